//! The agent's CNI socket: one thread accepts, one short-lived thread per request.

use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use policy_cni::local_socket;
use policy_cni::protocol::{self, Command, Reply, Request};

use super::install::Install;
use super::registry::PodStarts;
use crate::model::ObjectKey;

/// Requests served at once; more are refused at once (the runtime retries).
const MAX_CONCURRENT: usize = 64;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Most addresses one pod may report (one or two in practice).
const MAX_ADDRESSES: usize = 8;
/// How often the plugin's conflist entry is checked (a main plugin's installer may have
/// rewritten the file without it).
const INSTALL_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("CNI socket @{name}: {source}")]
    Socket {
        name: String,
        source: std::io::Error,
    },
}

/// The running server; dropping it stops it.
pub struct CniServer {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CniServer {
    /// Serves the CNI socket of pin directory `bpf_dir` for `starts`; with `install`, keeps
    /// the plugin installed.
    pub fn spawn(
        bpf_dir: &Path,
        starts: Arc<PodStarts>,
        install: Option<Install>,
    ) -> Result<CniServer, CniServerError> {
        let name = socket_name(bpf_dir);
        let err = |source| CniServerError::Socket {
            name: name.clone(),
            source,
        };
        let listener = local_socket::bind(&name).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cni-server".into())
            .spawn(move || accept_loop(&listener, &starts, install.as_ref(), &s))
            .map_err(err)?;
        tracing::info!(socket = %format!("@{name}"), "serving netpol-cni requests");
        Ok(CniServer {
            name,
            stop,
            thread: Some(thread),
        })
    }

    /// The abstract name served.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The abstract name of `bpf_dir`'s CNI socket (written into the plugin's configuration).
pub fn socket_name(bpf_dir: &Path) -> String {
    local_socket::name_for(protocol::SOCKET_PREFIX, bpf_dir)
}

fn accept_loop(
    listener: &UnixListener,
    starts: &Arc<PodStarts>,
    install: Option<&Install>,
    stop: &AtomicBool,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    let mut next_check = Instant::now();
    // Logged once per distinct failure, not every check.
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(i) = install
            && Instant::now() >= next_check
        {
            next_check = Instant::now() + INSTALL_CHECK;
            match i.ensure() {
                Ok(written) => {
                    if !written.is_empty() {
                        tracing::info!(?written, "netpol-cni installed");
                    }
                    last_error = None;
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::error!(error = %text, "installing netpol-cni failed; retrying");
                        last_error = Some(text);
                    }
                }
            }
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        while let Ok((stream, _)) = listener.accept() {
            if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
                busy.fetch_sub(1, Ordering::AcqRel);
                let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
                let _ = protocol::send(&mut &stream, &Reply::error("agent busy"));
                continue;
            }
            let (starts, busy) = (starts.clone(), busy.clone());
            let spawned = std::thread::Builder::new()
                .name("cni-request".into())
                .spawn(move || {
                    serve(stream, &starts);
                    busy.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread for a CNI request");
            }
        }
    }
}

/// One request: read, check, act, reply.
fn serve(stream: UnixStream, starts: &PodStarts) {
    // Anyone may connect to an abstract name; only root (or our user) may say which
    // addresses a pod has.
    if !local_socket::trusted_peer(&stream) {
        tracing::warn!("CNI request from an untrusted peer refused");
        let _ = protocol::send(&mut &stream, &Reply::error("only root may ask"));
        return;
    }
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let reply = match protocol::receive::<Request>(&stream) {
        Ok(req) => handle(&req, starts),
        Err(e) => Reply::error(format!("bad request: {e}")),
    };
    let _ = protocol::send(&mut &stream, &reply);
}

fn handle(req: &Request, starts: &PodStarts) -> Reply {
    if req.command == Command::Status {
        return Reply::ok();
    }
    let key = match pod_key(req) {
        Ok(k) => k,
        Err(e) => return Reply::error(e),
    };
    match req.command {
        Command::Del => {
            starts.forget(&key);
            Reply::ok()
        }
        Command::Add => {
            if let Err(e) = check_addresses(&req.ips) {
                return Reply::error(e);
            }
            let t0 = Instant::now();
            let wait = Duration::from_millis(req.timeout_ms.min(protocol::MAX_WAIT_MS));
            let result = starts
                .report(&key, &req.ips)
                .and_then(|()| starts.wait_enforced(&key, &req.ips, t0 + wait));
            match result {
                Ok(()) => {
                    tracing::info!(pod = %key, container = %req.container_id, elapsed_us = t0.elapsed().as_micros() as u64, "pod enforced before start");
                    Reply::ok()
                }
                Err(e) => {
                    tracing::warn!(pod = %key, container = %req.container_id, host_interface = ?req.host_interface, error = %e, "pod start refused: not enforced in time");
                    Reply::error(e.to_string())
                }
            }
        }
        Command::Status => Reply::ok(),
    }
}

fn pod_key(req: &Request) -> Result<ObjectKey, String> {
    // DNS-1123 names are at most 253 bytes; anything else is not a pod.
    let ok = |s: &str| !s.is_empty() && s.len() <= 253;
    if !ok(&req.namespace) || !ok(&req.name) {
        return Err("namespace and name must be 1-253 bytes".into());
    }
    Ok(ObjectKey::new(&req.namespace, &req.name))
}

/// A pod's addresses are unicast and its own: never the unspecified, loopback or
/// multicast addresses.
fn check_addresses(ips: &[IpAddr]) -> Result<(), String> {
    if ips.is_empty() || ips.len() > MAX_ADDRESSES {
        return Err(format!("1 to {MAX_ADDRESSES} addresses expected"));
    }
    for ip in ips {
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(format!("{ip} cannot be a pod's address"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn add(ns: &str, name: &str, ips: &[&str], timeout_ms: u64) -> Request {
        Request {
            command: Command::Add,
            namespace: ns.into(),
            name: name.into(),
            container_id: "c".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            host_interface: None,
            timeout_ms,
        }
    }

    #[test]
    fn bad_requests_are_refused_without_touching_the_registry() {
        let starts = PodStarts::new();
        for req in [
            add("", "a", &["198.18.1.5"], 10),
            add("x", &"n".repeat(254), &["198.18.1.5"], 10),
            add("x", "a", &[], 10),
            add("x", "a", &["0.0.0.0"], 10),
            add("x", "a", &["127.0.0.1"], 10),
            add("x", "a", &["ff02::1"], 10),
            add("x", "a", &["198.18.1.1"; 9], 10),
        ] {
            assert!(!handle(&req, &starts).ok, "{req:?}");
        }
        assert!(starts.reported().1.is_empty());
    }

    #[test]
    fn an_add_times_out_with_the_reason_and_a_del_forgets() {
        let starts = PodStarts::new();
        let r = handle(&add("x", "a", &["198.18.1.5"], 10), &starts);
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("no local pod x/a"));
        assert_eq!(starts.reported().1.len(), 1);
        let mut del = add("x", "a", &[], 10);
        del.command = Command::Del;
        assert!(handle(&del, &starts).ok);
        assert!(starts.reported().1.is_empty());
    }
}
