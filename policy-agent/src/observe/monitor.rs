//! `policy-agent monitor`: deny events as they happen, from the agent's socket when an agent
//! runs, else straight from the pinned ring (see [`super`] for who may consume it).

use std::io::{BufRead as _, BufReader, Write};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::event::{MonitorEvent, Resolver};
use super::{ConsumerLock, ObserveError, broker, timefmt};

#[derive(Clone, Debug)]
pub struct Options {
    pub bpf_dir: PathBuf,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
}

/// Where the events come from (told on stderr, and to tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Agent,
    Ring,
}

/// How long a monitor waits for a starting agent's socket before calling the ring busy.
const BUSY_GRACE: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(200);

/// Streams events to `out` until `count` events, the timeout, or `stop`. Returns how many
/// events were written. `note` receives one line each time the source is chosen.
pub fn run(
    opts: &Options,
    stop: &AtomicBool,
    out: &mut dyn Write,
    note: &mut dyn FnMut(Source, &str),
) -> Result<u64, ObserveError> {
    super::check_pin_dir(&opts.bpf_dir)?;
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    let mut printed = 0u64;
    let done = |printed: u64| {
        stop.load(Ordering::Relaxed)
            || opts.count.is_some_and(|c| printed >= c)
            || deadline.is_some_and(|d| Instant::now() >= d)
    };
    let mut emit = |e: &MonitorEvent, printed: &mut u64| -> Result<(), ObserveError> {
        let line = if opts.json { e.json() } else { e.line() };
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|source| ObserveError::Io {
                path: PathBuf::from("<stdout>"),
                source,
            })?;
        *printed += 1;
        Ok(())
    };
    let sock = super::socket_name(&opts.bpf_dir);
    let mut busy_since: Option<Instant> = None;
    while !done(printed) {
        // A socket someone else serves is an error, not a reason to read the ring instead:
        // its owner is in the agent's place.
        if let Some(stream) = super::connect_agent(&opts.bpf_dir)? {
            busy_since = None;
            note(
                Source::Agent,
                &format!("deny events from the agent (socket @{sock})"),
            );
            from_agent(stream, &mut printed, &done, &mut emit)?;
            // The agent went away (stopped or restarting): look again.
            continue;
        }
        match ConsumerLock::try_take(&opts.bpf_dir)? {
            Some(lock) => {
                busy_since = None;
                note(
                    Source::Ring,
                    &format!(
                        "no agent running: reading {} directly",
                        opts.bpf_dir.join(policy_common::MAP_EVENTS).display()
                    ),
                );
                from_ring(opts, &mut printed, &done, &mut emit)?;
                drop(lock);
            }
            None => {
                // An agent that just took the lock binds its socket right after.
                let since = *busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() > BUSY_GRACE {
                    return Err(ObserveError::Busy {
                        dir: opts.bpf_dir.clone(),
                        holder: super::lock_holder(&opts.bpf_dir),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(printed)
}

type Emit<'a> = dyn FnMut(&MonitorEvent, &mut u64) -> Result<(), ObserveError> + 'a;

fn from_agent(
    stream: UnixStream,
    printed: &mut u64,
    done: &dyn Fn(u64) -> bool,
    emit: &mut Emit<'_>,
) -> Result<(), ObserveError> {
    let _ = stream.set_read_timeout(Some(TICK));
    let mut r = BufReader::new(stream);
    let mut buf = String::new();
    while !done(*printed) {
        // A timeout keeps what was read of a partial line in `buf`: never cleared before a
        // whole line is in.
        match r.read_line(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) if buf.ends_with('\n') => {
                match serde_json::from_str::<MonitorEvent>(buf.trim_end()) {
                    Ok(e) => emit(&e, printed)?,
                    Err(e) => tracing::warn!(error = %e, "unreadable line from the agent"),
                }
                buf.clear();
            }
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn from_ring(
    opts: &Options,
    printed: &mut u64,
    done: &dyn Fn(u64) -> bool,
    emit: &mut Emit<'_>,
) -> Result<(), ObserveError> {
    let (mut ring, id) = broker::open_ring(&opts.bpf_dir)?;
    let mut resolver = Resolver::new(&opts.bpf_dir);
    // With no consumer, the ring keeps what was denied long ago until it fills up: only what
    // happens from now on is shown.
    let since = timefmt::monotonic_ns();
    let mut last_check = Instant::now();
    while !done(*printed) {
        let mut fd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, TICK.as_millis() as i32) };
        while let Some(rec) = broker::next_event(&mut ring) {
            if let Some(e) = rec
                && e.timestamp_ns >= since
                && !done(*printed)
            {
                emit(&resolver.decode(&e), printed)?;
            }
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            if broker::ring_replaced(&opts.bpf_dir, id) {
                return Ok(());
            }
        }
    }
    Ok(())
}
