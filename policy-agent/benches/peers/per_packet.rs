//! Our per-packet cost on each policy set: the real `to_pod` program over the same compiled
//! maps, run by BPF_PROG_TEST_RUN on the probe's SYN (a new flow meeting every rule's
//! lookups), its ACK (a conntrack hit) and a SYN to a port no rule admits, against an empty
//! TC program in the same run.

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use policy_agent::compiler::MapContents;
use policy_agent::dataplane::{Dataplane, writer};
use policy_common::{Direction, PROG_BENCH_EMPTY, PROG_TO_POD, Reason};
use policy_testkit::testbed::PrivateBpffs;

use super::filters::{CLIENT_IP, Prepared, SERVER_IP};
use super::packet::{ACK, SYN, V4, tcp};
use super::rules::{PROBE_PORT, REFUSED_PORT};

const REPEAT: u32 = 200_000;
const ROUNDS: usize = 5;
/// The interface a test run's packet appears on (the bench process's loopback).
const TEST_IFINDEX: u32 = 1;

/// Median ns per packet (and the empty program's, same run).
#[derive(Clone, Copy, Debug, Default)]
pub struct PerPacket {
    pub empty_ns: f64,
    pub new_flow_ns: f64,
    pub established_ns: f64,
    pub refused_ns: f64,
}

struct Case {
    prog: &'static str,
    frame: Vec<u8>,
    expect: Option<(Direction, Reason)>,
}

pub fn measure(p: &Prepared) -> Result<PerPacket> {
    let fs = PrivateBpffs::mount().context("private bpffs")?;
    let mut dp = Dataplane::load(fs.path()).context("loading the eBPF object")?;
    let mut maps = dp.take_maps()?;
    drop(fs);
    writer::apply(
        &mut maps,
        &MapContents::diff(&MapContents::default(), &p.contents),
    )?;
    maps.bind(
        TEST_IFINDEX,
        &[policy_agent::compiler::addr_of(SERVER_IP.into())],
    )?;
    let v4 = V4::new(CLIENT_IP, SERVER_IP);
    let cases = [
        Case {
            prog: PROG_BENCH_EMPTY,
            frame: v4.frame(&tcp(40000, PROBE_PORT, SYN)),
            expect: None,
        },
        Case {
            prog: PROG_TO_POD,
            frame: v4.frame(&tcp(40000, PROBE_PORT, SYN)),
            expect: Some((Direction::Ingress, Reason::AllowCidr)),
        },
        Case {
            prog: PROG_TO_POD,
            frame: v4.frame(&tcp(40000, PROBE_PORT, ACK)),
            expect: Some((Direction::Ingress, Reason::AllowEstablished)),
        },
        Case {
            prog: PROG_TO_POD,
            frame: v4.frame(&tcp(40001, REFUSED_PORT, SYN)),
            expect: Some((Direction::Ingress, Reason::DenyPolicy)),
        },
    ];
    let run = |c: &Case, repeat: u32| -> Result<f64> {
        let prog = dp.program(c.prog)?;
        let mut o = TestRunOptions::new();
        o.data_in = Some(&c.frame);
        o.repeat = repeat;
        Ok(prog.test_run(o)?.duration.as_nanos() as f64)
    };
    // Each case takes the path it is named for (the counters say which).
    for c in &cases {
        if let Some((d, r)) = c.expect {
            let before = maps.counters()?;
            run(c, 1)?;
            let moved = maps.counters()?.since(&before);
            if moved.get(d, r) != 1 {
                bail!("per-packet case {:?}: expected {d:?} {r:?}", c.expect);
            }
        }
    }
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, c) in cases.iter().enumerate() {
            samples[i].push(run(c, REPEAT)?);
        }
    }
    let median = |v: &[f64]| policy_testkit::bench_report::Spread::of(v).median;
    Ok(PerPacket {
        empty_ns: median(&samples[0]),
        new_flow_ns: median(&samples[1]),
        established_ns: median(&samples[2]),
        refused_ns: median(&samples[3]),
    })
}
