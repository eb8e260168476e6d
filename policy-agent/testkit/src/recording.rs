//! [`RecordingEnforcer`]: the cluster [`Enforcer`] with the "kernel" in memory, recording
//! every call, for tests of the reconcile loop that need no kernel.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use policy_agent::cluster::Write;
use policy_agent::cluster::enforcer::{EnforceError, Enforcer, LocalPod};
use policy_agent::compiler::MapContents;
use policy_agent::dataplane::{Counters, DataplaneError};
use policy_agent::model::ObjectKey;
use policy_agent::node::Interfaces;

/// One call the loop made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Apply { changes: usize },
    Repair { changed: usize },
    Interfaces { pods: Vec<ObjectKey> },
}

/// What the fake holds; shared with the test through [`RecordingEnforcer::state`].
#[derive(Debug, Default)]
pub struct Recorded {
    /// The fake kernel maps.
    pub kernel: MapContents,
    pub calls: Vec<Call>,
    /// Fail the next this-many `apply` calls (the maps stay untouched).
    pub fail_applies: usize,
    pub node_addrs: Vec<IpAddr>,
    pub counters: Counters,
}

/// An in-memory enforcer: applies diffs to [`Recorded::kernel`] exactly as the writer
/// applies them to the kernel, and records every call.
#[derive(Clone, Debug, Default)]
pub struct RecordingEnforcer {
    state: Arc<Mutex<Recorded>>,
}

impl RecordingEnforcer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> Arc<Mutex<Recorded>> {
        self.state.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A test that panicked while holding it already failed; keep the data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The failure `fail_applies` injects: an I/O error as a failed map write would give, so the
/// agent keeps no error variant only this fake uses.
fn injected() -> EnforceError {
    EnforceError::Dataplane(DataplaneError::Io {
        path: PathBuf::from("(recording enforcer)"),
        source: io::Error::other("injected failure: apply"),
    })
}

impl Enforcer for RecordingEnforcer {
    fn apply(&mut self, desired: &MapContents, how: Write<'_>) -> Result<(), EnforceError> {
        let mut s = self.lock();
        if s.fail_applies > 0 {
            s.fail_applies -= 1;
            s.calls.push(Call::Apply { changes: 0 });
            return Err(injected());
        }
        let whole;
        let diff = match how {
            Write::Engine(d) => d,
            Write::Whole => {
                whole = MapContents::diff(&s.kernel, desired);
                &whole
            }
        };
        diff.apply(&mut s.kernel);
        s.calls.push(Call::Apply {
            changes: diff.len(),
        });
        Ok(())
    }

    fn repair(&mut self, desired: &MapContents) -> Result<usize, EnforceError> {
        let mut s = self.lock();
        let diff = MapContents::diff(&s.kernel, desired);
        diff.apply(&mut s.kernel);
        s.calls.push(Call::Repair {
            changed: diff.len(),
        });
        Ok(diff.len())
    }

    fn sync_interfaces(&mut self, local: &[LocalPod]) -> Interfaces<ObjectKey> {
        let mut s = self.lock();
        let pods: Vec<ObjectKey> = local.iter().map(|p| p.key.clone()).collect();
        if s.calls.last() != Some(&Call::Interfaces { pods: pods.clone() }) {
            s.calls.push(Call::Interfaces { pods: pods.clone() });
        }
        Interfaces {
            attached: local
                .iter()
                .map(|p| format!("veth-{}-{}", p.key.namespace, p.key.name))
                .collect(),
            enforced: local
                .iter()
                .map(|p| (p.key.clone(), p.ips.clone()))
                .collect(),
            ..Interfaces::default()
        }
    }

    fn node_addrs(&mut self) -> Result<Vec<IpAddr>, EnforceError> {
        Ok(self.lock().node_addrs.clone())
    }

    fn verdicts(&mut self) -> Option<Counters> {
        Some(self.lock().counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_apply_failure_is_a_dataplane_error_and_leaves_the_maps() {
        let mut e = RecordingEnforcer::new();
        e.state()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fail_applies = 1;
        let err = e
            .apply(&MapContents::default(), Write::Whole)
            .expect_err("fails once");
        assert!(matches!(err, EnforceError::Dataplane(_)), "{err}");
        assert!(!err.is_map_full());
        assert!(e.apply(&MapContents::default(), Write::Whole).is_ok());
        let calls = e
            .state()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .calls
            .clone();
        assert_eq!(
            calls,
            vec![Call::Apply { changes: 0 }, Call::Apply { changes: 0 }]
        );
    }
}
