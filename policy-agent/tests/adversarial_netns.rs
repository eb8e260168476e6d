//! The adversary's layer: a compromised pod (root in its own namespace, crafting any frame)
//! and a host outside the node try to get packets past the policy, with real frames put on
//! their links by raw sockets and counted where they would arrive (the victim's own link),
//! through the real agent (standalone, the manifests below) and its programs. For each
//! attack the same frame from the rightful sender is the control: it arrives, so a frame
//! that does not arrive was stopped by the policy, not by the test bed. Needs root, BPF and
//! namespaces: fails without them.
//!
//! The node namespace has reverse-path filtering off (as with many CNIs): the datapath's own
//! binding of addresses to pod interfaces is what stops spoofing here.

#[path = "restart_common/mod.rs"]
mod restart_common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use policy_common::Reason;
use policy_testkit::testbed::{
    Netns, PrivateBpffs, RawLink, Testbed, TunDevice, address_frame, fix_ipv4_checksum, mac_of,
};
use restart_common::{Agent, TempDir, ingress_from, pod, write_manifests};
use serde_json::json;

/// How many copies of each attack frame are sent; none may arrive.
const COPIES: usize = 10;
/// How long the victim's link is watched after a burst.
const WATCH: Duration = Duration::from_millis(600);

const TCP: u8 = 6;
const UDP: u8 = 17;

/// One bed for the whole file: pods a (the attacker), b (whom a impersonates), c (the
/// victim: its ingress admits only b), and x, a host outside the node; the agent enforcing.
struct Bed {
    bed: Testbed,
    a: usize,
    b: usize,
    c: usize,
    x: usize,
    fs: PrivateBpffs,
    tun: TunDevice,
    _dir: TempDir,
    _agent: Agent,
}

impl Bed {
    fn new() -> Bed {
        let mut bed = Testbed::new().expect("node namespace (needs root)");
        // Veths made after this inherit it: the datapath alone must stop the spoofing.
        bed.node
            .sysctl(&[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ])
            .expect("rp_filter off");
        let a = bed.add_pod().expect("pod a");
        let b = bed.add_pod().expect("pod b");
        let c = bed.add_pod().expect("pod c");
        let x = bed.add_external().expect("external x");
        // An L3 uplink, there before the agent starts (it attaches to every non-pod link).
        let tun = TunDevice::create(&bed.node, "tun0").expect("tun device");
        let dir = TempDir::new("adversary");
        let fs = PrivateBpffs::mount().expect("private bpffs");
        let generation = write_manifests(
            &dir.manifests(),
            &[
                pod(&bed, a, "a"),
                pod(&bed, b, "b"),
                pod(&bed, c, "c"),
                ingress_from("c-from-b", "c", "b", 8080, 9090),
                // x (outside) may reach c too: an external peer for c's own flows.
                json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "c-from-x", "namespace": "default"},
                    "spec": {
                        "podSelector": {"matchLabels": {"app": "c"}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "198.19.0.0/16"}},
                                              {"ipBlock": {"cidr": "fd00:19::/64"}}]}],
                    },
                }),
            ],
        );
        let mut agent = Agent::start(&bed, &dir, &fs, &[], 0);
        agent.wait_generation(&dir.status(), generation, 3);
        Bed {
            bed,
            a,
            b,
            c,
            x,
            fs,
            tun,
            _dir: dir,
            _agent: agent,
        }
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.bed.hosts[i].ns
    }
    fn v4(&self, i: usize) -> Ipv4Addr {
        self.bed.hosts[i].ipv4
    }
    fn v6(&self, i: usize) -> Ipv6Addr {
        self.bed.hosts[i].ipv6
    }

    /// Sends `frame` `COPIES` times from host `from`'s link (addressed to the node's side
    /// of it) and counts the copies that arrive on host `to`'s link.
    fn arrivals(&self, from: usize, to: usize, mut frame: Vec<u8>, marker: &[u8]) -> usize {
        let node_mac = mac_of(&self.bed.node, &self.bed.hosts[from].host_if).expect("node mac");
        let own_mac = mac_of(self.ns(from), "eth0").expect("own mac");
        address_frame(&mut frame, node_mac, own_mac);
        fix_ipv4_checksum(&mut frame);
        let tx = RawLink::open(self.ns(from), "eth0").expect("raw socket (sender)");
        let rx = RawLink::open(self.ns(to), "eth0").expect("raw socket (receiver)");
        for _ in 0..COPIES {
            tx.send(&frame).expect("send");
        }
        rx.count_received(marker, WATCH).expect("receive")
    }

    /// The packets counted for `reason` (both directions) so far.
    fn counted(&self, reason: Reason) -> u64 {
        let s = policy_agent::observe::status::collect(self.fs.path()).expect("status");
        s.counters
            .iter()
            .filter(|c| c.reason == reason.as_str() && c.verdict == verdict_of(reason))
            .map(|c| c.packets)
            .sum()
    }
}

fn verdict_of(r: Reason) -> &'static str {
    if r.is_allow() { "allow" } else { "deny" }
}

/// A marker unique to one attack, carried in the payload.
fn marker(tag: &str) -> Vec<u8> {
    format!("netpol-adversary-{tag}-{}", std::process::id()).into_bytes()
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn l4(proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = match proto {
        TCP => {
            let mut t = vec![0u8; 20];
            t[12] = 5 << 4;
            // A bare ACK with data: a "reply" or a replay into a connection.
            t[13] = 0x18;
            t[14..16].copy_from_slice(&65535u16.to_be_bytes());
            t
        }
        _ => {
            let mut u = vec![0u8; 8];
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u
        }
    };
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(body);
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(body);
    h
}

fn frame4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: u16, m: &[u8]) -> Vec<u8> {
    eth(0x0800, &ipv4(src, dst, proto, &l4(proto, 40000, dport, m)))
}

fn frame6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, dport: u16, m: &[u8]) -> Vec<u8> {
    eth(0x86DD, &ipv6(src, dst, proto, &l4(proto, 40000, dport, m)))
}

/// An ICMP(v6) error (type, code, the 4 bytes after the checksum) quoting `quoted`.
fn icmp_error(v6: bool, ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    b.extend_from_slice(&rest);
    b.extend_from_slice(quoted);
    let _ = v6;
    b
}

/// c's packets from outside that enter the node on an L3 device (a tun: no Ethernet
/// header, as from a VPN or WireGuard): from an external address they arrive (c admits
/// 198.19.0.0/16 and fd00:19::/64); from b's, a local pod's, they are spoofed, which the
/// L3 uplink program must parse the packet to see.
fn spoofed_sources_through_an_l3_device(t: &Bed, b: usize, c: usize) {
    let rx = RawLink::open(t.ns(c), "eth0").expect("raw socket");
    let outside4 = Ipv4Addr::new(198, 19, 9, 9);
    let outside6: Ipv6Addr = "fd00:19::9:9".parse().expect("v6");
    for v6 in [false, true] {
        for (src_is_b, tag) in [(false, "control"), (true, "spoof")] {
            let m = marker(&format!("tun-{tag}-{v6}"));
            let packet = if v6 {
                let src = if src_is_b { t.v6(b) } else { outside6 };
                ipv6(src, t.v6(c), UDP, &l4(UDP, 40000, 9090, &m))
            } else {
                let src = if src_is_b { t.v4(b) } else { outside4 };
                let mut f = eth(0x0800, &ipv4(src, t.v4(c), UDP, &l4(UDP, 40000, 9090, &m)));
                fix_ipv4_checksum(&mut f);
                f.split_off(14)
            };
            for _ in 0..COPIES {
                t.tun.inject(&packet).expect("inject");
            }
            let got = rx.count_received(&m, WATCH).expect("receive");
            let want = if src_is_b { 0 } else { COPIES };
            assert_eq!(got, want, "{tag} through the tun device (v6={v6})");
        }
    }
}

#[test]
fn the_adversary_gets_nothing_past_the_policy() {
    let t = Bed::new();
    let (a, b, c, x) = (t.a, t.b, t.c, t.x);
    spoofed_sources_from_a_pod(&t, a, b, c);
    spoofed_sources_from_outside(&t, b, c, x);
    spoofed_sources_through_an_l3_device(&t, b, c);
    forged_icmp_errors(&t, a, c, x);
    non_ip_frames_from_a_pod(&t, a);
}

/// a sends as b (whom c admits), over TCP and UDP, both families: nothing arrives; b's own
/// frames do.
fn spoofed_sources_from_a_pod(t: &Bed, a: usize, b: usize, c: usize) {
    let before = t.counted(Reason::DenySpoofed);
    for (proto, port) in [(TCP, 8080), (UDP, 9090)] {
        let m = marker(&format!("spoof4-{proto}"));
        let f = frame4(t.v4(b), t.v4(c), proto, port, &m);
        assert_eq!(
            t.arrivals(b, c, f.clone(), &m),
            COPIES,
            "control: b itself, v4 {proto}"
        );
        assert_eq!(t.arrivals(a, c, f, &m), 0, "a as b, v4 {proto}");
        let m = marker(&format!("spoof6-{proto}"));
        let f = frame6(t.v6(b), t.v6(c), proto, port, &m);
        assert_eq!(
            t.arrivals(b, c, f.clone(), &m),
            COPIES,
            "control: b itself, v6 {proto}"
        );
        assert_eq!(t.arrivals(a, c, f, &m), 0, "a as b, v6 {proto}");
    }
    // A link-local source used for anything but neighbour discovery.
    let m = marker("linklocal");
    let f = frame6("fe80::99".parse().expect("ll"), t.v6(c), UDP, 9090, &m);
    assert_eq!(t.arrivals(a, c, f, &m), 0, "a from a link-local source");
    let spoofed = t.counted(Reason::DenySpoofed) - before;
    assert!(
        spoofed >= (4 * COPIES + COPIES) as u64,
        "every spoofed frame counted as spoofed: {spoofed}"
    );
}

/// x (outside the node) sends as b, a local pod: the uplink drops it; x as itself arrives.
fn spoofed_sources_from_outside(t: &Bed, b: usize, c: usize, x: usize) {
    let m = marker("uplink-control");
    let f = frame4(t.v4(x), t.v4(c), UDP, 9090, &m);
    assert_eq!(t.arrivals(x, c, f, &m), COPIES, "control: x itself");
    for v6 in [false, true] {
        let m = marker(&format!("uplink-spoof-{v6}"));
        let f = if v6 {
            frame6(t.v6(b), t.v6(c), UDP, 9090, &m)
        } else {
            frame4(t.v4(b), t.v4(c), UDP, 9090, &m)
        };
        assert_eq!(t.arrivals(x, c, f, &m), 0, "x as b (v6={v6})");
    }
}

/// c has a live UDP flow to x. a, another local pod, forges errors quoting it (port
/// unreachable, fragmentation needed, packet too big): none arrives. x's own error does.
fn forged_icmp_errors(t: &Bed, a: usize, c: usize, x: usize) {
    for v6 in [false, true] {
        // c's flow to x, sent for real from c's socket.
        let (cip, xip) = if v6 {
            (t.v6(c).into(), t.v6(x).into())
        } else {
            (t.v4(c).into(), t.v4(x).into())
        };
        let sock = t
            .ns(c)
            .enter(move || std::net::UdpSocket::bind(std::net::SocketAddr::new(cip, 0)))
            .expect("enter")
            .expect("udp socket in c");
        let sport = sock.local_addr().expect("port").port();
        sock.send_to(b"flow", std::net::SocketAddr::new(xip, 9999))
            .expect("c -> x");
        std::thread::sleep(Duration::from_millis(50));
        let m = marker(&format!("icmp-{v6}"));
        let mut quoted_l4 = l4(UDP, sport, 9999, &m);
        quoted_l4.truncate(8);
        quoted_l4.extend_from_slice(&m);
        let error_from = |src_host: usize| -> Vec<u8> {
            if v6 {
                let quoted = ipv6(t.v6(c), t.v6(x), UDP, &quoted_l4);
                let body = icmp_error(true, 2, 0, 1280u32.to_be_bytes(), &quoted);
                eth(0x86DD, &ipv6(t.v6(src_host), t.v6(c), 58, &body))
            } else {
                let quoted = ipv4(t.v4(c), t.v4(x), UDP, &quoted_l4);
                let body = icmp_error(false, 3, 4, [0, 0, 2, 0x28], &quoted);
                eth(0x0800, &ipv4(t.v4(src_host), t.v4(c), 1, &body))
            }
        };
        assert_eq!(
            t.arrivals(x, c, error_from(x), &m),
            COPIES,
            "control: the flow's peer reports it (v6={v6})"
        );
        assert_eq!(
            t.arrivals(a, c, error_from(a), &m),
            0,
            "another local pod quoting c's flow (v6={v6})"
        );
    }
}

/// MPLS and other non-IP frames from a pod are dropped at its hook and counted.
fn non_ip_frames_from_a_pod(t: &Bed, a: usize) {
    let before = t.counted(Reason::DenyNonIp);
    let m = marker("mpls");
    let mut label = vec![0x00, 0x01, 0x01, 0x40];
    label.extend_from_slice(&ipv4(t.v4(a), t.v4(t.c), UDP, &l4(UDP, 1, 9090, &m)));
    // (The receiver is the attacker's own link: only the hook's counter can tell.)
    let _ = t.arrivals(a, a, eth(0x8847, &label), &m);
    let dropped = t.counted(Reason::DenyNonIp) - before;
    assert!(
        dropped >= COPIES as u64,
        "MPLS frames from a pod are dropped as non_ip: {dropped}"
    );
}
