//! The manifests a kernel runner hands to the standalone agent describe exactly the objects
//! the simulation judged: reading them back through `convert` gives the same snapshot, for
//! every step of every scenario file.

use std::path::Path;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use policy_agent::convert;
use policy_agent::model::Snapshot;
use policy_testkit::scenario::Plan;
use policy_testkit::scenario::manifests::manifests;

use crate::scenario_common;
use scenario_common::yaml_files;

#[test]
fn manifests_round_trip_to_the_simulated_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let mut files = Vec::new();
    yaml_files(&root.join("scenarios"), &mut files);
    assert!(files.len() >= 10, "scenario files not found: {files:?}");
    let mut steps = 0;
    for f in files {
        let plan = Plan::load(&f).unwrap_or_else(|e| panic!("{e}"));
        for step in &plan.steps {
            steps += 1;
            let mut snap = Snapshot::default();
            plan.topology.view_from(0, &mut snap);
            let docs = manifests(&step.state).expect("render");
            // The standalone agent's own loader reads them to the same snapshot.
            let mut loaded = policy_agent::manifests::Manifests::default();
            for m in &docs {
                policy_agent::manifests::load_text(&mut loaded, Path::new(&m.file_name), &m.yaml);
            }
            for problem in &loaded.problems {
                assert!(
                    problem.file.to_string_lossy().starts_with("networkpolicy-"),
                    "{} step {}: {problem}",
                    plan.file,
                    step.index + 1
                );
            }
            let agent_view = loaded.snapshot(&snap.node, snap.node_addrs.clone());
            assert_eq!(
                agent_view,
                step.state.snapshot,
                "{} step {}: agent loader",
                plan.file,
                step.index + 1
            );
            for m in docs {
                let value: serde_json::Value =
                    policy_agent::manifests::yaml::from_str(&m.yaml).expect("yaml");
                match value.get("kind").and_then(|k| k.as_str()) {
                    Some("Namespace") => {
                        let n: core::Namespace = serde_json::from_value(value).expect("namespace");
                        let n = convert::namespace(&n).expect("valid namespace");
                        snap.namespaces.insert(n.name.clone(), n);
                    }
                    Some("Pod") => {
                        let p: core::Pod = serde_json::from_value(value).expect("pod");
                        let p = convert::pod(&p).expect("valid pod");
                        snap.pods.insert(p.key(), p);
                    }
                    Some("NetworkPolicy") => {
                        let np: net::NetworkPolicy = serde_json::from_value(value).expect("policy");
                        let np = convert::network_policy(&np).value;
                        snap.policies.insert(np.key(), np);
                    }
                    other => panic!("{}: unexpected kind {other:?}", m.file_name),
                }
            }
            assert_eq!(
                snap,
                step.state.snapshot,
                "{} step {}",
                plan.file,
                step.index + 1
            );
        }
    }
    assert!(steps > 20);
}
