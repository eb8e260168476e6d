//! Standalone mode: enforce the objects of a manifest directory on this host, with no
//! cluster. The agent runs in the node's network namespace, finds each local pod's host-side
//! veth from the route to its address, attaches the programs there, and re-reads the
//! directory whenever it changes (told by inotify, [`manifests::watch`]; polled besides).
//!
//! Restarts and upgrades leave no gap: maps and TCX links are pinned under `--bpf-dir` and
//! stay enforcing while no agent runs (also after a clean stop); a new agent reuses the
//! maps, reads them back, renames its compiler's numbers onto the kernel's and writes only
//! the difference, then takes the pinned links over by replacing their program in place.
//! On the very first start it seeds conntrack from the kernel's connection table.
//! `policy-agent uninstall` removes everything.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cni::PodStarts;
use crate::compiler::capacity::{self, Capacity, Fitted};
use crate::compiler::{Change, Engine};
use crate::dataplane::DataplaneError;
use crate::dataplane::netinfo;
use crate::manifests::{self, Reload};
use crate::model::Snapshot;
use crate::node::{NodeEnforcer, NodeOptions};
use crate::status_file::{self, Status};

mod snapshot;
use snapshot::snapshot_of;

#[derive(Clone, Debug)]
pub struct Config {
    pub manifests: PathBuf,
    /// Pods whose nodeName is unset or equal to this are local.
    pub node_name: String,
    pub poll_interval: Duration,
    /// Where to write what is enforced (see [`Status`]).
    pub status_file: Option<PathBuf>,
    /// The node side: pin directory, attachment, conntrack seeding, migration.
    pub node: NodeOptions,
    /// Starting pods `netpol-cni` waits on (see [`crate::cni`]).
    pub pod_starts: Option<Arc<PodStarts>>,
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
    #[error(transparent)]
    Status(#[from] status_file::StatusFileError),
}

/// Least time between two passes woken by link notifications.
const LINK_EVENT_GAP: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs until `stop` is set. Attachments and maps stay in place when it returns.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(), StandaloneError> {
    std::fs::read_dir(&cfg.manifests).map_err(|source| StandaloneError::ManifestDir {
        path: cfg.manifests.clone(),
        source,
    })?;
    let mut node = NodeEnforcer::start(&cfg.node)?;
    let mut agent = Agent {
        engine: None,
        pending: Vec::new(),
        written_is_engine: false,
        last_fingerprint: None,
        read: None,
        compiled: None,
        last_status: None,
        full: Vec::new(),
        loader: manifests::DirLoader::default(),
    };
    tracing::info!(
        manifests = %cfg.manifests.display(),
        node = %cfg.node_name,
        adopted = node.adopted(),
        entries = node.written().sizes().iter().map(|(_, n, _)| n).sum::<usize>(),
        "standalone agent started"
    );
    let events = match netinfo::LinkEvents::open() {
        Ok(e) => {
            if let Some(ps) = &cfg.pod_starts {
                // A starting pod's reported addresses end the wait at once.
                let waker = e.waker();
                ps.set_waker(move || waker.wake());
            }
            Some(e)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no link notifications: interfaces are polled only");
            None
        }
    };
    // A change written to the directory wakes the same wait: enforced at once, not at the
    // next poll (which stays, for what no notification reports).
    let _watch = events.as_ref().and_then(|e| {
        let waker = e.waker();
        manifests::watch::DirWatch::start(&cfg.manifests, move || waker.wake())
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no manifest notifications: the directory is polled only");
            })
            .ok()
    });
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        if let Err(e) = agent.reconcile(cfg, &mut node) {
            // Keep running: the next tick retries from a full compile against a fresh
            // read of the kernel maps.
            tracing::error!(error = %e, "reconcile failed");
            agent.compiled = None;
        }
        let left = cfg.poll_interval.saturating_sub(t0.elapsed());
        match &events {
            // A link, address or route change (a pod's veth appearing) wakes the next pass
            // at once; a burst of them still leaves a moment between passes.
            Some(e) => {
                if e.wait(left) {
                    std::thread::sleep(LINK_EVENT_GAP);
                }
            }
            None => std::thread::sleep(left),
        }
    }
    // Persistent attachments are left to enforce until the next agent takes them over.
    node.release_all();
    tracing::info!(
        "standalone agent stopped (programs stay attached; `policy-agent uninstall` removes them)"
    );
    Ok(())
}

/// Standalone's own part: turning the directory into snapshots. The node side is
/// [`NodeEnforcer`]'s, the same as in cluster mode.
struct Agent {
    /// The incremental compiler: a change costs what it reaches, not a whole compile.
    engine: Option<Engine>,
    /// Changes of the snapshot the engine has not taken yet.
    pending: Vec<Change>,
    /// The maps hold the engine's contents (nothing fitted away, no failed write): the
    /// engine's own diff is the write.
    written_is_engine: bool,
    /// The directory's fingerprint when it was last read, kept only once it proves the
    /// content unchanged ([`manifests::fingerprint_settled`]): while it matches, nothing is
    /// read or parsed.
    last_fingerprint: Option<manifests::Fingerprint>,
    /// The directory as last read and parsed (updated in place by the loader when only some
    /// files changed), and its snapshot with the node addresses and the generation of
    /// reported pod addresses it was made for.
    read: Option<(manifests::Manifests, Vec<IpAddr>, u64, Snapshot)>,
    /// What the maps hold (directory generation, node addresses, reported-addresses
    /// generation); `None`: compile next tick.
    compiled: Option<(u64, Vec<IpAddr>, u64)>,
    last_status: Option<Status>,
    /// What the last compile did not fit into the maps (reported as problems).
    full: Vec<String>,
    /// Keeps each manifest file's last good version: a file turning bad never opens traffic.
    loader: manifests::DirLoader,
}

impl Agent {
    fn reconcile(&mut self, cfg: &Config, node: &mut NodeEnforcer) -> Result<(), StandaloneError> {
        let t0 = Instant::now();
        let fp = manifests::fingerprint(&cfg.manifests);
        let node_addrs = netinfo::local_addrs()?;
        let (reported_gen, reported) = cfg
            .pod_starts
            .as_ref()
            .map(|ps| ps.reported())
            .unwrap_or_default();
        if self.read.is_none() || self.last_fingerprint.as_ref() != Some(&fp) {
            // Taken before reading: a write racing the read changes it, so the next tick
            // reads again; what is parsed and the generation reported are the same bytes.
            let settled = manifests::fingerprint_settled(&fp, std::time::SystemTime::now());
            let prev = self.read.as_mut().map(|(m, ..)| m);
            let reload = self.loader.reload(&cfg.manifests, prev).map_err(|source| {
                StandaloneError::ManifestDir {
                    path: cfg.manifests.clone(),
                    source,
                }
            })?;
            match (reload, self.read.as_mut()) {
                (Reload::Unchanged, _) => {}
                (Reload::InPlace(touched), Some((m, _, _, snap))) => {
                    log_problems(m);
                    self.pending
                        .extend(snapshot::update(snap, m, &reported, &touched));
                }
                // Not reached: with nothing read before, the loader reads whole.
                (Reload::InPlace(_), None) => return Ok(()),
                (Reload::Whole(m), _) => {
                    log_problems(&m);
                    let snap = snapshot_of(&m, &cfg.node_name, &node_addrs, &reported);
                    if let Some((.., old)) = &self.read {
                        self.pending.extend(snapshot::changes_between(old, &snap));
                    }
                    self.read = Some((m, node_addrs.clone(), reported_gen, snap));
                }
            }
            self.last_fingerprint = settled.then_some(fp);
        }
        let Some((m, addrs, made_gen, snap)) = self.read.as_mut() else {
            return Ok(());
        };
        if *addrs != node_addrs || *made_gen != reported_gen {
            let new = snapshot_of(m, &cfg.node_name, &node_addrs, &reported);
            self.pending.extend(snapshot::changes_between(snap, &new));
            *snap = new;
            *addrs = node_addrs;
            *made_gen = reported_gen;
        }
        let t_read = t0.elapsed();
        let snapshot = &*snap;
        let mut problems: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
        let generation = m.generation;
        let key = (generation, addrs.clone(), reported_gen);
        if self.compiled.as_ref() != Some(&key) {
            let t0 = Instant::now();
            let pending = std::mem::take(&mut self.pending);
            let (engine, diff) = match &mut self.engine {
                Some(e) => {
                    let diff = e.apply_all(snapshot, &pending);
                    (&*e, Some(diff))
                }
                None => (&*self.engine.insert(Engine::new(snapshot)), None),
            };
            let desired = engine.contents();
            let capacity = Capacity::default();
            let written = match diff {
                // The common case: everything fits and the maps hold the engine's last
                // contents, so its diff is the write (a change costs its own entries).
                Some(d) if self.written_is_engine && capacity.overflow(desired).is_empty() => {
                    self.full.clear();
                    node.write_diff(desired, &d)
                }
                _ => {
                    // Too much for the maps: the same fail-closed fit as cluster mode (whole
                    // policy-sets dropped, their endpoints denied everything in that
                    // direction).
                    let fitted = capacity::fit(desired, capacity);
                    self.full = capacity_problems(&fitted);
                    for p in &self.full {
                        tracing::error!(problem = %p, "policy maps full");
                    }
                    let written = node.write(&fitted.contents);
                    self.written_is_engine = fitted.overflowed.is_empty();
                    written
                }
            };
            let changes = written.inspect_err(|_| self.written_is_engine = false)?;
            self.compiled = Some(key);
            tracing::info!(
                changes,
                endpoints = node.written().endpoints.len(),
                elapsed_us = t0.elapsed().as_micros() as u64,
                "maps updated"
            );
        }
        let t_write = t0.elapsed();
        problems.extend(self.full.iter().cloned());
        // Interfaces can appear after the manifests: look every tick.
        let local: Vec<_> = snapshot
            .pods
            .values()
            .filter(|p| snapshot.is_local(p))
            .collect();
        let ifaces = node.sync_interfaces(local.iter().map(|p| (p.key(), p.ips.as_slice())));
        let t_ifaces = t0.elapsed();
        for (iface, error) in &ifaces.failed {
            tracing::warn!(%iface, %error, "attaching failed; retrying next tick");
        }
        if let Some(ps) = &cfg.pod_starts {
            ps.publish(local.iter().map(|p| p.key()), ifaces.enforced);
        }
        let status = Status {
            generation,
            endpoints: node.written().endpoints.len(),
            attached: ifaces.attached,
            waiting: ifaces.waiting.iter().map(ToString::to_string).collect(),
            uplinks: ifaces.uplinks,
            problems,
            adopted: node.adopted(),
            migrated: node.migrated(),
        };
        if self.last_status.as_ref() != Some(&status) {
            if let Some(path) = &cfg.status_file {
                status_file::write(path, &status)?;
            }
            self.last_status = Some(status);
        }
        // Where a pass's time goes (microseconds since its start).
        tracing::debug!(
            read_us = t_read.as_micros() as u64,
            written_us = t_write.as_micros() as u64,
            interfaces_us = t_ifaces.as_micros() as u64,
            done_us = t0.elapsed().as_micros() as u64,
            "pass"
        );
        Ok(())
    }
}

/// A problem line per map the desired contents overflowed.
fn capacity_problems(f: &Fitted) -> Vec<String> {
    f.overflowed
        .iter()
        .map(|(map, entries, capacity)| {
            format!(
                "map {map} full ({entries} entries wanted, {capacity} fit): {} policy sets left \
                 out, {} endpoints deny everything in the affected direction",
                f.dropped_sets.len(),
                f.failclosed.len()
            )
        })
        .collect()
}

/// Logs what the directory holds wrong (each is also in the status file).
fn log_problems(m: &manifests::Manifests) {
    for p in &m.problems {
        tracing::warn!(problem = %p, "manifest problem (enforced fail-closed)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_is_a_problem_naming_the_map_and_what_was_given_up() {
        let f = Fitted {
            overflowed: vec![(policy_common::MAP_RULES, 70_000, 65_536)],
            dropped_sets: [3, 4].into(),
            failclosed: [policy_common::maps::EndpointKey::default()].into(),
            ..Fitted::default()
        };
        assert_eq!(
            capacity_problems(&f),
            [
                "map RULES full (70000 entries wanted, 65536 fit): 2 policy sets left out, 1 \
              endpoints deny everything in the affected direction"
            ]
        );
        assert!(capacity_problems(&Fitted::default()).is_empty());
    }
}
