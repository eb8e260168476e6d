//! What the agent reads of its own network namespace: which interface routes to a pod
//! address (the pod's host-side veth), and the node's own addresses.
//!
//! Routes come from `/proc/net/route` and `/proc/net/ipv6_route` (the main table of the
//! caller's namespace): no netlink dependency, and exactly what the kernel would pick for a
//! pod's /32 or /128 route, which is how CNI plugins attach pods.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
pub enum NetInfoError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{path} line {line}: cannot parse {what}")]
    Parse {
        path: &'static str,
        line: usize,
        what: &'static str,
    },
    #[error("listing interface addresses: {0}")]
    Addrs(std::io::Error),
}

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub iface: String,
}

impl Route {
    fn covers(&self, ip: IpAddr) -> bool {
        match (self.dst, ip) {
            (IpAddr::V4(d), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(d) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(d), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(d) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Every route of the main table of this namespace, both families.
pub fn routes() -> Result<Vec<Route>, NetInfoError> {
    // thread-self: /proc/net is the namespace of the process's main thread, not of the
    // calling thread (which a test or a multi-namespace caller may have moved).
    let mut out = parse_v4_routes(&read("/proc/thread-self/net/route")?)?;
    // A kernel without IPv6 has no ipv6_route: that is no error, just no v6 routes.
    if let Ok(v6) = std::fs::read_to_string("/proc/thread-self/net/ipv6_route") {
        out.extend(parse_v6_routes(&v6)?);
    }
    Ok(out)
}

/// The interface of the longest-prefix route to `ip`, ignoring the default route (a pod is
/// reached through its own host route, never through the default gateway).
pub fn iface_for(routes: &[Route], ip: IpAddr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.prefix_len > 0 && r.iface != "lo" && r.covers(ip))
        .max_by_key(|r| r.prefix_len)
        .map(|r| r.iface.as_str())
}

fn read(path: &'static str) -> Result<String, NetInfoError> {
    std::fs::read_to_string(path).map_err(|source| NetInfoError::Read { path, source })
}

/// `/proc/net/route`: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in
/// host-order hex of the network-order bytes (little-endian machines print them reversed).
fn parse_v4_routes(text: &str) -> Result<Vec<Route>, NetInfoError> {
    const PATH: &str = "/proc/net/route";
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str, what| {
            u32::from_str_radix(s, 16).map_err(|_| NetInfoError::Parse {
                path: PATH,
                line: i + 1,
                what,
            })
        };
        let dst = Ipv4Addr::from(hex(f[1], "destination")?.to_ne_bytes());
        let mask = hex(f[7], "mask")?;
        out.push(Route {
            dst: IpAddr::V4(dst),
            prefix_len: mask.count_ones() as u8,
            iface: f[0].to_string(),
        });
    }
    Ok(out)
}

/// `/proc/net/ipv6_route`: dst dst_len src src_len next_hop metric refcnt use flags iface.
fn parse_v6_routes(text: &str) -> Result<Vec<Route>, NetInfoError> {
    const PATH: &str = "/proc/net/ipv6_route";
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let err = |what| NetInfoError::Parse {
            path: PATH,
            line: i + 1,
            what,
        };
        let dst = u128::from_str_radix(f[0], 16).map_err(|_| err("destination"))?;
        let len = u8::from_str_radix(f[1], 16).map_err(|_| err("prefix length"))?;
        let iface = f[9].to_string();
        out.push(Route {
            dst: IpAddr::V6(Ipv6Addr::from(dst)),
            prefix_len: len,
            iface,
        });
    }
    Ok(out)
}

/// The addresses configured on this namespace's interfaces, loopback excluded: the node's
/// own addresses, whose traffic to local pods is always admitted.
pub fn local_addrs() -> Result<Vec<IpAddr>, NetInfoError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetInfoError::Addrs(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family tells its real type.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !ip.is_loopback() && !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// What an interface's packets start with, from its ARPHRD link type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// An Ethernet header (veth, physical NICs, bridges, VXLAN, Geneve, gretap).
    Ethernet,
    /// The IP header itself: tun, WireGuard (ARPHRD_NONE), IPIP, SIT, GRE, ip6tnl, raw IP.
    Ip,
    /// Anything else (InfiniBand, CAN, ...): its ARPHRD number.
    Other(u16),
}

/// Link types whose packets start at the IP header.
const ARPHRD_IP: [u16; 7] = [
    0xfffe, // ARPHRD_NONE: tun, WireGuard
    768,    // ARPHRD_TUNNEL: ipip
    769,    // ARPHRD_TUNNEL6: ip6tnl
    776,    // ARPHRD_SIT
    778,    // ARPHRD_IPGRE
    823,    // ARPHRD_IP6GRE
    519,    // ARPHRD_RAWIP
];

impl LinkKind {
    pub fn from_arphrd(t: u16) -> LinkKind {
        match t {
            1 => LinkKind::Ethernet,
            t if ARPHRD_IP.contains(&t) => LinkKind::Ip,
            t => LinkKind::Other(t),
        }
    }
}

/// The link kind of `name` in the calling thread's namespace (`SIOCGIFHWADDR`).
pub fn link_kind(name: &str) -> std::io::Result<LinkKind> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("interface name too long"));
    }
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed ifreq is valid; the name is copied in below, NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq's hardware address.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union member SIOCGIFHWADDR writes.
    let family = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family };
    Ok(LinkKind::from_arphrd(family))
}

/// The kernel's own notifications of link, address and route changes in this namespace
/// (rtnetlink multicast groups): a pod's veth and its route appearing wake the interface
/// pass at once, instead of at the next poll.
pub struct LinkEvents {
    fd: std::os::fd::OwnedFd,
    /// An eventfd [`LinkWaker`]s write to: a wait also ends on it.
    wake: std::sync::Arc<std::os::fd::OwnedFd>,
}

/// Ends a [`LinkEvents::wait`] from another thread (something besides a link changed).
#[derive(Clone)]
pub struct LinkWaker(std::sync::Arc<std::os::fd::OwnedFd>);

impl LinkWaker {
    pub fn wake(&self) {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd we own; a full counter only means a wake
        // is pending already.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR |
/// RTMGRP_IPV6_ROUTE.
const LINK_EVENT_GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

impl LinkEvents {
    /// Subscribes in the calling thread's network namespace.
    pub fn open() -> std::io::Result<LinkEvents> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket(2); the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid; family and groups set below.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = LINK_EVENT_GROUPS;
        // SAFETY: sa is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain eventfd(2); the fd is owned at once.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let wake = std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(LinkEvents { fd, wake })
    }

    /// A handle that ends the current or next [`LinkEvents::wait`].
    pub fn waker(&self) -> LinkWaker {
        LinkWaker(self.wake.clone())
    }

    /// Waits up to `timeout` for a notification or a [`LinkWaker`]; drains every one queued.
    /// Whether any came (an overrun of the socket's buffer counts: something changed).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = [self.fd.as_raw_fd(), self.wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) } <= 0 {
            return false;
        }
        let mut any = false;
        if pfd[1].revents != 0 {
            let mut count = [0u8; 8];
            // SAFETY: an 8-byte read from our non-blocking eventfd resets it.
            unsafe { libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            any = true;
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: a valid writable buffer of its length; non-blocking socket.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                any = true;
                continue;
            }
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                any = true;
                continue;
            }
            return any;
        }
    }
}

/// The ifindex of an interface name in this namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_events_wake_on_a_link_change_in_a_namespace_of_the_test() {
        // A namespace of this test's own (never the machine's): unshare a thread into it.
        let woke = std::thread::spawn(|| {
            // SAFETY: unshare on this short-lived thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let events = LinkEvents::open()?;
            assert!(
                !events.wait(std::time::Duration::from_millis(50)),
                "quiet namespace"
            );
            // Bring this namespace's lo up (a link change here, nowhere else).
            // SAFETY: plain socket(2), closed below.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            // SAFETY: a zeroed ifreq is valid; name and flags set below.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo".iter()) {
                *d = *s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
            // SAFETY: SIOCSIFFLAGS with a valid ifreq, on this thread's namespace's lo.
            let rc = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) };
            // SAFETY: the socket opened above.
            unsafe { libc::close(sock) };
            assert_eq!(rc, 0, "lo up: {}", std::io::Error::last_os_error());
            Ok(events.wait(std::time::Duration::from_secs(2)))
        })
        .join()
        .expect("thread")
        .expect("a namespace of the test's own (needs root)");
        assert!(woke, "bringing a link up is notified");
    }

    #[test]
    fn link_kinds_by_arphrd() {
        assert_eq!(LinkKind::from_arphrd(1), LinkKind::Ethernet);
        for t in [0xfffe, 768, 769, 776, 778, 823, 519] {
            assert_eq!(LinkKind::from_arphrd(t), LinkKind::Ip, "{t}");
        }
        assert_eq!(LinkKind::from_arphrd(32), LinkKind::Other(32));
        assert_eq!(LinkKind::from_arphrd(772), LinkKind::Other(772));
    }

    #[test]
    fn parses_proc_routes_and_picks_the_host_route() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  vethA\t0500120A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  br0\t0000120A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let v6 = "fd000018000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001   vethA\n";
        let mut r = parse_v4_routes(v4).unwrap();
        r.extend(parse_v6_routes(v6).unwrap());
        let ip: IpAddr = "10.18.0.5".parse().unwrap();
        assert_eq!(iface_for(&r, ip), Some("vethA"));
        assert_eq!(iface_for(&r, "10.18.0.9".parse().unwrap()), Some("br0"));
        assert_eq!(iface_for(&r, "8.8.8.8".parse().unwrap()), None);
        assert_eq!(iface_for(&r, "fd00:18::5".parse().unwrap()), Some("vethA"));
    }
}
