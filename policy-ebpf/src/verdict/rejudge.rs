//! A reply on a connection decided under an older policy epoch: the connection is judged
//! again from its originator's side, as a new one would be (replies are no new
//! connections). A program of its own (`rejudge`), tail-called by the hooks (`run`): their
//! stack and verifier budget have no room for a second, mirrored decision.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use policy_common::{Direction, Reason, ct, ct_flags, decide::decide, proto};

use super::conntrack::{ct_lookup, refresh};
use super::endpoints::far_endpoint;
use super::report::{count, report};
use super::service::is_service;
use crate::clock;
use crate::maps::{BpfMaps, CtKeys, Known, SCRATCH, Scratch};
use crate::parse::{Pkt, parse};

/// Decides, counts and reports the reply the caller found on a stale entry (the packet is
/// parsed again: its fields are not carried over, as this program may be of another agent
/// version than the caller).
#[inline(always)]
pub fn rejudge<const L2: usize>(ctx: &TcContext) -> i32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: as in `run` (the caller's run ended with the tail call).
    let Scratch { pkt, keys, known } = unsafe { &mut *scratch };
    if parse::<L2>(ctx, pkt).is_err() {
        return TC_ACT_SHOT;
    }
    clock::stamp(pkt);
    let pkt: &Pkt = pkt;
    // SAFETY: reading the control block the caller wrote (`run`).
    let hook_dir = if unsafe { (*ctx.skb.skb).cb[0] } == Direction::Egress as u32 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let (reason, dir, ep) = rejudge_reply(pkt, keys, known, hook_dir);
    count(reason, dir);
    if reason.is_allow() {
        TC_ACT_OK
    } else {
        report(ctx, dir, reason, Some(pkt), ep);
        TC_ACT_SHOT
    }
}

/// The verdict, the direction it is counted in (an allowed one in the hook's, a refused one
/// in the refusing policy's), and the endpoint whose policy refused.
#[inline(always)]
fn rejudge_reply(
    pkt: &Pkt,
    keys: &mut CtKeys,
    known: &mut Known,
    hook_dir: Direction,
) -> (Reason, Direction, u32) {
    let ct = ct_lookup(pkt, keys);
    let Some(p) = ct.entry else {
        // Gone since the caller looked: nothing admits the reply any more.
        return (Reason::DenyPolicy, hook_dir, 0);
    };
    // SAFETY: a conntrack slot (see `Ct::entry`), copied at once.
    let v = unsafe { *p };
    if ct::is_original(&v, ct.src_is_a) || ct::expired(&v, pkt.proto, pkt.now) {
        return (Reason::DenyPolicy, hook_dir, 0);
    }
    // The connection's ends: its originator is this reply's destination.
    known.src_state = Known::UNSEEN;
    known.dst_state = Known::UNSEEN;
    let (responder, _) = far_endpoint(&pkt.src, &mut known.src_state, &mut known.src);
    let (originator, _) = far_endpoint(&pkt.dst, &mut known.dst_state, &mut known.dst);
    let need = ct::required_grants(Some(&originator), Some(&responder));
    // Another CPU judged it meanwhile; or a reply from a Service's virtual IP, whose
    // backend's real tuple was judged on the way here (at the backend's hook, or arriving
    // from its node): the virtual tuple is judged again with the client's next packet,
    // where DNAT is still ahead.
    if (ct::current(&v, pkt.epoch) && ct::has_grants(&v, need)) || is_service(&pkt.src) {
        refresh(p, &v, false, pkt);
        return (Reason::AllowEstablished, hook_dir, 0);
    }
    let maps = BpfMaps { pkt, known };
    // The connection's destination port is this reply's source port.
    let port = if pkt.proto == proto::TCP || pkt.proto == proto::UDP || pkt.proto == proto::SCTP {
        pkt.sport
    } else {
        pkt.policy_port
    };
    let mut granted = 0;
    if need & ct_flags::EGRESS_OK != 0 {
        let r = decide(
            &maps,
            &originator,
            Direction::Egress,
            &pkt.src,
            pkt.proto,
            port,
        );
        if !r.is_allow() {
            return (r, Direction::Egress, originator.endpoint_id);
        }
        granted |= ct_flags::EGRESS_OK;
    }
    if need & ct_flags::INGRESS_OK != 0 {
        let r = decide(
            &maps,
            &responder,
            Direction::Ingress,
            &pkt.dst,
            pkt.proto,
            port,
        );
        if !r.is_allow() {
            return (r, Direction::Ingress, responder.endpoint_id);
        }
        granted |= ct_flags::INGRESS_OK;
    }
    let mut seen = ct_flags::SEEN_REPLY;
    if pkt.proto == proto::TCP {
        seen |= ct::tcp_state_flags(pkt.tcp_flags, false);
    }
    let flags = (v.flags & !ct_flags::GRANTS & !ct_flags::REQ_MASK)
        | granted
        | (need << ct_flags::REQ_SHIFT)
        | seen;
    // SAFETY: a conntrack slot (see `Ct::entry`).
    unsafe {
        (*p).flags = ct::with_epoch(flags, pkt.epoch);
        (*p).last_seen_ns = pkt.now;
    }
    (Reason::AllowEstablished, hook_dir, 0)
}
