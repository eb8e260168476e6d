//! Several scenario files at once: `jobs` workers take the files in order from one queue, each
//! with an oracle of its own (its own hosts and agents under tags of their own, kept across
//! files of the same topology), and every file's report is handed over in file order as soon
//! as it and the files before it are done.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use super::report::Counts;
use super::run::{Oracle, OracleError, run_plan};
use super::{Plan, kernel::cleanup};

/// One file's run.
pub struct FileRun<X> {
    /// The report `run_plan` wrote.
    pub output: Vec<u8>,
    pub result: Result<Counts, OracleError>,
    pub secs: f64,
    /// What the caller took from the oracle after the file (`take`).
    pub taken: X,
}

/// Runs `plans` on `jobs` workers, each with the oracle `make` gives it (made in the worker
/// that uses it); after each file `take` gets what the caller wants of the oracle (e.g. its
/// own tallies), and `done(index, run)` gets every file's run, in file order. Returns the
/// workers' oracles (to finish or inspect), in no particular order. Stops taking files once
/// the run is interrupted.
pub fn run_files<O, X, M, T, D>(
    plans: &[Plan],
    jobs: usize,
    make: M,
    take: T,
    mut done: D,
) -> Vec<O>
where
    O: Oracle + Send,
    X: Send,
    M: Fn() -> O + Sync,
    T: Fn(&mut O) -> X + Sync,
    D: FnMut(usize, FileRun<X>),
{
    let next = AtomicUsize::new(0);
    let oracles = Mutex::new(Vec::new());
    let (tx, rx) = mpsc::channel::<(usize, FileRun<X>)>();
    std::thread::scope(|sc| {
        for _ in 0..jobs.clamp(1, plans.len().max(1)) {
            let tx = tx.clone();
            let (next, make, take, oracles) = (&next, &make, &take, &oracles);
            sc.spawn(move || {
                let mut oracle = make();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plans.len() || cleanup::interrupted() {
                        break;
                    }
                    let mut output = Vec::new();
                    let t0 = Instant::now();
                    let result = run_plan(&plans[i], &mut oracle, &mut output);
                    let run = FileRun {
                        output,
                        result,
                        secs: t0.elapsed().as_secs_f64(),
                        taken: take(&mut oracle),
                    };
                    if tx.send((i, run)).is_err() {
                        break;
                    }
                }
                oracles
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(oracle);
            });
        }
        drop(tx);
        // In file order: a finished file waits for the ones before it.
        let mut ready = BTreeMap::new();
        let mut first = 0;
        for (i, run) in rx {
            ready.insert(i, run);
            while let Some(run) = ready.remove(&first) {
                done(first, run);
                first += 1;
            }
        }
        // Files after an interrupted one never came; what did is still reported.
        for (i, run) in ready {
            done(i, run);
        }
    });
    oracles
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
