//! Connection tracking rules shared by the kernel and the agent's model: key normalisation,
//! which flag a packet needs, and idle timeouts.

use crate::addr::Addr;
use crate::maps::{CtKey, CtValue, EndpointValue, ct_flags, ep_flags};
use crate::proto;

pub const SEC: u64 = 1_000_000_000;
/// TCP after the handshake was answered.
pub const TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * SEC;
/// TCP before any reply, UDP, SCTP and other protocols.
pub const TIMEOUT_TCP_SYN_NS: u64 = 60 * SEC;
pub const TIMEOUT_UDP_NS: u64 = 60 * SEC;
pub const TIMEOUT_SCTP_NS: u64 = 300 * SEC;
pub const TIMEOUT_ICMP_NS: u64 = 30 * SEC;
pub const TIMEOUT_OTHER_NS: u64 = 60 * SEC;
/// After RST, or FIN from both sides.
pub const TIMEOUT_CLOSING_NS: u64 = 10 * SEC;
/// `last_seen_ns` is rewritten at most this often on a hit (saves cache-line writes).
pub const REFRESH_INTERVAL_NS: u64 = SEC;
/// A non-first fragment is accepted this long after its first fragment.
pub const TIMEOUT_FRAGMENT_NS: u64 = 30 * SEC;

/// Builds the normalised key of a packet and tells whether the packet's source is side `a`.
#[inline(always)]
pub fn normalize(src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> (CtKey, bool) {
    let src_first = src_is_a(&src, &dst, sport, dport);
    let key = if src_first {
        CtKey {
            addr_a: src,
            addr_b: dst,
            port_a: sport,
            port_b: dport,
            proto,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            addr_a: dst,
            addr_b: src,
            port_a: dport,
            port_b: sport,
            proto,
            _pad: [0; 3],
        }
    };
    (key, src_first)
}

/// Whether a packet's source is side `a` of its normalised key (see [`normalize`]).
#[inline(always)]
pub fn src_is_a(src: &Addr, dst: &Addr, sport: u16, dport: u16) -> bool {
    match cmp_addr(src, dst) {
        core::cmp::Ordering::Less => true,
        core::cmp::Ordering::Greater => false,
        core::cmp::Ordering::Equal => sport <= dport,
    }
}

/// Byte-order comparison of two addresses (words hold network-order bytes).
#[inline(always)]
fn cmp_addr(x: &Addr, y: &Addr) -> core::cmp::Ordering {
    let mut i = 0;
    while i < 4 {
        let a = u32::from_be(x.0[i]);
        let b = u32::from_be(y.0[i]);
        if a != b {
            return if a < b {
                core::cmp::Ordering::Less
            } else {
                core::cmp::Ordering::Greater
            };
        }
        i += 1;
    }
    core::cmp::Ordering::Equal
}

/// Whether the packet goes in the connection's original direction.
#[inline(always)]
pub const fn is_original(v: &CtValue, src_is_a: bool) -> bool {
    (v.flags & ct_flags::ORIG_IS_A != 0) == src_is_a
}

/// The grants a connection needs, from the endpoints at its two ends (`None`: not a local
/// endpoint): `EGRESS_OK` when the originator is isolated for egress, `INGRESS_OK` when the
/// responder is isolated for ingress. Any hook may decide either grant.
#[inline(always)]
// Nested on purpose: this runs in the kernel programs, whose verifier headroom is small, and
// let-chains compile to other instructions (measured: 15 fewer, unverified).
#[allow(clippy::collapsible_if)]
pub const fn required_grants(
    orig_src: Option<&EndpointValue>,
    orig_dst: Option<&EndpointValue>,
) -> u32 {
    let mut r = 0;
    if let Some(e) = orig_src {
        if e.flags & ep_flags::ISOLATED_EGRESS != 0 {
            r |= ct_flags::EGRESS_OK;
        }
    }
    if let Some(e) = orig_dst {
        if e.flags & ep_flags::ISOLATED_INGRESS != 0 {
            r |= ct_flags::INGRESS_OK;
        }
    }
    r
}

/// The grants an entry needed at its last decision (stored in its flags).
#[inline(always)]
pub const fn stored_required(v: &CtValue) -> u32 {
    (v.flags >> ct_flags::REQ_SHIFT) & ct_flags::GRANTS
}

/// Whether an entry holds every grant in `required`.
#[inline(always)]
pub const fn has_grants(v: &CtValue, required: u32) -> bool {
    v.flags & required == required
}

/// Whether an entry's grants were decided under `epoch` (`Config::policy_epoch`): if not,
/// its next packet judges the connection again as a new one would be.
#[inline(always)]
pub const fn current(v: &CtValue, epoch: u32) -> bool {
    (v.flags ^ (epoch << ct_flags::EPOCH_SHIFT)) & ct_flags::EPOCH_MASK == 0
}

/// `flags` stamped with `epoch`.
#[inline(always)]
pub const fn with_epoch(flags: u32, epoch: u32) -> u32 {
    (flags & !ct_flags::EPOCH_MASK) | (epoch << ct_flags::EPOCH_SHIFT)
}

/// The epoch after `e`: a Gray-code counter over [`ct_flags::EPOCH_BITS`] bits, so one bit
/// changes per bump (see `Config::policy_epoch`) and it takes 2^20 bumps to come back.
pub const fn next_epoch(e: u32) -> u32 {
    let mask = u32::MAX >> (32 - ct_flags::EPOCH_BITS);
    // Gray -> binary (prefix XOR), +1, binary -> Gray.
    let mut n = e & mask;
    let mut shift = 1;
    while shift < 32 {
        n ^= n >> shift;
        shift <<= 1;
    }
    let n = n.wrapping_add(1) & mask;
    n ^ (n >> 1)
}

/// Idle lifetime of an entry.
#[inline(always)]
pub const fn timeout_ns(proto_nr: u8, flags: u32) -> u64 {
    if flags & ct_flags::RST != 0
        || flags & (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
    {
        return TIMEOUT_CLOSING_NS;
    }
    match proto_nr {
        proto::TCP => {
            if flags & ct_flags::SEEN_REPLY != 0 {
                TIMEOUT_TCP_ESTABLISHED_NS
            } else {
                TIMEOUT_TCP_SYN_NS
            }
        }
        proto::UDP => TIMEOUT_UDP_NS,
        proto::SCTP => TIMEOUT_SCTP_NS,
        proto::ICMP | proto::ICMPV6 => TIMEOUT_ICMP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}

/// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`.
#[inline(always)]
pub const fn expired(v: &CtValue, proto_nr: u8, now_ns: u64) -> bool {
    now_ns.saturating_sub(v.last_seen_ns) > timeout_ns(proto_nr, v.flags)
}

/// TCP flag bits as in the header's 13th byte.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The conntrack flags a TCP packet adds to its entry.
#[inline(always)]
pub const fn tcp_state_flags(tcp_flags: u8, original: bool) -> u32 {
    let mut f = 0;
    if tcp_flags & tcp::RST != 0 {
        f |= ct_flags::RST;
    }
    if tcp_flags & tcp::FIN != 0 {
        f |= if original {
            ct_flags::FIN_ORIG
        } else {
            ct_flags::FIN_REPLY
        };
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_share_a_key() {
        let a = Addr::from_v4_octets([198, 18, 0, 1]);
        let b = Addr::from_v4_octets([198, 18, 0, 2]);
        let (k1, s1) = normalize(a, b, 40000, 80, proto::TCP);
        let (k2, s2) = normalize(b, a, 80, 40000, proto::TCP);
        assert_eq!(k1, k2);
        assert!(s1 && !s2);
    }

    #[test]
    fn the_compact_ipv4_key_keeps_the_normalised_order() {
        let a = Addr::from_v4_octets([198, 18, 0, 1]);
        let b = Addr::from_v4_octets([198, 19, 0, 2]);
        let v6 = Addr::from_v6_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        for (s, d, sp, dp) in [
            (a, b, 40000, 80),
            (b, a, 80, 40000),
            (a, a, 5, 4),
            (a, a, 4, 5),
        ] {
            let (k, src_is_a) = normalize(s, d, sp, dp, proto::UDP);
            let k4 = k.v4().expect("two IPv4 addresses");
            assert_eq!(k4.widen(), k);
            assert_eq!(src_is_a, super::src_is_a(&s, &d, sp, dp));
            // The compact order is the order of the last word's bytes, then the ports.
            let (sh, dh) = (u32::from_be(s.0[3]), u32::from_be(d.0[3]));
            assert_eq!(src_is_a, sh < dh || (sh == dh && sp <= dp));
        }
        assert!(normalize(a, v6, 1, 2, proto::TCP).0.v4().is_none());
    }

    #[test]
    fn the_epoch_changes_one_bit_per_bump_and_cycles_through_every_value() {
        let mut e = 0;
        // One bit per value: every value is met once before the cycle closes.
        let mut seen = [0u64; (1 << ct_flags::EPOCH_BITS) / 64];
        for _ in 0..(1u32 << ct_flags::EPOCH_BITS) {
            let (w, b) = ((e / 64) as usize, e % 64);
            assert!(seen[w] & (1 << b) == 0, "{e:#x} repeated early");
            seen[w] |= 1 << b;
            let n = next_epoch(e);
            assert_eq!((n ^ e).count_ones(), 1, "{e:#x} -> {n:#x}");
            assert_eq!(n >> ct_flags::EPOCH_BITS, 0);
            e = n;
        }
        assert_eq!(e, 0, "a full cycle");
    }

    #[test]
    fn an_entry_is_current_only_under_its_own_epoch() {
        let flags = ct_flags::ORIG_IS_A | ct_flags::EGRESS_OK | ct_flags::REQ_EGRESS;
        let v = CtValue {
            last_seen_ns: 0,
            flags: with_epoch(flags, 5),
            owner: 0,
        };
        assert!(current(&v, 5));
        assert!(!current(&v, 4) && !current(&v, next_epoch(5)));
        assert_eq!(
            v.flags & !ct_flags::EPOCH_MASK,
            flags,
            "the other flags stay"
        );
        let old = CtValue { flags, ..v };
        assert!(current(&old, 0), "entries of older agents carry epoch 0");
    }

    #[test]
    fn required_grants_follow_the_isolated_ends() {
        let ep = |flags| EndpointValue {
            endpoint_id: 1,
            ingress_policy_set: 0,
            egress_policy_set: 0,
            flags,
        };
        let eg = ep(ep_flags::ISOLATED_EGRESS);
        let ing = ep(ep_flags::ISOLATED_INGRESS);
        let both = ep(ep_flags::ISOLATED_EGRESS | ep_flags::ISOLATED_INGRESS);
        assert_eq!(required_grants(None, None), 0);
        assert_eq!(required_grants(Some(&eg), None), ct_flags::EGRESS_OK);
        assert_eq!(
            required_grants(Some(&ing), None),
            0,
            "the originator's ingress is irrelevant"
        );
        assert_eq!(required_grants(None, Some(&ing)), ct_flags::INGRESS_OK);
        assert_eq!(required_grants(Some(&both), Some(&both)), ct_flags::GRANTS);
        let v = CtValue {
            last_seen_ns: 0,
            flags: ct_flags::REQ_EGRESS | ct_flags::INGRESS_OK,
            owner: 0,
        };
        assert_eq!(stored_required(&v), ct_flags::EGRESS_OK);
        assert!(!has_grants(&v, stored_required(&v)));
    }
}
