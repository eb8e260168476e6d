//! The client side of the latency bench: a TCP connection attempt every millisecond from
//! the client pod's namespace to the server, each with its own deadline, several in flight,
//! and each attempt's start time and outcome kept; and a sink accepting and closing what
//! reaches the server.
//!
//! An attempt succeeds when its handshake completes (the SYN-ACK is processed by the
//! kernel within the connect's own softirq work, so long before the deadline); it fails
//! when its SYN is dropped (no answer by the deadline, far below the 1 s SYN retransmission)
//! or refused. Connected sockets are closed with an RST (SO_LINGER 0): a thousand
//! connections a second leave no TIME_WAIT behind.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::agent_harness::spawn_in;

#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub start: Instant,
    pub ok: bool,
}

#[derive(Default)]
struct Log {
    /// Resolved attempts, in the order they resolved.
    done: Vec<Attempt>,
    /// Every attempt started before this is in `done`.
    resolved_through: Option<Instant>,
}

/// Attempts from a namespace to a target until dropped.
pub struct Prober {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<std::io::Result<()>>>>,
}

impl Prober {
    pub fn start(ns: &str, to: SocketAddr, every: Duration, deadline: Duration) -> Result<Prober> {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = spawn_in(ns, "prober", move || run(to, every, deadline, &l, &s))?;
        Ok(Prober {
            log,
            stop,
            thread: Some(thread),
        })
    }

    /// Resolved attempts started at or after `t`, by start time, and the time up to which
    /// every attempt is resolved.
    pub fn since(&self, t: Instant) -> (Vec<Attempt>, Option<Instant>) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Attempt> = log.done.iter().filter(|a| a.start >= t).copied().collect();
        v.sort_by_key(|a| a.start);
        (v, log.resolved_through)
    }

    /// Forgets attempts started before `t` (memory stays bounded over a long run).
    pub fn forget_before(&self, t: Instant) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.done.retain(|a| a.start >= t);
    }

    /// Stops the thread; its error, if it ended with one.
    pub fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(Ok(())))) | None => Ok(()),
            Some(Ok(Ok(Err(e)))) | Some(Ok(Err(e))) => Err(e).context("the prober"),
            Some(Err(_)) => anyhow::bail!("the prober panicked"),
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    to: SocketAddr,
    every: Duration,
    deadline: Duration,
    log: &Mutex<Log>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut inflight: Vec<(OwnedFd, Instant)> = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut resolved = Vec::new();
        if now >= next {
            match start_attempt(to) {
                Ok(fd) => inflight.push((fd, now)),
                // No route yet (a pod being plumbed): a failed attempt.
                Err(_) => resolved.push(Attempt {
                    start: now,
                    ok: false,
                }),
            }
            // No burst to catch up after a stall: the cadence resumes from now.
            next = (next + every).max(now);
        }
        let mut pfds: Vec<libc::pollfd> = inflight
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: valid pollfds of open sockets; no wait.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
        let checked = Instant::now();
        let mut keep = Vec::with_capacity(inflight.len());
        for ((fd, start), p) in inflight.drain(..).zip(&pfds) {
            if p.revents != 0 {
                resolved.push(Attempt {
                    start,
                    ok: so_error(&fd) == 0,
                });
            } else if checked.duration_since(start) >= deadline {
                resolved.push(Attempt { start, ok: false });
            } else {
                keep.push((fd, start));
            }
        }
        inflight = keep;
        {
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            l.done.extend(resolved);
            l.resolved_through = Some(inflight.iter().map(|(_, s)| *s).min().unwrap_or(checked));
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()).min(every));
    }
    Ok(())
}

/// A non-blocking connect under way (its SYN is out when this returns).
fn start_attempt(to: SocketAddr) -> std::io::Result<OwnedFd> {
    let (domain, addr, len) = sockaddr(to);
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger for SO_LINGER: closing sends an RST, no TIME_WAIT.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    // SAFETY: addr holds a sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr().cast(), len) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(fd)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn so_error(fd: &OwnedFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized buffer for SO_ERROR.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 { -1 } else { err }
}

/// The socket domain, a sockaddr's bytes and its length.
fn sockaddr(to: SocketAddr) -> (i32, Vec<u8>, libc::socklen_t) {
    match to {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>();
            // SAFETY: a plain-old-data struct viewed as its bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sa as *const libc::sockaddr_in).cast(), len)
            };
            (libc::AF_INET, bytes.to_vec(), len as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            let len = std::mem::size_of::<libc::sockaddr_in6>();
            // SAFETY: a plain-old-data struct viewed as its bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sa as *const libc::sockaddr_in6).cast(), len)
            };
            (libc::AF_INET6, bytes.to_vec(), len as libc::socklen_t)
        }
    }
}

/// Accepts and closes every connection to a listener in a namespace, until dropped.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<std::io::Result<()>>>>,
}

impl Sink {
    pub fn start(ns: &str, at: SocketAddr) -> Result<Sink> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = spawn_in(ns, "sink", move || -> std::io::Result<()> {
            let listener = std::net::TcpListener::bind(at)?;
            listener.set_nonblocking(true)?;
            while !s.load(Ordering::Relaxed) {
                let mut p = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                while let Ok((conn, _)) = listener.accept() {
                    drop(conn);
                }
            }
            Ok(())
        })?;
        Ok(Sink {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When the path turned to `open` (or closed) after a change at `written`: the start of the
/// first attempt after which every attempt has the new outcome, provided at least `settle`
/// of resolved attempts confirm it; `None` while not (yet) settled.
pub fn turned(
    attempts: &[Attempt],
    resolved_through: Option<Instant>,
    written: Instant,
    open: bool,
    settle: Duration,
) -> Option<Duration> {
    let resolved_through = resolved_through?;
    let resolved: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start >= written && a.start < resolved_through)
        .collect();
    let last_wrong = resolved.iter().rposition(|a| a.ok != open);
    let first_right = match last_wrong {
        Some(i) => resolved.get(i + 1)?,
        None => resolved.first()?,
    };
    // Confirmed: attempts over `settle` after it all agree.
    let last = resolved.last()?;
    (last.start.duration_since(first_right.start) >= settle)
        .then(|| first_right.start.duration_since(written))
}
