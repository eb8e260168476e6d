//! Real packets through the loaded programs in a node namespace built for the test:
//! (i) egress through a Service ClusterIP, DNATed by iptables in the node namespace as
//! kube-proxy does, is judged on the backend; (ii) a pod in the maps is isolated from its
//! first packet even though its own veth has no program, against a pod client and an
//! external host hammering it, until a rule admits the client. Needs root, BPF, iptables and
//! namespaces: fails without them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use policy_agent::dataplane::{AttachMode, Dataplane, DataplaneMaps};
use policy_common::{
    Addr, CidrData, EndpointKey, EndpointValue, LpmKey, RuleKey, RuleValue, cidr_prefixlen,
    ep_flags, rule_flags,
};
use policy_testkit::testbed::{
    Netns, PrivateBpffs, TcpEchoServer, Testbed, UdpEchoServer, tcp_echo, udp_echo,
};

const OK_WAIT: Duration = Duration::from_secs(3);
const DENY_WAIT: Duration = Duration::from_millis(700);
const PORT: u16 = 8080;
const SET_IN: u32 = 40;
const SET_EG: u32 = 41;
const ID_CLIENT: u32 = 500;
/// ClusterIPs of the test's two Services (backends B and C).
const VIP_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 2);
const VIP_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 3);
const VIP_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 2, 2);
const VIP_C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 2, 3);
const SERVICE_V4: &str = "198.18.128.0/17";
const SERVICE_V6: &str = "fd00:18::2:0/112";

fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6_octets(v6.octets()),
    }
}

fn endpoint(maps: &mut DataplaneMaps, ips: [IpAddr; 2], id: u32, flags: u32) {
    for ip in ips {
        maps.set_local_endpoint(
            EndpointKey { addr: addr(ip) },
            EndpointValue {
                endpoint_id: id,
                ingress_policy_set: SET_IN,
                egress_policy_set: SET_EG,
                flags,
            },
        )
        .expect("endpoint");
    }
}

fn all() -> RuleValue {
    RuleValue {
        flags: rule_flags::ALL,
        ..Default::default()
    }
}

fn cidr_key(set: u32, net: &str) -> LpmKey<CidrData> {
    let net: ipnet::IpNet = net.parse().expect("cidr");
    let a = addr(net.network());
    LpmKey {
        prefixlen: cidr_prefixlen(a.is_v4(), net.prefix_len()),
        data: CidrData::new(set, a),
    }
}

fn assert_no_namespaces_left(names: Vec<String>) {
    for n in names {
        assert!(!Netns::exists(&n), "namespace {n} left behind");
    }
}

/// kube-proxy's iptables shape, reduced: the ClusterIP:port is DNATed to one backend in
/// PREROUTING (packets from pods) and OUTPUT (the node's own).
fn dnat(node: &Netns, vip: IpAddr, backend: IpAddr) {
    policy_testkit::testbed::dnat(node, vip, PORT, backend, PORT)
        .expect("iptables DNAT rule (needs iptables)");
}

/// The pod programs on `interfaces` (in the node namespace) and the test's Service ranges.
fn enforce_with_service_ranges(
    bed: &Testbed,
    dp: &mut Dataplane,
    maps: &mut DataplaneMaps,
    interfaces: &[&str],
) {
    bed.node
        .enter(|| {
            for i in interfaces {
                dp.attach(i, AttachMode::Auto).expect("attach");
            }
        })
        .expect("enter node namespace");
    for (i, h) in bed.hosts.iter().enumerate() {
        if interfaces.contains(&h.host_if.as_str()) {
            bed.bind(i, maps).expect("bind");
        }
    }
    maps.set_service_cidrs(&[
        SERVICE_V4.parse().expect("v4"),
        SERVICE_V6.parse().expect("v6"),
    ])
    .expect("service ranges");
}

#[test]
fn service_egress_is_judged_on_the_dnat_backend() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let b = bed.add_pod().expect("pod b");
    let c = bed.add_pod().expect("pod c");
    let names = bed.namespace_names();
    service_scenario(&bed, a, b, c);
    drop(bed);
    assert_no_namespaces_left(names);
}

fn service_scenario(bed: &Testbed, a: usize, b: usize, c: usize) {
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
    let mut maps = dp.take_maps().expect("maps");
    let (ha, hb, hc) = (&bed.hosts[a], &bed.hosts[b], &bed.hosts[c]);
    let _servers: Vec<_> = [hb, hc]
        .iter()
        .flat_map(|h| [false, true].map(|v6| (h, v6)))
        .map(|(h, v6)| {
            let at = SocketAddr::new(h.ip(v6), PORT);
            (
                TcpEchoServer::start(&h.ns, at).expect("tcp server"),
                UdpEchoServer::start(&h.ns, at).expect("udp server"),
            )
        })
        .collect();
    for v6 in [false, true] {
        let (vb, vc): (IpAddr, IpAddr) = if v6 {
            (VIP_B6.into(), VIP_C6.into())
        } else {
            (VIP_B4.into(), VIP_C4.into())
        };
        dnat(&bed.node, vb, hb.ip(v6));
        dnat(&bed.node, vc, hc.ip(v6));
    }
    let vip = |v6: bool, to_b: bool| -> SocketAddr {
        let ip: IpAddr = match (v6, to_b) {
            (false, true) => VIP_B4.into(),
            (false, false) => VIP_C4.into(),
            (true, true) => VIP_B6.into(),
            (true, false) => VIP_C6.into(),
        };
        SocketAddr::new(ip, PORT)
    };
    let probe = |to_b: bool, want: bool, what: &str| {
        for v6 in [false, true] {
            let wait = if want { OK_WAIT } else { DENY_WAIT };
            let t = tcp_echo(&ha.ns, vip(v6, to_b), wait);
            assert_eq!(t.is_ok(), want, "{what}: TCP v6={v6} via ClusterIP: {t:?}");
            let u = udp_echo(&ha.ns, vip(v6, to_b), wait);
            assert_eq!(u.is_ok(), want, "{what}: UDP v6={v6} via ClusterIP: {u:?}");
        }
    };
    // The Services work before any enforcement.
    probe(true, true, "no programs");
    probe(false, true, "no programs");

    enforce_with_service_ranges(
        bed,
        &mut dp,
        &mut maps,
        &[&ha.host_if, &hb.host_if, &hc.host_if],
    );
    endpoint(&mut maps, [hb.ip(false), hb.ip(true)], 2, 0);
    endpoint(&mut maps, [hc.ip(false), hc.ip(true)], 3, 0);
    // A's egress admits the whole ClusterIP range and B's addresses, not C's.
    endpoint(
        &mut maps,
        [ha.ip(false), ha.ip(true)],
        1,
        ep_flags::ISOLATED_EGRESS | ep_flags::EGRESS_HAS_CIDR_RULES,
    );
    for net in [
        SERVICE_V4.to_string(),
        SERVICE_V6.to_string(),
        format!("{}/32", hb.ip(false)),
        format!("{}/128", hb.ip(true)),
    ] {
        maps.set_cidr_rule(cidr_key(SET_EG, &net), all())
            .expect("cidr rule");
    }
    probe(true, true, "backend B admitted");
    probe(
        false,
        false,
        "backend C refused though its ClusterIP's range is admitted",
    );

    // A rule naming only the backend (as a podSelector egress rule would): still admitted
    // through the Service, since the decision waits for the backend.
    for net in [SERVICE_V4, SERVICE_V6] {
        maps.delete_cidr_rule(cidr_key(SET_EG, net))
            .expect("delete cidr rule");
    }
    probe(true, true, "only backend B named");
    probe(false, false, "only backend B named");
    // Without the service ranges A's own hook judges the ClusterIP, which no rule names:
    // the ranges are what lets a backend-only rule work.
    maps.set_service_cidrs(&[]).expect("no ranges");
    probe(true, false, "no service ranges: judged on the ClusterIP");
    maps.set_service_cidrs(&[
        SERVICE_V4.parse().expect("v4"),
        SERVICE_V6.parse().expect("v6"),
    ])
    .expect("service ranges");
    probe(true, true, "ranges back");
    // An egress rule naming C admits it through its Service.
    for net in [
        format!("{}/32", hc.ip(false)),
        format!("{}/128", hc.ip(true)),
    ] {
        maps.set_cidr_rule(cidr_key(SET_EG, &net), all())
            .expect("cidr rule");
    }
    probe(false, true, "backend C admitted");
    drop(dp);
}

#[test]
fn a_known_pod_is_isolated_from_its_first_packet() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let client = bed.add_pod().expect("client pod");
    let server = bed.add_pod().expect("server pod");
    let ext = bed.add_external().expect("external host");
    let names = bed.namespace_names();
    first_packet_scenario(&bed, client, server, ext);
    drop(bed);
    assert_no_namespaces_left(names);
}

/// Connects from `ns` to `to` in `threads` threads for `dur`; the number of successes.
fn hammer(
    ns: &Netns,
    to: &[SocketAddr],
    threads: usize,
    dur: Duration,
    wait: Duration,
) -> (usize, usize) {
    let ok = AtomicUsize::new(0);
    let tries = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (ok, tries, stop) = (&ok, &tries, &stop);
            let target = to[t % to.len()];
            s.spawn(move || {
                let end = Instant::now() + dur;
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    tries.fetch_add(1, Ordering::Relaxed);
                    if tcp_echo(ns, target, wait).is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (ok.into_inner(), tries.into_inner())
}

fn first_packet_scenario(bed: &Testbed, client: usize, server: usize, ext: usize) {
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
    let mut maps = dp.take_maps().expect("maps");
    let (hc, hs, he) = (&bed.hosts[client], &bed.hosts[server], &bed.hosts[ext]);
    let targets: Vec<SocketAddr> = [false, true]
        .map(|v6| SocketAddr::new(hs.ip(v6), PORT))
        .to_vec();
    let _servers: Vec<_> = targets
        .iter()
        .map(|t| TcpEchoServer::start(&hs.ns, *t).expect("tcp server"))
        .collect();
    for t in &targets {
        tcp_echo(&hc.ns, *t, OK_WAIT).expect("reachable before enforcement");
        tcp_echo(&he.ns, *t, OK_WAIT).expect("reachable from outside before enforcement");
    }
    // The server is in the maps, isolated for ingress with no rule, but its veth has NO
    // program: only the client's hook and the uplink's stand between.
    endpoint(&mut maps, [hc.ip(false), hc.ip(true)], 1, 0);
    endpoint(
        &mut maps,
        [hs.ip(false), hs.ip(true)],
        2,
        ep_flags::ISOLATED_INGRESS | ep_flags::INGRESS_HAS_IDENTITY_RULES,
    );
    for ip in [hc.ip(false), hc.ip(true)] {
        maps.set_identity(addr(ip), ID_CLIENT).expect("ipcache");
    }
    let (uplink, pod) = bed
        .node
        .enter(|| {
            let u = dp
                .attach_uplink(&he.host_if, AttachMode::Auto)
                .expect("attach uplink");
            let p = dp
                .attach(&hc.host_if, AttachMode::Auto)
                .expect("attach client");
            (u, p)
        })
        .expect("enter node namespace");
    bed.bind(client, &mut maps).expect("bind client");
    assert!(
        bed.node.ip(&["link", "show", &hs.host_if]).is_ok(),
        "server veth exists"
    );

    let dur = Duration::from_millis(1500);
    let ((c_ok, c_tries), (e_ok, e_tries)) = std::thread::scope(|s| {
        let c = s.spawn(|| hammer(&hc.ns, &targets, 4, dur, Duration::from_millis(300)));
        let e = s.spawn(|| hammer(&he.ns, &targets, 4, dur, Duration::from_millis(300)));
        (
            c.join().expect("client hammer"),
            e.join().expect("external hammer"),
        )
    });
    assert!(c_tries > 0 && e_tries > 0);
    assert_eq!(
        c_ok, 0,
        "client connects to a pod isolated from its first packet ({c_tries} tries)"
    );
    assert_eq!(
        e_ok, 0,
        "external connects to a pod isolated from its first packet ({e_tries} tries)"
    );

    // A rule admits the client: its connects succeed, the external host stays out.
    maps.set_rule(
        RuleKey {
            policy_set: SET_IN,
            identity: ID_CLIENT,
        },
        all(),
    )
    .expect("rule");
    let (c_ok, c_tries) = hammer(&hc.ns, &targets, 2, Duration::from_millis(600), OK_WAIT);
    assert!(
        c_ok > 0 && c_ok == c_tries,
        "client admitted: {c_ok}/{c_tries} connects succeeded"
    );
    for t in &targets {
        assert!(
            tcp_echo(&he.ns, *t, DENY_WAIT).is_err(),
            "external still refused"
        );
    }
    // The node's own traffic through the uplink is untouched (no endpoint involved).
    let ext_targets: Vec<SocketAddr> = [false, true]
        .map(|v6| SocketAddr::new(he.ip(v6), PORT + 1))
        .to_vec();
    let _ext_servers: Vec<_> = ext_targets
        .iter()
        .map(|t| TcpEchoServer::start(&he.ns, *t).expect("tcp server"))
        .collect();
    for t in &ext_targets {
        tcp_echo(&bed.node, *t, OK_WAIT).expect("node -> external through the uplink");
    }
    let node_targets: Vec<SocketAddr> = [
        SocketAddr::new(policy_testkit::testbed::NODE_IPV4.into(), PORT + 2),
        SocketAddr::new(policy_testkit::testbed::NODE_IPV6.into(), PORT + 2),
    ]
    .to_vec();
    let _node_servers: Vec<_> = node_targets
        .iter()
        .map(|t| TcpEchoServer::start(&bed.node, *t).expect("tcp server"))
        .collect();
    for t in &node_targets {
        tcp_echo(&he.ns, *t, OK_WAIT).expect("external -> node through the uplink");
    }
    dp.detach(uplink).expect("detach uplink");
    dp.detach(pod).expect("detach pod");
}

/// A TCP connection from `src` (SO_REUSEADDR, so a port whose last connection is in
/// TIME_WAIT can be bound again) to `to`, made inside `ns`.
fn connect_from(
    ns: &Netns,
    src: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    fn raw(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage; the family's struct fits in it.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    ns.enter(|| {
        let family = if src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket calls on a descriptor owned here (wrapped in TcpStream at once).
        unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stream = std::net::TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            let tv = libc::timeval {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_usec: timeout.subsec_micros() as libc::suseconds_t,
            };
            let opts = [
                (
                    libc::SO_REUSEADDR,
                    &one as *const _ as *const libc::c_void,
                    size_of_val(&one),
                ),
                (
                    libc::SO_SNDTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    size_of_val(&tv),
                ),
            ];
            for (opt, val, len) in opts {
                if libc::setsockopt(fd, libc::SOL_SOCKET, opt, val, len as libc::socklen_t) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let (s, l) = raw(src);
            if libc::bind(fd, &s as *const _ as *const libc::sockaddr, l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (d, l) = raw(to);
            if libc::connect(fd, &d as *const _ as *const libc::sockaddr, l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            stream.set_read_timeout(Some(timeout))?;
            Ok(stream)
        }
    })?
}

fn round_trip(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    if buf != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// A client port whose direct connection to the backend just ended (its conntrack entry in
/// TIME_WAIT) is used again towards the backend's ClusterIP: netfilter's DNAT must move the
/// source port to keep tuples unique, and the backend's hook, seeing a port the client's
/// hook never saw, must still grant the client's virtual tuple (the SYN's sequence number
/// survives). The client is isolated both ways, so an ungranted virtual tuple would drop the
/// reverse-NATed SYN-ACK. Found as a rare failure of the upstream suite via Service.
#[test]
fn a_service_connection_from_a_port_just_used_directly_still_gets_its_replies() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let b = bed.add_pod().expect("pod b");
    let names = bed.namespace_names();
    {
        let fs = PrivateBpffs::mount().expect("private bpffs");
        let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
        let mut maps = dp.take_maps().expect("maps");
        let (ha, hb) = (&bed.hosts[a], &bed.hosts[b]);
        let _servers: Vec<_> = [false, true]
            .map(|v6| {
                TcpEchoServer::start(&hb.ns, SocketAddr::new(hb.ip(v6), PORT)).expect("server")
            })
            .into();
        dnat(&bed.node, VIP_B4.into(), hb.ip(false));
        dnat(&bed.node, VIP_B6.into(), hb.ip(true));
        enforce_with_service_ranges(&bed, &mut dp, &mut maps, &[&ha.host_if, &hb.host_if]);
        endpoint(&mut maps, [hb.ip(false), hb.ip(true)], 2, 0);
        // A: isolated both ways; egress admits B's addresses only; no ingress rule at all.
        endpoint(
            &mut maps,
            [ha.ip(false), ha.ip(true)],
            1,
            ep_flags::ISOLATED_EGRESS
                | ep_flags::EGRESS_HAS_CIDR_RULES
                | ep_flags::ISOLATED_INGRESS,
        );
        for net in [
            format!("{}/32", hb.ip(false)),
            format!("{}/128", hb.ip(true)),
        ] {
            maps.set_cidr_rule(cidr_key(SET_EG, &net), all())
                .expect("cidr rule");
        }
        for (i, v6) in [false, true].into_iter().enumerate() {
            let src = SocketAddr::new(ha.ip(v6), 47000 + i as u16);
            let vip: IpAddr = if v6 { VIP_B6.into() } else { VIP_B4.into() };
            let mut direct = connect_from(&ha.ns, src, SocketAddr::new(hb.ip(v6), PORT), OK_WAIT)
                .expect("direct connection A -> B");
            round_trip(&mut direct, b"direct").expect("direct round trip");
            // A closes first: A's socket and both conntrack entries enter TIME_WAIT.
            drop(direct);
            std::thread::sleep(Duration::from_millis(100));
            let mut via = connect_from(&ha.ns, src, SocketAddr::new(vip, PORT), OK_WAIT)
                .unwrap_or_else(|e| {
                    panic!("v6={v6}: the same port towards B's ClusterIP must connect: {e}")
                });
            round_trip(&mut via, b"via the ClusterIP")
                .unwrap_or_else(|e| panic!("v6={v6}: round trip via the ClusterIP: {e}"));
        }
    }
    drop(bed);
    assert_no_namespaces_left(names);
}
