//! The one writer: waits for the caches, then on every (debounced) change and every resync
//! brings its snapshot of all caches up to date, compiles the changed objects, fits the
//! result to the maps and writes the difference. Nothing else writes the maps.
//!
//! - Snapshots, never events: every pass walks the whole caches (a deleted object is simply
//!   absent), so a lost delete event (or a re-list after a dropped watch) is repaired by
//!   construction. Only objects whose version changed are converted again
//!   ([`SnapshotCache`]), and only they are recompiled ([`Engine::apply_all`]).
//! - Bursts coalesce: a change after `debounce` of quiet is compiled at once; changes within
//!   `debounce` of the last pass wait out the rest of it and are compiled together.
//! - Resync: every `resync` the maps are repaired against the desired state (drift from
//!   failed or foreign writes), the kept snapshot is checked against one built from scratch,
//!   and the incremental compile against a full one.
//! - A failed write leaves the maps unknown: the next pass repairs instead of diffing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::cache::SnapshotCache;
use super::enforcer::{Enforcer, LocalPod, Write};
use super::generation::Generation;
use super::snapshot::{self, Objects, PolicyProblems};
use super::watch::{Changes, Stores};
use crate::cni::PodStarts;
use crate::compiler::capacity::{self, Capacity};
use crate::compiler::{self, Change, Engine, MapContents, MapDiff};
use crate::metrics::{ErrorKind, Health, Metrics};
use crate::model::{self, ObjectKey, Snapshot};
use crate::node::Interfaces;
use crate::status_file::{self, Status};

/// Timings of the loop.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub node: String,
    /// Least time between change-triggered passes (coalesces bursts; a change after that
    /// much quiet is compiled at once).
    pub debounce: Duration,
    /// Full repair of the maps and self-check of the incremental compile.
    pub resync: Duration,
    /// How often pod interfaces are looked for and the verdict counters read.
    pub poll: Duration,
    /// Map capacities (tests shrink them).
    pub capacity: Capacity,
    /// Starting pods `netpol-cni` waits on: their reported addresses come in, and which
    /// local pods are enforced goes out after every interface pass.
    pub pod_starts: Option<Arc<PodStarts>>,
    /// Where to write what is enforced after every pass and interface change (the
    /// generation is [`Generation`] of the cached objects).
    pub status_file: Option<PathBuf>,
}

impl LoopConfig {
    pub fn new(node: impl Into<String>) -> Self {
        LoopConfig {
            node: node.into(),
            debounce: Duration::from_millis(50),
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(1),
            capacity: Capacity::default(),
            pod_starts: None,
            status_file: None,
        }
    }
}

/// Why a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Change,
    Resync,
}

pub struct Reconciler<E: Enforcer> {
    cfg: LoopConfig,
    enforcer: E,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    events: Option<mpsc::UnboundedSender<PolicyProblems>>,
    engine: Option<Engine>,
    /// The caches' model snapshot, kept across passes.
    cache: SnapshotCache,
    /// What the maps hold, as far as this process knows.
    written: MapContents,
    /// `written` equals the engine's contents (nothing fitted away, nothing failed): the
    /// engine's own diff is then the diff to write.
    written_is_engine: bool,
    /// The maps may differ from `written` (a failed write): repair on the next pass.
    needs_repair: bool,
    /// Problems already reported, per policy (so a resync does not repeat Events).
    reported: BTreeMap<ObjectKey, Vec<snapshot::Problem>>,
    /// Addresses more than one pod claims, as last logged.
    shared: BTreeMap<IpAddr, Vec<ObjectKey>>,
    local: Vec<LocalPod>,
    failures: u32,
    /// The generation of the objects the maps hold (with a status file only).
    enforced: Option<u64>,
    last_status: Option<Status>,
}

impl<E: Enforcer> Reconciler<E> {
    pub fn new(
        cfg: LoopConfig,
        enforcer: E,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        events: Option<mpsc::UnboundedSender<PolicyProblems>>,
    ) -> Self {
        Reconciler {
            enforcer,
            metrics,
            health,
            events,
            engine: None,
            cache: SnapshotCache::new(&cfg.node),
            written: MapContents::default(),
            written_is_engine: false,
            // Until restart adoption reads the pinned maps, assume nothing about them.
            needs_repair: true,
            reported: BTreeMap::new(),
            shared: BTreeMap::new(),
            local: Vec::new(),
            failures: 0,
            enforced: None,
            last_status: None,
            cfg,
        }
    }

    pub fn enforcer(&mut self) -> &mut E {
        &mut self.enforcer
    }

    /// Runs until `shutdown` resolves; returns the enforcer (for detaching at exit).
    pub async fn run(
        mut self,
        stores: Stores,
        changes: Arc<Changes>,
        shutdown: impl Future<Output = ()>,
    ) -> E {
        let mut shutdown = std::pin::pin!(shutdown);
        tracing::info!(node = %self.cfg.node, "waiting for the watch caches");
        {
            let ready = stores.wait_until_ready();
            let mut ready = std::pin::pin!(ready);
            loop {
                self.health.beat();
                tokio::select! {
                    r = &mut ready => {
                        if let Err(e) = r {
                            tracing::error!(error = %e, "a watch cache will never be ready");
                            return self.enforcer;
                        }
                        break;
                    }
                    _ = tokio::time::sleep(self.cfg.poll) => {}
                    _ = &mut shutdown => return self.enforcer,
                }
            }
        }
        self.health.set_synced();
        tracing::info!("watch caches synced");
        // The first pass covers everything seen so far.
        let mut seen = changes.take().or(Some(Instant::now()));
        let mut next_resync = tokio::time::Instant::now() + self.cfg.resync;
        let mut next_poll = tokio::time::Instant::now() + self.cfg.poll;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut trigger = Some(Trigger::Change);
        // When the last change-triggered pass ended (the debounce counts from it).
        let mut last_change_pass = Instant::now();
        let links = link_notifications();
        let starting = Arc::new(tokio::sync::Notify::new());
        if let Some(ps) = &self.cfg.pod_starts {
            let n = Arc::downgrade(&starting);
            ps.set_waker(move || {
                if let Some(n) = n.upgrade() {
                    n.notify_one();
                }
            });
        }
        loop {
            self.health.beat();
            if let Some(t) = trigger.take() {
                let ok = self.pass(&stores, t, seen.take());
                if t == Trigger::Change {
                    last_change_pass = Instant::now();
                }
                if ok {
                    self.failures = 0;
                    retry_at = None;
                } else {
                    self.failures = self.failures.saturating_add(1);
                    let backoff = Duration::from_millis(200u64 << self.failures.min(8))
                        .min(Duration::from_secs(30));
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changes.notified() => {
                    if !changes.is_pending() {
                        continue; // a wake-up for a change an earlier pass already took
                    }
                    // Coalesce bursts without delaying a lone change: the first change after
                    // `debounce` of quiet is compiled at once; what follows within
                    // `debounce` of that pass waits out the rest of it and joins one pass.
                    let since = last_change_pass.elapsed();
                    if since < self.cfg.debounce {
                        tokio::time::sleep(self.cfg.debounce - since).await;
                    }
                    seen = changes.take();
                    trigger = Some(Trigger::Change);
                }
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = tokio::time::Instant::now() + self.cfg.resync;
                    seen = changes.take();
                    trigger = Some(Trigger::Resync);
                }
                _ = retry => {
                    seen = changes.take();
                    trigger = Some(Trigger::Change);
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    next_poll = tokio::time::Instant::now() + self.cfg.poll;
                    self.poll();
                }
                // A pod's veth or route appearing: its programs now, not at the next poll.
                _ = links.notified() => self.poll(),
                // A starting pod's addresses, reported by netpol-cni while its runtime
                // waits: compiled at once, no debounce.
                _ = starting.notified() => {
                    seen = changes.take().or(Some(Instant::now()));
                    trigger = Some(Trigger::Change);
                }
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("reconcile loop stopped");
        self.enforcer
    }

    /// Interfaces (pods' veths come and go) and the verdict counters.
    ///
    /// (Also run on every link notification, see [`link_notifications`].)
    fn poll(&mut self) {
        let report = blocking(|| self.enforcer.sync_interfaces(&self.local));
        if let Some(ps) = &self.cfg.pod_starts
            && !self.needs_repair
        {
            // Only with the maps as written: a pod counts as enforced with its endpoint.
            ps.publish(
                self.local.iter().map(|p| p.key.clone()),
                report.enforced.iter().cloned(),
            );
        }
        for _ in &report.failed {
            self.metrics.error(ErrorKind::Attach);
        }
        self.metrics
            .set_interfaces(report.attached.len(), report.waiting.len());
        if let Some(c) = self.enforcer.verdicts() {
            self.metrics.set_verdicts(&c);
        }
        self.write_status(report);
    }

    /// The status file, when asked for and the maps hold what a pass wrote.
    fn write_status(&mut self, report: Interfaces<ObjectKey>) {
        let (Some(path), Some(generation)) = (&self.cfg.status_file, self.enforced) else {
            return;
        };
        if self.needs_repair {
            return;
        }
        let status = Status {
            generation,
            endpoints: self.written.endpoints.len(),
            attached: report.attached,
            waiting: report.waiting.iter().map(ToString::to_string).collect(),
            uplinks: report.uplinks,
            problems: self
                .cache
                .problems()
                .values()
                .flat_map(|pp| pp.problems.iter().map(|p| p.message.clone()))
                .collect(),
            adopted: self.enforcer.adopted(),
            migrated: self.enforcer.migrated(),
        };
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        match status_file::write(path, &status) {
            Ok(()) => self.last_status = Some(status),
            Err(e) => tracing::warn!(error = %e, "status file not written"),
        }
    }

    /// One change-triggered pass now, outside the loop (benchmarks and tests drive it);
    /// `false` when the maps could not be written.
    pub fn pass_now(&mut self, stores: &Stores) -> bool {
        self.pass(stores, Trigger::Change, None)
    }

    /// One compile-and-write pass; `false` when the maps could not be written.
    fn pass(&mut self, stores: &Stores, trigger: Trigger, seen: Option<Instant>) -> bool {
        let t0 = Instant::now();
        let node_addrs = match self.enforcer.node_addrs() {
            Ok(a) => a,
            Err(e) => {
                self.metrics.error(ErrorKind::NetInfo);
                tracing::warn!(error = %e, "reading the node addresses failed; keeping the last ones");
                self.cache.snapshot().node_addrs.clone()
            }
        };
        let resync = trigger == Trigger::Resync;
        // One read of the caches serves both the kept snapshot and the resync's reference.
        let mut objects = Objects::read(stores);
        if let Some(ps) = &self.cfg.pod_starts {
            objects.reported = ps.reported().1;
        }
        let generation = self
            .cfg
            .status_file
            .is_some()
            .then(|| Generation::of(&objects).value());
        let mut update = self.cache.update(&objects, node_addrs.clone());
        if resync {
            let built = snapshot::build_from(&objects, &self.cfg.node, node_addrs.clone());
            if !self.cache.matches(&built) {
                self.metrics.error(ErrorKind::CompileMismatch);
                tracing::error!("kept snapshot differs from one built from scratch; rebuilding it");
                self.cache = SnapshotCache::new(&self.cfg.node);
                update = self.cache.update(&objects, node_addrs);
                self.engine = None;
            }
        }
        drop(objects);
        for (kind, n) in ["pods", "namespaces", "networkpolicies"]
            .into_iter()
            .zip(self.cache.counts())
        {
            self.metrics.set_objects(kind, n);
        }
        report_problems(
            &mut self.reported,
            &self.metrics,
            self.events.as_ref(),
            self.cache.problems(),
        );
        let snap = self.cache.snapshot();
        let pods_changed = update.changes.iter().any(|c| matches!(c, Change::Pod(_)));
        if pods_changed || resync {
            report_shared_addresses(&mut self.shared, snap);
        }

        let (engine, engine_diff) = blocking(|| {
            compile(
                &mut self.engine,
                snap,
                &update.changes,
                resync,
                &self.metrics,
            )
        });
        let desired = engine.contents();
        let repair = self.needs_repair || resync;
        let plan = match engine_diff {
            // The common case: everything fits and the maps hold the engine's last contents,
            // so the engine's diff is the write and nothing is copied or compared whole.
            Some(d)
                if !repair
                    && self.written_is_engine
                    && self.cfg.capacity.overflow(desired).is_empty() =>
            {
                WritePlan::EngineDiff(d)
            }
            _ => {
                let fitted = capacity::fit(desired, self.cfg.capacity);
                if !fitted.overflowed.is_empty() {
                    self.metrics.error(ErrorKind::MapFull);
                    tracing::error!(
                        overflowed = ?fitted.overflowed,
                        dropped_policy_sets = fitted.dropped_sets.len(),
                        failclosed_endpoints = fitted.failclosed.len(),
                        "policy maps full: affected endpoints deny everything in the affected direction"
                    );
                }
                if repair {
                    WritePlan::Repair(fitted)
                } else {
                    WritePlan::Whole(fitted)
                }
            }
        };
        self.metrics.set_failclosed_endpoints(plan.failclosed());
        let enforcer = &mut self.enforcer;
        let written = &self.written;
        let result = blocking(|| match &plan {
            WritePlan::EngineDiff(diff) => {
                if diff.is_empty() {
                    return Ok((0, false));
                }
                enforcer
                    .apply(desired, Write::Engine(diff))
                    .map(|()| (diff.len(), false))
            }
            WritePlan::Repair(f) => enforcer.repair(&f.contents).map(|n| (n, true)),
            WritePlan::Whole(f) => {
                let diff = MapContents::diff(written, &f.contents);
                if diff.is_empty() {
                    return Ok((0, false));
                }
                enforcer
                    .apply(&f.contents, Write::Whole)
                    .map(|()| (diff.len(), false))
            }
        });
        self.metrics.reconciled(resync);
        let ok = match result {
            Ok((changes, repaired)) => {
                self.needs_repair = false;
                self.enforced = generation;
                match plan {
                    WritePlan::EngineDiff(diff) => diff.apply(&mut self.written),
                    WritePlan::Repair(f) | WritePlan::Whole(f) => {
                        self.written_is_engine = f.overflowed.is_empty();
                        self.written = f.contents;
                    }
                }
                if let Some(seen) = seen {
                    self.metrics.observe_programming(seen.elapsed());
                }
                self.metrics.set_map_entries(&self.written.sizes());
                if repaired && changes > 0 && trigger == Trigger::Resync {
                    tracing::warn!(entries = changes, "resync repaired drift in the maps");
                }
                tracing::info!(
                    trigger = ?trigger,
                    changes,
                    repaired,
                    converted = update.converted,
                    pods = snap.pods.len(),
                    policies = snap.policies.len(),
                    endpoints = self.written.endpoints.len(),
                    elapsed_us = t0.elapsed().as_micros() as u64,
                    "maps reconciled"
                );
                true
            }
            Err(e) => {
                self.needs_repair = true;
                self.written_is_engine = false;
                let kind = if e.is_map_full() {
                    ErrorKind::MapFull
                } else {
                    ErrorKind::MapWrite
                };
                self.metrics.error(kind);
                tracing::error!(error = %e, kind = kind.as_str(), "writing the maps failed; repairing on retry");
                false
            }
        };
        if pods_changed || update.changes.contains(&Change::NodeAddrs) {
            self.local = snap
                .pods
                .values()
                .filter(|p| snap.is_local(p) && !p.ips.is_empty())
                .map(|p| LocalPod {
                    key: p.key(),
                    ips: p.ips.clone(),
                })
                .collect();
        }
        // Attach to new pods' interfaces now rather than at the next poll.
        self.poll();
        if ok {
            // Ready means enforcing: maps written and the programs on the pods' veths.
            self.health.set_programmed();
        }
        ok
    }
}

/// The engine holding `snap`: incremental from the last pass, checked against a full compile
/// when `check`. The diff is the engine's own when it was applied incrementally and passed
/// the check; `None` when the engine was (re)built.
fn compile<'e>(
    slot: &'e mut Option<Engine>,
    snap: &Snapshot,
    changes: &[Change],
    check: bool,
    metrics: &Metrics,
) -> (&'e Engine, Option<MapDiff>) {
    let (engine, mut diff) = match slot {
        Some(engine) => {
            let diff = engine.apply_all(snap, changes);
            (engine, Some(diff))
        }
        None => (slot.insert(Engine::new(snap)), None),
    };
    if check {
        let full = compiler::compile(snap, &mut engine.numbers().clone());
        if &full != engine.contents() {
            metrics.error(ErrorKind::CompileMismatch);
            tracing::error!("incremental compile differs from a full compile; rebuilding it");
            *engine = Engine::new(snap);
            diff = None;
        }
    }
    (engine, diff)
}

/// How one pass writes the maps.
enum WritePlan {
    /// The engine's own diff: the maps hold the engine's last contents and the new ones fit.
    EngineDiff(MapDiff),
    /// Whole contents, fitted to capacity, diffed against what was written.
    Whole(capacity::Fitted),
    /// Whole contents, fitted, made equal to whatever the kernel holds (after a failed
    /// write, and on every resync).
    Repair(capacity::Fitted),
}

impl WritePlan {
    /// Endpoints the fit denied everything (0 when nothing had to be given up).
    fn failclosed(&self) -> usize {
        match self {
            WritePlan::EngineDiff(_) => 0,
            WritePlan::Whole(f) | WritePlan::Repair(f) => f.failclosed.len(),
        }
    }
}

/// Logs, counts and publishes the problems of policies not reported in this form before.
fn report_problems(
    reported: &mut BTreeMap<ObjectKey, Vec<snapshot::Problem>>,
    metrics: &Metrics,
    events: Option<&mpsc::UnboundedSender<PolicyProblems>>,
    now: &BTreeMap<ObjectKey, PolicyProblems>,
) {
    reported.retain(|k, _| now.contains_key(k));
    for (key, pp) in now {
        if reported.get(key) == Some(&pp.problems) {
            continue;
        }
        for p in &pp.problems {
            metrics.error(ErrorKind::InvalidPolicy);
            tracing::warn!(policy = %key, field = %p.field, problem = %p.message, "invalid NetworkPolicy");
        }
        if let Some(tx) = events {
            // The publisher outlives the loop; a closed channel only loses Events.
            let _ = tx.send(pp.clone());
        }
        reported.insert(key.clone(), pp.problems.clone());
    }
}

/// Logs each address more than one pod claims, once (again when its claimants change);
/// returns how many were logged. The compiler already keeps such an address from granting
/// either pod anything the other would not (see `compiler::shared_endpoint`).
fn report_shared_addresses(
    reported: &mut BTreeMap<IpAddr, Vec<ObjectKey>>,
    snap: &Snapshot,
) -> usize {
    let now = model::shared_addresses(snap.pods.values());
    let mut logged = 0;
    for (addr, pods) in &now {
        if reported.get(addr) == Some(pods) {
            continue;
        }
        let pods: Vec<String> = pods.iter().map(ToString::to_string).collect();
        tracing::warn!(
            %addr,
            pods = %pods.join(", "),
            "address claimed by more than one pod (a stale pod object or a forged status): as a peer it has no pod identity unless theirs agree, as a local endpoint it denies everything but the node unless their policies agree"
        );
        logged += 1;
    }
    *reported = now;
    logged
}

/// The objects that differ between two snapshots, as incremental-compile changes.
pub fn changes_between(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    if old.node_addrs != new.node_addrs {
        out.push(Change::NodeAddrs);
    }
    diff_keys(&old.namespaces, &new.namespaces, |k| {
        out.push(Change::Namespace(k.clone()))
    });
    diff_keys(&old.pods, &new.pods, |k| out.push(Change::Pod(k.clone())));
    diff_keys(&old.policies, &new.policies, |k| {
        out.push(Change::Policy(k.clone()))
    });
    out
}

fn diff_keys<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut f: impl FnMut(&K),
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            f(k);
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            f(k);
        }
    }
}

/// Runs CPU- or syscall-heavy work without stalling the runtime's other tasks (watchers,
/// the metrics endpoint) where the runtime allows it.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Woken on every link, address or route change of this namespace, by a thread reading the
/// kernel's notifications ([`crate::dataplane::netinfo::LinkEvents`]); the thread ends once the loop
/// drops the handle. Never woken when notifications cannot be had (the poll remains).
fn link_notifications() -> std::sync::Arc<tokio::sync::Notify> {
    let notify = std::sync::Arc::new(tokio::sync::Notify::new());
    match crate::dataplane::netinfo::LinkEvents::open() {
        Ok(events) => {
            let weak = std::sync::Arc::downgrade(&notify);
            let spawned = std::thread::Builder::new()
                .name("link-events".into())
                .spawn(move || {
                    loop {
                        let woke = events.wait(Duration::from_secs(1));
                        let Some(n) = weak.upgrade() else { return };
                        if woke {
                            n.notify_one();
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no link notifications: interfaces are polled only");
            }
        }
        Err(e) => tracing::warn!(error = %e, "no link notifications: interfaces are polled only"),
    }
    notify
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::networking::v1 as net;
    use kube::core::DeserializeGuard;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::cluster::enforcer::EnforceError;
    use crate::dataplane::renumber::renumber_onto;
    use crate::node::Interfaces;

    /// The "kernel" in memory; the full recording fake lives in the testkit crate, which unit
    /// tests cannot use (they would see two copies of this crate).
    #[derive(Clone, Default)]
    struct MemoryEnforcer {
        kernel: Arc<std::sync::Mutex<MapContents>>,
    }

    impl MemoryEnforcer {
        fn kernel(&self) -> MapContents {
            self.kernel.lock().unwrap().clone()
        }
    }

    impl Enforcer for MemoryEnforcer {
        fn apply(&mut self, desired: &MapContents, how: Write<'_>) -> Result<(), EnforceError> {
            let mut k = self.kernel.lock().unwrap();
            match how {
                Write::Engine(d) => d.apply(&mut k),
                Write::Whole => MapContents::diff(&k, desired).apply(&mut k),
            }
            Ok(())
        }

        fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError> {
            let mut k = self.kernel.lock().unwrap();
            let diff = MapContents::diff(&k, desired);
            diff.apply(&mut k);
            Ok(diff.len())
        }

        fn sync_interfaces(&mut self, local: &[LocalPod]) -> Interfaces<ObjectKey> {
            Interfaces {
                attached: local.iter().map(|p| p.key.name.clone()).collect(),
                ..Interfaces::default()
            }
        }

        fn node_addrs(&mut self) -> Result<Vec<std::net::IpAddr>, EnforceError> {
            Ok(Vec::new())
        }

        fn verdicts(&mut self) -> Option<crate::dataplane::Counters> {
            None
        }
    }

    #[test]
    fn an_address_claimed_twice_is_logged_once_until_its_claimants_change() {
        let pod = |name: &str| model::Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: Default::default(),
            ips: vec!["198.18.0.7".parse().unwrap()],
            ports: Vec::new(),
            host_network: false,
            node: None,
        };
        let mut snap = Snapshot::default();
        for p in [pod("a"), pod("b")] {
            snap.pods.insert(p.key(), p);
        }
        let mut reported = BTreeMap::new();
        assert_eq!(report_shared_addresses(&mut reported, &snap), 1);
        assert_eq!(report_shared_addresses(&mut reported, &snap), 0);
        let c = pod("c");
        snap.pods.insert(c.key(), c);
        assert_eq!(report_shared_addresses(&mut reported, &snap), 1);
        snap.pods.retain(|k, _| k.name == "a");
        assert_eq!(report_shared_addresses(&mut reported, &snap), 0);
        assert!(reported.is_empty());
    }

    #[test]
    fn reconcile_resync_rebuilds_a_damaged_kept_snapshot() {
        let mut wp = Writer::<DeserializeGuard<core::Pod>>::default();
        let wn = Writer::<DeserializeGuard<core::Namespace>>::default();
        let wnp = Writer::<DeserializeGuard<net::NetworkPolicy>>::default();
        for (name, ip) in [("web", "198.18.0.1"), ("db", "198.18.0.2")] {
            let pod: core::Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "a", "name": name, "resourceVersion": "1", "labels": {"app": name}},
                "spec": {"nodeName": "n0", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }))
            .unwrap();
            wp.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(pod))));
        }
        let stores = Stores {
            pods: wp.as_reader(),
            namespaces: wn.as_reader(),
            policies: wnp.as_reader(),
        };
        let enforcer = MemoryEnforcer::default();
        let metrics = Arc::new(Metrics::new());
        let mut r = Reconciler::new(
            LoopConfig::new("n0"),
            enforcer.clone(),
            metrics.clone(),
            Arc::new(Health::new(Duration::from_secs(60))),
            None,
        );
        assert!(r.pass_now(&stores));
        let good = enforcer.kernel();
        assert_eq!(good.endpoints.len(), 2);

        // A bug drops a pod from the kept snapshot; the caches did not change, so a change
        // pass has nothing to convert and keeps it lost.
        r.cache
            .snapshot_mut()
            .pods
            .remove(&ObjectKey::new("a", "db"));
        assert!(r.pass_now(&stores));
        assert_eq!(metrics.error_count(ErrorKind::CompileMismatch), 0);
        // The resync compares with a from-scratch build, rebuilds, and repairs the maps.
        assert!(r.pass(&stores, Trigger::Resync, None));
        assert_eq!(metrics.error_count(ErrorKind::CompileMismatch), 1);
        assert_eq!(r.cache.snapshot().pods.len(), 2);
        let kernel = enforcer.kernel();
        assert_eq!(renumber_onto(&good, &kernel), good);
        // And stays quiet once repaired.
        assert!(r.pass(&stores, Trigger::Resync, None));
        assert_eq!(metrics.error_count(ErrorKind::CompileMismatch), 1);
    }
}
