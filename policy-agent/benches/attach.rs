//! `cargo bench -p policy-agent --bench attach` (or `cargo xtask bench attach`): how soon a
//! new pod's veth carries the programs. The standalone agent runs in a node namespace with
//! the pods already in its manifests (waiting for their interfaces); each pod's veth and
//! routes are then made as a CNI plugin does, and the time from the start of that to the
//! pod's pinned `from_pod` link is measured. Run with the poll at 100 ms and at 1 s: with
//! the kernel's link notifications the programs follow the route, not the poll.
//!
//! Then with `netpol-cni`: the pods' objects carry no address (as in a cluster, where the
//! kubelet writes them after the CNI ADD), the plugin is called after the plumbing as a
//! runtime calls it, and the time to its successful return (when a runtime would start the
//! pod, enforced) is measured, with the link pinned by then checked every time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use policy_testkit::testbed::{PrivateBpffs, Testbed, unique_suffix};
use serde_json::json;

const PODS: usize = 40;
const NODE: &str = "bench-node";

fn manifests(dir: &Path, with_addresses: bool) -> u64 {
    let mut docs = vec![json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": "default"}})];
    // The addresses the test bed gives its pods, in order (198.18.0.1, fd00:18::1, ...).
    for n in 1..=PODS {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{n}"), "namespace": "default",
                         "labels": {"app": "bench"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
        });
        if with_addresses {
            pod["status"] = json!({"podIP": format!("198.18.0.{n}"),
                                   "podIPs": [{"ip": format!("198.18.0.{n}")},
                                              {"ip": format!("fd00:18::{n:x}")}]});
        }
        docs.push(pod);
    }
    let text: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    std::fs::write(dir.join("pods.yaml"), text.join("\n---\n")).expect("manifests");
    policy_agent::manifests::content_hash(dir)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(
    bed: &Testbed,
    manifests: &Path,
    status: &Path,
    fs: &PrivateBpffs,
    poll_ms: u32,
    extra: &[&std::ffi::OsStr],
) -> Agent {
    let child = Command::new("ip")
        .args(["netns", "exec", bed.node.name()])
        .arg(env!("CARGO_BIN_EXE_policy-agent"))
        .arg("standalone")
        .arg("--manifests")
        .arg(manifests)
        .arg("--status-file")
        .arg(status)
        .arg("--bpf-dir")
        .arg(fs.path())
        .args(["--node-name", NODE, "--poll-ms", &poll_ms.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    Agent(child)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Milliseconds from the start of each pod's plumbing to its pinned `from_pod` link, and of
/// the plumbing alone.
fn run(poll_ms: u32) -> (Vec<f64>, Vec<f64>) {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let dir = std::env::temp_dir().join(format!("policy-attach-{}", unique_suffix()));
    let man = dir.join("manifests");
    std::fs::create_dir_all(&man).expect("dir");
    let status = dir.join("status.json");
    let generation = manifests(&man, true);
    let _agent = start(&bed, &man, &status, &fs, poll_ms, &[]);
    wait_for("the agent enforcing", Duration::from_secs(30), || {
        policy_agent::status_file::read(&status)
            .is_some_and(|s| s.generation == generation && s.waiting.len() == PODS)
    });
    let mut attach = Vec::new();
    let mut plumb = Vec::new();
    for _ in 0..PODS {
        let t0 = Instant::now();
        let i = bed.add_pod().expect("pod");
        plumb.push(t0.elapsed().as_secs_f64() * 1e3);
        let ifindex = bed.host_ifindex(i).expect("ifindex");
        let pin: PathBuf = fs
            .path()
            .join("links")
            .join(format!("{}@{ifindex}", bed.hosts[i].host_if))
            .join(policy_common::PROG_FROM_POD);
        wait_for("programs attached", Duration::from_secs(10), || {
            pin.exists()
        });
        attach.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    (attach, plumb)
}

/// Milliseconds from the start of each pod's plumbing to netpol-cni's successful return,
/// and of the plumbing alone.
fn run_with_plugin(poll_ms: u32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use policy_testkit::testbed::cni::{call_plugin, plugin_conf, prev_result};
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let dir = std::env::temp_dir().join(format!("policy-attach-cni-{}", unique_suffix()));
    let (man, conf_dir, bin_dir) = (dir.join("manifests"), dir.join("net.d"), dir.join("bin"));
    for d in [&man, &conf_dir, &bin_dir] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let conflist = conf_dir.join("10-podnet.conflist");
    let main = json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "ptp"}]});
    std::fs::write(&conflist, main.to_string()).expect("conflist");
    let status = dir.join("status.json");
    let generation = manifests(&man, false);
    let plugin_src = PathBuf::from(env!("CARGO_BIN_EXE_netpol-cni"));
    let extra: [&std::ffi::OsStr; 6] = [
        "--cni-conf-dir".as_ref(),
        conf_dir.as_os_str(),
        "--cni-bin-dir".as_ref(),
        bin_dir.as_os_str(),
        "--cni-plugin".as_ref(),
        plugin_src.as_os_str(),
    ];
    let _agent = start(&bed, &man, &status, &fs, poll_ms, &extra);
    let mut conf = serde_json::Value::Null;
    wait_for(
        "the agent enforcing, the plugin installed",
        Duration::from_secs(30),
        || {
            let list: serde_json::Value = std::fs::read_to_string(&conflist)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            if list["plugins"].as_array().is_some_and(|p| p.len() == 2) {
                conf = plugin_conf(&list, 1);
            }
            !conf.is_null()
                && policy_agent::status_file::read(&status)
                    .is_some_and(|s| s.generation == generation && s.waiting.len() == PODS)
        },
    );
    let plugin = bin_dir.join("netpol-cni");
    let mut started = Vec::new();
    let mut plumb = Vec::new();
    let mut status_calls = Vec::new();
    for n in 1..=PODS {
        let t0 = Instant::now();
        let i = bed.add_pod().expect("pod");
        plumb.push(t0.elapsed().as_secs_f64() * 1e3);
        let prev = prev_result(&bed.hosts[i], "1.0.0");
        let name = format!("p{n}");
        let out = call_plugin(
            &bed.node,
            &plugin,
            "ADD",
            ("default", &name),
            &conf,
            Some(&prev),
            Duration::from_secs(20),
        )
        .expect("run the plugin");
        started.push(t0.elapsed().as_secs_f64() * 1e3);
        assert_eq!(out.code, 0, "ADD failed: {out:?}");
        // The same process and socket round trip with nothing to wait for.
        let t1 = Instant::now();
        let out = call_plugin(
            &bed.node,
            &plugin,
            "STATUS",
            ("default", &name),
            &conf,
            None,
            Duration::from_secs(20),
        )
        .expect("run the plugin");
        assert_eq!(out.code, 0, "STATUS failed: {out:?}");
        status_calls.push(t1.elapsed().as_secs_f64() * 1e3);
        let ifindex = bed.host_ifindex(i).expect("ifindex");
        let pin = fs
            .path()
            .join("links")
            .join(format!("{}@{ifindex}", bed.hosts[i].host_if))
            .join(policy_common::PROG_FROM_POD);
        assert!(
            pin.exists(),
            "ADD returned before the programs were attached"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    (started, plumb, status_calls)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    println!("pod veth made -> its programs attached ({PODS} pods per run; ms)");
    for poll in [100, 1000] {
        let (attach, plumb) = run(poll);
        // After the plumbing returned (its last step is the pod's addresses, after the
        // routes the agent needs): what a runtime starting the pod next would see.
        let after: Vec<f64> = attach
            .iter()
            .zip(&plumb)
            .map(|(a, p)| (a - p).max(0.0))
            .collect();
        println!(
            "  --poll-ms {poll:>4}: attached p50 {:6.1}  p99 {:6.1}  | after the plumbing \
             returned p50 {:5.1}  p99 {:5.1}  | the plumbing itself p50 {:5.1}  p99 {:5.1}",
            pct(&attach, 0.5),
            pct(&attach, 0.99),
            pct(&after, 0.5),
            pct(&after, 0.99),
            pct(&plumb, 0.5),
            pct(&plumb, 0.99)
        );
    }
    println!("with netpol-cni: pod veth made -> the plugin's ADD returned, programs attached (ms)");
    let (started, plumb, status_calls) = run_with_plugin(1000);
    let after: Vec<f64> = started
        .iter()
        .zip(&plumb)
        .map(|(a, p)| (a - p).max(0.0))
        .collect();
    println!(
        "  --poll-ms 1000: ADD returned p50 {:6.1}  p99 {:6.1}  | after the plumbing \
         returned p50 {:5.1}  p99 {:5.1}  | a STATUS call (the plugin process via `ip netns \
         exec`, no wait) p50 {:5.1}  p99 {:5.1}",
        pct(&started, 0.5),
        pct(&started, 0.99),
        pct(&after, 0.5),
        pct(&after, 0.99),
        pct(&status_calls, 0.5),
        pct(&status_calls, 0.99),
    );
}
