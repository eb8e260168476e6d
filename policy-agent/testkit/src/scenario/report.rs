//! The report of a step: one reachability matrix per probed port and family (rows sources,
//! columns destinations), mismatches marked, then each mismatch spelt out.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::expect::ProbePort;
use super::format::{IpFamily, Liveness};
use super::plan::{Plan, Step};
use super::run::Outcome;
use super::topology::EndpointName;

pub const LEGEND: &str = "legend: + allowed, - denied (both as expected); X expected allowed but denied; \
! expected denied but allowed; ~ port not served (not probed)";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    /// Probes to ports the destination does not serve (counted neither way).
    pub skipped: usize,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

fn cell(expect_allowed: bool, outcome: Outcome) -> char {
    match (expect_allowed, outcome) {
        (_, Outcome::NotServed) => '~',
        (true, Outcome::Observed(true)) => '+',
        (false, Outcome::Observed(false)) => '-',
        (true, Outcome::Observed(false)) => 'X',
        (false, Outcome::Observed(true)) => '!',
    }
}

/// Writes a step's matrices and connection checks; `outcomes` is parallel to `step.probes`,
/// `alive` to `step.connections.checks`.
pub fn write_step(
    out: &mut dyn Write,
    plan: &Plan,
    step: &Step,
    steps: usize,
    outcomes: &[Outcome],
    alive: &[bool],
) -> io::Result<Counts> {
    let changes = if step.applied.changes.is_empty() {
        "no change".to_string()
    } else {
        step.applied.changes.join("; ")
    };
    writeln!(out, "--- step {}/{steps}: {changes}", step.index + 1)?;
    for w in &step.applied.warnings {
        writeln!(out, "warning: {w}")?;
    }
    let mut counts = Counts::default();
    if step.probes.is_empty() {
        writeln!(out, "(nothing probed)")?;
        return Ok(counts);
    }
    let endpoints = plan.topology.endpoints();
    let names: Vec<String> = endpoints.iter().map(EndpointName::to_string).collect();
    let row_width = names.iter().map(String::len).max().unwrap_or(0);
    for &family in &plan.topology.families {
        for &port in &step.ports {
            let selected: Vec<(usize, &super::plan::Probe)> = step
                .probes
                .iter()
                .enumerate()
                .filter(|(_, p)| p.family == family && p.port == port)
                .collect();
            let mut c = Counts::default();
            let mut failures = Vec::new();
            for (i, p) in &selected {
                match outcomes[*i] {
                    Outcome::NotServed => c.skipped += 1,
                    Outcome::Observed(got) if got == p.expect_allowed => c.passed += 1,
                    Outcome::Observed(got) => {
                        c.failed += 1;
                        failures.push(format!(
                            "  FAIL {} -> {} {port} {}: expected {}, got {}",
                            p.src,
                            p.dst,
                            family.as_str(),
                            verdict(p.expect_allowed),
                            verdict(got)
                        ));
                    }
                }
            }
            writeln!(
                out,
                "{port} {} via {}: {} passed, {} failed{}",
                family.as_str(),
                step.via.as_str(),
                c.passed,
                c.failed,
                if c.skipped > 0 {
                    format!(", {} not served", c.skipped)
                } else {
                    String::new()
                }
            )?;
            // Header: destination names.
            write!(out, "{:row_width$} ", "")?;
            for n in &names {
                write!(out, " {n}")?;
            }
            writeln!(out)?;
            for (si, src) in endpoints.iter().enumerate() {
                write!(out, "{:row_width$} ", names[si])?;
                for (di, dst) in endpoints.iter().enumerate() {
                    let mark = selected
                        .iter()
                        .find(|(_, p)| &p.src == src && &p.dst == dst)
                        .map(|(i, p)| cell(p.expect_allowed, outcomes[*i]))
                        .unwrap_or(' ');
                    let w = names[di].len();
                    write!(out, " {:^w$}", mark)?;
                }
                writeln!(out)?;
            }
            for f in failures {
                writeln!(out, "{f}")?;
            }
            counts.add(&c);
        }
    }
    counts.add(&write_connections(out, step, alive)?);
    Ok(counts)
}

/// Whether check `i` of the step passed: each check counts as one probe.
pub fn check_passed(step: &Step, alive: &[bool], i: usize) -> bool {
    match (step.connections.checks.get(i), alive.get(i)) {
        (Some(c), Some(&a)) => Liveness::from_alive(a) == c.expect,
        _ => false,
    }
}

/// The step's open connections, one line each: `name src -> dst port family via ..: alive
/// (expected alive)`, failures marked `FAIL`.
fn write_connections(out: &mut dyn Write, step: &Step, alive: &[bool]) -> io::Result<Counts> {
    let mut c = Counts::default();
    let checks = &step.connections.checks;
    if checks.is_empty() {
        return Ok(c);
    }
    let mut lines = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        let got = alive.get(i).copied().map(Liveness::from_alive);
        let ok = check_passed(step, alive, i);
        if ok {
            c.passed += 1;
        } else {
            c.failed += 1;
        }
        lines.push(format!(
            "  {}{}: {} (expected {})",
            if ok { "" } else { "FAIL " },
            check.conn,
            got.map_or("not checked", Liveness::as_str),
            check.expect.as_str()
        ));
    }
    writeln!(
        out,
        "established connections: {} passed, {} failed",
        c.passed, c.failed
    )?;
    for l in lines {
        writeln!(out, "{l}")?;
    }
    Ok(c)
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allow" } else { "deny" }
}

/// What a step observed, by (family, port, source, destination).
pub type Observed = BTreeMap<(IpFamily, ProbePort, EndpointName, EndpointName), bool>;

pub fn observed(step: &Step, outcomes: &[Outcome]) -> Observed {
    step.probes
        .iter()
        .zip(outcomes)
        .filter_map(|(p, o)| match o {
            Outcome::Observed(v) => Some(((p.family, p.port, p.src.clone(), p.dst.clone()), *v)),
            Outcome::NotServed => None,
        })
        .collect()
}

/// How many transitions are spelt out per direction before "and N more".
const CHANGES_SHOWN: usize = 8;

/// One line per direction of change since the previous step (probes both steps ran).
pub fn write_changes(out: &mut dyn Write, before: &Observed, after: &Observed) -> io::Result<()> {
    let mut opened = Vec::new();
    let mut closed = Vec::new();
    for (k, now) in after {
        if let Some(was) = before.get(k)
            && was != now
        {
            let (family, port, src, dst) = k;
            let line = format!("{src} -> {dst} {port} {}", family.as_str());
            if *now {
                opened.push(line)
            } else {
                closed.push(line)
            }
        }
    }
    if opened.is_empty() && closed.is_empty() {
        return writeln!(out, "changed since the previous step: nothing");
    }
    for (what, list) in [("now allowed", opened), ("now denied", closed)] {
        if list.is_empty() {
            continue;
        }
        let shown: Vec<&str> = list
            .iter()
            .take(CHANGES_SHOWN)
            .map(String::as_str)
            .collect();
        let more = list.len().saturating_sub(CHANGES_SHOWN);
        let tail = if more > 0 {
            format!(", and {more} more")
        } else {
            String::new()
        };
        writeln!(out, "{what} ({}): {}{tail}", list.len(), shown.join(", "))?;
    }
    Ok(())
}
