//! Every verdict counted per direction and reason (per-CPU counters); denies reported to
//! `EVENTS` under a per-CPU token bucket.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use policy_common::{Addr, DenyEvent, Direction, Reason, ct};

use crate::clock;
use crate::maps::{CONFIG, COUNTERS, EVENT_BUDGET, EVENTS};
use crate::parse::Pkt;

#[inline(always)]
pub(super) fn count(reason: Reason, dir: Direction) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason.counter_index(dir)) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Emits a deny event when the per-CPU token bucket has a token. The bucket runs on the
/// tick clock (a tick boundary may refill a few tokens at once, never more than the rate
/// allows): in a flood of denies it costs no helper call; only an emitted event reads the
/// fine clock for its stamp.
#[inline(always)]
pub(super) fn report(
    ctx: &TcContext,
    dir: Direction,
    reason: Reason,
    pkt: Option<&Pkt>,
    ep_id: u32,
) {
    let now = match pkt {
        Some(p) => p.now,
        None => clock::now(),
    };
    if !take_token(now) {
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut e) = EVENTS.reserve::<DenyEvent>(0) else {
        return;
    };
    let (src, dst, sport, dport, proto_nr) = match pkt {
        Some(p) => (p.src, p.dst, p.sport, p.dport, p.proto),
        None => (Addr([0; 4]), Addr([0; 4]), 0, 0, 0),
    };
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Field by field into the reservation: no 56-byte copy on the stack.
    let d: *mut DenyEvent = e.as_mut_ptr();
    // SAFETY: `d` points to a reserved, writable DenyEvent; every field is written.
    unsafe {
        (*d).timestamp_ns = now;
        (*d).src = src;
        (*d).dst = dst;
        (*d).src_port = sport;
        (*d).dst_port = dport;
        (*d).proto = proto_nr;
        (*d).direction = dir as u8;
        (*d).reason = reason as u8;
        (*d)._pad = 0;
        (*d).endpoint_id = ep_id;
        (*d).ifindex = ifindex;
    }
    e.submit(0);
}

#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    let rate = cfg.events_per_sec as u64;
    let burst = cfg.events_burst as u64;
    if rate == 0 {
        return false;
    }
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        // Capped so the product cannot overflow.
        let elapsed = now.saturating_sub((*b).last_refill_ns).min(1000 * ct::SEC);
        // Divide only when a whole token was earned: in a flood of denies with an empty
        // bucket most packets earn none, and a 64-bit division is the dearest instruction.
        let earned = elapsed * rate;
        if earned >= ct::SEC {
            let add = earned / ct::SEC;
            let tokens = (*b).tokens + add;
            if tokens >= burst {
                (*b).tokens = burst;
                (*b).last_refill_ns = now;
            } else {
                (*b).tokens = tokens;
                // Keep the fraction of a token already earned.
                (*b).last_refill_ns += add * ct::SEC / rate;
            }
        }
        if (*b).tokens == 0 {
            return false;
        }
        (*b).tokens -= 1;
    }
    true
}
