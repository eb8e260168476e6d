//! The kernel side as the agent sees it: load the eBPF object, attach its programs to pod
//! interfaces, write and read its maps, read its deny events.

pub mod cidr;
pub mod clock;
pub mod ct_table;
pub mod ctnetlink;
pub mod ctseed;
mod error;
pub mod events;
pub mod links;
pub mod loader;
pub mod maps;
pub mod pinning;
mod readback;
pub mod reconcile;
pub mod service_judge;
pub mod uplink;

pub use error::DataplaneError;
pub use events::DenyEvents;
pub use links::{LinkSet, Role};
pub use loader::{AttachMode, Attachment, Dataplane};
pub use maps::{Counters, DataplaneMaps, monotonic_coarse_ns};
pub use pinning::PinState;
pub use reconcile::{
    Numbering, ReconcileStats, adopt_kernel_state, reconcile_with_kernel, renumber_onto,
    renumber_with,
};
pub use uplink::UplinkMode;
