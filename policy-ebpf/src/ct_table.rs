//! Conntrack lookups and inserts over the set-associative tables of `policy_common::ct_table`
//! (its docs hold the slot protocol). No helper call: the bucket is an inlined array lookup
//! and the slots are compared here.

use core::ptr::{read_volatile as rd, write_volatile as wr};

use policy_common::{
    CtKey, CtKey4, CtValue, ct_flags,
    ct_table::{CT_OWNER_SHARE, CT_WAYS, CtSlot4, CtSlot6, bucket4, bucket6, seq_holds_key},
};

use crate::maps::{CONFIG, CONNTRACK, CONNTRACK4, CT_WAY};

/// What the generic code needs of a slot type.
pub trait Slot {
    type Key;
    /// The key words of `s` equal `k`'s (read volatile: the seq check brackets them).
    fn key_eq(s: *const Self, k: &Self::Key) -> bool;
    fn write_key(s: *mut Self, k: &Self::Key);
    fn seq(s: *mut Self) -> *mut u64;
    fn value(s: *mut Self) -> *mut CtValue;
}

/// `n` 32-bit words at `a` and `b` are equal.
#[inline(always)]
fn words_eq<const N: usize>(a: *const u32, b: *const u32) -> bool {
    let mut i = 0;
    while i < N {
        // SAFETY: the callers pass pointers to keys of at least N words.
        if unsafe { rd(a.add(i)) != rd(b.add(i)) } {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn words_copy<const N: usize>(dst: *mut u32, src: *const u32) {
    let mut i = 0;
    while i < N {
        // SAFETY: as in `words_eq`.
        unsafe { wr(dst.add(i), rd(src.add(i))) };
        i += 1;
    }
}

/// The `Slot` impl of a slot type whose key is `$words` aligned 32-bit words.
macro_rules! slot_impl {
    ($slot:ty, $key:ty, $words:literal) => {
        impl Slot for $slot {
            type Key = $key;
            #[inline(always)]
            fn key_eq(s: *const Self, k: &$key) -> bool {
                // SAFETY: `s` points to a slot; the key is `$words` aligned words.
                let a = unsafe { &raw const (*s).key } as *const u32;
                words_eq::<$words>(a, k as *const $key as *const u32)
            }
            #[inline(always)]
            fn write_key(s: *mut Self, k: &$key) {
                // SAFETY: as above.
                let a = unsafe { &raw mut (*s).key } as *mut u32;
                words_copy::<$words>(a, k as *const $key as *const u32)
            }
            #[inline(always)]
            fn seq(s: *mut Self) -> *mut u64 {
                // SAFETY: as above.
                unsafe { &raw mut (*s).seq }
            }
            #[inline(always)]
            fn value(s: *mut Self) -> *mut CtValue {
                // SAFETY: as above.
                unsafe { &raw mut (*s).value }
            }
        }
    };
}
slot_impl!(CtSlot4, CtKey4, 4);
slot_impl!(CtSlot6, CtKey, 10);

/// Compare-and-swap of a map value's word (BPF_ATOMIC | BPF_CMPXCHG, fully ordered):
/// returns the value found.
#[inline(always)]
unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64(r1 + 0, r0, r2)",
            inout("r0") r0,
            in("r1") p,
            in("r2") new,
            options(nostack)
        )
    };
    r0
}

/// Atomic add (with fetch: fully ordered, so the writes before it are seen first).
#[inline(always)]
unsafe fn fetch_add(p: *mut u64, v: u64) {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::arch::asm!(
            "r2 = atomic_fetch_add((u64 *)(r1 + 0), r2)",
            in("r1") p,
            inout("r2") v => _,
            options(nostack)
        )
    };
}

#[inline(always)]
fn seed() -> u32 {
    match CONFIG.get(0) {
        Some(c) => c.ct_seed,
        None => 0,
    }
}

/// The value of `k`'s slot, if a slot holds `k`.
///
/// The way found goes through `CT_WAY` (map memory, written and read back volatile): the
/// pointer returned then has one shape, "bucket + unknown way", instead of one per way,
/// or the verifier would walk everything after a conntrack lookup once per way.
#[inline(always)]
fn find<S: Slot>(slots: *mut S, k: &S::Key) -> Option<*mut CtValue> {
    let way = CT_WAY.get_ptr_mut(0)?;
    let mut found = false;
    let mut i = 0;
    while i < CT_WAYS {
        // SAFETY: `slots` points to a bucket of CT_WAYS slots.
        let s = unsafe { slots.add(i) };
        // SAFETY: a slot's seq word.
        let seq = unsafe { rd(S::seq(s)) };
        if seq_holds_key(seq) && S::key_eq(s, k) && unsafe { rd(S::seq(s)) } == seq {
            // SAFETY: this CPU's slot of CT_WAY.
            unsafe { wr(way, i as u32) };
            found = true;
            break;
        }
        i += 1;
    }
    if !found {
        return None;
    }
    // SAFETY: as above; masked into the bucket.
    let i = unsafe { rd(way) } as usize & (CT_WAYS - 1);
    // SAFETY: `i` < CT_WAYS.
    Some(S::value(unsafe { slots.add(i) }))
}

/// Writes `k` -> `v` (a key no slot holds) over the slot of its bucket that matters least:
/// a connection not (or no longer) answered before an established one, then the least
/// recently seen; and when `v`'s owner already holds [`CT_OWNER_SHARE`] slots of the
/// bucket, one of its own. So a flood of new flows, which stay unanswered, churns the
/// unanswered slots, and no pod's flows, answered or not, take more than its share of a
/// bucket from the others.
/// Gives up when that slot is being written by another CPU: nothing recorded, the next packet
/// decides again. (Few branches: every path that records a connection goes through here,
/// and the verifier walks each.)
#[inline(always)]
fn put<S: Slot>(slots: *mut S, k: &S::Key, v: &CtValue) {
    let owner = v.owner;
    let mut held = 0;
    let mut i = 0;
    while i < CT_WAYS {
        // SAFETY: `slots` points to a bucket of CT_WAYS slots.
        let s = unsafe { slots.add(i) };
        // SAFETY: as above.
        let (seq, o) = unsafe { (rd(S::seq(s)), rd(&raw const (*S::value(s)).owner)) };
        if owner != 0 && seq_holds_key(seq) && o == owner {
            held += 1;
        }
        i += 1;
    }
    let own_only = held >= CT_OWNER_SHARE;
    let mut pick_way = 0u32;
    let mut lowest = u64::MAX;
    let mut i = 0;
    while i < CT_WAYS {
        // SAFETY: as above.
        let s = unsafe { slots.add(i) };
        // SAFETY: as above.
        let o = unsafe { rd(&raw const (*S::value(s)).owner) };
        if !own_only || o == owner {
            // SAFETY: as above.
            let rank = unsafe { eviction_rank(S::value(s)) };
            if rank < lowest {
                lowest = rank;
                pick_way = i as u32;
            }
        }
        i += 1;
    }
    // Through `CT_WAY` (see `find`): one pointer shape after the choice, not one per way
    // and per path that led to it, or the verifier walks the rest once per combination.
    let Some(way) = CT_WAY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of CT_WAY; the way read back is masked into the bucket.
    let pick = unsafe {
        wr(way, pick_way);
        slots.add(rd(way) as usize & (CT_WAYS - 1))
    };
    let seq = S::seq(pick);
    // SAFETY: pointers into the bucket's map value.
    unsafe {
        let cur = rd(seq);
        if cur & 1 != 0 || cmpxchg(seq, cur, cur + 1) != cur {
            return;
        }
        S::write_key(pick, k);
        let d = S::value(pick);
        wr(&raw mut (*d).flags, v.flags);
        wr(&raw mut (*d).owner, v.owner);
        wr(&raw mut (*d).last_seen_ns, v.last_seen_ns);
        fetch_add(seq, 1);
    }
}

/// Lower goes first: the last-seen stamp, with the top bit set for an established connection
/// (a reply seen, not reset).
///
/// # Safety
/// `v` points to a slot's value in a conntrack table.
#[inline(always)]
unsafe fn eviction_rank(v: *mut CtValue) -> u64 {
    // SAFETY: the caller's pointer; racing writers may at worst skew one choice.
    let (flags, seen) = unsafe { (rd(&raw const (*v).flags), rd(&raw const (*v).last_seen_ns)) };
    let established = flags & (ct_flags::SEEN_REPLY | ct_flags::RST) == ct_flags::SEEN_REPLY;
    (seen & !(1 << 63)) | ((established as u64) << 63)
}

/// `CONNTRACK4`'s entry of `k`.
#[inline(always)]
pub fn get4(k: &CtKey4) -> Option<*mut CtValue> {
    let b = CONNTRACK4.get_ptr_mut(bucket4(k, seed()))?;
    // SAFETY: a bucket is an array of slots.
    find(unsafe { &raw mut (*b).slots } as *mut CtSlot4, k)
}

/// `CONNTRACK`'s entry of `k`.
#[inline(always)]
pub fn get6(k: &CtKey) -> Option<*mut CtValue> {
    let b = CONNTRACK.get_ptr_mut(bucket6(k, seed()))?;
    // SAFETY: as above.
    find(unsafe { &raw mut (*b).slots } as *mut CtSlot6, k)
}

#[inline(always)]
pub fn insert4(k: &CtKey4, v: &CtValue) {
    if let Some(b) = CONNTRACK4.get_ptr_mut(bucket4(k, seed())) {
        // SAFETY: as above.
        put(unsafe { &raw mut (*b).slots } as *mut CtSlot4, k, v);
    }
}

#[inline(always)]
pub fn insert6(k: &CtKey, v: &CtValue) {
    if let Some(b) = CONNTRACK.get_ptr_mut(bucket6(k, seed())) {
        // SAFETY: as above.
        put(unsafe { &raw mut (*b).slots } as *mut CtSlot6, k, v);
    }
}
