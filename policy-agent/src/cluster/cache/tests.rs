//! The kept snapshot against a from-scratch build of the same stores, over scripted and
//! random histories of watch events: same snapshot, same problems, same change set as
//! `changes_between`, and an engine fed its changes that equals a full compile.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::cluster::reconcile::changes_between;
use crate::cluster::watch::Stores;
use crate::compiler::{self, Engine};

const NODE: &str = "n0";

type Key = (String, String);

/// Three scripted watch caches, and the objects each holds (for re-lists).
struct World {
    pods: Writer<PodObj>,
    namespaces: Writer<NamespaceObj>,
    policies: Writer<PolicyObj>,
    pod_objs: BTreeMap<Key, PodObj>,
    ns_objs: BTreeMap<Key, NamespaceObj>,
    policy_objs: BTreeMap<Key, PolicyObj>,
    rv: u64,
    uid: u64,
}

/// The cache under test beside the reference: the last from-scratch snapshot and an engine.
struct Check {
    cache: SnapshotCache,
    prev: Option<Snapshot>,
    engine: Option<Engine>,
    node_addrs: Vec<IpAddr>,
}

fn meta(ns: Option<&str>, name: &str, rv: u64, uid: u64) -> serde_json::Value {
    let mut m =
        json!({"name": name, "resourceVersion": rv.to_string(), "uid": format!("uid-{uid}")});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn malformed<K>(m: serde_json::Value) -> DeserializeGuard<K> {
    DeserializeGuard(Err(kube::core::error_boundary::InvalidObject {
        error: "spec: invalid type: string \"x\", expected a sequence".into(),
        metadata: serde_json::from_value(m).unwrap(),
    }))
}

impl World {
    fn new() -> Self {
        World {
            pods: Writer::default(),
            namespaces: Writer::default(),
            policies: Writer::default(),
            pod_objs: BTreeMap::new(),
            ns_objs: BTreeMap::new(),
            policy_objs: BTreeMap::new(),
            rv: 0,
            uid: 0,
        }
    }

    fn stores(&self) -> Stores {
        Stores {
            pods: self.pods.as_reader(),
            namespaces: self.namespaces.as_reader(),
            policies: self.policies.as_reader(),
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// The uid of the object under `key` now, or a new one (`recreate` always a new one).
    fn uid_for<K>(
        &mut self,
        objs: &BTreeMap<Key, DeserializeGuard<K>>,
        key: &Key,
        recreate: bool,
    ) -> u64
    where
        K: kube::Resource,
    {
        let cur = objs
            .get(key)
            .and_then(|o| o.meta().uid.as_deref()?.strip_prefix("uid-")?.parse().ok());
        match cur {
            Some(u) if !recreate => u,
            _ => {
                self.uid += 1;
                self.uid
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pod(
        &mut self,
        ns: &str,
        name: &str,
        app: &str,
        ip: Option<&str>,
        node: &str,
        recreate: bool,
    ) {
        let spec = PodSpec {
            app: app.into(),
            ip: ip.map(Into::into),
            node: node.into(),
            ..Default::default()
        };
        self.pod_spec(ns, name, &spec, recreate);
    }

    fn pod_spec(&mut self, ns: &str, name: &str, s: &PodSpec, recreate: bool) {
        let key = (ns.to_owned(), name.to_owned());
        let uid = self.uid_for(&self.pod_objs.clone(), &key, recreate);
        let rv = self.next_rv();
        let m = meta(Some(ns), name, rv, uid);
        let obj = if s.malformed {
            malformed(m)
        } else {
            let mut m = m;
            m["labels"] = json!({"app": s.app});
            let port = if s.app == "a" { 8080 } else { 80 };
            let mut status = json!({"phase": if s.terminal { "Succeeded" } else { "Running" }});
            if let Some(ip) = &s.ip {
                status["podIP"] = json!(ip);
                status["podIPs"] = json!([{"ip": ip}]);
            }
            DeserializeGuard(Ok(serde_json::from_value::<core::Pod>(json!({
                "metadata": m,
                "spec": {"nodeName": s.node, "hostNetwork": s.host,
                         "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
                "status": status,
            }))
            .unwrap()))
        };
        self.pods.apply_watcher_event(&Event::Apply(obj.clone()));
        self.pod_objs.insert(key, obj);
    }

    fn namespace(&mut self, name: &str, team: Option<&str>, recreate: bool) {
        let key = (String::new(), name.to_owned());
        let uid = self.uid_for(&self.ns_objs.clone(), &key, recreate);
        let rv = self.next_rv();
        let mut m = meta(None, name, rv, uid);
        if let Some(t) = team {
            m["labels"] = json!({"team": t});
        }
        let obj = DeserializeGuard(Ok(serde_json::from_value::<core::Namespace>(
            json!({"metadata": m}),
        )
        .unwrap()));
        self.namespaces
            .apply_watcher_event(&Event::Apply(obj.clone()));
        self.ns_objs.insert(key, obj);
    }

    /// Variants: 0 ingress from pods of team namespaces on the named port, 1 egress to an
    /// ipBlock and own-namespace pods, 2 an invalid port (a problem), 3 does not decode,
    /// 4 ingress isolation only (deny all), 5 ingress from app=b pods of every namespace.
    fn policy(&mut self, ns: &str, name: &str, variant: u8) {
        let key = (ns.to_owned(), name.to_owned());
        let uid = self.uid_for(&self.policy_objs.clone(), &key, false);
        let rv = self.next_rv();
        let m = meta(Some(ns), name, rv, uid);
        let spec = match variant % 6 {
            0 => json!({"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "t0"}},
                                               "podSelector": {"matchLabels": {"app": "b"}}}],
                                     "ports": [{"port": "http"}]}]}),
            1 => json!({"podSelector": {}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "198.19.0.0/16", "except": ["198.19.1.0/24"]}},
                                           {"podSelector": {"matchLabels": {"app": "a"}}}]}]}),
            2 => json!({"podSelector": {"matchLabels": {"app": "b"}},
                        "ingress": [{"ports": [{"port": 70000}]}, {"from": [{"podSelector": {}}]}]}),
            4 => json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}),
            _ => json!({"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        };
        let obj = if variant % 6 == 3 {
            malformed(m)
        } else {
            DeserializeGuard(Ok(serde_json::from_value::<net::NetworkPolicy>(
                json!({"metadata": m, "spec": spec}),
            )
            .unwrap()))
        };
        self.policies
            .apply_watcher_event(&Event::Apply(obj.clone()));
        self.policy_objs.insert(key, obj);
    }

    fn delete(&mut self, kind: u8, key: &Key) {
        match kind % 3 {
            0 => {
                if let Some(o) = self.pod_objs.remove(key) {
                    self.pods.apply_watcher_event(&Event::Delete(o));
                }
            }
            1 => {
                if let Some(o) = self.ns_objs.remove(key) {
                    self.namespaces.apply_watcher_event(&Event::Delete(o));
                }
            }
            _ => {
                if let Some(o) = self.policy_objs.remove(key) {
                    self.policies.apply_watcher_event(&Event::Delete(o));
                }
            }
        }
    }

    /// The same version applied again (a new `Arc` in the store, same resourceVersion).
    fn reapply(&mut self, kind: u8, idx: usize) {
        match kind % 3 {
            0 => reapply(&mut self.pods, &self.pod_objs, idx),
            1 => reapply(&mut self.namespaces, &self.ns_objs, idx),
            _ => reapply(&mut self.policies, &self.policy_objs, idx),
        }
    }

    /// A re-list (after 410 Gone or a dropped watch): every object again with its version;
    /// `lose`: one object deleted while the watch was down (its delete event never seen).
    fn relist(&mut self, kind: u8, lose: Option<usize>) {
        match kind % 3 {
            0 => relist(&mut self.pods, &mut self.pod_objs, lose),
            1 => relist(&mut self.namespaces, &mut self.ns_objs, lose),
            _ => relist(&mut self.policies, &mut self.policy_objs, lose),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct PodSpec {
    app: String,
    ip: Option<String>,
    node: String,
    host: bool,
    terminal: bool,
    malformed: bool,
}

fn reapply<G>(w: &mut Writer<G>, objs: &BTreeMap<Key, G>, idx: usize)
where
    G: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    if let Some(o) = objs.values().nth(idx % objs.len().max(1)) {
        w.apply_watcher_event(&Event::Apply(o.clone()));
    }
}

fn relist<G>(w: &mut Writer<G>, objs: &mut BTreeMap<Key, G>, lose: Option<usize>)
where
    G: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    if let Some(i) = lose
        && !objs.is_empty()
    {
        let k = objs.keys().nth(i % objs.len()).cloned();
        k.map(|k| objs.remove(&k));
    }
    w.apply_watcher_event(&Event::Init);
    for o in objs.values() {
        w.apply_watcher_event(&Event::InitApply(o.clone()));
    }
    w.apply_watcher_event(&Event::InitDone);
}

fn sorted(changes: &[Change]) -> Vec<String> {
    let mut v: Vec<String> = changes.iter().map(|c| format!("{c:?}")).collect();
    v.sort();
    v
}

impl Check {
    fn new() -> Self {
        Check {
            cache: SnapshotCache::new(NODE),
            prev: None,
            engine: None,
            node_addrs: vec!["198.18.255.254".parse().unwrap()],
        }
    }

    /// One pass: the cache must equal a from-scratch build, report exactly the objects
    /// `changes_between` finds, and drive the engine to a full compile's contents.
    fn pass(&mut self, w: &World) -> Update {
        let objects = Objects::read(&w.stores());
        let up = self.cache.update(&objects, self.node_addrs.clone());
        let built = snapshot::build_from(&objects, NODE, self.node_addrs.clone());
        assert_eq!(self.cache.snapshot(), &built.snapshot, "kept snapshot");
        assert_eq!(self.cache.problems(), &built.policy_problems, "problems");
        assert_eq!(self.cache.counts(), built.counts);
        match &self.prev {
            Some(prev) => assert_eq!(
                sorted(&up.changes),
                sorted(&changes_between(prev, &built.snapshot)),
                "change set"
            ),
            None => {
                // The first pass names every object.
                let n = built.snapshot.pods.len()
                    + built.snapshot.namespaces.len()
                    + built.snapshot.policies.len()
                    + 1;
                assert_eq!(up.changes.len(), n);
            }
        }
        match &mut self.engine {
            None => self.engine = Some(Engine::new(self.cache.snapshot())),
            Some(engine) => {
                let mut before = engine.contents().clone();
                let diff = engine.apply_all(self.cache.snapshot(), &up.changes);
                diff.apply(&mut before);
                assert_eq!(
                    &before,
                    engine.contents(),
                    "the engine's diff is its change"
                );
                let full = compiler::compile(&built.snapshot, &mut engine.numbers().clone());
                assert_eq!(&full, engine.contents(), "incremental == full compile");
            }
        }
        self.prev = Some(built.snapshot);
        up
    }
}

/// A small cluster: namespaces a (team t0) and b, pods on this node and another, policies.
fn seeded() -> World {
    let mut w = World::new();
    w.namespace("a", Some("t0"), false);
    w.namespace("b", None, false);
    w.pod("a", "web", "a", Some("198.18.0.1"), NODE, false);
    w.pod("a", "client", "b", Some("198.18.0.2"), NODE, false);
    w.pod("b", "client", "b", Some("198.18.0.3"), "n1", false);
    w.pod("b", "server", "a", Some("198.18.0.4"), NODE, false);
    w.policy("a", "web", 0);
    w.policy("b", "any-b", 5);
    w.policy("b", "bad-port", 2);
    w
}

#[test]
fn cache_unchanged_stores_convert_nothing() {
    let w = seeded();
    let mut c = Check::new();
    let first = c.pass(&w);
    assert_eq!(first.converted, 9);
    let again = c.pass(&w);
    assert_eq!(again, Update::default());
}

#[test]
fn cache_relist_with_same_versions_converts_nothing() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    for kind in 0..3 {
        w.relist(kind, None);
    }
    let up = c.pass(&w);
    assert_eq!(
        up,
        Update::default(),
        "same versions re-listed: nothing to redo"
    );
}

#[test]
fn cache_relist_repairs_a_lost_delete() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    // pod a/client (index 0 in key order) was deleted while the watch was down.
    w.relist(0, Some(0));
    let up = c.pass(&w);
    assert_eq!(up.changes, vec![Change::Pod(ObjectKey::new("a", "client"))]);
    assert_eq!(up.converted, 0);
    assert!(
        !c.cache
            .snapshot()
            .pods
            .contains_key(&ObjectKey::new("a", "client"))
    );
}

#[test]
fn cache_one_pod_change_converts_one_object() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    w.pod("a", "web", "a", Some("198.18.0.9"), NODE, false);
    let up = c.pass(&w);
    assert_eq!(up.converted, 1);
    assert_eq!(up.changes, vec![Change::Pod(ObjectKey::new("a", "web"))]);
    let web = &c.cache.snapshot().pods[&ObjectKey::new("a", "web")];
    assert_eq!(web.ips, vec!["198.18.0.9".parse::<IpAddr>().unwrap()]);
}

#[test]
fn cache_pod_recreated_with_new_uid_is_seen() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    // Deleted and created again under the same name before the loop ran.
    w.delete(0, &("a".into(), "client".into()));
    w.pod("a", "client", "a", Some("198.18.0.7"), NODE, true);
    let up = c.pass(&w);
    assert_eq!(up.changes, vec![Change::Pod(ObjectKey::new("a", "client"))]);
    // Recreated identical (same labels and address): nothing for the compiler.
    w.delete(0, &("a".into(), "client".into()));
    w.pod("a", "client", "a", Some("198.18.0.7"), NODE, true);
    let up = c.pass(&w);
    assert_eq!(up.converted, 1);
    assert!(up.changes.is_empty());
}

#[test]
fn cache_namespace_label_change_reaches_its_pods() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    // b joins team t0: its app=b pods become peers of policy a/web.
    w.namespace("b", Some("t0"), false);
    let up = c.pass(&w);
    assert_eq!(up.changes, vec![Change::Namespace("b".into())]);
}

#[test]
fn cache_malformed_policy_and_problems_follow_versions() {
    let mut w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    assert!(
        c.cache
            .problems()
            .contains_key(&ObjectKey::new("b", "bad-port"))
    );
    w.policy("b", "bad-port", 5); // fixed
    c.pass(&w);
    assert!(c.cache.problems().is_empty());
    w.policy("a", "web", 3); // no longer decodes: enforced fail-closed, with a problem
    c.pass(&w);
    let pp = &c.cache.problems()[&ObjectKey::new("a", "web")];
    assert!(pp.malformed);
    w.delete(2, &("a".into(), "web".into()));
    c.pass(&w);
    assert!(c.cache.problems().is_empty());
}

#[test]
fn cache_node_address_change_is_a_change() {
    let w = seeded();
    let mut c = Check::new();
    c.pass(&w);
    c.node_addrs = vec!["198.18.255.253".parse().unwrap()];
    let up = c.pass(&w);
    assert_eq!(up.changes, vec![Change::NodeAddrs]);
}

#[derive(Clone, Debug)]
enum Op {
    Pod {
        ns: u8,
        name: u8,
        app: u8,
        ip: Option<u8>,
        node: u8,
        host: bool,
        terminal: bool,
        malformed: bool,
        recreate: bool,
    },
    Namespace {
        ns: u8,
        team: Option<u8>,
        recreate: bool,
    },
    Policy {
        ns: u8,
        name: u8,
        variant: u8,
    },
    Delete {
        kind: u8,
        ns: u8,
        name: u8,
    },
    Reapply {
        kind: u8,
        idx: u8,
    },
    Relist {
        kind: u8,
        lose: Option<u8>,
    },
    NodeAddr(u8),
    Pass,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3u8, 0..5u8, 0..3u8, proptest::option::weighted(0.9, 0..6u8), 0..2u8,
              proptest::bool::weighted(0.1), proptest::bool::weighted(0.1),
              proptest::bool::weighted(0.05), proptest::bool::weighted(0.2))
            .prop_map(|(ns, name, app, ip, node, host, terminal, malformed, recreate)| Op::Pod {
                ns, name, app, ip, node, host, terminal, malformed, recreate
            }),
        2 => (0..3u8, proptest::option::of(0..2u8), proptest::bool::weighted(0.2))
            .prop_map(|(ns, team, recreate)| Op::Namespace { ns, team, recreate }),
        2 => (0..3u8, 0..3u8, 0..6u8).prop_map(|(ns, name, variant)| Op::Policy { ns, name, variant }),
        3 => (0..3u8, 0..3u8, 0..5u8).prop_map(|(kind, ns, name)| Op::Delete { kind, ns, name }),
        1 => (0..3u8, any::<u8>()).prop_map(|(kind, idx)| Op::Reapply { kind, idx }),
        1 => (0..3u8, proptest::option::of(any::<u8>())).prop_map(|(kind, lose)| Op::Relist { kind, lose }),
        1 => (0..2u8).prop_map(Op::NodeAddr),
        4 => Just(Op::Pass),
    ]
}

fn run(ops: &[Op]) {
    let mut w = World::new();
    let mut c = Check::new();
    c.pass(&w);
    for op in ops {
        match *op {
            Op::Pod {
                ns,
                name,
                app,
                ip,
                node,
                host,
                terminal,
                malformed,
                recreate,
            } => {
                let spec = PodSpec {
                    app: ["a", "b", "c"][usize::from(app)].into(),
                    ip: ip.map(|i| format!("198.18.0.{}", i + 1)),
                    node: format!("n{node}"),
                    host,
                    terminal,
                    malformed,
                };
                w.pod_spec(&format!("ns{ns}"), &format!("p{name}"), &spec, recreate);
            }
            Op::Namespace { ns, team, recreate } => {
                let team = team.map(|t| format!("t{t}"));
                w.namespace(&format!("ns{ns}"), team.as_deref(), recreate);
            }
            Op::Policy { ns, name, variant } => {
                w.policy(&format!("ns{ns}"), &format!("np{name}"), variant)
            }
            Op::Delete { kind, ns, name } => {
                let key = match kind {
                    0 => (format!("ns{ns}"), format!("p{name}")),
                    1 => (String::new(), format!("ns{ns}")),
                    _ => (format!("ns{ns}"), format!("np{name}")),
                };
                w.delete(kind, &key);
            }
            Op::Reapply { kind, idx } => w.reapply(kind, usize::from(idx)),
            Op::Relist { kind, lose } => w.relist(kind, lose.map(usize::from)),
            Op::NodeAddr(i) => {
                c.node_addrs = vec![format!("198.18.255.{}", 250 + i).parse().unwrap()]
            }
            Op::Pass => {
                c.pass(&w);
            }
        }
    }
    c.pass(&w);
    // Nothing changed since: nothing to convert, nothing to compile.
    assert_eq!(c.pass(&w), Update::default());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn cache_equals_a_from_scratch_build_over_random_histories(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        run(&ops);
    }
}
