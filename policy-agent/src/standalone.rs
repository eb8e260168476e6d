//! Standalone mode: enforce the objects of a manifest directory on this host, with no
//! cluster. The agent runs in the node's network namespace, finds each local pod's host-side
//! veth from the route to its address, attaches the programs there, and re-reads the
//! directory whenever it changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::compiler::{self, CompilerState, MapContents};
use crate::dataplane::{AttachMode, Attachment, Dataplane, DataplaneError, DataplaneMaps, UplinkMode, uplink};
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
    /// Service ClusterIP ranges: egress to them is judged on the DNAT backend.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Which non-pod interfaces get the uplink programs.
    pub uplinks: UplinkMode,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("manifest directory {path}: {source}")]
    ManifestDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    NetInfo(#[from] netinfo::NetInfoError),
    #[error("writing status file {path}: {source}")]
    Status { path: PathBuf, source: std::io::Error },
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
}

/// Runs until `stop` is set.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(), StandaloneError> {
    std::fs::read_dir(&cfg.manifests)
        .map_err(|source| StandaloneError::ManifestDir { path: cfg.manifests.clone(), source })?;
    let mut dp = Dataplane::load(&cfg.bpf_dir)?;
    let mut maps = dp.take_maps()?;
    // Until restart adoption exists, start from empty maps so nothing stale is enforced.
    maps.clear_all()?;
    maps.set_service_cidrs(&cfg.service_cidrs)?;
    let mut agent = Agent {
        state: CompilerState::new(),
        written: MapContents::default(),
        attached: BTreeMap::new(),
        uplinks: BTreeMap::new(),
        uplink_failed: BTreeMap::new(),
        last_fingerprint: None,
        last_status: None,
    };
    tracing::info!(manifests = %cfg.manifests.display(), node = %cfg.node_name, "standalone agent started");
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        if let Err(e) = agent.reconcile(cfg, &mut dp, &mut maps) {
            // Keep running: the next change or tick retries from a full compile.
            tracing::error!(error = %e, "reconcile failed");
            agent.last_fingerprint = None;
        }
        let spent = t0.elapsed();
        std::thread::sleep(cfg.poll_interval.saturating_sub(spent));
    }
    let uplinks = std::mem::take(&mut agent.uplinks);
    for (_, (_, a)) in std::mem::take(&mut agent.attached).into_iter().chain(uplinks) {
        let iface = a.interface.clone();
        if let Err(e) = dp.detach(a) {
            tracing::debug!(interface = %iface, error = %e, "detach at exit");
        }
    }
    tracing::info!("standalone agent stopped");
    Ok(())
}

struct Agent {
    state: CompilerState,
    /// What the kernel maps hold (as written by this process).
    written: MapContents,
    /// Interface name -> (its ifindex when attached, the attachment).
    attached: BTreeMap<String, (u32, Attachment)>,
    /// Uplink interface name -> (ifindex, the attachment).
    uplinks: BTreeMap<String, (u32, Attachment)>,
    /// Uplinks whose attach failed, by ifindex (not retried until the interface changes).
    uplink_failed: BTreeMap<String, u32>,
    last_fingerprint: Option<Vec<(PathBuf, u64, Option<std::time::SystemTime>)>>,
    last_status: Option<Status>,
}

impl Agent {
    fn reconcile(
        &mut self,
        cfg: &Config,
        dp: &mut Dataplane,
        maps: &mut DataplaneMaps,
    ) -> Result<(), StandaloneError> {
        let fp = manifests::fingerprint(&cfg.manifests);
        let changed = self.last_fingerprint.as_ref() != Some(&fp);
        // Hash before reading: if a file changes while we read, the next tick sees it.
        let generation = manifests::content_hash(&cfg.manifests);
        let m = manifests::load_dir(&cfg.manifests)
            .map_err(|source| StandaloneError::ManifestDir { path: cfg.manifests.clone(), source })?;
        let problems: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        let snapshot = m.snapshot(&cfg.node_name, netinfo::local_addrs()?);
        if changed {
            for p in &problems {
                tracing::warn!(problem = %p, "manifest problem (enforced fail-closed)");
            }
            let t0 = Instant::now();
            let desired = compiler::compile(&snapshot, &mut self.state);
            let diff = MapContents::diff(&self.written, &desired);
            writer::apply(maps, &diff)?;
            self.written = desired;
            tracing::info!(
                changes = diff.len(),
                endpoints = self.written.endpoints.len(),
                elapsed_us = t0.elapsed().as_micros() as u64,
                "maps updated"
            );
        }
        // Interfaces can appear after the manifests: look every tick.
        let routes = netinfo::routes()?;
        let mut wanted = BTreeSet::new();
        let mut waiting = Vec::new();
        for pod in snapshot.pods.values().filter(|p| snapshot.is_local(p)) {
            let ifaces: BTreeSet<&str> =
                pod.ips.iter().filter_map(|ip| netinfo::iface_for(&routes, *ip)).collect();
            if ifaces.is_empty() {
                waiting.push(pod.key().to_string());
            }
            wanted.extend(ifaces.into_iter().map(str::to_string));
        }
        // An interface deleted (or deleted and re-created: a new ifindex) lost its programs.
        self.attached.retain(|iface, (idx, _)| netinfo::ifindex(iface) == Some(*idx));
        self.uplinks.retain(|iface, (idx, _)| netinfo::ifindex(iface) == Some(*idx));
        // Uplinks first lose what is now a pod's veth (a pod's interface may have looked like
        // an uplink before its pod was known).
        let uplinks = uplink::select(&cfg.uplinks, &uplink::interfaces(), &wanted);
        let gone: Vec<String> = self.uplinks.keys().filter(|i| !uplinks.contains(*i)).cloned().collect();
        for iface in gone {
            if let Some((_, a)) = self.uplinks.remove(&iface) {
                if let Err(e) = dp.detach(a) {
                    tracing::debug!(interface = %iface, error = %e, "detach uplink");
                }
            }
        }
        for iface in &wanted {
            if !self.attached.contains_key(iface) {
                let Some(idx) = netinfo::ifindex(iface) else { continue };
                match dp.attach(iface, cfg.attach_mode) {
                    Ok(a) => {
                        tracing::info!(interface = %iface, "programs attached");
                        self.attached.insert(iface.clone(), (idx, a));
                    }
                    Err(e) => tracing::error!(interface = %iface, error = %e, "attach failed"),
                }
            }
        }
        let gone: Vec<String> =
            self.attached.keys().filter(|i| !wanted.contains(*i)).cloned().collect();
        for iface in gone {
            if let Some((_, a)) = self.attached.remove(&iface) {
                if let Err(e) = dp.detach(a) {
                    tracing::debug!(interface = %iface, error = %e, "detach");
                }
            }
        }
        for iface in &uplinks {
            if self.uplinks.contains_key(iface) {
                continue;
            }
            let Some(idx) = netinfo::ifindex(iface) else { continue };
            if self.uplink_failed.get(iface) == Some(&idx) {
                continue;
            }
            match dp.attach_uplink(iface, cfg.attach_mode) {
                Ok(a) => {
                    tracing::info!(interface = %iface, "uplink programs attached");
                    self.uplink_failed.remove(iface);
                    self.uplinks.insert(iface.clone(), (idx, a));
                }
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "uplink attach failed");
                    self.uplink_failed.insert(iface.clone(), idx);
                }
            }
        }
        self.last_fingerprint = Some(fp);
        let status = Status {
            generation,
            endpoints: self.written.endpoints.len(),
            attached: self.attached.keys().cloned().collect(),
            waiting,
            uplinks: self.uplinks.keys().cloned().collect(),
            problems,
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
    let err = |source| StandaloneError::Status { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(status).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a status file written by [`run`].
pub fn read_status(path: &Path) -> Option<Status> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
