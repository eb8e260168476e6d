//! `cargo bench -p policy-agent --bench attach` (or `cargo xtask bench attach`): how soon a
//! new pod's veth carries the programs. The standalone agent runs in a node namespace with
//! the pods already in its manifests (waiting for their interfaces); each pod's veth and
//! routes are then made as a CNI plugin does, and the time from the start of that to the
//! pod's pinned `from_pod` link is measured. Run with the poll at 100 ms and at 1 s: with
//! the kernel's link notifications the programs follow the route, not the poll.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use policy_testkit::testbed::{PrivateBpffs, Testbed, unique_suffix};
use serde_json::json;

const PODS: usize = 40;
const NODE: &str = "bench-node";

fn manifests(dir: &Path) -> u64 {
    let mut docs = vec![json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": "default"}})];
    // The addresses the test bed gives its pods, in order (198.18.0.1, fd00:18::1, ...).
    for n in 1..=PODS {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{n}"), "namespace": "default",
                         "labels": {"app": "bench"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": format!("198.18.0.{n}"),
                       "podIPs": [{"ip": format!("198.18.0.{n}")},
                                  {"ip": format!("fd00:18::{n:x}")}]},
        }));
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

fn start(bed: &Testbed, manifests: &Path, status: &Path, fs: &PrivateBpffs, poll_ms: u32) -> Agent {
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
    let generation = manifests(&man);
    let _agent = start(&bed, &man, &status, &fs, poll_ms);
    wait_for("the agent enforcing", Duration::from_secs(30), || {
        policy_agent::standalone::read_status(&status)
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
}
