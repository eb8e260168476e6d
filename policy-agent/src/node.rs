//! The node side of enforcement, one for both modes: loading the programs (taking over what
//! an earlier agent pinned, or migrating its incompatible maps), seeding conntrack, writing
//! compiled contents renumbered onto what the kernel holds, and keeping the programs on the
//! right interfaces. Standalone mode and the cluster loop only decide *what* to enforce;
//! everything here is the same whichever of them asks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::compiler::addr_of;
use crate::compiler::{MapContents, MapDiff};
use crate::dataplane::{
    AttachMode, Counters, Dataplane, DataplaneError, DataplaneMaps, Established, LinkSet, PinState,
    Role, Translation, UplinkMode, adopt_kernel_state, ctseed, links, pinning, renumber_with,
    service_judge, uplink,
};
use crate::dataplane::{netinfo, writer};
use policy_common::BindingKey;

/// How the node side starts.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// bpffs directory of the pinned maps and links.
    pub bpf_dir: PathBuf,
    pub attach_mode: AttachMode,
    /// Which non-pod interfaces get the uplink programs.
    pub uplink_mode: UplinkMode,
    /// Service ClusterIP ranges: egress to them is judged on the DNAT backend.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Remove whatever an earlier agent pinned first (enforcement restarts from nothing).
    pub reset: bool,
    /// Seed conntrack from the kernel's connection table when starting on new maps.
    pub seed_conntrack: bool,
    /// When the pinned maps do not match this agent's object (an upgrade changed a map),
    /// move to new maps without a gap; else refuse to start, leaving the old programs
    /// enforcing (fail closed, never open).
    pub migrate: bool,
    /// What a policy change does to open connections.
    pub established: Established,
}

impl NodeOptions {
    pub fn new(bpf_dir: &Path) -> NodeOptions {
        NodeOptions {
            bpf_dir: bpf_dir.to_path_buf(),
            attach_mode: AttachMode::Auto,
            uplink_mode: UplinkMode::Auto,
            service_cidrs: Vec::new(),
            reset: false,
            seed_conntrack: true,
            migrate: true,
            established: Established::default(),
        }
    }
}

/// Result of one interface pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interfaces<K> {
    /// Interfaces with the pod programs attached.
    pub attached: Vec<String>,
    /// Local pods whose interface was not found yet (isolated anyway once it appears).
    pub waiting: Vec<K>,
    /// Non-pod interfaces with the uplink programs.
    pub uplinks: Vec<String>,
    /// Interfaces where attaching failed (retried next pass), with why.
    pub failed: Vec<(String, String)>,
    /// Local pods enforced: every address bound on an interface with the pod programs
    /// (their endpoints are whatever the caller wrote before this pass).
    pub enforced: Vec<(K, Vec<IpAddr>)>,
}

impl<K> Default for Interfaces<K> {
    fn default() -> Self {
        Interfaces {
            attached: Vec::new(),
            waiting: Vec::new(),
            uplinks: Vec::new(),
            failed: Vec::new(),
            enforced: Vec::new(),
        }
    }
}

/// The loaded programs, their maps and attachments.
pub struct NodeEnforcer {
    dp: Dataplane,
    maps: DataplaneMaps,
    mode: AttachMode,
    uplink_mode: UplinkMode,
    /// What the kernel maps hold, in the kernel's numbering.
    written: MapContents,
    /// `written` may be wrong (a write failed half-way): read the kernel before the next.
    stale: bool,
    /// How the last whole write renamed the caller's numbers onto the kernel's: the
    /// caller's later diffs in the same numbering are written translated.
    translation: Option<Translation>,
    /// Whether the pinned links of an earlier agent were taken over yet.
    pins_adopted: bool,
    attached: LinkSet,
    uplinks: LinkSet,
    /// The (interface, address) pairs `BINDINGS` holds.
    bound: BTreeSet<BindingKey>,
    adopted: bool,
    migrated: bool,
    /// The old agent's Service judge still runs beside ours (a migration in progress).
    judges_to_settle: bool,
}

impl NodeEnforcer {
    /// Loads the object under `opts.bpf_dir` and takes its maps: pinned maps of an earlier
    /// agent are adopted (read back; later writes are renumbered onto them, so an unchanged
    /// policy writes nothing); incompatible ones are migrated when `opts.migrate` (the old
    /// agent's conntrack copied when its layout allows, else seeded); new maps get
    /// conntrack seeded from the kernel's table so enforcement starting cuts nothing.
    pub fn start(opts: &NodeOptions) -> Result<NodeEnforcer, DataplaneError> {
        if opts.reset {
            let object = crate::ebpf_object::require()?;
            let gone = pinning::uninstall(object, &opts.bpf_dir)?;
            tracing::warn!(?gone, "reset: removed what an earlier agent pinned");
        }
        // An incompatible pin directory fails here, before anything is touched: the programs
        // already attached keep enforcing their own maps.
        let dp = match Dataplane::load(&opts.bpf_dir) {
            Err(DataplaneError::Incompatible { detail, .. }) if opts.migrate => {
                tracing::warn!(%detail, "pinned maps do not match this agent: migrating to new maps");
                Dataplane::load_staged(&opts.bpf_dir)?
            }
            r => r?,
        };
        Self::with_dataplane(dp, opts)
    }

    /// [`NodeEnforcer::start`] over an object loaded by the caller.
    pub fn with_dataplane(
        mut dp: Dataplane,
        opts: &NodeOptions,
    ) -> Result<NodeEnforcer, DataplaneError> {
        dp.persist_links();
        let mut maps = dp.take_maps()?;
        maps.set_established(opts.established);
        let adopted = dp.pin_state() == PinState::Adopted;
        let mut seed = !adopted && opts.seed_conntrack;
        if dp.pin_state() == PinState::Migrating {
            // The old agent's table, when its layout is ours; else the kernel's (established
            // connections only: the same as a first start).
            let old = opts.bpf_dir.join(policy_common::MAP_CONNTRACK);
            match ctseed::copy_pinned(&mut maps, &old) {
                Ok(Some(n)) => {
                    tracing::info!(entries = n, "conntrack copied from the old map");
                    seed = false;
                }
                Ok(None) => tracing::warn!(
                    "old conntrack map of another layout: seeding from the kernel's table"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "old conntrack map unreadable: seeding from the kernel's table"
                ),
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
                // No table means no tracked connection to keep (nf_conntrack not in use).
                Err(e) => {
                    tracing::warn!(error = %e, "kernel connection table unreadable; nothing seeded")
                }
            }
        } else if adopted {
            tracing::info!("adopted the maps and links an earlier agent pinned");
        }
        maps.set_service_cidrs(&opts.service_cidrs)?;
        let mut judges_to_settle = false;
        if !opts.service_cidrs.is_empty() {
            // Deferred Service egress whose translated packet meets no TC hook is judged in
            // netfilter; without that judge it would pass unjudged, so no start without it.
            let pin = dp.pin_service_judge()?;
            // Migrating: the old programs keep deferring into the old maps until their links
            // switch, and only the old judge reads those; both judge until then.
            let old = opts.bpf_dir.join(policy_common::PROG_SERVICE_JUDGE);
            let both = dp.pin_state() == PinState::Migrating && old.exists();
            let pins: Vec<&Path> = if both { vec![&old, &pin] } else { vec![&pin] };
            service_judge::install(&pins)?;
            judges_to_settle = both;
            tracing::info!(pin = %pin.display(), with_old = both, "translated Service traffic judged in netfilter");
        }
        let written = maps.read_contents()?;
        let bound = maps.bindings()?.into_iter().collect();
        Ok(NodeEnforcer {
            dp,
            maps,
            mode: opts.attach_mode,
            uplink_mode: opts.uplink_mode.clone(),
            written,
            stale: false,
            translation: None,
            pins_adopted: false,
            attached: LinkSet::new(Role::Pod),
            uplinks: LinkSet::new(Role::Uplink),
            bound,
            adopted,
            migrated: false,
            judges_to_settle,
        })
    }

    /// Writes `desired` (in any numbering): renamed onto the kernel's numbers where the
    /// meaning is the same, a changed table under a number nothing uses, and only the
    /// difference written, in the writer's order. Returns the entries written or deleted.
    pub fn write(&mut self, desired: &MapContents) -> Result<usize, DataplaneError> {
        if self.stale {
            self.written = self.maps.read_contents()?;
            self.stale = false;
        }
        self.translation = None;
        let (target, translation) = renumber_with(&self.written, desired);
        let diff = MapContents::diff(&self.written, &target);
        if let Err(e) = writer::apply(&mut self.maps, &diff) {
            self.stale = true;
            return Err(e);
        }
        self.written = target;
        self.translation = Some(translation);
        Ok(diff.len())
    }

    /// Writes `diff`, which takes the caller's last written contents to `desired` in the
    /// same numbering (the incremental engine's own diff): translated into the kernel's
    /// numbers and written as it is, so a change costs its own entries, not a pass over
    /// everything. Without a numbering to translate with (first write, after a failure or
    /// a repair) it is a whole [`NodeEnforcer::write`] of `desired`.
    pub fn write_diff(
        &mut self,
        desired: &MapContents,
        diff: &MapDiff,
    ) -> Result<usize, DataplaneError> {
        let Some(translation) = self.translation.as_mut().filter(|_| !self.stale) else {
            return self.write(desired);
        };
        let translated = translation.translate(diff);
        if let Err(e) = writer::apply(&mut self.maps, &translated) {
            self.stale = true;
            self.translation = None;
            return Err(e);
        }
        translated.apply(&mut self.written);
        Ok(translated.len())
    }

    /// Makes the maps equal `desired` whatever they hold now (entries lost or changed
    /// behind the agent's back). Returns the entries written or deleted.
    pub fn repair(&mut self, desired: &MapContents) -> Result<usize, DataplaneError> {
        self.stale = true;
        // The next diff is translated only after a whole write chose a numbering again.
        self.translation = None;
        let (target, stats) = adopt_kernel_state(&mut self.maps, desired)?;
        self.written = target;
        self.stale = false;
        Ok(stats.upserts + stats.deletes)
    }

    /// Attaches the pod programs to the host interfaces of these local pods (found from
    /// their addresses), the uplink programs to the interfaces `uplink_mode` picks, and
    /// detaches them where no longer wanted. The first pass takes over the links an
    /// earlier agent pinned; once that is done a migration finishes (the new maps pinned in
    /// place of the old).
    pub fn sync_interfaces<'a, K: Clone + 'a>(
        &mut self,
        local: impl IntoIterator<Item = (K, &'a [IpAddr])>,
    ) -> Interfaces<K> {
        let routes = match netinfo::routes() {
            Ok(r) => r,
            Err(e) => {
                // Keep what is attached: a pod losing its programs would fail open.
                tracing::warn!(error = %e, "reading routes failed");
                return Interfaces {
                    attached: self.attached.names(),
                    uplinks: self.uplinks.names(),
                    failed: vec![("<routes>".into(), e.to_string())],
                    ..Interfaces::default()
                };
            }
        };
        let pods = links::pod_interfaces(&routes, local);
        let (wanted, waiting) = (pods.wanted, pods.waiting);
        let binding_of: BTreeMap<(String, IpAddr), BindingKey> = pods
            .bound
            .into_iter()
            .filter_map(|(iface, ip)| {
                let key = BindingKey {
                    ifindex: netinfo::ifindex(&iface)?,
                    addr: addr_of(ip),
                };
                Some(((iface, ip), key))
            })
            .collect();
        let bound: BTreeSet<BindingKey> = binding_of.values().copied().collect();
        let mut failed = Vec::new();
        // New bindings before any program that needs them runs (a pod hook drops what
        // its interface does not carry); old ones only after their programs are gone.
        let adds: Vec<BindingKey> = bound.difference(&self.bound).copied().collect();
        match self.maps.set_bindings(&adds, &[]) {
            Ok(()) => self.bound.extend(adds),
            Err(e) => {
                tracing::error!(error = %e, "writing interface bindings failed");
                failed.push(("<bindings>".into(), e.to_string()));
            }
        }
        if !self.pins_adopted {
            // After the maps are right: links an earlier agent pinned get this agent's
            // programs in place (no gap); failures are retried next pass.
            self.pins_adopted = links::adopt_pins(
                &mut self.dp,
                self.mode,
                &mut self.attached,
                &mut self.uplinks,
            ) == 0;
        }
        // Attach before detaching, so an interface changing role (a pod's veth that looked
        // like an uplink before its pod was known) is never without programs: for a moment
        // it carries both pairs, which only ever drops more (an uplink's hook takes a
        // local pod's packets for spoofed).
        let uplinks = uplink::select(&self.uplink_mode, &uplink::interfaces(), &wanted);
        failed.extend(
            self.attached
                .attach_missing(&mut self.dp, self.mode, &wanted),
        );
        failed.extend(
            self.uplinks
                .attach_missing(&mut self.dp, self.mode, &uplinks),
        );
        self.uplinks.prune(&mut self.dp, &uplinks, &self.attached);
        self.attached.prune(&mut self.dp, &wanted, &self.uplinks);
        let removes: Vec<BindingKey> = self.bound.difference(&bound).copied().collect();
        match self.maps.set_bindings(&[], &removes) {
            Ok(()) => self.bound.retain(|k| bound.contains(k)),
            Err(e) => {
                tracing::error!(error = %e, "removing interface bindings failed");
                failed.push(("<bindings>".into(), e.to_string()));
            }
        }
        if self.dp.pin_state() == PinState::Migrating && self.pins_adopted {
            // Every pinned link and filter runs the new programs on the new maps now.
            match self.dp.finish_migration() {
                Ok(()) => {
                    self.migrated = true;
                    tracing::info!(
                        "migration finished: the new maps are pinned in place of the old"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "finishing the migration failed; retrying");
                    failed.push(("<migration>".into(), e.to_string()));
                }
            }
        }
        // A pod is enforced once each of its addresses is bound on an interface that has
        // the pod programs (what `netpol-cni` waits for).
        let enforced = pods
            .placed
            .into_iter()
            .filter(|(_, pairs)| {
                pairs.iter().all(|pair| {
                    self.attached.contains(&pair.0)
                        && binding_of.get(pair).is_some_and(|k| self.bound.contains(k))
                })
            })
            .map(|(k, pairs)| (k, pairs.into_iter().map(|(_, ip)| ip).collect()))
            .collect();
        if self.judges_to_settle && self.dp.pin_state() != PinState::Migrating {
            // Every link runs the new programs: nothing defers into the old maps any more.
            let settled = self
                .dp
                .pin_service_judge()
                .and_then(|pin| Ok(service_judge::install(&[&pin])?));
            match settled {
                Ok(()) => self.judges_to_settle = false,
                Err(e) => {
                    tracing::error!(error = %e, "leaving the old Service judge failed; retrying");
                    failed.push(("<service judge>".into(), e.to_string()));
                }
            }
        }
        Interfaces {
            attached: self.attached.names(),
            waiting,
            uplinks: self.uplinks.names(),
            failed,
            enforced,
        }
    }

    /// The kernel's verdict counters summed over CPUs.
    pub fn verdicts(&self) -> Result<Counters, DataplaneError> {
        self.maps.counters()
    }

    pub fn maps(&self) -> &DataplaneMaps {
        &self.maps
    }

    /// What the kernel maps hold, as last written or read.
    pub fn written(&self) -> &MapContents {
        &self.written
    }

    /// Whether this agent adopted the pinned maps of an earlier one.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether this agent moved an earlier one's incompatible maps to new ones.
    pub fn migrated(&self) -> bool {
        self.migrated
    }

    /// Leaves every attachment in place for the next agent (restart without a gap);
    /// `policy-agent uninstall` removes them.
    pub fn release_all(&mut self) {
        self.attached.release_all(&mut self.dp);
        self.uplinks.release_all(&mut self.dp);
    }

    /// Detaches (and unpins) every attachment: a test or an uninstall, not a restart.
    pub fn detach_all(&mut self) {
        self.attached.detach_all(&mut self.dp);
        self.uplinks.detach_all(&mut self.dp);
    }
}

/// Detaches and unpins everything an agent of either mode left under `bpf_dir` and in this
/// network namespace (`policy-agent uninstall`).
pub fn uninstall(bpf_dir: &Path) -> Result<pinning::Uninstalled, DataplaneError> {
    let object = crate::ebpf_object::require()?;
    pinning::uninstall(object, bpf_dir)
}
