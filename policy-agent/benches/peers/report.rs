//! The peers bench's console table, `peers.json` and its `BENCHMARKS.md` section.

use std::fmt::Write as _;

use policy_testkit::bench_report::{Spread, machine, table};
use serde_json::Value;

use super::Size;
use super::filters::Filter;
use super::per_packet::PerPacket;

pub struct Config {
    pub rounds: usize,
    pub seconds: f64,
    pub cpus: (usize, usize),
}

fn spread(v: Option<&Vec<f64>>) -> Spread {
    Spread::of(v.map_or(&[][..], Vec::as_slice))
}

fn rate(x: f64) -> String {
    let n = x.round() as u64;
    if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

/// `filter`'s rate as a share of no filter's, in percent: the median over rounds of each
/// round's ratio (both measured in the same round, slice by slice), which the machine's
/// changes of speed between rounds do not move.
fn share(size: &Size, metric: Metric, filter: Filter) -> f64 {
    let m = metric.of(size);
    let (Some(base), Some(mine)) = (m.get(Filter::Unfiltered.key()), m.get(filter.key())) else {
        return f64::NAN;
    };
    let ratios: Vec<f64> = base.iter().zip(mine).map(|(b, x)| 100.0 * x / b).collect();
    Spread::of(&ratios).median
}

#[derive(Clone, Copy)]
enum Metric {
    Crr,
    Rr,
}

impl Metric {
    fn of(self, s: &Size) -> &std::collections::BTreeMap<&'static str, Vec<f64>> {
        match self {
            Metric::Crr => &s.crr,
            Metric::Rr => &s.rr,
        }
    }
    fn key(self) -> &'static str {
        match self {
            Metric::Crr => "crr",
            Metric::Rr => "rr",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Metric::Crr => "new connections per second (TCP_CRR-style)",
            Metric::Rr => "transactions per second on one connection (TCP_RR-style)",
        }
    }
}

pub fn console(sizes: &[Size]) -> String {
    let mut s = String::new();
    for metric in [Metric::Crr, Metric::Rr] {
        let _ = writeln!(
            s,
            "peers: {}, median (min-max), % of no filter",
            metric.title()
        );
        let _ = write!(s, "{:>7}", "rules");
        for f in Filter::ALL {
            let _ = write!(s, " {:>30}", f.title());
        }
        s.push('\n');
        for size in sizes {
            let _ = write!(s, "{:>7}", size.rules);
            for f in Filter::ALL {
                let sp = spread(metric.of(size).get(f.key()));
                let cell = format!(
                    "{} ({}-{}) {:.0}%",
                    rate(sp.median),
                    rate(sp.min),
                    rate(sp.max),
                    share(size, metric, f)
                );
                let _ = write!(s, " {cell:>30}");
            }
            s.push('\n');
        }
    }
    let _ = writeln!(
        s,
        "peers: our to_pod per packet (BPF_PROG_TEST_RUN), ns, median"
    );
    for size in sizes {
        let p = &size.per_packet;
        let _ = writeln!(
            s,
            "{:>7} rules: empty program {:.1}, new flow {:.1}, established {:.1}, refused {:.1}",
            size.rules, p.empty_ns, p.new_flow_ns, p.established_ns, p.refused_ns
        );
    }
    s
}

pub fn json(sizes: &[Size], cfg: &Config) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("rules".into(), sizes.iter().map(|s| s.rules).collect());
    for metric in [Metric::Crr, Metric::Rr] {
        for f in Filter::ALL {
            let spreads: Vec<Spread> = sizes
                .iter()
                .map(|s| spread(metric.of(s).get(f.key())))
                .collect();
            let key = format!("{}_{}", f.key(), metric.key());
            m.insert(key.clone(), spreads.iter().map(|s| s.median).collect());
            m.insert(
                format!("{key}_min"),
                spreads.iter().map(|s| s.min).collect(),
            );
            m.insert(
                format!("{key}_max"),
                spreads.iter().map(|s| s.max).collect(),
            );
        }
    }
    let pp =
        |f: fn(&PerPacket) -> f64| -> Value { sizes.iter().map(|s| f(&s.per_packet)).collect() };
    m.insert("empty_program_ns".into(), pp(|p| p.empty_ns));
    m.insert("ours_new_flow_ns".into(), pp(|p| p.new_flow_ns));
    m.insert("ours_established_ns".into(), pp(|p| p.established_ns));
    m.insert("ours_refused_ns".into(), pp(|p| p.refused_ns));
    m.insert(
        "ours_cidr_rules_entries".into(),
        sizes.iter().map(|s| s.entries.0).collect(),
    );
    m.insert(
        "ours_ports_entries".into(),
        sizes.iter().map(|s| s.entries.1).collect(),
    );
    m.insert("rounds".into(), cfg.rounds.into());
    m.insert("seconds_per_measurement".into(), cfg.seconds.into());
    m.insert("machine".into(), machine().into());
    Value::Object(m)
}

/// Where the goals of the comparison stand, and where ours loses, from the figures.
fn verdicts(sizes: &[Size]) -> Vec<String> {
    let mut out = Vec::new();
    for metric in [Metric::Crr, Metric::Rr] {
        let worst = sizes
            .iter()
            .map(|s| (share(s, metric, Filter::Ours), s.rules))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((pct, rules)) = worst {
            out.push(format!(
                "{}: ours is at least {pct:.0}% of no filter at every size (lowest at {} rules); \
                 the goal is 90%: {}.",
                metric.key().to_uppercase(),
                rate(rules as f64),
                if pct >= 90.0 { "met" } else { "**not met**" }
            ));
        }
        for size in sizes {
            for other in [Filter::Iptables, Filter::Nftables] {
                let (ours, theirs) = (
                    share(size, metric, Filter::Ours),
                    share(size, metric, other),
                );
                if ours < theirs {
                    out.push(format!(
                        "{} at {} rules: ours is behind {} ({ours:.0}% against {theirs:.0}% of \
                         no filter).",
                        metric.key().to_uppercase(),
                        rate(size.rules as f64),
                        other.title()
                    ));
                }
            }
        }
    }
    out
}

pub fn markdown(sizes: &[Size], cfg: &Config) -> String {
    let mut s = String::from("## Datapath side by side (`cargo xtask bench peers`)\n\n");
    let _ = writeln!(s, "Measured on: {}.\n", machine());
    let _ = writeln!(
        s,
        "One client pod and one server pod (network namespaces, veth pairs routed by a node \
         namespace, IPv4), the server isolated for ingress by the same generated policy set \
         under each filter: 10 rules per NetworkPolicy, each admitting one peer (a /32, /24 \
         or /16 in turn) on TCP to one port or a range; the probe's flow matches only the \
         last rule. Filters: none; ours (the agent's compiler writing our maps, the \
         programs attached to both pods' veths); iptables-legacy with one ipset per rule, \
         ESTABLISHED,RELATED accepted first in the pod's chain, then one chain per policy \
         marking admitted packets (kube-router's layout; Calico's iptables mode is alike); \
         nftables with `ct state established,related accept` first, then per policy one \
         rule `ip saddr . meta l4proto . th dport @set` over an interval set \
         (kube-network-policies' layout). Each filter has a node namespace of its own with \
         its own two pods, checked to enforce (probe admitted, another port refused) before \
         it is measured; the four live side by side and take turns every fifth of the \
         measuring time, so a change in this shared VM's speed lands on all of them alike. \
         Client thread on CPU {}, server thread on CPU {}. {} rounds of {:.1} s per filter, \
         size and load; rates are median (min-max) over rounds, shares the median over \
         rounds of each round's share of no filter.\n",
        cfg.cpus.0, cfg.cpus.1, cfg.rounds, cfg.seconds
    );
    let mut header = vec!["rules"];
    header.extend(Filter::ALL.iter().map(|f| f.title()));
    for metric in [Metric::Crr, Metric::Rr] {
        let _ = writeln!(s, "**{}**\n", capitalize(metric.title()));
        let rows: Vec<Vec<String>> = sizes
            .iter()
            .map(|size| {
                let mut row = vec![rate(size.rules as f64)];
                for f in Filter::ALL {
                    let sp = spread(metric.of(size).get(f.key()));
                    row.push(format!(
                        "{} ({}-{}), {:.0}%",
                        rate(sp.median),
                        rate(sp.min),
                        rate(sp.max),
                        share(size, metric, f)
                    ));
                }
                row
            })
            .collect();
        s += &table(&header, &rows);
        s.push('\n');
    }
    s += "**Our per-packet cost** (`to_pod` on the same maps, BPF_PROG_TEST_RUN, ns, median)\n\n";
    let rows: Vec<Vec<String>> = sizes
        .iter()
        .map(|size| {
            let p = &size.per_packet;
            vec![
                rate(size.rules as f64),
                format!("{:.1}", p.empty_ns),
                format!("{:.1}", p.new_flow_ns),
                format!("{:.1}", p.established_ns),
                format!("{:.1}", p.refused_ns),
                format!(
                    "{} / {}",
                    rate(size.entries.0 as f64),
                    rate(size.entries.1 as f64)
                ),
            ]
        })
        .collect();
    s += &table(
        &[
            "rules",
            "empty program",
            "new flow (probe SYN)",
            "established (conntrack hit)",
            "refused SYN",
            "our entries: CIDR_RULES / PORTS",
        ],
        &rows,
    );
    s += "\n**Against the goals** (computed from the figures above)\n\n";
    for v in verdicts(sizes) {
        let _ = writeln!(s, "- {v}");
    }
    s += "\nReproduce: `cargo xtask bench peers` as root (`PEERS_RULES`, `PEERS_ROUNDS`, \
          `PEERS_SECONDS` to change sizes, rounds and length). Raw figures: \
          `target/bench/peers.json`.\n";
    s
}

fn capitalize(t: &str) -> String {
    let mut c = t.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
