//! `policy-scenario [--simulate] FILE...`: runs scenario files (scenarios/FORMAT.md) and ends
//! with `N passed, N failed`. Exit 0 when every probe passed, 1 on a failed probe or an invalid
//! file, 2 on a usage error or when the requested runner is unavailable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use policy_agent::scenario::report::{Counts, LEGEND};
use policy_agent::scenario::{Plan, run_plan, simulate};

fn usage() -> ExitCode {
    eprintln!("usage: policy-scenario [--simulate] FILE...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut simulate = false;
    let mut files = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.to_str() {
            Some("--simulate") => simulate = true,
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
    if !simulate {
        eprintln!(
            "policy-scenario: kernel runner not built yet; use --simulate to run the scenarios \
             through the compiler and the kernel model"
        );
        return ExitCode::from(2);
    }

    // Check every file first: an invalid file is reported before anything runs.
    let mut plans = Vec::new();
    let mut invalid = 0usize;
    for f in &files {
        match Plan::load(f) {
            Ok(p) => plans.push(p),
            Err(e) => {
                eprintln!("error: {e}");
                invalid += 1;
            }
        }
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "{LEGEND}");
    let mut total = Counts::default();
    let mut broken = 0usize;
    for plan in &plans {
        let mut oracle = simulate::simulation_oracle();
        match run_plan(plan, oracle.as_mut(), &mut out) {
            Ok(c) => total.add(&c),
            Err(e) => {
                eprintln!("error: {}: {e}", plan.file);
                broken += 1;
            }
        }
    }
    if total.skipped > 0 {
        let _ = writeln!(
            out,
            "({} probes to ports their destination does not serve were not run)",
            total.skipped
        );
    }
    if invalid + broken > 0 {
        let _ = writeln!(out, "{invalid} invalid file(s), {broken} run error(s)");
    }
    let _ = writeln!(out, "{} passed, {} failed", total.passed, total.failed);
    if total.failed > 0 || invalid + broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
