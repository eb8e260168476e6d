//! `cargo bench -p policy-agent --bench scale` (or `cargo xtask bench scale`, as root): what
//! the agent costs on one node of a large cluster. 10,000 pods over 100 nodes, 100
//! namespaces, 1,000 NetworkPolicies (objects only, see `scale/objects.rs`); one real node
//! namespace holds the 100 local pods (veths routed like a CNI would). For each mode (cluster
//! against a fake API server over HTTP, standalone on a manifest directory) the release
//! agent starts on fresh maps and the bench takes:
//!
//! - the time from its start to full enforcement: the status file names the objects'
//!   generation and no local pod waits for its interface;
//! - its resident memory then (VmRSS) and at its peak so far (VmHWM);
//! - the kernel memory of its maps (`scale/measure.rs`).
//!
//! Three loads per mode, each several rounds (median, min, max): `empty` (only the local
//! pods), `pods` (every pod, no policy) and `full`. Differences between them, in the same
//! run, give the cost per pod and per policy rule on a noisy machine. Writes
//! `target/bench/scale.json`. Knobs: `SCALE_ROUNDS` (default 3), `BENCH_AGENT` (the agent
//! binary; default the release one cargo builds for this bench).

#[path = "agent_harness.rs"]
mod agent_harness;
#[path = "agent_source.rs"]
#[allow(dead_code)] // `write` is the latency bench's
mod agent_source;
#[path = "scale/measure.rs"]
mod measure;
#[path = "scale/objects.rs"]
mod objects;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_harness::{AgentProc, AgentSpec};
use agent_source::Source;
use anyhow::{Context, Result};
use objects::{LOCAL_NODE, Load, NAMESPACES};
use policy_testkit::bench_report::{self, Spread};
use policy_testkit::testbed::{PrivateBpffs, Testbed, unique_suffix};
use serde_json::{Value, json};

/// Longest wait for full enforcement; far above what 10k pods take, so only a stuck agent
/// reaches it.
const ENFORCE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Cluster,
    Standalone,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cluster => "cluster",
            Mode::Standalone => "standalone",
        }
    }
}

/// The node namespace with its local pods, the private bpffs and a scratch directory; all
/// removed on drop.
struct Node {
    bed: Testbed,
    fs: PrivateBpffs,
    dir: PathBuf,
    agent: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn new(agent: PathBuf) -> Result<Node> {
        let mut bed = Testbed::new().context("node namespace (needs root)")?;
        for _ in 0..NAMESPACES {
            bed.add_pod().context("adding a local pod")?;
        }
        let fs = PrivateBpffs::mount().context("private bpffs")?;
        let dir = std::env::temp_dir().join(format!("policy-scale-{}", unique_suffix()));
        std::fs::create_dir_all(&dir)?;
        Ok(Node {
            bed,
            fs,
            dir,
            agent,
        })
    }

    /// The local pods' real addresses, one per namespace.
    fn local_addrs(&self) -> Vec<(std::net::Ipv4Addr, std::net::Ipv6Addr)> {
        self.bed.hosts.iter().map(|h| (h.ipv4, h.ipv6)).collect()
    }
}

/// What one start of the agent measured.
#[derive(Clone, Debug, Default)]
struct Round {
    enforce_ms: f64,
    rss: measure::Rss,
    kernel: measure::Kernel,
}

/// One start on fresh maps: timed, measured, stopped, and everything it pinned removed.
fn round(node: &Node, source: &Source, tag: &str) -> Result<(Round, Entries)> {
    let status = node.dir.join(format!("status-{tag}.json"));
    let log = node.dir.join(format!("agent-{tag}.log"));
    let (args, env) = source.agent_args();
    let spec = AgentSpec {
        binary: &node.agent,
        args,
        env,
        node_name: LOCAL_NODE,
    };
    let generation = source.generation();
    let t0 = Instant::now();
    let mut agent = AgentProc::start(&node.bed, &node.fs, &spec, &status, &log)?;
    // Full enforcement: the status names the objects' generation, no local pod waits.
    let enforced = |s: &policy_agent::status_file::Status| {
        s.generation == generation && s.waiting.is_empty() && s.attached.len() >= NAMESPACES
    };
    let measured = agent
        .wait_status(&status, ENFORCE_LIMIT, Duration::from_millis(5), enforced)
        .with_context(|| format!("enforcing generation {generation}"))
        .and_then(|_| {
            let enforce_ms = t0.elapsed().as_secs_f64() * 1e3;
            let rss = measure::rss(agent.pid())?;
            let kernel = measure::kernel(agent.pid(), node.fs.path())?;
            Ok((
                Round {
                    enforce_ms,
                    rss,
                    kernel,
                },
                measure::entries(node.fs.path()),
            ))
        });
    let stopped = agent.stop();
    let uninstalled = agent_harness::uninstall(&node.bed, &node.fs, &node.agent);
    let r = measured?;
    stopped?;
    uninstalled?;
    Ok(r)
}

type Entries = BTreeMap<String, (Option<u64>, u64)>;

/// One load's rounds in one mode.
#[derive(Clone)]
struct Figures {
    enforce_ms: Spread,
    rss: Spread,
    hwm: Spread,
    maps: Spread,
    progs: Spread,
    /// The last round's breakdown (map memory hardly varies between rounds).
    last: Round,
    entries: Entries,
}

fn spread(v: impl IntoIterator<Item = f64>) -> Spread {
    Spread::of(&v.into_iter().collect::<Vec<_>>())
}

fn figures(rounds: &[Round], entries: Entries) -> Figures {
    Figures {
        enforce_ms: spread(rounds.iter().map(|r| r.enforce_ms)),
        rss: spread(rounds.iter().map(|r| r.rss.now as f64)),
        hwm: spread(rounds.iter().map(|r| r.rss.peak as f64)),
        maps: spread(rounds.iter().map(|r| r.kernel.map_bytes as f64)),
        progs: spread(rounds.iter().map(|r| r.kernel.prog_bytes as f64)),
        last: rounds.last().cloned().unwrap_or_default(),
        entries,
    }
}

fn run_load(
    node: &Node,
    mode: Mode,
    load: Load,
    pods_per_namespace: usize,
    rounds: usize,
) -> Result<Figures> {
    let objs = objects::generate_sized(load, &node.local_addrs(), pods_per_namespace);
    let scratch = node.dir.join(format!(
        "{}-{}-{}",
        mode.name(),
        load.name(),
        objs.pods.len()
    ));
    std::fs::create_dir_all(&scratch)?;
    let source = match mode {
        Mode::Cluster => Source::api(&node.bed, &scratch, objs.all())?,
        Mode::Standalone => Source::dir(&scratch, objs.all())?,
    };
    let mut done = Vec::new();
    let mut entries = Entries::new();
    for r in 0..rounds {
        let tag = format!("{}-{}-{}-{r}", mode.name(), load.name(), objs.pods.len());
        let (round, e) = round(node, &source, &tag).with_context(|| tag.clone())?;
        eprintln!(
            "  {tag}: enforced after {:.0} ms, VmRSS {:.1} MiB, maps {:.1} MiB",
            round.enforce_ms,
            mib(round.rss.now as f64),
            mib(round.kernel.map_bytes as f64)
        );
        done.push(round);
        entries = e;
    }
    Ok(figures(&done, entries))
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn show(s: Spread, scale: impl Fn(f64) -> f64) -> String {
    format!(
        "{:8.1} [{:.1}..{:.1}]",
        scale(s.median),
        scale(s.min),
        scale(s.max)
    )
}

fn print_mode(mode: Mode, pods: usize, by_load: &BTreeMap<&str, Figures>) {
    for load in Load::ALL {
        let Some(f) = by_load.get(load.name()) else {
            continue;
        };
        println!(
            "{:<10} {pods:>6} {:<5} {:>28} {:>28} {:>28} {:>26}",
            mode.name(),
            load.name(),
            show(f.enforce_ms, |x| x),
            show(f.rss, mib),
            show(f.hwm, mib),
            show(f.maps, mib),
        );
    }
}

/// Medians' differences between loads, per pod and per rule.
struct PerUnit {
    rss_per_pod: f64,
    maps_per_pod: f64,
    rss_per_rule: f64,
    maps_per_rule: f64,
    ms_per_1k_pods: f64,
    ms_per_1k_rules: f64,
    /// `RULES` entries the policies add: a rule expands to one entry per (policy set, peer
    /// identity), so this, not the rule count, is what memory follows.
    rules_entries: u64,
    rss_per_rules_entry: f64,
    maps_per_rules_entry: f64,
}

fn rules_entries(f: &Figures) -> u64 {
    f.entries
        .get(policy_common::MAP_RULES)
        .and_then(|e| e.0)
        .unwrap_or(0)
}

fn per_unit(by_load: &BTreeMap<&str, Figures>, pods: f64, rules: f64) -> PerUnit {
    let [e, p, f] = Load::ALL.map(|l| &by_load[l.name()]);
    let added = rules_entries(f).saturating_sub(rules_entries(p));
    PerUnit {
        rss_per_pod: (p.rss.median - e.rss.median) / pods,
        maps_per_pod: (p.maps.median - e.maps.median) / pods,
        rss_per_rule: (f.rss.median - p.rss.median) / rules,
        maps_per_rule: (f.maps.median - p.maps.median) / rules,
        ms_per_1k_pods: (p.enforce_ms.median - e.enforce_ms.median) / pods * 1e3,
        ms_per_1k_rules: (f.enforce_ms.median - p.enforce_ms.median) / rules * 1e3,
        rules_entries: added,
        rss_per_rules_entry: (f.rss.median - p.rss.median) / added.max(1) as f64,
        maps_per_rules_entry: (f.maps.median - p.maps.median) / added.max(1) as f64,
    }
}

fn print_breakdown(mode: Mode, by_load: &BTreeMap<&str, Figures>) {
    let [e, _, f] = Load::ALL.map(|l| &by_load[l.name()]);
    println!(
        "{} maps, empty -> full (last round; KiB; entries/capacity when full):",
        mode.name()
    );
    for (name, (n, bytes)) in &f.last.kernel.by_name {
        let before = e.last.kernel.by_name.get(name).map_or(0, |x| x.1);
        let entries = match f.entries.get(name) {
            Some((Some(used), cap)) => format!("{used}/{cap}"),
            Some((None, cap)) => format!("-/{cap}"),
            None => String::new(),
        };
        println!(
            "  {name:<22} {n:>5} map(s) {:>10.0} -> {:>10.0}  {entries}",
            before as f64 / 1024.0,
            *bytes as f64 / 1024.0
        );
    }
    println!(
        "  programs (held open)        {:>10.0} -> {:>10.0}",
        e.progs.median / 1024.0,
        f.progs.median / 1024.0
    );
}

fn mode_json(by_size: &[(usize, BTreeMap<&'static str, Figures>, PerUnit)]) -> Value {
    let sizes: serde_json::Map<String, Value> = by_size
        .iter()
        .map(|(pods, by_load, u)| (pods.to_string(), size_json(by_load, u)))
        .collect();
    Value::Object(sizes)
}

fn size_json(by_load: &BTreeMap<&str, Figures>, u: &PerUnit) -> Value {
    let loads: serde_json::Map<String, Value> = by_load
        .iter()
        .map(|(name, f)| {
            let maps: BTreeMap<&String, Value> = f
                .last
                .kernel
                .by_name
                .iter()
                .map(|(n, (count, bytes))| {
                    let entries = f.entries.get(n).map(|e| e.0);
                    (
                        n,
                        json!({"maps": count, "bytes": bytes, "entries": entries}),
                    )
                })
                .collect();
            (
                name.to_string(),
                json!({
                    "enforced_ms": f.enforce_ms.json(),
                    "vm_rss_bytes": f.rss.json(),
                    "vm_hwm_bytes": f.hwm.json(),
                    "map_bytes": f.maps.json(),
                    "prog_bytes": f.progs.json(),
                    "maps": maps,
                }),
            )
        })
        .collect();
    json!({
        "loads": loads,
        "rss_bytes_per_pod": u.rss_per_pod,
        "map_bytes_per_pod": u.maps_per_pod,
        "rss_bytes_per_rule": u.rss_per_rule,
        "map_bytes_per_rule": u.maps_per_rule,
        "enforced_ms_per_1k_pods": u.ms_per_1k_pods,
        "enforced_ms_per_1k_rules": u.ms_per_1k_rules,
        "rules_map_entries_added": u.rules_entries,
        "rss_bytes_per_rules_map_entry": u.rss_per_rules_entry,
        "map_bytes_per_rules_map_entry": u.maps_per_rules_entry,
    })
}

fn main() -> Result<()> {
    let rounds: usize = std::env::var("SCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let sizes: Vec<usize> = std::env::var("SCALE_PODS")
        .unwrap_or_else(|_| "1000,10000,50000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .context("SCALE_PODS: comma-separated pod counts")
        })
        .collect::<Result<_>>()?;
    let agent = std::env::var_os("BENCH_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_policy-agent")));
    let t0 = Instant::now();
    let node = Node::new(agent.clone())?;
    let per_ns: Vec<usize> = sizes
        .iter()
        .map(|&p| (p / NAMESPACES).clamp(1, objects::MAX_NODES))
        .collect();
    let probe = objects::generate(Load::Full, &node.local_addrs());
    let (policies, rules) = (probe.policies.len(), probe.rules());
    println!(
        "scale: {:?} pods ({NAMESPACES} local, real veths; the rest on one node per pod index), \
         {NAMESPACES} namespaces, {policies} NetworkPolicies ({rules} rules); agent {}",
        per_ns.iter().map(|n| n * NAMESPACES).collect::<Vec<_>>(),
        agent.display()
    );
    println!(
        "loads: empty = the local pods only, pods = every pod and no policy, full = \
         everything; {rounds} round(s) each on fresh maps, median [min..max]"
    );
    let mut results: Vec<ModeResult> = Vec::new();
    for mode in [Mode::Cluster, Mode::Standalone] {
        let empty = run_load(&node, mode, Load::Empty, 1, rounds)?;
        let mut by_size = Vec::new();
        for &n in &per_ns {
            let objects = objects::generate_sized(Load::Full, &node.local_addrs(), n);
            let count = objects.all().count();
            if mode == Mode::Standalone && count > policy_agent::manifests::MAX_OBJECTS {
                // The reader refuses it (fail closed): a standalone host is not sized for it.
                println!(
                    "  standalone at {} pods: not measured ({count} objects, over the manifest \
                     reader's limit of {})",
                    n * NAMESPACES,
                    policy_agent::manifests::MAX_OBJECTS
                );
                continue;
            }
            let pods = run_load(&node, mode, Load::Pods, n, rounds)?;
            let full = run_load(&node, mode, Load::Full, n, rounds)?;
            let by_load: BTreeMap<&str, Figures> = [
                (Load::Empty.name(), empty.clone()),
                (Load::Pods.name(), pods),
                (Load::Full.name(), full),
            ]
            .into();
            let remote = ((n - 1) * NAMESPACES).max(1) as f64;
            let u = per_unit(&by_load, remote, rules as f64);
            by_size.push((n * NAMESPACES, by_load, u));
        }
        results.push((mode, by_size));
    }
    println!(
        "\n{:<10} {:>6} {:<5} {:>28} {:>28} {:>28} {:>26}",
        "mode",
        "pods",
        "load",
        "enforced after start (ms)",
        "VmRSS (MiB)",
        "VmHWM (MiB)",
        "maps (MiB)"
    );
    for (mode, by_size) in &results {
        for (pods, by_load, _) in by_size {
            print_mode(*mode, *pods, by_load);
        }
    }
    println!("\nper remote pod (pods - empty), per rule (full - pods) / {rules} (medians):");
    for (mode, by_size) in &results {
        for (pods, _, u) in by_size {
            println!(
                "  {:<10} {pods:>6} pods | per pod: VmRSS {:+.0} B, maps {:+.0} B | per rule: VmRSS \
                 {:+.0} B, maps {:+.0} B | {} RULES entries added, per entry VmRSS {:+.0} B, \
                 maps {:+.0} B",
                mode.name(),
                u.rss_per_pod,
                u.maps_per_pod,
                u.rss_per_rule,
                u.maps_per_rule,
                u.rules_entries,
                u.rss_per_rules_entry,
                u.maps_per_rules_entry
            );
        }
    }
    println!();
    for (mode, by_size) in &results {
        if let Some((_, by_load, _)) = by_size.last() {
            print_breakdown(*mode, by_load);
        }
    }
    let shape = Shape {
        policies,
        rules,
        rounds,
    };
    let mut out = serde_json::Map::new();
    for (mode, by_size) in &results {
        out.insert(mode.name().into(), mode_json(by_size));
    }
    out.insert(
        "shape".into(),
        json!({"pods": per_ns.iter().map(|n| n * NAMESPACES).collect::<Vec<_>>(),
               "local_pods": NAMESPACES, "namespaces": NAMESPACES, "policies": policies,
               "rules": rules, "rounds": rounds, "machine": bench_report::machine()}),
    );
    bench_report::write_json("scale", &Value::Object(out))?;
    bench_report::write_section("scale", &markdown(&results, &shape))?;
    eprintln!("scale: done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

type ModeResult = (Mode, Vec<(usize, BTreeMap<&'static str, Figures>, PerUnit)>);

struct Shape {
    policies: usize,
    rules: usize,
    rounds: usize,
}

/// The `scale` section of BENCHMARKS.md.
fn markdown(results: &[ModeResult], shape: &Shape) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("## Memory and start at scale\n\n");
    let _ = writeln!(s, "Measured on: {}.\n", bench_report::machine());
    let _ = writeln!(
        s,
        "One node of a cluster of 100 namespaces with {} NetworkPolicies ({} rules: pod and \
         namespace selectors, ipBlocks with `except`, named ports, port ranges, both \
         directions) and 1k, 10k or 50k pods spread over one node per pod index; the node \
         namespace holds 100 real local pods on veths. The release agent starts on fresh \
         maps, in cluster mode against a fake API server over HTTP and standalone on a \
         manifest directory; once the status file says everything is enforced, its resident \
         memory (VmRSS, VmHWM) and its maps' kernel memory (`memlock` of each map it holds, as \
         `bpftool map show` reports) are read. Median of {} starts [min..max]. Loads: the \
         local pods only (empty), every pod without policies (pods), everything (full).\n",
        shape.policies, shape.rules, shape.rounds
    );
    let mib = |x: f64| format!("{:.1}", x / (1024.0 * 1024.0));
    for (mode, by_size) in results {
        let _ = writeln!(s, "**{}**\n", mode.name());
        let rows: Vec<Vec<String>> = by_size
            .iter()
            .map(|(pods, by_load, u)| {
                let [e, p, f] = Load::ALL.map(|l| &by_load[l.name()]);
                vec![
                    pods.to_string(),
                    format!(
                        "{:.1} / {:.1} / {:.1}",
                        e.enforce_ms.median / 1e3,
                        p.enforce_ms.median / 1e3,
                        f.enforce_ms.median / 1e3
                    ),
                    format!(
                        "{} / {} / {}",
                        mib(e.rss.median),
                        mib(p.rss.median),
                        mib(f.rss.median)
                    ),
                    format!(
                        "{} / {} / {}",
                        mib(e.hwm.median),
                        mib(p.hwm.median),
                        mib(f.hwm.median)
                    ),
                    format!(
                        "{} / {} / {}",
                        mib(e.maps.median),
                        mib(p.maps.median),
                        mib(f.maps.median)
                    ),
                    format!("{:.0} / {:.0}", u.rss_per_pod, u.maps_per_pod),
                    format!("{:.0} / {:.0}", u.rss_per_rule, u.maps_per_rule),
                    format!(
                        "{} ({:.0} / {:.0})",
                        u.rules_entries, u.rss_per_rules_entry, u.maps_per_rules_entry
                    ),
                ]
            })
            .collect();
        s += &bench_report::table(
            &[
                "pods",
                "enforced after start, s (empty / pods / full)",
                "VmRSS MiB",
                "VmHWM MiB",
                "kernel maps MiB",
                "per remote pod, B (RSS / maps)",
                "per rule, B (RSS / maps)",
                "RULES entries added (B each: RSS / maps)",
            ],
            &rows,
        );
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Sizes missing from the standalone table hold more objects than the manifest reader \
         takes ({}; a directory over it is enforced fail-closed): a lone host is not sized \
         for a 50k-pod cluster.\n",
        policy_agent::manifests::MAX_OBJECTS
    );
    s += "Reproduce: `cargo xtask bench scale` as root (`SCALE_PODS`, `SCALE_ROUNDS` to change \
          sizes and rounds). Raw figures, with each map's entries and bytes: \
          `target/bench/scale.json`.\n";
    s
}
