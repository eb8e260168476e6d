//! Header parsing. Every read goes through `bpf_skb_load_bytes` (`TcContext::load`), which
//! fails instead of reading past the packet and also works on non-linear skbs (GRO/GSO
//! packets whose headers are not all in the linear area); variable offsets (IPv4 options,
//! IPv6 extension headers) then need no pointer arithmetic the verifier must follow.

use aya_ebpf::programs::TcContext;
use policy_common::{Addr, proto};

/// Length of an Ethernet header: the link header of every pod veth and Ethernet uplink.
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// VLAN tags left in the packet data (the kernel moves the outer tag of a received frame
/// to metadata; one still in the data is a second, smuggled tag).
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// IPv6 extension headers walked before the upper-layer header.
const NH_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AH: u8 = 51;
const NH_DSTOPTS: u8 = 60;
/// Extension headers walked at most; a packet with more is malformed.
const MAX_EXT_HEADERS: usize = 6;

/// What kind of packet, beyond its 5-tuple.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// A fragment other than the first: no L4 header.
    NonFirstFragment,
    /// An ICMP/ICMPv6 error; `inner_*` hold the quoted packet's tuple.
    IcmpError,
    /// IPv6 link control: neighbour discovery (ICMPv6 133-137 with hop limit 255) and
    /// multicast listener discovery (130-132, 143 with hop limit 1).
    NeighbourDiscovery,
}

/// A parsed packet. Ports in host order; ICMP echo carries its identifier as both ports.
/// Lives in a per-CPU scratch map, not on the 512-byte BPF stack.
#[repr(C)]
pub struct Pkt {
    /// The datapath clock when the packet arrived (`clock::now`), set once after parsing:
    /// read from here, it is defined on every path.
    pub now: u64,
    /// `Config::policy_epoch` when the packet arrived, set with `now` (`clock::stamp`): the
    /// epoch its conntrack entry must carry to settle it, and stamps when judged.
    pub epoch: u32,
    pub src: Addr,
    pub dst: Addr,
    pub inner_src: Addr,
    pub inner_dst: Addr,
    /// Fragment identification (IPv4: 16 bits).
    pub frag_id: u32,
    /// TCP sequence number (0 for other protocols): ties a SYN seen before DNAT to the same
    /// SYN after it.
    pub tcp_seq: u32,
    pub sport: u16,
    pub dport: u16,
    pub inner_sport: u16,
    pub inner_dport: u16,
    /// The destination port a port rule judges (0 for protocols without ports).
    pub policy_port: u16,
    pub proto: u8,
    pub inner_proto: u8,
    /// Protocol of the fragmented datagram (IPv4 protocol, IPv6 fragment header's next header).
    pub frag_proto: u8,
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type (when `proto` is the family's ICMP).
    pub icmp_type: u8,
    pub kind: Kind,
    /// More fragments follow and this is the first (offset 0).
    pub first_fragment: bool,
    /// Truncated or malformed past the addresses.
    pub malformed: bool,
}

/// Why there is no [`Pkt`].
pub enum NoPkt {
    /// ARP: a pod needs it to reach its gateway at all.
    Arp,
    /// Neither IP nor ARP (MPLS, PPPoE, ...).
    NotIp,
    /// IP, but the addresses cannot be read or are inconsistent.
    BadL3,
}

#[inline(always)]
fn ld<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| ())
}

#[inline(always)]
fn be16(a: u8, b: u8) -> u16 {
    u16::from_be_bytes([a, b])
}

/// Parses the packet into `p` (every field is written).
#[inline(always)]
pub fn parse<const L2: usize>(ctx: &TcContext, p: &mut Pkt) -> Result<(), NoPkt> {
    if parse_fast::<L2>(ctx, p) {
        return Ok(());
    }
    parse_loaded::<L2>(ctx, p)
}

/// [`parse`] without the direct-access fast path, every read through
/// `bpf_skb_load_bytes`: for programs that may not read packet data directly (the socket
/// filter judging translated Service traffic in netfilter).
#[inline(always)]
pub fn parse_loaded<const L2: usize>(ctx: &TcContext, p: &mut Pkt) -> Result<(), NoPkt> {
    match ethertype::<L2>(ctx)? {
        ETH_P_IP => parse_v4::<L2>(ctx, p),
        ETH_P_IPV6 => parse_v6::<L2>(ctx, p),
        // Not judged, so not passed: IP inside could reach a pod that decodes the tag.
        ETH_P_8021Q | ETH_P_8021AD => Err(NoPkt::BadL3),
        ETH_P_ARP => Err(NoPkt::Arp),
        _ => Err(NoPkt::NotIp),
    }
}

/// The packet's ethertype: from the Ethernet header, or on an L3 device (no link header:
/// tun, WireGuard, IPIP) from the protocol the device gave the skb. Only the ethertype: the
/// MACs play no part in the decision.
#[inline(always)]
fn ethertype<const L2: usize>(ctx: &TcContext) -> Result<u16, NoPkt> {
    if L2 == 0 {
        return Ok(u16::from_be(ctx.skb.protocol() as u16));
    }
    let et: [u8; 2] = ld(ctx, 12).map_err(|_| NoPkt::BadL3)?;
    Ok(be16(et[0], et[1]))
}

/// Sets the fields every path reads. Volatile stores: merged, they become a `memset` call,
/// a byte loop in BPF. The `inner_*` fields are written (and read) only for ICMP errors.
#[inline(always)]
fn reset(p: &mut Pkt, proto_nr: u8) {
    // SAFETY: plain stores into fields of a valid &mut.
    unsafe {
        use core::ptr::write_volatile as w;
        w(&mut p.frag_id, 0);
        w(&mut p.sport, 0);
        w(&mut p.dport, 0);
        w(&mut p.policy_port, 0);
        w(&mut p.proto, proto_nr);
        w(&mut p.frag_proto, proto_nr);
        w(&mut p.tcp_flags, 0);
        w(&mut p.tcp_seq, 0);
        w(&mut p.icmp_type, 0);
        w(&mut p.kind, Kind::Normal);
        w(&mut p.first_fragment, false);
        w(&mut p.malformed, false);
    }
}

#[inline(always)]
fn parse_v4<const L2: usize>(ctx: &TcContext, p: &mut Pkt) -> Result<(), NoPkt> {
    let h: [u8; 20] = ld(ctx, L2).map_err(|_| NoPkt::BadL3)?;
    if h[0] >> 4 != 4 {
        return Err(NoPkt::BadL3);
    }
    p.src = Addr::from_v4_octets([h[12], h[13], h[14], h[15]]);
    p.dst = Addr::from_v4_octets([h[16], h[17], h[18], h[19]]);
    reset(p, h[9]);
    let hlen = ((h[0] & 0x0f) as usize) * 4;
    let tot_len = be16(h[2], h[3]) as usize;
    let pkt_len = ctx.len() as usize;
    // tot_len 0 is legal for BIG TCP GSO packets; the skb length bounds them instead.
    if hlen < 20
        || (tot_len != 0 && (tot_len < hlen || L2 + tot_len > pkt_len))
        || L2 + hlen > pkt_len
    {
        p.malformed = true;
        return Ok(());
    }
    let frag = be16(h[6], h[7]);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    p.frag_id = be16(h[4], h[5]) as u32;
    if offset != 0 {
        p.kind = Kind::NonFirstFragment;
        return Ok(());
    }
    p.first_fragment = more;
    parse_l4(ctx, p, L2 + hlen, false);
    Ok(())
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    nh == NH_HOP || nh == NH_ROUTING || nh == NH_FRAGMENT || nh == NH_AH || nh == NH_DSTOPTS
}

#[inline(always)]
fn parse_v6<const L2: usize>(ctx: &TcContext, p: &mut Pkt) -> Result<(), NoPkt> {
    let h: [u8; 8] = ld(ctx, L2).map_err(|_| NoPkt::BadL3)?;
    if h[0] >> 4 != 6 {
        return Err(NoPkt::BadL3);
    }
    // Addresses straight into place: both words arrays, in network order.
    p.src = Addr(ld::<[u32; 4]>(ctx, L2 + 8).map_err(|_| NoPkt::BadL3)?);
    p.dst = Addr(ld::<[u32; 4]>(ctx, L2 + 24).map_err(|_| NoPkt::BadL3)?);
    // An IPv6 packet claiming IPv4-mapped addresses would alias an IPv4 endpoint's key.
    if p.src.is_v4() || p.dst.is_v4() {
        return Err(NoPkt::BadL3);
    }
    reset(p, h[6]);
    let payload = be16(h[4], h[5]) as usize;
    let pkt_len = ctx.len() as usize;
    if payload != 0 && L2 + 40 + payload > pkt_len {
        p.malformed = true;
        return Ok(());
    }
    let hop_limit = h[7];
    let mut nh = h[6];
    let mut off = L2 + 40;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        if !is_ext_header(nh) {
            break;
        }
        if nh == NH_FRAGMENT {
            let Ok(f) = ld::<[u8; 8]>(ctx, off) else {
                p.malformed = true;
                return Ok(());
            };
            let fo = be16(f[2], f[3]);
            p.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
            p.frag_proto = f[0];
            if fo >> 3 != 0 {
                p.proto = f[0];
                p.kind = Kind::NonFirstFragment;
                return Ok(());
            }
            p.first_fragment = fo & 1 != 0;
            nh = f[0];
            off += 8;
        } else {
            let Ok(e) = ld::<[u8; 2]>(ctx, off) else {
                p.malformed = true;
                return Ok(());
            };
            // AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
            off += if nh == NH_AH {
                (e[1] as usize + 2) * 4
            } else {
                (e[1] as usize + 1) * 8
            };
            nh = e[0];
        }
        i += 1;
    }
    if is_ext_header(nh) {
        // More extension headers than we walk: undecidable, treated as malformed.
        p.malformed = true;
        return Ok(());
    }
    p.proto = nh;
    if p.kind == Kind::Normal {
        parse_l4(ctx, p, off, true);
        if p.proto == proto::ICMPV6 && is_link_control(p.icmp_type, hop_limit) && !p.malformed {
            p.kind = Kind::NeighbourDiscovery;
        }
    }
    Ok(())
}

/// ICMPv6 that never leaves the link: neighbour discovery (hop limit 255, RFC 4861) and
/// multicast listener discovery (hop limit 1, RFC 2710/3810).
#[inline(always)]
fn is_link_control(icmp_type: u8, hop_limit: u8) -> bool {
    ((133..=137).contains(&icmp_type) && hop_limit == 255)
        || (((130..=132).contains(&icmp_type) || icmp_type == 143) && hop_limit == 1)
}

/// ICMP types: echo request/reply, and the errors that quote a packet.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

#[inline(always)]
fn is_echo(icmp_type: u8, v6: bool) -> bool {
    if v6 {
        icmp_type == ICMPV6_ECHO || icmp_type == ICMPV6_ECHO_REPLY
    } else {
        icmp_type == ICMP_ECHO || icmp_type == ICMP_ECHO_REPLY
    }
}

#[inline(always)]
fn is_error(icmp_type: u8, v6: bool) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        (1..=4).contains(&icmp_type)
    } else {
        // Destination unreachable, source quench, time exceeded, parameter problem.
        icmp_type == 3 || icmp_type == 4 || icmp_type == 11 || icmp_type == 12
    }
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Pkt, off: usize, v6: bool) {
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    if p.proto == proto::TCP {
        let Ok(t) = ld::<[u8; 20]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        if t[12] >> 4 < 5 {
            p.malformed = true;
            return;
        }
        p.sport = be16(t[0], t[1]);
        p.dport = be16(t[2], t[3]);
        p.policy_port = p.dport;
        p.tcp_flags = t[13];
        p.tcp_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    } else if p.proto == proto::UDP {
        let Ok(u) = ld::<[u8; 8]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        p.sport = be16(u[0], u[1]);
        p.dport = be16(u[2], u[3]);
        p.policy_port = p.dport;
    } else if p.proto == proto::SCTP {
        // The common header: ports, verification tag, checksum.
        let Ok(s) = ld::<[u8; 12]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        p.sport = be16(s[0], s[1]);
        p.dport = be16(s[2], s[3]);
        p.policy_port = p.dport;
    } else if p.proto == icmp {
        let Ok(c) = ld::<[u8; 8]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        p.icmp_type = c[0];
        if is_echo(c[0], v6) {
            let id = be16(c[4], c[5]);
            p.sport = id;
            p.dport = id;
        } else if is_error(c[0], v6) {
            p.kind = Kind::IcmpError;
            parse_inner(ctx, p, off + 8, v6);
        }
    }
}

/// The packet an ICMP error quotes: its addresses and the first bytes of its L4 header.
#[inline(always)]
fn parse_inner(ctx: &TcContext, p: &mut Pkt, off: usize, v6: bool) {
    p.inner_sport = 0;
    p.inner_dport = 0;
    let l4_off;
    if v6 {
        let Ok(h) = ld::<[u8; 8]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        if h[0] >> 4 != 6 || is_ext_header(h[6]) {
            // Quoted extension headers are not walked: the error stays unrelated.
            p.malformed = true;
            return;
        }
        let (Ok(s), Ok(d)) = (ld::<[u32; 4]>(ctx, off + 8), ld::<[u32; 4]>(ctx, off + 24)) else {
            p.malformed = true;
            return;
        };
        p.inner_src = Addr(s);
        p.inner_dst = Addr(d);
        p.inner_proto = h[6];
        l4_off = off + 40;
    } else {
        let Ok(h) = ld::<[u8; 20]>(ctx, off) else {
            p.malformed = true;
            return;
        };
        let ihl = (h[0] & 0x0f) as usize;
        if h[0] >> 4 != 4 || ihl < 5 || be16(h[6], h[7]) & 0x1fff != 0 {
            p.malformed = true;
            return;
        }
        p.inner_src = Addr::from_v4_octets([h[12], h[13], h[14], h[15]]);
        p.inner_dst = Addr::from_v4_octets([h[16], h[17], h[18], h[19]]);
        p.inner_proto = h[9];
        l4_off = off + ihl * 4;
    }
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    if p.inner_proto == proto::TCP || p.inner_proto == proto::UDP || p.inner_proto == proto::SCTP {
        let Ok(l) = ld::<[u8; 4]>(ctx, l4_off) else {
            p.malformed = true;
            return;
        };
        p.inner_sport = be16(l[0], l[1]);
        p.inner_dport = be16(l[2], l[3]);
    } else if p.inner_proto == icmp {
        let Ok(l) = ld::<[u8; 8]>(ctx, l4_off) else {
            p.malformed = true;
            return;
        };
        if is_echo(l[0], v6) {
            let id = be16(l[4], l[5]);
            p.inner_sport = id;
            p.inner_dport = id;
        }
    }
}

// ---- fast path: direct packet access for the common layouts ----

/// Reads a `T` at `off` of the linear packet data; the caller has bounds-checked it.
#[inline(always)]
unsafe fn at<T: Copy>(data: usize, off: usize) -> T {
    // SAFETY: the caller checked `data + off + size_of::<T>() <= data_end`.
    unsafe { core::ptr::read_unaligned((data + off) as *const T) }
}

/// Word by word: a 16-byte unaligned read becomes a `memcpy` call (a byte loop in BPF).
#[inline(always)]
unsafe fn addr_at(data: usize, off: usize) -> Addr {
    // SAFETY: the caller checked 16 bytes at `off`.
    unsafe {
        Addr([
            at(data, off),
            at(data, off + 4),
            at(data, off + 8),
            at(data, off + 12),
        ])
    }
}

/// Parses IPv4 without options or IPv6 without extension headers, not fragmented, with a
/// complete TCP/UDP/SCTP/ICMP header in the linear data, by direct packet access (no helper
/// calls). Anything else (or anything odd) returns false and takes the generic path, which
/// decides the same way.
#[inline(always)]
fn parse_fast<const L2: usize>(ctx: &TcContext, p: &mut Pkt) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + L2 + 20 > end {
        return false;
    }
    // SAFETY (all reads below): each is preceded by a bounds check against `end`, which the
    // verifier also enforces.
    let et = if L2 == 0 {
        u16::from_be(ctx.skb.protocol() as u16)
    } else {
        u16::from_be(unsafe { at::<u16>(data, 12) })
    };
    let pkt_len = ctx.len() as usize;
    let l4: usize;
    let v6;
    if et == ETH_P_IP {
        let vihl: u8 = unsafe { at(data, L2) };
        let tot_len = u16::from_be(unsafe { at::<u16>(data, L2 + 2) }) as usize;
        let frag = u16::from_be(unsafe { at::<u16>(data, L2 + 6) });
        if vihl != 0x45 || frag & 0x3fff != 0 || tot_len < 20 || L2 + tot_len > pkt_len {
            return false;
        }
        p.src = Addr::from_v4_raw(unsafe { at(data, L2 + 12) });
        p.dst = Addr::from_v4_raw(unsafe { at(data, L2 + 16) });
        reset(p, unsafe { at(data, L2 + 9) });
        l4 = L2 + 20;
        v6 = false;
    } else if et == ETH_P_IPV6 {
        if data + L2 + 40 > end {
            return false;
        }
        let ver: u8 = unsafe { at(data, L2) };
        let payload = u16::from_be(unsafe { at::<u16>(data, L2 + 4) }) as usize;
        let nh: u8 = unsafe { at(data, L2 + 6) };
        if ver >> 4 != 6 || is_ext_header(nh) || payload == 0 || L2 + 40 + payload > pkt_len {
            return false;
        }
        p.src = unsafe { addr_at(data, L2 + 8) };
        p.dst = unsafe { addr_at(data, L2 + 24) };
        if p.src.is_v4() || p.dst.is_v4() {
            return false;
        }
        reset(p, nh);
        l4 = L2 + 40;
        v6 = true;
    } else {
        return false;
    }
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    if p.proto == proto::TCP {
        if data + l4 + 20 > end {
            return false;
        }
        let doff: u8 = unsafe { at(data, l4 + 12) };
        if doff >> 4 < 5 {
            return false;
        }
        p.sport = u16::from_be(unsafe { at(data, l4) });
        p.dport = u16::from_be(unsafe { at(data, l4 + 2) });
        p.policy_port = p.dport;
        p.tcp_flags = unsafe { at(data, l4 + 13) };
        p.tcp_seq = u32::from_be(unsafe { at(data, l4 + 4) });
    } else if p.proto == proto::UDP || p.proto == proto::SCTP {
        // 8 bytes of UDP header; SCTP's common header is 12.
        let need = if p.proto == proto::UDP { 8 } else { 12 };
        if data + l4 + need > end {
            return false;
        }
        p.sport = u16::from_be(unsafe { at(data, l4) });
        p.dport = u16::from_be(unsafe { at(data, l4 + 2) });
        p.policy_port = p.dport;
    } else if p.proto == icmp {
        if data + l4 + 8 > end {
            return false;
        }
        let ty: u8 = unsafe { at(data, l4) };
        if is_error(ty, v6) {
            return false;
        }
        p.icmp_type = ty;
        if is_echo(ty, v6) {
            let id = u16::from_be(unsafe { at(data, l4 + 4) });
            p.sport = id;
            p.dport = id;
        } else if v6 {
            let hop_limit: u8 = unsafe { at(data, L2 + 7) };
            if is_link_control(ty, hop_limit) {
                p.kind = Kind::NeighbourDiscovery;
            }
        }
    }
    true
}
