//! The node agent, in layers (each uses only the ones below it):
//!
//! 1. sources of objects: [`cluster`] (Kubernetes watchers), [`manifests`] read by
//!    [`standalone`], and [`cni`] (addresses of starting pods, from `netpol-cni`);
//! 2. the pure policy side: [`model`], [`convert`] (API objects into the model), [`compiler`]
//!    (the model into map contents; no aya, kube or tokio);
//! 3. the node side: [`node`] (one enforcer for both modes) over [`dataplane`] (programs,
//!    maps, links, the map writer, the kernel's network facts);
//! 4. the kernel programs (`policy-ebpf`, embedded by [`ebpf_object`]).
//!
//! Beside them: [`observe`] (`status`, `monitor`), [`metrics`] and [`status_file`].

pub mod cluster;
pub mod cni;
pub mod compiler;
pub mod convert;
pub mod dataplane;
pub mod ebpf_object;
/// Test support (the kernel's lookups modelled in userspace), never in the agent binary.
#[cfg(any(test, feature = "test-support"))]
pub mod kernel_model;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod node;
pub mod observe;
/// Test support (the spec as an evaluator), never in the agent binary.
#[cfg(any(test, feature = "test-support"))]
pub mod reference;
pub mod standalone;
pub mod status_file;
