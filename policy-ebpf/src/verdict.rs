//! The per-packet decision: endpoint, fragments, conntrack, ICMP errors, policy; then count,
//! report denies, and record what later packets need (conntrack, fragments).

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use policy_common::{
    Addr, BindingKey, CtKey, CtKey4, CtValue, DenyEvent, Direction, EndpointKey, EndpointValue,
    FragKey, FragValue, GRANT_ETHERNET, GRANT_L3, IpCacheKey, IpCacheValue, PENDING_SLOTS,
    PENDING_WINDOW_NS, PendingKey, Reason, ct, ct_flags, decide::decide, ep_flags, ipc_flags,
    proto,
};

use crate::maps::{
    BINDINGS, BpfMaps, CONFIG, COUNTERS, CtKeys, ENDPOINTS, EP_CACHE, EP_CACHE_SLOTS, EVENT_BUDGET,
    EVENTS, FRAGMENTS, GRANTS, IPCACHE, Known, PENDING_ZERO, SCRATCH, SERVICE_CIDRS,
    SERVICE_PENDING, Scratch, same_addr,
};
use crate::parse::{Kind, NoPkt, Pkt, parse, parse_loaded};
use crate::{clock, ct_table};

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
    pkt.now = clock::now();
    let pkt: &Pkt = pkt;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (reason, ep_id, decider) = judge(pkt, keys, known, hook, ifindex);
    // A policy deny is counted and reported in the direction of the endpoint whose policy
    // refused (at a client's hook that may be the destination's ingress).
    let dir = match decider {
        Decider::Egress => Direction::Egress,
        Decider::Ingress => Direction::Ingress,
        Decider::Hook | Decider::HookGrants => dir,
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
        pkt.now = clock::now();
        grant_virtual_tuple(pkt, pkt.now);
    }
    TC_ACT_OK
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
    pkt.now = clock::now();
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
    let syn = is_syn(pkt);
    let mut entry = None;
    if syn {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, true));
    }
    if entry.is_none() {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, false));
    }
    let Some(p) = entry else {
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

/// An endpoint and whether it exists: a missing one reads as all zeros (isolated in no
/// direction). Plain values, no `Option` payloads: an unset payload spilled to the stack is
/// uninitialised memory, which the verifier refuses to read back without CAP_SYS_ADMIN.
#[inline(always)]
fn endpoint(addr: &Addr) -> (EndpointValue, bool) {
    // SAFETY: the value is copied at once.
    match unsafe { ENDPOINTS.get(&EndpointKey { addr: *addr }) } {
        Some(v) => (*v, true),
        None => (EndpointValue::default(), false),
    }
}

/// [`own_endpoint`]'s answers: the pair (interface, address) is bound and its endpoint
/// known; the pair is not bound (not this pod's address); bound, but no endpoint (yet).
const OWN_BOUND: u32 = 0;
const OWN_UNBOUND: u32 = 1;
const OWN_UNKNOWN: u32 = 2;

/// The hook's own endpoint, if `addr` is an address of the pod behind interface `ifindex`:
/// from this CPU's `EP_CACHE` slot of the interface and family when it was filled for this
/// address under the current `Config::endpoints_gen`, else from `BINDINGS` and `ENDPOINTS`
/// (and the slot refilled). A slot is filled only for a bound pair, and the agent bumps
/// the generation after every `ENDPOINTS` change and every `BINDINGS` removal, so a
/// cached value never outlives the binding or the entry it was read from.
#[inline(always)]
fn own_endpoint(ifindex: u32, addr: &Addr) -> (EndpointValue, u32) {
    let generation = match CONFIG.get(0) {
        Some(c) => c.endpoints_gen,
        None => return bound_endpoint(ifindex, addr),
    };
    let slot = ((ifindex << 1) | !addr.is_v4() as u32) & (EP_CACHE_SLOTS - 1);
    let Some(s) = EP_CACHE.get_ptr_mut(slot) else {
        return bound_endpoint(ifindex, addr);
    };
    // SAFETY: this CPU's slot (see `Scratch`); field by field, no struct copies.
    unsafe {
        if (*s).ifindex == ifindex && (*s).generation == generation && same_addr(&(*s).addr, addr) {
            return ((*s).value, OWN_BOUND);
        }
        let (v, state) = bound_endpoint(ifindex, addr);
        if state == OWN_BOUND {
            (*s).ifindex = ifindex;
            (*s).generation = generation;
            (*s).addr.0[0] = addr.0[0];
            (*s).addr.0[1] = addr.0[1];
            (*s).addr.0[2] = addr.0[2];
            (*s).addr.0[3] = addr.0[3];
            (*s).value.endpoint_id = v.endpoint_id;
            (*s).value.ingress_policy_set = v.ingress_policy_set;
            (*s).value.egress_policy_set = v.egress_policy_set;
            (*s).value.flags = v.flags;
        }
        (v, state)
    }
}

/// [`own_endpoint`] without the cache: the binding, then the endpoint.
#[inline(always)]
fn bound_endpoint(ifindex: u32, addr: &Addr) -> (EndpointValue, u32) {
    let key = BindingKey {
        ifindex,
        addr: *addr,
    };
    // SAFETY: presence only.
    if unsafe { BINDINGS.get(&key) }.is_none() {
        return (EndpointValue::default(), OWN_UNBOUND);
    }
    match endpoint(addr) {
        (v, true) => (v, OWN_BOUND),
        (v, false) => (v, OWN_UNKNOWN),
    }
}

/// The endpoint at the far side of a hook, through `IPCACHE`: its entry (recorded in
/// `state`/`value` for the decision, which needs the identity anyway) says whether the
/// address is a local endpoint at all, so a peer off the node costs one lookup.
#[inline(always)]
fn far_endpoint(addr: &Addr, state: &mut u32, value: &mut IpCacheValue) -> (EndpointValue, bool) {
    // SAFETY: the value is copied at once.
    match unsafe { IPCACHE.get(&IpCacheKey { addr: *addr }) } {
        Some(v) => {
            *value = *v;
            *state = Known::HIT;
            if v.flags & ipc_flags::LOCAL_ENDPOINT != 0 {
                return endpoint(addr);
            }
        }
        None => *state = Known::MISS,
    }
    (EndpointValue::default(), false)
}

/// Both ends' endpoints: at a pod hook the pod's own (`own`, bound to the interface by
/// [`own_endpoint`]) and the far side through `IPCACHE` ([`far_endpoint`]); at an uplink
/// both through `IPCACHE`.
#[inline(always)]
fn endpoints(
    pkt: &Pkt,
    known: &mut Known,
    hook: Hook,
    own: EndpointValue,
) -> ((EndpointValue, bool), (EndpointValue, bool)) {
    known.src_state = Known::UNSEEN;
    known.dst_state = Known::UNSEEN;
    match hook {
        Hook::FromPod => (
            (own, true),
            far_endpoint(&pkt.dst, &mut known.dst_state, &mut known.dst),
        ),
        Hook::ToPod => (
            far_endpoint(&pkt.src, &mut known.src_state, &mut known.src),
            (own, true),
        ),
        Hook::FromWorld | Hook::ToWorld => (
            far_endpoint(&pkt.src, &mut known.src_state, &mut known.src),
            far_endpoint(&pkt.dst, &mut known.dst_state, &mut known.dst),
        ),
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
    if (src.flags | dst.flags) & (ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS) == 0 {
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
                Decider::Hook | Decider::HookGrants => own,
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

#[inline(always)]
fn fragment_verdict(pkt: &Pkt, isolated: bool) -> Reason {
    if !isolated {
        return Reason::AllowNotIsolated;
    }
    let key = frag_key(pkt);
    // SAFETY: copied at once.
    match unsafe { FRAGMENTS.get(&key) } {
        Some(v) if pkt.now.saturating_sub(v.created_ns) <= ct::TIMEOUT_FRAGMENT_NS => {
            Reason::AllowFragment
        }
        _ => Reason::DenyFragment,
    }
}

/// Built with the padding written by one word store (as in `ct_key`): field by field, the
/// 3 zero bytes become a `memset` call.
#[inline(always)]
fn frag_key(pkt: &Pkt) -> FragKey {
    let mut out = core::mem::MaybeUninit::<FragKey>::uninit();
    let p = out.as_mut_ptr();
    // SAFETY: every byte of `out` is written: addresses, id, then proto and `_pad` together.
    unsafe {
        (*p).src = pkt.src;
        (*p).dst = pkt.dst;
        (*p).id = pkt.frag_id;
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(FragKey, proto)) as *mut u32,
            u32::from_le_bytes([pkt.frag_proto, 0, 0, 0]),
        );
        out.assume_init()
    }
}

#[inline(always)]
fn record_fragment(pkt: &Pkt, reason: Reason) {
    let v = FragValue {
        created_ns: pkt.now,
        reason: reason as u32,
        _pad: 0,
    };
    let _ = FRAGMENTS.insert(&frag_key(pkt), &v, 0);
}

/// An ICMP error passes when it travels the reverse path of a live connection holding
/// every grant it needed: the tuple is the quoted packet's ([`reverse_path`]).
#[inline(always)]
fn related_verdict(pkt: &Pkt, isolated: bool, maps: &BpfMaps) -> Reason {
    if !isolated {
        return Reason::AllowNotIsolated;
    }
    if !reverse_path(pkt, maps) {
        return Reason::DenyUnrelated;
    }
    let (key, _) = ct_key(
        pkt.inner_dst,
        pkt.inner_src,
        pkt.inner_dport,
        pkt.inner_sport,
        pkt.inner_proto,
    );
    if let Some(p) = ct_get(&key) {
        // SAFETY: copied at once.
        let v = unsafe { *p };
        if !ct::expired(&v, key.proto, pkt.now) && ct::has_grants(&v, ct::stored_required(&v)) {
            return Reason::AllowRelated;
        }
    }
    Reason::DenyUnrelated
}

/// Whether an ICMP error comes back the way its quoted packet went: it is addressed to the
/// quoted packet's source, and it comes from the quoted packet's destination, from the
/// node (a router on every path of its pods), or from a router beyond the node, which
/// can be on the path only when the quoted destination is off the node too. Never from
/// another local pod: quoting someone else's flow opens nothing.
#[inline(always)]
fn reverse_path(pkt: &Pkt, maps: &BpfMaps) -> bool {
    use policy_common::decide::PolicyMaps as _;
    if !same_addr(&pkt.dst, &pkt.inner_src) {
        return false;
    }
    if same_addr(&pkt.src, &pkt.inner_dst) {
        return true;
    }
    if let Some(v) = maps.ipcache(&IpCacheKey { addr: pkt.src }) {
        if v.identity == policy_common::IDENTITY_HOST {
            return true;
        }
        if v.flags & ipc_flags::LOCAL_ENDPOINT != 0 {
            return false;
        }
    }
    match maps.ipcache(&IpCacheKey {
        addr: pkt.inner_dst,
    }) {
        Some(v) => {
            v.flags & ipc_flags::LOCAL_ENDPOINT == 0 && v.identity != policy_common::IDENTITY_HOST
        }
        None => true,
    }
}

/// `ct::normalize`, with the key's padding written by one word store: built field by field,
/// the 3 zero bytes become a `memset` call (a byte loop in BPF) on the hot path.
#[inline(always)]
fn ct_key(src: Addr, dst: Addr, sport: u16, dport: u16, proto_nr: u8) -> (CtKey, bool) {
    let (k, src_is_a) = ct::normalize(src, dst, sport, dport, proto_nr);
    let mut out = core::mem::MaybeUninit::<CtKey>::uninit();
    let p = out.as_mut_ptr();
    // SAFETY: every byte of `out` is written: the addresses, the ports, then `proto` and
    // `_pad` together as one little-endian word (proto in the first byte, zeros after).
    unsafe {
        (*p).addr_a = k.addr_a;
        (*p).addr_b = k.addr_b;
        (*p).port_a = k.port_a;
        (*p).port_b = k.port_b;
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(CtKey, proto)) as *mut u32,
            u32::from_le_bytes([k.proto, 0, 0, 0]),
        );
        (out.assume_init(), src_is_a)
    }
}

/// [`ct_key`] written in place, every byte, straight from the packet's fields (no
/// normalised copy in registers spilled to the stack first).
#[inline(always)]
fn ct_key_into(out: &mut CtKey, pkt: &Pkt) -> bool {
    let src_is_a = ct::src_is_a(&pkt.src, &pkt.dst, pkt.sport, pkt.dport);
    let (a, b, pa, pb) = if src_is_a {
        (&pkt.src, &pkt.dst, pkt.sport, pkt.dport)
    } else {
        (&pkt.dst, &pkt.src, pkt.dport, pkt.sport)
    };
    let p: *mut CtKey = out;
    // SAFETY: plain stores into a valid &mut; `proto` and `_pad` as one little-endian word
    // (proto in the first byte, zeros after), as in `ct_key`.
    unsafe {
        (*p).addr_a = *a;
        (*p).addr_b = *b;
        (*p).port_a = pa;
        (*p).port_b = pb;
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(CtKey, proto)) as *mut u32,
            u32::from_le_bytes([pkt.proto, 0, 0, 0]),
        );
    }
    src_is_a
}

/// The compact key of an IPv4 packet, written in place (every byte). The same order as
/// `ct::normalize`: the mapped prefixes are equal, so the last word decides.
#[inline(always)]
fn ct_key4_into(out: &mut CtKey4, pkt: &Pkt) -> bool {
    let (s, d) = (pkt.src.0[3], pkt.dst.0[3]);
    let (sh, dh) = (u32::from_be(s), u32::from_be(d));
    let src_is_a = sh < dh || (sh == dh && pkt.sport <= pkt.dport);
    let p: *mut CtKey4 = out;
    // SAFETY: plain stores into a valid &mut; `proto` and `_pad` as one word (see `ct_key`).
    unsafe {
        if src_is_a {
            (*p).addr_a = s;
            (*p).addr_b = d;
            (*p).port_a = pkt.sport;
            (*p).port_b = pkt.dport;
        } else {
            (*p).addr_a = d;
            (*p).addr_b = s;
            (*p).port_a = pkt.dport;
            (*p).port_b = pkt.sport;
        }
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(CtKey4, proto)) as *mut u32,
            u32::from_le_bytes([pkt.proto, 0, 0, 0]),
        );
    }
    src_is_a
}

/// The compact key of an IPv4 tuple given by its words (network order) and ports, in
/// `ct::normalize`'s order (see `ct_key4_into`).
#[inline(always)]
fn ct_key4(s: u32, d: u32, sport: u16, dport: u16, proto_nr: u8) -> CtKey4 {
    let (sh, dh) = (u32::from_be(s), u32::from_be(d));
    let src_is_a = sh < dh || (sh == dh && sport <= dport);
    let mut out = core::mem::MaybeUninit::<CtKey4>::uninit();
    let p = out.as_mut_ptr();
    // SAFETY: every byte of `out` is written, proto and padding as one word (see `ct_key`).
    unsafe {
        if src_is_a {
            (*p).addr_a = s;
            (*p).addr_b = d;
            (*p).port_a = sport;
            (*p).port_b = dport;
        } else {
            (*p).addr_a = d;
            (*p).addr_b = s;
            (*p).port_a = dport;
            (*p).port_b = sport;
        }
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(CtKey4, proto)) as *mut u32,
            u32::from_le_bytes([proto_nr, 0, 0, 0]),
        );
        out.assume_init()
    }
}

/// The entry of a normalised key built on the stack (ICMP errors, virtual tuples), from the
/// map of its family.
#[inline(always)]
fn ct_get(k: &CtKey) -> Option<*mut CtValue> {
    if k.addr_a.is_v4() && k.addr_b.is_v4() {
        let mut out = core::mem::MaybeUninit::<CtKey4>::uninit();
        let p = out.as_mut_ptr();
        // SAFETY: every byte of `out` is written, proto and padding as one word.
        let k4 = unsafe {
            (*p).addr_a = k.addr_a.0[3];
            (*p).addr_b = k.addr_b.0[3];
            (*p).port_a = k.port_a;
            (*p).port_b = k.port_b;
            core::ptr::write_volatile(
                (p as *mut u8).add(core::mem::offset_of!(CtKey4, proto)) as *mut u32,
                u32::from_le_bytes([k.proto, 0, 0, 0]),
            );
            out.assume_init()
        };
        ct_table::get4(&k4)
    } else {
        ct_table::get6(k)
    }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & ct_flags::RST != 0
        || flags & (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
}

/// Conntrack, then the policy for the grants conntrack does not hold yet.
#[inline(always)]
fn flow_verdict(
    pkt: &Pkt,
    hook: Hook,
    src: &EndpointValue,
    dst: &EndpointValue,
    keys: &CtKeys,
    ct: &Ct,
    maps: &BpfMaps,
) -> (Reason, Decider) {
    let src_is_a = ct.src_is_a;
    let now = pkt.now;
    let syn = is_syn(pkt);
    // The grants this packet needs as a connection's original direction.
    let fwd_req = ct::required_grants(Some(src), Some(dst));
    let entry = ct.entry;
    // A live entry this packet may update (None: absent, expired, or a closed connection
    // whose tuple a new SYN reuses).
    let mut live: Option<*mut CtValue> = None;
    let mut original = true;
    let mut have = 0;
    if let Some(p) = entry {
        // SAFETY: a slot of a conntrack table (array memory, always valid); races with
        // other CPUs may at worst lose a flag update, which the next packet repeats.
        let v = unsafe { *p };
        original = ct::is_original(&v, src_is_a);
        if !ct::expired(&v, pkt.proto, now) && !(syn && closing(v.flags)) {
            live = Some(p);
            have = v.flags;
            let need = if original {
                fwd_req
            } else {
                ct::required_grants(Some(dst), Some(src))
            };
            // A SYN in the original direction is re-decided: the tuple may be reused by a
            // new connection that today's policy must judge.
            if !(syn && original) && ct::has_grants(&v, need) {
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
                return (Reason::AllowEstablished, Decider::Hook);
            }
        }
    }
    // Decide what this packet's direction needs and lacks: everything for a new entry, a
    // SYN, or a reply without its grants (judged as a new flow, recording nothing).
    let missing = if live.is_none() || syn || !original {
        fwd_req
    } else {
        fwd_req & !have
    };
    let mut reason = Reason::AllowNotIsolated;
    let mut granted = 0;
    let mut deferred = false;
    let mut by = Decider::Hook;
    // (A missing grant implies a known, isolated endpoint on that side.)
    if missing & ct_flags::EGRESS_OK != 0 {
        if hook == Hook::FromPod && is_service(&pkt.dst) && !is_host(maps, &pkt.dst) {
            // A virtual IP: DNAT picks the real peer after this hook.
            deferred = true;
            reason = Reason::AllowServicePending;
        } else {
            reason = decide(
                maps,
                src,
                Direction::Egress,
                &pkt.dst,
                pkt.proto,
                pkt.policy_port,
            );
            if reason.is_allow() {
                granted |= ct_flags::EGRESS_OK;
            } else {
                by = Decider::Egress;
            }
        }
    }
    if reason.is_allow() && missing & ct_flags::INGRESS_OK != 0 {
        let r = decide(
            maps,
            dst,
            Direction::Ingress,
            &pkt.src,
            pkt.proto,
            pkt.policy_port,
        );
        if r.is_allow() {
            granted |= ct_flags::INGRESS_OK;
            if reason as u8 == Reason::AllowNotIsolated as u8 {
                reason = r;
            }
        } else {
            reason = r;
            by = Decider::Ingress;
        }
    }
    if !original {
        return (reason, by);
    }
    let ok = reason.is_allow();
    let req_bits = fwd_req << ct_flags::REQ_SHIFT;
    match live {
        None => {
            if ok {
                let mut flags = granted | req_bits;
                if src_is_a {
                    flags |= ct_flags::ORIG_IS_A;
                }
                if pkt.proto == proto::TCP {
                    flags |= ct::tcp_state_flags(pkt.tcp_flags, true);
                }
                if let Some(p) = ct.entry {
                    // The tuple's own slot (expired, or closed and reused): rewritten in
                    // place, stamp last, so a reader never pairs the old flags with a live
                    // stamp.
                    // SAFETY: see above.
                    unsafe {
                        core::ptr::write_volatile(&raw mut (*p).flags, flags);
                        core::ptr::write_volatile(&raw mut (*p).last_seen_ns, now);
                    }
                } else {
                    let v = CtValue {
                        last_seen_ns: now,
                        flags,
                        // The local pod the connection is made for: its share of the table.
                        owner: if src.endpoint_id != 0 {
                            src.endpoint_id
                        } else {
                            dst.endpoint_id
                        },
                    };
                    if ct.v4 {
                        ct_table::insert4(&keys.key4, &v);
                    } else {
                        ct_table::insert6(&keys.key, &v);
                    }
                }
            }
        }
        Some(p) => {
            // SAFETY: see above.
            unsafe {
                if ok {
                    (*p).flags =
                        ((*p).flags & !missing & !(ct_flags::GRANTS << ct_flags::REQ_SHIFT))
                            | granted
                            | req_bits;
                    (*p).last_seen_ns = now;
                } else if syn {
                    // Today's policy refuses the reused tuple: forget the old grants.
                    (*p).flags &= !missing;
                }
            }
        }
    }
    if ok {
        if deferred {
            defer_virtual_tuple(pkt, now);
        } else if granted & ct_flags::EGRESS_OK != 0 && hook != Hook::FromPod {
            // Allowed, so no policy refused: the hook decided. The grant is tail-called
            // once the verdict is counted (see `run`).
            by = Decider::HookGrants;
        }
    }
    (reason, by)
}

/// A packet's conntrack lookup, done once per packet (its key is in the scratch map: a
/// 40-byte key on the stack would be zeroed by a `memset` byte loop before every lookup).
struct Ct {
    /// Both addresses IPv4: the entry is in `CONNTRACK4` under `CtKeys::key4`.
    v4: bool,
    src_is_a: bool,
    entry: Option<*mut CtValue>,
}

#[inline(always)]
fn ct_lookup(pkt: &Pkt, keys: &mut CtKeys) -> Ct {
    // (An IPv6 packet never carries IPv4-mapped addresses: the parser refuses them.)
    let v4 = pkt.src.is_v4() && pkt.dst.is_v4();
    let (src_is_a, entry) = if v4 {
        let src_is_a = ct_key4_into(&mut keys.key4, pkt);
        (src_is_a, ct_table::get4(&keys.key4))
    } else {
        let src_is_a = ct_key_into(&mut keys.key, pkt);
        (src_is_a, ct_table::get6(&keys.key))
    };
    Ct {
        v4,
        src_is_a,
        entry,
    }
}

#[inline(always)]
fn is_syn(pkt: &Pkt) -> bool {
    pkt.proto == proto::TCP
        && pkt.tcp_flags & ct::tcp::SYN != 0
        && pkt.tcp_flags & ct::tcp::ACK == 0
}

/// A live entry holding every grant its connection needed when last decided: the packet
/// passes as established (and refreshes the entry). Judged on the entry alone, so a change
/// of isolation applies to new connections, as policy changes do.
#[inline(always)]
fn ct_fast_hit(pkt: &Pkt, ct: &Ct) -> bool {
    let Some(p) = ct.entry else {
        return false;
    };
    // SAFETY: see flow_verdict.
    let v = unsafe { *p };
    let original = ct::is_original(&v, ct.src_is_a);
    let syn = is_syn(pkt);
    if ct::expired(&v, pkt.proto, pkt.now)
        || (syn && (original || closing(v.flags)))
        || !ct::has_grants(&v, ct::stored_required(&v))
    {
        return false;
    }
    let mut f = v.flags;
    if !original {
        f |= ct_flags::SEEN_REPLY;
    }
    if pkt.proto == proto::TCP {
        f |= ct::tcp_state_flags(pkt.tcp_flags, original);
    }
    if f != v.flags || pkt.now.wrapping_sub(v.last_seen_ns) >= ct::REFRESH_INTERVAL_NS {
        // SAFETY: see flow_verdict.
        unsafe {
            (*p).flags = f;
            (*p).last_seen_ns = pkt.now;
        }
    }
    true
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
fn defer_virtual_tuple(pkt: &Pkt, now: u64) {
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
    let syn = is_syn(pkt);
    let mut entry = None;
    if syn {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, true));
    }
    if entry.is_none() {
        entry = SERVICE_PENDING.get_ptr_mut(&pending_key(pkt, false));
    }
    let Some(p) = entry else {
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
            ct_table::get6(&ct_key(pkt.src, s.vip, s.sport, s.vport, pkt.proto).0)
        };
        if let Some(c) = found {
            // SAFETY: see flow_verdict.
            unsafe {
                (*c).flags |= ct_flags::EGRESS_OK;
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
fn is_host(maps: &BpfMaps, a: &Addr) -> bool {
    use policy_common::decide::PolicyMaps as _;
    matches!(maps.ipcache(&policy_common::IpCacheKey { addr: *a }), Some(v) if v.identity == policy_common::IDENTITY_HOST)
}

#[inline(always)]
fn is_service(a: &Addr) -> bool {
    SERVICE_CIDRS.get(Key::new(128, *a)).is_some()
}

#[inline(always)]
fn count(reason: Reason, dir: Direction) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason.counter_index(dir)) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Emits a deny event when the per-CPU token bucket has a token. The bucket runs on the
/// tick clock (a tick boundary may refill a few tokens at once, never more than the rate
/// allows): in a flood of denies it costs no helper call; only an emitted event reads the
/// fine clock for its stamp.
#[inline(always)]
fn report(ctx: &TcContext, dir: Direction, reason: Reason, pkt: Option<&Pkt>, ep_id: u32) {
    let now = match pkt {
        Some(p) => p.now,
        None => clock::now(),
    };
    if !take_token(now) {
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
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
        // Divide only when a whole token was earned: in a flood of denies with an empty
        // bucket most packets earn none, and a 64-bit division is the dearest instruction.
        let earned = elapsed * rate;
        if earned >= ct::SEC {
            let add = earned / ct::SEC;
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
