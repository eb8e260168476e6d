//! Abstract unix sockets between root processes of one node: the agent's monitor socket and
//! its CNI socket.
//!
//! An abstract name lives in the network namespace (where the agent, its `monitor` and the
//! container runtime's plugins all run), vanishes with its socket (nothing stale after a
//! crash) and needs no shared directory. It has no file mode, so each side checks the
//! other's credentials, which the kernel takes at connect time (`SO_PEERCRED`): only root
//! or the process's own user is trusted.

use std::io;
use std::os::fd::AsRawFd as _;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;

/// The abstract name of the socket `prefix` serves for pin directory `bpf_dir`: a hash of
/// the canonical path (names are limited to 107 bytes, so the path itself cannot be the
/// name), so agents of different pin directories never collide.
pub fn name_for(prefix: &str, bpf_dir: &Path) -> String {
    let canon = std::fs::canonicalize(bpf_dir).unwrap_or_else(|_| bpf_dir.to_path_buf());
    format!(
        "{prefix}-{:016x}",
        fnv1a(canon.as_os_str().as_encoded_bytes())
    )
}

/// Connects to abstract socket `name` without asking who serves it.
pub fn connect(name: &str) -> io::Result<UnixStream> {
    UnixStream::connect_addr(&SocketAddr::from_abstract_name(name)?)
}

/// Binds abstract socket `name` (fails when another process serves it).
pub fn bind(name: &str) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)
}

/// Who may be on the other end, either way: root, or the same user.
pub fn trusted_uid(uid: u32, euid: u32) -> bool {
    uid == 0 || uid == euid
}

/// Whether the peer of `s` is trusted ([`trusted_uid`] against this process's user).
pub fn trusted_peer(s: &UnixStream) -> bool {
    // SAFETY: geteuid cannot fail.
    peer_cred(s).is_ok_and(|c| trusted_uid(c.uid, unsafe { libc::geteuid() }))
}

/// The credentials of a unix socket's peer (`SO_PEERCRED`: for a connected client, of the
/// process that made the listening socket; for an accepted one, of the client), taken by
/// the kernel when the connection was made, so the peer cannot fake them.
pub fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_per_pin_dir() {
        let a = name_for("netpol-cni", Path::new("/nonexistent/a"));
        let b = name_for("netpol-cni", Path::new("/nonexistent/b"));
        assert_ne!(a, b);
        assert!(a.starts_with("netpol-cni-") && a.len() < 107);
        assert_eq!(a, name_for("netpol-cni", Path::new("/nonexistent/a")));
    }

    #[test]
    fn root_and_the_own_user_are_trusted_nobody_else() {
        assert!(trusted_uid(0, 1000));
        assert!(trusted_uid(1000, 1000));
        assert!(!trusted_uid(1001, 1000));
    }
}
