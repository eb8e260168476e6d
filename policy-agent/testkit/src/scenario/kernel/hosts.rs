//! The scenario's hosts as network namespaces: a node namespace (the node's addresses on its
//! loopback, hostNetwork pods live here), one namespace per pod and per external hanging off
//! it by a veth pair and routed like a routed-veth CNI, and kube-proxy style DNAT rules for
//! the pods' ClusterIPs. Only the scenario's addresses (198.18.0.0/15, fd00::/8) are used.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::scenario::topology::Topology;
use crate::testbed::{Netns, plumb_host};
use policy_agent::model::Protocol;

/// Where the ClusterIPs live (`topology::service_v4` / `service_v6`): routed in the node to a
/// placeholder interface so node-originated connections reach the OUTPUT DNAT.
pub const SERVICE_NET_V4: &str = "198.18.128.0/17";
pub const SERVICE_NET_V6: &str = "fd00:18::2:0/112";

/// Dropping deletes the pod and external namespaces first, then the node's.
pub struct Hosts {
    /// By pod index; `None` for a hostNetwork pod (it lives in the node namespace).
    pub pods: Vec<Option<Netns>>,
    /// In the topology's order.
    pub externals: Vec<Netns>,
    pub node: Netns,
}

impl Hosts {
    pub fn build(topo: &Topology, tag: &str) -> io::Result<Hosts> {
        let node = Netns::create_node(&format!("ksn-{tag}"), topo.node_v4, topo.node_v6)?;
        let mut hosts = Hosts {
            pods: Vec::new(),
            externals: Vec::new(),
            node,
        };
        let node = &hosts.node;
        // A veth pair inside the node (no dummy driver needed): the route target of the
        // ClusterIPs, like kube-proxy's kube-ipvs0; DNAT reroutes before anything is sent.
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
        let v4 = topo.node_v4.to_string();
        let v6 = topo.node_v6.to_string();
        node.ip(&["route", "add", SERVICE_NET_V4, "dev", "ksvc", "src", &v4])?;
        node.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_NET_V6,
            "dev",
            "ksvc",
            "src",
            &v6,
        ])?;
        for pod in &topo.pods {
            if pod.host_network {
                hosts.pods.push(None);
                continue;
            }
            let ns = Netns::create(&format!("ksp{}-{tag}", pod.index))?;
            let hif = format!("k{tag}p{}", pod.index);
            hosts.pods.push(Some(ns));
            let ns = hosts
                .pods
                .last()
                .and_then(Option::as_ref)
                .ok_or_else(|| io::Error::other("pod"))?;
            plumb_host(
                &hosts.node,
                ns,
                &hif,
                Some(pod.v4),
                Some(pod.v6),
                (topo.node_v4, topo.node_v6),
            )?;
        }
        for (i, e) in topo.externals.iter().enumerate() {
            let ns = Netns::create(&format!("kse{i}-{tag}"))?;
            hosts.externals.push(ns);
            let hif = format!("k{tag}e{i}");
            plumb_host(
                &hosts.node,
                &hosts.externals[i],
                &hif,
                e.v4,
                e.v6,
                (topo.node_v4, topo.node_v6),
            )?;
        }
        Ok(hosts)
    }

    /// The namespace a pod's traffic starts and ends in.
    pub fn pod_ns(&self, index: usize) -> &Netns {
        self.pods
            .get(index)
            .and_then(Option::as_ref)
            .unwrap_or(&self.node)
    }
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

/// Installs [`service_rules`] for both families in the node namespace.
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
