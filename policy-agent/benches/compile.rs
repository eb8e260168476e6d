//! `cargo bench -p policy-agent --bench compile` (or `cargo xtask bench compile`): full
//! compiles of synthetic clusters with a realistic policy mix, and a single-pod change; prints
//! a table and writes `target/bench/compile.json`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use policy_agent::compiler::{Change, CompilerState, Engine, compile};
use policy_agent::model::*;

const PODS_PER_NS: usize = 100;
const PODS_PER_NODE: usize = 110;

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: Vec::new(),
    }
}

fn tcp(port: PortRef) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(port),
        end_port: None,
    }
}

fn pod_ips(i: usize) -> Vec<IpAddr> {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + i as u32);
    let v6 = Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + 1 + i as u128);
    vec![IpAddr::V4(v4), IpAddr::V6(v6)]
}

fn make_pod(i: usize, apps: usize, generation: usize) -> Pod {
    let ns = i / PODS_PER_NS;
    let app = (i % PODS_PER_NS) % apps;
    Pod {
        namespace: format!("ns{ns}"),
        name: format!("pod{i}-{generation}"),
        labels: labels(&[
            ("app", &format!("app{app}")),
            ("tier", if app.is_multiple_of(2) { "fe" } else { "be" }),
            ("pod-template-hash", &format!("h{}", i % 3)),
        ]),
        ips: pod_ips(i),
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080 + (app % 3) as u16,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
        ],
        host_network: false,
        node: Some(format!("n{}", i / PODS_PER_NODE)),
    }
}

/// `pods` pods in namespaces of 100, `policies` policies spread over the namespaces: per
/// namespace a default-deny, then app-to-app, namespace-selector, ipBlock and egress rules.
fn cluster(pods: usize, policies: usize) -> Snapshot {
    let namespaces = pods.div_ceil(PODS_PER_NS);
    let apps = 10;
    let mut s = Snapshot {
        node: "n0".into(),
        node_addrs: vec!["198.18.255.254".parse().expect("ip")],
        ..Default::default()
    };
    for n in 0..namespaces {
        let name = format!("ns{n}");
        let team = format!("team{}", n % 5);
        s.namespaces.insert(
            name.clone(),
            Namespace {
                name: name.clone(),
                labels: labels(&[("kubernetes.io/metadata.name", &name), ("team", &team)]),
            },
        );
    }
    for i in 0..pods {
        let p = make_pod(i, apps, 0);
        s.pods.insert(p.key(), p);
    }
    for k in 0..policies {
        let ns = k % namespaces;
        let kind = k / namespaces;
        let app = format!("app{}", kind % apps);
        let peer_app = format!("app{}", (kind + 1) % apps);
        let (pod_selector, ingress_isolation, egress_isolation, ingress, egress) = match kind % 6 {
            // Default deny, both directions, with DNS egress to kube-system.
            0 => (
                LabelSelector::everything(),
                true,
                true,
                vec![],
                vec![Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: Some(sel(&[("kubernetes.io/metadata.name", "ns0")])),
                        pods: Some(sel(&[("app", "app0")])),
                    }]),
                    ports: vec![
                        PortSpec {
                            protocol: Protocol::Udp,
                            port: Some(PortRef::Number(53)),
                            end_port: None,
                        },
                        tcp(PortRef::Number(53)),
                    ],
                }],
            ),
            // App to app on a named port.
            1 | 2 => (
                sel(&[("app", &app)]),
                true,
                false,
                vec![Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: None,
                        pods: Some(sel(&[("app", &peer_app)])),
                    }]),
                    ports: vec![tcp(PortRef::Name("http".into()))],
                }],
                vec![],
            ),
            // Monitoring from every namespace of a team.
            3 => (
                sel(&[("tier", "be")]),
                true,
                false,
                vec![Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: Some(sel(&[("team", "team0")])),
                        pods: Some(sel(&[("app", "app9")])),
                    }]),
                    ports: vec![
                        tcp(PortRef::Name("metrics".into())),
                        tcp(PortRef::Number(9100)),
                    ],
                }],
                vec![],
            ),
            // Egress to external networks with holes, and to a port range.
            4 => (
                sel(&[("app", &app)]),
                false,
                true,
                vec![],
                vec![Rule {
                    peers: Some(vec![
                        Peer::IpBlock {
                            cidr: format!("10.{}.0.0/16", k % 256).parse().expect("cidr"),
                            except: vec![
                                format!("10.{}.{}.0/24", k % 256, k % 7)
                                    .parse()
                                    .expect("cidr"),
                            ],
                        },
                        Peer::IpBlock {
                            cidr: "0.0.0.0/0".parse().expect("cidr"),
                            except: vec!["198.18.0.0/15".parse().expect("cidr")],
                        },
                    ]),
                    ports: vec![
                        tcp(PortRef::Number(443)),
                        PortSpec {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(30000)),
                            end_port: Some(32767),
                        },
                    ],
                }],
            ),
            // Ingress from a load-balancer range and same-tier pods of any namespace.
            _ => (
                sel(&[("tier", "fe")]),
                true,
                false,
                vec![Rule {
                    peers: Some(vec![
                        Peer::IpBlock {
                            cidr: format!("192.0.{}.0/24", k % 256).parse().expect("cidr"),
                            except: vec![],
                        },
                        Peer::Pods {
                            namespaces: Some(LabelSelector::everything()),
                            pods: Some(sel(&[("tier", "fe")])),
                        },
                    ]),
                    ports: vec![
                        tcp(PortRef::Number(80)),
                        tcp(PortRef::Number(443)),
                        tcp(PortRef::Number(8443)),
                        tcp(PortRef::Number(8000)),
                        tcp(PortRef::Number(8001)),
                        tcp(PortRef::Number(9443)),
                    ],
                }],
                vec![],
            ),
        };
        let p = NetworkPolicy {
            namespace: format!("ns{ns}"),
            name: format!("p{k}"),
            pod_selector,
            ingress_isolation,
            egress_isolation,
            ingress,
            egress,
            declared: None,
        };
        s.policies.insert(p.key(), p);
    }
    s
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("at least one run"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let mut json = BTreeMap::new();
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "case", "ms", "endpoints", "ipcache", "rules", "cidr", "ports", "bytes"
    );
    for (pods, policies) in [(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)] {
        let snap = cluster(pods, policies);
        let (d, m) = time(5, || compile(&snap, &mut CompilerState::new()));
        let sizes = m.sizes();
        let bytes: usize = sizes.iter().map(|s| s.2).sum();
        let name = format!("full {}k pods {} policies", pods / 1000, policies);
        println!(
            "{:<28} {:>10.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            name,
            ms(d),
            sizes[0].1,
            sizes[1].1,
            sizes[2].1,
            sizes[3].1,
            sizes[4].1,
            bytes
        );
        json.insert(
            format!(
                "full_{}k_pods_{}_policies_ms",
                pods / 1000,
                if policies >= 1000 {
                    "1k".to_string()
                } else {
                    policies.to_string()
                }
            ),
            ms(d),
        );
    }

    {
        // A dense node: 2,000 of the 10k pods local.
        let mut snap = cluster(10_000, 1_000);
        for p in snap.pods.values_mut().take(2_000) {
            p.node = Some("n0".into());
        }
        let (d, m) = time(3, || compile(&snap, &mut CompilerState::new()));
        let sizes = m.sizes();
        let bytes: usize = sizes.iter().map(|s| s.2).sum();
        println!(
            "{:<28} {:>10.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "full 10k/1k, 2k local pods",
            ms(d),
            sizes[0].1,
            sizes[1].1,
            sizes[2].1,
            sizes[3].1,
            sizes[4].1,
            bytes
        );
        json.insert("full_10k_pods_1k_policies_2k_local_ms".into(), ms(d));
    }

    // Single changes on the 10k x 1k cluster through the incremental engine.
    let mut snap = cluster(10_000, 1_000);
    let t = Instant::now();
    let mut engine = Engine::new(&snap);
    println!("{:<28} {:>10.2}", "engine build 10k x 1k", ms(t.elapsed()));
    let local = snap
        .pods
        .values()
        .find(|p| p.node.as_deref() == Some("n0"))
        .expect("a local pod")
        .key();
    let remote = snap
        .pods
        .values()
        .find(|p| p.node.as_deref() == Some("n50"))
        .expect("a remote pod")
        .key();
    let mut per_kind: Vec<(&str, Duration, usize)> = Vec::new();
    for (name, key) in [
        ("local pod relabel", &local),
        ("remote pod relabel", &remote),
    ] {
        let mut best = Duration::MAX;
        let mut len = 0;
        for round in 0..10 {
            let p = snap.pods.get_mut(key).expect("pod");
            p.labels.insert(
                "app".into(),
                if round % 2 == 0 {
                    "app3".into()
                } else {
                    "app0".into()
                },
            );
            let t = Instant::now();
            let d = engine.apply(&snap, &Change::Pod(key.clone()));
            best = best.min(t.elapsed());
            len = d.len();
        }
        per_kind.push((name, best, len));
    }
    {
        // A new pod appears on a remote node, then goes away.
        let mut best = Duration::MAX;
        let mut len = 0;
        for round in 0..10 {
            let p = make_pod(20_000 + round, 10, 1);
            let k = p.key();
            snap.pods.insert(k.clone(), p);
            let t = Instant::now();
            let d = engine.apply(&snap, &Change::Pod(k.clone()));
            best = best.min(t.elapsed());
            len = d.len();
            snap.pods.remove(&k);
            engine.apply(&snap, &Change::Pod(k));
        }
        per_kind.push(("remote pod added", best, len));
    }
    {
        let key = snap.policies.keys().nth(1).expect("policy").clone();
        let mut best = Duration::MAX;
        let mut len = 0;
        for round in 0..10 {
            let p = snap.policies.get_mut(&key).expect("policy");
            p.ingress_isolation = round % 2 == 0;
            let t = Instant::now();
            let d = engine.apply(&snap, &Change::Policy(key.clone()));
            best = best.min(t.elapsed());
            len = d.len();
        }
        per_kind.push(("policy changed", best, len));
    }
    for (name, d, len) in &per_kind {
        println!(
            "{:<28} {:>10.3}   (diff: {} entries)",
            format!("incremental {name}"),
            ms(*d),
            len
        );
    }
    let worst_pod = per_kind
        .iter()
        .filter(|k| k.0.contains("pod"))
        .map(|k| k.1)
        .max()
        .unwrap_or_default();
    json.insert("incremental_pod_change_ms".into(), ms(worst_pod));
    json.insert("incremental_policy_change_ms".into(), ms(per_kind[3].1));
    // The engine must agree with a full compile after all this.
    let full = compile(&snap, &mut engine.numbers().clone());
    assert!(
        &full == engine.contents(),
        "engine diverged from the full compile"
    );

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench");
    let _ = std::fs::create_dir_all(&dir);
    let body = serde_json::to_string_pretty(&json).expect("json");
    match std::fs::write(dir.join("compile.json"), body) {
        Ok(()) => println!("wrote {}", dir.join("compile.json").display()),
        Err(e) => eprintln!("cannot write {}: {e}", dir.display()),
    }
}
