//! The per-packet decision, one job per module, in the order a packet meets them:
//!
//! - [`endpoints`]: the hook's own pod (bound to its interface) and the far side;
//! - [`conntrack`]: the connection's entry, one lookup; an entry holding its grants settles
//!   the packet;
//! - [`fragments`], [`icmp_errors`]: packets without a whole flow of their own, judged by
//!   the flow they belong to;
//! - [`flow`]: the two-sided decision (source's egress, destination's ingress) for the
//!   grants conntrack does not hold yet, recorded for later packets;
//! - [`service`]: egress to a Service deferred until DNAT picks the backend, and the
//!   grant of the client's virtual tuple;
//! - [`rejudge`]: a reply on a connection decided under an older policy epoch, judged
//!   again from the originator's side (a tail call);
//! - [`report`]: every verdict counted, denies reported.

mod conntrack;
mod endpoints;
mod flow;
mod fragments;
mod icmp_errors;
mod rejudge;
mod report;
mod service;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use policy_common::{
    Addr, Direction, EndpointValue, GRANT_ETHERNET, GRANT_L3, REJUDGE_ETHERNET, REJUDGE_L3, Reason,
    ct, ep_flags,
};

use crate::clock;
use crate::maps::{BpfMaps, CtKeys, GRANTS, Known, REJUDGES, SCRATCH, Scratch};
use crate::parse::{Kind, NoPkt, Pkt, parse};
use conntrack::{ct_fast_hit, ct_lookup};
use endpoints::{OWN_BOUND, OWN_UNBOUND, endpoints, own_endpoint};
use flow::flow_verdict;
use fragments::{fragment_verdict, record_fragment};
use icmp_errors::related_verdict;
pub use rejudge::rejudge;
use report::{count, report};
pub use service::{grant, judge_translated};

/// Where a program runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of a pod's host-side veth: what the pod sends.
    FromPod,
    /// TC egress of a pod's host-side veth: what is sent to the pod.
    ToPod,
    /// TC ingress of an uplink (any non-pod interface).
    FromWorld,
    /// TC egress of an uplink.
    ToWorld,
}

impl Hook {
    /// The direction verdicts are counted in: packets leaving local pods count as egress.
    #[inline(always)]
    fn dir(self) -> Direction {
        match self {
            Hook::FromPod | Hook::ToWorld => Direction::Egress,
            Hook::ToPod | Hook::FromWorld => Direction::Ingress,
        }
    }
}

/// Decides one packet at `hook`, whose link header is `L2` bytes long (14 on Ethernet, 0 on
/// an L3 device).
#[inline(always)]
pub fn run<const L2: usize>(ctx: &TcContext, hook: Hook) -> i32 {
    let dir = hook.dir();
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's slot, used by one program run at a time (TC programs do not nest
    // on a CPU: softirq and process context each run to completion with preemption off).
    let Scratch { pkt, keys, known } = unsafe { &mut *scratch };
    match parse::<L2>(ctx, pkt) {
        Ok(()) => {}
        Err(e) => {
            let reason = unparsed(e, hook);
            count(reason, dir);
            if reason.is_allow() {
                return TC_ACT_OK;
            }
            report(ctx, dir, reason, None, 0);
            return TC_ACT_SHOT;
        }
    };
    clock::stamp(pkt);
    let pkt: &Pkt = pkt;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (reason, ep_id, decider) = judge(pkt, keys, known, hook, ifindex);
    if decider == Decider::Rejudge {
        let slot = if L2 == 0 {
            REJUDGE_L3
        } else {
            REJUDGE_ETHERNET
        };
        // SAFETY: the skb's control block is the program's to write (it carries the hook's
        // direction to `rejudge`, which counts an allowed packet in it); then a tail call:
        // on success `rejudge` decides, counts and reports the packet.
        unsafe {
            (*ctx.skb.skb).cb[0] = dir as u32;
            REJUDGES.tail_call(ctx, slot)
        };
        // The slot is empty: the connection cannot be judged, so it is not admitted.
        count(Reason::DenyPolicy, dir);
        return TC_ACT_SHOT;
    }
    // A policy deny is counted and reported in the direction of the endpoint whose policy
    // refused (at a client's hook that may be the destination's ingress).
    let dir = match decider {
        Decider::Egress => Direction::Egress,
        Decider::Ingress => Direction::Ingress,
        Decider::Hook | Decider::HookGrants | Decider::Rejudge => dir,
    };
    count(reason, dir);
    if reason.is_allow() {
        if pkt.first_fragment && (ep_id.is_some() || reason as u8 == Reason::AllowEstablished as u8)
        {
            record_fragment(pkt, reason);
        }
        if decider == Decider::HookGrants {
            // The Service grant: a tail call once the verdict is counted (`grant`),
            // verified apart from this program.
            let slot = if L2 == 0 { GRANT_L3 } else { GRANT_ETHERNET };
            // SAFETY: a tail call; on success this program ends here (the grant program
            // returns TC_ACT_OK: the same verdict). When the slot is empty it returns, and
            // the reply of this connection then finds no grant: refused, never opened.
            unsafe { GRANTS.tail_call(ctx, slot) };
        }
        TC_ACT_OK
    } else {
        report(ctx, dir, reason, Some(pkt), ep_id.unwrap_or(0));
        TC_ACT_SHOT
    }
}

/// The verdict on a frame the parser could not make a packet of. A pod's hook judges its
/// pod's traffic: what it cannot judge does not pass (ARP aside, which a pod needs to reach
/// its gateway at all). On an uplink such a frame concerns no endpoint we could name.
#[inline(always)]
fn unparsed(e: NoPkt, hook: Hook) -> Reason {
    let uplink = matches!(hook, Hook::FromWorld | Hook::ToWorld);
    match e {
        NoPkt::Arp => Reason::AllowNonIp,
        NoPkt::NotIp if uplink => Reason::AllowNonIp,
        NoPkt::NotIp => Reason::DenyNonIp,
        NoPkt::BadL3 if uplink => Reason::AllowNoEndpoint,
        NoPkt::BadL3 => Reason::DenyMalformed,
    }
}

/// Whose policy settled a verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Decider {
    /// The hook itself (its direction, its own endpoint).
    Hook,
    /// The source's egress policy.
    Egress,
    /// The destination's ingress policy.
    Ingress,
    /// The hook, and the verdict grants a deferred Service egress: the client's virtual
    /// tuple is to be granted (tail call to `grant`).
    HookGrants,
    /// Nobody yet: a reply on a stale entry, judged by a tail call to `rejudge`.
    Rejudge,
}

/// The verdict, the id of the endpoint it concerns when one is involved (the hook's own pod
/// first, else the endpoint whose policy refused), and whose policy settled it.
#[inline(always)]
fn judge(
    pkt: &Pkt,
    keys: &mut CtKeys,
    known: &mut Known,
    hook: Hook,
    ifindex: u32,
) -> (Reason, Option<u32>, Decider) {
    let pod_hook = matches!(hook, Hook::FromPod | Hook::ToPod);
    // A pod's own side is bound to its interface before anything else (conntrack
    // included): a pod sending with another pod's address is refused, whatever tuple it
    // imitates. Link-local sources serve neighbour discovery only.
    let mut own = EndpointValue::default();
    if hook == Hook::FromPod && link_scoped(&pkt.src) {
        if pkt.kind == Kind::NeighbourDiscovery {
            return (Reason::AllowLinkLocal, None, Decider::Hook);
        }
        return (Reason::DenySpoofed, None, Decider::Hook);
    }
    // Link-scoped control traffic (ND, DAD, MLD to and from link-local and multicast
    // addresses) never leaves the link and must flow for the pod to have IPv6 at all.
    if hook != Hook::FromPod
        && (pkt.kind == Kind::NeighbourDiscovery
            || (link_scoped(&pkt.src) && link_scoped(&pkt.dst)))
    {
        return (Reason::AllowLinkLocal, None, Decider::Hook);
    }
    if pod_hook {
        let own_addr = if hook == Hook::FromPod {
            &pkt.src
        } else {
            &pkt.dst
        };
        let (v, state) = own_endpoint(ifindex, own_addr);
        if state == OWN_UNBOUND && hook == Hook::FromPod {
            return (Reason::DenySpoofed, None, Decider::Hook);
        }
        if state != OWN_BOUND {
            // Not (yet) this interface's pod: fail closed.
            return (Reason::DenyUnknownEndpoint, None, Decider::Hook);
        }
        if pkt.kind == Kind::NeighbourDiscovery {
            return (Reason::AllowLinkLocal, Some(v.endpoint_id), Decider::Hook);
        }
        own = v;
    }
    // Conntrack: at a pod's hook an entry holding every grant it recorded as needed
    // settles the packet without the far side's lookups. (Uplinks decide "no endpoint"
    // before using it.) Looked up for every packet, used only for whole ones: the lookup
    // makes no call, and a conditional one left LLVM carrying values over paths that never
    // set them, uninitialised reads the verifier refuses without CAP_SYS_ADMIN.
    let ct = ct_lookup(pkt, keys);
    let whole = pkt.kind == Kind::Normal && !pkt.malformed;
    if whole && pod_hook && ct_fast_hit(pkt, &ct) {
        return (
            Reason::AllowEstablished,
            Some(own.endpoint_id),
            Decider::Hook,
        );
    }
    // A missing endpoint reads as all zeros: isolated in no direction, so it never needs a
    // grant. (Plain values, no Option payloads: the verifier rejects spilled uninit bytes.)
    let ((src, src_known), (dst, dst_known)) = endpoints(pkt, known, hook, own);
    let own = match hook {
        Hook::FromPod | Hook::ToWorld => {
            if src_known {
                src.endpoint_id
            } else {
                dst.endpoint_id
            }
        }
        Hook::ToPod | Hook::FromWorld => {
            if dst_known {
                dst.endpoint_id
            } else {
                src.endpoint_id
            }
        }
    };
    match hook {
        // A local pod's address never arrives from outside the node: its own veth is the
        // only way in for it.
        Hook::FromWorld if src_known => return (Reason::DenySpoofed, Some(own), Decider::Hook),
        // The node's own traffic, or transit: none of our business.
        Hook::FromWorld | Hook::ToWorld if !src_known && !dst_known => {
            return (Reason::AllowNoEndpoint, None, Decider::Hook);
        }
        _ => {}
    }
    let id = Some(own);
    // Nobody isolated: passes. A whole packet still goes through conntrack (below), which
    // records its connection's originator: once a change isolates either end, the
    // connection is judged again from the right side (`Config::policy_epoch`), where the
    // first packet seen after the change could only guess (a server's push would pass for
    // a new connection of its own, and the client's data for its replies).
    if (src.flags | dst.flags) & (ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS) == 0
        && !whole
    {
        return (Reason::AllowNotIsolated, id, Decider::Hook);
    }
    // Whether this packet, taken as a new connection, needs a grant.
    let isolated = ct::required_grants(Some(&src), Some(&dst)) != 0;
    if pkt.malformed {
        return (
            if isolated {
                Reason::DenyMalformed
            } else {
                Reason::AllowNotIsolated
            },
            id,
            Decider::Hook,
        );
    }
    match pkt.kind {
        Kind::NonFirstFragment => (fragment_verdict(pkt, isolated), id, Decider::Hook),
        Kind::IcmpError => {
            let maps = BpfMaps { pkt, known };
            (related_verdict(pkt, isolated, &maps), id, Decider::Hook)
        }
        _ => {
            let maps = BpfMaps { pkt, known };
            let (r, by) = flow_verdict(pkt, hook, &src, &dst, keys, &ct, &maps);
            let id = match by {
                Decider::Egress => src.endpoint_id,
                Decider::Ingress => dst.endpoint_id,
                Decider::Hook | Decider::HookGrants | Decider::Rejudge => own,
            };
            (r, Some(id), by)
        }
    }
}

/// `fe80::/10`, `ff00::/8` and `::` (IPv6 only).
#[inline(always)]
fn link_scoped(a: &Addr) -> bool {
    if a.is_v4() {
        return false;
    }
    let o = a.0[0].to_ne_bytes();
    (o[0] == 0xfe && o[1] & 0xc0 == 0x80)
        || o[0] == 0xff
        || (a.0[0] == 0 && a.0[1] == 0 && a.0[2] == 0 && a.0[3] == 0)
}
