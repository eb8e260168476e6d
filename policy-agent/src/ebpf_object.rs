//! The kernel object built by `cargo xtask build-ebpf`, embedded at compile time.

/// The ELF bytes, 8-byte aligned as aya requires. Empty when the object was not built.
pub fn bytes() -> &'static [u8] {
    static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf.o"));
    OBJ
}

/// Why the embedded object does not match the kernel sources it was compiled with (the
/// build script's check); empty when it does.
const STALE: &str = include_str!(concat!(env!("OUT_DIR"), "/policy-ebpf.stale"));

/// The object, or an error saying how to build it.
pub fn require() -> Result<&'static [u8], MissingObject> {
    let b = bytes();
    if b.is_empty() {
        Err(MissingObject::NotBuilt)
    } else if !STALE.is_empty() {
        Err(MissingObject::Stale(STALE))
    } else {
        Ok(b)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MissingObject {
    #[error(
        "the eBPF object was not built into this binary: run `cargo xtask build-ebpf` and rebuild"
    )]
    NotBuilt,
    /// Running it would test or enforce old kernel code against new maps and layouts.
    #[error("{0}: run `cargo xtask build-ebpf` and rebuild")]
    Stale(&'static str),
}
