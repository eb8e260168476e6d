//! Oracles that need no kernel: the compiler with the userspace model of the kernel's lookups
//! (the datapath's algorithm over the maps the agent would write; what `--simulate` uses), and
//! the reference evaluator straight from the spec (to judge the former).

use super::apply::State;
use super::plan::Probe;
use super::run::{Oracle, OracleError};
use super::topology::{EndpointName, Topology};
use crate::compiler::{self, CompilerState, MapContents};
use crate::kernel_model::KernelModel;
use crate::model::Snapshot;
use crate::reference::{self, Endpoint};

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

/// The oracle `--simulate` uses: the datapath's decisions over compiled maps.
pub fn simulation_oracle() -> Box<dyn Oracle> {
    Box::new(KernelModelOracle::default())
}
