//! `policy-agent status`: what the pinned datapath holds and has decided, read from bpffs
//! read-only (no agent needed; safe beside a running one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use policy_common::{
    Config, Direction, EndpointKey, EndpointValue, MAP_BINDINGS, MAP_CIDR_RULES, MAP_CONFIG,
    MAP_CONNTRACK, MAP_CONNTRACK4, MAP_COUNTERS, MAP_ENDPOINTS, MAP_EVENT_BUDGET, MAP_EVENTS,
    MAP_FRAGMENTS, MAP_IPCACHE, MAP_PORTS, MAP_RULES, MAP_SERVICE_CIDRS, MAP_SERVICE_PENDING,
    PROG_FROM_WORLD, Reason, reason::COUNTERS_LEN,
};
use serde::{Deserialize, Serialize};

use super::{ObserveError, event::addr_text, pinned};
use crate::dataplane::pinning;

/// Every map the agent pins, in the order they are shown.
pub const MAPS: &[&str] = &[
    MAP_ENDPOINTS,
    MAP_BINDINGS,
    MAP_IPCACHE,
    MAP_RULES,
    MAP_CIDR_RULES,
    MAP_PORTS,
    MAP_CONNTRACK,
    MAP_CONNTRACK4,
    MAP_FRAGMENTS,
    MAP_SERVICE_CIDRS,
    MAP_SERVICE_PENDING,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_EVENT_BUDGET,
    MAP_CONFIG,
];

/// The whole report; `--json` prints exactly this (field order is part of the contract).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub bpf_dir: String,
    /// Whether an agent answers on the monitor socket of this pin directory (in the caller's
    /// network namespace).
    pub agent_running: bool,
    /// Interfaces with pinned TCX links (clsact filters are not pinned: `tc filter show`).
    pub interfaces: Vec<InterfaceStatus>,
    /// Distinct endpoints (a pod with an IPv4 and an IPv6 address is one).
    pub endpoint_count: usize,
    pub endpoints: Vec<EndpointStatus>,
    pub maps: Vec<MapStatus>,
    /// Every (direction, reason) pair, summed over CPUs, zeros included.
    pub counters: Vec<CounterStatus>,
    pub events: EventSettings,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// `pod` (from_pod/to_pod) or `uplink` (from_world/to_world).
    pub role: String,
    pub programs: Vec<String>,
    /// Whether this interface exists with this index in the caller's network namespace
    /// (false: gone, its links are defunct; or `status` runs in another namespace).
    pub present: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub id: u32,
    pub addresses: Vec<String>,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub ingress_policy_set: u32,
    pub egress_policy_set: u32,
    /// The interface routing to the endpoint in the caller's namespace, when found.
    pub interface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    /// `hash`, `lru_hash`, `lpm_trie`, `lpm_tries` (`CIDR_RULES`: a trie per policy-set and
    /// family, entries summed, capacity the total the agent admits), `ct_table`
    /// (`CONNTRACK`, `CONNTRACK4`: connections held, capacity in slots), `array`,
    /// `percpu_array`, `ringbuf`, or `missing`.
    pub kind: String,
    /// Entries now (`null` for the ring buffer and missing maps).
    pub entries: Option<u64>,
    /// The kernel's max_entries (bytes for the ring buffer).
    pub capacity: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStatus {
    pub direction: String,
    /// `allow` or `deny`.
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSettings {
    /// Deny events per second per CPU (0: none are reported).
    pub per_sec: u32,
    pub burst: u32,
}

/// Reads everything from the maps pinned in `bpf_dir`.
pub fn collect(bpf_dir: &Path) -> Result<NodeStatus, ObserveError> {
    super::check_pin_dir(bpf_dir)?;
    let ep = pinned::open_ro(bpf_dir, MAP_ENDPOINTS)?;
    let ep_map: HashMap<&MapData, EndpointKey, EndpointValue> =
        HashMap::try_from(&ep.map).map_err(|e| ObserveError::map(MAP_ENDPOINTS, e))?;
    let entries: Vec<(EndpointKey, EndpointValue)> = ep_map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| ObserveError::map(MAP_ENDPOINTS, e))?;
    let routes = crate::dataplane::netinfo::routes().unwrap_or_default();
    let endpoints = endpoints(&entries, |ip| {
        crate::dataplane::netinfo::iface_for(&routes, ip).map(str::to_string)
    });

    let mut maps = Vec::new();
    for name in MAPS {
        maps.push(match pinned::open_ro(bpf_dir, name) {
            Ok(m) => MapStatus {
                name: name.to_string(),
                kind: m.kind().to_string(),
                entries: m.entries()?,
                capacity: m.capacity(),
            },
            Err(ObserveError::OpenPin { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                MapStatus {
                    name: name.to_string(),
                    kind: "missing".into(),
                    entries: None,
                    capacity: 0,
                }
            }
            Err(e) => return Err(e),
        });
    }

    let c = pinned::open_ro(bpf_dir, MAP_COUNTERS)?;
    let cm: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(&c.map).map_err(|e| ObserveError::map(MAP_COUNTERS, e))?;
    let mut sums = vec![0u64; COUNTERS_LEN as usize];
    for (i, s) in sums.iter_mut().enumerate() {
        let per_cpu = cm
            .get(&(i as u32), 0)
            .map_err(|e| ObserveError::map(MAP_COUNTERS, e))?;
        *s = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
    }

    let cfg = pinned::open_ro(bpf_dir, MAP_CONFIG)?;
    let cfg: Array<&MapData, Config> =
        Array::try_from(&cfg.map).map_err(|e| ObserveError::map(MAP_CONFIG, e))?;
    let cfg = cfg
        .get(&0, 0)
        .map_err(|e| ObserveError::map(MAP_CONFIG, e))?;

    Ok(NodeStatus {
        bpf_dir: bpf_dir.display().to_string(),
        agent_running: matches!(super::connect_agent(bpf_dir), Ok(Some(_))),
        interfaces: interfaces(bpf_dir),
        endpoint_count: endpoints.len(),
        endpoints,
        maps,
        counters: counters(&sums),
        events: EventSettings {
            per_sec: cfg.events_per_sec,
            burst: cfg.events_burst,
        },
    })
}

/// The pinned links: `links/<ifname>@<ifindex>/<program>`.
fn interfaces(bpf_dir: &Path) -> Vec<InterfaceStatus> {
    pinning::pinned_interfaces(bpf_dir)
        .into_iter()
        .map(|p| {
            let mut programs: Vec<String> = std::fs::read_dir(&p.dir)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default();
            programs.sort();
            let role = if programs
                .iter()
                .any(|n| n == PROG_FROM_WORLD || n == policy_common::PROG_FROM_WORLD_L3)
            {
                "uplink"
            } else {
                "pod"
            };
            InterfaceStatus {
                present: crate::dataplane::netinfo::ifindex(&p.ifname) == Some(p.ifindex),
                name: p.ifname,
                ifindex: p.ifindex,
                role: role.into(),
                programs,
            }
        })
        .collect()
}

/// Groups `ENDPOINTS` entries by endpoint number (one pod, several addresses).
pub fn endpoints(
    entries: &[(EndpointKey, EndpointValue)],
    iface_of: impl Fn(std::net::IpAddr) -> Option<String>,
) -> Vec<EndpointStatus> {
    let mut by_id: BTreeMap<u32, EndpointStatus> = BTreeMap::new();
    for (k, v) in entries {
        let e = by_id
            .entry(v.endpoint_id)
            .or_insert_with(|| EndpointStatus {
                id: v.endpoint_id,
                addresses: Vec::new(),
                isolated_ingress: v.isolated(Direction::Ingress),
                isolated_egress: v.isolated(Direction::Egress),
                ingress_policy_set: v.ingress_policy_set,
                egress_policy_set: v.egress_policy_set,
                interface: None,
            });
        e.addresses.push(addr_text(&k.addr));
    }
    let mut out: Vec<EndpointStatus> = by_id.into_values().collect();
    for e in &mut out {
        // IPv4 first, then IPv6: parse so 198.18.0.10 sorts after 198.18.0.9.
        e.addresses.sort_by_key(|a| {
            a.parse::<std::net::IpAddr>()
                .map(|ip| (ip.is_ipv6(), ip))
                .ok()
        });
        e.interface = e
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .find_map(&iface_of);
    }
    out
}

/// The counters array (summed over CPUs) as named rows, in index order.
pub fn counters(sums: &[u64]) -> Vec<CounterStatus> {
    let mut out = Vec::new();
    for d in Direction::ALL {
        for r in Reason::ALL {
            out.push(CounterStatus {
                direction: d.as_str().into(),
                verdict: if r.is_allow() { "allow" } else { "deny" }.into(),
                reason: r.as_str().into(),
                packets: sums.get(r.counter_index(d) as usize).copied().unwrap_or(0),
            });
        }
    }
    out
}

/// The human report: four tables.
pub fn render(s: &NodeStatus) -> String {
    let mut o = String::new();
    let agent = if s.agent_running {
        "running"
    } else {
        "not running (the pinned programs keep enforcing)"
    };
    let _ = writeln!(o, "bpf dir: {}    agent: {agent}", s.bpf_dir);
    let _ = writeln!(
        o,
        "deny events: {} per second per CPU, burst {}",
        s.events.per_sec, s.events.burst
    );

    let _ = writeln!(
        o,
        "\nPROGRAMS (pinned TCX links; clsact filters: tc filter show)"
    );
    if s.interfaces.is_empty() {
        let _ = writeln!(o, "  none pinned");
    } else {
        let rows: Vec<Vec<String>> = s
            .interfaces
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.ifindex.to_string(),
                    i.role.clone(),
                    i.programs.join(","),
                    if i.present { "" } else { "(gone)" }.into(),
                ]
            })
            .collect();
        table(
            &mut o,
            &["INTERFACE", "IFINDEX", "ROLE", "PROGRAMS", ""],
            &rows,
        );
    }

    let _ = writeln!(o, "\nENDPOINTS ({})", s.endpoint_count);
    if s.endpoints.is_empty() {
        let _ = writeln!(o, "  none");
    } else {
        let iso = |b: bool| if b { "isolated" } else { "open" }.to_string();
        let rows: Vec<Vec<String>> = s
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    iso(e.isolated_ingress),
                    iso(e.isolated_egress),
                    e.interface.clone().unwrap_or_else(|| "-".into()),
                    e.addresses.join(", "),
                ]
            })
            .collect();
        table(
            &mut o,
            &["ID", "INGRESS", "EGRESS", "INTERFACE", "ADDRESSES"],
            &rows,
        );
    }

    let _ = writeln!(o, "\nMAPS");
    let rows: Vec<Vec<String>> = s
        .maps
        .iter()
        .map(|m| {
            // Arrays are always full: a percentage would only alarm.
            let array = m.kind.ends_with("array");
            let (entries, used) = match m.entries {
                Some(n) if m.capacity > 0 && !array => (
                    n.to_string(),
                    format!("{:.1}%", n as f64 * 100.0 / m.capacity as f64),
                ),
                Some(n) => (n.to_string(), "-".into()),
                None => ("-".into(), "-".into()),
            };
            let cap = if m.kind == "ringbuf" {
                format!("{} B", m.capacity)
            } else {
                m.capacity.to_string()
            };
            vec![m.name.clone(), m.kind.clone(), entries, cap, used]
        })
        .collect();
    table(
        &mut o,
        &["NAME", "KIND", "ENTRIES", "CAPACITY", "USED"],
        &rows,
    );

    let _ = writeln!(
        o,
        "\nVERDICTS (packets since the maps were created, all CPUs)"
    );
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .filter(|c| c.packets > 0)
        .map(|c| {
            vec![
                c.direction.clone(),
                c.verdict.clone(),
                c.reason.clone(),
                c.packets.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        let _ = writeln!(o, "  no packet counted yet");
    } else {
        table(
            &mut o,
            &["DIRECTION", "VERDICT", "REASON", "PACKETS"],
            &rows,
        );
    }
    o
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(o: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, " {:<width$} ", c, width = w[i]);
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(o, "{}", line(head.to_vec()));
    for r in rows {
        let _ = writeln!(o, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::{Addr, ep_flags};

    fn sample() -> NodeStatus {
        let a4 = Addr::from_v4_octets([198, 18, 0, 10]);
        let a6 = Addr::from_v6_octets(
            "fd00:18::a"
                .parse::<std::net::Ipv6Addr>()
                .expect("test value")
                .octets(),
        );
        let b4 = Addr::from_v4_octets([198, 18, 0, 9]);
        let va = EndpointValue {
            endpoint_id: 2,
            ingress_policy_set: 5,
            egress_policy_set: 0,
            flags: ep_flags::ISOLATED_INGRESS,
        };
        let vb = EndpointValue {
            endpoint_id: 1,
            flags: 0,
            ..Default::default()
        };
        let entries = vec![
            (EndpointKey { addr: a6 }, va),
            (EndpointKey { addr: b4 }, vb),
            (EndpointKey { addr: a4 }, va),
        ];
        let eps = endpoints(&entries, |ip| Some(format!("veth-{ip}")));
        let mut sums = vec![0u64; COUNTERS_LEN as usize];
        sums[Reason::DenyPolicy.counter_index(Direction::Ingress) as usize] = 3;
        sums[Reason::AllowEstablished.counter_index(Direction::Egress) as usize] = 12;
        NodeStatus {
            bpf_dir: "/sys/fs/bpf/netpol".into(),
            agent_running: true,
            interfaces: vec![InterfaceStatus {
                name: "veth1".into(),
                ifindex: 7,
                role: "pod".into(),
                programs: vec!["from_pod".into(), "to_pod".into()],
                present: true,
            }],
            endpoint_count: eps.len(),
            endpoints: eps,
            maps: vec![
                MapStatus {
                    name: "ENDPOINTS".into(),
                    kind: "hash".into(),
                    entries: Some(3),
                    capacity: 16_384,
                },
                MapStatus {
                    name: "COUNTERS".into(),
                    kind: "percpu_array".into(),
                    entries: Some(32),
                    capacity: 32,
                },
                MapStatus {
                    name: "EVENTS".into(),
                    kind: "ringbuf".into(),
                    entries: None,
                    capacity: 1 << 20,
                },
            ],
            counters: counters(&sums),
            events: EventSettings {
                per_sec: 1000,
                burst: 100,
            },
        }
    }

    #[test]
    fn endpoints_group_addresses_by_id() {
        let s = sample();
        assert_eq!(s.endpoint_count, 2);
        let e = &s.endpoints[1];
        assert_eq!(e.id, 2);
        assert_eq!(e.addresses, vec!["198.18.0.10", "fd00:18::a"]);
        assert!(e.isolated_ingress && !e.isolated_egress);
        assert_eq!(e.ingress_policy_set, 5);
        assert!(
            e.interface
                .as_deref()
                .expect("test value")
                .starts_with("veth-")
        );
        assert!(!s.endpoints[0].isolated_ingress);
    }

    #[test]
    fn counters_name_every_slot_once() {
        let s = sample();
        assert_eq!(s.counters.len(), COUNTERS_LEN as usize);
        let deny: Vec<_> = s.counters.iter().filter(|c| c.packets > 0).collect();
        assert_eq!(deny.len(), 2);
        let d = s
            .counters
            .iter()
            .find(|c| c.packets == 3)
            .expect("test value");
        assert_eq!(
            (d.direction.as_str(), d.verdict.as_str(), d.reason.as_str()),
            ("ingress", "deny", "policy")
        );
        // "fragment" names both an allow and a deny reason: the verdict tells them apart.
        let frag: Vec<_> = s
            .counters
            .iter()
            .filter(|c| c.direction == "ingress" && c.reason == "fragment")
            .map(|c| c.verdict.as_str())
            .collect();
        assert_eq!(frag, vec!["allow", "deny"]);
    }

    #[test]
    fn json_shape_is_stable() {
        let s = sample();
        let v: serde_json::Value = serde_json::to_value(&s).expect("test value");
        let keys: Vec<&str> = v
            .as_object()
            .expect("test value")
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = vec![
            "bpf_dir",
            "agent_running",
            "interfaces",
            "endpoint_count",
            "endpoints",
            "maps",
            "counters",
            "events",
        ];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want);
        let text = serde_json::to_string(&s).expect("test value");
        assert!(text.starts_with(r#"{"bpf_dir":"/sys/fs/bpf/netpol","agent_running":true,"interfaces":[{"name":"veth1","ifindex":7,"role":"pod","programs":["from_pod","to_pod"],"present":true}],"endpoint_count":2,"#), "{text}");
        assert!(
            text.contains(
                r#"{"direction":"ingress","verdict":"deny","reason":"policy","packets":3}"#
            )
        );
        assert!(
            text.contains(
                r#"{"name":"EVENTS","kind":"ringbuf","entries":null,"capacity":1048576}"#
            )
        );
        assert_eq!(
            serde_json::from_str::<NodeStatus>(&text).expect("test value"),
            s
        );
    }

    #[test]
    fn human_report_has_the_four_tables() {
        let out = render(&sample());
        let want = "\
bpf dir: /sys/fs/bpf/netpol    agent: running
deny events: 1000 per second per CPU, burst 100

PROGRAMS (pinned TCX links; clsact filters: tc filter show)
  INTERFACE  IFINDEX  ROLE  PROGRAMS
  veth1      7        pod   from_pod,to_pod

ENDPOINTS (2)
  ID  INGRESS   EGRESS  INTERFACE         ADDRESSES
  1   open      open    veth-198.18.0.9   198.18.0.9
  2   isolated  open    veth-198.18.0.10  198.18.0.10, fd00:18::a

MAPS
  NAME       KIND          ENTRIES  CAPACITY   USED
  ENDPOINTS  hash          3        16384      0.0%
  COUNTERS   percpu_array  32       32         -
  EVENTS     ringbuf       -        1048576 B  -

VERDICTS (packets since the maps were created, all CPUs)
  DIRECTION  VERDICT  REASON       PACKETS
  ingress    deny     policy       3
  egress     allow    established  12
";
        assert_eq!(out, want, "\n{out}");
    }

    #[test]
    fn human_report_when_empty() {
        let mut s = sample();
        s.interfaces.clear();
        s.endpoints.clear();
        s.endpoint_count = 0;
        s.agent_running = false;
        for c in &mut s.counters {
            c.packets = 0;
        }
        let out = render(&s);
        assert!(out.contains("agent: not running (the pinned programs keep enforcing)"));
        assert!(out.contains(
            "PROGRAMS (pinned TCX links; clsact filters: tc filter show)\n  none pinned"
        ));
        assert!(out.contains("ENDPOINTS (0)\n  none"));
        assert!(out.contains("no packet counted yet"));
    }
}
