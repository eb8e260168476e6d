//! What the reconcile loop needs of the node: write map changes, repair drift, attach the
//! programs to local pods' interfaces, read the verdict counters and the node's addresses.
//!
//! [`KernelEnforcer`] is the real one over the loaded object and its maps; tests of the loop
//! use an in-memory fake from the `policy-testkit` crate.

use std::net::IpAddr;

use crate::compiler::{MapContents, MapDiff};
use crate::dataplane::netinfo;
use crate::dataplane::{
    AttachMode, Counters, Dataplane, DataplaneError, DataplaneMaps, UplinkMode,
};
use crate::model::ObjectKey;
use crate::node::{Interfaces, NodeEnforcer, NodeOptions};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    NetInfo(#[from] netinfo::NetInfoError),
}

impl EnforceError {
    /// Whether the error is a full map (ENOSPC/E2BIG from an insert).
    pub fn is_map_full(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::E2BIG))
            {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// A local pod the programs must be attached for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
}

/// How the contents to write relate to the last ones written.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// The engine's own incremental diff from the contents last written, in the same
    /// numbering (each number keeps its meaning): the enforcer may write it as it is, after
    /// translating numbers into the kernel's.
    Engine(&'a MapDiff),
    /// Whole contents whose numbers may mean something else than last time (a rebuilt
    /// engine, contents fitted to capacity): renumbered onto the kernel's before diffing.
    Whole,
}

/// The node side of the reconcile loop.
pub trait Enforcer: Send {
    /// Brings the maps from the last written state to `desired`, in an order that never
    /// opens traffic mid-way. On error the maps are in an unknown state between the two;
    /// the loop then calls [`Enforcer::repair`].
    fn apply(&mut self, desired: &MapContents, how: Write<'_>) -> Result<(), EnforceError>;

    /// Makes the maps equal `desired` whatever they hold now (lost writes, entries changed
    /// or added behind the agent's back). Returns the number of entries written or deleted.
    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError>;

    /// Attaches the programs to the host interfaces of these pods (found from their
    /// addresses) and detaches them from interfaces no local pod uses any more.
    fn sync_interfaces(&mut self, local: &[LocalPod]) -> Interfaces<ObjectKey>;

    /// This node's own addresses (the agent runs in the host network namespace).
    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError>;

    /// The kernel's verdict counters summed over CPUs, when there is a kernel.
    fn verdicts(&mut self) -> Option<Counters>;

    /// Whether this agent adopted pinned maps of an earlier one (else it created them).
    fn adopted(&self) -> bool {
        false
    }

    /// Whether this agent moved an earlier one's incompatible maps to new ones.
    fn migrated(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

/// The node side shared with standalone mode ([`NodeEnforcer`]) behind the loop's trait.
pub struct KernelEnforcer {
    node: NodeEnforcer,
}

impl KernelEnforcer {
    /// Loads and takes the node side as [`NodeEnforcer::start`] does: an earlier agent's
    /// pinned maps are adopted, incompatible ones migrated (a DaemonSet upgrade that changed
    /// a map moves to new maps without a gap), new ones get conntrack seeded.
    pub fn start(opts: &NodeOptions) -> Result<Self, EnforceError> {
        Ok(KernelEnforcer {
            node: NodeEnforcer::start(opts)?,
        })
    }

    /// The same over an object the caller loaded.
    pub fn new(
        dp: Dataplane,
        mode: AttachMode,
        service_cidrs: &[ipnet::IpNet],
        uplink_mode: UplinkMode,
    ) -> Result<Self, EnforceError> {
        let mut opts = NodeOptions::new(dp.pin_dir());
        opts.attach_mode = mode;
        opts.service_cidrs = service_cidrs.to_vec();
        opts.uplink_mode = uplink_mode;
        Ok(KernelEnforcer {
            node: NodeEnforcer::with_dataplane(dp, &opts)?,
        })
    }

    pub fn maps(&self) -> &DataplaneMaps {
        self.node.maps()
    }

    /// Leaves every attachment in place for the next agent (restart without a gap);
    /// `policy-agent uninstall` removes them.
    pub fn release_all(&mut self) {
        self.node.release_all();
    }

    /// Detaches (and unpins) every attachment: a test or an uninstall, not a restart.
    pub fn detach_all(&mut self) {
        self.node.detach_all();
    }
}

impl Enforcer for KernelEnforcer {
    fn apply(&mut self, desired: &MapContents, how: Write<'_>) -> Result<(), EnforceError> {
        // The loop's numbers are its own; the kernel's win where the meaning is the same
        // (they may come from an earlier agent): a whole write renames onto them once, and
        // the engine's later diffs are translated with the same renaming.
        match how {
            Write::Engine(diff) => self.node.write_diff(desired, diff)?,
            Write::Whole => self.node.write(desired)?,
        };
        Ok(())
    }

    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError> {
        Ok(self.node.repair(desired)?)
    }

    fn sync_interfaces(&mut self, local: &[LocalPod]) -> Interfaces<ObjectKey> {
        self.node
            .sync_interfaces(local.iter().map(|p| (p.key.clone(), p.ips.as_slice())))
    }

    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError> {
        Ok(netinfo::local_addrs()?)
    }

    fn adopted(&self) -> bool {
        self.node.adopted()
    }

    fn migrated(&self) -> bool {
        self.node.migrated()
    }

    fn verdicts(&mut self) -> Option<Counters> {
        match self.node.verdicts() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "reading verdict counters failed");
                None
            }
        }
    }
}
