//! A scripted Kubernetes API server for Pods, Namespaces and NetworkPolicies, served over
//! real HTTP/1.1 to any number of agents (one state, many watchers), or through a mock
//! service in-process (the tests' `kube_support`).
//!
//! It keeps objects per kind with resource versions and an event log like the real server:
//! a list returns the objects and the current version; a watch from version X replays logged
//! events after X, then streams live ones; a watch from a version older than the compaction
//! point gets `410 Gone`; watches that asked for bookmarks get them on [`FakeApi::bookmark`].
//! Tests change objects, lose events, compact, expire and drop watches, hold lists, and read
//! back every request (e.g. the Events POSTed).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::channel::mpsc;
use http::{Method, Response, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};

use crate::testbed::Netns;

pub type RespBody = BoxBody<Bytes, Infallible>;

/// Where a response goes: a mock service's responder or a real HTTP connection.
pub type Respond = Box<dyn FnOnce(Response<RespBody>) + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Namespaces,
    Policies,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Pods, Kind::Namespaces, Kind::Policies];

    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/pods" => Some(Kind::Pods),
            "/api/v1/namespaces" => Some(Kind::Namespaces),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Kind::Policies),
            _ => None,
        }
    }

    /// The kind an object's `kind` field names.
    pub fn of_object(obj: &Value) -> Option<Kind> {
        match obj["kind"].as_str()? {
            "Pod" => Some(Kind::Pods),
            "Namespace" => Some(Kind::Namespaces),
            "NetworkPolicy" => Some(Kind::Policies),
            _ => None,
        }
    }

    /// The resource's plural, as `policy_agent::cluster::generation` names kinds.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Policies => "networkpolicies",
        }
    }

    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pods => ("v1", "Pod"),
            Kind::Namespaces => ("v1", "Namespace"),
            Kind::Policies => ("networking.k8s.io/v1", "NetworkPolicy"),
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

struct Watcher {
    tx: mpsc::UnboundedSender<Bytes>,
    bookmarks: bool,
}

#[derive(Default)]
struct KindState {
    objects: BTreeMap<(String, String), Value>,
    log: Vec<(u64, Value)>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    held: bool,
    lists: usize,
    watches: usize,
}

/// A request held back by [`FakeApi::hold`].
struct Held {
    method: Method,
    uri: Uri,
    body: Option<Value>,
    respond: Respond,
}

#[derive(Default)]
struct State {
    rv: u64,
    kinds: HashMap<Kind, KindState>,
    requests: Vec<ApiRequest>,
    pending: Vec<Held>,
}

/// The scripted API server (cheap to clone: clones share the state).
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
    let mut s = serde_json::to_vec(ev).unwrap_or_default();
    s.push(b'\n');
    Bytes::from(s)
}

fn full(status: StatusCode, body: &Value) -> Response<RespBody> {
    let b = http_body_util::Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default()))
        .boxed();
    let mut r = Response::new(b);
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// The object without what the server sets (resourceVersion, uid): equal for an unchanged
/// object written again.
fn content(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("uid");
    }
    o
}

impl FakeApi {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves over real HTTP/1.1 on `listener` from the current tokio runtime, until the
    /// runtime stops.
    pub fn serve_http(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
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
                                    parts.method,
                                    parts.uri,
                                    json,
                                    Box::new(move |r| {
                                        let _ = tx.send(r);
                                    }),
                                );
                                Ok::<_, Infallible>(rx.await.unwrap_or_else(|_| {
                                    full(StatusCode::SERVICE_UNAVAILABLE, &json!({}))
                                }))
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(conn);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        Ok(())
    }

    /// Serves over HTTP on `ip` (port picked by the kernel) inside network namespace `ns`,
    /// from a runtime of its own that lives as long as the returned [`Served`].
    pub fn serve_in(&self, ns: &Netns, ip: IpAddr) -> std::io::Result<Served> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = ns.enter(|| std::net::TcpListener::bind(SocketAddr::new(ip, 0)))??;
        let addr = listener.local_addr()?;
        {
            let _in_rt = rt.enter();
            self.serve_http(listener)?;
        }
        Ok(Served { _rt: rt, addr })
    }

    /// Answers one request (`respond` may be called later: watches stream, held requests
    /// wait).
    pub fn handle(&self, method: Method, uri: Uri, body: Option<Value>, respond: Respond) {
        let mut st = self.lock();
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or("").to_string();
        st.requests.push(ApiRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        if let Some(kind) = Kind::from_path(&path) {
            if st.kinds.entry(kind).or_default().held {
                st.pending.push(Held {
                    method,
                    uri,
                    body,
                    respond,
                });
                return;
            }
            let params: HashMap<&str, &str> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let flag = |k: &str| params.get(k).is_some_and(|v| *v == "true" || *v == "1");
            let rv_now = st.rv;
            let ks = st.kinds.entry(kind).or_default();
            if flag("watch") {
                ks.watches += 1;
                let from: u64 = params
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded::<Bytes>();
                if from < ks.compacted {
                    let _ = tx.unbounded_send(line(&gone()));
                    drop(tx);
                } else {
                    for (rv, ev) in &ks.log {
                        if *rv > from {
                            let _ = tx.unbounded_send(line(ev));
                        }
                    }
                    ks.watchers.push(Watcher {
                        tx,
                        bookmarks: flag("allowWatchBookmarks"),
                    });
                }
                let stream = rx.map(|b| Ok::<_, Infallible>(Frame::data(b)));
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                respond(r);
            } else {
                ks.lists += 1;
                let items: Vec<Value> = ks.objects.values().cloned().collect();
                let (api_version, k) = kind.type_meta();
                let list = json!({
                    "apiVersion": api_version, "kind": format!("{k}List"),
                    "metadata": {"resourceVersion": rv_now.to_string()},
                    "items": items,
                });
                respond(full(StatusCode::OK, &list));
            }
            return;
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/")
            && path.ends_with("/events")
            && method == Method::POST
        {
            let mut b = body.unwrap_or(json!({}));
            b["metadata"]["resourceVersion"] = json!("1");
            respond(full(StatusCode::CREATED, &b));
            return;
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && method == Method::PATCH {
            respond(full(StatusCode::OK, &body.unwrap_or(json!({}))));
            return;
        }
        respond(full(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": path}),
        ));
    }

    /// A new resourceVersion, and a uid when the object brings none: an update keeps the
    /// stored object's, a creation (also after a delete) gets a new one, as on a real server.
    fn stamp(st: &mut State, kind: Kind, obj: &mut Value) -> u64 {
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            let k = key_of(obj);
            let uid = st
                .kinds
                .get(&kind)
                .and_then(|ks| ks.objects.get(&k))
                .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("uid-{}-{}-{rv}", k.0, k.1));
            obj["metadata"]["uid"] = json!(uid);
        }
        rv
    }

    fn publish(ks: &mut KindState, rv: u64, ev: Value) {
        let l = line(&ev);
        ks.watchers
            .retain(|w| w.tx.unbounded_send(l.clone()).is_ok());
        ks.log.push((rv, ev));
    }

    /// Creates or updates an object (seen by lists and watches).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let mut st = self.lock();
        let rv = Self::stamp(&mut st, kind, &mut obj);
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

    /// Several objects in one go.
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

    /// Makes `objects` the whole content of the server, as a client applying them would:
    /// new objects are created, changed ones updated, missing ones deleted, unchanged ones
    /// left alone (no new version). Namespaces are written first and deleted last, so no
    /// object ever sits in a namespace the server does not have. Returns the writes made.
    pub fn converge(&self, objects: &[Value]) -> usize {
        let mut want: HashMap<Kind, BTreeMap<(String, String), &Value>> = HashMap::new();
        for o in objects {
            if let Some(kind) = Kind::of_object(o) {
                want.entry(kind).or_default().insert(key_of(o), o);
            }
        }
        let held = |kind: Kind| -> Vec<((String, String), Value)> {
            let st = self.lock();
            st.kinds
                .get(&kind)
                .map(|ks| {
                    ks.objects
                        .iter()
                        .map(|(k, v)| (k.clone(), content(v)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut writes = 0;
        for kind in [Kind::Namespaces, Kind::Pods, Kind::Policies] {
            let have = held(kind);
            for (k, obj) in want.get(&kind).into_iter().flatten() {
                if !have.iter().any(|(hk, hv)| hk == k && *hv == content(obj)) {
                    self.apply(kind, (*obj).clone());
                    writes += 1;
                }
            }
        }
        for kind in [Kind::Pods, Kind::Policies, Kind::Namespaces] {
            for (k, _) in held(kind) {
                if !want.get(&kind).is_some_and(|w| w.contains_key(&k)) {
                    self.delete(kind, &k.0, &k.1);
                    writes += 1;
                }
            }
        }
        writes
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
        let mut st = self.lock();
        let ks = st.kinds.entry(kind).or_default();
        for w in ks.watchers.drain(..) {
            let _ = w.tx.unbounded_send(line(&gone()));
        }
    }

    /// Sends a BOOKMARK with the current resource version on every watch that asked for
    /// them.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv.to_string();
        for (kind, ks) in st.kinds.iter_mut() {
            let (api_version, k) = kind.type_meta();
            let ev = line(&json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": k,
                "metadata": {"resourceVersion": rv}}}));
            ks.watchers
                .retain(|w| !w.bookmarks || w.tx.unbounded_send(ev.clone()).is_ok());
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
        let rv = Self::stamp(&mut st, kind, &mut obj);
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
        for h in pending {
            // Requests of other held kinds go back to pending; `handle` records requests,
            // so the duplicate record is dropped.
            self.handle(h.method, h.uri, h.body, h.respond);
            self.lock().requests.pop();
        }
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
        ks.watchers.retain(|w| !w.tx.is_closed());
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

    /// `policy_agent::cluster::generation` of everything the server holds: what an agent's
    /// status file names once it enforces exactly this.
    pub fn generation(&self) -> u64 {
        let st = self.lock();
        let mut g = policy_agent::cluster::generation::Generation::default();
        for (kind, ks) in &st.kinds {
            for obj in ks.objects.values() {
                let m = &obj["metadata"];
                let s = |f: &str| m[f].as_str().unwrap_or("").to_string();
                g.add(
                    kind.plural(),
                    &s("namespace"),
                    &s("name"),
                    &s("uid"),
                    &s("resourceVersion"),
                );
            }
        }
        g.value()
    }
}

/// A [`FakeApi`] served on an address; serving stops on drop.
pub struct Served {
    _rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
}

impl Served {
    /// A kubeconfig for this plain-HTTP server (no credentials), for `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        let host = match self.addr {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: \"http://{host}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{FakeApi, Kind};
    use serde_json::json;

    fn uid(api: &FakeApi) -> String {
        let st = api.lock();
        let o = &st.kinds[&Kind::Pods].objects[&("x".to_string(), "a".to_string())];
        o["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn an_update_keeps_the_uid_and_a_new_creation_gets_a_new_one() {
        let api = FakeApi::default();
        let pod = |label: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"namespace": "x", "name": "a", "labels": {"l": label}}})
        };
        api.apply(Kind::Pods, pod("1"));
        let first = uid(&api);
        api.apply(Kind::Pods, pod("2"));
        assert_eq!(uid(&api), first, "an update");
        let before = api.generation();
        api.delete(Kind::Pods, "x", "a");
        api.apply(Kind::Pods, pod("2"));
        assert_ne!(uid(&api), first, "deleted and created again");
        assert_ne!(api.generation(), before);
        // Converging to what is there writes nothing.
        let now = api.generation();
        assert_eq!(api.converge(&[pod("2")]), 0);
        assert_eq!(api.generation(), now);
    }
}
