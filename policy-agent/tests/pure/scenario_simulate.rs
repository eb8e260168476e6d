//! Every scenario file of the project (and ../shared/scenarios when present) passes in
//! simulation; the compiler + kernel model agree with the reference evaluator on every probe;
//! invalid files are reported by file, step and field; the binary's output and exit codes.

use std::path::PathBuf;

use policy_testkit::scenario::report::Counts;
use policy_testkit::scenario::simulate::{KernelModelOracle, ReferenceOracle};
use policy_testkit::scenario::{Oracle, Plan, ScenarioError, run_plan};

use crate::scenario_common;
use scenario_common::{workspace, yaml_files};

/// `scenarios/**` of the workspace, then ../shared/scenarios when it exists.
fn scenario_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&workspace().join("scenarios"), &mut files);
    yaml_files(&workspace().join("../shared/scenarios"), &mut files);
    files
}

/// Every file on `nodes` nodes.
fn load_all_on(nodes: usize) -> Vec<Plan> {
    let files = scenario_files();
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("traps"))
            && files.iter().any(|f| f.to_string_lossy().contains("seed")),
        "the project's scenario files were not found: {files:?}"
    );
    let mut errors = Vec::new();
    let plans: Vec<Plan> = files
        .iter()
        .filter_map(|f| {
            Plan::load_on(f, nodes)
                .map_err(|e| errors.push(e.to_string()))
                .ok()
        })
        .collect();
    assert!(
        errors.is_empty(),
        "invalid scenario files:\n{}",
        errors.join("\n")
    );
    plans
}

fn run(plan: &Plan, oracle: &mut dyn Oracle) -> (Counts, String) {
    let mut out = Vec::new();
    let counts = run_plan(plan, oracle, &mut out).expect("simulation runs");
    (counts, String::from_utf8(out).expect("utf-8 report"))
}

#[test]
fn every_scenario_passes_on_the_compiler_and_kernel_model() {
    every_scenario_passes_on_the_kernel_model_on(1);
}

/// Spread over three nodes, each compiling its own maps: a probe passes when every node it
/// crosses lets it through.
#[test]
fn every_scenario_passes_on_three_nodes_on_the_compiler_and_kernel_model() {
    every_scenario_passes_on_the_kernel_model_on(3);
}

fn every_scenario_passes_on_the_kernel_model_on(nodes: usize) {
    let plans = load_all_on(nodes);
    let mut failed = Vec::new();
    let mut total = Counts::default();
    for plan in &plans {
        let (counts, report) = run(plan, &mut KernelModelOracle::default());
        total.add(&counts);
        if counts.failed > 0 {
            failed.push(report);
        }
    }
    assert!(
        failed.is_empty(),
        "failing scenarios:\n{}",
        failed.join("\n")
    );
    assert!(total.passed > 1000, "too few probes ran: {total:?}");
}

#[test]
fn every_scenario_passes_on_the_reference_evaluator() {
    for nodes in [1, 3] {
        every_scenario_passes_on_the_reference_evaluator_on(nodes);
    }
}

fn every_scenario_passes_on_the_reference_evaluator_on(nodes: usize) {
    let plans = load_all_on(nodes);
    let mut failed = Vec::new();
    for plan in &plans {
        let (counts, report) = run(plan, &mut ReferenceOracle::default());
        if counts.failed > 0 {
            failed.push(report);
        }
    }
    assert!(
        failed.is_empty(),
        "failing scenarios:\n{}",
        failed.join("\n")
    );
}

/// Independent of the expectations written in the files: the datapath model and the spec agree
/// on every probe of every step (including probes to ports nobody serves).
#[test]
fn kernel_model_agrees_with_reference_on_every_probe() {
    let mut disagreements = Vec::new();
    let mut compared = 0usize;
    for plan in load_all_on(1).into_iter().chain(load_all_on(3)) {
        let mut km = KernelModelOracle::default();
        km.setup(&plan.topology).expect("setup");
        for step in &plan.steps {
            km.apply(&plan.topology, &step.state).expect("compile");
            for probe in &step.probes {
                compared += 1;
                let kernel = km.verdict(probe);
                let reference =
                    ReferenceOracle::verdict(&plan.topology, &step.state.snapshot, probe);
                if kernel != reference {
                    disagreements.push(format!(
                        "{} step {}: {} -> {} {} {}: kernel model {kernel}, reference {reference}",
                        plan.file,
                        step.index + 1,
                        probe.src,
                        probe.dst,
                        probe.port,
                        probe.family.as_str()
                    ));
                }
            }
        }
    }
    assert!(compared > 1000, "too few probes compared: {compared}");
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Invalid files: the error names the file, the step (index into `steps`) and the field.
// ---------------------------------------------------------------------------------------------

const GOOD_STEP: &str = "  - expect: {default: allow}\n";

fn parse_err(text: &str) -> ScenarioError {
    match Plan::parse("t.yaml", text) {
        Ok(_) => panic!("accepted an invalid file:\n{text}"),
        Err(e) => e,
    }
}

fn assert_err(text: &str, step: Option<usize>, field: &str, message_part: &str) {
    let e = parse_err(text);
    assert_eq!(e.file, "t.yaml");
    assert_eq!((e.step, e.field.as_str()), (step, field), "{e}");
    assert!(
        e.message.contains(message_part),
        "message {:?} lacks {message_part:?}",
        e.message
    );
    let shown = e.to_string();
    assert!(shown.starts_with("t.yaml: "), "{shown}");
    if let Some(i) = step {
        assert!(
            shown.contains(&format!("step {} (steps[{i}])", i + 1)),
            "{shown}"
        );
    }
    assert!(shown.contains(field), "{shown}");
}

#[test]
fn unknown_fields_are_named() {
    assert_err(
        &format!("name: t\nnamspaces: {{}}\nsteps:\n{GOOD_STEP}"),
        None,
        "namspaces",
        "unknown field",
    );
    assert_err(
        &format!("name: t\nsteps:\n{GOOD_STEP}  - expect: {{default: allow, probs: [TCP/80]}}\n"),
        Some(1),
        "expect.probs",
        "unknown field",
    );
    assert_err(
        "name: t\npods: [{namespace: x, name: a, labls: {}}]\nsteps:\n  - {}\n",
        None,
        "pods[0].labls",
        "unknown field",
    );
}

#[test]
fn invalid_values_are_named() {
    assert_err(
        &format!("name: t\nsteps:\n{GOOD_STEP}  - expect: {{default: maybe}}\n"),
        Some(1),
        "expect.default",
        "unknown variant",
    );
    assert_err(
        &format!("name: t\nipFamilies: [IPv5]\nsteps:\n{GOOD_STEP}"),
        None,
        "ipFamilies[0]",
        "unknown variant",
    );
    assert_err(
        &format!("name: t\npods: [{{namespace: w, name: a}}]\nsteps:\n{GOOD_STEP}"),
        None,
        "pods[0].namespace",
        "not declared",
    );
    assert_err(
        &format!("name: t\nexternals: [{{name: e, ip: 10.0.0.1}}]\nsteps:\n{GOOD_STEP}"),
        None,
        "externals[0].ip",
        "outside 198.19.0.0/16",
    );
    assert_err(
        &format!(
            "name: t\npods: [{{namespace: x, name: a, ports: [{{port: 80, protocol: ICMP}}]}}]\nsteps:\n{GOOD_STEP}"
        ),
        None,
        "pods[0].ports[0].protocol",
        "unknown variant",
    );
    assert_err(
        &format!(
            "name: t\npods: [{{namespace: x, name: a, hostNetwork: true}}, {{namespace: y, name: a, hostNetwork: true}}]\nsteps:\n{GOOD_STEP}"
        ),
        None,
        "pods[1].ports",
        "already served on the node by hostNetwork pod x/a",
    );
    assert_err("name: t\nsteps: []\n", None, "steps", "no step");
    assert_err(
        &format!("steps:\n{GOOD_STEP}"),
        None,
        "",
        "missing field `name`",
    );
}

#[test]
fn invalid_expectations_are_named() {
    let step = |expect: &str| format!("name: t\nsteps:\n{GOOD_STEP}  - expect: {expect}\n");
    assert_err(
        &step("{default: allow, probes: [TCP/0]}"),
        Some(1),
        "expect.probes[0]",
        "not a port",
    );
    assert_err(
        &step("{default: allow, probes: [ICMP/1]}"),
        Some(1),
        "expect.probes[0]",
        "not a protocol",
    );
    assert_err(
        &step("{default: allow, probes: [TCP/80, TCP/80]}"),
        Some(1),
        "expect.probes[1]",
        "twice",
    );
    assert_err(
        &step("{default: allow, deny: [\"x/a => x/b\"]}"),
        Some(1),
        "expect.deny[0]",
        "SRC -> DST",
    );
    assert_err(
        &step("{default: allow, allow: [\"x/q -> x/b\"]}"),
        Some(1),
        "expect.allow[0]",
        "matches no pod",
    );
    // A pattern naming a port the step does not probe is accepted (patterns are reused).
    let ok = step("{default: allow, allow: [\"x/a -> x/b:UDP/80\"]}");
    assert!(Plan::parse("t.yaml", &ok).is_ok());
    // And `default` may be left out: it is `allow`, the Kubernetes default.
    assert!(Plan::parse("t.yaml", &step("{probes: [TCP/80]}")).is_ok());
    assert_err(
        &step("{default: allow, allow: [\"x/a* -> x/b\"]}"),
        Some(1),
        "expect.allow[0]",
        "whole part",
    );
}

#[test]
fn invalid_changes_are_named() {
    let step = |body: &str| {
        format!("name: t\nsteps:\n{GOOD_STEP}  - {body}\n    expect: {{default: allow}}\n")
    };
    assert_err(
        &step("apply: \"{{ip x/q}}\""),
        Some(1),
        "apply",
        "no pod x/q",
    );
    assert_err(
        &step("apply: \"{{addr x/a}}\""),
        Some(1),
        "apply",
        "unknown template function",
    );
    assert_err(
        &step("apply: \"kind: Service\\napiVersion: v1\\nmetadata: {name: s}\""),
        Some(1),
        "apply[0].kind",
        "only NetworkPolicy",
    );
    assert_err(
        &step("apply: \"kind: ConfigMap\\n---\\nkind: Service\""),
        Some(1),
        "apply[0].kind",
        "ConfigMap",
    );
    assert_err(
        &step(
            "apply: \"apiVersion: networking.k8s.io/v1\\nkind: NetworkPolicy\\nmetadata: {name: p, namespace: x}\\nspec: {ingress: notalist}\"",
        ),
        Some(1),
        "apply[0].spec.ingress",
        "invalid type",
    );
    assert_err(
        &step(
            "apply: \"apiVersion: networking.k8s.io/v1\\nkind: NetworkPolicy\\nmetadata: {name: p}\\nspec: {}\"",
        ),
        Some(1),
        "apply[0].metadata.namespace",
        "missing",
    );
    assert_err(
        &step("apply: \"apiVersion: v1\\nkind: Pod\\nmetadata: {name: q, namespace: x}\""),
        Some(1),
        "apply[0].metadata",
        "not declared",
    );
    assert_err(
        &step(
            "apply: \"apiVersion: v1\\nkind: Namespace\\nmetadata: {name: x, labels: {'bad key!': v}}\"",
        ),
        Some(1),
        "apply[0].metadata.labels",
        "not a valid label key",
    );
    // Unknown fields of Kubernetes objects are errors (strict field validation).
    assert_err(
        &step(
            r#"apply: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelectr: {matchLabels: {pod: a}}}""#,
        ),
        Some(1),
        "apply[0].spec.podSelectr",
        "unknown field",
    );
    assert_err(
        &step(
            r#"apply: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {ingress: [{from: [{podSelector: {}, ipblock: {}}]}]}""#,
        ),
        Some(1),
        "apply[0].spec.ingress[0].from[0].ipblock",
        "unknown field",
    );
    assert_err(
        &step("delete: [networkpolicy/x/none]"),
        Some(1),
        "delete[0]",
        "does not exist",
    );
    assert_err(
        &step("delete: [pod/x/a]"),
        Some(1),
        "delete[0]",
        "fixed hosts",
    );
    assert_err(
        &step("delete: [x/p]"),
        Some(1),
        "delete[0]",
        "networkpolicy/NS/NAME",
    );
}

#[test]
fn an_invalid_policy_is_a_warning_and_fails_closed() {
    let text = r#"
name: t
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: p, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from: [{ipBlock: {cidr: not-a-cidr}}]
    expect:
      default: allow
      deny: ["*/* -> x/a"]
"#;
    let plan = Plan::parse("t.yaml", text).expect("an invalid policy is not a file error");
    let warnings = &plan.steps[0].applied.warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("networkpolicy x/p") && warnings[0].contains("cidr"),
        "{warnings:?}"
    );
    let (counts, report) = run(&plan, &mut KernelModelOracle::default());
    assert_eq!(counts.failed, 0, "{report}");
    assert!(report.contains("warning: networkpolicy x/p"), "{report}");
}

#[test]
fn templates_resolve_to_the_topology_addresses() {
    let text = r#"
name: t
externals: [{name: e, ip: 198.19.0.7, ip6: "fd00:19::7"}]
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: p, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from: [{ipBlock: {cidr: "{{ip y/b}}/32"}}, {ipBlock: {cidr: "{{ ip6 y/b }}/128"}}, {ipBlock: {cidr: "{{ip external:e}}/32"}}]
    expect:
      default: allow
      deny: ["* -> x/a"]
      allow: ["y/b -> x/a", "external:e -> x/a"]
"#;
    let plan = Plan::parse("t.yaml", text).expect("valid");
    let doc = plan.steps[0]
        .state
        .policy_docs
        .values()
        .next()
        .expect("policy doc")
        .to_string();
    let yb = plan
        .topology
        .pods
        .iter()
        .find(|p| p.key.to_string() == "y/b")
        .expect("y/b");
    assert!(doc.contains(&format!("{}/32", yb.v4)), "{doc}");
    assert!(doc.contains(&format!("{}/128", yb.v6)), "{doc}");
    assert!(doc.contains("198.19.0.7/32"), "{doc}");
    let (counts, report) = run(&plan, &mut KernelModelOracle::default());
    assert_eq!(counts.failed, 0, "{report}");
}

#[test]
fn standard_model_and_probe_enumeration() {
    let text = "name: t\nexternals: [{name: e, ip: 198.19.0.7}]\nsteps:\n  - expect: {default: allow, probes: [TCP/80, UDP/81]}\n";
    let plan = Plan::parse("t.yaml", text).expect("valid");
    let topo = &plan.topology;
    let names: Vec<String> = topo.pods.iter().map(|p| p.key.to_string()).collect();
    assert_eq!(
        names,
        [
            "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"
        ]
    );
    for p in &topo.pods {
        assert_eq!(p.labels.get("pod"), Some(&p.key.name));
        assert_eq!(p.ports.len(), 6);
        assert!(
            p.ports
                .iter()
                .any(|c| c.name.as_deref() == Some("serve-81-udp") && c.port == 81)
        );
    }
    let x = &plan.steps[0].state.snapshot.namespaces["x"];
    assert_eq!(
        x.labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("x")
    );
    // 9 pods probe 8 pods and 1 external, the external probes 9 pods: 90 per port.
    assert_eq!(plan.steps[0].probes.len(), 2 * 90);
    assert!(plan.steps[0].probes.iter().all(|p| p.served));
}

#[test]
fn reports_say_what_changed_between_steps() {
    let plan = Plan::load(&workspace().join("scenarios/traps/label-updates.yaml")).expect("valid");
    let (counts, report) = run(&plan, &mut KernelModelOracle::default());
    assert_eq!(counts.failed, 0, "{report}");
    assert!(
        report.contains("changed since the previous step: nothing"),
        "{report}"
    );
    assert!(
        report.contains("now allowed (1): y/b -> x/a TCP/80 IPv4\n"),
        "{report}"
    );
    assert!(
        report.contains("now denied (1): y/b -> x/a TCP/80 IPv4\n"),
        "{report}"
    );
}

#[test]
fn scenario_addresses_fit_the_namespace_test_bed() {
    use policy_testkit::scenario::topology::*;
    assert_eq!(NODE_V4, policy_testkit::testbed::NODE_IPV4);
    assert_eq!(NODE_V6, policy_testkit::testbed::NODE_IPV6);
    // Pods, ClusterIPs and the node never share an address; all stay in the test ranges.
    let mut seen = std::collections::BTreeSet::new();
    assert!(seen.insert(std::net::IpAddr::from(NODE_V4)));
    assert!(seen.insert(std::net::IpAddr::from(NODE_V6)));
    for i in [0, 1, 254, 255, 256, MAX_PODS - 1] {
        for a in [
            pod_v4(i).into(),
            pod_v6(i).into(),
            service_v4(i).into(),
            service_v6(i).into(),
        ] {
            assert!(seen.insert(a), "{a} used twice");
            match a {
                std::net::IpAddr::V4(v4) => assert!(POD_NET_V4.contains(&v4), "{v4}"),
                std::net::IpAddr::V6(v6) => assert!(POD_NET_V6.contains(&v6), "{v6}"),
            }
        }
    }
    assert!(pod_v4(MAX_PODS - 1) < service_v4(0));
}

/// Pods go round-robin over the nodes in file order unless they name theirs; a node the run
/// does not have is a file error naming the pod's field.
#[test]
fn pods_spread_over_nodes_round_robin_unless_they_name_theirs() {
    let text = "name: t\nnamespaces: {x: {}}\npods:\n\
        - {namespace: x, name: a}\n- {namespace: x, name: b}\n- {namespace: x, name: c}\n\
        - {namespace: x, name: d, node: node-1}\n- {namespace: x, name: h, hostNetwork: true}\n\
        steps:\n  - expect: {default: allow}\n";
    let plan = Plan::parse_on("t.yaml", text, 3).expect("valid");
    let nodes: Vec<&str> = plan
        .topology
        .pods
        .iter()
        .map(|p| plan.topology.node_of(p).name.as_str())
        .collect();
    assert_eq!(nodes, ["node-1", "node-2", "node-3", "node-1", "node-2"]);
    let h = &plan.topology.pods[4];
    assert_eq!(
        h.v4, plan.topology.nodes[1].v4,
        "a hostNetwork pod uses its node's address"
    );
    assert_ne!(plan.topology.nodes[0].v4, plan.topology.nodes[1].v4);
    let e = Plan::parse_on("t.yaml", &text.replace("node: node-1", "node: node-4"), 3)
        .expect_err("no node-4 in a 3-node run");
    assert_eq!((e.step, e.field.as_str()), (None, "pods[3].node"), "{e}");
    assert!(Plan::parse_on("t.yaml", text, 0).is_err());
}

/// A hostNetwork pod is its node: its node's pods always admit it, a pod on another node
/// judges it by policy (only an ipBlock over that node's address matches it), in the
/// kernel model of each node and in the reference alike.
#[test]
fn a_host_network_pod_on_another_node_is_judged_by_policy() {
    let text = "name: t\nnamespaces: {x: {}}\npods:\n\
        - {namespace: x, name: a, node: node-1, ports: [{port: 80}]}\n\
        - {namespace: x, name: h, hostNetwork: true, node: node-1, ports: [{port: 80}]}\n\
        - {namespace: x, name: r, hostNetwork: true, node: node-2, ports: [{port: 80}]}\n\
        steps:\n\
        - apply: |\n    apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    \
        metadata: {name: deny, namespace: x}\n    spec: {podSelector: {}, policyTypes: [Ingress]}\n  \
        expect:\n    default: allow\n    deny: [\"x/r -> x/a\"]\n\
        - apply: |\n    apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    \
        metadata: {name: node2, namespace: x}\n    spec:\n      podSelector: {}\n      \
        ingress: [{from: [{ipBlock: {cidr: \"{{ip x/r}}/32\"}}]}]\n  \
        expect: {default: allow}\n";
    let plan = Plan::parse_on("t.yaml", text, 2).expect("valid");
    for oracle in [
        &mut KernelModelOracle::default() as &mut dyn Oracle,
        &mut ReferenceOracle::default(),
    ] {
        let (counts, report) = run(&plan, oracle);
        assert_eq!(counts.failed, 0, "{report}");
        assert!(counts.passed >= 8, "{report}");
    }
}

/// `nodes:` raises a run's node count for the file (never lowers it); `move` puts a pod on
/// another node of the run, and moving a hostNetwork pod, to a node the run does not have,
/// or to where the pod already is, is a file error naming the step and the pod.
#[test]
fn files_ask_for_nodes_and_steps_move_pods() {
    let text = "name: t\nnodes: 2\nnamespaces: {x: {}}\npods:\n\
        - {namespace: x, name: a, node: node-1}\n- {namespace: x, name: h, hostNetwork: true}\n\
        steps:\n  - move: {x/a: node-2}\n    expect: {default: allow}\n";
    for (given, want) in [(1, 2), (2, 2), (3, 3)] {
        let plan = Plan::parse_on("t.yaml", text, given).expect("valid");
        assert_eq!(plan.topology.nodes.len(), want, "--nodes {given}");
        let snap = &plan.steps[0].state.snapshot;
        let key = &plan.topology.pods[0].key;
        assert_eq!(plan.topology.node_in(snap, key), Some(1), "moved to node-2");
        assert_eq!(
            plan.steps[0].applied.changes,
            ["move pod x/a from node-1 to node-2"]
        );
    }
    for (bad, why) in [
        ("{x/a: node-3}", "is not a node of this run"),
        ("{x/a: node-1}", "already on node-1"),
        ("{x/h: node-2}", "hostNetwork"),
        ("{x/zz: node-2}", "no pod x/zz"),
    ] {
        let e = Plan::parse_on("t.yaml", &text.replace("{x/a: node-2}", bad), 2).expect_err(bad);
        assert_eq!(e.step, Some(0), "{e}");
        assert!(e.field.starts_with("move."), "{e}");
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    let e = Plan::parse_on("t.yaml", &text.replace("nodes: 2", "nodes: 17"), 1)
        .expect_err("too many nodes");
    assert_eq!(e.field, "nodes", "{e}");
}
