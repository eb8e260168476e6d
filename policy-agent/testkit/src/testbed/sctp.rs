//! SCTP without a kernel SCTP stack (this machine kind has none), over raw sockets: the
//! client sends an INIT, a responder answers with an INIT-ACK (ports swapped, the INIT's
//! initiate tag as verification tag). A matching INIT-ACK coming back means the association
//! could start in both directions. The datapath judges these packets like any SCTP
//! association's first packets (protocol 132, ports in the common header).
//!
//! A long-lived association ([`SctpAssociation`]) goes on with COOKIE-ECHO / COOKIE-ACK (so
//! conntrack on the way sees it established) and is checked with HEARTBEAT chunks, which the
//! responder answers with HEARTBEAT-ACKs echoing their information, all on the same ports
//! and verification tags. The responder keeps no state: its initiate tag is a fixed
//! permutation of the client's ([`responder_tag`]), so it finds the client's tag again in
//! every later packet's verification tag.
//!
//! [`probe`] and [`respond`] work on the calling thread's namespace (the scenario runner's
//! workers); [`sctp_probe`] and [`SctpResponder`] take a [`Netns`] (the namespace tests).

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::Netns;

pub const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_HEARTBEAT: u8 = 4;
const CHUNK_HEARTBEAT_ACK: u8 = 5;
const CHUNK_COOKIE_ECHO: u8 = 10;
const CHUNK_COOKIE_ACK: u8 = 11;
/// INIT-ACK parameter: State Cookie; HEARTBEAT parameter: Heartbeat Info.
const PARAM_STATE_COOKIE: u16 = 7;
const PARAM_HEARTBEAT_INFO: u16 = 1;
/// What the responder's initiate tag is made from (see [`responder_tag`]).
const TAG_MASK: u32 = 0x5c7b_a5a5;

/// The responder's initiate tag for an INIT carrying `client_tag`: a permutation, so the
/// client's tag follows back from it ([`client_tag`]) without any state.
pub fn responder_tag(client_tag: u32) -> u32 {
    client_tag.rotate_left(16) ^ TAG_MASK
}

/// The inverse of [`responder_tag`].
pub fn client_tag(responder_tag: u32) -> u32 {
    (responder_tag ^ TAG_MASK).rotate_right(16)
}

/// A packet of one chunk with `body` (padded to 4 bytes), checksummed.
fn chunk_packet(src: u16, dst: u16, vtag: u32, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + body.len() + 3);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[kind, 0]);
    p.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
    p.extend_from_slice(body);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    seal(&mut p);
    p
}

/// A parameter (type, value) as chunk bodies carry them.
fn param(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + value.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    v.extend_from_slice(value);
    v
}

/// The value of the first parameter of type `kind` in `params`.
fn find_param(mut params: &[u8], kind: u16) -> Option<&[u8]> {
    while params.len() >= 4 {
        let t = u16::from_be_bytes([params[0], params[1]]);
        let len = u16::from_be_bytes([params[2], params[3]]) as usize;
        if len < 4 || len > params.len() {
            return None;
        }
        if t == kind {
            return Some(&params[4..len]);
        }
        let padded = len.div_ceil(4) * 4;
        params = params.get(padded..).unwrap_or(&[]);
    }
    None
}

/// A packet's common header and first chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk<'a> {
    src: u16,
    dst: u16,
    vtag: u32,
    kind: u8,
    /// The chunk's value (after type, flags and length).
    body: &'a [u8],
}

fn parse_chunk(p: &[u8]) -> Option<Chunk<'_>> {
    if p.len() < 16 || !checksum_ok(p) {
        return None;
    }
    let len = u16::from_be_bytes([p[14], p[15]]) as usize;
    if len < 4 || 12 + len > p.len() {
        return None;
    }
    Some(Chunk {
        src: u16::from_be_bytes([p[0], p[1]]),
        dst: u16::from_be_bytes([p[2], p[3]]),
        vtag: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        kind: p[12],
        body: &p[16..12 + len],
    })
}

/// CRC32c (Castagnoli), as SCTP's checksum uses it (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78; // reflected 0x1EDC6F41
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Fills in the checksum of an SCTP packet (the field is stored least significant byte first).
fn seal(packet: &mut [u8]) {
    packet[8..12].fill(0);
    let c = crc32c(packet);
    packet[8..12].copy_from_slice(&c.to_le_bytes());
}

fn checksum_ok(packet: &[u8]) -> bool {
    if packet.len() < 12 {
        return false;
    }
    let mut copy = packet.to_vec();
    copy[8..12].fill(0);
    crc32c(&copy).to_le_bytes() == packet[8..12]
}

/// An INIT or INIT-ACK: common header and one chunk (INIT-ACK carries a small State Cookie).
fn packet(src: u16, dst: u16, vtag: u32, kind: u8, init_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(44);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let cookie: &[u8] = if kind == CHUNK_INIT_ACK {
        b"netpolck"
    } else {
        b""
    };
    let params = if cookie.is_empty() {
        0
    } else {
        4 + cookie.len()
    };
    let len = (20 + params) as u16;
    p.extend_from_slice(&[kind, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&init_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&init_tag.to_be_bytes()); // initial TSN
    if !cookie.is_empty() {
        p.extend_from_slice(&7u16.to_be_bytes()); // State Cookie
        p.extend_from_slice(&((4 + cookie.len()) as u16).to_be_bytes());
        p.extend_from_slice(cookie);
    }
    seal(&mut p);
    p
}

/// A parsed SCTP packet's first chunk: (src port, dst port, vtag, chunk type, initiate tag).
fn parse(p: &[u8]) -> Option<(u16, u16, u32, u8, u32)> {
    if p.len() < 24 || !checksum_ok(p) {
        return None;
    }
    let u16_at = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    Some((u16_at(0), u16_at(2), u32_at(4), p[12], u32_at(16)))
}

fn sockaddr(addr: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = match addr {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as _;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as _;
            sin6.sin6_addr.s6_addr = a.octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// A raw SCTP socket bound to a local address, in the calling thread's network namespace.
pub struct RawSctp {
    fd: OwnedFd,
    v4: bool,
}

impl RawSctp {
    pub fn bind(local: IpAddr) -> io::Result<RawSctp> {
        let domain = if local.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (ss, len) = sockaddr(local);
        // SAFETY: ss is a valid sockaddr of length len.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(RawSctp {
            fd,
            v4: local.is_ipv4(),
        })
    }

    /// Only packets from `peer` are received afterwards.
    pub fn connect(&self, peer: IpAddr) -> io::Result<()> {
        let (ss, len) = sockaddr(peer);
        // SAFETY: ss is a valid sockaddr of length len.
        if unsafe {
            libc::connect(
                self.fd.as_raw_fd(),
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as _,
            tv_usec: t.subsec_micros().max(1) as _,
        };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as _,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send_to(&self, p: &[u8], to: IpAddr) -> io::Result<()> {
        let (ss, len) = sockaddr(to);
        // SAFETY: p and ss are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                p.as_ptr() as *const libc::c_void,
                p.len(),
                0,
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one SCTP packet (without the IPv4 header raw IPv4 sockets deliver).
    fn recv(&self, buf: &mut [u8]) -> io::Result<(IpAddr, std::ops::Range<usize>)> {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buf and ss are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut ss as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let from = from_sockaddr(&ss).ok_or_else(|| io::Error::other("unknown address family"))?;
        let start = if self.v4 {
            if n < 20 {
                return Err(io::Error::other("short IPv4 packet"));
            }
            ((buf[0] & 0x0f) as usize) * 4
        } else {
            0
        };
        Ok((from, start.min(n)..n))
    }
}

/// Sends an INIT from `local:src_port` to `to` and waits up to `timeout` for the matching
/// INIT-ACK. Call on a thread inside the source's namespace.
pub fn probe(
    local: IpAddr,
    src_port: u16,
    to: SocketAddr,
    tag: u32,
    timeout: Duration,
) -> io::Result<()> {
    let sock = RawSctp::bind(local)?;
    sock.connect(to.ip())?;
    sock.send_to(&packet(src_port, to.port(), 0, CHUNK_INIT, tag), to.ip())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no INIT-ACK"));
        }
        sock.set_timeout(left)?;
        let (from, range) = match sock.recv(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no INIT-ACK"));
            }
            Err(e) => return Err(e),
        };
        if from != to.ip() {
            continue;
        }
        if let Some((sp, dp, vtag, kind, _)) = parse(&buf[range])
            && kind == CHUNK_INIT_ACK
            && sp == to.port()
            && dp == src_port
            && vtag == tag
        {
            return Ok(());
        }
    }
}

/// Receives packets from `peer` until `accept` takes one or `deadline` passes (TimedOut).
fn recv_until<T>(
    sock: &RawSctp,
    peer: IpAddr,
    deadline: Instant,
    mut accept: impl FnMut(Chunk<'_>) -> Option<T>,
) -> io::Result<T> {
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
        }
        sock.set_timeout(left)?;
        let (from, range) = match sock.recv(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
            }
            Err(e) => return Err(e),
        };
        if from != peer {
            continue;
        }
        if let Some(c) = parse_chunk(&buf[range])
            && let Some(t) = accept(c)
        {
            return Ok(t);
        }
    }
}

/// A long-lived SCTP association over a raw socket: one source port, one pair of
/// verification tags for its whole life. Make it on a thread inside the client's namespace;
/// the socket stays there.
pub struct SctpAssociation {
    sock: RawSctp,
    to: SocketAddr,
    port: u16,
    /// Ours (the INIT's initiate tag: what the peer's packets carry).
    tag: u32,
    /// The peer's (from its INIT-ACK: what our packets carry after the INIT).
    peer_tag: u32,
}

impl SctpAssociation {
    /// INIT / INIT-ACK / COOKIE-ECHO / COOKIE-ACK from `local` to `to`, each answer within
    /// `timeout`.
    pub fn open(local: IpAddr, to: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let (port, tag) = fresh_port_and_tag();
        let sock = RawSctp::bind(local)?;
        sock.connect(to.ip())?;
        sock.send_to(&packet(port, to.port(), 0, CHUNK_INIT, tag), to.ip())?;
        let from_peer = |c: &Chunk<'_>| c.src == to.port() && c.dst == port && c.vtag == tag;
        let (peer_tag, cookie) = recv_until(&sock, to.ip(), Instant::now() + timeout, |c| {
            if c.kind != CHUNK_INIT_ACK || !from_peer(&c) || c.body.len() < 16 {
                return None;
            }
            let peer_tag = u32::from_be_bytes([c.body[0], c.body[1], c.body[2], c.body[3]]);
            let cookie = find_param(&c.body[16..], PARAM_STATE_COOKIE)?.to_vec();
            Some((peer_tag, cookie))
        })?;
        sock.send_to(
            &chunk_packet(port, to.port(), peer_tag, CHUNK_COOKIE_ECHO, &cookie),
            to.ip(),
        )?;
        recv_until(&sock, to.ip(), Instant::now() + timeout, |c| {
            (c.kind == CHUNK_COOKIE_ACK && from_peer(&c)).then_some(())
        })?;
        Ok(SctpAssociation {
            sock,
            to,
            port,
            tag,
            peer_tag,
        })
    }

    /// Sends a HEARTBEAT carrying `info` and waits up to `timeout` for the HEARTBEAT-ACK
    /// echoing exactly `info` (acks of earlier heartbeats are skipped).
    pub fn heartbeat(&self, info: &[u8], timeout: Duration) -> io::Result<()> {
        let body = param(PARAM_HEARTBEAT_INFO, info);
        let hb = chunk_packet(
            self.port,
            self.to.port(),
            self.peer_tag,
            CHUNK_HEARTBEAT,
            &body,
        );
        self.sock.send_to(&hb, self.to.ip())?;
        recv_until(&self.sock, self.to.ip(), Instant::now() + timeout, |c| {
            (c.kind == CHUNK_HEARTBEAT_ACK
                && c.src == self.to.port()
                && c.dst == self.port
                && c.vtag == self.tag
                && find_param(c.body, PARAM_HEARTBEAT_INFO) == Some(info))
            .then_some(())
        })
    }
}

/// Answers INITs to the address `sock` is bound to, on the ports `serves` accepts, until
/// `stop` is set.
pub fn respond(sock: RawSctp, serves: &dyn Fn(u16) -> bool, stop: &AtomicBool) -> io::Result<()> {
    sock.set_timeout(Duration::from_millis(50))?;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let (from, range) = match sock.recv(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(c) = parse_chunk(&buf[range]) else {
            continue;
        };
        if !serves(c.dst) {
            continue;
        }
        let reply = match c.kind {
            CHUNK_INIT if c.vtag == 0 && c.body.len() >= 4 => {
                let init_tag = u32::from_be_bytes([c.body[0], c.body[1], c.body[2], c.body[3]]);
                packet(
                    c.dst,
                    c.src,
                    init_tag,
                    CHUNK_INIT_ACK,
                    responder_tag(init_tag),
                )
            }
            // Later chunks of an association carry the responder's tag; the client's
            // follows from it.
            CHUNK_COOKIE_ECHO => {
                chunk_packet(c.dst, c.src, client_tag(c.vtag), CHUNK_COOKIE_ACK, &[])
            }
            CHUNK_HEARTBEAT => chunk_packet(
                c.dst,
                c.src,
                client_tag(c.vtag),
                CHUNK_HEARTBEAT_ACK,
                c.body,
            ),
            _ => continue,
        };
        let _ = sock.send_to(&reply, from);
    }
    Ok(())
}

/// A source port and initiate tag no other probe of this process uses at the same time, so
/// concurrent probes from one host never take each other's INIT-ACKs (and a probe never
/// rides on the datapath's conntrack entry of an earlier one).
pub fn fresh_port_and_tag() -> (u16, u32) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let port = 20000 + (n % 40000) as u16;
    let tag = 0x7a61_0000u32.wrapping_add(n).max(1);
    (port, tag)
}

/// Sends an INIT from `ns` to `to` (from whichever source address the routes pick) and waits
/// up to `timeout` for the INIT-ACK.
pub fn sctp_probe(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let any = if to.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let (port, tag) = fresh_port_and_tag();
    ns.enter(|| probe(any, port, to, tag, timeout))?
}

/// Answers SCTP INITs to one address of a namespace with INIT-ACKs, on a thread. Stops on drop.
pub struct SctpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SctpResponder {
    /// Answers on `ports`.
    pub fn start(ns: &Netns, ip: IpAddr, ports: Vec<u16>) -> io::Result<Self> {
        Self::serving(ns, ip, move |p| ports.contains(&p))
    }

    /// Answers on the ports `serves` accepts (it may change its mind while running).
    pub fn serving(
        ns: &Netns,
        ip: IpAddr,
        serves: impl Fn(u16) -> bool + Send + 'static,
    ) -> io::Result<Self> {
        // The socket stays in the namespace it was made in; the thread need not enter it.
        let sock = ns.enter(|| RawSctp::bind(ip))??;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let name = ns.name().to_string();
        let thread = std::thread::spawn(move || {
            if let Err(e) = respond(sock, &serves, &s) {
                tracing::error!(ns = %name, addr = %ip, error = %e, "SCTP responder failed");
            }
        });
        Ok(SctpResponder {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SctpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn fresh_ports_and_tags_differ() {
        let (a, b) = (fresh_port_and_tag(), fresh_port_and_tag());
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
        assert_ne!(a.1, 0);
    }

    #[test]
    fn packets_round_trip() {
        let p = packet(1000, 80, 0, CHUNK_INIT, 77);
        assert_eq!(parse(&p), Some((1000, 80, 0, CHUNK_INIT, 77)));
        let mut bad = p.clone();
        bad[13] ^= 1;
        assert_eq!(parse(&bad), None);
        let a = packet(80, 1000, 77, CHUNK_INIT_ACK, 5);
        assert_eq!(parse(&a), Some((80, 1000, 77, CHUNK_INIT_ACK, 5)));
    }

    #[test]
    fn responder_tags_lead_back_to_the_client_tag() {
        for t in [1u32, 0x7a61_0000, 0xffff_ffff, 0x1234_5678] {
            assert_eq!(client_tag(responder_tag(t)), t);
            assert_ne!(responder_tag(t), t);
        }
    }

    #[test]
    fn heartbeats_and_cookies_round_trip() {
        let info = b"netpol-c\0\0\0\0\0\0\0\x07";
        let body = param(PARAM_HEARTBEAT_INFO, info);
        let hb = chunk_packet(2000, 80, 9, CHUNK_HEARTBEAT, &body);
        assert_eq!(hb.len() % 4, 0);
        let c = parse_chunk(&hb).expect("valid heartbeat");
        assert_eq!(
            (c.src, c.dst, c.vtag, c.kind),
            (2000, 80, 9, CHUNK_HEARTBEAT)
        );
        assert_eq!(find_param(c.body, PARAM_HEARTBEAT_INFO), Some(&info[..]));
        // An INIT-ACK's cookie is found after the fixed part.
        let a = packet(80, 2000, 77, CHUNK_INIT_ACK, 5);
        let c = parse_chunk(&a).expect("valid INIT-ACK");
        assert_eq!(
            find_param(&c.body[16..], PARAM_STATE_COOKIE),
            Some(&b"netpolck"[..])
        );
        // An odd-length cookie is padded, its length says how much is real.
        let e = chunk_packet(2000, 80, 5, CHUNK_COOKIE_ECHO, b"abc");
        assert_eq!(parse_chunk(&e).expect("valid").body, b"abc");
    }
}
