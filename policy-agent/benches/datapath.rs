//! ns per BPF_PROG_TEST_RUN iteration of the real programs: an empty TC program (baseline),
//! a new flow allowed by identity (TCP SYN), one allowed by CIDR, a denied one, and an
//! established flow (conntrack hit), and the reply of a connection whose entry is of an older
//! policy epoch, judged again and refused on every packet (`rejudge`, the dearest path a
//! revalidation takes); once with ~10 map entries and once with 100k identity
//! rules and 100k CIDR rules. Median of several rounds of >= 1M repeats each. Prints a
//! table and writes `target/bench/datapath.json`. Needs root and BPF.

#[path = "../tests/kernel/common/packet.rs"]
mod packet;

use std::{net::Ipv4Addr, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use packet::*;
use policy_agent::dataplane::{Dataplane, DataplaneMaps};
use policy_common::{
    Addr, CidrData, CtValue, DEFAULT_EVENTS_BURST, DEFAULT_EVENTS_PER_SEC, Direction, EndpointKey,
    EndpointValue, IpCacheKey, IpCacheValue, LpmKey, PROG_BENCH_EMPTY, PROG_TO_POD, PortRange,
    Reason, RuleKey, RuleValue, cidr_prefixlen, ct, ct_flags, ep_flags,
};
use policy_testkit::testbed::PrivateBpffs;

const REPEAT: u32 = 1_000_000;
/// TC actions (linux/pkt_cls.h).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const ROUNDS: usize = 9;
const BIG: u32 = 100_000;

const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 5);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 7);
const SET_IN: u32 = 10;
const ID_PEER: u32 = 300;
/// The pod's port of the connection whose entry is stale.
const STALE_PORT: u16 = 41000;
/// A local pod nobody isolates.
const OPEN_POD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

fn a4(ip: Ipv4Addr) -> Addr {
    Addr::from_v4_octets(ip.octets())
}

fn tcp_rule(port: u16) -> RuleValue {
    let mut v = RuleValue::default();
    v.ranges[0] = PortRange {
        first: port,
        last: port,
        proto: TCP,
        _pad: [0; 3],
    };
    v
}

fn seed_small(maps: &mut DataplaneMaps) {
    maps.set_event_budget(DEFAULT_EVENTS_PER_SEC, DEFAULT_EVENTS_BURST)
        .expect("config");
    // The pod's address bound to the interface test runs happen on (the loopback).
    maps.bind(1, &[a4(POD), a4(OPEN_POD)]).expect("bind");
    maps.set_local_endpoint(
        EndpointKey { addr: a4(OPEN_POD) },
        EndpointValue {
            endpoint_id: 2,
            ingress_policy_set: SET_IN + 20,
            egress_policy_set: SET_IN + 21,
            flags: 0,
        },
    )
    .expect("endpoint");
    maps.set_local_endpoint(
        EndpointKey { addr: a4(POD) },
        EndpointValue {
            endpoint_id: 1,
            ingress_policy_set: SET_IN,
            egress_policy_set: SET_IN + 1,
            flags: ep_flags::ISOLATED_INGRESS
                | ep_flags::ISOLATED_EGRESS
                | ep_flags::INGRESS_HAS_IDENTITY_RULES
                | ep_flags::INGRESS_HAS_CIDR_RULES,
        },
    )
    .expect("endpoint");
    maps.set_ipcache(
        IpCacheKey { addr: a4(PEER) },
        IpCacheValue {
            identity: ID_PEER,
            flags: 0,
        },
    )
    .expect("ipcache");
    maps.set_rule(
        RuleKey {
            policy_set: SET_IN,
            identity: ID_PEER,
        },
        tcp_rule(80),
    )
    .expect("rule");
    let key = LpmKey {
        prefixlen: cidr_prefixlen(true, 24),
        data: CidrData::new(SET_IN, a4(EXT)),
    };
    maps.set_cidr_rule(key, tcp_rule(80)).expect("cidr");
    // A connection the pod opened to the peer under epoch 0, then the epoch moves: its
    // replies are judged again, and the pod's egress (isolated, no rule) refuses them.
    let (k, pod_is_a) = ct::normalize(a4(POD), a4(PEER), STALE_PORT, 80, TCP);
    let mut flags = ct_flags::EGRESS_OK | ct_flags::REQ_EGRESS | ct_flags::SEEN_REPLY;
    if pod_is_a {
        flags |= ct_flags::ORIG_IS_A;
    }
    maps.set_conntrack(
        k,
        CtValue {
            last_seen_ns: policy_agent::dataplane::monotonic_coarse_ns(),
            flags,
            owner: 1,
        },
    )
    .expect("conntrack");
    maps.bump_policy_epoch().expect("epoch");
    // A handful more, as a small cluster has.
    for i in 0..6u32 {
        maps.set_rule(
            RuleKey {
                policy_set: SET_IN + 2 + i,
                identity: ID_PEER + i,
            },
            tcp_rule(443),
        )
        .expect("rule");
    }
}

/// 100k identity rules (with their ipcache entries) and 100k CIDR rules (/24s and /32s)
/// spread over 1000 other policy-sets, as a large cluster's maps hold them.
fn seed_big(maps: &mut DataplaneMaps) {
    let t = Instant::now();
    let mut cidrs = Vec::with_capacity(BIG as usize);
    // Other pods' addresses: never one of the measured flows' (198.18.128.0 + i once ran
    // over EXT and STRANGER, turning the CIDR and deny cases into identity hits plus a rule
    // miss: a different path, not a bigger map).
    let measured = [POD, PEER, EXT, STRANGER].map(u32::from);
    let mut next_ip = u32::from(Ipv4Addr::new(198, 18, 1, 0));
    for i in 0..BIG {
        let identity = 1000 + i;
        maps.set_rule(
            RuleKey {
                policy_set: 100 + i % 1000,
                identity,
            },
            tcp_rule(443),
        )
        .expect("rule");
        while measured.contains(&next_ip) {
            next_ip += 1;
        }
        let ip = Ipv4Addr::from(next_ip);
        next_ip += 1;
        maps.set_ipcache(
            IpCacheKey { addr: a4(ip) },
            IpCacheValue { identity, flags: 0 },
        )
        .expect("ipcache");
        let set = 100 + i % 1000;
        let bits = if i % 3 == 0 { 24 } else { 32 };
        let base = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 256 + i * 7;
        let cidr = Ipv4Addr::from(if bits == 24 { base & !0xff } else { base });
        let key = LpmKey {
            prefixlen: cidr_prefixlen(true, bits),
            data: CidrData::new(set, a4(cidr)),
        };
        cidrs.push((key, tcp_rule(8443)));
    }
    // As the agent's writer does: each set's trie enters CIDR_RULES complete, all at once.
    maps.set_cidr_rules(&cidrs).expect("cidr");
    eprintln!(
        "seeded {BIG} identity rules and {BIG} CIDR rules in {:.1?}",
        t.elapsed()
    );
}

struct Bench<'a> {
    dp: &'a Dataplane,
    maps: &'a DataplaneMaps,
}

/// One measured case: program, frame, and the verdict it must reach.
struct Case {
    name: &'static str,
    prog: &'static str,
    frame: Vec<u8>,
    /// The verdict, and the direction it is counted in.
    expect: Option<(Direction, Reason)>,
}

/// Median and minimum ns per iteration of each case.
struct Figures {
    median: Vec<f64>,
    min: Vec<f64>,
}

impl Bench<'_> {
    /// ns per iteration, and the program's return value (the TC action).
    fn run(&self, c: &Case, repeat: u32) -> (f64, u32) {
        let p = self.dp.program(c.prog).expect("program");
        let mut o = TestRunOptions::new();
        o.data_in = Some(&c.frame);
        o.repeat = repeat;
        let r = p.test_run(o).expect("test run");
        (r.duration.as_nanos() as f64, r.return_value)
    }

    /// Checks each case's verdict and action once, then measures them interleaved (round r
    /// runs every case once) so load changes on a shared machine hit all cases alike, then
    /// checks that every measured iteration took the path the case is named for (each case
    /// expects a reason of its own, so the counters tell them apart).
    fn suite(&self, cases: &[Case]) -> Figures {
        let reasons: Vec<(Direction, Reason)> = cases.iter().filter_map(|c| c.expect).collect();
        for c in cases {
            if let Some((d, r)) = c.expect {
                let before = self.maps.counters().expect("counters");
                let (_, action) = self.run(c, 1);
                let moved = self.maps.counters().expect("counters").since(&before);
                assert_eq!(moved.get(d, r), 1, "{}: expected {d:?} {r:?}", c.name);
                let want = if r.is_allow() { TC_ACT_OK } else { TC_ACT_SHOT };
                assert_eq!(action, want, "{}: TC action", c.name);
                assert!(
                    reasons
                        .iter()
                        .filter(|(xd, xr)| *xd as u8 == d as u8 && *xr as u8 == r as u8)
                        .count()
                        == 1,
                    "{}: {d:?} {r:?} shared with another case",
                    c.name
                );
            }
        }
        let before = self.maps.counters().expect("counters");
        let mut per_case: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..ROUNDS {
            for (i, c) in cases.iter().enumerate() {
                per_case[i].push(self.run(c, REPEAT).0);
            }
        }
        let moved = self.maps.counters().expect("counters").since(&before);
        for c in cases {
            if let Some((d, r)) = c.expect {
                assert_eq!(
                    moved.get(d, r),
                    ROUNDS as u64 * REPEAT as u64,
                    "{}: every measured iteration must end in {r:?}",
                    c.name
                );
            }
        }
        let mut f = Figures {
            median: Vec::new(),
            min: Vec::new(),
        };
        for mut v in per_case {
            v.sort_by(f64::total_cmp);
            f.median.push(v[v.len() / 2]);
            f.min.push(v[0]);
        }
        f
    }
}

fn cases() -> Vec<Case> {
    let case = |name, prog, frame, expect| Case {
        name,
        prog,
        frame,
        expect,
    };
    vec![
        case(
            "empty",
            PROG_BENCH_EMPTY,
            V4::new(PEER, POD).frame(&tcp(40000, 80, SYN)),
            None,
        ),
        // A SYN is always decided by policy (tuple reuse), so it measures the new-flow path.
        case(
            "new_flow_identity",
            PROG_TO_POD,
            V4::new(PEER, POD).frame(&tcp(40000, 80, SYN)),
            Some((Direction::Ingress, Reason::AllowIdentity)),
        ),
        case(
            "new_flow_cidr",
            PROG_TO_POD,
            V4::new(EXT, POD).frame(&tcp(40001, 80, SYN)),
            Some((Direction::Ingress, Reason::AllowCidr)),
        ),
        case(
            "deny",
            PROG_TO_POD,
            V4::new(STRANGER, POD).frame(&tcp(40002, 22, SYN)),
            Some((Direction::Ingress, Reason::DenyPolicy)),
        ),
        // Nobody isolated: passes, its connection recorded (a SYN is decided each time).
        case(
            "not_isolated_syn",
            PROG_TO_POD,
            V4::new(PEER, OPEN_POD).frame(&tcp(40003, 80, SYN)),
            Some((Direction::Ingress, Reason::AllowNotIsolated)),
        ),
        // The SYN above created the entry; its ACK is a conntrack hit.
        case(
            "ct_hit",
            PROG_TO_POD,
            V4::new(PEER, POD).frame(&tcp(40000, 80, ACK)),
            Some((Direction::Ingress, Reason::AllowEstablished)),
        ),
        // A reply on the stale entry: the hook tail-calls `rejudge`, which refuses it.
        case(
            "rejudge_refused",
            PROG_TO_POD,
            V4::new(PEER, POD).frame(&tcp(80, STALE_PORT, ACK)),
            Some((Direction::Egress, Reason::DenyPolicy)),
        ),
    ]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let fs = PrivateBpffs::mount().expect("mount a private bpffs (needs root)");
    let mut dp = Dataplane::load(fs.path()).expect("load the eBPF object");
    let mut maps = dp.take_maps().expect("maps");
    drop(fs);
    let mut cases = cases();
    // For profiling one path (`perf record` on the bench binary): keep the baseline and the
    // named case only.
    if let Ok(only) = std::env::var("DATAPATH_BENCH_ONLY") {
        cases.retain(|c| {
            c.name == "empty"
                || c.name == only
                || (only == "ct_hit" && c.name == "new_flow_identity")
        });
    }
    seed_small(&mut maps);
    let small = Bench {
        dp: &dp,
        maps: &maps,
    }
    .suite(&cases);
    seed_big(&mut maps);
    let big = Bench {
        dp: &dp,
        maps: &maps,
    }
    .suite(&cases);

    let (empty, empty_big) = (small.median[0], big.median[0]);
    println!(
        "datapath: ns per BPF_PROG_TEST_RUN iteration, median (min) of {ROUNDS} rounds x {REPEAT}"
    );
    println!(
        "{:<18} {:>16} {:>9} {:>16} {:>9}",
        "case", "~10 entries", "vs empty", "100k+100k", "vs empty"
    );
    let mut json = serde_json::Map::new();
    for (i, c) in cases.iter().enumerate() {
        let (s, b) = (small.median[i], big.median[i]);
        println!(
            "{:<18} {:>8.1} ({:>5.1}) {:>+9.1} {:>8.1} ({:>5.1}) {:>+9.1}",
            c.name,
            s,
            small.min[i],
            s - empty,
            b,
            big.min[i],
            b - empty_big
        );
        json.insert(format!("{}_ns", c.name), s.into());
        json.insert(format!("{}_min_ns", c.name), small.min[i].into());
        json.insert(format!("{}_100k_ns", c.name), b.into());
        json.insert(format!("{}_100k_min_ns", c.name), big.min[i].into());
    }
    json.insert("repeat".into(), REPEAT.into());
    json.insert("rounds".into(), (ROUNDS as u64).into());
    json.insert("big_identity_rules".into(), BIG.into());
    json.insert("big_cidr_rules".into(), BIG.into());

    if std::env::var_os("DATAPATH_BENCH_ONLY").is_some() {
        return; // a partial run: keep the last full figures
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("datapath.json");
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("json");
    std::fs::write(&path, text).expect("write datapath.json");
    println!("wrote {}", path.display());
}
