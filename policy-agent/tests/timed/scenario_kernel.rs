//! The scenario files on the real kernel datapath: namespaces, the `policy-agent` binary in
//! standalone mode, real TCP/UDP/SCTP probes. Every probe of the demo, seed, trap and upstream
//! e2e scenarios (IPv4 and IPv6, by pod IP and by Service ClusterIP) must match its
//! expectation. Needs root, BPF, namespaces and iptables: fails without.
//!
//! The upstream set runs once (files sharing the standard model share hosts and agent); its
//! `via: pod` and `via: service` probes are judged by separate tests so a regression in one
//! path is named as such. Interrupting the test binary (Ctrl-C) stops the run and cleans up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use crate::scenario_common;

use policy_testkit::scenario::apply::State;
use policy_testkit::scenario::connections::Connection;
use policy_testkit::scenario::format::Via;
use policy_testkit::scenario::kernel::{KernelConfig, KernelOracle, Mode, cleanup};
use policy_testkit::scenario::narrate::Narration;
use policy_testkit::scenario::parallel::run_files;
use policy_testkit::scenario::{Oracle, OracleError, Plan, Probe, Topology, run_plan_narrated};

use crate::SERIAL;
use policy_testkit::scenario::kernel::hosts::Network;

fn files(dir: &str) -> Vec<PathBuf> {
    scenario_common::scenario_dir(dir)
}

/// Scenario files run at once (each worker with its own hosts and agents): on this 2-core
/// machine 3 workers run the trap files in about half the time of one, most of a probe
/// batch being spent waiting on denied probes' timeouts.
const JOBS: usize = 3;

fn kernel_config(network: Network, mode: Mode) -> KernelConfig {
    let mut cfg = KernelConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_policy-agent")));
    cfg.reuse_hosts = true;
    cfg.network = network;
    cfg.mode = mode;
    cfg
}

/// Ends every worker's runner; an error of one is recorded.
fn finish_all<O: Oracle>(oracles: Vec<O>, errors: &mut Vec<String>) {
    for mut o in oracles {
        if let Err(e) = o.finish() {
            errors.push(format!("closing a runner: {e}"));
        }
    }
}

/// Runs the probes of the steps probing `via` of every file of the scenario directories on
/// the kernel (every step is still applied: each carries the full state) and asserts that all
/// passed, reporting the matrices of the files that did not.
fn run_sets(dirs: &[&str], via: Via) {
    let _guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut plans = Vec::new();
    for f in dirs.iter().flat_map(|d| files(d)) {
        let mut plan = Plan::load(&f).unwrap_or_else(|e| panic!("{e}"));
        let mut probes = 0;
        for step in &mut plan.steps {
            if step.via != via {
                step.probes.clear();
            }
            probes += step.probes.len();
        }
        if probes > 0 {
            plans.push(plan);
        }
    }
    let mut bad = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    let t_all = Instant::now();
    let cfg = kernel_config(Network::Routed, Mode::Standalone);
    let oracles = run_files(
        &plans,
        JOBS,
        || KernelOracle::new(cfg.clone()),
        |_| (),
        |i, run| {
            let f = &plans[i].file;
            let report = String::from_utf8_lossy(&run.output).to_string();
            match run.result {
                Ok(c) => {
                    eprintln!(
                        "{f}: {} passed, {} failed, {} not served, {:.1} s",
                        c.passed, c.failed, c.skipped, run.secs
                    );
                    passed += c.passed;
                    failed += c.failed;
                    if c.failed > 0 {
                        bad.push(format!("{f}: {} failed\n{report}", c.failed));
                    }
                }
                Err(e) => bad.push(format!("{f}: run error: {e}\n{report}")),
            }
        },
    );
    finish_all(oracles, &mut bad);
    eprintln!(
        "{dirs:?} via {via:?}: {passed} passed, {failed} failed in {:.1} s",
        t_all.elapsed().as_secs_f64()
    );
    assert!(passed > 0, "{dirs:?}: no probe ran");
    assert!(bad.is_empty(), "{dirs:?}:\n{}", bad.join("\n"));
}

#[test]
fn seed_scenarios_on_the_kernel() {
    run_sets(&["seed"], Via::Pod);
}

#[test]
fn trap_scenarios_on_the_kernel() {
    run_sets(&["traps"], Via::Pod);
}

/// Per `via`: probes passed and failed, and the report of each file with a failure there.
#[derive(Default)]
struct ViaResult {
    passed: usize,
    failed: usize,
    bad: Vec<String>,
}

struct SetResult {
    by_via: BTreeMap<Via, ViaResult>,
    errors: Vec<String>,
    files: usize,
    secs: f64,
}

/// A runner that records, per `via`, how each probe it answered compares with its
/// expectation (taken and reset after every file).
struct Tally {
    inner: KernelOracle,
    seen: BTreeMap<Via, (usize, usize)>,
}

impl Oracle for Tally {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn setup(&mut self, t: &Topology) -> Result<(), OracleError> {
        self.inner.setup(t)
    }
    fn apply(&mut self, t: &Topology, s: &State) -> Result<(), OracleError> {
        self.inner.apply(t, s)
    }
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        let got = self.inner.probe(probes)?;
        for (p, g) in probes.iter().zip(&got) {
            let e = self.seen.entry(p.via).or_default();
            if *g == p.expect_allowed {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        Ok(got)
    }
    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        self.inner.open_connections(conns)
    }
    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        self.inner.check_connections(conns)
    }
    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        self.inner.close_connections(names)
    }
    fn teardown(&mut self) -> Result<(), OracleError> {
        self.inner.teardown()
    }
    fn finish(&mut self) -> Result<(), OracleError> {
        self.inner.finish()
    }
}

/// Every file of the directories, every step and both `via`s, on one node.
fn run_all(dirs: &[&str]) -> SetResult {
    run_all_on(dirs, 1, Network::Routed, Mode::Standalone)
}

/// [`run_all`] with the pods spread over `nodes` nodes, one agent each in `mode`, reaching
/// each other over `network`; [`JOBS`] files at once, each worker reusing its hosts across
/// files of the same topology.
fn run_all_on(dirs: &[&str], nodes: usize, network: Network, mode: Mode) -> SetResult {
    let _guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let plans: Vec<Plan> = dirs
        .iter()
        .flat_map(|d| files(d))
        .map(|f| Plan::load_on(&f, nodes).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert!(!cleanup::interrupted(), "interrupted");
    let mut res = SetResult {
        by_via: BTreeMap::new(),
        errors: Vec::new(),
        files: 0,
        secs: 0.0,
    };
    let t_all = Instant::now();
    let cfg = kernel_config(network, mode);
    let oracles = run_files(
        &plans,
        JOBS,
        || Tally {
            inner: KernelOracle::new(cfg.clone()),
            seen: BTreeMap::new(),
        },
        |t| std::mem::take(&mut t.seen),
        |i, run| {
            let f = &plans[i].file;
            let report = String::from_utf8_lossy(&run.output).to_string();
            res.files += 1;
            eprintln!("{f}: {:?} in {:.1} s", run.taken, run.secs);
            for (via, (p, fl)) in run.taken {
                let r = res.by_via.entry(via).or_default();
                r.passed += p;
                r.failed += fl;
                if fl > 0 {
                    r.bad
                        .push(format!("{f}: {fl} failed via {via:?}\n{report}"));
                }
            }
            if let Err(e) = run.result {
                res.errors.push(format!("{f}: run error: {e}\n{report}"));
            }
        },
    );
    finish_all(oracles, &mut res.errors);
    res.secs = t_all.elapsed().as_secs_f64();
    for (via, r) in &res.by_via {
        eprintln!(
            "{dirs:?} via {via:?}: {} passed, {} failed",
            r.passed, r.failed
        );
    }
    eprintln!(
        "{dirs:?} on {nodes} node(s), {network:?}, {mode:?}: {} files in {:.1} s",
        res.files, res.secs
    );
    res
}

fn check(res: &SetResult, via: Via) {
    assert!(
        res.errors.is_empty(),
        "run errors:\n{}",
        res.errors.join("\n")
    );
    let r = res
        .by_via
        .get(&via)
        .unwrap_or_else(|| panic!("no probe via {via:?} ran"));
    assert!(r.passed > 0, "no probe via {via:?} passed");
    assert!(
        r.bad.is_empty(),
        "via {via:?}: {} passed, {} failed\n{}",
        r.passed,
        r.failed,
        r.bad.join("\n")
    );
}

/// The upstream e2e set runs once for both tests below.
fn upstream() -> &'static SetResult {
    static RESULT: OnceLock<SetResult> = OnceLock::new();
    RESULT.get_or_init(|| run_all(&["upstream"]))
}

/// Every scenario file (demo, seeds, traps, the upstream suite) with its pods spread over
/// three nodes (routed underlay, one standalone agent per node): remote identities and named
/// ports, Services to backends on other nodes, externals on the underlay.
#[test]
fn every_scenario_on_three_routed_nodes() {
    let res = run_all_on(
        &["demo", "seed", "traps", "upstream"],
        3,
        Network::Routed,
        Mode::Standalone,
    );
    check(&res, Via::Pod);
    check(&res, Via::Service);
}

/// The same over a VXLAN overlay on two nodes, in cluster mode: pod traffic between the nodes
/// crosses the underlay encapsulated and is judged where it leaves `vx0`; both agents list
/// and watch one fake API server on the underlay, which the runner writes every step to,
/// with a bookmark after every step and 410 Gone on one kind's watches every third step (the
/// runner waits for every agent to list that kind again).
#[test]
fn every_scenario_on_two_vxlan_nodes_in_cluster_mode() {
    let res = run_all_on(
        &["demo", "seed", "traps", "upstream"],
        2,
        Network::Vxlan,
        Mode::Cluster,
    );
    check(&res, Via::Pod);
    check(&res, Via::Service);
}

#[test]
fn upstream_scenarios_on_the_kernel_via_pod() {
    check(upstream(), Via::Pod);
}

#[test]
fn upstream_scenarios_on_the_kernel_via_service() {
    check(upstream(), Via::Service);
}

/// `cargo xtask demo` end to end in its narrated form: every matrix as the file expects, and
/// the narration a newcomer reads (each step's title and description, what changed).
#[test]
fn demo_runs_on_the_kernel_with_its_narration() {
    let _guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_policy-agent"));
    for f in files("demo") {
        let plan = Plan::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            plan.steps.len() >= 6,
            "{}: a demo tells 6-10 steps",
            f.display()
        );
        let mut oracle = KernelOracle::new(KernelConfig::new(agent.clone()));
        let mut out = Vec::new();
        let counts = run_plan_narrated(&plan, &mut oracle, &mut out, &Narration { color: false })
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let text = String::from_utf8_lossy(&out);
        assert!(
            counts.passed > 0 && counts.failed == 0,
            "{}: {counts:?}\n{text}",
            f.display()
        );
        for step in &plan.steps {
            let title = step
                .title
                .as_deref()
                .unwrap_or_else(|| panic!("step {} has no title", step.index + 1));
            assert!(text.contains(title), "missing title {title:?}");
            assert!(
                step.description.is_some(),
                "step {} has no description",
                step.index + 1
            );
        }
        assert!(
            text.matches("What changed:").count() >= plan.steps.len() - 1,
            "{text}"
        );
        assert!(!text.contains('\x1b'), "colour written to a non-terminal");
    }
}

/// A run killed outright leaves namespaces and dirs named with its pid; the next runner
/// removes them, and never those of a live process or of another naming scheme.
#[test]
fn leftovers_of_dead_runs_are_swept_and_nothing_else() {
    use std::process::Command;
    let _guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A pid that is certainly dead: a child that exited and was reaped.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    assert!(
        !Path::new(&format!("/proc/{dead}")).exists(),
        "pid {dead} reused already"
    );
    let dead_tag = cleanup::make_tag(dead, 5);
    let live_tag = cleanup::make_tag(std::process::id(), 1000);
    let ns_dead = [format!("ksn-{dead_tag}"), format!("ksp3-{dead_tag}")];
    let ns_live = format!("ksn-{live_tag}");
    let ns_other = format!("ksx-{dead_tag}");
    for n in ns_dead.iter().chain([&ns_live, &ns_other]) {
        let st = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {n}");
    }
    let dir_dead = std::env::temp_dir().join(format!("policy-scenario-{dead_tag}"));
    std::fs::create_dir_all(dir_dead.join("manifests")).expect("mkdir");

    let swept = cleanup::sweep_leftovers();

    let exists = |n: &str| Path::new("/run/netns").join(n).exists();
    let remove = |n: &str| {
        let _ = Command::new("ip").args(["netns", "del", n]).status();
    };
    let live_kept = exists(&ns_live);
    let other_kept = exists(&ns_other);
    remove(&ns_live);
    remove(&ns_other);
    for n in &ns_dead {
        assert!(!exists(n), "{n} not swept ({swept:?})");
    }
    assert!(!dir_dead.exists(), "{} not swept", dir_dead.display());
    assert!(live_kept, "the namespace of a live run was removed");
    assert!(
        other_kept,
        "a namespace of another naming scheme was removed"
    );
}
