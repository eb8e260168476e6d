//! What the agent leaves in bpffs so that a restarted or upgraded agent adopts it, and how
//! it checks that what it finds is compatible with the object it is about to load.
//!
//! Layout under the pin directory (`--bpf-dir`):
//! - `<MAP>`: every map of the object declared pinned by name (`ENDPOINTS`, `CONNTRACK`, ...);
//!   aya creates it on first load and reopens it afterwards.
//! - `links/<ifname>@<ifindex>/<program>` (dots of the name as `~`): the TCX link of `<program>` on that interface. A
//!   pinned link keeps its program attached while no agent runs; a new agent replaces the
//!   program inside the link (`BPF_LINK_UPDATE`), never detaching first. The ifindex in the
//!   name tells a re-created interface (which lost its links) from the one that was pinned.
//!
//! - `upgrade/<MAP>`: during a migration only, the new maps, moved over the old pins once
//!   every link runs the new programs.
//!
//! clsact filters (kernels without TCX) are not pinned: they live in the qdisc anyway. They
//! are created at a fixed priority and handle ([`NETLINK_PRIORITY`], [`NETLINK_HANDLE`]) so
//! a new agent replaces them in place (`RTM_NEWTFILTER` without `NLM_F_EXCL`).

use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use aya_obj::generated::bpf_map_type;
use aya_obj::maps::PinningType;

use super::DataplaneError;

/// Directory of the pinned links, under the pin directory.
pub const LINKS_DIR: &str = "links";
/// Where a migration pins the new maps until every link runs the new programs.
/// (bpffs refuses names with a dot.)
pub const STAGING_DIR: &str = "upgrade";
/// tc priority of our clsact filters (a fixed value so a new agent finds and replaces them).
pub const NETLINK_PRIORITY: u16 = 0x4e50;
/// tc handle of our clsact filters.
pub const NETLINK_HANDLE: u32 = 1;

/// The directory holding the links of one interface. bpffs refuses names with a dot
/// (`eth0.100`): dots are written as `~`.
pub fn link_dir(pin_dir: &Path, ifname: &str, ifindex: u32) -> PathBuf {
    pin_dir
        .join(LINKS_DIR)
        .join(format!("{}@{ifindex}", ifname.replace('.', "~")))
}

/// One pinned-link directory found under the pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedInterface {
    pub ifname: String,
    pub ifindex: u32,
    pub dir: PathBuf,
}

/// Every `links/<ifname>@<ifindex>` directory (also ones whose interface is gone).
pub fn pinned_interfaces(pin_dir: &Path) -> Vec<PinnedInterface> {
    let Ok(rd) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) else {
        return Vec::new();
    };
    let mut out: Vec<PinnedInterface> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (ifname, idx) = name.rsplit_once('@')?;
            Some(PinnedInterface {
                ifname: ifname.replace('~', "."),
                ifindex: idx.parse().ok()?,
                dir: e.path(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// What a load found in the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinState {
    /// No map was pinned: a first start (seed conntrack from the kernel's table).
    Fresh,
    /// Every pinned map existed and matches the object: adopt them with their state.
    Adopted,
    /// The pinned maps did not match: new maps are staged beside them until the programs
    /// are switched ([`super::Dataplane::load_staged`]).
    Migrating,
}

/// One property of a pinned map that differs from the object's definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub map: String,
    pub field: &'static str,
    pub pinned: u64,
    pub object: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}: pinned {} but the object wants {}",
            self.map, self.field, self.pinned, self.object
        )
    }
}

/// Checks every map the object pins by name against what is pinned under `pin_dir`.
///
/// aya reopens a pinned map whatever its definition, and a program verified against a
/// map of another layout would read garbage: so an upgrade whose maps changed must be
/// caught here, before anything is loaded. Some maps pinned and others not is a broken
/// directory and is refused too (an old agent's maps with a newer object's extra map is
/// reported as a mismatch of that map).
pub fn check_pinned_maps(object: &[u8], pin_dir: &Path) -> Result<PinState, DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DataplaneError::Incompatible {
        pin_dir: pin_dir.to_path_buf(),
        detail: format!("parsing the eBPF object: {e}"),
    })?;
    let mut mismatches = Vec::new();
    let mut present = Vec::new();
    let mut absent = Vec::new();
    let mut names: Vec<&String> = obj.maps.keys().collect();
    names.sort();
    for name in names {
        let def = &obj.maps[name];
        if def.pinning() != PinningType::ByName {
            continue;
        }
        let path = pin_dir.join(name);
        if !path.exists() {
            absent.push(name.clone());
            continue;
        }
        present.push(name.clone());
        let info = MapInfo::from_pin(&path).map_err(|e| DataplaneError::Incompatible {
            pin_dir: pin_dir.to_path_buf(),
            detail: format!("{name}: cannot open the pinned map: {e}"),
        })?;
        let outer = compare(name, def, &info);
        let outer_matches = outer.is_empty();
        mismatches.extend(outer);
        // Only an array of maps of the object's own layout is asked about its inner maps
        // (the raw slot reads assume 4-byte keys and values).
        if let Some(inner) = def.inner().filter(|_| outer_matches) {
            mismatches.extend(compare_inner(name, &path, &inner).map_err(|e| {
                DataplaneError::Incompatible {
                    pin_dir: pin_dir.to_path_buf(),
                    detail: format!("{name}: cannot read the pinned map's inner maps: {e}"),
                }
            })?);
        }
    }
    // Same shapes can still mean something else: the format the maps were created under.
    if mismatches.is_empty() && present.iter().any(|n| n == policy_common::MAP_CONFIG) {
        let config = pinned_config(&pin_dir.join(policy_common::MAP_CONFIG)).map_err(|e| {
            DataplaneError::Incompatible {
                pin_dir: pin_dir.to_path_buf(),
                detail: format!(
                    "{}: cannot read the pinned format: {e}",
                    policy_common::MAP_CONFIG
                ),
            }
        })?;
        let format = config.format;
        // An all-zero CONFIG was never set up by an agent (one that loaded and stopped
        // before taking the maps): nothing was written under any format.
        if format != policy_common::FORMAT_VERSION && config != policy_common::Config::default() {
            mismatches.push(Mismatch {
                map: policy_common::MAP_CONFIG.to_string(),
                field: "format",
                pinned: format as u64,
                object: policy_common::FORMAT_VERSION as u64,
            });
        }
    }
    if !mismatches.is_empty() {
        let list: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
        return Err(DataplaneError::Incompatible {
            pin_dir: pin_dir.to_path_buf(),
            detail: format!(
                "the pinned maps do not match this agent's object ({}); the running programs \
                 keep enforcing the old maps; run `policy-agent uninstall` (or start with \
                 --reset) to replace them",
                list.join("; ")
            ),
        });
    }
    match (present.is_empty(), absent.is_empty()) {
        (true, _) => Ok(PinState::Fresh),
        (false, true) => Ok(PinState::Adopted),
        (false, false) => Err(DataplaneError::Incompatible {
            pin_dir: pin_dir.to_path_buf(),
            detail: format!(
                "some maps are pinned ({}) and others are not ({}): an agent of another \
                 version, or a partial cleanup; run `policy-agent uninstall` (or --reset)",
                present.join(", "),
                absent.join(", ")
            ),
        }),
    }
}

/// A pinned `CONFIG` of this agent's layout.
fn pinned_config(path: &Path) -> Result<policy_common::Config, String> {
    let data = aya::maps::MapData::from_pin(path).map_err(|e| e.to_string())?;
    let config: aya::maps::Array<_, policy_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(|e| e.to_string())?;
    config.get(&0, 0).map_err(|e| e.to_string())
}

fn compare(name: &str, def: &aya_obj::Map, info: &MapInfo) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut check = |field, pinned: u64, object: u64| {
        if pinned != object {
            out.push(Mismatch {
                map: name.to_string(),
                field,
                pinned,
                object,
            });
        }
    };
    let want_type = bpf_map_type::try_from(def.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    match (info.map_type().ok(), want_type) {
        (Some(a), Some(b)) if a == b => {}
        _ => check("type", u64::MAX, def.map_type() as u64),
    }
    check("key_size", info.key_size() as u64, def.key_size() as u64);
    check(
        "value_size",
        info.value_size() as u64,
        def.value_size() as u64,
    );
    check(
        "max_entries",
        info.max_entries() as u64,
        def.max_entries() as u64,
    );
    check("map_flags", info.map_flags() as u64, def.map_flags() as u64);
    out
}

/// A map of maps was verified against the inner template it was created with, which the
/// kernel does not report and which the object may have changed since: compare a map it
/// holds with the object's template, or, holding none, ask the kernel whether it accepts
/// one of the object's template.
fn compare_inner(
    name: &str,
    path: &Path,
    inner: &aya_obj::Map,
) -> Result<Vec<Mismatch>, std::io::Error> {
    use std::os::fd::AsFd as _;
    let outer =
        aya::maps::MapData::from_pin(path).map_err(|e| std::io::Error::other(e.to_string()))?;
    let want = [
        inner.map_type() as u64,
        inner.key_size() as u64,
        inner.value_size() as u64,
        inner.max_entries() as u64,
        inner.map_flags() as u64,
    ];
    let map = format!("{name}.inner");
    Ok(
        match super::cidr::inner_template(outer.fd().as_fd(), inner)? {
            super::cidr::InnerTemplate::Held(have) => {
                const FIELDS: [&str; 5] =
                    ["type", "key_size", "value_size", "max_entries", "map_flags"];
                FIELDS
                    .iter()
                    .zip(have.iter().zip(want))
                    .filter(|(_, (h, w))| **h != *w)
                    .map(|(f, (h, w))| Mismatch {
                        map: map.clone(),
                        field: f,
                        pinned: *h,
                        object: w,
                    })
                    .collect()
            }
            super::cidr::InnerTemplate::Accepts(true) => Vec::new(),
            super::cidr::InnerTemplate::Accepts(false) => vec![Mismatch {
                map,
                field: "template",
                pinned: u64::MAX,
                object: want[1],
            }],
        },
    )
}

/// Names of the maps the object pins by name (for uninstall and reset).
pub fn pinned_map_names(object: &[u8]) -> Vec<String> {
    let Ok(obj) = aya_obj::Object::parse(object) else {
        return Vec::new();
    };
    let mut v: Vec<String> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == PinningType::ByName)
        .map(|(n, _)| n.clone())
        .collect();
    v.sort();
    v
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Interfaces whose pinned links were unpinned (the kernel detaches them).
    pub links: Vec<String>,
    /// Interfaces of this namespace from which our clsact filters were deleted.
    pub filters: Vec<String>,
    /// Map pins removed.
    pub maps: Vec<String>,
    /// Program pins removed (the netfilter judge).
    pub programs: Vec<String>,
}

/// Removes everything an agent left under `pin_dir` and in the calling thread's network
/// namespace: pinned links (unpinning the last reference detaches them), our fixed-priority
/// clsact filters on every interface, and the map pins of `object`. Enforcement stops.
pub fn uninstall(object: &[u8], pin_dir: &Path) -> Result<Uninstalled, DataplaneError> {
    let mut out = Uninstalled::default();
    for p in pinned_interfaces(pin_dir) {
        std::fs::remove_dir_all(&p.dir).map_err(|source| DataplaneError::Io {
            path: p.dir.clone(),
            source,
        })?;
        out.links.push(p.ifname);
    }
    let links = pin_dir.join(LINKS_DIR);
    if links.exists() {
        std::fs::remove_dir_all(&links).map_err(|source| DataplaneError::Io {
            path: links.clone(),
            source,
        })?;
    }
    for iface in interfaces() {
        let mut any = false;
        for at in [
            aya::programs::TcAttachType::Ingress,
            aya::programs::TcAttachType::Egress,
        ] {
            any |= super::loader::detach_fixed_filter(&iface, at)?;
        }
        if any {
            out.filters.push(iface);
        }
    }
    // The netfilter rule first, then the program it runs (none left is not an error; no
    // iptables on the host means no rule was ever installed).
    match super::service_judge::remove() {
        Ok(()) | Err(super::service_judge::ServiceJudgeError::Spawn { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let judge = pin_dir.join(policy_common::PROG_SERVICE_JUDGE);
    match std::fs::remove_file(&judge) {
        Ok(()) => out
            .programs
            .push(policy_common::PROG_SERVICE_JUDGE.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DataplaneError::Io {
                path: judge,
                source,
            });
        }
    }
    for name in pinned_map_names(object) {
        let path = pin_dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => out.maps.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path, source }),
        }
    }
    Ok(out)
}

/// Interface names of the calling thread's network namespace.
fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}
