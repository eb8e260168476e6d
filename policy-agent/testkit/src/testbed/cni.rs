//! Calling a CNI plugin as a container runtime does: `CNI_*` environment variables, the
//! network configuration (with the previous plugin's result) on stdin, the result or error
//! object on stdout, inside the node's network namespace.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{Host, Netns};

/// What the plugin answered.
#[derive(Clone, Debug)]
pub struct CniOutcome {
    /// The exit code.
    pub code: i32,
    /// stdout as JSON (`Null` when empty).
    pub output: Value,
}

impl CniOutcome {
    /// The CNI error code, when it failed.
    pub fn error_code(&self) -> Option<u64> {
        self.output.get("code").and_then(Value::as_u64)
    }
}

/// The result a main plugin (ptp-like) returns for test-bed host `h` in the `cni_version`
/// layout: its host-side veth, the sandbox's eth0 and both addresses.
pub fn prev_result(h: &Host, cni_version: &str) -> Value {
    json!({
        "cniVersion": cni_version,
        "interfaces": [
            {"name": h.host_if, "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": format!("/var/run/netns/{}", h.ns.name())},
        ],
        "ips": [
            {"address": format!("{}/32", h.ipv4), "interface": 1},
            {"address": format!("{}/128", h.ipv6), "interface": 1},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
    })
}

/// Runs `plugin` in `node` for `command` on pod `namespace/name`, with `conf` (the
/// plugin's conflist entry, completed with the list's name and version and `prev` as the
/// runtime does). Killed after `limit`.
#[allow(clippy::too_many_arguments)]
pub fn call_plugin(
    node: &Netns,
    plugin: &Path,
    command: &str,
    (namespace, name): (&str, &str),
    conf: &Value,
    prev: Option<&Value>,
    limit: Duration,
) -> std::io::Result<CniOutcome> {
    let mut conf = conf.clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let mut child = Command::new("timeout")
        .arg(format!("{}", limit.as_secs_f64()))
        .args(["ip", "netns", "exec", node.name()])
        .arg(plugin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{namespace}-{name}"))
        .env("CNI_NETNS", format!("/var/run/netns/{name}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox"
            ),
        )
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let output = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).map_err(|e| {
            std::io::Error::other(format!(
                "plugin output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })?
    };
    Ok(CniOutcome {
        code: out.status.code().unwrap_or(-1),
        output,
    })
}

/// The network configuration a runtime gives the plugin at `index` of `conflist`.
pub fn plugin_conf(conflist: &Value, index: usize) -> Value {
    let mut c = conflist["plugins"][index].clone();
    c["name"] = conflist["name"].clone();
    c["cniVersion"] = conflist["cniVersion"].clone();
    c
}
