//! Cleaning up after the kernel runner, also when it is interrupted or was killed.
//!
//! - Interrupts: SIGINT, SIGTERM and SIGHUP set a flag the runner polls between waits (every
//!   wait it makes is short), so a step in progress stops and the drop guards remove the
//!   namespaces, the agent, the bpffs mount and the temp dir. A second signal exits at once.
//! - Leftovers: a run killed outright (SIGKILL, a crash) leaves its objects behind. Every
//!   object the runner makes carries its owner's pid in its name (see [`tag_pid`]), so the next
//!   run removes those whose owner is dead: namespaces `ksn-TAG`, `kspN-TAG`, `kseN-TAG`, temp
//!   dirs `policy-scenario-TAG`, bpffs mounts `policy-bpffs-PID-N`, and agent processes still
//!   serving such a temp dir. Nothing else is touched, and nothing of a live run.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::testbed::netns::run_checked;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second signal: the default action now (terminate).
        // SAFETY: signal and raise are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    const MSG: &[u8] = b"\ninterrupted: stopping and cleaning up (signal again to quit at once)\n";
    // SAFETY: write is async-signal-safe; a valid buffer.
    unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
}

/// Installs the handlers once per process. From then on the first SIGINT/SIGTERM/SIGHUP makes
/// [`interrupted`] true instead of killing the process.
pub fn install_interrupt_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a plain handler is valid; SA_RESTART keeps
            // interrupted system calls of other threads going.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Whether an interrupt arrived (the runner should stop and clean up).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub use crate::testbed::{make_tag, tag_pid};

/// The tag of a namespace name of our schemes: the runner's `ksn-TAG` (the first node),
/// `ksnN-TAG` (the others), `ksu-TAG` (their underlay), `kspN-TAG`, `kseN-TAG` and the test bed's `pnode-TAG`, `ppN-TAG`, `pxN-TAG`.
pub fn namespace_tag(name: &str) -> Option<&str> {
    let (head, tag) = name.split_once('-')?;
    let numbered = |rest: &str, kinds: &[char]| {
        rest.len() > 1 && rest.starts_with(kinds) && rest[1..].bytes().all(|b| b.is_ascii_digit())
    };
    let ok = match (head.strip_prefix("ks"), head.strip_prefix('p')) {
        (Some(rest), _) => rest == "n" || rest == "u" || numbered(rest, &['p', 'e', 'n']),
        (None, Some(rest)) => rest == "node" || numbered(rest, &['p', 'x']),
        _ => false,
    };
    let tag_ok = !tag.is_empty()
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    (ok && tag_ok).then_some(tag)
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// What [`sweep_leftovers`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub namespaces: Vec<String>,
    pub dirs: Vec<PathBuf>,
    pub processes: Vec<u32>,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.dirs.is_empty() && self.processes.is_empty()
    }
}

/// Removes the leftovers of earlier runs whose owning process is dead (see the module doc).
pub fn sweep_leftovers() -> Swept {
    let mut swept = Swept::default();
    let tmp = std::env::temp_dir();
    // Agents first: they hold the namespaces' programs and the bpffs.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for e in procs.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            if !args.iter().any(|a| *a == b"standalone") {
                continue;
            }
            let owner = args.iter().find_map(|a| {
                let s = std::str::from_utf8(a).ok()?;
                let rest = Path::new(s).strip_prefix(&tmp).ok()?.to_str()?;
                let (dir, tail) = rest.split_once('/')?;
                if tail != "manifests" {
                    return None;
                }
                tag_pid(dir.strip_prefix("policy-scenario-")?)
            });
            if let Some(owner) = owner
                && !alive(owner)
            {
                // SAFETY: signalling a process of our own naming scheme whose owner is dead.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                swept.processes.push(pid);
            }
        }
    }
    if !swept.processes.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Ok(list) = std::fs::read_dir("/run/netns") {
        for e in list.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some(pid) = namespace_tag(&name).and_then(tag_pid) else {
                continue;
            };
            if alive(pid) {
                continue;
            }
            match run_checked(std::process::Command::new("ip").args(["netns", "del", &name])) {
                Ok(_) => swept.namespaces.push(name),
                Err(e) => {
                    tracing::warn!(ns = %name, error = %e, "removing a leftover namespace failed")
                }
            }
        }
    }
    if let Ok(list) = std::fs::read_dir(&tmp) {
        for e in list.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let owner = if let Some(tag) = name.strip_prefix("policy-scenario-") {
                tag_pid(tag)
            } else if let Some(rest) = name.strip_prefix("policy-bpffs-") {
                rest.split_once('-').and_then(|(pid, _)| pid.parse().ok())
            } else {
                None
            };
            let Some(owner) = owner else { continue };
            if alive(owner) {
                continue;
            }
            let path = e.path();
            if name.starts_with("policy-bpffs-") {
                if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                    // SAFETY: a valid C string; MNT_DETACH; fails harmlessly when not mounted.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
                if std::fs::remove_dir(&path).is_ok() {
                    swept.dirs.push(path);
                }
            } else if std::fs::remove_dir_all(&path).is_ok() {
                swept.dirs.push(path);
            }
        }
    }
    if !swept.is_empty() {
        tracing::info!(?swept, "removed leftovers of killed scenario runs");
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_give_their_pid_back() {
        for (pid, n) in [(1, 0), (4_194_304, 1023), (12345, 7), (99, 2000)] {
            assert_eq!(tag_pid(&make_tag(pid, n)), Some(pid));
        }
    }

    #[test]
    fn only_the_runner_scheme_is_recognised() {
        assert_eq!(namespace_tag("ksn-abc1"), Some("abc1"));
        assert_eq!(namespace_tag("ksp12-abc1"), Some("abc1"));
        assert_eq!(namespace_tag("kse0-z"), Some("z"));
        assert_eq!(namespace_tag("ksn2-abc1"), Some("abc1"));
        assert_eq!(namespace_tag("ksu-abc1"), Some("abc1"));
        assert_eq!(namespace_tag("pnode-q1"), Some("q1"));
        assert_eq!(namespace_tag("pp3-q1"), Some("q1"));
        assert_eq!(namespace_tag("px12-q1"), Some("q1"));
        for other in [
            "ksn",
            "ksx-ab",
            "ksp-ab",
            "kspa-ab",
            "ksn-AB",
            "netpol-1-2",
            "ksn-",
            "cni-1234",
            "pz1-ab",
            "pnodes-ab",
            "p-ab",
        ] {
            assert_eq!(namespace_tag(other), None, "{other}");
        }
    }
}
