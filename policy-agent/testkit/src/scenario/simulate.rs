//! Oracles that need no kernel: the compiler with the userspace model of the kernel's lookups
//! (the datapath's algorithm over the maps the agent would write; what `--simulate` uses), and
//! the reference evaluator straight from the spec (to judge the former).

use std::collections::BTreeMap;

use super::apply::State;
use super::connections::{Connection, admitted_as_new};
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

/// The nodes whose programs a probe's packets cross: the source pod's and the destination
/// pod's in `snapshot` (a hostNetwork pod's too: its node's uplink programs see it), each
/// once; externals run none.
pub fn nodes_crossed(topology: &Topology, snapshot: &Snapshot, probe: &Probe) -> Vec<usize> {
    let mut nodes = Vec::new();
    for name in [&probe.src, &probe.dst] {
        if let EndpointName::Pod(key) = name
            && let Some(n) = topology.node_in(snapshot, key)
            && !nodes.contains(&n)
        {
            nodes.push(n);
        }
    }
    nodes
}

/// Answers probes with [`reference::allowed`], cluster-wide: a destination pod admits its own
/// node's addresses, so the snapshot is seen from that node.
#[derive(Default)]
pub struct ReferenceOracle {
    topology: Option<Topology>,
    snapshot: Snapshot,
    held: Held,
}

impl ReferenceOracle {
    pub fn verdict(topology: &Topology, snapshot: &Snapshot, probe: &Probe) -> bool {
        let (src, dst) = reference_endpoints(probe);
        let node = match &probe.dst {
            EndpointName::Pod(key) => topology.node_in(snapshot, key).unwrap_or(0),
            EndpointName::External(_) => 0,
        };
        let mut seen = snapshot.clone();
        topology.view_from(node, &mut seen);
        reference::allowed(&seen, &src, &dst, probe.port.protocol, probe.port.port)
    }
}

impl Oracle for ReferenceOracle {
    fn describe(&self) -> String {
        "simulation (reference evaluator)".into()
    }

    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        self.topology = Some(topology.clone());
        Ok(())
    }

    fn apply(&mut self, _topology: &Topology, state: &State) -> Result<(), OracleError> {
        self.snapshot = state.snapshot.clone();
        Ok(())
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        let topology = self
            .topology
            .as_ref()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        Ok(probes
            .iter()
            .map(|p| Self::verdict(topology, &self.snapshot, p))
            .collect())
    }

    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        let topology = self
            .topology
            .as_ref()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        let snapshot = &self.snapshot;
        self.held
            .open(conns, |c| admitted_as_new(topology, snapshot, c))
    }

    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        let topology = self
            .topology
            .as_ref()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        let snapshot = &self.snapshot;
        self.held
            .check(conns, |c| admitted_as_new(topology, snapshot, c))
    }

    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        self.held.close(names)
    }

    fn teardown(&mut self) -> Result<(), OracleError> {
        self.held = Held::default();
        Ok(())
    }
}

/// The connections a simulation holds open, by name. The datapath re-judges open
/// connections on every change, so a simulation answers a check with the verdict a new
/// connection would get now (`admits`).
#[derive(Default)]
struct Held {
    open: BTreeMap<String, Connection>,
}

impl Held {
    fn open(
        &mut self,
        conns: &[&Connection],
        admits: impl Fn(&Connection) -> bool,
    ) -> Result<(), OracleError> {
        for c in conns {
            if self.open.contains_key(&c.name) {
                return Err(OracleError::Failed(format!(
                    "connection {} is already open",
                    c.name
                )));
            }
            if !admits(c) {
                return Err(OracleError::Failed(format!(
                    "connection {c} cannot be opened: the policies in force deny it"
                )));
            }
            self.open.insert(c.name.clone(), (*c).clone());
        }
        Ok(())
    }

    fn check(
        &self,
        conns: &[&Connection],
        admits: impl Fn(&Connection) -> bool,
    ) -> Result<Vec<bool>, OracleError> {
        conns
            .iter()
            .map(|c| match self.open.get(&c.name) {
                Some(held) if held == *c => Ok(admits(c)),
                _ => Err(OracleError::Failed(format!(
                    "connection {c} is checked but was not opened"
                ))),
            })
            .collect()
    }

    fn close(&mut self, names: &[String]) -> Result<(), OracleError> {
        for n in names {
            if self.open.remove(n).is_none() {
                return Err(OracleError::Failed(format!(
                    "connection {n} is closed but was not open"
                )));
            }
        }
        Ok(())
    }
}

/// Compiles each step's objects into map contents for every node, as each node's agent does,
/// and answers probes with the kernel model's lookups: a probe passes when it passes on every
/// node it crosses ([`nodes_crossed`]). The compiler states live across steps, so later steps
/// compile with the numbering earlier ones left, as in the running agents.
#[derive(Default)]
pub struct KernelModelOracle {
    topology: Option<Topology>,
    /// The step's objects (where each pod runs).
    snapshot: Snapshot,
    /// Per node.
    states: Vec<CompilerState>,
    maps: Vec<MapContents>,
    held: Held,
}

impl KernelModelOracle {
    /// The first node's maps.
    pub fn maps(&self) -> &MapContents {
        &self.maps[0]
    }

    /// The verdict for one probe over the current maps. With `via: service` the kernel sees
    /// the backend's address (DNAT precedes the pod's TC hooks on the way in), so the model is
    /// asked about the backend.
    pub fn verdict(&self, probe: &Probe) -> bool {
        let Some(topology) = &self.topology else {
            return false;
        };
        let nodes = nodes_crossed(topology, &self.snapshot, probe);
        // A probe between externals crosses no node; the first one's maps judge it (they
        // know neither side: allowed).
        let nodes = if nodes.is_empty() { vec![0] } else { nodes };
        nodes.iter().all(|&n| {
            KernelModel::new(&self.maps[n]).allowed(
                probe.src_addr,
                probe.dst_addr,
                probe.port.protocol.number(),
                probe.port.port,
            )
        })
    }
}

impl Oracle for KernelModelOracle {
    fn describe(&self) -> String {
        "simulation (compiler + kernel model)".into()
    }

    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        *self = KernelModelOracle {
            topology: Some(topology.clone()),
            snapshot: Snapshot::default(),
            states: topology
                .nodes
                .iter()
                .map(|_| CompilerState::default())
                .collect(),
            maps: vec![MapContents::default(); topology.nodes.len()],
            held: Held::default(),
        };
        Ok(())
    }

    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError> {
        if self.states.len() != topology.nodes.len() {
            self.setup(topology)?;
        }
        for (n, st) in self.states.iter_mut().enumerate() {
            let mut seen = state.snapshot.clone();
            topology.view_from(n, &mut seen);
            self.maps[n] = compiler::compile(&seen, st);
        }
        self.snapshot = state.snapshot.clone();
        Ok(())
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        Ok(probes.iter().map(|p| self.verdict(p)).collect())
    }

    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        let mut held = std::mem::take(&mut self.held);
        let r = held.open(conns, |c| self.verdict(&c.as_probe()));
        self.held = held;
        r
    }

    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        self.held.check(conns, |c| self.verdict(&c.as_probe()))
    }

    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        self.held.close(names)
    }

    fn teardown(&mut self) -> Result<(), OracleError> {
        self.held = Held::default();
        Ok(())
    }
}

/// The compiler + kernel model, each answer checked against the reference evaluator: a
/// disagreement is a bug in one of them, reported as an error rather than as a verdict.
#[derive(Default)]
pub struct CheckedSimulation {
    kernel: KernelModelOracle,
    reference: ReferenceOracle,
}

impl Oracle for CheckedSimulation {
    fn describe(&self) -> String {
        "simulation (compiler + kernel model, checked against the reference evaluator)".into()
    }

    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        self.reference.setup(topology)?;
        self.kernel.setup(topology)
    }

    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError> {
        self.reference.apply(topology, state)?;
        self.kernel.apply(topology, state)
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        let answers = self.kernel.probe(probes)?;
        let reference = self.reference.probe(probes)?;
        let disagree: Vec<String> = probes
            .iter()
            .zip(answers.iter().zip(&reference))
            .filter(|(_, (a, r))| a != r)
            .map(|(p, (a, _))| (p, a))
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

    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        self.reference.open_connections(conns)?;
        self.kernel.open_connections(conns)
    }

    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        let answers = self.kernel.check_connections(conns)?;
        let reference = self.reference.check_connections(conns)?;
        let disagree: Vec<String> = conns
            .iter()
            .zip(answers.iter().zip(&reference))
            .filter(|(_, (a, r))| a != r)
            .map(|(c, (a, _))| {
                format!(
                    "open connection {c}: kernel model alive={a}, reference alive={}",
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

    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        self.reference.close_connections(names)?;
        self.kernel.close_connections(names)
    }

    fn teardown(&mut self) -> Result<(), OracleError> {
        self.reference.teardown()?;
        self.kernel.teardown()
    }
}

/// The oracle `--simulate` uses: the datapath's decisions over compiled maps, checked
/// against the spec.
pub fn simulation_oracle() -> Box<dyn Oracle> {
    Box::new(CheckedSimulation::default())
}
