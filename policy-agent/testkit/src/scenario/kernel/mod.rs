//! The kernel runner: each scenario on the real datapath. Setup builds the hosts as network
//! namespaces (`hosts`: a namespace per node, pods off their node, several nodes on a routed
//! underlay), starts echo servers and SCTP responders (`probe`), installs the ClusterIP DNAT
//! rules on every node and starts one agent binary per node in standalone mode inside the
//! node's namespace, each on its own bpffs and node name, all reading one manifest directory.
//! Each step writes the step's objects as manifests, waits until every agent reports that
//! exact directory content enforced with its pods' interfaces attached, then runs the probes
//! with real sockets in parallel. Long-lived connections (`connections`) keep their sockets
//! across steps and are closed at the end of every plan, also when the hosts are kept. Everything is removed on teardown, on error and on panic
//! (drop guards), and on SIGINT, SIGTERM or SIGHUP (`cleanup`: the runner stops at its next
//! wait); leftovers of runs killed outright are swept when the next runner starts.

pub mod cleanup;
pub mod connections;
pub mod hosts;
pub mod probe;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::apply::State;
use super::connections::Connection;
use super::manifests;
use super::plan::Probe;
use super::run::{Oracle, OracleError};
use super::topology::{EndpointName, Topology};
use crate::fake_api::{FakeApi, Kind, Served};
use crate::testbed::PrivateBpffs;
use connections::{OpenConnections, OpenJob};
use hosts::Hosts;
use policy_agent::model::ObjectKey;
use probe::{Job, Servers};

/// The ClusterIP ranges of the topology ([`super::topology::service_v4`] / `service_v6`):
/// the agent judges egress to them on the DNAT backend. IPv4 ClusterIPs run from
/// 198.18.128.1 to 198.18.253.255; the node's own address (198.18.255.254) must stay
/// outside, so the /17 is cut short.
pub const SERVICE_CIDRS: [&str; 7] = [
    "198.18.128.0/18",
    "198.18.192.0/19",
    "198.18.224.0/20",
    "198.18.240.0/21",
    "198.18.248.0/22",
    "198.18.252.0/23",
    "fd00:18::2:0/112",
];

#[derive(Clone, Debug)]
pub struct KernelConfig {
    /// The `policy-agent` binary.
    pub agent: PathBuf,
    /// How long a probe may take before it counts as denied.
    pub probe_timeout: Duration,
    /// How many probes run at once.
    pub parallel: usize,
    /// How long the agent may take to enforce a step.
    pub apply_timeout: Duration,
    /// The same for the first step after agents start: loading and verifying the programs
    /// takes seconds of CPU per agent, and several runs may start agents at once.
    pub start_timeout: Duration,
    /// Keep the hosts and the agent after a scenario, for the next one when its topology is
    /// the same (most files use the standard model): saves building namespaces and starting
    /// the agent per file. Its first step replaces every object the previous file left.
    pub reuse_hosts: bool,
    /// How several nodes reach each other's pods (ignored on one node).
    pub network: hosts::Network,
    /// Where the agents read the objects from.
    pub mode: Mode,
}

/// Where the agents read the scenario's objects from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// `policy-agent standalone`: every agent reads one manifest directory.
    #[default]
    Standalone,
    /// `policy-agent cluster`: every agent lists and watches one fake API server over HTTP
    /// (on the underlay, or on the node's loopback with one node), which the runner writes
    /// the objects to; now and then a kind's watches get 410 Gone (re-list), and every
    /// write ends with a bookmark.
    Cluster,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standalone" => Ok(Mode::Standalone),
            "cluster" => Ok(Mode::Cluster),
            other => Err(format!("mode {other:?}: standalone or cluster")),
        }
    }
}

impl KernelConfig {
    pub fn new(agent: PathBuf) -> KernelConfig {
        KernelConfig {
            agent,
            probe_timeout: Duration::from_secs(1),
            parallel: 256,
            apply_timeout: Duration::from_secs(20),
            start_timeout: Duration::from_secs(120),
            reuse_hosts: false,
            network: hosts::Network::Routed,
            mode: Mode::Standalone,
        }
    }
}

pub struct KernelOracle {
    cfg: KernelConfig,
    run: Option<Run>,
}

/// What one scenario built; the field order is the teardown order.
struct Run {
    /// Long-lived connections (closed first: their sockets live in the hosts' namespaces).
    connections: OpenConnections,
    /// What it was built for.
    topology: Topology,
    /// One per node, in the topology's order.
    agents: Vec<AgentProcess>,
    /// Cluster mode: the API server the agents watch (served until dropped, after them).
    api: Option<(FakeApi, Served)>,
    servers: Servers,
    ns_files: Vec<File>,
    /// Namespace index (into `ns_files`) of each pod.
    pod_ns: BTreeMap<ObjectKey, usize>,
    /// Namespace index (into `ns_files`) and index into `hosts.externals` of each external.
    external_ns: BTreeMap<String, (usize, usize)>,
    hosts: Hosts,
    /// One per node: each agent pins its own maps.
    bpffs: Vec<PrivateBpffs>,
    /// Steps applied so far (cluster mode expires a kind's watches every few).
    applied: usize,
    /// The node each pod is on now (steps move pods), by pod index.
    placed: Vec<usize>,
    /// Whether every agent has enforced a step since it (re)started.
    started: bool,
    dir: TempDir,
}

fn fail(what: &str, e: impl std::fmt::Display) -> OracleError {
    OracleError::Failed(format!("{what}: {e}"))
}

impl KernelOracle {
    /// Catches interrupts (see `cleanup`) and, once per process, removes leftovers of
    /// killed runs.
    pub fn new(cfg: KernelConfig) -> KernelOracle {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        cleanup::install_interrupt_handler();
        SWEEP.call_once(|| {
            let s = cleanup::sweep_leftovers();
            if !s.is_empty() {
                eprintln!(
                    "removed leftovers of killed scenario runs: {} namespace(s), {} dir(s), {} agent process(es)",
                    s.namespaces.len(),
                    s.dirs.len(),
                    s.processes.len()
                );
            }
        });
        KernelOracle { cfg, run: None }
    }

    fn build(&self, topo: &Topology) -> Result<Run, OracleError> {
        if !self.cfg.agent.is_file() {
            return Err(OracleError::Failed(format!(
                "agent binary {} not found (build it: cargo build --release -p policy-agent --bins)",
                self.cfg.agent.display()
            )));
        }
        let tag = crate::testbed::pid_tag();
        let dir =
            TempDir::create(&format!("policy-scenario-{tag}")).map_err(|e| fail("temp dir", e))?;
        let manifests = dir.0.join("manifests");
        std::fs::create_dir(&manifests).map_err(|e| fail("manifest dir", e))?;
        let hosts =
            Hosts::build(topo, &tag, self.cfg.network).map_err(|e| fail("namespaces", e))?;
        check_interrupt()?;
        for node in &hosts.nodes {
            hosts::install_services(node, topo, &dir.0).map_err(|e| fail("service rules", e))?;
        }

        let mut ns_files = Vec::new();
        let mut open = |name: &str| -> Result<usize, OracleError> {
            let f = File::open(format!("/run/netns/{name}")).map_err(|e| fail(name, e))?;
            ns_files.push(f);
            Ok(ns_files.len() - 1)
        };
        let mut node_ns = Vec::new();
        for node in &hosts.nodes {
            node_ns.push(open(node.name())?);
        }
        let mut pod_ns = BTreeMap::new();
        for p in &topo.pods {
            let i = match &hosts.pods[p.index] {
                Some(ns) => open(ns.name())?,
                None => node_ns[p.node],
            };
            pod_ns.insert(p.key.clone(), i);
        }
        let mut external_ns = BTreeMap::new();
        for (i, e) in topo.externals.iter().enumerate() {
            external_ns.insert(e.name.clone(), (open(hosts.externals[i].name())?, i));
        }

        // Pods serve their container ports on their addresses (hostNetwork pods: the node's).
        let mut servers = Servers::default();
        for p in &topo.pods {
            let ns = hosts.pod_ns(topo, p.index);
            for port in &p.ports {
                for addr in [IpAddr::from(p.v4), IpAddr::from(p.v6)] {
                    servers
                        .ensure(ns, addr, port.protocol, port.port)
                        .map_err(|e| {
                            fail(
                                &format!(
                                    "server {} {addr} {}/{}",
                                    p.key,
                                    port.protocol.as_str(),
                                    port.port
                                ),
                                e,
                            )
                        })?;
                }
            }
        }

        let api = match self.cfg.mode {
            Mode::Standalone => None,
            Mode::Cluster => {
                let api = FakeApi::default();
                // On the underlay like a real control plane; one node has none, so there
                // it listens on the node's loopback.
                let served = match &hosts.underlay {
                    Some(u) => api.serve_in(u, hosts::API_SERVER_V4.into()),
                    None => api.serve_in(&hosts.nodes[0], Ipv4Addr::LOCALHOST.into()),
                }
                .map_err(|e| fail("serving the fake API server", e))?;
                std::fs::write(dir.0.join("kubeconfig"), served.kubeconfig())
                    .map_err(|e| fail("kubeconfig", e))?;
                Some((api, served))
            }
        };
        let mut agents = Vec::new();
        let mut bpffs = Vec::new();
        for (k, node) in topo.nodes.iter().enumerate() {
            let fs = PrivateBpffs::mount().map_err(|e| fail("bpffs", e))?;
            agents.push(self.start_agent(&hosts.nodes[k], &node.name, fs.path(), &dir.0, k)?);
            bpffs.push(fs);
        }
        Ok(Run {
            connections: OpenConnections::default(),
            topology: topo.clone(),
            agents,
            api,
            applied: 0,
            placed: topo.pods.iter().map(|p| p.node).collect(),
            started: false,
            servers,
            ns_files,
            pod_ns,
            external_ns,
            hosts,
            bpffs,
            dir,
        })
    }

    /// Starts node number `k`'s agent in its namespace under its own node name, with its own
    /// bpffs, status file and log: standalone on the shared manifest directory, or cluster
    /// on the fake API server.
    fn start_agent(
        &self,
        ns: &crate::testbed::Netns,
        node_name: &str,
        bpf_dir: &Path,
        dir: &Path,
        k: usize,
    ) -> Result<AgentProcess, OracleError> {
        // Appended: a restarted agent's log follows its predecessor's.
        let log = File::options()
            .create(true)
            .append(true)
            .open(agent_log(dir, k))
            .map_err(|e| fail("agent log", e))?;
        let log2 = log.try_clone().map_err(|e| fail("agent log", e))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(&self.cfg.agent);
        match self.cfg.mode {
            Mode::Standalone => {
                cmd.arg("standalone")
                    .arg("--manifests")
                    .arg(dir.join("manifests"))
                    .args(["--poll-ms", "20"]);
            }
            Mode::Cluster => {
                cmd.arg("cluster")
                    .args(["--metrics-addr", "127.0.0.1:9090", "--debounce-ms", "10"])
                    .env("KUBECONFIG", dir.join("kubeconfig"));
            }
        }
        let child = cmd
            .args(["--node-name", node_name])
            .arg("--bpf-dir")
            .arg(bpf_dir)
            .arg("--status-file")
            .arg(status_file(dir, k))
            .args(SERVICE_CIDRS.iter().flat_map(|c| ["--service-cidr", c]))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0) // a terminal's Ctrl-C reaches the runner, which stops the agent
            .pdeath_signal()
            .spawn()
            .map_err(|e| fail("starting the agent", e))?;
        Ok(AgentProcess(child))
    }
}

/// [`publish`], then [`wait_enforced`].
fn enforce(
    cfg: &KernelConfig,
    run: &mut Run,
    topology: &Topology,
    state: &State,
) -> Result<(), OracleError> {
    let published = publish(run, state)?;
    wait_enforced(cfg, run, topology, published)
}

/// What [`publish`] told the agents: the generation they report once they enforce it, and in
/// cluster mode the kind whose watches it expired with the lists of it answered before
/// (every agent must list it again).
#[derive(Clone, Copy, Debug)]
pub struct Published {
    generation: u64,
    relist: Option<(Kind, usize)>,
}

/// Makes `state` what every agent of `run` is told: the manifest file, or the fake API
/// server's content.
fn publish(run: &mut Run, state: &State) -> Result<Published, OracleError> {
    let mut relist: Option<(Kind, usize)> = None;
    let want = match &run.api {
        None => {
            let manifests = run.dir.0.join("manifests");
            let text = render(state)?;
            // Atomic: the agent ignores dot files, and rename replaces the file in one
            // step.
            let tmp = manifests.join(".cluster.yaml.tmp");
            std::fs::write(&tmp, text).map_err(|e| fail("writing manifests", e))?;
            std::fs::rename(&tmp, manifests.join("cluster.yaml"))
                .map_err(|e| fail("writing manifests", e))?;
            policy_agent::manifests::content_hash(&manifests)
        }
        Some((api, _)) => {
            let objects: Vec<serde_json::Value> = manifests::objects(state)
                .map_err(|e| fail("rendering objects", e))?
                .into_iter()
                .map(|o| o.value)
                .collect();
            if run.applied % 3 == 2 {
                // The log is gone and the watches expire: the agents must re-list,
                // and this step's changes reach them only through that list.
                let kind = Kind::ALL[(run.applied / 3) % Kind::ALL.len()];
                relist = Some((kind, api.lists(kind)));
                api.compact(kind);
                api.expire_watches(kind);
            }
            api.converge(&objects);
            api.bookmark();
            api.generation()
        }
    };
    run.applied += 1;
    Ok(Published {
        generation: want,
        relist,
    })
}

/// Waits until every agent of `run` reports `published` enforced with its pods attached.
fn wait_enforced(
    cfg: &KernelConfig,
    run: &mut Run,
    topology: &Topology,
    published: Published,
) -> Result<(), OracleError> {
    let Published {
        generation: want,
        relist,
    } = published;
    let timeout = if run.started {
        cfg.apply_timeout
    } else {
        cfg.start_timeout
    };
    let deadline = Instant::now() + timeout;
    // Every node's agent enforces the objects with its pods attached.
    let mut pending: Vec<usize> = (0..run.agents.len()).collect();
    loop {
        pending.retain(|&k| {
            !matches!(
                policy_agent::status_file::read(&status_file(&run.dir.0, k)),
                Some(s) if s.generation == want && s.waiting.is_empty()
            )
        });
        let relisted = match (&run.api, relist) {
            (Some((api, _)), Some((kind, before))) => api.lists(kind) >= before + run.agents.len(),
            _ => true,
        };
        if pending.is_empty() && relisted {
            run.started = true;
            return Ok(());
        }
        if let Some((k, exit)) = run.exited() {
            return Err(OracleError::Failed(format!(
                "the agent of {} exited ({exit}): {}",
                topology.nodes[k].name,
                tail(&agent_log(&run.dir.0, k))
            )));
        }
        check_interrupt()?;
        if Instant::now() >= deadline && pending.is_empty() {
            return Err(OracleError::Failed(format!(
                "not every agent listed {relist:?} again within {:?} after its watches got 410 Gone",
                timeout
            )));
        }
        if Instant::now() >= deadline {
            let k = pending[0];
            let status = policy_agent::status_file::read(&status_file(&run.dir.0, k));
            return Err(OracleError::Failed(format!(
                "the agent of {} did not enforce the step within {:?} (want generation {want}, status {status:?}); log: {}",
                topology.nodes[k].name,
                timeout,
                tail(&agent_log(&run.dir.0, k))
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Node number `k`'s agent status file and log in the run's directory.
fn status_file(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("status-{}.json", k + 1))
}

fn agent_log(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("agent-{}.log", k + 1))
}

impl Oracle for KernelOracle {
    fn describe(&self) -> String {
        let mode = match self.cfg.mode {
            Mode::Standalone => "standalone",
            Mode::Cluster => "cluster",
        };
        format!("the kernel datapath (namespaces, policy-agent {mode}, real sockets)")
    }

    fn setup(&mut self, topology: &Topology) -> Result<(), OracleError> {
        if let Some(run) = &mut self.run
            && self.cfg.reuse_hosts
            && run.topology == *topology
            && run.placed.iter().eq(topology.pods.iter().map(|p| &p.node))
            && run.exited().is_none()
        {
            return Ok(());
        }
        self.close()?;
        self.run = Some(self.build(topology)?);
        Ok(())
    }

    fn apply(&mut self, topology: &Topology, state: &State) -> Result<(), OracleError> {
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        // Pods the step moves: (index, from, to).
        let moves: Vec<(usize, usize, usize)> = topology
            .pods
            .iter()
            .filter_map(|p| {
                let to = topology.node_in(&state.snapshot, &p.key)?;
                (run.placed[p.index] != to).then_some((p.index, run.placed[p.index], to))
            })
            .collect();
        if !moves.is_empty() {
            // As a rescheduled pod: deleted (and its deletion enforced everywhere), its
            // interface gone from the old node and made on the new one, then created there.
            let mut gone = state.clone();
            for &(i, ..) in &moves {
                gone.snapshot.pods.remove(&topology.pods[i].key);
            }
            enforce(&self.cfg, run, topology, &gone)?;
            for &(i, from, to) in &moves {
                run.hosts
                    .move_pod(topology, i, from, to)
                    .map_err(|e| fail(&format!("moving pod {}", topology.pods[i].key), e))?;
                run.placed[i] = to;
            }
        }
        enforce(&self.cfg, run, topology, state)
    }

    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        check_interrupt()?;
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        let mut jobs = Vec::with_capacity(probes.len());
        for p in probes {
            let ns = match &p.src {
                EndpointName::Pod(key) => run.pod(key)?,
                EndpointName::External(name) => run.external(name)?.0,
            };
            if let EndpointName::External(name) = &p.dst {
                // Externals serve every probed port.
                let ext_ns = &run.hosts.externals[run.external(name)?.1];
                run.servers
                    .ensure(ext_ns, p.dst_addr, p.port.protocol, p.port.port)
                    .map_err(|e| fail(&format!("server on external {name}"), e))?;
            }
            jobs.push(Job {
                ns,
                src: p.src_addr,
                to: SocketAddr::new(p.target_addr, p.port.port),
                protocol: p.port.protocol,
            });
        }
        Ok(probe::run(
            &run.ns_files,
            &jobs,
            self.cfg.probe_timeout,
            self.cfg.parallel,
        ))
    }

    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        check_interrupt()?;
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        let mut jobs = Vec::with_capacity(conns.len());
        for c in conns {
            let ns = match &c.src {
                EndpointName::Pod(key) => run.pod(key)?,
                EndpointName::External(name) => run.external(name)?.0,
            };
            if let EndpointName::External(name) = &c.dst {
                // Externals serve every port they are asked for.
                let ext_ns = &run.hosts.externals[run.external(name)?.1];
                run.servers
                    .ensure(ext_ns, c.dst_addr, c.port.protocol, c.port.port)
                    .map_err(|e| fail(&format!("server on external {name}"), e))?;
            }
            jobs.push(OpenJob { conn: c, ns });
        }
        run.connections
            .open(&run.ns_files, &jobs, self.cfg.probe_timeout)
            .map_err(OracleError::Failed)
    }

    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        check_interrupt()?;
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        run.connections
            .check(conns, self.cfg.probe_timeout)
            .map_err(OracleError::Failed)
    }

    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        if let Some(run) = &mut self.run {
            run.connections.close(names);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), OracleError> {
        self.close()
    }

    fn teardown(&mut self) -> Result<(), OracleError> {
        if let Some(run) = &mut self.run {
            // The next plan starts without connections, whether or not it reuses the hosts.
            run.connections.close_all();
        }
        if self.cfg.reuse_hosts && !cleanup::interrupted() {
            // Kept for the next scenario; an agent that died is reported now.
            if let Some(run) = &mut self.run
                && let Some((k, exit)) = run.exited()
            {
                let msg = tail(&agent_log(&run.dir.0, k));
                self.run = None;
                return Err(OracleError::Failed(format!(
                    "the agent of node {} exited with {exit}: {msg}",
                    k + 1
                )));
            }
            return Ok(());
        }
        self.close()
    }
}

/// Restarts under traffic: the tests drive one node's agent and the objects by hand between
/// the steps of a plan.
impl KernelOracle {
    fn run_mut(&mut self) -> Result<&mut Run, OracleError> {
        self.run
            .as_mut()
            .ok_or_else(|| OracleError::Failed("not set up".into()))
    }

    /// Kills node `k`'s agent with SIGKILL: its programs and pinned maps stay enforcing.
    pub fn kill_agent(&mut self, k: usize) -> Result<(), OracleError> {
        let agent = self
            .run_mut()?
            .agents
            .get_mut(k)
            .ok_or_else(|| OracleError::Failed(format!("no node {}", k + 1)))?;
        agent.0.kill().map_err(|e| fail("SIGKILL", e))?;
        agent.0.wait().map_err(|e| fail("reaping the agent", e))?;
        Ok(())
    }

    /// Starts node `k`'s agent again on the same bpffs, status file and log.
    pub fn restart_agent(&mut self, k: usize) -> Result<(), OracleError> {
        let run = self
            .run
            .as_ref()
            .ok_or_else(|| OracleError::Failed("not set up".into()))?;
        let node = run
            .topology
            .nodes
            .get(k)
            .ok_or_else(|| OracleError::Failed(format!("no node {}", k + 1)))?;
        let agent = self.start_agent(
            &run.hosts.nodes[k],
            &node.name,
            run.bpffs[k].path(),
            &run.dir.0,
            k,
        )?;
        let run = self.run_mut()?;
        drop(std::mem::replace(&mut run.agents[k], agent));
        run.started = false;
        Ok(())
    }

    /// Tells the agents `state` without waiting for them (one may be down).
    pub fn publish(&mut self, state: &State) -> Result<Published, OracleError> {
        publish(self.run_mut()?, state)
    }

    /// Waits until every agent enforces what [`KernelOracle::publish`] told them.
    pub fn wait_enforced(&mut self, published: Published) -> Result<(), OracleError> {
        let cfg = self.cfg.clone();
        let run = self.run_mut()?;
        let topology = run.topology.clone();
        wait_enforced(&cfg, run, &topology, published)
    }

    /// Node `k`'s status file.
    pub fn status(&self, k: usize) -> Option<policy_agent::status_file::Status> {
        let run = self.run.as_ref()?;
        policy_agent::status_file::read(&status_file(&run.dir.0, k))
    }

    /// The namespace pod `key` lives in (its node's for a hostNetwork pod).
    pub fn pod_netns(&self, key: &ObjectKey) -> Option<&crate::testbed::Netns> {
        let run = self.run.as_ref()?;
        let pod = run.topology.pod(key)?;
        Some(run.hosts.pod_ns(&run.topology, pod.index))
    }
}

impl KernelOracle {
    /// Stops the agents and removes everything built (also done on drop).
    pub fn close(&mut self) -> Result<(), OracleError> {
        let run = self.run.take();
        if let Some(mut run) = run {
            let mut failed = None;
            for (k, agent) in run.agents.iter_mut().enumerate() {
                agent.stop();
                if failed.is_none()
                    && let Ok(Some(exit)) = agent.0.try_wait()
                    && !exit.success()
                {
                    failed = Some((k, exit, tail(&agent_log(&run.dir.0, k))));
                }
            }
            drop(run);
            if let Some((k, exit, msg)) = failed {
                return Err(OracleError::Failed(format!(
                    "the agent of node {} exited with {exit}: {msg}",
                    k + 1
                )));
            }
        }
        Ok(())
    }
}

impl Run {
    /// The first agent that exited, with its status.
    fn exited(&mut self) -> Option<(usize, std::process::ExitStatus)> {
        self.agents
            .iter_mut()
            .enumerate()
            .find_map(|(k, a)| a.0.try_wait().ok().flatten().map(|e| (k, e)))
    }

    fn pod(&self, key: &ObjectKey) -> Result<usize, OracleError> {
        self.pod_ns
            .get(key)
            .copied()
            .ok_or_else(|| OracleError::Failed(format!("no pod {key}")))
    }

    fn external(&self, name: &str) -> Result<(usize, usize), OracleError> {
        self.external_ns
            .get(name)
            .copied()
            .ok_or_else(|| OracleError::Failed(format!("no external {name}")))
    }
}

/// The step's objects as one multi-document manifest file (see [`super::manifests`]).
pub fn render(state: &State) -> Result<String, OracleError> {
    let docs = manifests::manifests(state).map_err(|e| fail("rendering manifests", e))?;
    Ok(docs
        .iter()
        .map(|d| d.yaml.trim_end())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The agent child process; stopped (SIGTERM, then SIGKILL) on drop.
struct AgentProcess(Child);

impl AgentProcess {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        // `ip netns exec` execs the agent: the child's pid is the agent's.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create(name: &str) -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(name);
        std::fs::create_dir(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_interrupt() -> Result<(), OracleError> {
    if cleanup::interrupted() {
        return Err(OracleError::Failed("interrupted".into()));
    }
    Ok(())
}

/// Children that end with the runner: SIGTERM when the thread that started them exits (the
/// runner was killed), so no agent outlives it.
trait PdeathSignal {
    fn pdeath_signal(&mut self) -> &mut Self;
}

impl PdeathSignal for Command {
    fn pdeath_signal(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod service_range_tests {
    use super::super::topology::{
        MAX_PODS, NODE_V4, NODE_V6, pod_v4, pod_v6, service_v4, service_v6,
    };
    use super::SERVICE_CIDRS;
    use std::net::IpAddr;

    #[test]
    fn service_ranges_cover_every_cluster_ip_and_no_pod() {
        let nets: Vec<ipnet::IpNet> = SERVICE_CIDRS
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        let covered = |ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        for i in [0, 1, MAX_PODS / 2, MAX_PODS - 1] {
            assert!(
                covered(service_v4(i).into()) && covered(service_v6(i).into()),
                "service {i}"
            );
            assert!(
                !covered(pod_v4(i).into()) && !covered(pod_v6(i).into()),
                "pod {i}"
            );
        }
        assert!(
            !covered(NODE_V4.into()) && !covered(NODE_V6.into()),
            "the node's own addresses"
        );
    }
}
