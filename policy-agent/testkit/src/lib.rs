//! Test support for the agent, kept out of its library and binary: network-namespace test
//! beds (`testbed`), the scenario file runner with its kernel and simulated oracles
//! (`scenario`, binary `policy-scenario`), a scripted API server (`fake_api`), and an in-memory
//! fake of the cluster enforcer (`recording`).

pub mod bench_report;
pub mod fake_api;
pub mod recording;
pub mod scenario;
pub mod testbed;

pub use recording::{Call, Recorded, RecordingEnforcer};
