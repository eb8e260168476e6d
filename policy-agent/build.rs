//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can embed it,
//! and checks it was built from the sources in the tree (the fingerprint `build-ebpf`
//! writes beside it). A missing or stale object is not a build error (the compiler and its
//! tests need no kernel side); loading then fails with a message saying how to build it.
use std::path::{Path, PathBuf};

#[path = "../xtask/src/ebpf_sources.rs"]
mod ebpf_sources;

fn main() {
    println!("cargo::rerun-if-env-changed=POLICY_EBPF_OBJECT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = dir.join("..");
    let path = std::env::var_os("POLICY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/ebpf/bpfel-unknown-none/release/policy-ebpf"));
    let stamp = ebpf_sources::stamp_path(&path);
    println!("cargo::rerun-if-changed={}", path.display());
    println!("cargo::rerun-if-changed={}", stamp.display());
    for input in ebpf_sources::INPUTS {
        println!("cargo::rerun-if-changed={}", root.join(input).display());
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let out = out_dir.join("policy-ebpf.o");
    match std::fs::read(&path) {
        Ok(bytes) => std::fs::write(&out, bytes).expect("write OUT_DIR copy"),
        Err(_) => {
            println!(
                "cargo::warning=eBPF object {} not found: run `cargo xtask build-ebpf`; the agent will refuse to load",
                path.display()
            );
            std::fs::write(&out, []).expect("write OUT_DIR placeholder");
        }
    }
    std::fs::write(
        out_dir.join("policy-ebpf.stale"),
        staleness(&root, &path, &stamp),
    )
    .expect("write OUT_DIR staleness");
}

/// Why the object does not match the tree's kernel sources; empty when it does (or when
/// nothing says what it was built from: an object built outside `cargo xtask`, as the
/// image's build stage does from the same tree).
fn staleness(root: &Path, object: &Path, stamp: &Path) -> String {
    if !object.exists() {
        return String::new();
    }
    let Ok(built) = std::fs::read_to_string(stamp) else {
        println!(
            "cargo::warning=eBPF object {} has no {}: its sources cannot be checked",
            object.display(),
            stamp.display()
        );
        return String::new();
    };
    match ebpf_sources::fingerprint(root) {
        Ok(now) if now == built.trim() => String::new(),
        Ok(_) => {
            println!(
                "cargo::warning=eBPF object {} is stale (policy-ebpf or policy-common changed since it was built): run `cargo xtask build-ebpf`",
                object.display()
            );
            format!(
                "the eBPF object {} was built from other sources than policy-ebpf and policy-common now hold",
                object.display()
            )
        }
        Err(e) => format!("the eBPF sources could not be read: {e}"),
    }
}
