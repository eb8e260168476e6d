//! What the reconcile loop needs of the node: write map changes, repair drift, attach the
//! programs to local pods' interfaces, read the verdict counters and the node's addresses.
//!
//! [`KernelEnforcer`] is the real one over the loaded object and its maps;
//! [`RecordingEnforcer`] keeps the "kernel" in memory and records every call, for tests of
//! the loop that need no kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::compiler::{MapContents, MapDiff};
use crate::dataplane::{
    AttachMode, Attachment, Counters, Dataplane, DataplaneError, DataplaneMaps,
};
use crate::model::ObjectKey;
use crate::{netinfo, writer};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    NetInfo(#[from] netinfo::NetInfoError),
    #[error("reading map {map} back: {source}")]
    ReadBack {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    /// The recording fake was told to fail (tests).
    #[error("injected failure: {0}")]
    Injected(String),
}

impl EnforceError {
    /// Whether the error is a full map (ENOSPC/E2BIG from an insert).
    pub fn is_map_full(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::E2BIG))
            {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// A local pod the programs must be attached for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
}

/// Result of one interface pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceReport {
    /// Interfaces with the programs attached.
    pub attached: Vec<String>,
    /// Local pods whose interface was not found yet.
    pub waiting: Vec<ObjectKey>,
    /// Interfaces where attaching failed (retried next pass).
    pub failed: Vec<(String, String)>,
}

/// The node side of the reconcile loop.
pub trait Enforcer: Send {
    /// Writes `diff`, which takes the maps from the last written state to `desired`, in an
    /// order that never opens traffic mid-way. On error the maps are in an unknown state
    /// between the two; the loop then calls [`Enforcer::repair`].
    fn apply(&mut self, desired: &MapContents, diff: &MapDiff) -> Result<(), EnforceError>;

    /// Makes the maps equal `desired` whatever they hold now (lost writes, entries changed
    /// or added behind the agent's back). Returns the number of entries written or deleted.
    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError>;

    /// Attaches the programs to the host interfaces of these pods (found from their
    /// addresses) and detaches them from interfaces no local pod uses any more.
    fn sync_interfaces(&mut self, local: &[LocalPod]) -> InterfaceReport;

    /// This node's own addresses (the agent runs in the host network namespace).
    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError>;

    /// The kernel's verdict counters summed over CPUs, when there is a kernel.
    fn verdicts(&mut self) -> Option<Counters>;
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

/// The loaded programs and their maps.
pub struct KernelEnforcer {
    dp: Dataplane,
    maps: DataplaneMaps,
    mode: AttachMode,
    /// Interface name -> (ifindex when attached, the attachment).
    attached: BTreeMap<String, (u32, Attachment)>,
}

impl KernelEnforcer {
    /// Takes the maps of a loaded object. Until restart adoption lands the caller starts
    /// from empty maps; the first [`Enforcer::repair`] then writes everything.
    pub fn new(mut dp: Dataplane, mode: AttachMode) -> Result<Self, EnforceError> {
        let maps = dp.take_maps()?;
        Ok(KernelEnforcer {
            dp,
            maps,
            mode,
            attached: BTreeMap::new(),
        })
    }

    pub fn maps(&self) -> &DataplaneMaps {
        &self.maps
    }

    /// Detaches every attachment (agent shutdown without restart adoption).
    pub fn detach_all(&mut self) {
        for (iface, (_, a)) in std::mem::take(&mut self.attached) {
            if let Err(e) = self.dp.detach(a) {
                tracing::debug!(interface = %iface, error = %e, "detach at exit");
            }
        }
    }
}

/// Reads the five policy maps back.
///
/// RESTART/READ-BACK PLUG POINT: the dataplane helper's read-back (adopting pinned maps and
/// writing only the difference) replaces this function and the `repair` body below; the
/// loop's contract (`repair(desired)` makes the maps equal `desired`) stays as it is.
pub fn read_back(maps: &DataplaneMaps) -> Result<MapContents, EnforceError> {
    use policy_common::maps::*;
    let rb = |map: &'static str| {
        move |e: aya::maps::MapError| EnforceError::ReadBack {
            map,
            source: Box::new(e),
        }
    };
    let mut out = MapContents::default();
    for r in maps.endpoints.iter() {
        let (k, v) = r.map_err(rb(MAP_ENDPOINTS))?;
        out.endpoints.insert(k, v);
    }
    for r in maps.ipcache.iter() {
        let (k, v) = r.map_err(rb(MAP_IPCACHE))?;
        out.ipcache.insert(k, v);
    }
    for r in maps.rules.iter() {
        let (k, v) = r.map_err(rb(MAP_RULES))?;
        out.rules.insert(k, v);
    }
    for r in maps.cidr_rules.iter() {
        let (k, v) = r.map_err(rb(MAP_CIDR_RULES))?;
        out.cidr_rules.insert(
            LpmKey {
                prefixlen: k.prefix_len(),
                data: k.data(),
            },
            v,
        );
    }
    for r in maps.ports.iter() {
        let (k, v) = r.map_err(rb(MAP_PORTS))?;
        out.ports.insert(
            LpmKey {
                prefixlen: k.prefix_len(),
                data: k.data(),
            },
            v,
        );
    }
    Ok(out)
}

impl Enforcer for KernelEnforcer {
    fn apply(&mut self, _desired: &MapContents, diff: &MapDiff) -> Result<(), EnforceError> {
        writer::apply(&mut self.maps, diff)?;
        Ok(())
    }

    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError> {
        let now = read_back(&self.maps)?;
        let diff = MapContents::diff(&now, desired);
        writer::apply(&mut self.maps, &diff)?;
        Ok(diff.len())
    }

    fn sync_interfaces(&mut self, local: &[LocalPod]) -> InterfaceReport {
        let mut report = InterfaceReport::default();
        let routes = match netinfo::routes() {
            Ok(r) => r,
            Err(e) => {
                // Keep what is attached: a pod losing its programs would fail open.
                tracing::warn!(error = %e, "reading routes failed");
                report.attached = self.attached.keys().cloned().collect();
                report.failed.push(("<routes>".into(), e.to_string()));
                return report;
            }
        };
        let mut wanted = BTreeSet::new();
        for pod in local {
            let ifaces: BTreeSet<&str> = pod
                .ips
                .iter()
                .filter_map(|ip| netinfo::iface_for(&routes, *ip))
                .collect();
            if ifaces.is_empty() {
                report.waiting.push(pod.key.clone());
            }
            wanted.extend(ifaces.into_iter().map(str::to_string));
        }
        // An interface deleted (or re-created: a new ifindex) lost its programs.
        self.attached
            .retain(|iface, (idx, _)| netinfo::ifindex(iface) == Some(*idx));
        for iface in &wanted {
            if self.attached.contains_key(iface) {
                continue;
            }
            let Some(idx) = netinfo::ifindex(iface) else {
                continue;
            };
            match self.dp.attach(iface, self.mode) {
                Ok(a) => {
                    tracing::info!(interface = %iface, mode = ?a.mode, "programs attached");
                    self.attached.insert(iface.clone(), (idx, a));
                }
                Err(e) => {
                    tracing::error!(interface = %iface, error = %e, "attach failed");
                    report.failed.push((iface.clone(), e.to_string()));
                }
            }
        }
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|i| !wanted.contains(*i))
            .cloned()
            .collect();
        for iface in gone {
            if let Some((_, a)) = self.attached.remove(&iface) {
                tracing::info!(interface = %iface, "programs detached (no local pod)");
                if let Err(e) = self.dp.detach(a) {
                    tracing::debug!(interface = %iface, error = %e, "detach");
                }
            }
        }
        report.attached = self.attached.keys().cloned().collect();
        report
    }

    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError> {
        Ok(netinfo::local_addrs()?)
    }

    fn verdicts(&mut self) -> Option<Counters> {
        match self.maps.counters() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "reading verdict counters failed");
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The recording fake
// ---------------------------------------------------------------------------------------------

/// One call the loop made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Apply { changes: usize },
    Repair { changed: usize },
    Interfaces { pods: Vec<ObjectKey> },
}

/// What the fake holds; shared with the test through [`RecordingEnforcer::state`].
#[derive(Debug, Default)]
pub struct Recorded {
    /// The fake kernel maps.
    pub kernel: MapContents,
    pub calls: Vec<Call>,
    /// Fail the next this-many `apply` calls (the maps stay untouched).
    pub fail_applies: usize,
    pub node_addrs: Vec<IpAddr>,
    pub counters: Counters,
}

/// An in-memory enforcer: applies diffs to [`Recorded::kernel`] exactly as the writer
/// applies them to the kernel, and records every call.
#[derive(Clone, Debug, Default)]
pub struct RecordingEnforcer {
    state: Arc<Mutex<Recorded>>,
}

impl RecordingEnforcer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> Arc<Mutex<Recorded>> {
        self.state.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A test that panicked while holding it already failed; keep the data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Enforcer for RecordingEnforcer {
    fn apply(&mut self, _desired: &MapContents, diff: &MapDiff) -> Result<(), EnforceError> {
        let mut s = self.lock();
        if s.fail_applies > 0 {
            s.fail_applies -= 1;
            s.calls.push(Call::Apply { changes: 0 });
            return Err(EnforceError::Injected("apply".into()));
        }
        diff.apply(&mut s.kernel);
        s.calls.push(Call::Apply {
            changes: diff.len(),
        });
        Ok(())
    }

    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError> {
        let mut s = self.lock();
        let diff = MapContents::diff(&s.kernel, desired);
        diff.apply(&mut s.kernel);
        s.calls.push(Call::Repair {
            changed: diff.len(),
        });
        Ok(diff.len())
    }

    fn sync_interfaces(&mut self, local: &[LocalPod]) -> InterfaceReport {
        let mut s = self.lock();
        let pods: Vec<ObjectKey> = local.iter().map(|p| p.key.clone()).collect();
        if s.calls.last() != Some(&Call::Interfaces { pods: pods.clone() }) {
            s.calls.push(Call::Interfaces { pods: pods.clone() });
        }
        InterfaceReport {
            attached: local
                .iter()
                .map(|p| format!("veth-{}-{}", p.key.namespace, p.key.name))
                .collect(),
            waiting: Vec::new(),
            failed: Vec::new(),
        }
    }

    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError> {
        Ok(self.lock().node_addrs.clone())
    }

    fn verdicts(&mut self) -> Option<Counters> {
        Some(self.lock().counters)
    }
}
