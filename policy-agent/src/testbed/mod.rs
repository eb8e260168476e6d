//! Test beds in network namespaces: a node namespace with pod and external-host namespaces
//! hanging off it by veth pairs, private bpffs mounts, echo servers and bounded-time
//! clients. Used by the namespace tests and the scenario runner. Only 198.18.0.0/15 and
//! fd00::/8 addresses are used, and nothing touches the machine's own namespace or
//! interfaces.

pub mod bpffs;
pub mod netns;
pub mod topology;
pub mod traffic;

pub use bpffs::PrivateBpffs;
pub use netns::Netns;
pub use topology::{Host, HostKind, NODE_IPV4, NODE_IPV6, Testbed};
pub use traffic::{TcpClient, TcpEchoServer, UdpEchoServer, tcp_echo, udp_echo};

use std::sync::atomic::{AtomicU32, Ordering};

/// A suffix unique on this machine for this process's objects: pid and a counter.
pub fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
