//! A step's changes to the cluster: `apply` (multi-document Kubernetes YAML with `{{ip ns/pod}}`
//! templates) and `delete`. NetworkPolicies are created or replaced through `convert`, so an
//! invalid policy is enforced fail-closed and reported as a warning, as the agent would.
//! Namespace and Pod documents replace the labels of existing objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::de::DeserializeOwned;
use std::ops::ControlFlow;

use super::ScenarioError;
use super::format::IpFamily;
use super::topology::{Topology, check_labels, namespace_labels};
use policy_agent::convert;
use policy_agent::manifests::yaml;
use policy_agent::model::{ObjectKey, Snapshot};

/// The objects after some steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub snapshot: Snapshot,
    /// Every live NetworkPolicy as applied (templates resolved), for runners that hand the
    /// objects to the agent.
    pub policy_docs: BTreeMap<ObjectKey, serde_json::Value>,
}

impl State {
    pub fn new(topo: &Topology) -> State {
        State {
            snapshot: topo.initial_snapshot(),
            policy_docs: BTreeMap::new(),
        }
    }
}

/// What a step did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One line per change ("apply networkpolicy x/p", "delete networkpolicy x/p").
    pub changes: Vec<String>,
    /// Problems of applied policies (enforced fail-closed).
    pub warnings: Vec<String>,
}

/// Replaces `{{ip ns/pod}}`, `{{ip6 ns/pod}}` (and `external:name` targets) by addresses.
pub fn expand_templates(text: &str, topo: &Topology) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("unclosed `{{`")?;
        let inner = after[..end].trim();
        let (func, target) = inner.split_once(char::is_whitespace).ok_or_else(|| {
            format!("template {{{{{inner}}}}} is not `ip ns/pod` or `ip6 ns/pod`")
        })?;
        let family = match func {
            "ip" => IpFamily::V4,
            "ip6" => IpFamily::V6,
            other => return Err(format!("unknown template function {other:?} (ip or ip6)")),
        };
        let target = target.trim();
        let addr = if let Some(name) = target.strip_prefix("external:") {
            let e = topo
                .external(name)
                .ok_or_else(|| format!("no external {name:?}"))?;
            e.addr(family)
                .ok_or_else(|| format!("external {name} has no {} address", family.as_str()))?
        } else {
            let (ns, pod) = target
                .split_once('/')
                .ok_or_else(|| format!("{target:?} is not ns/pod or external:name"))?;
            topo.pod(&ObjectKey::new(ns, pod))
                .ok_or_else(|| format!("no pod {target}"))?
                .addr(family)
        };
        out.push_str(&addr.to_string());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Applies one step's `apply` text, `delete` list and `move` map to `state`.
pub fn apply_step(
    file: &str,
    step: usize,
    topo: &Topology,
    state: &mut State,
    apply: Option<&str>,
    delete: &[String],
    moves: &BTreeMap<String, String>,
) -> Result<Applied, ScenarioError> {
    let mut applied = Applied::default();
    if let Some(text) = apply {
        let err = |field: String, msg: String| ScenarioError::new(file, Some(step), field, msg);
        let text = expand_templates(text, topo).map_err(|m| err("apply".into(), m))?;
        let mut result = Ok(());
        yaml::for_each_document(&text, |document, value| {
            let field = format!("apply[{}]", document - 1);
            result = value
                .map_err(|e| err(field.clone(), e.to_string()))
                .and_then(|value| {
                    apply_document(topo, state, &value, &mut applied)
                        .map_err(|(sub, m)| err(join(&field, &sub), m))
                });
            if result.is_ok() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        });
        result?;
    }
    for (i, entry) in delete.iter().enumerate() {
        delete_object(state, entry, &mut applied)
            .map_err(|m| ScenarioError::new(file, Some(step), format!("delete[{i}]"), m))?;
    }
    for (pod, node) in moves {
        move_pod(topo, state, pod, node, &mut applied)
            .map_err(|m| ScenarioError::new(file, Some(step), format!("move.{pod}"), m))?;
    }
    Ok(applied)
}

/// Moves pod `entry` (`ns/name`) to `node`: its object now names that node.
fn move_pod(
    topo: &Topology,
    state: &mut State,
    entry: &str,
    node: &str,
    applied: &mut Applied,
) -> Result<(), String> {
    let (ns, name) = entry
        .split_once('/')
        .ok_or_else(|| format!("{entry:?} is not ns/pod"))?;
    let key = ObjectKey::new(ns, name);
    let host = topo.pod(&key).ok_or_else(|| format!("no pod {entry}"))?;
    if host.host_network {
        return Err(format!(
            "{entry} is a hostNetwork pod: it has its node's address and cannot keep it on another node"
        ));
    }
    if !topo.nodes.iter().any(|n| n.name == node) {
        return Err(format!(
            "{node:?} is not a node of this run (node-1 .. node-{}; give the file `nodes:`)",
            topo.nodes.len()
        ));
    }
    let pod = state
        .snapshot
        .pods
        .get_mut(&key)
        .ok_or_else(|| format!("no pod {entry}"))?;
    let from = pod.node.clone().unwrap_or_default();
    if from == node {
        return Err(format!("{entry} is already on {node}"));
    }
    pod.node = Some(node.to_string());
    applied
        .changes
        .push(format!("move pod {key} from {from} to {node}"));
    Ok(())
}

fn join(base: &str, sub: &str) -> String {
    if sub.is_empty() {
        base.to_string()
    } else {
        format!("{base}.{sub}")
    }
}

/// An error inside one document: (field path inside it, message).
type DocError = (String, String);

fn apply_document(
    topo: &Topology,
    state: &mut State,
    value: &serde_json::Value,
    applied: &mut Applied,
) -> Result<(), DocError> {
    let kind = value.get("kind").and_then(|k| k.as_str()).ok_or_else(|| {
        (
            "kind".to_string(),
            "missing: every document needs apiVersion and kind".to_string(),
        )
    })?;
    match kind {
        "NetworkPolicy" => {
            let np: net::NetworkPolicy = typed(value)?;
            let ns = np.metadata.namespace.clone().unwrap_or_default();
            let name = np.metadata.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(("metadata.name".into(), "missing".into()));
            }
            if ns.is_empty() {
                return Err((
                    "metadata.namespace".into(),
                    "missing: scenario policies name their namespace".into(),
                ));
            }
            if !topo.namespaces.contains_key(&ns) {
                return Err((
                    "metadata.namespace".into(),
                    format!("namespace {ns:?} is not declared"),
                ));
            }
            let converted = convert::network_policy(&np);
            for e in &converted.errors {
                applied.warnings.push(format!("{e} (enforced fail-closed)"));
            }
            let key = ObjectKey::new(&ns, &name);
            let verb = if state.snapshot.policies.contains_key(&key) {
                "replace"
            } else {
                "create"
            };
            applied.changes.push(format!("{verb} networkpolicy {key}"));
            state.snapshot.policies.insert(key.clone(), converted.value);
            state.policy_docs.insert(key, value.clone());
        }
        "Namespace" => {
            let n: core::Namespace = typed(value)?;
            let name = n.metadata.name.clone().unwrap_or_default();
            let labels = n.metadata.labels.clone().unwrap_or_default();
            check_labels(&labels).map_err(|m| ("metadata.labels".to_string(), m))?;
            let ns = state.snapshot.namespaces.get_mut(&name).ok_or_else(|| {
                (
                    "metadata.name".to_string(),
                    format!("namespace {name:?} is not declared"),
                )
            })?;
            ns.labels = namespace_labels(&name, &labels);
            applied.changes.push(format!("relabel namespace {name}"));
        }
        "Pod" => {
            let p: core::Pod = typed(value)?;
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            check_labels(&labels).map_err(|m| ("metadata.labels".to_string(), m))?;
            let key = ObjectKey::new(&ns, &name);
            let pod =
                state.snapshot.pods.get_mut(&key).ok_or_else(|| {
                    ("metadata".to_string(), format!("pod {key} is not declared"))
                })?;
            pod.labels = labels;
            applied.changes.push(format!("relabel pod {key}"));
        }
        other => {
            return Err((
                "kind".into(),
                format!("{other:?}: only NetworkPolicy, Namespace and Pod can be applied"),
            ));
        }
    }
    Ok(())
}

/// Deserializes a document as a Kubernetes type, with the field path of any error.
/// Unknown fields are errors (like `kubectl apply`'s strict field validation): the Kubernetes
/// types ignore them, and a misspelt `podSelectr` would silently select every pod.
fn typed<T: DeserializeOwned + serde::Serialize>(value: &serde_json::Value) -> Result<T, DocError> {
    let typed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| (String::new(), e.to_string()))?;
    if let Some(path) = unknown_field(value, &back, String::new()) {
        return Err((path, "unknown field".to_string()));
    }
    Ok(typed)
}

/// The first field of `original` that did not survive a round trip through the typed object
/// (null-valued fields aside, which mean "absent").
fn unknown_field(
    original: &serde_json::Value,
    back: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => o.iter().find_map(|(k, v)| {
            let sub = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match b.get(k) {
                _ if v.is_null() => None,
                None => Some(sub),
                Some(bv) => unknown_field(v, bv, sub),
            }
        }),
        (Value::Array(o), Value::Array(b)) => o
            .iter()
            .zip(b.iter())
            .enumerate()
            .find_map(|(i, (ov, bv))| unknown_field(ov, bv, format!("{path}[{i}]"))),
        _ => None,
    }
}

fn delete_object(state: &mut State, entry: &str, applied: &mut Applied) -> Result<(), String> {
    let parts: Vec<&str> = entry.trim().split('/').collect();
    match parts.as_slice() {
        [kind, ns, name] if is_policy_kind(kind) => {
            let key = ObjectKey::new(*ns, *name);
            if state.snapshot.policies.remove(&key).is_none() {
                return Err(format!("networkpolicy {key} does not exist"));
            }
            state.policy_docs.remove(&key);
            applied.changes.push(format!("delete networkpolicy {key}"));
            Ok(())
        }
        [kind, ..] if ["pod", "namespace"].contains(&kind.to_lowercase().as_str()) => Err(format!(
            "{entry:?}: pods and namespaces are the scenario's fixed hosts; only networkpolicy/NS/NAME can be deleted"
        )),
        _ => Err(format!("{entry:?} is not networkpolicy/NS/NAME")),
    }
}

fn is_policy_kind(kind: &str) -> bool {
    matches!(
        kind.to_lowercase().as_str(),
        "networkpolicy" | "networkpolicies" | "netpol"
    )
}
