//! The kernel side as the agent sees it: load the eBPF object, attach its programs to pod
//! interfaces, write and read its maps, read its deny events.

pub(crate) mod bpf_sys;
pub mod cidr;
pub mod clock;
pub mod ct_table;
pub mod ctnetlink;
pub mod ctseed;
pub mod deny_events;
mod error;
pub mod established;
pub mod kernel_version;
pub mod links;
pub mod loader;
pub mod maps;
pub mod netinfo;
pub mod pinning;
mod readback;
pub mod renumber;
pub mod service_judge;
pub mod uplink;
pub mod writer;

pub use deny_events::DenyEvents;
pub use error::DataplaneError;
pub use established::Established;
pub use links::{LinkSet, Role};
pub use loader::{AttachMode, Attachment, Dataplane};
pub use maps::{Counters, DataplaneMaps, monotonic_coarse_ns};
pub use pinning::PinState;
pub use renumber::{
    ReconcileStats, Translation, adopt_kernel_state, reconcile_with_kernel, renumber_onto,
    renumber_with,
};
pub use uplink::UplinkMode;
