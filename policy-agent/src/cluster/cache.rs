//! The model snapshot kept from pass to pass: each store object is converted once per
//! version, and a pass yields the changed objects as incremental-compile changes.
//!
//! A pass still reads whole store snapshots (a lost delete event cannot leave anything
//! behind), but converting every object on every pass costs tens of milliseconds at 10k
//! pods. So each converted object is remembered with the store's `Arc` of the version it came
//! from:
//! - the same allocation still in the store: the object did not change (a store never
//!   mutates an object in place; every applied version is a new `Arc`), nothing to do;
//! - a new allocation with the uid and resourceVersion of a remembered one (a re-list after
//!   a dropped watch or 410 Gone re-applies every object): the same version, kept as is;
//! - anything else is converted; remembered objects no longer in the store are removed.
//!
//! A pass is then a walk of addresses (one hash lookup per object) plus conversions of the
//! objects that changed. Holding the `Arc` keeps its address from being reused by another
//! object while it is remembered. The result equals [`super::snapshot::build`] of the same
//! stores (unit tests check it over random histories; the loop checks it on every resync).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use kube::Resource;

use super::snapshot::{self, Objects, PolicyProblems};
use crate::compiler::Change;
use crate::model::{self, ObjectKey, Snapshot};

/// The store's identity of an object: (namespace, name).
type Identity = (Option<String>, Option<String>);

/// One remembered store object.
struct Entry<G, K> {
    /// The version converted; holding it keeps its address unique.
    obj: Arc<G>,
    /// The pass that last saw it in the store.
    seen: u64,
    /// The snapshot key its model form is under (`None`: left out).
    key: Option<K>,
}

/// The remembered objects of one kind, by the address of their `Arc`.
struct Tracked<G, K> {
    by_addr: HashMap<usize, Entry<G, K>>,
}

impl<G, K> Default for Tracked<G, K> {
    fn default() -> Self {
        Tracked {
            by_addr: HashMap::new(),
        }
    }
}

fn addr<G>(o: &Arc<G>) -> usize {
    Arc::as_ptr(o) as usize
}

fn identity<G: Resource>(o: &G) -> Identity {
    let m = o.meta();
    (m.namespace.clone(), m.name.clone())
}

/// Same object, same version: nothing in it can differ. Without a resourceVersion (never
/// from an API server) nothing is assumed.
fn same_version<G: Resource>(a: &G, b: &G) -> bool {
    let (a, b) = (a.meta(), b.meta());
    a.resource_version.is_some() && a.resource_version == b.resource_version && a.uid == b.uid
}

/// How one kind's objects become snapshot entries.
trait Sink<G> {
    type Key: Ord + Clone + Hash;
    type Value: PartialEq;
    fn entries(&mut self) -> &mut BTreeMap<Self::Key, Self::Value>;
    /// The model form of an object and its key; `None`: left out of the snapshot.
    fn convert(&mut self, obj: &G) -> Option<(Self::Key, Self::Value)>;
    /// The entry under `key` was removed.
    fn removed(&mut self, _key: &Self::Key) {}
}

impl<G: Resource, K: Ord + Clone + Hash> Tracked<G, K> {
    /// Forgets the objects under `keys`, so the next sync converts them again (their model
    /// form depends on something besides the object).
    fn reconvert(&mut self, keys: &BTreeSet<K>) {
        if !keys.is_empty() {
            self.by_addr
                .retain(|_, e| e.key.as_ref().is_none_or(|k| !keys.contains(k)));
        }
    }

    /// Brings `sink`'s entries in line with `state` (the store's objects); returns the keys
    /// whose entry was added, removed or changed, and how many objects were converted.
    fn sync<S>(&mut self, state: &[Arc<G>], pass: u64, sink: &mut S) -> (Vec<K>, usize)
    where
        S: Sink<G, Key = K>,
    {
        // Unchanged objects: the same allocation as last pass.
        let mut fresh = Vec::new();
        let mut hits = 0;
        for o in state {
            match self.by_addr.get_mut(&addr(o)) {
                Some(e) => {
                    e.seen = pass;
                    hits += 1;
                }
                None => fresh.push(Arc::clone(o)),
            }
        }
        if fresh.is_empty() && hits == self.by_addr.len() {
            return (Vec::new(), 0);
        }
        // Versions that left the store (deleted, replaced, or re-listed).
        let mut gone: HashMap<Identity, Entry<G, K>> = HashMap::new();
        let mut stale = Vec::new();
        if hits != self.by_addr.len() {
            self.by_addr.retain(|_, e| {
                if e.seen == pass {
                    return true;
                }
                stale.push((identity(e.obj.as_ref()), e.key.take(), Arc::clone(&e.obj)));
                false
            });
        }
        // Keys whose entry is removed before the new versions are converted.
        let mut stale_keys = Vec::new();
        for (id, key, obj) in stale {
            if let Some(dup) = gone.insert(id, Entry { obj, seen: 0, key }) {
                // Two remembered objects with one identity (a store never has them): drop both.
                stale_keys.extend(dup.key);
            }
        }
        // The old value of every key touched, to report only real changes.
        let mut before: BTreeMap<K, Option<S::Value>> = BTreeMap::new();
        // A re-listed object of a remembered version keeps its model form.
        let mut convert = Vec::new();
        for o in fresh {
            let id = identity(o.as_ref());
            match gone.remove(&id) {
                Some(old) if same_version(old.obj.as_ref(), o.as_ref()) => {
                    let key = old.key;
                    self.by_addr.insert(
                        addr(&o),
                        Entry {
                            obj: o,
                            seen: pass,
                            key,
                        },
                    );
                }
                Some(old) => {
                    // Its old entry goes first, so the key is free for the new version.
                    stale_keys.extend(old.key);
                    convert.push(o);
                }
                None => convert.push(o),
            }
        }
        stale_keys.extend(gone.into_values().filter_map(|e| e.key));
        for k in stale_keys {
            let prev = sink.entries().remove(&k);
            sink.removed(&k);
            before.entry(k).or_insert(prev);
        }
        let converted = convert.len();
        for o in convert {
            let key = sink.convert(o.as_ref()).map(|(k, v)| {
                let prev = sink.entries().insert(k.clone(), v);
                before.entry(k.clone()).or_insert(prev);
                k
            });
            self.by_addr.insert(
                addr(&o),
                Entry {
                    obj: o,
                    seen: pass,
                    key,
                },
            );
        }
        let entries = sink.entries();
        let changed = before
            .into_iter()
            .filter(|(k, old)| entries.get(k) != old.as_ref())
            .map(|(k, _)| k)
            .collect();
        (changed, converted)
    }
}

/// The snapshot of the watch caches, kept up to date one changed object at a time.
pub struct SnapshotCache {
    snap: Snapshot,
    problems: BTreeMap<ObjectKey, PolicyProblems>,
    pods: Tracked<PodObj, ObjectKey>,
    namespaces: Tracked<NamespaceObj, String>,
    policies: Tracked<PolicyObj, ObjectKey>,
    counts: [usize; 3],
    pass: u64,
    primed: bool,
    /// The reported addresses the pods were converted with.
    reported: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

type PodObj = kube::core::DeserializeGuard<k8s_openapi::api::core::v1::Pod>;
type NamespaceObj = kube::core::DeserializeGuard<k8s_openapi::api::core::v1::Namespace>;
type PolicyObj = kube::core::DeserializeGuard<k8s_openapi::api::networking::v1::NetworkPolicy>;

/// What one [`SnapshotCache::update`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// The objects whose model form changed, for [`crate::compiler::Engine::apply_all`].
    pub changes: Vec<Change>,
    /// Objects converted in this pass (the rest were remembered).
    pub converted: usize,
}

impl SnapshotCache {
    /// An empty cache for `node`: the first update converts everything.
    pub fn new(node: &str) -> Self {
        SnapshotCache {
            snap: Snapshot {
                node: node.to_owned(),
                ..Default::default()
            },
            problems: BTreeMap::new(),
            pods: Tracked::default(),
            namespaces: Tracked::default(),
            policies: Tracked::default(),
            counts: [0; 3],
            pass: 0,
            primed: false,
            reported: BTreeMap::new(),
        }
    }

    /// Brings the snapshot up to date with the stores; returns what changed since the last
    /// update (on the first, every object).
    pub fn update(&mut self, objects: &Objects, node_addrs: Vec<IpAddr>) -> Update {
        self.pass += 1;
        let pass = self.pass;
        let mut out = Update::default();
        if !self.primed || self.snap.node_addrs != node_addrs {
            out.changes.push(Change::NodeAddrs);
        }
        self.primed = true;
        self.snap.node_addrs = node_addrs;
        self.counts = objects.counts();

        let (keys, n) = self.namespaces.sync(
            &objects.namespaces,
            pass,
            &mut Namespaces(&mut self.snap.namespaces),
        );
        out.converted += n;
        out.changes.extend(keys.into_iter().map(Change::Namespace));

        if self.reported != objects.reported {
            // Pods whose reported addresses came, went or changed are converted again.
            let touched: BTreeSet<ObjectKey> = self
                .reported
                .iter()
                .chain(&objects.reported)
                .filter(|(k, v)| {
                    self.reported.get(*k) != Some(*v) || objects.reported.get(*k) != Some(*v)
                })
                .map(|(k, _)| k.clone())
                .collect();
            self.pods.reconvert(&touched);
            self.reported = objects.reported.clone();
        }
        let (keys, n) = self.pods.sync(
            &objects.pods,
            pass,
            &mut PodSink {
                pods: &mut self.snap.pods,
                reported: &self.reported,
            },
        );
        out.converted += n;
        out.changes.extend(keys.into_iter().map(Change::Pod));

        let (keys, n) = self.policies.sync(
            &objects.policies,
            pass,
            &mut Policies {
                policies: &mut self.snap.policies,
                problems: &mut self.problems,
            },
        );
        out.converted += n;
        out.changes.extend(keys.into_iter().map(Change::Policy));
        out
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Policies with problems, as [`snapshot::Built::policy_problems`].
    pub fn problems(&self) -> &BTreeMap<ObjectKey, PolicyProblems> {
        &self.problems
    }

    /// Objects of each kind in the stores at the last update (pods, namespaces, policies).
    pub fn counts(&self) -> [usize; 3] {
        self.counts
    }

    /// Damages the kept snapshot as a bug would (tests of the resync's self-check).
    #[cfg(test)]
    pub(crate) fn snapshot_mut(&mut self) -> &mut Snapshot {
        &mut self.snap
    }

    /// Whether the cache holds what a from-scratch build of the same stores gives.
    pub fn matches(&self, built: &snapshot::Built) -> bool {
        built.snapshot == self.snap && built.policy_problems == self.problems
    }
}

struct PodSink<'a> {
    pods: &'a mut BTreeMap<ObjectKey, model::Pod>,
    reported: &'a BTreeMap<ObjectKey, Vec<IpAddr>>,
}

impl Sink<PodObj> for PodSink<'_> {
    type Key = ObjectKey;
    type Value = model::Pod;
    fn entries(&mut self) -> &mut BTreeMap<ObjectKey, model::Pod> {
        self.pods
    }
    fn convert(&mut self, obj: &PodObj) -> Option<(ObjectKey, model::Pod)> {
        snapshot::pod(obj, self.reported).map(|m| (m.key(), m))
    }
}

struct Namespaces<'a>(&'a mut BTreeMap<String, model::Namespace>);

impl Sink<NamespaceObj> for Namespaces<'_> {
    type Key = String;
    type Value = model::Namespace;
    fn entries(&mut self) -> &mut BTreeMap<String, model::Namespace> {
        self.0
    }
    fn convert(&mut self, obj: &NamespaceObj) -> Option<(String, model::Namespace)> {
        snapshot::namespace(obj).map(|m| (m.name.clone(), m))
    }
}

struct Policies<'a> {
    policies: &'a mut BTreeMap<ObjectKey, model::NetworkPolicy>,
    problems: &'a mut BTreeMap<ObjectKey, PolicyProblems>,
}

impl Sink<PolicyObj> for Policies<'_> {
    type Key = ObjectKey;
    type Value = model::NetworkPolicy;
    fn entries(&mut self) -> &mut BTreeMap<ObjectKey, model::NetworkPolicy> {
        self.policies
    }
    fn convert(&mut self, obj: &PolicyObj) -> Option<(ObjectKey, model::NetworkPolicy)> {
        let (value, problems) = snapshot::network_policy(obj)?;
        let key = value.key();
        match problems {
            Some(pp) => self.problems.insert(key.clone(), pp),
            None => self.problems.remove(&key),
        };
        Some((key, value))
    }
    fn removed(&mut self, key: &ObjectKey) {
        self.problems.remove(key);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
