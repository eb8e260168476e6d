//! `cargo bench -p policy-agent --bench latency` (or `cargo xtask bench latency`, as root):
//! how soon a policy change is enforced, end to end. The release agent runs in a node
//! namespace of the test bed; a client pod tries a TCP connection to a server pod every
//! millisecond (`latency/probe.rs`); a NetworkPolicy that opens the path, then one that
//! closes it again, is written to the agent's source (`agent_source.rs`), and the time from
//! the write's completion to the first attempt after which every attempt has the new outcome
//! is taken, for each change. Cases: an empty cluster (the two pods) and one with the scale
//! bench's 10,000 pods over 100 nodes and 1,000 policies already loaded (100 of the pods
//! local, on real veths); standalone (a manifest directory) and cluster mode (the fake API
//! server over HTTP). With the load, also a new pod: its manifest (or object) written and
//! its veth plumbed as a CNI would, to its programs attached and its endpoint written (the
//! status file naming its interface; every tenth one also checked by a dropped connection).
//!
//! Writes `target/bench/latency.json` and the `latency` section of `BENCHMARKS.md`. Knobs:
//! `LATENCY_CHANGES` (opens and closes each per case, default 100), `LATENCY_PODS` (new pods
//! per mode, default 40), `LATENCY_MODES` (default `standalone,cluster`), `BENCH_AGENT` (the
//! agent binary).

#[path = "agent_harness.rs"]
mod agent_harness;
// Shared with the scale bench, which uses all of it.
#[allow(dead_code)]
#[path = "scale/objects.rs"]
mod objects;
#[path = "latency/probe.rs"]
mod probe;
#[path = "latency/reading.rs"]
mod reading;
#[path = "latency/report.rs"]
mod report;
#[path = "agent_source.rs"]
mod source;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_harness::{AgentProc, AgentSpec, uninstall};
use anyhow::{Context, Result, bail};
use objects::{LOCAL_NODE, Load, NAMESPACES};
use policy_testkit::testbed::{PrivateBpffs, Testbed, unique_suffix};
use probe::{Prober, Sink};
use serde_json::{Value, json};
use source::Source;

/// The server's port (the sink listens there).
const PORT: u16 = 8080;
const LAT_NS: &str = "lat";
const TOGGLE_FILE: &str = "lat-toggle.yaml";
/// How often the client tries.
const EVERY: Duration = Duration::from_millis(1);
/// An attempt with no answer by then had its SYN dropped (SYN retransmission is at 1 s).
const DEADLINE: Duration = Duration::from_millis(80);
/// How long every attempt after a turn must agree before the turn is taken.
const SETTLE: Duration = Duration::from_millis(100);
/// A change not seen enforced by then counts as missed.
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
/// Changes after the agent's start not counted (one open, one close).
const WARM_UP: usize = 2;
/// A change slower than this is named on the console.
const SLOW: Duration = Duration::from_millis(100);
const START_LIMIT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Standalone,
    Cluster,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Cluster => "cluster",
        }
    }
}

/// What one (mode, load) measured.
#[derive(Debug, Default)]
pub struct Case {
    pub open: Vec<Duration>,
    pub close: Vec<Duration>,
    /// Changes not seen enforced within [`CHANGE_LIMIT`].
    pub missed: usize,
    /// Pod manifest written -> its interface attached (loaded cases only).
    pub pod_start: Vec<Duration>,
    /// The plumbing alone (veth, addresses, routes), part of `pod_start`.
    pub plumbing: Vec<Duration>,
    /// Agent start to full enforcement.
    pub started: Duration,
}

struct Knobs {
    changes: usize,
    pods: usize,
    modes: Vec<Mode>,
    agent: PathBuf,
}

fn knobs() -> Knobs {
    let num = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let modes = std::env::var("LATENCY_MODES").unwrap_or_else(|_| "standalone,cluster".into());
    Knobs {
        changes: num("LATENCY_CHANGES", 100).max(1),
        pods: num("LATENCY_PODS", 40),
        modes: [Mode::Standalone, Mode::Cluster]
            .into_iter()
            .filter(|m| modes.split(',').any(|s| s.trim() == m.name()))
            .collect(),
        agent: std::env::var_os("BENCH_AGENT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_policy-agent"))),
    }
}

/// The bed, its private bpffs and a scratch directory (removed on drop).
struct Node {
    bed: Testbed,
    fs: PrivateBpffs,
    scratch: PathBuf,
    client: usize,
    server: usize,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn pod(name: &str, app: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": LAT_NS, "labels": {"app": app}},
        "spec": {"nodeName": LOCAL_NODE, "containers": [{"name": "c", "image": "x",
                 "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": v4.to_string(),
                   "podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}]},
    })
}

/// The client and server pods, and a policy isolating the server's ingress (nothing
/// admitted): the path is closed until the toggled policy opens it.
fn lat_objects(node: &Node) -> Vec<Value> {
    let (c, s) = (&node.bed.hosts[node.client], &node.bed.hosts[node.server]);
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": LAT_NS, "labels": {"kubernetes.io/metadata.name": LAT_NS}}}),
        pod("client", "lat-client", c.ipv4, c.ipv6),
        pod("server", "lat-server", s.ipv4, s.ipv6),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "isolate", "namespace": LAT_NS},
               "spec": {"podSelector": {"matchLabels": {"app": "lat-server"}},
                        "policyTypes": ["Ingress"]}}),
    ]
}

/// The changing policy: it admits the client to the server's port, or (closed) a pod
/// that does not exist.
fn toggle(open: bool) -> Value {
    let from = if open { "lat-client" } else { "lat-nobody" };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "toggle", "namespace": LAT_NS},
           "spec": {"podSelector": {"matchLabels": {"app": "lat-server"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                                 "ports": [{"protocol": "TCP", "port": PORT}]}]}})
}

fn main() -> Result<()> {
    let k = knobs();
    let t0 = Instant::now();
    let mut bed = Testbed::new().context("node namespace (needs root)")?;
    for _ in 0..NAMESPACES {
        bed.add_pod().context("adding a local pod")?;
    }
    let client = bed.add_pod()?;
    let server = bed.add_pod()?;
    let fs = PrivateBpffs::mount().context("private bpffs")?;
    let scratch = std::env::temp_dir().join(format!("policy-latency-{}", unique_suffix()));
    std::fs::create_dir_all(&scratch)?;
    let mut node = Node {
        bed,
        fs,
        scratch,
        client,
        server,
    };
    println!(
        "latency: a connection attempt every {EVERY:?} (deadline {DEADLINE:?}); {} opens and \
         {} closes per case; {} new pods per mode with the load; agent {} (bed ready after {:.0} s)",
        k.changes,
        k.changes,
        k.pods,
        k.agent.display(),
        t0.elapsed().as_secs_f64()
    );
    let to_server = SocketAddr::new(IpAddr::V4(node.bed.hosts[server].ipv4), PORT);
    let _sink = Sink::start(node.bed.hosts[server].ns.name(), to_server)?;
    let prober = Prober::start(node.bed.hosts[client].ns.name(), to_server, EVERY, DEADLINE)?;
    let mut cases = Vec::new();
    for &mode in &k.modes {
        for load in [Load::Empty, Load::Full] {
            let case = run_case(&mut node, &k, mode, load, &prober)
                .with_context(|| format!("{} {}", mode.name(), load.name()))?;
            report::print_case(mode, load, &case);
            cases.push((mode, load, case));
        }
    }
    prober.finish()?;
    report::write(&cases, k.changes, t0.elapsed())?;
    eprintln!("latency: done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_case(node: &mut Node, k: &Knobs, mode: Mode, load: Load, prober: &Prober) -> Result<Case> {
    let local: Vec<_> = node.bed.hosts[..NAMESPACES]
        .iter()
        .map(|h| (h.ipv4, h.ipv6))
        .collect();
    let mut objs: Vec<Value> = Vec::new();
    if load == Load::Full {
        objs.extend(objects::generate(Load::Full, &local).all().cloned());
    }
    objs.extend(lat_objects(node));
    let tag = format!("{}-{}", mode.name(), load.name());
    let scratch = node.scratch.join(&tag);
    std::fs::create_dir_all(&scratch)?;
    let source = match mode {
        Mode::Standalone => Source::dir(&scratch, objs.iter())?,
        Mode::Cluster => Source::api(&node.bed, &scratch, objs.iter())?,
    };
    // The toggled policy in a file of its own (written before the agent starts, closed).
    source.write(TOGGLE_FILE, &toggle(false))?;
    let (args, env) = source.agent_args();
    let spec = AgentSpec {
        binary: &k.agent,
        args,
        env,
        node_name: LOCAL_NODE,
    };
    let status = scratch.join("status.json");
    let started = Instant::now();
    let mut agent = AgentProc::start(
        &node.bed,
        &node.fs,
        &spec,
        &status,
        &scratch.join("agent.log"),
    )?;
    let generation = source.generation();
    let local_pods = 2 + if load == Load::Full { NAMESPACES } else { 0 };
    let measured = agent
        .wait_status(&status, START_LIMIT, Duration::from_millis(5), |s| {
            s.generation == generation && s.waiting.is_empty() && s.attached.len() >= local_pods
        })
        .context("the agent enforcing at start")
        .and_then(|_| {
            let started = started.elapsed();
            let mut case = changes(&source, prober, &mut agent, k.changes)?;
            case.started = started;
            if load == Load::Full {
                pod_starts(node, &source, &mut agent, &status, k.pods, &mut case)?;
            }
            Ok(case)
        });
    let stopped = agent.stop();
    if std::env::var_os("BENCH_AGENT_LOG").is_some() {
        // Kept for a closer look (the scratch directory goes).
        let keep =
            policy_testkit::bench_report::target_dir().join(format!("bench/latency-{tag}.log"));
        let _ = std::fs::copy(scratch.join("agent.log"), &keep);
        eprintln!("  agent log kept in {}", keep.display());
    }
    let uninstalled = uninstall(&node.bed, &node.fs, &k.agent);
    let case = measured?;
    stopped?;
    uninstalled?;
    Ok(case)
}

/// `n` opens and `n` closes, alternating, each timed from its write to the turn the prober
/// sees. One open and close before them are not counted: the first change after the
/// agent's start meets its watches still opening (cluster mode, up to a few hundred ms).
fn changes(source: &Source, prober: &Prober, agent: &mut AgentProc, n: usize) -> Result<Case> {
    let mut case = Case::default();
    for i in 0..2 * n + WARM_UP {
        let open = i % 2 == 0;
        prober.forget_before(Instant::now() - Duration::from_secs(1));
        let written = source.write(TOGGLE_FILE, &toggle(open))?;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let (attempts, through) = prober.since(written);
            if let Some(d) = probe::turned(&attempts, through, written, open, SETTLE) {
                if d > SLOW {
                    let wrong = attempts.iter().filter(|a| a.ok != open).count();
                    eprintln!(
                        "  change {i} ({}): {:.1} ms ({wrong} attempts the other way after the write)",
                        if open { "open" } else { "close" },
                        d.as_secs_f64() * 1e3
                    );
                }
                if i < WARM_UP {
                } else if open {
                    case.open.push(d);
                } else {
                    case.close.push(d);
                }
                break;
            }
            if written.elapsed() > CHANGE_LIMIT {
                agent.check_alive()?;
                eprintln!(
                    "  change {i} ({}) not seen enforced within {CHANGE_LIMIT:?}",
                    if open { "open" } else { "close" }
                );
                case.missed += 1;
                break;
            }
        }
    }
    Ok(case)
}

/// New pods, isolated by the `isolate` policy: manifest (or object) written, veth plumbed,
/// until the status file names the interface as attached.
fn pod_starts(
    node: &mut Node,
    source: &Source,
    agent: &mut AgentProc,
    status: &Path,
    n: usize,
    case: &mut Case,
) -> Result<()> {
    for j in 0..n {
        // The test bed numbers its pods 198.18.0.1, .2, ... in order.
        let next = node.bed.hosts.len() + 1;
        let v4 = Ipv4Addr::new(198, 18, 0, u8::try_from(next).context("test bed full")?);
        let v6 = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, next as u16);
        let name = format!("new-{}-{j}", unique_suffix());
        let t0 = Instant::now();
        source.write(&format!("{name}.yaml"), &pod(&name, "lat-server", v4, v6))?;
        let i = node.bed.add_pod()?;
        let plumbed = t0.elapsed();
        if node.bed.hosts[i].ipv4 != v4 {
            bail!(
                "the test bed gave {} where {v4} was expected",
                node.bed.hosts[i].ipv4
            );
        }
        let host_if = node.bed.hosts[i].host_if.clone();
        agent.wait_status(status, CHANGE_LIMIT, Duration::from_millis(1), |s| {
            s.attached.contains(&host_if)
        })?;
        case.pod_start.push(t0.elapsed());
        case.plumbing.push(plumbed);
        if j % 10 == 0 {
            check_dropped(node, SocketAddr::new(IpAddr::V4(v4), PORT))?;
        }
    }
    Ok(())
}

/// A connection from the client to `to` has its SYN dropped (enforced), not refused by the
/// empty port (not enforced).
fn check_dropped(node: &Node, to: SocketAddr) -> Result<()> {
    let r = node.bed.hosts[node.client].ns.enter(|| {
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(150)).map(|_| ())
    })?;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        other => bail!("a new pod attached but not enforcing: a denied connection got {other:?}"),
    }
}
