//! Long-lived connections (scenarios/FORMAT.md, "Long-lived connections"): a step's `close`
//! and `open` lists and `expect.established`, checked at plan time. A connection is opened
//! once and kept on the same socket pair across steps; after every step with `expect`, each
//! open one is checked. The datapath re-judges open connections when policy changes, so a
//! connection is alive exactly when the policies in force admit it as a new one
//! ([`admitted_as_new`]): every oracle and the plan's checks use that one predicate.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::ScenarioError;
use super::apply::State;
use super::expect::{ProbePort, parse_probe_port};
use super::format::{EstablishedDef, IpFamily, Liveness, OpenDef, Via};
use super::plan::Probe;
use super::simulate::ReferenceOracle;
use super::topology::{EndpointName, Topology, is_dns_label};
use policy_agent::model::{ObjectKey, Snapshot};

/// One long-lived connection, resolved to addresses like a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub name: String,
    pub src: EndpointName,
    pub dst: EndpointName,
    pub family: IpFamily,
    pub port: ProbePort,
    pub via: Via,
    pub src_addr: IpAddr,
    /// The destination's own address (the backend pod for `via: service`).
    pub dst_addr: IpAddr,
    /// What the client connects to (the ClusterIP for `via: service`).
    pub target_addr: IpAddr,
}

impl Connection {
    /// The probe a new connection with the same endpoints, family, port and path would be.
    pub fn as_probe(&self) -> Probe {
        Probe {
            src: self.src.clone(),
            dst: self.dst.clone(),
            family: self.family,
            port: self.port,
            via: self.via,
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            target_addr: self.target_addr,
            expect_allowed: true,
            served: true,
        }
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {} {} {} via {}",
            self.name,
            self.src,
            self.dst,
            self.port,
            self.family.as_str(),
            self.via.as_str()
        )
    }
}

/// One open connection's check after a step, and what the file expects of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub conn: Connection,
    pub expect: Liveness,
}

/// Whether the policies of `state` admit `conn` as a new connection: the verdict a probe of
/// the same source, destination, family, port and path gets (the reference evaluator).
/// Revalidation makes this an open connection's verdict too.
pub fn admitted_as_new(topology: &Topology, snapshot: &Snapshot, conn: &Connection) -> bool {
    ReferenceOracle::verdict(topology, snapshot, &conn.as_probe())
}

/// The connections open between steps, in the order they were opened, while a plan is
/// checked.
#[derive(Clone, Debug, Default)]
pub struct OpenSet {
    open: Vec<Connection>,
}

/// A step's connection changes and checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepConnections {
    /// Closed at the start of the step.
    pub close: Vec<String>,
    /// Opened once the step's change is enforced.
    pub open: Vec<Connection>,
    /// Every connection open after the step (opening order); empty without `expect`.
    pub checks: Vec<Check>,
}

impl OpenSet {
    pub fn names(&self) -> Vec<String> {
        self.open.iter().map(|c| c.name.clone()).collect()
    }

    fn get(&self, name: &str) -> Option<&Connection> {
        self.open.iter().find(|c| c.name == name)
    }

    /// Step `index`'s `close` list, before its change: every name must be open.
    pub fn close(
        &mut self,
        file: &str,
        index: usize,
        close: &[String],
    ) -> Result<Vec<String>, ScenarioError> {
        let err = |field: String, msg: String| ScenarioError::new(file, Some(index), field, msg);
        let mut closed = Vec::new();
        for (i, name) in close.iter().enumerate() {
            if closed.contains(name) {
                return Err(err(
                    format!("close[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
            if self.get(name).is_none() {
                return Err(err(
                    format!("close[{i}]"),
                    format!("no connection {name:?} is open"),
                ));
            }
            closed.push(name.clone());
        }
        self.open.retain(|c| !closed.contains(&c.name));
        Ok(closed)
    }

    /// The step's `move` map against the connections still open: a pod that moves is deleted,
    /// and its connections with it.
    pub fn check_moves(
        &self,
        file: &str,
        index: usize,
        moves: &BTreeMap<String, String>,
    ) -> Result<(), ScenarioError> {
        for pod in moves.keys() {
            let Some((ns, name)) = pod.split_once('/') else {
                continue; // apply_step names the malformed entry
            };
            let moved = EndpointName::Pod(ObjectKey::new(ns, name));
            if let Some(c) = self.open.iter().find(|c| c.src == moved || c.dst == moved) {
                return Err(ScenarioError::new(
                    file,
                    Some(index),
                    format!("move.{pod}"),
                    format!(
                        "connection {} is open on {pod}, which the move deletes: close it in this step",
                        c.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Step `index`'s `open` list, after its change made `state`: each entry resolved and
    /// admitted as new by the step's policies.
    pub fn open(
        &mut self,
        file: &str,
        index: usize,
        topology: &Topology,
        state: &State,
        defs: &[OpenDef],
    ) -> Result<Vec<Connection>, ScenarioError> {
        let mut opened = Vec::new();
        for (i, def) in defs.iter().enumerate() {
            let field = format!("open[{i}]");
            let err = |sub: &str, msg: String| {
                let f = if sub.is_empty() {
                    field.clone()
                } else {
                    format!("{field}.{sub}")
                };
                ScenarioError::new(file, Some(index), f, msg)
            };
            if !is_dns_label(&def.name) {
                return Err(err(
                    "name",
                    format!(
                        "{:?} is not a connection name (lowercase letters, digits and -)",
                        def.name
                    ),
                ));
            }
            if self.get(&def.name).is_some() {
                return Err(err(
                    "name",
                    format!("connection {:?} is already open", def.name),
                ));
            }
            let conn = resolve(topology, def).map_err(|(sub, m)| err(sub, m))?;
            if !admitted_as_new(topology, &state.snapshot, &conn) {
                return Err(err(
                    "",
                    format!(
                        "the step's policies deny {conn} as a new connection: it cannot be opened"
                    ),
                ));
            }
            self.open.push(conn.clone());
            opened.push(conn);
        }
        Ok(opened)
    }

    /// Step `index`'s `expect.established` against the connections open after it.
    pub fn checks(
        &self,
        file: &str,
        index: usize,
        established: Option<&EstablishedDef>,
    ) -> Result<Vec<Check>, ScenarioError> {
        let err = |field: String, msg: String| ScenarioError::new(file, Some(index), field, msg);
        let Some(def) = established else {
            if self.open.is_empty() {
                return Ok(Vec::new());
            }
            return Err(err(
                "expect.established".into(),
                format!(
                    "missing: connections are open ({}); say what each must be",
                    self.names().join(", ")
                ),
            ));
        };
        if self.open.is_empty() {
            return Err(err(
                "expect.established".into(),
                "no connection is open after this step".into(),
            ));
        }
        let mut listed: BTreeMap<&str, Liveness> = BTreeMap::new();
        for (list, verdict, key) in [
            (&def.cut, Liveness::Cut, "cut"),
            (&def.alive, Liveness::Alive, "alive"),
        ] {
            let mut seen = BTreeSet::new();
            for (i, name) in list.iter().enumerate() {
                let field = format!("expect.established.{key}[{i}]");
                if !seen.insert(name.as_str()) {
                    return Err(err(field, format!("{name:?} is listed twice")));
                }
                if self.get(name).is_none() {
                    return Err(err(field, format!("no connection {name:?} is open")));
                }
                if listed.insert(name, verdict).is_some() {
                    return Err(err(
                        field,
                        format!("{name:?} is listed as both cut and alive"),
                    ));
                }
            }
        }
        Ok(self
            .open
            .iter()
            .map(|c| Check {
                conn: c.clone(),
                expect: listed.get(c.name.as_str()).copied().unwrap_or(def.default),
            })
            .collect())
    }
}

/// An open entry's endpoints, port and family as addresses; errors are (field, message).
fn resolve(topology: &Topology, def: &OpenDef) -> Result<Connection, (&'static str, String)> {
    let src = endpoint(topology, &def.from).map_err(|m| ("from", m))?;
    let dst = endpoint(topology, &def.to).map_err(|m| ("to", m))?;
    if src == dst {
        return Err(("to", "a connection needs two different endpoints".into()));
    }
    if matches!(
        (&src, &dst),
        (EndpointName::External(_), EndpointName::External(_))
    ) {
        return Err((
            "to",
            "externals do not connect to each other (one end must be a pod)".into(),
        ));
    }
    let port = parse_probe_port(&def.port).map_err(|m| ("port", m))?;
    let family = match def.family {
        None => topology.families[0],
        Some(f) if topology.families.contains(&f) => f,
        Some(f) => {
            return Err((
                "family",
                format!("the file's ipFamilies do not include {}", f.as_str()),
            ));
        }
    };
    let addr = |ep: &EndpointName, side: &'static str| -> Result<IpAddr, (&'static str, String)> {
        match ep {
            EndpointName::Pod(key) => topology
                .pod(key)
                .map(|p| p.addr(family))
                .ok_or_else(|| (side, format!("no pod {key}"))),
            EndpointName::External(name) => topology
                .external(name)
                .and_then(|e| e.addr(family))
                .ok_or_else(|| {
                    (
                        side,
                        format!("external {name} has no {} address", family.as_str()),
                    )
                }),
        }
    };
    let src_addr = addr(&src, "from")?;
    let dst_addr = addr(&dst, "to")?;
    let target_addr = match (&dst, def.via) {
        (_, Via::Pod) => dst_addr,
        (EndpointName::Pod(key), Via::Service) => topology
            .pod(key)
            .map(|p| p.service_addr(family))
            .ok_or_else(|| ("to", format!("no pod {key}")))?,
        (EndpointName::External(_), Via::Service) => {
            return Err(("via", "an external has no Service: use via: pod".into()));
        }
    };
    if let EndpointName::Pod(key) = &dst
        && let Some(pod) = topology.pod(key)
        && !pod.serves(port.protocol, port.port)
    {
        return Err((
            "port",
            format!("{key} does not serve {port}: nobody would answer"),
        ));
    }
    Ok(Connection {
        name: def.name.clone(),
        src,
        dst,
        family,
        port,
        via: def.via,
        src_addr,
        dst_addr,
        target_addr,
    })
}

/// `ns/pod` or `external:name`, naming a host of the topology.
fn endpoint(topology: &Topology, s: &str) -> Result<EndpointName, String> {
    let s = s.trim();
    if let Some(name) = s.strip_prefix("external:") {
        return match topology.external(name) {
            Some(_) => Ok(EndpointName::External(name.to_string())),
            None => Err(format!("no external {name:?}")),
        };
    }
    match s.split_once('/') {
        Some((ns, name)) if !name.contains('/') => {
            let key = ObjectKey::new(ns, name);
            match topology.pod(&key) {
                Some(_) => Ok(EndpointName::Pod(key)),
                None => Err(format!("no pod {key}")),
            }
        }
        _ => Err(format!("{s:?} is not ns/pod or external:name")),
    }
}
