//! The agent's side of `monitor`: the single consumer of the `EVENTS` ring while an agent
//! runs, republishing each deny event as a JSON line ([`super::event::MonitorEvent`]) to
//! every client of the monitor socket. See the module doc of [`super`] for why.
//!
//! It runs on its own thread so neither a burst of events nor a slow client ever delays the
//! map writer, and a failure here is logged, never fatal to enforcement.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, MapInfo, RingBuf};
use policy_common::{DenyEvent, MAP_EVENTS};

use super::event::Resolver;
use super::{ConsumerLock, ObserveError};

/// A client whose unsent output exceeds this is cut off (it is not reading).
const MAX_BACKLOG: usize = 1 << 20;
/// How often a replaced `EVENTS` pin (an upgrade migrated the maps) is looked for.
const REPIN_CHECK: Duration = Duration::from_secs(2);

/// The running broker; stops (and removes its socket) when dropped.
pub struct Broker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Broker {
    /// Starts serving `monitor` for the maps pinned in `bpf_dir` once they exist, on an
    /// abstract socket of the calling thread's network namespace.
    pub fn spawn(bpf_dir: PathBuf) -> Broker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("event-broker".into())
            .spawn(move || run(&bpf_dir, &flag))
            .map_err(|e| tracing::error!(error = %e, "cannot start the event broker"))
            .ok();
        Broker { stop, handle }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(bpf_dir: &Path, stop: &AtomicBool) {
    let mut told_busy = false;
    while !stop.load(Ordering::Relaxed) {
        if !bpf_dir.join(MAP_EVENTS).exists() {
            // The agent has not loaded its object yet.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let lock = match ConsumerLock::try_take(bpf_dir) {
            Ok(Some(l)) => l,
            Ok(None) => {
                if !told_busy {
                    tracing::warn!(
                        holder = %super::lock_holder(bpf_dir),
                        "a monitor reads the deny events directly; the agent takes over when it exits"
                    );
                    told_busy = true;
                }
                sleep_unless(stop, Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "event broker: taking the consumer lock");
                sleep_unless(stop, Duration::from_secs(5));
                continue;
            }
        };
        told_busy = false;
        if let Err(e) = serve(bpf_dir, stop) {
            tracing::error!(error = %e, "event broker failed; retrying");
            sleep_unless(stop, Duration::from_secs(1));
        }
        drop(lock);
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens the pinned ring for consuming (read-write: the consumer position is written).
pub(crate) fn open_ring(bpf_dir: &Path) -> Result<(RingBuf<MapData>, u32), ObserveError> {
    let path = bpf_dir.join(MAP_EVENTS);
    let data = MapData::from_pin(&path).map_err(|e| ObserveError::map(MAP_EVENTS, e))?;
    let id = data
        .info()
        .map_err(|e| ObserveError::map(MAP_EVENTS, e))?
        .id();
    let ring =
        RingBuf::try_from(Map::RingBuf(data)).map_err(|e| ObserveError::map(MAP_EVENTS, e))?;
    Ok((ring, id))
}

/// Whether the map pinned as `EVENTS` is no longer the one with `id` (replaced by a
/// migration, or unpinned by an uninstall).
pub(crate) fn ring_replaced(bpf_dir: &Path, id: u32) -> bool {
    MapInfo::from_pin(bpf_dir.join(MAP_EVENTS)).map_or(true, |i| i.id() != id)
}

/// The next record of the ring as a `DenyEvent` (records of another size are skipped).
pub(crate) fn next_event(ring: &mut RingBuf<MapData>) -> Option<Option<DenyEvent>> {
    let item = ring.next()?;
    if item.len() < std::mem::size_of::<DenyEvent>() {
        return Some(None);
    }
    // SAFETY: DenyEvent is plain old data of this size; ring records are only 8-byte
    // aligned, hence the unaligned read.
    Some(Some(unsafe {
        std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>())
    }))
}

struct Client {
    stream: UnixStream,
    out: Vec<u8>,
}

impl Client {
    /// Writes what it can without blocking; false when the client is gone or too slow.
    fn flush(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.out.len() <= MAX_BACKLOG
    }
}

fn serve(bpf_dir: &Path, stop: &AtomicBool) -> Result<(), ObserveError> {
    let (mut ring, id) = open_ring(bpf_dir)?;
    let name = super::socket_name(bpf_dir);
    let listener = bind(&name)?;
    tracing::info!(socket = %format!("@{name}"), "deny events served to `policy-agent monitor`");
    let mut resolver = Resolver::new(bpf_dir);
    let mut clients: Vec<Client> = Vec::new();
    let mut last_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        while let Ok((s, _)) = listener.accept() {
            if !trusted_peer(&s) {
                tracing::warn!("monitor connection refused: only root may read deny events");
                continue;
            }
            if s.set_nonblocking(true).is_ok() {
                tracing::debug!(clients = clients.len() + 1, "monitor connected");
                clients.push(Client {
                    stream: s,
                    out: Vec::new(),
                });
            }
        }
        // Drained whether or not anyone listens, so the ring never holds stale events.
        let mut lines = Vec::new();
        while let Some(rec) = next_event(&mut ring) {
            if let Some(e) = rec
                && !clients.is_empty()
            {
                lines.extend_from_slice(resolver.decode(&e).json().as_bytes());
                lines.push(b'\n');
            }
        }
        if !lines.is_empty() || clients.iter().any(|c| !c.out.is_empty()) {
            clients.retain_mut(|c| {
                c.out.extend_from_slice(&lines);
                let keep = c.flush();
                if !keep {
                    tracing::debug!("monitor disconnected (gone, or not reading)");
                }
                keep
            });
        }
        if last_check.elapsed() > REPIN_CHECK {
            last_check = Instant::now();
            // Clients that hung up are noticed here at the latest (a zero-length probe
            // cannot tell; peek for EOF instead).
            clients.retain(|c| !hung_up(&c.stream));
            if ring_replaced(bpf_dir, id) {
                tracing::info!("the EVENTS map was replaced; reopening it");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Whether the peer closed its end (a monitor never sends anything).
fn hung_up(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a valid socket and a one-byte buffer.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn bind(name: &str) -> Result<UnixListener, ObserveError> {
    let err = |source| ObserveError::Socket {
        name: name.to_string(),
        source,
    };
    // We hold the consumer lock of this pin directory, so no other broker serves it; an
    // abstract name dies with its socket, so there is nothing stale to remove first.
    let l = policy_cni::local_socket::bind(name).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Deny events name the node's workloads and their peers: only root (or the agent's own
/// user) may read them. An abstract socket has no file mode, so the peer's credentials
/// decide.
fn trusted_peer(s: &UnixStream) -> bool {
    policy_cni::local_socket::trusted_peer(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_does_not_read_is_cut_off_not_waited_for() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let mut c = Client {
            stream: ours,
            out: Vec::new(),
        };
        let line = vec![b'x'; 4096];
        let t0 = Instant::now();
        let mut kept = true;
        for _ in 0..(2 * MAX_BACKLOG / line.len()) {
            c.out.extend_from_slice(&line);
            kept = c.flush();
            if !kept {
                break;
            }
        }
        assert!(!kept, "a peer that never reads must be dropped");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "flush must never block"
        );
        drop(theirs);
    }

    #[test]
    fn a_reading_client_gets_whole_lines() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let mut c = Client {
            stream: ours,
            out: b"{\"a\":1}\n{\"b\":2}\n".to_vec(),
        };
        assert!(c.flush());
        assert!(c.out.is_empty());
        let mut r = std::io::BufReader::new(theirs);
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).expect("read");
        assert_eq!(l, "{\"a\":1}\n");
        drop(c);
        l.clear();
        std::io::BufRead::read_line(&mut r, &mut l).expect("read");
        assert_eq!(l, "{\"b\":2}\n");
    }

    #[test]
    fn our_own_user_is_trusted() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        assert!(trusted_peer(&ours));
    }

    #[test]
    fn hung_up_sees_a_closed_peer() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        assert!(!hung_up(&ours));
        drop(theirs);
        assert!(hung_up(&ours));
    }
}
