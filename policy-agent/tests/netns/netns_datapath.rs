//! The agent's loader attaches the real programs to the host-side veths of two pods in a
//! node namespace; real TCP and UDP connections (IPv4 and IPv6) flip between allowed and
//! denied as map contents change at runtime, replies flow, and everything is removed
//! afterwards, on success and on failure. Needs root, BPF and namespaces: fails without.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use policy_agent::dataplane::{AttachMode, Dataplane, DataplaneMaps};
use policy_common::{
    Addr, CidrData, Direction, EndpointKey, EndpointValue, IDENTITY_HOST, LpmKey, PortRange,
    Reason, RuleKey, RuleValue, cidr_prefixlen, ep_flags, proto,
};
use policy_testkit::testbed::{
    NODE_IPV4, NODE_IPV6, Netns, PrivateBpffs, SctpResponder, TcpClient, TcpEchoServer, Testbed,
    UdpEchoServer, sctp_probe, tcp_echo, udp_echo,
};

pub(super) const OK_WAIT: Duration = Duration::from_secs(3);
/// Long enough for a dropped SYN or datagram to be a clear failure.
pub(super) const DENY_WAIT: Duration = Duration::from_millis(700);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9090;
const SCTP_PORT: u16 = 7000;
pub(super) const ID_A: u32 = 300;
pub(super) const SET_B_IN: u32 = 20;
const SET_A_EG: u32 = 21;

pub(super) fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6_octets(v6.octets()),
    }
}

struct Pods<'a> {
    bed: &'a Testbed,
    a: usize,
    b: usize,
}

impl Pods<'_> {
    fn to_b(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.bed.hosts[self.b].ip(v6), port)
    }
    fn a_ns(&self) -> &Netns {
        &self.bed.hosts[self.a].ns
    }
    /// SCTP (INIT / INIT-ACK) from A to B, both families.
    fn expect_sctp(&self, ok: bool, what: &str) {
        for v6 in [false, true] {
            let r = sctp_probe(
                self.a_ns(),
                self.to_b(v6, SCTP_PORT),
                if ok { OK_WAIT } else { DENY_WAIT },
            );
            assert_eq!(r.is_ok(), ok, "{what}: SCTP v6={v6}: {r:?}");
        }
    }
    /// TCP and UDP from A to B, both families: all must equal `want`.
    fn expect(&self, tcp: bool, udp: bool, what: &str) {
        for v6 in [false, true] {
            let wait = |ok: bool| if ok { OK_WAIT } else { DENY_WAIT };
            let t = tcp_echo(self.a_ns(), self.to_b(v6, TCP_PORT), wait(tcp));
            assert_eq!(t.is_ok(), tcp, "{what}: TCP v6={v6}: {t:?}");
            let u = udp_echo(self.a_ns(), self.to_b(v6, UDP_PORT), wait(udp));
            assert_eq!(u.is_ok(), udp, "{what}: UDP v6={v6}: {u:?}");
        }
    }
}

pub(super) fn set_endpoint(maps: &mut DataplaneMaps, ips: [IpAddr; 2], id: u32, flags: u32) {
    for ip in ips {
        maps.set_local_endpoint(
            EndpointKey { addr: addr(ip) },
            EndpointValue {
                endpoint_id: id,
                ingress_policy_set: SET_B_IN,
                egress_policy_set: SET_A_EG,
                flags,
            },
        )
        .expect("endpoint");
    }
}

pub(super) fn ranges(r: &[(u8, u16, u16)]) -> RuleValue {
    let mut v = RuleValue::default();
    for (i, (p, first, last)) in r.iter().enumerate() {
        v.ranges[i] = PortRange {
            first: *first,
            last: *last,
            proto: *p,
            _pad: [0; 3],
        };
    }
    v
}

#[test]
fn connections_follow_map_changes_at_runtime() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let b = bed.add_pod().expect("pod b");
    let names = bed.namespace_names();
    run_scenario(&bed, a, b);
    drop(bed);
    for n in names {
        assert!(!Netns::exists(&n), "namespace {n} left behind");
    }
}

fn run_scenario(bed: &Testbed, a: usize, b: usize) {
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
    let mut maps = dp.take_maps().expect("maps");
    let mut events = maps.take_events().expect("events");
    let (ha, hb) = (&bed.hosts[a], &bed.hosts[b]);
    let pods = Pods { bed, a, b };

    // Servers on B, both families, before any enforcement.
    let _servers = [false, true].map(|v6| {
        (
            TcpEchoServer::start(&hb.ns, pods.to_b(v6, TCP_PORT)).expect("tcp server"),
            UdpEchoServer::start(&hb.ns, pods.to_b(v6, UDP_PORT)).expect("udp server"),
        )
    });
    let _sctp = SctpResponder::start(&hb.ns, hb.ip(false), vec![SCTP_PORT]).expect("sctp v4");
    let _sctp6 = SctpResponder::start(&hb.ns, hb.ip(true), vec![SCTP_PORT]).expect("sctp v6");
    pods.expect(true, true, "before attaching");
    pods.expect_sctp(true, "before attaching");

    // The agent's loader attaches in the node namespace, to both pods' host veths.
    let (att_a, att_b) = bed
        .node
        .enter(|| {
            let x = dp.attach(&ha.host_if, AttachMode::Auto).expect("attach a");
            let y = dp.attach(&hb.host_if, AttachMode::Auto).expect("attach b");
            (x, y)
        })
        .expect("enter node namespace");
    // Kernel 6.6+ has TCX; older kernels take the clsact fallback.
    assert!(matches!(att_a.mode, AttachMode::Tcx | AttachMode::Netlink));
    assert_eq!(att_a.mode, att_b.mode);

    // Attached, but no address is bound to the veths yet: fail closed (anti-spoofing).
    pods.expect(false, false, "unbound interfaces");
    let counters0 = maps.counters().expect("counters");
    assert!(counters0.get(Direction::Egress, Reason::DenySpoofed) > 0);
    bed.bind(a, &mut maps).expect("bind a");
    bed.bind(b, &mut maps).expect("bind b");
    // Bound, but not endpoints yet: still closed.
    pods.expect(false, false, "unknown endpoints");
    let counters1 = maps.counters().expect("counters");
    assert!(counters1.get(Direction::Egress, Reason::DenyUnknownEndpoint) > 0);

    let ips_a = [ha.ip(false), ha.ip(true)];
    let ips_b = [hb.ip(false), hb.ip(true)];
    set_endpoint(&mut maps, ips_a, 1, 0);
    set_endpoint(&mut maps, ips_b, 2, 0);
    pods.expect(true, true, "endpoints, no isolation");

    // B isolated for ingress with no rule: everything to it is denied.
    set_endpoint(
        &mut maps,
        ips_b,
        2,
        ep_flags::ISOLATED_INGRESS | ep_flags::INGRESS_HAS_IDENTITY_RULES,
    );
    pods.expect(false, false, "b isolated, no rules");
    pods.expect_sctp(false, "b isolated, no rules");

    // A's identity may reach B on TCP 8080 only.
    for ip in ips_a {
        maps.set_identity(addr(ip), ID_A).expect("ipcache");
    }
    let rule_key = RuleKey {
        policy_set: SET_B_IN,
        identity: ID_A,
    };
    maps.set_rule(rule_key, ranges(&[(proto::TCP, TCP_PORT, TCP_PORT)]))
        .expect("rule");
    pods.expect(true, false, "tcp rule");

    // An open connection outlives the rule (replies keep flowing), new ones do not.
    let mut open =
        TcpClient::connect(pods.a_ns(), pods.to_b(false, TCP_PORT), OK_WAIT).expect("connect");
    open.round_trip(b"first").expect("echo while allowed");
    maps.set_rule(
        rule_key,
        ranges(&[
            (proto::TCP, TCP_PORT, TCP_PORT),
            (proto::UDP, UDP_PORT, UDP_PORT),
        ]),
    )
    .expect("rule");
    pods.expect(true, true, "tcp and udp rule");
    maps.delete_rule(&rule_key).expect("delete rule");
    open.round_trip(b"second")
        .expect("established connection survives the rule's removal");
    pods.expect(false, false, "rule removed");
    pods.expect_sctp(false, "rule removed");

    // The node itself always reaches its pods (kubelet probes).
    for ip in [NODE_IPV4.into(), NODE_IPV6.into()] {
        maps.set_identity(addr(ip), IDENTITY_HOST).expect("ipcache");
    }
    for v6 in [false, true] {
        tcp_echo(&bed.node, pods.to_b(v6, TCP_PORT), OK_WAIT).expect("node to isolated pod");
    }

    // B open again; A isolated for egress with a CIDR rule to B's addresses.
    set_endpoint(&mut maps, ips_b, 2, 0);
    set_endpoint(
        &mut maps,
        ips_a,
        1,
        ep_flags::ISOLATED_EGRESS | ep_flags::EGRESS_HAS_CIDR_RULES,
    );
    pods.expect(false, false, "a isolated for egress, no rules");
    let cidr_keys: Vec<LpmKey<CidrData>> = ips_b
        .iter()
        .map(|ip| {
            let a = addr(*ip);
            LpmKey {
                prefixlen: cidr_prefixlen(a.is_v4(), if a.is_v4() { 32 } else { 128 }),
                data: CidrData::new(SET_A_EG, a),
            }
        })
        .collect();
    for k in &cidr_keys {
        maps.set_cidr_rule(
            *k,
            RuleValue {
                flags: policy_common::rule_flags::ALL,
                ..Default::default()
            },
        )
        .expect("cidr");
    }
    pods.expect(true, true, "egress cidr rule");
    for k in &cidr_keys {
        maps.delete_cidr_rule(*k).expect("delete cidr");
    }
    pods.expect(false, false, "egress cidr rule removed");

    // The denies were counted and reported (B's ingress denies at A's hook already, in the
    // direction of the policy that refused).
    let c = maps.counters().expect("counters");
    assert!(c.get(Direction::Egress, Reason::DenyPolicy) > 0);
    assert!(c.get(Direction::Ingress, Reason::DenyPolicy) > 0);
    assert!(c.get(Direction::Ingress, Reason::AllowHost) > 0);
    let ev = events.drain();
    assert!(
        ev.iter().any(|e| e.reason == Reason::DenyPolicy as u8
            && e.direction == Direction::Egress as u8
            && e.endpoint_id == 1),
        "an egress deny event of endpoint 1 among {} events",
        ev.len()
    );

    // Detaching A's interface does not lift A's policy: B's hook judges whatever grant A's
    // hook did not record. Lifting A's isolation in the maps does.
    dp.detach(att_a).expect("detach a");
    pods.expect(false, false, "a detached, still isolated for egress");
    set_endpoint(&mut maps, ips_a, 1, 0);
    pods.expect(true, true, "a detached and not isolated");
    drop(att_b);
}

#[test]
fn cleanup_is_complete_when_a_test_fails() {
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let mut bed = Testbed::new().expect("node namespace (needs root)");
        bed.add_pod().expect("pod");
        bed.add_external().expect("external host");
        *names.lock().unwrap_or_else(|e| e.into_inner()) = bed.namespace_names();
        let fs = PrivateBpffs::mount().expect("bpffs");
        let mut dp = Dataplane::load(fs.path()).expect("load");
        let hif = bed.hosts[0].host_if.clone();
        bed.node
            .enter(|| {
                dp.attach(&hif, AttachMode::Netlink)
                    .expect("attach via clsact")
            })
            .expect("enter");
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap_or_else(|e| e.into_inner());
    assert_eq!(names.len(), 3);
    for n in names {
        assert!(
            !Netns::exists(&n),
            "namespace {n} left behind after a failure"
        );
    }
}

#[test]
fn clsact_fallback_enforces_and_dropping_the_loader_detaches() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let x = bed.add_external().expect("external host");
    let (ha, hx) = (&bed.hosts[a], &bed.hosts[x]);
    let to_x = SocketAddr::new(hx.ip(false), TCP_PORT);
    let _server = TcpEchoServer::start(&hx.ns, to_x).expect("server");
    tcp_echo(&ha.ns, to_x, OK_WAIT).expect("open before attaching");

    let fs = PrivateBpffs::mount().expect("bpffs");
    let mut dp = Dataplane::load(fs.path()).expect("load");
    let mut maps = dp.take_maps().expect("maps");
    let att = bed
        .node
        .enter(|| dp.attach_index(ifindex_in(&bed.node, &ha.host_if), AttachMode::Netlink))
        .expect("enter")
        .expect("attach through a clsact qdisc");
    assert_eq!(att.mode, AttachMode::Netlink);
    // Visible to tc, unlike TCX links.
    let filters = bed
        .node
        .exec("tc", &["filter", "show", "dev", &ha.host_if, "ingress"])
        .expect("tc");
    assert!(
        String::from_utf8_lossy(&filters.stdout).contains("from_pod"),
        "tc shows the filter"
    );

    // Unknown endpoint: dropped. Isolated for egress with a CIDR rule: allowed.
    assert!(tcp_echo(&ha.ns, to_x, DENY_WAIT).is_err());
    bed.bind(a, &mut maps).expect("bind a");
    set_endpoint(
        &mut maps,
        [ha.ip(false), ha.ip(true)],
        1,
        ep_flags::ISOLATED_EGRESS | ep_flags::EGRESS_HAS_CIDR_RULES,
    );
    assert!(tcp_echo(&ha.ns, to_x, DENY_WAIT).is_err());
    let k = LpmKey {
        prefixlen: cidr_prefixlen(true, 24),
        data: CidrData::new(SET_A_EG, addr(hx.ip(false))),
    };
    maps.set_cidr_rule(k, ranges(&[(proto::TCP, TCP_PORT, TCP_PORT)]))
        .expect("cidr");
    tcp_echo(&ha.ns, to_x, OK_WAIT).expect("allowed by the CIDR rule");
    maps.delete_cidr_rule(k).expect("delete");
    assert!(tcp_echo(&ha.ns, to_x, DENY_WAIT).is_err());

    // The agent going away takes its filters with it.
    drop(att);
    drop(maps);
    drop(dp);
    tcp_echo(&ha.ns, to_x, OK_WAIT).expect("open after the loader is gone");
}

fn ifindex_in(ns: &Netns, ifname: &str) -> u32 {
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: a valid C string.
    ns.enter(|| unsafe { libc::if_nametoindex(name.as_ptr()) })
        .expect("enter")
}
