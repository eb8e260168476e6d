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

use crate::restart_common;

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

/// The Service ClusterIP range the agent is told about, and two Services in it: one whose
/// backend is the node itself (a hostNetwork pod, an API server endpoint), one backed by b.
const SERVICE_RANGES: &[&str] = &["--service-cidr", "198.18.128.0/17"];
const VIP_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 11);
const VIP_PORT: u16 = 80;
const NODE_PORT: u16 = 7777;
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
                // a may send only to b (TCP 8080): not to the node, whatever Service fronts it.
                json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "a-to-b", "namespace": "default"},
                    "spec": {
                        "podSelector": {"matchLabels": {"app": "a"}},
                        "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                                    "ports": [{"protocol": "TCP", "port": 8080}]}],
                    },
                }),
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
        services(&bed, b);
        let mut agent = Agent::start(&bed, &dir, &fs, SERVICE_RANGES, 0);
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
    fn arrivals(&self, from: usize, to: usize, frame: Vec<u8>, marker: &[u8]) -> usize {
        self.arrivals_all(from, to, vec![frame], marker)
    }

    /// [`Self::arrivals`] of a sequence of frames sent together, `COPIES` times.
    fn arrivals_all(&self, from: usize, to: usize, frames: Vec<Vec<u8>>, marker: &[u8]) -> usize {
        let node_mac = mac_of(&self.bed.node, &self.bed.hosts[from].host_if).expect("node mac");
        let own_mac = mac_of(self.ns(from), "eth0").expect("own mac");
        let frames: Vec<Vec<u8>> = frames
            .into_iter()
            .map(|mut f| {
                address_frame(&mut f, node_mac, own_mac);
                fix_ipv4_checksum(&mut f);
                f
            })
            .collect();
        let tx = RawLink::open(self.ns(from), "eth0").expect("raw socket (sender)");
        let rx = RawLink::open(self.ns(to), "eth0").expect("raw socket (receiver)");
        for _ in 0..COPIES {
            for f in &frames {
                tx.send(f).expect("send");
            }
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
    format!("{tag}-netpol-adversary-{}", std::process::id()).into_bytes()
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
fn icmp_error(ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    b.extend_from_slice(&rest);
    b.extend_from_slice(quoted);
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

/// kube-proxy's DNAT for the two Services, in the node namespace.
fn services(bed: &Testbed, b: usize) {
    let node = policy_testkit::testbed::NODE_IPV4;
    for (vip, backend, port) in [
        (VIP_NODE, node, NODE_PORT),
        (VIP_B, bed.hosts[b].ipv4, 8080),
    ] {
        policy_testkit::testbed::dnat(&bed.node, vip.into(), VIP_PORT, backend.into(), port)
            .expect("iptables DNAT rule (needs iptables)");
    }
}

/// a's egress admits b only. Through a Service backed by b it connects (judged at b's
/// hook after DNAT); through one backed by the node itself, whose translated packet meets
/// no TC hook, it does not (judged in netfilter on the real destination). b, whose egress
/// is open, reaches the node's Service: the backend is there.
fn service_egress_is_judged_on_the_real_destination(t: &Bed, a: usize, b: usize) {
    use policy_testkit::testbed::{TcpEchoServer, tcp_echo};
    use std::net::SocketAddr;
    let node = policy_testkit::testbed::NODE_IPV4;
    let _on_node = TcpEchoServer::start(&t.bed.node, SocketAddr::new(node.into(), NODE_PORT))
        .expect("a server on the node (hostNetwork)");
    let _on_b = TcpEchoServer::start(t.ns(b), SocketAddr::new(t.v4(b).into(), 8080))
        .expect("a server on b");
    let to_node = SocketAddr::new(VIP_NODE.into(), VIP_PORT);
    let to_b = SocketAddr::new(VIP_B.into(), VIP_PORT);
    tcp_echo(t.ns(b), to_node, Duration::from_secs(3))
        .expect("control: b reaches the node's Service");
    tcp_echo(t.ns(a), to_b, Duration::from_secs(3)).expect("a reaches b's Service");
    let before = t.counted(Reason::DenyPolicy);
    for _ in 0..3 {
        assert!(
            tcp_echo(t.ns(a), to_node, Duration::from_millis(700)).is_err(),
            "a reached the node through a Service its egress does not admit"
        );
    }
    assert!(
        t.counted(Reason::DenyPolicy) > before,
        "the refused translated packets are counted"
    );
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
    fragments_and_header_chains(&t, a, b, c);
    replies_without_a_connection(&t, a, c);
    smuggled_vlan_tags(&t, a, c);
    service_egress_is_judged_on_the_real_destination(&t, a, b);
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
                let body = icmp_error(2, 0, 1280u32.to_be_bytes(), &quoted);
                eth(0x86DD, &ipv6(t.v6(src_host), t.v6(c), 58, &body))
            } else {
                let quoted = ipv4(t.v4(c), t.v4(x), UDP, &quoted_l4);
                let body = icmp_error(3, 4, [0, 0, 2, 0x28], &quoted);
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

/// An IPv4 fragment of `body` (the L4 header and payload of a whole datagram): `offset` in
/// 8-byte units, `len` bytes of it, `more` set when fragments follow.
fn fragment4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    body: &[u8],
    (offset, len, more): (usize, usize, bool),
) -> Vec<u8> {
    let part = &body[offset * 8..(offset * 8 + len).min(body.len())];
    let mut p = ipv4(src, dst, proto, part);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let frag = (offset as u16 & 0x1fff) | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    eth(0x0800, &p)
}

/// An IPv6 fragment header (next header, offset in 8-byte units, more, id).
fn frag6_header(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// Fragments and extension-header chains from b (whom c admits) and a (whom c does not):
/// a first fragment too small for its TCP header, fragments whose first fragment never
/// passed, a chain of more extension headers than the datapath walks, and an IPv6 first
/// fragment whose upper-layer header is left to a later fragment. None arrives; b's whole
/// fragmented datagram does.
fn fragments_and_header_chains(t: &Bed, a: usize, b: usize, c: usize) {
    // Control: b's UDP datagram in two fragments, both arrive.
    let m = marker("frag-control");
    let body = l4(UDP, 40000, 9090, &m);
    let first = fragment4(t.v4(b), t.v4(c), UDP, 0x1111, &body, (0, 16, true));
    let second = fragment4(t.v4(b), t.v4(c), UDP, 0x1111, &body, (2, 400, false));
    // (Sent together: the node may reassemble before forwarding, where conntrack runs.)
    let got = t.arrivals_all(b, c, vec![first, second], &m[..8]);
    assert!(got >= 1, "control: b's fragmented datagram arrives ({got})");
    // a's datagram whose first fragment c's policy refuses: the later fragments carry the
    // marker, and no first fragment of theirs ever passed.
    let m = marker("frag-unseen");
    let mut body = l4(UDP, 40000, 9090, &[0u8; 16]);
    body.extend_from_slice(&m);
    let later = fragment4(t.v4(a), t.v4(c), UDP, 0x2222, &body, (3, 200, false));
    assert_eq!(
        t.arrivals(a, c, later, &m),
        0,
        "a's non-first fragment, id never seen"
    );
    // b's first fragment cut inside its TCP header (8 bytes: ports, no flags): undecidable.
    let m = marker("frag-tiny");
    let mut body = l4(TCP, 40000, 8080, &[]);
    body[0..2].copy_from_slice(&47_123u16.to_be_bytes());
    body.extend_from_slice(&m);
    let tiny = fragment4(t.v4(b), t.v4(c), TCP, 0x3333, &body, (0, 8, true));
    let rest = fragment4(t.v4(b), t.v4(c), TCP, 0x3333, &body, (1, 400, false));
    assert_eq!(t.arrivals(b, c, tiny, &body[..8]), 0, "tiny first fragment");
    assert_eq!(
        t.arrivals(b, c, rest, &m),
        0,
        "the rest of a tiny first fragment"
    );
    // IPv6: seven destination-options headers before UDP (more than are walked).
    let m = marker("ext-long");
    let mut chain = l4(UDP, 40000, 9090, &m);
    for i in 0..7 {
        let next = if i == 0 { UDP } else { 60 };
        let mut h = vec![next, 0, 1, 4, 0, 0, 0, 0];
        h.extend_from_slice(&chain);
        chain = h;
    }
    let f = eth(0x86DD, &ipv6(t.v6(b), t.v6(c), 60, &chain));
    assert_eq!(t.arrivals(b, c, f, &m), 0, "seven extension headers");
    // IPv6: a first fragment holding only a destination-options header; UDP (with a's
    // marker) in the second fragment.
    let m = marker("ext-later");
    let udp = l4(UDP, 40000, 9090, &m);
    let mut first = frag6_header(60, 0, true, 0x4444);
    first.extend_from_slice(&dest_options(UDP, &m));
    let mut second = frag6_header(60, 1, false, 0x4444);
    second.extend_from_slice(&udp);
    for (i, body) in [first, second].into_iter().enumerate() {
        let f = eth(0x86DD, &ipv6(t.v6(a), t.v6(c), 44, &body));
        assert_eq!(
            t.arrivals(a, c, f, &m),
            0,
            "L4 header in a later fragment ({i})"
        );
    }
}

/// A destination-options header carrying `data` in a PadN option (zero bytes after it
/// are Pad1 options up to a multiple of 8).
fn dest_options(next: u8, data: &[u8]) -> Vec<u8> {
    let total = (4 + data.len()).div_ceil(8) * 8;
    let mut h = vec![next, (total / 8 - 1) as u8, 1, data.len() as u8];
    h.extend_from_slice(data);
    h.resize(total, 0);
    h
}

/// ACK, RST and UDP "replies" from a to c with no connection behind them: judged as new
/// flows, which c's policy refuses.
fn replies_without_a_connection(t: &Bed, a: usize, c: usize) {
    for (tag, proto, flags) in [("ack", TCP, 0x10u8), ("rst", TCP, 0x04), ("udp", UDP, 0)] {
        let m = marker(&format!("reply-{tag}"));
        let mut body = l4(proto, 8080, 40000, &m);
        if proto == TCP {
            body[13] = flags;
        }
        let f = eth(0x0800, &ipv4(t.v4(a), t.v4(c), proto, &body));
        assert_eq!(t.arrivals(a, c, f, &m), 0, "{tag} without a connection");
    }
}

/// 802.1Q inside 802.1ad (QinQ), and a lone 802.1Q tag, around a packet from a to c: the
/// kernel takes the outer tag off; one left in the data is never looked through.
fn smuggled_vlan_tags(t: &Bed, a: usize, c: usize) {
    let m = marker("qinq");
    let ip = ipv4(t.v4(a), t.v4(c), UDP, &l4(UDP, 40000, 9090, &m));
    let mut inner = vec![0, 7, 0x08, 0x00];
    inner.extend_from_slice(&ip);
    let mut outer = vec![0, 5, 0x81, 0x00];
    outer.extend_from_slice(&inner);
    assert_eq!(t.arrivals(a, c, eth(0x88A8, &outer), &m), 0, "QinQ from a");
    assert_eq!(
        t.arrivals(a, c, eth(0x8100, &inner), &m),
        0,
        "802.1Q from a"
    );
}
