//! Oracles that need no kernel: the reference evaluator straight from the spec.

use super::apply::State;
use super::plan::Probe;
use super::run::{Oracle, OracleError};
use super::topology::{EndpointName, Topology};
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

/// The oracle `--simulate` uses.
pub fn simulation_oracle() -> Box<dyn Oracle> {
    Box::new(ReferenceOracle::default())
}
