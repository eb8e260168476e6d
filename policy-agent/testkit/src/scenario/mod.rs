//! Scenario files (scenarios/FORMAT.md): a small cluster, steps that change its objects and the
//! reachability expected after each. `format` reads the file, `topology` gives it addresses,
//! `plan` validates everything and precomputes each step's objects and probes (so an invalid
//! file is reported before any namespace is created), `run` drives an [`Oracle`] and reports,
//! `simulate` holds the oracles that need no kernel.
//!
//! A kernel runner is another [`Oracle`]:
//! - `setup(topology)`: a node namespace holding [`topology::NODE_V4`]/[`topology::NODE_V6`];
//!   one namespace per pod at `PodHost::v4`/`v6` (hostNetwork pods serve from the node
//!   namespace), servers on each `PodHost::ports` entry; one namespace per external at its
//!   addresses, serving every probed port; for `via: service`, DNAT from
//!   `PodHost::service_v4`/`service_v6` to the pod, as kube-proxy writes it.
//! - `apply(topology, state)`: write [`manifests::manifests`] into the agent's `--manifests`
//!   directory (and remove files of deleted objects), then wait until the agent enforced them.
//! - `open_connections`, `check_connections`, `close_connections`: long-lived connections (`connections`),
//!   kept on the same sockets across steps; a check says whether a message still makes the
//!   round trip.
//! - `probe(probes)`: from `Probe::src_addr`'s host, connect to `Probe::target_addr` on
//!   `Probe::port`; `true` when the reply came back in time. Probes to unserved ports are never
//!   passed in.

pub mod apply;
pub mod connections;
pub mod expect;
pub mod format;
pub mod kernel;
pub mod manifests;
pub mod narrate;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod run;
pub mod simulate;
pub mod topology;

use std::fmt;

pub use plan::{Plan, Probe, Step};
pub use run::{Oracle, OracleError, run_plan, run_plan_narrated};
pub use topology::Topology;

/// An invalid scenario file: names the file, the step (index into `steps`) and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ScenarioError {
    pub file: String,
    /// Index into the file's `steps`, when the problem is in a step.
    pub step: Option<usize>,
    /// Field path, relative to the step when there is one (`expect.deny[1]`).
    pub field: String,
    pub message: String,
}

impl ScenarioError {
    pub fn new(
        file: &str,
        step: Option<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ScenarioError {
            file: file.to_string(),
            step,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if let Some(i) = self.step {
            write!(f, "step {} (steps[{i}]), ", i + 1)?;
        }
        if !self.field.is_empty() {
            write!(f, "field {}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}
