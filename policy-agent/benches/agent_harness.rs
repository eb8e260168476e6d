//! The release agent as a process in a test bed's node namespace, for the benches that
//! time it end to end (`latency`): started with its arguments and environment, its status
//! file waited on, stopped with SIGTERM (SIGKILLed when dropped), and everything it pinned
//! removed after.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use policy_agent::status_file::Status;
use policy_testkit::testbed::{PrivateBpffs, Testbed};

/// A child gets SIGTERM when the bench's thread that started it exits, so no agent
/// outlives a bench that panicked or was killed.
pub fn end_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How to start one agent: its binary, arguments (mode first) and environment.
pub struct AgentSpec<'a> {
    pub binary: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, PathBuf)>,
    pub node_name: &'a str,
}

/// The agent process: SIGKILLed and reaped on drop unless stopped before.
pub struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    /// Starts the agent in `bed`'s node namespace on the pins of `fs`, writing `status`.
    pub fn start(
        bed: &Testbed,
        fs: &PrivateBpffs,
        spec: &AgentSpec<'_>,
        status: &Path,
        log: &Path,
    ) -> Result<AgentProc> {
        let _ = std::fs::remove_file(status);
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", bed.node.name()])
            .arg(spec.binary)
            .args(&spec.args)
            .args(["--node-name", spec.node_name, "--bpf-dir"])
            .arg(fs.path())
            .arg("--status-file")
            .arg(status)
            // `BENCH_AGENT_LOG` (a RUST_LOG filter) for a closer look at a run.
            .env(
                "RUST_LOG",
                std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        end_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting the agent")?;
        Ok(AgentProc {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        // `ip netns exec` execs the agent: the child's pid is the agent's.
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails when the agent has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(exit) = self.child.try_wait()? {
            bail!("the agent exited ({exit}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Waits until the status file satisfies `done`, looking every `every`; fails after
    /// `limit` or when the agent exits. Returns the status that satisfied it.
    pub fn wait_status(
        &mut self,
        status: &Path,
        limit: Duration,
        every: Duration,
        mut done: impl FnMut(&Status) -> bool,
    ) -> Result<Status> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = policy_agent::status_file::read(status)
                && done(&s)
            {
                return Ok(s);
            }
            self.check_alive()?;
            if t0.elapsed() > limit {
                bail!(
                    "not within {limit:?} (status {:?}):\n{}",
                    policy_agent::status_file::read(status).map(|s| (
                        s.generation,
                        s.attached.len(),
                        s.waiting.len(),
                        s.problems
                    )),
                    self.log_tail()
                );
            }
            std::thread::sleep(every);
        }
    }

    /// SIGTERM (the way a DaemonSet pod ends), then SIGKILL if it lingers.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    eprintln!("  agent exited with {st} on SIGTERM");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the agent did not exit within 20 s of SIGTERM")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Detaches and unpins everything an agent left, so the next one starts fresh.
pub fn uninstall(bed: &Testbed, fs: &PrivateBpffs, binary: &Path) -> Result<()> {
    let out = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", bed.node.name()])
        .arg(binary)
        .arg("uninstall")
        .arg("--bpf-dir")
        .arg(fs.path())
        .output()
        .context("running policy-agent uninstall")?;
    if !out.status.success() {
        bail!("uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered network namespace `ns` (by its name under
/// `/run/netns`) for good: sockets it makes live there.
pub fn spawn_in<R: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<R>>> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("namespace {ns}"))?;
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })?;
    Ok(handle)
}
