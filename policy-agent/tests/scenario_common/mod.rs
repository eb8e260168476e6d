//! Finding the scenario files, shared by the scenario tests.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.yaml`/`.yml` file below `dir`, depth first, sorted; nothing when `dir` is missing.
pub fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

/// The files of `scenarios/<dir>` (at least one).
pub fn scenario_dir(dir: &str) -> Vec<PathBuf> {
    let root = workspace().join("scenarios").join(dir);
    let mut v = Vec::new();
    yaml_files(&root, &mut v);
    assert!(!v.is_empty(), "no scenario in {}", root.display());
    v
}
