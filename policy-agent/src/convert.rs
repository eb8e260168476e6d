//! Conversion of Kubernetes API objects (`k8s_openapi`) into the domain model, with the
//! validation the API server would do. The only module that sees `k8s_openapi`.
//!
//! Bad input never panics and never widens what a policy allows: an invalid rule is dropped
//! (it allows nothing) while the policy keeps isolating what it selects; an invalid
//! `podSelector` makes the policy isolate its whole namespace; an unknown `policyTypes` entry
//! isolates both directions. Every problem is reported as a [`ConvertError`] naming the object
//! and the field path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{self, Labels, Protocol};

/// A converted object and the problems found in it. `value` is always usable: it is the
/// fail-closed interpretation of the object.
#[derive(Debug)]
pub struct Converted<T> {
    pub value: T,
    pub errors: Vec<ConvertError>,
}

/// Where a problem is: the object ("networkpolicy ns/name") and the field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub object: String,
    pub path: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.object)
        } else {
            write!(f, "{}: {}", self.object, self.path)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{at}: missing")]
    MissingField { at: Location },
    #[error("{at}: {value:?} is not a valid CIDR")]
    InvalidCidr { at: Location, value: String },
    #[error("{at}: except {except} is not strictly inside cidr {cidr}")]
    ExceptNotInside {
        at: Location,
        except: String,
        cidr: String,
    },
    #[error("{at}: port {value} is out of range 1-65535")]
    PortOutOfRange { at: Location, value: i64 },
    #[error("{at}: endPort {end_port} is less than port {port}")]
    EndPortBelowPort {
        at: Location,
        port: u16,
        end_port: i64,
    },
    #[error("{at}: endPort cannot be used with the named port {name:?}")]
    EndPortWithNamedPort { at: Location, name: String },
    #[error("{at}: endPort requires a numeric port")]
    EndPortWithoutPort { at: Location },
    #[error("{at}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol { at: Location, value: String },
    #[error("{at}: unknown selector operator {value:?} (expected In, NotIn, Exists, DoesNotExist)")]
    UnknownOperator { at: Location, value: String },
    #[error("{at}: values must be empty when the operator is {operator}")]
    ValuesNotAllowed {
        at: Location,
        operator: &'static str,
    },
    #[error("{at}: values must be non-empty when the operator is {operator}")]
    ValuesRequired {
        at: Location,
        operator: &'static str,
    },
    #[error("{at}: {value:?} is not a valid label key")]
    InvalidLabelKey { at: Location, value: String },
    #[error("{at}: {value:?} is not a valid label value")]
    InvalidLabelValue { at: Location, value: String },
    #[error("{at}: {value:?} is not a valid port name (IANA_SVC_NAME)")]
    InvalidPortName { at: Location, value: String },
    #[error(
        "{at}: unknown policy type {value:?} (expected Ingress or Egress); isolating both directions"
    )]
    UnknownPolicyType { at: Location, value: String },
    #[error("{at}: {count} entries, at most two (Ingress, Egress); isolating both directions")]
    TooManyPolicyTypes { at: Location, count: usize },
    #[error("{at}: {value:?} is not a valid {kind} name")]
    InvalidName {
        at: Location,
        value: String,
        kind: &'static str,
    },
    #[error("{at}: a peer must set podSelector, namespaceSelector or ipBlock")]
    EmptyPeer { at: Location },
    #[error("{at}: ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector { at: Location },
}

impl ConvertError {
    pub fn location(&self) -> &Location {
        match self {
            ConvertError::MissingField { at }
            | ConvertError::InvalidCidr { at, .. }
            | ConvertError::ExceptNotInside { at, .. }
            | ConvertError::PortOutOfRange { at, .. }
            | ConvertError::EndPortBelowPort { at, .. }
            | ConvertError::EndPortWithNamedPort { at, .. }
            | ConvertError::EndPortWithoutPort { at }
            | ConvertError::UnknownProtocol { at, .. }
            | ConvertError::UnknownOperator { at, .. }
            | ConvertError::ValuesNotAllowed { at, .. }
            | ConvertError::ValuesRequired { at, .. }
            | ConvertError::InvalidLabelKey { at, .. }
            | ConvertError::InvalidLabelValue { at, .. }
            | ConvertError::InvalidPortName { at, .. }
            | ConvertError::UnknownPolicyType { at, .. }
            | ConvertError::TooManyPolicyTypes { at, .. }
            | ConvertError::InvalidName { at, .. }
            | ConvertError::EmptyPeer { at }
            | ConvertError::IpBlockWithSelector { at } => at,
        }
    }
}

/// Collects errors for one object; paths are built as the walk descends.
struct Ctx {
    object: String,
    errors: Vec<ConvertError>,
}

impl Ctx {
    fn at(&self, path: &str) -> Location {
        Location {
            object: self.object.clone(),
            path: path.to_owned(),
        }
    }
}

fn object_name(kind: &str, meta: &meta::ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
        (None, Some(n)) => format!("{kind} {n}"),
        (Some(ns), None) => format!("{kind} {ns}/<unnamed>"),
        (None, None) => format!("{kind} <unnamed>"),
    }
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicy
// ---------------------------------------------------------------------------------------------

/// Converts a NetworkPolicy. A policy without namespace or name is reported and converted
/// with an empty string in its place (the caller decides whether to keep it).
pub fn network_policy(np: &net::NetworkPolicy) -> Converted<model::NetworkPolicy> {
    let mut cx = Ctx {
        object: object_name("networkpolicy", &np.metadata),
        errors: Vec::new(),
    };
    let namespace = required(
        &mut cx,
        np.metadata.namespace.as_ref(),
        "metadata.namespace",
    );
    let name = required(&mut cx, np.metadata.name.as_ref(), "metadata.name");
    // ValidateNetworkPolicy: the name is a DNS subdomain, the namespace a DNS label. Only
    // reported: a name decides nothing about traffic.
    check_name(
        &mut cx,
        &namespace,
        "metadata.namespace",
        "namespace",
        valid_dns_label,
    );
    check_name(
        &mut cx,
        &name,
        "metadata.name",
        "networkpolicy",
        valid_dns_subdomain,
    );
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    // policyTypes defaulting as SetDefaults_NetworkPolicy (pkg/apis/networking/v1/defaults.go):
    // absent or empty means Ingress, plus Egress when `len(spec.egress) != 0`, so an empty
    // `egress: []` leaves egress open. Validation allows at most two entries, each Ingress or
    // Egress; anything else is reported and isolates both directions (fail closed).
    let (mut ingress_isolation, mut egress_isolation) = (false, false);
    let egress_rules = spec.egress.as_ref().map_or(0, Vec::len);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            ingress_isolation = true;
            egress_isolation = egress_rules != 0;
        }
        Some(types) if types.len() > 2 => {
            cx.errors.push(ConvertError::TooManyPolicyTypes {
                at: cx.at("spec.policyTypes"),
                count: types.len(),
            });
            ingress_isolation = true;
            egress_isolation = true;
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_isolation = true,
                    "Egress" => egress_isolation = true,
                    other => {
                        cx.errors.push(ConvertError::UnknownPolicyType {
                            at: cx.at(&format!("spec.policyTypes[{i}]")),
                            value: other.to_owned(),
                        });
                        ingress_isolation = true;
                        egress_isolation = true;
                    }
                }
            }
        }
    }
    let declared = model::Declared {
        policy_types: spec.policy_types.clone(),
        egress_rules,
    };

    let selector = match spec.pod_selector.as_ref() {
        None => Some(model::LabelSelector::everything()),
        Some(s) => selector(&mut cx, s, "spec.podSelector"),
    };
    let (pod_selector, selector_ok) = match selector {
        Some(s) => (s, true),
        None => (model::LabelSelector::everything(), false),
    };

    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        if let Some(rule) = rule(
            &mut cx,
            r.from.as_deref(),
            r.ports.as_deref(),
            &path,
            "from",
        ) {
            ingress.push(rule);
        }
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        if let Some(rule) = rule(&mut cx, r.to.as_deref(), r.ports.as_deref(), &path, "to") {
            egress.push(rule);
        }
    }
    if !selector_ok {
        // The policy's scope is unknown: isolate the whole namespace and allow nothing.
        ingress.clear();
        egress.clear();
    }

    Converted {
        value: model::NetworkPolicy {
            namespace,
            name,
            pod_selector,
            ingress_isolation,
            egress_isolation,
            ingress,
            egress,
            declared: Some(declared),
        },
        errors: cx.errors,
    }
}

fn required(cx: &mut Ctx, v: Option<&String>, path: &str) -> String {
    match v {
        Some(s) if !s.is_empty() => s.clone(),
        _ => {
            cx.errors
                .push(ConvertError::MissingField { at: cx.at(path) });
            String::new()
        }
    }
}

fn check_name(cx: &mut Ctx, v: &str, path: &str, kind: &'static str, ok: fn(&str) -> bool) {
    if !v.is_empty() && !ok(v) {
        cx.errors.push(ConvertError::InvalidName {
            at: cx.at(path),
            value: v.to_owned(),
            kind,
        });
    }
}

/// One rule; `None` when any part of it is invalid (the rule is dropped: fail closed).
fn rule(
    cx: &mut Ctx,
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
) -> Option<model::Rule> {
    let before = cx.errors.len();
    let peers_out = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| peer(cx, p, &format!("{path}.{peers_field}[{i}]")))
                .collect::<Vec<_>>(),
        ),
    };
    let ports_out: Vec<model::PortSpec> = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| port(cx, p, &format!("{path}.ports[{i}]")))
        .collect();
    if cx.errors.len() != before {
        return None;
    }
    Some(model::Rule {
        peers: peers_out,
        ports: ports_out,
    })
}

fn peer(cx: &mut Ctx, p: &net::NetworkPolicyPeer, path: &str) -> Option<model::Peer> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (None, None, None) => {
            cx.errors.push(ConvertError::EmptyPeer { at: cx.at(path) });
            None
        }
        (Some(_), ns, pods) if ns.is_some() || pods.is_some() => {
            cx.errors
                .push(ConvertError::IpBlockWithSelector { at: cx.at(path) });
            None
        }
        (Some(b), _, _) => ip_block(cx, b, &format!("{path}.ipBlock")),
        (None, ns, pods) => {
            let namespaces = match ns {
                Some(s) => Some(selector(cx, s, &format!("{path}.namespaceSelector"))?),
                None => None,
            };
            let pods = match pods {
                Some(s) => Some(selector(cx, s, &format!("{path}.podSelector"))?),
                None => None,
            };
            Some(model::Peer::Pods { namespaces, pods })
        }
    }
}

fn ip_block(cx: &mut Ctx, b: &net::IPBlock, path: &str) -> Option<model::Peer> {
    let cidr_path = format!("{path}.cidr");
    if b.cidr.is_empty() {
        cx.errors.push(ConvertError::MissingField {
            at: cx.at(&cidr_path),
        });
        return None;
    }
    let Some(cidr) = parse_cidr(&b.cidr) else {
        cx.errors.push(ConvertError::InvalidCidr {
            at: cx.at(&cidr_path),
            value: b.cidr.clone(),
        });
        return None;
    };
    let mut except = Vec::new();
    let mut ok = true;
    for (i, e) in b.except.iter().flatten().enumerate() {
        let epath = format!("{path}.except[{i}]");
        match parse_cidr(e) {
            None => {
                cx.errors.push(ConvertError::InvalidCidr {
                    at: cx.at(&epath),
                    value: e.clone(),
                });
                ok = false;
            }
            Some(en) => {
                if strictly_inside(&en, &cidr) {
                    except.push(en);
                } else {
                    cx.errors.push(ConvertError::ExceptNotInside {
                        at: cx.at(&epath),
                        except: e.clone(),
                        cidr: b.cidr.clone(),
                    });
                    ok = false;
                }
            }
        }
    }
    if !ok {
        return None;
    }
    except.sort();
    except.dedup();
    Some(model::Peer::IpBlock { cidr, except })
}

/// Parses a CIDR as Go's `net.ParseCIDR` does: host bits are accepted and masked off.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    // Go accepts only plain decimal digits for the length.
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

fn strictly_inside(inner: &IpNet, outer: &IpNet) -> bool {
    inner.prefix_len() > outer.prefix_len()
        && outer.contains(&inner.network())
        && matches!(
            (inner, outer),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        )
}

fn port(cx: &mut Ctx, p: &net::NetworkPolicyPort, path: &str) -> Option<model::PortSpec> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::parse(s) {
            Some(pr) => pr,
            None => {
                cx.errors.push(ConvertError::UnknownProtocol {
                    at: cx.at(&format!("{path}.protocol")),
                    value: s.to_owned(),
                });
                return None;
            }
        },
    };
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => match u16::try_from(*n) {
            Ok(v) if v != 0 => Some(model::PortRef::Number(v)),
            _ => {
                cx.errors.push(ConvertError::PortOutOfRange {
                    at: cx.at(&format!("{path}.port")),
                    value: i64::from(*n),
                });
                return None;
            }
        },
        Some(IntOrString::String(s)) => {
            if !valid_port_name(s) {
                cx.errors.push(ConvertError::InvalidPortName {
                    at: cx.at(&format!("{path}.port")),
                    value: s.clone(),
                });
                return None;
            }
            Some(model::PortRef::Name(s.clone()))
        }
    };
    let end_port = match p.end_port {
        None => None,
        Some(e) => {
            let at = cx.at(&format!("{path}.endPort"));
            match &port {
                None => {
                    cx.errors.push(ConvertError::EndPortWithoutPort { at });
                    return None;
                }
                Some(model::PortRef::Name(n)) => {
                    cx.errors.push(ConvertError::EndPortWithNamedPort {
                        at,
                        name: n.clone(),
                    });
                    return None;
                }
                Some(model::PortRef::Number(start)) => {
                    let start = *start;
                    if !(1..=65535).contains(&e) {
                        cx.errors.push(ConvertError::PortOutOfRange {
                            at,
                            value: i64::from(e),
                        });
                        return None;
                    }
                    if i64::from(e) < i64::from(start) {
                        cx.errors.push(ConvertError::EndPortBelowPort {
                            at,
                            port: start,
                            end_port: i64::from(e),
                        });
                        return None;
                    }
                    u16::try_from(e).ok()
                }
            }
        }
    };
    Some(model::PortSpec {
        protocol,
        port,
        end_port,
    })
}

/// Converts a label selector; `None` (with errors pushed) when any part is invalid.
fn selector(cx: &mut Ctx, s: &meta::LabelSelector, path: &str) -> Option<model::LabelSelector> {
    let before = cx.errors.len();
    let mut match_labels = BTreeMap::new();
    for (k, v) in s.match_labels.iter().flatten() {
        let p = format!("{path}.matchLabels[{k:?}]");
        if !valid_label_key(k) {
            cx.errors.push(ConvertError::InvalidLabelKey {
                at: cx.at(&p),
                value: k.clone(),
            });
        } else if !valid_label_value(v) {
            cx.errors.push(ConvertError::InvalidLabelValue {
                at: cx.at(&p),
                value: v.clone(),
            });
        } else {
            match_labels.insert(k.clone(), v.clone());
        }
    }
    let mut match_expressions = Vec::new();
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if !valid_label_key(&r.key) {
            cx.errors.push(ConvertError::InvalidLabelKey {
                at: cx.at(&format!("{p}.key")),
                value: r.key.clone(),
            });
            continue;
        }
        let operator = match r.operator.as_str() {
            "In" => model::Operator::In,
            "NotIn" => model::Operator::NotIn,
            "Exists" => model::Operator::Exists,
            "DoesNotExist" => model::Operator::DoesNotExist,
            other => {
                cx.errors.push(ConvertError::UnknownOperator {
                    at: cx.at(&format!("{p}.operator")),
                    value: other.to_owned(),
                });
                continue;
            }
        };
        let values: &[String] = r.values.as_deref().unwrap_or_default();
        match operator {
            model::Operator::In | model::Operator::NotIn if values.is_empty() => {
                cx.errors.push(ConvertError::ValuesRequired {
                    at: cx.at(&format!("{p}.values")),
                    operator: if operator == model::Operator::In {
                        "In"
                    } else {
                        "NotIn"
                    },
                });
                continue;
            }
            model::Operator::Exists | model::Operator::DoesNotExist if !values.is_empty() => {
                cx.errors.push(ConvertError::ValuesNotAllowed {
                    at: cx.at(&format!("{p}.values")),
                    operator: if operator == model::Operator::Exists {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    },
                });
                continue;
            }
            _ => {}
        }
        let mut set = BTreeSet::new();
        for (j, v) in values.iter().enumerate() {
            if valid_label_value(v) {
                set.insert(v.clone());
            } else {
                cx.errors.push(ConvertError::InvalidLabelValue {
                    at: cx.at(&format!("{p}.values[{j}]")),
                    value: v.clone(),
                });
            }
        }
        match_expressions.push(model::Requirement {
            key: r.key.clone(),
            operator,
            values: set,
        });
    }
    if cx.errors.len() != before {
        return None;
    }
    // Canonical order so equal selectors compare equal.
    match_expressions.sort();
    match_expressions.dedup();
    Some(model::LabelSelector {
        match_labels,
        match_expressions,
    })
}

// ---------------------------------------------------------------------------------------------
// Name syntax (Kubernetes apimachinery validation)
// ---------------------------------------------------------------------------------------------

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters, non-empty.
fn valid_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// DNS-1123 subdomain: at most 253 characters, dot-separated lowercase alphanumeric labels
/// with inner '-'.
fn valid_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && is_lower_alnum(b[0])
                && is_lower_alnum(b[b.len() - 1])
                && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        })
}

/// DNS-1123 label (a namespace name): one subdomain label.
fn valid_dns_label(s: &str) -> bool {
    !s.contains('.') && valid_dns_subdomain(s)
}

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A qualified name: an optional DNS-subdomain prefix and '/', then a label name.
pub fn valid_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => valid_dns_subdomain(prefix) && valid_label_name(name),
        None => valid_label_name(s),
    }
}

/// Empty, or a label name.
pub fn valid_label_value(s: &str) -> bool {
    s.is_empty() || valid_label_name(s)
}

/// IANA_SVC_NAME: at most 15 characters of lowercase alphanumerics and '-', at least one
/// letter, no leading, trailing or double '-'.
pub fn valid_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

// ---------------------------------------------------------------------------------------------
// Pod and Namespace
// ---------------------------------------------------------------------------------------------

/// Converts a pod. Unusable details (an address or container port that does not parse) are
/// left out; only a missing namespace or name is an error.
pub fn pod(p: &core::Pod) -> Result<model::Pod, ConvertError> {
    let mut cx = Ctx {
        object: object_name("pod", &p.metadata),
        errors: Vec::new(),
    };
    let namespace = required(&mut cx, p.metadata.namespace.as_ref(), "metadata.namespace");
    let name = required(&mut cx, p.metadata.name.as_ref(), "metadata.name");
    if let Some(e) = cx.errors.into_iter().next() {
        return Err(e);
    }
    let labels: Labels = p.metadata.labels.clone().unwrap_or_default();
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();

    // A finished pod's address may already belong to a new pod: it is no longer an endpoint
    // or a peer.
    let terminal = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let mut ips: Vec<IpAddr> = Vec::new();
    if !terminal && let Some(st) = status {
        let listed: Vec<&str> = match st.pod_ips.as_deref() {
            Some(list) if !list.is_empty() => list.iter().map(|i| i.ip.as_str()).collect(),
            _ => st.pod_ip.iter().map(String::as_str).collect(),
        };
        for s in listed {
            match s.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => tracing::warn!(pod = %cx.object, ip = s, "ignoring unparsable pod IP"),
            }
        }
    }

    let mut ports = Vec::new();
    if let Some(spec) = spec {
        // Sidecars (init containers with restartPolicy Always) run beside the app containers
        // and their ports are resolvable like any other.
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        for c in spec.containers.iter().chain(sidecars) {
            for cp in c.ports.iter().flatten() {
                let Ok(port) = u16::try_from(cp.container_port) else {
                    continue;
                };
                if port == 0 {
                    continue;
                }
                let Some(protocol) = Protocol::parse(cp.protocol.as_deref().unwrap_or("TCP"))
                else {
                    continue;
                };
                let name = cp.name.clone().filter(|n| valid_port_name(n));
                let entry = model::ContainerPort {
                    name,
                    port,
                    protocol,
                };
                if !ports.contains(&entry) {
                    ports.push(entry);
                }
            }
        }
    }

    Ok(model::Pod {
        namespace,
        name,
        labels,
        ips,
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
    })
}

/// Converts a namespace, adding the `kubernetes.io/metadata.name` label the API server sets.
pub fn namespace(n: &core::Namespace) -> Result<model::Namespace, ConvertError> {
    let mut cx = Ctx {
        object: object_name("namespace", &n.metadata),
        errors: Vec::new(),
    };
    let name = required(&mut cx, n.metadata.name.as_ref(), "metadata.name");
    if let Some(e) = cx.errors.into_iter().next() {
        return Err(e);
    }
    let mut labels: Labels = n.metadata.labels.clone().unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".to_owned(), name.clone());
    Ok(model::Namespace { name, labels })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
