//! Raw Ethernet frames on a test bed's interfaces: what an attacker with root inside a pod
//! (or on a host outside) can put on its link, and what really arrives at a victim's.
//! `AF_PACKET` sockets opened inside the host's namespace (a socket keeps the namespace it
//! was made in), bound to one interface.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::netns::Netns;

const ETH_P_ALL: u16 = 0x0003;

/// An `AF_PACKET` socket bound to one interface of one namespace.
pub struct RawLink {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawLink {
    /// Opens `ifname` of `ns` (receiving every protocol).
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<RawLink> {
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        ns.enter(move || -> io::Result<RawLink> {
            // SAFETY: plain socket(2); the fd is owned at once.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (ETH_P_ALL.to_be()) as i32,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: zeroed sockaddr_ll is a valid value; the fields are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = ifindex;
            // SAFETY: sll is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(RawLink { fd, ifindex })
        })?
    }

    /// Puts one whole frame (Ethernet header included) on the link.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame is a valid buffer of its length; sll a valid address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Counts the frames received (not sent) on the link within `wait` that contain
    /// `marker`, reading until the time is up.
    pub fn count_received(&self, marker: &[u8], wait: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + wait;
        let mut seen = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(seen);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: zeroed sockaddr_ll is valid; recvfrom fills it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf is a valid writable buffer of its length.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if contains(&buf[..n as usize], marker) {
                seen += 1;
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> io::Result<[u8; 6]> {
    let out = ns.ip(&["-o", "link", "show", "dev", ifname])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| io::Error::other(format!("no MAC in: {text}")))?;
    let mut out = [0u8; 6];
    for (i, part) in mac.split(':').enumerate().take(6) {
        out[i] = u8::from_str_radix(part, 16).map_err(io::Error::other)?;
    }
    Ok(out)
}

/// Sets a frame's Ethernet addresses (destination first, as on the wire).
pub fn address_frame(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

/// Recomputes the IPv4 header checksum of an Ethernet frame carrying IPv4 (a router drops
/// a header whose checksum is wrong; nothing else along the path checks the rest).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    if ihl < 20 || frame.len() < 14 + ihl {
        return;
    }
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = 0;
    for c in frame[14..14 + ihl].chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
}

/// `TUNSETIFF` (linux/if_tun.h: `_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A tun device (an L3 link: packets start at their IP header) in a namespace: what the
/// test writes to it, the namespace receives on the device, as from a VPN or a tunnel.
/// The device goes away with this handle.
pub struct TunDevice {
    fd: OwnedFd,
}

impl TunDevice {
    /// Creates tun device `name` in `ns` and sets it up.
    pub fn create(ns: &Netns, name: &str) -> io::Result<TunDevice> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other("interface name too long"));
        }
        let owned = name.to_string();
        let fd = ns.enter(move || -> io::Result<OwnedFd> {
            // SAFETY: a NUL-terminated path; the fd is owned at once.
            let raw = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a zeroed ifreq is valid; name (shorter than IFNAMSIZ) and flags set.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(owned.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads the ifreq (the device is made in this thread's netns).
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut ifr) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        })??;
        ns.ip(&["link", "set", name, "up"])?;
        Ok(TunDevice { fd })
    }

    /// Hands one IP packet to the namespace as received on the device.
    pub fn inject(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
