//! Deny events from the `EVENTS` ring buffer.

use aya::maps::{MapData, RingBuf};
use policy_common::DenyEvent;

/// Reader of deny events (non-blocking; poll its fd with `AsRawFd` for readiness).
pub struct DenyEvents {
    ring: RingBuf<MapData>,
}

impl DenyEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        DenyEvents { ring }
    }

    /// The next pending event, if any.
    pub fn next_event(&mut self) -> Option<DenyEvent> {
        let item = self.ring.next()?;
        if item.len() < std::mem::size_of::<DenyEvent>() {
            return None;
        }
        // SAFETY: DenyEvent is plain old data of exactly this size; read unaligned because
        // ring buffer records are only 8-byte aligned by the kernel's convention.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>()) })
    }

    /// Every pending event.
    pub fn drain(&mut self) -> Vec<DenyEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl std::os::fd::AsRawFd for DenyEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}
