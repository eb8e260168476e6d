//! Runs a plan against an [`Oracle`]: something that enforces the objects of each step and
//! says whether a probe connects. The simulation oracles live in `simulate`; the kernel runner
//! (real namespaces, the agent, real sockets) implements the same trait.

use std::io::{self, Write};

use super::apply::State;
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
    let result = run_steps(plan, oracle, out, None);
    let down = oracle.teardown();
    let counts = result?;
    down?;
    Ok(counts)
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
    let result = run_steps(plan, oracle, out, Some(narration));
    let down = oracle.teardown();
    let counts = result?;
    down?;
    Ok(counts)
}

fn run_steps(
    plan: &Plan,
    oracle: &mut dyn Oracle,
    out: &mut dyn Write,
    narration: Option<&Narration>,
) -> Result<Counts, OracleError> {
    let mut total = Counts::default();
    let n = plan.steps.len();
    let mut previous: Option<report::Observed> = None;
    for step in &plan.steps {
        if let Some(nar) = narration {
            nar.step_header(out, step, n)?;
        }
        let t0 = std::time::Instant::now();
        oracle.apply(&plan.topology, &step.state)?;
        let enforced_in = t0.elapsed();
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
        let counts = match narration {
            None => report::write_step(out, plan, step, n, &outcomes)?,
            Some(nar) => nar.step_result(out, plan, step, &outcomes, enforced_in)?,
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
