//! `cargo bench -p policy-agent --bench cluster` (or `cargo xtask bench cluster`): the
//! cluster agent's work for one pod change at 1k and 10k pods (100 and 1k policies), against
//! a full compile of the same snapshot as the baseline.
//!
//! - `from scratch`: what every pass cost before the kept snapshot — converting every cached
//!   object into a new snapshot, comparing it with the last one, the incremental compile,
//!   and copying, fitting and diffing the whole map contents.
//! - `kept snapshot`: the same pass with [`SnapshotCache`] — a walk of the caches converting
//!   only the changed object, the incremental compile, and its own diff.
//! - `loop pass`: one whole [`Reconciler`] pass, end to end, into the recording enforcer.
//! - `kernel renumber`: what the kernel enforcer added per write before (renumbering the
//!   whole contents onto what the kernel maps hold, then diffing), against `translate`:
//!   the engine's diff translated with the renaming kept from one whole write (what it
//!   adds now). Measured apart since the recording enforcer has neither.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use policy_agent::cluster::cache::SnapshotCache;
use policy_agent::cluster::reconcile::changes_between;
use policy_agent::cluster::snapshot::{self, Objects};
use policy_agent::cluster::{LoopConfig, Reconciler, Stores};
use policy_agent::compiler::capacity::{self, Capacity};
use policy_agent::compiler::{self, CompilerState, Engine, MapContents};
use policy_agent::dataplane::renumber::{renumber_onto, renumber_with};
use policy_agent::metrics::{Health, Metrics};
use policy_testkit::RecordingEnforcer;
use serde_json::json;

const PODS_PER_NS: usize = 100;
const PODS_PER_NODE: usize = 110;

fn pod(i: usize, generation: usize) -> core::Pod {
    let ns = i / PODS_PER_NS;
    // A new generation moves the pod to the next app: other policies select it and admit it.
    let app = (i + generation) % 10;
    let ip =
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + 1 + i as u32);
    serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns{ns}"), "name": format!("pod{i}"),
                     "resourceVersion": format!("{generation}"),
                     "labels": {"app": format!("app{app}"), "gen": format!("g{generation}")}},
        "spec": {"nodeName": format!("n{}", i / PODS_PER_NODE),
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    }))
    .expect("pod")
}

fn policy(ns: usize, k: usize) -> net::NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns{ns}"), "name": format!("p{k}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app{}", k % 10)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % 10)}}},
                                  {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 5)}}}],
                         "ports": [{"port": "http"}, {"port": 443}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "198.19.0.0/16", "except": ["198.19.1.0/24"]}}]}],
        },
    }))
    .expect("policy")
}

fn fill<K>(w: &mut Writer<DeserializeGuard<K>>, objs: impl IntoIterator<Item = K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    for o in objs {
        w.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(o))));
    }
}

fn time<R>(n: u32, mut f: impl FnMut() -> R) -> Duration {
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f());
    }
    t0.elapsed() / n
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One timed pass per relabelling of a local pod: median over `rounds`.
struct Rounds {
    rounds: u32,
    next_generation: usize,
}

impl Rounds {
    fn each(
        &mut self,
        wp: &mut Writer<DeserializeGuard<core::Pod>>,
        mut f: impl FnMut() -> Duration,
    ) -> Duration {
        let mut v = Vec::new();
        for _ in 0..self.rounds {
            self.next_generation += 1;
            fill(wp, [pod(5, self.next_generation)]);
            v.push(f());
        }
        median(v)
    }
}

fn run(pods: usize, rounds: u32) {
    let namespaces = pods.div_ceil(PODS_PER_NS);
    let mut wp = Writer::<DeserializeGuard<core::Pod>>::default();
    let mut wn = Writer::<DeserializeGuard<core::Namespace>>::default();
    let mut wnp = Writer::<DeserializeGuard<net::NetworkPolicy>>::default();
    fill(&mut wp, (0..pods).map(|i| pod(i, 0)));
    fill(
        &mut wn,
        (0..namespaces).map(|n| {
            serde_json::from_value::<core::Namespace>(json!({"metadata": {"name": format!("ns{n}"),
                "resourceVersion": "1", "labels": {"team": format!("t{}", n % 5)}}}))
            .expect("ns")
        }),
    );
    fill(
        &mut wnp,
        (0..namespaces).flat_map(|n| (0..10).map(move |k| policy(n, k))),
    );
    let stores = Stores {
        pods: wp.as_reader(),
        namespaces: wn.as_reader(),
        policies: wnp.as_reader(),
    };
    let node_addrs = vec!["198.18.255.254".parse().expect("ip")];
    let cap = Capacity::default();

    let snap0 = snapshot::build(&stores, "n0", node_addrs.clone()).snapshot;
    let t_build = time(3, || snapshot::build(&stores, "n0", node_addrs.clone()));
    let t_full = time(3, || compiler::compile(&snap0, &mut CompilerState::new()));

    // The old loop's pass, from scratch.
    let mut old_engine = Engine::new(&snap0);
    let mut old_written = old_engine.contents().clone();
    let mut old_prev = snap0;
    // The kept snapshot.
    let mut cache = SnapshotCache::new("n0");
    let up = cache.update(&Objects::read(&stores), node_addrs.clone());
    assert_eq!(up.converted, pods + namespaces * 11);
    let mut new_engine = Engine::new(cache.snapshot());
    let mut new_written = new_engine.contents().clone();
    // The whole loop.
    let enforcer = RecordingEnforcer::new();
    enforcer.state().lock().expect("state").node_addrs = node_addrs.clone();
    let mut reconciler = Reconciler::new(
        LoopConfig::new("n0"),
        enforcer.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(60))),
        None,
    );
    assert!(reconciler.pass_now(&stores));

    let mut r = Rounds {
        rounds,
        next_generation: 0,
    };
    let mut diff_entries = 0;
    let t_old = r.each(&mut wp, || {
        let t0 = Instant::now();
        let snap = snapshot::build(&stores, "n0", node_addrs.clone()).snapshot;
        let changes = changes_between(&old_prev, &snap);
        old_engine.apply_all(&snap, &changes);
        let desired = old_engine.contents().clone();
        let fitted = capacity::fit(&desired, cap);
        let diff = MapContents::diff(&old_written, &fitted.contents);
        let t = t0.elapsed();
        diff_entries = diff.len();
        old_written = fitted.contents;
        old_prev = snap;
        t
    });
    let mut t_update = Vec::new();
    let mut converted = 0;
    let mut new_entries = 0;
    let t_new = r.each(&mut wp, || {
        let t0 = Instant::now();
        let up = cache.update(&Objects::read(&stores), node_addrs.clone());
        let t1 = Instant::now();
        let diff = new_engine.apply_all(cache.snapshot(), &up.changes);
        diff.apply(&mut new_written);
        let t = t0.elapsed();
        new_entries = diff.len();
        t_update.push(t1 - t0);
        converted = up.converted;
        t
    });
    let t_update = median(t_update);
    // Same result as from scratch.
    assert!(cache.snapshot() == &snapshot::build(&stores, "n0", node_addrs.clone()).snapshot);
    let full = compiler::compile(cache.snapshot(), &mut new_engine.numbers().clone());
    assert!(&full == new_engine.contents() && &new_written == new_engine.contents());
    let t_loop = r.each(&mut wp, || {
        let t0 = Instant::now();
        assert!(reconciler.pass_now(&stores));
        t0.elapsed()
    });
    let fresh_snap = snapshot::build(&stores, "n0", node_addrs.clone()).snapshot;
    let fresh = compiler::compile(&fresh_snap, &mut CompilerState::new());
    let kernel = enforcer.state().lock().expect("state").kernel.clone();
    assert!(
        MapContents::diff(&kernel, &renumber_onto(&kernel, &fresh)).is_empty(),
        "the loop's maps mean what a full compile means"
    );
    let fits = capacity::fit(new_engine.contents(), cap)
        .overflowed
        .is_empty();
    println!(
        "{pods:>6} pods: map entries {:?}, within capacity: {fits}",
        new_engine.contents().sizes().map(|(n, e, _)| (n, e))
    );
    // What the kernel enforcer adds per write: before, a renumbering of the whole contents
    // and a whole diff; now the engine's diff translated with the renaming kept from one
    // whole write (the diffs' results checked against the engine's contents).
    let t_renumber = time(3, || {
        let target = renumber_onto(&new_written, new_engine.contents());
        MapContents::diff(&new_written, &target)
    });
    let (mut kernel_view, mut numbering) = renumber_with(&new_written, new_engine.contents());
    let t_translate = r.each(&mut wp, || {
        let up = cache.update(&Objects::read(&stores), node_addrs.clone());
        let diff = new_engine.apply_all(cache.snapshot(), &up.changes);
        let t0 = Instant::now();
        let translated = numbering.translate(&diff);
        let t = t0.elapsed();
        translated.apply(&mut kernel_view);
        t
    });
    assert_eq!(kernel_view.sizes(), new_engine.contents().sizes());

    println!(
        "{pods:>6} pods {:>5} policies | full compile {:>7.2} ms | snapshot build {:>7.2} ms | \
         one pod change: from scratch {:>7.2} ms ({:.3}x full) -> kept snapshot {:>6.3} ms ({:.4}x full; \
         cache walk {:.3} ms, {converted} converted, {new_entries} map changes vs {diff_entries} from scratch) | loop pass {:>6.3} ms ({:.4}x full) | \
         kernel renumber {:>6.2} ms -> translate {:>6.4} ms ({:.4}x renumber)",
        namespaces * 10,
        ms(t_full),
        ms(t_build),
        ms(t_old),
        ms(t_old) / ms(t_full),
        ms(t_new),
        ms(t_new) / ms(t_full),
        ms(t_update),
        ms(t_loop),
        ms(t_loop) / ms(t_full),
        ms(t_renumber),
        ms(t_translate),
        ms(t_translate) / ms(t_renumber),
    );
}

fn main() {
    // `cargo test` runs benches without --bench; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        run(1_000, 3);
    } else {
        run(1_000, 21);
        run(10_000, 21);
    }
}
