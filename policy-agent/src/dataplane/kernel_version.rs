//! The oldest kernel the programs load on, checked before loading so an old kernel gets a
//! clear error instead of a verifier log.
//!
//! 5.12: the programs use BPF atomic read-modify-write instructions with fetch (`BPF_FETCH`,
//! `BPF_XCHG`, `BPF_CMPXCHG`, all new in 5.12) for their counters and table slots. Older
//! requirements are below it: ring buffers (5.8), `CAP_BPF` (5.8), BPF memory charged to
//! the cgroup (5.11). TCX links (6.6) are used where present, clsact filters otherwise.

/// (major, minor).
pub const MINIMUM: (u32, u32) = (5, 12);

/// The running kernel's release (`uname -r`).
pub fn running_release() -> String {
    // SAFETY: a zeroed utsname is a valid out-buffer for uname(2).
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates `release`.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether `release` (as `uname -r` prints it: `6.18.44-fc`, `5.15.0-91-generic`) is at
/// least [`MINIMUM`]; `None` when it cannot be read (then loading decides).
pub fn supported(release: &str) -> Option<bool> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    Some((major, minor) >= MINIMUM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_compared_by_major_and_minor() {
        assert_eq!(supported("6.18.44-fc-v1300"), Some(true));
        assert_eq!(supported("5.12.0"), Some(true));
        assert_eq!(supported("5.15.0-91-generic"), Some(true));
        assert_eq!(supported("5.11.22"), Some(false));
        assert_eq!(supported("4.19.0-26-amd64"), Some(false));
        assert_eq!(supported("garbage"), None);
        assert_eq!(supported(""), None);
    }

    #[test]
    fn this_machine_is_supported() {
        assert_eq!(supported(&running_release()), Some(true));
    }
}
