//! Kubernetes Events on invalid NetworkPolicies, published off the reconcile path.
//!
//! The loop hands each new problem set to a task that publishes through kube's `Recorder`
//! (events.k8s.io/v1), so a slow or failing API server never delays the maps. One Event per
//! problem; its `regarding.fieldPath` and its note name the field.

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use super::snapshot::PolicyProblems;
use crate::metrics::{ErrorKind, Metrics};

/// The reporting controller named on every Event.
pub const CONTROLLER: &str = "netpol-ebpf-agent";

/// An Event note may hold at most 1 kB.
const NOTE_MAX: usize = 1024;

/// At most this many Events per policy version: a policy with hundreds of bad rules must not
/// flood the API server.
const MAX_EVENTS_PER_POLICY: usize = 8;

/// Starts the publisher; send it the problems to report.
pub fn spawn_publisher(
    client: Client,
    instance: String,
    metrics: Arc<Metrics>,
) -> (
    mpsc::UnboundedSender<PolicyProblems>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<PolicyProblems>();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.into(),
            instance: Some(instance),
        },
    );
    let task = tokio::spawn(async move {
        while let Some(pp) = rx.recv().await {
            for p in pp.problems.iter().take(MAX_EVENTS_PER_POLICY) {
                let mut regarding = pp.reference.clone();
                if !p.field.is_empty() {
                    regarding.field_path = Some(p.field.clone());
                }
                let ev = Event {
                    type_: EventType::Warning,
                    reason: if pp.malformed {
                        "MalformedNetworkPolicy"
                    } else {
                        "InvalidNetworkPolicy"
                    }
                    .into(),
                    note: Some(truncate(&p.message, NOTE_MAX)),
                    action: "Enforce".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &regarding).await {
                    metrics.error(ErrorKind::EventPublish);
                    tracing::warn!(policy = %pp.key, field = %p.field, error = %e, "publishing the Event failed");
                }
            }
        }
    });
    (tx, task)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
