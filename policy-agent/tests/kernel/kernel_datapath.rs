//! The real eBPF object, loaded into the kernel, deciding crafted packets through
//! BPF_PROG_TEST_RUN. Each case seeds the maps, runs packets and checks the return code and
//! the verdict counter that moved. Needs root and BPF: fails (never skips) without them.

use crate::common;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Mutex, MutexGuard, OnceLock},
};

use aya::programs::{TestRun as _, TestRunOptions};
use common::packet::*;
use policy_agent::dataplane::{Dataplane, DataplaneMaps};
use policy_common::{
    Addr, CidrData, CtKey, Direction, EndpointKey, EndpointValue, FragKey, IDENTITY_HOST, LpmKey,
    MAP_CIDR_RULES, MAP_CONFIG, MAP_CONNTRACK, MAP_COUNTERS, MAP_ENDPOINTS, MAP_EVENT_BUDGET,
    MAP_EVENTS, MAP_FRAGMENTS, MAP_IPCACHE, MAP_PORTS, MAP_RULES, PROG_FROM_POD, PROG_FROM_WORLD,
    PROG_TO_POD, PROG_TO_WORLD, PendingKey, PortData, PortRange, Reason, RuleKey, RuleValue,
    TC_ACT_OK, TC_ACT_SHOT, cidr_prefixlen, ct, ct_flags, ep_flags, port_prefixlen, rule_flags,
};
use policy_testkit::testbed::PrivateBpffs;

use Direction::{Egress, Ingress};

// ---- addresses: the local pod A, a pod B elsewhere, an external host, a router ----
const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const EXT4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 5);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x10);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x20);
const EXT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 5);

const ID_B: u32 = 300;
/// The interface a BPF_PROG_TEST_RUN packet is on: the loopback of the caller's namespace.
const TEST_RUN_IFINDEX: u32 = 1;
const SET_IN: u32 = 10;
const SET_EG: u32 = 11;

fn a4(ip: Ipv4Addr) -> Addr {
    Addr::from_v4_octets(ip.octets())
}
fn a6(ip: Ipv6Addr) -> Addr {
    Addr::from_v6_octets(ip.octets())
}

struct Fixture {
    dp: Dataplane,
    maps: DataplaneMaps,
}

// SAFETY-free sharing: one loaded object for all cases (loading verifies both programs,
// which is the slow part); each case takes the lock and starts from empty maps.
fn fixture() -> MutexGuard<'static, Fixture> {
    static FIX: OnceLock<Mutex<Fixture>> = OnceLock::new();
    let m = FIX.get_or_init(|| {
        // The pins vanish when the private mount goes; the maps live on through their fds.
        let fs = PrivateBpffs::mount().expect("mount a private bpffs (needs root)");
        let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object into the kernel");
        let maps = dp.take_maps().expect("map handles");
        Mutex::new(Fixture { dp, maps })
    });
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    g.maps.clear_all().expect("clear maps");
    g.maps.set_event_budget(0, 0).expect("config");
    g
}

impl Fixture {
    /// Now on the datapath's clock (the clock of every stamp in the maps).
    fn now(&self) -> u64 {
        self.dp.now_ns(&self.maps).expect("read the datapath clock")
    }

    /// Runs one frame through a program and returns its TC return code.
    fn run_prog(&self, name: &'static str, frame: &[u8]) -> i32 {
        let prog = self.dp.program(name).expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value as i32
    }

    /// Runs a frame and returns the one reason whose counter moved, checking the return
    /// code agrees with it.
    fn verdict(&self, dir: Direction, frame: &[u8]) -> Reason {
        let name = match dir {
            Egress => PROG_FROM_POD,
            Ingress => PROG_TO_POD,
        };
        self.verdict_at(name, frame)
    }

    /// [`Self::verdict`] through any program; the counter must move in the program's
    /// direction (packets leaving local pods count as egress).
    fn verdict_at(&self, name: &'static str, frame: &[u8]) -> Reason {
        let hook_dir = if name == PROG_FROM_POD || name == PROG_TO_WORLD {
            Egress
        } else {
            Ingress
        };
        let (d, r) = self.verdict_by(name, frame);
        // A policy deny is counted in the direction of the policy that refused, which at a
        // client's hook may be the destination's ingress.
        if r != Reason::DenyPolicy {
            assert_eq!(d, hook_dir, "counted in the hook's direction");
        }
        r
    }

    /// The direction and reason whose counter moved (exactly one moves per packet).
    fn verdict_by(&self, name: &'static str, frame: &[u8]) -> (Direction, Reason) {
        let before = self.maps.counters().expect("counters");
        let rc = self.run_prog(name, frame);
        let diff = self.maps.counters().expect("counters").since(&before);
        let moved: Vec<(Direction, Reason)> = Direction::ALL
            .iter()
            .flat_map(|d| Reason::ALL.iter().map(move |r| (*d, *r)))
            .filter(|(d, r)| diff.get(*d, *r) != 0)
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "exactly one counter moves per packet: {moved:?}"
        );
        let (d, r) = moved[0];
        assert_eq!(diff.get(d, r), 1);
        let expect_rc = if r.is_allow() { TC_ACT_OK } else { TC_ACT_SHOT };
        assert_eq!(rc, expect_rc, "return code agrees with {r:?}");
        (d, r)
    }

    /// A local endpoint, bound to the interface test runs happen on (the test's `lo`).
    fn endpoint(&mut self, addr: Addr, flags: u32) {
        self.maps.bind(TEST_RUN_IFINDEX, &[addr]).expect("bind");
        self.maps
            .set_local_endpoint(
                EndpointKey { addr },
                EndpointValue {
                    endpoint_id: 7,
                    ingress_policy_set: SET_IN,
                    egress_policy_set: SET_EG,
                    flags,
                },
            )
            .expect("endpoint");
    }

    fn endpoint_id(&mut self, addr: Addr, id: u32, flags: u32) {
        self.maps.bind(TEST_RUN_IFINDEX, &[addr]).expect("bind");
        self.maps
            .set_local_endpoint(
                EndpointKey { addr },
                EndpointValue {
                    endpoint_id: id,
                    ingress_policy_set: SET_IN,
                    egress_policy_set: SET_EG,
                    flags,
                },
            )
            .expect("endpoint");
    }

    fn service_cidrs(&mut self, nets: &[&str]) {
        let nets: Vec<ipnet::IpNet> = nets.iter().map(|n| n.parse().expect("cidr")).collect();
        self.maps.set_service_cidrs(&nets).expect("service cidrs");
    }

    fn ipcache(&mut self, addr: Addr, identity: u32) {
        self.maps.set_identity(addr, identity).expect("ipcache");
    }

    fn rule(&mut self, set: u32, identity: u32, v: RuleValue) {
        self.maps
            .set_rule(
                RuleKey {
                    policy_set: set,
                    identity,
                },
                v,
            )
            .expect("rule");
    }

    fn cidr(&mut self, set: u32, addr: Addr, bits: u8, v: RuleValue) {
        let v4 = addr.is_v4();
        let key = LpmKey {
            prefixlen: cidr_prefixlen(v4, bits),
            data: CidrData::new(set, addr),
        };
        self.maps.set_cidr_rule(key, v).expect("cidr rule");
    }

    fn port_prefix(&mut self, port_set: u32, proto: u8, port: u16, bits: u8) {
        let key = LpmKey {
            prefixlen: port_prefixlen(bits),
            data: PortData::new(port_set, proto, port),
        };
        self.maps.set_port(key).expect("port");
    }

    fn ct(
        &self,
        src: Addr,
        dst: Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Option<policy_common::CtValue> {
        let (k, _): (CtKey, bool) = ct::normalize(src, dst, sport, dport, proto);
        self.maps.conntrack_get(&k)
    }
}

fn all() -> RuleValue {
    RuleValue {
        flags: rule_flags::ALL,
        ..Default::default()
    }
}

fn ranges(r: &[(u8, u16, u16)]) -> RuleValue {
    let mut v = RuleValue::default();
    for (i, (proto, first, last)) in r.iter().enumerate() {
        v.ranges[i] = PortRange {
            first: *first,
            last: *last,
            proto: *proto,
            _pad: [0; 3],
        };
    }
    v
}

/// A rule that admits nothing: how `except` blocks are compiled (a longer prefix).
fn nothing() -> RuleValue {
    RuleValue::default()
}

const ISO_IN: u32 = ep_flags::ISOLATED_INGRESS;
const ISO_EG: u32 = ep_flags::ISOLATED_EGRESS;
const IN_ID: u32 = ep_flags::INGRESS_HAS_IDENTITY_RULES;
const IN_CIDR: u32 = ep_flags::INGRESS_HAS_CIDR_RULES;
const EG_ID: u32 = ep_flags::EGRESS_HAS_IDENTITY_RULES;
const EG_CIDR: u32 = ep_flags::EGRESS_HAS_CIDR_RULES;

fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    V4::new(src, dst).frame(&tcp(sport, dport, flags))
}
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    V4::new(src, dst).frame(&udp(sport, dport))
}
fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    V6::new(src, dst).frame(&tcp(sport, dport, flags))
}

// ================= the object =================

#[test]
fn object_has_every_contract_map_and_program() {
    let f = fixture();
    // take_maps() moved the maps out; their presence is proven by it having succeeded for
    // each name. Check the names against a fresh load too.
    let fs = PrivateBpffs::mount().expect("bpffs");
    let dp = Dataplane::load(fs.path()).expect("load");
    let names = dp.map_names();
    for m in [
        MAP_ENDPOINTS,
        MAP_CONNTRACK,
        policy_common::MAP_CONNTRACK4,
        MAP_IPCACHE,
        MAP_RULES,
        MAP_CIDR_RULES,
        MAP_PORTS,
        MAP_FRAGMENTS,
        MAP_COUNTERS,
        MAP_EVENTS,
        MAP_EVENT_BUDGET,
        MAP_CONFIG,
        policy_common::MAP_SERVICE_CIDRS,
        policy_common::MAP_SERVICE_PENDING,
    ] {
        assert!(
            names.iter().any(|n| n == m),
            "map {m} missing from {names:?}"
        );
        assert!(fs.path().join(m).exists(), "map {m} pinned by name");
    }
    for p in [
        PROG_FROM_POD,
        PROG_TO_POD,
        PROG_FROM_WORLD,
        PROG_TO_WORLD,
        policy_common::PROG_BENCH_EMPTY,
    ] {
        dp.program(p).expect("program present and loaded");
    }
    drop(f);
}

#[test]
fn a_reload_adopts_the_pinned_maps_and_their_state() {
    let fs = PrivateBpffs::mount().expect("bpffs");
    let key = EndpointKey { addr: a4(A4) };
    let value = EndpointValue {
        endpoint_id: 42,
        ingress_policy_set: 1,
        egress_policy_set: 2,
        flags: ISO_IN | IN_CIDR,
    };
    let cidr = LpmKey {
        prefixlen: cidr_prefixlen(true, 32),
        data: CidrData::new(1, a4(EXT4)),
    };
    let first_clock = {
        let mut dp = Dataplane::load(fs.path()).expect("first load");
        let mut maps = dp.take_maps().expect("maps");
        maps.set_local_endpoint(key, value).expect("write");
        maps.bind(TEST_RUN_IFINDEX, &[key.addr]).expect("bind");
        // A set's CIDR trie lives in the pinned array, not in a pin of its own.
        maps.set_cidr_rule(cidr, all()).expect("cidr");
        maps.set_event_budget(5, 9).expect("config");
        maps.config().expect("config")
    };
    // The first agent is gone; its maps live on in the pins. A new one adopts them.
    let mut dp = Dataplane::load(fs.path()).expect("second load");
    let mut maps = dp.take_maps().expect("maps");
    assert_eq!(
        maps.endpoints.get(&key, 0).expect("endpoint survived"),
        value
    );
    // Adopted settings are kept, not reset to defaults; so is the calibrated clock.
    let c = maps.config().expect("config");
    assert_eq!((c.events_per_sec, c.events_burst), (5, 9));
    assert_eq!(
        (c.jiffy_ns, c.jiffies_base),
        (first_clock.jiffy_ns, first_clock.jiffies_base)
    );
    // And the adopted maps are the ones the new programs use.
    let mut opts = TestRunOptions::new();
    let frame = tcp4(B4, A4, 40000, 80, SYN);
    opts.data_in = Some(&frame);
    let rc = dp
        .program(PROG_TO_POD)
        .expect("prog")
        .test_run(opts)
        .expect("run")
        .return_value;
    assert_eq!(
        rc as i32, TC_ACT_SHOT,
        "the adopted endpoint is isolated for ingress"
    );
    // The adopted array still holds the first agent's trie, read back through it and used
    // by the new programs.
    let back = maps.read_contents().expect("read back");
    assert_eq!(
        back.cidr_rules.into_iter().collect::<Vec<_>>(),
        vec![(cidr, all())]
    );
    let run = |frame: &[u8]| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        dp.program(PROG_TO_POD)
            .expect("prog")
            .test_run(opts)
            .expect("run")
            .return_value as i32
    };
    assert_eq!(
        run(&tcp4(EXT4, A4, 40000, 80, SYN)),
        TC_ACT_OK,
        "adopted CIDR rule"
    );
    // `status` counts the rules of every trie against the total the agent admits.
    maps.set_cidr_rule(
        LpmKey {
            prefixlen: cidr_prefixlen(false, 64),
            data: CidrData::new(3, a6(EXT6)),
        },
        all(),
    )
    .expect("cidr");
    let pinned = policy_agent::observe::pinned::open_ro(fs.path(), MAP_CIDR_RULES).expect("open");
    assert_eq!(
        (
            pinned.kind(),
            pinned.entries().expect("count"),
            pinned.capacity()
        ),
        ("lpm_tries", Some(2), policy_common::MAX_CIDR_RULES as u64)
    );
    maps.delete_cidr_rule(LpmKey {
        prefixlen: cidr_prefixlen(false, 64),
        data: CidrData::new(3, a6(EXT6)),
    })
    .expect("delete");
    // The new agent edits the adopted trie: removing its last rule empties the slot.
    maps.delete_cidr_rule(cidr).expect("delete");
    assert!(maps.cidr_rules.slot_sizes().expect("slots").is_empty());
    assert_eq!(run(&tcp4(EXT4, A4, 40001, 80, SYN)), TC_ACT_SHOT);
}

/// Maps of the same shapes created under another format (what a flag, a key or the hash
/// means) are never adopted: the load is refused as incompatible, so the agent migrates.
#[test]
fn pinned_maps_of_another_format_are_not_adopted() {
    let fs = PrivateBpffs::mount().expect("bpffs");
    {
        let mut dp = Dataplane::load(fs.path()).expect("first load");
        let mut maps = dp.take_maps().expect("maps");
        let mut c = maps.config().expect("config");
        assert_eq!(
            c.format,
            policy_common::FORMAT_VERSION,
            "new maps carry the format"
        );
        c.format = policy_common::FORMAT_VERSION - 1;
        maps.set_config(c).expect("config");
    }
    match Dataplane::load(fs.path()) {
        Err(policy_agent::dataplane::DataplaneError::Incompatible { detail, .. }) => {
            assert!(detail.contains("CONFIG.format"), "{detail}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("maps of another format were adopted"),
    }
}

#[test]
fn loading_refuses_a_pin_directory_outside_bpffs() {
    let dir = std::env::temp_dir().join(format!("not-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let r = Dataplane::load(&dir);
    let _ = std::fs::remove_dir(&dir);
    assert!(matches!(
        r,
        Err(policy_agent::dataplane::DataplaneError::NotBpffs(_))
    ));
}

// ================= basics =================

#[test]
fn arp_passes_and_other_non_ip_frames_pass_only_uplinks() {
    let f = fixture();
    assert_eq!(f.verdict(Egress, &arp()), Reason::AllowNonIp);
    assert_eq!(f.verdict(Ingress, &arp()), Reason::AllowNonIp);
    // MPLS unicast carrying an IPv4 packet: nothing at a pod's hook judges what is inside.
    let ip = V4::new(A4, B4).packet(&tcp(40000, 80, SYN));
    let mut mpls = vec![0x00, 0x01, 0x01, 0x40];
    mpls.extend_from_slice(&ip);
    for et in [0x8847, 0x8848, 0x8863, 0x88cc] {
        let frame = eth(et, &mpls);
        assert_eq!(f.verdict(Egress, &frame), Reason::DenyNonIp, "{et:#x}");
        assert_eq!(f.verdict(Ingress, &frame), Reason::DenyNonIp, "{et:#x}");
        assert_eq!(f.verdict_at(PROG_FROM_WORLD, &frame), Reason::AllowNonIp);
        assert_eq!(f.verdict_at(PROG_TO_WORLD, &frame), Reason::AllowNonIp);
    }
}

#[test]
fn vlan_tagged_frame_in_the_data_is_dropped() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    // 802.1Q tag (VLAN 5) then IPv4: the inner packet is never judged, so never passed.
    let ip = V4::new(A4, B4).packet(&tcp(40000, 80, SYN));
    let mut tagged = vec![0, 5, 0x08, 0x00];
    tagged.extend_from_slice(&ip);
    assert_eq!(
        f.verdict(Egress, &eth(0x8100, &tagged)),
        Reason::DenyMalformed
    );
    assert_eq!(
        f.verdict(Ingress, &eth(0x88A8, &tagged)),
        Reason::DenyMalformed
    );
}

#[test]
fn unknown_endpoint_is_dropped_both_ways() {
    let mut f = fixture();
    // Source not bound to the interface: not this pod's address.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::DenySpoofed
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::DenyUnknownEndpoint
    );
    // Bound, but no endpoint (yet): fail closed too.
    f.maps.bind(TEST_RUN_IFINDEX, &[a4(A4)]).expect("bind");
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::DenyUnknownEndpoint
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::DenyUnknownEndpoint
    );
}

/// Nothing isolated: every connection passes, and its originator is recorded (no grant
/// needed), so a later isolation judges it from the right side.
#[test]
fn not_isolated_flows_pass_and_their_originator_is_recorded() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40001, 80, SYN)),
        Reason::AllowNotIsolated
    );
    let e = f.ct(a4(A4), a4(B4), 40000, 80, TCP).expect("entry");
    assert_eq!(e.flags & (ct_flags::GRANTS | ct_flags::REQ_MASK), 0);
    let (_, a_is_a) = ct::normalize(a4(A4), a4(B4), 40000, 80, TCP);
    assert!(ct::is_original(&e, a_is_a), "A opened it");
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
}

#[test]
fn not_isolated_egress_records_an_entry_for_replies_of_ingress_isolated_pod() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
    let e = f
        .ct(a4(A4), a4(B4), 40000, 80, TCP)
        .expect("entry recorded");
    // Neither end needs a grant for this connection: A is not isolated for egress, B is
    // not a local endpoint.
    assert_eq!(ct::stored_required(&e), 0);
    assert_ne!(
        e.flags & ct_flags::ORIG_IS_A,
        0,
        "A (the lower address) originated it"
    );
    // The reply reaches the ingress-isolated pod as established.
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // A new connection into it is still judged (and denied: no rules).
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40001, 22, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn not_isolated_ingress_of_egress_isolated_pod() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG);
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40001, 80, SYN)),
        Reason::DenyPolicy
    );
}

// ================= identity and CIDR =================

#[test]
fn ingress_allowed_by_identity() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    let e = f.ct(a4(B4), a4(A4), 40000, 80, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::INGRESS_OK, 0);
}

#[test]
fn ingress_denied_for_identity_without_rule() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B + 1);
    f.rule(SET_IN, ID_B, all());
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
    assert!(
        f.ct(a4(B4), a4(A4), 40000, 80, TCP).is_none(),
        "denied flows leave no entry"
    );
}

#[test]
fn egress_allowed_by_identity() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG | EG_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_EG, ID_B, all());
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 5353, 53)),
        Reason::AllowIdentity
    );
}

#[test]
fn ingress_allowed_by_cidr() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_CIDR);
    f.cidr(
        SET_IN,
        a4(Ipv4Addr::new(198, 19, 0, 0)),
        16,
        ranges(&[(TCP, 443, 443)]),
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 443, SYN)),
        Reason::AllowCidr
    );
}

#[test]
fn egress_allowed_by_cidr_to_world() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(Ipv4Addr::new(198, 19, 0, 0)), 24, all());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 40000, 8080, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(
            Egress,
            &tcp4(A4, Ipv4Addr::new(198, 19, 1, 5), 40000, 8080, SYN)
        ),
        Reason::DenyPolicy
    );
}

#[test]
fn cidr_except_is_a_longer_empty_prefix() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(Ipv4Addr::new(198, 19, 0, 0)), 16, all());
    f.cidr(SET_EG, a4(Ipv4Addr::new(198, 19, 0, 0)), 24, nothing());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict(
            Egress,
            &tcp4(A4, Ipv4Addr::new(198, 19, 1, 5), 40000, 80, SYN)
        ),
        Reason::AllowCidr
    );
}

#[test]
fn cidr_matches_pod_addresses_too() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_CIDR | IN_ID);
    f.ipcache(a4(B4), ID_B); // a pod identity with no identity rule
    f.cidr(SET_IN, a4(Ipv4Addr::new(198, 18, 0, 0)), 24, all());
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowCidr
    );
}

#[test]
fn ipv6_cidr_never_covers_ipv4() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG | EG_CIDR);
    // ::/0 must not match IPv4-mapped peers.
    f.cidr(SET_EG, a6(Ipv6Addr::UNSPECIFIED), 0, all());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
}

/// Two policy-sets hold the same /16 with different `except`s (and a third set a wider
/// prefix): each endpoint's lookup sees only its own set's trie.
#[test]
fn cidr_sets_with_overlapping_prefixes_never_see_each_other() {
    let mut f = fixture();
    const SET_X: u32 = 20;
    const SET_Y: u32 = 21;
    const SET_Z: u32 = 22;
    let ep = |f: &mut Fixture, addr: Ipv4Addr, set: u32| {
        f.maps.bind(TEST_RUN_IFINDEX, &[a4(addr)]).expect("bind");
        f.maps
            .set_endpoint(
                EndpointKey { addr: a4(addr) },
                EndpointValue {
                    endpoint_id: set,
                    ingress_policy_set: set,
                    egress_policy_set: 0,
                    flags: ISO_IN | IN_CIDR,
                },
            )
            .expect("endpoint");
    };
    let (x, y, z) = (
        Ipv4Addr::new(198, 18, 0, 1),
        Ipv4Addr::new(198, 18, 0, 2),
        Ipv4Addr::new(198, 18, 0, 3),
    );
    ep(&mut f, x, SET_X);
    ep(&mut f, y, SET_Y);
    ep(&mut f, z, SET_Z);
    let net = a4(Ipv4Addr::new(198, 19, 0, 0));
    f.cidr(SET_X, net, 16, ranges(&[(TCP, 80, 80)]));
    f.cidr(SET_X, a4(Ipv4Addr::new(198, 19, 1, 0)), 24, nothing());
    f.cidr(SET_Y, net, 16, ranges(&[(TCP, 443, 443)]));
    f.cidr(SET_Y, a4(Ipv4Addr::new(198, 19, 2, 0)), 24, nothing());
    // Z: only a /8 around, allowing port 22; a longer prefix of X or Y must not shadow it.
    f.cidr(
        SET_Z,
        a4(Ipv4Addr::new(198, 0, 0, 0)),
        8,
        ranges(&[(TCP, 22, 22)]),
    );
    let one = Ipv4Addr::new(198, 19, 1, 5);
    let two = Ipv4Addr::new(198, 19, 2, 5);
    let cases = [
        // (peer, endpoint, port, expected)
        (one, x, 80, Reason::DenyPolicy), // X's except
        (two, x, 80, Reason::AllowCidr),  // Y's except is not X's
        (two, x, 443, Reason::DenyPolicy),
        (one, y, 443, Reason::AllowCidr), // X's except is not Y's
        (two, y, 443, Reason::DenyPolicy),
        (one, y, 80, Reason::DenyPolicy),
        (one, z, 22, Reason::AllowCidr), // X's and Y's longer prefixes are not Z's
        (two, z, 22, Reason::AllowCidr),
        (two, z, 80, Reason::DenyPolicy),
    ];
    for (i, (peer, ep, port, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            f.verdict(Ingress, &tcp4(peer, ep, 41000 + i as u16, port, SYN)),
            want,
            "{peer} -> {ep}:{port}"
        );
    }
    // The kernel holds what was written, split per set and family.
    let back = f.maps.read_contents().expect("read back");
    assert_eq!(back.cidr_rules.len(), 5);
    let slots = f.maps.cidr_rules.slot_sizes().expect("slots");
    assert_eq!(
        slots,
        vec![
            (policy_common::cidr_slot(SET_X, false), 2),
            (policy_common::cidr_slot(SET_Y, false), 2),
            (policy_common::cidr_slot(SET_Z, false), 1),
        ]
    );
}

/// A set's IPv4 and IPv6 prefixes live in two tries; both read back under their own keys.
#[test]
fn cidr_families_of_one_set_read_back_as_written() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | IN_CIDR);
    f.endpoint(a4(A4), ISO_IN | IN_CIDR);
    f.cidr(
        SET_IN,
        a4(Ipv4Addr::UNSPECIFIED),
        0,
        ranges(&[(TCP, 80, 80)]),
    );
    f.cidr(
        SET_IN,
        a6(Ipv6Addr::UNSPECIFIED),
        0,
        ranges(&[(TCP, 443, 443)]),
    );
    f.cidr(SET_IN, a6(EXT6), 128, nothing());
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 80, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 443, SYN)),
        Reason::DenyPolicy,
        "::/0 is not an IPv4 rule"
    );
    let b6 = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 6);
    let v6 = |src| V6::new(src, A6).frame(&tcp(40001, 443, SYN));
    assert_eq!(f.verdict(Ingress, &v6(b6)), Reason::AllowCidr);
    assert_eq!(f.verdict(Ingress, &v6(EXT6)), Reason::DenyPolicy, "except");
    let back = f.maps.read_contents().expect("read back");
    let want: Vec<LpmKey<CidrData>> = [
        (a4(Ipv4Addr::UNSPECIFIED), 0),
        (a6(Ipv6Addr::UNSPECIFIED), 0),
        (a6(EXT6), 128),
    ]
    .iter()
    .map(|(addr, bits)| LpmKey {
        prefixlen: cidr_prefixlen(addr.is_v4(), *bits),
        data: CidrData::new(SET_IN, *addr),
    })
    .collect();
    let mut got: Vec<LpmKey<CidrData>> = back.cidr_rules.keys().copied().collect();
    let mut want = want;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// When a set's last CIDR rule goes, its trie leaves the array and the set denies again; a
/// new rule brings a new trie.
#[test]
fn cidr_set_whose_last_rule_is_removed_denies_again() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_CIDR);
    let net = LpmKey {
        prefixlen: cidr_prefixlen(true, 24),
        data: CidrData::new(SET_IN, a4(Ipv4Addr::new(198, 19, 0, 0))),
    };
    let host = LpmKey {
        prefixlen: cidr_prefixlen(true, 32),
        data: CidrData::new(SET_IN, a4(EXT4)),
    };
    f.maps.set_cidr_rule(net, all()).expect("insert");
    f.maps.set_cidr_rule(host, all()).expect("insert");
    let syn = |port| tcp4(EXT4, A4, 40000, port, SYN);
    assert_eq!(f.verdict(Ingress, &syn(80)), Reason::AllowCidr);
    f.maps.delete_cidr_rule(host).expect("delete");
    assert_eq!(
        f.verdict(Ingress, &syn(81)),
        Reason::AllowCidr,
        "the /24 stays"
    );
    assert_eq!(f.maps.cidr_rules.slot_sizes().expect("slots").len(), 1);
    f.maps.delete_cidr_rule(net).expect("delete the last");
    assert!(
        f.maps.cidr_rules.slot_sizes().expect("slots").is_empty(),
        "the emptied trie left its slot"
    );
    assert_eq!(f.verdict(Ingress, &syn(82)), Reason::DenyPolicy);
    // Deleting again is not an error; a new rule makes a new trie.
    f.maps.delete_cidr_rule(net).expect("delete absent");
    f.maps
        .set_cidr_rule(host, ranges(&[(TCP, 83, 83)]))
        .expect("insert");
    assert_eq!(f.verdict(Ingress, &syn(83)), Reason::AllowCidr);
    assert_eq!(f.verdict(Ingress, &syn(84)), Reason::DenyPolicy);
}

/// A policy-set number past the array is refused with a typed error, nothing written.
#[test]
fn cidr_rule_of_a_set_beyond_the_array_is_refused() {
    let mut f = fixture();
    let key = LpmKey {
        prefixlen: cidr_prefixlen(true, 24),
        data: CidrData::new(policy_common::MAX_POLICY_SETS, a4(EXT4)),
    };
    let e = f
        .maps
        .set_cidr_rule(key, all())
        .expect_err("beyond the slots");
    assert!(e.to_string().contains(MAP_CIDR_RULES), "{e}");
    assert!(f.maps.read_contents().expect("read").cidr_rules.is_empty());
}

// ================= ports =================

fn port_case(port: u16) -> Reason {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 8000, 8080)]));
    f.verdict(Ingress, &tcp4(B4, A4, 40000, port, SYN))
}

#[test]
fn port_range_first_port_allowed() {
    assert_eq!(port_case(8000), Reason::AllowIdentity);
}

#[test]
fn port_range_last_port_allowed() {
    assert_eq!(port_case(8080), Reason::AllowIdentity);
}

#[test]
fn port_range_below_first_denied() {
    assert_eq!(port_case(7999), Reason::DenyPolicy);
}

#[test]
fn port_range_above_last_denied() {
    assert_eq!(port_case(8081), Reason::DenyPolicy);
}

#[test]
fn protocol_mismatch_denied() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 53, 53)]));
    assert_eq!(
        f.verdict(Ingress, &udp4(B4, A4, 40000, 53)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 53, SYN)),
        Reason::AllowIdentity
    );
}

#[test]
fn port_set_in_ports_trie() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    // Inline range 22 plus a trie port-set 9000-9007 (one /13 prefix) and 9100 (/16).
    let mut v = ranges(&[(TCP, 22, 22)]);
    v.flags = rule_flags::PORT_SET;
    v.port_set = 5;
    f.rule(SET_IN, ID_B, v);
    f.port_prefix(5, TCP, 9000, 13);
    f.port_prefix(5, TCP, 9100, 16);
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 22, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40001, 9000, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40002, 9007, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40003, 9008, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40004, 9100, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40005, 9101, SYN)),
        Reason::DenyPolicy
    );
    // Same port-set, other protocol: not covered.
    assert_eq!(
        f.verdict(Ingress, &udp4(B4, A4, 40006, 9000)),
        Reason::DenyPolicy
    );
}

#[test]
fn sctp_judged_by_port() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(SCTP, 5000, 5000)]));
    let ok = V4::new(B4, A4).frame(&sctp(40000, 5000));
    let bad = V4::new(B4, A4).frame(&sctp(40000, 5001));
    assert_eq!(f.verdict(Ingress, &ok), Reason::AllowIdentity);
    assert_eq!(f.verdict(Ingress, &bad), Reason::DenyPolicy);
    // The reply of the allowed association is established.
    let reply = V4::new(A4, B4).frame(&sctp(5000, 40000));
    f.endpoint(a4(A4), ISO_IN | ISO_EG | IN_ID);
    assert_eq!(f.verdict(Egress, &reply), Reason::AllowEstablished);
}

// ================= host =================

#[test]
fn host_identity_always_admitted_on_ingress() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    f.ipcache(a4(NODE4), IDENTITY_HOST);
    assert_eq!(
        f.verdict(Ingress, &tcp4(NODE4, A4, 40000, 8080, SYN)),
        Reason::AllowHost
    );
}

#[test]
fn host_identity_gets_no_free_pass_on_egress() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG);
    f.ipcache(a4(NODE4), IDENTITY_HOST);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, NODE4, 40000, 10250, SYN)),
        Reason::DenyPolicy
    );
}

// ================= conntrack =================

#[test]
fn reply_of_egress_originated_flow_passes_isolated_ingress() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, ranges(&[(TCP, 443, 443)]));
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 41000, 443, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 443, 41000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 41000, 443, ACK)),
        Reason::AllowEstablished
    );
    let e = f.ct(a4(A4), a4(EXT4), 41000, 443, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::SEEN_REPLY, 0);
    // The same peer may not open a connection the other way.
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 443, 41001, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn reply_of_ingress_originated_flow_passes_isolated_egress() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(UDP, 53, 53)]));
    assert_eq!(
        f.verdict(Ingress, &udp4(B4, A4, 40000, 53)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 53, 40000)),
        Reason::AllowEstablished
    );
    // A's own new flow to B is denied by its egress.
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 53, 40001)),
        Reason::DenyPolicy
    );
}

#[test]
fn established_flow_survives_rule_removal_but_new_syn_is_redecided() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    // A repeated SYN on a live tuple is judged again (tuple reuse, current policy).
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    f.maps
        .delete_rule(&RuleKey {
            policy_set: SET_IN,
            identity: ID_B,
        })
        .expect("delete");
    // Mid-connection packets keep flowing (per-connection enforcement)...
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK | PSH)),
        Reason::AllowEstablished
    );
    // ...but a new SYN on the same tuple is denied, and the old grant is withdrawn.
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
    let e = f.ct(a4(B4), a4(A4), 40000, 80, TCP).expect("entry");
    assert_eq!(e.flags & ct_flags::INGRESS_OK, 0);
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::DenyPolicy
    );
}

#[test]
fn tcp_rst_and_fin_move_the_entry_to_closing() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 42000, 80, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 80, 42000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 42000, 80, FIN | ACK)),
        Reason::AllowEstablished
    );
    let e = f.ct(a4(A4), a4(EXT4), 42000, 80, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::FIN_ORIG, 0);
    assert_eq!(ct::timeout_ns(TCP, e.flags), ct::TIMEOUT_TCP_ESTABLISHED_NS);
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 80, 42000, FIN | ACK)),
        Reason::AllowEstablished
    );
    let e = f.ct(a4(A4), a4(EXT4), 42000, 80, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::FIN_REPLY, 0);
    assert_eq!(ct::timeout_ns(TCP, e.flags), ct::TIMEOUT_CLOSING_NS);

    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 42001, 80, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 80, 42001, RST | ACK)),
        Reason::AllowEstablished
    );
    let e = f.ct(a4(A4), a4(EXT4), 42001, 80, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::RST, 0);
    // A new SYN on the closed tuple starts a fresh entry.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 42001, 80, SYN)),
        Reason::AllowCidr
    );
    let e = f.ct(a4(A4), a4(EXT4), 42001, 80, TCP).expect("entry");
    assert_eq!(e.flags & (ct_flags::RST | ct_flags::SEEN_REPLY), 0);
}

/// The clock contract: stamps are on the datapath's clock, which the agent reads exactly
/// (`Dataplane::now_ns`): a packet handled between two readings stamps a time between them,
/// with no slack (a tick clock compared with CLOCK_MONOTONIC_COARSE can lag it).
#[test]
fn conntrack_timestamps_lie_between_two_readings_of_the_datapath_clock() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    for port in 43100..43150 {
        let before = f.now();
        assert_eq!(
            f.verdict(Egress, &udp4(A4, EXT4, port, 53)),
            Reason::AllowCidr
        );
        let after = f.now();
        let v = f.ct(a4(A4), a4(EXT4), port, 53, UDP).expect("entry");
        assert!(
            before <= v.last_seen_ns && v.last_seen_ns <= after,
            "{before} <= {} <= {after}",
            v.last_seen_ns
        );
    }
}

/// Calibration finds the kernel's one tick length every time (it is a build constant), also
/// while the machine is loaded (CI runs other test binaries beside this one).
#[test]
fn calibration_finds_the_same_tick_every_time() {
    let f = fixture();
    let tick = f.maps.config().expect("config").jiffy_ns;
    for _ in 0..10 {
        let c = policy_agent::dataplane::clock::calibrate(&f.dp).expect("calibrate");
        assert_eq!(c.jiffy_ns, tick);
    }
}

#[test]
fn the_calibrated_tick_clock_advances_with_the_coarse_monotonic_clock() {
    let mut f = fixture();
    let c = f.maps.config().expect("config");
    // HZ between 100 and 1000.
    assert!(
        (1_000_000..=10_000_000).contains(&c.jiffy_ns),
        "tick of {} ns",
        c.jiffy_ns
    );
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    let stamp = |f: &mut Fixture, port: u16| {
        assert_eq!(
            f.verdict(Egress, &udp4(A4, EXT4, port, 53)),
            Reason::AllowCidr
        );
        f.ct(a4(A4), a4(EXT4), port, 53, UDP)
            .expect("entry")
            .last_seen_ns
    };
    // Calibration only has to keep the tick clock's rate: its readings are compared with
    // each other, never with the coarse clock (a tick of phase, and a VM's lag).
    let (t0, s0) = (
        policy_agent::dataplane::monotonic_coarse_ns(),
        stamp(&mut f, 43200),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (t1, s1) = (
        policy_agent::dataplane::monotonic_coarse_ns(),
        stamp(&mut f, 43201),
    );
    let (kernel, agent) = (s1 - s0, t1 - t0);
    assert!(
        kernel.abs_diff(agent) <= 2 * c.jiffy_ns as u64,
        "the datapath clock moved {kernel} ns while the agent's moved {agent} ns"
    );
}

#[test]
fn expired_entry_is_not_trusted() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    assert_eq!(
        f.verdict(Egress, &udp4(A4, EXT4, 43000, 53)),
        Reason::AllowCidr
    );
    let (k, _) = ct::normalize(a4(A4), a4(EXT4), 43000, 53, UDP);
    let mut v = f.maps.conntrack_get(&k).expect("entry");
    v.last_seen_ns = v
        .last_seen_ns
        .saturating_sub(ct::TIMEOUT_UDP_NS + 5 * ct::SEC);
    f.maps.set_conntrack(k, v).expect("age the entry");
    assert_eq!(
        f.verdict(Ingress, &udp4(EXT4, A4, 53, 43000)),
        Reason::DenyPolicy
    );
}

// ================= IPv6 =================

#[test]
fn ipv6_allowed_by_identity_and_reply() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | ISO_EG | IN_ID);
    f.ipcache(a6(B6), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Ingress, &tcp6(B6, A6, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Egress, &tcp6(A6, B6, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(B6, A6, 40000, 81, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_ports() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | IN_CIDR);
    f.cidr(SET_IN, a6(EXT6), 128, ranges(&[(UDP, 53, 53)]));
    let mut ip = V6::new(EXT6, A6);
    ip.ext = vec![Ext::HopByHop, Ext::DestOpts];
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&udp(40000, 53))),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&udp(40000, 54))),
        Reason::DenyPolicy
    );
    ip.ext = vec![Ext::HopByHop, Ext::Routing, Ext::Ah, Ext::DestOpts];
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&udp(40001, 53))),
        Reason::AllowCidr
    );
}

#[test]
fn ipv6_too_many_extension_headers_is_malformed() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | IN_CIDR);
    f.cidr(SET_IN, a6(EXT6), 128, all());
    let mut ip = V6::new(EXT6, A6);
    ip.ext = vec![
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::DestOpts,
        Ext::DestOpts,
        Ext::DestOpts,
        Ext::DestOpts,
        Ext::DestOpts,
    ];
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&udp(40000, 53))),
        Reason::DenyMalformed
    );
}

#[test]
fn ipv4_mapped_addresses_in_ipv6_are_malformed() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    let mapped = A4.to_ipv6_mapped();
    assert_eq!(
        f.verdict(Egress, &tcp6(mapped, B6, 40000, 80, SYN)),
        Reason::DenyMalformed
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(B6, mapped, 40000, 80, SYN)),
        Reason::DenyMalformed
    );
}

#[test]
fn icmpv6_neighbour_discovery_passes() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | ISO_EG);
    let ll_pod: Ipv6Addr = "fe80::2".parse().expect("addr");
    let ll_node: Ipv6Addr = "fe80::1".parse().expect("addr");
    let solicited: Ipv6Addr = "ff02::1:ff00:10".parse().expect("addr");
    let mut ns = V6::new(ll_node, solicited);
    ns.hop_limit = 255;
    let ns_l4 = icmp_raw(true, 135, 0, [0; 4], &A6.octets());
    assert_eq!(
        f.verdict(Ingress, &ns.frame(&ns_l4)),
        Reason::AllowLinkLocal
    );
    // A neighbour solicitation to the pod's global address (unreachability detection).
    let mut nud = V6::new(ll_node, A6);
    nud.hop_limit = 255;
    assert_eq!(
        f.verdict(Ingress, &nud.frame(&ns_l4)),
        Reason::AllowLinkLocal
    );
    // The advertisement back, from the pod's global address.
    let mut na = V6::new(A6, ll_node);
    na.hop_limit = 255;
    let na_l4 = icmp_raw(true, 136, 0, [0x60, 0, 0, 0], &A6.octets());
    assert_eq!(f.verdict(Egress, &na.frame(&na_l4)), Reason::AllowLinkLocal);
    // Router solicitation from the link-local address.
    let mut rs = V6::new(ll_pod, "ff02::2".parse().expect("addr"));
    rs.hop_limit = 255;
    assert_eq!(
        f.verdict(Egress, &rs.frame(&icmp_raw(true, 133, 0, [0; 4], &[]))),
        Reason::AllowLinkLocal
    );
    // ND that was routed (hop limit < 255) is judged like anything else.
    nud.hop_limit = 64;
    assert_eq!(f.verdict(Ingress, &nud.frame(&ns_l4)), Reason::DenyPolicy);
}

#[test]
fn link_local_source_serves_neighbour_discovery_only() {
    let f = fixture();
    let ll_pod: Ipv6Addr = "fe80::2".parse().expect("addr");
    let ll_node: Ipv6Addr = "fe80::1".parse().expect("addr");
    for dst in ["ff02::fb".parse().expect("a"), ll_node, EXT6] {
        assert_eq!(
            f.verdict(Egress, &tcp6(ll_pod, dst, 5353, 5353, 0)),
            Reason::DenySpoofed,
            "{dst}"
        );
        assert_eq!(
            f.verdict(Egress, &V6::new(ll_pod, dst).frame(&udp(5353, 5353))),
            Reason::DenySpoofed,
            "{dst}"
        );
    }
    // Multicast listener reports (hop limit 1) and ND still flow.
    let mut mld = V6::new(ll_pod, "ff02::16".parse().expect("a"));
    mld.hop_limit = 1;
    assert_eq!(
        f.verdict(Egress, &mld.frame(&icmp_raw(true, 143, 0, [0; 4], &[]))),
        Reason::AllowLinkLocal
    );
    // Echo to the node's link-local address is not link control.
    assert_eq!(
        f.verdict(
            Egress,
            &V6::new(ll_pod, ll_node).frame(&echo_request(true, 7))
        ),
        Reason::DenySpoofed
    );
}

// ================= IPv4 options =================

#[test]
fn ipv4_options_are_skipped_to_the_ports() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    let mut ip = V4::new(B4, A4);
    // Record-route option, 11 bytes (padded to 12): IHL 8.
    ip.options = vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&tcp(40000, 80, SYN))),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&tcp(40001, 81, SYN))),
        Reason::DenyPolicy
    );
}

#[test]
fn ipv4_ihl_below_five_is_malformed() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    let mut ip = V4::new(B4, A4);
    ip.ihl = Some(4);
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&tcp(40000, 80, SYN))),
        Reason::DenyMalformed
    );
    // Not isolated in this direction: passes (and is counted as such).
    f.endpoint(a4(A4), ISO_EG);
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&tcp(40000, 80, SYN))),
        Reason::AllowNotIsolated
    );
}

#[test]
fn ipv4_total_length_beyond_the_frame_is_malformed() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    let mut ip = V4::new(B4, A4);
    ip.tot_len = Some(1400);
    assert_eq!(
        f.verdict(Ingress, &ip.frame(&tcp(40000, 80, SYN))),
        Reason::DenyMalformed
    );
}

// ================= fragments =================

#[test]
fn ipv4_fragments_follow_their_first_fragment() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(UDP, 53, 53)]));
    let mut first = V4::new(B4, A4);
    first.id = 0x1111;
    first.more_fragments = true;
    assert_eq!(
        f.verdict(Ingress, &first.frame(&udp(40000, 53))),
        Reason::AllowIdentity
    );
    let fk = FragKey {
        src: a4(B4),
        dst: a4(A4),
        id: 0x1111,
        proto: UDP,
        _pad: [0; 3],
    };
    assert!(
        f.maps.fragment_get(&fk).is_some(),
        "first fragment recorded"
    );
    let mut rest = first.clone();
    rest.frag_offset = 185;
    let payload = L4 {
        proto: UDP,
        bytes: vec![0xab; 64],
    };
    assert_eq!(
        f.verdict(Ingress, &rest.frame(&payload)),
        Reason::AllowFragment
    );
    rest.more_fragments = false;
    assert_eq!(
        f.verdict(Ingress, &rest.frame(&payload)),
        Reason::AllowFragment
    );
}

#[test]
fn ipv4_fragment_of_a_denied_datagram_is_dropped() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(UDP, 53, 53)]));
    let mut first = V4::new(B4, A4);
    first.id = 0x2222;
    first.more_fragments = true;
    assert_eq!(
        f.verdict(Ingress, &first.frame(&udp(40000, 54))),
        Reason::DenyPolicy
    );
    let mut rest = first.clone();
    rest.frag_offset = 185;
    let payload = L4 {
        proto: UDP,
        bytes: vec![0; 64],
    };
    assert_eq!(
        f.verdict(Ingress, &rest.frame(&payload)),
        Reason::DenyFragment
    );
}

#[test]
fn ipv4_fragment_passes_where_not_isolated() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG);
    let mut rest = V4::new(B4, A4);
    rest.frag_offset = 100;
    let payload = L4 {
        proto: TCP,
        bytes: vec![0; 64],
    };
    assert_eq!(
        f.verdict(Ingress, &rest.frame(&payload)),
        Reason::AllowNotIsolated
    );
}

#[test]
fn ipv6_fragments_follow_their_first_fragment() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 64, ranges(&[(UDP, 4789, 4789)]));
    let mut first = V6::new(A6, EXT6);
    first.ext = vec![Ext::Fragment {
        offset: 0,
        more: true,
        id: 0xdead_beef,
    }];
    assert_eq!(
        f.verdict(Egress, &first.frame(&udp(40000, 4789))),
        Reason::AllowCidr
    );
    let mut rest = V6::new(A6, EXT6);
    rest.ext = vec![Ext::Fragment {
        offset: 181,
        more: false,
        id: 0xdead_beef,
    }];
    let payload = L4 {
        proto: UDP,
        bytes: vec![0; 64],
    };
    assert_eq!(
        f.verdict(Egress, &rest.frame(&payload)),
        Reason::AllowFragment
    );
    // Another datagram's trailing fragment, never seen its head: dropped.
    rest.ext = vec![Ext::Fragment {
        offset: 181,
        more: false,
        id: 0x0bad_f00d,
    }];
    assert_eq!(
        f.verdict(Egress, &rest.frame(&payload)),
        Reason::DenyFragment
    );
}

#[test]
fn ipv6_first_fragment_is_judged_on_its_ports() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 64, ranges(&[(UDP, 4789, 4789)]));
    let mut first = V6::new(A6, EXT6);
    first.ext = vec![
        Ext::HopByHop,
        Ext::Fragment {
            offset: 0,
            more: true,
            id: 7,
        },
    ];
    assert_eq!(
        f.verdict(Egress, &first.frame(&udp(40000, 4790))),
        Reason::DenyPolicy
    );
    let mut rest = V6::new(A6, EXT6);
    rest.ext = vec![Ext::Fragment {
        offset: 181,
        more: false,
        id: 7,
    }];
    assert_eq!(
        f.verdict(
            Egress,
            &rest.frame(&L4 {
                proto: UDP,
                bytes: vec![0; 64]
            })
        ),
        Reason::DenyFragment
    );
}

// ================= truncation at every layer =================

/// A pod isolated both ways, so every truncated packet must be dropped as malformed.
fn truncated(frame: Vec<u8>, len: usize, dir: Direction) -> Reason {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | IN_CIDR | EG_CIDR);
    f.endpoint(a6(A6), ISO_IN | ISO_EG | IN_CIDR | EG_CIDR);
    f.cidr(SET_IN, a4(Ipv4Addr::UNSPECIFIED), 0, all());
    f.cidr(SET_EG, a4(Ipv4Addr::UNSPECIFIED), 0, all());
    f.cidr(SET_IN, a6(Ipv6Addr::UNSPECIFIED), 0, all());
    f.cidr(SET_EG, a6(Ipv6Addr::UNSPECIFIED), 0, all());
    // The whole packet is allowed: only the cut can make it a drop.
    assert!(f.verdict(dir, &frame).is_allow());
    f.verdict(dir, &truncate_consistent(frame, len))
}

/// Runs a frame the kernel's test-run refuses (it pulls the L3 header it names before the
/// program runs), so no such frame reaches the program that way.
fn kernel_refuses(frame: &[u8]) -> bool {
    let f = fixture();
    let prog = f.dp.program(PROG_FROM_POD).expect("program");
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    prog.test_run(opts).is_err()
}

#[test]
fn truncated_ethernet_header_is_rejected_by_the_kernel() {
    // Shorter than an Ethernet header never reaches a TC program.
    assert!(kernel_refuses(&arp()[..13]));
    // An IPv4 ethertype with less than an IPv4 header behind it: refused too.
    assert!(kernel_refuses(&truncate(
        tcp4(A4, B4, 40000, 80, SYN),
        14 + 19
    )));
}

#[test]
fn ip_version_not_matching_the_ethertype_is_malformed() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    let mut frame = tcp4(A4, B4, 40000, 80, SYN);
    frame[14] = 0x65; // version 6 behind an IPv4 ethertype
    assert_eq!(f.verdict(Egress, &frame), Reason::DenyMalformed);
}

#[test]
fn truncated_ipv4_header_is_malformed() {
    // The IHL promises 40 bytes of options the frame does not have.
    let mut ip = V4::new(A4, B4);
    ip.ihl = Some(15);
    let frame = ip.frame(&tcp(40000, 80, SYN));
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_EG);
    assert_eq!(f.verdict(Egress, &frame), Reason::DenyMalformed);
}

#[test]
fn truncated_ipv6_header_is_malformed() {
    assert!(kernel_refuses(&truncate(
        tcp6(A6, B6, 40000, 80, SYN),
        14 + 39
    )));
    // A payload length beyond the frame.
    let mut frame = tcp6(A6, B6, 40000, 80, SYN);
    frame[18..20].copy_from_slice(&1000u16.to_be_bytes());
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_EG);
    assert_eq!(f.verdict(Egress, &frame), Reason::DenyMalformed);
}

#[test]
fn truncated_ipv6_extension_header_is_malformed() {
    let mut ip = V6::new(A6, B6);
    ip.ext = vec![Ext::HopByHop, Ext::DestOpts];
    // Cut in the middle of the destination options header.
    assert_eq!(
        truncated(ip.frame(&tcp(40000, 80, SYN)), 14 + 40 + 8 + 1, Egress),
        Reason::DenyMalformed
    );
}

#[test]
fn truncated_tcp_header_is_malformed() {
    assert_eq!(
        truncated(tcp4(A4, B4, 40000, 80, SYN), 14 + 20 + 19, Egress),
        Reason::DenyMalformed
    );
    assert_eq!(
        truncated(tcp6(B6, A6, 40000, 80, SYN), 14 + 40 + 10, Ingress),
        Reason::DenyMalformed
    );
}

#[test]
fn truncated_udp_header_is_malformed() {
    assert_eq!(
        truncated(udp4(B4, A4, 40000, 53), 14 + 20 + 7, Ingress),
        Reason::DenyMalformed
    );
}

#[test]
fn truncated_sctp_header_is_malformed() {
    let frame = V4::new(A4, B4).frame(&sctp(40000, 5000));
    assert_eq!(
        truncated(frame, 14 + 20 + 11, Egress),
        Reason::DenyMalformed
    );
}

#[test]
fn truncated_icmp_header_is_malformed() {
    let frame = V4::new(A4, B4).frame(&echo_request(false, 9));
    assert_eq!(truncated(frame, 14 + 20 + 7, Egress), Reason::DenyMalformed);
    let frame6 = V6::new(A6, B6).frame(&echo_request(true, 9));
    assert_eq!(
        truncated(frame6, 14 + 40 + 3, Egress),
        Reason::DenyMalformed
    );
}

#[test]
fn truncated_packet_passes_where_not_isolated() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    let frame = truncate_consistent(tcp4(A4, B4, 40000, 80, SYN), 14 + 20 + 10);
    assert_eq!(f.verdict(Egress, &frame), Reason::AllowNotIsolated);
}

// ================= ICMP =================

#[test]
fn icmp_echo_needs_a_rule_without_ports_and_its_reply_is_established() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_EG, ID_B, ranges(&[(TCP, 1, 65535), (UDP, 1, 65535)]));
    let req = V4::new(A4, B4).frame(&echo_request(false, 77));
    assert_eq!(
        f.verdict(Egress, &req),
        Reason::DenyPolicy,
        "ICMP is not subject to port rules"
    );
    f.rule(SET_EG, ID_B, all());
    assert_eq!(f.verdict(Egress, &req), Reason::AllowIdentity);
    let reply = V4::new(B4, A4).frame(&echo_reply(false, 77));
    assert_eq!(f.verdict(Ingress, &reply), Reason::AllowEstablished);
    let other = V4::new(B4, A4).frame(&echo_reply(false, 78));
    assert_eq!(f.verdict(Ingress, &other), Reason::DenyPolicy);
}

#[test]
fn icmpv6_echo_reply_is_established() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 128, all());
    assert_eq!(
        f.verdict(Egress, &V6::new(A6, EXT6).frame(&echo_request(true, 5))),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &V6::new(EXT6, A6).frame(&echo_reply(true, 5))),
        Reason::AllowEstablished
    );
}

#[test]
fn icmp_error_quoting_an_allowed_flow_is_related() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    let out = V4::new(A4, EXT4).packet(&udp(44000, 9999));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &out)), Reason::AllowCidr);
    // Port unreachable from the host, and fragmentation needed from a router on the way.
    let unreach = V4::new(EXT4, A4).frame(&icmp_error(false, 3, 3, &out[..28]));
    assert_eq!(f.verdict(Ingress, &unreach), Reason::AllowRelated);
    let frag_needed = V4::new(ROUTER4, A4).frame(&icmp_error(false, 3, 4, &out));
    assert_eq!(f.verdict(Ingress, &frag_needed), Reason::AllowRelated);
    let ttl = V4::new(ROUTER4, A4).frame(&icmp_error(false, 11, 0, &out[..28]));
    assert_eq!(f.verdict(Ingress, &ttl), Reason::AllowRelated);
}

#[test]
fn icmp_error_quoting_an_unknown_flow_is_unrelated() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    let out = V4::new(A4, EXT4).packet(&udp(44000, 9999));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &out)), Reason::AllowCidr);
    let never_sent = V4::new(A4, EXT4).packet(&udp(44001, 9999));
    let e = V4::new(EXT4, A4).frame(&icmp_error(false, 3, 3, &never_sent[..28]));
    assert_eq!(f.verdict(Ingress, &e), Reason::DenyUnrelated);
    // The quoted packet cut before its ports: undecidable, dropped.
    let short = V4::new(EXT4, A4).frame(&icmp_error(false, 3, 3, &out[..22]));
    assert_eq!(f.verdict(Ingress, &short), Reason::DenyMalformed);
}

#[test]
fn icmp_error_about_an_inbound_flow_leaves_the_pod() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | IN_CIDR);
    f.cidr(SET_IN, a4(EXT4), 32, ranges(&[(UDP, 161, 161)]));
    let inbound = V4::new(EXT4, A4).packet(&udp(45000, 161));
    assert_eq!(
        f.verdict(Ingress, &eth(0x0800, &inbound)),
        Reason::AllowCidr
    );
    let err = V4::new(A4, EXT4).frame(&icmp_error(false, 3, 3, &inbound[..28]));
    assert_eq!(f.verdict(Egress, &err), Reason::AllowRelated);
}

// ================= the adversary: spoofed sources, forged ICMP errors =================

/// Another local pod, B, behind another interface than the test runs' (its binding).
const OTHER_IFINDEX: u32 = 77;

fn other_pod(f: &mut Fixture, addr: Addr, flags: u32) {
    f.maps.bind(OTHER_IFINDEX, &[addr]).expect("bind");
    f.maps
        .set_local_endpoint(
            EndpointKey { addr },
            EndpointValue {
                endpoint_id: 8,
                ingress_policy_set: SET_IN,
                egress_policy_set: SET_EG,
                flags,
            },
        )
        .expect("endpoint");
}

#[test]
fn a_pod_sending_as_another_local_pod_is_dropped_before_conntrack() {
    let mut f = fixture();
    // A (the test runs' interface) and B (another interface), neither isolated; B has a
    // live connection to an external host.
    f.endpoint(a4(A4), 0);
    f.endpoint(a6(A6), 0);
    other_pod(&mut f, a4(B4), 0);
    other_pod(&mut f, a6(B6), 0);
    f.ipcache(a4(EXT4), 0);
    f.ipcache(a6(EXT6), 0);
    // A's own packets pass.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
    // As B, over TCP and UDP, both families: spoofed, whatever B may do.
    for frame in [
        tcp4(B4, EXT4, 40000, 80, SYN),
        udp4(B4, EXT4, 40000, 53),
        tcp6(B6, EXT6, 40000, 80, SYN),
        V6::new(B6, EXT6).frame(&udp(40000, 53)),
        // As the node, or as an address nobody has.
        tcp4(NODE4, EXT4, 40000, 80, SYN),
        tcp4(Ipv4Addr::new(198, 18, 0, 99), EXT4, 40000, 80, SYN),
    ] {
        assert_eq!(f.verdict(Egress, &frame), Reason::DenySpoofed);
    }
    // Replaying into B's live connection: its conntrack entry is never reached.
    f.endpoint(a4(A4), ISO_EG);
    other_pod(&mut f, a4(B4), ISO_IN | IN_CIDR);
    f.cidr(SET_IN, a4(EXT4), 32, all());
    // (Decided where it enters the node: B's own interface is not the test runs'.)
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(EXT4, B4, 50000, 22, SYN)),
        Reason::AllowCidr
    );
    assert!(f.ct(a4(EXT4), a4(B4), 50000, 22, TCP).is_some());
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, EXT4, 22, 50000, ACK | PSH)),
        Reason::DenySpoofed
    );
    // The same reply from B's own interface is established (B's binding is what counts).
    f.maps.bind(TEST_RUN_IFINDEX, &[a4(B4)]).expect("bind");
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, EXT4, 22, 50000, ACK | PSH)),
        Reason::AllowEstablished
    );
}

#[test]
fn a_removed_binding_stops_vouching_for_the_cached_endpoint() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    f.ipcache(a4(EXT4), 0);
    let frame = tcp4(A4, EXT4, 40000, 80, SYN);
    // Twice: the second is served from this CPU's cache of the interface.
    assert_eq!(f.verdict(Egress, &frame), Reason::AllowNotIsolated);
    assert_eq!(f.verdict(Egress, &frame), Reason::AllowNotIsolated);
    let k = policy_common::BindingKey {
        ifindex: TEST_RUN_IFINDEX,
        addr: a4(A4),
    };
    f.maps.set_bindings(&[], &[k]).expect("unbind");
    assert_eq!(f.verdict(Egress, &frame), Reason::DenySpoofed);
}

#[test]
fn an_uplink_drops_a_local_pods_address_from_outside() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    f.endpoint(a6(A6), ISO_IN);
    other_pod(&mut f, a4(B4), ISO_IN | IN_CIDR);
    f.cidr(SET_IN, a4(A4), 32, all());
    // From outside the node as A (a local pod) to B: B's ingress admits A, yet it is spoofed.
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::DenySpoofed
    );
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp6(A6, EXT6, 40000, 80, SYN)),
        Reason::DenySpoofed
    );
    // A's own traffic leaving through the uplink is not.
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
}

#[test]
fn an_icmp_error_must_come_back_the_way_its_quoted_packet_went() {
    let mut f = fixture();
    // A (isolated both ways) has a flow out to EXT, and one to B, a pod on this node.
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    f.cidr(SET_EG, a4(B4), 32, all());
    other_pod(&mut f, a4(B4), 0);
    f.maps.set_identity(a4(NODE4), IDENTITY_HOST).expect("node");
    let out = V4::new(A4, EXT4).packet(&udp(44000, 9999));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &out)), Reason::AllowCidr);
    let local = V4::new(A4, B4).packet(&udp(44001, 9999));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &local)), Reason::AllowCidr);
    let err = |from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]| {
        V4::new(from, to).frame(&icmp_error(false, 3, 4, &quoted[..28]))
    };
    for (from, quoted, want, why) in [
        (EXT4, &out, Reason::AllowRelated, "the far end"),
        (
            ROUTER4,
            &out,
            Reason::AllowRelated,
            "a router beyond the node",
        ),
        (NODE4, &out, Reason::AllowRelated, "the node itself"),
        (
            B4,
            &out,
            Reason::DenyUnrelated,
            "another local pod, not on the path",
        ),
        // A flow to a pod on this node has no router but the node on its path.
        (B4, &local, Reason::AllowRelated, "the local peer itself"),
        (
            NODE4,
            &local,
            Reason::AllowRelated,
            "the node, for a local flow",
        ),
        (
            ROUTER4,
            &local,
            Reason::DenyUnrelated,
            "a router, for a local flow",
        ),
        (
            EXT4,
            &local,
            Reason::DenyUnrelated,
            "an outsider, for a local flow",
        ),
    ] {
        assert_eq!(f.verdict(Ingress, &err(from, A4, quoted)), want, "{why}");
    }
    // Quoting a packet A never sent as its source (addressed to A, quoting EXT's flow).
    let theirs = V4::new(EXT4, A4).packet(&udp(9999, 44000));
    assert_eq!(
        f.verdict(Ingress, &err(EXT4, A4, &theirs)),
        Reason::DenyUnrelated
    );
    // The same over IPv6: packet too big from a host not on the path.
    f.endpoint(a6(A6), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 128, all());
    other_pod(&mut f, a6(B6), 0);
    let out6 = V6::new(A6, EXT6).packet(&tcp(46000, 443, ACK));
    assert_eq!(f.verdict(Egress, &eth(0x86DD, &out6)), Reason::AllowCidr);
    let ptb = |from: Ipv6Addr| {
        V6::new(from, A6).frame(&icmp_raw(true, 2, 0, 1280u32.to_be_bytes(), &out6))
    };
    assert_eq!(f.verdict(Ingress, &ptb(EXT6)), Reason::AllowRelated);
    assert_eq!(f.verdict(Ingress, &ptb(B6)), Reason::DenyUnrelated);
}

/// A serves EXT (its ingress admits it); its egress admits only the flood's range, so its
/// packets to EXT pass only as replies. B may send anything into the flood's range. A's
/// connection from EXT is open (SYN, SYN-ACK). Returns the flood's range.
fn flood_setup(f: &mut Fixture) -> Ipv4Addr {
    f.endpoint(a4(A4), ISO_IN | ISO_EG | IN_CIDR | EG_CIDR);
    f.endpoint_id(a4(B4), 9, ISO_EG | EG_CIDR);
    f.cidr(SET_IN, a4(EXT4), 32, all());
    let flood_net = Ipv4Addr::new(198, 19, 128, 0);
    f.cidr(SET_EG, a4(flood_net), 17, all());
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 50000, 22, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 22, 50000, SYN | ACK)),
        Reason::AllowEstablished
    );
    flood_net
}

/// Another pod floods the node's connection table with ten times its capacity of distinct
/// allowed flows (one packet each, never answered): an established connection of a server
/// isolated for egress keeps its entry, so the server's next packet still passes.
#[test]
fn an_established_connection_survives_a_flood_of_ten_times_the_tables_capacity() {
    let mut f = fixture();
    let flood_net = flood_setup(&mut f);
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 50000, 22, ACK)),
        Reason::AllowEstablished
    );
    // The flood: distinct UDP tuples from B, patched into one frame in place.
    let capacity = policy_common::MAX_CONNTRACK as usize;
    let mut frame = udp4(B4, flood_net, 1024, 1024);
    let prog = f.dp.program(PROG_FROM_POD).expect("program");
    let mut last = (flood_net, 0u16);
    for i in 0..10 * capacity {
        let host = u32::from(flood_net) + (i % 32_768) as u32;
        let port = 1024 + (i / 32_768) as u16;
        frame[30..34].copy_from_slice(&host.to_be_bytes());
        frame[36..38].copy_from_slice(&port.to_be_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        let rc = prog.test_run(opts).expect("run").return_value as i32;
        assert_eq!(rc, TC_ACT_OK, "flood packet {i} is allowed");
        last = (Ipv4Addr::from(host), port);
    }
    assert!(
        f.ct(a4(B4), a4(last.0), 1024, last.1, UDP).is_some(),
        "the flood is recorded"
    );
    // The server's next packet, long after: still the connection's.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 22, 50000, ACK | PSH)),
        Reason::AllowEstablished
    );
}

/// The flood again, but every flow answered (the attacker controls the far end), so its
/// entries are established too: B holds at most its share of each bucket, and A's
/// connection keeps its entry.
#[test]
fn an_answered_flood_takes_no_more_than_its_share_of_the_table() {
    let mut f = fixture();
    let flood_net = flood_setup(&mut f);
    let capacity = policy_common::MAX_CONNTRACK as usize;
    let mut out = udp4(B4, flood_net, 1024, 1024);
    let mut back = udp4(flood_net, B4, 1024, 1024);
    let from_pod = f.dp.program(PROG_FROM_POD).expect("program");
    let to_pod = f.dp.program(PROG_TO_POD).expect("program");
    let run = |prog: &aya::programs::SchedClassifier, frame: &[u8]| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        prog.test_run(opts).expect("run").return_value as i32
    };
    for i in 0..2 * capacity {
        let host = (u32::from(flood_net) + (i % 32_768) as u32).to_be_bytes();
        let port = (1024 + (i / 32_768) as u16).to_be_bytes();
        out[30..34].copy_from_slice(&host);
        out[36..38].copy_from_slice(&port);
        back[26..30].copy_from_slice(&host);
        back[34..36].copy_from_slice(&port);
        assert_eq!(run(from_pod, &out), TC_ACT_OK, "flood packet {i}");
        assert_eq!(run(to_pod, &back), TC_ACT_OK, "its answer {i}");
    }
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 22, 50000, ACK | PSH)),
        Reason::AllowEstablished
    );
}

#[test]
fn icmpv6_packet_too_big_is_related() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 128, all());
    let out = V6::new(A6, EXT6).packet(&tcp(46000, 443, ACK));
    assert_eq!(f.verdict(Egress, &eth(0x86DD, &out)), Reason::AllowCidr);
    let ptb = V6::new(EXT6, A6).frame(&icmp_raw(true, 2, 0, 1280u32.to_be_bytes(), &out));
    assert_eq!(f.verdict(Ingress, &ptb), Reason::AllowRelated);
    let other = V6::new(A6, EXT6).packet(&tcp(46001, 443, ACK));
    let ptb2 = V6::new(EXT6, A6).frame(&icmp_raw(true, 2, 0, 1280u32.to_be_bytes(), &other));
    assert_eq!(f.verdict(Ingress, &ptb2), Reason::DenyUnrelated);
}

#[test]
fn icmp_error_quoting_an_echo_is_related() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, all());
    let ping = V4::new(A4, EXT4).packet(&echo_request(false, 4242));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &ping)), Reason::AllowCidr);
    let ttl = V4::new(ROUTER4, A4).frame(&icmp_error(false, 11, 0, &ping));
    assert_eq!(f.verdict(Ingress, &ttl), Reason::AllowRelated);
}

// ================= events and counters =================

#[test]
fn deny_events_carry_the_tuple_and_are_rate_bounded() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN);
    let mut events = f
        .maps
        .take_events()
        .expect("event reader (first and only taker)");
    events.drain();
    // Burst of 3, a refill rate too slow to matter within the test.
    f.maps.set_event_budget(1, 3).expect("config");
    for i in 0..10u16 {
        assert_eq!(
            f.verdict(Ingress, &tcp4(B4, A4, 50000 + i, 22, SYN)),
            Reason::DenyPolicy
        );
    }
    let got = events.drain();
    assert!(
        (1..=3).contains(&got.len()),
        "at most the burst: {}",
        got.len()
    );
    let e = got[0];
    assert_eq!(e.src, a4(B4));
    assert_eq!(e.dst, a4(A4));
    assert_eq!(e.dst_port, 22);
    assert_eq!(e.proto, TCP);
    assert_eq!(e.direction, Ingress as u8);
    assert_eq!(e.reason, Reason::DenyPolicy as u8);
    assert_eq!(e.endpoint_id, 7);
    // The bucket refills at the configured rate, never above the burst.
    f.maps.set_event_budget(1000, 1).expect("config");
    std::thread::sleep(std::time::Duration::from_millis(20));
    for i in 0..5u16 {
        assert_eq!(
            f.verdict(Ingress, &tcp4(B4, A4, 52000 + i, 22, SYN)),
            Reason::DenyPolicy
        );
    }
    assert_eq!(events.drain().len(), 1, "a burst of 1 after a pause");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 52010, 22, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(events.drain().len(), 1, "refilled after 20 ms at 1000/s");
    // Events off: none at all.
    f.maps.set_event_budget(0, 0).expect("config");
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 51000, 22, SYN)),
        Reason::DenyPolicy
    );
    assert!(events.drain().is_empty());
}

// ================= two-sided grants, services, uplinks =================

const C4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 30);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 5);
const VIP4_OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 6);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 2, 5);
const ID_A: u32 = 301;
const ID_C: u32 = 302;
const SERVICE_RANGES: [&str; 2] = ["198.18.128.0/17", "fd00:18::2:0/112"];

/// The virtual tuples pending under a key (occupied slots): a SYN's sequence number
/// (`by_seq`) or a source port.
fn pending(f: &Fixture, src: Addr, id: u32, proto: u8, by_seq: bool) -> Vec<(Addr, u16)> {
    f.maps
        .pending_get(&PendingKey {
            src,
            id,
            proto,
            by_seq: by_seq as u8,
            _pad: 0,
        })
        .map(|v| {
            v.slots
                .iter()
                .filter(|s| s.seen_ns != 0)
                .map(|s| (s.vip, s.vport))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn from_pod_judges_a_local_destinations_ingress() {
    let mut f = fixture();
    // A open both ways; B isolated for ingress, nothing admits A yet. B's own veth need not
    // have a program: A's hook already refuses.
    f.endpoint_id(a4(A4), 1, 0);
    f.endpoint_id(a4(B4), 2, ISO_IN | IN_ID);
    f.ipcache(a4(A4), ID_A);
    // Refused by B's ingress policy, at A's hook: counted as an ingress deny.
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &tcp4(A4, B4, 40000, 80, SYN)),
        (Ingress, Reason::DenyPolicy)
    );
    assert!(
        f.ct(a4(A4), a4(B4), 40000, 80, TCP).is_none(),
        "a denied flow leaves no entry"
    );
    // A rule admits A: the grant is decided and recorded at A's hook.
    f.rule(SET_IN, ID_A, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    let e = f.ct(a4(A4), a4(B4), 40000, 80, TCP).expect("entry");
    assert_eq!(e.flags & ct_flags::GRANTS, ct_flags::INGRESS_OK);
    assert_eq!(ct::stored_required(&e), ct_flags::INGRESS_OK);
    // B's hook finds the grant; B's reply and A's later packets are established.
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
    // Another port is still refused at A's hook.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40001, 81, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn a_connection_between_two_isolated_pods_needs_both_grants() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_ID);
    f.endpoint_id(a4(B4), 2, ISO_IN | IN_ID);
    f.ipcache(a4(A4), ID_A);
    f.ipcache(a4(B4), ID_B);
    // A's egress admits B, B's ingress does not admit A.
    f.rule(SET_EG, ID_B, all());
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &tcp4(A4, B4, 40000, 80, SYN)),
        (Ingress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(A4, B4, 40000, 80, SYN)),
        (Ingress, Reason::DenyPolicy)
    );
    // Both admit: every hook passes it, replies too.
    f.rule(SET_IN, ID_A, all());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    let e = f.ct(a4(A4), a4(B4), 40000, 80, TCP).expect("entry");
    assert_eq!(e.flags & ct_flags::GRANTS, ct_flags::GRANTS);
    assert_eq!(ct::stored_required(&e), ct_flags::GRANTS);
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 80, 40000, ACK)),
        Reason::AllowEstablished
    );
    // B's ingress alone (A's egress revoked): a new SYN is refused at A's hook.
    f.maps
        .delete_rule(&RuleKey {
            policy_set: SET_EG,
            identity: ID_B,
        })
        .expect("delete");
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(A4, B4, 40001, 80, SYN)),
        (Egress, Reason::DenyPolicy),
        "A's egress refuses, wherever it is judged"
    );
}

#[test]
fn to_pod_decides_the_egress_a_sources_hook_never_saw() {
    let mut f = fixture();
    // A's veth has no program (or the tuple changed after it): B's hook judges A's egress.
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_ID);
    f.endpoint_id(a4(B4), 2, 0);
    f.ipcache(a4(B4), ID_B);
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(A4, B4, 40000, 80, SYN)),
        (Egress, Reason::DenyPolicy)
    );
    f.rule(SET_EG, ID_B, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    let e = f.ct(a4(A4), a4(B4), 40000, 80, TCP).expect("entry");
    assert_eq!(e.flags & ct_flags::GRANTS, ct_flags::EGRESS_OK);
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
}

/// Service ranges set; A (plus `a_flags`) isolated for egress with a rule admitting B (any
/// port), not C; B and C known endpoints, not isolated; no rule names a virtual IP.
fn service_fixture(a_flags: u32) -> MutexGuard<'static, Fixture> {
    let mut f = fixture();
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_ID | a_flags);
    f.endpoint_id(a4(B4), 2, 0);
    f.endpoint_id(a4(C4), 3, 0);
    f.ipcache(a4(B4), ID_B);
    f.ipcache(a4(C4), ID_C);
    f.rule(SET_EG, ID_B, all());
    f
}

#[test]
fn egress_to_a_service_is_deferred_and_judged_on_the_backend() {
    let f = service_fixture(0);

    // A's hook sees the virtual IP: deferred, remembered.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(pending(&f, a4(A4), 1, TCP, true), vec![(a4(VIP4), 8080)]);
    let v = f
        .ct(a4(A4), a4(VIP4), 40000, 8080, TCP)
        .expect("virtual entry");
    assert_eq!(
        v.flags & ct_flags::EGRESS_OK,
        0,
        "not granted before the backend is known"
    );
    assert_eq!(ct::stored_required(&v), ct_flags::EGRESS_OK);
    // Until then a reply from the virtual IP is no reply of a granted connection... but A is
    // not isolated for ingress, so it would pass as new; what matters is the grant:
    // B's hook sees the DNATed packet and judges A's egress on B.
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    let v = f
        .ct(a4(A4), a4(VIP4), 40000, 8080, TCP)
        .expect("virtual entry");
    assert_ne!(
        v.flags & ct_flags::EGRESS_OK,
        0,
        "the virtual tuple was granted too"
    );
    // Replies: B's hook (real tuple), then A's hook after reverse NAT (virtual tuple).
    assert_eq!(
        f.verdict(Egress, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, ACK)),
        Reason::AllowEstablished
    );

    // Another Service whose backend is C: deferred at A, refused at C's hook; the virtual
    // tuple is never granted.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4_OTHER, 40001, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, C4, 40001, 80, SYN)),
        Reason::DenyPolicy
    );
    let v = f
        .ct(a4(A4), a4(VIP4_OTHER), 40001, 8080, TCP)
        .expect("virtual entry");
    assert_eq!(v.flags & ct_flags::EGRESS_OK, 0);
    // Still deferred (not established) on A's next packet, and still refused at C.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4_OTHER, 40001, 8080, ACK)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, C4, 40001, 80, ACK)),
        Reason::DenyPolicy
    );

    // UDP the same way.
    let u = |src, dst, sp, dp| udp4(src, dst, sp, dp);
    assert_eq!(
        f.verdict(Egress, &u(A4, VIP4, 5000, 53)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &u(A4, B4, 5000, 5353)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Egress, &u(B4, A4, 5353, 5000)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &u(VIP4, A4, 53, 5000)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &u(A4, VIP4, 5000, 53)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &u(A4, VIP4_OTHER, 5001, 53)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &u(A4, C4, 5001, 5353)),
        Reason::DenyPolicy
    );
}

fn tcp4_seq(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8, seq: u32) -> Vec<u8> {
    V4::new(src, dst).frame(&tcp_seq(sport, dport, flags, seq))
}

/// The kernel keeps only the whole 4-tuple unique: one client port may address two Services
/// at once. Each backend's hook must grant its own virtual tuple, not the other's (found as
/// a flake: an allowed Service connection whose SYN-ACK was dropped at the client).
#[test]
fn one_client_port_towards_two_services_grants_each_its_own_virtual_tuple() {
    let f = service_fixture(ISO_IN);
    for (vip, seq) in [(VIP4, 100), (VIP4_OTHER, 200)] {
        assert_eq!(
            f.verdict(Egress, &tcp4_seq(A4, vip, 40000, 8080, SYN, seq)),
            Reason::AllowServicePending
        );
    }
    assert_eq!(pending(&f, a4(A4), 100, TCP, true), vec![(a4(VIP4), 8080)]);
    assert_eq!(
        pending(&f, a4(A4), 200, TCP, true),
        vec![(a4(VIP4_OTHER), 8080)]
    );
    // VIP4 -> B (allowed) is judged first, then VIP4_OTHER -> C (refused).
    assert_eq!(
        f.verdict(Ingress, &tcp4_seq(A4, B4, 40000, 80, SYN, 100)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4_seq(A4, C4, 40000, 80, SYN, 200)),
        Reason::DenyPolicy
    );
    assert!(
        virtual_granted(&f, VIP4, 40000),
        "B's hook grants the tuple of B's Service"
    );
    assert!(
        !virtual_granted(&f, VIP4_OTHER, 40000),
        "and not the other Service's"
    );
    assert_eq!(
        pending(&f, a4(A4), 100, TCP, true),
        vec![],
        "a used slot is freed"
    );
    assert_eq!(
        pending(&f, a4(A4), 200, TCP, true),
        vec![(a4(VIP4_OTHER), 8080)]
    );
    // The reverse-NATed SYN-ACK from VIP4 reaches A (isolated for ingress) as the reply it is.
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // A retransmitted SYN towards VIP4_OTHER is deferred again and refused at C again.
    assert_eq!(
        f.verdict(Egress, &tcp4_seq(A4, VIP4_OTHER, 40000, 8080, SYN, 200)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4_seq(A4, C4, 40000, 80, SYN, 200)),
        Reason::DenyPolicy
    );
    assert!(!virtual_granted(&f, VIP4_OTHER, 40000));

    // Five Services from one UDP port: the oldest slot gives way, the newest four are kept.
    for port in 9001..=9005 {
        assert_eq!(
            f.verdict(Egress, &udp4(A4, VIP4, 41000, port)),
            Reason::AllowServicePending
        );
    }
    let mut ports: Vec<u16> = pending(&f, a4(A4), 41000, UDP, false)
        .iter()
        .map(|s| s.1)
        .collect();
    ports.sort();
    assert_eq!(ports, vec![9002, 9003, 9004, 9005]);
}

/// Whether A's conntrack entry of the virtual tuple (A:sport -> vip:8080) holds EGRESS_OK.
fn virtual_granted(f: &Fixture, vip: Ipv4Addr, sport: u16) -> bool {
    f.ct(a4(A4), a4(vip), sport, 8080, TCP)
        .expect("virtual entry")
        .flags
        & ct_flags::EGRESS_OK
        != 0
}

/// DNAT may also move the source port (netfilter does when the translated tuple would clash
/// with a live one, e.g. a recent direct connection from the same port): the SYN's sequence
/// number still finds the virtual tuple, which is granted under the client's original port.
#[test]
fn a_service_syn_whose_source_port_dnat_moved_still_grants_its_virtual_tuple() {
    let mut f = fixture();
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_ID | ISO_IN);
    f.endpoint_id(a4(B4), 2, 0);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_EG, ID_B, all());
    assert_eq!(
        f.verdict(Egress, &tcp4_seq(A4, VIP4, 40000, 8080, SYN, 777)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4_seq(A4, B4, 51234, 80, SYN, 777)),
        Reason::AllowIdentity
    );
    assert!(virtual_granted(&f, VIP4, 40000));
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, ACK)),
        Reason::AllowEstablished
    );
}

/// A UDP socket addressing two Services: after DNAT nothing tells its datagrams apart, so the
/// first allowed backend grants both virtual tuples (replies only); the refused backend still
/// drops every datagram sent to it.
#[test]
fn one_udp_socket_towards_two_services_still_meets_each_backends_verdict() {
    let f = service_fixture(0);
    for vip in [VIP4, VIP4_OTHER] {
        assert_eq!(
            f.verdict(Egress, &udp4(A4, vip, 5000, 53)),
            Reason::AllowServicePending
        );
    }
    assert_eq!(
        f.verdict(Ingress, &udp4(A4, B4, 5000, 5353)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &udp4(VIP4, A4, 53, 5000)),
        Reason::AllowEstablished
    );
    for _ in 0..2 {
        f.verdict(Egress, &udp4(A4, VIP4_OTHER, 5000, 53));
        assert_eq!(
            f.verdict(Ingress, &udp4(A4, C4, 5000, 5353)),
            Reason::DenyPolicy
        );
    }
}

#[test]
fn without_service_ranges_a_virtual_ip_is_judged_as_it_is() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_EG, ID_B, all());
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(pending(&f, a4(A4), 1, TCP, true), vec![]);
    // A pod address is never deferred, even with ranges configured.
    f.service_cidrs(&SERVICE_RANGES);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
    // Ranges are replaced, not added to.
    f.service_cidrs(&[]);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40001, 8080, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn ipv6_service_egress_is_deferred_too() {
    let mut f = fixture();
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a6(A6), 1, ISO_EG | EG_ID);
    f.endpoint_id(a6(B6), 2, 0);
    f.ipcache(a6(B6), ID_B);
    f.rule(SET_EG, ID_B, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Egress, &tcp6(A6, VIP6, 40000, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(A6, B6, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(VIP6, A6, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // The backend port is what egress rules name.
    assert_eq!(
        f.verdict(Egress, &tcp6(A6, VIP6, 40001, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(A6, B6, 40001, 81, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn a_service_with_a_remote_backend_is_judged_at_the_uplink() {
    let mut f = fixture();
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, SYN)),
        Reason::AllowServicePending
    );
    // DNAT sent it out of the node: the uplink's egress program judges A on the backend.
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &tcp4(A4, EXT4, 40000, 80, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(EXT4, A4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // A backend port the rule does not name: dropped on the way out.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40001, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &tcp4(A4, EXT4, 40001, 81, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn uplinks_pass_traffic_that_involves_no_local_endpoint() {
    let mut f = fixture();
    // Endpoints exist and are isolated both ways, but none is involved.
    f.endpoint_id(a4(A4), 1, ISO_IN | ISO_EG);
    f.endpoint_id(a6(A6), 1, ISO_IN | ISO_EG);
    for prog in [PROG_FROM_WORLD, PROG_TO_WORLD] {
        assert_eq!(
            f.verdict_at(prog, &tcp4(EXT4, NODE4, 40000, 22, SYN)),
            Reason::AllowNoEndpoint
        );
        assert_eq!(
            f.verdict_at(prog, &tcp4(NODE4, EXT4, 22, 40000, SYN | ACK)),
            Reason::AllowNoEndpoint
        );
        assert_eq!(
            f.verdict_at(prog, &udp4(ROUTER4, B4, 53, 5000)),
            Reason::AllowNoEndpoint
        );
        assert_eq!(
            f.verdict_at(prog, &tcp6(EXT6, B6, 40000, 443, SYN)),
            Reason::AllowNoEndpoint
        );
        // Even what a pod hook would call malformed is not the uplink's business.
        let bad = truncate_consistent(tcp4(EXT4, NODE4, 40000, 22, SYN), 14 + 20 + 8);
        assert_eq!(f.verdict_at(prog, &bad), Reason::AllowNoEndpoint);
        assert_eq!(f.verdict_at(prog, &arp()), Reason::AllowNonIp);
    }
    assert!(
        f.ct(a4(EXT4), a4(NODE4), 40000, 22, TCP).is_none(),
        "no conntrack for the node's traffic"
    );
}

#[test]
fn from_world_judges_a_local_destinations_ingress() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, ISO_IN | IN_CIDR);
    f.cidr(SET_IN, a4(EXT4), 32, ranges(&[(TCP, 80, 80)]));
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(EXT4, A4, 40000, 80, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, EXT4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &tcp4(A4, EXT4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // A port the rule does not name, and another host: refused at the uplink already.
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(EXT4, A4, 40001, 81, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &tcp4(ROUTER4, A4, 40001, 80, SYN)),
        Reason::DenyPolicy
    );
    // Counted against the local endpoint in the ingress direction.
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &udp4(EXT4, A4, 5000, 80)),
        Reason::DenyPolicy
    );
}

#[test]
fn to_world_judges_egress_not_granted_yet() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, ranges(&[(UDP, 53, 53)]));
    // Granted at A's hook: the uplink finds the grant.
    assert_eq!(
        f.verdict(Egress, &udp4(A4, EXT4, 5000, 53)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &udp4(A4, EXT4, 5000, 53)),
        Reason::AllowEstablished
    );
    // Never seen by A's hook (no program on its veth yet): judged at the uplink.
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &udp4(A4, EXT4, 5001, 54)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict_at(PROG_TO_WORLD, &udp4(A4, EXT4, 5002, 53)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict_at(PROG_FROM_WORLD, &udp4(EXT4, A4, 53, 5002)),
        Reason::AllowEstablished
    );
}

#[test]
fn icmp_error_about_a_deferred_service_flow_is_unrelated_until_granted() {
    let mut f = fixture();
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a4(A4), 1, ISO_EG | ISO_IN | EG_ID);
    f.endpoint_id(a4(B4), 2, 0);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_EG, ID_B, all());
    let quoted = V4::new(A4, VIP4).packet(&tcp(40000, 8080, SYN));
    let err = V4::new(ROUTER4, A4).frame(&icmp_error(false, 3, 1, &quoted));
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(f.verdict(Ingress, &err), Reason::DenyUnrelated);
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(f.verdict(Ingress, &err), Reason::AllowRelated);
}

#[test]
fn isolation_added_later_applies_to_new_connections() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, 0);
    f.endpoint_id(a4(B4), 2, ISO_IN);
    // A connection into A while A is open: recorded (B is isolated for ingress, which this
    // direction does not involve: it needs no grant).
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowNotIsolated
    );
    let e = f.ct(a4(B4), a4(A4), 40000, 80, TCP).expect("entry");
    assert_eq!(ct::stored_required(&e), 0);
    // A becomes isolated for ingress with no rule: the open connection keeps flowing (its
    // entry settles it), a new one is refused, and a new SYN on the old tuple too.
    f.endpoint_id(a4(A4), 1, ISO_IN);
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 80, 40000, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40001, 80, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
}

#[test]
fn the_nodes_own_address_is_never_deferred_as_a_service() {
    let mut f = fixture();
    // The /17 covers the node's address too (a misconfigured range): traffic to the node is
    // delivered locally, no later hook would judge it, so A's hook decides it.
    f.service_cidrs(&SERVICE_RANGES);
    f.endpoint_id(a4(A4), 1, ISO_EG);
    f.ipcache(a4(NODE4), IDENTITY_HOST);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, NODE4, 40000, 80, SYN)),
        Reason::DenyPolicy
    );
    assert_eq!(pending(&f, a4(A4), 1, TCP, true), vec![]);
}

// ================= conntrack tables (set-associative, no helper call) =================

/// `n` UDP (source port, destination port) pairs from `src` to `dst` whose normalised keys
/// fall into one bucket of the table of their family, under the table's seed.
fn same_bucket_ports(f: &Fixture, src: Addr, dst: Addr, n: usize) -> Vec<(u16, u16)> {
    use policy_common::ct_table::{bucket4, bucket6};
    let seed = f.maps.config().expect("config").ct_seed;
    let bucket = |sport: u16, dport: u16| {
        let (k, _): (CtKey, bool) = ct::normalize(src, dst, sport, dport, UDP);
        match k.v4() {
            Some(k4) => bucket4(&k4, seed),
            None => bucket6(&k, seed),
        }
    };
    let want = bucket(1024, 53);
    // About one hit per 64k pairs: the first 16 destination ports give dozens.
    let ports: Vec<(u16, u16)> = (53..69u16)
        .flat_map(|d| (1024..=u16::MAX).map(move |s| (s, d)))
        .filter(|&(s, d)| bucket(s, d) == want)
        .take(n)
        .collect();
    assert_eq!(ports.len(), n, "not enough colliding pairs");
    ports
}

/// A full bucket gives its least recently seen slot to a new connection; the other
/// connections keep theirs (the LRU map's policy, within a bucket). The pod's entries
/// fill its share of the bucket, so the slot is one of its own.
fn full_bucket_evicts_the_least_recently_seen(
    src: Addr,
    dst: Addr,
    frame: impl Fn(u16, u16) -> Vec<u8>,
    reply: impl Fn(u16, u16) -> Vec<u8>,
) {
    use policy_common::ct_table::CT_WAYS;
    let mut f = fixture();
    f.endpoint(src, ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, dst, if src.is_v4() { 32 } else { 128 }, all());
    let ports = same_bucket_ports(&f, src, dst, CT_WAYS + 1);
    for (i, &(sp, dp)) in ports[..CT_WAYS].iter().enumerate() {
        assert_eq!(f.verdict(Egress, &frame(sp, dp)), Reason::AllowCidr);
        if i < 2 {
            // Rewritten by the agent (as seeding does): owned by nobody, so the pod's own
            // share of the bucket (2 slots) leaves room for the next two.
            let (k, _) = ct::normalize(src, dst, sp, dp, UDP);
            let v = f.maps.conntrack_get(&k).expect("entry");
            f.maps.set_conntrack(k, v).expect("rewrite");
            assert_eq!(f.maps.conntrack_get(&k).expect("entry").owner, 0);
        }
    }
    // Make ports[2] the least recently seen of the full bucket.
    let (k, _) = ct::normalize(src, dst, ports[2].0, ports[2].1, UDP);
    let mut v = f.maps.conntrack_get(&k).expect("entry");
    v.last_seen_ns -= 5 * ct::SEC;
    f.maps.set_conntrack(k, v).expect("age the entry");
    let (sp, dp) = ports[CT_WAYS];
    assert_eq!(f.verdict(Egress, &frame(sp, dp)), Reason::AllowCidr);
    for (i, &(sp, dp)) in ports.iter().enumerate() {
        assert_eq!(
            f.ct(src, dst, sp, dp, UDP).is_some(),
            i != 2,
            "{sp}->{dp} (#{i}) after the fifth connection"
        );
    }
    // Each survivor is still found by the kernel: its reply is established.
    for (i, &(sp, dp)) in ports.iter().enumerate().filter(|&(i, _)| i != 2) {
        assert_eq!(
            f.verdict(Ingress, &reply(sp, dp)),
            Reason::AllowEstablished,
            "reply #{i}"
        );
    }
}

#[test]
fn conntrack4_full_bucket_evicts_the_least_recently_seen() {
    full_bucket_evicts_the_least_recently_seen(
        a4(A4),
        a4(EXT4),
        |sp, dp| udp4(A4, EXT4, sp, dp),
        |sp, dp| udp4(EXT4, A4, dp, sp),
    );
}

#[test]
fn conntrack6_full_bucket_evicts_the_least_recently_seen() {
    let udp6 = |s: Ipv6Addr, d: Ipv6Addr, sp, dp| V6::new(s, d).frame(&udp(sp, dp));
    full_bucket_evicts_the_least_recently_seen(
        a6(A6),
        a6(EXT6),
        |sp, dp| udp6(A6, EXT6, sp, dp),
        |sp, dp| udp6(EXT6, A6, dp, sp),
    );
}

/// Entries the agent writes (seeding, migration) are found by the programs, and entries the
/// programs write are read back by the agent, under one hash and slot protocol.
#[test]
fn agent_and_kernel_share_the_conntrack_tables() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG);
    f.endpoint(a6(A6), ISO_IN | ISO_EG);
    let now = f.now();
    // Written under the epoch in force (earlier cases moved it), as the agent's are.
    let epoch = f.maps.config().expect("config").policy_epoch;
    for (src, dst) in [(a4(EXT4), a4(A4)), (a6(EXT6), a6(A6))] {
        let (k, src_is_a) = ct::normalize(src, dst, 40000, 8080, TCP);
        let mut flags = ct::with_epoch(
            ct_flags::INGRESS_OK | (ct_flags::INGRESS_OK << ct_flags::REQ_SHIFT),
            epoch,
        );
        if src_is_a {
            flags |= ct_flags::ORIG_IS_A;
        }
        let v = policy_common::CtValue {
            last_seen_ns: now,
            flags: flags | ct_flags::SEEN_REPLY,
            owner: 0,
        };
        f.maps.set_conntrack(k, v).expect("seed");
        assert_eq!(f.maps.conntrack_get(&k), Some(v));
    }
    // No policy admits EXT: only the seeded entries pass these.
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 8080, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(EXT6, A6, 40000, 8080, ACK)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40001, 8080, ACK)),
        Reason::DenyPolicy
    );
    // What the kernel refreshed, the agent reads: the reply set the TCP flags it saw.
    let got = f.ct(a4(EXT4), a4(A4), 40000, 8080, TCP).expect("entry");
    assert!(got.last_seen_ns >= now, "{got:?}");
    f.maps.clear_all().expect("clear");
    assert_eq!(f.ct(a4(EXT4), a4(A4), 40000, 8080, TCP), None);
    f.endpoint(a4(A4), ISO_IN | ISO_EG);
    assert_eq!(
        f.verdict(Ingress, &tcp4(EXT4, A4, 40000, 8080, ACK)),
        Reason::DenyPolicy
    );
}

// ================= the per-interface endpoint cache =================

/// The hook's own endpoint is cached per CPU and interface; any `ENDPOINTS` change retires
/// the cached copy before the next packet (here: isolation switched on, then the endpoint
/// removed), and the cache never answers for another address on the same interface.
#[test]
fn own_endpoint_cache_follows_every_endpoints_change() {
    let mut f = fixture();
    f.endpoint(a4(A4), 0);
    let pkt = udp4(A4, EXT4, 43100, 53);
    assert_eq!(f.verdict(Egress, &pkt), Reason::AllowNotIsolated);
    assert_eq!(f.verdict(Egress, &pkt), Reason::AllowEstablished);
    f.endpoint(a4(A4), ISO_EG);
    assert_eq!(
        f.verdict(Egress, &udp4(A4, EXT4, 43101, 53)),
        Reason::DenyPolicy
    );
    // Another address behind the same interface (spoofing): not served from the cache.
    assert_eq!(
        f.verdict(Egress, &udp4(B4, EXT4, 43102, 53)),
        Reason::DenySpoofed
    );
    f.maps
        .delete_endpoint(&EndpointKey { addr: a4(A4) })
        .expect("delete");
    assert_eq!(
        f.verdict(Egress, &udp4(A4, EXT4, 43103, 53)),
        Reason::DenyUnknownEndpoint
    );
    let before = f.maps.config().expect("config").endpoints_gen;
    f.endpoint(a4(A4), 0);
    assert_ne!(f.maps.config().expect("config").endpoints_gen, before);
    assert_eq!(
        f.verdict(Ingress, &udp4(EXT4, A4, 53, 43104)),
        Reason::AllowNotIsolated
    );
}

/// The verifier's cost of each program, against its 1M-instruction limit: printed for every
/// CI run, so a change that eats the headroom is seen before a load fails.
#[test]
fn every_program_verifies_below_the_instruction_limit() {
    let f = fixture();
    for (name, n) in f.dp.verifier_cost() {
        let n = n.unwrap_or_else(|| panic!("{name}: the kernel reports no verified_insns"));
        eprintln!(
            "verifier: {name:>14} {n:>8} instructions ({:.1} % of 1M)",
            n as f64 / 1e4
        );
        assert!(n < 1_000_000, "{name}: {n}");
    }
}

// ================= revalidation (the policy epoch) =================

impl Fixture {
    /// Moves the policy epoch, as the agent does after a map write.
    fn bump(&mut self) {
        self.maps
            .bump_policy_epoch()
            .expect("bump the policy epoch");
    }

    /// Whether the tuple's entry was decided under the epoch in force.
    fn current(&self, src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> bool {
        let e = self.ct(src, dst, sport, dport, proto).expect("entry");
        let epoch = self.maps.config().expect("config").policy_epoch;
        ct::current(&e, epoch)
    }
}

#[test]
fn a_policy_change_cuts_an_open_connection_both_ways_and_admits_it_again() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    let rule = RuleKey {
        policy_set: SET_IN,
        identity: ID_B,
    };
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 80, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // A bump that changes nothing: judged again, admitted, stamped.
    f.bump();
    assert!(!f.current(a4(B4), a4(A4), 40000, 80, TCP));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::AllowIdentity,
        "judged again as a new connection"
    );
    assert!(f.current(a4(B4), a4(A4), 40000, 80, TCP));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );

    // The rule goes and the epoch moves: the client's packets and the server's are refused.
    f.maps.delete_rule(&rule).expect("delete");
    f.bump();
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::DenyPolicy
    );
    // The server's push is a reply on a stale entry: `rejudge` judges the connection from
    // B's side, and A's ingress refuses it.
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &tcp4(A4, B4, 80, 40000, ACK | PSH)),
        (Ingress, Reason::DenyPolicy)
    );
    // The entry stays, stale, its old grant kept: each packet is judged again.
    let e = f.ct(a4(B4), a4(A4), 40000, 80, TCP).expect("entry");
    assert_ne!(e.flags & ct_flags::INGRESS_OK, 0);
    assert!(!f.current(a4(B4), a4(A4), 40000, 80, TCP));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::DenyPolicy
    );

    // Admitted again: the server's retransmission first (through `rejudge`, counted in the
    // hook's direction), then the client's.
    f.rule(SET_IN, ID_B, ranges(&[(TCP, 80, 80)]));
    f.bump();
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, B4, 80, 40000, ACK | PSH)),
        Reason::AllowEstablished
    );
    assert!(f.current(a4(B4), a4(A4), 40000, 80, TCP));
    assert_eq!(
        f.verdict(Ingress, &tcp4(B4, A4, 40000, 80, ACK)),
        Reason::AllowEstablished
    );
}

#[test]
fn the_replies_of_an_egress_isolated_server_are_no_new_connections() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | IN_ID);
    f.ipcache(a4(B4), ID_B);
    f.rule(SET_IN, ID_B, ranges(&[(UDP, 53, 53)]));
    assert_eq!(
        f.verdict(Ingress, &udp4(B4, A4, 40000, 53)),
        Reason::AllowIdentity
    );
    // A becomes isolated for egress with no rule, and answers first after the change.
    f.endpoint(a4(A4), ISO_IN | IN_ID | ISO_EG);
    f.bump();
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 53, 40000)),
        Reason::AllowEstablished
    );
    assert_eq!(
        f.verdict(Ingress, &udp4(B4, A4, 40000, 53)),
        Reason::AllowEstablished
    );
    // A's own new flow is refused.
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 53, 40001)),
        Reason::DenyPolicy
    );
}

#[test]
fn an_ipv6_connection_opened_by_a_pod_follows_its_egress_policy() {
    let mut f = fixture();
    f.endpoint(a6(A6), ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a6(EXT6), 128, ranges(&[(TCP, 443, 443)]));
    assert_eq!(
        f.verdict(Egress, &tcp6(A6, EXT6, 41000, 443, SYN)),
        Reason::AllowCidr
    );
    assert_eq!(
        f.verdict(Ingress, &tcp6(EXT6, A6, 443, 41000, SYN | ACK)),
        Reason::AllowEstablished
    );
    // The CIDR rule now excepts the peer (a longer prefix with nothing allowed).
    f.cidr(SET_EG, a6(EXT6), 128, nothing());
    f.bump();
    // The peer speaks first: its packet is refused by A's egress, judged from A's side.
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp6(EXT6, A6, 443, 41000, ACK | PSH)),
        (Egress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict(Egress, &tcp6(A6, EXT6, 41000, 443, ACK)),
        Reason::DenyPolicy
    );
}

#[test]
fn a_service_connection_is_judged_again_on_its_backend() {
    let mut f = service_fixture(0);
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, SYN)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, SYN)),
        Reason::AllowIdentity
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, SYN | ACK)),
        Reason::AllowEstablished
    );
    f.bump();
    // A reply from the virtual IP passes on the backend's judged tuple...
    assert_eq!(
        f.verdict(Ingress, &tcp4(VIP4, A4, 8080, 40000, ACK)),
        Reason::AllowEstablished
    );
    // ...and the client's next packet is deferred past DNAT again, judged on the backend,
    // which grants the virtual tuple under the new epoch.
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, ACK)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict(Ingress, &tcp4(A4, B4, 40000, 80, ACK)),
        Reason::AllowIdentity
    );
    assert!(f.current(a4(A4), a4(VIP4), 40000, 8080, TCP));
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, ACK)),
        Reason::AllowEstablished
    );
    // A's egress no longer admits the backend: refused at the backend's hook, both ways.
    f.maps
        .delete_rule(&RuleKey {
            policy_set: SET_EG,
            identity: ID_B,
        })
        .expect("delete");
    f.bump();
    assert_eq!(
        f.verdict(Egress, &tcp4(A4, VIP4, 40000, 8080, ACK)),
        Reason::AllowServicePending
    );
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(A4, B4, 40000, 80, ACK)),
        (Egress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &tcp4(B4, A4, 80, 40000, ACK | PSH)),
        (Egress, Reason::DenyPolicy)
    );
}

#[test]
fn an_icmp_error_relates_only_to_a_connection_of_the_epoch_in_force() {
    let mut f = fixture();
    f.endpoint(a4(A4), ISO_IN | ISO_EG | EG_CIDR);
    f.cidr(SET_EG, a4(EXT4), 32, ranges(&[(UDP, 53, 53)]));
    let quoted = V4::new(A4, EXT4).packet(&udp(41000, 53));
    assert_eq!(f.verdict(Egress, &eth(0x0800, &quoted)), Reason::AllowCidr);
    let err = V4::new(EXT4, A4).frame(&icmp_error(false, 3, 3, &quoted[..28]));
    assert_eq!(f.verdict(Ingress, &err), Reason::AllowRelated);
    f.maps
        .delete_cidr_rule(LpmKey {
            prefixlen: cidr_prefixlen(true, 32),
            data: CidrData::new(SET_EG, a4(EXT4)),
        })
        .expect("delete");
    f.bump();
    assert_eq!(f.verdict(Ingress, &err), Reason::DenyUnrelated);
}

#[test]
fn keep_never_moves_the_epoch_and_the_writer_moves_it_once_per_nonempty_diff() {
    use policy_agent::compiler::MapDiff;
    use policy_agent::dataplane::{Established, writer};
    let mut f = fixture();
    let epoch = |f: &Fixture| f.maps.config().expect("config").policy_epoch;
    let e0 = epoch(&f);
    writer::apply(&mut f.maps, &MapDiff::default()).expect("empty diff");
    assert_eq!(epoch(&f), e0, "nothing written, nothing judged again");
    let mut diff = MapDiff::default();
    diff.ipcache.upserts.push((
        policy_common::IpCacheKey { addr: a4(B4) },
        policy_common::IpCacheValue {
            identity: ID_B,
            flags: 0,
        },
    ));
    writer::apply(&mut f.maps, &diff).expect("diff");
    assert_eq!(epoch(&f), ct::next_epoch(e0));
    f.maps.set_established(Established::Keep);
    writer::apply(&mut f.maps, &diff).expect("diff");
    f.bump();
    assert_eq!(epoch(&f), ct::next_epoch(e0), "keep: the epoch never moves");
    f.maps.set_established(Established::Revalidate);
}

#[test]
fn a_connection_opened_before_any_isolation_is_judged_once_isolated() {
    let mut f = fixture();
    f.endpoint_id(a4(A4), 1, 0);
    f.endpoint_id(a4(B4), 2, 0);
    f.ipcache(a4(A4), ID_B + 1);
    for (flags, want) in [
        (SYN, Reason::AllowNotIsolated),
        (SYN | ACK, Reason::AllowEstablished),
        (ACK, Reason::AllowEstablished),
    ] {
        let (s, d, sp, dp) = if flags == SYN | ACK {
            (B4, A4, 80, 40000)
        } else {
            (A4, B4, 40000, 80)
        };
        assert_eq!(f.verdict(Egress, &tcp4(s, d, sp, dp, flags)), want);
    }
    assert_eq!(
        f.verdict(Egress, &udp4(A4, B4, 40000, 80)),
        Reason::AllowNotIsolated
    );
    // B isolated for ingress, no rule: judged again from A's side, whichever end speaks
    // first (B's push is a reply, refused by B's own ingress on A's connection).
    f.endpoint_id(a4(B4), 2, ISO_IN | IN_ID);
    f.bump();
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(B4, A4, 80, 40000, ACK | PSH)),
        (Ingress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &tcp4(A4, B4, 40000, 80, ACK | PSH)),
        (Ingress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict_by(PROG_FROM_POD, &udp4(A4, B4, 40000, 80)),
        (Ingress, Reason::DenyPolicy)
    );
    assert_eq!(
        f.verdict_by(PROG_TO_POD, &tcp4(A4, B4, 40000, 80, ACK | PSH)),
        (Ingress, Reason::DenyPolicy)
    );
}
