//! Test beds in network namespaces: a node namespace with pod and external-host namespaces
//! hanging off it by veth pairs, private bpffs mounts, echo servers and bounded-time
//! clients, SCTP over raw sockets. Used by the namespace tests and the scenario runner. Only
//! 198.18.0.0/15 and fd00::/8 addresses are used, and nothing touches the machine's own
//! namespace or interfaces.
//!
//! ```no_run
//! use policy_agent::dataplane::{AttachMode, Dataplane};
//! use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
//! use std::{net::SocketAddr, time::Duration};
//!
//! let mut bed = Testbed::new()?;                   // node namespace, forwarding on
//! let a = bed.add_pod()?;                          // 198.18.0.1, fd00:18::1
//! let b = bed.add_pod()?;                          // 198.18.0.2, fd00:18::2
//! let to_b = SocketAddr::new(bed.hosts[b].ip(false), 8080);
//! let _srv = TcpEchoServer::start(&bed.hosts[b].ns, to_b)?;
//! let fs = PrivateBpffs::mount()?;                 // never /sys/fs/bpf
//! let mut dp = Dataplane::load(fs.path())?;
//! let hif = bed.hosts[a].host_if.clone();
//! let _att = bed.node.enter(|| dp.attach(&hif, AttachMode::Auto))??;
//! let reachable = tcp_echo(&bed.hosts[a].ns, to_b, Duration::from_secs(1)).is_ok();
//! # let _ = reachable;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! // Dropping `dp` detaches (clsact filters from inside their namespace); dropping `bed`
//! // deletes every namespace it made.
//! ```

pub mod bpffs;
pub mod cni;
pub mod nat;
pub mod netns;
pub mod raw;
pub mod sctp;
pub mod topology;
pub mod traffic;

pub use bpffs::PrivateBpffs;
pub use nat::dnat;
pub use netns::Netns;
pub use raw::{RawLink, TunDevice, address_frame, fix_ipv4_checksum, mac_of};
pub use sctp::{SctpResponder, sctp_probe};
pub use topology::{Host, HostKind, NODE_IPV4, NODE_IPV6, Testbed, plumb_host};
pub use traffic::{
    TcpClient, TcpEchoServer, UdpEchoServer, bind_fresh_udp_port, tcp_echo, udp_echo,
};

use std::sync::atomic::{AtomicU32, Ordering};

/// A suffix unique on this machine for this process's objects: pid and a counter.
pub fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const TAG_DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A short tag unique on this machine for this process's next objects: base 36 of
/// `pid << 10 | counter % 1024`. Short, because interface names have at most 15 bytes; and the
/// owner's pid can be read back ([`tag_pid`]) so leftovers of a killed run can be found.
pub fn pid_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    make_tag(std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The tag of process `pid`'s `n`-th objects (see [`pid_tag`]).
pub fn make_tag(pid: u32, n: u32) -> String {
    let mut v = ((pid as u64) << 10) | (n as u64 & 0x3ff);
    let mut s = Vec::new();
    loop {
        s.push(TAG_DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// The pid that made `tag` ([`make_tag`]), if it is one.
pub fn tag_pid(tag: &str) -> Option<u32> {
    if tag.is_empty() || tag.len() > 12 {
        return None;
    }
    let mut v: u64 = 0;
    for c in tag.bytes() {
        let d = TAG_DIGITS.iter().position(|&x| x == c)? as u64;
        v = v.checked_mul(36)?.checked_add(d)?;
    }
    u32::try_from(v >> 10).ok()
}
