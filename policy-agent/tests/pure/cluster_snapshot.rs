//! The reconcile loop with its kept snapshot, pass by pass, against a from-scratch compile of
//! the same watch caches: over seeded random histories of watch events (changes, deletes,
//! same-name re-creations, namespace relabels, re-lists with lost deletes, invalid and
//! undecodable policies, node address changes, failed writes) the recording enforcer's maps
//! must always mean exactly what a full compile of a snapshot built from scratch means.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use policy_agent::cluster::snapshot;
use policy_agent::cluster::{LoopConfig, Reconciler, Stores};
use policy_agent::compiler::capacity::Capacity;
use policy_agent::compiler::{self, CompilerState, MapContents};
use policy_agent::dataplane::renumber::renumber_onto;
use policy_agent::metrics::{ErrorKind, Health, Metrics};
use policy_testkit::RecordingEnforcer;
use serde_json::json;

const NODE: &str = "n0";

type Key = (String, String);

/// A tiny deterministic generator (xorshift64*), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len() as u64) as usize]
    }
}

#[derive(Default)]
struct Cluster {
    pods: Writer<DeserializeGuard<core::Pod>>,
    namespaces: Writer<DeserializeGuard<core::Namespace>>,
    policies: Writer<DeserializeGuard<net::NetworkPolicy>>,
    pod_objs: BTreeMap<Key, DeserializeGuard<core::Pod>>,
    rv: u64,
}

impl Cluster {
    fn stores(&self) -> Stores {
        Stores {
            pods: self.pods.as_reader(),
            namespaces: self.namespaces.as_reader(),
            policies: self.policies.as_reader(),
        }
    }

    fn meta(&mut self, ns: Option<&str>, name: &str, uid: u64) -> serde_json::Value {
        self.rv += 1;
        let mut m =
            json!({"name": name, "resourceVersion": self.rv.to_string(), "uid": format!("u{uid}")});
        if let Some(ns) = ns {
            m["namespace"] = json!(ns);
        }
        m
    }

    fn pod(&mut self, ns: &str, name: &str, app: &str, ip: &str, node: &str, uid: u64) {
        let mut m = self.meta(Some(ns), name, uid);
        m["labels"] = json!({"app": app});
        let port = if app == "a" { 8080 } else { 80 };
        let obj = DeserializeGuard(Ok(serde_json::from_value::<core::Pod>(json!({
            "metadata": m,
            "spec": {"nodeName": node,
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()));
        self.pods.apply_watcher_event(&Event::Apply(obj.clone()));
        self.pod_objs.insert((ns.into(), name.into()), obj);
    }

    fn delete_pod(&mut self, ns: &str, name: &str) {
        if let Some(o) = self.pod_objs.remove(&(ns.into(), name.into())) {
            self.pods.apply_watcher_event(&Event::Delete(o));
        }
    }

    /// Pods re-listed after a dropped watch; `lose`: one deleted meanwhile, never seen.
    fn relist_pods(&mut self, lose: Option<usize>) {
        if let Some(i) = lose
            && !self.pod_objs.is_empty()
        {
            let k = self
                .pod_objs
                .keys()
                .nth(i % self.pod_objs.len())
                .cloned()
                .unwrap();
            self.pod_objs.remove(&k);
        }
        self.pods.apply_watcher_event(&Event::Init);
        for o in self.pod_objs.values() {
            self.pods.apply_watcher_event(&Event::InitApply(o.clone()));
        }
        self.pods.apply_watcher_event(&Event::InitDone);
    }

    fn namespace(&mut self, name: &str, team: Option<&str>) {
        let mut m = self.meta(None, name, 0);
        if let Some(t) = team {
            m["labels"] = json!({"team": t});
        }
        let obj = serde_json::from_value::<core::Namespace>(json!({"metadata": m})).unwrap();
        self.namespaces
            .apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(obj))));
    }

    fn policy(&mut self, ns: &str, name: &str, variant: u64) {
        let m = self.meta(Some(ns), name, 0);
        let spec = match variant {
            0 => json!({"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "t0"}},
                                               "podSelector": {"matchLabels": {"app": "b"}}}],
                                     "ports": [{"port": "http"}]}]}),
            1 => json!({"podSelector": {}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "198.19.0.0/16", "except": ["198.19.1.0/24"]}},
                                           {"podSelector": {"matchLabels": {"app": "a"}}}]}]}),
            2 => json!({"podSelector": {"matchLabels": {"app": "b"}},
                        "ingress": [{"ports": [{"port": 70000}]}, {"from": [{"podSelector": {}}]}]}),
            _ => json!({"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        };
        let obj = if variant == 4 {
            DeserializeGuard(Err(InvalidObject {
                error: "spec.ingress: invalid type: string, expected a sequence".into(),
                metadata: serde_json::from_value(m).unwrap(),
            }))
        } else {
            DeserializeGuard(Ok(serde_json::from_value::<net::NetworkPolicy>(
                json!({"metadata": m, "spec": spec}),
            )
            .unwrap()))
        };
        self.policies.apply_watcher_event(&Event::Apply(obj));
    }

    fn delete_policy(&mut self, ns: &str, name: &str) {
        let obj = serde_json::from_value::<net::NetworkPolicy>(
            json!({"metadata": {"namespace": ns, "name": name}}),
        )
        .unwrap();
        self.policies
            .apply_watcher_event(&Event::Delete(DeserializeGuard(Ok(obj))));
    }
}

struct Loop {
    reconciler: Reconciler<RecordingEnforcer>,
    enforcer: RecordingEnforcer,
    metrics: Arc<Metrics>,
}

impl Loop {
    fn new(capacity: Capacity) -> Self {
        let enforcer = RecordingEnforcer::new();
        enforcer.state().lock().unwrap().node_addrs = vec!["198.18.255.254".parse().unwrap()];
        let metrics = Arc::new(Metrics::new());
        let mut cfg = LoopConfig::new(NODE);
        cfg.capacity = capacity;
        let reconciler = Reconciler::new(
            cfg,
            enforcer.clone(),
            metrics.clone(),
            Arc::new(Health::new(Duration::from_secs(60))),
            None,
        );
        Loop {
            reconciler,
            enforcer,
            metrics,
        }
    }

    fn kernel(&self) -> MapContents {
        self.enforcer.state().lock().unwrap().kernel.clone()
    }

    /// The maps must mean what a full compile of a from-scratch snapshot means.
    fn assert_programmed(&self, c: &Cluster, what: &str) {
        let addrs = self.enforcer.state().lock().unwrap().node_addrs.clone();
        let snap = snapshot::build(&c.stores(), NODE, addrs).snapshot;
        let fresh = compiler::compile(&snap, &mut CompilerState::new());
        let kernel = self.kernel();
        assert_eq!(renumber_onto(&kernel, &fresh), kernel, "{what}");
    }
}

fn run_seed(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut c = Cluster::default();
    c.namespace("ns0", Some("t0"));
    c.namespace("ns1", None);
    let mut uid = 1;
    for i in 0..6 {
        let (ns, ns_i) = if i % 2 == 0 { ("ns0", 0) } else { ("ns1", 1) };
        let app = rng.pick(&["a", "b", "c"]);
        let ip = format!("198.18.{}.1", ns_i * 8 + i);
        c.pod(ns, &format!("p{i}"), app, &ip, NODE, i);
    }
    c.policy("ns0", "np0", 0);
    let mut l = Loop::new(Capacity::default());
    assert!(l.reconciler.pass_now(&c.stores()));
    l.assert_programmed(&c, &format!("seed {seed} first pass"));
    for step in 0..40 {
        // A few events per pass (the loop coalesces bursts).
        for _ in 0..=rng.below(3) {
            let ns_i = rng.below(3);
            let ns = ["ns0", "ns1", "ns2"][ns_i as usize];
            let name_i = rng.below(8);
            let name = format!("p{name_i}");
            // Each pod has addresses of its own (two to move between): shared addresses
            // leave rows no address reaches, which the meaning check cannot pair up.
            let ip = format!("198.18.{}.{}", ns_i * 8 + name_i, rng.below(2) + 1);
            match rng.below(10) {
                0..=2 => {
                    let app = rng.pick(&["a", "b", "c"]);
                    let node = rng.pick(&[NODE, "n1"]);
                    c.pod(ns, &name, app, &ip, node, uid);
                }
                3 => {
                    // Deleted and created again under the same name: a new uid.
                    c.delete_pod(ns, &name);
                    uid += 1;
                    c.pod(ns, &name, rng.pick(&["a", "b"]), &ip, NODE, uid);
                }
                4 => c.delete_pod(ns, &name),
                5 => c.namespace(ns, [Some("t0"), Some("t1"), None][rng.below(3) as usize]),
                6 => c.policy(ns, &format!("np{}", rng.below(3)), rng.below(5)),
                7 => c.delete_policy(ns, &format!("np{}", rng.below(3))),
                8 => {
                    let lose = (rng.below(2) == 0).then(|| rng.below(16) as usize);
                    c.relist_pods(lose);
                }
                _ => {
                    let last = 250 + rng.below(2) as u8;
                    l.enforcer.state().lock().unwrap().node_addrs =
                        vec![format!("198.18.255.{last}").parse().unwrap()];
                }
            }
        }
        if rng.below(8) == 0 {
            // A failed write: the next pass repairs.
            l.enforcer.state().lock().unwrap().fail_applies = 1;
            if !l.reconciler.pass_now(&c.stores()) {
                assert!(
                    l.reconciler.pass_now(&c.stores()),
                    "repair after a failed write"
                );
            }
            // Nothing to write leaves the injected failure unused.
            l.enforcer.state().lock().unwrap().fail_applies = 0;
        } else {
            assert!(l.reconciler.pass_now(&c.stores()));
        }
        l.assert_programmed(&c, &format!("seed {seed} step {step}"));
    }
    assert_eq!(l.metrics.error_count(ErrorKind::CompileMismatch), 0);
}

#[test]
fn reconcile_kept_snapshot_programs_what_a_full_compile_does() {
    for seed in 0..40 {
        run_seed(seed);
    }
}

#[test]
fn reconcile_kept_snapshot_recovers_from_map_full() {
    let mut c = Cluster::default();
    for ns in ["ns0", "ns1", "ns2", "ns3"] {
        c.namespace(ns, None);
    }
    // web admits app=b pods of every namespace: one RULES entry per peer identity.
    c.policy("ns0", "np0", 3);
    c.pod("ns0", "web", "a", "198.18.0.1", NODE, 1);
    c.pod("ns1", "c1", "b", "198.18.0.2", "n1", 2);
    let mut l = Loop::new(Capacity {
        rules: 2,
        ..Capacity::default()
    });
    assert!(l.reconciler.pass_now(&c.stores()));
    l.assert_programmed(&c, "fits");
    // More peer identities than RULES holds: fitted, fail-closed.
    c.pod("ns2", "c2", "b", "198.18.0.3", "n1", 3);
    c.pod("ns3", "c3", "b", "198.18.0.4", "n1", 4);
    assert!(l.reconciler.pass_now(&c.stores()));
    assert!(l.metrics.error_count(ErrorKind::MapFull) > 0);
    // Fits again: the maps hold the whole compile again, then follow single changes.
    c.delete_pod("ns2", "c2");
    assert!(l.reconciler.pass_now(&c.stores()));
    l.assert_programmed(&c, "fits again");
    c.pod("ns1", "c1", "b", "198.18.0.9", "n1", 2);
    assert!(l.reconciler.pass_now(&c.stores()));
    l.assert_programmed(&c, "one change after");
}
