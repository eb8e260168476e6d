//! The standalone object source: a directory of Kubernetes YAML (or JSON) manifests holding
//! Namespaces, Pods (with status.podIPs and container ports) and NetworkPolicies.
//!
//! A bad file or object is reported with the file, the document and the object. Nothing a
//! bad file holds may open traffic: an invalid NetworkPolicy is kept in its fail-closed form
//! (see `convert`); a document that cannot be read at all (YAML syntax, schema, an unusable
//! Pod or Namespace) makes [`DirLoader`] keep enforcing the last good version of its file, and
//! with no good version yet, every namespace is isolated both ways until the file is fixed
//! (a dropped Pod, Namespace or policy could otherwise un-isolate a pod).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Deserialize;

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
    #[error(
        "kind {kind} (apiVersion {api_version}) is not one this agent reads; expected Namespace, Pod or NetworkPolicy (v1, networking.k8s.io/v1) or a List"
    )]
    UnsupportedKind { kind: String, api_version: String },
    #[error("{kind} does not match the API schema: {source}")]
    Schema {
        kind: &'static str,
        source: serde_yaml::Error,
    },
    /// An invalid part of a policy: the policy is kept in its fail-closed form.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A Namespace or Pod that cannot be used: it is left out.
    #[error("{0} (object left out)")]
    Unusable(#[source] ConvertError),
    #[error(
        "objects were left out and there is no earlier good version of this file: every namespace is isolated in both directions until it is fixed"
    )]
    NoGoodVersion,
    #[error("{kind} {key} is defined again (first in {first})")]
    Duplicate {
        kind: &'static str,
        key: String,
        first: String,
    },
}

impl ManifestError {
    /// Whether the document's object was left out (rather than kept fail-closed or ignored
    /// as a kind this agent does not enforce).
    fn drops_object(&self) -> bool {
        match self {
            Self::Read(_)
            | Self::Yaml(_)
            | Self::NoKind
            | Self::Schema { .. }
            | Self::Unusable(_) => true,
            Self::UnsupportedKind { kind, .. } => {
                // Our kinds under another apiVersion (networking.k8s.io/v1beta1...) were meant
                // to be enforced.
                matches!(kind.as_str(), "Namespace" | "Pod" | "NetworkPolicy")
            }
            Self::Convert(_) | Self::Duplicate { .. } | Self::NoGoodVersion => false,
        }
    }
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
        write!(
            f,
            "{} (document {}): {}",
            self.file.display(),
            self.document,
            self.error
        )
    }
}

/// What a directory holds.
#[derive(Debug, Default)]
pub struct Manifests {
    pub namespaces: BTreeMap<String, model::Namespace>,
    pub pods: BTreeMap<ObjectKey, model::Pod>,
    pub policies: BTreeMap<ObjectKey, model::NetworkPolicy>,
    pub problems: Vec<Problem>,
    /// Files that lost objects and have no good version to fall back on: until they are
    /// fixed, [`Manifests::snapshot`] isolates every namespace in both directions.
    pub lockdown: Vec<PathBuf>,
    /// [`content_hash`] of the bytes read ([`DirLoader::load`]; 0 for text loaded otherwise).
    pub generation: u64,
    /// Where each object came from, for duplicate reports.
    origin: BTreeMap<(&'static str, String), String>,
}

impl Manifests {
    /// The snapshot to compile. Namespaces that objects use but no manifest declares exist
    /// with their name label only (as the API server would label them); pods without a
    /// nodeName are on this node.
    pub fn snapshot(&self, node: &str, node_addrs: Vec<std::net::IpAddr>) -> Snapshot {
        let mut namespaces = self.namespaces.clone();
        let used = self
            .pods
            .keys()
            .chain(self.policies.keys())
            .map(|k| k.namespace.clone());
        for ns in used {
            namespaces
                .entry(ns.clone())
                .or_insert_with(|| model::Namespace {
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
        let mut policies = self.policies.clone();
        if !self.lockdown.is_empty() {
            for ns in namespaces.keys() {
                let np = lockdown_policy(ns);
                policies.insert(np.key(), np);
            }
        }
        Snapshot {
            namespaces,
            pods,
            policies,
            node: node.to_string(),
            node_addrs,
        }
    }
}

/// The name of the policy a lockdown adds to each namespace: a ':' cannot occur in a real
/// object name, so it never collides with one.
pub const LOCKDOWN_POLICY: &str = "policy-agent:fail-closed";

/// Selects every pod of `namespace`, isolates both directions, admits nothing.
fn lockdown_policy(namespace: &str) -> model::NetworkPolicy {
    model::NetworkPolicy {
        namespace: namespace.to_string(),
        name: LOCKDOWN_POLICY.to_string(),
        pod_selector: model::LabelSelector::everything(),
        ingress_isolation: true,
        egress_isolation: true,
        ingress: Vec::new(),
        egress: Vec::new(),
        declared: None,
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` below `dir` (sorted, recursively), with no
/// earlier good versions to fall back on.
pub fn load_dir(dir: &Path) -> Result<Manifests, std::io::Error> {
    DirLoader::default().load(dir)
}

/// Loads a directory again and again, remembering each file's last good text: a file that
/// turns bad keeps being enforced as it last was (and the problem is reported).
#[derive(Debug, Default)]
pub struct DirLoader {
    last_good: BTreeMap<PathBuf, String>,
}

impl DirLoader {
    /// Reads and parses every manifest file. [`Manifests::generation`] is the
    /// [`content_hash`] of exactly the bytes parsed here, so a status naming it never claims
    /// a version written while (or after) the directory was read.
    pub fn load(&mut self, dir: &Path) -> Result<Manifests, std::io::Error> {
        let (generation, read) = read_all(dir)?;
        Ok(self.parse(generation, read))
    }

    /// [`DirLoader::load`], or `None` without parsing when the bytes read hash to `unchanged`.
    pub fn load_if_changed(
        &mut self,
        dir: &Path,
        unchanged: Option<u64>,
    ) -> Result<Option<Manifests>, std::io::Error> {
        let (generation, read) = read_all(dir)?;
        Ok((unchanged != Some(generation)).then(|| self.parse(generation, read)))
    }

    fn parse(
        &mut self,
        generation: u64,
        read: Vec<(PathBuf, std::io::Result<Vec<u8>>)>,
    ) -> Manifests {
        self.last_good
            .retain(|f, _| read.iter().any(|(r, _)| r == f));
        let mut m = Manifests {
            generation,
            ..Manifests::default()
        };
        for (f, bytes) in read {
            let text = match bytes.and_then(|b| {
                String::from_utf8(b)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }) {
                Ok(text) => text,
                Err(e) => {
                    m.problems.push(Problem {
                        file: f.clone(),
                        document: 1,
                        error: ManifestError::Read(e),
                    });
                    self.fall_back(&mut m, &f);
                    continue;
                }
            };
            // Try the file on its own first: only a file that loses nothing is taken as is.
            let mut alone = Manifests::default();
            load_text(&mut alone, &f, &text);
            if alone.problems.iter().any(|p| p.error.drops_object()) {
                m.problems.append(&mut alone.problems);
                self.fall_back(&mut m, &f);
            } else {
                load_text(&mut m, &f, &text);
                self.last_good.insert(f, text);
            }
        }
        m
    }

    fn fall_back(&self, m: &mut Manifests, file: &Path) {
        match self.last_good.get(file) {
            Some(good) => {
                tracing::warn!(file = %file.display(), "enforcing the last good version of the file");
                let mut scratch = Vec::new();
                std::mem::swap(&mut scratch, &mut m.problems);
                load_text(m, file, good);
                // The good version's own (non-dropping) problems were reported when it was read.
                m.problems = scratch;
            }
            None => {
                m.problems.push(Problem {
                    file: file.to_path_buf(),
                    document: 1,
                    error: ManifestError::NoGoodVersion,
                });
                m.lockdown.push(file.to_path_buf());
            }
        }
    }
}

/// Every manifest file's bytes, read once, and their [`content_hash`]: the hash and the
/// parse see the same bytes.
#[allow(clippy::type_complexity)]
fn read_all(dir: &Path) -> Result<(u64, Vec<(PathBuf, std::io::Result<Vec<u8>>)>), std::io::Error> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut h = ContentHasher::default();
    let read = files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f);
            h.add(dir, &f, bytes.as_deref().unwrap_or_default());
            (f, bytes)
        })
        .collect();
    Ok((h.finish(), read))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), std::io::Error> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue; // editors' swap files and atomic-write temporaries
        }
        if p.is_dir() {
            collect(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// A cheap fingerprint of the directory (paths, sizes, mtimes) to notice changes.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// How close to `now` an mtime may be and still hide a same-size rewrite: file times come
/// from the kernel's coarse clock (one tick, a few ms), and a clock step moves them.
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether an unchanged `fp` proves unchanged content later: not when a file was modified
/// within [`RACY_WINDOW`] of `now` (the git "racy clean" rule), or has no mtime.
pub fn fingerprint_settled(fp: &Fingerprint, now: SystemTime) -> bool {
    fp.iter()
        .all(|(_, _, mtime)| mtime.is_some_and(|t| t + RACY_WINDOW <= now))
}

pub fn fingerprint(dir: &Path) -> Fingerprint {
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
    let mut files = Vec::new();
    let _ = collect(dir, &mut files);
    files.sort();
    let mut h = ContentHasher::default();
    for f in files {
        h.add(dir, &f, &std::fs::read(&f).unwrap_or_default());
    }
    h.finish()
}

/// File names (relative to the directory) and bytes, in name order. `DefaultHasher::new()`
/// has fixed keys: the same binary computes the same value.
#[derive(Default)]
struct ContentHasher(std::collections::hash_map::DefaultHasher);

impl ContentHasher {
    fn add(&mut self, dir: &Path, file: &Path, bytes: &[u8]) {
        use std::hash::Hash;
        file.strip_prefix(dir).unwrap_or(file).hash(&mut self.0);
        bytes.hash(&mut self.0);
    }
    fn finish(self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// Loads one file's documents into `m`.
pub fn load_text(m: &mut Manifests, file: &Path, text: &str) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document (`---` at the end)
            Ok(v) => v,
            Err(e) => {
                m.problems.push(Problem {
                    file: file.into(),
                    document,
                    error: ManifestError::Yaml(e),
                });
                // serde_yaml cannot resume after a syntax error within the stream.
                break;
            }
        };
        let mut errors = Vec::new();
        load_value(m, file, document, value, &mut errors);
        m.problems.extend(errors.into_iter().map(|error| Problem {
            file: file.into(),
            document,
            error,
        }));
    }
}

fn load_value(
    m: &mut Manifests,
    file: &Path,
    document: usize,
    value: serde_yaml::Value,
    errors: &mut Vec<ManifestError>,
) {
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let kind = field("kind");
    let api_version = field("apiVersion");
    let origin = format!("{} (document {document})", file.display());
    match (kind.as_str(), api_version.as_str()) {
        ("", _) => errors.push(ManifestError::NoKind),
        ("List" | "NamespaceList" | "PodList" | "NetworkPolicyList", _) => {
            let items = value
                .get("items")
                .and_then(|v| v.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                load_value(m, file, document, item, errors);
            }
        }
        ("Namespace", "v1") => match serde_yaml::from_value::<core::Namespace>(value) {
            Err(source) => errors.push(ManifestError::Schema {
                kind: "Namespace",
                source,
            }),
            Ok(obj) => match convert::namespace(&obj) {
                Err(e) => errors.push(ManifestError::Unusable(e)),
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
            Err(source) => errors.push(ManifestError::Schema {
                kind: "Pod",
                source,
            }),
            Ok(obj) => match convert::pod(&obj) {
                Err(e) => errors.push(ManifestError::Unusable(e)),
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
                Err(source) => errors.push(ManifestError::Schema {
                    kind: "NetworkPolicy",
                    source,
                }),
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
            Some(first) => Some(ManifestError::Duplicate {
                kind,
                key,
                first: first.clone(),
            }),
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
        assert_eq!(
            snap.namespaces["y"].labels["kubernetes.io/metadata.name"],
            "y"
        );
    }

    #[test]
    fn bad_objects_are_located_and_invalid_policies_fail_closed() {
        let m = load(&[("good.yaml", GOOD), ("bad.yaml", BAD)]);
        let text: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].starts_with("bad.yaml (document 1)") && text[0].contains("tcp"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("document 2") && text[1].contains("Deployment"),
            "{}",
            text[1]
        );
        assert!(
            text[2].contains("document 3") && text[2].contains("defined again"),
            "{}",
            text[2]
        );
        // The invalid policy is kept: it still isolates app=web, its bad rule allows nothing.
        let np = &m.policies[&ObjectKey::new("x", "lower")];
        assert!(np.ingress_isolation && np.ingress.is_empty());
    }

    /// A scratch manifest directory, removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("manifests-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const ALLOW_ALL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";

    #[test]
    fn a_file_that_turns_bad_keeps_its_last_good_version() {
        let d = Dir::new("lastgood");
        d.write("good.yaml", GOOD);
        d.write("policy.yaml", ALLOW_ALL);
        let mut loader = DirLoader::default();
        let m = loader.load(&d.0).unwrap();
        assert!(
            m.problems.is_empty() && m.lockdown.is_empty(),
            "{:?}",
            m.problems
        );
        // A schema error (a string where a list belongs) in the policy: it would vanish,
        // un-isolating nothing here but possibly opening traffic elsewhere; the old one stays.
        d.write(
            "policy.yaml",
            &ALLOW_ALL.replace("ingress: [{}]", "ingress: nope"),
        );
        let m = loader.load(&d.0).unwrap();
        assert!(m.policies.contains_key(&ObjectKey::new("x", "open")));
        assert!(m.lockdown.is_empty());
        assert!(
            m.problems
                .iter()
                .any(|p| matches!(p.error, ManifestError::Schema { .. })),
            "{:?}",
            m.problems
        );
        // A Pod whose address is not an address: the good version of good.yaml keeps it.
        d.write(
            "good.yaml",
            &GOOD.replace("podIP: 198.18.0.10,", "podIP: nonsense,"),
        );
        let m = loader.load(&d.0).unwrap();
        assert_eq!(m.pods[&ObjectKey::new("x", "a")].ips.len(), 2);
        // Fixed: the new text is taken.
        d.write(
            "policy.yaml",
            &ALLOW_ALL.replace("name: open", "name: open2"),
        );
        let m = loader.load(&d.0).unwrap();
        assert!(m.policies.contains_key(&ObjectKey::new("x", "open2")));
        assert!(!m.policies.contains_key(&ObjectKey::new("x", "open")));
    }

    #[test]
    fn a_bad_file_with_no_good_version_isolates_every_namespace() {
        let d = Dir::new("lockdown");
        d.write("good.yaml", GOOD);
        d.write("broken.yaml", "kind: [unclosed\n");
        d.write(
            "beta.yaml",
            &ALLOW_ALL.replace("networking.k8s.io/v1", "networking.k8s.io/v1beta1"),
        );
        let m = loader_once(&d);
        assert_eq!(m.lockdown.len(), 2, "{:?}", m.problems);
        assert!(
            m.problems
                .iter()
                .any(|p| matches!(p.error, ManifestError::NoGoodVersion))
        );
        let snap = m.snapshot("node-1", vec![]);
        for ns in ["x", "y"] {
            let np = &snap.policies[&ObjectKey::new(ns, LOCKDOWN_POLICY)];
            assert!(
                np.ingress_isolation
                    && np.egress_isolation
                    && np.ingress.is_empty()
                    && np.egress.is_empty()
            );
            assert_eq!(np.pod_selector, model::LabelSelector::everything());
        }
    }

    fn loader_once(d: &Dir) -> Manifests {
        load_dir(&d.0).unwrap()
    }

    #[test]
    fn the_generation_is_the_hash_of_the_bytes_parsed() {
        let d = Dir::new("generation");
        d.write(
            "a.yaml",
            "kind: Namespace\napiVersion: v1\nmetadata: {name: x}\n",
        );
        d.write("sub.json", "{}");
        std::fs::write(d.0.join("bad.yaml"), [0xff, 0xfe, b'\n']).unwrap();
        let m = loader_once(&d);
        assert_eq!(m.generation, content_hash(&d.0));
        d.write(
            "a.yaml",
            "kind: Namespace\napiVersion: v1\nmetadata: {name: y}\n",
        );
        let m2 = loader_once(&d);
        assert_ne!(m2.generation, m.generation);
        assert_eq!(m2.generation, content_hash(&d.0));
        assert!(m2.namespaces.contains_key("y"));
    }

    #[test]
    fn a_fingerprint_settles_only_once_its_files_are_older_than_the_racy_window() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let fp: Fingerprint = vec![("a.yaml".into(), 10, Some(t))];
        assert!(!fingerprint_settled(&fp, t));
        assert!(!fingerprint_settled(&fp, t + RACY_WINDOW / 2));
        assert!(fingerprint_settled(&fp, t + RACY_WINDOW));
        let no_time: Fingerprint = vec![("a.yaml".into(), 10, None)];
        assert!(!fingerprint_settled(&no_time, t + RACY_WINDOW * 10));
        assert!(fingerprint_settled(&Vec::new(), t));
    }

    #[test]
    fn an_unchanged_directory_is_not_parsed_again() {
        let d = Dir::new("unchanged");
        d.write(
            "a.yaml",
            "kind: Namespace\napiVersion: v1\nmetadata: {name: x}\n",
        );
        let mut l = DirLoader::default();
        let m = l.load(&d.0).unwrap();
        assert!(
            l.load_if_changed(&d.0, Some(m.generation))
                .unwrap()
                .is_none()
        );
        d.write(
            "a.yaml",
            "kind: Namespace\napiVersion: v1\nmetadata: {name: z}\n",
        );
        let m2 = l
            .load_if_changed(&d.0, Some(m.generation))
            .unwrap()
            .unwrap();
        assert!(m2.namespaces.contains_key("z"));
    }

    #[test]
    fn broken_yaml_is_a_problem_not_a_panic() {
        let m = load(&[("broken.yaml", "kind: [unclosed\n")]);
        assert_eq!(m.problems.len(), 1);
        assert!(matches!(m.problems[0].error, ManifestError::Yaml(_)));
    }
}
