//! The agent's side of the conntrack tables (`policy_common::ct_table`): both arrays are
//! mapped into memory (`BPF_F_MMAPABLE`) and their slots read and written under the same
//! sequence-lock protocol as the kernel's, with real atomics, so seeding and tests may write
//! while programs run.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::atomic::{AtomicU64, Ordering, fence};

use aya::maps::{Map, MapData};
use policy_common::{
    CtKey, CtKey4, CtValue, MAP_CONNTRACK, MAP_CONNTRACK4,
    ct_table::{
        CT_BUCKETS, CT_WAYS, CtBucket4, CtBucket6, CtSlot4, CtSlot6, bucket4, bucket6,
        seq_holds_key,
    },
};

use super::DataplaneError;

/// One array, mapped.
struct Mapped<B> {
    ptr: *mut B,
    len: usize,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is shared memory accessed only through volatile and atomic operations
// under the slot protocol; the pointer is owned by this value.
unsafe impl<B> Send for Mapped<B> {}
// SAFETY: as above.
unsafe impl<B> Sync for Mapped<B> {}

impl<B> Mapped<B> {
    fn new(name: &'static str, map: Map) -> Result<Self, DataplaneError> {
        let data = match map {
            Map::Array(d) => d,
            _ => {
                return Err(DataplaneError::CtLayout {
                    map: name,
                    detail: "not an array".into(),
                });
            }
        };
        let info = data.info().map_err(|e| DataplaneError::map(name, e))?;
        if info.value_size() as usize != size_of::<B>() || info.max_entries() != CT_BUCKETS {
            return Err(DataplaneError::CtLayout {
                map: name,
                detail: format!(
                    "{} x {} B, this agent's layout is {} x {} B",
                    info.max_entries(),
                    info.value_size(),
                    CT_BUCKETS,
                    size_of::<B>()
                ),
            });
        }
        let bytes = CT_BUCKETS as usize * size_of::<B>();
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's own memory, its size; checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                map: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapped {
            ptr: p as *mut B,
            len: CT_BUCKETS as usize,
            _map: data,
        })
    }

    fn bucket(&self, i: u32) -> *mut B {
        // SAFETY: `i` is masked to the bucket count by the hash; bounds asserted anyway.
        assert!((i as usize) < self.len);
        unsafe { self.ptr.add(i as usize) }
    }
}

impl<B> Drop for Mapped<B> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len * size_of::<B>()) };
    }
}

/// What the generic code needs of a slot type (user side).
trait Slot: Copy {
    type Key: Copy + PartialEq;
    fn seq(s: *mut Self) -> *mut u64;
    fn key(s: *const Self) -> Self::Key;
    fn set_key(s: *mut Self, k: Self::Key);
    fn value(s: *mut Self) -> *mut CtValue;
}

macro_rules! slot_impl {
    ($slot:ty, $key:ty) => {
        impl Slot for $slot {
            type Key = $key;
            fn seq(s: *mut Self) -> *mut u64 {
                // SAFETY: `s` points to a mapped slot.
                unsafe { &raw mut (*s).seq }
            }
            fn key(s: *const Self) -> $key {
                // SAFETY: as above; volatile: other CPUs write it.
                unsafe { std::ptr::read_volatile(&raw const (*s).key) }
            }
            fn set_key(s: *mut Self, k: $key) {
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(&raw mut (*s).key, k) }
            }
            fn value(s: *mut Self) -> *mut CtValue {
                // SAFETY: as above.
                unsafe { &raw mut (*s).value }
            }
        }
    };
}
slot_impl!(CtSlot4, CtKey4);
slot_impl!(CtSlot6, CtKey);

/// The slot's seq word. Used transiently, within a `&self`/`&mut self` of the tables that
/// own the mapping.
fn seq_of<'a, S: Slot>(s: *mut S) -> &'a AtomicU64 {
    // SAFETY: an aligned u64 in a live shared mapping, only ever accessed atomically (here)
    // or by the kernel's atomics and volatile reads.
    unsafe { AtomicU64::from_ptr(S::seq(s)) }
}

/// The key and value a slot holds, read consistently (None: empty or being written).
fn read_slot<S: Slot>(s: *mut S) -> Option<(S::Key, CtValue)> {
    let seq = seq_of(s).load(Ordering::Acquire);
    if !seq_holds_key(seq) {
        return None;
    }
    let k = S::key(s);
    // SAFETY: `s` points to a mapped slot.
    let v = unsafe { std::ptr::read_volatile(S::value(s)) };
    fence(Ordering::Acquire);
    (seq_of(s).load(Ordering::Relaxed) == seq).then_some((k, v))
}

fn find<S: Slot>(slots: *mut S, k: &S::Key) -> Option<CtValue> {
    (0..CT_WAYS).find_map(|i| {
        // SAFETY: a bucket holds CT_WAYS slots.
        let s = unsafe { slots.add(i) };
        read_slot(s).filter(|(key, _)| key == k).map(|(_, v)| v)
    })
}

fn put<S: Slot>(
    name: &'static str,
    slots: *mut S,
    k: &S::Key,
    v: &CtValue,
) -> Result<(), DataplaneError> {
    // A few tries: a slot the kernel is writing is free again within nanoseconds.
    for _ in 0..64 {
        // The key's own slot, else the least recently seen (the kernel's policy).
        let mut pick = None;
        let mut oldest = u64::MAX;
        for i in 0..CT_WAYS {
            // SAFETY: a bucket holds CT_WAYS slots.
            let s = unsafe { slots.add(i) };
            let seq = seq_of(s).load(Ordering::Acquire);
            if seq_holds_key(seq) && S::key(s) == *k {
                pick = Some((s, seq));
                break;
            }
            // SAFETY: as above.
            let seen = unsafe { std::ptr::read_volatile(&raw const (*S::value(s)).last_seen_ns) };
            if seen < oldest {
                oldest = seen;
                pick = Some((s, seq));
            }
        }
        let Some((s, seq)) = pick else { continue };
        if seq & 1 != 0
            || seq_of(s)
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            std::hint::spin_loop();
            continue;
        }
        S::set_key(s, *k);
        // SAFETY: as above; the slot is claimed.
        unsafe { std::ptr::write_volatile(S::value(s), CtValue { owner: 0, ..*v }) };
        seq_of(s).fetch_add(1, Ordering::Release);
        return Ok(());
    }
    Err(DataplaneError::BucketBusy { map: name })
}

fn clear_slot<S: Slot>(s: *mut S) {
    loop {
        let seq = seq_of(s).load(Ordering::Acquire);
        if seq == 0 {
            return;
        }
        if seq & 1 == 0
            && seq_of(s)
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            // SAFETY: claimed; zero key and value, then mark it never used.
            unsafe { std::ptr::write_bytes(s as *mut u8, 0, size_of::<S>()) };
            seq_of(s).store(0, Ordering::Release);
            return;
        }
        std::hint::spin_loop();
    }
}

/// Both conntrack tables.
pub struct CtTables {
    v4: Mapped<CtBucket4>,
    v6: Mapped<CtBucket6>,
    /// `Config::ct_seed`, kept in step with `CONFIG` by `DataplaneMaps`.
    pub(crate) seed: u32,
}

impl CtTables {
    pub(crate) fn new(v6: Map, v4: Map, seed: u32) -> Result<Self, DataplaneError> {
        Ok(CtTables {
            v4: Mapped::new(MAP_CONNTRACK4, v4)?,
            v6: Mapped::new(MAP_CONNTRACK, v6)?,
            seed,
        })
    }

    fn slots4(&self, k: &CtKey4) -> *mut CtSlot4 {
        let b = self.v4.bucket(bucket4(k, self.seed));
        // SAFETY: a bucket is an array of slots.
        unsafe { &raw mut (*b).slots as *mut CtSlot4 }
    }

    fn slots6(&self, k: &CtKey) -> *mut CtSlot6 {
        let b = self.v6.bucket(bucket6(k, self.seed));
        // SAFETY: as above.
        unsafe { &raw mut (*b).slots as *mut CtSlot6 }
    }

    /// The entry of a normalised key, from the table of its family.
    pub fn get(&self, k: &CtKey) -> Option<CtValue> {
        match k.v4() {
            Some(k4) => find(self.slots4(&k4), &k4),
            None => find(self.slots6(k), k),
        }
    }

    /// Stores `k` -> `v` as the kernel would (evicting by the same policy).
    pub fn set(&mut self, k: &CtKey, v: &CtValue) -> Result<(), DataplaneError> {
        match k.v4() {
            Some(k4) => put(MAP_CONNTRACK4, self.slots4(&k4), &k4, v),
            None => put(MAP_CONNTRACK, self.slots6(k), k, v),
        }
    }

    /// Every entry (IPv4 keys widened), in no particular order.
    pub fn entries(&self) -> Vec<(CtKey, CtValue)> {
        let mut out = Vec::new();
        for b in 0..CT_BUCKETS {
            // SAFETY: in bounds; a bucket is an array of slots.
            let s4 = unsafe { &raw mut (*self.v4.bucket(b)).slots as *mut CtSlot4 };
            let s6 = unsafe { &raw mut (*self.v6.bucket(b)).slots as *mut CtSlot6 };
            for i in 0..CT_WAYS {
                // SAFETY: as above.
                let (a, c) = unsafe { (s4.add(i), s6.add(i)) };
                out.extend(read_slot(a).map(|(k, v)| (k.widen(), v)));
                out.extend(read_slot(c));
            }
        }
        out
    }

    /// Empties both tables.
    pub fn clear(&mut self) {
        for b in 0..CT_BUCKETS {
            // SAFETY: as in `entries`.
            let s4 = unsafe { &raw mut (*self.v4.bucket(b)).slots as *mut CtSlot4 };
            let s6 = unsafe { &raw mut (*self.v6.bucket(b)).slots as *mut CtSlot6 };
            for i in 0..CT_WAYS {
                // SAFETY: as above.
                unsafe {
                    clear_slot(s4.add(i));
                    clear_slot(s6.add(i));
                }
            }
        }
    }
}
