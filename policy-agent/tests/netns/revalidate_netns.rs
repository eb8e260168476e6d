//! Open connections follow the policy epoch (`--established revalidate`): the real programs
//! on two pods' veths, TCP and UDP socket pairs kept open (IPv4 and IPv6) while the maps
//! change. Connections opened while nothing is isolated are recorded too, so isolation
//! coming later judges them from the client's side. A write without an epoch bump leaves
//! them as they are; a bump makes each judged again as a new connection: cut when refused (both ways: the client's data and the
//! server's pushes, the latter judged by the tail-called `rejudge`), flowing again when
//! admitted again (UDP at once, TCP with its retransmission), alive when only the server's
//! own egress closes (replies are no new connections). `Keep` never moves the epoch.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use policy_agent::dataplane::{AttachMode, Dataplane, DataplaneMaps, Established};
use policy_common::{Direction, Reason, RuleKey, ep_flags, proto};
use policy_testkit::testbed::{PrivateBpffs, Testbed};

use super::netns_datapath::{DENY_WAIT, ID_A, OK_WAIT, SET_B_IN, addr, ranges, set_endpoint};

const TCP_PORT: u16 = 8081;
const UDP_PORT: u16 = 9091;
/// A TCP retransmission backs off: after a cut of a second or two the next one may take
/// seconds.
const RETRANSMIT_WAIT: Duration = Duration::from_secs(15);

/// An open connection, both ends in the test's hands (a socket stays in the namespace it
/// was made in).
enum Pair {
    Tcp {
        client: TcpStream,
        server: TcpStream,
        /// Bytes sent while cut, per direction (to server, to client): TCP delivers them
        /// first once the connection flows again.
        queued: [Vec<u8>; 2],
    },
    Udp {
        client: UdpSocket,
        server: UdpSocket,
    },
}

impl Pair {
    fn tcp(bed: &Testbed, a: usize, b: usize, v6: bool) -> io::Result<Pair> {
        let at = SocketAddr::new(bed.hosts[b].ip(v6), TCP_PORT);
        let listener = bed.hosts[b].ns.enter(|| TcpListener::bind(at))??;
        let client = bed.hosts[a]
            .ns
            .enter(|| TcpStream::connect_timeout(&at, OK_WAIT))??;
        let (server, _) = listener.accept()?;
        Ok(Pair::Tcp {
            client,
            server,
            queued: [Vec::new(), Vec::new()],
        })
    }

    fn udp(bed: &Testbed, a: usize, b: usize, v6: bool) -> io::Result<Pair> {
        let at = SocketAddr::new(bed.hosts[b].ip(v6), UDP_PORT);
        let from = SocketAddr::new(bed.hosts[a].ip(v6), 0);
        let server = bed.hosts[b].ns.enter(|| UdpSocket::bind(at))??;
        let client = bed.hosts[a].ns.enter(|| UdpSocket::bind(from))??;
        client.connect(at)?;
        server.connect(client.local_addr()?)?;
        // The client speaks first: it is the connection's originator, as for TCP.
        let mut p = Pair::Udp { client, server };
        if !p.carries(true, b"hello", OK_WAIT)? {
            return Err(io::Error::other("the first datagram did not arrive"));
        }
        Ok(p)
    }

    fn name(&self) -> String {
        match self {
            Pair::Tcp { client, .. } => format!("TCP {:?}", client.peer_addr()),
            Pair::Udp { client, .. } => format!("UDP {:?}", client.peer_addr()),
        }
    }

    /// Sends `msg` one way (`to_server`) and says whether it arrived within `wait` (with
    /// what TCP queued before it, in order).
    fn carries(&mut self, to_server: bool, msg: &[u8], wait: Duration) -> io::Result<bool> {
        match self {
            Pair::Tcp {
                client,
                server,
                queued,
            } => {
                let (tx, rx) = if to_server {
                    (client, server)
                } else {
                    (server, client)
                };
                let q = &mut queued[usize::from(!to_server)];
                tx.write_all(msg)?;
                q.extend_from_slice(msg);
                rx.set_read_timeout(Some(wait))?;
                let mut got = vec![0u8; q.len()];
                match rx.read_exact(&mut got) {
                    Ok(()) if got == *q => {
                        q.clear();
                        Ok(true)
                    }
                    Ok(()) => Err(io::Error::other(format!("stream differs: {got:?}"))),
                    // Nothing (or part) arrived: a dropped segment is retransmitted whole,
                    // so nothing was consumed.
                    Err(e) if timed_out(&e) && rx_empty(rx)? => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Pair::Udp { client, server } => {
                let (tx, rx) = if to_server {
                    (client, server)
                } else {
                    (server, client)
                };
                tx.send(msg)?;
                rx.set_read_timeout(Some(wait))?;
                let mut buf = [0u8; 64];
                match rx.recv(&mut buf) {
                    Ok(n) if &buf[..n] == msg => Ok(true),
                    Ok(n) => Err(io::Error::other(format!(
                        "datagram differs: {:?}",
                        &buf[..n]
                    ))),
                    Err(e) if timed_out(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::UnexpectedEof
    )
}

/// Whether a timed-out `read_exact` consumed nothing (then the stream stays in step).
fn rx_empty(s: &TcpStream) -> io::Result<bool> {
    s.set_nonblocking(true)?;
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    s.set_nonblocking(false)?;
    match r {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

/// Every pair carries data both ways (`true`) or neither way (`false`).
fn expect_all(pairs: &mut [Pair], alive: bool, wait: Duration, what: &str) {
    for (i, p) in pairs.iter_mut().enumerate() {
        let name = p.name();
        let wait = if alive { wait } else { DENY_WAIT };
        // The server speaks first: after a bump its packet is the reply on a stale entry.
        let push = p
            .carries(false, format!("push-{i}-{what}").as_bytes(), wait)
            .expect("server push");
        let data = p
            .carries(true, format!("data-{i}-{what}").as_bytes(), wait)
            .expect("client data");
        assert_eq!(
            (push, data),
            (alive, alive),
            "{what}: {name}: server -> client {push}, client -> server {data}"
        );
    }
}

fn bump(maps: &mut DataplaneMaps) {
    maps.bump_policy_epoch().expect("bump the policy epoch");
}

#[test]
fn open_connections_follow_the_policy_epoch() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let b = bed.add_pod().expect("pod b");
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
    let mut maps = dp.take_maps().expect("maps");
    let (ha, hb) = (&bed.hosts[a], &bed.hosts[b]);
    let _attached = bed
        .node
        .enter(|| {
            let x = dp.attach(&ha.host_if, AttachMode::Auto).expect("attach a");
            let y = dp.attach(&hb.host_if, AttachMode::Auto).expect("attach b");
            (x, y)
        })
        .expect("enter node namespace");
    bed.bind(a, &mut maps).expect("bind a");
    bed.bind(b, &mut maps).expect("bind b");
    let ips_a = [ha.ip(false), ha.ip(true)];
    let ips_b = [hb.ip(false), hb.ip(true)];
    for ip in ips_a {
        maps.set_identity(addr(ip), ID_A).expect("ipcache");
    }
    // B admits A on the two ports; A is not isolated.
    let b_in = ep_flags::ISOLATED_INGRESS | ep_flags::INGRESS_HAS_IDENTITY_RULES;
    set_endpoint(&mut maps, ips_a, 1, 0);
    set_endpoint(&mut maps, ips_b, 2, b_in);
    let rule = RuleKey {
        policy_set: SET_B_IN,
        identity: ID_A,
    };
    let allow = ranges(&[
        (proto::TCP, TCP_PORT, TCP_PORT),
        (proto::UDP, UDP_PORT, UDP_PORT),
    ]);
    maps.set_rule(rule, allow).expect("rule");
    bump(&mut maps);
    let mut pairs = Vec::new();
    set_endpoint(&mut maps, ips_b, 2, 0);
    for v6 in [false, true] {
        pairs.push(Pair::tcp(&bed, a, b, v6).expect("tcp connection"));
        pairs.push(Pair::udp(&bed, a, b, v6).expect("udp pair"));
    }
    expect_all(&mut pairs, true, OK_WAIT, "opened unisolated");
    set_endpoint(&mut maps, ips_b, 2, b_in);
    maps.delete_rule(&rule).expect("delete rule");
    bump(&mut maps);
    expect_all(&mut pairs, false, DENY_WAIT, "isolated after opening");
    maps.set_rule(rule, allow).expect("rule");
    bump(&mut maps);
    expect_all(&mut pairs, true, RETRANSMIT_WAIT, "admitted");

    // A bump that changes nothing cuts nothing (the server's pushes go through `rejudge`).
    bump(&mut maps);
    expect_all(&mut pairs, true, OK_WAIT, "bump, same policy");

    // A write without a bump (what `keep` does) leaves the connections running.
    maps.delete_rule(&rule).expect("delete rule");
    expect_all(&mut pairs, true, OK_WAIT, "rule deleted, no bump");

    // The bump: no longer admitted as new, so cut both ways.
    let before = maps.counters().expect("counters");
    bump(&mut maps);
    expect_all(&mut pairs, false, DENY_WAIT, "rule deleted, bumped");
    let c = maps.counters().expect("counters").since(&before);
    assert!(c.get(Direction::Ingress, Reason::DenyPolicy) > 0);

    // Admitted again: flows again (TCP delivers what was sent during the cut first).
    maps.set_rule(rule, allow).expect("rule again");
    bump(&mut maps);
    expect_all(&mut pairs, true, RETRANSMIT_WAIT, "admitted again");

    // The server isolated for egress with no rule: its replies are no new connections.
    set_endpoint(&mut maps, ips_b, 2, b_in | ep_flags::ISOLATED_EGRESS);
    bump(&mut maps);
    expect_all(&mut pairs, true, OK_WAIT, "server isolated for egress");

    // The client isolated for egress with no rule: cut.
    set_endpoint(&mut maps, ips_a, 1, ep_flags::ISOLATED_EGRESS);
    bump(&mut maps);
    expect_all(&mut pairs, false, DENY_WAIT, "client isolated for egress");
    set_endpoint(&mut maps, ips_a, 1, 0);
    bump(&mut maps);
    expect_all(&mut pairs, true, RETRANSMIT_WAIT, "client open again");

    // `Keep`: the epoch never moves, so a refusing policy leaves them running.
    maps.set_established(Established::Keep);
    maps.delete_rule(&rule).expect("delete rule");
    bump(&mut maps);
    expect_all(&mut pairs, true, OK_WAIT, "keep");
}

/// The agent binary's `--established`: with the default (`revalidate`) an open connection
/// stops as soon as a change that refuses it is enforced; with `keep` it runs on.
#[test]
fn the_agents_established_flag_decides_what_a_change_does_to_open_connections() {
    use crate::restart_common::{Agent, TempDir, ingress_from, pod, uninstall, write_manifests};
    use policy_testkit::testbed::{TcpClient, TcpEchoServer};
    const A: usize = 0;
    const B: usize = 1;
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    bed.add_pod().expect("pod a");
    bed.add_pod().expect("pod b");
    let to_b = SocketAddr::new(bed.hosts[B].ip(false), TCP_PORT);
    let _server = TcpEchoServer::start(&bed.hosts[B].ns, to_b).expect("server on B");
    for (n, (flag, survives)) in [(&[][..], false), (&["--established", "keep"][..], true)]
        .into_iter()
        .enumerate()
    {
        let dir = TempDir::new("established");
        let fs = PrivateBpffs::mount().expect("private bpffs");
        let pods = [pod(&bed, A, "a"), pod(&bed, B, "b")];
        let admits = ingress_from("b-in", "b", "a", TCP_PORT, UDP_PORT);
        let generation = write_manifests(
            &dir.manifests(),
            &[pods[0].clone(), pods[1].clone(), admits],
        );
        let mut agent = Agent::start(&bed, &dir, &fs, flag, n as u32);
        agent.wait_generation(&dir.status(), generation, 2);
        let mut open = TcpClient::connect(&bed.hosts[A].ns, to_b, OK_WAIT).expect("connect");
        open.round_trip(b"admitted")
            .expect("round trip while admitted");
        // b now admits app=c only.
        let refuses = ingress_from("b-in", "b", "c", TCP_PORT, UDP_PORT);
        let generation = write_manifests(
            &dir.manifests(),
            &[pods[0].clone(), pods[1].clone(), refuses],
        );
        agent.wait_generation(&dir.status(), generation, 2);
        let new = TcpClient::connect(&bed.hosts[A].ns, to_b, DENY_WAIT);
        assert!(new.is_err(), "{flag:?}: a new connection is refused");
        let r = open.round_trip(b"after the change");
        assert_eq!(
            r.is_ok(),
            survives,
            "{flag:?}: the open connection after the change: {r:?}"
        );
        drop(agent);
        uninstall(&bed, &fs);
    }
}
