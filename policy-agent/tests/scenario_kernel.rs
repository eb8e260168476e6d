//! The scenario files on the real kernel datapath: namespaces, the `policy-agent` binary in
//! standalone mode, real TCP/UDP/SCTP probes. Every probe of the seed and trap scenarios and of
//! the upstream e2e cases must match its expectation. Needs root, BPF, namespaces and
//! iptables: fails without.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

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

/// Runs each file on the kernel; returns (file, passed, failed, report) of the files with a
/// failed probe or a run error.
fn run_set(dir: &str) {
    let _guard = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_policy-agent"));
    let mut bad = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    let t_all = Instant::now();
    for f in files(dir) {
        let plan = Plan::load(&f).unwrap_or_else(|e| panic!("{e}"));
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
        "scenarios/{dir}: {passed} passed, {failed} failed in {:.1} s",
        t_all.elapsed().as_secs_f64()
    );
    assert!(passed > 0, "scenarios/{dir}: no probe ran");
    assert!(bad.is_empty(), "scenarios/{dir}:\n{}", bad.join("\n"));
}

#[test]
fn seed_scenarios_on_the_kernel() {
    run_set("seed");
}

#[test]
fn trap_scenarios_on_the_kernel() {
    run_set("traps");
}

#[test]
fn upstream_scenarios_on_the_kernel() {
    run_set("upstream");
}
