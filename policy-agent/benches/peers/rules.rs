//! The policy set every filter of the peers bench enforces, and its rendering for each:
//! NetworkPolicy manifests (ours), iptables-restore and ipset-restore input shaped like
//! kube-router's (and Calico's iptables mode), and an nftables ruleset shaped like
//! kube-network-policies' (one rule per policy and direction over a concatenated set).
//!
//! `n` ingress rules over policies of [`RULES_PER_POLICY`] rules, all selecting the server
//! pod. Each rule admits one peer on TCP to one port or a range of six: of every 20 rules,
//! 16 name a /32 (hosts), 3 a /24 and 1 a /16, all inside 198.18.0.0/15 (so the broad rules
//! cover the narrow ones, the case that costs an LPM encoding most). Every rule's ports are
//! its own block, so no two rules overlap and none admits the probe (its port is below every
//! block) except the last, which admits the client on the probe port: a new connection of
//! the probe meets every other rule first.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

pub const RULES_PER_POLICY: usize = 10;
pub const NAMESPACE: &str = "bench";
/// The probe's port, and one no rule admits.
pub const PROBE_PORT: u16 = 80;
pub const REFUSED_PORT: u16 = 81;
/// Ports of rule `i` start at `FIRST_PORT + PORT_BLOCK * i`.
const FIRST_PORT: u16 = 1024;
const PORT_BLOCK: u16 = 6;
/// The mark kube-router's policy chains set on a packet a rule admits.
const ADMIT_MARK: &str = "0x10000/0x10000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub ports: (u16, u16),
}

impl Rule {
    fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.prefix)
    }
}

/// `n` rules (`n` >= 1, at most what the port space holds), the last one the probe's.
pub fn generate(n: usize, client: Ipv4Addr) -> Vec<Rule> {
    let blocks = usize::from((u16::MAX - FIRST_PORT) / PORT_BLOCK);
    assert!((1..=blocks).contains(&n), "{n} rules: 1 to {blocks}");
    let mut rules: Vec<Rule> = (0..n - 1)
        .map(|i| {
            let (addr, prefix) = match i % 20 {
                0 => (Ipv4Addr::new(198, 18 + ((i / 20) % 2) as u8, 0, 0), 16),
                j @ 1..=3 => {
                    let k = (i / 20) * 3 + j - 1;
                    (Ipv4Addr::new(198, 18 + (k % 2) as u8, (k / 2) as u8, 0), 24)
                }
                _ => (Ipv4Addr::new(198, 19, i as u8, (i >> 8) as u8), 32),
            };
            let first = FIRST_PORT + PORT_BLOCK * i as u16;
            let last = if i % 2 == 0 {
                first
            } else {
                first + PORT_BLOCK - 1
            };
            Rule {
                addr,
                prefix,
                ports: (first, last),
            }
        })
        .collect();
    rules.push(Rule {
        addr: client,
        prefix: 32,
        ports: (PROBE_PORT, PROBE_PORT),
    });
    rules
}

/// The manifests: the namespace, both pods (local, with their real addresses) and the
/// policies, as one multi-document YAML text (JSON documents are YAML).
pub fn manifests(rules: &[Rule], client: Ipv4Addr, server: Ipv4Addr) -> String {
    let mut docs: Vec<Value> = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}},
    })];
    for (name, ip) in [("client", client), ("server", server)] {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "bench"}]},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
        }));
    }
    for (k, chunk) in rules.chunks(RULES_PER_POLICY).enumerate() {
        let ingress: Vec<Value> = chunk
            .iter()
            .map(|r| {
                let mut port = json!({"protocol": "TCP", "port": r.ports.0});
                if r.ports.1 != r.ports.0 {
                    port["endPort"] = r.ports.1.into();
                }
                json!({"from": [{"ipBlock": {"cidr": r.cidr()}}], "ports": [port]})
            })
            .collect();
        docs.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("p{k}"), "namespace": NAMESPACE},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                     "policyTypes": ["Ingress"], "ingress": ingress},
        }));
    }
    docs.iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// `ipset restore` input: per policy a set of the pods it selects, per rule a set of its
/// peers (kube-router makes one per rule; hash:net holds CIDRs of any length).
pub fn ipsets(rules: &[Rule], server: Ipv4Addr) -> String {
    let mut s = String::new();
    for (k, chunk) in rules.chunks(RULES_PER_POLICY).enumerate() {
        let _ = writeln!(s, "create KR-D-{k} hash:ip family inet");
        let _ = writeln!(s, "add KR-D-{k} {server}");
        for (j, r) in chunk.iter().enumerate() {
            let _ = writeln!(s, "create KR-S-{k}-{j} hash:net family inet");
            let _ = writeln!(s, "add KR-S-{k}-{j} {}", r.cidr());
        }
    }
    s
}

/// `iptables-restore` input, kube-router's shape: FORWARD jumps to the pod's firewall chain,
/// which accepts ESTABLISHED,RELATED first, then runs every policy chain selecting the pod;
/// a policy chain marks a packet one of its rules admits (peers by ipset, port in the rule)
/// and returns; an unmarked packet is dropped.
pub fn iptables(rules: &[Rule], server: Ipv4Addr) -> String {
    let policies = rules.len().div_ceil(RULES_PER_POLICY);
    let mut s =
        String::from("*filter\n:KUBE-ROUTER-FORWARD - [0:0]\n:KUBE-POD-FW-SERVER - [0:0]\n");
    for k in 0..policies {
        let _ = writeln!(s, ":KUBE-NWPLCY-{k} - [0:0]");
    }
    s += "-A FORWARD -j KUBE-ROUTER-FORWARD\n";
    let _ = writeln!(
        s,
        "-A KUBE-ROUTER-FORWARD -d {server}/32 -j KUBE-POD-FW-SERVER"
    );
    s += "-A KUBE-POD-FW-SERVER -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    for k in 0..policies {
        let _ = writeln!(s, "-A KUBE-POD-FW-SERVER -j KUBE-NWPLCY-{k}");
    }
    let _ = writeln!(
        s,
        "-A KUBE-POD-FW-SERVER -m mark ! --mark {ADMIT_MARK} -j DROP"
    );
    s += "-A KUBE-POD-FW-SERVER -j ACCEPT\n";
    for (k, chunk) in rules.chunks(RULES_PER_POLICY).enumerate() {
        for (j, r) in chunk.iter().enumerate() {
            let ports = if r.ports.0 == r.ports.1 {
                r.ports.0.to_string()
            } else {
                format!("{}:{}", r.ports.0, r.ports.1)
            };
            let _ = writeln!(
                s,
                "-A KUBE-NWPLCY-{k} -p tcp -m set --match-set KR-S-{k}-{j} src \
                 -m set --match-set KR-D-{k} dst -m tcp --dport {ports} \
                 -j MARK --set-xmark {ADMIT_MARK}"
            );
            let _ = writeln!(
                s,
                "-A KUBE-NWPLCY-{k} -m mark --mark {ADMIT_MARK} -j RETURN"
            );
        }
    }
    s += "COMMIT\n";
    s
}

/// An `nft -f` ruleset, kube-network-policies' shape: established and related accepted
/// first, then one rule per policy matching `saddr . l4proto . dport` against the policy's
/// interval set, then a drop for the isolated pod.
pub fn nftables(rules: &[Rule], server: Ipv4Addr) -> String {
    let mut s = String::from("table ip peerbench {\n");
    let policies = rules.len().div_ceil(RULES_PER_POLICY);
    for (k, chunk) in rules.chunks(RULES_PER_POLICY).enumerate() {
        let elements: Vec<String> = chunk
            .iter()
            .map(|r| {
                let ports = if r.ports.0 == r.ports.1 {
                    r.ports.0.to_string()
                } else {
                    format!("{}-{}", r.ports.0, r.ports.1)
                };
                format!("{} . tcp . {ports}", r.cidr())
            })
            .collect();
        let _ = writeln!(
            s,
            "  set allow{k} {{\n    type ipv4_addr . inet_proto . inet_service\n    \
             flags interval\n    elements = {{ {} }}\n  }}",
            elements.join(", ")
        );
    }
    s += "  chain forward {\n    type filter hook forward priority filter; policy accept;\n";
    s += "    ct state established,related accept\n";
    for k in 0..policies {
        let _ = writeln!(
            s,
            "    ip daddr {server} ip saddr . meta l4proto . th dport @allow{k} accept"
        );
    }
    let _ = writeln!(s, "    ip daddr {server} drop\n  }}\n}}");
    s
}
