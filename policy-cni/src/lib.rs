//! `netpol-cni`, the chained CNI plugin that closes the pod-start window, and what the node
//! agent shares with it.
//!
//! A runtime creates a pod's network by running the plugins of a conflist in order; this
//! one is chained after the plugin that creates the pod's interface. It asks the agent,
//! over a local socket, to enforce the pod with the addresses the previous plugin gave it,
//! and answers the runtime only once the agent says the pod's endpoint is written and the
//! programs are on its interface. When the agent does not answer in time, the ADD fails:
//! the runtime retries the sandbox later instead of starting the pod unprotected.
//!
//! - [`protocol`]: the agent<->plugin messages (one JSON line each way);
//! - [`local_socket`]: abstract unix sockets whose peers are checked by credentials (shared
//!   with the agent's monitor socket);
//! - [`spec`]: the CNI side: environment, network configuration, results, errors;
//! - [`plugin`]: one invocation, from environment and stdin to stdout and exit code.

pub mod local_socket;
pub mod plugin;
pub mod protocol;
pub mod spec;
