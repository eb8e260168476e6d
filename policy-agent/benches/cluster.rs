//! `cargo bench -p policy-agent --bench cluster`: the cluster agent's per-change work at
//! 1k and 10k pods — building a model snapshot from the watch caches (the agent never reads
//! single events), finding what changed, the incremental compile, and the map diff — for one
//! pod change, against a full compile of the same snapshot.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use policy_agent::cluster::Stores;
use policy_agent::cluster::reconcile::changes_between;
use policy_agent::cluster::snapshot;
use policy_agent::compiler::{self, CompilerState, Engine, MapContents};
use serde_json::json;

const PODS_PER_NS: usize = 100;
const PODS_PER_NODE: usize = 110;

fn pod(i: usize, generation: usize) -> core::Pod {
    let ns = i / PODS_PER_NS;
    let app = i % 10;
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

fn run(pods: usize) {
    let namespaces = pods.div_ceil(PODS_PER_NS);
    let mut wp = Writer::<DeserializeGuard<core::Pod>>::default();
    let mut wn = Writer::<DeserializeGuard<core::Namespace>>::default();
    let mut wnp = Writer::<DeserializeGuard<net::NetworkPolicy>>::default();
    fill(&mut wp, (0..pods).map(|i| pod(i, 0)));
    fill(
        &mut wn,
        (0..namespaces).map(|n| {
            serde_json::from_value::<core::Namespace>(json!({"metadata": {"name": format!("ns{n}"),
                "labels": {"team": format!("t{}", n % 5)}}}))
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

    let built = snapshot::build(&stores, "n0", node_addrs.clone());
    let snap0 = built.snapshot;
    let mut engine = Engine::new(&snap0);
    let written = engine.contents().clone();

    let t_build = time(5, || snapshot::build(&stores, "n0", node_addrs.clone()));
    let t_full = time(3, || compiler::compile(&snap0, &mut CompilerState::new()));

    // One local pod relabelled: the agent's whole path for it.
    fill(&mut wp, [pod(5, 1)]);
    let t0 = Instant::now();
    let snap1 = snapshot::build(&stores, "n0", node_addrs.clone()).snapshot;
    let t_snap = t0.elapsed();
    let t1 = Instant::now();
    let changes = changes_between(&snap0, &snap1);
    let t_changes = t1.elapsed();
    let t2 = Instant::now();
    engine.apply_all(&snap1, &changes);
    let t_engine = t2.elapsed();
    let t3 = Instant::now();
    let diff = MapContents::diff(&written, engine.contents());
    let t_diff = t3.elapsed();
    println!(
        "{pods:>6} pods {:>5} policies | snapshot build {:>7.2} ms | changes_between {:>6.2} ms ({} change) | \
         incremental {:>6.2} ms | map diff {:>6.2} ms ({} entries) | one change total {:>7.2} ms | full compile {:>7.2} ms",
        namespaces * 10,
        t_build.as_secs_f64() * 1e3,
        t_changes.as_secs_f64() * 1e3,
        changes.len(),
        t_engine.as_secs_f64() * 1e3,
        t_diff.as_secs_f64() * 1e3,
        diff.len(),
        (t_snap + t_changes + t_engine + t_diff).as_secs_f64() * 1e3,
        t_full.as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo test` runs benches with --bench-less args; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    run(1_000);
    if !quick {
        run(10_000);
    }
}
