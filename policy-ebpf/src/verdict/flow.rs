//! The two-sided decision of a whole packet: conntrack first, then the policies of the
//! grants it does not hold yet (the source's egress, the destination's ingress), recorded in
//! conntrack for the connection's later packets.

use policy_common::{
    CtValue, Direction, EndpointValue, Reason, ct, ct_flags, decide::decide, proto,
};

use super::conntrack::{Ct, closing, is_syn, refresh};
use super::service::{defer_virtual_tuple, is_host, is_service};
use super::{Decider, Hook};
use crate::ct_table;
use crate::maps::{BpfMaps, CtKeys};
use crate::parse::Pkt;

/// Conntrack, then the policy for the grants conntrack does not hold yet.
#[inline(always)]
pub(super) fn flow_verdict(
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
    // The live entry was decided under an older policy epoch: the connection is judged
    // again, as a new one would be.
    let mut stale = false;
    if let Some(p) = entry {
        // SAFETY: a conntrack slot (see `Ct::entry`), copied at once.
        let v = unsafe { *p };
        original = ct::is_original(&v, src_is_a);
        if !ct::expired(&v, pkt.proto, now) && !(syn && closing(v.flags)) {
            live = Some(p);
            have = v.flags;
            stale = !ct::current(&v, pkt.epoch);
            let need = if original {
                fwd_req
            } else {
                ct::required_grants(Some(dst), Some(src))
            };
            // A SYN in the original direction is re-decided: the tuple may be reused by a
            // new connection that today's policy must judge.
            if !stale && !(syn && original) && ct::has_grants(&v, need) {
                refresh(p, &v, original, pkt);
                return (Reason::AllowEstablished, Decider::Hook);
            }
            if stale && !original {
                // A reply judges the connection it belongs to, from the originator's
                // side (replies are no new connections): in the tail-called `rejudge`.
                return (Reason::AllowEstablished, Decider::Rejudge);
            }
        }
    }
    // Decide what this packet's direction needs and lacks: everything for a new or stale
    // entry, a SYN, or a reply without its grants (judged as a new flow, recording nothing).
    let missing = if live.is_none() || syn || stale || !original {
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
                let mut flags = ct::with_epoch(granted | req_bits, pkt.epoch);
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
                    // SAFETY: a conntrack slot (see `Ct::entry`).
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
            // SAFETY: a conntrack slot (see `Ct::entry`).
            unsafe {
                if ok && deferred {
                    // A virtual tuple: the grant that judges it comes after DNAT. A stale
                    // one keeps its old grant meanwhile, for the replies its backend's
                    // real tuple admits.
                } else if ok {
                    // (A stale entry's `missing` is every grant it needs: all decided anew.)
                    (*p).flags = ct::with_epoch(
                        ((*p).flags & !missing & !ct_flags::REQ_MASK) | granted | req_bits,
                        pkt.epoch,
                    );
                    (*p).last_seen_ns = now;
                } else if syn {
                    // Today's policy refuses the reused tuple: forget the old grants.
                    (*p).flags &= !missing;
                }
                // A stale entry refused stays as it is: each of its packets is judged
                // again (and refused) until a later epoch admits the connection again, or
                // it expires.
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
