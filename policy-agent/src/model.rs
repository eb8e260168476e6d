//! Domain model of the objects the agent enforces: namespaces, pods and network policies,
//! already validated. Nothing here knows `k8s_openapi`; conversion from API objects (and
//! validation with fail-closed fallbacks) lives in `convert`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

pub type Labels = BTreeMap<String, String>;

/// Protocols a NetworkPolicy port or a container port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => policy_common::proto::TCP,
            Protocol::Udp => policy_common::proto::UDP,
            Protocol::Sctp => policy_common::proto::SCTP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the API spelling (exactly `TCP`, `UDP` or `SCTP`, as the API server requires).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a pod or policy: (namespace, name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Includes `kubernetes.io/metadata.name`.
    pub labels: Labels,
}

/// A named (or unnamed) container port: named ports are what a policy's `port: name` resolves
/// against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// status.podIPs (one per family at most, in practice).
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    /// spec.nodeName; `None` while unscheduled.
    pub node: Option<String>,
}

impl Pod {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// A pod whose object carries no address yet takes those the CNI plugin reported for
    /// it (the kubelet writes status.podIPs only once the CNI ADD has returned, and the
    /// ADD waits for the pod to be enforced). The object's own addresses always win.
    pub fn take_reported_addresses(&mut self, reported: Option<&Vec<IpAddr>>) {
        if let Some(ips) = reported
            && self.ips.is_empty()
            && !self.host_network
        {
            self.ips = ips.clone();
        }
    }

    /// Resolves a named port on this pod for a protocol (the destination-side resolution the
    /// spec prescribes).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

/// Label selector operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// Non-empty for In/NotIn, empty for Exists/DoesNotExist.
    pub values: BTreeSet<String>,
}

/// A validated label selector: matchLabels and matchExpressions ANDed. The empty selector
/// (`{}`, or null `matchLabels` and no expressions) selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Selects everything.
    pub fn everything() -> Self {
        LabelSelector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector selects an object with these labels.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A rule peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`. `namespaces: None` = the policy's own
    /// namespace; `pods: None` = every pod of the selected namespaces.
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
    /// `ipBlock`: `cidr` minus every `except` (each strictly inside `cidr`, same family).
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

/// A port of a rule. `port: None` = every port of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Option<PortRef>,
    /// Inclusive end of a numeric range (`endPort`), >= the port.
    pub end_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One ingress or egress rule. `peers: None` (missing or empty `from`/`to`) = every peer;
/// `ports` empty = every port and protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// policyTypes after defaulting (the API server's `SetDefaults_NetworkPolicy`).
    pub ingress_isolation: bool,
    pub egress_isolation: bool,
    /// Valid rules only: an invalid rule was dropped (it allows nothing).
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// The defaulting's inputs as the object wrote them; `None` for a policy built in code
    /// (its isolation is what it says). The reference evaluator derives isolation from
    /// these itself, so a defaulting mistake in the conversion shows up as a disagreement.
    pub declared: Option<Declared>,
}

/// What a NetworkPolicy object wrote that `policyTypes` defaulting reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// `spec.policyTypes` as written (`None`: absent).
    pub policy_types: Option<Vec<String>>,
    /// How many rules `spec.egress` listed, valid or not.
    pub egress_rules: usize,
}

impl NetworkPolicy {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// Selects every pod of `namespace`, isolates both directions, admits nothing: what
    /// stands in where the agent must fail closed.
    pub fn deny_all(namespace: &str, name: &str) -> Self {
        NetworkPolicy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            pod_selector: LabelSelector::everything(),
            ingress_isolation: true,
            egress_isolation: true,
            ingress: Vec::new(),
            egress: Vec::new(),
            declared: None,
        }
    }
}

/// Everything the compiler needs: all objects of the cluster and which node this is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    /// This node's name: pods with `node == Some(node)` (and not hostNetwork) are local.
    pub node: String,
    /// This node's own addresses (traffic from them to local pods is always admitted).
    pub node_addrs: Vec<IpAddr>,
}

impl Snapshot {
    pub fn is_local(&self, pod: &Pod) -> bool {
        !pod.host_network && pod.node.as_deref() == Some(self.node.as_str())
    }
}

/// Addresses claimed by more than one pod that takes part in identities (not hostNetwork:
/// those share their node's address by design), with the claimants in name order. Each is
/// a stale pod object or a forged status; the compiler gives such an address to neither pod
/// (see `compiler::shared_endpoint`), and both modes report them.
pub fn shared_addresses<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
) -> BTreeMap<IpAddr, Vec<ObjectKey>> {
    let mut claims: BTreeMap<IpAddr, BTreeSet<ObjectKey>> = BTreeMap::new();
    for pod in pods.into_iter().filter(|p| !p.host_network) {
        for ip in &pod.ips {
            claims.entry(*ip).or_default().insert(pod.key());
        }
    }
    claims
        .into_iter()
        .filter(|(_, pods)| pods.len() > 1)
        .map(|(ip, pods)| (ip, pods.into_iter().collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ips: &[&str], host_network: bool) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: Labels::new(),
            ips: ips.iter().map(|a| a.parse().expect("ip")).collect(),
            ports: Vec::new(),
            host_network,
            node: None,
        }
    }

    #[test]
    fn shared_addresses_name_every_claimant_but_host_network_pods() {
        let pods = [
            pod("x", "b", &["10.0.0.1", "fd00::1"], false),
            pod("y", "a", &["10.0.0.1"], false),
            pod("x", "c", &["10.0.0.2", "fd00::1"], false),
            // hostNetwork pods share the node's address by design.
            pod("x", "h1", &["10.0.0.9"], true),
            pod("x", "h2", &["10.0.0.9"], true),
            // One pod listing an address twice claims it once.
            pod("x", "d", &["10.0.0.3", "10.0.0.3"], false),
        ];
        let shared = shared_addresses(&pods);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let keys = |v: &[(&str, &str)]| v.iter().map(|(n, p)| ObjectKey::new(*n, *p)).collect();
        let want: BTreeMap<IpAddr, Vec<ObjectKey>> = [
            (ip("10.0.0.1"), keys(&[("x", "b"), ("y", "a")])),
            (ip("fd00::1"), keys(&[("x", "b"), ("x", "c")])),
        ]
        .into();
        assert_eq!(shared, want);
    }
}
