//! A dump of the kernel's connection table over `NETLINK_NETFILTER` (ctnetlink), for
//! seeding: works where `/proc/net/nf_conntrack` is not built in, and acts on the calling
//! thread's network namespace.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use policy_common::proto;

use super::ctseed::KernelConn;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_SCTP: u16 = 3;
/// `CTA_PROTOINFO_TCP_STATE` and `CTA_PROTOINFO_SCTP_STATE`.
const CTA_PROTOINFO_STATE: u16 = 1;
/// `TCP_CONNTRACK_ESTABLISHED` and `SCTP_CONNTRACK_ESTABLISHED`.
const STATE_ESTABLISHED: u8 = 3;
/// `IPS_SEEN_REPLY`.
const IPS_SEEN_REPLY: u32 = 1 << 1;

/// Dumps every established TCP, UDP and SCTP connection.
pub fn dump() -> io::Result<Vec<KernelConn>> {
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid option value of its size. Bounded: a dump never blocks for long.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // nlmsghdr (16) + nfgenmsg (family AF_UNSPEC: every family, version 0, res_id 0).
    let mut req = [0u8; 20];
    req[0..4].copy_from_slice(&20u32.to_ne_bytes());
    req[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: a valid buffer of its length; a netlink socket sends to the kernel by default.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_messages(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// Parses one datagram of netlink messages; `true` once the dump is done.
pub fn parse_messages(mut b: &[u8], out: &mut Vec<KernelConn>) -> io::Result<bool> {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return Err(io::Error::other("truncated netlink message"));
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ if len >= 20 => {
                if let Some(c) = parse_conn(&b[20..len]) {
                    out.push(c);
                }
            }
            _ => {}
        }
        b = &b[align(len).min(b.len())..];
    }
    Ok(false)
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// (type, payload) of each attribute.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[align(len).min(b.len())..];
        Some((ty, payload))
    })
}

fn attr(b: &[u8], want: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == want).map(|(_, p)| p)
}

/// (proto, src, dst, sport, dport) of a `CTA_TUPLE_*`.
fn tuple(b: &[u8]) -> Option<(u8, IpAddr, IpAddr, u16, u16)> {
    let ip = attr(b, CTA_TUPLE_IP)?;
    let (src, dst) = if let (Some(s), Some(d)) = (attr(ip, CTA_IP_V4_SRC), attr(ip, CTA_IP_V4_DST))
    {
        let v4 = |x: &[u8]| -> Option<IpAddr> {
            Some(Ipv4Addr::from(<[u8; 4]>::try_from(x).ok()?).into())
        };
        (v4(s)?, v4(d)?)
    } else {
        let v6 = |x: &[u8]| -> Option<IpAddr> {
            Some(Ipv6Addr::from(<[u8; 16]>::try_from(x).ok()?).into())
        };
        (v6(attr(ip, CTA_IP_V6_SRC)?)?, v6(attr(ip, CTA_IP_V6_DST)?)?)
    };
    let p = attr(b, CTA_TUPLE_PROTO)?;
    let num = *attr(p, CTA_PROTO_NUM)?.first()?;
    let port = |t| -> Option<u16> { Some(u16::from_be_bytes(attr(p, t)?.try_into().ok()?)) };
    Some((
        num,
        src,
        dst,
        port(CTA_PROTO_SRC_PORT)?,
        port(CTA_PROTO_DST_PORT)?,
    ))
}

fn parse_conn(b: &[u8]) -> Option<KernelConn> {
    let (proto_nr, src, dst, sport, dport) = tuple(attr(b, CTA_TUPLE_ORIG)?)?;
    if !matches!(proto_nr, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    let status = u32::from_be_bytes(attr(b, CTA_STATUS)?.try_into().ok()?);
    if status & IPS_SEEN_REPLY == 0 {
        return None;
    }
    if proto_nr != proto::UDP {
        let which = if proto_nr == proto::TCP {
            CTA_PROTOINFO_TCP
        } else {
            CTA_PROTOINFO_SCTP
        };
        let state = *attr(attr(attr(b, CTA_PROTOINFO)?, which)?, CTA_PROTOINFO_STATE)?.first()?;
        if state != STATE_ESTABLISHED {
            return None;
        }
    }
    let reply = attr(b, CTA_TUPLE_REPLY)
        .and_then(tuple)
        .map(|(_, rs, rd, rsp, rdp)| (rs, rd, rsp, rdp));
    Some(KernelConn::from_tuples(
        proto_nr,
        (src, dst, sport, dport),
        reply,
    ))
}
