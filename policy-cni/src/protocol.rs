//! What the plugin and the agent say to each other: one JSON request line, one JSON reply
//! line, then the connection closes.

use std::io::{self, BufRead, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The abstract socket's name prefix ([`crate::local_socket::name_for`] with the agent's
/// pin directory); the agent writes the full name into the plugin's configuration.
pub const SOCKET_PREFIX: &str = "netpol-cni";
/// Longest message either side reads: a request names one pod.
pub const MAX_MESSAGE_BYTES: u64 = 16 * 1024;
/// Longest wait a request may ask for: past it a runtime has given up anyway.
pub const MAX_WAIT_MS: u64 = 120_000;

/// What the plugin asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Enforce this pod with these addresses; answer once it is enforced.
    Add,
    /// The pod's sandbox is gone: forget the addresses the plugin reported for it.
    Del,
    /// Is the agent there (CNI STATUS)?
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// The pod (CNI_ARGS `K8S_POD_NAMESPACE`, `K8S_POD_NAME`); empty for `status`.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// The runtime's sandbox id (logs only).
    #[serde(default)]
    pub container_id: String,
    /// The pod's addresses from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The pod's interface on the host side, when the previous plugin reported it (logs).
    #[serde(default)]
    pub host_interface: Option<String>,
    /// How long the plugin waits for the answer.
    #[serde(default)]
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
        }
    }

    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
        }
    }
}

/// Writes `msg` as one line.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one line of at most [`MAX_MESSAGE_BYTES`] and parses it.
pub fn receive<T: for<'de> Deserialize<'de>>(r: impl io::Read) -> io::Result<T> {
    let mut line = Vec::new();
    let mut limited = io::BufReader::new(r.take(MAX_MESSAGE_BYTES + 1));
    limited.read_until(b'\n', &mut line)?;
    if line.len() as u64 > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message longer than {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a whole message",
        ));
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_request_goes_through_one_line() {
        let req = Request {
            command: Command::Add,
            namespace: "x".into(),
            name: "a".into(),
            container_id: "c1".into(),
            ips: vec!["198.18.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            host_interface: Some("veth1".into()),
            timeout_ms: 5000,
        };
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(receive::<Request>(&buf[..]).unwrap(), req);
    }

    #[test]
    fn oversized_truncated_and_malformed_messages_are_errors() {
        let big = vec![b' '; MAX_MESSAGE_BYTES as usize + 10];
        assert!(receive::<Reply>(&big[..]).is_err());
        assert!(receive::<Reply>(&b"{\"ok\":true}"[..]).is_err());
        assert!(receive::<Reply>(&b"{\"ok\":\n"[..]).is_err());
        assert!(receive::<Reply>(&b"{\"ok\":true}\n"[..]).unwrap().ok);
    }
}
