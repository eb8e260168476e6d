//! The API server's defaulting and validation of NetworkPolicy, rule by rule, as the
//! conversion applies them: `SetDefaults_NetworkPolicy` / `SetDefaults_NetworkPolicyPort`
//! (pkg/apis/networking/v1/defaults.go) and `ValidateNetworkPolicy` and its helpers
//! (pkg/apis/networking/validation/validation.go, apimachinery's label selector and name
//! validation). Each test names the Go rule it pins. Where the API server would refuse the
//! object, the agent (which also reads objects no API server checked: standalone manifests)
//! reports a typed error naming the field and fails closed.
//!
//! Defaulting is also judged end to end: the reference evaluator derives isolation from what
//! the object wrote, on its own, and must agree with the compiled maps.

use crate::compiler_common;

use compiler_common::{Cluster, ip};
use k8s_openapi::api::networking::v1::NetworkPolicy as ApiPolicy;
use policy_agent::convert::{self, ConvertError};
use policy_agent::manifests::{Manifests, load_text};
use policy_agent::model::{self, PortRef, Protocol};
use policy_agent::reference::{self, Endpoint};
use policy_common::proto::TCP;

fn api(spec: &str) -> ApiPolicy {
    let text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{}",
        indent(spec)
    );
    policy_agent::manifests::yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("test policy: {e}\n{text}"))
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn conv(spec: &str) -> convert::Converted<model::NetworkPolicy> {
    convert::network_policy(&api(spec))
}

/// (ingress isolated, egress isolated) after defaulting, with no error.
fn isolation(spec: &str) -> (bool, bool) {
    let c = conv(spec);
    assert!(c.errors.is_empty(), "{spec}: {:?}", c.errors);
    (c.value.ingress_isolation, c.value.egress_isolation)
}

/// The errors' field paths.
fn paths(c: &convert::Converted<model::NetworkPolicy>) -> Vec<String> {
    c.errors.iter().map(|e| e.location().path.clone()).collect()
}

// --- SetDefaults_NetworkPolicy -------------------------------------------------------------

#[test]
fn policy_types_default_to_ingress_plus_egress_only_when_egress_has_rules() {
    // `len(obj.Spec.Egress) != 0`: an absent and an empty egress are the same.
    assert_eq!(isolation("podSelector: {}"), (true, false));
    assert_eq!(isolation("podSelector: {}\negress: []"), (true, false));
    assert_eq!(
        isolation("podSelector: {}\npolicyTypes: []\negress: []"),
        (true, false)
    );
    assert_eq!(isolation("podSelector: {}\negress: [{}]"), (true, true));
    assert_eq!(
        isolation("podSelector: {}\ningress: []\negress: [{}]"),
        (true, true)
    );
    // Given types are taken as they are, whatever the sections hold.
    assert_eq!(
        isolation("podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]"),
        (false, true)
    );
    assert_eq!(
        isolation("podSelector: {}\npolicyTypes: [Egress]"),
        (false, true)
    );
    assert_eq!(
        isolation("podSelector: {}\npolicyTypes: [Ingress]\negress: [{}]"),
        (true, false)
    );
    assert_eq!(
        isolation("podSelector: {}\npolicyTypes: [Ingress, Ingress]"),
        (true, false)
    );
}

#[test]
fn an_empty_egress_section_without_policy_types_leaves_egress_open_end_to_end() {
    let text = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 198.18.0.10, podIPs: [{ip: 198.18.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 198.18.0.11, podIPs: [{ip: 198.18.0.11}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: []
  egress: []
";
    let mut m = Manifests::default();
    load_text(&mut m, std::path::Path::new("t.yaml"), text);
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let snap = m.snapshot("n1", vec![]);
    let key = |n: &str| model::ObjectKey::new("x", n);
    let ep = |n: &str| Endpoint::pod(&snap, &key(n), false).expect("pod");
    // a's egress stays open; its ingress is closed.
    assert!(reference::allowed(
        &snap,
        &ep("a"),
        &ep("b"),
        Protocol::Tcp,
        80
    ));
    assert!(!reference::allowed(
        &snap,
        &ep("b"),
        &ep("a"),
        Protocol::Tcp,
        80
    ));
    let cluster = Cluster::compile(&snap);
    assert!(cluster.allowed(ip("198.18.0.10"), ip("198.18.0.11"), TCP, 80));
    assert!(!cluster.allowed(ip("198.18.0.11"), ip("198.18.0.10"), TCP, 80));
}

#[test]
fn the_reference_derives_policy_types_itself() {
    // A conversion that defaulted wrongly would be caught: the reference reads `declared`.
    let mut c = conv("podSelector: {matchLabels: {app: a}}\negress: []").value;
    let d = c.declared.clone().expect("declared");
    assert_eq!(d.policy_types, None);
    assert_eq!(d.egress_rules, 0);
    c.egress_isolation = true; // the old mistake, planted
    let mut snap = model::Snapshot::default();
    for (name, addr) in [("a", "198.18.0.10"), ("b", "198.18.0.11")] {
        let p = model::Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            ips: vec![ip(addr)],
            ports: vec![],
            host_network: false,
            node: Some("n1".into()),
        };
        snap.pods.insert(p.key(), p);
    }
    snap.policies.insert(c.key(), c);
    let ep = |n: &str| Endpoint::pod(&snap, &model::ObjectKey::new("x", n), false).unwrap();
    assert!(reference::allowed(
        &snap,
        &ep("a"),
        &ep("b"),
        Protocol::Tcp,
        80
    ));
    assert!(!Cluster::compile(&snap).allowed(ip("198.18.0.10"), ip("198.18.0.11"), TCP, 80));
}

// --- SetDefaults_NetworkPolicyPort ---------------------------------------------------------

#[test]
fn a_port_without_protocol_is_tcp() {
    let c = conv("podSelector: {}\ningress: [{ports: [{port: 80}, {}]}]");
    assert!(c.errors.is_empty());
    let ports = &c.value.ingress[0].ports;
    assert_eq!(ports[0].protocol, Protocol::Tcp);
    assert_eq!(ports[0].port, Some(PortRef::Number(80)));
    assert_eq!(ports[1].protocol, Protocol::Tcp);
    assert_eq!(ports[1].port, None);
}

// --- ValidateNetworkPolicySpec: policyTypes -------------------------------------------------

#[test]
fn policy_types_allow_ingress_and_egress_and_at_most_two_entries() {
    let c = conv("podSelector: {}\npolicyTypes: [Ingress, Egress, Ingress]");
    assert!(matches!(
        c.errors[..],
        [ConvertError::TooManyPolicyTypes { count: 3, .. }]
    ));
    assert_eq!(paths(&c), ["spec.policyTypes"]);
    assert!(c.value.ingress_isolation && c.value.egress_isolation);

    // field.NotSupported: case matters.
    let c = conv("podSelector: {}\npolicyTypes: [ingress]\ningress: [{}]");
    assert!(
        matches!(&c.errors[..], [ConvertError::UnknownPolicyType { value, .. }] if value == "ingress")
    );
    assert_eq!(paths(&c), ["spec.policyTypes[0]"]);
    assert!(c.value.ingress_isolation && c.value.egress_isolation);
}

// --- ValidateNetworkPolicyPort --------------------------------------------------------------

fn one_port_error(port: &str) -> (ConvertError, String) {
    let c = conv(&format!(
        "podSelector: {{}}\ningress: [{{ports: [{port}]}}]"
    ));
    assert_eq!(c.errors.len(), 1, "{port}: {:?}", c.errors);
    // The rule is dropped; the policy still isolates.
    assert!(c.value.ingress.is_empty() && c.value.ingress_isolation);
    let p = c.errors[0].location().path.clone();
    (c.errors.into_iter().next().expect("one error"), p)
}

#[test]
fn protocol_is_tcp_udp_or_sctp_exactly() {
    for bad in ["tcp", "ICMP", "\"\""] {
        let (e, p) = one_port_error(&format!("{{protocol: {bad}, port: 80}}"));
        assert!(matches!(e, ConvertError::UnknownProtocol { .. }), "{bad}");
        assert_eq!(p, "spec.ingress[0].ports[0].protocol");
    }
    for good in ["TCP", "UDP", "SCTP"] {
        assert!(
            conv(&format!(
                "podSelector: {{}}\ningress: [{{ports: [{{protocol: {good}}}]}}]"
            ))
            .errors
            .is_empty()
        );
    }
}

#[test]
fn a_numeric_port_is_1_to_65535() {
    for bad in ["0", "65536", "-1"] {
        let (e, p) = one_port_error(&format!("{{port: {bad}}}"));
        assert!(matches!(e, ConvertError::PortOutOfRange { .. }), "{bad}");
        assert_eq!(p, "spec.ingress[0].ports[0].port");
    }
    for good in ["1", "65535"] {
        assert!(
            conv(&format!(
                "podSelector: {{}}\ningress: [{{ports: [{{port: {good}}}]}}]"
            ))
            .errors
            .is_empty()
        );
    }
}

#[test]
fn end_port_is_at_least_port_in_range_and_needs_a_numeric_port() {
    let (e, p) = one_port_error("{port: 100, endPort: 99}");
    assert!(matches!(
        e,
        ConvertError::EndPortBelowPort {
            port: 100,
            end_port: 99,
            ..
        }
    ));
    assert_eq!(p, "spec.ingress[0].ports[0].endPort");
    let (e, _) = one_port_error("{port: 100, endPort: 65536}");
    assert!(matches!(
        e,
        ConvertError::PortOutOfRange { value: 65536, .. }
    ));
    let (e, _) = one_port_error("{port: http, endPort: 100}");
    assert!(matches!(e, ConvertError::EndPortWithNamedPort { .. }));
    let (e, _) = one_port_error("{endPort: 100}");
    assert!(matches!(e, ConvertError::EndPortWithoutPort { .. }));
    // endPort == port is a range of one.
    let c = conv("podSelector: {}\ningress: [{ports: [{port: 100, endPort: 100}]}]");
    assert!(c.errors.is_empty());
    assert_eq!(c.value.ingress[0].ports[0].end_port, Some(100));
}

#[test]
fn a_named_port_is_an_iana_service_name() {
    for bad in [
        "HTTP",
        "-web",
        "web-",
        "we--b",
        "1234",
        "abcdefghijklmnop",
        "web_1",
    ] {
        let (e, p) = one_port_error(&format!("{{port: \"{bad}\"}}"));
        assert!(matches!(e, ConvertError::InvalidPortName { .. }), "{bad}");
        assert_eq!(p, "spec.ingress[0].ports[0].port");
    }
    for good in ["http", "h2c", "a-b-c", "abcdefghijklmno", "1a"] {
        let c = conv(&format!(
            "podSelector: {{}}\ningress: [{{ports: [{{port: {good}}}]}}]"
        ));
        assert!(c.errors.is_empty(), "{good}: {:?}", c.errors);
    }
}

// --- ValidateNetworkPolicyPeer --------------------------------------------------------------

#[test]
fn a_peer_names_something_and_an_ip_block_stands_alone() {
    let c = conv("podSelector: {}\negress: [{to: [{}]}]");
    assert!(matches!(c.errors[..], [ConvertError::EmptyPeer { .. }]));
    assert_eq!(paths(&c), ["spec.egress[0].to[0]"]);
    assert!(c.value.egress.is_empty() && c.value.egress_isolation);

    let c = conv(
        "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
    );
    assert!(matches!(
        c.errors[..],
        [ConvertError::IpBlockWithSelector { .. }]
    ));
    assert_eq!(paths(&c), ["spec.ingress[0].from[0]"]);

    // podSelector and namespaceSelector together are one peer (AND), not an error.
    let c = conv("podSelector: {}\ningress: [{from: [{podSelector: {}, namespaceSelector: {}}]}]");
    assert!(c.errors.is_empty());
}

// --- ValidateIPBlock ------------------------------------------------------------------------

#[test]
fn an_ip_block_needs_a_cidr_and_excepts_strictly_inside_it() {
    let c = conv("podSelector: {}\ningress: [{from: [{ipBlock: {cidr: \"\"}}]}]");
    assert!(matches!(c.errors[..], [ConvertError::MissingField { .. }]));
    assert_eq!(paths(&c), ["spec.ingress[0].from[0].ipBlock.cidr"]);

    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "10.0.0.0/+8",
        "fd00::/129",
        "x/8",
    ] {
        let c = conv(&format!(
            "podSelector: {{}}\ningress: [{{from: [{{ipBlock: {{cidr: \"{bad}\"}}}}]}}]"
        ));
        assert!(
            matches!(c.errors[..], [ConvertError::InvalidCidr { .. }]),
            "{bad}"
        );
    }
    // ParseCIDR masks host bits: accepted.
    let c = conv("podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.1.2.3/8}}]}]");
    assert!(c.errors.is_empty());
    match &c.value.ingress[0].peers.as_ref().unwrap()[0] {
        model::Peer::IpBlock { cidr, .. } => assert_eq!(cidr.to_string(), "10.0.0.0/8"),
        p => panic!("{p:?}"),
    }
    // "must be a strict subset of `cidr`": equal, outside, or of the other family.
    for bad in ["10.0.0.0/8", "11.0.0.0/16", "fd00::/64", "0.0.0.0/0"] {
        let c = conv(&format!(
            "podSelector: {{}}\ningress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [\"{bad}\"]}}}}]}}]"
        ));
        assert!(
            matches!(c.errors[..], [ConvertError::ExceptNotInside { .. }]),
            "{bad}"
        );
        assert_eq!(paths(&c), ["spec.ingress[0].from[0].ipBlock.except[0]"]);
        assert!(c.value.ingress.is_empty() && c.value.ingress_isolation);
    }
}

// --- ValidateLabelSelector (apimachinery) ---------------------------------------------------

#[test]
fn selector_operators_values_keys_and_values_are_validated() {
    let cases = [
        (
            "{matchExpressions: [{key: a, operator: Equals, values: [b]}]}",
            "UnknownOperator",
            ".matchExpressions[0].operator",
        ),
        (
            "{matchExpressions: [{key: a, operator: In}]}",
            "ValuesRequired",
            ".matchExpressions[0].values",
        ),
        (
            "{matchExpressions: [{key: a, operator: NotIn, values: []}]}",
            "ValuesRequired",
            ".matchExpressions[0].values",
        ),
        (
            "{matchExpressions: [{key: a, operator: Exists, values: [b]}]}",
            "ValuesNotAllowed",
            ".matchExpressions[0].values",
        ),
        (
            "{matchExpressions: [{key: a, operator: DoesNotExist, values: [b]}]}",
            "ValuesNotAllowed",
            ".matchExpressions[0].values",
        ),
        (
            "{matchExpressions: [{key: \"a b\", operator: Exists}]}",
            "InvalidLabelKey",
            ".matchExpressions[0].key",
        ),
        (
            "{matchExpressions: [{key: a, operator: In, values: [\"-b\"]}]}",
            "InvalidLabelValue",
            ".matchExpressions[0].values[0]",
        ),
        (
            "{matchLabels: {\"Example.com/a\": b}}",
            "InvalidLabelKey",
            ".matchLabels[\"Example.com/a\"]",
        ),
        (
            "{matchLabels: {a: \"b c\"}}",
            "InvalidLabelValue",
            ".matchLabels[\"a\"]",
        ),
    ];
    for (sel, kind, suffix) in cases {
        // In a peer: the rule is dropped.
        let c = conv(&format!(
            "podSelector: {{}}\ningress: [{{from: [{{namespaceSelector: {sel}}}]}}]"
        ));
        assert_eq!(c.errors.len(), 1, "{sel}: {:?}", c.errors);
        assert!(
            format!("{:?}", c.errors[0]).starts_with(kind),
            "{sel}: {:?}",
            c.errors[0]
        );
        assert_eq!(
            paths(&c),
            [format!("spec.ingress[0].from[0].namespaceSelector{suffix}")]
        );
        assert!(c.value.ingress.is_empty() && c.value.ingress_isolation);
        // As the policy's podSelector: the whole namespace is isolated, nothing allowed.
        let c = conv(&format!(
            "podSelector: {sel}\ningress: [{{}}]\negress: [{{}}]"
        ));
        assert_eq!(paths(&c), [format!("spec.podSelector{suffix}")]);
        assert_eq!(c.value.pod_selector, model::LabelSelector::everything());
        assert!(c.value.ingress.is_empty() && c.value.egress.is_empty());
    }
    // Qualified keys with a DNS prefix, empty values: valid.
    let c = conv("podSelector: {matchLabels: {\"example.com/a_b.c\": \"\"}}");
    assert!(c.errors.is_empty(), "{:?}", c.errors);
}

// --- ValidateNetworkPolicy: object meta -----------------------------------------------------

#[test]
fn names_are_validated_and_reported_without_changing_enforcement() {
    let mut np = api("podSelector: {}");
    np.metadata.name = Some("Bad_Name".into());
    np.metadata.namespace = Some("x.y".into());
    let c = convert::network_policy(&np);
    let mut p = paths(&c);
    p.sort();
    assert_eq!(p, ["metadata.name", "metadata.namespace"]);
    assert!(
        c.errors
            .iter()
            .all(|e| matches!(e, ConvertError::InvalidName { .. }))
    );
    assert!(c.value.ingress_isolation);
    np.metadata.name = Some("a.b-c".into());
    np.metadata.namespace = Some("x-1".into());
    assert!(convert::network_policy(&np).errors.is_empty());
    // Missing ones are errors of their own.
    np.metadata.name = None;
    assert!(matches!(
        convert::network_policy(&np).errors[..],
        [ConvertError::MissingField { .. }]
    ));
}
