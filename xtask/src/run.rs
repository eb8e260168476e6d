//! The composite tasks: test, bench, scenario.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{ebpf, setup};

pub fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

pub(crate) fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

pub(crate) fn status(what: &str, cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Setup and the kernel object: what every task that touches the kernel needs first.
pub(crate) fn prepare(root: &Path) -> Result<()> {
    let tools = setup::run()?;
    ebpf::build(root, &tools)
}

pub fn test(root: &Path) -> Result<()> {
    let t0 = Instant::now();
    prepare(root)?;
    // Kernel and namespace tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). They fail
    // rather than skip without it; say so up front so the failure is not a puzzle.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("test: not running as root: the kernel and namespace tests will fail");
    }
    lint(root)?;
    let totals = cargo_test(root)?;
    eprintln!(
        "test: all layers ran in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    // One closing line over every test binary (cargo prints one `test result` per binary).
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.ok {
        bail!("{} test(s) failed", totals.failed.max(1));
    }
    Ok(())
}

/// Formatting and lints, before any test: `cargo fmt --check` (the kernel crate too, which
/// is outside the workspace) and clippy with every warning an error.
fn lint(root: &Path) -> Result<()> {
    let t0 = Instant::now();
    status(
        "cargo fmt --check",
        cargo(root).args(["fmt", "--all", "--check"]),
    )?;
    status(
        "rustfmt --check policy-ebpf",
        Command::new("rustfmt").current_dir(root).args([
            "--edition",
            "2024",
            "--check",
            "policy-ebpf/src/main.rs",
        ]),
    )?;
    status(
        "cargo clippy",
        cargo(root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The agent as it ships: the tests' dev-dependencies turn its `test-support` feature on
    // above, so code used only there would hide unused items from the build that runs.
    status(
        "cargo clippy (agent as shipped)",
        cargo(root).args([
            "clippy",
            "-p",
            "policy-agent",
            "--lib",
            "--bins",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    eprintln!(
        "test: fmt and clippy clean ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ok: bool,
}

/// Runs `cargo test` on the workspace (the agent, its testkit, common, xtask), streaming its output and adding up the counts.
fn cargo_test(root: &Path) -> Result<Totals> {
    use std::io::{BufRead, BufReader};
    let mut child = cargo(root)
        .args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--color",
            "never",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut t = Totals::default();
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            t.passed += count(rest, " passed");
            t.failed += count(rest, " failed");
        }
    }
    t.ok = child.wait()?.success();
    Ok(t)
}

/// The number before `what` in a `test result:` line ("ok. 3 passed; 0 failed; ...").
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(what)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub fn bench(root: &Path, which: &[String]) -> Result<()> {
    let which: Vec<&str> = if which.is_empty() {
        vec!["datapath", "compile", "cluster"]
    } else {
        which.iter().map(String::as_str).collect()
    };
    // These load the kernel object (built by `prepare`) and need root.
    if which
        .iter()
        .any(|b| ["datapath", "attach", "scale", "peers", "latency"].contains(b))
    {
        prepare(root)?;
    }
    // `scale` and `latency` measure the release agent binary as a node runs it.
    if which.contains(&"scale") || which.contains(&"latency") {
        build_agent_release(root)?;
    }
    for b in which {
        let mut cmd = cargo(root);
        cmd.args(["bench", "-p", "policy-agent", "--bench", b]);
        if b == "scale" || b == "latency" {
            let agent = crate::demo::target_dir(root).join("release/policy-agent");
            cmd.env("BENCH_AGENT", agent);
        }
        status(&format!("bench {b}"), &mut cmd)?;
    }
    Ok(())
}

/// The cluster a scenario run builds (`policy-scenario`'s `--nodes`, `--network`, `--mode`)
/// and how many files run at once (`--jobs`).
pub struct Shape {
    pub nodes: usize,
    pub network: String,
    pub mode: String,
    pub jobs: usize,
}

pub fn scenario(
    root: &Path,
    simulate: bool,
    narrate: bool,
    shape: &Shape,
    files: &[PathBuf],
) -> Result<()> {
    if simulate {
        setup::run()?;
    } else {
        prepare(root)?;
    }
    if !simulate {
        // The kernel runner starts the agent binary it finds beside itself.
        build_agent_release(root)?;
    }
    let cwd = std::env::current_dir()?;
    let bin = crate::demo::target_dir(root).join("release");
    if simulate {
        status(
            "cargo build policy-scenario",
            cargo(root).args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "policy-testkit",
                "--bin",
                "policy-scenario",
            ]),
        )?;
    }
    let mut cmd = Command::new(bin.join("policy-scenario"));
    cmd.args(["--nodes", &shape.nodes.to_string()]).args([
        "--network",
        &shape.network,
        "--mode",
        &shape.mode,
        "--jobs",
        &shape.jobs.to_string(),
    ]);
    if narrate {
        cmd.arg("--narrate");
    }
    if simulate {
        cmd.arg("--simulate");
    } else {
        cmd.arg("--agent").arg(bin.join("policy-agent"));
    }
    // Paths are relative to where the user ran `cargo xtask`, not the workspace root.
    cmd.args(files.iter().map(|f| {
        if f.is_absolute() {
            f.clone()
        } else {
            cwd.join(f)
        }
    }));
    // Generous: the whole upstream set takes about two minutes.
    let limit = std::time::Duration::from_secs(120 + 60 * files.len() as u64);
    let st = crate::demo::run_runner(&mut cmd, limit)?;
    if crate::demo::interrupted() {
        crate::demo::exit_interrupted();
    }
    if !st.success() {
        bail!("policy-scenario failed ({st})");
    }
    Ok(())
}

/// Builds the agent and the scenario runner (release, both into target/release, where the
/// runner finds the agent beside itself): `cargo xtask scenario` and the demo start them.
pub fn build_agent_release(root: &Path) -> Result<()> {
    status(
        "cargo build policy-agent policy-scenario",
        cargo(root).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "policy-agent",
            "-p",
            "policy-testkit",
            "--bins",
        ]),
    )
}
