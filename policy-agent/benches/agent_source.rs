//! Where the agent under test gets its objects, and how a change is written there: a
//! manifest directory (each file written as an operator's tool would: a dot temporary,
//! fsync, rename) or the fake API server served over HTTP in the node namespace (a change
//! is an object applied, its watch event queued to the agent's open watches).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use policy_testkit::fake_api::{FakeApi, Kind, Served};
use policy_testkit::testbed::Testbed;
use serde_json::Value;

pub enum Source {
    Dir(PathBuf),
    Api {
        api: FakeApi,
        _served: Served,
        kubeconfig: PathBuf,
    },
}

impl Source {
    /// A manifest directory under `scratch` holding `objects`, one file per namespace (its
    /// Namespace, pods and policies), as the scale bench lays them out.
    pub fn dir<'a>(scratch: &Path, objects: impl Iterator<Item = &'a Value>) -> Result<Source> {
        let dir = scratch.join("manifests");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for obj in objects {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .or(obj["metadata"]["name"].as_str())
                .context("object without a name")?;
            files
                .entry(ns.to_string())
                .or_default()
                .push(obj.to_string());
        }
        for (ns, docs) in files {
            // JSON documents are YAML documents.
            std::fs::write(dir.join(format!("{ns}.yaml")), docs.join("\n---\n"))?;
        }
        Ok(Source::Dir(dir))
    }

    /// The fake API server holding `objects`, served on the node namespace's loopback.
    pub fn api<'a>(
        bed: &Testbed,
        scratch: &Path,
        objects: impl Iterator<Item = &'a Value>,
    ) -> Result<Source> {
        let api = FakeApi::default();
        for obj in objects {
            api.apply(
                Kind::of_object(obj).context("object of an unknown kind")?,
                obj.clone(),
            );
        }
        let served = api
            .serve_in(&bed.node, "127.0.0.1".parse()?)
            .context("serving the fake API server")?;
        let kubeconfig = scratch.join("kubeconfig");
        std::fs::write(&kubeconfig, served.kubeconfig())?;
        Ok(Source::Api {
            api,
            _served: served,
            kubeconfig,
        })
    }

    /// The agent's mode and source arguments, and its environment.
    pub fn agent_args(&self) -> (Vec<String>, Vec<(String, PathBuf)>) {
        match self {
            Source::Dir(dir) => (
                vec![
                    "standalone".into(),
                    "--manifests".into(),
                    dir.to_string_lossy().into_owned(),
                ],
                Vec::new(),
            ),
            // The defaults an operator runs with (debounce, resync); the health endpoint on
            // the node namespace's own loopback.
            Source::Api { kubeconfig, .. } => (
                ["cluster", "--metrics-addr", "127.0.0.1:9090"]
                    .map(String::from)
                    .to_vec(),
                vec![("KUBECONFIG".into(), kubeconfig.clone())],
            ),
        }
    }

    /// The generation the agent's status file names once it enforces what is there now.
    pub fn generation(&self) -> u64 {
        match self {
            Source::Dir(dir) => policy_agent::manifests::content_hash(dir),
            Source::Api { api, .. } => api.generation(),
        }
    }

    /// Writes `obj` (into file `file` of the directory, alone) and returns when the write is
    /// complete: renamed into place, or applied with its event queued.
    pub fn write(&self, file: &str, obj: &Value) -> Result<Instant> {
        match self {
            Source::Dir(dir) => {
                let tmp = dir.join(format!(".{file}.tmp"));
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(obj.to_string().as_bytes())?;
                f.sync_all()?;
                drop(f);
                std::fs::rename(&tmp, dir.join(file))?;
                Ok(Instant::now())
            }
            Source::Api { api, .. } => {
                api.apply(
                    Kind::of_object(obj).context("object of an unknown kind")?,
                    obj.clone(),
                );
                Ok(Instant::now())
            }
        }
    }
}
