//! Notices changes of the manifest directory as they happen (inotify), so the standalone
//! agent reads a change at once instead of at its next poll.
//!
//! Every directory the reader walks is watched (symbolic links followed, as the reader
//! follows them); a directory appearing, moving or going away makes the set of watches be
//! taken again from a fresh walk. A file counts as changed when a writer closes it, when it
//! is renamed into or out of place (atomic writes, a ConfigMap volume's `..data` swap),
//! deleted, or its attributes change; not on every `write(2)`, so a file written in pieces
//! is read once it is complete (a poll can still land mid-write: the agent's periodic pass
//! and the fingerprint's racy window stay as they were and catch up). A lost event (a full
//! queue) counts as a change.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify: {0}")]
    Init(#[source] std::io::Error),
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the watch thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What ends a watch on a directory, or says its content changed.
const DIR_MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// How often the thread looks at its stop flag while nothing happens.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Watches a manifest directory on a thread of its own, calling `wake` after every change;
/// stops when dropped.
pub struct DirWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirWatch {
    /// Watches `dir` and the directories below it the reader walks.
    pub fn start(dir: &Path, wake: impl Fn() + Send + 'static) -> Result<DirWatch, WatchError> {
        let mut watches = Watches::new(dir.to_path_buf())?;
        watches.sync()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("manifest-watch".into())
            .spawn(move || watches.run(&stopped, wake))
            .map_err(WatchError::Thread)?;
        Ok(DirWatch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one read of the queue found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// Something the reader reads may have changed.
    changed: bool,
    /// The directory tree itself may have changed: take the watches again.
    dirs: bool,
}

struct Watches {
    root: PathBuf,
    fd: OwnedFd,
    /// Watch descriptors and the directory each was added for.
    wds: BTreeMap<i32, PathBuf>,
}

impl Watches {
    fn new(root: PathBuf) -> Result<Watches, WatchError> {
        // SAFETY: plain inotify_init1(2); the fd is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(WatchError::Init(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Watches {
            root,
            fd,
            wds: BTreeMap::new(),
        })
    }

    /// Watches every directory a walk of the reader reaches, and no other. Only the root
    /// failing is an error (a subdirectory may vanish between the walk and the watch).
    fn sync(&mut self) -> Result<(), WatchError> {
        let dirs = super::collect(&self.root, &super::Limits::default())
            .map(|w| w.dirs)
            .unwrap_or_default();
        let mut live = BTreeSet::new();
        for dir in std::iter::once(&self.root).chain(dirs.iter().filter(|d| **d != self.root)) {
            match self.add(dir) {
                Ok(wd) => {
                    live.insert(wd);
                    self.wds.entry(wd).or_insert_with(|| dir.clone());
                }
                Err(source) if *dir == self.root => {
                    return Err(WatchError::Watch {
                        path: dir.clone(),
                        source,
                    });
                }
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "not watched"),
            }
        }
        let gone: Vec<i32> = self
            .wds
            .keys()
            .copied()
            .filter(|wd| !live.contains(wd))
            .collect();
        for wd in gone {
            self.wds.remove(&wd);
            // SAFETY: a watch descriptor of our own fd; a stale one only fails (EINVAL).
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
        Ok(())
    }

    fn add(&self, dir: &Path) -> std::io::Result<i32> {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; the same inode gives back the same wd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), DIR_MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wd)
    }

    fn run(mut self, stop: &AtomicBool, wake: impl Fn()) {
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, STOP_CHECK.as_millis() as i32) } <= 0 {
                continue;
            }
            let seen = self.drain();
            // Wake first: taking the watches again walks the tree, which a change need not
            // wait for.
            if seen.changed {
                wake();
            }
            if seen.dirs {
                let before: BTreeSet<i32> = self.wds.keys().copied().collect();
                match self.sync() {
                    // A new directory is watched only from now: files written into it
                    // before that are read by a pass woken after it.
                    Ok(()) if self.wds.keys().any(|wd| !before.contains(wd)) => wake(),
                    Ok(()) => {}
                    // The directory itself went away: the agent's pass reports it; keep
                    // trying, a new one may appear under the same name.
                    Err(e) => tracing::warn!(error = %e, "manifest directory not watched"),
                }
            }
        }
    }

    /// Reads every queued event.
    fn drain(&mut self) -> Seen {
        let mut seen = Seen::default();
        // Aligned for inotify_event; room for many events with names.
        let mut buf = vec![0u64; 4096 / 8];
        loop {
            // SAFETY: a valid writable buffer of its length; the fd is non-blocking.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len() * 8) };
            if n <= 0 {
                return seen;
            }
            // SAFETY: the kernel wrote `n` bytes into `buf`, which outlives the slice.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            for (wd, mask, name) in events(bytes) {
                let dir = self.wds.get(&wd).cloned();
                judge(&mut seen, mask, || {
                    dir.zip(name).is_some_and(|(d, n)| {
                        std::fs::symlink_metadata(d.join(n)).is_ok_and(|m| m.is_symlink())
                    })
                });
            }
        }
    }
}

/// Folds one event into `seen`. A created non-directory counts only when it is a symbolic
/// link (`is_symlink`): a regular file counts when its writer closes it.
fn judge(seen: &mut Seen, mask: u32, is_symlink: impl FnOnce() -> bool) {
    let dir = mask & libc::IN_ISDIR != 0;
    if mask & libc::IN_Q_OVERFLOW != 0 {
        seen.changed = true;
        seen.dirs = true;
        return;
    }
    if mask & libc::IN_CREATE != 0 && !dir && !is_symlink() {
        return;
    }
    if mask & (DIR_MASK | libc::IN_IGNORED) != 0 {
        seen.changed = true;
    }
    let moved = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE;
    let tree = mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0
        || (mask & moved != 0 && (dir || mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0));
    if tree {
        // A symbolic link (or a rename) may bring a directory in as well.
        seen.dirs = true;
    }
}

/// The events of one read: watch descriptor, mask and name (when the event has one).
fn events(bytes: &[u8]) -> impl Iterator<Item = (i32, u32, Option<std::ffi::OsString>)> + '_ {
    use std::os::unix::ffi::OsStrExt as _;
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = bytes.get(at..at + HEADER)?;
        // SAFETY: HEADER bytes of an inotify_event as the kernel wrote it (read unaligned).
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
        let name_at = at + HEADER;
        let name_end = name_at.checked_add(ev.len as usize)?;
        let raw = bytes.get(name_at..name_end)?;
        at = name_end;
        let name = raw.split(|b| *b == 0).next().filter(|n| !n.is_empty());
        Some((
            ev.wd,
            ev.mask,
            name.map(|n| std::ffi::OsStr::from_bytes(n).to_os_string()),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("manifest-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    fn woke(rx: &mpsc::Receiver<()>) -> bool {
        let got = rx.recv_timeout(Duration::from_secs(2)).is_ok();
        while rx.try_recv().is_ok() {}
        got
    }

    #[test]
    fn writes_renames_deletes_and_new_subdirectories_wake_it() {
        let dir = scratch("wake");
        let (tx, rx) = mpsc::channel();
        let _w = DirWatch::start(&dir, move || {
            let _ = tx.send(());
        })
        .expect("watch");
        std::fs::write(dir.join(".a.yaml.tmp"), "x: 1\n").expect("write");
        assert!(woke(&rx), "a closed write");
        std::fs::rename(dir.join(".a.yaml.tmp"), dir.join("a.yaml")).expect("rename");
        assert!(woke(&rx), "a rename into place");
        std::fs::remove_file(dir.join("a.yaml")).expect("delete");
        assert!(woke(&rx), "a delete");
        std::fs::create_dir(dir.join("sub")).expect("subdir");
        assert!(woke(&rx), "a new directory");
        // The new directory is watched too.
        std::fs::write(dir.join("sub/b.yaml"), "x: 1\n").expect("write below");
        assert!(woke(&rx), "a write in the new directory");
        // A new directory's watch wakes once more after it is taken, at a moment of its own:
        // let such wakes pass, then nothing may keep waking it without a change.
        let mut extra = 0;
        while rx.recv_timeout(Duration::from_millis(300)).is_ok() {
            extra += 1;
            assert!(extra < 5, "keeps waking with nothing changed");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_regular_file_counts_when_closed_not_when_created() {
        let mut seen = Seen::default();
        judge(&mut seen, libc::IN_CREATE, || false);
        assert_eq!(seen, Seen::default());
        judge(&mut seen, libc::IN_CREATE, || true);
        assert_eq!(
            seen,
            Seen {
                changed: true,
                dirs: true
            }
        );
        let mut seen = Seen::default();
        judge(&mut seen, libc::IN_CLOSE_WRITE, || false);
        assert_eq!(
            seen,
            Seen {
                changed: true,
                dirs: false
            }
        );
        let mut seen = Seen::default();
        judge(&mut seen, libc::IN_Q_OVERFLOW, || false);
        assert_eq!(
            seen,
            Seen {
                changed: true,
                dirs: true
            }
        );
    }

    #[test]
    fn events_are_split_with_their_names() {
        let mut bytes = Vec::new();
        for (wd, mask, name) in [
            (1i32, libc::IN_CLOSE_WRITE, &b"a.yaml\0\0"[..]),
            (2, libc::IN_IGNORED, &b""[..]),
        ] {
            bytes.extend_from_slice(&wd.to_ne_bytes());
            bytes.extend_from_slice(&mask.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            bytes.extend_from_slice(name);
        }
        // A truncated tail is ignored.
        bytes.extend_from_slice(&[1, 2, 3]);
        let got: Vec<_> = events(&bytes).collect();
        assert_eq!(
            got,
            [
                (1, libc::IN_CLOSE_WRITE, Some("a.yaml".into())),
                (2, libc::IN_IGNORED, None)
            ]
        );
    }
}
