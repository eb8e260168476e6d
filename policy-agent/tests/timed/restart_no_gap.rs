//! The agent killed with SIGKILL under continuous traffic, a policy changed while it is
//! down, the agent restarted: not one connection may be decided against the policy that was
//! enforced, the long-lived connection survives, and the change is enforced once the
//! restarted agent reports it. Network namespaces, the real `policy-agent` binary in
//! standalone mode (a manifest directory) and in cluster mode (a fake API server over HTTP
//! on the node namespace's loopback), real sockets. Needs root, BPF and namespaces: fails
//! without.

use crate::kube_support;
use crate::restart_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::under_traffic::{self, Endpoint, Ports, Timeline};
use kube_support::{FakeApi, Kind};
use policy_testkit::testbed::{
    PrivateBpffs, TcpClient, TcpEchoServer, Testbed, UdpEchoServer, tcp_echo,
};
use restart_common::{Agent, TempDir, files_under, ingress_from, pod, uninstall, write_manifests};
use serde_json::Value;

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9090;
/// Test-bed indexes of the four pods.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const PAIRS: [(usize, usize); 4] = [(A, B), (C, B), (A, D), (C, D)];

/// Generation 1: B and D admit A only. Generation 2 (written while the agent is down): B
/// admits C instead; D unchanged.
fn allowed(generation: u8, pair: (usize, usize)) -> bool {
    matches!((generation, pair), (1, (A, B)) | (2, (C, B)) | (_, (A, D)))
}

use crate::SERIAL;

#[test]
fn restart_kill9_under_traffic_no_wrong_verdicts_and_change_applied_tcx() {
    restart_under_traffic("tcx", Plane::Standalone);
}

#[test]
fn restart_kill9_under_traffic_no_wrong_verdicts_and_change_applied_clsact() {
    restart_under_traffic("clsact", Plane::Standalone);
}

#[test]
fn restart_kill9_cluster_agent_under_traffic_no_wrong_verdicts_and_change_applied() {
    restart_under_traffic("tcx", Plane::Cluster);
}

/// Where the agent reads the cluster from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Standalone,
    Cluster,
}

/// The cluster's state as the agent sees it: a manifest directory, or a fake API server.
struct Control<'a> {
    plane: Plane,
    bed: &'a Testbed,
    dir: &'a TempDir,
    fs: &'a PrivateBpffs,
    api: FakeApi,
    kubeconfig: std::path::PathBuf,
    /// Serves the fake API server while the test runs.
    _served: Option<policy_testkit::fake_api::Served>,
}

/// /readyz of the cluster agent, on the node namespace's loopback.
const METRICS_PORT: u16 = 9090;

impl<'a> Control<'a> {
    fn new(plane: Plane, bed: &'a Testbed, dir: &'a TempDir, fs: &'a PrivateBpffs) -> Self {
        let api = FakeApi::default();
        let (served, kubeconfig) = match plane {
            Plane::Standalone => (None, std::path::PathBuf::new()),
            Plane::Cluster => {
                let (served, kubeconfig) = restart_common::serve_api(&api, bed, dir);
                (Some(served), kubeconfig)
            }
        };
        Control {
            plane,
            bed,
            dir,
            fs,
            api,
            kubeconfig,
            _served: served,
        }
    }

    /// Makes `docs` (Pods and NetworkPolicies of namespace default) the cluster's state;
    /// returns the standalone generation to wait for (0 in cluster mode).
    fn publish(&self, docs: &[Value]) -> u64 {
        match self.plane {
            Plane::Standalone => write_manifests(&self.dir.manifests(), docs),
            Plane::Cluster => {
                self.api.apply(
                    Kind::Namespaces,
                    kube_support::namespace("default", serde_json::json!({})),
                );
                for d in docs {
                    let kind = match d["kind"].as_str() {
                        Some("Pod") => Kind::Pods,
                        Some("NetworkPolicy") => Kind::Policies,
                        other => panic!("unexpected kind {other:?}"),
                    };
                    self.api.apply(kind, d.clone());
                }
                0
            }
        }
    }

    fn start(&self, mode: &str, n: u32) -> Agent {
        match self.plane {
            Plane::Standalone => Agent::start(self.bed, self.dir, self.fs, &["--attach", mode], n),
            Plane::Cluster => Agent::start_cluster(
                self.bed,
                self.dir,
                self.fs,
                &self.kubeconfig,
                METRICS_PORT,
                &["--attach", mode],
                n,
            ),
        }
    }

    /// Waits until `agent` enforces `generation` on the 4 pods; says whether it adopted
    /// pinned maps (a restart) rather than creating them.
    fn wait_enforced(&self, agent: &mut Agent, generation: u64) -> bool {
        match self.plane {
            Plane::Standalone => {
                agent
                    .wait_generation(&self.dir.status(), generation, 4)
                    .adopted
            }
            Plane::Cluster => {
                agent.wait_ready(self.bed, METRICS_PORT);
                agent
                    .log_text()
                    .contains("adopted the maps and links an earlier agent pinned")
            }
        }
    }
}

/// The programs attached at each hook of `iface` (TCX only; clsact filters: by `tc`).
fn attached_programs(bed: &Testbed, iface: &str, mode: &str) -> Vec<String> {
    if mode == "tcx" {
        use aya::programs::{SchedClassifier, TcAttachType};
        let mut out = Vec::new();
        for at in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = bed
                .node
                .enter(|| SchedClassifier::query_tcx(iface, at))
                .expect("enter node")
                .expect("query tcx");
            out.extend(progs.iter().map(|p| format!("{at:?}:{}", p.id())));
        }
        out
    } else {
        let mut out = Vec::new();
        for at in ["ingress", "egress"] {
            let o = bed
                .node
                .exec("tc", &["filter", "show", "dev", iface, at])
                .expect("tc filter show");
            let text = String::from_utf8_lossy(&o.stdout);
            out.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "id").nth(1))
                    .map(|id| format!("{at}:{id}")),
            );
        }
        out
    }
}

fn restart_under_traffic(mode: &str, plane: Plane) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut bed = Testbed::new().expect("node namespace");
    for _ in 0..4 {
        bed.add_pod().expect("pod namespace");
    }
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let dir = TempDir::new("restart");
    let mut servers_tcp = Vec::new();
    let mut servers_udp = Vec::new();
    for s in [B, D] {
        let ip = bed.hosts[s].ip(false);
        servers_tcp.push(
            TcpEchoServer::start(&bed.hosts[s].ns, SocketAddr::new(ip, TCP_PORT))
                .expect("tcp server"),
        );
        servers_udp.push(
            UdpEchoServer::start(&bed.hosts[s].ns, SocketAddr::new(ip, UDP_PORT))
                .expect("udp server"),
        );
    }
    let pods = vec![
        pod(&bed, A, "a"),
        pod(&bed, B, "b"),
        pod(&bed, C, "c"),
        pod(&bed, D, "d"),
    ];
    let gen1_docs = [
        pods.clone(),
        vec![
            ingress_from("b", "b", "a", TCP_PORT, UDP_PORT),
            ingress_from("d", "d", "a", TCP_PORT, UDP_PORT),
        ],
    ]
    .concat();
    let gen2_docs = [
        pods.clone(),
        vec![
            ingress_from("b", "b", "c", TCP_PORT, UDP_PORT),
            ingress_from("d", "d", "a", TCP_PORT, UDP_PORT),
        ],
    ]
    .concat();

    let control = Control::new(plane, &bed, &dir, &fs);
    let gen1 = control.publish(&gen1_docs);
    let mut agent1 = control.start(mode, 1);
    let adopted1 = control.wait_enforced(&mut agent1, gen1);
    assert!(
        !adopted1,
        "a first start creates the maps: {}",
        agent1.log_tail()
    );
    let progs1 = attached_programs(&bed, &bed.hosts[B].host_if, mode);
    assert_eq!(
        progs1.len(),
        2,
        "one program per hook: {progs1:?}; {}",
        agent1.log_tail()
    );

    let to = |dst: usize, port: u16| SocketAddr::new(bed.hosts[dst].ip(false), port);
    // The long-lived connection, through an isolated endpoint, allowed in both generations.
    let mut long = TcpClient::connect(&bed.hosts[A].ns, to(D, TCP_PORT), Duration::from_secs(2))
        .expect("long-lived connection A -> D");
    long.round_trip(b"hello").expect("first round trip");

    let pods: Vec<Endpoint> = bed
        .hosts
        .iter()
        .map(|h| Endpoint {
            ns: &h.ns,
            ip: h.ip(false),
        })
        .collect();
    let ports = Ports {
        tcp: TCP_PORT,
        udp: UDP_PORT,
    };
    let control = &control;
    let ((t, s2), seen) = under_traffic::run(&pods, &PAIRS, ports, &mut long, || {
        std::thread::sleep(Duration::from_millis(2500));
        agent1.kill9();
        let kill = Instant::now();
        std::thread::sleep(Duration::from_millis(1000));
        // The policy changes while no agent runs.
        let gen2 = control.publish(&gen2_docs);
        std::thread::sleep(Duration::from_millis(1500));
        let restart = Instant::now();
        let mut agent2 = control.start(mode, 2);
        let s2 = control.wait_enforced(&mut agent2, gen2);
        let switch = Instant::now();
        std::thread::sleep(Duration::from_millis(3000));
        // Agent 2 runs on until the checks below are done (agent 1 is gone already).
        drop(std::mem::replace(&mut agent1, agent2));
        (
            Timeline {
                kill,
                restart,
                switch,
            },
            s2,
        )
    });
    assert!(
        s2,
        "the restarted agent adopts the pinned maps: {}",
        agent1.log_tail()
    );
    // The restarted agent's programs replaced the old ones in place: still one per hook.
    let progs2 = attached_programs(&bed, &bed.hosts[B].host_if, mode);
    assert_eq!(
        progs2.len(),
        2,
        "one program per hook after the restart: {progs2:?}"
    );
    assert!(
        progs1.iter().all(|p| !progs2.contains(p)),
        "programs not replaced: {progs1:?} -> {progs2:?}"
    );

    // Every probe against the policy enforced when it ran; C reaches B and A does not once
    // generation 2 is in force.
    under_traffic::assert_held(
        &format!("restart under traffic ({mode}, {plane:?})"),
        &seen,
        t,
        &PAIRS,
        allowed,
        ((C, B), (A, B)),
    );

    // Uninstall (with no agent running): nothing enforced any more, nothing pinned.
    drop(long);
    agent1.kill9();
    uninstall(&bed, &fs);
    assert!(
        files_under(fs.path()).is_empty(),
        "left pinned: {:?}",
        files_under(fs.path())
    );
    tcp_echo(&bed.hosts[C].ns, to(D, TCP_PORT), Duration::from_secs(2))
        .expect("after uninstall C reaches D (nothing enforces)");
}
