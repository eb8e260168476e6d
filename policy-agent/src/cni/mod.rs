//! The agent's side of `netpol-cni` (crate `policy-cni`), the chained CNI plugin that keeps a
//! pod from starting before it is enforced.
//!
//! ```text
//! runtime ─ADD─> netpol-cni ─(pod, addresses)─> server ──report──> PodStarts <──publish── mode loop
//!                    <──────── ok / error ────────┘ <──wait_enforced──┘          (compile, attach)
//! ```
//!
//! - The kubelet writes a pod's addresses into its status only after the CNI ADD returns, so
//!   the plugin brings them: a local pod whose object has none yet takes the addresses the
//!   plugin reported for it ([`crate::model::Pod::take_reported_addresses`], in both modes).
//! - The reply waits until the mode's loop has written the pod's endpoint and has the
//!   programs on the interface its addresses route to, with the addresses bound there
//!   ([`PodStarts::publish`]); a timeout is an error, and the runtime retries the sandbox.
//! - [`install`] puts the plugin binary and its conflist entry on the node, and keeps the
//!   entry there (a main plugin's installer may rewrite the file).

pub mod install;
pub mod registry;
pub mod server;

pub use registry::PodStarts;
pub use server::CniServer;
