//! What the CNI server and a mode's loop share: addresses the plugin reported for starting
//! pods, and which local pods are enforced.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::model::ObjectKey;

/// Most pods with reported addresses held at once: far above a node's pod limit (110 by
/// default), so only a flood of requests meets it.
pub const MAX_REPORTED: usize = 4096;

/// Why a starting pod is not enforced (the plugin's error text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotEnforced {
    #[error(
        "the agent has no local pod {0} (its object not seen yet, or not scheduled on this node)"
    )]
    UnknownPod(ObjectKey),
    #[error("pod {0} is known, but its interface has no programs or addresses bound yet")]
    NotAttached(ObjectKey),
    #[error("{0} starting pods already wait for the agent")]
    TooMany(usize),
}

type Waker = Box<dyn Fn() + Send + Sync>;

/// Shared between the CNI server (many connection threads) and one mode loop.
#[derive(Default)]
pub struct PodStarts {
    state: Mutex<State>,
    changed: Condvar,
    waker: Mutex<Option<Waker>>,
}

#[derive(Default)]
struct State {
    /// Addresses the plugin reported, per pod; `generation` counts their changes.
    reported: BTreeMap<ObjectKey, Vec<IpAddr>>,
    generation: u64,
    /// Local pods whose endpoint is written and whose addresses are bound on an interface
    /// with the programs, with those addresses (as last published).
    enforced: BTreeMap<ObjectKey, Vec<IpAddr>>,
    /// Local pods the loop knows.
    known: BTreeSet<ObjectKey>,
}

impl std::fmt::Debug for PodStarts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("PodStarts")
            .field("reported", &s.reported.len())
            .field("enforced", &s.enforced.len())
            .finish()
    }
}

impl PodStarts {
    pub fn new() -> Arc<PodStarts> {
        Arc::new(PodStarts::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder left plain data behind: still consistent enough to serve.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the mode's loop is woken when reported addresses change.
    pub fn set_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(wake));
    }

    fn wake(&self) {
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            w();
        }
    }

    /// The plugin reported `ips` for starting pod `key`.
    pub fn report(&self, key: &ObjectKey, ips: &[IpAddr]) -> Result<(), NotEnforced> {
        {
            let mut s = self.lock();
            if s.reported.get(key).map(Vec::as_slice) == Some(ips) {
                return Ok(());
            }
            if !s.reported.contains_key(key) && s.reported.len() >= MAX_REPORTED {
                return Err(NotEnforced::TooMany(s.reported.len()));
            }
            s.reported.insert(key.clone(), ips.to_vec());
            s.generation += 1;
        }
        self.wake();
        Ok(())
    }

    /// The pod's sandbox is gone (CNI DEL): its reported addresses go too.
    pub fn forget(&self, key: &ObjectKey) {
        let removed = {
            let mut s = self.lock();
            let removed = s.reported.remove(key).is_some();
            if removed {
                s.generation += 1;
            }
            removed
        };
        if removed {
            self.wake();
        }
    }

    /// The reported addresses and their generation (the loop recompiles when it changes).
    pub fn reported(&self) -> (u64, BTreeMap<ObjectKey, Vec<IpAddr>>) {
        let s = self.lock();
        (s.generation, s.reported.clone())
    }

    /// The loop's view after an interface pass: the local pods it knows, and those enforced
    /// (endpoint written, addresses bound on an interface with the programs). A pod known
    /// before and gone now was deleted: its reported addresses go (a DEL may never come).
    /// Reports of pods not known yet stay (the watch may lag the runtime).
    pub fn publish(
        &self,
        known: impl IntoIterator<Item = ObjectKey>,
        enforced: impl IntoIterator<Item = (ObjectKey, Vec<IpAddr>)>,
    ) {
        let mut s = self.lock();
        let known: BTreeSet<ObjectKey> = known.into_iter().collect();
        let gone: Vec<ObjectKey> = s.known.difference(&known).cloned().collect();
        for k in gone {
            if s.reported.remove(&k).is_some() {
                s.generation += 1;
            }
        }
        s.known = known;
        s.enforced = enforced.into_iter().collect();
        drop(s);
        self.changed.notify_all();
    }

    /// Waits until pod `key` is enforced with every one of `ips`, or `deadline`.
    pub fn wait_enforced(
        &self,
        key: &ObjectKey,
        ips: &[IpAddr],
        deadline: Instant,
    ) -> Result<(), NotEnforced> {
        let mut s = self.lock();
        loop {
            if s.enforced
                .get(key)
                .is_some_and(|have| ips.iter().all(|ip| have.contains(ip)))
            {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if s.known.contains(key) {
                    NotEnforced::NotAttached(key.clone())
                } else {
                    NotEnforced::UnknownPod(key.clone())
                });
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn key(n: &str) -> ObjectKey {
        ObjectKey::new("x", n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_report_wakes_the_loop_once_per_change() {
        let starts = PodStarts::new();
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        starts.set_waker(move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        starts.report(&key("a"), &[ip("198.18.1.5")]).unwrap();
        starts.report(&key("a"), &[ip("198.18.1.5")]).unwrap();
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        let (g, r) = starts.reported();
        assert_eq!((g, r[&key("a")].clone()), (1, vec![ip("198.18.1.5")]));
        starts.forget(&key("a"));
        starts.forget(&key("a"));
        assert_eq!(woken.load(Ordering::Relaxed), 2);
        assert!(starts.reported().1.is_empty());
    }

    #[test]
    fn a_waiter_returns_once_every_address_is_enforced_and_says_why_on_timeout() {
        let starts = PodStarts::new();
        let ips = [ip("198.18.1.5"), ip("fd00::1:5")];
        let s = starts.clone();
        let waiter = std::thread::spawn(move || {
            s.wait_enforced(&key("a"), &ips, Instant::now() + Duration::from_secs(10))
        });
        // Half of it is not enough.
        starts.publish([key("a")], [(key("a"), vec![ips[0]])]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        starts.publish([key("a")], [(key("a"), ips.to_vec())]);
        assert_eq!(waiter.join().unwrap(), Ok(()));

        let soon = || Instant::now() + Duration::from_millis(10);
        assert_eq!(
            starts.wait_enforced(&key("b"), &ips, soon()),
            Err(NotEnforced::UnknownPod(key("b")))
        );
        starts.publish([key("b")], []);
        assert_eq!(
            starts.wait_enforced(&key("b"), &ips, soon()),
            Err(NotEnforced::NotAttached(key("b")))
        );
    }

    #[test]
    fn reports_end_with_their_pod_and_are_bounded() {
        let starts = PodStarts::new();
        starts.report(&key("a"), &[ip("198.18.1.5")]).unwrap();
        starts.report(&key("b"), &[ip("198.18.1.6")]).unwrap();
        starts.publish([key("a")], []);
        // a was deleted; b was never seen (the watch lags): only a's report goes.
        starts.publish([], []);
        let r = starts.reported().1;
        assert!(!r.contains_key(&key("a")) && r.contains_key(&key("b")));
        for i in r.len()..MAX_REPORTED {
            starts
                .report(&key(&format!("p{i}")), &[ip("198.18.2.1")])
                .unwrap();
        }
        assert!(matches!(
            starts.report(&key("one-more"), &[ip("198.18.2.2")]),
            Err(NotEnforced::TooMany(_))
        ));
        // A pod already reported may still update.
        starts.report(&key("b"), &[ip("198.18.1.7")]).unwrap();
    }
}
