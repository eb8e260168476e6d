//! The node agent: model of the cluster objects, the pure policy compiler, the map writer and
//! loader, and the object sources (Kubernetes watchers, standalone manifests).

pub mod convert;
pub mod ebpf_object;
pub mod model;
pub mod reference;
pub mod scenario;
