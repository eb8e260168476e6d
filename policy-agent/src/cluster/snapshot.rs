//! Store snapshots -> the domain model, with every problem of every NetworkPolicy.
//!
//! A pod or namespace that does not decode is left out (a pod without a known address
//! cannot be an endpoint or a peer; a namespace not seen matches only by its name label).
//! A NetworkPolicy that does not decode cannot be left out — that would fail open for the
//! pods it selects — so it is enforced as the strictest policy its metadata allows: it
//! selects every pod of its namespace and isolates both directions with no rule.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use kube::core::DeserializeGuard;

use super::watch::Stores;
use crate::convert;
use crate::model::{self, ObjectKey, Snapshot};

/// One problem of a NetworkPolicy, for its Event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The field path (`spec.ingress[0].ports[1].port`), empty when the object did not decode.
    pub field: String,
    /// The full message, naming the object and field and what is enforced instead.
    pub message: String,
}

/// The problems of one NetworkPolicy version.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyProblems {
    pub key: ObjectKey,
    pub reference: ObjectReference,
    /// `true` when the object did not decode at all.
    pub malformed: bool,
    pub problems: Vec<Problem>,
}

/// A snapshot and what was wrong in it.
#[derive(Debug, Default)]
pub struct Built {
    pub snapshot: Snapshot,
    /// Only policies with problems.
    pub policy_problems: BTreeMap<ObjectKey, PolicyProblems>,
    /// Objects of each kind in the caches (pods, namespaces, networkpolicies).
    pub counts: [usize; 3],
}

/// The caches' objects at one moment.
pub struct Objects {
    pub pods: Vec<Arc<DeserializeGuard<Pod>>>,
    pub namespaces: Vec<Arc<DeserializeGuard<Namespace>>>,
    pub policies: Vec<Arc<DeserializeGuard<NetworkPolicy>>>,
    /// Addresses `netpol-cni` reported for starting pods whose objects carry none yet
    /// ([`model::Pod::take_reported_addresses`]).
    pub reported: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

impl Objects {
    pub fn read(stores: &Stores) -> Self {
        Objects {
            pods: stores.pods.state(),
            namespaces: stores.namespaces.state(),
            policies: stores.policies.state(),
            reported: BTreeMap::new(),
        }
    }

    /// Objects of each kind (pods, namespaces, networkpolicies).
    pub fn counts(&self) -> [usize; 3] {
        [self.pods.len(), self.namespaces.len(), self.policies.len()]
    }
}

/// Builds the snapshot the compiler sees from the current cache contents, converting every
/// object. The reconcile loop keeps a [`super::cache::SnapshotCache`] instead (same result,
/// converting only what changed) and uses this one as the reference on resync.
pub fn build(stores: &Stores, node: &str, node_addrs: Vec<IpAddr>) -> Built {
    build_from(&Objects::read(stores), node, node_addrs)
}

/// [`build`] over objects already read.
pub fn build_from(objects: &Objects, node: &str, node_addrs: Vec<IpAddr>) -> Built {
    let mut snap = Snapshot {
        node: node.to_owned(),
        node_addrs,
        ..Default::default()
    };
    for p in &objects.pods {
        if let Some(m) = pod(p, &objects.reported) {
            snap.pods.insert(m.key(), m);
        }
    }
    for n in &objects.namespaces {
        if let Some(m) = namespace(n) {
            snap.namespaces.insert(m.name.clone(), m);
        }
    }
    let mut policy_problems = BTreeMap::new();
    for np in &objects.policies {
        let Some((value, problems)) = network_policy(np) else {
            continue;
        };
        if let Some(pp) = problems {
            policy_problems.insert(pp.key.clone(), pp);
        }
        snap.policies.insert(value.key(), value);
    }
    Built {
        snapshot: snap,
        policy_problems,
        counts: objects.counts(),
    }
}

/// The model form of one cached pod; `None`: left out of the snapshot.
pub(super) fn pod(
    p: &DeserializeGuard<Pod>,
    reported: &BTreeMap<ObjectKey, Vec<IpAddr>>,
) -> Option<model::Pod> {
    // Undecodable objects were reported by the watcher.
    let Ok(p) = &p.0 else { return None };
    let mut m = convert::pod(p)
        .inspect_err(|e| tracing::warn!(error = %e, "pod skipped"))
        .ok()?;
    m.take_reported_addresses(reported.get(&m.key()));
    Some(m)
}

/// The model form of one cached namespace; `None`: left out of the snapshot.
pub(super) fn namespace(n: &DeserializeGuard<Namespace>) -> Option<model::Namespace> {
    let Ok(n) = &n.0 else { return None };
    convert::namespace(n)
        .inspect_err(|e| tracing::warn!(error = %e, "namespace skipped"))
        .ok()
}

/// The enforced form of one cached NetworkPolicy and its problems; `None` only without a
/// namespace or name (nothing to key it by).
pub(super) fn network_policy(
    np: &DeserializeGuard<NetworkPolicy>,
) -> Option<(model::NetworkPolicy, Option<PolicyProblems>)> {
    let (value, problems) = match &np.0 {
        Ok(np) => policy(np),
        Err(bad) => malformed_policy(&bad.metadata, &bad.error),
    };
    Some((value?, problems))
}

fn reference(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// What the fail-closed interpretation of a problem at `path` is.
fn consequence(path: &str) -> &'static str {
    if path.starts_with("spec.podSelector") {
        "the policy is enforced as selecting every pod of its namespace"
    } else if path.starts_with("spec.policyTypes") {
        "the policy is enforced as isolating both directions"
    } else if path.starts_with("spec.ingress") || path.starts_with("spec.egress") {
        "the rule is enforced as allowing nothing"
    } else {
        "the policy is enforced fail-closed"
    }
}

fn policy(np: &NetworkPolicy) -> (Option<model::NetworkPolicy>, Option<PolicyProblems>) {
    let c = convert::network_policy(np);
    let (Some(_), Some(_)) = (&np.metadata.namespace, &np.metadata.name) else {
        // The API server never sends one; nothing to key it by.
        for e in &c.errors {
            tracing::warn!(error = %e, "networkpolicy without namespace or name skipped");
        }
        return (None, None);
    };
    if c.errors.is_empty() {
        return (Some(c.value), None);
    }
    let problems = c
        .errors
        .iter()
        .map(|e| {
            let field = e.location().path.clone();
            Problem {
                message: format!("{e}; {}", consequence(&field)),
                field,
            }
        })
        .collect();
    let pp = PolicyProblems {
        key: c.value.key(),
        reference: reference(&np.metadata),
        malformed: false,
        problems,
    };
    (Some(c.value), Some(pp))
}

fn malformed_policy(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    error: &str,
) -> (Option<model::NetworkPolicy>, Option<PolicyProblems>) {
    let (Some(ns), Some(name)) = (&meta.namespace, &meta.name) else {
        return (None, None);
    };
    let value = model::NetworkPolicy::deny_all(ns, name);
    let pp = PolicyProblems {
        key: value.key(),
        reference: reference(meta),
        malformed: true,
        problems: vec![Problem {
            field: String::new(),
            message: format!(
                "networkpolicy {ns}/{name} does not decode: {error}; enforced as isolating every \
                 pod of namespace {ns} in both directions"
            ),
        }],
    };
    (Some(value), Some(pp))
}
