//! The fingerprint of everything the kernel object is built from. `cargo xtask build-ebpf`
//! writes it beside the object; policy-agent's build script (which includes this file)
//! recomputes it and refuses an object built from other sources: a plain `cargo test` after
//! editing `policy-common` must not run the old kernel code. Standard library only.

use std::path::{Path, PathBuf};

/// The inputs, relative to the repository root: files, and directories walked whole.
pub const INPUTS: [&str; 6] = [
    "policy-ebpf/Cargo.toml",
    "policy-ebpf/Cargo.lock",
    "policy-ebpf/.cargo/config.toml",
    "policy-ebpf/src",
    "policy-common/Cargo.toml",
    "policy-common/src",
];

/// Where the fingerprint is written beside `object`.
pub fn stamp_path(object: &Path) -> PathBuf {
    let mut name = object.file_name().unwrap_or_default().to_os_string();
    name.push(".sources");
    object.with_file_name(name)
}

/// FNV-1a over each input file's relative path and contents, in path order.
pub fn fingerprint(root: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    for input in INPUTS {
        collect(&root.join(input), &mut files)?;
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in &files {
        let rel = f.strip_prefix(root).unwrap_or(f);
        eat(rel.to_string_lossy().as_bytes());
        eat(&[0]);
        let data = std::fs::read(f)?;
        eat(&(data.len() as u64).to_le_bytes());
        eat(&data);
    }
    Ok(format!("{h:016x}"))
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            collect(&e?.path(), out)?;
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}
