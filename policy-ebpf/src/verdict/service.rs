//! Service traffic: a pod's egress to a virtual IP is deferred (`SERVICE_PENDING`) until
//! DNAT has picked the backend, judged there (at the backend's hook, or in netfilter by
//! `service_judge`), and the client's virtual tuple granted for the replies.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use policy_common::{
    Addr, Direction, PENDING_SLOTS, PENDING_WINDOW_NS, PendingKey, PendingValue, ct, ct_flags,
    decide::decide, ep_flags,
};

use super::conntrack::{ct_key, ct_key4, is_syn};
use super::endpoints::far_endpoint;
use super::report::{count, report};
use crate::maps::{
    BpfMaps, Known, PENDING_ZERO, SCRATCH, SERVICE_CIDRS, SERVICE_PENDING, Scratch, same_addr,
};
use crate::parse::{Kind, Pkt, parse, parse_loaded};
use crate::{clock, ct_table};

/// The Service grant of a packet whose verdict at a hook after DNAT allowed a deferred
/// egress (tail-called by `run`, which counted the verdict already): the packet is parsed
/// again (its fields are not carried over: this program may be of another agent version
/// than the caller) and the client's virtual tuple granted. Always passes: the caller's
/// verdict was to pass.
#[inline(always)]
pub fn grant<const L2: usize>(ctx: &TcContext) -> i32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: as in `run` (the caller's run ended with the tail call).
    let pkt = unsafe { &mut (*scratch).pkt };
    if parse::<L2>(ctx, pkt).is_ok() {
        clock::stamp(pkt);
        grant_virtual_tuple(pkt, pkt.now);
    }
    TC_ACT_OK
}

/// Judges, in netfilter after kube-proxy's DNAT (the `service_judge` socket filter an
/// iptables rule runs on translated packets in INPUT and FORWARD), a packet whose Service
/// egress a pod hook deferred: the client's egress on the real destination, and the
/// virtual tuple granted when allowed. This covers the packets no later hook sees (a
/// backend on the node itself; a remote one behind an interface without programs).
/// Returns whether to drop. Anything else is not its business: passed.
#[inline(always)]
pub fn judge_translated(ctx: &TcContext) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot (see `run`; netfilter hooks do not nest on a CPU either).
    let Scratch {
        pkt,
        keys: _,
        known,
    } = unsafe { &mut *scratch };
    if parse_loaded::<0>(ctx, pkt).is_err() {
        return false;
    }
    clock::stamp(pkt);
    let pkt: &Pkt = pkt;
    if pkt.kind != Kind::Normal || pkt.malformed || !deferred(pkt) {
        return false;
    }
    known.src_state = Known::UNSEEN;
    known.dst_state = Known::UNSEEN;
    let (src, src_known) = far_endpoint(&pkt.src, &mut known.src_state, &mut known.src);
    if !src_known || src.flags & ep_flags::ISOLATED_EGRESS == 0 {
        return false;
    }
    let maps = BpfMaps { pkt, known };
    let reason = decide(
        &maps,
        &src,
        Direction::Egress,
        &pkt.dst,
        pkt.proto,
        pkt.policy_port,
    );
    count(reason, Direction::Egress);
    if reason.is_allow() {
        grant_virtual_tuple(pkt, pkt.now);
        return false;
    }
    report(ctx, Direction::Egress, reason, Some(pkt), src.endpoint_id);
    true
}

/// Whether a pod hook deferred this client socket's egress to a Service moments ago.
#[inline(always)]
fn deferred(pkt: &Pkt) -> bool {
    let Some(p) = pending_entry(pkt) else {
        return false;
    };
    let mut fresh = false;
    for i in 0..PENDING_SLOTS {
        // SAFETY: see defer_virtual_tuple.
        let s = unsafe { &(*p).slots[i] };
        if s.seen_ns != 0 && pkt.now.wrapping_sub(s.seen_ns) < PENDING_WINDOW_NS {
            fresh = true;
        }
    }
    fresh
}

/// The `SERVICE_PENDING` entry of a translated packet's client socket: a SYN's own (by
/// sequence number) first, else the one of its source port.
#[inline(always)]
fn pending_entry(pkt: &Pkt) -> Option<*mut PendingValue> {
    let mut entry = None;
    if is_syn(pkt) {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, true));
    }
    if entry.is_none() {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, false));
    }
    entry
}

/// What of a deferred packet survives DNAT: a SYN's sequence number, else its source port.
#[inline(always)]
fn pending_key(pkt: &Pkt, by_seq: bool) -> PendingKey {
    PendingKey {
        src: pkt.src,
        id: if by_seq {
            pkt.tcp_seq
        } else {
            pkt.sport as u32
        },
        proto: pkt.proto,
        by_seq: by_seq as u8,
        _pad: 0,
    }
}

/// Remembers the virtual tuple whose egress this `from_pod` deferred: a slot of its
/// `SERVICE_PENDING` entry (the same tuple's slot, else an empty or the oldest one).
#[inline(always)]
pub(super) fn defer_virtual_tuple(pkt: &Pkt, now: u64) {
    let k = pending_key(pkt, is_syn(pkt));
    let mut entry = SERVICE_PENDING.get_ptr_mut(&k);
    if entry.is_none() {
        let Some(zero) = PENDING_ZERO.get(0) else {
            return;
        };
        let _ = SERVICE_PENDING.insert(&k, zero, 0);
        entry = SERVICE_PENDING.get_ptr_mut(&k);
    }
    let Some(p) = entry else {
        return;
    };
    let mut pick = 0;
    let mut oldest = u64::MAX;
    for i in 0..PENDING_SLOTS {
        // SAFETY: `i` is in bounds; LRU values stay valid for the program's run (a race with
        // another CPU may at worst mix two slots' fields, which grants nothing that exists).
        let s = unsafe { &(*p).slots[i] };
        if s.seen_ns != 0
            && s.vport == pkt.dport
            && s.sport == pkt.sport
            && same_addr(&s.vip, &pkt.dst)
        {
            pick = i;
            break;
        }
        if s.seen_ns < oldest {
            oldest = s.seen_ns;
            pick = i;
        }
    }
    // SAFETY: as above.
    unsafe {
        let s = &mut (*p).slots[pick];
        // Word by word: a whole-struct copy between two map values becomes a `memmove`
        // call whose pointer subtraction an unprivileged verifier refuses.
        s.vip.0[0] = pkt.dst.0[0];
        s.vip.0[1] = pkt.dst.0[1];
        s.vip.0[2] = pkt.dst.0[2];
        s.vip.0[3] = pkt.dst.0[3];
        s.vport = pkt.dport;
        s.sport = pkt.sport;
        s.seen_ns = now;
    }
}

/// The client's egress was allowed on the real backend, at a hook after DNAT: grant the
/// client's entry of the virtual tuple too, so the reverse-NATed replies (from the virtual
/// IP) pass its pod's hook. Only a source whose egress its own hook did not grant gets here:
/// a tuple translated after that hook, or a pod whose veth has no program yet.
///
/// A SYN finds its own virtual tuple by sequence number. Any other packet finds the fresh
/// tuples its source port was deferred for: a UDP socket addressing several Services at once
/// has them all granted, an over-grant that only admits replies from those virtual IPs,
/// whose own backends still judge what the client sends them.
#[inline(always)]
fn grant_virtual_tuple(pkt: &Pkt, now: u64) {
    let Some(p) = pending_entry(pkt) else {
        return;
    };
    // The family is the packet's, decided once: a per-slot family test (and the IPv6
    // address comparison of a normalised key) multiplied the states the verifier walks
    // through the unrolled loop (this grant cost to_world most of its instruction budget).
    let v4 = pkt.src.is_v4();
    for i in 0..PENDING_SLOTS {
        // SAFETY: see defer_virtual_tuple.
        let s = unsafe { &mut (*p).slots[i] };
        if s.seen_ns == 0 || now.wrapping_sub(s.seen_ns) >= PENDING_WINDOW_NS {
            continue;
        }
        let found = if v4 {
            ct_table::get4(&ct_key4(
                pkt.src.0[3],
                s.vip.0[3],
                s.sport,
                s.vport,
                pkt.proto,
            ))
        } else {
            ct_table::get6(&ct_key(pkt.src, s.vip, s.sport, s.vport, pkt.proto))
        };
        if let Some(c) = found {
            // SAFETY: a conntrack slot (see `Ct::entry`).
            // Judged just now on the backend: decided under this epoch.
            unsafe {
                (*c).flags = ct::with_epoch((*c).flags | ct_flags::EGRESS_OK, pkt.epoch);
                (*c).last_seen_ns = now;
            }
        }
        // Used: a later packet cannot take it for another tuple.
        s.seen_ns = 0;
    }
}

/// The node's own address: delivered locally, no later hook would judge it, so never
/// deferred even when a (misconfigured) service range covers it.
#[inline(always)]
pub(super) fn is_host(maps: &BpfMaps, a: &Addr) -> bool {
    use policy_common::decide::PolicyMaps as _;
    matches!(maps.ipcache(&policy_common::IpCacheKey { addr: *a }), Some(v) if v.identity == policy_common::IDENTITY_HOST)
}

#[inline(always)]
pub(super) fn is_service(a: &Addr) -> bool {
    SERVICE_CIDRS.get(Key::new(128, *a)).is_some()
}
