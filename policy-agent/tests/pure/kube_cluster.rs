//! The cluster agent's kube layer against a scripted API server (tower-test mock): lists,
//! watches, malformed objects, dropped watches, lost deletes, resync, Events, readiness and
//! burst coalescing. The enforcer is the recording fake: these tests need no kernel (the
//! kernel path of the same maps is covered by the datapath tests).

#![allow(clippy::unwrap_used)]

use crate::kube_support;

use std::time::Duration;

use kube_support::*;
use policy_agent::metrics::ErrorKind;
use policy_common::ep_flags;
use policy_testkit::Call;
use serde_json::json;

fn base_api() -> FakeApi {
    let api = FakeApi::default();
    api.apply(Kind::Namespaces, namespace("shop", json!({"team": "shop"})));
    api.apply(Kind::Namespaces, namespace("other", json!({})));
    api.apply(
        Kind::Pods,
        pod("shop", "web", NODE, "198.18.0.10", json!({"app": "web"})),
    );
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "client",
            NODE,
            "198.18.0.11",
            json!({"app": "client"}),
        ),
    );
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "remote",
            "node-b",
            "198.18.0.20",
            json!({"app": "client"}),
        ),
    );
    api.apply(
        Kind::Pods,
        host_network_pod("shop", "hostpod", NODE, "198.18.255.1"),
    );
    api.apply(
        Kind::Policies,
        policy("shop", "web-from-client", "web", "client", json!(8080)),
    );
    api
}

fn isolated_ingress(v: Option<policy_common::EndpointValue>) -> bool {
    v.is_some_and(|v| v.flags & ep_flags::ISOLATED_INGRESS != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_initial_list_programs_only_local_pods() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "first programming", || agent.health.is_ready()).await;
    let k = agent.kernel();
    // Local pods are endpoints; web is isolated by the policy, client is not.
    assert!(isolated_ingress(endpoint(&k, "198.18.0.10")));
    let client = endpoint(&k, "198.18.0.11").expect("client endpoint");
    assert_eq!(
        client.flags & (ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS),
        0
    );
    // The other node's pod is a peer (an identity), not an endpoint.
    assert!(endpoint(&k, "198.18.0.20").is_none());
    assert_eq!(
        identity(&k, "198.18.0.20"),
        identity(&k, "198.18.0.11"),
        "same labels, same identity"
    );
    // hostNetwork pods are never endpoints; the node's own address is the host identity.
    assert!(endpoint(&k, "198.18.255.1").is_none());
    assert_eq!(
        identity(&k, "198.18.255.1"),
        Some(policy_common::IDENTITY_HOST)
    );
    assert_eq!(k.endpoints.len(), 2);
    // Exactly one list per kind, then watches.
    for kind in [Kind::Pods, Kind::Namespaces, Kind::Policies] {
        assert_eq!(api.lists(kind), 1, "{kind:?}");
    }
    eventually(5, "watches open", || api.open_watches(Kind::Pods) == 1).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_change_and_remove_endpoints() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;

    // A new local pod labelled web: isolated by the existing policy.
    api.apply(
        Kind::Pods,
        pod("shop", "web2", NODE, "198.18.0.12", json!({"app": "web"})),
    );
    eventually(5, "web2 endpoint", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.12"))
    })
    .await;
    // Relabelled: no longer selected.
    api.apply(
        Kind::Pods,
        pod("shop", "web2", NODE, "198.18.0.12", json!({"app": "other"})),
    );
    eventually(5, "web2 not isolated", || {
        endpoint(&agent.kernel(), "198.18.0.12")
            .is_some_and(|v| v.flags & ep_flags::ISOLATED_INGRESS == 0)
    })
    .await;
    // Deleted: gone from ENDPOINTS and IPCACHE.
    api.delete(Kind::Pods, "shop", "web2");
    eventually(5, "web2 removed", || {
        let k = agent.kernel();
        endpoint(&k, "198.18.0.12").is_none() && identity(&k, "198.18.0.12").is_none()
    })
    .await;
    // The policy deleted: web is no longer isolated.
    api.delete(Kind::Policies, "shop", "web-from-client");
    eventually(5, "web not isolated", || {
        !isolated_ingress(endpoint(&agent.kernel(), "198.18.0.10"))
    })
    .await;
    assert!(agent.kernel().rules.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_malformed_object_is_skipped_and_the_watch_goes_on() {
    let api = base_api();
    // A pod whose containers field is not a list: it cannot decode.
    api.put_raw(
        Kind::Pods,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": "broken"},
            "spec": {"nodeName": NODE, "containers": "not-a-list"},
            "status": {"podIP": "198.18.0.99"},
        }),
    );
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    let k = agent.kernel();
    assert!(
        endpoint(&k, "198.18.0.10").is_some(),
        "the good pods of the same list are enforced"
    );
    assert!(
        endpoint(&k, "198.18.0.99").is_none(),
        "the malformed pod is skipped"
    );
    assert!(agent.metrics.error_count(ErrorKind::MalformedObject) >= 1);
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;

    // A malformed object on the watch itself, then a good one: the watch goes on.
    api.send_raw(
        Kind::Pods,
        json!({"type": "ADDED", "object": {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "broken2", "resourceVersion": "900"},
        "spec": {"containers": 7}}}),
    );
    api.apply(
        Kind::Pods,
        pod("shop", "late", NODE, "198.18.0.13", json!({"app": "web"})),
    );
    eventually(5, "late pod after a malformed event", || {
        endpoint(&agent.kernel(), "198.18.0.13").is_some()
    })
    .await;
    assert!(agent.metrics.error_count(ErrorKind::MalformedObject) >= 2);
    assert_eq!(api.watches(Kind::Pods), 1, "the watch was never restarted");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflect_malformed_policy_fails_closed_with_an_event() {
    let api = base_api();
    api.put_raw(
        Kind::Policies,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "garbled"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": "everything"},
        }),
    );
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    // Every pod of the namespace is isolated both ways, also the one no valid policy selects.
    let client = endpoint(&agent.kernel(), "198.18.0.11").unwrap();
    assert_ne!(client.flags & ep_flags::ISOLATED_INGRESS, 0);
    assert_ne!(client.flags & ep_flags::ISOLATED_EGRESS, 0);
    assert_eq!(client.ingress_policy_set, policy_common::POLICY_SET_EMPTY);
    eventually(5, "Event for the malformed policy", || {
        api.posted_events()
            .iter()
            .any(|e| e["reason"] == "MalformedNetworkPolicy" && e["regarding"]["name"] == "garbled")
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gone_relists_and_converges() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    // While the watch is cut, a pod comes and one goes; the log is compacted so resuming
    // is impossible and the server answers 410 Gone.
    api.compact(Kind::Pods);
    api.expire_watches(Kind::Pods);
    api.delete_silently(Kind::Pods, "shop", "client");
    api.apply(
        Kind::Pods,
        pod("shop", "new", NODE, "198.18.0.14", json!({"app": "web"})),
    );
    api.compact(Kind::Pods);
    eventually(15, "re-list", || api.lists(Kind::Pods) >= 2).await;
    eventually(5, "state after the re-list", || {
        let k = agent.kernel();
        endpoint(&k, "198.18.0.11").is_none() && isolated_ingress(endpoint(&k, "198.18.0.14"))
    })
    .await;
    assert!(
        agent.metrics.error_count(ErrorKind::Watch) >= 1,
        "the 410 is counted"
    );
    agent.stop().await;
}

/// The status file names the generation of exactly the objects the server holds once they
/// are enforced: after writes, bookmarks, and a 410 Gone re-list alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_file_names_the_servers_generation_across_bookmarks_and_relists() {
    let api = base_api();
    let dir = std::env::temp_dir().join(format!("pa-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("status.json");
    let mut cfg = test_loop_config();
    cfg.status_file = Some(path.clone());
    let agent = Agent::start(api.clone(), cfg, None).await;
    let enforced = |want: u64| {
        let path = path.clone();
        move || policy_agent::status_file::read(&path).is_some_and(|s| s.generation == want)
    };
    eventually(10, "the initial objects", enforced(api.generation())).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    assert!(
        api.requests()
            .iter()
            .any(|r| r.query.contains("watch=true") && r.query.contains("allowWatchBookmarks=true")),
        "the agent asks for bookmarks"
    );
    api.apply(
        Kind::Pods,
        pod("shop", "new", NODE, "198.18.0.14", json!({"app": "web"})),
    );
    api.bookmark();
    eventually(10, "a new pod", enforced(api.generation())).await;
    assert_eq!(
        agent.metrics.error_count(ErrorKind::Watch),
        0,
        "bookmarks are read as bookmarks"
    );
    // A bookmark moves no object: the generation stays.
    let before = api.generation();
    api.bookmark();
    assert_eq!(api.generation(), before);
    api.compact(Kind::Policies);
    api.expire_watches(Kind::Policies);
    api.delete(Kind::Pods, "shop", "new");
    eventually(15, "re-list", || api.lists(Kind::Policies) >= 2).await;
    eventually(10, "after the re-list", enforced(api.generation())).await;
    let s = policy_agent::status_file::read(&path).unwrap();
    assert!(s.endpoints > 0 && s.waiting.is_empty(), "{s:?}");
    agent.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dropped_stream_resumes_without_losing_events() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    api.drop_watches(Kind::Pods);
    // Happens while no watch is open: the resumed watch replays it from the version.
    api.apply(
        Kind::Pods,
        pod("shop", "during", NODE, "198.18.0.15", json!({"app": "web"})),
    );
    eventually(10, "event replayed", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.15"))
    })
    .await;
    assert!(api.watches(Kind::Pods) >= 2, "the watch was re-opened");
    assert_eq!(
        api.lists(Kind::Pods),
        1,
        "a dropped stream resumes without re-listing"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_lost_delete_is_repaired_by_the_relist() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "policy watch open", || {
        api.open_watches(Kind::Policies) == 1
    })
    .await;
    assert!(isolated_ingress(endpoint(&agent.kernel(), "198.18.0.10")));
    // The policy's delete event is lost; later the watch is dropped and cannot resume.
    api.delete_silently(Kind::Policies, "shop", "web-from-client");
    api.compact(Kind::Policies);
    // Three turns of the loop (polls included) after the lost event: it has looked again.
    let beats = agent.health.beats();
    eventually(5, "three turns of the loop", || {
        agent.health.beats() >= beats + 3
    })
    .await;
    assert!(
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.10")),
        "nothing heard yet"
    );
    api.drop_watches(Kind::Policies);
    eventually(15, "the lost delete is repaired", || {
        let k = agent.kernel();
        !isolated_ingress(endpoint(&k, "198.18.0.10")) && k.rules.is_empty()
    })
    .await;
    assert!(api.lists(Kind::Policies) >= 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_resync_repairs_drift_in_the_maps() {
    let api = base_api();
    let mut cfg = test_loop_config();
    cfg.resync = Duration::from_millis(300);
    let agent = Agent::start(api.clone(), cfg, None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    let good = agent.kernel();
    // Drift: an endpoint deleted and a foreign one added behind the agent's back.
    {
        let mut s = agent.kernel.lock().unwrap();
        let web = policy_common::EndpointKey {
            addr: policy_agent::compiler::addr_of("198.18.0.10".parse().unwrap()),
        };
        s.kernel.endpoints.remove(&web);
        let stray = policy_common::EndpointKey {
            addr: policy_agent::compiler::addr_of("198.18.9.9".parse().unwrap()),
        };
        s.kernel.endpoints.insert(stray, Default::default());
    }
    eventually(5, "drift repaired", || agent.kernel() == good).await;
    assert!(
        agent
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Repair { changed } if *changed == 2))
    );
    // Changes between resyncs go the incremental way; each resync checks it against a full
    // compile, which must agree.
    api.apply(
        Kind::Pods,
        pod("shop", "web9", NODE, "198.18.0.19", json!({"app": "web"})),
    );
    api.apply(
        Kind::Policies,
        policy("shop", "more", "client", "web", json!("http")),
    );
    eventually(5, "changes applied", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.11"))
    })
    .await;
    // Two whole resyncs after the changes: the second began after they were applied.
    let resyncs = agent.metrics.reconcile_count(true);
    eventually(10, "two resyncs", || {
        agent.metrics.reconcile_count(true) >= resyncs + 2
    })
    .await;
    assert_eq!(agent.metrics.error_count(ErrorKind::CompileMismatch), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_invalid_policy_posts_an_event_naming_the_field() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "policy watch open", || {
        api.open_watches(Kind::Policies) == 1
    })
    .await;
    // Port 70000: the API server's validation would reject it; the rule allows nothing.
    api.apply(
        Kind::Policies,
        policy("shop", "bad-port", "client", "web", json!(70000)),
    );
    let field = "spec.ingress[0].ports[0].port";
    eventually(5, "Event naming the field", || {
        api.posted_events().iter().any(|e| {
            e["reason"] == "InvalidNetworkPolicy"
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == "NetworkPolicy"
                && e["regarding"]["name"] == "bad-port"
                && e["regarding"]["namespace"] == "shop"
                && e["regarding"]["fieldPath"] == field
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains(field) && n.contains("70000"))
        })
    })
    .await;
    let posts = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect::<Vec<_>>();
    assert!(
        posts
            .iter()
            .all(|r| r.path == "/apis/events.k8s.io/v1/namespaces/shop/events"),
        "{posts:?}"
    );
    // Fails closed: the policy still isolates client, and its bad rule admits nothing.
    eventually(5, "client isolated", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.11"))
    })
    .await;
    let c = endpoint(&agent.kernel(), "198.18.0.11").unwrap();
    assert_eq!(c.ingress_policy_set, policy_common::POLICY_SET_EMPTY);
    assert!(agent.metrics.error_count(ErrorKind::InvalidPolicy) >= 1);
    // A resync or an unrelated change does not repeat the Event.
    let n = api.posted_events().len();
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "unrelated",
            "node-b",
            "198.18.0.30",
            json!({"app": "x"}),
        ),
    );
    eventually(5, "unrelated pod seen", || {
        identity(&agent.kernel(), "198.18.0.30").is_some()
    })
    .await;
    assert_eq!(api.posted_events().len(), n);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_ready_only_after_every_cache_synced_and_the_maps_written() {
    let api = base_api();
    api.hold(Kind::Policies);
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(5, "pods and namespaces listed", || {
        api.lists(Kind::Pods) == 1 && api.lists(Kind::Namespaces) == 1
    })
    .await;
    // The loop waits on the caches: three turns, and still nothing.
    let beats = agent.health.beats();
    eventually(5, "three turns of the loop", || {
        agent.health.beats() >= beats + 3
    })
    .await;
    assert!(!agent.health.is_ready(), "policies are not listed yet");
    assert!(
        agent.kernel().endpoints.is_empty(),
        "nothing is written from a partial view"
    );
    assert!(agent.calls().is_empty());
    api.release(Kind::Policies);
    eventually(10, "ready after the policy list", || {
        agent.health.is_ready()
    })
    .await;
    assert!(
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.10")),
        "written with the policies"
    );
    agent.stop().await;
}

/// Three turns of the loop from now: a change notified before was taken by one of them
/// (the loop takes one wake-up per turn, and a change's turn ends after its pass).
async fn settled(agent: &Agent) {
    let beats = agent.health.beats();
    eventually(5, "three turns of the loop", || {
        agent.health.beats() >= beats + 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_burst_is_coalesced() {
    let api = base_api();
    let mut cfg = test_loop_config();
    cfg.debounce = Duration::from_millis(200);
    let agent = Agent::start(api.clone(), cfg, None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    settled(&agent).await;
    let applies_before = agent
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Apply { .. } | Call::Repair { .. }))
        .count();
    let pods: Vec<_> = (0..60)
        .map(|i| {
            pod(
                "shop",
                &format!("burst-{i}"),
                NODE,
                &format!("198.18.1.{i}"),
                json!({"app": "web"}),
            )
        })
        .collect();
    api.apply_all(Kind::Pods, pods);
    eventually(10, "all 60 endpoints", || {
        let k = agent.kernel();
        (0..60).all(|i| isolated_ingress(endpoint(&k, &format!("198.18.1.{i}"))))
    })
    .await;
    settled(&agent).await;
    let writes = agent
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Apply { .. } | Call::Repair { .. }))
        .count()
        - applies_before;
    assert!(writes <= 2, "60 events became {writes} writes");
    agent.stop().await;
}

/// The debounce spaces passes; it does not delay a change that comes after a quiet time
/// (a lone policy change is enforced at once, not `debounce` later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_a_change_after_quiet_is_not_held_by_the_debounce() {
    let api = base_api();
    let mut cfg = test_loop_config();
    let debounce = Duration::from_secs(3);
    cfg.debounce = debounce;
    let agent = Agent::start(api.clone(), cfg, None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    settled(&agent).await;
    tokio::time::sleep(debounce).await;
    let t = std::time::Instant::now();
    api.apply(
        Kind::Pods,
        pod("shop", "lone", NODE, "198.18.0.17", json!({"app": "web"})),
    );
    eventually(10, "the pod's endpoint", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.17"))
    })
    .await;
    assert!(
        t.elapsed() < debounce / 2,
        "a lone change waited {:?} (debounce {debounce:?})",
        t.elapsed()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_failed_write_is_retried_as_a_repair() {
    let api = base_api();
    let agent = Agent::start(api.clone(), test_loop_config(), None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    eventually(5, "pod watch open", || api.open_watches(Kind::Pods) == 1).await;
    agent.kernel.lock().unwrap().fail_applies = 1;
    api.apply(
        Kind::Pods,
        pod("shop", "web3", NODE, "198.18.0.16", json!({"app": "web"})),
    );
    eventually(10, "written after the retry", || {
        isolated_ingress(endpoint(&agent.kernel(), "198.18.0.16"))
    })
    .await;
    assert!(agent.metrics.error_count(ErrorKind::MapWrite) >= 1);
    let calls = agent.calls();
    let failed = calls
        .iter()
        .position(|c| *c == Call::Apply { changes: 0 })
        .expect("the failed apply");
    assert!(
        calls[failed + 1..]
            .iter()
            .any(|c| matches!(c, Call::Repair { .. })),
        "{calls:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_map_full_fails_closed_for_the_affected_endpoint() {
    let api = base_api();
    // web admits client and the remote pod (one identity): one RULES entry; a second policy
    // makes client admit web and web9 through another set. Room for one RULES entry only.
    api.apply(
        Kind::Policies,
        policy("shop", "client-from-web", "client", "web", json!(80)),
    );
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "web9",
            "node-b",
            "198.18.0.19",
            json!({"app": "web", "v": "2"}),
        ),
    );
    let mut cfg = test_loop_config();
    cfg.capacity.rules = 1;
    let agent = Agent::start(api.clone(), cfg, None).await;
    eventually(10, "ready", || agent.health.is_ready()).await;
    let k = agent.kernel();
    assert!(
        k.rules.len() <= 1,
        "never more than the capacity: {}",
        k.rules.len()
    );
    // client's set (two identities) did not fit: client denies all ingress; web keeps its rule.
    let client = endpoint(&k, "198.18.0.11").unwrap();
    assert_ne!(client.flags & ep_flags::ISOLATED_INGRESS, 0);
    assert_eq!(client.ingress_policy_set, policy_common::POLICY_SET_EMPTY);
    assert_eq!(client.flags & ep_flags::INGRESS_HAS_IDENTITY_RULES, 0);
    let web = endpoint(&k, "198.18.0.10").unwrap();
    assert_ne!(web.ingress_policy_set, policy_common::POLICY_SET_EMPTY);
    assert!(
        k.rules
            .keys()
            .all(|r| r.policy_set == web.ingress_policy_set)
    );
    assert!(agent.metrics.error_count(ErrorKind::MapFull) >= 1);
    assert!(
        agent
            .metrics
            .encode()
            .contains("netpol_failclosed_endpoints 1\n")
    );
    // Room again (web's policy and the second peer go): client gets its one rule back.
    api.delete(Kind::Policies, "shop", "web-from-client");
    api.delete(Kind::Pods, "shop", "web9");
    eventually(5, "client programmed", || {
        endpoint(&agent.kernel(), "198.18.0.11")
            .is_some_and(|v| v.ingress_policy_set != policy_common::POLICY_SET_EMPTY)
    })
    .await;
    assert!(
        agent
            .metrics
            .encode()
            .contains("netpol_failclosed_endpoints 0\n")
    );
    agent.stop().await;
}
