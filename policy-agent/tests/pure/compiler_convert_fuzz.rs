//! Property: conversion never panics on arbitrary objects shaped like NetworkPolicies, Pods
//! and Namespaces (garbage included), and what it returns keeps the model's invariants and
//! fails closed.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use policy_agent::convert;
use policy_agent::model::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Value, json};

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop::sample::select(vec![
            -1i64,
            0,
            1,
            53,
            80,
            65535,
            65536,
            i64::from(i32::MAX),
            i64::MIN
        ])
        .prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "TCP",
            "tcp",
            "UDP",
            "SCTP",
            "ICMP",
            "In",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "in",
            "Ingress",
            "Egress",
            "ingress",
            "http",
            "HTTP",
            "a--b",
            "-x",
            "80",
            "app",
            "web",
            "example.com/app",
            "Example.com/app",
            "a/b/c",
            "x y",
            "198.18.0.0/16",
            "198.18.0.5/24",
            "198.18.1.0/24",
            "198.18.0.0/33",
            "fd00::/64",
            "fd00::/129",
            "::ffff:198.18.0.0/112",
            "0.0.0.0/0",
            "::/0",
            "198.18.0.0",
            "garbage",
            "\u{0}",
            "ü",
            "1.2.3.4/8",
        ])
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "cidr",
                    "except",
                    "port",
                    "endPort",
                    "protocol",
                    "podSelector",
                    "namespaceSelector",
                    "ipBlock",
                    "matchLabels",
                    "matchExpressions",
                    "key",
                    "operator",
                    "values",
                    "from",
                    "to",
                    "ports",
                    "app",
                    "x"
                ])
                .prop_map(String::from),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn peer() -> impl Strategy<Value = Value> {
    (
        prop::option::of(selector()),
        prop::option::of(selector()),
        prop::option::weighted(
            0.3,
            (
                mostly(vec![
                    json!("198.18.0.0/16"),
                    json!("fd00::/64"),
                    json!("198.18.0.5/24"),
                ]),
                prop::collection::vec(
                    mostly(vec![json!("198.18.1.0/24"), json!("fd00::/96")]),
                    0..3,
                ),
            ),
        ),
    )
        .prop_map(|(ps, ns, ipb)| {
            let mut m = serde_json::Map::new();
            if let Some(v) = ps {
                m.insert("podSelector".into(), v);
            }
            if let Some(v) = ns {
                m.insert("namespaceSelector".into(), v);
            }
            if let Some((c, e)) = ipb {
                m.insert("ipBlock".into(), json!({"cidr": c, "except": e}));
            }
            Value::Object(m)
        })
}

fn mostly(good: Vec<Value>) -> impl Strategy<Value = Value> {
    prop_oneof![4 => prop::sample::select(good), 1 => scalar()]
}

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(json!({})),
        3 => prop::sample::select(vec!["web", "db"]).prop_map(|a| json!({"matchLabels": {"app": a}})),
        1 => value(),
        1 => (prop::collection::btree_map(prop::sample::select(vec!["app", "a/b", "-x", "example.com/a"]).prop_map(String::from), scalar(), 0..3),
         prop::collection::vec((scalar(), scalar(), prop::option::of(prop::collection::vec(scalar(), 0..3))), 0..3))
            .prop_map(|(ml, me)| json!({"matchLabels": ml, "matchExpressions": me.into_iter().map(|(k, o, v)| json!({"key": k, "operator": o, "values": v})).collect::<Vec<_>>()})),
    ]
}

fn rule(peers_key: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::collection::vec(peer(), 0..3)),
        prop::option::of(prop::collection::vec(
            (
                mostly(vec![json!("TCP"), json!("UDP"), json!("SCTP"), Value::Null]),
                mostly(vec![json!(80), json!("http"), Value::Null]),
                prop_oneof![3 => Just(Value::Null), 1 => scalar()],
            )
                .prop_map(|(pr, p, e)| json!({"protocol": pr, "port": p, "endPort": e})),
            0..3,
        )),
    )
        .prop_map(move |(peers, ports)| json!({peers_key: peers, "ports": ports}))
}

fn policy_json() -> impl Strategy<Value = Value> {
    (
        selector(),
        prop::option::of(prop::collection::vec(
            mostly(vec![json!("Ingress"), json!("Egress")]),
            0..3,
        )),
        prop::option::of(prop::collection::vec(rule("from"), 0..3)),
        prop::option::of(prop::collection::vec(rule("to"), 0..3)),
        mostly(vec![json!("x")]),
        mostly(vec![json!("p")]),
    )
        .prop_map(|(ps, types, ing, eg, ns, name)| {
            json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": {"podSelector": ps, "policyTypes": types, "ingress": ing, "egress": eg},
            })
        })
}

fn check(p: &NetworkPolicy, errors: &[convert::ConvertError]) {
    for r in p.ingress.iter().chain(&p.egress) {
        for peer in r.peers.iter().flatten() {
            if let Peer::IpBlock { cidr, except } = peer {
                assert_eq!(*cidr, cidr.trunc());
                for e in except {
                    assert!(e.prefix_len() > cidr.prefix_len() && cidr.contains(&e.network()));
                }
            }
        }
        for port in &r.ports {
            match (&port.port, port.end_port) {
                (Some(PortRef::Number(n)), e) => assert!(*n > 0 && e.is_none_or(|e| e >= *n)),
                (Some(PortRef::Name(n)), e) => assert!(!n.is_empty() && e.is_none()),
                (None, e) => assert!(e.is_none()),
            }
        }
    }
    assert!(
        p.ingress_isolation || p.egress_isolation,
        "a policy always isolates something"
    );
    for e in errors {
        let msg = e.to_string();
        assert!(msg.starts_with("networkpolicy "), "{msg}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn policies_never_panic(v in prop_oneof![policy_json(), value()]) {
        if let Ok(np) = serde_json::from_value::<net::NetworkPolicy>(v) {
            let c = convert::network_policy(&np);
            check(&c.value, &c.errors);
        }
    }

    #[test]
    fn pods_and_namespaces_never_panic(v in value(), ips in prop::collection::vec(scalar(), 0..3), ports in prop::collection::vec((scalar(), scalar(), scalar()), 0..3)) {
        let pod = json!({"metadata": {"namespace": "x", "name": "p", "labels": v.clone()},
            "spec": {"containers": [{"name": "c", "ports": ports.iter().map(|(n, p, pr)| json!({"name": n, "containerPort": p, "protocol": pr})).collect::<Vec<_>>()}]},
            "status": {"podIPs": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}});
        if let Ok(p) = serde_json::from_value::<core::Pod>(pod) {
            let m = convert::pod(&p).expect("named pod");
            prop_assert!(m.ports.iter().all(|p| p.port > 0));
        }
        if let Ok(p) = serde_json::from_value::<core::Pod>(v.clone()) {
            let _ = convert::pod(&p);
        }
        if let Ok(n) = serde_json::from_value::<core::Namespace>(v) {
            let _ = convert::namespace(&n);
        }
    }
}

/// The generator reaches the converter with both valid and invalid policies.
#[test]
fn generator_reaches_both_outcomes() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..500 {
        let v = policy_json().new_tree(&mut runner).expect("tree").current();
        if let Ok(np) = serde_json::from_value::<net::NetworkPolicy>(v) {
            if convert::network_policy(&np).errors.is_empty() {
                ok += 1
            } else {
                bad += 1
            }
        }
    }
    assert!(ok > 10 && bad > 10, "ok {ok} bad {bad}");
}
