//! `netpol-cni` called as a container runtime calls it (CNI environment variables, the
//! network configuration with the previous plugin's result on stdin), against the real
//! agent in a node namespace: the ADD returns only once the pod is enforced, so the pod's
//! very first packets meet its policy; every failure fails the ADD (the runtime retries)
//! rather than start a pod unprotected. Needs root, BPF and namespaces: fails without them.

use crate::kube_support;
use crate::restart_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube_support::{FakeApi, Kind};
use policy_testkit::testbed::cni::{call_plugin, plugin_conf, prev_result};
use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use restart_common::{Agent, NODE, TempDir, pod, uninstall_with, write_manifests};
use serde_json::{Value, json};

/// The main plugin's conflist, as its installer writes it.
fn main_conflist() -> Value {
    json!({"cniVersion": "1.0.0", "name": "podnet",
           "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}},
                       {"type": "portmap", "capabilities": {"portMappings": true}}]})
}

/// A pod with no address in its object yet (the kubelet writes status.podIPs only after
/// the CNI ADD returned).
fn starting_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "test"}]},
    })
}

fn policy(name: &str, target: &str, kind: &str, peer: &str) -> Value {
    let dir = if kind == "Ingress" { "from" } else { "to" };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": [kind],
            kind.to_lowercase(): [{
                dir: [{"podSelector": {"matchLabels": {"app": peer}}}],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }],
        },
    })
}

struct CniDirs {
    conf: PathBuf,
    bin: PathBuf,
}

impl CniDirs {
    fn new(dir: &TempDir) -> CniDirs {
        let d = CniDirs {
            conf: dir.0.join("net.d"),
            bin: dir.0.join("cni-bin"),
        };
        std::fs::create_dir_all(&d.conf).expect("conf dir");
        std::fs::create_dir_all(&d.bin).expect("bin dir");
        std::fs::write(
            d.conf.join("10-podnet.conflist"),
            main_conflist().to_string(),
        )
        .expect("conflist");
        d
    }

    fn conflist(&self) -> Value {
        let text = std::fs::read_to_string(self.conf.join("10-podnet.conflist")).expect("read");
        serde_json::from_str(&text).expect("conflist JSON")
    }

    fn agent_args(&self, timeout: &str) -> Vec<String> {
        vec![
            "--cni-conf-dir".into(),
            self.conf.display().to_string(),
            "--cni-bin-dir".into(),
            self.bin.display().to_string(),
            "--cni-plugin".into(),
            env!("CARGO_BIN_EXE_netpol-cni").into(),
            "--cni-timeout".into(),
            timeout.into(),
        ]
    }

    /// Waits for the agent to put the plugin in place; returns the runtime's view of it.
    fn wait_installed(&self, agent: &Agent) -> (PathBuf, Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = self.conflist();
            let plugins = list["plugins"].as_array().expect("plugins").clone();
            let bin = self.bin.join("netpol-cni");
            if plugins.len() == 3 && bin.exists() {
                assert_eq!(json!(plugins[..2]), json!(main_conflist()["plugins"]));
                assert_eq!(plugins[2]["type"], "netpol-cni", "chained last: {list}");
                return (bin, plugin_conf(&list, 2));
            }
            assert!(
                Instant::now() < deadline,
                "netpol-cni not installed: {list} {}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn pinned(fs: &Path, iface: &str, ifindex: u32) -> bool {
    fs.join("links")
        .join(format!("{iface}@{ifindex}"))
        .join(policy_common::PROG_FROM_POD)
        .exists()
}

/// /readyz of the cluster agent, on the node namespace's loopback.
const METRICS_PORT: u16 = 9090;

#[test]
fn a_pod_starts_only_once_enforced_and_its_first_packets_meet_its_policy_standalone() {
    pod_start(false);
}

#[test]
fn a_pod_starts_only_once_enforced_and_its_first_packets_meet_its_policy_cluster() {
    pod_start(true);
}

fn pod_start(cluster: bool) {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let b = bed.add_pod().expect("pod b");
    let c = bed.add_pod().expect("pod c");
    let dir = TempDir::new("cni");
    let cni = CniDirs::new(&dir);
    let fs = PrivateBpffs::mount().expect("private bpffs");
    // b admits only a; a may reach only b; a's object has no address yet.
    let docs = [
        starting_pod("a"),
        pod(&bed, b, "b"),
        pod(&bed, c, "c"),
        policy("b-from-a", "b", "Ingress", "a"),
        policy("a-to-b", "a", "Egress", "b"),
    ];
    let args = cni.agent_args("10");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let api = FakeApi::default();
    let mut _api_server = None;
    let mut agent = if cluster {
        api.apply(
            Kind::Namespaces,
            kube_support::namespace("default", json!({})),
        );
        for d in &docs {
            let kind = if d["kind"] == "Pod" {
                Kind::Pods
            } else {
                Kind::Policies
            };
            api.apply(kind, d.clone());
        }
        let (served, kubeconfig) = restart_common::serve_api(&api, &bed, &dir);
        _api_server = Some(served);
        let mut agent = Agent::start_cluster(&bed, &dir, &fs, &kubeconfig, METRICS_PORT, &args, 0);
        agent.wait_ready(&bed, METRICS_PORT);
        agent
    } else {
        let generation = write_manifests(&dir.manifests(), &docs);
        let agent = Agent::start(&bed, &dir, &fs, &args, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !policy_agent::status_file::read(&dir.status())
            .is_some_and(|s| s.generation == generation && s.attached.len() == 2)
        {
            assert!(Instant::now() < deadline, "agent: {}", agent.log_tail());
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    };
    let (plugin, conf) = cni.wait_installed(&agent);
    let mut servers = Vec::new();
    for (i, v6) in [(b, false), (b, true), (c, false), (c, true)] {
        let addr = std::net::SocketAddr::new(bed.hosts[i].ip(v6), 8080);
        servers.push(TcpEchoServer::start(&bed.hosts[i].ns, addr).expect("server"));
    }

    // The main plugin's work: a's veth, addresses and routes. Then the runtime's ADD.
    let a = bed.add_pod().expect("pod a");
    let prev = prev_result(&bed.hosts[a], "1.0.0");
    let out = call_plugin(
        &bed.node,
        &plugin,
        "ADD",
        ("default", "a"),
        &conf,
        Some(&prev),
        Duration::from_secs(20),
    )
    .expect("run the plugin");
    // Nothing may have happened between the ADD's return and these checks but the
    // checks: the programs are on a's veth already.
    let ifindex = bed.host_ifindex(a).expect("ifindex");
    assert!(
        pinned(fs.path(), &bed.hosts[a].host_if, ifindex),
        "ADD returned before a's programs were attached: {out:?}"
    );
    assert_eq!(out.code, 0, "ADD failed: {out:?} {}", agent.log_tail());
    // A chained plugin that changes nothing returns the previous result.
    assert_eq!(out.output["ips"], prev["ips"]);
    assert_eq!(out.output["interfaces"], prev["interfaces"]);
    assert_eq!(out.output["cniVersion"], "1.0.0");
    let t = Duration::from_secs(2);
    for v6 in [false, true] {
        let to_b = std::net::SocketAddr::new(bed.hosts[b].ip(v6), 8080);
        let to_c = std::net::SocketAddr::new(bed.hosts[c].ip(v6), 8080);
        // a is a/app=a at once (its endpoint written with the reported addresses): b admits it.
        tcp_echo(&bed.hosts[a].ns, to_b, t)
            .unwrap_or_else(|e| panic!("a -> b (v6={v6}) refused: {e}"));
        // a's egress isolation holds from its first packet.
        assert!(
            tcp_echo(&bed.hosts[a].ns, to_c, t).is_err(),
            "a -> c passed (v6={v6})"
        );
        // And b's ingress still refuses c.
        assert!(
            tcp_echo(&bed.hosts[c].ns, to_b, t).is_err(),
            "c -> b passed (v6={v6})"
        );
    }
    // CHECK: the same question, nothing printed.
    let out = call_plugin(
        &bed.node,
        &plugin,
        "CHECK",
        ("default", "a"),
        &conf,
        Some(&prev),
        Duration::from_secs(20),
    )
    .expect("run the plugin");
    assert_eq!((out.code, out.output.clone()), (0, Value::Null), "{out:?}");
    if std::env::var_os("CNI_TEST_LOG").is_some() {
        eprintln!("{}", agent.log_text());
    }
    agent.kill9();
}

#[test]
fn every_failure_fails_the_start_and_uninstall_takes_the_plugin_out() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let b = bed.add_pod().expect("pod b");
    let dir = TempDir::new("cni-fail");
    let cni = CniDirs::new(&dir);
    let fs = PrivateBpffs::mount().expect("private bpffs");
    write_manifests(&dir.manifests(), &[pod(&bed, b, "b")]);
    let args = cni.agent_args("0.5");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&bed, &dir, &fs, &args, 0);
    let (plugin, conf) = cni.wait_installed(&agent);
    // An address nobody knows: a real sandbox the agent has no pod object for.
    let ghost = bed.add_pod().expect("pod ghost");
    let prev = prev_result(&bed.hosts[ghost], "0.4.0");
    let limit = Duration::from_secs(20);
    let call = |cmd: &str, pod: &str, conf: &Value, prev: Option<&Value>| {
        call_plugin(&bed.node, &plugin, cmd, ("default", pod), conf, prev, limit)
            .expect("run the plugin")
    };

    let out = call("VERSION", "", &conf, None);
    assert_eq!(out.code, 0);
    assert!(
        out.output["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.1.0")) && v.contains(&json!("0.3.1")))
    );
    assert_eq!(call("STATUS", "", &conf, None).code, 0, "agent up");

    // Not enforced within the timeout: try again later, naming the pod and why.
    let t0 = Instant::now();
    let out = call("ADD", "ghost", &conf, Some(&prev));
    assert_eq!((out.code, out.error_code()), (1, Some(11)), "{out:?}");
    let text = out.output.to_string();
    assert!(
        text.contains("default/ghost") && text.contains("no local pod"),
        "{text}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Not chained after a main plugin: a configuration error.
    let out = call("ADD", "ghost", &conf, None);
    assert_eq!(out.error_code(), Some(7), "{out:?}");
    // DEL always succeeds.
    assert_eq!(call("DEL", "ghost", &conf, Some(&prev)).code, 0);

    // The agent gone: starts fail, STATUS says unavailable, DEL still succeeds.
    agent.kill9();
    let out = call("ADD", "ghost", &conf, Some(&prev));
    assert_eq!(out.error_code(), Some(11), "{out:?}");
    assert_eq!(call("STATUS", "", &conf, None).error_code(), Some(50));
    assert_eq!(call("DEL", "ghost", &conf, Some(&prev)).code, 0);

    // A socket served by someone untrusted is refused. (Only root runs CI; the check
    // itself is unit-tested in policy-cni's local_socket.)

    // Uninstall takes the entry and the binary out.
    uninstall_with(
        &bed,
        &fs,
        &[
            "--cni-conf-dir".as_ref(),
            cni.conf.as_os_str(),
            "--cni-bin-dir".as_ref(),
            cni.bin.as_os_str(),
        ],
    );
    assert_eq!(cni.conflist(), main_conflist());
    assert!(!cni.bin.join("netpol-cni").exists());
}
