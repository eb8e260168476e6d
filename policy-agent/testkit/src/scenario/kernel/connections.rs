//! Long-lived connections on the kernel datapath: opened once from the client's namespace
//! (a thread enters it; the socket stays there) and kept on the same socket pair across
//! steps. A check sends a message carrying a sequence number and waits for its echo:
//! - TCP: a stream to the pod's echo server; messages are fixed-size frames, and echoes of
//!   earlier checks (a message sent while the connection was cut is retransmitted once it is
//!   admitted again, before the new one) are skipped by sequence number;
//! - UDP: a connected socket on a fixed source port to the echo server; stale datagrams are
//!   skipped the same way;
//! - SCTP: an association over raw sockets (`testbed::sctp::SctpAssociation`): INIT,
//!   INIT-ACK, COOKIE-ECHO, COOKIE-ACK, then one HEARTBEAT per check answered by a
//!   HEARTBEAT-ACK echoing its sequence number, same ports and verification tags throughout.
//!
//! Checks run in parallel, one thread per connection (a file holds a few).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use crate::scenario::connections::Connection;
use crate::testbed::bind_fresh_udp_port;
use crate::testbed::sctp::SctpAssociation;
use policy_agent::model::Protocol;

/// A check's message: this prefix and the sequence number, big-endian.
const PREFIX: &[u8; 8] = b"netpol-c";
const FRAME: usize = 16;

fn frame(seq: u64) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[..8].copy_from_slice(PREFIX);
    f[8..].copy_from_slice(&seq.to_be_bytes());
    f
}

/// The sequence number of a frame, if it is one.
fn seq_of(f: &[u8]) -> Option<u64> {
    if f.len() != FRAME || &f[..8] != PREFIX {
        return None;
    }
    f[8..].try_into().ok().map(u64::from_be_bytes)
}

/// The longest TCP retransmission timeout of a connection (`TCP_RTO_MAX_MS`, Linux 6.15+;
/// ignored before): a connection cut for a while backs off, and once admitted again it
/// carries data at its next retransmission, which this keeps within about a second.
const TCP_RTO_MAX_MS: libc::c_int = 44;
const RTO_MAX: Duration = Duration::from_secs(1);
/// A cut connection is not given up by TCP while a scenario runs (`TCP_USER_TIMEOUT`).
const USER_TIMEOUT: Duration = Duration::from_secs(900);

/// One open connection's socket.
enum Socket {
    Tcp {
        stream: TcpStream,
        /// Bytes of a frame not read completely yet.
        pending: Vec<u8>,
    },
    Udp(UdpSocket),
    Sctp(SctpAssociation),
}

struct Live {
    conn: Connection,
    socket: Socket,
    /// The sequence number of the next check (0 is the opening round trip).
    next_seq: u64,
}

/// Every open connection of a run, by name; dropping closes them.
#[derive(Default)]
pub struct OpenConnections {
    live: BTreeMap<String, Live>,
}

/// What to open: the connection and the index of its client's namespace.
pub struct OpenJob<'a> {
    pub conn: &'a Connection,
    pub ns: usize,
}

impl OpenConnections {
    /// Opens every job (in parallel), each with a first round trip; the first failure is
    /// returned naming its connection (those opened stay open, to be closed by name).
    pub fn open(
        &mut self,
        namespaces: &[File],
        jobs: &[OpenJob<'_>],
        timeout: Duration,
    ) -> Result<(), String> {
        for j in jobs {
            if self.live.contains_key(&j.conn.name) {
                return Err(format!("connection {} is already open", j.conn.name));
            }
        }
        let results: Vec<Result<Live, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|j| s.spawn(move || open_one(namespaces, j, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the opening thread panicked".into()))
                })
                .collect()
        });
        let mut first_error = None;
        for r in results {
            match r {
                Ok(live) => {
                    self.live.insert(live.conn.name.clone(), live);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Checks the named connections in parallel; says, in order, whether each is alive.
    pub fn check(&mut self, conns: &[&Connection], timeout: Duration) -> Result<Vec<bool>, String> {
        for c in conns {
            match self.live.get(&c.name) {
                Some(l) if l.conn == **c => {}
                _ => return Err(format!("connection {c} is checked but is not open")),
            }
        }
        let mut selected: Vec<&mut Live> = self
            .live
            .values_mut()
            .filter(|l| conns.iter().any(|c| c.name == l.conn.name))
            .collect();
        let by_name: BTreeMap<String, bool> = std::thread::scope(|s| {
            let handles: Vec<_> = selected
                .iter_mut()
                .map(|l| {
                    s.spawn(move || {
                        let seq = l.next_seq;
                        l.next_seq += 1;
                        let r = l.socket.round_trip(seq, timeout);
                        tracing::debug!(conn = %l.conn, seq, alive = r.is_ok(), error = ?r.as_ref().err(), "check");
                        (l.conn.name.clone(), r.is_ok())
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        Ok(conns
            .iter()
            .map(|c| by_name.get(&c.name).copied().unwrap_or(false))
            .collect())
    }

    /// Closes the named connections (those not open are ignored: a half-failed open).
    pub fn close(&mut self, names: &[String]) {
        for n in names {
            if let Some(l) = self.live.remove(n) {
                tracing::debug!(conn = %l.conn, "close");
                drop(l);
            }
        }
    }

    pub fn close_all(&mut self) {
        self.live.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// Opens one connection from its client's namespace, with a first round trip.
fn open_one(namespaces: &[File], job: &OpenJob<'_>, timeout: Duration) -> Result<Live, String> {
    let conn = job.conn;
    let fail = |e: io::Error| format!("cannot open connection {conn}: {e}");
    let ns = namespaces
        .get(job.ns)
        .ok_or_else(|| format!("connection {conn}: no namespace {}", job.ns))?;
    // SAFETY: a valid namespace fd; this thread is ours and ends after the open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    let to = SocketAddr::new(conn.target_addr, conn.port.port);
    let socket = match conn.port.protocol {
        Protocol::Tcp => {
            let stream = TcpStream::connect_timeout(&to, timeout).map_err(fail)?;
            stream.set_nodelay(true).map_err(fail)?;
            tune_tcp(&stream);
            Socket::Tcp {
                stream,
                pending: Vec::new(),
            }
        }
        Protocol::Udp => {
            // One source port for the connection's whole life.
            let sock = bind_fresh_udp_port(conn.src_addr).map_err(fail)?;
            sock.connect(to).map_err(fail)?;
            Socket::Udp(sock)
        }
        Protocol::Sctp => {
            Socket::Sctp(SctpAssociation::open(conn.src_addr, to, timeout).map_err(fail)?)
        }
    };
    let mut live = Live {
        conn: conn.clone(),
        socket,
        next_seq: 0,
    };
    live.socket.round_trip(0, timeout).map_err(fail)?;
    live.next_seq = 1;
    Ok(live)
}

/// Bounds retransmission backoff and keeps a cut connection from timing out (best effort:
/// options this kernel lacks are skipped).
fn tune_tcp(stream: &TcpStream) {
    let set = |opt: libc::c_int, value: libc::c_int| {
        // SAFETY: an int option on a socket we own.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                opt,
                &value as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(TCP_RTO_MAX_MS, RTO_MAX.as_millis() as libc::c_int) != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "TCP_RTO_MAX_MS");
    }
    if set(
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT.as_millis() as libc::c_int,
    ) != 0
    {
        tracing::debug!(error = %io::Error::last_os_error(), "TCP_USER_TIMEOUT");
    }
}

/// The connection's current retransmission timeout and whether it has data in flight.
fn tcp_retransmission(stream: &TcpStream) -> Option<(Duration, bool)> {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info is valid for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then(|| {
        (
            Duration::from_micros(info.tcpi_rto as u64),
            info.tcpi_unacked > 0,
        )
    })
}

impl Socket {
    /// Sends check `seq`'s message and waits for its echo: `Ok` when it came back.
    fn round_trip(&mut self, seq: u64, timeout: Duration) -> io::Result<()> {
        let msg = frame(seq);
        match self {
            Socket::Tcp { stream, pending } => {
                // A message still unacknowledged (sent while the connection was cut) goes
                // again only at the next retransmission: wait for it, besides the timeout.
                let wait = match tcp_retransmission(stream) {
                    Some((rto, true)) => timeout.max(rto.min(RTO_MAX * 2) + timeout / 2),
                    _ => timeout,
                };
                stream.set_write_timeout(Some(timeout))?;
                stream.write_all(&msg)?;
                let deadline = Instant::now() + wait;
                let mut buf = [0u8; 256];
                loop {
                    // Whole frames first: stale ones (earlier checks) are skipped.
                    while pending.len() >= FRAME {
                        let got: Vec<u8> = pending.drain(..FRAME).collect();
                        match seq_of(&got) {
                            Some(s) if s == seq => return Ok(()),
                            Some(s) if s < seq => continue,
                            _ => return Err(io::Error::other("echo differs")),
                        }
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no echo"));
                    }
                    stream.set_read_timeout(Some(left))?;
                    match stream.read(&mut buf) {
                        Ok(0) => return Err(io::Error::other("closed by the server")),
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                        Err(e) if is_timeout(&e) => {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "no echo"));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Socket::Udp(sock) => {
                sock.send(&msg)?;
                let deadline = Instant::now() + timeout;
                let mut buf = [0u8; 64];
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no echo"));
                    }
                    sock.set_read_timeout(Some(left))?;
                    match sock.recv(&mut buf) {
                        // Late echoes of earlier checks are skipped.
                        Ok(n) if seq_of(&buf[..n]) == Some(seq) => return Ok(()),
                        Ok(_) => continue,
                        Err(e) if is_timeout(&e) => {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "no echo"));
                        }
                        // An ICMP error from an earlier datagram: keep waiting for the echo.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Socket::Sctp(assoc) => assoc.heartbeat(&msg, timeout),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Socket::Tcp { stream, .. } = &self.socket {
            // Reset rather than linger: a cut connection's unsent data would keep the
            // socket retransmitting in the pod's namespace long after the scenario.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a linger option on a socket we own.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const _ as *const libc::c_void,
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_sequence_number() {
        assert_eq!(seq_of(&frame(0)), Some(0));
        assert_eq!(seq_of(&frame(u64::MAX)), Some(u64::MAX));
        assert_eq!(seq_of(b"netpol-scenario-probe"), None);
        let mut f = frame(3);
        f[0] = b'x';
        assert_eq!(seq_of(&f), None);
    }
}
