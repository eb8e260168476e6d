//! A private bpffs mount per test run, so pinned maps never meet the machine's
//! `/sys/fs/bpf` or another run's.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// A bpffs mounted on a fresh directory under the system temp dir; unmounted (lazily) and
/// removed on drop. Pinned objects vanish with the mount; loaded maps live while their file
/// descriptors are open.
pub struct PrivateBpffs {
    dir: PathBuf,
}

impl PrivateBpffs {
    pub fn mount() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("policy-bpffs-{}", super::unique_suffix()));
        std::fs::create_dir(&dir)?;
        let c = cstr(&dir)?;
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::new(
                e.kind(),
                format!("mount bpffs on {}: {e}", dir.display()),
            ));
        }
        Ok(PrivateBpffs { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(c) = cstr(&self.dir) {
            // SAFETY: valid C string. MNT_DETACH: open fds into the mount do not block it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
