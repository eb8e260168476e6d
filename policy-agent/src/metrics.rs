//! The agent's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoint.
//!
//! Every label set is bounded: directions and reasons come from `policy_common`, map names
//! from the five policy maps, error kinds and reconcile triggers from the enums below. No
//! label ever carries an object name, address or interface.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use policy_common::{Direction, Reason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::Counters;

/// What went wrong, as a bounded label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A watch or list request failed (the watcher retries with backoff).
    Watch,
    /// An object that does not decode; it is skipped (a policy: enforced fail-closed).
    MalformedObject,
    /// A NetworkPolicy field the API server would reject; enforced fail-closed.
    InvalidPolicy,
    /// A map would exceed its capacity; the affected endpoints are enforced fail-closed.
    MapFull,
    /// Writing the kernel maps failed (repaired on the next pass).
    MapWrite,
    /// Attaching the programs to a pod interface failed.
    Attach,
    /// Publishing a Kubernetes Event failed.
    EventPublish,
    /// Reading the node's routes or addresses failed.
    NetInfo,
    /// The incremental compile disagreed with a full compile (the full one is enforced).
    CompileMismatch,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Watch,
        ErrorKind::MalformedObject,
        ErrorKind::InvalidPolicy,
        ErrorKind::MapFull,
        ErrorKind::MapWrite,
        ErrorKind::Attach,
        ErrorKind::EventPublish,
        ErrorKind::NetInfo,
        ErrorKind::CompileMismatch,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Watch => "watch",
            ErrorKind::MalformedObject => "malformed_object",
            ErrorKind::InvalidPolicy => "invalid_policy",
            ErrorKind::MapFull => "map_full",
            ErrorKind::MapWrite => "map_write",
            ErrorKind::Attach => "attach",
            ErrorKind::EventPublish => "event_publish",
            ErrorKind::NetInfo => "netinfo",
            ErrorKind::CompileMismatch => "compile_mismatch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
    reason: &'static str,
}

/// The kernel's verdict counters as last read (absolute values: the kernel owns them).
#[derive(Debug, Default)]
struct VerdictCounts {
    values: [[AtomicU64; Reason::COUNT]; Direction::COUNT],
}

/// Encodes [`VerdictCounts`] at scrape time.
#[derive(Debug)]
struct VerdictCollector(Arc<VerdictCounts>);

impl Collector for VerdictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "netpol_verdicts",
            "Packets decided by the TC programs, by pod-relative direction and reason",
            None,
            counter.metric_type(),
        )?;
        for d in Direction::ALL {
            for r in Reason::ALL {
                let labels = VerdictLabels {
                    direction: d.as_str(),
                    verdict: if r.is_allow() { "allow" } else { "deny" },
                    reason: r.as_str(),
                };
                let v = self.0.values[d as usize][r as usize].load(Ordering::Relaxed);
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Liveness and readiness, shared by the reconcile loop and the HTTP endpoint.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the reconcile loop's last sign of life.
    heartbeat_ms: AtomicU64,
    synced: AtomicBool,
    programmed: AtomicBool,
    /// Turns of the loop so far: a test waits for the loop to have looked again instead of
    /// sleeping for a guess.
    beats: AtomicU64,
    /// The loop is considered hung when silent for longer than this.
    stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Health {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            programmed: AtomicBool::new(false),
            beats: AtomicU64::new(0),
            stall_after,
        }
    }

    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the loop has gone round (see [`Health::beat`]).
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }

    /// Every watched store has finished its initial list.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// The first desired state was written to the kernel.
    pub fn set_programmed(&self) {
        self.programmed.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.programmed.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) <= self.stall_after
    }
}

/// Every metric of the agent, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    verdicts: Arc<VerdictCounts>,
    errors: Family<KindLabel, Counter>,
    programming: Histogram,
    map_entries: Family<MapLabel, Gauge>,
    reconciles: Family<TriggerLabel, Counter>,
    objects: Family<KindLabel, Gauge>,
    attached: Gauge,
    waiting: Gauge,
    failclosed_endpoints: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let verdicts = Arc::new(VerdictCounts::default());
        registry.register_collector(Box::new(VerdictCollector(verdicts.clone())));
        let errors = Family::<KindLabel, Counter>::default();
        registry.register("netpol_errors", "Errors by kind", errors.clone());
        // 1 ms .. ~65 s: a change normally lands in tens of ms, a backlog in seconds.
        let programming = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
        );
        registry.register_with_unit(
            "netpol_policy_programming",
            "Time from an object change being seen to the kernel maps holding its effect",
            prometheus_client::registry::Unit::Seconds,
            programming.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "netpol_map_entries",
            "Entries written to each policy map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "netpol_map_capacity",
            "Capacity (max_entries) of each policy map",
            map_capacity.clone(),
        );
        let reconciles = Family::<TriggerLabel, Counter>::default();
        registry.register(
            "netpol_reconciles",
            "Reconcile passes by what triggered them",
            reconciles.clone(),
        );
        let objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "netpol_watched_objects",
            "Objects in the watch caches",
            objects.clone(),
        );
        let attached = Gauge::default();
        registry.register(
            "netpol_attached_interfaces",
            "Pod interfaces with the programs attached",
            attached.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "netpol_local_pods_without_interface",
            "Local pods with addresses whose host interface was not found yet",
            waiting.clone(),
        );
        let failclosed_endpoints = Gauge::default();
        registry.register(
            "netpol_failclosed_endpoints",
            "Local endpoints denied everything because their rules did not fit the maps",
            failclosed_endpoints.clone(),
        );
        // Pre-create every bounded series so dashboards see zeros, not gaps.
        for k in ErrorKind::ALL {
            let _ = errors.get_or_create(&KindLabel { kind: k.as_str() });
        }
        for (name, cap) in map_capacities() {
            map_capacity
                .get_or_create(&MapLabel { map: name })
                .set(i64::from(cap));
            let _ = map_entries.get_or_create(&MapLabel { map: name });
        }
        for t in ["change", "resync"] {
            let _ = reconciles.get_or_create(&TriggerLabel { trigger: t });
        }
        Metrics {
            registry,
            verdicts,
            errors,
            programming,
            map_entries,
            reconciles,
            objects,
            attached,
            waiting,
            failclosed_endpoints,
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn error_count(&self, kind: ErrorKind) -> u64 {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .get()
    }

    pub fn observe_programming(&self, latency: Duration) {
        self.programming.observe(latency.as_secs_f64());
    }

    pub fn reconciled(&self, resync: bool) {
        let trigger = if resync { "resync" } else { "change" };
        self.reconciles
            .get_or_create(&TriggerLabel { trigger })
            .inc();
    }

    /// Passes completed so far with this trigger.
    pub fn reconcile_count(&self, resync: bool) -> u64 {
        let trigger = if resync { "resync" } else { "change" };
        self.reconciles
            .get_or_create(&TriggerLabel { trigger })
            .get()
    }

    /// Entries per policy map (`MapContents::sizes` order and names).
    pub fn set_map_entries(&self, sizes: &[(&'static str, usize, usize)]) {
        for (name, n, _) in sizes {
            self.map_entries
                .get_or_create(&MapLabel { map: name })
                .set(*n as i64);
        }
    }

    /// `kind` is one of "pods", "namespaces", "networkpolicies".
    pub fn set_objects(&self, kind: &'static str, n: usize) {
        self.objects
            .get_or_create(&KindLabel { kind })
            .set(n as i64);
    }

    pub fn set_interfaces(&self, attached: usize, waiting: usize) {
        self.attached.set(attached as i64);
        self.waiting.set(waiting as i64);
    }

    pub fn set_failclosed_endpoints(&self, n: usize) {
        self.failclosed_endpoints.set(n as i64);
    }

    pub fn set_verdicts(&self, c: &Counters) {
        for d in Direction::ALL {
            for r in Reason::ALL {
                self.verdicts.values[d as usize][r as usize].store(c.get(d, r), Ordering::Relaxed);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// (map name, capacity) of the five policy maps.
pub fn map_capacities() -> [(&'static str, u32); 5] {
    use policy_common::maps::*;
    [
        (MAP_ENDPOINTS, MAX_ENDPOINTS),
        (MAP_IPCACHE, MAX_IPCACHE),
        (MAP_RULES, MAX_RULES),
        (MAP_CIDR_RULES, MAX_CIDR_RULES),
        (MAP_PORTS, MAX_PORTS),
    ]
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the returned task is aborted. Binds
/// before returning, so the address is usable at once (pass port 0 to pick a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // E.g. EMFILE: keep serving once descriptors free up.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let resp = respond(&req, &metrics, &health);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                // A scraper must not hold a connection forever.
                match tokio::time::timeout(Duration::from_secs(30), conn).await {
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection"),
                    Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok((local, task))
}

fn respond<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), PLAIN);
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" if health.is_live() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "reconcile loop stalled\n".into(),
            PLAIN,
        ),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n".into(), PLAIN),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the watch caches and the first programming\n".into(),
            PLAIN,
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}
