//! The CNI side of the plugin (CNI spec 1.1, with results of 0.3.0 and later): how a
//! runtime calls a plugin (environment variables, the network configuration on stdin) and
//! what it expects back (the result on stdout, or an error object and a non-zero exit).

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The result and configuration versions this plugin speaks (the result layout of 0.3.0
/// and later: `interfaces`, `ips[].address`, `ips[].interface`).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Longest configuration read from stdin.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// How long an ADD waits for the agent unless the configuration says otherwise.
pub const DEFAULT_TIMEOUT_SECS: f64 = 10.0;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The CNI spec's error codes this plugin returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    DecodeFailed = 6,
    InvalidConfig = 7,
    /// The agent did not confirm in time: the runtime tries the sandbox again later.
    TryAgainLater = 11,
    /// STATUS: the agent is not there, so ADD cannot be served.
    NotAvailable = 50,
}

/// An error as the runtime receives it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// One call as the runtime made it (`CNI_*` variables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V` pairs separated by `;`.
    pub args: Vec<(String, String)>,
}

impl Invocation {
    pub fn from_env(vars: &[(String, String)]) -> Result<Invocation, CniError> {
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let missing = |k: &str| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("{k} is not set"),
                "a container runtime sets it when running a CNI plugin",
            )
        };
        let command = match get("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))? {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
                ));
            }
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let field = |k: &str| -> Result<String, CniError> {
            match get(k) {
                Some(v) => Ok(v.to_string()),
                None if per_container => Err(missing(k)),
                None => Ok(String::new()),
            }
        };
        Ok(Invocation {
            command,
            container_id: field("CNI_CONTAINERID")?,
            ifname: field("CNI_IFNAME")?,
            args: get("CNI_ARGS").map(parse_args).unwrap_or_default(),
        })
    }

    /// The value of a `CNI_ARGS` key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The pod this call is for (Kubernetes runtimes pass it in `CNI_ARGS`).
    pub fn pod(&self) -> Result<(String, String), CniError> {
        match (self.arg("K8S_POD_NAMESPACE"), self.arg("K8S_POD_NAME")) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => Err(CniError::new(
                Code::InvalidEnvironment,
                "CNI_ARGS names no pod",
                "K8S_POD_NAMESPACE and K8S_POD_NAME are needed to find the pod's policies",
            )),
        }
    }
}

fn parse_args(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The network configuration on stdin: the conflist's common fields, this plugin's own
/// and the previous plugin's result.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The agent's socket (abstract name); the agent writes it when it installs the plugin.
    #[serde(default)]
    pub socket: Option<String>,
    /// How long an ADD waits for the agent.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        if stdin.len() as u64 > MAX_CONFIG_BYTES {
            return Err(CniError::new(
                Code::DecodeFailed,
                "network configuration too large",
                format!("more than {MAX_CONFIG_BYTES} bytes on stdin"),
            ));
        }
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::DecodeFailed,
                "network configuration is not valid JSON",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("cniVersion {:?} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// The ADD's wait, bounded to what the protocol allows.
    pub fn timeout(&self) -> Result<std::time::Duration, CniError> {
        let secs = self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let max = crate::protocol::MAX_WAIT_MS as f64 / 1000.0;
        if !(secs > 0.0 && secs <= max) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("timeoutSeconds {secs} is out of range"),
                format!("between 0 (exclusive) and {max}"),
            ));
        }
        Ok(std::time::Duration::from_secs_f64(secs))
    }

    /// The previous plugin's result, required where this plugin is chained.
    pub fn prev_result(&self) -> Result<&Map<String, Value>, CniError> {
        self.prev_result
            .as_ref()
            .and_then(Value::as_object)
            .ok_or_else(|| {
                CniError::new(
                    Code::InvalidConfig,
                    "no prevResult",
                    "netpol-cni must be chained after the plugin that creates the pod's interface",
                )
            })
    }
}

/// The pod's addresses in a result (`ips[].address`, CIDR notation).
pub fn pod_addresses(result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let bad = |detail: String| CniError::new(Code::InvalidConfig, "prevResult.ips", detail);
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Err(bad("no address: nothing to enforce".into())),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("not a list".into())),
    };
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let text = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("[{i}].address missing")))?;
        let addr = text.split_once('/').map_or(text, |(a, _)| a);
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("[{i}].address {text:?} is not an address")))?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(bad("no address: nothing to enforce".into()));
    }
    Ok(out)
}

/// The host side of the pod's interface in a result: an interface with no `sandbox`.
pub fn host_interface(result: &Map<String, Value>) -> Option<String> {
    result
        .get("interfaces")?
        .as_array()?
        .iter()
        .find(|i| {
            i.get("sandbox")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
        })
        .and_then(|i| i.get("name")?.as_str().map(str::to_string))
}

/// The result a chained plugin that changes nothing returns: the previous one, in the
/// configuration's version.
pub fn pass_through(result: &Map<String, Value>, cni_version: &str) -> Value {
    let mut r = result.clone();
    r.insert("cniVersion".into(), Value::String(cni_version.to_string()));
    Value::Object(r)
}

/// The VERSION command's answer.
pub fn version_info(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_pod_comes_from_cni_args() {
        let inv = Invocation::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_UID=u",
            ),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.pod().unwrap(), ("x".to_string(), "a".to_string()));
    }

    #[test]
    fn missing_or_unknown_variables_are_environment_errors() {
        let e = Invocation::from_env(&env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        let e = Invocation::from_env(&env(&[("CNI_COMMAND", "FLY")])).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        // VERSION needs no container.
        assert!(Invocation::from_env(&env(&[("CNI_COMMAND", "VERSION")])).is_ok());
        let inv = Invocation::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(inv.pod().unwrap_err().code, Code::InvalidEnvironment);
    }

    #[test]
    fn addresses_and_the_host_interface_come_from_the_previous_result() {
        let r: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"veth1","mac":"aa:bb:cc:dd:ee:ff"},
                {"name":"eth0","sandbox":"/var/run/netns/x"}],
                "ips":[{"version":"4","address":"198.18.1.5/24","interface":1},
                       {"version":"6","address":"fd00::1:5/64","interface":1}]}"#,
        )
        .unwrap();
        let r = r.as_object().unwrap();
        assert_eq!(
            pod_addresses(r).unwrap(),
            vec![
                "198.18.1.5".parse::<IpAddr>().unwrap(),
                "fd00::1:5".parse().unwrap()
            ]
        );
        assert_eq!(host_interface(r).as_deref(), Some("veth1"));
        let out = pass_through(r, "1.0.0");
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["ips"], r["ips"]);
    }

    #[test]
    fn a_result_without_usable_addresses_is_a_config_error() {
        for bad in [
            r#"{}"#,
            r#"{"ips":[]}"#,
            r#"{"ips":"x"}"#,
            r#"{"ips":[{"address":"nonsense/24"}]}"#,
            r#"{"ips":[{"gateway":"198.18.0.1"}]}"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            let e = pod_addresses(v.as_object().unwrap()).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{bad}");
        }
    }

    #[test]
    fn configuration_errors_name_what_is_wrong() {
        assert_eq!(
            NetConf::parse(b"not json").unwrap_err().code,
            Code::DecodeFailed
        );
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"netpol-cni"}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"netpol-cni"}"#).unwrap();
        assert_eq!(c.prev_result().unwrap_err().code, Code::InvalidConfig);
        for t in ["0", "-1", "1e9"] {
            let text = format!(r#"{{"cniVersion":"1.0.0","timeoutSeconds":{t}}}"#);
            let c = NetConf::parse(text.as_bytes()).unwrap();
            assert_eq!(c.timeout().unwrap_err().code, Code::InvalidConfig, "{t}");
        }
        let huge = vec![b' '; MAX_CONFIG_BYTES as usize + 1];
        assert_eq!(NetConf::parse(&huge).unwrap_err().code, Code::DecodeFailed);
    }
}
