//! The cluster the scale bench feeds the agent: 10,000 pods over 100 nodes in 100 namespaces
//! of 100 pods, and 10 NetworkPolicies per namespace (1,000), as API objects (JSON values).
//!
//! Pod `j` of every namespace runs on `node-j`, so each node holds one pod of each namespace
//! and the local node (`node-0`) holds 100 pods spread over all namespaces, as a scheduler
//! spreading replicas would. Local pods carry the test bed's real addresses; a remote pod on
//! `node-k` gets `198.18.k.(n+1)` and `fd00:18::k:(n+1)` (namespace `n`), a /24 per node like
//! a per-node pod CIDR, which never meets the bed's `198.18.0.x`, its externals (`198.19.0.x`)
//! or the node's own `198.18.255.254`.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

pub const NODES: usize = 100;
pub const NAMESPACES: usize = 100;
pub const POLICIES_PER_NAMESPACE: usize = 10;
pub const LOCAL_NODE: &str = "node-0";

/// What a run loads: the empty baseline (only the local pods and their namespaces), every
/// pod without policies, or everything. The middle one separates what pods cost from what
/// policies cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Empty,
    Pods,
    Full,
}

impl Load {
    pub const ALL: [Load; 3] = [Load::Empty, Load::Pods, Load::Full];

    pub fn name(self) -> &'static str {
        match self {
            Load::Empty => "empty",
            Load::Pods => "pods",
            Load::Full => "full",
        }
    }
}

/// The objects of one load, by kind.
pub struct Objects {
    pub namespaces: Vec<Value>,
    pub pods: Vec<Value>,
    pub policies: Vec<Value>,
}

impl Objects {
    /// Every object, namespaces first (the order a manifest reader and a human expect).
    pub fn all(&self) -> impl Iterator<Item = &Value> {
        self.namespaces
            .iter()
            .chain(&self.pods)
            .chain(&self.policies)
    }

    /// Ingress and egress rules over all policies (the unit "per rule" figures divide by).
    pub fn rules(&self) -> usize {
        self.policies
            .iter()
            .map(|p| {
                let len = |f: &str| p["spec"][f].as_array().map_or(0, Vec::len);
                len("ingress") + len("egress")
            })
            .sum()
    }
}

/// The objects of `load`; `local[n]` is the address pair of namespace `n`'s local pod.
pub fn generate(load: Load, local: &[(Ipv4Addr, Ipv6Addr)]) -> Objects {
    generate_sized(load, local, NODES)
}

/// [`generate`] with `pods_per_namespace` pods in each namespace (on as many nodes, at most
/// [`MAX_NODES`]) instead of [`NODES`].
pub fn generate_sized(
    load: Load,
    local: &[(Ipv4Addr, Ipv6Addr)],
    pods_per_namespace: usize,
) -> Objects {
    assert_eq!(local.len(), NAMESPACES, "one local pod per namespace");
    assert!((1..=MAX_NODES).contains(&pods_per_namespace));
    let pods_per_namespace = if load == Load::Empty {
        1
    } else {
        pods_per_namespace
    };
    Objects {
        namespaces: (0..NAMESPACES).map(namespace).collect(),
        pods: (0..NAMESPACES)
            .flat_map(|n| (0..pods_per_namespace).map(move |j| (n, j)))
            .map(|(n, j)| {
                let addrs = if j == 0 { local[n] } else { remote_addrs(j, n) };
                pod(n, j, addrs)
            })
            .collect(),
        policies: if load == Load::Full {
            (0..NAMESPACES)
                .flat_map(|n| (0..POLICIES_PER_NAMESPACE).map(move |k| policy(n, k)))
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn ns_name(n: usize) -> String {
    format!("ns-{n:02}")
}

/// Nodes the address plan holds: 255 /24s in 198.18.0.0/16 and 244 more in 198.19.0.0/16.
pub const MAX_NODES: usize = 500;

/// Node `k`'s pod of namespace `n` (1 <= k < [`MAX_NODES`]). Nodes past 255 take /24s of
/// 198.19.1.0 to 198.19.244.0 (never the bed's externals in 198.19.0.x).
fn remote_addrs(k: usize, n: usize) -> (Ipv4Addr, Ipv6Addr) {
    let v4 = if k <= 255 {
        Ipv4Addr::new(198, 18, k as u8, n as u8 + 1)
    } else {
        Ipv4Addr::new(198, 19, (k - 255) as u8, n as u8 + 1)
    };
    (
        v4,
        Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, k as u16, n as u16 + 1),
    )
}

fn namespace(n: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns_name(n), "labels": {
            "kubernetes.io/metadata.name": ns_name(n),
            "team": format!("t{}", n % 10),
            "env": if n.is_multiple_of(3) { "dev" } else { "prod" },
        }},
    })
}

const TIERS: [&str; 3] = ["web", "api", "db"];

/// Pod `j` of namespace `n`, on `node-j`. Its app and tier vary over both indices, and the
/// app with `n / 10` where the policies' selectors go with `n`, so each policy selecting by app
/// selects the local pod (j = 0) of a tenth of the namespaces; its named ports differ by tier, so `http` resolves to different numbers on different pods.
fn pod(n: usize, j: usize, (v4, v6): (Ipv4Addr, Ipv6Addr)) -> Value {
    let tier = TIERS[(n * 7 + j) % 3];
    let http = if tier == "web" { 80 } else { 8080 };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{j:02}"), "namespace": ns_name(n), "labels": {
            "app": format!("app{}", (n / 10 + j) % 10),
            "tier": tier,
            "release": if j.is_multiple_of(4) { "canary" } else { "stable" },
        }},
        "spec": {"nodeName": format!("node-{j}"), "containers": [{"name": "main", "image": "app",
            "ports": [{"name": "http", "containerPort": http},
                      {"name": "metrics", "containerPort": 9090},
                      {"name": "grpc", "containerPort": 50051},
                      {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"phase": "Running", "hostIP": "198.18.255.254",
                   "podIP": v4.to_string(),
                   "podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}]},
    })
}

/// Policy `k` of namespace `n`: ten shapes seen in real clusters, from default deny to
/// cross-namespace selectors, CIDRs with holes, named ports and port ranges.
fn policy(n: usize, k: usize) -> Value {
    let app = |d: usize| json!({"matchLabels": {"app": format!("app{}", (n + d) % 10)}});
    let ns = n as u8;
    let v4_block = json!({"ipBlock": {"cidr": "198.19.0.0/16",
                                      "except": [format!("198.19.{ns}.0/24")]}});
    let v6_block = json!({"ipBlock": {"cidr": "fd00:19::/32",
                                      "except": [format!("fd00:19:0:{ns:x}::/64")]}});
    let (types, spec): (&[&str], Value) = match k {
        0 => (&["Ingress"], json!({"podSelector": {}})),
        1 => (
            &["Ingress"],
            json!({"podSelector": app(0), "ingress": [
                {"from": [{"podSelector": app(1)}], "ports": [{"port": "http"}]}]}),
        ),
        2 => (
            &["Ingress"],
            json!({"podSelector": {"matchLabels": {"tier": "api"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (n + 1) % 10)}},
                           "podSelector": {"matchLabels": {"tier": "web"}}}],
                 "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}]}]}),
        ),
        3 => (
            &["Ingress"],
            json!({"podSelector": app(2), "ingress": [
                {"from": [v4_block, v6_block], "ports": [{"protocol": "TCP", "port": 443}]}]}),
        ),
        4 => (
            &["Ingress"],
            json!({"podSelector": {"matchExpressions": [
                       {"key": "tier", "operator": "In", "values": ["web", "api"]}]},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                                "ports": [{"port": "metrics"}]}]}),
        ),
        5 => (
            &["Egress"],
            json!({"podSelector": {"matchLabels": {"tier": "db"}}, "egress": []}),
        ),
        6 => (
            &["Egress"],
            json!({"podSelector": {}, "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-00"}},
                         "podSelector": {"matchLabels": {"app": "app0"}}}],
                 "ports": [{"protocol": "UDP", "port": "dns"}, {"protocol": "TCP", "port": 53}]}]}),
        ),
        7 => (
            &["Egress"],
            json!({"podSelector": app(3), "egress": [
                {"to": [{"ipBlock": {"cidr": "198.19.0.0/16",
                                     "except": [format!("198.19.{ns}.0/24"), "198.19.255.0/24"]}}],
                 "ports": [{"protocol": "TCP", "port": 443},
                           {"protocol": "TCP", "port": 5000, "endPort": 5999}]}]}),
        ),
        8 => (
            &["Ingress", "Egress"],
            json!({"podSelector": app(4),
                   "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "grpc"}]}],
                   "egress": [{"to": [{"podSelector": {"matchExpressions": [
                                  {"key": "app", "operator": "NotIn", "values": ["app5", "app6"]}]}}],
                               "ports": [{"port": "http"}]},
                              {"to": [{"ipBlock": {"cidr": "198.18.0.0/15"}}]}]}),
        ),
        _ => (
            &["Ingress"],
            json!({"podSelector": {"matchLabels": {"release": "canary"}}, "ingress": [
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                 "ports": [{"protocol": "SCTP", "port": 3868},
                           {"protocol": "TCP", "port": 9000, "endPort": 9100}]}]}),
        ),
    };
    let mut spec = spec;
    spec["policyTypes"] = json!(types);
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np-{k}"), "namespace": ns_name(n)},
        "spec": spec,
    })
}
