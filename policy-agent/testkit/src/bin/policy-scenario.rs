//! `policy-scenario [--simulate] [--narrate] [--nodes N] [--network routed|vxlan] [--mode standalone|cluster] [--jobs N] [--color auto|always|never] [--agent PATH] FILE...`:
//! runs scenario files (scenarios/FORMAT.md) and ends with `N passed, N failed`. `--nodes N`
//! spreads the pods over N nodes (round-robin unless a pod names its node), each node with
//! its own agent, joined by an underlay (`--network`: routed host-gw style, the default, or a
//! VXLAN overlay). `--mode cluster` runs every agent as `policy-agent cluster` watching one fake
//! API server the runner writes the objects to (default: standalone on one manifest
//! directory). `--jobs N` runs N files at once, each worker with its own hosts and agents
//! (reports still in file order). `--narrate`
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
use policy_testkit::scenario::parallel::run_files;
use policy_testkit::scenario::report::{Counts, LEGEND};
use policy_testkit::scenario::simulate::CheckedSimulation;
use policy_testkit::scenario::{Oracle, OracleError, Plan, run_plan_narrated};

fn usage() -> ExitCode {
    eprintln!(
        "usage: policy-scenario [--simulate] [--narrate] [--nodes N] [--network routed|vxlan] [--mode standalone|cluster] [--jobs N] [--color auto|always|never] [--agent PATH] FILE..."
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
    let mut jobs = 1usize;
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
            Some("--jobs") => match args.next().and_then(|a| a.to_str()?.parse().ok()) {
                Some(n) if n >= 1 => jobs = n,
                _ => return usage(),
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
    let make = || -> Box<dyn Oracle + Send> {
        if simulate {
            Box::new(CheckedSimulation::default())
        } else {
            // Files with the same hosts share them (and the agents).
            let mut cfg = KernelConfig::new(agent.clone());
            cfg.reuse_hosts = true;
            cfg.network = network;
            cfg.mode = mode;
            Box::new(KernelOracle::new(cfg))
        }
    };
    let mut report = |plan: &Plan, result: Result<Counts, OracleError>| match result {
        Ok(c) => total.add(&c),
        Err(e) => {
            if !cleanup::interrupted() {
                eprintln!("error: {}: {e}", plan.file);
            }
            broken += 1;
        }
    };
    let oracles = if narrate {
        // A story is told in order, by one runner.
        let mut oracle = make();
        for plan in &plans {
            if cleanup::interrupted() {
                break;
            }
            let result = run_plan_narrated(plan, &mut oracle, &mut out, &narration);
            report(plan, result);
        }
        vec![oracle]
    } else {
        run_files(
            &plans,
            jobs,
            make,
            |_| (),
            |i, run| {
                let _ = out.write_all(&run.output);
                let _ = writeln!(out, "({}: {:.1} s)", plans[i].file, run.secs);
                let _ = out.flush();
                report(&plans[i], run.result);
            },
        )
    };
    for mut oracle in oracles {
        if let Err(e) = oracle.finish() {
            eprintln!("error: {e}");
            broken += 1;
        }
    }
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
