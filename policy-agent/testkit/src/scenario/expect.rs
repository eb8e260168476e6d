//! The `expect` section: probe ports (`TCP/80`) and expectation patterns
//! (`SRC -> DST` or `SRC -> DST:PROTO/PORT`, `*` matching any one part).

use std::fmt;

use super::topology::{EndpointName, Topology};
use policy_agent::model::Protocol;

/// A probed port: protocol and destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbePort {
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for ProbePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// The default probe list.
pub const DEFAULT_PROBE: ProbePort = ProbePort {
    protocol: Protocol::Tcp,
    port: 80,
};

/// Parses `TCP/80`, `UDP/81`, `SCTP/80`.
pub fn parse_probe_port(s: &str) -> Result<ProbePort, String> {
    let (proto, port) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not PROTO/PORT (like TCP/80)"))?;
    let protocol = Protocol::parse(proto)
        .ok_or_else(|| format!("{proto:?} is not a protocol (TCP, UDP or SCTP)"))?;
    let port = parse_port(port).ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    Ok(ProbePort { protocol, port })
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// One part of an endpoint pattern: a name or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Any,
    Name(String),
}

impl Part {
    fn parse(s: &str) -> Result<Part, String> {
        match s {
            "*" => Ok(Part::Any),
            "" => Err("empty name".into()),
            s if s.contains('*') => Err(format!("{s:?}: `*` must stand for a whole part")),
            s => Ok(Part::Name(s.to_string())),
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Name(n) => n == s,
        }
    }
}

/// An endpoint pattern: `ns/pod`, `external:name` (either part may be `*`), or `*` alone for
/// any endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointPattern {
    Any,
    Pod { namespace: Part, name: Part },
    External(Part),
}

impl EndpointPattern {
    pub fn parse(s: &str) -> Result<EndpointPattern, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(EndpointPattern::Any);
        }
        if let Some(name) = s.strip_prefix("external:") {
            return Ok(EndpointPattern::External(Part::parse(name)?));
        }
        match s.split_once('/') {
            Some((ns, name)) if !name.contains('/') => Ok(EndpointPattern::Pod {
                namespace: Part::parse(ns)?,
                name: Part::parse(name)?,
            }),
            _ => Err(format!("{s:?} is not ns/pod, external:name or *")),
        }
    }

    pub fn matches(&self, ep: &EndpointName) -> bool {
        match (self, ep) {
            (EndpointPattern::Any, _) => true,
            (EndpointPattern::Pod { namespace, name }, EndpointName::Pod(key)) => {
                namespace.matches(&key.namespace) && name.matches(&key.name)
            }
            (EndpointPattern::External(name), EndpointName::External(n)) => name.matches(n),
            _ => false,
        }
    }
}

/// `SRC -> DST` or `SRC -> DST:PROTO/PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub src: EndpointPattern,
    pub dst: EndpointPattern,
    /// `None`: any protocol.
    pub protocol: Option<Protocol>,
    /// `None`: any port.
    pub port: Option<u16>,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let (src, rest) = s
            .split_once("->")
            .ok_or_else(|| format!("{s:?} is not \"SRC -> DST\""))?;
        let rest = rest.trim();
        // `:PROTO/PORT` is the last colon-part when it holds a slash (`external:name` does not).
        let (dst, port) = match rest.rsplit_once(':') {
            Some((d, p)) if p.contains('/') => (d, Some(p)),
            _ => (rest, None),
        };
        let (protocol, port) = match port {
            None => (None, None),
            Some(p) => {
                let (proto, num) = p.split_once('/').unwrap_or((p, ""));
                let protocol = match proto.trim() {
                    "*" => None,
                    other => Some(Protocol::parse(other).ok_or_else(|| {
                        format!("{other:?} is not a protocol (TCP, UDP, SCTP or *)")
                    })?),
                };
                let port = match num.trim() {
                    "*" => None,
                    other => Some(
                        parse_port(other)
                            .ok_or_else(|| format!("{other:?} is not a port (1-65535 or *)"))?,
                    ),
                };
                (protocol, port)
            }
        };
        Ok(Pattern {
            src: EndpointPattern::parse(src)?,
            dst: EndpointPattern::parse(dst)?,
            protocol,
            port,
        })
    }

    pub fn matches(&self, src: &EndpointName, dst: &EndpointName, probe: ProbePort) -> bool {
        self.src.matches(src)
            && self.dst.matches(dst)
            && self.protocol.is_none_or(|p| p == probe.protocol)
            && self.port.is_none_or(|p| p == probe.port)
    }

    /// Why the pattern cannot match any probe of the step (a typo, most likely), if so.
    pub fn check(&self, topo: &Topology, probes: &[ProbePort]) -> Result<(), String> {
        let eps = topo.endpoints();
        if !eps.iter().any(|e| self.src.matches(e)) {
            return Err("the source matches no pod or external".into());
        }
        if !eps.iter().any(|e| self.dst.matches(e)) {
            return Err("the destination matches no pod or external".into());
        }
        // A port the step does not probe is no error: authors reuse patterns across steps.
        let _ = probes;
        Ok(())
    }
}
