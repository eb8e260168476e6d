//! `cargo xtask build-ebpf`: the kernel programs, release (a debug build fails the verifier),
//! with BTF, into target/ebpf where policy-agent's build script picks the object up.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::Tools;

pub fn build(root: &Path, tools: &Tools) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.bpf_linker_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    let st = Command::new("cargo")
        .current_dir(root.join("policy-ebpf"))
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(root.join("target/ebpf"))
        .env("PATH", std::env::join_paths(paths)?)
        // The host workspace's toolchain choice must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo +nightly build for policy-ebpf")?;
    if !st.success() {
        bail!("building policy-ebpf failed");
    }
    let obj = root.join("target/ebpf/bpfel-unknown-none/release/policy-ebpf");
    if !obj.is_file() {
        bail!("the build succeeded but {} is missing", obj.display());
    }
    // What it was built from: the agent's build script refuses an object of other sources.
    let stamp = crate::ebpf_sources::stamp_path(&obj);
    std::fs::write(&stamp, crate::ebpf_sources::fingerprint(root)?)
        .with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!("build-ebpf: {}", obj.display());
    Ok(())
}
