//! The policy decision for a packet that conntrack did not settle. The kernel programs run it
//! over BPF maps; the agent's kernel model runs it over the compiler's output. One algorithm,
//! so the model cannot drift from the datapath.

use crate::addr::Addr;
use crate::maps::*;
use crate::{Direction, Reason, proto};

/// Read access to the policy maps, as the kernel has it.
pub trait PolicyMaps {
    fn ipcache(&self, key: &IpCacheKey) -> Option<IpCacheValue>;
    fn rule(&self, key: &RuleKey) -> Option<RuleValue>;
    /// Longest-prefix match in `CIDR_RULES`.
    fn cidr_rule(&self, key: &LpmKey<CidrData>) -> Option<RuleValue>;
    /// Longest-prefix match in `PORTS`: whether an entry covers the key.
    fn port(&self, key: &LpmKey<PortData>) -> bool;
}

/// Decides a new flow at an endpoint: `peer` is the other side (source for ingress,
/// destination for egress), `port` the packet's destination port (0 for protocols without
/// ports, which only a rule without `ports` allows).
#[inline(always)]
// Nested on purpose: this runs in the kernel programs, whose verifier headroom is small, and
// let-chains compile to other instructions (measured: 15 fewer, unverified).
#[allow(clippy::collapsible_if)]
pub fn decide<M: PolicyMaps>(
    maps: &M,
    ep: &EndpointValue,
    dir: Direction,
    peer: &Addr,
    proto_nr: u8,
    port: u16,
) -> Reason {
    if !ep.isolated(dir) {
        return Reason::AllowNotIsolated;
    }
    let set = ep.policy_set(dir);
    // The node's own traffic to its pods is always admitted (kubelet probes); the lookup is
    // needed for ingress anyway or when identity rules exist.
    let need_identity = dir as u8 == Direction::Ingress as u8 || ep.has_identity_rules(dir);
    if need_identity {
        if let Some(id) = maps.ipcache(&IpCacheKey { addr: *peer }) {
            if id.identity == IDENTITY_HOST {
                if dir as u8 == Direction::Ingress as u8 {
                    return Reason::AllowHost;
                }
            } else if ep.has_identity_rules(dir) {
                if let Some(rule) = maps.rule(&RuleKey {
                    policy_set: set,
                    identity: id.identity,
                }) {
                    if rule_allows(maps, &rule, proto_nr, port) {
                        return Reason::AllowIdentity;
                    }
                }
            }
        }
    }
    if ep.has_cidr_rules(dir) {
        let key = LpmKey {
            prefixlen: CIDR_LOOKUP_PREFIXLEN,
            data: CidrData::new(set, *peer),
        };
        if let Some(rule) = maps.cidr_rule(&key) {
            if rule_allows(maps, &rule, proto_nr, port) {
                return Reason::AllowCidr;
            }
        }
    }
    Reason::DenyPolicy
}

/// Whether a matched rule admits this protocol and port.
#[inline(always)]
pub fn rule_allows<M: PolicyMaps>(maps: &M, rule: &RuleValue, proto_nr: u8, port: u16) -> bool {
    if rule.flags & rule_flags::ALL != 0 {
        return true;
    }
    // Port rules name TCP, UDP or SCTP only: other protocols need a rule without ports.
    if !has_ports(proto_nr) {
        return false;
    }
    let mut i = 0;
    while i < INLINE_PORT_RANGES {
        let r = &rule.ranges[i];
        if r.proto == proto_nr && r.first <= port && port <= r.last {
            return true;
        }
        i += 1;
    }
    if rule.flags & rule_flags::PORT_SET != 0 {
        let key = LpmKey {
            prefixlen: PORT_LOOKUP_PREFIXLEN,
            data: PortData::new(rule.port_set, proto_nr, port),
        };
        return maps.port(&key);
    }
    false
}

/// Protocols that port rules can name.
#[inline(always)]
pub const fn has_ports(proto_nr: u8) -> bool {
    proto_nr == proto::TCP || proto_nr == proto::UDP || proto_nr == proto::SCTP
}
