//! What a packet's judgement is stamped with: the datapath's clock (`CLOCK_MONOTONIC_COARSE`
//! as the kernel's tick count gives it) and the policy epoch, both from `CONFIG`, read once.
//! `bpf_jiffies64` is inlined by the verifier into one load, where `bpf_ktime_get_coarse_ns`
//! is a helper call chain: on a conntrack hit the clock was a quarter of the whole cost.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::CONFIG;
use crate::parse::Pkt;

/// Sets the packet's `now` and `epoch`.
#[inline(always)]
pub fn stamp(pkt: &mut Pkt) {
    let (now, epoch) = now_and_epoch();
    pkt.now = now;
    pkt.epoch = epoch;
}

/// Now, in ns, on the clock of every stamp in the maps (resolution: one tick).
#[inline(always)]
pub fn now() -> u64 {
    now_and_epoch().0
}

/// [`now`], and `Config::policy_epoch` (0 before the agent wrote `CONFIG`).
#[inline(always)]
fn now_and_epoch() -> (u64, u32) {
    let mut epoch = 0;
    if let Some(c) = CONFIG.get(0) {
        epoch = c.policy_epoch;
        let tick = c.jiffy_ns as u64;
        if tick != 0 {
            // SAFETY: a helper without arguments (inlined: a load of `jiffies_64`).
            let j = unsafe { bpf_jiffies64() };
            return (j.wrapping_sub(c.jiffies_base).wrapping_mul(tick), epoch);
        }
    }
    // Not calibrated yet: the helper gives the same clock, only dearer.
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() }, epoch)
}
