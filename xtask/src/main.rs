//! `cargo xtask ...`: the project's tasks. Every task that builds or tests first makes the
//! machine ready (`setup`), so a fresh clone needs only `cargo xtask test` or `cargo xtask demo`.

mod demo;
mod ebpf;
mod ebpf_sources;
mod run;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Tasks of the eBPF NetworkPolicy dataplane")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent): nightly rust-src, bpf-linker,
    /// Debian packages.
    Setup,
    /// Build the kernel programs (release, BTF) into target/ebpf.
    BuildEbpf,
    /// The first thing to run: setup, build, then a narrated tour of NetworkPolicy on the
    /// real datapath (namespaces x, y, z; pods a, b, c; policies from the seed documents).
    Demo {
        /// Spread the pods over this many nodes, each with its own agent.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Setup, build, then every test layer: unit, property, kernel (BPF_PROG_TEST_RUN),
    /// namespaces, scenarios.
    Test,
    /// Benchmarks: `datapath` (ns per packet), `compile` (policy compiler), `cluster`
    /// (the cluster agent's pass for one pod change), `attach` (a new pod's veth to its
    /// programs attached), `scale` (memory and start time at 1k, 10k and 50k pods, 1k
    /// policies), `latency` (a policy change written to the first connection it allows or
    /// refuses) or `peers` (ours beside no filter, iptables and nftables on the same
    /// policies).
    Bench {
        #[arg(value_parser = [
            "datapath", "compile", "cluster", "attach", "scale", "latency", "peers"
        ])]
        which: Vec<String>,
    },
    /// Run scenario files (scenarios/FORMAT.md) on the kernel, or with
    /// `--simulate` through the compiler and the kernel model.
    Scenario {
        #[arg(long)]
        simulate: bool,
        /// Write for a reader, like the demo: step titles, descriptions, compact matrices.
        #[arg(long)]
        narrate: bool,
        /// Spread the pods over this many nodes, each with its own agent (routed underlay).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// How several nodes reach each other's pods: routed (host-gw) or vxlan.
        #[arg(long, default_value = "routed")]
        network: String,
        /// Where the agents read the objects: standalone (a manifest directory) or cluster
        /// (watching a fake API server).
        #[arg(long, default_value = "standalone")]
        mode: String,
        /// Run this many files at once (each with its own hosts and agents).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = run::workspace_root()?;
    match cli.task {
        Task::Setup => setup::run().map(|_| ()),
        Task::BuildEbpf => {
            let tools = setup::run()?;
            ebpf::build(&root, &tools)
        }
        Task::Demo { nodes } => demo::demo(&root, nodes),
        Task::Test => run::test(&root),
        Task::Bench { which } => run::bench(&root, &which),
        Task::Scenario {
            simulate,
            narrate,
            nodes,
            network,
            mode,
            jobs,
            files,
        } => run::scenario(
            &root,
            simulate,
            narrate,
            &run::Shape {
                nodes,
                network,
                mode,
                jobs,
            },
            &files,
        ),
    }
}
