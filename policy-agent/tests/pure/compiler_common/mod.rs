//! Shared by the compiler test files: cluster builders, random clusters, and a cluster-wide
//! kernel model (one compile per node, each flow decided at the nodes of its two ends).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use policy_agent::compiler::{CompilerState, MapContents, compile};
use policy_agent::kernel_model::KernelModel;
use policy_agent::model::*;
use policy_common::{Direction, Reason};
use proptest::prelude::*;

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn net(s: &str) -> IpNet {
    s.parse().expect("test cidr")
}

pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: Vec::new(),
    }
}

pub const NODES: [&str; 2] = ["n1", "n2"];

/// Every node's map contents for one snapshot.
pub struct Cluster {
    pub maps: Vec<MapContents>,
}

impl Cluster {
    pub fn compile(snap: &Snapshot) -> Cluster {
        let mut nodes: BTreeSet<String> = NODES.iter().map(|n| n.to_string()).collect();
        nodes.extend(snap.pods.values().filter_map(|p| p.node.clone()));
        let maps = nodes
            .into_iter()
            .map(|n| {
                let mut s = snap.clone();
                s.node = n;
                compile(&s, &mut CompilerState::new())
            })
            .collect();
        Cluster { maps }
    }

    fn decide(
        &self,
        local: IpAddr,
        dir: Direction,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<Reason> {
        self.maps
            .iter()
            .find_map(|m| KernelModel::new(m).decide_at(local, dir, peer, proto, port))
    }

    /// A new flow passes the source's egress and the destination's ingress.
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        self.decide(src, Direction::Egress, dst, proto, port)
            .is_none_or(Reason::is_allow)
            && self
                .decide(dst, Direction::Ingress, src, proto, port)
                .is_none_or(Reason::is_allow)
    }
}

// ---- random clusters ----

pub const NODE_V4: &str = "198.18.255.1";
pub const NODE_V6: &str = "fd00::ff:1";
pub const EXTERNAL: [&str; 6] = [
    "203.0.113.5",
    "198.18.1.1",
    "198.18.0.200",
    "fd00::1:5",
    "2001:db8::1",
    "198.19.0.1",
];

fn label_pool() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["web", "db", "api"])),
        prop::option::of(prop::sample::select(vec!["fe", "be"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(a) = app {
                l.insert("app".into(), a.into());
            }
            if let Some(t) = tier {
                l.insert("tier".into(), t.into());
            }
            l
        })
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        prop::sample::select(vec!["web", "db", "api"]).prop_map(|a| sel(&[("app", a)])),
        prop::sample::select(vec!["fe", "be"]).prop_map(|t| sel(&[("tier", t)])),
        (
            prop::sample::select(vec![
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist
            ]),
            prop::sample::select(vec!["app", "tier"])
        )
            .prop_map(|(op, key)| {
                let values = match op {
                    Operator::In | Operator::NotIn => {
                        ["web", "fe"].iter().map(|s| s.to_string()).collect()
                    }
                    _ => BTreeSet::new(),
                };
                LabelSelector {
                    match_labels: Labels::new(),
                    match_expressions: vec![Requirement {
                        key: key.into(),
                        operator: op,
                        values,
                    }],
                }
            }),
    ]
}

fn ns_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        prop::sample::select(vec!["x", "y"]).prop_map(|t| sel(&[("team", t)])),
        prop::sample::select(vec!["a", "b", "c", "gone"])
            .prop_map(|n| sel(&[("kubernetes.io/metadata.name", n)])),
    ]
}

const BLOCKS: [(&str, &[&str]); 9] = [
    ("198.18.0.0/24", &["198.18.0.0/28"]),
    ("198.18.0.0/16", &[]),
    ("198.18.0.8/29", &["198.18.0.12/30"]),
    ("0.0.0.0/0", &["198.18.0.0/16"]),
    ("198.18.0.0/15", &["198.18.0.0/24", "198.19.0.0/16"]),
    ("fd00::/64", &["fd00::/124"]),
    ("::/0", &[]),
    ("203.0.113.0/24", &[]),
    ("198.18.255.0/24", &[]),
];

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (
            prop::option::of(ns_selector()),
            prop::option::of(selector())
        )
            .prop_filter("a peer selects something", |(n, p)| n.is_some()
                || p.is_some())
            .prop_map(|(namespaces, pods)| Peer::Pods { namespaces, pods }),
        prop::sample::select(BLOCKS.to_vec()).prop_map(|(c, e)| Peer::IpBlock {
            cidr: net(c),
            except: e.iter().map(|s| net(s)).collect(),
        }),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        prop::sample::select(Protocol::ALL.to_vec()),
        prop_oneof![
            Just((None, None)),
            prop::sample::select(vec![53u16, 80, 8080, 9090])
                .prop_map(|p| (Some(PortRef::Number(p)), None)),
            (prop::sample::select(vec![53u16, 80, 1000]), 0u16..100)
                .prop_map(|(p, w)| (Some(PortRef::Number(p)), Some(p + w))),
            prop::sample::select(vec!["http", "dns", "metrics", "nope"])
                .prop_map(|n| (Some(PortRef::Name(n.into())), None)),
        ],
    )
        .prop_map(|(protocol, (port, end_port))| PortSpec {
            protocol,
            port,
            end_port,
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::weighted(0.8, prop::collection::vec(peer(), 1..4)),
        prop::collection::vec(port_spec(), 0..3),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

pub fn policy() -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        0u8..8,
        selector(),
        prop::sample::select(vec![(true, false), (false, true), (true, true)]),
        prop::collection::vec(rule(), 0..3),
        prop::collection::vec(rule(), 0..3),
    )
        .prop_map(
            |(ns, n, pod_selector, (ingress_isolation, egress_isolation), ingress, egress)| {
                NetworkPolicy {
                    namespace: ns.into(),
                    name: format!("p{n}"),
                    pod_selector,
                    ingress_isolation,
                    egress_isolation,
                    ingress,
                    egress,
                    declared: None,
                }
            },
        )
}

/// A pod; `slot` makes its addresses unique (198.18.0.<slot+1>, fd00::<slot+1>).
pub fn pod(slot: u8) -> impl Strategy<Value = Pod> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        label_pool(),
        prop::sample::select(vec![
            (true, false),
            (false, true),
            (true, true),
            (false, false),
        ]),
        prop::collection::vec(
            prop::sample::select(vec![
                ("http", Protocol::Tcp, 80u16),
                ("http", Protocol::Tcp, 8080),
                ("dns", Protocol::Udp, 53),
                ("dns", Protocol::Tcp, 53),
                ("metrics", Protocol::Tcp, 9090),
                ("metrics", Protocol::Sctp, 1050),
            ]),
            0..3,
        ),
        prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    )
        .prop_map(move |(ns, labels, (v4, v6), ports, roll)| {
            let host_network = roll == 0;
            let node = if roll % 2 == 0 { "n1" } else { "n2" };
            let mut ips = Vec::new();
            if host_network {
                // hostNetwork pods use their node's addresses.
                ips = vec![ip(NODE_V4), ip(NODE_V6)];
            } else {
                if v4 {
                    ips.push(IpAddr::from([198, 18, 0, slot + 1]));
                }
                if v6 {
                    ips.push(ip(&format!("fd00::{:x}", u16::from(slot) + 1)));
                }
            }
            let mut cps: Vec<ContainerPort> = Vec::new();
            for (n, protocol, port) in ports {
                // One port per (name, protocol) as the API requires of a pod.
                if !cps.iter().any(|c| c.name.as_deref() == Some(n)) {
                    cps.push(ContainerPort {
                        name: Some(n.into()),
                        port,
                        protocol,
                    });
                }
            }
            Pod {
                namespace: ns.into(),
                name: format!("pod{slot}"),
                labels,
                ips,
                ports: cps,
                host_network,
                node: Some(if host_network { "n1" } else { node }.into()),
            }
        })
}

pub fn namespaces() -> impl Strategy<Value = BTreeMap<String, Namespace>> {
    prop::collection::vec(prop::option::of(prop::sample::select(vec!["x", "y"])), 3).prop_map(
        |teams| {
            ["a", "b", "c"]
                .iter()
                .zip(teams)
                .map(|(n, team)| {
                    let mut l = labels(&[("kubernetes.io/metadata.name", n)]);
                    if let Some(t) = team {
                        l.insert("team".into(), t.into());
                    }
                    (
                        n.to_string(),
                        Namespace {
                            name: n.to_string(),
                            labels: l,
                        },
                    )
                })
                .collect()
        },
    )
}

pub fn snapshot(max_pods: usize, max_policies: usize) -> impl Strategy<Value = Snapshot> {
    (
        namespaces(),
        (0..=max_pods).prop_flat_map(|n| (0..n as u8).map(pod).collect::<Vec<_>>()),
        prop::collection::vec(policy(), 0..=max_policies),
    )
        .prop_map(|(namespaces, pods, policies)| Snapshot {
            namespaces,
            pods: pods.into_iter().map(|p| (p.key(), p)).collect(),
            policies: policies.into_iter().map(|p| (p.key(), p)).collect(),
            node: "n1".into(),
            node_addrs: vec![ip(NODE_V4), ip(NODE_V6)],
        })
}
