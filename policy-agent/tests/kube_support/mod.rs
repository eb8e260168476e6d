//! A scripted Kubernetes API server behind a `tower-test` mock service (the kube-rs
//! convention for testing clients without a cluster), and helpers to run the cluster agent
//! against it with the recording enforcer.
//!
//! The fake keeps objects per kind with resource versions and an event log like the real
//! server: a list returns the objects and the current version; a watch from version X
//! replays logged events after X, then streams live ones; a watch from a version older than
//! the compaction point gets `410 Gone`. Tests change objects, lose events, compact, drop
//! watches and hold lists, and read back every request (e.g. the Events POSTed).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Bytes;
use hyper::body::Frame;
use kube::client::Body;
use policy_agent::cluster::{self, LoopConfig};
use policy_agent::compiler::{MapContents, addr_of};
use policy_agent::metrics::{Health, Metrics};
use policy_common::{EndpointKey, EndpointValue, IpCacheKey};
use policy_testkit::{Recorded, RecordingEnforcer};
use serde_json::{Value, json};

pub type RespBody = BoxBody<Bytes, Infallible>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Namespaces,
    Policies,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/pods" => Some(Kind::Pods),
            "/api/v1/namespaces" => Some(Kind::Namespaces),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Kind::Policies),
            _ => None,
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pods => "PodList",
            Kind::Namespaces => "NamespaceList",
            Kind::Policies => "NetworkPolicyList",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

#[derive(Default)]
struct KindState {
    objects: BTreeMap<(String, String), Value>,
    log: Vec<(u64, Value)>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    held: bool,
    lists: usize,
    watches: usize,
}

/// Where a response goes: the tower-test mock's responder or a real HTTP connection.
pub type Respond = Box<dyn FnOnce(Response<RespBody>) + Send>;

/// A request held back by [`FakeApi::hold`], with its responder and body.
type Held = (Request<Body>, Respond, Option<Value>);

#[derive(Default)]
struct State {
    rv: u64,
    kinds: HashMap<Kind, KindState>,
    requests: Vec<ApiRequest>,
    pending: Vec<Held>,
}

/// The scripted API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn key_of(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_string(),
        m["name"].as_str().unwrap_or("").to_string(),
    )
}

fn line(ev: &Value) -> Bytes {
    let mut s = serde_json::to_vec(ev).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

fn full(status: StatusCode, body: &Value) -> Response<RespBody> {
    let b = http_body_util::Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(b)
        .unwrap()
}

impl FakeApi {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts serving; returns a kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<RespBody>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let json: Option<Value> = serde_json::from_slice(&bytes).ok();
                let req = Request::from_parts(parts, Body::empty());
                me.handle(req, Box::new(move |r| send.send_response(r)), json);
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Serves the same fake over real HTTP/1.1 on `listener` (bound by the caller, e.g. on a
    /// test namespace's loopback), for an agent running as its own process. Runs on the
    /// current tokio runtime until the runtime stops.
    pub fn serve_http(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let json: Option<Value> = serde_json::from_slice(&bytes).ok();
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                me.handle(
                                    Request::from_parts(parts, Body::empty()),
                                    Box::new(move |r| {
                                        let _ = tx.send(r);
                                    }),
                                    json,
                                );
                                Ok::<_, Infallible>(rx.await.unwrap_or_else(|_| {
                                    full(StatusCode::SERVICE_UNAVAILABLE, &json!({}))
                                }))
                            }
                        });
                    let io = hyper_util::rt::TokioIo::new(conn);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
    }

    fn handle(&self, req: Request<Body>, send: Respond, body: Option<Value>) {
        let mut st = self.lock();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        st.requests.push(ApiRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        if let Some(kind) = Kind::from_path(&path) {
            if st.kinds.entry(kind).or_default().held {
                st.pending.push((req, send, body));
                return;
            }
            let params: HashMap<String, String> = query
                .split('&')
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect();
            let rv_now = st.rv;
            let ks = st.kinds.entry(kind).or_default();
            if params.get("watch").is_some_and(|v| v == "true" || v == "1") {
                ks.watches += 1;
                let from: u64 = params
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded::<Bytes>();
                if from < ks.compacted {
                    let gone = json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "too old resource version", "reason": "Expired", "code": 410}});
                    tx.unbounded_send(line(&gone)).unwrap();
                    drop(tx);
                } else {
                    for (rv, ev) in &ks.log {
                        if *rv > from {
                            tx.unbounded_send(line(ev)).unwrap();
                        }
                    }
                    ks.watchers.push(tx);
                }
                let stream = rx.map(|b| Ok::<_, Infallible>(Frame::data(b)));
                let body = BodyExt::boxed(StreamBody::new(stream));
                send(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap(),
                );
            } else {
                ks.lists += 1;
                let items: Vec<Value> = ks.objects.values().cloned().collect();
                let list = json!({
                    "apiVersion": "v1", "kind": kind.list_kind(),
                    "metadata": {"resourceVersion": rv_now.to_string()},
                    "items": items,
                });
                send(full(StatusCode::OK, &list));
            }
            return;
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/")
            && path.ends_with("/events")
            && req.method() == "POST"
        {
            let mut b = body.unwrap_or(json!({}));
            b["metadata"]["resourceVersion"] = json!("1");
            send(full(StatusCode::CREATED, &b));
            return;
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && req.method() == "PATCH" {
            send(full(StatusCode::OK, &body.unwrap_or(json!({}))));
            return;
        }
        send(full(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": path}),
        ));
    }

    fn stamp(st: &mut State, obj: &mut Value) -> u64 {
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            let (ns, n) = key_of(obj);
            obj["metadata"]["uid"] = json!(format!("uid-{ns}-{n}"));
        }
        st.rv
    }

    fn publish(ks: &mut KindState, rv: u64, ev: Value) {
        ks.watchers.retain(|w| w.unbounded_send(line(&ev)).is_ok());
        ks.log.push((rv, ev));
    }

    /// Creates or updates an object (seen by lists and watches).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let mut st = self.lock();
        let rv = Self::stamp(&mut st, &mut obj);
        let ks = st.kinds.entry(kind).or_default();
        let k = key_of(&obj);
        let t = if ks.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        ks.objects.insert(k, obj.clone());
        Self::publish(ks, rv, json!({"type": t, "object": obj}));
    }

    /// Several objects in one go (one write to the watch streams each, no pause between).
    pub fn apply_all(&self, kind: Kind, objs: Vec<Value>) {
        for o in objs {
            self.apply(kind, o);
        }
    }

    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let ks = st.kinds.entry(kind).or_default();
        if let Some(mut obj) = ks.objects.remove(&(ns.to_string(), name.to_string())) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            Self::publish(ks, rv, json!({"type": "DELETED", "object": obj}));
        }
    }

    /// Deletes an object without any watch ever hearing of it (a lost delete event).
    pub fn delete_silently(&self, kind: Kind, ns: &str, name: &str) {
        let mut st = self.lock();
        st.rv += 1;
        st.kinds
            .entry(kind)
            .or_default()
            .objects
            .remove(&(ns.to_string(), name.to_string()));
    }

    /// Forgets the event log: watches resuming from an older version get 410 Gone.
    pub fn compact(&self, kind: Kind) {
        let mut st = self.lock();
        let rv = st.rv + 1;
        let ks = st.kinds.entry(kind).or_default();
        ks.log.clear();
        ks.compacted = rv;
    }

    /// Ends every open watch stream of `kind` (a dropped connection).
    pub fn drop_watches(&self, kind: Kind) {
        self.lock().kinds.entry(kind).or_default().watchers.clear();
    }

    /// Sends `410 Gone` on every open watch of `kind` and ends them.
    pub fn expire_watches(&self, kind: Kind) {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        let mut st = self.lock();
        let ks = st.kinds.entry(kind).or_default();
        for w in ks.watchers.drain(..) {
            let _ = w.unbounded_send(line(&gone));
        }
    }

    /// Sends a raw line on the open watches of `kind` (e.g. an undecodable object).
    pub fn send_raw(&self, kind: Kind, ev: Value) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        Self::publish(st.kinds.entry(kind).or_default(), rv, ev);
    }

    /// Stores an object as-is in the list (no schema check), e.g. a malformed one.
    pub fn put_raw(&self, kind: Kind, mut obj: Value) {
        let mut st = self.lock();
        let rv = Self::stamp(&mut st, &mut obj);
        let ks = st.kinds.entry(kind).or_default();
        ks.objects.insert(key_of(&obj), obj.clone());
        Self::publish(ks, rv, json!({"type": "ADDED", "object": obj}));
    }

    /// Holds list and watch requests of `kind` unanswered until [`FakeApi::release`].
    pub fn hold(&self, kind: Kind) {
        self.lock().kinds.entry(kind).or_default().held = true;
    }

    pub fn release(&self, kind: Kind) {
        let pending = {
            let mut st = self.lock();
            st.kinds.entry(kind).or_default().held = false;
            std::mem::take(&mut st.pending)
        };
        for (req, send, body) in pending {
            // Requests of other held kinds go back to pending.
            self.handle_again(req, send, body);
        }
    }

    fn handle_again(&self, req: Request<Body>, send: Respond, body: Option<Value>) {
        // `handle` records requests; drop the duplicate record.
        self.handle(req, send, body);
        self.lock().requests.pop();
    }

    pub fn lists(&self, kind: Kind) -> usize {
        self.lock().kinds.get(&kind).map_or(0, |k| k.lists)
    }

    pub fn watches(&self, kind: Kind) -> usize {
        self.lock().kinds.get(&kind).map_or(0, |k| k.watches)
    }

    pub fn open_watches(&self, kind: Kind) -> usize {
        let mut st = self.lock();
        let ks = st.kinds.entry(kind).or_default();
        ks.watchers.retain(|w| !w.is_closed());
        ks.watchers.len()
    }

    /// The Events POSTed so far (their bodies).
    pub fn posted_events(&self) -> Vec<Value> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
            .filter_map(|r| r.body.clone())
            .collect()
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        self.lock().requests.clone()
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

/// Serves `api` over HTTP on the loopback of network namespace `ns`, where an agent run
/// there reaches it on 127.0.0.1, from a runtime of its own (serving while it lives).
/// Returns the runtime and the port.
pub fn serve_in(
    api: &FakeApi,
    ns: &policy_testkit::testbed::Netns,
) -> (tokio::runtime::Runtime, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = ns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("enter the namespace")
        .expect("bind the fake API server");
    let port = listener.local_addr().expect("port").port();
    {
        let _in_rt = rt.enter();
        api.serve_http(listener);
    }
    (rt, port)
}
