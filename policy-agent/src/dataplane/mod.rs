//! The kernel side as the agent sees it: load the eBPF object, attach its programs to pod
//! interfaces, write and read its maps, read its deny events.

mod error;
pub mod events;
pub mod loader;
pub mod maps;
pub mod uplink;

pub use error::DataplaneError;
pub use events::DenyEvents;
pub use loader::{AttachMode, Attachment, Dataplane};
pub use maps::{Counters, DataplaneMaps, monotonic_coarse_ns};
pub use uplink::UplinkMode;
