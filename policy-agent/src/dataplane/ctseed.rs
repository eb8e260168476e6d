//! Seeding `CONNTRACK` from the kernel's connection table when the agent first starts, so
//! connections that were up before any enforcement are not cut when a policy isolates one
//! of their ends (their next packet in either direction finds an entry).
//!
//! Only established connections are seeded (TCP in ESTABLISHED, others once a reply was
//! seen): a connection attempt still unanswered is judged by the policy like a new one. A
//! restarted agent never seeds: its own table survived in the pinned map, and the kernel's
//! table also holds attempts the policy refused (the node's netfilter sees a SYN before the
//! receiving pod's hook drops it).

use std::net::IpAddr;
use std::path::Path;

use policy_common::{CtKey, CtValue, ct, ct_flags, proto};

use super::{DataplaneError, DataplaneMaps};
use crate::compiler::addr_of;

/// The kernel's table as text (the process's network namespace): the fallback when the
/// netlink dump is refused.
pub const PROC_CONNTRACK: &str = "/proc/net/nf_conntrack";

/// One connection of the kernel's table, in its original direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConn {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// The same connection as the receiver sees it after NAT (reply tuple reversed), when
    /// it differs (a Service's DNAT): both are seeded, the sender's hook sees the first and
    /// the receiver's the second.
    pub translated: Option<Tuple>,
}

/// A connection's addresses and ports, source first.
pub type Tuple = (IpAddr, IpAddr, u16, u16);

impl KernelConn {
    /// The connection of a table entry from its original tuple and its reply tuple (as the
    /// kernel stores it: from the responder back), which is reversed into `translated`
    /// when NAT made it differ.
    pub fn from_tuples(proto: u8, original: Tuple, reply: Option<Tuple>) -> Self {
        let (src, dst, sport, dport) = original;
        KernelConn {
            proto,
            src,
            dst,
            sport,
            dport,
            translated: reply
                .map(|(rs, rd, rsp, rdp)| (rd, rs, rdp, rsp))
                .filter(|t| *t != original),
        }
    }
}

/// The entry a connection of the kernel's table is seeded with: both ends' grants (it was
/// allowed, there being no policy when it started), reply seen, and [`ct_flags::SEEDED`].
pub fn seed_entry(
    proto_nr: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    now_ns: u64,
) -> (CtKey, CtValue) {
    let (key, src_is_a) = ct::normalize(addr_of(src), addr_of(dst), sport, dport, proto_nr);
    let mut flags =
        ct_flags::SEEDED | ct_flags::EGRESS_OK | ct_flags::INGRESS_OK | ct_flags::SEEN_REPLY;
    if src_is_a {
        flags |= ct_flags::ORIG_IS_A;
    }
    (
        key,
        CtValue {
            last_seen_ns: now_ns,
            flags,
            owner: 0,
        },
    )
}

/// Parses `/proc/net/nf_conntrack` text: established TCP, UDP and SCTP connections.
pub fn parse_proc(text: &str) -> Vec<KernelConn> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<KernelConn> {
    let tok: Vec<&str> = line.split_whitespace().collect();
    // "ipv4 2 tcp 6 431999 ESTABLISHED src=.. dst=.. sport=.. dport=.. [flags] src=.. ..."
    let proto_nr: u8 = tok.get(3)?.parse().ok()?;
    if !matches!(proto_nr, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    if tok.contains(&"[UNREPLIED]") {
        return None;
    }
    if proto_nr != proto::UDP && tok.get(5) != Some(&"ESTABLISHED") {
        return None;
    }
    let field = |name: &str, nth: usize| -> Option<&str> {
        tok.iter().filter_map(|t| t.strip_prefix(name)).nth(nth)
    };
    let tuple = |nth: usize| -> Option<Tuple> {
        Some((
            field("src=", nth)?.parse().ok()?,
            field("dst=", nth)?.parse().ok()?,
            field("sport=", nth)?.parse().ok()?,
            field("dport=", nth)?.parse().ok()?,
        ))
    };
    Some(KernelConn::from_tuples(proto_nr, tuple(0)?, tuple(1)))
}

/// What seeding did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedStats {
    pub connections: usize,
    pub entries: usize,
}

/// Never more than this share of `CONNTRACK` is filled by seeding (least recently seen
/// slots are evicted first: seeds must not push out the connections the programs track).
const MAX_SEED_FRACTION: u32 = 2;

/// The kernel's established connections (calling thread's network namespace): a ctnetlink
/// dump, else `/proc/net/nf_conntrack`.
pub fn kernel_table() -> Result<Vec<KernelConn>, DataplaneError> {
    match super::ctnetlink::dump() {
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::debug!(error = %e, "ctnetlink dump refused, reading {PROC_CONNTRACK}");
            let text =
                std::fs::read_to_string(PROC_CONNTRACK).map_err(|source| DataplaneError::Io {
                    path: PROC_CONNTRACK.into(),
                    source,
                })?;
            Ok(parse_proc(&text))
        }
    }
}

/// Inserts the seeds of `conns`.
pub fn seed(
    maps: &mut DataplaneMaps,
    conns: &[KernelConn],
    now_ns: u64,
) -> Result<SeedStats, DataplaneError> {
    let limit = (policy_common::MAX_CONNTRACK / MAX_SEED_FRACTION) as usize;
    let mut stats = SeedStats::default();
    for c in conns {
        let mut views = vec![(c.src, c.dst, c.sport, c.dport)];
        views.extend(c.translated);
        for (s, d, sp, dp) in views {
            if stats.entries >= limit {
                tracing::warn!(limit, "conntrack seeding stopped at its limit");
                return Ok(stats);
            }
            let (k, v) = seed_entry(c.proto, s, d, sp, dp, now_ns);
            if maps.conntrack_get(&k).is_none() {
                maps.set_conntrack(k, v)?;
                stats.entries += 1;
            }
        }
        stats.connections += 1;
    }
    Ok(stats)
}

/// Copies the entries of the conntrack map pinned at `old` (an earlier agent's, in a
/// migration), and of the `CONNTRACK4` beside it when it had one: this layout's tables, or an
/// earlier agent's LRU hash maps when their key and value layouts are this object's. `Ok(None)` when `CONNTRACK`'s is not (the caller seeds from the
/// kernel's table instead).
pub fn copy_pinned(maps: &mut DataplaneMaps, old: &Path) -> Result<Option<usize>, DataplaneError> {
    use super::ct_table::CtTables;
    use aya::maps::{HashMap, Map, MapData};
    use policy_common::{Config, CtKey4, MAP_CONFIG, MAP_CONNTRACK, MAP_CONNTRACK4};
    let old4 = old.with_file_name(MAP_CONNTRACK4);
    let open = |name: &'static str, path: &Path| -> Result<Map, DataplaneError> {
        let data = MapData::from_pin(path).map_err(|e| DataplaneError::map(name, e))?;
        Map::from_map_data(data).map_err(|e| DataplaneError::map(name, e))
    };
    let old_map = open(MAP_CONNTRACK, old)?;
    if matches!(old_map, Map::Array(_)) && old4.exists() {
        // This layout (set-associative tables), hashed with the old CONFIG's seed.
        let seed = open(MAP_CONFIG, &old.with_file_name(MAP_CONFIG))
            .and_then(|m| {
                aya::maps::Array::<MapData, Config>::try_from(m)
                    .and_then(|c| c.get(&0, 0))
                    .map_err(|e| DataplaneError::map(MAP_CONFIG, e))
            })?
            .ct_seed;
        let Ok(tables) = CtTables::new(old_map, open(MAP_CONNTRACK4, &old4)?, seed) else {
            return Ok(None);
        };
        let entries = tables.entries();
        for (k, v) in &entries {
            maps.set_conntrack(*k, *v)?;
        }
        return Ok(Some(entries.len()));
    }
    // An earlier agent's LRU hash maps. The typed handle checks the key and value sizes.
    let Ok(old_ct) = HashMap::<MapData, CtKey, CtValue>::try_from(old_map) else {
        return Ok(None);
    };
    let mut entries: Vec<(CtKey, CtValue)> = old_ct.iter().filter_map(Result::ok).collect();
    // An agent from before the compact IPv4 map kept every connection in `CONNTRACK`.
    if old4.exists() {
        let map = open(MAP_CONNTRACK4, &old4)?;
        if let Ok(old4) = HashMap::<MapData, CtKey4, CtValue>::try_from(map) {
            entries.extend(
                old4.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| (k.widen(), v)),
            );
        }
    }
    for (k, v) in &entries {
        maps.set_conntrack(*k, *v)?;
    }
    Ok(Some(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=40000 dport=8080 src=198.18.0.1 dst=198.18.0.2 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 118 SYN_SENT src=198.18.0.3 dst=198.18.0.1 sport=40001 dport=8080 [UNREPLIED] src=198.18.0.1 dst=198.18.0.3 sport=8080 dport=40001 mark=0 zone=0 use=2
ipv4     2 tcp      6 100 TIME_WAIT src=198.18.0.3 dst=198.18.0.1 sport=40002 dport=8080 src=198.18.0.1 dst=198.18.0.3 sport=8080 dport=40002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 170 src=198.18.0.2 dst=10.96.0.10 sport=5353 dport=53 src=198.18.0.5 dst=198.18.0.2 sport=53 dport=5353 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 431999 ESTABLISHED src=fd00:0018:0000:0000:0000:0000:0000:0002 dst=fd00:0018:0000:0000:0000:0000:0000:0001 sport=40000 dport=80 src=fd00:0018:0000:0000:0000:0000:0000:0001 dst=fd00:0018:0000:0000:0000:0000:0000:0002 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=198.18.0.2 dst=198.18.0.1 type=8 code=0 id=7 src=198.18.0.1 dst=198.18.0.2 type=0 code=0 id=7 mark=0 zone=0 use=2
";

    #[test]
    fn ctseed_parses_established_connections_only() {
        let c = parse_proc(TABLE);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0].src, "198.18.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            (c[0].sport, c[0].dport, c[0].translated),
            (40000, 8080, None)
        );
        // DNAT: the receiver sees the backend address.
        let t = c[1].translated.expect("translated view");
        assert_eq!(
            t,
            (
                "198.18.0.2".parse().expect("ip"),
                "198.18.0.5".parse().expect("ip"),
                5353,
                53
            )
        );
        assert_eq!(c[2].dst, "fd00:18::1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn ctseed_entry_passes_both_directions_at_both_hooks() {
        let (src, dst) = (
            "198.18.0.9".parse().expect("ip"),
            "198.18.0.1".parse().expect("ip"),
        );
        let (k, v) = seed_entry(proto::TCP, src, dst, 40000, 8080, 5);
        assert!(v.flags & ct_flags::SEEDED != 0);
        for (s, d, sp, dp) in [(src, dst, 40000, 8080), (dst, src, 8080, 40000)] {
            let (k2, s_is_a) = ct::normalize(addr_of(s), addr_of(d), sp, dp, proto::TCP);
            assert_eq!(k, k2);
            // The first view is the original direction; whatever a hook needs, both grants
            // are there (at any hook, for either side).
            assert_eq!(ct::is_original(&v, s_is_a), sp == 40000);
            assert!(ct::has_grants(
                &v,
                ct_flags::EGRESS_OK | ct_flags::INGRESS_OK
            ));
            assert!(ct::has_grants(&v, ct::stored_required(&v)));
        }
        assert!(!ct::expired(&v, proto::TCP, 5 + ct::TIMEOUT_TCP_SYN_NS * 2));
    }
}
