//! SCTP without a kernel SCTP stack (this machine kind has none): a raw-socket responder
//! that answers INIT with INIT-ACK on chosen ports, and a probe that sends an INIT and waits
//! for the INIT-ACK. The datapath judges these packets like any SCTP association's first
//! packets (protocol 132, ports in the common header).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::netns::Netns;

const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;

/// Answers SCTP INITs to `ip` on `ports` with INIT-ACKs. Stops on drop.
pub struct SctpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SctpResponder {
    pub fn start(ns: &Netns, ip: IpAddr, ports: Vec<u16>) -> io::Result<Self> {
        let sock = ns.enter(|| raw_socket(ip, Some(ip)))??;
        set_timeout(&sock, Duration::from_millis(50))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = recv(&sock, &mut buf) else {
                    continue;
                };
                let Some(sctp) = sctp_payload(&buf[..n], ip.is_ipv4()) else {
                    continue;
                };
                let Some(init) = Header::parse(sctp) else {
                    continue;
                };
                if init.chunk != CHUNK_INIT || !ports.contains(&init.dport) {
                    continue;
                }
                let reply = build(
                    init.dport,
                    init.sport,
                    init.init_tag,
                    CHUNK_INIT_ACK,
                    0x5eed_0001,
                );
                let _ = send(&sock, &reply, SocketAddr::new(from, 0));
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

/// Sends an INIT from `ns` to `to` and waits up to `timeout` for the INIT-ACK.
pub fn sctp_probe(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let sock = ns.enter(|| raw_socket(to.ip(), None))??;
    set_timeout(&sock, Duration::from_millis(50))?;
    // A source port unique enough for concurrent probes.
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u16;
    let sport = 32768 + (salt ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919)) % 28000;
    let tag = 0x1000_0000 | u32::from(sport);
    send(&sock, &build(sport, to.port(), 0, CHUNK_INIT, tag), to)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok((n, from)) = recv(&sock, &mut buf) else {
            continue;
        };
        if from != to.ip() {
            continue;
        }
        let Some(h) = sctp_payload(&buf[..n], to.is_ipv4()).and_then(Header::parse) else {
            continue;
        };
        if h.sport == to.port() && h.dport == sport && h.chunk == CHUNK_INIT_ACK && h.vtag == tag {
            return Ok(());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no SCTP INIT-ACK from {to}"),
    ))
}

struct Header {
    sport: u16,
    dport: u16,
    vtag: u32,
    chunk: u8,
    init_tag: u32,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < 20 {
            return None;
        }
        Some(Header {
            sport: u16::from_be_bytes([b[0], b[1]]),
            dport: u16::from_be_bytes([b[2], b[3]]),
            vtag: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            chunk: b[12],
            init_tag: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
        })
    }
}

/// IPv4 raw sockets deliver the IP header, IPv6 ones do not.
fn sctp_payload(b: &[u8], v4: bool) -> Option<&[u8]> {
    if !v4 {
        return Some(b);
    }
    let ihl = (*b.first()? & 0x0f) as usize * 4;
    b.get(ihl..)
}

/// A common header and one INIT or INIT-ACK chunk (with a state cookie for INIT-ACK).
fn build(sport: u16, dport: u16, vtag: u32, chunk: u8, init_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let cookie: &[u8] = if chunk == CHUNK_INIT_ACK {
        &[0, 7, 0, 8, 0xc0, 0x0c, 0x1e, 0x00]
    } else {
        &[]
    };
    let len = (20 + cookie.len()) as u16;
    p.extend_from_slice(&[chunk, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&init_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&[0, 1, 0, 1]); // outbound and inbound streams
    p.extend_from_slice(&init_tag.to_be_bytes()); // initial TSN
    p.extend_from_slice(cookie);
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// CRC-32C (Castagnoli), as SCTP's checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn raw_socket(family_of: IpAddr, bind: Option<IpAddr>) -> io::Result<OwnedFd> {
    let af = if family_of.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the fd is owned at once.
    let fd = unsafe { libc::socket(af, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(ip) = bind {
        let (sa, len) = sockaddr(SocketAddr::new(ip, 0));
        // SAFETY: sa is a valid sockaddr of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn set_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as _,
        tv_usec: t.subsec_micros() as _,
    };
    // SAFETY: a valid timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            (ss, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            (ss, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn send(fd: &OwnedFd, data: &[u8], to: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(to);
    // SAFETY: valid buffer and sockaddr.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            (&raw const sa).cast(),
            len,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, IpAddr)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid buffer and out-parameters.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut ss).cast(),
            &mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = if ss.ss_family as i32 == libc::AF_INET {
        // SAFETY: the kernel wrote a sockaddr_in.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
        IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
    } else {
        // SAFETY: the kernel wrote a sockaddr_in6.
        let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const ss).cast()) };
        IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
    };
    Ok((n as usize, ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn init_round_trips_through_the_parser() {
        let p = build(40000, 5000, 0, CHUNK_INIT, 77);
        let h = Header::parse(&p).expect("parse");
        assert_eq!(
            (h.sport, h.dport, h.vtag, h.chunk, h.init_tag),
            (40000, 5000, 0, CHUNK_INIT, 77)
        );
    }
}
