//! The standalone agent's snapshot of its manifests: made whole, or brought up to date in
//! place for the objects an in-place reload touched, with the changes the incremental
//! engine takes ([`Change`]). Either way it equals what [`snapshot_of`] makes of the same
//! manifests (checked by the tests below).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::compiler::Change;
use crate::manifests::{Manifests, Touched};
use crate::model::{Namespace, ObjectKey, Snapshot};

/// Reported addresses of starting pods (`netpol-cni`), by pod.
pub type Reported = BTreeMap<ObjectKey, Vec<IpAddr>>;

/// The directory's snapshot for this node, starting pods given the addresses `netpol-cni`
/// reported for them.
pub fn snapshot_of(
    m: &Manifests,
    node: &str,
    node_addrs: &[IpAddr],
    reported: &Reported,
) -> Snapshot {
    let mut snap = m.snapshot(node, node_addrs.to_vec());
    for (key, ips) in reported {
        if let Some(p) = snap.pods.get_mut(key) {
            p.take_reported_addresses(Some(ips));
        }
    }
    snap
}

/// Brings `snap` (made from `m` before an in-place reload, which had no lockdown) up to
/// date for the objects `touched`; returns what changed, for the engine.
pub fn update(
    snap: &mut Snapshot,
    m: &Manifests,
    reported: &Reported,
    touched: &Touched,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for key in &touched.pods {
        let now = m.pods.get(key).map(|p| {
            let mut p = p.clone();
            p.node.get_or_insert_with(|| snap.node.clone());
            p.take_reported_addresses(reported.get(key));
            p
        });
        if set(&mut snap.pods, key, now) {
            changes.push(Change::Pod(key.clone()));
        }
    }
    for key in &touched.policies {
        if set(&mut snap.policies, key, m.policies.get(key).cloned()) {
            changes.push(Change::Policy(key.clone()));
        }
    }
    // Namespaces: declared ones, and those objects use but no manifest declares (few:
    // all are looked at).
    let used: BTreeSet<&str> = m
        .pods
        .keys()
        .chain(m.policies.keys())
        .map(|k| k.namespace.as_str())
        .collect();
    let names: BTreeSet<String> = snap
        .namespaces
        .keys()
        .cloned()
        .chain(m.namespaces.keys().cloned())
        .chain(used.iter().map(|n| n.to_string()))
        .collect();
    for name in names {
        let now = m.namespaces.get(&name).cloned().or_else(|| {
            used.contains(name.as_str()).then(|| Namespace {
                labels: [("kubernetes.io/metadata.name".to_string(), name.clone())].into(),
                name: name.clone(),
            })
        });
        if set(&mut snap.namespaces, &name, now) {
            changes.push(Change::Namespace(name));
        }
    }
    changes
}

/// Sets or removes `key`; whether that changed anything.
fn set<K: Ord + Clone, V: PartialEq>(map: &mut BTreeMap<K, V>, key: &K, now: Option<V>) -> bool {
    match now {
        Some(v) => {
            if map.get(key) == Some(&v) {
                return false;
            }
            map.insert(key.clone(), v);
            true
        }
        None => map.remove(key).is_some(),
    }
}

/// What differs between two snapshots of one node, as the engine's changes.
pub fn changes_between(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let mut changes = Vec::new();
    if old.node_addrs != new.node_addrs {
        changes.push(Change::NodeAddrs);
    }
    changes.extend(differing(&old.namespaces, &new.namespaces).map(Change::Namespace));
    changes.extend(differing(&old.pods, &new.pods).map(Change::Pod));
    changes.extend(differing(&old.policies, &new.policies).map(Change::Policy));
    changes
}

/// Keys present in one map only, or with different values.
fn differing<'a, K: Ord + Clone, V: PartialEq>(
    a: &'a BTreeMap<K, V>,
    b: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    let gone = a.keys().filter(|k| !b.contains_key(*k));
    let new_or_changed = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, _)| k);
    gone.chain(new_or_changed).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::{self, Engine};
    use crate::manifests::{DirLoader, Reload};

    fn pod(ns: &str, name: &str, app: &str, ip: &str, node: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\n\
             status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
        )
    }

    fn policy(ns: &str, name: &str, from: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]}}]}}\n"
        )
    }

    fn namespace(name: &str, team: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n"
        )
    }

    /// Each step's in-place snapshot and engine equal a whole snapshot and a full compile.
    #[test]
    fn an_update_in_place_equals_the_whole_snapshot_and_compile() {
        let dir = std::env::temp_dir().join(format!("standalone-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let w = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("write");
        let node = "n1";
        let addrs: Vec<IpAddr> = vec!["198.18.255.254".parse().expect("addr")];
        let reported = Reported::new();
        w(
            "a.yaml",
            [
                namespace("x", "red"),
                pod("x", "a", "web", "198.18.0.1", node),
            ]
            .join("---\n"),
        );
        w(
            "b.yaml",
            [
                pod("y", "b", "db", "198.18.0.2", node),
                pod("y", "r", "web", "198.18.0.3", "n2"),
            ]
            .join("---\n"),
        );
        w("p.yaml", policy("y", "p", "web"));
        let mut loader = DirLoader::default();
        let Reload::Whole(mut m) = loader.reload(&dir, None).expect("read") else {
            panic!("first read is whole");
        };
        let mut snap = snapshot_of(&m, node, &addrs, &reported);
        let mut engine = Engine::new(&snap);
        let steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| w("p.yaml", policy("y", "p", "db"))),
            Box::new(|| {
                w(
                    "a.yaml",
                    [
                        namespace("x", "blue"),
                        pod("x", "a", "web", "198.18.0.1", node),
                    ]
                    .join("---\n"),
                )
            }),
            Box::new(|| w("b.yaml", pod("y", "b", "web", "198.18.0.2", node))),
            Box::new(|| {
                w(
                    "c.yaml",
                    [
                        pod("z", "c", "web", "198.18.0.4", node),
                        policy("z", "q", "web"),
                    ]
                    .join("---\n"),
                )
            }),
            Box::new(|| std::fs::remove_file(dir.join("a.yaml")).expect("delete")),
        ];
        for (i, step) in steps.iter().enumerate() {
            step();
            let Reload::InPlace(touched) = loader.reload(&dir, Some(&mut m)).expect("reload")
            else {
                panic!("step {i}: not in place");
            };
            let changes = update(&mut snap, &m, &reported, &touched);
            assert_eq!(
                snap,
                snapshot_of(&m, node, &addrs, &reported),
                "step {i}: snapshot"
            );
            engine.apply_all(&snap, &changes);
            let full = compiler::compile(&snap, &mut engine.numbers().clone());
            assert_eq!(&full, engine.contents(), "step {i}: compile");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn changes_between_snapshots_name_every_difference() {
        let mut a = Snapshot {
            node: "n".into(),
            ..Snapshot::default()
        };
        a.namespaces.insert(
            "x".into(),
            Namespace {
                name: "x".into(),
                labels: Default::default(),
            },
        );
        let mut b = a.clone();
        b.node_addrs = vec!["198.18.0.1".parse().expect("addr")];
        b.namespaces.clear();
        b.namespaces.insert(
            "y".into(),
            Namespace {
                name: "y".into(),
                labels: Default::default(),
            },
        );
        assert_eq!(
            changes_between(&a, &b),
            [
                Change::NodeAddrs,
                Change::Namespace("x".into()),
                Change::Namespace("y".into())
            ]
        );
        assert!(changes_between(&a, &a).is_empty());
    }
}
