//! The reference evaluator on every trap of the NetworkPolicy spec listed in design.md. Each
//! expectation comes from the API reference, not from the implementation.

use std::collections::BTreeSet;
use std::net::IpAddr;

use policy_agent::model::*;
use policy_agent::reference::{Endpoint, allowed};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

/// Namespaces x, y (labelled ns=<name>); pods a, b in each, labelled pod=<name>, serving
/// TCP/UDP/SCTP 80 and 81 under names serve-<port>-<proto>; plus pod x/c whose `http` name is
/// port 81 while x/a's and x/b's `http` is 80.
struct Cluster {
    snap: Snapshot,
}

impl Cluster {
    fn new() -> Self {
        let mut snap = Snapshot {
            node: "node".into(),
            node_addrs: vec![ip("198.18.0.1"), ip("fd00:18::1")],
            ..Snapshot::default()
        };
        for ns in ["x", "y"] {
            snap.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: labels(&[("kubernetes.io/metadata.name", ns), ("ns", ns)]),
                },
            );
        }
        let mut c = Cluster { snap };
        c.add_pod("x", "a", 10, 80);
        c.add_pod("x", "b", 11, 80);
        c.add_pod("x", "c", 12, 81);
        c.add_pod("y", "a", 20, 80);
        c.add_pod("y", "b", 21, 80);
        c
    }

    fn add_pod(&mut self, ns: &str, name: &str, host: u8, http: u16) {
        let mut ports = vec![ContainerPort {
            name: Some("http".into()),
            port: http,
            protocol: TCP,
        }];
        for port in [80u16, 81] {
            for proto in Protocol::ALL {
                let lower = proto.as_str().to_lowercase();
                ports.push(ContainerPort {
                    name: Some(format!("serve-{port}-{lower}")),
                    port,
                    protocol: proto,
                });
            }
        }
        let pod = Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("pod", name)]),
            ips: vec![
                ip(&format!("198.18.1.{host}")),
                ip(&format!("fd00:18::1:{host}")),
            ],
            ports,
            host_network: false,
            node: Some("node".into()),
        };
        self.snap.pods.insert(pod.key(), pod);
    }

    fn add_host_network_pod(&mut self, ns: &str, name: &str) {
        let pod = Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("pod", name)]),
            ips: self.snap.node_addrs.clone(),
            ports: vec![],
            host_network: true,
            node: Some("node".into()),
        };
        self.snap.pods.insert(pod.key(), pod);
    }

    fn policy(&mut self, p: NetworkPolicy) {
        self.snap.policies.insert(p.key(), p);
    }

    fn ep(&self, key: &str, v6: bool) -> Endpoint {
        let (ns, name) = key.split_once('/').expect("ns/pod");
        Endpoint::pod(&self.snap, &ObjectKey::new(ns, name), v6).expect("pod in cluster")
    }

    /// IPv4 probe between two pods.
    fn can(&self, src: &str, dst: &str, proto: Protocol, port: u16) -> bool {
        allowed(
            &self.snap,
            &self.ep(src, false),
            &self.ep(dst, false),
            proto,
            port,
        )
    }

    fn can6(&self, src: &str, dst: &str, proto: Protocol, port: u16) -> bool {
        allowed(
            &self.snap,
            &self.ep(src, true),
            &self.ep(dst, true),
            proto,
            port,
        )
    }

    fn host_to(&self, src: &str, dst: &str, port: u16) -> bool {
        let dst = self.ep(dst, ip(src).is_ipv6());
        allowed(&self.snap, &Endpoint::Host(ip(src)), &dst, TCP, port)
    }

    fn to_ext(&self, src: &str, dst: &str, port: u16) -> bool {
        let src = self.ep(src, ip(dst).is_ipv6());
        allowed(&self.snap, &src, &Endpoint::Host(ip(dst)), TCP, port)
    }
}

fn policy(ns: &str, name: &str, selector: LabelSelector) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: selector,
        ingress_isolation: false,
        egress_isolation: false,
        ingress: vec![],
        egress: vec![],
        declared: None,
    }
}

fn ingress(ns: &str, name: &str, selector: LabelSelector, rules: Vec<Rule>) -> NetworkPolicy {
    NetworkPolicy {
        ingress_isolation: true,
        ingress: rules,
        ..policy(ns, name, selector)
    }
}

fn egress(ns: &str, name: &str, selector: LabelSelector, rules: Vec<Rule>) -> NetworkPolicy {
    NetworkPolicy {
        egress_isolation: true,
        egress: rules,
        ..policy(ns, name, selector)
    }
}

/// The policy most traps need: `x/p` selecting x/a (pod=a) with one ingress rule.
fn into_x_a(peers: Vec<Peer>, ports: Vec<PortSpec>) -> NetworkPolicy {
    ingress(
        "x",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(Some(peers), ports)],
    )
}

fn rule(peers: Option<Vec<Peer>>, ports: Vec<PortSpec>) -> Rule {
    Rule { peers, ports }
}

fn pods_peer(namespaces: Option<LabelSelector>, pods: Option<LabelSelector>) -> Peer {
    Peer::Pods { namespaces, pods }
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::IpBlock {
        cidr: cidr.parse().expect("cidr"),
        except: except.iter().map(|e| e.parse().expect("except")).collect(),
    }
}

fn port(proto: Protocol, n: u16) -> PortSpec {
    PortSpec {
        protocol: proto,
        port: Some(PortRef::Number(n)),
        end_port: None,
    }
}

fn named(proto: Protocol, name: &str) -> PortSpec {
    PortSpec {
        protocol: proto,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn range(proto: Protocol, first: u16, last: u16) -> PortSpec {
    PortSpec {
        protocol: proto,
        port: Some(PortRef::Number(first)),
        end_port: Some(last),
    }
}

#[test]
fn no_policy_allows_everything() {
    let c = Cluster::new();
    assert!(c.can("x/a", "y/b", TCP, 80));
    assert!(c.can("y/b", "x/a", SCTP, 9));
    assert!(c.host_to("198.19.0.5", "x/a", 80));
    assert!(c.to_ext("x/a", "198.19.0.5", 443));
}

#[test]
fn ingress_only_policy_does_not_isolate_egress() {
    let mut c = Cluster::new();
    // policyTypes [Ingress] (the default without an egress section): deny all ingress of x/a.
    c.policy(ingress("x", "deny", sel(&[("pod", "a")]), vec![]));
    assert!(!c.can("x/b", "x/a", TCP, 80));
    assert!(!c.host_to("198.19.0.5", "x/a", 80));
    assert!(
        c.can("x/a", "x/b", TCP, 80),
        "egress of x/a is not isolated"
    );
    assert!(c.can("x/b", "x/c", TCP, 80), "x/c is not selected");
}

#[test]
fn egress_only_policy_does_not_isolate_ingress() {
    let mut c = Cluster::new();
    c.policy(egress("x", "deny", sel(&[("pod", "a")]), vec![]));
    assert!(!c.can("x/a", "x/b", TCP, 80));
    assert!(!c.to_ext("x/a", "198.19.0.5", 80));
    assert!(
        c.can("x/b", "x/a", TCP, 80),
        "ingress of x/a is not isolated"
    );
}

#[test]
fn policy_types_with_both_directions_and_no_rules_isolates_both() {
    let mut c = Cluster::new();
    let mut p = ingress("x", "deny", LabelSelector::everything(), vec![]);
    p.egress_isolation = true;
    c.policy(p);
    assert!(!c.can("x/a", "x/b", TCP, 80));
    assert!(!c.can("x/a", "y/b", TCP, 80), "egress of x/a is isolated");
    assert!(!c.can("y/a", "x/b", TCP, 80), "ingress of x/b is isolated");
    assert!(c.can("y/a", "y/b", TCP, 80), "namespace y is untouched");
}

#[test]
fn policies_are_additive() {
    let mut c = Cluster::new();
    c.policy(ingress("x", "deny", LabelSelector::everything(), vec![]));
    c.policy(ingress(
        "x",
        "from-b",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(None, Some(sel(&[("pod", "b")])))]),
            vec![],
        )],
    ));
    c.policy(ingress(
        "x",
        "from-c",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(None, Some(sel(&[("pod", "c")])))]),
            vec![],
        )],
    ));
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(c.can("x/c", "x/a", TCP, 80));
    assert!(!c.can("y/a", "x/a", TCP, 80));
    assert!(!c.can("x/a", "x/b", TCP, 80), "deny-all still isolates x/b");
}

#[test]
fn connection_needs_egress_and_ingress() {
    let mut c = Cluster::new();
    // x/a may send to anything; y/b admits only y/a.
    c.policy(egress(
        "x",
        "out",
        sel(&[("pod", "a")]),
        vec![rule(None, vec![])],
    ));
    c.policy(ingress(
        "y",
        "in",
        sel(&[("pod", "b")]),
        vec![rule(
            Some(vec![pods_peer(None, Some(sel(&[("pod", "a")])))]),
            vec![],
        )],
    ));
    assert!(
        !c.can("x/a", "y/b", TCP, 80),
        "egress allows, ingress denies"
    );
    assert!(c.can("y/a", "y/b", TCP, 80));
    // x/b may only send to x/c; y/a admits everything (not isolated).
    c.policy(egress(
        "x",
        "b-out",
        sel(&[("pod", "b")]),
        vec![rule(
            Some(vec![pods_peer(None, Some(sel(&[("pod", "c")])))]),
            vec![],
        )],
    ));
    assert!(
        !c.can("x/b", "y/a", TCP, 80),
        "ingress allows, egress denies"
    );
    assert!(c.can("x/b", "x/c", TCP, 80));
}

#[test]
fn replies_are_not_judged_as_new_connections() {
    let mut c = Cluster::new();
    // x/a admits x/b but may send nothing: the connection x/b -> x/a is still allowed (its
    // replies belong to it), and x/a cannot open one towards x/b.
    let mut p = ingress(
        "x",
        "a",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(None, Some(sel(&[("pod", "b")])))]),
            vec![],
        )],
    );
    p.egress_isolation = true;
    c.policy(p);
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(!c.can("x/a", "x/b", TCP, 80));
}

#[test]
fn pod_selector_alone_means_policy_namespace() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![pods_peer(None, Some(sel(&[("pod", "b")])))],
        vec![],
    ));
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(
        !c.can("y/b", "x/a", TCP, 80),
        "y/b has the label but another namespace"
    );
}

#[test]
fn namespace_selector_alone_means_all_pods_of_matching_namespaces() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![pods_peer(Some(sel(&[("ns", "y")])), None)],
        vec![],
    ));
    assert!(c.can("y/a", "x/a", TCP, 80));
    assert!(c.can("y/b", "x/a", TCP, 80));
    assert!(
        !c.can("x/b", "x/a", TCP, 80),
        "own namespace is not selected"
    );
}

#[test]
fn both_selectors_in_one_peer_are_anded() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![pods_peer(
            Some(sel(&[("ns", "y")])),
            Some(sel(&[("pod", "b")])),
        )],
        vec![],
    ));
    assert!(c.can("y/b", "x/a", TCP, 80));
    assert!(!c.can("y/a", "x/a", TCP, 80));
    assert!(!c.can("x/b", "x/a", TCP, 80));
}

#[test]
fn two_peers_are_ored() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![
            pods_peer(Some(sel(&[("ns", "y")])), None),
            pods_peer(None, Some(sel(&[("pod", "b")]))),
        ],
        vec![],
    ));
    assert!(c.can("y/a", "x/a", TCP, 80));
    assert!(c.can("y/b", "x/a", TCP, 80));
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(!c.can("x/c", "x/a", TCP, 80));
}

#[test]
fn empty_selectors_and_missing_peers_select_everything() {
    let mut c = Cluster::new();
    // podSelector {} alone: every pod of the policy's namespace.
    c.policy(into_x_a(
        vec![pods_peer(None, Some(LabelSelector::everything()))],
        vec![],
    ));
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(!c.can("y/b", "x/a", TCP, 80));
    // namespaceSelector {}: every pod of every namespace (but not external hosts).
    c.policy(ingress(
        "x",
        "q",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(Some(LabelSelector::everything()), None)]),
            vec![],
        )],
    ));
    assert!(c.can("y/b", "x/a", TCP, 80));
    assert!(!c.host_to("198.19.0.5", "x/a", 80));
    // missing or empty `from`: every source, external hosts included.
    c.policy(ingress(
        "x",
        "r",
        sel(&[("pod", "b")]),
        vec![rule(None, vec![])],
    ));
    assert!(c.host_to("198.19.0.5", "x/b", 80));
    assert!(c.can("y/a", "x/b", UDP, 81));
}

#[test]
fn ip_block_with_except_matches_pods_and_externals() {
    let mut c = Cluster::new();
    // 198.18.1.0/24 holds every pod; except x/b (198.18.1.11) and 198.19.0.0/24 is outside.
    c.policy(ingress(
        "y",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![block("198.18.1.0/24", &["198.18.1.11/32"])]),
            vec![],
        )],
    ));
    assert!(c.can("x/a", "y/a", TCP, 80), "pod IP inside the block");
    assert!(!c.can("x/b", "y/a", TCP, 80), "pod IP in except");
    assert!(
        c.host_to("198.18.1.200", "y/a", 80),
        "external inside the block"
    );
    assert!(!c.host_to("198.19.0.5", "y/a", 80), "outside the block");
    // The IPv4 block says nothing about IPv6 addresses.
    assert!(!c.can6("x/a", "y/a", TCP, 80));

    // Egress to a block with an except, judged on the destination address.
    c.policy(egress(
        "x",
        "e",
        sel(&[("pod", "c")]),
        vec![rule(
            Some(vec![block("198.19.0.0/16", &["198.19.1.0/24"])]),
            vec![],
        )],
    ));
    assert!(c.to_ext("x/c", "198.19.2.1", 80));
    assert!(!c.to_ext("x/c", "198.19.1.1", 80));
    assert!(
        !c.can("x/c", "x/a", TCP, 80),
        "pods are outside the egress block"
    );
}

#[test]
fn ip_block_ipv6() {
    let mut c = Cluster::new();
    c.policy(ingress(
        "y",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![block("fd00:18::1:0/112", &["fd00:18::1:b/128"])]),
            vec![],
        )],
    ));
    // fd00:18::1:10 = x/a, fd00:18::1:11 = x/b (hex digits of the builder's decimal host).
    assert!(c.can6("x/a", "y/a", TCP, 80));
    assert!(c.can6("x/b", "y/a", TCP, 80));
    assert!(!c.host_to("fd00:18::1:b", "y/a", 80), "in except");
    assert!(
        !c.can("x/a", "y/a", TCP, 80),
        "an IPv6 block does not match IPv4 addresses"
    );
}

#[test]
fn named_ports_resolve_on_the_ingress_destination() {
    let mut c = Cluster::new();
    // `http` is 80 on x/a and x/b but 81 on x/c.
    c.policy(ingress(
        "x",
        "p",
        LabelSelector::everything(),
        vec![rule(None, vec![named(TCP, "http")])],
    ));
    assert!(c.can("y/a", "x/a", TCP, 80));
    assert!(!c.can("y/a", "x/a", TCP, 81));
    assert!(c.can("y/a", "x/c", TCP, 81));
    assert!(!c.can("y/a", "x/c", TCP, 80));
    assert!(!c.can("y/a", "x/a", UDP, 80), "http is a TCP name");
    // Ingress from an ipBlock peer still resolves on the local pod.
    c.policy(ingress(
        "y",
        "q",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![block("198.19.0.0/16", &[])]),
            vec![named(UDP, "serve-81-udp")],
        )],
    ));
    assert!(
        !c.host_to("198.19.0.5", "y/a", 81),
        "TCP is not the named protocol"
    );
    let dst = c.ep("y/a", false);
    assert!(allowed(
        &c.snap,
        &Endpoint::Host(ip("198.19.0.5")),
        &dst,
        UDP,
        81
    ));
    assert!(!allowed(
        &c.snap,
        &Endpoint::Host(ip("198.19.0.5")),
        &dst,
        UDP,
        80
    ));
}

#[test]
fn named_ports_resolve_on_the_egress_peer_never_through_ip_block() {
    let mut c = Cluster::new();
    c.policy(egress(
        "y",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(Some(sel(&[("ns", "x")])), None)]),
            vec![named(TCP, "http")],
        )],
    ));
    assert!(c.can("y/a", "x/a", TCP, 80));
    assert!(!c.can("y/a", "x/a", TCP, 81));
    assert!(c.can("y/a", "x/c", TCP, 81), "resolved on the peer x/c");
    assert!(!c.can("y/a", "x/c", TCP, 80));
    assert!(!c.can("y/a", "y/b", TCP, 80), "y/b is not a peer");

    // An ipBlock covering every pod with a named port allows nothing (no pod to resolve on).
    let mut c = Cluster::new();
    c.policy(egress(
        "y",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![block("0.0.0.0/0", &[])]),
            vec![named(TCP, "http")],
        )],
    ));
    assert!(!c.can("y/a", "x/a", TCP, 80));
    assert!(!c.to_ext("y/a", "198.19.0.5", 80));

    // With no `to`, every peer is matched as what it is: pods resolve, hosts cannot.
    let mut c = Cluster::new();
    c.policy(egress(
        "y",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(None, vec![named(TCP, "http")])],
    ));
    assert!(c.can("y/a", "x/c", TCP, 81));
    assert!(!c.can("y/a", "x/c", TCP, 80));
    assert!(!c.to_ext("y/a", "198.19.0.5", 80));
}

#[test]
fn end_port_ranges_are_inclusive() {
    let mut c = Cluster::new();
    c.policy(ingress(
        "x",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(None, vec![range(TCP, 80, 90)])],
    ));
    assert!(!c.can("x/b", "x/a", TCP, 79));
    assert!(c.can("x/b", "x/a", TCP, 80));
    assert!(c.can("x/b", "x/a", TCP, 85));
    assert!(c.can("x/b", "x/a", TCP, 90));
    assert!(!c.can("x/b", "x/a", TCP, 91));
    assert!(!c.can("x/b", "x/a", UDP, 85));
}

#[test]
fn protocols_must_match_and_port_none_means_all_ports() {
    let mut c = Cluster::new();
    c.policy(ingress(
        "x",
        "p",
        sel(&[("pod", "a")]),
        vec![rule(
            None,
            vec![
                port(UDP, 81),
                PortSpec {
                    protocol: SCTP,
                    port: None,
                    end_port: None,
                },
            ],
        )],
    ));
    assert!(c.can("x/b", "x/a", UDP, 81));
    assert!(!c.can("x/b", "x/a", TCP, 81));
    assert!(!c.can("x/b", "x/a", UDP, 80));
    assert!(c.can("x/b", "x/a", SCTP, 1));
    assert!(c.can("x/b", "x/a", SCTP, 65535));
    // A rule without ports admits every protocol.
    c.policy(ingress(
        "x",
        "q",
        sel(&[("pod", "b")]),
        vec![rule(None, vec![])],
    ));
    for proto in Protocol::ALL {
        assert!(c.can("x/a", "x/b", proto, 4242));
    }
}

#[test]
fn ipv6_follows_the_same_rules() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![pods_peer(Some(sel(&[("ns", "y")])), None)],
        vec![port(TCP, 80)],
    ));
    assert!(c.can6("y/a", "x/a", TCP, 80));
    assert!(!c.can6("y/a", "x/a", TCP, 81));
    assert!(!c.can6("x/b", "x/a", TCP, 80));
}

#[test]
fn host_network_pods_are_not_isolated_and_are_the_node_as_peers() {
    let mut c = Cluster::new();
    c.add_host_network_pod("x", "h");
    // Deny everything in x: the hostNetwork pod stays reachable and free to send.
    let mut p = ingress("x", "deny", LabelSelector::everything(), vec![]);
    p.egress_isolation = true;
    c.policy(p);
    assert!(
        c.can("y/a", "x/h", TCP, 80),
        "hostNetwork pod is not isolated for ingress"
    );
    // Its traffic comes from the node's address: admitted like kubelet's.
    assert!(c.can("x/h", "x/a", TCP, 80));

    // As an egress peer, selectors do not match it; an ipBlock over the node address does.
    let mut c = Cluster::new();
    c.add_host_network_pod("x", "h");
    c.policy(egress(
        "y",
        "e",
        sel(&[("pod", "a")]),
        vec![rule(
            Some(vec![pods_peer(
                Some(LabelSelector::everything()),
                Some(LabelSelector::everything()),
            )]),
            vec![],
        )],
    ));
    assert!(
        !c.can("y/a", "x/h", TCP, 80),
        "selectors never match a hostNetwork pod"
    );
    assert!(c.can("y/a", "x/b", TCP, 80));
    c.policy(egress(
        "y",
        "e2",
        sel(&[("pod", "a")]),
        vec![rule(Some(vec![block("198.18.0.1/32", &[])]), vec![])],
    ));
    assert!(
        c.can("y/a", "x/h", TCP, 80),
        "ipBlock over the node address matches it"
    );
    assert!(!c.can6("y/a", "x/h", TCP, 80), "not over its IPv6 address");
}

#[test]
fn node_addresses_always_reach_pods() {
    let mut c = Cluster::new();
    c.policy(ingress("x", "deny", LabelSelector::everything(), vec![]));
    assert!(c.host_to("198.18.0.1", "x/a", 80));
    assert!(c.host_to("fd00:18::1", "x/a", 80));
    assert!(!c.host_to("198.18.0.2", "x/a", 80));
}

#[test]
fn label_changes_change_verdicts() {
    let mut c = Cluster::new();
    c.policy(into_x_a(
        vec![pods_peer(
            Some(sel(&[("team", "blue")])),
            Some(sel(&[("role", "client")])),
        )],
        vec![],
    ));
    assert!(!c.can("y/b", "x/a", TCP, 80));
    c.snap
        .namespaces
        .get_mut("y")
        .expect("y")
        .labels
        .insert("team".into(), "blue".into());
    assert!(!c.can("y/b", "x/a", TCP, 80), "pod label still missing");
    let key = ObjectKey::new("y", "b");
    c.snap
        .pods
        .get_mut(&key)
        .expect("y/b")
        .labels
        .insert("role".into(), "client".into());
    assert!(c.can("y/b", "x/a", TCP, 80));
    // Relabelling the destination out of the policy's selector lifts its isolation.
    let key = ObjectKey::new("x", "a");
    c.snap
        .pods
        .get_mut(&key)
        .expect("x/a")
        .labels
        .insert("pod".into(), "z".into());
    assert!(c.can("x/b", "x/a", TCP, 80));
}

#[test]
fn deleting_a_policy_lifts_isolation() {
    let mut c = Cluster::new();
    c.policy(ingress("x", "deny", LabelSelector::everything(), vec![]));
    assert!(!c.can("y/a", "x/a", TCP, 80));
    c.snap.policies.remove(&ObjectKey::new("x", "deny"));
    assert!(c.can("y/a", "x/a", TCP, 80));
}

#[test]
fn match_expressions_select() {
    let mut c = Cluster::new();
    let expr = |key: &str, operator: Operator, values: &[&str]| Requirement {
        key: key.into(),
        operator,
        values: values
            .iter()
            .map(|v| v.to_string())
            .collect::<BTreeSet<_>>(),
    };
    let s = LabelSelector {
        match_labels: Default::default(),
        match_expressions: vec![
            expr("pod", Operator::NotIn, &["b"]),
            expr("pod", Operator::Exists, &[]),
        ],
    };
    c.policy(into_x_a(vec![pods_peer(None, Some(s))], vec![]));
    assert!(c.can("x/c", "x/a", TCP, 80));
    assert!(!c.can("x/b", "x/a", TCP, 80));
}

#[test]
fn failed_closed_policy_isolates_and_allows_nothing() {
    // What conversion yields for an invalid policy: its selector isolates, no rule remains.
    let mut c = Cluster::new();
    c.policy(ingress("x", "broken", sel(&[("pod", "a")]), vec![]));
    assert!(!c.can("x/b", "x/a", TCP, 80));
    assert!(c.can("x/a", "x/b", TCP, 80));
}
