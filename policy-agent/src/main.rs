//! `policy-agent`: the node agent's command line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use policy_agent::dataplane::{AttachMode, UplinkMode};
use policy_agent::standalone;

#[derive(Parser)]
#[command(name = "policy-agent", about = "Kubernetes NetworkPolicy enforcement with eBPF")]
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
        /// bpffs directory for the pinned maps.
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpf_dir: PathBuf,
        /// How often the directory and the pod interfaces are checked.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        /// Write the enforced generation here after every change (JSON).
        #[arg(long)]
        status_file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Attach::Auto)]
        attach: Attach,
        /// A Service ClusterIP range (repeatable): egress to it is judged on the backend
        /// chosen by DNAT, not on the virtual IP.
        #[arg(long = "service-cidr", value_name = "CIDR")]
        service_cidrs: Vec<ipnet::IpNet>,
        /// Non-pod interfaces that get the uplink programs: `auto` (every interface but `lo`
        /// and local pods' veths), `none`, or a comma-separated list.
        #[arg(long, default_value = "auto", value_name = "auto|none|IFACE[,IFACE]")]
        uplink: UplinkMode,
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
        Mode::Standalone { manifests, node_name, bpf_dir, poll_ms, status_file, attach, service_cidrs, uplink } => {
            if !bpf_dir.exists() {
                std::fs::create_dir_all(&bpf_dir)
                    .with_context(|| format!("creating {}", bpf_dir.display()))?;
            }
            let cfg = standalone::Config {
                manifests,
                node_name,
                bpf_dir,
                poll_interval: Duration::from_millis(poll_ms.max(10)),
                status_file,
                attach_mode: match attach {
                    Attach::Auto => AttachMode::Auto,
                    Attach::Tcx => AttachMode::Tcx,
                    Attach::Clsact => AttachMode::Netlink,
                },
                service_cidrs,
                uplinks: uplink,
            };
            standalone::run(&cfg, &STOP).context("standalone agent")
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
