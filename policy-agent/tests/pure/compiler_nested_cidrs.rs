//! Many narrow ipBlock rules inside broad ones, each with ports of its own (the shape of a
//! large allowlist): the kernel's lookups over the compiled maps decide every source and
//! port exactly as the reference evaluator, and the narrow prefixes share the broad ones'
//! `PORTS` lists instead of each carrying a copy (which made 1,000 such rules overflow the
//! trie).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use crate::compiler_common::Cluster;
use policy_agent::manifests;
use policy_agent::model::Protocol;
use policy_agent::reference::{self, Endpoint};

const SERVER: &str = "198.18.0.2";

fn manifests_text() -> String {
    let mut rules = String::new();
    let mut rule = |cidr: &str, except: &[&str], ports: &[(u16, u16)]| {
        let ports: Vec<String> = ports
            .iter()
            .map(|(f, l)| {
                if f == l {
                    format!("{{protocol: TCP, port: {f}}}")
                } else {
                    format!("{{protocol: TCP, port: {f}, endPort: {l}}}")
                }
            })
            .collect();
        let _ = writeln!(
            rules,
            "  - from: [{{ipBlock: {{cidr: {cidr}, except: [{}]}}}}]\n    ports: [{}]",
            except.join(", "),
            ports.join(", ")
        );
    };
    let broad: Vec<(u16, u16)> = (0..8).map(|i| (2000 + 2 * i, 2000 + 2 * i)).collect();
    rule("198.18.0.0/16", &["198.18.9.0/24"], &broad);
    rule(
        "198.19.0.0/16",
        &[],
        &[
            (5000, 5100),
            (5200, 5300),
            (5400, 5400),
            (5500, 5501),
            (5600, 5600),
        ],
    );
    for k in 0..30u16 {
        rule(&format!("198.18.{k}.0/24"), &[], &[(3000 + k, 3000 + k)]);
        if k % 3 == 0 {
            rule(&format!("198.18.{k}.0/24"), &[], &[(3100 + k, 3100 + k)]);
        }
    }
    for m in 0..100u16 {
        let cidr = format!("198.18.{}.{}/32", m % 30, m + 3);
        rule(&cidr, &[], &[(4000 + m % 7, 4000 + m % 7)]);
        rule(&format!("198.19.{}.{}/32", m % 5, m), &[], &[(4100, 4100)]);
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: t, labels: {{app: server}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}\n\
         status: {{phase: Running, podIP: {SERVER}, podIPs: [{{ip: {SERVER}}}]}}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow, namespace: t}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n{rules}"
    )
}

#[test]
fn nested_ipblocks_with_ports_of_their_own_share_trie_lists_and_decide_as_the_spec() {
    let mut m = manifests::Manifests::default();
    manifests::load_text(&mut m, Path::new("nested.yaml"), &manifests_text());
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let snap = m.snapshot("n1", vec!["198.18.255.1".parse().expect("ip")]);
    let cluster = Cluster::compile(&snap);
    let ports_entries: usize = cluster.maps.iter().map(|c| c.ports.len()).sum();
    // Shared: the two /16 lists and a few more, not one list per narrow prefix (> 1,000).
    assert!(ports_entries < 150, "{ports_entries} PORTS entries");

    let server: IpAddr = SERVER.parse().expect("ip");
    let mut sources: Vec<IpAddr> = Vec::new();
    for m in 0..100u8 {
        sources.push(format!("198.18.{}.{}", m % 30, m + 3).parse().expect("ip"));
        sources.push(format!("198.19.{}.{}", m % 5, m).parse().expect("ip"));
    }
    for s in [
        "198.18.5.200",
        "198.18.9.5",
        "198.18.9.200",
        "198.18.200.1",
        "198.19.3.200",
        "198.20.0.1",
    ] {
        sources.push(s.parse().expect("ip"));
    }
    let mut ports: Vec<u16> = vec![
        80, 1999, 2000, 2001, 2014, 2015, 5000, 5100, 5101, 5301, 5400, 5501, 5502, 5600,
    ];
    ports.extend(
        (3000..3031)
            .chain(3100..3131)
            .chain(3999..4008)
            .chain([4100, 4101]),
    );
    let (mut decided, mut allowed) = (0, 0);
    for src in &sources {
        for &port in &ports {
            let want = reference::allowed(
                &snap,
                &Endpoint::Host(*src),
                &Endpoint::Pod {
                    key: snap.pods.values().next().expect("pod").key(),
                    addr: server,
                },
                Protocol::Tcp,
                port,
            );
            let got = cluster.allowed(*src, server, Protocol::Tcp.number(), port);
            assert_eq!(got, want, "{src} -> {server} TCP/{port}");
            decided += 1;
            allowed += usize::from(got);
        }
    }
    assert!(
        allowed > decided / 20 && allowed < decided / 2,
        "{allowed} of {decided} allowed"
    );
}
