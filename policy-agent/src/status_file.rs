//! The status file both modes write (`--status-file`): what the agent enforces now, so a
//! script, a test or an operator can wait for a change to be in force. Written atomically
//! (a rename) and only when it changes.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("writing status file {path}: {source}")]
pub struct StatusFileError {
    path: PathBuf,
    source: std::io::Error,
}

/// What the agent enforces now.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Which input is enforced. Standalone: `manifests::content_hash` of the directory.
    /// Cluster: `cluster::generation::Generation` of the cached objects.
    pub generation: u64,
    pub endpoints: usize,
    /// Interfaces with the programs attached.
    pub attached: Vec<String>,
    /// Local pods whose interface was not found yet (isolated anyway once it appears).
    pub waiting: Vec<String>,
    /// Non-pod interfaces with the uplink programs attached.
    #[serde(default)]
    pub uplinks: Vec<String>,
    pub problems: Vec<String>,
    /// Whether this agent adopted pinned maps of an earlier one (else it created them).
    #[serde(default)]
    pub adopted: bool,
    /// Whether this agent moved an earlier one's incompatible maps to new ones.
    #[serde(default)]
    pub migrated: bool,
}

pub fn write(path: &Path, status: &Status) -> Result<(), StatusFileError> {
    let err = |source| StatusFileError {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(status).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a status file; `None` while it does not exist or is not one.
pub fn read(path: &Path) -> Option<Status> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
