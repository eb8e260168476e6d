//! Standalone mode: enforce the objects of a manifest directory on this host, with no
//! cluster. The agent runs in the node's network namespace, finds each local pod's host-side
//! veth from the route to its address, attaches the programs there, and re-reads the
//! directory whenever it changes.
//!
//! Restarts and upgrades leave no gap: maps and TCX links are pinned under `--bpf-dir` and
//! stay enforcing while no agent runs (also after a clean stop); a new agent reuses the
//! maps, reads them back, renames its compiler's numbers onto the kernel's and writes only
//! the difference, then takes the pinned links over by replacing their program in place.
//! On the very first start it seeds conntrack from the kernel's connection table.
//! `policy-agent uninstall` removes everything.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::compiler::{self, CompilerState, MapContents};
use crate::dataplane::{
    AttachMode, Dataplane, DataplaneError, DataplaneMaps, LinkSet, PinState, Role, UplinkMode,
    ctseed, links, pinning, renumber_onto, uplink,
};
use crate::model::Snapshot;
use crate::{manifests, netinfo, writer};

#[derive(Clone, Debug)]
pub struct Config {
    pub manifests: PathBuf,
    /// Pods whose nodeName is unset or equal to this are local.
    pub node_name: String,
    /// bpffs directory for the pinned maps.
    pub bpf_dir: PathBuf,
    pub poll_interval: Duration,
    /// Where to write the enforced generation (see [`Status`]).
    pub status_file: Option<PathBuf>,
    pub attach_mode: AttachMode,
    /// Remove whatever an earlier agent pinned before starting (enforcement restarts from
    /// nothing: established connections are re-seeded from the kernel's table).
    pub reset: bool,
    /// Seed conntrack from the kernel's connection table on a first start.
    pub seed_conntrack: bool,
    /// When the pinned maps do not match this agent's object (an upgrade changed a map),
    /// move to new maps without a gap; else refuse to start.
    pub migrate: bool,
    /// Service ClusterIP ranges: egress to them is judged on the DNAT backend.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Which non-pod interfaces get the uplink programs.
    pub uplinks: UplinkMode,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("manifest directory {path}: {source}")]
    ManifestDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    NetInfo(#[from] netinfo::NetInfoError),
    #[error("writing status file {path}: {source}")]
    Status {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the agent enforces now, written after every reconcile (atomically).
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    /// `manifests::content_hash` of the directory enforced.
    pub generation: u64,
    pub endpoints: usize,
    /// Interfaces with the programs attached.
    pub attached: Vec<String>,
    /// Local pods whose interface was not found yet (isolated anyway once it appears).
    pub waiting: Vec<String>,
    /// Non-pod interfaces with the uplink programs attached.
    #[serde(default)]
    pub uplinks: Vec<String>,
    pub problems: Vec<String>,
    /// Whether this agent adopted pinned maps of an earlier one (else it created them).
    #[serde(default)]
    pub adopted: bool,
    /// Whether this agent moved an earlier one's incompatible maps to new ones.
    #[serde(default)]
    pub migrated: bool,
}

/// Runs until `stop` is set. Attachments and maps stay in place when it returns.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(), StandaloneError> {
    std::fs::read_dir(&cfg.manifests).map_err(|source| StandaloneError::ManifestDir {
        path: cfg.manifests.clone(),
        source,
    })?;
    if cfg.reset {
        let gone = uninstall(&cfg.bpf_dir)?;
        tracing::warn!(?gone, "--reset: removed what an earlier agent pinned");
    }
    // An incompatible pin directory fails here, before anything is touched: the programs
    // already attached keep enforcing their own maps (fail closed, never open).
    let mut dp = match Dataplane::load(&cfg.bpf_dir) {
        Err(DataplaneError::Incompatible { detail, .. }) if cfg.migrate => {
            tracing::warn!(%detail, "pinned maps do not match this agent: migrating to new maps");
            Dataplane::load_staged(&cfg.bpf_dir)?
        }
        r => r?,
    };
    dp.persist_links();
    let mut maps = dp.take_maps()?;
    let adopted = dp.pin_state() == PinState::Adopted;
    let mut seed = !adopted && cfg.seed_conntrack;
    if dp.pin_state() == PinState::Migrating {
        // The old agent's table, when its layout is ours; else the kernel's (established
        // connections only: the same as a first start).
        match ctseed::copy_pinned(&mut maps, &cfg.bpf_dir.join(policy_common::MAP_CONNTRACK)) {
            Ok(Some(n)) => {
                tracing::info!(entries = n, "conntrack copied from the old map");
                seed = false;
            }
            Ok(None) => tracing::warn!(
                "old conntrack map of another layout: seeding from the kernel's table"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "old conntrack map unreadable: seeding from the kernel's table")
            }
        }
    }
    if seed {
        let seeded = ctseed::kernel_table().and_then(|t| {
            // Stamps on the datapath's clock, not the coarse clock (see dataplane::clock).
            let now = dp.now_ns(&maps)?;
            ctseed::seed(&mut maps, &t, now)
        });
        match seeded {
            Ok(s) => tracing::info!(
                connections = s.connections,
                entries = s.entries,
                "conntrack seeded from the kernel's table"
            ),
            // No table means no tracked connection to keep (nf_conntrack not in use here).
            Err(e) => {
                tracing::warn!(error = %e, "kernel connection table unreadable; nothing seeded")
            }
        }
    }
    maps.set_service_cidrs(&cfg.service_cidrs)?;
    let mut agent = Agent {
        state: CompilerState::new(),
        written: maps.read_contents()?,
        resync: false,
        attached: LinkSet::new(Role::Pod),
        pins_adopted: false,
        uplinks: LinkSet::new(Role::Uplink),
        last_fingerprint: None,
        read: None,
        compiled: None,
        last_status: None,
        loader: manifests::DirLoader::default(),
        adopted,
        migrated: false,
    };
    tracing::info!(
        manifests = %cfg.manifests.display(),
        node = %cfg.node_name,
        adopted,
        entries = agent.written.sizes().iter().map(|(_, n, _)| n).sum::<usize>(),
        "standalone agent started"
    );
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        if let Err(e) = agent.reconcile(cfg, &mut dp, &mut maps) {
            // Keep running: the next tick retries from a full compile against a fresh
            // read of the kernel maps.
            tracing::error!(error = %e, "reconcile failed");
            agent.compiled = None;
            agent.resync = true;
        }
        let spent = t0.elapsed();
        std::thread::sleep(cfg.poll_interval.saturating_sub(spent));
    }
    // Persistent attachments are left to enforce until the next agent takes them over.
    agent.attached.release_all(&mut dp);
    agent.uplinks.release_all(&mut dp);
    tracing::info!(
        "standalone agent stopped (programs stay attached; `policy-agent uninstall` removes them)"
    );
    Ok(())
}

/// Detaches and unpins everything an agent left under `bpf_dir` and in this network
/// namespace.
pub fn uninstall(bpf_dir: &Path) -> Result<pinning::Uninstalled, StandaloneError> {
    let object = crate::ebpf_object::require().map_err(DataplaneError::from)?;
    Ok(pinning::uninstall(object, bpf_dir)?)
}

struct Agent {
    state: CompilerState,
    /// What the kernel maps hold (read back at start, then as written by this process).
    written: MapContents,
    /// `written` may be wrong (a write failed half-way): read the kernel again.
    resync: bool,
    /// Whether the pinned links of an earlier agent were taken over yet.
    pins_adopted: bool,
    adopted: bool,
    migrated: bool,
    /// Local pods' veths with the pod programs.
    attached: LinkSet,
    /// Non-pod interfaces with the uplink programs.
    uplinks: LinkSet,
    /// The directory's fingerprint when it was last read, kept only once it proves the
    /// content unchanged ([`manifests::fingerprint_settled`]): while it matches, nothing is
    /// read or parsed.
    last_fingerprint: Option<manifests::Fingerprint>,
    /// The directory as last read and parsed, and its snapshot with the node addresses it
    /// was made for.
    read: Option<(manifests::Manifests, Vec<std::net::IpAddr>, Snapshot)>,
    /// Generation and node addresses of what the maps hold; `None`: compile next tick.
    compiled: Option<(u64, Vec<std::net::IpAddr>)>,
    last_status: Option<Status>,
    /// Keeps each manifest file's last good version: a file turning bad never opens traffic.
    loader: manifests::DirLoader,
}

impl Agent {
    fn reconcile(
        &mut self,
        cfg: &Config,
        dp: &mut Dataplane,
        maps: &mut DataplaneMaps,
    ) -> Result<(), StandaloneError> {
        let fp = manifests::fingerprint(&cfg.manifests);
        let node_addrs = netinfo::local_addrs()?;
        if self.read.is_none() || self.last_fingerprint.as_ref() != Some(&fp) {
            // Taken before reading: a write racing the read changes it, so the next tick
            // reads again; what is parsed and the generation reported are the same bytes.
            let settled = manifests::fingerprint_settled(&fp, std::time::SystemTime::now());
            let known = self.read.as_ref().map(|(m, ..)| m.generation);
            let loaded = self
                .loader
                .load_if_changed(&cfg.manifests, known)
                .map_err(|source| StandaloneError::ManifestDir {
                    path: cfg.manifests.clone(),
                    source,
                })?;
            if let Some(m) = loaded {
                for p in &m.problems {
                    tracing::warn!(problem = %p, "manifest problem (enforced fail-closed)");
                }
                let snapshot = m.snapshot(&cfg.node_name, node_addrs.clone());
                self.read = Some((m, node_addrs.clone(), snapshot));
            }
            self.last_fingerprint = settled.then_some(fp);
        }
        let Some((m, addrs, snapshot)) = self.read.as_mut() else {
            return Ok(());
        };
        if *addrs != node_addrs {
            *snapshot = m.snapshot(&cfg.node_name, node_addrs.clone());
            *addrs = node_addrs;
        }
        let problems: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        let generation = m.generation;
        let key = (generation, addrs.clone());
        if self.compiled.as_ref() != Some(&key) {
            let t0 = Instant::now();
            if self.resync {
                self.written = maps.read_contents()?;
                self.resync = false;
            }
            let desired = compiler::compile(snapshot, &mut self.state);
            if let Some((map, entries, capacity)) = desired.over_capacity().first().copied() {
                return Err(DataplaneError::OverCapacity {
                    map,
                    entries,
                    capacity,
                }
                .into());
            }
            // The kernel's numbers win where the meaning is the same; a changed table gets
            // a number nothing uses, so endpoints switch to it whole.
            let target = renumber_onto(&self.written, &desired);
            let diff = MapContents::diff(&self.written, &target);
            writer::apply(maps, &diff)?;
            self.written = target;
            self.compiled = Some(key);
            tracing::info!(
                changes = diff.len(),
                endpoints = self.written.endpoints.len(),
                elapsed_us = t0.elapsed().as_micros() as u64,
                "maps updated"
            );
        }
        // Interfaces can appear after the manifests: look every tick.
        let routes = netinfo::routes()?;
        let local = snapshot.pods.values().filter(|p| snapshot.is_local(p));
        let (wanted, waiting) = links::pod_interfaces(
            &routes,
            local.map(|p| (p.key().to_string(), p.ips.as_slice())),
        );
        if !self.pins_adopted {
            // After the maps are right: links an earlier agent pinned get this agent's
            // programs in place (no gap), and those of interfaces gone or no longer wanted
            // are dropped below like any other. Failures are retried next tick.
            self.pins_adopted =
                links::adopt_pins(dp, cfg.attach_mode, &mut self.attached, &mut self.uplinks) == 0;
        }
        // Detach before attaching, so an interface changing role (a pod's veth that looked
        // like an uplink before its pod was known) never carries both pairs.
        let uplinks = uplink::select(&cfg.uplinks, &uplink::interfaces(), &wanted);
        self.uplinks.prune(dp, &uplinks);
        self.attached.prune(dp, &wanted);
        self.attached.attach_missing(dp, cfg.attach_mode, &wanted);
        self.uplinks.attach_missing(dp, cfg.attach_mode, &uplinks);
        if dp.pin_state() == PinState::Migrating && self.pins_adopted {
            // Every pinned link and filter runs the new programs on the new maps now.
            dp.finish_migration()?;
            self.migrated = true;
            tracing::info!("migration finished: the new maps are pinned in place of the old");
        }
        let status = Status {
            generation,
            endpoints: self.written.endpoints.len(),
            attached: self.attached.names(),
            waiting,
            uplinks: self.uplinks.names(),
            problems,
            adopted: self.adopted,
            migrated: self.migrated,
        };
        if self.last_status.as_ref() != Some(&status) {
            if let Some(path) = &cfg.status_file {
                write_status(path, &status)?;
            }
            self.last_status = Some(status);
        }
        Ok(())
    }
}

fn write_status(path: &Path, status: &Status) -> Result<(), StandaloneError> {
    let err = |source| StandaloneError::Status {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(status).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a status file written by [`run`].
pub fn read_status(path: &Path) -> Option<Status> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
