//! The per-packet decision: endpoint, fragments, conntrack, ICMP errors, policy; then count,
//! report denies, and record what later packets need (conntrack, fragments).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use policy_common::{
    Addr, CtValue, DenyEvent, Direction, EndpointKey, EndpointValue, FragKey, FragValue,
    Reason, ct, ct_flags, decide::decide, proto,
};

use crate::maps::{
    BpfMaps, CONFIG, CONNTRACK, COUNTERS, ENDPOINTS, EVENT_BUDGET, EVENTS, FRAGMENTS, SCRATCH,
};
use crate::parse::{Kind, NoPkt, Pkt, parse};

#[inline(always)]
pub fn run(ctx: &TcContext, dir: Direction) -> i32 {
    let Some(pkt) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's slot, used by one program run at a time (TC programs do not nest
    // on a CPU: softirq and process context each run to completion with preemption off).
    let pkt = unsafe { &mut *pkt };
    match parse(ctx, pkt) {
        Ok(()) => {}
        Err(NoPkt::NotIp) => {
            count(Reason::AllowNonIp, dir);
            return TC_ACT_OK;
        }
        Err(NoPkt::BadL3) => {
            count(Reason::DenyMalformed, dir);
            report(ctx, dir, Reason::DenyMalformed, None, 0);
            return TC_ACT_SHOT;
        }
    };
    let pkt: &Pkt = pkt;
    let (reason, ep_id) = judge(pkt, dir);
    count(reason, dir);
    if reason.is_allow() {
        if pkt.first_fragment && ep_id.is_some() {
            record_fragment(pkt, reason);
        }
        TC_ACT_OK
    } else {
        report(ctx, dir, reason, Some(pkt), ep_id.unwrap_or(0));
        TC_ACT_SHOT
    }
}

/// The verdict and, when the endpoint is known, its id.
#[inline(always)]
fn judge(pkt: &Pkt, dir: Direction) -> (Reason, Option<u32>) {
    let egress = dir as u8 == Direction::Egress as u8;
    let (local, peer) = if egress { (&pkt.src, &pkt.dst) } else { (&pkt.dst, &pkt.src) };
    // Link-scoped control traffic (ND, DAD, MLD to and from link-local and multicast
    // addresses) never leaves the link and must flow for the pod to have IPv6 at all.
    if pkt.kind == Kind::NeighbourDiscovery || (link_scoped(local) && link_scoped(peer)) {
        return (Reason::AllowLinkLocal, None);
    }
    // SAFETY: the value is copied at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&EndpointKey { addr: *local }) }).copied() else {
        // Not a pod of this node: spoofed, or not known yet. Fail closed.
        return (Reason::DenyUnknownEndpoint, None);
    };
    let id = Some(ep.endpoint_id);
    let isolated = ep.isolated(dir);
    if !isolated && !ep.isolated(other(dir)) {
        return (Reason::AllowNotIsolated, id);
    }
    if pkt.malformed {
        return (if isolated { Reason::DenyMalformed } else { Reason::AllowNotIsolated }, id);
    }
    match pkt.kind {
        Kind::NonFirstFragment => (fragment_verdict(pkt, isolated), id),
        Kind::IcmpError => (related_verdict(pkt, dir, isolated), id),
        _ => (flow_verdict(pkt, &ep, dir, peer), id),
    }
}

#[inline(always)]
fn other(dir: Direction) -> Direction {
    if dir as u8 == Direction::Egress as u8 { Direction::Ingress } else { Direction::Egress }
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

#[inline(always)]
fn fragment_verdict(pkt: &Pkt, isolated: bool) -> Reason {
    if !isolated {
        return Reason::AllowNotIsolated;
    }
    let key = frag_key(pkt);
    // SAFETY: copied at once.
    match unsafe { FRAGMENTS.get(&key) } {
        Some(v) if now_coarse().saturating_sub(v.created_ns) <= ct::TIMEOUT_FRAGMENT_NS => {
            Reason::AllowFragment
        }
        _ => Reason::DenyFragment,
    }
}

#[inline(always)]
fn frag_key(pkt: &Pkt) -> FragKey {
    FragKey { src: pkt.src, dst: pkt.dst, id: pkt.frag_id, proto: pkt.frag_proto, _pad: [0; 3] }
}

#[inline(always)]
fn record_fragment(pkt: &Pkt, reason: Reason) {
    let v = FragValue { created_ns: now_coarse(), reason: reason as u32, _pad: 0 };
    let _ = FRAGMENTS.insert(&frag_key(pkt), &v, 0);
}

/// An ICMP error passes when the packet it quotes belongs to a connection this hook would
/// pass a reply of: the tuple is the quoted packet's, reversed.
#[inline(always)]
fn related_verdict(pkt: &Pkt, dir: Direction, isolated: bool) -> Reason {
    let (key, src_is_a) = ct::normalize(
        pkt.inner_dst,
        pkt.inner_src,
        pkt.inner_dport,
        pkt.inner_sport,
        pkt.inner_proto,
    );
    // SAFETY: copied at once.
    if let Some(v) = unsafe { CONNTRACK.get(&key) } {
        let v = *v;
        if !ct::expired(&v, key.proto, now_coarse())
            && v.flags & ct::required_flag(dir, ct::is_original(&v, src_is_a)) != 0
        {
            return Reason::AllowRelated;
        }
    }
    if isolated { Reason::DenyUnrelated } else { Reason::AllowNotIsolated }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & ct_flags::RST != 0
        || flags & (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
}

/// Conntrack, then the policy for what conntrack does not settle.
#[inline(always)]
fn flow_verdict(pkt: &Pkt, ep: &EndpointValue, dir: Direction, peer: &Addr) -> Reason {
    let (key, src_is_a) = ct::normalize(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    let now = now_coarse();
    let syn = pkt.proto == proto::TCP
        && pkt.tcp_flags & ct::tcp::SYN != 0
        && pkt.tcp_flags & ct::tcp::ACK == 0;
    let entry = CONNTRACK.get_ptr_mut(&key);
    // A live entry this packet may update (None: absent, expired, or a closed connection
    // whose tuple a new SYN reuses).
    let mut live: Option<*mut CtValue> = None;
    let mut original = true;
    if let Some(p) = entry {
        // SAFETY: LRU hash values stay valid for the program's run; races with other CPUs
        // may at worst lose a flag update, which the next packet repeats.
        let v = unsafe { *p };
        original = ct::is_original(&v, src_is_a);
        if !ct::expired(&v, pkt.proto, now) && !(syn && closing(v.flags)) {
            live = Some(p);
            // A SYN in the original direction is re-decided: the tuple may be reused by a
            // new connection that today's policy must judge.
            if !(syn && original) && v.flags & ct::required_flag(dir, original) != 0 {
                let mut f = v.flags;
                if !original {
                    f |= ct_flags::SEEN_REPLY;
                }
                if pkt.proto == proto::TCP {
                    f |= ct::tcp_state_flags(pkt.tcp_flags, original);
                }
                if f != v.flags || now.wrapping_sub(v.last_seen_ns) >= ct::REFRESH_INTERVAL_NS {
                    // SAFETY: see above.
                    unsafe {
                        (*p).flags = f;
                        (*p).last_seen_ns = now;
                    }
                }
                return Reason::AllowEstablished;
            }
        }
    }
    let reason = decide(&BpfMaps, ep, dir, peer, pkt.proto, pkt.policy_port);
    let granted = ct::granted_flag(dir);
    match live {
        None => {
            if reason.is_allow() {
                let mut flags = granted;
                if src_is_a {
                    flags |= ct_flags::ORIG_IS_A;
                }
                if pkt.proto == proto::TCP {
                    flags |= ct::tcp_state_flags(pkt.tcp_flags, true);
                }
                let v = CtValue { last_seen_ns: now, flags, _pad: 0 };
                let _ = CONNTRACK.insert(&key, &v, 0);
            }
        }
        Some(p) => {
            if original {
                // SAFETY: see above.
                unsafe {
                    if reason.is_allow() {
                        (*p).flags |= granted;
                        (*p).last_seen_ns = now;
                    } else if syn {
                        // Today's policy refuses the reused tuple: forget the old grant.
                        (*p).flags &= !granted;
                    }
                }
            }
        }
    }
    reason
}

#[inline(always)]
fn now_coarse() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn count(reason: Reason, dir: Direction) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason.counter_index(dir)) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Emits a deny event when the per-CPU token bucket has a token.
#[inline(always)]
fn report(ctx: &TcContext, dir: Direction, reason: Reason, pkt: Option<&Pkt>, ep_id: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(now) {
        return;
    }
    let Some(mut e) = EVENTS.reserve::<DenyEvent>(0) else {
        return;
    };
    let (src, dst, sport, dport, proto_nr) = match pkt {
        Some(p) => (p.src, p.dst, p.sport, p.dport, p.proto),
        None => (Addr([0; 4]), Addr([0; 4]), 0, 0, 0),
    };
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Field by field into the reservation: no 56-byte copy on the stack.
    let d: *mut DenyEvent = e.as_mut_ptr();
    // SAFETY: `d` points to a reserved, writable DenyEvent; every field is written.
    unsafe {
        (*d).timestamp_ns = now;
        (*d).src = src;
        (*d).dst = dst;
        (*d).src_port = sport;
        (*d).dst_port = dport;
        (*d).proto = proto_nr;
        (*d).direction = dir as u8;
        (*d).reason = reason as u8;
        (*d)._pad = 0;
        (*d).endpoint_id = ep_id;
        (*d).ifindex = ifindex;
    }
    e.submit(0);
}

#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    let rate = cfg.events_per_sec as u64;
    let burst = cfg.events_burst as u64;
    if rate == 0 {
        return false;
    }
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        // Capped so the product cannot overflow.
        let elapsed = now.saturating_sub((*b).last_refill_ns).min(1000 * ct::SEC);
        let add = elapsed * rate / ct::SEC;
        if add > 0 {
            let tokens = (*b).tokens + add;
            if tokens >= burst {
                (*b).tokens = burst;
                (*b).last_refill_ns = now;
            } else {
                (*b).tokens = tokens;
                // Keep the fraction of a token already earned.
                (*b).last_refill_ns += add * ct::SEC / rate;
            }
        }
        if (*b).tokens == 0 {
            return false;
        }
        (*b).tokens -= 1;
    }
    true
}
