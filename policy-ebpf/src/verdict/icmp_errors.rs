//! ICMP errors pass as related to a live connection they quote, when they travel its
//! reverse path.

use policy_common::{IpCacheKey, Reason, ct, ipc_flags};

use super::conntrack::{ct_get, ct_key};
use crate::maps::{BpfMaps, same_addr};
use crate::parse::Pkt;

/// An ICMP error passes when it travels the reverse path of a live connection holding
/// every grant it needed under the policy epoch in force: the tuple is the quoted packet's
/// ([`reverse_path`]).
#[inline(always)]
pub(super) fn related_verdict(pkt: &Pkt, isolated: bool, maps: &BpfMaps) -> Reason {
    if !isolated {
        return Reason::AllowNotIsolated;
    }
    if !reverse_path(pkt, maps) {
        return Reason::DenyUnrelated;
    }
    let key = ct_key(
        pkt.inner_dst,
        pkt.inner_src,
        pkt.inner_dport,
        pkt.inner_sport,
        pkt.inner_proto,
    );
    if let Some(p) = ct_get(&key) {
        // SAFETY: copied at once.
        let v = unsafe { *p };
        // Only a connection decided under the epoch in force: a revoked one relates nothing.
        if !ct::expired(&v, key.proto, pkt.now)
            && ct::current(&v, pkt.epoch)
            && ct::has_grants(&v, ct::stored_required(&v))
        {
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
