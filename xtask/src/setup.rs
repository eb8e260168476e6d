//! `cargo xtask setup`: makes a fresh machine of this kind ready, idempotently. A second run
//! only checks (well under 5 s). Everything built is cached outside the source tree, keyed by
//! what it depends on, so every clone reuses it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The bpf-linker release that builds against the nightly's LLVM 22 (toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests use: `ip` (namespaces, veth), `iptables` (kube-proxy-style DNAT
/// for `via: service` scenarios), `bpftool` (inspecting maps when a test fails), `ipset` and
/// `nft` (the baselines of `bench peers`).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("bpftool", "bpftool"),
    // `bench peers`: the iptables baseline's peer sets and the nftables baseline.
    ("ipset", "ipset"),
    ("nftables", "nft"),
];

/// What later steps need from setup.
pub struct Tools {
    /// Directory holding `bpf-linker`, to put first on PATH for the eBPF build.
    pub bpf_linker_dir: PathBuf,
}

pub fn run() -> Result<Tools> {
    let t0 = Instant::now();
    check_nightly()?;
    ensure_rust_src()?;
    ensure_lint_tools()?;
    let bpf_linker_dir = ensure_bpf_linker()?;
    ensure_debian_packages()?;
    eprintln!("setup: ready ({:.1} s)", t0.elapsed().as_secs_f64());
    Ok(Tools { bpf_linker_dir })
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("netpol-ebpf")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(output(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
    )?))
}

fn check_nightly() -> Result<()> {
    if nightly_sysroot().is_err() {
        bail!(
            "the `nightly` Rust toolchain is missing: the eBPF programs need it (build-std). \
             This machine kind ships it preinstalled; elsewhere run `rustup toolchain install nightly`"
        );
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain (needed by -Z build-std)");
    let st = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("running rustup")?;
    if !st.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed; run it by hand");
    }
    Ok(())
}

/// `cargo clippy` and `cargo fmt` for the host toolchain: CI runs both.
fn ensure_lint_tools() -> Result<()> {
    let have = |sub: &str| {
        Command::new("cargo")
            .args([sub, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("clippy") && have("fmt") {
        return Ok(());
    }
    eprintln!("setup: installing clippy and rustfmt (CI lints and checks formatting)");
    let st = Command::new("rustup")
        .args(["component", "add", "clippy", "rustfmt"])
        .status()
        .context("running rustup")?;
    if !st.success() {
        bail!("`rustup component add clippy rustfmt` failed; run it by hand");
    }
    Ok(())
}

/// The nightly's own libLLVM shared object (bpf-linker links against it: no system LLVM 22).
fn nightly_libllvm() -> Result<PathBuf> {
    let lib = nightly_sysroot()?.join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        // The real file is libLLVM.so.<ver>-rust-<ver>; libLLVM-<n>-rust-*.so is a linker script.
        if name.starts_with("libLLVM.so.") && e.metadata()?.len() > 1_000_000 {
            return Ok(e.path());
        }
    }
    bail!(
        "no libLLVM.so.* in {}: is the nightly toolchain complete?",
        lib.display()
    )
}

fn ensure_bpf_linker() -> Result<PathBuf> {
    let llvm = nightly_libllvm()?;
    let llvm_name = llvm
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    // Keyed by the LLVM file name: the binary is tied to that exact nightly.
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{llvm_name}"));
    let bin_dir = root.join("bin");
    let bin = bin_dir.join("bpf-linker");
    if bin.is_file() && works(&bin) {
        return Ok(bin_dir);
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about 2 minutes, once)",
        llvm.display()
    );
    let prefix = root.join("llvm");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    for link in [libdir.join("libLLVM.so"), libdir.join(&llvm_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    let st = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // Build it with the stable toolchain whatever the caller's directory pins.
        .env("RUSTUP_TOOLCHAIN", "stable")
        .status()
        .context("running cargo install bpf-linker")?;
    if !st.success() || !works(&bin) {
        bail!(
            "building bpf-linker failed. By hand: LLVM_PREFIX={} cargo install bpf-linker \
             --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22 --root {}",
            prefix.display(),
            root.display()
        );
    }
    Ok(bin_dir)
}

fn works(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn has_package(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(p, _)| !has_package(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!(
                "apt-get {} failed; install by hand: apt-get update && apt-get install -y {}",
                args.join(" "),
                missing.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    for (pkg, cmd) in DEBIAN_PACKAGES {
        if Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            bail!("package {pkg} is installed but `{cmd}` is not on PATH");
        }
    }
    Ok(())
}
