//! Loads the eBPF object with its maps pinned by name under a caller-given bpffs directory
//! (so a restarted agent adopts maps and their state), and attaches the two programs to pod
//! interfaces: TCX where the kernel has it (6.6+), a clsact qdisc otherwise.
//!
//! Two kinds of attachment: ephemeral (detached when the [`Dataplane`] drops; tests) and
//! persistent ([`Dataplane::persist_links`]; the agent): TCX links pinned under the pin
//! directory, clsact filters at a fixed priority, both outliving the agent and taken over
//! by the next one with an in-place program replacement (see [`super::pinning`]).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{
            NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle,
            qdisc_add_clsact,
        },
    },
};
use policy_common::{
    GRANT_ETHERNET, GRANT_L3, MAP_GRANTS, MAP_REJUDGES, PROG_BENCH_EMPTY, PROG_CLOCK_PROBE,
    PROG_FROM_POD, PROG_FROM_WORLD, PROG_FROM_WORLD_L3, PROG_GRANT, PROG_GRANT_L3, PROG_REJUDGE,
    PROG_REJUDGE_L3, PROG_SERVICE_JUDGE, PROG_TO_POD, PROG_TO_WORLD, PROG_TO_WORLD_L3,
    REJUDGE_ETHERNET, REJUDGE_L3,
};

use super::pinning::{self, PinState};
use super::{DataplaneError, maps::DataplaneMaps};

/// Every program of the object, loaded (verified) at load time. Adding a program is one
/// line here (and one hook list below if it is attached somewhere).
pub const PROGRAMS: &[&str] = &[
    PROG_FROM_POD,
    PROG_TO_POD,
    PROG_FROM_WORLD,
    PROG_TO_WORLD,
    PROG_FROM_WORLD_L3,
    PROG_TO_WORLD_L3,
    PROG_GRANT,
    PROG_GRANT_L3,
    PROG_REJUDGE,
    PROG_REJUDGE_L3,
    PROG_BENCH_EMPTY,
    PROG_CLOCK_PROBE,
];

/// The programs the hooks tail-call: each array, and its (slot, program) pairs.
const TAIL_CALLS: &[(&str, [(u32, &str); 2])] = &[
    (
        MAP_GRANTS,
        [(GRANT_ETHERNET, PROG_GRANT), (GRANT_L3, PROG_GRANT_L3)],
    ),
    (
        MAP_REJUDGES,
        [
            (REJUDGE_ETHERNET, PROG_REJUDGE),
            (REJUDGE_L3, PROG_REJUDGE_L3),
        ],
    ),
];

/// Puts this object's tail-called programs into their arrays ([`TAIL_CALLS`]). The arrays
/// are pinned: an earlier agent's programs still attached call these from now on (they
/// re-parse the packet, so any version's caller is served).
fn set_tail_calls(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for (array, slots) in TAIL_CALLS {
        set_tail_call_array(ebpf, array, slots)?;
    }
    Ok(())
}

fn set_tail_call_array(
    ebpf: &mut Ebpf,
    array: &'static str,
    slots: &[(u32, &'static str)],
) -> Result<(), DataplaneError> {
    let mut fds = Vec::new();
    for &(slot, name) in slots {
        let fd = classifier(ebpf, name)?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|e| DataplaneError::program(name, e))?;
        fds.push((slot, fd));
    }
    let map = ebpf
        .map_mut(array)
        .ok_or(DataplaneError::MissingMap(array))?;
    let mut programs =
        aya::maps::ProgramArray::try_from(map).map_err(|e| DataplaneError::map(array, e))?;
    for (slot, fd) in &fds {
        programs
            .set(*slot, fd, 0)
            .map_err(|e| DataplaneError::map(array, e))?;
    }
    Ok(())
}

/// The hooks of a pod's host-side veth: TC ingress sees what the pod sends.
pub const POD_HOOKS: &[(&str, TcAttachType)] = &[
    (PROG_FROM_POD, TcAttachType::Ingress),
    (PROG_TO_POD, TcAttachType::Egress),
];

/// The hooks of a non-pod interface (uplink, tunnel): TC ingress sees what enters the node.
pub const UPLINK_HOOKS: &[(&str, TcAttachType)] = &[
    (PROG_FROM_WORLD, TcAttachType::Ingress),
    (PROG_TO_WORLD, TcAttachType::Egress),
];

/// The uplink hooks of a device without a link header (the packet starts at its IP header).
pub const UPLINK_L3_HOOKS: &[(&str, TcAttachType)] = &[
    (PROG_FROM_WORLD_L3, TcAttachType::Ingress),
    (PROG_TO_WORLD_L3, TcAttachType::Egress),
];

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX when the kernel supports it, else a clsact qdisc.
    Auto,
    /// TCX links (kernel >= 6.6; invisible to `tc filter show`).
    Tcx,
    /// Classic `tc` filters on a clsact qdisc (netlink).
    Netlink,
}

/// The two programs attached to one interface (a handle; detach with
/// [`Dataplane::detach`], or drop the [`Dataplane`]).
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// The mode actually used (never `Auto`).
    pub mode: AttachMode,
    id: u64,
}

/// What the loader keeps of an attachment: the links, and for clsact filters the network
/// namespace they live in, since netlink requests act on the caller's namespace.
struct Slot {
    id: u64,
    links: SlotLinks,
    netns: Option<OwnedFd>,
}

enum SlotLinks {
    /// Owned by the programs: detached on detach or drop.
    Ephemeral(Vec<(&'static str, SchedClassifierLinkId)>),
    /// Pinned TCX links (the pins keep them attached); detach unpins the directory.
    /// Pinned TCX links: `programs[i]`'s link is pinned at `dir/programs[i]` (the
    /// directory of the interface, which another role's links may share for a moment).
    Pinned {
        links: Vec<FdLink>,
        dir: PathBuf,
        programs: Vec<&'static str>,
    },
    /// clsact filters at the fixed priority on `interface`, left in place on drop.
    Netlink {
        interface: String,
        hooks: Vec<TcAttachType>,
    },
}

/// The loaded object. Dropping it detaches every attachment it made (clsact filters from
/// inside their own namespace) and unloads the programs; pinned maps stay in the pin
/// directory.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    slots: Vec<Slot>,
    next_id: u64,
    pin_state: PinState,
    persist: bool,
    /// Where links are pinned (`<dir>/links/`): the pin directory, also while a migration
    /// stages new maps elsewhere.
    link_root: PathBuf,
    /// The object's maps pinned by name (moved into place when a migration finishes).
    map_pins: Vec<String>,
}

impl Dataplane {
    /// Loads the embedded object (`cargo xtask build-ebpf`).
    pub fn load(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Self::load_object(crate::ebpf_object::require()?, pin_dir)
    }

    /// Loads `object`, creating or adopting its maps under `pin_dir` (a bpffs directory),
    /// and loads (verifies) every program.
    ///
    /// Pinned maps are checked against the object's definitions first: an incompatible pin
    /// directory (an upgrade changed a map's layout) is refused with
    /// [`DataplaneError::Incompatible`] before anything is loaded, so whatever runs keeps
    /// running on the maps it was verified against.
    pub fn load_object(object: &[u8], pin_dir: &Path) -> Result<Self, DataplaneError> {
        let release = super::kernel_version::running_release();
        if super::kernel_version::supported(&release) == Some(false) {
            return Err(DataplaneError::KernelTooOld { found: release });
        }
        check_bpffs(pin_dir)?;
        let pin_state = pinning::check_pinned_maps(object, pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object)
            .map_err(|e| DataplaneError::Load {
                pin_dir: pin_dir.to_path_buf(),
                source: Box::new(e),
            })?;
        for name in PROGRAMS {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|e| DataplaneError::program(name, e))?;
        }
        service_judge_program(&mut ebpf)?
            .load()
            .map_err(|e| DataplaneError::program(PROG_SERVICE_JUDGE, e))?;
        set_tail_calls(&mut ebpf)?;
        Ok(Dataplane {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            slots: Vec::new(),
            next_id: 0,
            pin_state,
            persist: false,
            link_root: pin_dir.to_path_buf(),
            map_pins: pinning::pinned_map_names(object),
        })
    }

    /// The upgrade path for an incompatible pin directory: loads the embedded object with
    /// new, empty maps pinned in `<pin_dir>/.upgrade/` while links stay pinned under
    /// `<pin_dir>/links/`. The caller fills the maps, then attaches (each pinned link gets
    /// the new program in place, which switches it to the new maps at once), then calls
    /// [`Dataplane::finish_migration`]. The old programs enforce their old maps until their
    /// link is switched: no gap.
    pub fn load_staged(pin_dir: &Path) -> Result<Self, DataplaneError> {
        let object = crate::ebpf_object::require()?;
        let staging = pin_dir.join(pinning::STAGING_DIR);
        if staging.exists() {
            // A migration that died half-way: its maps were never switched to.
            std::fs::remove_dir_all(&staging).map_err(|source| DataplaneError::Io {
                path: staging.clone(),
                source,
            })?;
        }
        std::fs::create_dir_all(&staging).map_err(|source| DataplaneError::Io {
            path: staging.clone(),
            source,
        })?;
        let mut dp = Self::load_object(object, &staging)?;
        dp.link_root = pin_dir.to_path_buf();
        dp.pin_state = PinState::Migrating;
        Ok(dp)
    }

    /// Ends a migration: moves each new map pin over the old one (`rename`, atomic per
    /// map), so the next agent adopts the new maps. Call once every pinned link runs the
    /// new programs.
    pub fn finish_migration(&mut self) -> Result<(), DataplaneError> {
        if self.pin_state != PinState::Migrating {
            return Ok(());
        }
        for name in &self.map_pins {
            let (from, to) = (self.pin_dir.join(name), self.link_root.join(name));
            std::fs::rename(&from, &to)
                .map_err(|source| DataplaneError::Io { path: from, source })?;
        }
        // The new Service judge's staging pin: its rule holds the program, not the path.
        let _ = std::fs::remove_file(self.pin_dir.join(PROG_SERVICE_JUDGE));
        let _ = std::fs::remove_dir(&self.pin_dir);
        self.pin_dir = self.link_root.clone();
        self.pin_state = PinState::Adopted;
        Ok(())
    }

    /// Whether the maps were created by this load ([`PinState::Fresh`]: a first start) or
    /// adopted from an earlier agent.
    pub fn pin_state(&self) -> PinState {
        self.pin_state
    }

    /// From now on, attachments outlive this process: TCX links are pinned under
    /// `<pin dir>/links/`, clsact filters use a fixed priority; existing ones are taken
    /// over by replacing their program in place. Dropping the dataplane leaves them.
    pub fn persist_links(&mut self) {
        self.persist = true;
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Names of the maps in the object.
    pub fn map_names(&self) -> Vec<String> {
        self.ebpf.maps().map(|(n, _)| n.to_string()).collect()
    }

    /// Typed handles to the maps (once: they move out of the object). Writes the default
    /// `CONFIG` and calibrates the datapath clock when the map holds none yet (an adopted
    /// map keeps its settings and its clock).
    pub fn take_maps(&mut self) -> Result<DataplaneMaps, DataplaneError> {
        let mut maps = DataplaneMaps::take(&mut self.ebpf)?;
        maps.init_config(|| super::clock::calibrate(self))?;
        Ok(maps)
    }

    /// Pins the `service_judge` program (in place of an earlier agent's) where the
    /// iptables rule finds it, and returns that path.
    pub fn pin_service_judge(&mut self) -> Result<PathBuf, DataplaneError> {
        let path = self.pin_dir.join(PROG_SERVICE_JUDGE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path, source }),
        }
        service_judge_program(&mut self.ebpf)?
            .pin(&path)
            .map_err(|e| DataplaneError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(path)
    }

    /// A program, e.g. for `test_run`.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        let p = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram(name))?;
        p.try_into().map_err(|e| DataplaneError::program(name, e))
    }

    /// How many instructions the verifier processed for each program (the kernel's
    /// `verified_insns`, Linux 5.16+; `None` where the kernel does not say). The limit is
    /// 1,000,000: a program near it fails to load after a harmless-looking change, or when
    /// the loader has fewer privileges (the DaemonSet's capabilities cost more).
    pub fn verifier_cost(&self) -> Vec<(&'static str, Option<u32>)> {
        PROGRAMS
            .iter()
            .chain(&[PROG_SERVICE_JUDGE])
            .map(|&name| {
                let n = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (name, n)
            })
            .collect()
    }

    /// Attaches `from_pod` at TC ingress and `to_pod` at TC egress of `interface` (the host
    /// side of a pod's veth), in the calling thread's network namespace.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        self.attach_hooks(interface, POD_HOOKS, mode)
    }

    /// Attaches `from_world` at TC ingress and `to_world` at TC egress of `interface`, a
    /// non-pod interface of the node (calling thread's namespace): the Ethernet pair or,
    /// on a device without a link header, the L3 pair. Any other link type is refused:
    /// programs that would misparse its packets must not judge them.
    pub fn attach_uplink(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        let hooks = match super::netinfo::link_kind(interface) {
            Ok(super::netinfo::LinkKind::Ethernet) => UPLINK_HOOKS,
            Ok(super::netinfo::LinkKind::Ip) => UPLINK_L3_HOOKS,
            Ok(super::netinfo::LinkKind::Other(link_type)) => {
                return Err(DataplaneError::UnsupportedLink {
                    interface: interface.to_string(),
                    link_type,
                });
            }
            Err(source) => {
                return Err(DataplaneError::Interface {
                    interface: interface.to_string(),
                    source,
                });
            }
        };
        self.attach_hooks(interface, hooks, mode)
    }

    /// Attaches each `(program, hook)` of `hooks` to `interface`: all or none.
    pub fn attach_hooks(
        &mut self,
        interface: &str,
        hooks: &[(&'static str, TcAttachType)],
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        match mode {
            AttachMode::Auto => match self.attach_hooks(interface, hooks, AttachMode::Tcx) {
                Ok(a) => Ok(a),
                Err(e) => {
                    tracing::debug!(interface, error = %e, "TCX attach failed, using clsact");
                    self.attach_hooks(interface, hooks, AttachMode::Netlink)
                }
            },
            AttachMode::Tcx | AttachMode::Netlink => {
                // Taken before attaching, so that whatever is attached is also tracked.
                let netns = if mode == AttachMode::Netlink {
                    ensure_clsact(interface)?;
                    Some(current_netns()?)
                } else {
                    None
                };
                let links = match (self.persist, mode) {
                    (false, _) => {
                        SlotLinks::Ephemeral(self.attach_ephemeral(interface, hooks, mode)?)
                    }
                    (true, AttachMode::Tcx) => self.attach_pinned(interface, hooks)?,
                    (true, _) => self.attach_netlink_fixed(interface, hooks)?,
                };
                let id = self.next_id;
                self.next_id += 1;
                self.slots.push(Slot { id, links, netns });
                Ok(Attachment {
                    interface: interface.to_string(),
                    mode,
                    id,
                })
            }
        }
    }

    fn attach_ephemeral(
        &mut self,
        interface: &str,
        hooks: &[(&'static str, TcAttachType)],
        mode: AttachMode,
    ) -> Result<Vec<(&'static str, SchedClassifierLinkId)>, DataplaneError> {
        let mut done = Vec::new();
        for (program, at) in hooks {
            match self.attach_one(program, interface, *at, mode) {
                Ok(l) => done.push((*program, l)),
                Err(e) => {
                    // Never leave part of an attachment: the pod would be enforced one way.
                    // (Same thread, so the same namespace as the attach.)
                    for (p, l) in done {
                        let _ = classifier(&mut self.ebpf, p).map(|prog| prog.detach(l));
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// TCX links pinned under `links/<ifname>@<ifindex>/`: a pinned link found there gets
    /// this object's program in place (`BPF_LINK_UPDATE`: the hook is never empty), a
    /// missing one is created and pinned.
    fn attach_pinned(
        &mut self,
        interface: &str,
        hooks: &[(&'static str, TcAttachType)],
    ) -> Result<SlotLinks, DataplaneError> {
        let ifindex = ifindex_of(interface)?;
        let dir = pinning::link_dir(&self.link_root, interface, ifindex);
        std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut links = Vec::new();
        let mut created = Vec::new();
        for (program, at) in hooks {
            let path = dir.join(program);
            let existed = path.exists();
            match self.adopt_or_create_link(program, interface, *at, &path) {
                Ok(l) => {
                    links.push(l);
                    if !existed {
                        created.push(path);
                    }
                }
                Err(e) => {
                    // All or none: links created here are unpinned again (and detach when
                    // `links` drops); adopted ones stay as they were, still enforcing.
                    for p in created {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        let programs = hooks.iter().map(|(p, _)| *p).collect();
        Ok(SlotLinks::Pinned {
            links,
            dir,
            programs,
        })
    }

    fn adopt_or_create_link(
        &mut self,
        program: &'static str,
        interface: &str,
        at: TcAttachType,
        path: &Path,
    ) -> Result<FdLink, DataplaneError> {
        let link_err = |e: LinkError| DataplaneError::Link {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let prog = classifier(&mut self.ebpf, program)?;
        let id = match PinnedLink::from_pin(path) {
            Ok(pinned) => {
                let link: SchedClassifierLink =
                    FdLink::from(pinned).try_into().map_err(link_err)?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| DataplaneError::Attach {
                        program,
                        interface: interface.to_string(),
                        source: Box::new(e),
                    })?;
                tracing::debug!(
                    program,
                    interface,
                    "pinned link adopted, program replaced in place"
                );
                id
            }
            Err(LinkError::SyscallError(s))
                if s.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                prog.attach_with_options(
                    interface,
                    at,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| DataplaneError::Attach {
                    program,
                    interface: interface.to_string(),
                    source: Box::new(e),
                })?
            }
            Err(e) => return Err(link_err(e)),
        };
        let owned = prog
            .take_link(id)
            .map_err(|e| DataplaneError::program(program, e))?;
        let fd: FdLink = owned.try_into().map_err(link_err)?;
        if path.exists() {
            return Ok(fd);
        }
        let pinned = fd.pin(path).map_err(|e| DataplaneError::Link {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(FdLink::from(pinned))
    }

    /// clsact filters at [`pinning::NETLINK_PRIORITY`]: created, or replaced in place when
    /// an earlier agent left them.
    fn attach_netlink_fixed(
        &mut self,
        interface: &str,
        hooks: &[(&'static str, TcAttachType)],
    ) -> Result<SlotLinks, DataplaneError> {
        let mut done = Vec::new();
        for (program, at) in hooks {
            let prog = classifier(&mut self.ebpf, program)?;
            let opts = || {
                TcAttachOptions::Netlink(NlOptions {
                    priority: pinning::NETLINK_PRIORITY,
                    handle: TcHandle::from(pinning::NETLINK_HANDLE),
                    classid: None,
                })
            };
            let id = match prog.attach_with_options(interface, *at, opts()) {
                Ok(id) => id,
                Err(_) => {
                    // Present already (an earlier agent's): replace its program in place.
                    let old = fixed_filter(interface, *at)?;
                    prog.attach_to_link(old)
                        .map_err(|e| DataplaneError::Attach {
                            program,
                            interface: interface.to_string(),
                            source: Box::new(e),
                        })?
                }
            };
            // Owned links detach when dropped: keep this one alive for the process and
            // leave the filter behind on exit (the next agent replaces it).
            let link = prog
                .take_link(id)
                .map_err(|e| DataplaneError::program(program, e))?;
            std::mem::forget(link);
            done.push(*at);
        }
        Ok(SlotLinks::Netlink {
            interface: interface.to_string(),
            hooks: done,
        })
    }

    /// Attaches to the interface with index `ifindex` (calling thread's namespace).
    pub fn attach_index(
        &mut self,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        let name = ifname(ifindex)?;
        self.attach(&name, mode)
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        interface: &str,
        at: TcAttachType,
        mode: AttachMode,
    ) -> Result<SchedClassifierLinkId, DataplaneError> {
        let options = match mode {
            AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
            _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
        };
        classifier(&mut self.ebpf, program)?
            .attach_with_options(interface, at, options)
            .map_err(|e| DataplaneError::Attach {
                program,
                interface: interface.to_string(),
                source: Box::new(e),
            })
    }

    /// Detaches the attachment's programs from its interface (from any thread: clsact
    /// filters are removed from inside the namespace they were attached in; pinned links
    /// are unpinned).
    pub fn detach(&mut self, a: Attachment) -> Result<(), DataplaneError> {
        let Some(i) = self.slots.iter().position(|s| s.id == a.id) else {
            return Ok(());
        };
        let slot = self.slots.swap_remove(i);
        detach_slot(&mut self.ebpf, slot)
    }

    /// Forgets the attachment without detaching it (a persistent attachment keeps
    /// enforcing after this process).
    pub fn release(&mut self, a: Attachment) {
        self.slots.retain(|s| s.id != a.id);
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // TCX links would go with their fds anywhere, but clsact filters must be deleted by
        // a netlink request made in their namespace, never in whatever namespace the
        // dropping thread happens to be in.
        for slot in std::mem::take(&mut self.slots) {
            if !matches!(slot.links, SlotLinks::Ephemeral(_)) {
                // Persistent: pins and fixed-priority filters outlive the agent on purpose.
                continue;
            }
            if let Err(e) = detach_slot(&mut self.ebpf, slot) {
                tracing::warn!(error = %e, "detaching on drop failed");
            }
        }
    }
}

fn detach_slot(ebpf: &mut Ebpf, slot: Slot) -> Result<(), DataplaneError> {
    let Slot { links, netns, .. } = slot;
    let run = move |ebpf: &mut Ebpf| -> Result<(), DataplaneError> {
        match links {
            SlotLinks::Ephemeral(ids) => {
                let mut r = Ok(());
                for (p, id) in ids {
                    let one = classifier(ebpf, p)?
                        .detach(id)
                        .map_err(|e| DataplaneError::program(p, e));
                    r = r.and(one);
                }
                r
            }
            SlotLinks::Pinned {
                links,
                dir,
                programs,
            } => {
                // Unpinned and closed: the kernel drops the links with their last reference.
                // Only this slot's pins: the other role's may share the directory while an
                // interface changes role.
                let mut r = Ok(());
                for p in programs {
                    let path = dir.join(p);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => r = Err(DataplaneError::Io { path, source }),
                    }
                }
                // Gone once empty (not empty: another role's links live on).
                let _ = std::fs::remove_dir(&dir);
                drop(links);
                r
            }
            SlotLinks::Netlink { interface, hooks } => {
                let mut r = Ok(());
                for at in hooks {
                    r = r.and(detach_fixed_filter(&interface, at).map(|_| ()));
                }
                r
            }
        }
    };
    match netns {
        None => run(ebpf),
        Some(ns) => std::thread::scope(|s| {
            let h = s.spawn(move || {
                // SAFETY: a valid namespace fd; only this short-lived thread switches.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(DataplaneError::Io {
                        path: PathBuf::from("/proc/thread-self/ns/net"),
                        source: std::io::Error::last_os_error(),
                    });
                }
                run(ebpf)
            });
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}

/// Our fixed-priority clsact filter at `at` of `interface` (calling thread's namespace), as
/// a link to replace or delete.
fn fixed_filter(interface: &str, at: TcAttachType) -> Result<SchedClassifierLink, DataplaneError> {
    SchedClassifierLink::attached(
        interface,
        at,
        pinning::NETLINK_PRIORITY,
        TcHandle::from(pinning::NETLINK_HANDLE),
        None,
    )
    .map_err(|source| DataplaneError::Interface {
        interface: interface.to_string(),
        source,
    })
}

/// Deletes our fixed-priority clsact filter at `at` of `interface` (calling thread's
/// namespace); a filter that is not there is not an error. Whether one was deleted.
pub fn detach_fixed_filter(interface: &str, at: TcAttachType) -> Result<bool, DataplaneError> {
    use aya::programs::Link as _;
    let link = fixed_filter(interface, at)?;
    use aya::programs::{ProgramError, TcError};
    let errno = |e: &ProgramError| match e {
        ProgramError::NetlinkError(n) | ProgramError::TcError(TcError::NetlinkError(n)) => {
            n.raw_os_error()
        }
        _ => None,
    };
    match link.detach() {
        Ok(()) => Ok(true),
        // No such filter, or no clsact qdisc at all.
        Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(false),
        Err(e) => Err(DataplaneError::Interface {
            interface: interface.to_string(),
            source: std::io::Error::other(e),
        }),
    }
}

/// The index of `interface` in the calling thread's namespace.
pub fn ifindex_of(interface: &str) -> Result<u32, DataplaneError> {
    let c = std::ffi::CString::new(interface).map_err(|e| DataplaneError::Interface {
        interface: interface.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DataplaneError::Interface {
            interface: interface.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

/// The calling thread's network namespace.
fn current_netns() -> Result<OwnedFd, DataplaneError> {
    let path = "/proc/thread-self/ns/net";
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| DataplaneError::Io {
            path: PathBuf::from(path),
            source,
        })
}

fn service_judge_program(
    ebpf: &mut Ebpf,
) -> Result<&mut aya::programs::SocketFilter, DataplaneError> {
    let p = ebpf
        .program_mut(PROG_SERVICE_JUDGE)
        .ok_or(DataplaneError::MissingProgram(PROG_SERVICE_JUDGE))?;
    p.try_into()
        .map_err(|e| DataplaneError::program(PROG_SERVICE_JUDGE, e))
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let p = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?;
    p.try_into().map_err(|e| DataplaneError::program(name, e))
}

fn ensure_clsact(interface: &str) -> Result<(), DataplaneError> {
    match qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        // Already present (ours from an earlier attach, or the CNI's): reuse it.
        Err(aya::programs::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            Ok(())
        }
        Err(e) => Err(DataplaneError::Interface {
            interface: interface.to_string(),
            source: std::io::Error::other(e),
        }),
    }
}

fn check_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| DataplaneError::NotBpffs(dir.to_path_buf()))?;
    // SAFETY: a valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DataplaneError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::NotBpffs(dir.to_path_buf()));
    }
    Ok(())
}

/// The name of interface `ifindex` in the calling thread's namespace.
pub fn ifname(ifindex: u32) -> Result<String, DataplaneError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(DataplaneError::Interface {
            interface: format!("#{ifindex}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}
