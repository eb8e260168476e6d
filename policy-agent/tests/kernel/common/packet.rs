//! Builds Ethernet frames for BPF_PROG_TEST_RUN: IPv4 (options, fragments), IPv6 (extension
//! headers), TCP, UDP, SCTP, ICMP, ICMPv6. Checksums are left zero: the datapath does not
//! verify them.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// An upper-layer header (and payload) as bytes, with its protocol number.
#[derive(Clone, Debug)]
pub struct L4 {
    pub proto: u8,
    pub bytes: Vec<u8>,
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> L4 {
    tcp_seq(sport, dport, flags, 1)
}

/// TCP with a given sequence number.
pub fn tcp_seq(sport: u16, dport: u16, flags: u8, seq: u32) -> L4 {
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[4..8].copy_from_slice(&seq.to_be_bytes());
    b[12] = 5 << 4;
    b[13] = flags;
    b[14..16].copy_from_slice(&65535u16.to_be_bytes());
    L4 {
        proto: TCP,
        bytes: b,
    }
}

pub fn udp(sport: u16, dport: u16) -> L4 {
    let payload = b"ping";
    let mut b = vec![0u8; 8];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    b.extend_from_slice(payload);
    L4 {
        proto: UDP,
        bytes: b,
    }
}

/// SCTP common header plus an INIT chunk.
pub fn sctp(sport: u16, dport: u16) -> L4 {
    let mut b = vec![0u8; 12];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    // INIT chunk: type 1, flags 0, length 20, init tag, a_rwnd, streams, initial TSN.
    let mut chunk = vec![1u8, 0, 0, 20];
    chunk.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    chunk.extend_from_slice(&65535u32.to_be_bytes());
    chunk.extend_from_slice(&[0, 1, 0, 1]);
    chunk.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&chunk);
    L4 {
        proto: SCTP,
        bytes: b,
    }
}

/// ICMP (`v6`: ICMPv6) with type, code and the 4 bytes after the checksum.
pub fn icmp_raw(v6: bool, ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> L4 {
    let mut b = vec![ty, code, 0, 0];
    b.extend_from_slice(&rest);
    b.extend_from_slice(payload);
    L4 {
        proto: if v6 { ICMPV6 } else { ICMP },
        bytes: b,
    }
}

pub fn echo_request(v6: bool, id: u16) -> L4 {
    let [a, b] = id.to_be_bytes();
    icmp_raw(v6, if v6 { 128 } else { 8 }, 0, [a, b, 0, 1], b"abcdefgh")
}

pub fn echo_reply(v6: bool, id: u16) -> L4 {
    let [a, b] = id.to_be_bytes();
    icmp_raw(v6, if v6 { 129 } else { 0 }, 0, [a, b, 0, 1], b"abcdefgh")
}

/// An ICMP error quoting `quoted` (an IP packet without Ethernet header).
pub fn icmp_error(v6: bool, ty: u8, code: u8, quoted: &[u8]) -> L4 {
    icmp_raw(v6, ty, code, [0; 4], quoted)
}

/// IPv4 header knobs.
#[derive(Clone, Debug)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Option bytes (padded to 4 with End-of-options).
    pub options: Vec<u8>,
    pub id: u16,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// Forces the IHL field (malformed headers).
    pub ihl: Option<u8>,
    /// Forces the total length field.
    pub tot_len: Option<u16>,
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        V4 {
            src,
            dst,
            options: vec![],
            id: 0x4242,
            frag_offset: 0,
            more_fragments: false,
            ihl: None,
            tot_len: None,
        }
    }

    /// The IP packet (no Ethernet header).
    pub fn packet(&self, l4: &L4) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let hlen = 20 + opts.len();
        let total = hlen + l4.bytes.len();
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | self.ihl.unwrap_or((hlen / 4) as u8);
        h[2..4].copy_from_slice(&self.tot_len.unwrap_or(total as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        let frag = (self.frag_offset & 0x1fff) | if self.more_fragments { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = l4.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        h.extend_from_slice(&opts);
        h.extend_from_slice(&l4.bytes);
        h
    }

    pub fn frame(&self, l4: &L4) -> Vec<u8> {
        eth(0x0800, &self.packet(l4))
    }
}

/// IPv6 extension headers.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing,
    Ah,
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::Ah => 51,
            Ext::DestOpts => 60,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            // 8 bytes: next, len 0, PadN option of 4 bytes.
            Ext::HopByHop | Ext::DestOpts => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // Type 0 routing header, segments left 0, no addresses: 8 bytes.
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            // AH: length in 4-byte units minus 2; 12 fixed bytes + 4 ICV = 16 bytes -> len 2.
            Ext::Ah => {
                let mut b = vec![next, 2, 0, 0];
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&[0; 4]);
                b
            }
            Ext::Fragment { offset, more, id } => {
                let fo = (offset << 3) | u16::from(*more);
                let mut b = vec![next, 0];
                b.extend_from_slice(&fo.to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct V6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub ext: Vec<Ext>,
    pub hop_limit: u8,
}

impl V6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        V6 {
            src,
            dst,
            ext: vec![],
            hop_limit: 64,
        }
    }

    pub fn packet(&self, l4: &L4) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map(Ext::number).unwrap_or(l4.proto);
            chain.extend_from_slice(&e.bytes(next));
        }
        let first = self.ext.first().map(Ext::number).unwrap_or(l4.proto);
        let payload_len = chain.len() + l4.bytes.len();
        let mut h = vec![0u8; 8];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        h[6] = first;
        h[7] = self.hop_limit;
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&chain);
        h.extend_from_slice(&l4.bytes);
        h
    }

    pub fn frame(&self, l4: &L4) -> Vec<u8> {
        eth(0x86DD, &self.packet(l4))
    }
}

/// An Ethernet frame around `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 198, 18, 0, 10]);
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 20]);
    eth(0x0806, &p)
}

/// Cuts a frame to `len` bytes (keeping header length fields as they were).
pub fn truncate(mut f: Vec<u8>, len: usize) -> Vec<u8> {
    f.truncate(len);
    f
}

/// Cuts a frame to `len` bytes and rewrites the IP length field to match, so the cut shows
/// as a short upper-layer header rather than a length mismatch.
pub fn truncate_consistent(mut f: Vec<u8>, len: usize) -> Vec<u8> {
    f.truncate(len);
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f.len() >= 18 => {
            let l = (len - 14) as u16;
            f[16..18].copy_from_slice(&l.to_be_bytes());
        }
        0x86DD if f.len() >= 20 => {
            let l = len.saturating_sub(54) as u16;
            f[18..20].copy_from_slice(&l.to_be_bytes());
        }
        _ => {}
    }
    f
}
