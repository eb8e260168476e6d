//! A scenario file checked and expanded: the topology, and for each step the objects after it
//! and every probe with its expected verdict. Everything that can be wrong with a file is found
//! here, before a runner builds anything.

use std::net::IpAddr;
use std::path::Path;

use super::ScenarioError;
use super::apply::{Applied, State, apply_step};
use super::connections::{OpenSet, StepConnections};
use super::expect::{DEFAULT_PROBE, Pattern, ProbePort, parse_probe_port};
use super::format::{self, IpFamily, Verdict, Via};
use super::topology::{EndpointName, Topology};

#[derive(Clone, Debug)]
pub struct Plan {
    /// The file, as named in messages.
    pub file: String,
    pub name: String,
    pub description: Option<String>,
    pub topology: Topology,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug)]
pub struct Step {
    /// Index into the file's `steps`.
    pub index: usize,
    /// The file's narration of the step (`title`, `description`), if any.
    pub title: Option<String>,
    pub description: Option<String>,
    /// The step's `apply` text and `delete` list as the file wrote them.
    pub apply_text: Option<String>,
    pub delete: Vec<String>,
    pub applied: Applied,
    /// The objects once the step's changes are made.
    pub state: State,
    /// Ports probed this step, in the file's order.
    pub ports: Vec<ProbePort>,
    pub via: Via,
    /// Every probe of the step: for each family, port, source and destination.
    pub probes: Vec<Probe>,
    /// Long-lived connections closed, opened and checked in the step.
    pub connections: StepConnections,
}

/// One connection attempt and what the file expects of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub src: EndpointName,
    pub dst: EndpointName,
    pub family: IpFamily,
    pub port: ProbePort,
    pub via: Via,
    /// The source's address.
    pub src_addr: IpAddr,
    /// The destination's own address (the backend pod for `via: service`).
    pub dst_addr: IpAddr,
    /// What the client connects to: the destination pod's ClusterIP for `via: service`, else
    /// `dst_addr`.
    pub target_addr: IpAddr,
    pub expect_allowed: bool,
    /// False when the destination pod does not serve this port: nobody listens, so the probe
    /// says nothing about policy; runners skip it and it counts neither way.
    pub served: bool,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, ScenarioError> {
        Plan::load_on(path, 1)
    }

    /// The file at `path` on `nodes` nodes.
    pub fn load_on(path: &Path, nodes: usize) -> Result<Plan, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::new(&file, None, "", format!("cannot read: {e}")))?;
        Plan::parse_on(&file, &text, nodes)
    }

    pub fn parse(file: &str, text: &str) -> Result<Plan, ScenarioError> {
        Plan::parse_on(file, text, 1)
    }

    /// `text` (named `file` in errors) on `nodes` nodes: pods go round-robin over them
    /// unless they name their node.
    pub fn parse_on(file: &str, text: &str, nodes: usize) -> Result<Plan, ScenarioError> {
        let f = format::parse(file, text)?;
        if f.name.trim().is_empty() {
            return Err(ScenarioError::new(file, None, "name", "empty"));
        }
        if f.steps.is_empty() {
            return Err(ScenarioError::new(file, None, "steps", "no step given"));
        }
        let topology = Topology::build(file, &f, nodes)?;
        let mut state = State::new(&topology);
        let mut steps = Vec::new();
        let mut connections = OpenSet::default();
        for (index, def) in f.steps.iter().enumerate() {
            let err =
                |field: String, msg: String| ScenarioError::new(file, Some(index), field, msg);
            // Closing comes first, before the change: a moved pod's connections must be
            // closed by then.
            let close = connections.close(file, index, &def.close)?;
            connections.check_moves(file, index, &def.moves)?;
            let applied = apply_step(
                file,
                index,
                &topology,
                &mut state,
                def.apply.as_deref(),
                &def.delete,
                &def.moves,
            )?;
            let open = connections.open(file, index, &topology, &state, &def.open)?;
            let checks = match &def.expect {
                None => Vec::new(),
                Some(expect) => connections.checks(file, index, expect.established.as_ref())?,
            };
            let (ports, via, probes) = match &def.expect {
                None => (Vec::new(), Via::Pod, Vec::new()),
                Some(expect) => {
                    let ports = match &expect.probes {
                        None => vec![DEFAULT_PROBE],
                        Some(list) if list.is_empty() => {
                            return Err(err("expect.probes".into(), "empty list".into()));
                        }
                        Some(list) => {
                            let mut ports = Vec::new();
                            for (i, s) in list.iter().enumerate() {
                                let p = parse_probe_port(s)
                                    .map_err(|m| err(format!("expect.probes[{i}]"), m))?;
                                if ports.contains(&p) {
                                    return Err(err(
                                        format!("expect.probes[{i}]"),
                                        format!("{p} is listed twice"),
                                    ));
                                }
                                ports.push(p);
                            }
                            ports
                        }
                    };
                    let parse_all = |list: &[String], name: &str| {
                        list.iter()
                            .enumerate()
                            .map(|(i, s)| {
                                Pattern::parse(s)
                                    .and_then(|p| p.check(&topology, &ports).map(|()| p))
                                    .map_err(|m| {
                                        err(format!("expect.{name}[{i}]"), format!("{s:?}: {m}"))
                                    })
                            })
                            .collect::<Result<Vec<Pattern>, ScenarioError>>()
                    };
                    let allow = parse_all(&expect.allow, "allow")?;
                    let deny = parse_all(&expect.deny, "deny")?;
                    let probes =
                        probes_of(&topology, &ports, expect.via, expect.default, &allow, &deny);
                    (ports, expect.via, probes)
                }
            };
            steps.push(Step {
                index,
                title: def.title.clone(),
                description: def.description.clone(),
                apply_text: def.apply.clone(),
                delete: def.delete.clone(),
                applied,
                state: state.clone(),
                ports,
                via,
                probes,
                connections: StepConnections {
                    close,
                    open,
                    checks,
                },
            });
        }
        Ok(Plan {
            file: file.to_string(),
            name: f.name,
            description: f.description,
            topology,
            steps,
        })
    }
}

/// Every pod probes every other pod and every external; every external probes every pod.
fn probes_of(
    topo: &Topology,
    ports: &[ProbePort],
    via: Via,
    default: Verdict,
    allow: &[Pattern],
    deny: &[Pattern],
) -> Vec<Probe> {
    let endpoints = topo.endpoints();
    let mut probes = Vec::new();
    for &family in &topo.families {
        for &port in ports {
            for src in &endpoints {
                for dst in &endpoints {
                    if src == dst {
                        continue;
                    }
                    let (src_addr, dst_addr, target_addr, served) = match (src, dst) {
                        (EndpointName::External(_), EndpointName::External(_)) => continue,
                        (_, EndpointName::Pod(key)) => {
                            let Some(pod) = topo.pod(key) else { continue };
                            let target = match via {
                                Via::Pod => pod.addr(family),
                                Via::Service => pod.service_addr(family),
                            };
                            let Some(src_addr) = addr_of(topo, src, family) else {
                                continue;
                            };
                            (
                                src_addr,
                                pod.addr(family),
                                target,
                                pod.serves(port.protocol, port.port),
                            )
                        }
                        (_, EndpointName::External(_)) => {
                            let (Some(s), Some(d)) =
                                (addr_of(topo, src, family), addr_of(topo, dst, family))
                            else {
                                continue;
                            };
                            // Externals serve every probed port.
                            (s, d, d, true)
                        }
                    };
                    let expect_allowed = if allow.iter().any(|p| p.matches(src, dst, port)) {
                        true
                    } else if deny.iter().any(|p| p.matches(src, dst, port)) {
                        false
                    } else {
                        default == Verdict::Allow
                    };
                    probes.push(Probe {
                        src: src.clone(),
                        dst: dst.clone(),
                        family,
                        port,
                        via,
                        src_addr,
                        dst_addr,
                        target_addr,
                        expect_allowed,
                        served,
                    });
                }
            }
        }
    }
    probes
}

fn addr_of(topo: &Topology, ep: &EndpointName, family: IpFamily) -> Option<IpAddr> {
    match ep {
        EndpointName::Pod(key) => topo.pod(key).map(|p| p.addr(family)),
        EndpointName::External(name) => topo.external(name).and_then(|e| e.addr(family)),
    }
}
