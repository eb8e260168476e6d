//! The node agent: model of the cluster objects, the pure policy compiler, the map writer and
//! loader, and the object sources (Kubernetes watchers, standalone manifests).

pub mod cluster;
pub mod cni;
pub mod compiler;
pub mod convert;
pub mod dataplane;
pub mod ebpf_object;
pub mod kernel_model;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netinfo;
pub mod node;
pub mod observe;
pub mod reference;
pub mod standalone;
pub mod writer;
