//! `cargo xtask demo`: the first thing a new user runs. Makes the machine ready, builds, then
//! tells the story of `scenarios/demo/` on the real kernel datapath: the standard model
//! (namespaces x, y, z; pods a, b, c) as network namespaces, the agent in standalone mode, a
//! policy from the seed documents per step with a plain-language explanation, the reachability
//! matrix and what changed. Everything it creates is removed at the end, also on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run::prepare;

/// Signals received while the demo runs; each is passed on to the runner once.
static SIGNALS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn tty() -> bool {
    // SAFETY: isatty has no preconditions.
    unsafe { libc::isatty(1) == 1 }
}

fn heading(text: &str) {
    if tty() {
        println!("\n\x1b[1;34m{text}\x1b[0m");
    } else {
        println!("\n{text}");
    }
}

/// `nodes`: how many nodes the demo cluster has (pods round-robin over them, one agent each).
pub fn demo(root: &Path, nodes: usize) -> Result<()> {
    let t0 = Instant::now();
    println!(
        "netpol-ebpf demo: Kubernetes NetworkPolicy enforced by eBPF programs, on real packets."
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root \
             (sudo -E env \"PATH=$PATH\" cargo xtask demo)"
        );
    }
    heading("[1/3] Preparing the machine and building (the first run takes a few minutes)");
    prepare(root)?;
    crate::run::build_agent_release(root)?;
    let bin = target_dir(root).join("release");
    let files = demo_files(root)?;

    heading("[2/3] The demo cluster");
    if nodes > 1 {
        println!(
            "{nodes} nodes: each a network namespace with its own agent (`policy-agent standalone\n\
             --node-name node-K`, its own bpffs), joined by an underlay bridge that carries the\n\
             traffic between them and on which the outside hosts sit. The pods go round-robin\n\
             over the nodes, so most connections below cross two nodes: the client's node\n\
             judges the client's egress, the server's node the server's ingress. Each pod\n\
             namespace hangs off its node by a veth pair, addresses from 198.18.0.0/15. Each step\n\
             writes the manifest directory all agents read, waits until every one reports it\n\
             enforced, then opens real TCP connections from every pod and outside host to every\n\
             other one."
        );
    } else {
        println!(
            "Everything lives in network namespaces this demo creates (nothing touches this machine's\n\
         own network): a node namespace, and one namespace per pod hanging off it by a veth pair,\n\
         routed like a CNI plugin does, with addresses from 198.18.0.0/15. The agent\n\
         (`policy-agent standalone`) runs in the node namespace: it reads the Namespaces, Pods\n\
         and NetworkPolicies of a manifest directory, compiles them into BPF maps, and attaches\n\
         the TC programs to each pod's host-side veth. Each step below writes that directory,\n\
         waits until the agent reports it enforced, then opens real TCP connections from every\n\
         pod and outside host to every other one."
        );
    }

    heading("[3/3] The story, step by step");
    let code = run_runner(
        Command::new(bin.join("policy-scenario"))
            .arg("--narrate")
            .args(["--nodes", &nodes.to_string()])
            .arg("--agent")
            .arg(bin.join("policy-agent"))
            .args(&files),
        Duration::from_secs(600),
    )?;
    println!();
    println!(
        "demo: {:.0} s in all (setup and build included)",
        t0.elapsed().as_secs_f64()
    );
    if interrupted() {
        exit_interrupted();
    }
    if !code.success() {
        bail!("the demo did not run as expected ({code}); see the messages above");
    }
    println!(
        "next: `cargo xtask test` runs every test layer; README.md shows standalone mode on an edge gateway"
    );
    Ok(())
}

/// Runs the scenario runner in its own process group, so a terminal's Ctrl-C reaches only this
/// process, which passes each signal on once: the runner gets one orderly stop and cleans up
/// (a second signal makes it quit at once). Waits for it to end.
pub fn run_runner(cmd: &mut Command, limit: Duration) -> Result<std::process::ExitStatus> {
    // Handlers (unlike SIG_IGN) are reset in the child by exec.
    install_handlers();
    let mut child = cmd
        .process_group(0)
        .spawn()
        .context("starting policy-scenario")?;
    let mut forwarded = 0;
    let started = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        // Bounded: past its time limit the runner is asked to stop (it cleans up), and killed
        // if it has not within a minute.
        if started.elapsed() > limit {
            match stopping_since {
                None => {
                    eprintln!("policy-scenario ran longer than {limit:?}: stopping it");
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                    stopping_since = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(60) => {
                    let _ = child.kill();
                }
                Some(_) => {}
            }
        }
        let seen = SIGNALS.load(Ordering::SeqCst);
        while forwarded < seen {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            forwarded += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the task after an interrupt the runner already reported and cleaned up after.
pub fn exit_interrupted() -> ! {
    eprintln!("interrupted");
    std::process::exit(130)
}

pub fn interrupted() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a plain handler that only touches an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn demo_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("scenarios/demo");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no demo scenario in {}", dir.display());
    }
    Ok(files)
}

use std::os::unix::process::CommandExt as _;
