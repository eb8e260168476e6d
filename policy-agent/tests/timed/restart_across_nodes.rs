//! One node's agent killed with SIGKILL under continuous cross-node TCP and UDP traffic, a
//! policy changed while it is down, the agent restarted: not one connection may be decided
//! against the policy in force, the long-lived cross-node connection survives, and the
//! change holds once every agent reports it. Two node namespaces on an underlay (routed, and
//! VXLAN in cluster mode), one real agent per node, the scenario runner's hosts; the clients
//! are on node-1, the servers on node-2, whose agent is killed (their ingress is judged
//! there). Needs root, BPF and namespaces: fails without.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use policy_agent::model::ObjectKey;
use policy_testkit::scenario::Plan;
use policy_testkit::scenario::format::IpFamily;
use policy_testkit::scenario::kernel::hosts::Network;
use policy_testkit::scenario::kernel::{KernelConfig, KernelOracle, Mode};
use policy_testkit::scenario::run::Oracle;
use policy_testkit::testbed::TcpClient;

use crate::SERIAL;
use crate::under_traffic::{self, Endpoint, Ports, Timeline};

/// Pods a and c (clients) on node-1, b and d (servers) on node-2. Step 1 (generation 1): b
/// and d admit a only. Step 2 (generation 2, written while node-2's agent is down): b admits
/// c instead; d unchanged.
const SCENARIO: &str = r#"
name: restart-across-nodes
nodes: 2
namespaces: {x: {}}
pods:
  - {namespace: x, name: a, labels: {pod: a}, node: node-1, ports: [{port: 80}, {port: 80, protocol: UDP}]}
  - {namespace: x, name: b, labels: {pod: b}, node: node-2, ports: [{port: 80}, {port: 80, protocol: UDP}]}
  - {namespace: x, name: c, labels: {pod: c}, node: node-1, ports: [{port: 80}, {port: 80, protocol: UDP}]}
  - {namespace: x, name: d, labels: {pod: d}, node: node-2, ports: [{port: 80}, {port: 80, protocol: UDP}]}
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: b-in, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: b}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]
      ---
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: d-in, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: d}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: b-in, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: b}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
"#;

/// Indexes of the pods in [`SCENARIO`].
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const PAIRS: [(usize, usize); 4] = [(A, B), (C, B), (A, D), (C, D)];
/// node-2, where the servers run.
const KILLED: usize = 1;

fn allowed(generation: u8, pair: (usize, usize)) -> bool {
    matches!((generation, pair), (1, (A, B)) | (2, (C, B)) | (_, (A, D)))
}

#[test]
fn node_agent_killed_under_cross_node_traffic_routed_standalone() {
    restart_across_nodes(Network::Routed, Mode::Standalone);
}

#[test]
fn node_agent_killed_under_cross_node_traffic_vxlan_cluster() {
    restart_across_nodes(Network::Vxlan, Mode::Cluster);
}

fn restart_across_nodes(network: Network, mode: Mode) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let plan = Plan::parse_on("restart-across-nodes.yaml", SCENARIO, 1).expect("scenario");
    let topo = &plan.topology;
    assert_eq!(topo.nodes.len(), 2);
    let mut cfg = KernelConfig::new(env!("CARGO_BIN_EXE_policy-agent").into());
    cfg.network = network;
    cfg.mode = mode;
    let mut oracle = KernelOracle::new(cfg);
    oracle.setup(topo).expect("hosts and agents");
    oracle
        .apply(topo, &plan.steps[0].state)
        .expect("generation 1 enforced");

    let host = |i: usize| {
        let key = ObjectKey::new("x", ["a", "b", "c", "d"][i]);
        let pod = topo.pod(&key).expect("pod").clone();
        assert_eq!(
            topo.node_of(&pod).name,
            if i == B || i == D { "node-2" } else { "node-1" }
        );
        pod
    };
    let hosts: Vec<_> = (0..4).map(host).collect();
    let ns: Vec<_> = hosts
        .iter()
        .map(|p| oracle.pod_netns(&p.key).expect("namespace").handle())
        .collect();
    let pods: Vec<Endpoint> = hosts
        .iter()
        .zip(&ns)
        .map(|(p, ns)| Endpoint {
            ns,
            ip: p.addr(IpFamily::V4),
        })
        .collect();
    let ports = Ports { tcp: 80, udp: 80 };
    // Across the nodes, allowed in both generations.
    let mut long = TcpClient::connect(
        pods[A].ns,
        SocketAddr::new(pods[D].ip, ports.tcp),
        Duration::from_secs(2),
    )
    .expect("long-lived connection a -> d");
    long.round_trip(b"hello").expect("first round trip");

    let oracle_ref = &mut oracle;
    let (t, seen) = under_traffic::run(&pods, &PAIRS, ports, &mut long, || {
        std::thread::sleep(Duration::from_millis(2500));
        oracle_ref
            .kill_agent(KILLED)
            .expect("SIGKILL node-2's agent");
        let kill = Instant::now();
        std::thread::sleep(Duration::from_millis(1000));
        // The policy changes while node-2 has no agent; node-1's enforces it at once.
        let published = oracle_ref
            .publish(&plan.steps[1].state)
            .expect("generation 2 written");
        std::thread::sleep(Duration::from_millis(1500));
        let restart = Instant::now();
        oracle_ref.restart_agent(KILLED).expect("restart");
        oracle_ref
            .wait_enforced(published)
            .expect("generation 2 enforced on both nodes");
        let switch = Instant::now();
        std::thread::sleep(Duration::from_millis(3000));
        Timeline {
            kill,
            restart,
            switch,
        }
    });
    let status = oracle.status(KILLED).expect("status of node-2");
    assert!(
        status.adopted,
        "the restarted agent adopts the pinned maps: {status:?}"
    );
    under_traffic::assert_held(
        &format!("node-2's agent killed under cross-node traffic ({network:?}, {mode:?})"),
        &seen,
        t,
        &PAIRS,
        allowed,
        ((C, B), (A, B)),
    );
    drop(long);
    oracle.close().expect("teardown");
}
