//! `cargo xtask bench peers` (as root): the same NetworkPolicy set enforced by no filter, by
//! our programs and maps, by iptables with ipsets as kube-router and Calico's iptables mode
//! lay it out, and by nftables concatenated sets as kube-network-policies does, at 10, 1,000
//! and 10,000 rules (`peers/rules.rs`). For each: TCP_CRR-style new connections per second
//! and TCP_RR-style transactions per second between a client pod and a server pod on the
//! same node namespace (client and server threads on different CPUs), and our per-packet
//! cost by BPF_PROG_TEST_RUN on the same maps.
//!
//! Each filter is installed on a node namespace of its own (with its own client and server
//! pods), after which the bench checks that it enforces (the probe connects, a port no rule
//! admits does not). The four live side by side and take turns in slices of a fifth of the
//! measuring time, in a rotated order, so a change in the machine's speed (a shared VM) lands
//! on all of them alike; figures are median, min and max over rounds.
//! Writes `target/bench/peers.json` and the `peers` section of `BENCHMARKS.md`.
//! Knobs: `PEERS_RULES` (default `10,1000,10000`), `PEERS_ROUNDS` (7), `PEERS_SECONDS` (1),
//! `PEERS_FILTERS` (some of `nofilter,ours,iptables,nft`: a run for profiling, no report).

#[path = "peers/filters.rs"]
mod filters;
#[path = "peers/load.rs"]
mod load;
#[path = "../tests/kernel/common/packet.rs"]
mod packet;
#[path = "peers/per_packet.rs"]
mod per_packet;
#[path = "peers/report.rs"]
mod report;
#[path = "peers/rules.rs"]
mod rules;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use filters::{CLIENT, Cell, Filter, Prepared, SERVER};
use policy_testkit::testbed::unique_suffix;

/// A connection that is admitted opens well within this; a refused one never does.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
const REFUSED_WAIT: Duration = Duration::from_millis(300);
const WARM_UP: Duration = Duration::from_millis(100);

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one size measured: per filter the CRR and RR rates of each round.
#[derive(Default)]
pub struct Size {
    pub rules: usize,
    pub crr: BTreeMap<&'static str, Vec<f64>>,
    pub rr: BTreeMap<&'static str, Vec<f64>>,
    pub per_packet: per_packet::PerPacket,
    /// Our map entries for the set: `CIDR_RULES`, `PORTS`.
    pub entries: (usize, usize),
}

/// One filter installed on its own cell (its own node namespace), its server answering,
/// checked to enforce. The four cells of a size live side by side, so measurements can
/// alternate between them in short slices.
struct Live {
    filter: Filter,
    // Drop order: the filter's links and maps, the server, then the namespaces.
    _installed: filters::Installed,
    _server: load::Server,
    cell: Cell,
}

impl Live {
    fn new(filter: Filter, p: &Prepared, cpus: (usize, usize)) -> Result<Live> {
        let cell = Cell::new()?;
        let server = load::Server::start(
            &cell.bed.hosts[SERVER].ns,
            cell.to(rules::PROBE_PORT),
            cpus.1,
        )?;
        let installed = filters::install(filter, &cell, p)
            .with_context(|| format!("installing {}", filter.title()))?;
        let client = &cell.bed.hosts[CLIENT].ns;
        if !load::connects(client, cell.to(rules::PROBE_PORT), CONNECT_WAIT)? {
            bail!("{}: the probe's connection is refused", filter.title());
        }
        let refused = !load::connects(client, cell.to(rules::REFUSED_PORT), REFUSED_WAIT)?;
        if refused != (filter != Filter::Unfiltered) {
            bail!(
                "{}: a port no rule admits is {}",
                filter.title(),
                if refused { "refused" } else { "admitted" }
            );
        }
        let live = Live {
            filter,
            _installed: installed,
            _server: server,
            cell,
        };
        live.run(load::Kind::Crr, WARM_UP, cpus)?;
        Ok(live)
    }

    fn run(&self, kind: load::Kind, length: Duration, cpus: (usize, usize)) -> Result<f64> {
        let client = &self.cell.bed.hosts[CLIENT].ns;
        load::run(
            client,
            self.cell.to(rules::PROBE_PORT),
            cpus.0,
            kind,
            length,
        )
        .with_context(|| format!("{} under {:?} load", self.filter.title(), kind))
    }
}

/// Slices per filter, load and round: the filters take turns every `length / SLICES`, so
/// a change in the machine's speed (a shared VM) lands on all of them alike.
const SLICES: usize = 5;

/// One round: each filter's rate of `kind`, the filters alternating slice by slice.
fn round(
    lives: &[Live],
    kind: load::Kind,
    length: Duration,
    r: usize,
    cpus: (usize, usize),
) -> Result<Vec<f64>> {
    let slice = length / SLICES as u32;
    let mut sum = vec![0.0; lives.len()];
    for s in 0..SLICES {
        for k in 0..lives.len() {
            let i = (r + s + k) % lives.len();
            sum[i] += lives[i].run(kind, slice, cpus)?;
        }
    }
    Ok(sum.into_iter().map(|x| x / SLICES as f64).collect())
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("PEERS_RULES")
        .unwrap_or_else(|_| "10,1000,10000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("PEERS_RULES: comma-separated rule counts")
        })
        .collect::<Result<_>>()?;
    let rounds: usize = knob("PEERS_ROUNDS", 7usize).max(1);
    let length = Duration::from_secs_f64(knob("PEERS_SECONDS", 1.0f64).clamp(0.1, 30.0));
    let cpus = match std::thread::available_parallelism().map_or(1, |n| n.get()) {
        1 => (0, 0),
        _ => (0, 1),
    };
    let scratch = std::env::temp_dir().join(format!("policy-peers-{}", unique_suffix()));
    std::fs::create_dir_all(&scratch)?;
    let t0 = Instant::now();
    let run = || -> Result<Vec<Size>> {
        let mut out = Vec::new();
        for &n in &sizes {
            let tp = Instant::now();
            let p = Prepared::new(n, &scratch)?;
            let entries = (p.contents.cidr_rules.len(), p.contents.ports.len());
            println!(
                "peers: {n} rules ({} policies) rendered and compiled in {:.0} ms: \
                 {} CIDR_RULES and {} PORTS entries",
                n.div_ceil(rules::RULES_PER_POLICY),
                tp.elapsed().as_secs_f64() * 1e3,
                entries.0,
                entries.1
            );
            let mut size = Size {
                rules: n,
                entries,
                per_packet: per_packet::measure(&p)?,
                ..Size::default()
            };
            // `PEERS_FILTERS=ours,nofilter` (keys of peers.json) for profiling one; a partial
            // run writes no report.
            let only = std::env::var("PEERS_FILTERS").unwrap_or_default();
            let lives = Filter::ALL
                .iter()
                .filter(|f| only.is_empty() || only.split(',').any(|k| k == f.key()))
                .map(|&f| Live::new(f, &p, cpus))
                .collect::<Result<Vec<_>>>()?;
            for r in 0..rounds {
                for (kind, into) in [
                    (load::Kind::Crr, &mut size.crr),
                    (load::Kind::Rr, &mut size.rr),
                ] {
                    let rates = round(&lives, kind, length, r, cpus)?;
                    for (live, rate) in lives.iter().zip(rates) {
                        into.entry(live.filter.key()).or_default().push(rate);
                    }
                }
                println!("peers: {n} rules, round {}/{rounds} done", r + 1);
            }
            drop(lives);
            out.push(size);
        }
        Ok(out)
    };
    let result = run();
    let _ = std::fs::remove_dir_all(&scratch);
    let sizes = result?;
    println!(
        "peers: measured in {:.0} s ({rounds} rounds of {:.1} s per filter and size)",
        t0.elapsed().as_secs_f64(),
        length.as_secs_f64()
    );
    let cfg = report::Config {
        rounds,
        seconds: length.as_secs_f64(),
        cpus,
    };
    if std::env::var_os("PEERS_FILTERS").is_some() {
        for s in &sizes {
            println!("{} rules: CRR {:?}, RR {:?}", s.rules, s.crr, s.rr);
        }
        return Ok(());
    }
    print!("{}", report::console(&sizes));
    policy_testkit::bench_report::write_json("peers", &report::json(&sizes, &cfg))?;
    policy_testkit::bench_report::write_section("peers", &report::markdown(&sizes, &cfg))?;
    Ok(())
}
