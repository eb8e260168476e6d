//! `policy-scenario [--simulate] [--narrate] [--nodes N] [--network routed|vxlan] [--mode standalone|cluster] [--color auto|always|never] [--agent PATH] FILE...`:
//! runs scenario files (scenarios/FORMAT.md) and ends with `N passed, N failed`. `--nodes N`
//! spreads the pods over N nodes (round-robin unless a pod names its node), each node with
//! its own agent, joined by an underlay (`--network`: routed host-gw style, the default, or a
//! VXLAN overlay). `--mode cluster` runs every agent as `policy-agent cluster` watching one fake
//! API server the runner writes the objects to (default: standalone on one manifest
//! directory). `--narrate`
//! writes for a reader (`cargo xtask demo`): each step's title, description and objects, then
//! compact matrices and what changed. SIGINT/SIGTERM stop the run and clean up (exit 130). Without `--simulate` each file runs
//! on the kernel datapath: namespaces, the `policy-agent` binary (by default the one beside this
//! executable), real sockets; that needs root. Exit 0 when every probe
//! passed, 1 on a failed probe, an invalid file or a run error, 2 on a usage error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use policy_testkit::scenario::kernel::cleanup;
use policy_testkit::scenario::kernel::hosts::Network;
use policy_testkit::scenario::kernel::{KernelConfig, KernelOracle, Mode};
use policy_testkit::scenario::narrate::Narration;
use policy_testkit::scenario::report::{Counts, LEGEND};
use policy_testkit::scenario::{Oracle, Plan, run_plan, run_plan_narrated, simulate};

fn usage() -> ExitCode {
    eprintln!(
        "usage: policy-scenario [--simulate] [--narrate] [--nodes N] [--network routed|vxlan] [--mode standalone|cluster] [--color auto|always|never] [--agent PATH] FILE..."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let t_start = std::time::Instant::now();
    // Before any thread starts: Ctrl-C now stops the run at its next wait and cleans up.
    cleanup::install_interrupt_handler();
    let mut simulate = false;
    let mut narrate = false;
    // SAFETY: isatty has no preconditions.
    let mut color = unsafe { libc::isatty(1) } == 1 && std::env::var_os("NO_COLOR").is_none();
    let mut files = Vec::new();
    let mut agent: Option<PathBuf> = None;
    let mut nodes = 1usize;
    let mut network = Network::Routed;
    let mut mode = Mode::Standalone;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--simulate") => simulate = true,
            Some("--narrate") => narrate = true,
            Some("--color") => match args.next().as_deref().and_then(|a| a.to_str()) {
                Some("always") => color = true,
                Some("never") => color = false,
                Some("auto") => {}
                _ => return usage(),
            },
            Some("--nodes") => match args.next().and_then(|a| a.to_str()?.parse().ok()) {
                Some(n) => nodes = n,
                None => return usage(),
            },
            Some("--network") => match args.next().and_then(|a| a.to_str()?.parse().ok()) {
                Some(n) => network = n,
                None => return usage(),
            },
            Some("--mode") => match args.next().and_then(|a| a.to_str()?.parse().ok()) {
                Some(m) => mode = m,
                None => return usage(),
            },
            Some("--agent") => match args.next() {
                Some(p) => agent = Some(PathBuf::from(p)),
                None => return usage(),
            },
            Some("-h" | "--help") => return usage(),
            Some(s) if s.starts_with('-') => {
                eprintln!("unknown option {s}");
                return usage();
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    if files.is_empty() {
        return usage();
    }
    let agent = match agent {
        Some(p) => p,
        None => match std::env::current_exe() {
            Ok(exe) => exe.with_file_name("policy-agent"),
            Err(e) => {
                eprintln!(
                    "policy-scenario: cannot locate the agent binary ({e}); give --agent PATH"
                );
                return ExitCode::from(2);
            }
        },
    };
    if !simulate && !agent.is_file() {
        eprintln!(
            "policy-scenario: agent binary {} not found: build it (cargo build --release -p \
             policy-agent --bins) or give --agent PATH",
            agent.display()
        );
        return ExitCode::from(2);
    }

    // Check every file first: an invalid file is reported before anything runs.
    let mut plans = Vec::new();
    let mut invalid = 0usize;
    for f in &files {
        match Plan::load_on(f, nodes) {
            Ok(p) => plans.push(p),
            Err(e) => {
                eprintln!("error: {e}");
                invalid += 1;
            }
        }
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !narrate {
        let _ = writeln!(out, "{LEGEND}");
    }
    let narration = Narration { color };
    let mut total = Counts::default();
    let mut broken = 0usize;
    // One kernel runner for all files: files with the same hosts share them (and the agent).
    let mut kernel = (!simulate).then(|| {
        let mut cfg = KernelConfig::new(agent.clone());
        cfg.reuse_hosts = true;
        cfg.network = network;
        cfg.mode = mode;
        KernelOracle::new(cfg)
    });
    for plan in &plans {
        if cleanup::interrupted() {
            break;
        }
        let mut sim;
        let oracle: &mut dyn Oracle = match kernel.as_mut() {
            Some(k) => k,
            None => {
                sim = simulate::simulation_oracle();
                sim.as_mut()
            }
        };
        let t0 = std::time::Instant::now();
        let result = if narrate {
            run_plan_narrated(plan, oracle, &mut out, &narration)
        } else {
            run_plan(plan, oracle, &mut out)
        };
        if !narrate {
            let _ = writeln!(out, "({}: {:.1} s)", plan.file, t0.elapsed().as_secs_f64());
        }
        match result {
            Ok(c) => total.add(&c),
            Err(e) => {
                if !cleanup::interrupted() {
                    eprintln!("error: {}: {e}", plan.file);
                }
                broken += 1;
            }
        }
    }
    if let Some(k) = kernel.as_mut()
        && let Err(e) = k.close()
    {
        eprintln!("error: {e}");
        broken += 1;
    }
    drop(kernel);
    if total.skipped > 0 {
        let _ = writeln!(
            out,
            "({} probes to ports their destination does not serve were not run)",
            total.skipped
        );
    }
    if invalid + broken > 0 && !cleanup::interrupted() {
        let _ = writeln!(out, "{invalid} invalid file(s), {broken} run error(s)");
    }
    let _ = writeln!(out, "{} passed, {} failed", total.passed, total.failed);
    if narrate {
        let _ = writeln!(out, "total time {:.0} s", t_start.elapsed().as_secs_f64());
        if !simulate {
            let _ = writeln!(
                out,
                "every namespace, process and mount the run made is removed"
            );
        }
    }
    if cleanup::interrupted() {
        let _ = writeln!(out, "interrupted: stopped early, cleaned up");
        return ExitCode::from(130);
    }
    if total.failed > 0 || invalid + broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
