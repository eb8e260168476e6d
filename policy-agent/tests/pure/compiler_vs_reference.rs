//! Property: on random clusters, the kernel's lookup algorithm over the compiled maps decides
//! every probe exactly as the reference evaluator reads the spec.

use crate::compiler_common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use compiler_common::*;
use policy_agent::model::*;
use policy_agent::reference::{self, Endpoint};
use proptest::prelude::*;

static PROBES: AtomicUsize = AtomicUsize::new(0);
static ALLOWED: AtomicUsize = AtomicUsize::new(0);

fn endpoint(snap: &Snapshot, addr: IpAddr) -> Endpoint {
    // A non-hostNetwork pod owning the address first; hostNetwork pods share the node's.
    let owner = snap
        .pods
        .values()
        .filter(|p| p.ips.contains(&addr))
        .min_by_key(|p| p.host_network);
    match owner {
        Some(p) => Endpoint::Pod { key: p.key(), addr },
        None => Endpoint::Host(addr),
    }
}

const CASES: u32 = 200;
const PROBES_PER_CASE: usize = 80;

fn probe_case(
    snap: &Snapshot,
    probes: &[(prop::sample::Index, prop::sample::Index, Protocol, u16)],
) -> Result<usize, TestCaseError> {
    let cluster = Cluster::compile(snap);
    let mut addrs: Vec<IpAddr> = snap
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    addrs.extend(EXTERNAL.iter().map(|s| ip(s)));
    addrs.sort();
    addrs.dedup();
    let mut n = 0;
    for (si, di, protocol, port) in probes {
        let src = *si.get(&addrs);
        let same: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == src.is_ipv6() && *a != src)
            .collect();
        let dst = *di.get(&same);
        let want = reference::allowed(
            snap,
            &endpoint(snap, src),
            &endpoint(snap, dst),
            *protocol,
            *port,
        );
        let got = cluster.allowed(src, dst, protocol.number(), *port);
        prop_assert_eq!(
            got,
            want,
            "{} -> {} {}/{}\n{:#?}",
            src,
            dst,
            protocol,
            port,
            snap
        );
        n += 1;
        if got {
            ALLOWED.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(n)
}

/// Runs the property and counts the probes actually decided: at least 10,000 per run.
#[test]
fn kernel_model_agrees_with_reference() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    });
    let strategy = (
        snapshot(12, 10),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                prop::sample::select(Protocol::ALL.to_vec()),
                prop::sample::select(vec![53u16, 80, 81, 1000, 1050, 1099, 8080, 9090, 65535]),
            ),
            PROBES_PER_CASE,
        ),
    );
    let result = runner.run(&strategy, |(snap, probes)| {
        let n = probe_case(&snap, &probes)?;
        PROBES.fetch_add(n, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let n = PROBES.load(Ordering::Relaxed);
    assert!(n >= 10_000, "only {n} probes");
    // Both verdicts must be common, or the random clusters test nothing.
    let allowed = ALLOWED.load(Ordering::Relaxed);
    eprintln!("{n} probes agreed, {allowed} allowed");
    assert!(
        allowed > n / 10 && n - allowed > n / 10,
        "{allowed} of {n} allowed"
    );
}
