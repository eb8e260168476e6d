//! The raw `bpf(2)` call, for the few commands aya 0.14 does not offer (read-only pin
//! opening, key walks without values, batch lookups, map-in-map slots).

/// `bpf(cmd, attr, size_of(attr))`: the call's non-negative result (a new fd for the
/// commands that make one).
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads or writes through it.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    // SAFETY: the caller vouches for the pointers inside `attr`; `attr` itself is valid.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
