//! Property: the incremental engine, fed random change sequences, always holds exactly what
//! a full compile of the current snapshot yields (with the engine's numbering), and the diff
//! it returns is exactly the difference between its previous and new contents.

use crate::compiler_common;

use compiler_common::*;
use policy_agent::compiler::{Change, Engine, MapContents, compile};
use policy_agent::model::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    PutPod(u8, Pod),
    DelPod(u8),
    Relabel(u8, Labels),
    Readdress(u8, u8),
    Move(u8),
    NsTeam(usize, Option<&'static str>),
    PutPolicy(NetworkPolicy),
    DelPolicy(&'static str, u8),
    NodeAddrs(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..14).prop_flat_map(|s| pod(s).prop_map(move |p| Step::PutPod(s, p))),
        1 => (0u8..14).prop_map(Step::DelPod),
        2 => (0u8..14, prop::sample::select(vec!["web", "db", "api"])).prop_map(|(s, a)| Step::Relabel(s, labels(&[("app", a)]))),
        1 => (0u8..14, 0u8..14).prop_map(|(s, t)| Step::Readdress(s, t)),
        1 => (0u8..14).prop_map(Step::Move),
        1 => (0usize..3, prop::option::of(prop::sample::select(vec!["x", "y"]))).prop_map(|(n, t)| Step::NsTeam(n, t)),
        3 => policy().prop_map(Step::PutPolicy),
        1 => (prop::sample::select(vec!["a", "b", "c"]), 0u8..8).prop_map(|(n, i)| Step::DelPolicy(n, i)),
        1 => any::<bool>().prop_map(Step::NodeAddrs),
    ]
}

fn pod_key(snap: &Snapshot, slot: u8) -> Option<ObjectKey> {
    let name = format!("pod{slot}");
    snap.pods.keys().find(|k| k.name == name).cloned()
}

/// Applies a step to the snapshot; returns the changes it made.
fn apply(snap: &mut Snapshot, s: &Step) -> Vec<Change> {
    match s {
        Step::PutPod(slot, p) => {
            let mut out = Vec::new();
            if let Some(k) = pod_key(snap, *slot) {
                snap.pods.remove(&k);
                out.push(Change::Pod(k));
            }
            snap.pods.insert(p.key(), p.clone());
            out.push(Change::Pod(p.key()));
            out
        }
        Step::DelPod(slot) => pod_key(snap, *slot)
            .map(|k| {
                snap.pods.remove(&k);
                vec![Change::Pod(k)]
            })
            .unwrap_or_default(),
        Step::Relabel(slot, l) => pod_key(snap, *slot)
            .map(|k| {
                snap.pods.get_mut(&k).expect("pod").labels = l.clone();
                vec![Change::Pod(k)]
            })
            .unwrap_or_default(),
        Step::Readdress(slot, to) => pod_key(snap, *slot)
            .filter(|k| !snap.pods[k].host_network)
            .map(|k| {
                // Takes over another slot's address (the stale-address case) or a fresh one.
                snap.pods.get_mut(&k).expect("pod").ips =
                    vec![std::net::IpAddr::from([198, 18, 0, to + 1])];
                vec![Change::Pod(k)]
            })
            .unwrap_or_default(),
        Step::Move(slot) => pod_key(snap, *slot)
            .map(|k| {
                let p = snap.pods.get_mut(&k).expect("pod");
                p.node = Some(if p.node.as_deref() == Some("n1") {
                    "n2".into()
                } else {
                    "n1".into()
                });
                vec![Change::Pod(k)]
            })
            .unwrap_or_default(),
        Step::NsTeam(n, team) => {
            let name = ["a", "b", "c"][*n];
            let ns = snap.namespaces.get_mut(name).expect("ns");
            match team {
                Some(t) => ns.labels.insert("team".into(), t.to_string()),
                None => ns.labels.remove("team"),
            };
            vec![Change::Namespace(name.into())]
        }
        Step::PutPolicy(p) => {
            snap.policies.insert(p.key(), p.clone());
            vec![Change::Policy(p.key())]
        }
        Step::DelPolicy(ns, i) => {
            let k = ObjectKey::new(*ns, format!("p{i}"));
            snap.policies.remove(&k);
            vec![Change::Policy(k)]
        }
        Step::NodeAddrs(extra) => {
            snap.node_addrs = vec![ip(NODE_V4), ip(NODE_V6)];
            if *extra {
                snap.node_addrs.push(ip("198.18.0.3"));
            }
            vec![Change::NodeAddrs]
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full(start in snapshot(10, 6), steps in prop::collection::vec(step(), 1..25), node in prop::sample::select(NODES.to_vec())) {
        let mut snap = start;
        snap.node = node.into();
        let mut engine = Engine::new(&snap);
        prop_assert_eq!(engine.contents(), &compile(&snap, &mut engine.numbers().clone()));
        for s in &steps {
            let changes = apply(&mut snap, s);
            let before = engine.contents().clone();
            let diff = if changes.len() == 1 { engine.apply(&snap, &changes[0]) } else { engine.apply_all(&snap, &changes) };
            let full = compile(&snap, &mut engine.numbers().clone());
            prop_assert_eq!(engine.contents(), &full, "after {:?}", s);
            prop_assert_eq!(&diff, &MapContents::diff(&before, &full), "diff of {:?}", s);
            let mut replay = before;
            diff.apply(&mut replay);
            prop_assert_eq!(&replay, &full);
        }
    }
}

/// Every decision the kernel can make for `snap`'s addresses (pods, the node, externals).
fn decisions(maps: &MapContents, snap: &Snapshot) -> Vec<Option<policy_common::Reason>> {
    use policy_agent::kernel_model::KernelModel;
    use policy_common::Direction;
    use policy_common::proto::{TCP, UDP};
    let km = KernelModel::new(maps);
    let mut addrs: Vec<std::net::IpAddr> = snap.pods.values().flat_map(|p| p.ips.clone()).collect();
    addrs.extend(
        EXTERNAL
            .iter()
            .chain([NODE_V4, NODE_V6].iter())
            .map(|a| ip(a)),
    );
    let mut out = Vec::new();
    for local in &addrs {
        for peer in &addrs {
            for dir in [Direction::Ingress, Direction::Egress] {
                for (proto, port) in [(TCP, 80), (TCP, 8080), (UDP, 53)] {
                    out.push(km.decide_at(*local, dir, *peer, proto, port));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Cluster mode writes the engine's diffs translated into the kernel's numbering (the
    /// renaming chosen by one whole write onto an earlier agent's maps): the kernel stays a
    /// renaming of the engine's contents, decision for decision and entry for entry.
    #[test]
    fn translated_engine_diffs_keep_the_kernel_a_renaming(
        earlier in snapshot(10, 6),
        start in snapshot(10, 6),
        steps in prop::collection::vec(step(), 1..20),
        node in prop::sample::select(NODES.to_vec()),
    ) {
        use policy_agent::compiler::CompilerState;
        use policy_agent::dataplane::renumber_with;
        let mut snap = start;
        snap.node = node.into();
        let mut earlier = earlier;
        earlier.node = snap.node.clone();
        // What an earlier agent left, in its own numbering.
        let old = compile(&earlier, &mut CompilerState::new());
        let mut engine = Engine::new(&snap);
        let (mut kernel, mut numbering) = renumber_with(&old, engine.contents());
        prop_assert_eq!(decisions(&kernel, &snap), decisions(engine.contents(), &snap));
        for s in &steps {
            let changes = apply(&mut snap, s);
            let diff = engine.apply_all(&snap, &changes);
            let translated = numbering.translate(&diff);
            prop_assert_eq!(translated.len(), diff.len());
            translated.apply(&mut kernel);
            prop_assert_eq!(kernel.sizes(), engine.contents().sizes(), "after {:?}", s);
            prop_assert_eq!(
                decisions(&kernel, &snap),
                decisions(engine.contents(), &snap),
                "after {:?}",
                s
            );
        }
    }
}

/// Numbers stay put: one pod joining costs its own entries, not a rewrite.
#[test]
fn a_new_peer_pod_adds_rows_without_renumbering() {
    let mut snap = Snapshot {
        node: "n1".into(),
        ..Default::default()
    };
    for (i, app) in ["web", "db"].iter().enumerate() {
        let p = Pod {
            namespace: "a".into(),
            name: format!("pod{i}"),
            labels: labels(&[("app", app)]),
            ips: vec![std::net::IpAddr::from([198, 18, 0, i as u8 + 1])],
            ports: vec![],
            host_network: false,
            node: Some("n1".into()),
        };
        snap.pods.insert(p.key(), p);
    }
    let pol = NetworkPolicy {
        namespace: "a".into(),
        name: "p".into(),
        pod_selector: sel(&[("app", "db")]),
        ingress_isolation: true,
        egress_isolation: false,
        ingress: vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: None,
                pods: Some(sel(&[("app", "web")])),
            }]),
            ports: vec![],
        }],
        egress: vec![],
        declared: None,
    };
    snap.policies.insert(pol.key(), pol);
    let mut engine = Engine::new(&snap);
    let p = Pod {
        namespace: "a".into(),
        name: "pod9".into(),
        labels: labels(&[("app", "web"), ("v", "2")]),
        ips: vec![ip("198.18.0.9")],
        ports: vec![],
        host_network: false,
        node: Some("n2".into()),
    };
    snap.pods.insert(p.key(), p.clone());
    let d = engine.apply(&snap, &Change::Pod(p.key()));
    // One IPCACHE entry and one RULES row; the endpoint keeps its policy-set.
    assert_eq!(
        (d.ipcache.upserts.len(), d.rules.upserts.len(), d.len()),
        (1, 1, 2),
        "{d:?}"
    );
}

/// Full compiles that keep their state between changes (how the standalone agent runs) stay
/// semantically equal to a fresh compile, whatever numbers they reuse or pass on.
fn same_decisions(a: &MapContents, b: &MapContents, snap: &Snapshot) -> Result<(), TestCaseError> {
    use policy_agent::kernel_model::KernelModel;
    use policy_common::Direction;
    let (ka, kb) = (KernelModel::new(a), KernelModel::new(b));
    let mut peers: Vec<std::net::IpAddr> = snap
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    peers.extend(EXTERNAL.iter().map(|s| ip(s)));
    prop_assert_eq!(a.endpoints.len(), b.endpoints.len());
    for k in a.endpoints.keys() {
        let local = if let Some(o) = k.addr.v4_octets() {
            std::net::IpAddr::from(o)
        } else {
            std::net::IpAddr::from(k.addr.octets())
        };
        for peer in &peers {
            for dir in Direction::ALL {
                for (proto, port) in [
                    (6u8, 80u16),
                    (6, 8080),
                    (17, 53),
                    (17, 1000),
                    (132, 1050),
                    (1, 0),
                ] {
                    let (x, y) = (
                        ka.decide_at(local, dir, *peer, proto, port),
                        kb.decide_at(local, dir, *peer, proto, port),
                    );
                    prop_assert_eq!(
                        x.map(|r| r.is_allow()),
                        y.map(|r| r.is_allow()),
                        "{} {:?} {} {}/{}",
                        local,
                        dir,
                        peer,
                        proto,
                        port
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stateful_full_compiles_decide_like_fresh_ones(start in snapshot(10, 6), steps in prop::collection::vec(step(), 1..12)) {
        let mut snap = start;
        let mut persist = policy_agent::compiler::CompilerState::new();
        let _ = compile(&snap, &mut persist);
        for s in &steps {
            apply(&mut snap, s);
            let kept = compile(&snap, &mut persist);
            let fresh = compile(&snap, &mut policy_agent::compiler::CompilerState::new());
            same_decisions(&kept, &fresh, &snap)?;
        }
    }
}
