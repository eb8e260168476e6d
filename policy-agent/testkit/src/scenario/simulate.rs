//! Oracles that need no kernel: the compiler with the userspace model of the kernel's lookups
//! (the datapath's algorithm over the maps the agent would write; what `--simulate` uses), and
//! the reference evaluator straight from the spec (to judge the former).

use super::apply::State;
use super::plan::Probe;
use super::run::{Oracle, OracleError};
use super::topology::{EndpointName, Topology};
use policy_agent::compiler::{self, CompilerState, MapContents};
use policy_agent::kernel_model::KernelModel;
use policy_agent::model::Snapshot;
use policy_agent::reference::{self, Endpoint};

/// The probe's endpoints as the reference evaluator sees them. With `via: service` the
/// destination is the backend pod: kube-proxy's DNAT happens before any policy is judged.
pub fn reference_endpoints(probe: &Probe) -> (Endpoint, Endpoint) {
    let ep = |name: &EndpointName, addr| match name {
        EndpointName::Pod(key) => Endpoint::Pod {
            key: key.clone(),
            addr,
        },
        EndpointName::External(_) => Endpoint::Host(addr),
    };
    (
        ep(&probe.src, probe.src_addr),
        ep(&probe.dst, probe.dst_addr),
    )
}

/// Answers probes with [`reference::allowed`].
#[derive(Default)]
pub struct ReferenceOracle {
    snapshot: Snapshot,
}

impl ReferenceOracle {
    pub fn verdict(snapshot: &Snapshot, probe: &Probe) -> bool {
        let (src, dst) = reference_endpoints(probe);
        reference::allowed(snapshot, &src, &dst, probe.port.protocol, probe.port.port)
    }
}

impl Oracle for ReferenceOracle {
    fn describe(&self) -> String {
        "simulation (reference evaluator)".into()
    }

    fn setup(&mut self, _topology: &Topology) -> Result<(), OracleError> {
        Ok(())
    }

    fn apply(&mut self, _topology: &Topology, state: &State) -> Result<(), OracleError> {
        self.snapshot = state.snapshot.clone();
        Ok(())
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        Ok(probes
            .iter()
            .map(|p| Self::verdict(&self.snapshot, p))
            .collect())
    }
}

/// Compiles each step's objects into map contents, as the agent does, and answers probes with
/// the kernel model's lookups over them. The compiler state lives across steps, so later steps
/// compile with the numbering earlier ones left, as in the running agent.
#[derive(Default)]
pub struct KernelModelOracle {
    state: CompilerState,
    maps: MapContents,
}

impl KernelModelOracle {
    pub fn maps(&self) -> &MapContents {
        &self.maps
    }

    /// The verdict for one probe over the current maps. With `via: service` the kernel sees
    /// the backend's address (DNAT precedes the pod's TC hooks on the way in), so the model is
    /// asked about the backend.
    pub fn verdict(&self, probe: &Probe) -> bool {
        KernelModel::new(&self.maps).allowed(
            probe.src_addr,
            probe.dst_addr,
            probe.port.protocol.number(),
            probe.port.port,
        )
    }
}

impl Oracle for KernelModelOracle {
    fn describe(&self) -> String {
        "simulation (compiler + kernel model)".into()
    }

    fn setup(&mut self, _topology: &Topology) -> Result<(), OracleError> {
        *self = KernelModelOracle::default();
        Ok(())
    }

    fn apply(&mut self, _topology: &Topology, state: &State) -> Result<(), OracleError> {
        self.maps = compiler::compile(&state.snapshot, &mut self.state);
        Ok(())
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        let model = KernelModel::new(&self.maps);
        Ok(probes
            .iter()
            .map(|p| {
                model.allowed(
                    p.src_addr,
                    p.dst_addr,
                    p.port.protocol.number(),
                    p.port.port,
                )
            })
            .collect())
    }
}

/// The compiler + kernel model, each answer checked against the reference evaluator: a
/// disagreement is a bug in one of them, reported as an error rather than as a verdict.
#[derive(Default)]
pub struct CheckedSimulation {
    kernel: KernelModelOracle,
    snapshot: Snapshot,
}

impl Oracle for CheckedSimulation {
    fn describe(&self) -> String {
        "simulation (compiler + kernel model, checked against the reference evaluator)".into()
    }

    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        self.kernel.setup(topology)
    }

    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError> {
        self.snapshot = state.snapshot.clone();
        self.kernel.apply(topology, state)
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        let answers = self.kernel.probe(probes)?;
        let disagree: Vec<String> = probes
            .iter()
            .zip(&answers)
            .filter(|(p, a)| ReferenceOracle::verdict(&self.snapshot, p) != **a)
            .map(|(p, a)| {
                format!(
                    "{} -> {} {} {}: kernel model {}, reference {}",
                    p.src,
                    p.dst,
                    p.port,
                    p.family.as_str(),
                    a,
                    !a
                )
            })
            .collect();
        if !disagree.is_empty() {
            return Err(OracleError::Failed(format!(
                "the kernel model and the reference evaluator disagree (a bug):\n  {}",
                disagree.join("\n  ")
            )));
        }
        Ok(answers)
    }
}

/// The oracle `--simulate` uses: the datapath's decisions over compiled maps, checked
/// against the spec.
pub fn simulation_oracle() -> Box<dyn Oracle> {
    Box::new(CheckedSimulation::default())
}
