//! The standalone object source: a directory of Kubernetes YAML (or JSON) manifests holding
//! Namespaces, Pods (with status.podIPs and container ports) and NetworkPolicies.
//!
//! A bad file or object is reported with the file, the document and the object. Nothing a
//! bad file holds may open traffic: an invalid NetworkPolicy is kept in its fail-closed form
//! (see `convert`); a document that cannot be read at all (YAML syntax, schema, an unusable
//! Pod or Namespace) makes [`DirLoader`] keep enforcing the last good version of its file, and
//! with no good version yet, every namespace is isolated both ways until the file is fixed
//! (a dropped Pod, Namespace or policy could otherwise un-isolate a pod).
//!
//! Whoever writes the directory is not trusted to keep it small or sane ([`Limits`]): the
//! walk reads each directory once (a symbolic link loop is one problem), to a depth and a
//! number of files; each file is read through a bounded reader up to a size and a budget for
//! the whole directory; YAML aliases may not expand a file beyond what its size could hold
//! without them; the directory holds a bounded number of objects. A file over a limit, or
//! not UTF-8, is a file whose objects were all left out (its last good version, or a
//! lockdown); files the walk could not reach have no last good version: a lockdown.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;

use crate::convert::{self, ConvertError};
use crate::model::{self, ObjectKey, Snapshot};

#[cfg(test)]
mod reload_tests;
pub mod watch;
pub mod yaml;

/// Directories nested deeper than this below the manifest directory are not read.
pub const MAX_DEPTH: usize = 16;
/// Manifest files read from one directory tree at most.
pub const MAX_FILES: usize = 10_000;
/// Directory entries (of any kind) looked at in one walk at most: a directory of millions of
/// other files must not stall the agent either.
pub const MAX_ENTRIES: usize = 100_000;
/// The largest manifest file read. Room for ~25k policies in block style (~300 bytes each);
/// the parser holds one document's events and values at a time, which for a pathological
/// document (a flow list of one-letter scalars) costs many times its size: this bounds that
/// transient peak.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// All manifest files of the directory together (the texts are held in memory, twice with
/// their last good versions).
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;
/// Objects (documents and List items) of the whole directory.
pub const MAX_OBJECTS: usize = 50_000;

/// Bounds on what one read of the manifest directory may cost; [`Limits::default`] holds the
/// constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_depth: usize,
    pub max_files: usize,
    pub max_entries: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_objects: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: MAX_DEPTH,
            max_files: MAX_FILES,
            max_entries: MAX_ENTRIES,
            max_file_bytes: MAX_FILE_BYTES,
            max_total_bytes: MAX_TOTAL_BYTES,
            max_objects: MAX_OBJECTS,
        }
    }
}

/// Why part of the directory tree was not walked. All but [`WalkError::Revisited`] leave
/// files unread, whose objects may be missing: the directory is then enforced fail-closed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(
        "cannot list the directory: {0}; every namespace is isolated in both directions until it can be read"
    )]
    ReadDir(#[source] std::io::Error),
    #[error(
        "this directory is {first} again (a symbolic link loop or a second link to it): read once"
    )]
    Revisited { first: PathBuf },
    #[error(
        "directories nested deeper than {limit} levels are not read; every namespace is isolated in both directions until the tree is flatter"
    )]
    TooDeep { limit: usize },
    #[error(
        "more than {limit} manifest files: the rest are not read; every namespace is isolated in both directions until there are fewer"
    )]
    TooManyFiles { limit: usize },
    #[error(
        "more than {limit} directory entries: the rest are not looked at; every namespace is isolated in both directions until there are fewer"
    )]
    TooManyEntries { limit: usize },
}

impl WalkError {
    /// Whether manifest files may have been left unread.
    fn leaves_files_unread(&self) -> bool {
        !matches!(self, Self::Revisited { .. })
    }
}

/// Why a file's bytes were not used: the file is handled as one whose objects were all left
/// out (its last good version, or with none a lockdown).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    /// `size` is what the file held when opened, or what was read when it grew meanwhile.
    #[error("file too large: {size} bytes, limit {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("not read: the manifest files before it use up the directory's limit of {limit} bytes")]
    OverBudget { limit: u64 },
    #[error("not UTF-8 text: invalid byte at byte offset {offset}")]
    NotUtf8 { offset: usize },
}

/// Why a document could not be used as it stands.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("more than {limit} objects in the manifest directory: this file is not read")]
    TooManyObjects { limit: usize },
    #[error(transparent)]
    Yaml(#[from] yaml::YamlError),
    #[error("document has no `kind`")]
    NoKind,
    #[error(
        "kind {kind} (apiVersion {api_version}) is not one this agent reads; expected Namespace, Pod or NetworkPolicy (v1, networking.k8s.io/v1) or a List"
    )]
    UnsupportedKind { kind: String, api_version: String },
    #[error("{kind} does not match the API schema: {source}")]
    Schema {
        kind: &'static str,
        source: serde_json::Error,
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
    /// Enforced as the compiler decides (see `compiler::shared_endpoint`): the address
    /// gets nothing that only one of the pods would.
    #[error(
        "address {addr} is claimed by more than one pod: {pods} (a stale pod object or a forged status); as a peer it has no pod identity unless theirs agree, as a local endpoint it denies everything but the node unless their policies agree"
    )]
    SharedAddress {
        addr: std::net::IpAddr,
        pods: String,
    },
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
            Self::File(_)
            | Self::TooManyObjects { .. }
            | Self::Yaml(_)
            | Self::NoKind
            | Self::Schema { .. }
            | Self::Unusable(_) => true,
            Self::UnsupportedKind { kind, .. } => {
                // Our kinds under another apiVersion (networking.k8s.io/v1beta1...) were meant
                // to be enforced.
                matches!(kind.as_str(), "Namespace" | "Pod" | "NetworkPolicy")
            }
            // A walk problem concerns no single file: the loader locks down itself.
            Self::Walk(_)
            | Self::Convert(_)
            | Self::Duplicate { .. }
            | Self::SharedAddress { .. }
            | Self::NoGoodVersion => false,
        }
    }
}

/// One problem, located.
#[derive(Debug)]
pub struct Problem {
    /// The file, or for a [`WalkError`] the directory.
    pub file: PathBuf,
    /// 1-based document number within the file; 0 for the whole file or directory.
    pub document: usize,
    pub error: ManifestError,
}

impl Problem {
    /// A problem of a whole file or directory.
    fn whole(file: &Path, error: impl Into<ManifestError>) -> Self {
        Problem {
            file: file.to_path_buf(),
            document: 0,
            error: error.into(),
        }
    }
}

impl Problem {
    fn is_duplicate(&self) -> bool {
        matches!(self.error, ManifestError::Duplicate { .. })
    }

    /// The address of a [`ManifestError::SharedAddress`].
    fn shared_address(&self) -> Option<std::net::IpAddr> {
        match self.error {
            ManifestError::SharedAddress { addr, .. } => Some(addr),
            _ => None,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.document {
            0 => write!(f, "{}: {}", self.file.display(), self.error),
            n => write!(f, "{} (document {n}): {}", self.file.display(), self.error),
        }
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
    /// Objects read (documents and List items), for [`Limits::max_objects`].
    objects: usize,
    /// Where each object came from, for duplicate reports.
    origin: BTreeMap<(&'static str, String), Origin>,
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
    model::NetworkPolicy::deny_all(namespace, LOCKDOWN_POLICY)
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
    limits: Limits,
    /// What the last parse produced, per file, when it can be updated in place
    /// ([`DirLoader::reload`]).
    last: Option<LastParse>,
}

impl DirLoader {
    /// A loader with other bounds than [`Limits::default`].
    pub fn with_limits(limits: Limits) -> Self {
        DirLoader {
            last_good: BTreeMap::new(),
            limits,
            last: None,
        }
    }

    /// Reads and parses every manifest file. [`Manifests::generation`] is the
    /// [`content_hash`] of exactly the bytes parsed here, so a status naming it never claims
    /// a version written while (or after) the directory was read.
    pub fn load(&mut self, dir: &Path) -> Result<Manifests, std::io::Error> {
        let read = read_all(dir, &self.limits)?;
        Ok(self.parse(read))
    }

    /// [`DirLoader::load`], or `None` without parsing when the bytes read hash to `unchanged`.
    pub fn load_if_changed(
        &mut self,
        dir: &Path,
        unchanged: Option<u64>,
    ) -> Result<Option<Manifests>, std::io::Error> {
        let read = read_all(dir, &self.limits)?;
        Ok((unchanged != Some(read.generation)).then(|| self.parse(read)))
    }

    fn parse(&mut self, read: DirRead) -> Manifests {
        self.last_good
            .retain(|f, _| read.files.iter().any(|(r, _)| r == f));
        // Only a directory every file of which was taken as it stands, with nothing
        // defined twice, can be updated in place later.
        let mut last = LastParse {
            generation: read.generation,
            files: BTreeMap::new(),
            clean: read.walk.is_empty(),
        };
        let mut m = Manifests {
            generation: read.generation,
            ..Manifests::default()
        };
        for (dir, error) in read.walk {
            // Unread files may hold objects that isolate pods: nothing they could hold may
            // be missing, so everything is isolated (their last good versions are not
            // known either: a file that is not reached has no name).
            if error.leaves_files_unread() {
                m.lockdown.push(dir.clone());
            }
            m.problems.push(Problem::whole(&dir, error));
        }
        for (f, bytes) in read.files {
            let text = match bytes.and_then(utf8) {
                Ok(text) => text,
                Err(e) => {
                    m.problems.push(Problem::whole(&f, e));
                    self.fall_back(&mut m, &f);
                    last.clean = false;
                    continue;
                }
            };
            // Try the file on its own first: only a file that loses nothing is taken as is.
            // It counts against the directory's object limit with what is taken so far.
            let mut alone = Manifests {
                objects: m.objects,
                ..Manifests::default()
            };
            load_text_within(&mut alone, &f, &text, self.limits.max_objects);
            if alone.problems.iter().any(|p| p.error.drops_object()) {
                m.problems.append(&mut alone.problems);
                self.fall_back(&mut m, &f);
                last.clean = false;
            } else {
                let mut objects = FileObjects::of(&alone);
                // `alone` counted on from the files before it.
                objects.objects -= m.objects;
                last.files.insert(f.clone(), objects);
                m.absorb(alone);
                self.last_good.insert(f, text);
            }
        }
        last.clean &= m.lockdown.is_empty() && !m.problems.iter().any(Problem::is_duplicate);
        m.report_shared_addresses();
        self.last = last.clean.then_some(last);
        m
    }

    /// Reads the directory again after `prev` (what this loader returned last, possibly
    /// updated in place since). When only some files changed, every file was taken as it
    /// stands and nothing is defined twice, only the changed files are parsed and `prev` is
    /// updated in place (the result equals a whole parse, problems in the same order);
    /// otherwise the directory is parsed whole.
    pub fn reload(
        &mut self,
        dir: &Path,
        prev: Option<&mut Manifests>,
    ) -> Result<Reload, std::io::Error> {
        let read = read_all(dir, &self.limits)?;
        let Some(prev) = prev else {
            return Ok(Reload::Whole(self.parse(read)));
        };
        if prev.generation == read.generation {
            return Ok(Reload::Unchanged);
        }
        match self.update_in_place(prev, &read) {
            Some(touched) => Ok(Reload::InPlace(touched)),
            None => Ok(Reload::Whole(self.parse(read))),
        }
    }

    /// [`DirLoader::reload`]'s update of `prev`, or `None` (nothing changed) when the
    /// directory must be parsed whole.
    fn update_in_place(&mut self, prev: &mut Manifests, read: &DirRead) -> Option<Touched> {
        let last = self
            .last
            .as_ref()
            .filter(|l| l.clean && l.generation == prev.generation)?;
        if !read.walk.is_empty() || !prev.lockdown.is_empty() {
            return None;
        }
        // Files whose bytes differ from the version taken last time, and files gone.
        let mut changed = Vec::new();
        for (f, bytes) in &read.files {
            let bytes = bytes.as_ref().ok()?;
            let same = last.files.contains_key(f)
                && self
                    .last_good
                    .get(f)
                    .is_some_and(|t| t.as_bytes() == bytes.as_slice());
            if !same {
                changed.push((f, bytes));
            }
        }
        let removed: Vec<PathBuf> = last
            .files
            .keys()
            .filter(|f| !read.files.iter().any(|(r, _)| r == *f))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return None;
        }
        // Parse the changed files on their own; any that loses objects, or anything
        // defined twice, takes the whole path (its fallbacks and first-wins order).
        let mut parts = Vec::new();
        for (f, bytes) in &changed {
            let text = utf8((*bytes).clone()).ok()?;
            let mut alone = Manifests::default();
            load_text_within(&mut alone, f, &text, usize::MAX);
            if alone
                .problems
                .iter()
                .any(|p| p.error.drops_object() || p.is_duplicate())
            {
                return None;
            }
            parts.push(((*f).clone(), text, alone));
        }
        let gone: BTreeSet<PathBuf> = changed
            .iter()
            .map(|(f, _)| (*f).clone())
            .chain(removed)
            .collect();
        let kept_objects: usize = last
            .files
            .iter()
            .filter(|(f, _)| !gone.contains(*f))
            .map(|(_, o)| o.objects)
            .sum();
        let total = kept_objects + parts.iter().map(|(_, _, a)| a.objects).sum::<usize>();
        if total > self.limits.max_objects {
            return None;
        }
        let defined_elsewhere = |kind: &'static str, key: String| {
            prev.origin
                .get(&(kind, key))
                .is_some_and(|o| !gone.contains(&o.file))
        };
        let mut new_keys: BTreeSet<(&'static str, String)> = BTreeSet::new();
        for (_, _, a) in &parts {
            for k in a.origin.keys() {
                if defined_elsewhere(k.0, k.1.clone()) || !new_keys.insert(k.clone()) {
                    return None;
                }
            }
        }
        // From here on `prev` changes and the result is the update's.
        let mut files = std::mem::take(&mut self.last.as_mut()?.files);
        let mut touched = Touched::default();
        // Addresses whose claimants may change: those of the pods going and coming.
        let mut addrs: BTreeSet<std::net::IpAddr> = BTreeSet::new();
        for f in &gone {
            for k in files.get(f).map(|o| o.pods.as_slice()).unwrap_or_default() {
                addrs.extend(
                    prev.pods
                        .get(k)
                        .into_iter()
                        .flat_map(|p| p.ips.iter().copied()),
                );
            }
        }
        for (_, _, a) in &parts {
            addrs.extend(a.pods.values().flat_map(|p| p.ips.iter().copied()));
        }
        for f in &gone {
            let Some(old) = files.remove(f) else {
                continue;
            };
            self.last_good.remove(f);
            for ns in old.namespaces {
                prev.namespaces.remove(&ns);
                prev.origin.remove(&("Namespace", ns.clone()));
                touched.namespaces.insert(ns);
            }
            for k in old.pods {
                prev.pods.remove(&k);
                prev.origin.remove(&("Pod", k.to_string()));
                touched.pods.insert(k);
            }
            for k in old.policies {
                prev.policies.remove(&k);
                prev.origin.remove(&("NetworkPolicy", k.to_string()));
                touched.policies.insert(k);
            }
        }
        prev.problems.retain(|p| {
            !gone.contains(&p.file) && p.shared_address().is_none_or(|a| !addrs.contains(&a))
        });
        for (f, text, alone) in parts {
            let objects = FileObjects::of(&alone);
            touched
                .namespaces
                .extend(objects.namespaces.iter().cloned());
            touched.pods.extend(objects.pods.iter().cloned());
            touched.policies.extend(objects.policies.iter().cloned());
            files.insert(f.clone(), objects);
            self.last_good.insert(f, text);
            prev.absorb(alone);
        }
        prev.objects = total;
        prev.report_shared_addresses_among(Some(&addrs));
        // A whole parse lists each file's problems in file order, then shared addresses in
        // address order (the sort is stable: a file's own order stays).
        prev.problems
            .sort_by(|a, b| match (a.shared_address(), b.shared_address()) {
                (None, None) => a.file.cmp(&b.file),
                (x, y) => x.is_some().cmp(&y.is_some()).then(x.cmp(&y)),
            });
        prev.generation = read.generation;
        self.last = Some(LastParse {
            generation: read.generation,
            files,
            clean: true,
        });
        Some(touched)
    }

    fn fall_back(&self, m: &mut Manifests, file: &Path) {
        match self.last_good.get(file) {
            Some(good) => {
                tracing::warn!(file = %file.display(), "enforcing the last good version of the file");
                let mut scratch = Vec::new();
                std::mem::swap(&mut scratch, &mut m.problems);
                // Unlimited: it was within the limits when read, and nothing of it may be
                // cut off now.
                load_text_within(m, file, good, usize::MAX);
                // The good version's own (non-dropping) problems were reported when it was read.
                m.problems = scratch;
            }
            None => {
                m.problems
                    .push(Problem::whole(file, ManifestError::NoGoodVersion));
                m.lockdown.push(file.to_path_buf());
            }
        }
    }
}

/// What [`DirLoader::reload`] found.
#[derive(Debug)]
pub enum Reload {
    /// The bytes read hash to the generation of the manifests given.
    Unchanged,
    /// Read and parsed whole.
    Whole(Manifests),
    /// Only some files changed, and the manifests given were updated in place.
    InPlace(Touched),
}

/// The objects an in-place update may have changed (defined before or after it by a
/// changed file), by kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub namespaces: BTreeSet<String>,
    pub pods: BTreeSet<ObjectKey>,
    pub policies: BTreeSet<ObjectKey>,
}

/// A parse that can be updated in place: its generation, and per file the objects it
/// defined.
#[derive(Debug)]
struct LastParse {
    generation: u64,
    files: BTreeMap<PathBuf, FileObjects>,
    clean: bool,
}

/// The objects one file defined (it was taken as it stands).
#[derive(Debug)]
struct FileObjects {
    /// Documents and List items read, for [`Limits::max_objects`].
    objects: usize,
    namespaces: Vec<String>,
    pods: Vec<ObjectKey>,
    policies: Vec<ObjectKey>,
}

impl FileObjects {
    fn of(alone: &Manifests) -> FileObjects {
        FileObjects {
            objects: alone.objects,
            namespaces: alone.namespaces.keys().cloned().collect(),
            pods: alone.pods.keys().cloned().collect(),
            policies: alone.policies.keys().cloned().collect(),
        }
    }
}

/// The text of a file's bytes, or where it stops being UTF-8.
fn utf8(bytes: Vec<u8>) -> Result<String, FileError> {
    String::from_utf8(bytes).map_err(|e| FileError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

/// One read of the directory: every manifest file's bytes (or why not), what the walk
/// skipped, and the [`content_hash`] of it all: the hash and the parse see the same bytes.
struct DirRead {
    generation: u64,
    files: Vec<(PathBuf, Result<Vec<u8>, FileError>)>,
    walk: Vec<(PathBuf, WalkError)>,
}

fn read_all(dir: &Path, limits: &Limits) -> Result<DirRead, std::io::Error> {
    let walk = collect(dir, limits)?;
    let mut h = ContentHasher::default();
    let mut left = limits.max_total_bytes;
    let files = walk
        .files
        .into_iter()
        .map(|f| {
            let bytes = read_file(&f, limits, &mut left);
            match &bytes {
                Ok(b) => h.add(dir, &f, b),
                // What went wrong is part of the content: a change of it is a new generation.
                Err(e) => h.add(dir, &f, format!("\0{e}").as_bytes()),
            }
            (f, bytes)
        })
        .collect();
    Ok(DirRead {
        generation: h.finish(),
        files,
        walk: walk.problems,
    })
}

/// Reads one file, at most `limits.max_file_bytes` and what is `left` of the directory's
/// budget (taken from it), never more than one byte past either: a huge file costs no more
/// memory than the limit. Never blocks: a FIFO or device is refused before a read.
fn read_file(path: &Path, limits: &Limits, left: &mut u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO for reading waits for a writer without it; a no-op for files.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(FileError::Io)?;
    let meta = file.metadata().map_err(FileError::Io)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular);
    }
    let limit = limits.max_file_bytes;
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    if meta.len() > *left {
        return Err(FileError::OverBudget {
            limit: limits.max_total_bytes,
        });
    }
    // The file may grow between the stat and the read: the reader is bounded anyway.
    let cap = limit.min(*left);
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    let read = bytes.len() as u64;
    if read > limit {
        return Err(FileError::TooLarge { size: read, limit });
    }
    if read > *left {
        return Err(FileError::OverBudget {
            limit: limits.max_total_bytes,
        });
    }
    *left -= read;
    Ok(bytes)
}

/// The manifest files below a directory (sorted) and the parts of the tree not walked.
#[derive(Debug, Default)]
struct Walk {
    files: Vec<PathBuf>,
    /// Every directory read (the manifest directory first), by the path first read by:
    /// what [`watch::DirWatch`] watches.
    dirs: Vec<PathBuf>,
    problems: Vec<(PathBuf, WalkError)>,
}

/// Walks `dir` within `limits`. Symbolic links are followed (a ConfigMap volume links every
/// file; a linked directory may be meant), but every directory is read once, known by its
/// (device, inode): a link loop costs one problem, not a walk to the kernel's limit. Only an
/// unreadable `dir` itself is an error.
fn collect(dir: &Path, limits: &Limits) -> Result<Walk, std::io::Error> {
    let mut w = Walker {
        limits,
        seen: BTreeMap::new(),
        entries: 0,
        stopped: false,
        too_deep: false,
        walk: Walk::default(),
    };
    w.seen
        .insert(dir_id(&std::fs::metadata(dir)?), dir.to_path_buf());
    w.dir(dir, 0)?;
    w.walk.files.sort();
    w.walk.dirs = w.seen.into_values().collect();
    Ok(w.walk)
}

struct Walker<'l> {
    limits: &'l Limits,
    /// Directories read, by (device, inode), with the path first read by.
    seen: BTreeMap<(u64, u64), PathBuf>,
    entries: usize,
    /// A count limit was reached: nothing more is looked at.
    stopped: bool,
    /// [`WalkError::TooDeep`] was reported (once per walk).
    too_deep: bool,
    walk: Walk,
}

fn dir_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (meta.dev(), meta.ino())
}

impl Walker<'_> {
    /// Walks one directory at `depth` (0: the manifest directory).
    fn dir(&mut self, dir: &Path, depth: usize) -> Result<(), std::io::Error> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue; // editors' swap files and atomic-write temporaries
            }
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                let limit = self.limits.max_entries;
                self.stop(dir, WalkError::TooManyEntries { limit });
                return Ok(());
            }
            names.push(name);
        }
        // Sorted: with a directory linked twice, the same path is read each time.
        names.sort();
        for name in names {
            if self.stopped {
                break;
            }
            self.entry(&dir.join(name), depth);
        }
        Ok(())
    }

    fn entry(&mut self, p: &Path, depth: usize) {
        // Followed through links; a dangling link or a link loop fails here and is left to
        // the read below when it looks like a manifest (it is reported there).
        let meta = std::fs::metadata(p).ok().filter(|m| m.is_dir());
        if let Some(meta) = meta {
            self.subdir(p, &meta, depth + 1);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            if self.walk.files.len() >= self.limits.max_files {
                let limit = self.limits.max_files;
                return self.stop(p.parent().unwrap_or(p), WalkError::TooManyFiles { limit });
            }
            self.walk.files.push(p.to_path_buf());
        }
    }

    fn subdir(&mut self, p: &Path, meta: &std::fs::Metadata, depth: usize) {
        if depth > self.limits.max_depth {
            if !std::mem::replace(&mut self.too_deep, true) {
                let limit = self.limits.max_depth;
                self.walk
                    .problems
                    .push((p.to_path_buf(), WalkError::TooDeep { limit }));
            }
            return;
        }
        if let Some(first) = self.seen.get(&dir_id(meta)) {
            let first = first.clone();
            self.walk
                .problems
                .push((p.to_path_buf(), WalkError::Revisited { first }));
            return;
        }
        self.seen.insert(dir_id(meta), p.to_path_buf());
        if let Err(e) = self.dir(p, depth) {
            self.walk
                .problems
                .push((p.to_path_buf(), WalkError::ReadDir(e)));
        }
    }

    fn stop(&mut self, at: &Path, error: WalkError) {
        self.stopped = true;
        self.walk.problems.push((at.to_path_buf(), error));
    }
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
    let Ok(walk) = collect(dir, &Limits::default()) else {
        return Vec::new();
    };
    walk.files
        .into_iter()
        .map(|f| {
            let md = std::fs::metadata(&f).ok();
            let len = md.as_ref().map_or(0, |m| m.len());
            let mtime = md.and_then(|m| m.modified().ok());
            (f, len, mtime)
        })
        .collect()
}

/// A hash of the directory's content (file names and bytes, read as [`load_dir`] reads
/// them), the generation the agent reports once it enforces it: whoever wrote the files can
/// wait for exactly that.
pub fn content_hash(dir: &Path) -> u64 {
    match read_all(dir, &Limits::default()) {
        Ok(read) => read.generation,
        Err(_) => ContentHasher::default().finish(),
    }
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

/// Loads one file's documents into `m`, within the default object limit.
pub fn load_text(m: &mut Manifests, file: &Path, text: &str) {
    load_text_within(m, file, text, MAX_OBJECTS);
}

/// Loads one file's documents into `m` while it holds fewer than `max_objects` objects.
fn load_text_within(m: &mut Manifests, file: &Path, text: &str, max_objects: usize) {
    yaml::for_each_document(text, |document, value| {
        let mut errors = Vec::new();
        let flow = match value {
            Ok(value) => load_value(m, file, document, value, max_objects, &mut errors),
            Err(e) => {
                errors.push(ManifestError::Yaml(e));
                ControlFlow::Break(())
            }
        };
        m.problems.extend(errors.into_iter().map(|error| Problem {
            file: file.into(),
            document,
            error,
        }));
        flow
    });
}

/// Loads one object (or a List's items) into `m`; `Break` once `m` holds `max_objects`
/// (reported once, in `errors`).
fn load_value(
    m: &mut Manifests,
    file: &Path,
    document: usize,
    value: serde_json::Value,
    max_objects: usize,
    errors: &mut Vec<ManifestError>,
) -> ControlFlow<()> {
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let kind = field("kind");
    let api_version = field("apiVersion");
    if matches!(
        kind.as_str(),
        "List" | "NamespaceList" | "PodList" | "NetworkPolicyList"
    ) {
        let items = match value {
            serde_json::Value::Object(mut map) => map.remove("items"),
            _ => None,
        };
        if let Some(serde_json::Value::Array(items)) = items {
            for item in items {
                load_value(m, file, document, item, max_objects, errors)?;
            }
        }
        return ControlFlow::Continue(());
    }
    // Every other document counts, read or not: it was parsed.
    if m.objects >= max_objects {
        errors.push(ManifestError::TooManyObjects { limit: max_objects });
        return ControlFlow::Break(());
    }
    m.objects += 1;
    let origin = Origin {
        file: file.to_path_buf(),
        document,
    };
    match (kind.as_str(), api_version.as_str()) {
        ("", _) => errors.push(ManifestError::NoKind),
        ("Namespace", "v1") => match serde_json::from_value::<core::Namespace>(value) {
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
        ("Pod", "v1") => match serde_json::from_value::<core::Pod>(value) {
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
            match serde_json::from_value::<net::NetworkPolicy>(value) {
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
    ControlFlow::Continue(())
}

/// Where an object is defined.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Origin {
    file: PathBuf,
    document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

impl Manifests {
    /// Records where an object is defined; a second definition is a problem (the first wins,
    /// so the result does not depend on which file changed last).
    fn claim(&mut self, kind: &'static str, key: String, origin: &Origin) -> Option<ManifestError> {
        match self.origin.get(&(kind, key.clone())) {
            Some(first) => Some(ManifestError::Duplicate {
                kind,
                key,
                first: first.to_string(),
            }),
            None => {
                self.origin.insert((kind, key), origin.clone());
                None
            }
        }
    }

    /// One problem per address that more than one pod claims, located at the second
    /// claimant (in name order) and naming every one with where it is defined.
    fn report_shared_addresses(&mut self) {
        self.report_shared_addresses_among(None);
    }

    /// [`Manifests::report_shared_addresses`] for the addresses `only` (all when `None`):
    /// a scan of the pods without building the whole claims table.
    fn report_shared_addresses_among(&mut self, only: Option<&BTreeSet<std::net::IpAddr>>) {
        let pods = self
            .pods
            .values()
            .filter(|p| only.is_none_or(|o| p.ips.iter().any(|ip| o.contains(ip))));
        let shared = model::shared_addresses(pods)
            .into_iter()
            .filter(|(addr, _)| only.is_none_or(|o| o.contains(addr)));
        for (addr, keys) in shared {
            let origins: Vec<Option<&Origin>> = keys
                .iter()
                .map(|k| self.origin.get(&("Pod", k.to_string())))
                .collect();
            let pods = keys
                .iter()
                .zip(&origins)
                .map(|(k, o)| match o {
                    Some(o) => format!("{k} ({o})"),
                    None => k.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let at = origins.get(1).copied().flatten();
            self.problems.push(Problem {
                file: at.map(|o| o.file.clone()).unwrap_or_default(),
                document: at.map_or(0, |o| o.document),
                error: ManifestError::SharedAddress { addr, pods },
            });
        }
    }

    /// Takes in `other`, one file loaded on its own (counting on from this one's objects),
    /// as if its text were loaded into `self`, without parsing it a second time.
    fn absorb(&mut self, other: Manifests) {
        let Manifests {
            namespaces,
            pods,
            policies,
            problems,
            objects,
            origin,
            ..
        } = other;
        self.problems.extend(problems);
        self.objects = objects;
        // Whether this object is the first of its key (else a problem is recorded).
        let first = |m: &mut Manifests, kind: &'static str, key: String| {
            let Some(o) = origin.get(&(kind, key.clone())) else {
                return false; // every object loaded was claimed: not reached
            };
            match m.claim(kind, key, o) {
                None => true,
                Some(error) => {
                    m.problems.push(Problem {
                        file: o.file.clone(),
                        document: o.document,
                        error,
                    });
                    false
                }
            }
        };
        for (k, v) in namespaces {
            if first(self, "Namespace", k.clone()) {
                self.namespaces.insert(k, v);
            }
        }
        for (k, v) in pods {
            if first(self, "Pod", k.to_string()) {
                self.pods.insert(k, v);
            }
        }
        for (k, v) in policies {
            if first(self, "NetworkPolicy", k.to_string()) {
                self.policies.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    /// The problems' texts, for assertions.
    fn texts(m: &Manifests) -> Vec<String> {
        m.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_directory_linked_into_itself_is_read_once_and_reported_once() {
        let d = Dir::new("selflink");
        d.write("good.yaml", GOOD);
        std::os::unix::fs::symlink(".", d.0.join("loop")).unwrap();
        let m = loader_once(&d);
        let t = texts(&m);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(t[0].contains("loop") && t[0].contains("again"), "{}", t[0]);
        // Nothing was lost: every object is read, once.
        assert!(m.lockdown.is_empty());
        assert!(m.pods.contains_key(&ObjectKey::new("x", "a")));
    }

    #[test]
    fn a_tree_deeper_than_the_limit_is_reported_once_and_fails_closed() {
        let d = Dir::new("deep");
        d.write("good.yaml", GOOD);
        let mut p = d.0.clone();
        for i in 0..(MAX_DEPTH + 4) {
            p = p.join(format!("d{i}"));
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("deep.yaml"), ALLOW_ALL).unwrap();
        let m = loader_once(&d);
        let t = texts(&m);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(
            t[0].contains(&format!("deeper than {MAX_DEPTH}")),
            "{}",
            t[0]
        );
        // The policy below the limit is not read: whatever it held may be missing.
        assert!(!m.policies.contains_key(&ObjectKey::new("x", "open")));
        assert_eq!(m.lockdown.len(), 1);
    }

    #[test]
    fn more_files_than_the_limit_are_reported_once_and_fail_closed() {
        let d = Dir::new("manyfiles");
        for i in 0..=MAX_FILES {
            d.write(&format!("f{i:05}.yaml"), "");
        }
        let m = loader_once(&d);
        let t = texts(&m);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(t[0].contains(&format!("more than {MAX_FILES}")), "{}", t[0]);
        assert_eq!(m.lockdown.len(), 1);
    }

    #[test]
    fn more_entries_than_the_limit_stop_the_walk_once_and_fail_closed() {
        let d = Dir::new("manyentries");
        for i in 0..8 {
            d.write(&format!("notes{i}.txt"), "");
        }
        let limits = Limits {
            max_entries: 5,
            ..Limits::default()
        };
        let m = DirLoader::with_limits(limits).load(&d.0).unwrap();
        let t = texts(&m);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(t[0].contains("more than 5 directory entries"), "{}", t[0]);
        assert_eq!(m.lockdown.len(), 1);
    }

    #[test]
    fn a_file_over_the_size_limit_is_not_read_and_fails_closed() {
        let d = Dir::new("huge");
        d.write("good.yaml", GOOD);
        let size = MAX_FILE_BYTES + 1;
        d.write(
            "huge.yaml",
            &format!("#{}\n", "x".repeat(size as usize - 2)),
        );
        let m = loader_once(&d);
        let t = texts(&m);
        assert!(
            t.iter().any(|t| t.contains("huge.yaml")
                && t.contains(&format!(
                    "file too large: {size} bytes, limit {MAX_FILE_BYTES}"
                ))),
            "{t:#?}"
        );
        assert_eq!(m.lockdown.len(), 1, "{t:#?}");
        // The other file is read as usual.
        assert!(m.pods.contains_key(&ObjectKey::new("x", "a")));
    }

    #[test]
    fn a_fifo_is_a_problem_not_a_hang() {
        let d = Dir::new("fifo");
        let path =
            std::ffi::CString::new(d.0.join("pipe.yaml").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let dir = d.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(texts(&load_dir(&dir).unwrap()));
        });
        let t = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO must not block");
        assert!(
            t.iter()
                .any(|t| t.contains("pipe.yaml") && t.contains("not a regular file")),
            "{t:#?}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_file_and_offset_and_fails_closed() {
        let d = Dir::new("utf8");
        let mut bytes = b"kind: Namespace\n".to_vec();
        bytes.extend([0xff, 0xfe, b'\n']);
        std::fs::write(d.0.join("bad.yaml"), bytes).unwrap();
        let m = loader_once(&d);
        let t = texts(&m);
        assert!(
            t.iter().any(|t| t.contains("bad.yaml")
                && t.contains("not UTF-8")
                && t.contains("byte offset 16")),
            "{t:#?}"
        );
        assert_eq!(m.lockdown.len(), 1);
    }

    /// Loads `text` as a one-file directory on a thread, `None` when it takes over 20 s.
    fn load_one_timed(tag: &str, text: String) -> Option<(Manifests, std::time::Duration)> {
        let d = Dir::new(tag);
        d.write("bomb.yaml", &text);
        let dir = d.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let m = load_dir(&dir).unwrap();
            let _ = tx.send((m, t0.elapsed()));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20)).ok()
    }

    #[test]
    fn a_billion_laughs_is_reported_quickly() {
        let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: lol}\nx:\n");
        text.push_str("  a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for (prev, name) in ('a'..'i').zip('b'..='i') {
            let refs = vec![format!("*{prev}"); 9].join(",");
            text.push_str(&format!("  {name}: &{name} [{refs}]\n"));
        }
        let (m, took) = load_one_timed("laughs", text).expect("must not hang");
        eprintln!("billion laughs reported in {took:?}");
        let t = texts(&m);
        assert!(!m.namespaces.contains_key("lol"), "{t:#?}");
        assert!(!m.lockdown.is_empty(), "{t:#?}");
    }

    #[test]
    fn many_aliases_of_a_large_anchor_are_rejected() {
        // Quadratic rather than exponential: 1000 aliases of a 1000-element list expand to
        // a million nodes from 10 kB.
        let n = 1000;
        let text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: lol}}\nbig: &big [{}]\nmany: [{}]\n",
            vec!["x"; n].join(","),
            vec!["*big"; n].join(","),
        );
        let (m, took) = load_one_timed("quadratic", text).expect("must not hang");
        eprintln!("quadratic alias expansion reported in {took:?}");
        let t = texts(&m);
        assert!(t.iter().any(|t| t.contains("alias")), "{t:#?}");
        assert!(!m.namespaces.contains_key("lol"), "{t:#?}");
        assert!(!m.lockdown.is_empty(), "{t:#?}");
    }

    #[test]
    fn files_past_the_directory_byte_budget_are_not_read_and_fail_closed() {
        let d = Dir::new("budget");
        d.write("a.yaml", GOOD);
        d.write("b.yaml", ALLOW_ALL);
        let limits = Limits {
            max_total_bytes: GOOD.len() as u64 + 10,
            ..Limits::default()
        };
        let m = DirLoader::with_limits(limits).load(&d.0).unwrap();
        let t = texts(&m);
        assert!(
            t.iter().any(|t| t.contains("b.yaml")
                && t.contains(&format!("limit of {} bytes", GOOD.len() + 10))),
            "{t:#?}"
        );
        assert!(m.pods.contains_key(&ObjectKey::new("x", "a")));
        assert_eq!(m.lockdown, vec![d.0.join("b.yaml")]);
    }

    #[test]
    fn a_file_that_grows_too_large_keeps_its_last_good_version() {
        let d = Dir::new("grows");
        d.write("policy.yaml", ALLOW_ALL);
        let limits = Limits {
            max_file_bytes: 1000,
            ..Limits::default()
        };
        let mut loader = DirLoader::with_limits(limits);
        loader.load(&d.0).unwrap();
        d.write(
            "policy.yaml",
            &format!("{ALLOW_ALL}#{}\n", "x".repeat(1000)),
        );
        let m = loader.load(&d.0).unwrap();
        assert!(m.policies.contains_key(&ObjectKey::new("x", "open")));
        assert!(m.lockdown.is_empty());
        let t = texts(&m);
        assert!(t[0].contains("file too large"), "{t:#?}");
    }

    #[test]
    fn more_objects_than_the_limit_are_reported_once_and_fail_closed() {
        let d = Dir::new("objects");
        d.write("a.yaml", GOOD);
        let ns =
            |n: usize| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: n{n}}}\n");
        d.write("b.yaml", &(0..4).map(ns).collect::<String>());
        let list: String = (0..4)
            .map(|n| format!("- {{apiVersion: v1, kind: Namespace, metadata: {{name: l{n}}}}}\n"))
            .collect();
        d.write(
            "c.yaml",
            &format!("apiVersion: v1\nkind: List\nitems:\n{list}"),
        );
        let limits = Limits {
            max_objects: 5,
            ..Limits::default()
        };
        let m = DirLoader::with_limits(limits).load(&d.0).unwrap();
        let t = texts(&m);
        let over: Vec<_> = t
            .iter()
            .filter(|t| t.contains("more than 5 objects"))
            .collect();
        assert_eq!(over.len(), 2, "{t:#?}");
        assert!(over[0].contains("b.yaml (document 3)"), "{t:#?}");
        assert!(over[1].contains("c.yaml (document 1)"), "{t:#?}");
        // good.yaml's 3 objects are in; neither other file is taken in part.
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(m.lockdown.len(), 2);
    }

    #[test]
    fn broken_links_are_problems_and_linked_directories_are_read() {
        let d = Dir::new("links");
        let real = Dir::new("links-target");
        real.write("good.yaml", GOOD);
        std::os::unix::fs::symlink(&real.0, d.0.join("linked")).unwrap();
        std::os::unix::fs::symlink("nowhere.yaml", d.0.join("dangling.yaml")).unwrap();
        std::os::unix::fs::symlink("self.yaml", d.0.join("self.yaml")).unwrap();
        let m = loader_once(&d);
        let t = texts(&m);
        assert_eq!(
            t.iter().filter(|t| t.contains("cannot read")).count(),
            2,
            "{t:#?}"
        );
        assert!(m.pods.contains_key(&ObjectKey::new("x", "a")));
    }

    /// Not a limit test: how long 20k policies in one file take to load (one policy per
    /// document, as `kubectl get -o yaml` of each would write them).
    #[test]
    fn twenty_thousand_policies_in_one_file_load() {
        let d = Dir::new("20k");
        let text: String = (0..20_000)
            .map(|i| {
                format!(
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p{i}\n  namespace: ns{}\nspec:\n  podSelector:\n    matchLabels:\n      app: web{i}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: client{i}\n    ports:\n    - protocol: TCP\n      port: 80\n",
                    i % 50
                )
            })
            .collect();
        d.write("policies.yaml", &text);
        let t0 = std::time::Instant::now();
        let m = loader_once(&d);
        eprintln!(
            "20000 policies ({} bytes) loaded in {:?}",
            text.len(),
            t0.elapsed()
        );
        assert!(m.problems.is_empty(), "{:?}", m.problems.first());
        assert_eq!(m.policies.len(), 20_000);
    }

    #[test]
    fn pods_claiming_one_address_are_reported_by_name_and_kept() {
        let d = Dir::new("shared");
        d.write("a.yaml", GOOD);
        d.write(
            "b.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: y}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 198.18.0.10}\n",
        );
        let m = loader_once(&d);
        let t = texts(&m);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(
            t[0].contains("198.18.0.10") && t[0].contains("x/a") && t[0].contains("y/b"),
            "{}",
            t[0]
        );
        // Located at the second claimant; both pods stay (the compiler decides the address).
        assert!(
            t[0].starts_with(&format!("{}", d.0.join("b.yaml").display())),
            "{}",
            t[0]
        );
        assert_eq!(m.pods.len(), 2);
        assert!(m.lockdown.is_empty());
    }

    #[test]
    fn broken_yaml_is_a_problem_not_a_panic() {
        let m = load(&[("broken.yaml", "kind: [unclosed\n")]);
        assert_eq!(m.problems.len(), 1);
        assert!(matches!(
            m.problems[0].error,
            ManifestError::Yaml(yaml::YamlError::Syntax(_))
        ));
    }
}
