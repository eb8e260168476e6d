//! A node namespace with pods and external hosts hanging off it by veth pairs, routed like
//! a routed-veth CNI (Calico style): each host has a /32 and a /128 on its `eth0` and a
//! default route via the node; the node routes each host's addresses to its veth.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::netns::Netns;

/// The node's own addresses (on its loopback): the source of node-originated traffic.
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfffe);
/// Gateway addresses every host uses, present on each node-side veth.
const GATEWAY_V4: &str = "169.254.1.1";
const GATEWAY_V6: &str = "fe80::1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// A pod on the node: 198.18.0.x, fd00:18::x.
    Pod,
    /// A host outside the cluster: 198.19.0.x, fd00:19::x.
    External,
}

/// A pod or external host: its namespace, addresses and the node-side interface.
#[derive(Debug)]
pub struct Host {
    pub kind: HostKind,
    pub ns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node-side end of the host's veth (where the programs attach for pods).
    pub host_if: String,
}

impl Host {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// The test bed. Dropping it deletes every namespace it made (hosts first, then the node).
pub struct Testbed {
    pub hosts: Vec<Host>,
    pub node: Netns,
    tag: String,
    next: u8,
}

impl Testbed {
    /// An empty node namespace with forwarding on and its own addresses on loopback.
    pub fn new() -> io::Result<Self> {
        let tag = super::pid_tag();
        let node = Netns::create_node(&format!("pnode-{tag}"), NODE_IPV4, NODE_IPV6)?;
        Ok(Testbed {
            hosts: Vec::new(),
            node,
            tag,
            next: 1,
        })
    }

    pub fn add_pod(&mut self) -> io::Result<usize> {
        self.add_host(HostKind::Pod)
    }

    pub fn add_external(&mut self) -> io::Result<usize> {
        self.add_host(HostKind::External)
    }

    /// Adds a host and returns its index in `hosts`.
    pub fn add_host(&mut self, kind: HostKind) -> io::Result<usize> {
        let n = self.next;
        if n == u8::MAX {
            return Err(io::Error::other("test bed full"));
        }
        self.next += 1;
        let (v4, v6, prefix) = match kind {
            HostKind::Pod => (
                Ipv4Addr::new(198, 18, 0, n),
                Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, n as u16),
                "p",
            ),
            HostKind::External => (
                Ipv4Addr::new(198, 19, 0, n),
                Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, n as u16),
                "x",
            ),
        };
        let ns = Netns::create(&format!("p{prefix}{n}-{}", self.tag))?;
        // Interface names have at most 15 bytes: tag (<= 10) + kind + index.
        let host_if = format!("v{}{prefix}{n}", self.tag);
        let host = Host {
            kind,
            ns,
            ipv4: v4,
            ipv6: v6,
            host_if,
        };
        plumb_host(
            &self.node,
            &host.ns,
            &host.host_if,
            Some(host.ipv4),
            Some(host.ipv6),
            (NODE_IPV4, NODE_IPV6),
        )?;
        self.hosts.push(host);
        Ok(self.hosts.len() - 1)
    }

    /// The ifindex of host `i`'s node-side interface (what a pod's addresses are bound to).
    pub fn host_ifindex(&self, i: usize) -> io::Result<u32> {
        let name =
            std::ffi::CString::new(self.hosts[i].host_if.as_str()).map_err(io::Error::other)?;
        // SAFETY: a valid NUL-terminated name; if_nametoindex has no other precondition.
        let idx = self
            .node
            .enter(move || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        if idx == 0 {
            return Err(io::Error::other(format!(
                "no interface {} in the node namespace",
                self.hosts[i].host_if
            )));
        }
        Ok(idx)
    }

    /// Binds host `i`'s addresses to its node-side interface in `maps`, as the node side
    /// does for every local pod it attaches to (the pod hooks drop any other source).
    pub fn bind(
        &self,
        i: usize,
        maps: &mut policy_agent::dataplane::DataplaneMaps,
    ) -> io::Result<()> {
        let h = &self.hosts[i];
        let ifindex = self.host_ifindex(i)?;
        let addrs = [h.ipv4.into(), h.ipv6.into()].map(policy_agent::compiler::addr_of);
        maps.bind(ifindex, &addrs).map_err(io::Error::other)
    }

    /// Names of every namespace of the bed (node last).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hosts.iter().map(|h| h.ns.name().to_string()).collect();
        v.push(self.node.name().to_string());
        v
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Hosts first (their Drop deletes each namespace), then the node (field drop).
        self.hosts.clear();
    }
}

/// Connects host namespace `ns` to the node by a veth pair (`hif` on the node side, `eth0`
/// inside), routed like a CNI plugin does: a /32 and /128 route per address on the node,
/// a link-local gateway and default routes inside.
pub fn plumb_host(
    node: &Netns,
    ns: &Netns,
    hif: &str,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    (node_v4, node_v6): (Ipv4Addr, Ipv6Addr),
) -> io::Result<()> {
    ns.sysctl(&[
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.accept_dad=0",
    ])?;
    node.ip(&[
        "link",
        "add",
        hif,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{GATEWAY_V4}/32"),
        "dev",
        hif,
        "scope",
        "link",
    ])?;
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{GATEWAY_V6}/64"),
        "dev",
        hif,
        "nodad",
    ])?;
    node.ip(&["link", "set", hif, "up"])?;
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    if let Some(a) = v4 {
        node.ip(&[
            "route",
            "add",
            &format!("{a}/32"),
            "dev",
            hif,
            "src",
            &node_v4.to_string(),
        ])?;
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        ns.ip(&["route", "add", GATEWAY_V4, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", GATEWAY_V4, "dev", "eth0"])?;
    }
    if let Some(a) = v6 {
        node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{a}/128"),
            "dev",
            hif,
            "src",
            &node_v6.to_string(),
        ])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&[
            "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", "eth0",
        ])?;
    }
    Ok(())
}
