//! The four ways the peers bench filters the same pods, each installed on a fresh node
//! namespace (a filter leaves nothing behind for the next: no netfilter table, hook or
//! conntrack zone a baseline would otherwise pay for).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use policy_agent::compiler::{self, CompilerState, MapContents, capacity};
use policy_agent::dataplane::{AttachMode, Attachment, Dataplane, writer};
use policy_agent::manifests;
use policy_testkit::testbed::{NODE_IPV4, NODE_IPV6, PrivateBpffs, Testbed, netns::run_bounded};

use super::rules;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Unfiltered,
    Ours,
    Iptables,
    Nftables,
}

impl Filter {
    pub const ALL: [Filter; 4] = [
        Filter::Unfiltered,
        Filter::Ours,
        Filter::Iptables,
        Filter::Nftables,
    ];

    /// The key prefix in peers.json.
    pub fn key(self) -> &'static str {
        match self {
            Filter::Unfiltered => "nofilter",
            Filter::Ours => "ours",
            Filter::Iptables => "iptables",
            Filter::Nftables => "nft",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Filter::Unfiltered => "no filter",
            Filter::Ours => "ours (eBPF)",
            Filter::Iptables => "iptables + ipset",
            Filter::Nftables => "nftables sets",
        }
    }
}

/// Where the pods sit: `hosts[0]` the client, `hosts[1]` the server.
pub const CLIENT: usize = 0;
pub const SERVER: usize = 1;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// One policy set rendered for every filter, made once per size.
pub struct Prepared {
    pub contents: MapContents,
    dir: PathBuf,
}

impl Prepared {
    pub fn new(n: usize, scratch: &Path) -> Result<Prepared> {
        let rules = rules::generate(n, CLIENT_IP);
        let dir = scratch.join(format!("rules-{n}"));
        std::fs::create_dir_all(&dir)?;
        let yaml = rules::manifests(&rules, CLIENT_IP, SERVER_IP);
        std::fs::write(dir.join("ipsets"), rules::ipsets(&rules, SERVER_IP))?;
        std::fs::write(dir.join("iptables"), rules::iptables(&rules, SERVER_IP))?;
        std::fs::write(dir.join("nft"), rules::nftables(&rules, SERVER_IP))?;
        // Compiled as the standalone agent does: manifests, snapshot, compile, fit.
        let file = dir.join("policies.yaml");
        let mut m = manifests::Manifests::default();
        manifests::load_text(&mut m, &file, &yaml);
        if !m.problems.is_empty() {
            bail!("generated manifests: {:?}", m.problems);
        }
        let node_addrs = vec![IpAddr::V4(NODE_IPV4), IpAddr::V6(NODE_IPV6)];
        let snapshot = m.snapshot("node", node_addrs);
        let desired = compiler::compile(&snapshot, &mut CompilerState::new());
        let fitted = capacity::fit(&desired, capacity::Capacity::default());
        if !fitted.overflowed.is_empty() {
            bail!("{n} rules overflow the maps: {:?}", fitted.overflowed);
        }
        Ok(Prepared {
            contents: fitted.contents,
            dir,
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A fresh node namespace with the client and server pods, the server answering on the
/// probe port and listening (never accepting: the handshake completes in the kernel) on the
/// refused one, so a refusal can only be the filter's.
pub struct Cell {
    pub bed: Testbed,
    _refused: TcpListener,
}

impl Cell {
    pub fn new() -> Result<Cell> {
        let mut bed = Testbed::new().context("node namespace (needs root)")?;
        for want in [CLIENT_IP, SERVER_IP] {
            let i = bed.add_pod()?;
            if bed.hosts[i].ipv4 != want {
                bail!("pod {i} got {} (expected {want})", bed.hosts[i].ipv4);
            }
        }
        // Thousands of connections a second from one client: ports are reused from
        // TIME_WAIT as soon as the kernel allows.
        bed.hosts[CLIENT].ns.sysctl(&[
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])?;
        let refused = SocketAddr::new(SERVER_IP.into(), rules::REFUSED_PORT);
        let listener = bed.hosts[SERVER]
            .ns
            .enter(|| TcpListener::bind(refused))??;
        Ok(Cell {
            bed,
            _refused: listener,
        })
    }

    pub fn to(&self, port: u16) -> SocketAddr {
        SocketAddr::new(SERVER_IP.into(), port)
    }
}

/// What an installed filter holds (ours: its links, object and bpffs; netfilter's go with
/// the cell's namespace); dropping it removes what would outlive the cell.
pub type Installed = Option<Box<Ours>>;

/// Field order is drop order: links, then the object, then the bpffs.
pub struct Ours {
    _links: Vec<Attachment>,
    _dp: Dataplane,
    _fs: PrivateBpffs,
}

const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

fn in_node(cell: &Cell, program: &str, args: &[&str]) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", cell.bed.node.name(), program])
        .args(args);
    let out = run_bounded(&mut c, RESTORE_TIMEOUT).with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn install(filter: Filter, cell: &Cell, p: &Prepared) -> Result<Installed> {
    let path = |name: &str| p.file(name).to_string_lossy().into_owned();
    match filter {
        Filter::Unfiltered => Ok(None),
        Filter::Iptables => {
            // Legacy iptables (x_tables with xt_set), as kube-router and Calico's iptables
            // mode run it; this host's `iptables` is the nf_tables back end.
            in_node(cell, "ipset", &["restore", "-file", &path("ipsets")])?;
            in_node(cell, "iptables-legacy-restore", &[&path("iptables")])?;
            Ok(None)
        }
        Filter::Nftables => {
            in_node(cell, "nft", &["-f", &path("nft")])?;
            Ok(None)
        }
        Filter::Ours => {
            let fs = PrivateBpffs::mount().context("private bpffs")?;
            let mut dp = Dataplane::load(fs.path()).context("loading the eBPF object")?;
            let mut maps = dp.take_maps()?;
            writer::apply(
                &mut maps,
                &MapContents::diff(&MapContents::default(), &p.contents),
            )?;
            let mut links = Vec::new();
            for i in [CLIENT, SERVER] {
                cell.bed.bind(i, &mut maps)?;
                let hif = cell.bed.hosts[i].host_if.clone();
                links.push(
                    cell.bed
                        .node
                        .enter(|| dp.attach(&hif, AttachMode::Auto))??,
                );
            }
            Ok(Some(Box::new(Ours {
                _links: links,
                _dp: dp,
                _fs: fs,
            })))
        }
    }
}
