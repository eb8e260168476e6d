//! Shared by the restart tests: manifests for the test bed's pods, the agent binary run in
//! the node namespace (killed on drop), and its status file.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use policy_agent::status_file::Status;
use policy_testkit::testbed::{PrivateBpffs, Testbed, unique_suffix};
use serde_json::{Value, json};

pub const NODE: &str = "node-1";

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("policy-{tag}-{}", unique_suffix()));
        std::fs::create_dir_all(p.join("manifests")).expect("temp dir");
        TempDir(p)
    }
    pub fn manifests(&self) -> PathBuf {
        self.0.join("manifests")
    }
    pub fn status(&self) -> PathBuf {
        self.0.join("status.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pod manifest for test-bed host `i` labelled `app=<app>`.
pub fn pod(bed: &Testbed, i: usize, app: &str) -> Value {
    let h = &bed.hosts[i];
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": app, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "test"}]},
        "status": {"podIP": h.ipv4.to_string(),
                   "podIPs": [{"ip": h.ipv4.to_string()}, {"ip": h.ipv6.to_string()}]},
    })
}

/// A policy selecting `app=<target>` whose ingress admits `app=<from>` on TCP `tcp` and
/// UDP `udp`.
pub fn ingress_from(name: &str, target: &str, from: &str, tcp: u16, udp: u16) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": from}}}],
                "ports": [{"protocol": "TCP", "port": tcp}, {"protocol": "UDP", "port": udp}],
            }],
        },
    })
}

/// Writes the manifests atomically (the agent ignores dot files) and returns the
/// generation the agent will report for them.
/// Serves `api` on the node namespace's 127.0.0.1 and writes a kubeconfig for it; serving
/// lasts as long as the returned value.
pub fn serve_api(
    api: &policy_testkit::fake_api::FakeApi,
    bed: &Testbed,
    dir: &TempDir,
) -> (policy_testkit::fake_api::Served, PathBuf) {
    let served = api
        .serve_in(&bed.node, std::net::Ipv4Addr::LOCALHOST.into())
        .expect("serve the fake API server");
    let path = dir.0.join("kubeconfig");
    std::fs::write(&path, served.kubeconfig()).expect("kubeconfig");
    (served, path)
}

pub fn write_manifests(dir: &Path, docs: &[Value]) -> u64 {
    let mut all = vec![json!({"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": "default", "labels": {}}})];
    all.extend(docs.iter().cloned());
    let text: Vec<String> = all
        .iter()
        .map(|d| serde_json::to_string(d).expect("json"))
        .collect();
    let tmp = dir.join(".cluster.yaml.tmp");
    std::fs::write(&tmp, text.join("\n---\n") + "\n").expect("write manifests");
    std::fs::rename(&tmp, dir.join("cluster.yaml")).expect("rename manifests");
    policy_agent::manifests::content_hash(dir)
}

/// The agent binary in standalone mode inside the node namespace; SIGKILLed on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(bed: &Testbed, dir: &TempDir, fs: &PrivateBpffs, extra: &[&str], n: u32) -> Agent {
        Self::start_standalone(bed, dir, fs, Duration::from_millis(20), extra, n)
    }

    /// [`Agent::start`] with the directory polled every `poll` instead of 20 ms.
    pub fn start_polling(
        bed: &Testbed,
        dir: &TempDir,
        fs: &PrivateBpffs,
        poll: Duration,
        n: u32,
    ) -> Agent {
        Self::start_standalone(bed, dir, fs, poll, &[], n)
    }

    fn start_standalone(
        bed: &Testbed,
        dir: &TempDir,
        fs: &PrivateBpffs,
        poll: Duration,
        extra: &[&str],
        n: u32,
    ) -> Agent {
        let _ = std::fs::remove_file(dir.status());
        let (manifests, status) = (dir.manifests(), dir.status());
        let poll_ms = poll.as_millis().to_string();
        let args: [&std::ffi::OsStr; 7] = [
            "standalone".as_ref(),
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--status-file".as_ref(),
            status.as_os_str(),
            "--poll-ms".as_ref(),
            poll_ms.as_ref(),
        ];
        Self::spawn(bed, dir, fs, &args, extra, &[], n)
    }

    /// `policy-agent cluster` against the API server named in `kubeconfig`, serving its
    /// health endpoints on the node namespace's 127.0.0.1:`metrics_port`.
    pub fn start_cluster(
        bed: &Testbed,
        dir: &TempDir,
        fs: &PrivateBpffs,
        kubeconfig: &Path,
        metrics_port: u16,
        extra: &[&str],
        n: u32,
    ) -> Agent {
        let addr = format!("127.0.0.1:{metrics_port}");
        let args: Vec<&std::ffi::OsStr> = vec![
            "cluster".as_ref(),
            "--metrics-addr".as_ref(),
            addr.as_ref(),
            "--debounce-ms".as_ref(),
            "10".as_ref(),
        ];
        Self::spawn(bed, dir, fs, &args, extra, &[("KUBECONFIG", kubeconfig)], n)
    }

    fn spawn(
        bed: &Testbed,
        dir: &TempDir,
        fs: &PrivateBpffs,
        args: &[&std::ffi::OsStr],
        extra: &[&str],
        env: &[(&str, &Path)],
        n: u32,
    ) -> Agent {
        let log = dir.0.join(format!("agent-{n}.log"));
        let out = File::create(&log).expect("agent log");
        let err = out.try_clone().expect("agent log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", bed.node.name()])
            .arg(env!("CARGO_BIN_EXE_policy-agent"))
            .args(args)
            .args(["--node-name", NODE])
            .arg("--bpf-dir")
            .arg(fs.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the agent");
        Agent {
            child: Some(child),
            log,
        }
    }

    /// Waits until the agent's /readyz answers 200 (stores listed and the first write done).
    pub fn wait_ready(&mut self, bed: &Testbed, metrics_port: u16) {
        use std::io::{Read as _, Write as _};
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = bed
                .node
                .enter(|| {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")?;
                    let mut text = String::new();
                    s.read_to_string(&mut text)?;
                    Ok::<_, std::io::Error>(
                        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
                    )
                })
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
            if ready {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(exit)) = c.try_wait()
            {
                panic!("the agent exited ({exit}): {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "the agent was not ready within 30 s: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs the agent: the child's pid is the agent's.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until the status file reports `generation` with `attached` interfaces and
    /// nothing waiting; panics with the agent's log otherwise.
    pub fn wait_generation(&mut self, status: &Path, generation: u64, attached: usize) -> Status {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = policy_agent::status_file::read(status)
                && s.generation == generation
                && s.waiting.is_empty()
                && s.attached.len() == attached
            {
                return s;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(exit)) = c.try_wait()
            {
                panic!("the agent exited ({exit}): {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not report generation {generation} within 30 s (status {:?}): {}",
                policy_agent::status_file::read(status),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sets the flag when dropped: traffic threads of a scope stop also when the test panics
/// inside it (else the scope would wait for them forever).
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs `policy-agent uninstall` in the node namespace.
pub fn uninstall(bed: &Testbed, fs: &PrivateBpffs) {
    uninstall_with(bed, fs, &[]);
}

/// [`uninstall`] with more arguments (`--cni-conf-dir ...`).
pub fn uninstall_with(bed: &Testbed, fs: &PrivateBpffs, extra: &[&std::ffi::OsStr]) {
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", bed.node.name()])
        .arg(env!("CARGO_BIN_EXE_policy-agent"))
        .arg("uninstall")
        .arg("--bpf-dir")
        .arg(fs.path())
        .args(extra)
        .output()
        .expect("run uninstall");
    assert!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files left under a bpffs directory (recursively), less the kernel's own iterators
/// (`maps.debug`, `progs.debug`) present at every bpffs root.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if matches!(e.file_name().to_str(), Some("maps.debug" | "progs.debug")) {
                continue;
            }
            if p.is_dir() {
                out.extend(files_under(&p));
                out.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
