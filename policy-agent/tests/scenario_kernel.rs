//! The scenario files on the real kernel datapath: namespaces, the `policy-agent` binary in
//! standalone mode, real TCP/UDP/SCTP probes. Every probe of the seed, trap and upstream e2e
//! scenarios must match its expectation. Needs root, BPF, namespaces and iptables: fails
//! without.
//!
//! Steps probing through Service ClusterIPs (`via: service`) run in a test of their own: the
//! datapath judges a pod's egress at its veth before kube-proxy's DNAT (it sees the ClusterIP,
//! not the backend an egress rule names), so that test fails until the datapath defers the
//! egress verdict of service traffic to after the DNAT.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use policy_agent::scenario::format::Via;
use policy_agent::scenario::kernel::{KernelConfig, KernelOracle};
use policy_agent::scenario::{Plan, run_plan};

/// One scenario set at a time: probes time out after a second, so parallel sets on a small
/// machine would only make timing noisier.
static SERIAL: Mutex<()> = Mutex::new(());

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no scenario in {}", root.display());
    v
}

/// Runs the probes of the steps probing `via` of every file of the scenario directories on
/// the kernel (every step is still applied: each carries the full state) and asserts that all
/// passed, reporting the matrices of the files that did not.
fn run_sets(dirs: &[&str], via: Via) {
    let _guard = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_policy-agent"));
    let mut bad = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    let t_all = Instant::now();
    for f in dirs.iter().flat_map(|d| files(d)) {
        let mut plan = Plan::load(&f).unwrap_or_else(|e| panic!("{e}"));
        let mut probes = 0;
        for step in &mut plan.steps {
            if step.via != via {
                step.probes.clear();
            }
            probes += step.probes.len();
        }
        if probes == 0 {
            continue;
        }
        let mut oracle = KernelOracle::new(KernelConfig::new(agent.clone()));
        let mut out = Vec::new();
        let t0 = Instant::now();
        let result = run_plan(&plan, &mut oracle, &mut out);
        let report = String::from_utf8_lossy(&out).to_string();
        match result {
            Ok(c) => {
                eprintln!(
                    "{}: {} passed, {} failed, {} not served, {:.1} s",
                    f.display(),
                    c.passed,
                    c.failed,
                    c.skipped,
                    t0.elapsed().as_secs_f64()
                );
                passed += c.passed;
                failed += c.failed;
                if c.failed > 0 {
                    bad.push(format!("{}: {} failed\n{report}", f.display(), c.failed));
                }
            }
            Err(e) => bad.push(format!("{}: run error: {e}\n{report}", f.display())),
        }
    }
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


