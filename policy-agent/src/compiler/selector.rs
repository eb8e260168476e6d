//! Which identities each pod peer of a policy selects: the one place selection is decided,
//! for the full compile and the incremental engine alike (in the spirit of Cilium's
//! SelectorCache). A peer is keyed by its selectors as written (and the policy's namespace
//! when it has no namespaceSelector), so every policy using the same peer shares one entry;
//! the engine keeps the entries current as identities and namespaces change, the full
//! compile fills a fresh cache per compile.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use super::IdentityKey;
use crate::model::{LabelSelector, Labels, NetworkPolicy, ObjectKey, Pod, Snapshot};

/// The policies that select `pod` and isolate it in this direction: those of its own
/// namespace whose podSelector matches its labels, in key order.
pub fn isolating<'s>(
    snap: &'s Snapshot,
    pod: &'s Pod,
    ingress: bool,
) -> impl Iterator<Item = &'s NetworkPolicy> + 's {
    let lo = ObjectKey::new(pod.namespace.clone(), String::new());
    snap.policies
        .range(lo..)
        .take_while(move |(k, _)| k.namespace == pod.namespace)
        .map(|(_, p)| p)
        .filter(move |p| {
            if ingress {
                p.ingress_isolation
            } else {
                p.egress_isolation
            }
        })
        .filter(move |p| p.pod_selector.matches(&pod.labels))
}

/// Whether a namespace's labels match `sel`; a namespace not (yet) seen has only its name
/// label (as the API server sets it).
pub fn namespace_matches(snap: &Snapshot, sel: &LabelSelector, ns: &str) -> bool {
    match snap.namespaces.get(ns) {
        Some(n) => sel.matches(&n.labels),
        None => {
            let mut l = Labels::new();
            l.insert("kubernetes.io/metadata.name".to_owned(), ns.to_owned());
            sel.matches(&l)
        }
    }
}

/// A pod peer, borrowed from the policy that holds it.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    pub namespaces: Option<&'a LabelSelector>,
    /// The policy's namespace, which a peer without namespaceSelector is confined to.
    pub policy_ns: &'a str,
    pub pods: Option<&'a LabelSelector>,
}

impl<'a> Peer<'a> {
    pub fn new(
        namespaces: Option<&'a LabelSelector>,
        policy_ns: &'a str,
        pods: Option<&'a LabelSelector>,
    ) -> Self {
        Peer {
            namespaces,
            policy_ns,
            pods,
        }
    }

    /// The namespace the peer is confined to (none when it has a namespaceSelector).
    fn own_ns(&self) -> &'a str {
        if self.namespaces.is_none() {
            self.policy_ns
        } else {
            ""
        }
    }

    /// The spec's rule: a namespaceSelector picks namespaces by their labels, its absence
    /// means the policy's own; a podSelector picks pods there by their labels, its absence
    /// means all of them.
    pub fn selects(&self, snap: &Snapshot, k: &IdentityKey) -> bool {
        let ns_ok = match self.namespaces {
            None => k.namespace == self.policy_ns,
            Some(sel) => namespace_matches(snap, sel, &k.namespace),
        };
        ns_ok && self.pods.is_none_or(|s| s.matches(&k.labels))
    }

    fn hash64(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.namespaces.hash(&mut h);
        self.own_ns().hash(&mut h);
        self.pods.hash(&mut h);
        h.finish()
    }

    fn same(&self, o: &Owned) -> bool {
        self.namespaces == o.namespaces.as_ref()
            && self.own_ns() == o.own_ns
            && self.pods == o.pods.as_ref()
    }

    fn to_owned(self) -> Owned {
        Owned {
            namespaces: self.namespaces.cloned(),
            own_ns: self.own_ns().to_owned(),
            pods: self.pods.cloned(),
        }
    }
}

#[derive(Clone, Debug)]
struct Owned {
    namespaces: Option<LabelSelector>,
    own_ns: String,
    pods: Option<LabelSelector>,
}

impl Owned {
    fn peer(&self) -> Peer<'_> {
        Peer {
            namespaces: self.namespaces.as_ref(),
            policy_ns: &self.own_ns,
            pods: self.pods.as_ref(),
        }
    }
}

/// The identities there are, by namespace.
pub trait Identities {
    fn key(&self, id: u32) -> Option<&IdentityKey>;
    fn all(&self) -> impl Iterator<Item = u32>;
    fn namespaces(&self) -> impl Iterator<Item = &str>;
    fn in_namespace(&self, ns: &str) -> impl Iterator<Item = (u32, &IdentityKey)>;
}

#[derive(Clone, Debug)]
struct Entry {
    peer: Owned,
    selected: BTreeSet<u32>,
}

/// Each peer in use and the identities it selects.
#[derive(Clone, Debug, Default)]
pub struct SelectorCache {
    // By a hash of the borrowed peer: lookups clone nothing; equal hashes are told apart
    // by comparing the peers themselves.
    entries: HashMap<u64, Vec<Entry>>,
}

impl SelectorCache {
    /// The identities `peer` selects, computed on first use.
    pub fn selected(
        &mut self,
        peer: Peer<'_>,
        snap: &Snapshot,
        ids: &impl Identities,
    ) -> &BTreeSet<u32> {
        let bucket = self.entries.entry(peer.hash64()).or_default();
        let i = match bucket.iter().position(|e| peer.same(&e.peer)) {
            Some(i) => i,
            None => {
                bucket.push(Entry {
                    peer: peer.to_owned(),
                    selected: select(peer, snap, ids),
                });
                bucket.len() - 1
            }
        };
        &bucket[i].selected
    }

    /// Whether `peer` selects identity `id`; `None` when the peer is not in the cache.
    pub fn contains(&self, peer: Peer<'_>, id: u32) -> Option<bool> {
        self.entries
            .get(&peer.hash64())?
            .iter()
            .find(|e| peer.same(&e.peer))
            .map(|e| e.selected.contains(&id))
    }

    /// Identity `id` now stands for `key` (`None`: it is gone), or its namespace's labels
    /// changed: its membership in every cached peer is decided again.
    pub fn identity_changed(&mut self, id: u32, key: Option<&IdentityKey>, snap: &Snapshot) {
        for e in self.entries.values_mut().flatten() {
            if key.is_some_and(|k| e.peer.peer().selects(snap, k)) {
                e.selected.insert(id);
            } else {
                e.selected.remove(&id);
            }
        }
    }

    /// Keeps only the peers `used` says are still in use.
    pub fn retain(&mut self, mut used: impl FnMut(Peer<'_>) -> bool) {
        for bucket in self.entries.values_mut() {
            bucket.retain(|e| used(e.peer.peer()));
        }
        self.entries.retain(|_, b| !b.is_empty());
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn select(peer: Peer<'_>, snap: &Snapshot, ids: &impl Identities) -> BTreeSet<u32> {
    let pods_ok = |k: &IdentityKey| peer.pods.is_none_or(|s| s.matches(&k.labels));
    match peer.namespaces {
        None => ids
            .in_namespace(peer.policy_ns)
            .filter(|(_, k)| pods_ok(k))
            .map(|(id, _)| id)
            .collect(),
        Some(nsel) => ids
            .namespaces()
            .filter(|ns| namespace_matches(snap, nsel, ns))
            .flat_map(|ns| ids.in_namespace(ns))
            .filter(|(_, k)| pods_ok(k))
            .map(|(id, _)| id)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Namespace;
    use std::collections::BTreeMap;

    fn sel(kv: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    fn key(ns: &str, app: &str) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            named_ports: Default::default(),
        }
    }

    struct Ids(BTreeMap<u32, IdentityKey>);
    impl Identities for Ids {
        fn key(&self, id: u32) -> Option<&IdentityKey> {
            self.0.get(&id)
        }
        fn all(&self) -> impl Iterator<Item = u32> {
            self.0.keys().copied()
        }
        fn namespaces(&self) -> impl Iterator<Item = &str> {
            let s: BTreeSet<&str> = self.0.values().map(|k| k.namespace.as_str()).collect();
            s.into_iter()
        }
        fn in_namespace(&self, ns: &str) -> impl Iterator<Item = (u32, &IdentityKey)> {
            let ns = ns.to_owned();
            self.0
                .iter()
                .filter(move |(_, k)| k.namespace == ns)
                .map(|(i, k)| (*i, k))
        }
    }

    fn snap(team_of_y: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for (ns, team) in [("x", "a"), ("y", team_of_y)] {
            s.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: [("team".to_string(), team.to_string())].into(),
                },
            );
        }
        s
    }

    #[test]
    fn a_peer_without_namespace_selector_stays_in_the_policy_namespace() {
        let ids = Ids([(10, key("x", "web")), (11, key("y", "web"))].into());
        let web = sel(&[("app", "web")]);
        let mut c = SelectorCache::default();
        let s = snap("b");
        let got = c
            .selected(Peer::new(None, "x", Some(&web)), &s, &ids)
            .clone();
        assert_eq!(got, [10].into());
        let all = sel(&[]);
        let got = c
            .selected(Peer::new(Some(&all), "x", Some(&web)), &s, &ids)
            .clone();
        assert_eq!(got, [10, 11].into());
        // An unknown namespace is seen with its name label only.
        let by_name = sel(&[("kubernetes.io/metadata.name", "z")]);
        let ids = Ids([(12, key("z", "web"))].into());
        let got = c
            .selected(Peer::new(Some(&by_name), "x", None), &s, &ids)
            .clone();
        assert_eq!(got, [12].into());
    }

    #[test]
    fn equal_peers_of_different_policies_share_one_entry() {
        let ids = Ids([(10, key("x", "web"))].into());
        let team = sel(&[("team", "a")]);
        let team2 = team.clone();
        let mut c = SelectorCache::default();
        let s = snap("b");
        // With a namespaceSelector the policy's namespace does not matter.
        c.selected(Peer::new(Some(&team), "x", None), &s, &ids);
        c.selected(Peer::new(Some(&team2), "y", None), &s, &ids);
        assert_eq!(c.len(), 1);
        // Without one it does.
        c.selected(Peer::new(None, "x", None), &s, &ids);
        c.selected(Peer::new(None, "y", None), &s, &ids);
        assert_eq!(c.len(), 3);
        c.retain(|p| p.namespaces.is_some());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn identity_and_namespace_changes_update_every_entry() {
        let mut ids = Ids([(10, key("x", "web"))].into());
        let team_b = sel(&[("team", "b")]);
        let web = sel(&[("app", "web")]);
        let mut c = SelectorCache::default();
        let s = snap("b");
        let by_team = Peer::new(Some(&team_b), "x", None);
        let own_web = Peer::new(None, "x", Some(&web));
        c.selected(by_team, &s, &ids);
        c.selected(own_web, &s, &ids);
        assert_eq!(c.contains(by_team, 10), Some(false));
        assert_eq!(c.contains(own_web, 10), Some(true));
        // A new identity in y (team b).
        ids.0.insert(11, key("y", "web"));
        c.identity_changed(11, ids.0.get(&11), &s);
        assert_eq!(c.contains(by_team, 11), Some(true));
        assert_eq!(c.contains(own_web, 11), Some(false));
        // y's team label changes: its identities are decided again.
        let s2 = snap("c");
        c.identity_changed(11, ids.0.get(&11), &s2);
        assert_eq!(c.contains(by_team, 11), Some(false));
        // An identity gone leaves every entry.
        c.identity_changed(10, None, &s2);
        assert_eq!(c.contains(own_web, 10), Some(false));
        assert_eq!(c.contains(Peer::new(None, "q", None), 10), None);
    }
}
