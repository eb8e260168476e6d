//! A step's objects as Kubernetes objects, for runners that drive the real agent: manifests
//! for standalone mode (`--manifests DIR`), objects for a (fake) API server in cluster mode.
//! Namespaces and pods as the API server would show them
//! (labels, node, hostNetwork, container ports, status.podIPs), policies exactly as applied
//! (so an invalid one reaches the agent invalid, and fails closed there too).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::apply::State;
use policy_agent::reference::NAMESPACE_NAME_LABEL;

/// One manifest file: its name in the directory and its YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub file_name: String,
    pub yaml: String,
}

/// One object of a step, as a client would write it to the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Its manifest file's name.
    pub file_name: String,
    pub value: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
#[error("rendering {object}: {message}")]
pub struct ManifestError {
    object: String,
    message: String,
}

fn to_value<T: serde::Serialize>(
    object: String,
    v: &T,
) -> Result<serde_json::Value, ManifestError> {
    serde_json::to_value(v).map_err(|e| ManifestError {
        object,
        message: e.to_string(),
    })
}

/// Every object of `state` as manifest files: `namespace-<ns>.yaml`, `pod-<ns>-<name>.yaml`,
/// `networkpolicy-<ns>-<name>.yaml` (names are DNS labels, so these never collide).
pub fn manifests(state: &State) -> Result<Vec<Manifest>, ManifestError> {
    objects(state)?
        .into_iter()
        .map(|o| {
            let yaml = serde_saphyr::to_string(&o.value).map_err(|e| ManifestError {
                object: o.file_name.clone(),
                message: e.to_string(),
            })?;
            Ok(Manifest {
                file_name: o.file_name,
                yaml,
            })
        })
        .collect()
}

/// Every object of `state`: namespaces, then pods, then policies.
pub fn objects(state: &State) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for ns in state.snapshot.namespaces.values() {
        // The API server adds the name label itself; leave it implicit like a user would.
        let labels: BTreeMap<String, String> = ns
            .labels
            .iter()
            .filter(|(k, _)| *k != NAMESPACE_NAME_LABEL)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let obj = core::Namespace {
            metadata: ObjectMeta {
                name: Some(ns.name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        out.push(Object {
            file_name: format!("namespace-{}.yaml", ns.name),
            value: to_value(format!("namespace {}", ns.name), &obj)?,
        });
    }
    for pod in state.snapshot.pods.values() {
        let ports = pod
            .ports
            .iter()
            .map(|p| core::ContainerPort {
                name: p.name.clone(),
                container_port: i32::from(p.port),
                protocol: Some(p.protocol.as_str().to_string()),
                ..Default::default()
            })
            .collect();
        let ips: Vec<core::PodIP> = pod
            .ips
            .iter()
            .map(|ip| core::PodIP { ip: ip.to_string() })
            .collect();
        let obj = core::Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                labels: Some(pod.labels.clone()),
                ..Default::default()
            },
            spec: Some(core::PodSpec {
                node_name: pod.node.clone(),
                host_network: Some(pod.host_network),
                containers: vec![core::Container {
                    name: "serve".into(),
                    ports: Some(ports),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: Some("Running".into()),
                pod_ip: ips.first().map(|i| i.ip.clone()),
                pod_ips: Some(ips),
                ..Default::default()
            }),
        };
        out.push(Object {
            file_name: format!("pod-{}-{}.yaml", pod.namespace, pod.name),
            value: to_value(format!("pod {}/{}", pod.namespace, pod.name), &obj)?,
        });
    }
    for (key, doc) in &state.policy_docs {
        out.push(Object {
            file_name: format!("networkpolicy-{}-{}.yaml", key.namespace, key.name),
            value: doc.clone(),
        });
    }
    Ok(out)
}
