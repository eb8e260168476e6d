//! The interfaces an agent has attached the programs to, kept in step with the pods and
//! interfaces present; shared by standalone and cluster mode.
//!
//! An interface is either a local pod's veth (pod hooks) or an uplink (uplink hooks), never
//! both. Links pinned by an earlier agent are taken over in place (no gap) before anything
//! else is attached.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::netinfo;
use super::{AttachMode, Attachment, Dataplane, pinning};

/// Which program pair an interface carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Pod,
    Uplink,
}

/// The attachments of one role.
#[derive(Debug)]
pub struct LinkSet {
    role: Role,
    /// Interface name -> (ifindex when attached, the attachment).
    attached: BTreeMap<String, (u32, Attachment)>,
    /// Uplink attach failures by ifindex: not retried until the interface changes (a pod's
    /// veth is retried every pass: a pod must not stay unenforced).
    failed: BTreeMap<String, u32>,
}

impl LinkSet {
    pub fn new(role: Role) -> Self {
        LinkSet {
            role,
            attached: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Interfaces with the programs attached.
    pub fn names(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    pub fn contains(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    /// Detaches (and unpins) the attachments of interfaces not in `want`, and of interfaces
    /// deleted or re-created (a new ifindex: their links are defunct). An interface `other`
    /// (the other role's set) has taken over keeps what that attach put there: a clsact
    /// filter of ours is replaced in place by the other role's, so it is forgotten, not
    /// deleted.
    pub fn prune(&mut self, dp: &mut Dataplane, want: &BTreeSet<String>, other: &LinkSet) {
        let drop: Vec<String> = self
            .attached
            .iter()
            .filter(|(iface, (idx, _))| {
                !want.contains(*iface) || netinfo::ifindex(iface) != Some(*idx)
            })
            .map(|(iface, _)| iface.clone())
            .collect();
        for iface in drop {
            if let Some((_, a)) = self.attached.remove(&iface) {
                if other.contains(&iface) && a.mode == AttachMode::Netlink {
                    tracing::info!(interface = %iface, role = ?other.role, "role handed over");
                    dp.release(a);
                    continue;
                }
                tracing::info!(interface = %iface, role = ?self.role, "programs detached");
                if let Err(e) = dp.detach(a) {
                    tracing::debug!(interface = %iface, error = %e, "detach");
                }
            }
        }
    }

    /// Attaches to every interface of `want` that has no attachment yet; the failures.
    pub fn attach_missing(
        &mut self,
        dp: &mut Dataplane,
        mode: AttachMode,
        want: &BTreeSet<String>,
    ) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for iface in want {
            if self.attached.contains_key(iface) {
                continue;
            }
            let Some(idx) = netinfo::ifindex(iface) else {
                continue;
            };
            if self.role == Role::Uplink && self.failed.get(iface) == Some(&idx) {
                continue;
            }
            match attach(dp, self.role, iface, mode) {
                Ok(a) => {
                    tracing::info!(interface = %iface, role = ?self.role, "programs attached");
                    self.failed.remove(iface);
                    self.attached.insert(iface.clone(), (idx, a));
                }
                Err(e) => {
                    tracing::error!(interface = %iface, role = ?self.role, error = %e, "attach failed");
                    self.failed.insert(iface.clone(), idx);
                    failures.push((iface.clone(), e.to_string()));
                }
            }
        }
        failures
    }

    /// Leaves every attachment in place for the next agent (restart without a gap).
    pub fn release_all(&mut self, dp: &mut Dataplane) {
        for (_, (_, a)) in std::mem::take(&mut self.attached) {
            dp.release(a);
        }
    }

    /// Detaches (and unpins) every attachment.
    pub fn detach_all(&mut self, dp: &mut Dataplane) {
        for (iface, (_, a)) in std::mem::take(&mut self.attached) {
            if let Err(e) = dp.detach(a) {
                tracing::debug!(interface = %iface, error = %e, "detach");
            }
        }
    }
}

fn attach(
    dp: &mut Dataplane,
    role: Role,
    iface: &str,
    mode: AttachMode,
) -> Result<Attachment, super::DataplaneError> {
    match role {
        Role::Pod => dp.attach(iface, mode),
        Role::Uplink => dp.attach_uplink(iface, mode),
    }
}

/// Takes over the links an earlier agent pinned (this agent's programs replace theirs in
/// place), each in the role it had; the passes after this sort out which interfaces are
/// still wanted as what. Returns the number of failures (retry later).
pub fn adopt_pins(
    dp: &mut Dataplane,
    mode: AttachMode,
    pods: &mut LinkSet,
    uplinks: &mut LinkSet,
) -> usize {
    let mut failures = 0;
    for p in pinning::pinned_interfaces(dp.pin_dir()) {
        if pods.contains(&p.ifname) || uplinks.contains(&p.ifname) {
            continue;
        }
        if netinfo::ifindex(&p.ifname) != Some(p.ifindex) {
            // The interface went away while no agent ran: its links are defunct.
            if let Err(e) = std::fs::remove_dir_all(&p.dir) {
                tracing::warn!(dir = %p.dir.display(), error = %e, "unpinning stale links");
            }
            continue;
        }
        let set = if p.dir.join(policy_common::PROG_FROM_WORLD).exists()
            || p.dir.join(policy_common::PROG_FROM_WORLD_L3).exists()
        {
            &mut *uplinks
        } else {
            &mut *pods
        };
        match attach(dp, set.role, &p.ifname, mode) {
            Ok(a) => {
                tracing::info!(interface = %p.ifname, role = ?set.role, "pinned links taken over");
                set.attached.insert(p.ifname.clone(), (p.ifindex, a));
            }
            Err(e) => {
                failures += 1;
                tracing::error!(interface = %p.ifname, error = %e, "taking over pinned links failed");
            }
        }
    }
    failures
}

/// Where the local pods are: the host interfaces found by the route to each address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces<K> {
    /// Interfaces that get the pod programs.
    pub wanted: BTreeSet<String>,
    /// Each (interface, address) pair found: the address the pod behind that interface may
    /// send from.
    pub bound: BTreeSet<(String, IpAddr)>,
    /// Pods none was found for yet.
    pub waiting: Vec<K>,
    /// Pods every address of which was found, with their (interface, address) pairs.
    pub placed: Vec<(K, Vec<(String, IpAddr)>)>,
}

/// The host interfaces of local pods (by the route to each address), the addresses each
/// carries, and the pods none was found for yet.
pub fn pod_interfaces<'a, K: Clone + 'a>(
    routes: &[netinfo::Route],
    pods: impl IntoIterator<Item = (K, &'a [IpAddr])>,
) -> PodInterfaces<K> {
    let mut out = PodInterfaces {
        wanted: BTreeSet::new(),
        bound: BTreeSet::new(),
        waiting: Vec::new(),
        placed: Vec::new(),
    };
    for (key, ips) in pods {
        let mut pairs = Vec::new();
        for ip in ips {
            if let Some(iface) = netinfo::iface_for(routes, *ip) {
                out.wanted.insert(iface.to_string());
                out.bound.insert((iface.to_string(), *ip));
                pairs.push((iface.to_string(), *ip));
            }
        }
        if pairs.is_empty() {
            out.waiting.push(key);
        } else if pairs.len() == ips.len() {
            out.placed.push((key, pairs));
        }
    }
    out
}
