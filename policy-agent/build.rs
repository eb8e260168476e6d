//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can embed it.
//! A missing object is not a build error (the compiler and its tests need no kernel side);
//! loading then fails with a message saying how to build it.
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=POLICY_EBPF_OBJECT");
    let path = std::env::var_os("POLICY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            dir.join("../target/ebpf/bpfel-unknown-none/release/policy-ebpf")
        });
    println!("cargo::rerun-if-changed={}", path.display());
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("policy-ebpf.o");
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
}
