//! Echo servers and bounded-time clients running in namespaces.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::netns::Netns;

const POLL: Duration = Duration::from_millis(20);

/// A TCP echo server in a namespace: echoes what each connection sends until it closes.
/// Stops on drop.
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> io::Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s2 = s.clone();
                        std::thread::spawn(move || echo_tcp(conn, &s2));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        Ok(TcpEchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn echo_tcp(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 2048];
    // Bounded: the connection lives at most until the server stops or the peer closes.
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
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

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server in a namespace. Stops on drop.
pub struct UdpEchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> io::Result<Self> {
        let sock = ns.enter(|| UdpSocket::bind(addr))??;
        sock.set_read_timeout(Some(POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `ns` to `to`, sends a message and waits for its echo, all within
/// `timeout` per step. `Ok` means a full round trip.
pub fn tcp_echo(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut conn = TcpClient::connect(ns, to, timeout)?;
    conn.round_trip(b"netpol-probe")
}

/// A UDP socket on a source port no recent probe used (call it inside the namespace). Connections outlive policy changes
/// (conntrack, as in Cilium and Calico): a datagram whose 5-tuple repeats an earlier probe
/// within the UDP idle timeout would get that probe's verdict, and a random ephemeral port
/// repeats often enough over thousands of probes. So ports rotate through the ephemeral range
/// (28k ports before any repeats), skipping ports in use.
pub fn bind_fresh_udp_port(src: IpAddr) -> io::Result<UdpSocket> {
    const FIRST: u16 = 32768;
    const COUNT: u16 = 28000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let mut last = None;
    for _ in 0..64 {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        match UdpSocket::bind(SocketAddr::new(src, port)) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free UDP port")))
}

/// Sends a datagram from `ns` to `to` and waits `timeout` for its echo.
pub fn udp_echo(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let any = if to.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let sock = ns.enter(|| bind_fresh_udp_port(any))??;
    sock.set_read_timeout(Some(timeout))?;
    let msg = b"netpol-probe";
    sock.send_to(msg, to)?;
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf)?;
    if from != to || &buf[..n] != msg {
        return Err(io::Error::other(format!("unexpected reply from {from}")));
    }
    Ok(())
}

/// An open TCP connection from a namespace, for checks across policy changes.
pub struct TcpClient {
    stream: TcpStream,
}

impl TcpClient {
    pub fn connect(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = ns.enter(|| TcpStream::connect_timeout(&to, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpClient { stream })
    }

    /// Sends `msg` and reads its echo.
    pub fn round_trip(&mut self, msg: &[u8]) -> io::Result<()> {
        self.stream.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        self.stream.read_exact(&mut buf)?;
        if buf != msg {
            return Err(io::Error::other("echo differs"));
        }
        Ok(())
    }
}
