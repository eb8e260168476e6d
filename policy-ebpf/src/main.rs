//! TC programs enforcing Kubernetes NetworkPolicy on the host side of a pod's veth.
//!
//! `from_pod` (TC ingress of the host-side veth) sees what the pod sends: its egress.
//! `to_pod` (TC egress) sees what is sent to the pod: its ingress. Per packet
//! ([`verdict::run`]):
//!
//! 1. parse ([`parse`]): a direct-access fast path for IPv4 without options / IPv6 without
//!    extension headers, unfragmented, with the L4 header in the linear data; everything else
//!    through `bpf_skb_load_bytes` (IPv4 options, up to 6 IPv6 extension headers, fragments,
//!    ICMP errors and the packet they quote, truncation at any layer);
//! 2. link-scoped IPv6 control traffic (ND with hop limit 255, link-local/multicast on both
//!    sides) passes; `ENDPOINTS` for the hook's own pod (through `EP_CACHE`, a per-CPU copy
//!    per interface that `Config::endpoints_gen` retires), `IPCACHE` for the far side (and its
//!    `ENDPOINTS` entry only when IPCACHE marks it a local endpoint; the decision reuses the
//!    identity found): at a pod hook the pod-side address must be bound to the interface
//!    (`BINDINGS`, checked before conntrack; else `spoofed`) and known, at an uplink hook
//!    (`from_world`/`to_world`) a local pod's address arriving from outside is `spoofed` and
//!    no local endpoint on either side passes (the node's own traffic); nothing isolated on
//!    either side passes, its connection recorded in conntrack (its originator, for when
//!    isolation comes); non-IP frames other than ARP are dropped at pod hooks;
//! 3. malformed -> drop where isolated; non-first fragments follow their first fragment's
//!    verdict (`FRAGMENTS`); ICMP errors pass when they travel the reverse path of a live
//!    connection they quote;
//! 4. `CONNTRACK` (one lookup, normalised key; `CONNTRACK4` under a 16-byte key when both
//!    addresses are IPv4; set-associative tables searched without a kernel call, see
//!    `ct_table`; looked up first, for every packet): a connection needs EGRESS_OK when its
//!    originator is a local endpoint isolated for egress and INGRESS_OK when its responder is
//!    one isolated for ingress; a live entry holding both -> pass (TCP SYNs in the original
//!    direction are always re-decided);
//! 5. else every missing grant is decided here, whichever hook this is, by
//!    `policy_common::decide` over `IPCACHE`, `RULES`, `CIDR_RULES`, `PORTS` (the same
//!    function the agent's kernel model runs), and recorded in conntrack. So a pod known to
//!    the maps is enforced from its first packet even where its own veth has no program yet.
//!    Egress to a Service range (`SERVICE_CIDRS`) is deferred at `from_pod` (`SERVICE_PENDING`
//!    remembers the virtual tuple) and decided on the backend where the DNATed packet meets
//!    `to_pod` or `to_world`, which also grants the virtual tuple for the replies;
//! 6. every verdict counted per direction and reason; denies reported to `EVENTS` under a
//!    per-CPU token bucket.
//!
//! Limits (what the two-sided grants and the Service deferral do not cover):
//! - a Service DNATed AND source-NATed before a hook sees it (kube-proxy's masquerade for
//!   hairpin traffic, `masquerade-all`, SNAT to a remote backend): the translated packet's
//!   source is the node, not the client, so the client's egress is never judged on the
//!   backend; its virtual tuple stays ungranted, and the replies (from the virtual IP) are
//!   judged as new flows into the client: the connection works whenever the client's
//!   ingress admits the virtual IP. Hairpin without SNAT is judged like any local backend;
//! - `SERVICE_PENDING` is keyed by the client socket (address, port, protocol) and holds up
//!   to 4 virtual tuples of it; after DNAT a SYN finds its own by sequence number, but a UDP
//!   socket addressing several Services at once has all its pending virtual tuples granted
//!   by the first allowed backend (replies only: each backend still judges what reaches it).
//!   A grant is propagated only by a hook that itself decided the client's egress, i.e. for
//!   a tuple the client's own hook did not see (DNATed after it, or no program on the
//!   client's veth);
//! - conntrack hits at pod hooks are judged on the entry alone (after the binding check
//!   of the pod's own address, served from `EP_CACHE`) while its epoch is
//!   `Config::policy_epoch`: a policy write moves the epoch, and each entry is judged again
//!   on its next packet (a reply by the tail-called `rejudge`); with `--established keep`
//!   the epoch never moves and changes apply to new connections only. A Service backend on
//!   the node itself (judged in netfilter) pushes to a cut client until the client speaks;
//! - uplinks see outer headers only: encapsulated pod traffic (VXLAN, Geneve, IPIP) passes
//!   there as "no endpoint" and is judged at the pod's own hooks after decapsulation;
//!   a malformed IP packet on an uplink is passed, not counted against an endpoint.
#![no_std]
// Inline asm for the conntrack slots' atomics: the BPF target has no compare-and-swap.
#![feature(asm_experimental_arch)]
#![no_main]

mod clock;
mod ct_table;
mod maps;
mod parse;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use parse::ETH_HLEN;
use verdict::Hook;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict::run::<ETH_HLEN>(&ctx, Hook::FromPod)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict::run::<ETH_HLEN>(&ctx, Hook::ToPod)
}

#[classifier]
pub fn from_world(ctx: TcContext) -> i32 {
    verdict::run::<ETH_HLEN>(&ctx, Hook::FromWorld)
}

#[classifier]
pub fn to_world(ctx: TcContext) -> i32 {
    verdict::run::<ETH_HLEN>(&ctx, Hook::ToWorld)
}

/// `from_world` on an L3 uplink (tun, WireGuard, IPIP, GRE: no link header; the skb's
/// protocol says IPv4 or IPv6).
#[classifier]
pub fn from_world_l3(ctx: TcContext) -> i32 {
    verdict::run::<0>(&ctx, Hook::FromWorld)
}

/// `to_world` on an L3 uplink.
#[classifier]
pub fn to_world_l3(ctx: TcContext) -> i32 {
    verdict::run::<0>(&ctx, Hook::ToWorld)
}

/// The Service grant, tail-called through `GRANTS` (see `verdict::grant`). Never attached.
#[classifier]
pub fn grant(ctx: TcContext) -> i32 {
    verdict::grant::<ETH_HLEN>(&ctx)
}

/// [`grant`] for hooks without a link header.
#[classifier]
pub fn grant_l3(ctx: TcContext) -> i32 {
    verdict::grant::<0>(&ctx)
}

/// The re-judgement of a reply on a stale conntrack entry, tail-called through `REJUDGES`
/// (see `verdict::rejudge`). Never attached.
#[classifier]
pub fn rejudge(ctx: TcContext) -> i32 {
    verdict::rejudge::<ETH_HLEN>(&ctx)
}

/// [`rejudge`] for hooks without a link header.
#[classifier]
pub fn rejudge_l3(ctx: TcContext) -> i32 {
    verdict::rejudge::<0>(&ctx)
}

/// Run by an iptables rule (`-m bpf`, in INPUT and FORWARD, for DNATed connections) on
/// translated Service traffic: nonzero drops. Its packet starts at the IP header; socket
/// filters read it through `bpf_skb_load_bytes` only.
#[socket_filter]
pub fn service_judge(ctx: SkBuffContext) -> i64 {
    verdict::judge_translated(&TcContext::new(ctx.skb.skb)) as i64
}

/// Baseline for the datapath benchmark: the cost of running any TC program at all.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Clock calibration (agent, test-run only): writes a `ClockSample` over the start of the
/// packet. Never attached.
#[classifier]
pub fn clock_probe(ctx: TcContext) -> i32 {
    use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
    let size = core::mem::size_of::<policy_common::ClockSample>();
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + size > end {
        return TC_ACT_SHOT;
    }
    let p = data as *mut policy_common::ClockSample;
    // SAFETY: bounds checked above; a test run's packet is private and writable. The
    // helpers take no arguments.
    unsafe {
        (*p).coarse_ns = bpf_ktime_get_coarse_ns();
        (*p).jiffies = bpf_jiffies64();
        (*p).coarse_ns_after = bpf_ktime_get_coarse_ns();
    }
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
