//! Every trap of the NetworkPolicy spec (design.md), decided by the kernel's algorithm over
//! the compiled maps of every node. Expectations come from the API reference.

use crate::compiler_common;

use compiler_common::*;
use policy_agent::compiler::{CompilerState, compile};
use policy_agent::model::*;
use policy_common::proto::{ICMP, SCTP, TCP, UDP};

/// Namespaces x (team=a) and y (team=b); pods x/a (web, http=80, n1), x/b (db, http=8080, n1),
/// y/a (web, http=80, n2), y/h (hostNetwork on n1, the node's address).
struct C {
    snap: Snapshot,
}

const XA: &str = "198.18.0.10";
const XB: &str = "198.18.0.11";
const YA: &str = "198.18.0.20";
const XA6: &str = "fd00::10";
const YA6: &str = "fd00::20";
const OUT: &str = "203.0.113.7";

impl C {
    fn new() -> C {
        let mut snap = Snapshot {
            node: "n1".into(),
            node_addrs: vec![ip(NODE_V4), ip(NODE_V6)],
            ..Default::default()
        };
        for (ns, team) in [("x", "a"), ("y", "b")] {
            snap.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: labels(&[("kubernetes.io/metadata.name", ns), ("team", team)]),
                },
            );
        }
        let mut c = C { snap };
        c.pod("x", "a", "web", &[XA, XA6], 80, "n1", false);
        c.pod("x", "b", "db", &[XB], 8080, "n1", false);
        c.pod("y", "a", "web", &[YA, YA6], 80, "n2", false);
        c.pod("y", "h", "web", &[NODE_V4], 80, "n1", true);
        c
    }
    #[allow(clippy::too_many_arguments)]
    fn pod(
        &mut self,
        ns: &str,
        name: &str,
        app: &str,
        ips: &[&str],
        http: u16,
        node: &str,
        host: bool,
    ) {
        let p = Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("app", app)]),
            ips: ips.iter().map(|s| ip(s)).collect(),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: http,
                protocol: Protocol::Tcp,
            }],
            host_network: host,
            node: Some(node.into()),
        };
        self.snap.pods.insert(p.key(), p);
    }
    fn policy(
        &mut self,
        ns: &str,
        name: &str,
        sel: LabelSelector,
        ingress: Option<Vec<Rule>>,
        egress: Option<Vec<Rule>>,
    ) {
        let p = NetworkPolicy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector: sel,
            ingress_isolation: ingress.is_some(),
            egress_isolation: egress.is_some(),
            ingress: ingress.unwrap_or_default(),
            egress: egress.unwrap_or_default(),
            declared: None,
        };
        self.snap.policies.insert(p.key(), p);
    }
    fn ok(&self, src: &str, dst: &str, proto: u8, port: u16) -> bool {
        Cluster::compile(&self.snap).allowed(ip(src), ip(dst), proto, port)
    }
}

fn from(peers: Vec<Peer>, ports: Vec<PortSpec>) -> Rule {
    Rule {
        peers: Some(peers),
        ports,
    }
}
fn pods(ns: Option<LabelSelector>, p: Option<LabelSelector>) -> Peer {
    Peer::Pods {
        namespaces: ns,
        pods: p,
    }
}
fn block(c: &str, e: &[&str]) -> Peer {
    Peer::IpBlock {
        cidr: net(c),
        except: e.iter().map(|s| net(s)).collect(),
    }
}
fn tcp(p: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(p)),
        end_port: None,
    }
}
fn named(n: &str) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Name(n.into())),
        end_port: None,
    }
}

#[test]
fn unselected_pod_is_not_isolated() {
    let mut c = C::new();
    c.policy("x", "p", sel(&[("app", "db")]), Some(vec![]), None);
    assert!(c.ok(YA, XA, TCP, 1));
    assert!(!c.ok(YA, XB, TCP, 1));
}

#[test]
fn egress_only_policy_leaves_ingress_open() {
    let mut c = C::new();
    c.policy("x", "p", LabelSelector::everything(), None, Some(vec![]));
    assert!(c.ok(YA, XA, TCP, 80));
    assert!(!c.ok(XA, YA, TCP, 80));
}

#[test]
fn policies_are_additive() {
    let mut c = C::new();
    c.policy(
        "x",
        "p1",
        LabelSelector::everything(),
        Some(vec![from(
            vec![pods(None, Some(sel(&[("app", "db")])))],
            vec![],
        )]),
        None,
    );
    c.policy(
        "x",
        "p2",
        LabelSelector::everything(),
        Some(vec![from(
            vec![block("203.0.113.0/24", &[])],
            vec![tcp(80)],
        )]),
        None,
    );
    assert!(c.ok(XB, XA, TCP, 1));
    assert!(c.ok(OUT, XA, TCP, 80));
    assert!(!c.ok(OUT, XA, TCP, 81));
    assert!(!c.ok(YA, XA, TCP, 80));
}

#[test]
fn connection_needs_egress_and_ingress() {
    let mut c = C::new();
    c.policy(
        "y",
        "deny-in",
        LabelSelector::everything(),
        Some(vec![]),
        None,
    );
    c.policy(
        "x",
        "allow-out",
        LabelSelector::everything(),
        None,
        Some(vec![Rule::default()]),
    );
    assert!(!c.ok(XA, YA, TCP, 80));
    assert!(c.ok(XA, XB, TCP, 80));
}

#[test]
fn pod_selector_alone_means_own_namespace() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        sel(&[("app", "db")]),
        Some(vec![from(
            vec![pods(None, Some(sel(&[("app", "web")])))],
            vec![],
        )]),
        None,
    );
    assert!(c.ok(XA, XB, TCP, 5432));
    assert!(!c.ok(YA, XB, TCP, 5432));
}

#[test]
fn namespace_selector_alone_means_all_pods_there() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        sel(&[("app", "db")]),
        Some(vec![from(
            vec![pods(Some(sel(&[("team", "b")])), None)],
            vec![],
        )]),
        None,
    );
    assert!(c.ok(YA, XB, TCP, 1));
    assert!(!c.ok(XA, XB, TCP, 1));
}

#[test]
fn both_selectors_in_one_peer_are_anded_two_peers_are_ored() {
    let mut c = C::new();
    c.policy(
        "x",
        "and",
        sel(&[("app", "db")]),
        Some(vec![from(
            vec![pods(
                Some(sel(&[("team", "b")])),
                Some(sel(&[("app", "db")])),
            )],
            vec![],
        )]),
        None,
    );
    assert!(!c.ok(YA, XB, TCP, 1));
    c.policy(
        "x",
        "and",
        sel(&[("app", "db")]),
        Some(vec![from(
            vec![
                pods(Some(sel(&[("team", "b")])), None),
                pods(None, Some(sel(&[("app", "db")]))),
            ],
            vec![],
        )]),
        None,
    );
    assert!(c.ok(YA, XB, TCP, 1));
}

#[test]
fn empty_selectors_select_everything() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![from(
            vec![pods(Some(LabelSelector::everything()), None)],
            vec![],
        )]),
        None,
    );
    assert!(c.ok(YA, XA, TCP, 1) && c.ok(YA, XB, TCP, 1));
    assert!(
        !c.ok(OUT, XA, TCP, 1),
        "a namespaceSelector does not match external hosts"
    );
}

#[test]
fn empty_or_missing_from_allows_every_source() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![Rule {
            peers: None,
            ports: vec![tcp(80)],
        }]),
        None,
    );
    assert!(c.ok(OUT, XA, TCP, 80) && c.ok(YA, XA, TCP, 80) && c.ok(YA6, XA6, TCP, 80));
    assert!(!c.ok(OUT, XA, TCP, 81));
}

#[test]
fn ip_block_except_carves_holes() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        None,
        Some(vec![from(
            vec![block("198.18.0.0/16", &["198.18.0.20/32"])],
            vec![],
        )]),
    );
    assert!(c.ok(XA, XB, TCP, 1));
    assert!(!c.ok(XA, YA, TCP, 1));
    assert!(!c.ok(XA, OUT, TCP, 1));
}

#[test]
fn ip_block_matches_pod_addresses() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        sel(&[("app", "db")]),
        Some(vec![from(
            vec![block("198.18.0.20/32", &[])],
            vec![tcp(80)],
        )]),
        None,
    );
    assert!(c.ok(YA, XB, TCP, 80));
    assert!(!c.ok(XA, XB, TCP, 80));
}

#[test]
fn ingress_named_port_resolves_on_the_local_pod() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![Rule {
            peers: None,
            ports: vec![named("http")],
        }]),
        None,
    );
    assert!(c.ok(YA, XA, TCP, 80) && !c.ok(YA, XA, TCP, 8080));
    assert!(c.ok(YA, XB, TCP, 8080) && !c.ok(YA, XB, TCP, 80));
    assert!(c.ok(OUT, XB, TCP, 8080), "also for an external source");
}

#[test]
fn egress_named_port_resolves_on_each_peer_and_never_on_an_ip_block() {
    let mut c = C::new();
    c.policy(
        "y",
        "p",
        LabelSelector::everything(),
        None,
        Some(vec![from(
            vec![pods(Some(LabelSelector::everything()), None)],
            vec![named("http")],
        )]),
    );
    assert!(c.ok(YA, XA, TCP, 80) && !c.ok(YA, XA, TCP, 8080));
    assert!(c.ok(YA, XB, TCP, 8080) && !c.ok(YA, XB, TCP, 80));
    c.policy(
        "y",
        "p",
        LabelSelector::everything(),
        None,
        Some(vec![from(
            vec![block("0.0.0.0/0", &[])],
            vec![named("http")],
        )]),
    );
    assert!(!c.ok(YA, XA, TCP, 80) && !c.ok(YA, OUT, TCP, 80));
}

#[test]
fn unresolvable_named_port_allows_nothing() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![Rule {
            peers: None,
            ports: vec![named("nope")],
        }]),
        None,
    );
    for port in [80, 8080, 0] {
        assert!(!c.ok(YA, XA, TCP, port));
    }
}

#[test]
fn end_port_is_an_inclusive_range_and_protocols_are_distinct() {
    let mut c = C::new();
    let ports = vec![
        PortSpec {
            protocol: Protocol::Udp,
            port: Some(PortRef::Number(1000)),
            end_port: Some(1010),
        },
        PortSpec {
            protocol: Protocol::Sctp,
            port: None,
            end_port: None,
        },
    ];
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![Rule { peers: None, ports }]),
        None,
    );
    assert!(c.ok(YA, XA, UDP, 1000) && c.ok(YA, XA, UDP, 1010));
    assert!(!c.ok(YA, XA, UDP, 999) && !c.ok(YA, XA, UDP, 1011) && !c.ok(YA, XA, TCP, 1000));
    assert!(c.ok(YA, XA, SCTP, 1) && c.ok(YA, XA, SCTP, 65535));
}

#[test]
fn rule_without_ports_allows_every_protocol_but_port_rules_never_icmp() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        sel(&[("app", "web")]),
        Some(vec![from(vec![pods(None, None)], vec![])]),
        None,
    );
    c.policy(
        "x",
        "q",
        sel(&[("app", "db")]),
        Some(vec![from(vec![pods(None, None)], vec![tcp(80)])]),
        None,
    );
    assert!(c.ok(XB, XA, ICMP, 0));
    assert!(!c.ok(XA, XB, ICMP, 0));
}

#[test]
fn dual_stack_and_families_do_not_mix() {
    let mut c = C::new();
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![from(vec![block("::/0", &[])], vec![])]),
        None,
    );
    assert!(c.ok(YA6, XA6, TCP, 1));
    assert!(!c.ok(YA, XA, TCP, 1), "::/0 does not cover IPv4");
    c.policy(
        "x",
        "p",
        LabelSelector::everything(),
        Some(vec![from(
            vec![pods(Some(sel(&[("team", "b")])), None)],
            vec![],
        )]),
        None,
    );
    assert!(c.ok(YA6, XA6, TCP, 1) && c.ok(YA, XA, TCP, 1));
}

#[test]
fn host_network_pods_are_neither_isolated_nor_selectable_and_the_node_is_admitted() {
    let mut c = C::new();
    c.policy(
        "y",
        "p",
        LabelSelector::everything(),
        Some(vec![]),
        Some(vec![]),
    );
    c.policy(
        "x",
        "q",
        LabelSelector::everything(),
        Some(vec![from(
            vec![pods(Some(LabelSelector::everything()), None)],
            vec![],
        )]),
        None,
    );
    // y/h (hostNetwork on the node's address) is not isolated by y's deny-all...
    assert!(c.ok(XA, NODE_V4, TCP, 10250));
    // ...and as the node it reaches x's pods although no selector can match it.
    assert!(c.ok(NODE_V4, XA, TCP, 80));
    // y's ordinary pods are isolated by it.
    assert!(!c.ok(XA, YA, TCP, 80));
    let m = compile(&c.snap, &mut CompilerState::new());
    assert!(
        m.ipcache
            .values()
            .any(|v| v.identity == policy_common::IDENTITY_HOST)
    );
    assert_eq!(
        m.endpoints.len(),
        3,
        "x/a (two addresses) and x/b; never y/h"
    );
}

#[test]
fn policies_selecting_no_local_pod_cost_nothing() {
    let mut c = C::new();
    let base = compile(&c.snap, &mut CompilerState::new());
    c.policy(
        "y",
        "remote-only",
        sel(&[("app", "web")]),
        Some(vec![from(vec![block("0.0.0.0/0", &[])], vec![tcp(80)])]),
        None,
    );
    assert_eq!(compile(&c.snap, &mut CompilerState::new()), base);
}

#[test]
fn invalid_rule_fails_closed_but_keeps_isolating() {
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "bad"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/33"}}]}]}
    })).expect("shape");
    let conv = policy_agent::convert::network_policy(&np);
    assert_eq!(conv.errors.len(), 1);
    let mut c = C::new();
    c.snap.policies.insert(conv.value.key(), conv.value);
    assert!(!c.ok(YA, XA, TCP, 80));
    assert!(!c.ok(OUT, XA, TCP, 80));
    assert!(c.ok(NODE_V4, XA, TCP, 80));
}
