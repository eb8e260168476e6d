//! Tests judged on timing (probes with timeouts, traffic under a restart): one at a time
//! ([`SERIAL`]), in a binary of their own so nothing else runs beside them.

#[path = "../kube_support/mod.rs"]
mod kube_support;
#[path = "../restart_common/mod.rs"]
mod restart_common;
#[path = "../scenario_common/mod.rs"]
mod scenario_common;

mod restart_across_nodes;
mod restart_no_gap;
mod scenario_kernel;
mod under_traffic;

/// Held by every test of this binary for its whole run.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
