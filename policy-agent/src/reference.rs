//! The reference evaluator: "may A open a connection to B on this protocol and port?", answered
//! straight from the Kubernetes NetworkPolicy specification over the domain model. It knows
//! nothing of identities, policy-sets or maps, so it can judge the compiler and the kernel.
//!
//! Choices the spec leaves to the implementation, made here as the datapath makes them:
//! - Every pod of the snapshot that is not `hostNetwork` is treated as enforced, whatever its
//!   node: a remote pod is enforced by its own node's agent with the same semantics, so a
//!   cluster-wide answer does not depend on which node runs the probe.
//! - `hostNetwork` pods are not isolated in either direction and, as peers, they are the node:
//!   no pod or namespace labels match them, only `ipBlock`s over the address they use.
//! - Traffic from the node's own addresses (`Snapshot::node_addrs`) to a pod is always admitted
//!   (kubelet health checks).
//! - A pod of an unknown namespace is seen with the namespace's implicit
//!   `kubernetes.io/metadata.name` label only.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{
    Labels, NetworkPolicy, ObjectKey, Peer, Pod, PortRef, PortSpec, Protocol, Rule, Snapshot,
};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One side of a connection, at the address of the probe's family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A pod of the snapshot, seen at `addr` (one of its addresses; for a `hostNetwork` pod, the
    /// node address it uses).
    Pod { key: ObjectKey, addr: IpAddr },
    /// Anything that is not a pod: an external host, the node itself.
    Host(IpAddr),
}

impl Endpoint {
    /// The pod `key` at its address of the family of `v6`; `None` when the pod is unknown or
    /// has no address of that family.
    pub fn pod(snap: &Snapshot, key: &ObjectKey, v6: bool) -> Option<Endpoint> {
        let pod = snap.pods.get(key)?;
        let addr = *pod.ips.iter().find(|a| a.is_ipv6() == v6)?;
        Some(Endpoint::Pod {
            key: key.clone(),
            addr,
        })
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Endpoint::Pod { addr, .. } | Endpoint::Host(addr) => *addr,
        }
    }
}

/// Whether a connection from `src` to `dst` with this protocol and destination port is allowed:
/// `src`'s egress AND `dst`'s ingress must both admit it.
pub fn allowed(
    snap: &Snapshot,
    src: &Endpoint,
    dst: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> bool {
    let src_pod = enforced_pod(snap, src);
    let dst_pod = enforced_pod(snap, dst);
    let egress_ok = match src_pod {
        None => true,
        Some(pod) => egress_allows(snap, pod, dst, protocol, port),
    };
    let ingress_ok = match dst_pod {
        None => true,
        Some(pod) => {
            snap.node_addrs.contains(&src.addr()) || ingress_allows(snap, pod, src, protocol, port)
        }
    };
    egress_ok && ingress_ok
}

/// The pod behind an endpoint when NetworkPolicy applies to it (not `hostNetwork`).
fn enforced_pod<'a>(snap: &'a Snapshot, ep: &Endpoint) -> Option<&'a Pod> {
    match ep {
        Endpoint::Pod { key, .. } => snap.pods.get(key).filter(|p| !p.host_network),
        Endpoint::Host(_) => None,
    }
}

/// Policies of `pod`'s namespace selecting it.
fn selecting<'a>(snap: &'a Snapshot, pod: &'a Pod) -> impl Iterator<Item = &'a NetworkPolicy> {
    snap.policies
        .values()
        .filter(move |p| p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
}

/// Whether `policy` isolates its pods for egress (`egress`) or ingress, read from what the
/// object wrote as the API reference words it: "If no policyTypes are specified on a
/// NetworkPolicy then by default Ingress will always be set and Egress will be set if the
/// NetworkPolicy has any egress rules." An entry the API server would refuse (not Ingress or
/// Egress, or more than two) isolates both ways here, failing closed. A policy built in code
/// says its isolation itself.
fn isolates(policy: &NetworkPolicy, egress: bool) -> bool {
    let Some(d) = &policy.declared else {
        return if egress {
            policy.egress_isolation
        } else {
            policy.ingress_isolation
        };
    };
    match d.policy_types.as_deref() {
        None | Some([]) => !egress || d.egress_rules > 0,
        Some(types) => {
            let wanted = if egress { "Egress" } else { "Ingress" };
            types.len() > 2
                || types
                    .iter()
                    .any(|t| t == wanted || (t != "Ingress" && t != "Egress"))
        }
    }
}

fn ingress_allows(
    snap: &Snapshot,
    dst: &Pod,
    src: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> bool {
    let policies: Vec<&NetworkPolicy> = selecting(snap, dst)
        .filter(|p| isolates(p, false))
        .collect();
    if policies.is_empty() {
        return true; // not isolated for ingress
    }
    policies.iter().any(|policy| {
        policy.ingress.iter().any(|rule| {
            peers_admit(snap, policy, rule, src)
                // Ingress: named ports resolve on the selected (destination) pod, whatever
                // kind of peer matched.
                && ports_admit(rule, protocol, port, Some(dst))
        })
    })
}

fn egress_allows(
    snap: &Snapshot,
    src: &Pod,
    dst: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> bool {
    let policies: Vec<&NetworkPolicy> =
        selecting(snap, src).filter(|p| isolates(p, true)).collect();
    if policies.is_empty() {
        return true; // not isolated for egress
    }
    let dst_pod = enforced_pod(snap, dst);
    policies.iter().any(|policy| {
        policy.egress.iter().any(|rule| {
            // Egress: named ports resolve on the peer pod, and only for a peer matched as a pod
            // (by selectors, or by an absent `to`), never through an ipBlock.
            let as_pod = dst_pod.filter(|_| match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|peer| {
                    !matches!(peer, Peer::IpBlock { .. }) && peer_admits(snap, policy, peer, dst)
                }),
            });
            let as_addr = match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|peer| {
                    matches!(peer, Peer::IpBlock { .. }) && peer_admits(snap, policy, peer, dst)
                }),
            };
            if as_pod.is_some() && ports_admit(rule, protocol, port, as_pod) {
                return true;
            }
            as_addr && ports_admit(rule, protocol, port, None)
        })
    })
}

fn peers_admit(snap: &Snapshot, policy: &NetworkPolicy, rule: &Rule, ep: &Endpoint) -> bool {
    match &rule.peers {
        None => true,
        Some(peers) => peers.iter().any(|peer| peer_admits(snap, policy, peer, ep)),
    }
}

/// Whether one peer of a rule of `policy` matches the endpoint.
fn peer_admits(snap: &Snapshot, policy: &NetworkPolicy, peer: &Peer, ep: &Endpoint) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => in_block(cidr, except, ep.addr()),
        Peer::Pods { namespaces, pods } => {
            // hostNetwork pods are the node: no selector matches them.
            let Some(pod) = enforced_pod(snap, ep) else {
                return false;
            };
            let ns_ok = match namespaces {
                None => pod.namespace == policy.namespace,
                Some(sel) => sel.matches(&namespace_labels(snap, &pod.namespace)),
            };
            let pod_ok = match pods {
                None => true,
                Some(sel) => sel.matches(&pod.labels),
            };
            ns_ok && pod_ok
        }
    }
}

fn in_block(cidr: &IpNet, except: &[IpNet], addr: IpAddr) -> bool {
    cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
}

fn namespace_labels(snap: &Snapshot, ns: &str) -> Labels {
    match snap.namespaces.get(ns) {
        Some(n) => n.labels.clone(),
        None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]),
    }
}

/// Whether the rule's `ports` admit the protocol and port. `named_on` is the pod named ports
/// resolve on; `None` means names resolve on nothing (match nothing).
fn ports_admit(rule: &Rule, protocol: Protocol, port: u16, named_on: Option<&Pod>) -> bool {
    rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|spec| port_admits(spec, protocol, port, named_on))
}

fn port_admits(spec: &PortSpec, protocol: Protocol, port: u16, named_on: Option<&Pod>) -> bool {
    if spec.protocol != protocol {
        return false;
    }
    match &spec.port {
        None => true,
        Some(PortRef::Number(first)) => {
            let last = spec.end_port.unwrap_or(*first);
            (*first..=last).contains(&port)
        }
        Some(PortRef::Name(name)) => {
            named_on.and_then(|pod| pod.named_port(name, protocol)) == Some(port)
        }
    }
}
