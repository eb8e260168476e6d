//! Reads the policy maps back from the kernel into [`MapContents`], so a restarted agent
//! (or a periodic resync) diffs against what the kernel really holds, not what it believes
//! it wrote.

use std::collections::BTreeMap;

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use policy_common::{LpmKey, MAP_ENDPOINTS, MAP_IPCACHE, MAP_PORTS, MAP_RULES};

use super::{DataplaneError, DataplaneMaps};
use crate::compiler::MapContents;

impl DataplaneMaps {
    /// Every entry of `ENDPOINTS`, `IPCACHE`, `RULES`, `CIDR_RULES` and `PORTS`.
    pub fn read_contents(&mut self) -> Result<MapContents, DataplaneError> {
        Ok(MapContents {
            endpoints: read_hash(MAP_ENDPOINTS, &self.endpoints)?,
            ipcache: read_hash(MAP_IPCACHE, &self.ipcache)?,
            rules: read_hash(MAP_RULES, &self.rules)?,
            cidr_rules: self.cidr_rules.read()?,
            ports: read_lpm(MAP_PORTS, &self.ports)?,
        })
    }
}

fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    name: &'static str,
    m: &HashMap<MapData, K, V>,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    // Only the agent writes these maps, so a walk sees a consistent table.
    m.iter()
        .map(|r| r.map_err(|e| DataplaneError::map(name, e)))
        .collect()
}

fn read_lpm<K: aya::Pod + Ord, V: aya::Pod>(
    name: &'static str,
    m: &LpmTrie<MapData, K, V>,
) -> Result<BTreeMap<LpmKey<K>, V>, DataplaneError> {
    m.iter()
        .map(|r| {
            r.map(|(k, v): (Key<K>, V)| {
                (
                    LpmKey {
                        prefixlen: k.prefix_len(),
                        data: k.data(),
                    },
                    v,
                )
            })
            .map_err(|e| DataplaneError::map(name, e))
        })
        .collect()
}
