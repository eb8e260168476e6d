//! Cluster mode: the DaemonSet agent. kube-rs reflectors keep caches of Pods, Namespaces
//! and NetworkPolicies; one reconcile loop compiles store snapshots into the maps of this
//! node; invalid policies get Kubernetes Events; `/metrics`, `/healthz` and `/readyz` are
//! served for the kubelet and Prometheus.
//!
//! ```text
//! watchers ──(Changes)──> reconcile loop ──> Enforcer (maps, interfaces)
//!     └─> Stores ─────────────┘    └──> Event publisher ──> API server
//! ```

pub mod cache;
pub mod enforcer;
pub mod generation;
pub mod policy_events;
pub mod reconcile;
pub mod snapshot;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

pub use enforcer::{Enforcer, KernelEnforcer, Write};
pub use reconcile::{LoopConfig, Reconciler};
pub use watch::{Changes, Stores};

use crate::metrics::{self, Health, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub loop_cfg: LoopConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
}

/// A running agent: its shared state and the address metrics are served on.
pub struct Running {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub metrics_addr: Option<SocketAddr>,
}

/// Runs the cluster agent on `client` until `shutdown` resolves. `on_start` is told where
/// metrics are served as soon as they are (tests learn the port picked for `:0`).
pub async fn run<E: Enforcer>(
    client: kube::Client,
    enforcer: E,
    cfg: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    on_start: impl FnOnce(&Running),
    shutdown: impl Future<Output = ()>,
) -> Result<E, ClusterError> {
    let mut tasks = Vec::new();
    let mut served = None;
    if let Some(addr) = cfg.metrics_addr {
        let (local, task) = metrics::serve(addr, metrics.clone(), health.clone())
            .await
            .map_err(|source| ClusterError::Metrics { addr, source })?;
        tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
        served = Some(local);
        tasks.push(task);
    }
    on_start(&Running {
        metrics: metrics.clone(),
        health: health.clone(),
        metrics_addr: served,
    });
    let changes = Arc::new(Changes::default());
    let (stores, watch_tasks) =
        watch::spawn_reflectors(client.clone(), changes.clone(), metrics.clone());
    tasks.extend(watch_tasks);
    let (events_tx, events_task) = policy_events::spawn_publisher(
        client,
        format!("{}-{}", policy_events::CONTROLLER, cfg.loop_cfg.node),
        metrics.clone(),
    );
    tasks.push(events_task);
    let reconciler = Reconciler::new(cfg.loop_cfg, enforcer, metrics, health, Some(events_tx));
    let enforcer = reconciler.run(stores, changes, shutdown).await;
    for t in tasks {
        t.abort();
    }
    Ok(enforcer)
}
