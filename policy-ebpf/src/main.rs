//! TC programs enforcing Kubernetes NetworkPolicy on the host side of a pod's veth.
//!
//! `from_pod` (TC ingress of the host-side veth) sees what the pod sends: its egress.
//! `to_pod` (TC egress) sees what is sent to the pod: its ingress. Each packet costs a fixed
//! number of map lookups: ENDPOINTS, then CONNTRACK, then (new flows only) the policy lookups
//! of `policy_common::decide`, shared with the agent's kernel model.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod verdict;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use policy_common::Direction;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict::run(&ctx, Direction::Egress)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict::run(&ctx, Direction::Ingress)
}

/// Baseline for the datapath benchmark: the cost of running any TC program at all.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
