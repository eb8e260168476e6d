//! The scenario file as written (scenarios/FORMAT.md): plain serde types, unknown fields
//! rejected. Meaning (defaults, addresses, patterns) is given to them in `plan`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use super::ScenarioError;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// `None`: the standard namespaces x, y, z.
    #[serde(default)]
    pub namespaces: Option<BTreeMap<String, NamespaceDef>>,
    /// `None`: the standard pods a, b, c in every namespace.
    #[serde(default)]
    pub pods: Option<Vec<PodDef>>,
    #[serde(default)]
    pub externals: Vec<ExternalDef>,
    #[serde(default)]
    pub ip_families: Option<Vec<IpFamily>>,
    /// The least number of nodes the file means (its pods name `node-2` ..): a run given
    /// fewer uses this many for the file. `None`: any number.
    #[serde(default)]
    pub nodes: Option<usize>,
    pub steps: Vec<StepDef>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDef {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodDef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `None`: the standard ports (80 and 81 over TCP, UDP and SCTP).
    #[serde(default)]
    pub ports: Option<Vec<PortDef>>,
    #[serde(default)]
    pub host_network: bool,
    /// The node the pod runs on (`node-1` .. `node-N`); `None`: the next node round-robin
    /// in file order.
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDef {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: ProtocolName,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ProtocolName {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalDef {
    pub name: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub fn is_v6(self) -> bool {
        self == IpFamily::V6
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Optional narration (a short heading and a plain-language paragraph): shown by the
    /// narrated runner (`policy-scenario --narrate`, `cargo xtask demo`); no effect on results.
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub apply: Option<String>,
    #[serde(default)]
    pub delete: Vec<String>,
    /// Pods that move, `ns/pod: node-N`: deleted on their node and created on that one with
    /// the same addresses (as a rescheduled pod that keeps its IP).
    #[serde(default, rename = "move")]
    pub moves: BTreeMap<String, String>,
    /// Long-lived connections ended at the start of the step (before its change).
    #[serde(default)]
    pub close: Vec<String>,
    /// Long-lived connections opened once the step's change is enforced, kept open across
    /// the following steps until closed.
    #[serde(default)]
    pub open: Vec<OpenDef>,
    /// `None`: the step only changes objects; nothing is probed.
    #[serde(default)]
    pub expect: Option<ExpectDef>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectDef {
    #[serde(default)]
    pub probes: Option<Vec<String>>,
    #[serde(default)]
    pub via: Via,
    /// Omitted: `allow`, the Kubernetes default for traffic no policy isolates.
    #[serde(default)]
    pub default: Verdict,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    /// What each open connection must be after the step (required while any is open).
    #[serde(default)]
    pub established: Option<EstablishedDef>,
}

/// One long-lived connection of a step's `open` list.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenDef {
    pub name: String,
    pub from: String,
    pub to: String,
    /// `PROTO/PORT`, as in `expect.probes`.
    pub port: String,
    #[serde(default)]
    pub via: Via,
    /// `None`: the file's first family.
    #[serde(default)]
    pub family: Option<IpFamily>,
}

/// `expect.established`: the verdict of every open connection.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstablishedDef {
    /// Omitted: `alive`.
    #[serde(default)]
    pub default: Liveness,
    #[serde(default)]
    pub cut: Vec<String>,
    #[serde(default)]
    pub alive: Vec<String>,
}

/// What an open connection does after a step: carries data both ways, or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    #[default]
    Alive,
    Cut,
}

impl Liveness {
    pub fn from_alive(alive: bool) -> Liveness {
        if alive {
            Liveness::Alive
        } else {
            Liveness::Cut
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Cut => "cut",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    #[default]
    Pod,
    Service,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Pod => "pod",
            Via::Service => "service",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// Parses a scenario file's text. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<ScenarioFile, ScenarioError> {
    let options = policy_agent::manifests::yaml::options(text.len());
    // The path of a failed field, kept aside: the parser's own error ends the stream.
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| yaml_error(file, &path, &e.to_string()))
}

/// Turns an error at `path` ("steps[1].expect", "." for the root) into a file/step/field
/// error.
fn yaml_error(file: &str, path: &str, message: &str) -> ScenarioError {
    let message = message.to_string();
    let path = if is_path(path) && path != "." {
        path.to_string()
    } else {
        String::new()
    };
    // An unknown field may be reported on its parent: name the field itself.
    let mut path = path;
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, _)) = rest.split_once('`')
        && path != field
        && !path.ends_with(&format!(".{field}"))
    {
        path = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
    }
    let (step, field) = split_step(&path);
    ScenarioError::new(file, step, field, message)
}

fn is_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-[]?/".contains(c))
}

/// `steps[3].expect.deny` -> (Some(3), "expect.deny").
fn split_step(path: &str) -> (Option<usize>, String) {
    if let Some(rest) = path.strip_prefix("steps[")
        && let Some((n, tail)) = rest.split_once(']')
        && let Ok(n) = n.parse::<usize>()
    {
        let field = tail.strip_prefix('.').unwrap_or(tail);
        return (Some(n), field.to_string());
    }
    (None, path.to_string())
}
