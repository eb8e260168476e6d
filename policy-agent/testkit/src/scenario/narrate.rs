//! The narrated report (`policy-scenario --narrate`, `cargo xtask demo`): for a reader new to
//! NetworkPolicy rather than for a test log. Each step opens with its title, the file's
//! plain-language description and the objects it applies or deletes, then shows one compact
//! matrix per probed port and family (colour when the output is a terminal), whether every
//! connection behaved as the file expects, and what changed since the step before.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::time::Duration;

use super::format::{IpFamily, Liveness};
use super::plan::{Plan, Step};
use super::report::{self, Counts, Observed};
use super::run::Outcome;
use super::topology::EndpointName;

/// How the narration is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct Narration {
    /// ANSI colours (only when the output is a terminal).
    pub color: bool,
}

const WIDTH: usize = 92;

impl Narration {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }

    /// The scenario's name, description and how to read the matrices.
    pub fn intro(&self, out: &mut dyn Write, plan: &Plan, oracle: &str) -> io::Result<()> {
        writeln!(out, "{}", self.bold(&format!("== {} ==", plan.name)))?;
        if let Some(d) = &plan.description {
            for line in wrap(d, WIDTH) {
                writeln!(out, "{line}")?;
            }
        }
        writeln!(out, "{}", self.dim(&format!("(answered by {oracle})")))?;
        if plan.topology.nodes.len() > 1 {
            // Where each pod runs: what is judged on which node follows from it.
            for (k, node) in plan.topology.nodes.iter().enumerate() {
                let pods: Vec<String> = plan
                    .topology
                    .pods
                    .iter()
                    .filter(|p| p.node == k)
                    .map(|p| p.key.to_string())
                    .collect();
                writeln!(
                    out,
                    "{}",
                    self.dim(&format!("{} ({}): {}", node.name, node.v4, pods.join(" ")))
                )?;
            }
        }
        writeln!(out)?;
        writeln!(
            out,
            "How to read a matrix: each row is a client, each column a server; a cell is one"
        )?;
        writeln!(out, "real connection attempt from the row to the column.")?;
        writeln!(
            out,
            "  {} connected    {} blocked by policy    {} expected to connect, but blocked    {} expected blocked, but connected",
            self.paint("32", "+"),
            self.paint("31", "-"),
            self.paint("1;33", "X"),
            self.paint("1;33", "!")
        )?;
        writeln!(
            out,
            "  (blank: a host does not connect to itself; outside hosts do not connect to each other)"
        )
    }

    /// Before the step is applied: heading, description, the objects applied and deleted.
    pub fn step_header(&self, out: &mut dyn Write, step: &Step, steps: usize) -> io::Result<()> {
        writeln!(out)?;
        let title = step.title.clone().unwrap_or_else(|| {
            if step.applied.changes.is_empty() {
                "no change".into()
            } else {
                step.applied.changes.join("; ")
            }
        });
        let head = format!("--- Step {}/{steps}: {title} ", step.index + 1);
        let fill = WIDTH.saturating_sub(head.chars().count());
        writeln!(out, "{}", self.bold(&format!("{head}{}", "-".repeat(fill))))?;
        if let Some(d) = &step.description {
            for line in wrap(d, WIDTH) {
                writeln!(out, "{line}")?;
            }
        }
        if let Some(text) = &step.apply_text {
            writeln!(out, "{}", self.dim("applied:"))?;
            for (i, doc) in text.split("\n---").enumerate() {
                if i > 0 {
                    writeln!(out, "    {}", self.dim("---"))?;
                }
                for line in doc.trim_matches('\n').lines() {
                    writeln!(out, "    {}", self.paint("36", line))?;
                }
            }
        }
        if !step.delete.is_empty() {
            writeln!(
                out,
                "{} {}",
                self.dim("deleted:"),
                self.paint("36", &step.delete.join(", "))
            )?;
        }
        for w in &step.applied.warnings {
            writeln!(out, "warning: {w}")?;
        }
        let conns = &step.connections;
        if !conns.close.is_empty() {
            writeln!(
                out,
                "{} {}",
                self.dim("closes connections:"),
                self.paint("36", &conns.close.join(", "))
            )?;
        }
        for c in &conns.open {
            writeln!(
                out,
                "{} {}",
                self.dim("opens (kept open across the next steps):"),
                self.paint("36", &c.to_string())
            )?;
        }
        Ok(())
    }

    /// The step's matrices and verdict line; returns the counts.
    pub fn step_result(
        &self,
        out: &mut dyn Write,
        plan: &Plan,
        step: &Step,
        outcomes: &[Outcome],
        alive: &[bool],
        enforced_in: Duration,
    ) -> io::Result<Counts> {
        let mut counts = Counts::default();
        if step.probes.is_empty() {
            writeln!(out, "{}", self.dim("(nothing probed in this step)"))?;
            return Ok(counts);
        }
        if enforced_in.as_millis() > 0 {
            // (a simulation answers at once: nothing worth a line)
            writeln!(
                out,
                "{}",
                self.dim(&format!(
                    "enforced by the agent in {} ms",
                    enforced_in.as_millis()
                ))
            )?;
        }
        let endpoints = plan.topology.endpoints();
        let names: Vec<String> = endpoints.iter().map(short_name).collect();
        let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(1);
        let mut mismatches = Vec::new();
        for &family in &plan.topology.families {
            for &port in &step.ports {
                writeln!(
                    out,
                    "\n  {port} over {} (via {}):",
                    family.as_str(),
                    step.via.as_str()
                )?;
                write!(out, "  {:>width$}  ", "")?;
                for n in &names {
                    write!(out, " {n:^w$}", w = n.chars().count().max(3))?;
                }
                writeln!(out)?;
                for (si, src) in endpoints.iter().enumerate() {
                    write!(out, "  {:>width$}  ", names[si])?;
                    for (di, dst) in endpoints.iter().enumerate() {
                        let w = names[di].chars().count().max(3);
                        let found = step.probes.iter().enumerate().find(|(_, p)| {
                            p.family == family && p.port == port && &p.src == src && &p.dst == dst
                        });
                        let cell = match found {
                            None => " ".to_string(),
                            Some((i, p)) => match outcomes[i] {
                                Outcome::NotServed => {
                                    counts.skipped += 1;
                                    "~".into()
                                }
                                Outcome::Observed(got) if got == p.expect_allowed => {
                                    counts.passed += 1;
                                    if got { "+".into() } else { "-".into() }
                                }
                                Outcome::Observed(got) => {
                                    counts.failed += 1;
                                    mismatches.push(format!(
                                        "{} -> {} {port} {}: expected {}, got {}",
                                        p.src,
                                        p.dst,
                                        family.as_str(),
                                        if p.expect_allowed {
                                            "connected"
                                        } else {
                                            "blocked"
                                        },
                                        if got { "connected" } else { "blocked" },
                                    ));
                                    if got { "!".into() } else { "X".into() }
                                }
                            },
                        };
                        let pad = w - 1;
                        let (l, r) = (pad / 2, pad - pad / 2);
                        let shown = match cell.as_str() {
                            "+" => self.paint("32", &cell),
                            "-" => self.paint("31", &cell),
                            "X" | "!" => self.paint("1;33", &cell),
                            _ => cell,
                        };
                        write!(out, " {}{shown}{}", " ".repeat(l), " ".repeat(r))?;
                    }
                    writeln!(out)?;
                }
            }
        }
        self.connections(out, step, alive, &mut counts, &mut mismatches)?;
        writeln!(out)?;
        let probed = counts.passed + counts.failed;
        if counts.failed == 0 {
            writeln!(
                out,
                "{}",
                self.paint(
                    "32",
                    &format!("all {probed} connections behaved as the policies say they must")
                )
            )?;
        } else {
            writeln!(
                out,
                "{}",
                self.paint(
                    "1;31",
                    &format!(
                        "{} of {probed} connections did NOT behave as expected:",
                        counts.failed
                    )
                )
            )?;
            for m in &mismatches {
                writeln!(out, "  {m}")?;
            }
        }
        Ok(counts)
    }

    /// The connections kept open across steps, each with what it did and what it must do.
    fn connections(
        &self,
        out: &mut dyn Write,
        step: &Step,
        alive: &[bool],
        counts: &mut Counts,
        mismatches: &mut Vec<String>,
    ) -> io::Result<()> {
        let checks = &step.connections.checks;
        if checks.is_empty() {
            return Ok(());
        }
        writeln!(
            out,
            "\n  Connections kept open from earlier (alive: a message still makes the round trip):"
        )?;
        for (i, check) in checks.iter().enumerate() {
            let got = alive.get(i).copied().map(Liveness::from_alive);
            let ok = report::check_passed(step, alive, i);
            let shown = got.map_or("not checked", Liveness::as_str);
            let mark = match (ok, got) {
                (true, Some(Liveness::Alive)) => self.paint("32", "+"),
                (true, _) => self.paint("31", "-"),
                (false, _) => self.paint(
                    "1;33",
                    if got == Some(Liveness::Alive) {
                        "!"
                    } else {
                        "X"
                    },
                ),
            };
            if ok {
                counts.passed += 1;
            } else {
                counts.failed += 1;
                mismatches.push(format!(
                    "open connection {}: expected {}, got {shown}",
                    check.conn,
                    check.expect.as_str()
                ));
            }
            writeln!(
                out,
                "  {mark} {}: {shown} (expected {})",
                check.conn,
                check.expect.as_str()
            )?;
        }
        Ok(())
    }

    /// The closing paragraph of a scenario.
    pub fn summary(&self, out: &mut dyn Write, plan: &Plan, total: &Counts) -> io::Result<()> {
        writeln!(out)?;
        let n = total.passed + total.failed;
        let text = if total.failed == 0 {
            self.paint(
                "1;32",
                &format!(
                    "{}: {} steps, {n} connections, every one as the policies say.",
                    plan.name,
                    plan.steps.len()
                ),
            )
        } else {
            self.paint("1;31", &format!(
                "{}: {} steps, {n} connections, {} NOT as the policies say (marked X or ! above).",
                plan.name,
                plan.steps.len(),
                total.failed
            ))
        };
        writeln!(out, "{text}")
    }

    /// One line per direction of what changed since the previous step.
    pub fn changes(
        &self,
        out: &mut dyn Write,
        plan: &Plan,
        before: &Observed,
        after: &Observed,
    ) -> io::Result<()> {
        let mut opened = Vec::new();
        let mut closed = Vec::new();
        for (k, now) in after {
            if let Some(was) = before.get(k)
                && was != now
            {
                if *now {
                    opened.push(k.clone())
                } else {
                    closed.push(k.clone())
                }
            }
        }
        if opened.is_empty() && closed.is_empty() {
            return writeln!(out, "{} nothing", self.bold("What changed:"));
        }
        for (what, code, list) in [("now blocked", "31", &closed), ("now open", "32", &opened)] {
            if list.is_empty() {
                continue;
            }
            writeln!(
                out,
                "{} {} ({}): {}",
                self.bold("What changed:"),
                self.paint(code, what),
                list.len(),
                summarise(plan, after, list)
            )?;
        }
        Ok(())
    }
}

/// `x/a` for pods, the bare name for externals.
fn short_name(e: &EndpointName) -> String {
    match e {
        EndpointName::Pod(k) => k.to_string(),
        EndpointName::External(n) => n.clone(),
    }
}

type Key = (
    IpFamily,
    super::expect::ProbePort,
    EndpointName,
    EndpointName,
);

/// The changed connections grouped by server (or by client, whichever reads shorter): "every
/// client -> x/a", "y/* -> x/a", "z/c -> x/b".
fn summarise(plan: &Plan, all: &Observed, changed: &[Key]) -> String {
    let by_dst = group(plan, all, changed, false);
    let by_src = group(plan, all, changed, true);
    let len = |v: &Vec<String>| v.iter().map(String::len).sum::<usize>() + 2 * v.len();
    let pick = if len(&by_src) < len(&by_dst) {
        by_src
    } else {
        by_dst
    };
    const SHOWN: usize = 5;
    let more = pick.len().saturating_sub(SHOWN);
    let mut s = pick.into_iter().take(SHOWN).collect::<Vec<_>>().join("; ");
    if more > 0 {
        s.push_str(&format!("; and {more} more"));
    }
    s
}

fn group(plan: &Plan, all: &Observed, changed: &[Key], by_src: bool) -> Vec<String> {
    // Per (family, port, fixed end): the other ends that changed.
    let mut groups: BTreeMap<
        (IpFamily, super::expect::ProbePort, EndpointName),
        BTreeSet<EndpointName>,
    > = BTreeMap::new();
    for (f, p, s, d) in changed {
        let (fixed, other) = if by_src { (s, d) } else { (d, s) };
        groups
            .entry((*f, *p, fixed.clone()))
            .or_default()
            .insert(other.clone());
    }
    let multi = {
        let fams: BTreeSet<_> = changed.iter().map(|k| (k.0, k.1)).collect();
        fams.len() > 1
    };
    // Ends with the same set of changed peers are written once: "{x/a, y/*} -> z/*".
    let mut merged: BTreeMap<(IpFamily, super::expect::ProbePort, String), BTreeSet<EndpointName>> =
        BTreeMap::new();
    for ((f, p, fixed), others) in groups {
        let probed: BTreeSet<EndpointName> = all
            .keys()
            .filter(|(ff, pp, s, d)| {
                *ff == f && *pp == p && if by_src { s == &fixed } else { d == &fixed }
            })
            .map(|(_, _, s, d)| if by_src { d.clone() } else { s.clone() })
            .collect();
        let text = if others == probed {
            if by_src {
                "everything".to_string()
            } else {
                "everyone".to_string()
            }
        } else {
            compress(plan, &others, &probed)
        };
        merged.entry((f, p, text)).or_default().insert(fixed);
    }
    let everyone: BTreeSet<EndpointName> = plan.topology.endpoints().into_iter().collect();
    merged
        .into_iter()
        .map(|((f, p, others_text), fixed)| {
            let fixed_text = compress(plan, &fixed, &everyone);
            let tail = if multi {
                format!(" ({p} {})", f.as_str())
            } else {
                String::new()
            };
            if by_src {
                format!("{fixed_text} -> {others_text}{tail}")
            } else {
                format!("{others_text} -> {fixed_text}{tail}")
            }
        })
        .collect()
}

/// Names, with every probed pod of a namespace written `ns/*`.
fn compress(plan: &Plan, set: &BTreeSet<EndpointName>, probed: &BTreeSet<EndpointName>) -> String {
    let mut parts = Vec::new();
    let mut done = BTreeSet::new();
    for e in set {
        if done.contains(e) {
            continue;
        }
        if let EndpointName::Pod(k) = e {
            let ns_members: BTreeSet<EndpointName> = plan
                .topology
                .pods
                .iter()
                .filter(|p| p.key.namespace == k.namespace)
                .map(|p| EndpointName::Pod(p.key.clone()))
                .filter(|m| probed.contains(m))
                .collect();
            if ns_members.len() > 1 && ns_members.is_subset(set) {
                parts.push(format!("{}/*", k.namespace));
                done.extend(ns_members);
                continue;
            }
        }
        parts.push(short_name(e));
        done.insert(e.clone());
    }
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        format!("{{{}}}", parts.join(", "))
    }
}

/// Words of `text` on lines of at most `width` characters.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_on_words() {
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert!(wrap("  ", 10).is_empty());
    }
}
