//! `policy-agent`: the node agent's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use policy_agent::dataplane::{AttachMode, Established, UplinkMode};
use policy_agent::node::NodeOptions;
use policy_agent::{cni, observe, standalone};

#[derive(Parser)]
#[command(
    name = "policy-agent",
    about = "Kubernetes NetworkPolicy enforcement with eBPF"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Attach {
    Auto,
    Tcx,
    Clsact,
}

/// The node side, the same in both modes (see `policy_agent::node`).
#[derive(clap::Args)]
struct NodeArgs {
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/netpol")]
    bpf_dir: PathBuf,
    #[arg(long, value_enum, default_value_t = Attach::Auto)]
    attach: Attach,
    /// Remove what an earlier agent pinned under --bpf-dir before starting.
    #[arg(long)]
    reset: bool,
    /// Do not seed conntrack from the kernel's connection table when starting on new maps.
    #[arg(long)]
    no_seed_conntrack: bool,
    /// Refuse to start when the pinned maps do not match this agent's (instead of
    /// migrating to new maps without a gap); the old programs keep enforcing.
    #[arg(long)]
    no_migrate: bool,
    /// A Service ClusterIP range (repeatable; e.g. 10.96.0.0/12): egress to it is judged on
    /// the backend chosen by DNAT, not on the virtual IP.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<ipnet::IpNet>,
    /// Non-pod interfaces that get the uplink programs: `auto` (every interface but `lo`
    /// and local pods' veths), `none`, or a comma-separated list.
    #[arg(long, default_value = "auto", value_name = "auto|none|IFACE[,IFACE]")]
    uplink: UplinkMode,
    /// What a policy change does to open connections: `revalidate` judges each again on its
    /// next packet, as a new connection would be (one no longer admitted stops at once);
    /// `keep` lets them run with the verdict they were opened with.
    #[arg(long, value_enum, default_value_t = EstablishedArg::Revalidate)]
    established: EstablishedArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum EstablishedArg {
    Revalidate,
    Keep,
}

impl NodeArgs {
    /// The options, with the pin directory created if missing.
    fn options(self) -> Result<NodeOptions> {
        if !self.bpf_dir.exists() {
            std::fs::create_dir_all(&self.bpf_dir)
                .with_context(|| format!("creating {}", self.bpf_dir.display()))?;
        }
        Ok(NodeOptions {
            bpf_dir: self.bpf_dir,
            attach_mode: attach_mode(self.attach),
            uplink_mode: self.uplink,
            service_cidrs: self.service_cidrs,
            reset: self.reset,
            seed_conntrack: !self.no_seed_conntrack,
            migrate: !self.no_migrate,
            established: match self.established {
                EstablishedArg::Revalidate => Established::Revalidate,
                EstablishedArg::Keep => Established::Keep,
            },
        })
    }
}

/// `netpol-cni`, the chained plugin that holds a pod's start until it is enforced.
#[derive(clap::Args)]
struct CniArgs {
    /// The runtime's CNI configuration directory: the plugin's entry is kept at the end of
    /// the conflist the runtime uses (pods then start only once enforced). Unset: nothing
    /// is installed (the agent still answers a plugin configured by hand).
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The runtime's CNI binary directory, where the plugin is copied.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The plugin binary to install (default: `netpol-cni` beside this executable).
    #[arg(long, value_name = "PATH")]
    cni_plugin: Option<PathBuf>,
    /// How long a pod's start waits for enforcement before the runtime is told to retry.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    cni_timeout: f64,
}

impl CniArgs {
    /// Serves the CNI socket for `bpf_dir` (and installs the plugin when asked); the
    /// server runs while the returned handle lives.
    fn serve(
        self,
        bpf_dir: &std::path::Path,
    ) -> Result<(std::sync::Arc<cni::PodStarts>, Option<cni::CniServer>)> {
        let starts = cni::PodStarts::new();
        let install = match self.cni_conf_dir {
            None => None,
            Some(conf_dir) => {
                let max = policy_cni::protocol::MAX_WAIT_MS as f64 / 1000.0;
                anyhow::ensure!(
                    self.cni_timeout > 0.0 && self.cni_timeout <= max,
                    "--cni-timeout must be in (0, {max}] seconds"
                );
                let plugin = match self.cni_plugin {
                    Some(p) => p,
                    None => std::env::current_exe()
                        .context("locating this executable")?
                        .with_file_name(cni::install::PLUGIN_TYPE),
                };
                Some(cni::install::Install {
                    plugin,
                    bin_dir: self.cni_bin_dir,
                    conf_dir,
                    socket: cni::server::socket_name(bpf_dir),
                    timeout_secs: self.cni_timeout,
                })
            }
        };
        let required = install.is_some();
        match cni::CniServer::spawn(bpf_dir, starts.clone(), install) {
            Ok(s) => Ok((starts, Some(s))),
            // Installed, the plugin would fail every pod start without the socket.
            Err(e) if required => Err(e).context("serving netpol-cni"),
            Err(e) => {
                tracing::warn!(error = %e, "no CNI socket: a netpol-cni configured by hand fails pod starts");
                Ok((starts, None))
            }
        }
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Enforce the Namespaces, Pods and NetworkPolicies of a manifest directory on this host
    /// (no cluster). Run it in the node's network namespace.
    Standalone {
        /// Directory of YAML/JSON manifests; changes are enforced without restart.
        #[arg(long)]
        manifests: PathBuf,
        /// Pods whose spec.nodeName is unset or equal to this are local.
        #[arg(long, env = "NODE_NAME", default_value = "standalone")]
        node_name: String,
        /// How often the directory and the pod interfaces are checked.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        /// Write the enforced generation here after every change (JSON).
        #[arg(long)]
        status_file: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        cni: CniArgs,
    },
    /// Detach the programs (pinned links, clsact filters in this network namespace) and
    /// unpin the maps: enforcement stops.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpf_dir: PathBuf,
        /// Also take netpol-cni out of this CNI configuration directory (and its binary out
        /// of --cni-bin-dir): else pods cannot start once no agent answers it.
        #[arg(long, value_name = "DIR")]
        cni_conf_dir: Option<PathBuf>,
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
    },
    /// Run as the node agent of a Kubernetes cluster (the DaemonSet in deploy/): watch Pods,
    /// Namespaces and NetworkPolicies and enforce them for this node's pods.
    Cluster {
        /// This node's name (the downward API's spec.nodeName): pods scheduled here are local.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, default_value = "0.0.0.0:9090")]
        metrics_addr: SocketAddr,
        /// Least time between change-triggered compiles (coalesces bursts; a change after
        /// that much quiet is compiled at once).
        #[arg(long, default_value_t = 50)]
        debounce_ms: u64,
        /// Period of the full repair of the maps against the desired state.
        #[arg(long, default_value_t = 300)]
        resync_secs: u64,
        /// Write what is enforced here after every change (JSON; the generation identifies
        /// the objects' versions, see `cluster::generation`).
        #[arg(long)]
        status_file: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        cni: CniArgs,
    },
    /// What the pinned datapath holds and has decided: attached programs, endpoints and their
    /// isolation, map use, verdict counters. Reads the pinned maps read-only; no agent needed.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpf_dir: PathBuf,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Deny events as they happen, one line each (through the running agent, or straight
    /// from the pinned ring buffer when none runs).
    Monitor {
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpf_dir: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events (exit code 1 if the timeout comes first).
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    match cli.mode {
        Mode::Status { bpf_dir, json } => {
            let s = observe::status::collect(&bpf_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", observe::status::render(&s));
            }
            Ok(())
        }
        Mode::Monitor {
            bpf_dir,
            json,
            count,
            timeout,
        } => {
            let timeout = timeout
                .map(|t| Duration::try_from_secs_f64(t).context("--timeout must be >= 0"))
                .transpose()?;
            let opts = observe::monitor::Options {
                bpf_dir,
                json,
                count,
                timeout,
            };
            let mut out = std::io::stdout().lock();
            let n = match observe::monitor::run(&opts, &STOP, &mut out, &mut |_, note| {
                tracing::info!("{note}")
            }) {
                // `monitor | head -3`: the reader has all it wanted.
                Err(observe::ObserveError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    return Ok(());
                }
                r => r?,
            };
            if let Some(c) = count
                && n < c
                && !STOP.load(Ordering::Relaxed)
            {
                anyhow::bail!("timed out with {n} of {c} events");
            }
            Ok(())
        }
        Mode::Uninstall {
            bpf_dir,
            cni_conf_dir,
            cni_bin_dir,
        } => {
            if let Some(conf_dir) = cni_conf_dir {
                // First: with the programs gone, nothing answers the plugin any more.
                let changed =
                    cni::install::remove(&conf_dir, &cni_bin_dir).context("removing netpol-cni")?;
                tracing::info!(?changed, "netpol-cni removed");
            }
            let gone = policy_agent::node::uninstall(&bpf_dir).context("uninstall")?;
            tracing::info!(links = ?gone.links, filters = ?gone.filters, maps = ?gone.maps, programs = ?gone.programs, "uninstalled");
            Ok(())
        }
        Mode::Standalone {
            manifests,
            node_name,
            poll_ms,
            status_file,
            node,
            cni,
        } => {
            let node = node.options()?;
            // Serves `policy-agent monitor` while the agent runs (see observe::broker).
            let _broker = observe::broker::Broker::spawn(node.bpf_dir.clone());
            let (pod_starts, _cni_server) = cni.serve(&node.bpf_dir)?;
            let cfg = standalone::Config {
                manifests,
                node_name,
                poll_interval: Duration::from_millis(poll_ms.max(10)),
                status_file,
                node,
                pod_starts: Some(pod_starts),
            };
            standalone::run(&cfg, &STOP).context("standalone agent")
        }
        Mode::Cluster {
            node_name,
            metrics_addr,
            debounce_ms,
            resync_secs,
            status_file,
            node,
            cni,
        } => {
            let node = node.options()?;
            let (pod_starts, _cni_server) = cni.serve(&node.bpf_dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let _broker = observe::broker::Broker::spawn(node.bpf_dir.clone());
            let mut loop_cfg = policy_agent::cluster::LoopConfig::new(&node_name);
            loop_cfg.debounce = Duration::from_millis(debounce_ms);
            loop_cfg.resync = Duration::from_secs(resync_secs.max(1));
            loop_cfg.pod_starts = Some(pod_starts);
            loop_cfg.status_file = status_file;
            rt.block_on(run_cluster(loop_cfg, metrics_addr, node))
        }
    }
}

fn attach_mode(a: Attach) -> AttachMode {
    match a {
        Attach::Auto => AttachMode::Auto,
        Attach::Tcx => AttachMode::Tcx,
        Attach::Clsact => AttachMode::Netlink,
    }
}

async fn run_cluster(
    loop_cfg: policy_agent::cluster::LoopConfig,
    metrics_addr: SocketAddr,
    node: NodeOptions,
) -> Result<()> {
    use policy_agent::cluster;
    use policy_agent::metrics::{Health, Metrics};
    use std::sync::Arc;

    let node_name = loop_cfg.node.clone();
    anyhow::ensure!(
        !node_name.is_empty(),
        "--node-name (NODE_NAME) must not be empty"
    );
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    // Adopts, migrates or creates the pinned maps the same way standalone mode does.
    let enforcer = cluster::KernelEnforcer::start(&node).context("loading the eBPF programs")?;
    let cfg = cluster::Config {
        loop_cfg,
        metrics_addr: Some(metrics_addr),
    };
    let metrics = Arc::new(Metrics::new());
    // The loop beats at least every poll interval (1 s); a minute of silence is a hang.
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    tracing::info!(node = %node_name, bpf_dir = %node.bpf_dir.display(), "cluster agent starting");
    let shutdown = async {
        while !STOP.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut enforcer = cluster::run(client, enforcer, cfg, metrics, health, |_| {}, shutdown)
        .await
        .context("cluster agent")?;
    // The programs keep enforcing until the next agent takes them over (no gap).
    enforcer.release_all();
    tracing::info!(
        "cluster agent stopped (programs stay attached; `policy-agent uninstall` removes them)"
    );
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
