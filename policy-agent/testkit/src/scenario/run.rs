//! Runs a plan against an [`Oracle`]: something that enforces the objects of each step and
//! says whether a probe connects. The simulation oracles live in `simulate`; the kernel runner
//! (real namespaces, the agent, real sockets) implements the same trait.

use std::io::{self, Write};

use super::apply::State;
use super::connections::Connection;
use super::narrate::Narration;
use super::plan::{Plan, Probe};
use super::report::{self, Counts};
use super::topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error("{0}")]
    Failed(String),
    #[error("writing the report: {0}")]
    Io(#[from] io::Error),
}

/// Each step calls, in order: `close_connections` (those the step ends), `apply` (its objects
/// enforced), `open_connections` (its new ones), `probe`, `check_connections` (every open one).
pub trait Oracle {
    /// What answers the probes, for the report header.
    fn describe(&self) -> String;

    /// Builds the hosts of a scenario; called once per plan before its first step.
    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError>;

    /// Enforces the objects of `state` (every namespace, pod and policy, replacing what the
    /// previous step enforced).
    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError>;

    /// Runs the probes (all to served ports) and says, in order, whether each connected.
    /// Runners that can probe in parallel should.
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError>;

    /// Opens long-lived connections (after the step's change is enforced), kept until
    /// [`Oracle::close_connections`] or the end of the plan. One the policies in force deny is an error
    /// naming it. Oracles that cannot keep connections say so (the default).
    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        match conns.first() {
            None => Ok(()),
            Some(c) => Err(OracleError::Failed(format!(
                "{} cannot keep long-lived connections (connection {})",
                self.describe(),
                c.name
            ))),
        }
    }

    /// Checks open connections and says, in order, whether each is alive: a message from the
    /// client reaches the server on that connection and the answer comes back in time.
    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        match conns.first() {
            None => Ok(Vec::new()),
            Some(c) => Err(OracleError::Failed(format!(
                "{} cannot check long-lived connections (connection {})",
                self.describe(),
                c.name
            ))),
        }
    }

    /// Ends open connections by name (at a step's `close` and at the end of a plan).
    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        let _ = names;
        Ok(())
    }

    /// Removes what `setup` built. Called after the last step, also when a step failed.
    fn teardown(&mut self) -> Result<(), OracleError> {
        Ok(())
    }

    /// Ends the oracle's use: removes anything `teardown` kept for the next plan.
    fn finish(&mut self) -> Result<(), OracleError> {
        Ok(())
    }
}

impl<T: Oracle + ?Sized> Oracle for Box<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        (**self).setup(topology)
    }
    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError> {
        (**self).apply(topology, state)
    }
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        (**self).probe(probes)
    }
    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        (**self).open_connections(conns)
    }
    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        (**self).check_connections(conns)
    }
    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        (**self).close_connections(names)
    }
    fn teardown(&mut self) -> Result<(), OracleError> {
        (**self).teardown()
    }
    fn finish(&mut self) -> Result<(), OracleError> {
        (**self).finish()
    }
}

/// One probe's observed result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (`true`) or not, as observed.
    Observed(bool),
    /// Not run: the destination does not serve the port.
    NotServed,
}

/// Runs every step of a plan, writing each step's matrices to `out`; returns the counts.
pub fn run_plan(
    plan: &Plan,
    oracle: &mut dyn Oracle,
    out: &mut dyn Write,
) -> Result<Counts, OracleError> {
    writeln!(
        out,
        "=== {} ({}) on {}",
        plan.name,
        plan.file,
        oracle.describe()
    )?;
    oracle.setup(&plan.topology)?;
    let mut open = Vec::new();
    let result = run_steps(plan, oracle, out, None, &mut open);
    finish_plan(oracle, result, &open)
}

/// [`run_plan`] for a reader: each step's title, description and objects before it runs, then
/// compact matrices and what changed (`narrate`). Same probes, same verdicts.
pub fn run_plan_narrated(
    plan: &Plan,
    oracle: &mut dyn Oracle,
    out: &mut dyn Write,
    narration: &Narration,
) -> Result<Counts, OracleError> {
    narration.intro(out, plan, &oracle.describe())?;
    oracle.setup(&plan.topology)?;
    let mut open = Vec::new();
    let result = run_steps(plan, oracle, out, Some(narration), &mut open);
    finish_plan(oracle, result, &open)
}

/// Closes the connections still `open` (a runner reusing its hosts for the next plan must
/// not keep them), then tears down; the first error wins.
fn finish_plan(
    oracle: &mut dyn Oracle,
    result: Result<Counts, OracleError>,
    open: &[String],
) -> Result<Counts, OracleError> {
    let closed = if open.is_empty() {
        Ok(())
    } else {
        oracle.close_connections(open)
    };
    let down = oracle.teardown();
    let counts = result?;
    closed?;
    down?;
    Ok(counts)
}

/// Runs the steps; `open` holds the names of the connections open at any time (also when a
/// step fails), for [`finish_plan`].
fn run_steps(
    plan: &Plan,
    oracle: &mut dyn Oracle,
    out: &mut dyn Write,
    narration: Option<&Narration>,
    open: &mut Vec<String>,
) -> Result<Counts, OracleError> {
    let mut total = Counts::default();
    let n = plan.steps.len();
    let mut previous: Option<report::Observed> = None;
    for step in &plan.steps {
        if let Some(nar) = narration {
            nar.step_header(out, step, n)?;
        }
        let conns = &step.connections;
        if !conns.close.is_empty() {
            oracle.close_connections(&conns.close)?;
            open.retain(|n| !conns.close.contains(n));
        }
        let t0 = std::time::Instant::now();
        oracle.apply(&plan.topology, &step.state)?;
        let enforced_in = t0.elapsed();
        if !conns.open.is_empty() {
            // Recorded first: a half-opened set is closed at the end too.
            open.extend(conns.open.iter().map(|c| c.name.clone()));
            oracle.open_connections(&conns.open.iter().collect::<Vec<_>>())?;
        }
        let run: Vec<&Probe> = step.probes.iter().filter(|p| p.served).collect();
        let answers = oracle.probe(&run)?;
        if answers.len() != run.len() {
            return Err(OracleError::Failed(format!(
                "oracle answered {} of {} probes",
                answers.len(),
                run.len()
            )));
        }
        let mut answers = answers.into_iter();
        let outcomes: Vec<Outcome> = step
            .probes
            .iter()
            .map(|p| match p.served {
                true => Outcome::Observed(answers.next().unwrap_or(false)),
                false => Outcome::NotServed,
            })
            .collect();
        let checked: Vec<&Connection> = conns.checks.iter().map(|c| &c.conn).collect();
        let alive = if checked.is_empty() {
            Vec::new()
        } else {
            oracle.check_connections(&checked)?
        };
        if alive.len() != checked.len() {
            return Err(OracleError::Failed(format!(
                "oracle answered {} of {} connection checks",
                alive.len(),
                checked.len()
            )));
        }
        let counts = match narration {
            None => report::write_step(out, plan, step, n, &outcomes, &alive)?,
            Some(nar) => nar.step_result(out, plan, step, &outcomes, &alive, enforced_in)?,
        };
        let observed = report::observed(step, &outcomes);
        if let Some(prev) = &previous {
            match narration {
                None => report::write_changes(out, prev, &observed)?,
                Some(nar) => nar.changes(out, plan, prev, &observed)?,
            }
        }
        previous = Some(observed);
        total.add(&counts);
    }
    match narration {
        None => writeln!(
            out,
            "{}: {} passed, {} failed",
            plan.name, total.passed, total.failed
        )?,
        Some(nar) => nar.summary(out, plan, &total)?,
    }
    Ok(total)
}
