//! What a running agent costs: its resident memory from `/proc/PID/status`, and the kernel
//! memory of its BPF maps as the kernel accounts it (`memlock:` in fdinfo, the map's actual
//! usage on kernels >= 6.4).
//!
//! The maps counted are the union of the maps the agent holds open, the maps pinned in its
//! bpffs directory, and every LPM trie `CIDR_RULES` holds: the agent keeps only a bounded
//! number of tries open, so its file descriptors alone would miss most of them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{MapData, MapInfo};

/// Resident memory of a process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rss {
    /// VmRSS: resident now.
    pub now: u64,
    /// VmHWM: the peak resident size so far.
    pub peak: u64,
}

pub fn rss(pid: u32) -> Result<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |field: &str| -> Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        let n: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{field} {line:?}"))?;
        Ok(n * 1024)
    };
    Ok(Rss {
        now: kib("VmRSS:")?,
        peak: kib("VmHWM:")?,
    })
}

/// One fdinfo file's `key:\tvalue` lines.
fn fdinfo(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

/// The kernel objects a process holds open: map ids, and the memory of its programs.
#[derive(Default)]
struct Held {
    map_ids: Vec<u32>,
    prog_bytes: u64,
}

fn held_by(pid: u32) -> Result<Held> {
    let mut held = Held::default();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // An fd closed while we walk is simply gone.
        let Some(info) = entry.ok().and_then(|e| fdinfo(&e.path())) else {
            continue;
        };
        if info.contains_key("map_type") {
            if let Some(id) = info.get("map_id").and_then(|v| v.parse().ok()) {
                held.map_ids.push(id);
            }
        } else if info.contains_key("prog_type") {
            held.prog_bytes += info
                .get("memlock")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(held)
}

/// The ids of the maps pinned directly in `bpf_dir`, by pin name, and of every trie the
/// pinned `CIDR_RULES` holds (named `CIDR_RULES/trie`).
fn pinned(bpf_dir: &Path) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(bpf_dir).with_context(|| format!("{}", bpf_dir.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        // Pinned programs and anything else that is not a map are skipped.
        let Ok(info) = MapInfo::from_pin(entry.path()) else {
            continue;
        };
        out.push((name.clone(), info.id()));
        if name == policy_common::MAP_CIDR_RULES {
            let outer = MapData::from_pin(entry.path()).context("opening CIDR_RULES")?;
            let slots = policy_agent::dataplane::cidr::populated_slots(outer.fd().as_fd())
                .context("walking CIDR_RULES")?;
            out.extend(
                slots
                    .into_iter()
                    .map(|(_, id)| (format!("{name}/trie"), id)),
            );
        }
    }
    Ok(out)
}

/// The kernel's accounting of map `id`'s memory, in bytes (`None`: the map is gone).
fn memlock_of(id: u32) -> Option<u64> {
    let fd = MapInfo::from_id(id).ok()?.fd().ok()?;
    let info = fdinfo(Path::new(&format!(
        "/proc/self/fdinfo/{}",
        fd.as_fd().as_raw_fd()
    )))?;
    info.get("memlock")?.parse().ok()
}

/// Kernel memory of an agent's datapath.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    /// All its maps, in bytes.
    pub map_bytes: u64,
    pub maps: usize,
    /// Bytes by map name (pin name; the tries summed under `CIDR_RULES/trie`; unpinned maps
    /// the agent holds under `(unpinned)`).
    pub by_name: BTreeMap<String, (usize, u64)>,
    /// Its programs, as far as it holds them open.
    pub prog_bytes: u64,
}

pub fn kernel(pid: u32, bpf_dir: &Path) -> Result<Kernel> {
    let held = held_by(pid)?;
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for id in held.map_ids {
        names.insert(id, "(unpinned)".into());
    }
    // Pin names win over "(unpinned)": a map is counted once, under its pin.
    names.extend(pinned(bpf_dir)?.into_iter().map(|(n, id)| (id, n)));
    let mut k = Kernel {
        prog_bytes: held.prog_bytes,
        ..Kernel::default()
    };
    for (id, name) in names {
        let Some(bytes) = memlock_of(id) else {
            continue;
        };
        k.map_bytes += bytes;
        k.maps += 1;
        let e = k.by_name.entry(name).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    Ok(k)
}

/// Entries against capacity of every map the agent pins (as `policy-agent status` shows).
pub fn entries(bpf_dir: &Path) -> BTreeMap<String, (Option<u64>, u64)> {
    use policy_agent::observe::{pinned, status};
    status::MAPS
        .iter()
        .filter_map(|name| {
            let m = pinned::open_ro(bpf_dir, name).ok()?;
            Some((name.to_string(), (m.entries().ok().flatten(), m.capacity())))
        })
        .collect()
}
