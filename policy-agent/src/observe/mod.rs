//! What the datapath decides, seen from the node without Prometheus: `policy-agent status`
//! (the pinned maps read back, read-only) and `policy-agent monitor` (deny events as they
//! happen).
//!
//! # Who reads the `EVENTS` ring buffer
//!
//! A BPF ring buffer has one consumer position shared by every reader: two readers would each
//! steal part of the stream and neither would see all of it. So exactly one process consumes
//! it, the holder of an exclusive `flock` on the pin directory ([`ConsumerLock`]):
//!
//! - while an agent runs, its [`broker`] holds the lock, drains the ring continuously (so the
//!   ring never fills up with stale events) and republishes each event as a JSON line to every
//!   client of its unix socket ([`socket_name`]): any number of `monitor`s see the whole
//!   stream, and a slow one is cut off instead of slowing the drain;
//! - with no agent (stopped, crashed: the pinned programs keep enforcing and reporting), a
//!   `monitor` takes the lock and reads the ring itself; a second one is told who holds it.
//!   An agent starting meanwhile retries the lock every second and takes over when that
//!   monitor exits.
//!
//! Userspace only: the kernel programs and `policy-common` are unchanged. The socket is in
//! the abstract namespace (bpffs holds no sockets): it vanishes with the agent, so a crash
//! leaves no stale file and nothing to clean up; it belongs to the network namespace the
//! agent enforces, where `monitor` runs too; its name is derived from the pin directory, so
//! the agent and the monitor of one `--bpf-dir` meet without configuration and agents of
//! other pin directories (tests side by side) never collide. With no file permissions to
//! guard it, the agent accepts only root (or its own user) by the peer's credentials, and a
//! monitor reads only from a socket root (or its own user) serves ([`connect_agent`]).

pub mod broker;
pub mod event;
pub mod monitor;
pub mod pinned;
pub mod status;
pub mod timefmt;

use std::os::fd::{AsRawFd as _, OwnedFd};

use policy_cni::local_socket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Errors of the observation commands.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(
        "nothing is pinned under {dir}: no agent has run with this --bpf-dir (the agents' \
         default is /sys/fs/bpf/netpol), or it was uninstalled"
    )]
    NothingPinned { dir: PathBuf },
    #[error("{dir} is not a directory on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { dir: PathBuf },
    #[error("opening the pinned map {path}: {source}")]
    OpenPin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {detail}")]
    Map { map: String, detail: String },
    #[error(
        "another process (pid {holder}) is reading the deny events of {dir} directly; with \
         no agent running only one reader is possible: stop it, or start the agent, which \
         shares the stream (if the agent runs, run monitor in its network namespace)"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error(
        "monitor socket @{name} is served by pid {pid} of uid {uid}, neither root nor this \
         user (uid {euid}): refusing its events (another process may have taken the agent's \
         socket name; the agent runs as root)"
    )]
    UntrustedServer {
        name: String,
        pid: i32,
        uid: u32,
        euid: u32,
    },
    #[error("monitor socket @{name}: {source}")]
    Socket {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ObserveError {
    pub(crate) fn map(map: &str, detail: impl std::fmt::Display) -> Self {
        ObserveError::Map {
            map: map.to_string(),
            detail: detail.to_string(),
        }
    }
}

/// The abstract socket name of pin directory `bpf_dir`'s monitor socket: a hash of the
/// canonical path (names are limited to 107 bytes, so the path itself cannot be the name).
pub fn socket_name(bpf_dir: &Path) -> String {
    local_socket::name_for("netpol-monitor", bpf_dir)
}

/// Connects to the monitor socket of the agent of `bpf_dir` (this network namespace),
/// without asking who serves it: [`connect_agent`] is the one to read events from.
pub fn connect(bpf_dir: &Path) -> std::io::Result<UnixStream> {
    connect_raw(&socket_name(bpf_dir))
}

fn connect_raw(name: &str) -> std::io::Result<UnixStream> {
    local_socket::connect(name)
}

/// Connects to the agent of `bpf_dir` as [`connect`] does, and checks who serves the socket:
/// `Ok(None)` when nothing listens. Any process may bind an abstract name first (there is
/// no file mode to stop it) and feed a monitor made-up events, so the server must be root or
/// this process's own user, as the agent requires of its clients.
pub fn connect_agent(bpf_dir: &Path) -> Result<Option<UnixStream>, ObserveError> {
    connect_named(&socket_name(bpf_dir))
}

fn connect_named(name: &str) -> Result<Option<UnixStream>, ObserveError> {
    let Ok(stream) = connect_raw(name) else {
        return Ok(None);
    };
    let cred = local_socket::peer_cred(&stream).map_err(|source| ObserveError::Socket {
        name: name.to_string(),
        source,
    })?;
    // SAFETY: geteuid cannot fail.
    check_server_cred(name, cred, unsafe { libc::geteuid() })?;
    Ok(Some(stream))
}

/// Refuses a server that is neither root nor `euid`.
fn check_server_cred(name: &str, cred: libc::ucred, euid: u32) -> Result<(), ObserveError> {
    if local_socket::trusted_uid(cred.uid, euid) {
        return Ok(());
    }
    Err(ObserveError::UntrustedServer {
        name: name.to_string(),
        pid: cred.pid,
        uid: cred.uid,
        euid,
    })
}

/// Checks that `dir` is a bpffs directory holding the agent's pinned maps.
pub fn check_pin_dir(dir: &Path) -> Result<(), ObserveError> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ObserveError::NotBpffs { dir: dir.into() })?;
    // SAFETY: a valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::NotFound {
            ObserveError::NothingPinned { dir: dir.into() }
        } else {
            ObserveError::Io {
                path: dir.into(),
                source: e,
            }
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(ObserveError::NotBpffs { dir: dir.into() });
    }
    if !dir.join(policy_common::MAP_ENDPOINTS).exists() {
        return Err(ObserveError::NothingPinned { dir: dir.into() });
    }
    Ok(())
}

/// The right to consume the `EVENTS` ring of one pin directory: an exclusive `flock` on the
/// directory itself (bpffs cannot hold a lock file; a directory fd can be locked on any
/// filesystem). Released when dropped, also when the holder is killed.
pub struct ConsumerLock {
    _fd: OwnedFd,
}

impl ConsumerLock {
    /// Takes the lock without waiting; `Ok(None)` when another process holds it.
    pub fn try_take(bpf_dir: &Path) -> Result<Option<Self>, ObserveError> {
        let file = std::fs::File::open(bpf_dir).map_err(|source| ObserveError::Io {
            path: bpf_dir.into(),
            source,
        })?;
        let fd = OwnedFd::from(file);
        // SAFETY: a valid fd owned by this function.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(ObserveError::Io {
                path: bpf_dir.into(),
                source: e,
            });
        }
        Ok(Some(ConsumerLock { _fd: fd }))
    }
}

/// Who holds the consumer lock of `bpf_dir`, from `/proc/locks` (for the error message).
pub fn lock_holder(bpf_dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(bpf_dir) else {
        return "unknown".into();
    };
    let ino = meta.ino();
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return "unknown".into();
    };
    // "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF": pid, then major:minor:inode.
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6
            && f[1] == "FLOCK"
            && f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) == Some(ino)
        {
            return f[4].to_string();
        }
    }
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_name_is_short_and_per_pin_dir() {
        let a = socket_name(Path::new("/nonexistent/a"));
        let b = socket_name(Path::new("/nonexistent/b"));
        assert_ne!(a, b);
        assert_eq!(a, socket_name(Path::new("/nonexistent/a")));
        assert!(a.len() < 108);
        assert!(a.starts_with("netpol-monitor-"));
    }

    fn cred(pid: i32, uid: u32) -> libc::ucred {
        libc::ucred { pid, uid, gid: uid }
    }

    #[test]
    fn a_server_of_another_user_is_refused() {
        let e = check_server_cred("netpol-monitor-x", cred(4242, 1234), 1000)
            .expect_err("uid 1234 is neither root nor uid 1000");
        assert!(matches!(e, ObserveError::UntrustedServer { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("@netpol-monitor-x")
                && text.contains("pid 4242")
                && text.contains("uid 1234"),
            "{text}"
        );
        check_server_cred("netpol-monitor-x", cred(1, 0), 1000).expect("root serves");
        check_server_cred("netpol-monitor-x", cred(1, 1000), 1000).expect("our own user serves");
    }

    #[test]
    fn the_monitor_connects_to_a_socket_of_its_own_user() {
        let name = format!("netpol-monitor-test-{}", std::process::id());
        let _listener = local_socket::bind(&name).expect("bind");
        let stream = connect_named(&name).expect("trusted").expect("listening");
        // SO_PEERCRED of the connected socket names the listener's process: this one.
        assert_eq!(
            local_socket::peer_cred(&stream).expect("cred").pid,
            std::process::id() as i32
        );
        let nobody = format!("{name}-nobody");
        assert!(connect_named(&nobody).expect("no error").is_none());
    }

    #[test]
    fn a_missing_pin_dir_is_nothing_pinned() {
        let e = check_pin_dir(Path::new("/nonexistent/netpol-observe")).expect_err("must fail");
        assert!(matches!(e, ObserveError::NothingPinned { .. }), "{e}");
        assert!(e.to_string().contains("nothing is pinned under"));
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let e = check_pin_dir(&std::env::temp_dir()).expect_err("must fail");
        assert!(matches!(e, ObserveError::NotBpffs { .. }), "{e}");
    }
}
