//! One invocation of `netpol-cni`, as a runtime makes it.

use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use crate::local_socket;
use crate::protocol::{self, Reply, Request};
use crate::spec::{self, CniError, Code, Command, Invocation, NetConf};

/// Slack over the agent's own wait before the plugin stops reading (the agent answers a
/// timeout itself; this only covers an agent that hangs).
const READ_SLACK: Duration = Duration::from_secs(2);
/// DEL never fails (the spec's rule: the runtime must be able to clean up), so its message
/// to the agent is best-effort and short.
const DEL_WAIT: Duration = Duration::from_secs(2);

/// Runs one CNI call: `env` the process environment, `stdin` the network configuration.
/// Writes the result or error object to `out`; returns the exit code.
pub fn run(env: &[(String, String)], stdin: &[u8], out: &mut impl Write) -> i32 {
    // The version errors are reported in: the configuration's when readable.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    match call(env, stdin) {
        Ok(None) => 0,
        Ok(Some(v)) => {
            let _ = serde_json::to_writer(&mut *out, &v);
            0
        }
        Err(e) => {
            let _ = serde_json::to_writer(&mut *out, &e.to_json(&version));
            1
        }
    }
}

fn call(env: &[(String, String)], stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let inv = Invocation::from_env(env)?;
    if inv.command == Command::Version {
        let v = NetConf::parse(stdin)
            .map(|c| c.cni_version)
            .unwrap_or_else(|_| "1.1.0".into());
        return Ok(Some(spec::version_info(&v)));
    }
    let conf = NetConf::parse(stdin)?;
    let socket = conf.socket.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "no socket",
            "the agent writes the plugin's entry (with its socket) into the conflist",
        )
    })?;
    match inv.command {
        Command::Add | Command::Check => {
            let prev = conf.prev_result()?;
            let (namespace, name) = inv.pod()?;
            let timeout = conf.timeout()?;
            let req = Request {
                command: protocol::Command::Add,
                namespace,
                name,
                container_id: inv.container_id.clone(),
                ips: spec::pod_addresses(prev)?,
                host_interface: spec::host_interface(prev),
                timeout_ms: timeout.as_millis() as u64,
            };
            let reply = ask(&socket, &req, timeout + READ_SLACK).map_err(|e| {
                CniError::new(
                    Code::TryAgainLater,
                    format!(
                        "the network policy agent did not confirm pod {}/{}",
                        req.namespace, req.name
                    ),
                    format!("{e} (the pod is not started unprotected; the runtime retries)"),
                )
            })?;
            if !reply.ok {
                return Err(CniError::new(
                    Code::TryAgainLater,
                    format!(
                        "the network policy agent does not enforce pod {}/{} yet",
                        req.namespace, req.name
                    ),
                    reply.error.unwrap_or_default(),
                ));
            }
            Ok((inv.command == Command::Add).then(|| spec::pass_through(prev, &conf.cni_version)))
        }
        Command::Del => {
            if let Ok((namespace, name)) = inv.pod() {
                let req = Request {
                    command: protocol::Command::Del,
                    namespace,
                    name,
                    container_id: inv.container_id.clone(),
                    ips: Vec::new(),
                    host_interface: None,
                    timeout_ms: DEL_WAIT.as_millis() as u64,
                };
                // Best-effort: an agent that is not there holds nothing for the pod.
                let _ = ask(&socket, &req, DEL_WAIT);
            }
            Ok(None)
        }
        Command::Status => {
            let req = Request {
                command: protocol::Command::Status,
                namespace: String::new(),
                name: String::new(),
                container_id: String::new(),
                ips: Vec::new(),
                host_interface: None,
                timeout_ms: 1000,
            };
            match ask(&socket, &req, Duration::from_secs(2)) {
                Ok(r) if r.ok => Ok(None),
                Ok(r) => Err(CniError::new(
                    Code::NotAvailable,
                    "the network policy agent is not ready",
                    r.error.unwrap_or_default(),
                )),
                Err(e) => Err(CniError::new(
                    Code::NotAvailable,
                    "the network policy agent is not running",
                    e.to_string(),
                )),
            }
        }
        Command::Gc | Command::Version => Ok(None),
    }
}

/// One request to the agent: refused unless root (or this user) serves the socket, since
/// anyone can bind an abstract name and would otherwise say "enforced".
pub fn ask(socket: &str, req: &Request, wait: Duration) -> std::io::Result<Reply> {
    let stream = local_socket::connect(socket)
        .map_err(|e| std::io::Error::new(e.kind(), format!("agent socket @{socket}: {e}")))?;
    if !local_socket::trusted_peer(&stream) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("agent socket @{socket} is served by neither root nor this user"),
        ));
    }
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    protocol::send(&mut &stream, req)?;
    protocol::receive(&stream)
}
