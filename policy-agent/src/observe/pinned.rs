//! The agent's pinned maps opened by path, read-only where reading is all that is needed:
//! `status` must never be able to change what the datapath decides, and works beside a
//! running agent (map reads are lock-free for the kernel and for the agent).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use aya::maps::{Map, MapData, MapInfo, MapType};

use super::ObserveError;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
/// `file_flags` of `BPF_OBJ_GET`: the fd may only read the map.
const BPF_F_RDONLY: u32 = 1 << 3;

/// The `BPF_OBJ_GET` part of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `BPF_MAP_*_ELEM` part of `union bpf_attr`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// A pinned map opened read-only, with the kernel's description of it.
pub struct PinnedMap {
    pub name: String,
    /// For aya's typed maps (`HashMap::try_from(&map)`).
    pub map: Map,
    pub info: MapInfo,
    /// A second descriptor of the same map, for raw key walks.
    fd: OwnedFd,
}

/// Opens the map pinned at `dir/name` read-only.
pub fn open_ro(dir: &Path, name: &str) -> Result<PinnedMap, ObserveError> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = dir.join(name);
    let c =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| ObserveError::OpenPin {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
    };
    // SAFETY: BPF_OBJ_GET reads `attr` (of the size given) and the C string it points to.
    let fd =
        unsafe { crate::dataplane::bpf_sys::bpf(BPF_OBJ_GET, &mut attr) }.map_err(|source| {
            ObserveError::OpenPin {
                path: path.clone(),
                source,
            }
        })?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let raw = fd.try_clone().map_err(|source| ObserveError::OpenPin {
        path: path.clone(),
        source,
    })?;
    let data = MapData::from_fd(fd).map_err(|e| ObserveError::map(name, e))?;
    let info = data.info().map_err(|e| ObserveError::map(name, e))?;
    let map = Map::from_map_data(data).map_err(|e| ObserveError::map(name, e))?;
    Ok(PinnedMap {
        name: name.to_string(),
        map,
        info,
        fd: raw,
    })
}

impl PinnedMap {
    /// How a map of this type holds its entries.
    pub fn kind(&self) -> &'static str {
        match self.info.map_type() {
            // The conntrack tables: slots in buckets of an mmapable array.
            Ok(MapType::Array) if is_ct_table(&self.name) => "ct_table",
            Ok(MapType::Hash) => "hash",
            Ok(MapType::LruHash) => "lru_hash",
            Ok(MapType::LpmTrie) => "lpm_trie",
            Ok(MapType::Array) => "array",
            Ok(MapType::PerCpuArray) => "percpu_array",
            Ok(MapType::RingBuf) => "ringbuf",
            // `CIDR_RULES`: one LPM trie per policy-set and family behind an array of maps.
            Ok(MapType::ArrayOfMaps) => "lpm_tries",
            _ => "other",
        }
    }

    /// Entries held now: keys walked for hash maps and tries (bounded by the capacity, since
    /// a walk over a changing hash map can restart), the capacity for arrays (always full),
    /// `None` for the ring buffer (its capacity counts bytes, not entries).
    pub fn entries(&self) -> Result<Option<u64>, ObserveError> {
        match self.kind() {
            "array" | "percpu_array" => Ok(Some(self.info.max_entries() as u64)),
            "ct_table" => count_ct_slots(&self.map, &self.name)
                .map(Some)
                .map_err(|e| ObserveError::map(&self.name, e)),
            "lpm_tries" => self
                .inner_entries()
                .map(Some)
                .map_err(|e| ObserveError::map(&self.name, e)),
            "ringbuf" | "other" => Ok(None),
            _ => count_keys(
                &self.fd,
                self.info.key_size() as usize,
                self.info.max_entries() as u64,
            )
            .map(Some)
            .map_err(|e| ObserveError::map(&self.name, e)),
        }
    }
}

impl PinnedMap {
    /// What the entries are counted against: for `CIDR_RULES` the total of all its tries
    /// the agent admits (the kernel bounds only each trie), else the kernel's max_entries.
    pub fn capacity(&self) -> u64 {
        if self.kind() == "lpm_tries" {
            policy_common::MAX_CIDR_RULES as u64
        } else if self.kind() == "ct_table" {
            self.info.max_entries() as u64 * policy_common::ct_table::CT_WAYS as u64
        } else {
            self.info.max_entries() as u64
        }
    }

    /// The entries of every map an array of maps holds, summed.
    fn inner_entries(&self) -> Result<u64, aya::maps::MapError> {
        use std::os::fd::AsFd as _;
        let slots = crate::dataplane::cidr::populated_slots(self.fd.as_fd()).map_err(|e| {
            aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: e,
            })
        })?;
        let mut n = 0;
        for (_, id) in slots {
            // A trie dropped since the walk is simply not counted.
            let Ok(inner) = MapData::from_id(id) else {
                continue;
            };
            let info = inner.info()?;
            let fd = inner
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|io_error| {
                    aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    })
                })?;
            n += count_keys(&fd, info.key_size() as usize, info.max_entries() as u64).map_err(
                |io_error| {
                    aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_get_next_key",
                        io_error,
                    })
                },
            )?;
        }
        Ok(n)
    }
}

/// Walks the keys of a map with `BPF_MAP_GET_NEXT_KEY`, at most `bound` of them.
fn is_ct_table(name: &str) -> bool {
    name == policy_common::MAP_CONNTRACK || name == policy_common::MAP_CONNTRACK4
}

/// Slots holding a connection, read bucket by bucket through the read-only descriptor (a
/// read-only fd cannot map the table).
fn count_ct_slots(m: &Map, name: &str) -> Result<u64, aya::maps::MapError> {
    use aya::maps::Array;
    use policy_common::ct_table::{CtBucket4, CtBucket6, seq_holds_key};
    let mut n = 0;
    if name == policy_common::MAP_CONNTRACK4 {
        let a = Array::<_, CtBucket4>::try_from(m)?;
        for b in a.iter() {
            n += b?.slots.iter().filter(|s| seq_holds_key(s.seq)).count() as u64;
        }
    } else {
        let a = Array::<_, CtBucket6>::try_from(m)?;
        for b in a.iter() {
            n += b?.slots.iter().filter(|s| seq_holds_key(s.seq)).count() as u64;
        }
    }
    Ok(n)
}

fn count_keys(fd: &OwnedFd, key_size: usize, bound: u64) -> std::io::Result<u64> {
    let fd = fd.as_raw_fd();
    let mut cur = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut first = true;
    let mut n = 0u64;
    while n < bound {
        let mut attr = NextKeyAttr {
            map_fd: fd as u32,
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the kernel reads `key_size` bytes at `key` and writes as many at
        // `next_key`; both buffers have that size.
        if let Err(e) = unsafe { crate::dataplane::bpf_sys::bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(n)
}
