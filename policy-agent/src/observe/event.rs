//! One deny event as operators read it: named direction, reason and protocol, addresses as
//! text, the endpoint's addresses and interface. The same object is what the agent sends
//! on its monitor socket and what `monitor --json` prints, one per line.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use policy_common::{Addr, DenyEvent, Direction, Reason, proto};
use serde::{Deserialize, Serialize};

use super::timefmt;

/// A deny event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
    /// The kernel's CLOCK_MONOTONIC stamp (orders events exactly).
    pub timestamp_ns: u64,
    /// Direction of the endpoint's policy that denied: `ingress` or `egress`.
    pub direction: String,
    /// Why: `policy`, `malformed`, `fragment`, `unknown_endpoint`, `unrelated_icmp`.
    pub reason: String,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, or the protocol number.
    pub protocol: String,
    pub src: String,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    /// The endpoint's number on this node (0: no endpoint known).
    pub endpoint_id: u32,
    /// The endpoint's addresses, from `ENDPOINTS` (empty when it is gone).
    pub endpoint: Vec<String>,
    /// Interface whose hook decided.
    pub ifindex: u32,
    pub interface: Option<String>,
}

/// Decodes `DenyEvent` fields and names the endpoint and interface.
pub struct Resolver {
    bpf_dir: std::path::PathBuf,
    endpoints: Option<super::pinned::PinnedMap>,
    by_id: BTreeMap<u32, Vec<String>>,
    ifnames: BTreeMap<u32, Option<String>>,
    refreshed: Option<Instant>,
    /// (monotonic, wall) read together, refreshed now and then (the wall clock may step).
    clocks: (u64, u64),
}

impl Resolver {
    /// Resolves endpoints through the `ENDPOINTS` map pinned in `bpf_dir` (when readable).
    pub fn new(bpf_dir: &std::path::Path) -> Self {
        Resolver {
            bpf_dir: bpf_dir.to_path_buf(),
            endpoints: super::pinned::open_ro(bpf_dir, policy_common::MAP_ENDPOINTS).ok(),
            by_id: BTreeMap::new(),
            ifnames: BTreeMap::new(),
            refreshed: None,
            clocks: (timefmt::monotonic_ns(), timefmt::realtime_ns()),
        }
    }

    pub fn decode(&mut self, e: &DenyEvent) -> MonitorEvent {
        // Unknown ids are looked up at most twice a second (a flood of events from spoofed
        // sources must not turn into map walks); known ones are re-read every few seconds,
        // since a number freed by a deleted pod may be given to another.
        let age = self.refreshed.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a > Duration::from_secs(5));
        let may = age.is_none_or(|a| a > Duration::from_millis(500));
        if stale || (may && !self.by_id.contains_key(&e.endpoint_id)) {
            self.refresh();
        }
        let ifindex = e.ifindex;
        let interface = self
            .ifnames
            .entry(ifindex)
            .or_insert_with(|| crate::dataplane::loader::ifname(ifindex).ok())
            .clone();
        decode(e, &self.clocks, self.by_id.get(&e.endpoint_id), interface)
    }

    fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        self.clocks = (timefmt::monotonic_ns(), timefmt::realtime_ns());
        self.ifnames.clear();
        if self.endpoints.is_none() {
            // The agent pins its maps one by one: EVENTS may have been there before ENDPOINTS.
            self.endpoints =
                super::pinned::open_ro(&self.bpf_dir, policy_common::MAP_ENDPOINTS).ok();
        }
        let Some(m) = &self.endpoints else {
            return;
        };
        let Ok(map) = aya::maps::HashMap::<
            &aya::maps::MapData,
            policy_common::EndpointKey,
            policy_common::EndpointValue,
        >::try_from(&m.map) else {
            return;
        };
        self.by_id.clear();
        for (k, v) in map.iter().filter_map(Result::ok) {
            self.by_id
                .entry(v.endpoint_id)
                .or_default()
                .push(addr_text(&k.addr));
        }
        for v in self.by_id.values_mut() {
            v.sort();
        }
    }
}

/// Decodes one event; `clocks` is (monotonic, wall) read at one instant.
pub fn decode(
    e: &DenyEvent,
    clocks: &(u64, u64),
    endpoint: Option<&Vec<String>>,
    interface: Option<String>,
) -> MonitorEvent {
    let wall = timefmt::wall_of(e.timestamp_ns, clocks.0, clocks.1);
    MonitorEvent {
        time: timefmt::rfc3339(wall),
        timestamp_ns: e.timestamp_ns,
        direction: match e.direction {
            0 => Direction::Ingress.as_str().to_string(),
            1 => Direction::Egress.as_str().to_string(),
            n => format!("direction_{n}"),
        },
        reason: Reason::from_u8(e.reason)
            .map(|r| r.as_str().to_string())
            .unwrap_or_else(|| format!("reason_{}", e.reason)),
        protocol: proto_name(e.proto),
        src: addr_text(&e.src),
        src_port: e.src_port,
        dst: addr_text(&e.dst),
        dst_port: e.dst_port,
        endpoint_id: e.endpoint_id,
        endpoint: endpoint.cloned().unwrap_or_default(),
        ifindex: e.ifindex,
        interface,
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::SCTP => "sctp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        // Headers too short to read the protocol (a malformed packet).
        0 => "-".into(),
        n => n.to_string(),
    }
}

/// An address as text: IPv4-mapped addresses as IPv4.
pub fn addr_text(a: &Addr) -> String {
    ip_of(a).to_string()
}

pub fn ip_of(a: &Addr) -> IpAddr {
    match a.v4_octets() {
        Some(o) => IpAddr::V4(Ipv4Addr::from(o)),
        None => IpAddr::V6(Ipv6Addr::from(a.octets())),
    }
}

/// `addr:port`, `[v6]:port`, or the bare address for protocols without ports.
fn endpoint_text(addr: &str, port: u16, protocol: &str) -> String {
    let ported = matches!(protocol, "tcp" | "udp" | "sctp");
    match (ported, addr.contains(':')) {
        (false, _) => addr.to_string(),
        (true, true) => format!("[{addr}]:{port}"),
        (true, false) => format!("{addr}:{port}"),
    }
}

impl MonitorEvent {
    /// One line for a terminal:
    /// `2024-05-01T12:34:56.123456Z ingress 198.18.0.2:40000 -> 198.18.0.1:8080 tcp policy endpoint 3 (198.18.0.1) on veth1`.
    pub fn line(&self) -> String {
        let ep = if self.endpoint_id == 0 {
            "no endpoint".to_string()
        } else if self.endpoint.is_empty() {
            format!("endpoint {}", self.endpoint_id)
        } else {
            format!(
                "endpoint {} ({})",
                self.endpoint_id,
                self.endpoint.join(", ")
            )
        };
        let iface = match &self.interface {
            Some(n) => n.clone(),
            None => format!("ifindex {}", self.ifindex),
        };
        format!(
            "{} {:<7} {} -> {} {} {} {} on {}",
            self.time,
            self.direction,
            endpoint_text(&self.src, self.src_port, &self.protocol),
            endpoint_text(&self.dst, self.dst_port, &self.protocol),
            self.protocol,
            self.reason,
            ep,
            iface
        )
    }

    /// One JSON line (no newline).
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> DenyEvent {
        DenyEvent {
            timestamp_ns: 5_000_000_000,
            src: Addr::from_v4_octets([198, 18, 0, 2]),
            dst: Addr::from_v4_octets([198, 18, 0, 1]),
            src_port: 40_000,
            dst_port: 8080,
            proto: proto::TCP,
            direction: Direction::Ingress as u8,
            reason: Reason::DenyPolicy as u8,
            _pad: 0,
            endpoint_id: 3,
            ifindex: 7,
        }
    }

    #[test]
    fn decodes_names_and_time() {
        // Read at monotonic 6 s = wall 1714566896 s: the event is one second older.
        let clocks = (6_000_000_000, 1_714_566_896_000_000_000);
        let m = decode(
            &ev(),
            &clocks,
            Some(&vec!["198.18.0.1".into(), "fd00:18::1".into()]),
            Some("veth1".into()),
        );
        assert_eq!(m.time, "2024-05-01T12:34:55.000000Z");
        assert_eq!(
            (m.direction.as_str(), m.reason.as_str()),
            ("ingress", "policy")
        );
        assert_eq!(m.protocol, "tcp");
        assert_eq!((m.src.as_str(), m.src_port), ("198.18.0.2", 40_000));
        assert_eq!((m.dst.as_str(), m.dst_port), ("198.18.0.1", 8080));
        assert_eq!(
            m.line(),
            "2024-05-01T12:34:55.000000Z ingress 198.18.0.2:40000 -> 198.18.0.1:8080 tcp policy \
             endpoint 3 (198.18.0.1, fd00:18::1) on veth1"
        );
    }

    #[test]
    fn json_is_stable_and_round_trips() {
        let m = decode(&ev(), &(5_000_000_000, 0), None, None);
        let j = m.json();
        assert_eq!(
            j,
            r#"{"time":"1970-01-01T00:00:00.000000Z","timestamp_ns":5000000000,"direction":"ingress","reason":"policy","protocol":"tcp","src":"198.18.0.2","src_port":40000,"dst":"198.18.0.1","dst_port":8080,"endpoint_id":3,"endpoint":[],"ifindex":7,"interface":null}"#
        );
        assert_eq!(
            serde_json::from_str::<MonitorEvent>(&j).expect("test value"),
            m
        );
    }

    #[test]
    fn v6_icmp_and_unknown_values() {
        let mut e = ev();
        e.src = Addr::from_v6_octets(
            "fd00:18::2"
                .parse::<Ipv6Addr>()
                .expect("test value")
                .octets(),
        );
        e.dst = Addr::from_v6_octets(
            "fd00:18::1"
                .parse::<Ipv6Addr>()
                .expect("test value")
                .octets(),
        );
        let m = decode(&e, &(0, 0), None, None);
        assert!(
            m.line()
                .contains("[fd00:18::2]:40000 -> [fd00:18::1]:8080 tcp"),
            "{}",
            m.line()
        );
        assert!(
            m.line().ends_with("endpoint 3 on ifindex 7"),
            "{}",
            m.line()
        );
        e.proto = proto::ICMPV6;
        e.direction = Direction::Egress as u8;
        e.reason = Reason::DenyUnrelated as u8;
        let m = decode(&e, &(0, 0), None, None);
        assert!(
            m.line()
                .contains("egress  fd00:18::2 -> fd00:18::1 icmpv6 unrelated_icmp"),
            "{}",
            m.line()
        );
        e.reason = 200;
        e.direction = 9;
        e.proto = 0;
        e.endpoint_id = 0;
        let m = decode(&e, &(0, 0), None, None);
        assert_eq!(
            (m.reason.as_str(), m.direction.as_str()),
            ("reason_200", "direction_9")
        );
        assert!(
            m.line().contains(" - reason_200 no endpoint"),
            "{}",
            m.line()
        );
    }
}
