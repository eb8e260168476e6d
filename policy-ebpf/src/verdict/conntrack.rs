//! The conntrack step: the connection's key (one builder per family, every byte written),
//! its entry found with one lookup, and the fast path of an entry that settles the packet.

use policy_common::{Addr, CtKey, CtKey4, CtValue, ct, ct_flags, proto};

use crate::ct_table;
use crate::maps::CtKeys;
use crate::parse::Pkt;

/// Writes every byte of an IPv6-table key in `ct::normalize`'s order and returns whether the
/// source is side A. The padding goes with `proto` as one word store: field by field, the 3
/// zero bytes become a `memset` call (a byte loop in BPF) on the hot path.
#[inline(always)]
fn key6_into(
    out: *mut CtKey,
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
    proto_nr: u8,
) -> bool {
    let src_is_a = ct::src_is_a(src, dst, sport, dport);
    let (a, b, pa, pb) = if src_is_a {
        (src, dst, sport, dport)
    } else {
        (dst, src, dport, sport)
    };
    // SAFETY: `out` is valid for writes; every byte is written: the addresses, the ports,
    // then `proto` and `_pad` as one little-endian word (proto first, zeros after).
    unsafe {
        (*out).addr_a = *a;
        (*out).addr_b = *b;
        (*out).port_a = pa;
        (*out).port_b = pb;
        core::ptr::write_volatile(
            (out as *mut u8).add(core::mem::offset_of!(CtKey, proto)) as *mut u32,
            u32::from_le_bytes([proto_nr, 0, 0, 0]),
        );
    }
    src_is_a
}

/// [`key6_into`] for `CONNTRACK4`'s compact key, from the addresses' last words (network
/// order): the IPv4-mapped prefixes are equal, so the last word decides the order.
#[inline(always)]
fn key4_into(out: *mut CtKey4, s: u32, d: u32, sport: u16, dport: u16, proto_nr: u8) -> bool {
    let (sh, dh) = (u32::from_be(s), u32::from_be(d));
    let src_is_a = sh < dh || (sh == dh && sport <= dport);
    if src_is_a {
        write_key4(out, s, d, sport, dport, proto_nr);
    } else {
        write_key4(out, d, s, dport, sport, proto_nr);
    }
    src_is_a
}

/// Writes every byte of a compact key whose sides are already in order.
#[inline(always)]
fn write_key4(out: *mut CtKey4, a: u32, b: u32, port_a: u16, port_b: u16, proto_nr: u8) {
    // SAFETY: as in `key6_into`.
    unsafe {
        (*out).addr_a = a;
        (*out).addr_b = b;
        (*out).port_a = port_a;
        (*out).port_b = port_b;
        core::ptr::write_volatile(
            (out as *mut u8).add(core::mem::offset_of!(CtKey4, proto)) as *mut u32,
            u32::from_le_bytes([proto_nr, 0, 0, 0]),
        );
    }
}

/// The IPv6-table key of a tuple built on the stack (ICMP errors, virtual tuples).
#[inline(always)]
pub(super) fn ct_key(src: Addr, dst: Addr, sport: u16, dport: u16, proto_nr: u8) -> CtKey {
    let mut out = core::mem::MaybeUninit::<CtKey>::uninit();
    key6_into(out.as_mut_ptr(), &src, &dst, sport, dport, proto_nr);
    // SAFETY: `key6_into` wrote every byte.
    unsafe { out.assume_init() }
}

/// [`ct_key`] for `CONNTRACK4`.
#[inline(always)]
pub(super) fn ct_key4(s: u32, d: u32, sport: u16, dport: u16, proto_nr: u8) -> CtKey4 {
    let mut out = core::mem::MaybeUninit::<CtKey4>::uninit();
    key4_into(out.as_mut_ptr(), s, d, sport, dport, proto_nr);
    // SAFETY: `key4_into` wrote every byte.
    unsafe { out.assume_init() }
}

/// The entry of a normalised key built on the stack, from the table of its family.
#[inline(always)]
pub(super) fn ct_get(k: &CtKey) -> Option<*mut CtValue> {
    if k.addr_a.is_v4() && k.addr_b.is_v4() {
        let mut out = core::mem::MaybeUninit::<CtKey4>::uninit();
        write_key4(
            out.as_mut_ptr(),
            k.addr_a.0[3],
            k.addr_b.0[3],
            k.port_a,
            k.port_b,
            k.proto,
        );
        // SAFETY: `write_key4` wrote every byte.
        let k4 = unsafe { out.assume_init() };
        ct_table::get4(&k4)
    } else {
        ct_table::get6(k)
    }
}

/// Whether a TCP connection is over: reset, or finished both ways (a new SYN may reuse its
/// tuple).
#[inline(always)]
pub(super) fn closing(flags: u32) -> bool {
    flags & ct_flags::RST != 0
        || flags & (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
}

/// A packet's conntrack lookup, done once per packet (its key is in the scratch map: a
/// 40-byte key on the stack would be zeroed by a `memset` byte loop before every lookup).
pub(super) struct Ct {
    /// Both addresses IPv4: the entry is in `CONNTRACK4` under `CtKeys::key4`.
    pub(super) v4: bool,
    pub(super) src_is_a: bool,
    /// A slot of a conntrack table (array memory, always valid). Races with other CPUs
    /// may at worst lose a flag update, which the next packet repeats.
    pub(super) entry: Option<*mut CtValue>,
}

#[inline(always)]
pub(super) fn ct_lookup(pkt: &Pkt, keys: &mut CtKeys) -> Ct {
    // (An IPv6 packet never carries IPv4-mapped addresses: the parser refuses them.)
    let v4 = pkt.src.is_v4() && pkt.dst.is_v4();
    let (src_is_a, entry) = if v4 {
        let src_is_a = key4_into(
            &mut keys.key4,
            pkt.src.0[3],
            pkt.dst.0[3],
            pkt.sport,
            pkt.dport,
            pkt.proto,
        );
        (src_is_a, ct_table::get4(&keys.key4))
    } else {
        let src_is_a = key6_into(
            &mut keys.key,
            &pkt.src,
            &pkt.dst,
            pkt.sport,
            pkt.dport,
            pkt.proto,
        );
        (src_is_a, ct_table::get6(&keys.key))
    };
    Ct {
        v4,
        src_is_a,
        entry,
    }
}

#[inline(always)]
pub(super) fn is_syn(pkt: &Pkt) -> bool {
    pkt.proto == proto::TCP
        && pkt.tcp_flags & ct::tcp::SYN != 0
        && pkt.tcp_flags & ct::tcp::ACK == 0
}

/// A packet of a live connection passing as established: what it shows (a reply seen, TCP
/// state) is marked and the stamp refreshed, written only on a change or once per
/// `REFRESH_INTERVAL_NS` (a store per packet would bounce the slot's cache line).
#[inline(always)]
pub(super) fn refresh(p: *mut CtValue, v: &CtValue, original: bool, pkt: &Pkt) {
    let mut f = v.flags;
    if !original {
        f |= ct_flags::SEEN_REPLY;
    }
    if pkt.proto == proto::TCP {
        f |= ct::tcp_state_flags(pkt.tcp_flags, original);
    }
    if f != v.flags || pkt.now.wrapping_sub(v.last_seen_ns) >= ct::REFRESH_INTERVAL_NS {
        // SAFETY: a conntrack slot (see `Ct::entry`).
        unsafe {
            (*p).flags = f;
            (*p).last_seen_ns = pkt.now;
        }
    }
}

/// A live entry decided under the policy epoch in force and holding every grant its
/// connection needed then: the packet passes as established (and refreshes the entry).
/// An entry of an older epoch goes the full way, where the connection is judged again.
#[inline(always)]
pub(super) fn ct_fast_hit(pkt: &Pkt, ct: &Ct) -> bool {
    let Some(p) = ct.entry else {
        return false;
    };
    // SAFETY: a conntrack slot (see `Ct::entry`), copied at once.
    let v = unsafe { *p };
    let original = ct::is_original(&v, ct.src_is_a);
    let syn = is_syn(pkt);
    if ct::expired(&v, pkt.proto, pkt.now)
        || (syn && (original || closing(v.flags)))
        || !ct::current(&v, pkt.epoch)
        || !ct::has_grants(&v, ct::stored_required(&v))
    {
        return false;
    }
    refresh(p, &v, original, pkt);
    true
}
