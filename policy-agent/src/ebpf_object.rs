//! The kernel object built by `cargo xtask build-ebpf`, embedded at compile time.

/// The ELF bytes, 8-byte aligned as aya requires. Empty when the object was not built.
pub fn bytes() -> &'static [u8] {
    static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf.o"));
    OBJ
}

/// The object, or an error saying how to build it.
pub fn require() -> Result<&'static [u8], MissingObject> {
    let b = bytes();
    if b.is_empty() {
        Err(MissingObject)
    } else {
        Ok(b)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the eBPF object was not built into this binary: run `cargo xtask build-ebpf` and rebuild")]
pub struct MissingObject;
