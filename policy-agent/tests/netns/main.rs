//! The real agent and programs in network namespaces of their own (root: BPF and
//! namespaces): datapath, Services and uplinks, the adversary, the CNI plugin, restarts.

#[path = "../kube_support/mod.rs"]
mod kube_support;
#[path = "../restart_common/mod.rs"]
mod restart_common;

mod adversarial_netns;
mod cluster_metrics;
mod cluster_netns;
mod cni_netns;
mod interfaces_netns;
mod manifest_watch_netns;
mod netns_datapath;
mod netns_services_uplinks;
mod observe_netns;
mod restart_ct_seed;
mod restart_upgrade;
mod revalidate_netns;
