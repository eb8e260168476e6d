//! The cluster of a scenario: its namespaces, pods and external hosts with their addresses.
//! The address scheme is fixed and public so the kernel runner builds exactly the hosts the
//! simulation reasons about:
//! - the nodes `node-1` .. `node-N` (the runner's choice of N, 1 unless told): [`node_v4`] /
//!   [`node_v6`] (node 1 at [`NODE_V4`] / [`NODE_V6`]); pods go round-robin over the nodes in
//!   file order unless they name theirs (`node:`);
//! - pod number `i` (file order, from 0): [`pod_v4`] / [`pod_v6`] (198.18.1.1, 198.18.1.2, ...
//!   and fd00:18::1:1, ...); a `hostNetwork` pod uses the node's addresses;
//! - the ClusterIP of pod `i`'s own Service (`via: service`): [`service_v4`] / [`service_v6`];
//! - externals: the addresses the file gives, inside 198.19.0.0/16 and fd00:19::/64.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::ScenarioError;
use super::format::{IpFamily, PodDef, ProtocolName, ScenarioFile};
use policy_agent::convert;
use policy_agent::model::{ContainerPort, Labels, Namespace, ObjectKey, Pod, Protocol, Snapshot};
use policy_agent::reference::NAMESPACE_NAME_LABEL;

/// The first node's own addresses: the same as the namespace test bed's
/// (`testbed::NODE_IPV4`/`6`), so a one-node runner built on it needs no other node address.
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfffe);
/// Most nodes a scenario may run on.
pub const MAX_NODES: usize = 16;

/// The name of node number `index` (from 0): `node-1`, `node-2`, ...
pub fn node_name(index: usize) -> String {
    format!("node-{}", index + 1)
}

/// The own addresses of node number `index` (from 0), counting down from [`NODE_V4`] /
/// [`NODE_V6`] (above the ClusterIPs, below nothing else).
pub fn node_v4(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(NODE_V4) - index as u32)
}

pub fn node_v6(index: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(NODE_V6) - index as u128)
}
/// Pods and services live here (pods in its lower half, ClusterIPs in its upper half).
pub const POD_NET_V4: Ipv4Net = ipv4_net(Ipv4Addr::new(198, 18, 0, 0), 16);
pub const POD_NET_V6: Ipv6Net = ipv6_net(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0), 64);
pub const EXTERNAL_NET_V4: Ipv4Net = ipv4_net(Ipv4Addr::new(198, 19, 0, 0), 16);
pub const EXTERNAL_NET_V6: Ipv6Net = ipv6_net(Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0), 64);
/// Most pods a scenario may have (their IPv4 addresses stay below the ClusterIPs, 198.18.128.0/17).
pub const MAX_PODS: usize = 127 * 256 - 258;

const fn ipv4_net(a: Ipv4Addr, len: u8) -> Ipv4Net {
    match Ipv4Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("constant prefix"),
    }
}

const fn ipv6_net(a: Ipv6Addr, len: u8) -> Ipv6Net {
    match Ipv6Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("constant prefix"),
    }
}

/// Address of pod number `index` (from 0).
pub fn pod_v4(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + index as u32 + 1)
}

pub fn pod_v6(index: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 1, 0)) + index as u128 + 1)
}

/// ClusterIP of the Service of pod number `index`.
pub fn service_v4(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + index as u32 + 1)
}

pub fn service_v6(index: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 2, 0)) + index as u128 + 1)
}

/// The standard model's names.
pub const STANDARD_NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const STANDARD_PODS: [&str; 3] = ["a", "b", "c"];

/// The standard pod's container ports: 80 and 81 over TCP, UDP and SCTP, named
/// `serve-<port>-<proto>`.
pub fn standard_ports() -> Vec<ContainerPort> {
    let mut ports = Vec::new();
    for port in [80u16, 81] {
        for protocol in Protocol::ALL {
            let name = format!("serve-{port}-{}", protocol.as_str().to_lowercase());
            ports.push(ContainerPort {
                name: Some(name),
                port,
                protocol,
            });
        }
    }
    ports
}

/// A probe source or destination, by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointName {
    Pod(ObjectKey),
    External(String),
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointName::Pod(key) => write!(f, "{key}"),
            EndpointName::External(name) => write!(f, "external:{name}"),
        }
    }
}

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHost {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodHost {
    pub key: ObjectKey,
    /// Position in the file's pod list: determines the addresses.
    pub index: usize,
    /// Index into [`Topology::nodes`].
    pub node: usize,
    /// Labels at the start of the scenario.
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    /// The pod's own addresses (the node's for a hostNetwork pod).
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub service_v4: Ipv4Addr,
    pub service_v6: Ipv6Addr,
}

impl PodHost {
    pub fn addr(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.v4.into(),
            IpFamily::V6 => self.v6.into(),
        }
    }

    pub fn service_addr(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.service_v4.into(),
            IpFamily::V6 => self.service_v6.into(),
        }
    }

    /// Whether the pod serves this port (a probe to a port nobody listens on says nothing
    /// about policy).
    pub fn serves(&self, protocol: Protocol, port: u16) -> bool {
        self.ports
            .iter()
            .any(|p| p.protocol == protocol && p.port == port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalHost {
    pub name: String,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl ExternalHost {
    pub fn addr(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.v4.map(IpAddr::from),
            IpFamily::V6 => self.v6.map(IpAddr::from),
        }
    }
}

/// The hosts of a scenario, fixed for its whole run (steps change labels and policies only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// At least one.
    pub nodes: Vec<NodeHost>,
    /// Namespaces with their labels at the start (`kubernetes.io/metadata.name` included).
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodHost>,
    pub externals: Vec<ExternalHost>,
    pub families: Vec<IpFamily>,
}

impl Topology {
    /// Builds and validates the topology of file `f` on `nodes` nodes (more when the file
    /// asks for more with `nodes:`).
    pub fn build(file: &str, f: &ScenarioFile, nodes: usize) -> Result<Topology, ScenarioError> {
        let err = |field: String, msg: String| ScenarioError::new(file, None, field, msg);
        if nodes == 0 || nodes > MAX_NODES {
            return Err(err(
                String::new(),
                format!("{nodes} nodes: a scenario runs on 1 to {MAX_NODES}"),
            ));
        }
        let nodes = match f.nodes {
            Some(least) if least == 0 || least > MAX_NODES => {
                return Err(err(
                    "nodes".into(),
                    format!("{least}: a scenario runs on 1 to {MAX_NODES} nodes"),
                ));
            }
            Some(least) => nodes.max(least),
            None => nodes,
        };
        let nodes: Vec<NodeHost> = (0..nodes)
            .map(|i| NodeHost {
                name: node_name(i),
                v4: node_v4(i),
                v6: node_v6(i),
            })
            .collect();

        let mut namespaces = BTreeMap::new();
        match &f.namespaces {
            None => {
                for ns in STANDARD_NAMESPACES {
                    namespaces.insert(ns.to_string(), namespace_labels(ns, &BTreeMap::new()));
                }
            }
            Some(defs) => {
                if defs.is_empty() {
                    return Err(err("namespaces".into(), "no namespace given".into()));
                }
                for (name, def) in defs {
                    let field = format!("namespaces.{name}");
                    if !is_dns_label(name) {
                        return Err(err(
                            field,
                            format!("{name:?} is not a valid namespace name"),
                        ));
                    }
                    check_labels(&def.labels).map_err(|m| err(format!("{field}.labels"), m))?;
                    namespaces.insert(name.clone(), namespace_labels(name, &def.labels));
                }
            }
        }

        let defs: Vec<PodDef> = match &f.pods {
            Some(pods) => pods.clone(),
            None => namespaces
                .keys()
                .flat_map(|ns| {
                    STANDARD_PODS.iter().map(move |p| PodDef {
                        namespace: ns.clone(),
                        name: p.to_string(),
                        labels: BTreeMap::from([("pod".to_string(), p.to_string())]),
                        ports: None,
                        host_network: false,
                        node: None,
                    })
                })
                .collect(),
        };
        if defs.len() > MAX_PODS {
            return Err(err("pods".into(), format!("more than {MAX_PODS} pods")));
        }
        let mut pods = Vec::new();
        let mut seen = BTreeSet::new();
        for (index, def) in defs.iter().enumerate() {
            let field = format!("pods[{index}]");
            if !namespaces.contains_key(&def.namespace) {
                return Err(err(
                    format!("{field}.namespace"),
                    format!("namespace {:?} is not declared", def.namespace),
                ));
            }
            if !is_dns_label(&def.name) {
                return Err(err(
                    format!("{field}.name"),
                    format!("{:?} is not a valid pod name", def.name),
                ));
            }
            let key = ObjectKey::new(&def.namespace, &def.name);
            if !seen.insert(key.clone()) {
                return Err(err(
                    format!("{field}.name"),
                    format!("pod {key} is declared twice"),
                ));
            }
            check_labels(&def.labels).map_err(|m| err(format!("{field}.labels"), m))?;
            let ports = match &def.ports {
                None => standard_ports(),
                Some(list) => {
                    let mut ports = Vec::new();
                    for (j, p) in list.iter().enumerate() {
                        let pf = format!("{field}.ports[{j}]");
                        if p.port == 0 {
                            return Err(err(format!("{pf}.port"), "port 0 is not a port".into()));
                        }
                        if let Some(name) = &p.name
                            && !convert::valid_port_name(name)
                        {
                            return Err(err(
                                format!("{pf}.name"),
                                format!("{name:?} is not a valid port name (IANA_SVC_NAME)"),
                            ));
                        }
                        let protocol = protocol_of(p.protocol);
                        let cp = ContainerPort {
                            name: p.name.clone(),
                            port: p.port,
                            protocol,
                        };
                        if ports.iter().any(|q: &ContainerPort| {
                            q.protocol == protocol
                                && (q.port == p.port || (q.name.is_some() && q.name == p.name))
                        }) {
                            return Err(err(
                                pf,
                                "duplicate port or port name for this protocol".into(),
                            ));
                        }
                        ports.push(cp);
                    }
                    ports
                }
            };
            let node = match &def.node {
                None => index % nodes.len(),
                Some(name) => nodes.iter().position(|n| &n.name == name).ok_or_else(|| {
                    err(
                        format!("{field}.node"),
                        format!(
                            "{name:?} is not a node of this run (node-1 .. node-{})",
                            nodes.len()
                        ),
                    )
                })?,
            };
            if def.host_network {
                // hostNetwork pods share their node's addresses: two cannot serve one port.
                let other = pods
                    .iter()
                    .filter(|p: &&PodHost| p.host_network && p.node == node)
                    .find_map(|p| {
                        ports
                            .iter()
                            .find(|c| p.serves(c.protocol, c.port))
                            .map(|c| (p, c))
                    });
                if let Some((p, c)) = other {
                    return Err(err(
                        format!("{field}.ports"),
                        format!(
                            "{}/{} is already served on the node by hostNetwork pod {}",
                            c.protocol, c.port, p.key
                        ),
                    ));
                }
            }
            let (v4, v6) = if def.host_network {
                (nodes[node].v4, nodes[node].v6)
            } else {
                (pod_v4(index), pod_v6(index))
            };
            pods.push(PodHost {
                key,
                index,
                node,
                labels: def.labels.clone(),
                ports,
                host_network: def.host_network,
                v4,
                v6,
                service_v4: service_v4(index),
                service_v6: service_v6(index),
            });
        }

        let families = match &f.ip_families {
            None => vec![IpFamily::V4],
            Some(list) => {
                if list.is_empty() {
                    return Err(err(
                        "ipFamilies".into(),
                        "empty: give [IPv4], [IPv6] or both".into(),
                    ));
                }
                let mut fams = list.clone();
                fams.sort();
                fams.dedup();
                if fams.len() != list.len() {
                    return Err(err("ipFamilies".into(), "a family is listed twice".into()));
                }
                list.clone()
            }
        };

        let mut externals = Vec::new();
        let mut names = BTreeSet::new();
        for (i, e) in f.externals.iter().enumerate() {
            let field = format!("externals[{i}]");
            if !is_dns_label(&e.name) {
                return Err(err(
                    format!("{field}.name"),
                    format!("{:?} is not a valid name", e.name),
                ));
            }
            if !names.insert(e.name.clone()) {
                return Err(err(
                    format!("{field}.name"),
                    format!("external {:?} is declared twice", e.name),
                ));
            }
            if let Some(ip) = e.ip
                && !EXTERNAL_NET_V4.contains(&ip)
            {
                return Err(err(
                    format!("{field}.ip"),
                    format!("{ip} is outside {EXTERNAL_NET_V4}"),
                ));
            }
            if let Some(ip) = e.ip6
                && !EXTERNAL_NET_V6.contains(&ip)
            {
                return Err(err(
                    format!("{field}.ip6"),
                    format!("{ip} is outside {EXTERNAL_NET_V6}"),
                ));
            }
            if e.ip.is_none() && e.ip6.is_none() {
                // An external without an address of a family sits that family's probes out.
                return Err(err(field, "give ip, ip6 or both".into()));
            }
            externals.push(ExternalHost {
                name: e.name.clone(),
                v4: e.ip,
                v6: e.ip6,
            });
        }
        let mut addrs = BTreeSet::new();
        for e in &externals {
            for a in
                e.v4.map(IpAddr::from)
                    .into_iter()
                    .chain(e.v6.map(IpAddr::from))
            {
                if !addrs.insert(a) {
                    return Err(err(
                        "externals".into(),
                        format!("address {a} is used twice"),
                    ));
                }
            }
        }

        Ok(Topology {
            nodes,
            namespaces,
            pods,
            externals,
            families,
        })
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&PodHost> {
        self.pods.iter().find(|p| &p.key == key)
    }

    pub fn external(&self, name: &str) -> Option<&ExternalHost> {
        self.externals.iter().find(|e| e.name == name)
    }

    /// Every probe endpoint: pods in file order, then externals.
    pub fn endpoints(&self) -> Vec<EndpointName> {
        self.pods
            .iter()
            .map(|p| EndpointName::Pod(p.key.clone()))
            .chain(
                self.externals
                    .iter()
                    .map(|e| EndpointName::External(e.name.clone())),
            )
            .collect()
    }

    /// The snapshot at the start: every namespace and pod on its node, no policy, seen from
    /// the first node.
    pub fn initial_snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        self.view_from(0, &mut snap);
        for (name, labels) in &self.namespaces {
            snap.namespaces.insert(
                name.clone(),
                Namespace {
                    name: name.clone(),
                    labels: labels.clone(),
                },
            );
        }
        for p in &self.pods {
            snap.pods.insert(
                p.key.clone(),
                Pod {
                    namespace: p.key.namespace.clone(),
                    name: p.key.name.clone(),
                    labels: p.labels.clone(),
                    ips: vec![p.v4.into(), p.v6.into()],
                    ports: p.ports.clone(),
                    host_network: p.host_network,
                    node: Some(self.node_of(p).name.clone()),
                },
            );
        }
        snap
    }

    /// The node of a pod.
    pub fn node_of(&self, pod: &PodHost) -> &NodeHost {
        &self.nodes[pod.node]
    }

    /// The node pod `key` runs on in `snap` (where a step's `move` put it), else where the
    /// file placed it.
    pub fn node_in(&self, snap: &Snapshot, key: &ObjectKey) -> Option<usize> {
        let placed = self.pod(key)?.node;
        Some(
            snap.pods
                .get(key)
                .and_then(|p| p.node.as_ref())
                .and_then(|name| self.nodes.iter().position(|n| &n.name == name))
                .unwrap_or(placed),
        )
    }

    /// Makes `snap` the cluster as node number `node`'s agent sees it: that node's name and
    /// own addresses (its local pods follow from their node names).
    pub fn view_from(&self, node: usize, snap: &mut Snapshot) {
        let n = &self.nodes[node];
        snap.node = n.name.clone();
        snap.node_addrs = vec![n.v4.into(), n.v6.into()];
    }
}

/// A namespace's labels with the name label the API server always sets.
pub fn namespace_labels(name: &str, labels: &BTreeMap<String, String>) -> Labels {
    let mut l = labels.clone();
    l.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    l
}

pub fn protocol_of(p: ProtocolName) -> Protocol {
    match p {
        ProtocolName::Tcp => Protocol::Tcp,
        ProtocolName::Udp => Protocol::Udp,
        ProtocolName::Sctp => Protocol::Sctp,
    }
}

/// Checks label keys and values as the API server does.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        if !convert::valid_label_key(k) {
            return Err(format!("{k:?} is not a valid label key"));
        }
        if !convert::valid_label_value(v) {
            return Err(format!("{v:?} (label {k}) is not a valid label value"));
        }
    }
    Ok(())
}

/// RFC 1123 label: what namespace and pod names must be here (they name network namespaces).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}
