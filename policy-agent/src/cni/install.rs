//! Puts `netpol-cni` on the node: its binary in the CNI bin directory and its entry at the
//! end of the conflist the runtime uses, and takes them away again (`uninstall`).
//!
//! The runtime uses the first configuration file of its directory in name order (libcni's
//! rule; `.conflist`, `.conf` and `.json`). Chaining needs a conflist: a single-plugin
//! `.conf` is reported, not rewritten (the main plugin's installer owns it). Every write is
//! a new file renamed over the old, so a runtime never reads half a file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type` (its binary's name).
pub const PLUGIN_TYPE: &str = "netpol-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no CNI configuration in {0} yet (the main plugin installs one)")]
    NoConfig(PathBuf),
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where and how the plugin is installed.
#[derive(Clone, Debug)]
pub struct Install {
    /// The plugin binary shipped with the agent.
    pub plugin: PathBuf,
    /// The runtime's CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The runtime's CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's socket (abstract name).
    pub socket: String,
    /// How long an ADD waits for the agent.
    pub timeout_secs: f64,
}

impl Install {
    /// Installs the binary and the conflist entry where missing or different; returns the
    /// files written.
    pub fn ensure(&self) -> Result<Vec<PathBuf>, InstallError> {
        let mut written = Vec::new();
        let bin = self.bin_dir.join(PLUGIN_TYPE);
        let want = std::fs::read(&self.plugin).map_err(io(&self.plugin))?;
        if std::fs::read(&bin).ok().as_deref() != Some(want.as_slice()) {
            replace(&bin, &want, 0o755)?;
            written.push(bin);
        }
        let conf = chosen_config(&self.conf_dir)?;
        let old = read_json(&conf)?;
        let entry = json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket,
            "timeoutSeconds": self.timeout_secs,
        });
        let new = with_plugin(&old, entry).map_err(|detail| InstallError::Config {
            path: conf.clone(),
            detail,
        })?;
        if new != old {
            write_json(&conf, &new)?;
            written.push(conf);
        }
        Ok(written)
    }
}

/// Takes the plugin out of every configuration in `conf_dir` and its binary out of
/// `bin_dir`; returns the files changed or removed.
pub fn remove(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for conf in config_files(conf_dir)? {
        let Ok(old) = read_json(&conf) else { continue };
        if let Some(new) = without_plugin(&old) {
            write_json(&conf, &new)?;
            changed.push(conf);
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => changed.push(bin),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(changed)
}

/// The configuration files of `dir` in the runtime's order.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file the runtime uses: the first in name order.
pub fn chosen_config(dir: &Path) -> Result<PathBuf, InstallError> {
    config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(dir.to_path_buf()))
}

/// `conf` with `entry` as its last plugin (replacing an older entry of ours wherever it
/// was: ours must run after every plugin that sets up the pod's interface).
pub fn with_plugin(conf: &Value, entry: Value) -> Result<Value, String> {
    let mut conf = conf.clone();
    let plugins = conf
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            "not a conflist (no \"plugins\" list): chaining netpol-cni needs one; convert \
             the main plugin's configuration to a .conflist"
                .to_string()
        })?;
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err("a conflist without plugins: netpol-cni must follow one".into());
    }
    plugins.push(entry);
    Ok(conf)
}

/// `conf` without our entry; `None` when it has none.
pub fn without_plugin(conf: &Value) -> Option<Value> {
    let mut conf = conf.clone();
    let plugins = conf.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    (plugins.len() != before).then_some(conf)
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Most bytes of a configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_json(path: &Path) -> Result<Value, InstallError> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut text))
        .map_err(io(path))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(InstallError::Config {
            path: path.to_path_buf(),
            detail: format!("larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    serde_json::from_slice(&text).map_err(|e| InstallError::Config {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(v).map_err(|e| InstallError::Config {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    text.push(b'\n');
    replace(path, &text, 0o644)
}

/// Writes `bytes` to a new file beside `path` and renames it over `path` (a binary being
/// run, or a file being read, keeps its old contents).
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.netpol-tmp", name.unwrap_or_default()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn conflist() -> Value {
        json!({"cniVersion":"1.0.0","name":"k8s","plugins":[
            {"type":"ptp","ipam":{"type":"host-local"}},
            {"type":"portmap","capabilities":{"portMappings":true}}]})
    }

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let entry = json!({"type": PLUGIN_TYPE, "socket": "s1"});
        let once = with_plugin(&conflist(), entry.clone()).unwrap();
        let plugins = once["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], entry);
        // Again: unchanged. A newer socket replaces the entry, still last.
        assert_eq!(with_plugin(&once, entry).unwrap(), once);
        let newer = json!({"type": PLUGIN_TYPE, "socket": "s2"});
        let twice = with_plugin(&once, newer.clone()).unwrap();
        assert_eq!(twice["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(twice["plugins"][2], newer);
        assert_eq!(without_plugin(&twice).unwrap(), conflist());
        assert_eq!(without_plugin(&conflist()), None);
    }

    #[test]
    fn a_single_plugin_config_is_refused_with_why() {
        let e = with_plugin(&json!({"cniVersion":"1.0.0","type":"bridge"}), json!({})).unwrap_err();
        assert!(e.contains("conflist"), "{e}");
    }

    #[test]
    fn files_are_installed_in_the_runtimes_order_and_removed() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-install-{}", std::process::id()));
        let (conf_dir, bin_dir) = (dir.join("net.d"), dir.join("bin"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::create_dir_all(&bin_dir).unwrap();
        let plugin = dir.join("netpol-cni-build");
        std::fs::write(&plugin, b"#!binary").unwrap();
        let install = Install {
            plugin,
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            socket: "netpol-cni-1".into(),
            timeout_secs: 5.0,
        };
        // The binary goes in first; the entry waits for the main plugin's configuration.
        assert!(matches!(install.ensure(), Err(InstallError::NoConfig(_))));
        assert_eq!(
            std::fs::read(bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"#!binary"
        );
        std::fs::write(conf_dir.join("20-other.conflist"), conflist().to_string()).unwrap();
        std::fs::write(conf_dir.join("10-main.conflist"), conflist().to_string()).unwrap();
        std::fs::write(conf_dir.join("05-notes.txt"), "not a config").unwrap();
        let written = install.ensure().unwrap();
        assert_eq!(written, vec![conf_dir.join("10-main.conflist")]);
        assert!(install.ensure().unwrap().is_empty(), "idempotent");
        let main = read_json(&conf_dir.join("10-main.conflist")).unwrap();
        assert_eq!(main["plugins"][2]["socket"], "netpol-cni-1");
        assert_eq!(
            read_json(&conf_dir.join("20-other.conflist")).unwrap(),
            conflist()
        );
        let removed = remove(&conf_dir, &bin_dir).unwrap();
        assert_eq!(
            removed,
            vec![conf_dir.join("10-main.conflist"), bin_dir.join(PLUGIN_TYPE)]
        );
        assert_eq!(
            read_json(&conf_dir.join("10-main.conflist")).unwrap(),
            conflist()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
