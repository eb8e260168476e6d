//! The load: TCP_CRR-style (connect, 1-byte request, 1-byte reply, close) and TCP_RR-style
//! (1-byte request and reply on one connection) transactions from a client thread pinned to
//! one CPU to a server thread pinned to another, each in its pod's namespace, for a bounded
//! time. netperf is not packaged here; these are the same transactions.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use policy_testkit::testbed::Netns;

/// How long one connect or reply may take before the run counts as broken.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a blocked server thread looks at its stop flag.
const SERVER_TICK: Duration = Duration::from_millis(100);

/// Moves the calling thread into `ns` and onto `cpu`.
fn enter(ns: &str, cpu: usize) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Answers each byte with a byte, one connection at a time, until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, addr: SocketAddr, cpu: usize) -> io::Result<Server> {
        let listener = ns.enter(|| TcpListener::bind(addr))??;
        // Blocking accept (a polled one would add its sleep to every new connection),
        // woken every tick to look at the stop flag.
        accept_timeout(&listener, SERVER_TICK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = ns.name().to_string();
        let thread = std::thread::spawn(move || {
            if let Err(e) = enter(&name, cpu) {
                eprintln!("server thread: {e}");
                return;
            }
            while !flag.load(Ordering::Relaxed) {
                if let Ok((conn, _)) = listener.accept() {
                    serve(conn, &flag);
                }
            }
        });
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

fn accept_timeout(listener: &TcpListener, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(SERVER_TICK));
    let mut b = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {
                if conn.write_all(&b).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// A new connection per transaction.
    Crr,
    /// Every transaction on one connection.
    Rr,
}

/// Transactions per second of `kind` from `ns` (pinned to `cpu`) to `to`, over `length`.
pub fn run(
    ns: &Netns,
    to: SocketAddr,
    cpu: usize,
    kind: Kind,
    length: Duration,
) -> io::Result<f64> {
    let name = ns.name().to_string();
    std::thread::spawn(move || {
        enter(&name, cpu)?;
        match kind {
            Kind::Crr => crr(to, length),
            Kind::Rr => rr(to, length),
        }
    })
    .join()
    .map_err(|_| io::Error::other("load thread panicked"))?
}

fn transact(s: &mut TcpStream) -> io::Result<()> {
    let mut b = [1u8; 1];
    s.write_all(&b)?;
    s.read_exact(&mut b)
}

fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, STEP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    Ok(s)
}

fn crr(to: SocketAddr, length: Duration) -> io::Result<f64> {
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < length {
        let mut s = connect(to)?;
        transact(&mut s)?;
        drop(s);
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn rr(to: SocketAddr, length: Duration) -> io::Result<f64> {
    let mut s = connect(to)?;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < length {
        transact(&mut s)?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Whether a connection to `to` from `ns` opens within `wait` (a dropped SYN does not).
pub fn connects(ns: &Netns, to: SocketAddr, wait: Duration) -> io::Result<bool> {
    ns.enter(|| TcpStream::connect_timeout(&to, wait).is_ok())
}
