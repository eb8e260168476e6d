//! The standalone object source: a directory of Kubernetes YAML (or JSON) manifests holding
//! Namespaces, Pods (with status.podIPs and container ports) and NetworkPolicies.
//!
//! A bad file or object is reported with the file, the document and the object, and skipped;
//! an invalid NetworkPolicy is kept in its fail-closed form (see `convert`), so a typo never
//! opens traffic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use serde::Deserialize;
use k8s_openapi::api::networking::v1 as net;

use crate::convert::{self, ConvertError};
use crate::model::{self, ObjectKey, Snapshot};

/// Why a document could not be used as it stands.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    #[error("not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    #[error("document has no `kind`")]
    NoKind,
    #[error("kind {kind} (apiVersion {api_version}) is not one this agent reads; expected Namespace, Pod or NetworkPolicy (v1, networking.k8s.io/v1) or a List")]
    UnsupportedKind { kind: String, api_version: String },
    #[error("{kind} does not match the API schema: {source}")]
    Schema { kind: &'static str, source: serde_yaml::Error },
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("{kind} {key} is defined again (first in {first})")]
    Duplicate { kind: &'static str, key: String, first: String },
}

/// One problem, located.
#[derive(Debug)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: usize,
    pub error: ManifestError,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {}): {}", self.file.display(), self.document, self.error)
    }
}

/// What a directory holds.
#[derive(Debug, Default)]
pub struct Manifests {
    pub namespaces: BTreeMap<String, model::Namespace>,
    pub pods: BTreeMap<ObjectKey, model::Pod>,
    pub policies: BTreeMap<ObjectKey, model::NetworkPolicy>,
    pub problems: Vec<Problem>,
    /// Where each object came from, for duplicate reports.
    origin: BTreeMap<(&'static str, String), String>,
}

impl Manifests {
    /// The snapshot to compile. Namespaces that objects use but no manifest declares exist
    /// with their name label only (as the API server would label them); pods without a
    /// nodeName are on this node.
    pub fn snapshot(&self, node: &str, node_addrs: Vec<std::net::IpAddr>) -> Snapshot {
        let mut namespaces = self.namespaces.clone();
        let used = self.pods.keys().chain(self.policies.keys()).map(|k| k.namespace.clone());
        for ns in used {
            namespaces.entry(ns.clone()).or_insert_with(|| model::Namespace {
                labels: [("kubernetes.io/metadata.name".to_string(), ns.clone())].into(),
                name: ns,
            });
        }
        let pods = self
            .pods
            .iter()
            .map(|(k, p)| {
                let mut p = p.clone();
                p.node.get_or_insert_with(|| node.to_string());
                (k.clone(), p)
            })
            .collect();
        Snapshot {
            namespaces,
            pods,
            policies: self.policies.clone(),
            node: node.to_string(),
            node_addrs,
        }
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` below `dir` (sorted, recursively).
pub fn load_dir(dir: &Path) -> Result<Manifests, std::io::Error> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut m = Manifests::default();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => load_text(&mut m, &f, &text),
            Err(e) => m.problems.push(Problem { file: f, document: 1, error: ManifestError::Read(e) }),
        }
    }
    Ok(m)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), std::io::Error> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.starts_with('.') {
            continue; // editors' swap files and atomic-write temporaries
        }
        if p.is_dir() {
            collect(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
    Ok(())
}

/// A cheap fingerprint of the directory (paths, sizes, mtimes) to notice changes.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files = Vec::new();
    if collect(dir, &mut files).is_err() {
        return Vec::new();
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let md = std::fs::metadata(&f).ok();
            let len = md.as_ref().map_or(0, |m| m.len());
            let mtime = md.and_then(|m| m.modified().ok());
            (f, len, mtime)
        })
        .collect()
}

/// A hash of the directory's content (file names and bytes), the generation the agent
/// reports once it enforces it: whoever wrote the files can wait for exactly that.
pub fn content_hash(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    let _ = collect(dir, &mut files);
    files.sort();
    // DefaultHasher::new() has fixed keys: the same binary computes the same value.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.strip_prefix(dir).unwrap_or(&f).hash(&mut h);
        std::fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Loads one file's documents into `m`.
pub fn load_text(m: &mut Manifests, file: &Path, text: &str) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document (`---` at the end)
            Ok(v) => v,
            Err(e) => {
                m.problems.push(Problem { file: file.into(), document, error: ManifestError::Yaml(e) });
                // serde_yaml cannot resume after a syntax error within the stream.
                break;
            }
        };
        let mut errors = Vec::new();
        load_value(m, file, document, value, &mut errors);
        m.problems.extend(errors.into_iter().map(|error| Problem { file: file.into(), document, error }));
    }
}

fn load_value(
    m: &mut Manifests,
    file: &Path,
    document: usize,
    value: serde_yaml::Value,
    errors: &mut Vec<ManifestError>,
) {
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let kind = field("kind");
    let api_version = field("apiVersion");
    let origin = format!("{} (document {document})", file.display());
    match (kind.as_str(), api_version.as_str()) {
        ("", _) => errors.push(ManifestError::NoKind),
        ("List" | "NamespaceList" | "PodList" | "NetworkPolicyList", _) => {
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for item in items {
                load_value(m, file, document, item, errors);
            }
        }
        ("Namespace", "v1") => match serde_yaml::from_value::<core::Namespace>(value) {
            Err(source) => errors.push(ManifestError::Schema { kind: "Namespace", source }),
            Ok(obj) => match convert::namespace(&obj) {
                Err(e) => errors.push(e.into()),
                Ok(ns) => {
                    if let Some(e) = m.claim("Namespace", ns.name.clone(), &origin) {
                        errors.push(e);
                    } else {
                        m.namespaces.insert(ns.name.clone(), ns);
                    }
                }
            },
        },
        ("Pod", "v1") => match serde_yaml::from_value::<core::Pod>(value) {
            Err(source) => errors.push(ManifestError::Schema { kind: "Pod", source }),
            Ok(obj) => match convert::pod(&obj) {
                Err(e) => errors.push(e.into()),
                Ok(pod) => {
                    if let Some(e) = m.claim("Pod", pod.key().to_string(), &origin) {
                        errors.push(e);
                    } else {
                        m.pods.insert(pod.key(), pod);
                    }
                }
            },
        },
        ("NetworkPolicy", "networking.k8s.io/v1") => {
            match serde_yaml::from_value::<net::NetworkPolicy>(value) {
                Err(source) => errors.push(ManifestError::Schema { kind: "NetworkPolicy", source }),
                Ok(obj) => {
                    let converted = convert::network_policy(&obj);
                    // The fail-closed value is enforced even when some rules were invalid.
                    errors.extend(converted.errors.into_iter().map(ManifestError::from));
                    let np = converted.value;
                    if let Some(e) = m.claim("NetworkPolicy", np.key().to_string(), &origin) {
                        errors.push(e);
                    } else {
                        m.policies.insert(np.key(), np);
                    }
                }
            }
        }
        _ => errors.push(ManifestError::UnsupportedKind { kind, api_version }),
    }
}

impl Manifests {
    /// Records where an object is defined; a second definition is a problem (the first wins,
    /// so the result does not depend on which file changed last).
    fn claim(&mut self, kind: &'static str, key: String, origin: &str) -> Option<ManifestError> {
        match self.origin.get(&(kind, key.clone())) {
            Some(first) => Some(ManifestError::Duplicate { kind, key, first: first.clone() }),
            None => {
                self.origin.insert((kind, key), origin.to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec:
  containers:
  - name: c
    image: i
    ports: [{name: http, containerPort: 80, protocol: TCP}]
status: {podIP: 198.18.0.10, podIPs: [{ip: 198.18.0.10}, {ip: "fd00:18::10"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: y}
spec: {podSelector: {}}
"#;

    const BAD: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lower, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{protocol: tcp, port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
"#;

    fn load(files: &[(&str, &str)]) -> Manifests {
        let mut m = Manifests::default();
        for (name, text) in files {
            load_text(&mut m, Path::new(name), text);
        }
        m
    }

    #[test]
    fn reads_objects_and_fills_implicit_namespaces() {
        let m = load(&[("good.yaml", GOOD)]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let snap = m.snapshot("node-1", vec![]);
        let pod = &snap.pods[&ObjectKey::new("x", "a")];
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.node.as_deref(), Some("node-1"));
        assert_eq!(snap.namespaces["x"].labels["team"], "red");
        // Namespace y is used by a policy only: it exists with its name label.
        assert_eq!(snap.namespaces["y"].labels["kubernetes.io/metadata.name"], "y");
    }

    #[test]
    fn bad_objects_are_located_and_invalid_policies_fail_closed() {
        let m = load(&[("good.yaml", GOOD), ("bad.yaml", BAD)]);
        let text: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(text[0].starts_with("bad.yaml (document 1)") && text[0].contains("tcp"), "{}", text[0]);
        assert!(text[1].contains("document 2") && text[1].contains("Deployment"), "{}", text[1]);
        assert!(text[2].contains("document 3") && text[2].contains("defined again"), "{}", text[2]);
        // The invalid policy is kept: it still isolates app=web, its bad rule allows nothing.
        let np = &m.policies[&ObjectKey::new("x", "lower")];
        assert!(np.ingress_isolation && np.ingress.is_empty());
    }

    #[test]
    fn broken_yaml_is_a_problem_not_a_panic() {
        let m = load(&[("broken.yaml", "kind: [unclosed\n")]);
        assert_eq!(m.problems.len(), 1);
        assert!(matches!(m.problems[0].error, ManifestError::Yaml(_)));
    }
}
