//! Servers in the scenario's namespaces and the probes between them: TCP (handshake and an
//! echoed message), UDP (a datagram and its echo), SCTP (INIT answered by INIT-ACK, see
//! `testbed::sctp`). Probes run in parallel on worker threads that enter each probe's source
//! namespace before making its socket (a socket stays in the namespace it was made in).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::testbed::sctp::{self, SctpResponder};
use crate::testbed::{Netns, TcpEchoServer, UdpEchoServer};
use policy_agent::model::Protocol;

/// Which SCTP ports a responder answers on.
type SctpPorts = Arc<Mutex<BTreeSet<u16>>>;

/// Every server started so far; stops them all on drop.
#[derive(Default)]
pub struct Servers {
    tcp: Vec<TcpEchoServer>,
    udp: Vec<UdpEchoServer>,
    /// One responder per address, answering on the ports its set holds.
    sctp: BTreeMap<(String, IpAddr), (SctpPorts, SctpResponder)>,
    started: BTreeSet<(String, IpAddr, Protocol, u16)>,
}

impl Servers {
    /// Makes `ns` serve `protocol`/`port` on `addr` (once).
    pub fn ensure(
        &mut self,
        ns: &Netns,
        addr: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> io::Result<()> {
        if !self
            .started
            .insert((ns.name().to_string(), addr, protocol, port))
        {
            return Ok(());
        }
        let sa = SocketAddr::new(addr, port);
        match protocol {
            Protocol::Tcp => self.tcp.push(TcpEchoServer::start(ns, sa)?),
            Protocol::Udp => self.udp.push(UdpEchoServer::start(ns, sa)?),
            Protocol::Sctp => {
                let key = (ns.name().to_string(), addr);
                if let Some((ports, _)) = self.sctp.get(&key) {
                    lock(ports).insert(port);
                    return Ok(());
                }
                let ports: SctpPorts = Arc::new(Mutex::new(BTreeSet::from([port])));
                let p = ports.clone();
                let responder =
                    SctpResponder::serving(ns, addr, move |port| lock(&p).contains(&port))?;
                self.sctp.insert(key, (ports, responder));
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One connection attempt.
#[derive(Clone, Debug)]
pub struct Job {
    /// The source's namespace (index into the `namespaces` given to [`run`]).
    pub ns: usize,
    pub src: IpAddr,
    pub to: SocketAddr,
    pub protocol: Protocol,
}

const MESSAGE: &[u8] = b"netpol-scenario-probe";

/// Runs every job on up to `parallel` threads; says, in order, whether each connected within
/// `timeout`.
pub fn run(namespaces: &[File], jobs: &[Job], timeout: Duration, parallel: usize) -> Vec<bool> {
    let next = AtomicUsize::new(0);
    let results: Vec<AtomicBool> = jobs.iter().map(|_| AtomicBool::new(false)).collect();
    let workers = parallel.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut current: Option<usize> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { return };
                    if current != Some(job.ns) {
                        let Some(f) = namespaces.get(job.ns) else {
                            continue;
                        };
                        // SAFETY: a valid namespace fd; only this worker thread changes namespace.
                        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            tracing::error!(error = %io::Error::last_os_error(), "setns");
                            current = None;
                            continue;
                        }
                        current = Some(job.ns);
                    }
                    let r = one(job, timeout);
                    tracing::trace!(?job, ok = r.is_ok(), "probe");
                    results[i].store(r.is_ok(), Ordering::Relaxed);
                }
            });
        }
    });
    results.into_iter().map(AtomicBool::into_inner).collect()
}

/// One probe, on a thread already in the source's namespace.
fn one(job: &Job, timeout: Duration) -> io::Result<()> {
    match job.protocol {
        Protocol::Tcp => {
            // The source address follows from the routes (each host has one address per family).
            let mut s = TcpStream::connect_timeout(&job.to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.write_all(MESSAGE)?;
            let mut buf = [0u8; MESSAGE.len()];
            s.read_exact(&mut buf)?;
            if buf != MESSAGE {
                return Err(io::Error::other("echo differs"));
            }
            Ok(())
        }
        Protocol::Udp => {
            let sock = crate::testbed::bind_fresh_udp_port(job.src)?;
            sock.connect(job.to)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send(MESSAGE)?;
            let mut buf = [0u8; 64];
            let n = sock.recv(&mut buf)?;
            if &buf[..n] != MESSAGE {
                return Err(io::Error::other("echo differs"));
            }
            Ok(())
        }
        Protocol::Sctp => {
            let (port, tag) = sctp::fresh_port_and_tag();
            sctp::probe(job.src, port, job.to, tag, timeout)
        }
    }
}
