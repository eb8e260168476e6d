//! The watch caches: one kube-rs reflector per kind (Pods of every namespace, Namespaces,
//! NetworkPolicies), each a `watcher` with the default backoff feeding a `Store`.
//!
//! Objects are wrapped in `DeserializeGuard`, so one object that does not decode is kept as
//! an error (with its metadata) instead of failing the list or the watch it came in. Every
//! change marks [`Changes`]; the reconcile loop reads whole store snapshots, never single
//! events, so a lost or reordered event can never leave state behind.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;

use crate::metrics::{ErrorKind, Metrics};

pub type PodStore = Store<DeserializeGuard<Pod>>;
pub type NamespaceStore = Store<DeserializeGuard<Namespace>>;
pub type PolicyStore = Store<DeserializeGuard<NetworkPolicy>>;

/// Readers of the three caches.
#[derive(Clone)]
pub struct Stores {
    pub pods: PodStore,
    pub namespaces: NamespaceStore,
    pub policies: PolicyStore,
}

impl Stores {
    /// Resolves once every cache has finished its first list.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.pods.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.policies.wait_until_ready().await
    }
}

/// "Something changed since the last reconcile": a wake-up for the loop and the time the
/// oldest unhandled change was seen (the start of the programming-latency measurement).
#[derive(Debug, Default)]
pub struct Changes {
    notify: Notify,
    oldest: Mutex<Option<Instant>>,
}

impl Changes {
    pub fn mark(&self) {
        let mut g = self
            .oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.is_none() {
            *g = Some(Instant::now());
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Takes the pending change, if any: the time its oldest part was seen.
    pub fn take(&self) -> Option<Instant> {
        self.oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    pub fn is_pending(&self) -> bool {
        self.oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Starts the three reflectors on `client`. They run until the returned tasks are aborted
/// (watch failures are retried with kube's default backoff, never fatal).
pub fn spawn_reflectors(
    client: Client,
    changes: Arc<Changes>,
    metrics: Arc<Metrics>,
) -> (Stores, Vec<tokio::task::JoinHandle<()>>) {
    let (pods, t1) = reflect(
        Api::<DeserializeGuard<Pod>>::all(client.clone()),
        "pods",
        // The agent reads labels, addresses, ports, node and hostNetwork: drop the bulk.
        |p: &mut DeserializeGuard<Pod>| {
            if let Ok(p) = &mut p.0 {
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
            }
        },
        changes.clone(),
        metrics.clone(),
    );
    let (namespaces, t2) = reflect(
        Api::<DeserializeGuard<Namespace>>::all(client.clone()),
        "namespaces",
        |n: &mut DeserializeGuard<Namespace>| {
            n.0.iter_mut()
                .for_each(|n| n.metadata.managed_fields = None)
        },
        changes.clone(),
        metrics.clone(),
    );
    let (policies, t3) = reflect(
        Api::<DeserializeGuard<NetworkPolicy>>::all(client),
        "networkpolicies",
        |n: &mut DeserializeGuard<NetworkPolicy>| {
            n.0.iter_mut()
                .for_each(|n| n.metadata.managed_fields = None)
        },
        changes,
        metrics,
    );
    (
        Stores {
            pods,
            namespaces,
            policies,
        },
        vec![t1, t2, t3],
    )
}

fn reflect<K>(
    api: Api<DeserializeGuard<K>>,
    kind: &'static str,
    trim: impl FnMut(&mut DeserializeGuard<K>) + Send + 'static,
    changes: Arc<Changes>,
    metrics: Arc<Metrics>,
) -> (Store<DeserializeGuard<K>>, tokio::task::JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) => {
                    report_malformed(kind, &o, &metrics);
                    changes.mark();
                }
                Ok(watcher::Event::InitApply(o)) => report_malformed(kind, &o, &metrics),
                // A (re-)list is swapped into the store whole at InitDone.
                Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => changes.mark(),
                Ok(watcher::Event::Init) => tracing::debug!(kind, "listing"),
                Err(e) => {
                    metrics.error(ErrorKind::Watch);
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
        tracing::error!(kind, "watch stream ended");
    });
    (reader, task)
}

fn report_malformed<K: Resource>(kind: &'static str, o: &DeserializeGuard<K>, metrics: &Metrics) {
    if let Err(bad) = &o.0 {
        metrics.error(ErrorKind::MalformedObject);
        tracing::warn!(
            kind,
            namespace = bad.metadata.namespace.as_deref().unwrap_or(""),
            name = bad.metadata.name.as_deref().unwrap_or(""),
            error = %bad.error,
            "object does not decode; skipped (a NetworkPolicy is enforced fail-closed)"
        );
    }
}
