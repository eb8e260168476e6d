//! Tests without privileges: the compiler and the reference evaluator against the spec's
//! traps, conversion, the cluster cache, deploy manifests and scenario files in simulation.

mod compiler_common;
#[path = "../kube_support/mod.rs"]
mod kube_support;
#[path = "../scenario_common/mod.rs"]
mod scenario_common;

mod api_semantics;
mod cluster_snapshot;
mod compiler_convert_fuzz;
mod compiler_incremental;
mod compiler_nested_cidrs;
mod compiler_traps;
mod compiler_vs_reference;
mod deploy_manifests;
mod kube_cluster;
mod reference_properties;
mod reference_traps;
mod scenario_established;
mod scenario_fuzz;
mod scenario_manifests;
mod scenario_simulate;
