//! The real `/metrics`, `/healthz` and `/readyz` endpoint on 127.0.0.1:0, over plain HTTP,
//! while the agent runs against the scripted API server. In a network namespace of the
//! test's own (its loopback only): nothing listens or connects in the machine's namespace.

#![allow(clippy::unwrap_used)]

use crate::kube_support;

use std::time::Duration;

use kube_support::*;
use policy_common::{Direction, Reason};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request; (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The value of the sample line starting with `series` (exact labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn cluster_metrics_endpoint_serves_health_readiness_and_metrics() {
    let ns = policy_testkit::testbed::Netns::create(&format!(
        "pa-metrics-{}",
        policy_testkit::testbed::pid_tag()
    ))
    .expect("namespace (needs root)");
    ns.ip(&["link", "set", "lo", "up"]).expect("loopback up");
    ns.enter(|| {
        // Built here, so the runtime's threads (and every socket) live in the namespace.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(serve_and_check());
    })
    .expect("enter the namespace");
}

async fn serve_and_check() {
    let api = FakeApi::default();
    api.apply(Kind::Namespaces, namespace("shop", json!({})));
    api.apply(
        Kind::Pods,
        pod("shop", "web", NODE, "198.18.0.10", json!({"app": "web"})),
    );
    api.apply(
        Kind::Policies,
        policy("shop", "p", "web", "client", json!(8080)),
    );
    api.apply(
        Kind::Policies,
        policy("shop", "bad", "web", "client", json!(0)),
    );
    api.hold(Kind::Namespaces);
    let agent = Agent::start(
        api.clone(),
        test_loop_config(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await;
    let addr = agent.metrics_addr.expect("served");
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    // Live, not ready while a cache is still listing.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    // Kernel counters the enforcer reports.
    {
        let mut s = agent.kernel.lock().unwrap();
        s.counters.0[Direction::Ingress as usize][Reason::DenyPolicy as usize] = 7;
        s.counters.0[Direction::Egress as usize][Reason::AllowEstablished as usize] = 40;
    }
    api.release(Kind::Namespaces);
    eventually(10, "ready", || agent.health.is_ready()).await;
    assert_eq!(get(addr, "/readyz").await.0, 200);

    // Counters are read every poll: three turns of the loop include one.
    let beats = agent.health.beats();
    eventually(5, "three turns of the loop", || {
        agent.health.beats() >= beats + 3
    })
    .await;
    let (status, ctype, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics terminator");
    assert_eq!(
        sample(
            &body,
            r#"netpol_verdicts_total{direction="ingress",verdict="deny",reason="policy"}"#
        ),
        Some(7.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            r#"netpol_verdicts_total{direction="egress",verdict="allow",reason="established"}"#
        ),
        Some(40.0)
    );
    // Every direction x reason series exists, and no other.
    let verdict_series = body
        .lines()
        .filter(|l| l.starts_with("netpol_verdicts_total{"))
        .count();
    assert_eq!(verdict_series, Direction::COUNT * Reason::COUNT);
    // The programming latency was observed for the first write.
    assert!(
        sample(&body, "netpol_policy_programming_seconds_count").unwrap() >= 1.0,
        "{body}"
    );
    // Map entries against capacity.
    assert_eq!(
        sample(&body, r#"netpol_map_entries{map="ENDPOINTS"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, r#"netpol_map_capacity{map="ENDPOINTS"}"#),
        Some(f64::from(policy_common::maps::MAX_ENDPOINTS))
    );
    // Errors by kind: the invalid policy (port 0) was counted; unrelated kinds are zero.
    assert!(sample(&body, r#"netpol_errors_total{kind="invalid_policy"}"#).unwrap() >= 1.0);
    assert_eq!(
        sample(&body, r#"netpol_errors_total{kind="map_full"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, r#"netpol_watched_objects{kind="networkpolicies"}"#),
        Some(2.0)
    );

    assert_eq!(get(addr, "/nope").await.0, 404);
    agent.stop().await;
    // The endpoint goes away with the agent.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < until, "listener still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
