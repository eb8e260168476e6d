//! An upgrade whose maps changed layout meets the old agent's pins: the new agent must see
//! it before loading anything and refuse clearly (fail closed: the attached programs keep
//! enforcing their own maps), never adopt a map of another layout. Needs root and BPF:
//! fails without.

mod restart_common;

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::Command;

use policy_agent::dataplane::{Dataplane, DataplaneError, PinState};
use policy_agent::testbed::PrivateBpffs;
use policy_common::{MAP_ENDPOINTS, MAP_PORTS, MAX_ENDPOINTS};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Creates a hash map of the given layout and pins it at `path` (raw syscalls: aya creates
/// maps only from an object).
fn pin_raw_hash(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, max_entries]);
    // SAFETY: a zeroed bpf_attr with the map-create fields set; its size is passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), std::mem::size_of_val(&attr))
    };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd this test owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut pin = [0u64; 4];
    pin[0] = c.as_ptr() as u64;
    pin[1] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    // SAFETY: a zeroed bpf_attr with pathname and bpf_fd set; `c` outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), std::mem::size_of_val(&pin))
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

#[test]
fn restart_incompatible_pinned_map_is_refused_before_loading() {
    let fs = PrivateBpffs::mount().expect("private bpffs");
    {
        let dp = Dataplane::load(fs.path()).expect("first load creates the pins");
        assert_eq!(dp.pin_state(), PinState::Fresh);
    }
    assert_eq!(Dataplane::load(fs.path()).expect("same object adopts").pin_state(), PinState::Adopted);

    // An "old agent" left ENDPOINTS with 8-byte values where this object has 16.
    let endpoints = fs.path().join(MAP_ENDPOINTS);
    std::fs::remove_file(&endpoints).expect("unpin");
    pin_raw_hash(&endpoints, 16, 8, MAX_ENDPOINTS);
    match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(detail.contains("ENDPOINTS.value_size: pinned 8 but the object wants 16"), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an incompatible map was adopted"),
    }

    // The agent binary says so and exits non-zero instead of running.
    let dir = restart_common::TempDir::new("upgrade");
    let out = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_policy-agent"))
        .arg("standalone")
        .arg("--manifests")
        .arg(dir.manifests())
        .arg("--bpf-dir")
        .arg(fs.path())
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.status.code() != Some(124), "the agent must refuse: {err}");
    assert!(err.contains("cannot be adopted") && err.contains("ENDPOINTS.value_size"), "{err}");

    // Some maps pinned and others not (a partial cleanup) is refused too.
    std::fs::remove_file(&endpoints).expect("unpin");
    std::fs::remove_file(fs.path().join(MAP_PORTS)).expect("unpin");
    match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(detail.contains("others are not") && detail.contains(MAP_PORTS), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a partial pin directory was adopted"),
    }
}
