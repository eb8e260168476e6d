//! Who is at either end: the hook's own pod, bound to its interface (`BINDINGS`, served
//! from `EP_CACHE`), and the far side through `IPCACHE`.

use policy_common::{
    Addr, BindingKey, EndpointKey, EndpointValue, IpCacheKey, IpCacheValue, ipc_flags,
};

use super::Hook;
use crate::maps::{
    BINDINGS, CONFIG, ENDPOINTS, EP_CACHE, EP_CACHE_SLOTS, IPCACHE, Known, same_addr,
};
use crate::parse::Pkt;

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
pub(super) const OWN_BOUND: u32 = 0;
pub(super) const OWN_UNBOUND: u32 = 1;
const OWN_UNKNOWN: u32 = 2;

/// The hook's own endpoint, if `addr` is an address of the pod behind interface `ifindex`:
/// from this CPU's `EP_CACHE` slot of the interface and family when it was filled for this
/// address under the current `Config::endpoints_gen`, else from `BINDINGS` and `ENDPOINTS`
/// (and the slot refilled). A slot is filled only for a bound pair, and the agent bumps
/// the generation after every `ENDPOINTS` change and every `BINDINGS` removal, so a
/// cached value never outlives the binding or the entry it was read from.
#[inline(always)]
pub(super) fn own_endpoint(ifindex: u32, addr: &Addr) -> (EndpointValue, u32) {
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
pub(super) fn far_endpoint(
    addr: &Addr,
    state: &mut u32,
    value: &mut IpCacheValue,
) -> (EndpointValue, bool) {
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
pub(super) fn endpoints(
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
