//! The testkit's scripted API server ([`FakeApi`]) behind a `tower-test` mock service (the
//! kube-rs convention for testing clients without a cluster), and helpers to run the cluster
//! agent against it with the recording enforcer.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use kube::client::Body;
use policy_agent::cluster::{self, LoopConfig};
use policy_agent::compiler::{MapContents, addr_of};
use policy_agent::metrics::{Health, Metrics};
use policy_common::{EndpointKey, EndpointValue, IpCacheKey};
use policy_testkit::{Recorded, RecordingEnforcer};
use serde_json::{Value, json};

pub use policy_testkit::fake_api::{FakeApi, Kind};

/// An in-process kube client of a [`FakeApi`] (through `tower-test`'s mock service).
pub trait FakeClient {
    fn client(&self) -> kube::Client;
}

impl FakeClient for FakeApi {
    fn client(&self) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<
            Request<Body>,
            http::Response<policy_testkit::fake_api::RespBody>,
        >();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let json: Option<Value> = serde_json::from_slice(&bytes).ok();
                me.handle(
                    parts.method,
                    parts.uri,
                    json,
                    Box::new(move |r| send.send_response(r)),
                );
            }
        });
        kube::Client::new(svc, "default")
    }
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

pub const NODE: &str = "node-a";

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "img",
                  "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn host_network_pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    let mut p = pod(ns, name, node, ip, json!({"app": "host"}));
    p["spec"]["hostNetwork"] = json!(true);
    p
}

/// A policy selecting `app=<target>` admitting ingress from `app=<from>` on TCP `port`.
pub fn policy(ns: &str, name: &str, target: &str, from: &str, port: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                         "ports": [{"protocol": "TCP", "port": port}]}],
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Running the agent
// ---------------------------------------------------------------------------------------------

pub struct Agent {
    pub api: FakeApi,
    pub kernel: Arc<Mutex<Recorded>>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn test_loop_config() -> LoopConfig {
    let mut c = LoopConfig::new(NODE);
    c.debounce = Duration::from_millis(50);
    c.resync = Duration::from_secs(3600);
    c.poll = Duration::from_millis(100);
    c
}

impl Agent {
    /// Starts the agent on `api` (already holding the initial objects).
    pub async fn start(
        api: FakeApi,
        loop_cfg: LoopConfig,
        metrics_addr: Option<std::net::SocketAddr>,
    ) -> Agent {
        let enforcer = RecordingEnforcer::new();
        let kernel = enforcer.state();
        kernel.lock().unwrap().node_addrs = vec!["198.18.255.1".parse().unwrap()];
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let client = api.client();
        let cfg = cluster::Config {
            loop_cfg,
            metrics_addr,
        };
        let (m, h) = (metrics.clone(), health.clone());
        let task = tokio::spawn(async move {
            let r = cluster::run(
                client,
                enforcer,
                cfg,
                m,
                h,
                |r| {
                    let _ = addr_tx.send(r.metrics_addr);
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
            r.unwrap();
        });
        let metrics_addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
            .await
            .unwrap()
            .unwrap();
        Agent {
            api,
            kernel,
            metrics,
            health,
            metrics_addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn kernel(&self) -> MapContents {
        self.kernel.lock().unwrap().kernel.clone()
    }

    pub fn calls(&self) -> Vec<policy_testkit::Call> {
        self.kernel.lock().unwrap().calls.clone()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("agent stops")
                .expect("agent task");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub fn endpoint(kernel: &MapContents, ip: &str) -> Option<EndpointValue> {
    let ip: IpAddr = ip.parse().unwrap();
    kernel
        .endpoints
        .get(&EndpointKey { addr: addr_of(ip) })
        .copied()
}

pub fn identity(kernel: &MapContents, ip: &str) -> Option<u32> {
    let ip: IpAddr = ip.parse().unwrap();
    kernel
        .ipcache
        .get(&IpCacheKey { addr: addr_of(ip) })
        .map(|v| v.identity)
}

/// Polls `cond` every 20 ms for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < until,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
