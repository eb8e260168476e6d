//! Loads the eBPF object with its maps pinned by name under a caller-given bpffs directory
//! (so a restarted agent adopts maps and their state), and attaches the two programs to pod
//! interfaces: TCX where the kernel has it (6.6+), a clsact qdisc otherwise.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
    },
};
use policy_common::{PROG_BENCH_EMPTY, PROG_FROM_POD, PROG_FROM_WORLD, PROG_TO_POD, PROG_TO_WORLD};

use super::{DataplaneError, maps::DataplaneMaps};

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
    /// The programs at TC ingress and egress (pod or uplink pair).
    programs: (&'static str, &'static str),
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
    netns: Option<OwnedFd>,
}

/// The loaded object. Dropping it detaches every attachment it made (clsact filters from
/// inside their own namespace) and unloads the programs; pinned maps stay in the pin
/// directory.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    slots: Vec<Slot>,
    next_id: u64,
}

impl Dataplane {
    /// Loads the embedded object (`cargo xtask build-ebpf`).
    pub fn load(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Self::load_object(crate::ebpf_object::require()?, pin_dir)
    }

    /// Loads `object`, creating or adopting its maps under `pin_dir` (a bpffs directory),
    /// and loads (verifies) every program.
    pub fn load_object(object: &[u8], pin_dir: &Path) -> Result<Self, DataplaneError> {
        check_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object)
            .map_err(|e| DataplaneError::Load {
                pin_dir: pin_dir.to_path_buf(),
                source: Box::new(e),
            })?;
        for name in [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_WORLD, PROG_TO_WORLD, PROG_BENCH_EMPTY] {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|e| DataplaneError::program(name, e))?;
        }
        Ok(Dataplane {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            slots: Vec::new(),
            next_id: 0,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Names of the maps in the object.
    pub fn map_names(&self) -> Vec<String> {
        self.ebpf.maps().map(|(n, _)| n.to_string()).collect()
    }

    /// Typed handles to the maps (once: they move out of the object). Writes the default
    /// `CONFIG` when the map holds none yet (an adopted map keeps its settings).
    pub fn take_maps(&mut self) -> Result<DataplaneMaps, DataplaneError> {
        let mut maps = DataplaneMaps::take(&mut self.ebpf)?;
        maps.init_config()?;
        Ok(maps)
    }

    /// A program, e.g. for `test_run`.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        let p = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram(name))?;
        p.try_into().map_err(|e| DataplaneError::program(name, e))
    }

    /// Attaches `from_pod` at TC ingress and `to_pod` at TC egress of `interface` (the host
    /// side of a pod's veth), in the calling thread's network namespace.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        self.attach_pair(interface, mode, (PROG_FROM_POD, PROG_TO_POD))
    }

    /// Attaches `from_world` at TC ingress and `to_world` at TC egress of `interface`, a
    /// non-pod interface of the node (calling thread's namespace).
    pub fn attach_uplink(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        self.attach_pair(interface, mode, (PROG_FROM_WORLD, PROG_TO_WORLD))
    }

    fn attach_pair(
        &mut self,
        interface: &str,
        mode: AttachMode,
        programs: (&'static str, &'static str),
    ) -> Result<Attachment, DataplaneError> {
        let (prog_in, prog_eg) = programs;
        match mode {
            AttachMode::Auto => match self.attach_pair(interface, AttachMode::Tcx, programs) {
                Ok(a) => Ok(a),
                Err(e) => {
                    tracing::debug!(interface, error = %e, "TCX attach failed, using clsact");
                    self.attach_pair(interface, AttachMode::Netlink, programs)
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
                let from_pod =
                    self.attach_one(prog_in, interface, TcAttachType::Ingress, mode)?;
                let to_pod =
                    match self.attach_one(prog_eg, interface, TcAttachType::Egress, mode) {
                        Ok(l) => l,
                        Err(e) => {
                            // Never leave half an attachment: the pod would be enforced one way.
                            // (Same thread, so the same namespace as the attach.)
                            let _ = classifier(&mut self.ebpf, prog_in)
                                .map(|p| p.detach(from_pod));
                            return Err(e);
                        }
                    };
                let id = self.next_id;
                self.next_id += 1;
                self.slots.push(Slot {
                    id,
                    programs,
                    from_pod,
                    to_pod,
                    netns,
                });
                Ok(Attachment {
                    interface: interface.to_string(),
                    mode,
                    id,
                })
            }
        }
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

    /// Detaches both programs from the attachment's interface (from any thread: clsact
    /// filters are removed from inside the namespace they were attached in).
    pub fn detach(&mut self, a: Attachment) -> Result<(), DataplaneError> {
        let Some(i) = self.slots.iter().position(|s| s.id == a.id) else {
            return Ok(());
        };
        let slot = self.slots.swap_remove(i);
        detach_slot(&mut self.ebpf, slot)
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // TCX links would go with their fds anywhere, but clsact filters must be deleted by
        // a netlink request made in their namespace, never in whatever namespace the
        // dropping thread happens to be in.
        for slot in std::mem::take(&mut self.slots) {
            if let Err(e) = detach_slot(&mut self.ebpf, slot) {
                tracing::warn!(error = %e, "detaching on drop failed");
            }
        }
    }
}

fn detach_slot(ebpf: &mut Ebpf, slot: Slot) -> Result<(), DataplaneError> {
    let Slot {
        programs: (prog_in, prog_eg),
        from_pod,
        to_pod,
        netns,
        ..
    } = slot;
    let run = move |ebpf: &mut Ebpf| -> Result<(), DataplaneError> {
        let r1 = classifier(ebpf, prog_in)?
            .detach(from_pod)
            .map_err(|e| DataplaneError::program(prog_in, e));
        let r2 = classifier(ebpf, prog_eg)?
            .detach(to_pod)
            .map_err(|e| DataplaneError::program(prog_eg, e));
        r1.and(r2)
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
