//! Non-first fragments carry no ports: they follow the verdict of their first fragment,
//! recorded in `FRAGMENTS`.

use policy_common::{FragKey, FragValue, Reason, ct};

use crate::maps::FRAGMENTS;
use crate::parse::Pkt;

#[inline(always)]
pub(super) fn fragment_verdict(pkt: &Pkt, isolated: bool) -> Reason {
    if !isolated {
        return Reason::AllowNotIsolated;
    }
    let key = frag_key(pkt);
    // SAFETY: copied at once.
    match unsafe { FRAGMENTS.get(&key) } {
        Some(v) if pkt.now.saturating_sub(v.created_ns) <= ct::TIMEOUT_FRAGMENT_NS => {
            Reason::AllowFragment
        }
        _ => Reason::DenyFragment,
    }
}

/// Built with the padding written by one word store (as in the conntrack keys): field by field, the
/// 3 zero bytes become a `memset` call.
#[inline(always)]
fn frag_key(pkt: &Pkt) -> FragKey {
    let mut out = core::mem::MaybeUninit::<FragKey>::uninit();
    let p = out.as_mut_ptr();
    // SAFETY: every byte of `out` is written: addresses, id, then proto and `_pad` together.
    unsafe {
        (*p).src = pkt.src;
        (*p).dst = pkt.dst;
        (*p).id = pkt.frag_id;
        core::ptr::write_volatile(
            (p as *mut u8).add(core::mem::offset_of!(FragKey, proto)) as *mut u32,
            u32::from_le_bytes([pkt.frag_proto, 0, 0, 0]),
        );
        out.assume_init()
    }
}

#[inline(always)]
pub(super) fn record_fragment(pkt: &Pkt, reason: Reason) {
    let v = FragValue {
        created_ns: pkt.now,
        reason: reason as u32,
        _pad: 0,
    };
    let _ = FRAGMENTS.insert(&frag_key(pkt), &v, 0);
}
