//! Loads the eBPF object with its maps pinned by name under a caller-given bpffs directory
//! (so a restarted agent adopts maps and their state), and attaches the two programs to pod
//! interfaces: TCX where the kernel has it (6.6+), a clsact qdisc otherwise.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
    },
};
use policy_common::{PROG_BENCH_EMPTY, PROG_FROM_POD, PROG_TO_POD};

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

/// The two programs attached to one interface.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// The mode actually used (never `Auto`).
    pub mode: AttachMode,
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

/// The loaded object. Dropping it detaches every attachment it made and unloads the
/// programs; pinned maps stay in the pin directory.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
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
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object).map_err(
            |e| DataplaneError::Load { pin_dir: pin_dir.to_path_buf(), source: Box::new(e) },
        )?;
        for name in [PROG_FROM_POD, PROG_TO_POD, PROG_BENCH_EMPTY] {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|e| DataplaneError::program(name, e))?;
        }
        Ok(Dataplane { ebpf, pin_dir: pin_dir.to_path_buf() })
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
        let p = self.ebpf.program(name).ok_or(DataplaneError::MissingProgram(name))?;
        p.try_into().map_err(|e| DataplaneError::program(name, e))
    }

    /// Attaches `from_pod` at TC ingress and `to_pod` at TC egress of `interface` (the host
    /// side of a pod's veth), in the calling thread's network namespace.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attachment, DataplaneError> {
        match mode {
            AttachMode::Auto => match self.attach(interface, AttachMode::Tcx) {
                Ok(a) => Ok(a),
                Err(e) => {
                    tracing::debug!(interface, error = %e, "TCX attach failed, using clsact");
                    self.attach(interface, AttachMode::Netlink)
                }
            },
            AttachMode::Tcx | AttachMode::Netlink => {
                if mode == AttachMode::Netlink {
                    ensure_clsact(interface)?;
                }
                let from_pod = self.attach_one(PROG_FROM_POD, interface, TcAttachType::Ingress, mode)?;
                let to_pod =
                    match self.attach_one(PROG_TO_POD, interface, TcAttachType::Egress, mode) {
                        Ok(l) => l,
                        Err(e) => {
                            // Never leave half an attachment: the pod would be enforced one way.
                            let _ = classifier(&mut self.ebpf, PROG_FROM_POD)
                                .map(|p| p.detach(from_pod));
                            return Err(e);
                        }
                    };
                Ok(Attachment { interface: interface.to_string(), mode, from_pod, to_pod })
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
        classifier(&mut self.ebpf, program)?.attach_with_options(interface, at, options).map_err(
            |e| DataplaneError::Attach {
                program,
                interface: interface.to_string(),
                source: Box::new(e),
            },
        )
    }

    /// Detaches both programs from the attachment's interface.
    pub fn detach(&mut self, a: Attachment) -> Result<(), DataplaneError> {
        let r1 = classifier(&mut self.ebpf, PROG_FROM_POD)?
            .detach(a.from_pod)
            .map_err(|e| DataplaneError::program(PROG_FROM_POD, e));
        let r2 = classifier(&mut self.ebpf, PROG_TO_POD)?
            .detach(a.to_pod)
            .map_err(|e| DataplaneError::program(PROG_TO_POD, e));
        r1.and(r2)
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let p = ebpf.program_mut(name).ok_or(DataplaneError::MissingProgram(name))?;
    p.try_into().map_err(|e| DataplaneError::program(name, e))
}

fn ensure_clsact(interface: &str) -> Result<(), DataplaneError> {
    match qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        // Already present (ours from an earlier attach, or the CNI's): reuse it.
        Err(aya::programs::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
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
