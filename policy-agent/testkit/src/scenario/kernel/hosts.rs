//! The scenario's hosts as network namespaces: a namespace per node (its own addresses on its
//! loopback, its hostNetwork pods live there), one namespace per pod hanging off its node by
//! a veth pair and routed like a routed-veth CNI, externals off the node (one node) or on the
//! underlay bridge between the nodes (several: routed host-gw style), and kube-proxy style
//! DNAT rules for the pods' ClusterIPs on every node. Only the scenario's addresses
//! (198.18.0.0/15, fd00::/8) are used.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::scenario::topology::Topology;
use crate::testbed::{Netns, plumb_host};
use policy_agent::model::Protocol;

/// Where the ClusterIPs live (`topology::service_v4` / `service_v6`): routed in the node to a
/// placeholder interface so node-originated connections reach the OUTPUT DNAT.
pub const SERVICE_NET_V4: &str = "198.18.128.0/17";
pub const SERVICE_NET_V6: &str = "fd00:18::2:0/112";

/// How the nodes of a multi-node run reach each other's pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// Each node routes the other nodes' pods via their underlay address (host-gw style,
    /// Calico without encapsulation, flannel host-gw).
    #[default]
    Routed,
    /// A VXLAN overlay (flannel/Cilium style): pod traffic between nodes crosses the underlay
    /// encapsulated (UDP 4789 between the nodes' underlay addresses) and leaves the overlay
    /// device `vx0` of the receiving node.
    Vxlan,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "routed" => Ok(Network::Routed),
            "vxlan" => Ok(Network::Vxlan),
            other => Err(format!("network {other:?}: routed or vxlan")),
        }
    }
}

/// The overlay MAC of node number `k`: static, so no learning or flooding is needed.
fn overlay_mac(k: usize) -> String {
    format!("02:00:00:00:01:{:02x}", k + 1)
}

/// The underlay joining the nodes of a multi-node run: a bridge in a namespace of its own,
/// node `k` on it at [`underlay_v4`]`(k)` / [`underlay_v6`]`(k)`.
pub const UNDERLAY_PREFIX_V4: u8 = 24;
pub const UNDERLAY_PREFIX_V6: u8 = 112;

/// Where the fake API server listens in cluster mode: the underlay bridge's own address.
pub const API_SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 250);

pub fn underlay_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 254, node as u8 + 1)
}

pub fn underlay_v6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 3, node as u16 + 1)
}

/// Dropping deletes the pod and external namespaces first, then the nodes', then the
/// underlay's.
pub struct Hosts {
    /// By pod index; `None` for a hostNetwork pod (it lives in its node's namespace).
    pub pods: Vec<Option<Netns>>,
    /// In the topology's order.
    pub externals: Vec<Netns>,
    /// By node index.
    pub nodes: Vec<Netns>,
    /// With more than one node: the bridge between them, externals hang off it too.
    pub underlay: Option<Netns>,
    /// The run's tag (in interface names) and how its nodes reach each other.
    tag: String,
    network: Network,
}

impl Hosts {
    /// One node: pods and externals off the node, routed like a routed-veth CNI. More
    /// nodes: each node's pods off it, the nodes and the externals on one underlay bridge,
    /// every node routing the other nodes' pods and own addresses via their underlay
    /// address (host-gw style); kube-proxy's ClusterIP route placeholder on every node.
    pub fn build(topo: &Topology, tag: &str, network: Network) -> io::Result<Hosts> {
        let mut hosts = Hosts {
            pods: Vec::new(),
            externals: Vec::new(),
            nodes: Vec::new(),
            underlay: None,
            tag: tag.to_string(),
            network,
        };
        for (k, n) in topo.nodes.iter().enumerate() {
            let name = if k == 0 {
                format!("ksn-{tag}")
            } else {
                format!("ksn{k}-{tag}")
            };
            let node = Netns::create_node(&name, n.v4, n.v6)?;
            service_route(&node, n.v4, n.v6)?;
            hosts.nodes.push(node);
        }
        let multi = topo.nodes.len() > 1;
        if multi {
            hosts.underlay = Some(Netns::create(&format!("ksu-{tag}"))?);
            hosts.join_underlay()?;
        }
        for pod in &topo.pods {
            if pod.host_network {
                hosts.pods.push(None);
                continue;
            }
            let ns = Netns::create(&format!("ksp{}-{tag}", pod.index))?;
            let hif = pod_link(tag, pod.index);
            let node = topo.node_of(pod);
            plumb_host(
                &hosts.nodes[pod.node],
                &ns,
                &hif,
                Some(pod.v4),
                Some(pod.v6),
                (node.v4, node.v6),
            )?;
            hosts.pods.push(Some(ns));
        }
        for (i, e) in topo.externals.iter().enumerate() {
            let ns = Netns::create(&format!("kse{i}-{tag}"))?;
            match &hosts.underlay {
                None => {
                    let n = &topo.nodes[0];
                    plumb_host(
                        &hosts.nodes[0],
                        &ns,
                        &format!("k{tag}e{i}"),
                        e.v4,
                        e.v6,
                        (n.v4, n.v6),
                    )?;
                }
                Some(underlay) => plumb_external(underlay, &ns, i, e.v4, e.v6, topo)?,
            }
            hosts.externals.push(ns);
        }
        if multi {
            if network == Network::Vxlan {
                hosts.join_overlay(topo)?;
            }
            hosts.route_between_nodes(topo, network)?;
        }
        Ok(hosts)
    }

    /// Each node's `ul0` on the underlay bridge, at its underlay address.
    fn join_underlay(&self) -> io::Result<()> {
        let Some(u) = &self.underlay else {
            return Ok(());
        };
        u.ip(&["link", "add", "br0", "type", "bridge"])?;
        u.ip(&["link", "set", "br0", "up"])?;
        u.ip(&[
            "addr",
            "add",
            &format!("{API_SERVER_V4}/{UNDERLAY_PREFIX_V4}"),
            "dev",
            "br0",
        ])?;
        for (k, node) in self.nodes.iter().enumerate() {
            bridge_port(node, "ul0", u, &format!("u{k}"))?;
            node.ip(&[
                "addr",
                "add",
                &format!("{}/{UNDERLAY_PREFIX_V4}", underlay_v4(k)),
                "dev",
                "ul0",
            ])?;
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/{UNDERLAY_PREFIX_V6}", underlay_v6(k)),
                "dev",
                "ul0",
                "nodad",
            ])?;
            node.ip(&["link", "set", "ul0", "up"])?;
        }
        Ok(())
    }

    /// Each node's `vx0`: VXLAN 1 from its underlay address, the other nodes' overlay MACs
    /// forwarded to their underlay addresses, and their own addresses resolved to those MACs
    /// (static entries: the gateways of the overlay routes).
    fn join_overlay(&self, topo: &Topology) -> io::Result<()> {
        for (k, node) in self.nodes.iter().enumerate() {
            node.ip(&[
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &underlay_v4(k).to_string(),
                "dstport",
                "4789",
                "nolearning",
            ])?;
            node.ip(&["link", "set", "vx0", "address", &overlay_mac(k)])?;
            node.ip(&["link", "set", "vx0", "up"])?;
            for (j, other) in topo.nodes.iter().enumerate().filter(|(j, _)| *j != k) {
                node.exec(
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        &overlay_mac(j),
                        "dev",
                        "vx0",
                        "dst",
                        &underlay_v4(j).to_string(),
                    ],
                )?;
                for (v6, addr) in [(false, other.v4.to_string()), (true, other.v6.to_string())] {
                    let mut args = vec![];
                    if v6 {
                        args.push("-6");
                    }
                    let mac = overlay_mac(j);
                    args.extend([
                        "neigh",
                        "add",
                        &addr,
                        "lladdr",
                        &mac,
                        "dev",
                        "vx0",
                        "nud",
                        "permanent",
                    ]);
                    node.ip(&args)?;
                }
            }
        }
        Ok(())
    }

    /// On every node: the other nodes' pods and own addresses via that node (its underlay
    /// address when routed, its own address over `vx0` with VXLAN), the externals on the
    /// underlay link; node-originated traffic leaves from the node's own address (what a
    /// hostNetwork pod is seen as).
    fn route_between_nodes(&self, topo: &Topology, network: Network) -> io::Result<()> {
        for (k, node) in self.nodes.iter().enumerate() {
            let (src4, src6) = (topo.nodes[k].v4.to_string(), topo.nodes[k].v6.to_string());
            for (j, other) in topo.nodes.iter().enumerate() {
                if j != k {
                    route_via(node, topo, k, (other.v4, other.v6), j, network, "add")?;
                }
            }
            for pod in topo.pods.iter().filter(|p| !p.host_network && p.node != k) {
                route_via(node, topo, k, (pod.v4, pod.v6), pod.node, network, "add")?;
            }
            for e in &topo.externals {
                if let Some(a) = e.v4 {
                    node.ip(&[
                        "route",
                        "add",
                        &format!("{a}/32"),
                        "dev",
                        "ul0",
                        "src",
                        &src4,
                    ])?;
                }
                if let Some(a) = e.v6 {
                    node.ip(&[
                        "-6",
                        "route",
                        "add",
                        &format!("{a}/128"),
                        "dev",
                        "ul0",
                        "src",
                        &src6,
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Moves pod number `index` (not hostNetwork) from node `from` to node `to`, keeping its
    /// namespace, addresses and servers: its veth is deleted on `from` and made again on
    /// `to`, and every other node and external now reaches it via `to`.
    pub fn move_pod(
        &self,
        topo: &Topology,
        index: usize,
        from: usize,
        to: usize,
    ) -> io::Result<()> {
        let pod = &topo.pods[index];
        let ns = self.pods[index].as_ref().ok_or_else(|| {
            io::Error::other(format!("pod {} is hostNetwork: it cannot move", pod.key))
        })?;
        let hif = pod_link(&self.tag, index);
        self.nodes[from].ip(&["link", "del", &hif])?;
        // `to` reached the pod via `from`: that route gives way to the veth's.
        self.nodes[to].ip(&["route", "del", &format!("{}/32", pod.v4)])?;
        self.nodes[to].ip(&["-6", "route", "del", &format!("{}/128", pod.v6)])?;
        let n = &topo.nodes[to];
        plumb_host(
            &self.nodes[to],
            ns,
            &hif,
            Some(pod.v4),
            Some(pod.v6),
            (n.v4, n.v6),
        )?;
        for (k, node) in self.nodes.iter().enumerate() {
            if k != to {
                route_via(node, topo, k, (pod.v4, pod.v6), to, self.network, "replace")?;
            }
        }
        for (i, e) in topo.externals.iter().enumerate() {
            if self.underlay.is_some() {
                let ext = &self.externals[i];
                if e.v4.is_some() {
                    external_route(ext, "replace", format!("{}/32", pod.v4), to, false)?;
                }
                if e.v6.is_some() {
                    external_route(ext, "replace", format!("{}/128", pod.v6), to, true)?;
                }
            }
        }
        Ok(())
    }

    /// The namespace a pod's traffic starts and ends in.
    pub fn pod_ns(&self, topo: &Topology, index: usize) -> &Netns {
        match self.pods.get(index).and_then(Option::as_ref) {
            Some(ns) => ns,
            None => &self.nodes[topo.pods.get(index).map_or(0, |p| p.node)],
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Hosts first, then the nodes, then the underlay (each Netns deletes itself).
        self.pods.clear();
        self.externals.clear();
        self.nodes.clear();
        self.underlay = None;
    }
}

/// A veth pair from `ns` (its end named `name`) to the underlay's bridge (port `port`).
fn bridge_port(ns: &Netns, name: &str, underlay: &Netns, port: &str) -> io::Result<()> {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        underlay.name(),
    ])?;
    underlay.ip(&["link", "set", port, "master", "br0"])?;
    underlay.ip(&["link", "set", port, "up"])?;
    Ok(())
}

/// A placeholder route for the ClusterIPs, like kube-proxy's kube-ipvs0 (a veth pair inside
/// the node: no dummy driver needed): node-originated connections reach the OUTPUT DNAT,
/// which reroutes them before anything is sent.
fn service_route(node: &Netns, v4: Ipv4Addr, v6: Ipv6Addr) -> io::Result<()> {
    node.ip(&[
        "link",
        "add",
        "ksvc",
        "type",
        "veth",
        "peer",
        "name",
        "ksvc-peer",
    ])?;
    node.ip(&["link", "set", "ksvc-peer", "up"])?;
    node.ip(&["link", "set", "ksvc", "up"])?;
    node.ip(&[
        "route",
        "add",
        SERVICE_NET_V4,
        "dev",
        "ksvc",
        "src",
        &v4.to_string(),
    ])?;
    node.ip(&[
        "-6",
        "route",
        "add",
        SERVICE_NET_V6,
        "dev",
        "ksvc",
        "src",
        &v6.to_string(),
    ])?;
    Ok(())
}

/// On node `k`: `dst` (a pod's or a node's addresses) via node `j` — its underlay address
/// when routed, its own address over `vx0` with VXLAN — leaving from node `k`'s own address.
/// `verb`: `add`, or `replace` when the destination moved.
fn route_via(
    node: &Netns,
    topo: &Topology,
    k: usize,
    (dst4, dst6): (Ipv4Addr, Ipv6Addr),
    j: usize,
    network: Network,
    verb: &str,
) -> io::Result<()> {
    let (src4, src6) = (topo.nodes[k].v4.to_string(), topo.nodes[k].v6.to_string());
    let (gw4, gw6, dev) = match network {
        Network::Routed => (underlay_v4(j), underlay_v6(j), "ul0"),
        Network::Vxlan => (topo.nodes[j].v4, topo.nodes[j].v6, "vx0"),
    };
    node.ip(&[
        "route",
        verb,
        &format!("{dst4}/32"),
        "via",
        &gw4.to_string(),
        "dev",
        dev,
        "onlink",
        "src",
        &src4,
    ])?;
    node.ip(&[
        "-6",
        "route",
        verb,
        &format!("{dst6}/128"),
        "via",
        &gw6.to_string(),
        "dev",
        dev,
        "onlink",
        "src",
        &src6,
    ])?;
    Ok(())
}

/// On an external: `dst` via node `j`'s underlay address (on-link: externals have no
/// underlay address of their own).
fn external_route(ns: &Netns, verb: &str, dst: String, j: usize, v6: bool) -> io::Result<()> {
    let gw = if v6 {
        underlay_v6(j).to_string()
    } else {
        underlay_v4(j).to_string()
    };
    let mut args = vec![];
    if v6 {
        args.push("-6");
    }
    args.extend(["route", verb, &dst, "via", &gw, "dev", "eth0", "onlink"]);
    ns.ip(&args).map(|_| ())
}

/// Pod number `index`'s host-side veth.
fn pod_link(tag: &str, index: usize) -> String {
    format!("k{tag}p{index}")
}

/// External number `i` on the underlay bridge at its own addresses, routing each node's pods
/// and own addresses via that node's underlay address (on-link: it has no underlay address
/// of its own), and the ClusterIPs via the first node.
fn plumb_external(
    underlay: &Netns,
    ns: &Netns,
    i: usize,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    topo: &Topology,
) -> io::Result<()> {
    ns.sysctl(&[
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.accept_dad=0",
    ])?;
    bridge_port(ns, "eth0", underlay, &format!("x{i}"))?;
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let routes = |dst: String, j: usize, v6: bool| external_route(ns, "add", dst, j, v6);
    if let Some(a) = v4 {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        for (j, n) in topo.nodes.iter().enumerate() {
            routes(format!("{}/32", n.v4), j, false)?;
        }
        for p in topo.pods.iter().filter(|p| !p.host_network) {
            routes(format!("{}/32", p.v4), p.node, false)?;
        }
        routes(SERVICE_NET_V4.to_string(), 0, false)?;
    }
    if let Some(a) = v6 {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        for (j, n) in topo.nodes.iter().enumerate() {
            routes(format!("{}/128", n.v6), j, true)?;
        }
        for p in topo.pods.iter().filter(|p| !p.host_network) {
            routes(format!("{}/128", p.v6), p.node, true)?;
        }
        routes(SERVICE_NET_V6.to_string(), 0, true)?;
    }
    Ok(())
}

/// kube-proxy's iptables rules for one ClusterIP Service per pod (its container ports as
/// ports and targetPorts), for one family: nat PREROUTING and OUTPUT jump to KUBE-SERVICES,
/// which sends each ClusterIP:port to the service's KUBE-SVC chain, which picks the (single)
/// endpoint's KUBE-SEP chain, which DNATs to the pod.
pub fn service_rules(topo: &Topology, v6: bool) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for pod in &topo.pods {
        for p in &pod.ports {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            let (cluster_ip, backend) = if v6 {
                (
                    format!("{}/128", pod.service_v6),
                    format!("[{}]:{}", pod.v6, p.port),
                )
            } else {
                (
                    format!("{}/32", pod.service_v4),
                    format!("{}:{}", pod.v4, p.port),
                )
            };
            // kube-proxy hashes the service port name into the chain name; an index does here.
            let id = format!("{}{}{}", pod.index, proto.to_uppercase(), p.port);
            let svc = format!("KUBE-SVC-{id}");
            let sep = format!("KUBE-SEP-{id}");
            let comment = format!(
                "{}/{}:{}",
                pod.key.namespace,
                pod.key.name,
                p.name.as_deref().unwrap_or(proto)
            );
            let _ = writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {cluster_ip} -p {proto} -m comment --comment \"{comment} cluster IP\" -m {proto} --dport {} -j {svc}",
                p.port
            );
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{comment} -> {backend}\" -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {backend}"
            );
        }
    }
    format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n{chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         {rules}COMMIT\n"
    )
}

/// Installs [`service_rules`] for both families in a node's namespace.
pub fn install_services(node: &Netns, topo: &Topology, dir: &Path) -> io::Result<()> {
    for (v6, tool) in [(false, "iptables-restore"), (true, "ip6tables-restore")] {
        let file = dir.join(if v6 {
            "services6.rules"
        } else {
            "services4.rules"
        });
        std::fs::write(&file, service_rules(topo, v6))?;
        let path = file.to_string_lossy().to_string();
        node.exec(tool, &["--noflush", &path])?;
    }
    Ok(())
}
