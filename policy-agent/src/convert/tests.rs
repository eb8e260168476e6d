use super::*;
use serde_json::json;

fn np(spec: serde_json::Value) -> Converted<model::NetworkPolicy> {
    let obj = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "x", "name": "p"},
        "spec": spec,
    });
    let np: net::NetworkPolicy = serde_json::from_value(obj).expect("shape");
    network_policy(&np)
}

fn only_error(c: &Converted<model::NetworkPolicy>) -> String {
    assert_eq!(c.errors.len(), 1, "{:?}", c.errors);
    c.errors[0].to_string()
}

#[test]
fn policy_types_default_to_ingress() {
    let c = np(json!({"podSelector": {}}));
    assert!(c.errors.is_empty());
    assert!(c.value.ingress_isolation && !c.value.egress_isolation);
    // SetDefaults_NetworkPolicy adds Egress only when `len(spec.egress) != 0`.
    let c = np(json!({"podSelector": {}, "egress": []}));
    assert!(c.value.ingress_isolation && !c.value.egress_isolation);
    let c = np(json!({"podSelector": {}, "egress": [{}]}));
    assert!(c.value.ingress_isolation && c.value.egress_isolation);
    let c = np(json!({"podSelector": {}, "policyTypes": ["Egress"]}));
    assert!(!c.value.ingress_isolation && c.value.egress_isolation);
}

#[test]
fn unknown_policy_type_isolates_both() {
    let c = np(json!({"podSelector": {}, "policyTypes": ["Ingres"]}));
    assert!(only_error(&c).contains("spec.policyTypes[0]"));
    assert!(c.value.ingress_isolation && c.value.egress_isolation);
}

#[test]
fn empty_from_means_all_peers() {
    let c = np(json!({"podSelector": {}, "ingress": [{"from": []}, {}]}));
    assert!(c.errors.is_empty());
    assert_eq!(
        c.value.ingress,
        vec![model::Rule::default(), model::Rule::default()]
    );
}

#[test]
fn host_bits_are_masked() {
    let c = np(
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.5/24", "except": ["198.18.0.129/25"]}}]}]}),
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    let model::Peer::IpBlock { cidr, except } = &c.value.ingress[0].peers.as_ref().unwrap()[0]
    else {
        panic!()
    };
    assert_eq!(cidr.to_string(), "198.18.0.0/24");
    assert_eq!(except[0].to_string(), "198.18.0.128/25");
}

#[test]
fn bad_except_drops_rule_and_names_path() {
    let c = np(json!({"ingress": [
        {"from": [{"podSelector": {}}]},
        {"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "198.18.0.0/24", "except": ["198.18.0.0/24"]}}]}]}));
    let e = only_error(&c);
    assert!(
        e.contains("networkpolicy x/p: spec.ingress[1].from[1].ipBlock.except[0]"),
        "{e}"
    );
    assert_eq!(c.value.ingress.len(), 1);
    assert!(c.value.ingress_isolation);
    for bad in ["198.19.0.0/25", "fd00::/64", "198.18.0.0/23"] {
        let c = np(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/24", "except": [bad]}}]}]}),
        );
        assert!(
            matches!(c.errors[..], [ConvertError::ExceptNotInside { .. }]),
            "{bad}"
        );
    }
}

#[test]
fn invalid_cidrs() {
    for bad in [
        "198.18.0.0",
        "198.18.0.0/33",
        "198.18.0.0/-1",
        "fd00::/129",
        "x/8",
        "198.018.0.0/16",
        "198.18.0.0/+8",
    ] {
        let c = np(json!({"egress": [{"to": [{"ipBlock": {"cidr": bad}}]}]}));
        assert!(
            matches!(c.errors[..], [ConvertError::InvalidCidr { .. }]),
            "{bad}: {:?}",
            c.errors
        );
        assert!(c.value.egress.is_empty());
        assert!(c.value.egress_isolation);
    }
}

#[test]
fn ports_validation() {
    let cases = [
        (json!({"port": 0}), "out of range"),
        (json!({"port": 65536}), "out of range"),
        (json!({"port": 80, "endPort": 79}), "less than port"),
        (json!({"port": "http", "endPort": 90}), "named port"),
        (json!({"endPort": 90}), "requires a numeric port"),
        (json!({"port": 80, "protocol": "tcp"}), "unknown protocol"),
        (json!({"port": 80, "protocol": "ICMP"}), "unknown protocol"),
        (json!({"port": "HTTP"}), "IANA_SVC_NAME"),
        (json!({"port": "a--b"}), "IANA_SVC_NAME"),
        (json!({"port": "-ab"}), "IANA_SVC_NAME"),
        (json!({"port": "80"}), "IANA_SVC_NAME"),
        (json!({"port": "abcdefghijklmnop"}), "IANA_SVC_NAME"),
    ];
    for (p, want) in cases {
        let c = np(json!({"ingress": [{"ports": [p.clone()]}]}));
        let e = only_error(&c);
        assert!(
            e.contains(want) && e.contains("spec.ingress[0].ports[0]"),
            "{p}: {e}"
        );
        assert!(c.value.ingress.is_empty());
    }
    let c = np(
        json!({"ingress": [{"ports": [{"port": 80, "endPort": 80, "protocol": "SCTP"}, {"port": "http-2"}, {"protocol": "UDP"}]}]}),
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert_eq!(
        c.value.ingress[0].ports,
        vec![
            model::PortSpec {
                protocol: Protocol::Sctp,
                port: Some(model::PortRef::Number(80)),
                end_port: Some(80)
            },
            model::PortSpec {
                protocol: Protocol::Tcp,
                port: Some(model::PortRef::Name("http-2".into())),
                end_port: None
            },
            model::PortSpec {
                protocol: Protocol::Udp,
                port: None,
                end_port: None
            },
        ]
    );
}

#[test]
fn selector_validation() {
    let cases = [
        (
            json!({"matchExpressions": [{"key": "a", "operator": "in", "values": ["x"]}]}),
            "unknown selector operator",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
            "must be empty",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "In"}]}),
            "must be non-empty",
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]}),
            "must be non-empty",
        ),
        (json!({"matchLabels": {"-a": "x"}}), "label key"),
        (json!({"matchLabels": {"Example.com/a": "x"}}), "label key"),
        (json!({"matchLabels": {"a": "x y"}}), "label value"),
        (json!({"matchLabels": {"a": "x".repeat(64)}}), "label value"),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "In", "values": ["ok", "-bad"]}]}),
            "label value",
        ),
    ];
    for (s, want) in cases {
        // In a peer: the rule is dropped.
        let c = np(json!({"ingress": [{"from": [{"namespaceSelector": s.clone()}]}]}));
        let e = only_error(&c);
        assert!(
            e.contains(want) && e.contains("spec.ingress[0].from[0].namespaceSelector"),
            "{s}: {e}"
        );
        assert!(c.value.ingress.is_empty());
        // As the podSelector: the whole namespace is isolated with no rule.
        let c = np(json!({"podSelector": s.clone(), "ingress": [{}], "egress": [{}]}));
        let e = only_error(&c);
        assert!(e.contains("spec.podSelector"), "{e}");
        assert!(c.value.pod_selector.is_everything());
        assert!(c.value.ingress.is_empty() && c.value.egress.is_empty());
        assert!(c.value.ingress_isolation && c.value.egress_isolation);
    }
    let c = np(
        json!({"podSelector": {"matchLabels": {"example.com/a_b.c": "", "x": "Y-1"},
        "matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]}}),
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
}

#[test]
fn peer_shapes() {
    let c = np(json!({"ingress": [{"from": [{}]}]}));
    assert!(only_error(&c).contains("must set"));
    let c = np(
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/16"}, "podSelector": {}}]}]}),
    );
    assert!(only_error(&c).contains("cannot be combined"));
    let c = np(json!({"ingress": [{"from": [{"podSelector": null, "namespaceSelector": {}}]}]}));
    assert!(c.errors.is_empty());
    assert_eq!(
        c.value.ingress[0].peers,
        Some(vec![model::Peer::Pods {
            namespaces: Some(model::LabelSelector::everything()),
            pods: None
        }])
    );
}

#[test]
fn missing_metadata() {
    let np: net::NetworkPolicy = serde_json::from_value(json!({"metadata": {}})).unwrap();
    let c = network_policy(&np);
    assert_eq!(c.errors.len(), 2);
    assert!(c.value.ingress_isolation);
}

#[test]
fn pod_conversion() {
    let p: core::Pod = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "a", "labels": {"app": "a"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
            {"containerPort": 80, "name": "http"}, {"containerPort": 53, "protocol": "UDP", "name": "dns"}]}],
            "initContainers": [
                {"name": "s", "restartPolicy": "Always", "ports": [{"containerPort": 9090, "name": "metrics"}]},
                {"name": "i", "ports": [{"containerPort": 9091, "name": "init"}]}]},
        "status": {"podIP": "198.18.0.9", "podIPs": [{"ip": "198.18.0.9"}, {"ip": "fd00::9"}]}
    })).unwrap();
    let m = pod(&p).unwrap();
    assert_eq!(
        m.ips,
        vec![
            "198.18.0.9".parse::<IpAddr>().unwrap(),
            "fd00::9".parse().unwrap()
        ]
    );
    assert_eq!(m.named_port("http", Protocol::Tcp), Some(80));
    assert_eq!(m.named_port("dns", Protocol::Udp), Some(53));
    assert_eq!(m.named_port("dns", Protocol::Tcp), None);
    assert_eq!(m.named_port("metrics", Protocol::Tcp), Some(9090));
    assert_eq!(m.named_port("init", Protocol::Tcp), None);
    assert_eq!(m.node.as_deref(), Some("n1"));
    assert!(!m.host_network);
    let p: core::Pod = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "a"}, "status": {"podIP": "198.18.0.9"}}))
    .unwrap();
    assert_eq!(pod(&p).unwrap().ips.len(), 1);
    let p: core::Pod = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
    assert!(
        pod(&p)
            .unwrap_err()
            .to_string()
            .contains("metadata.namespace")
    );
}

#[test]
fn namespace_gets_name_label() {
    let n: core::Namespace =
        serde_json::from_value(json!({"metadata": {"name": "x", "labels": {"a": "b"}}})).unwrap();
    let m = namespace(&n).unwrap();
    assert_eq!(
        m.labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("x")
    );
    assert_eq!(m.labels.get("a").map(String::as_str), Some("b"));
}
