//! `CIDR_RULES` as the agent writes and reads it: an array of maps whose slot
//! [`cidr_slot`]`(set, v6)` holds that policy-set's own LPM trie of that family, keyed by the
//! address prefix alone. The agent speaks the compiler's keys ([`LpmKey<CidrData>`]: set,
//! family, prefix) and splits them here.
//!
//! A set's trie is created (not preallocated, the template's exact parameters) with its
//! first rule and put in its slot once that rule is in it; when its last rule goes, the slot
//! is emptied and the kernel frees the trie once no program still holds it. The array is
//! pinned: a restarted agent finds the tries through it (slot -> map id -> fd).

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::maps::{LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use aya_obj::generated::{BPF_F_NO_PREALLOC, bpf_map_type};
use policy_common::{
    Addr, CIDR_SLOTS, CidrData, CidrKey, LpmKey, MAP_CIDR_RULES, MAX_CIDR_RULES_PER_SET, RuleValue,
};

use super::DataplaneError;

/// One policy-set's trie of one family.
pub type CidrTrie = LpmTrie<MapData, Addr, RuleValue>;

/// Tries kept open between writes; past this many the handles are closed and reopened on
/// demand (each holds a file descriptor).
const OPEN_TRIES: usize = 4096;

/// The `CIDR_RULES` array and handles to the tries it holds.
pub struct CidrRules {
    outer: MapData,
    /// Open tries by slot, with their kernel map id (a slot refilled behind the agent's back
    /// holds another id).
    open: BTreeMap<u32, (u32, CidrTrie)>,
}

fn err(e: MapError) -> DataplaneError {
    DataplaneError::map(MAP_CIDR_RULES, e)
}

fn sys(call: &'static str, io_error: std::io::Error) -> DataplaneError {
    err(MapError::SyscallError(aya::sys::SyscallError {
        call,
        io_error,
    }))
}

/// Deleting a missing key is not an error for the writer.
fn absent_ok(r: Result<(), MapError>) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

impl CidrRules {
    pub(crate) fn new(map: Map) -> Result<Self, DataplaneError> {
        let outer = match map {
            Map::ArrayOfMaps(m) => m,
            _ => {
                return Err(err(MapError::InvalidMapType {
                    map_type: bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS as u32,
                }));
            }
        };
        let info = outer.info().map_err(err)?;
        if info.max_entries() != CIDR_SLOTS || info.key_size() != 4 || info.value_size() != 4 {
            return Err(err(MapError::InvalidValueSize {
                size: info.max_entries() as usize,
                expected: CIDR_SLOTS as usize,
            }));
        }
        raise_fd_limit();
        Ok(CidrRules {
            outer,
            open: BTreeMap::new(),
        })
    }

    fn outer_fd(&self) -> BorrowedFd<'_> {
        self.outer.fd().as_fd()
    }

    /// The id of the trie in `slot`, if any.
    fn slot_id(&self, slot: u32) -> Result<Option<u32>, DataplaneError> {
        slot_id(self.outer_fd(), slot).map_err(|e| sys("bpf_map_lookup_elem", e))
    }

    /// The trie in `slot` (opened if needed), checked against the template.
    fn trie(&mut self, slot: u32) -> Result<Option<&mut CidrTrie>, DataplaneError> {
        let Some(id) = self.slot_id(slot)? else {
            self.open.remove(&slot);
            return Ok(None);
        };
        if self.open.get(&slot).is_none_or(|(have, _)| *have != id) {
            if self.open.len() >= OPEN_TRIES {
                self.open.clear();
            }
            let data = MapData::from_id(id).map_err(err)?;
            check_template(slot, &data)?;
            let trie = CidrTrie::try_from(Map::LpmTrie(data)).map_err(err)?;
            self.open.insert(slot, (id, trie));
        }
        Ok(self.open.get_mut(&slot).map(|(_, t)| t))
    }

    /// Inserts or replaces one rule, creating its set's trie if it has none yet.
    pub fn insert(&mut self, k: &LpmKey<CidrData>, v: RuleValue) -> Result<(), DataplaneError> {
        self.insert_many(&[(*k, v)])
    }

    /// Writes many rules. New sets' tries are filled first and then put in their slots
    /// together: after every write to an array of maps the kernel waits for an RCU grace
    /// period (so no running program still uses the old slot), one wait per batch instead
    /// of one per new set.
    pub fn insert_many(
        &mut self,
        rules: &[(LpmKey<CidrData>, RuleValue)],
    ) -> Result<(), DataplaneError> {
        let mut fresh: BTreeMap<u32, (u32, CidrTrie)> = BTreeMap::new();
        let mut checked: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
        for (k, v) in rules {
            let slot = check_slot(k)?;
            let ik = key(&k.inner_key());
            if let Some((_, t)) = fresh.get_mut(&slot) {
                t.insert(&ik, *v, 0).map_err(err)?;
                continue;
            }
            // The slot is read once per batch; later rules of the set reuse the handle
            // (read again if it was closed meanwhile, never taken for an empty slot).
            let t = if !checked.insert(slot) && self.open.contains_key(&slot) {
                self.open.get_mut(&slot).map(|(_, t)| t)
            } else {
                self.trie(slot)?
            };
            if let Some(t) = t {
                t.insert(&ik, *v, 0).map_err(err)?;
                continue;
            }
            let (id, mut t) = new_trie(k)?;
            t.insert(&ik, *v, 0).map_err(err)?;
            fresh.insert(slot, (id, t));
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let slots: Vec<u32> = fresh.keys().copied().collect();
        let fds: Vec<u32> = fresh.values().map(|(_, t)| trie_fd(t)).collect();
        put_slots(self.outer_fd(), &slots, &fds)?;
        if self.open.len() + fresh.len() > OPEN_TRIES {
            self.open.clear();
        }
        self.open.extend(fresh);
        Ok(())
    }

    /// Removes many rules; the slots of the tries they leave empty are cleared together
    /// (one grace period, see [`Self::insert_many`]).
    pub fn remove_many(&mut self, keys: &[LpmKey<CidrData>]) -> Result<(), DataplaneError> {
        let mut touched: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
        for k in keys {
            let slot = k.data.slot();
            if slot >= CIDR_SLOTS {
                continue;
            }
            let t = if !touched.insert(slot) && self.open.contains_key(&slot) {
                self.open.get_mut(&slot).map(|(_, t)| t)
            } else {
                self.trie(slot)?
            };
            if let Some(t) = t {
                absent_ok(t.remove(&key(&k.inner_key())))?;
            }
        }
        let mut empty = Vec::new();
        for slot in touched {
            if let Some(t) = self.trie(slot)?
                && t.keys().next().is_none()
            {
                empty.push(slot);
            }
        }
        self.drop_slots(&empty)
    }

    fn drop_slots(&mut self, slots: &[u32]) -> Result<(), DataplaneError> {
        if slots.is_empty() {
            return Ok(());
        }
        for s in slots {
            self.open.remove(s);
        }
        match batch(self.outer_fd(), BPF_MAP_DELETE_BATCH, slots, None) {
            Ok(()) => Ok(()),
            Err(e) if no_batch(&e) || e.raw_os_error() == Some(libc::ENOENT) => {
                for s in slots {
                    self.drop_slot(*s)?;
                }
                Ok(())
            }
            Err(e) => Err(sys("bpf_map_delete_batch", e)),
        }
    }

    /// Removes one rule; a set's trie left empty leaves its slot (the kernel frees it).
    pub fn remove(&mut self, k: &LpmKey<CidrData>) -> Result<(), DataplaneError> {
        self.remove_many(&[*k])
    }

    fn drop_slot(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.open.remove(&slot);
        match bpf_elem(
            self.outer_fd(),
            BPF_MAP_DELETE_ELEM,
            &slot,
            std::ptr::null_mut::<u32>(),
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(sys("bpf_map_delete_elem", e)),
        }
    }

    fn populated(&self) -> Result<Vec<(u32, u32)>, DataplaneError> {
        populated_slots(self.outer_fd()).map_err(|e| sys("bpf_map_lookup_batch", e))
    }

    /// Every rule of every set, as the compiler names them.
    pub fn read(&mut self) -> Result<BTreeMap<LpmKey<CidrData>, RuleValue>, DataplaneError> {
        let mut out = BTreeMap::new();
        for (slot, _) in self.populated()? {
            let Some(t) = self.trie(slot)? else { continue };
            for r in t.iter() {
                let (k, v) = r.map_err(err)?;
                let inner = CidrKey {
                    prefixlen: k.prefix_len(),
                    data: k.data(),
                };
                out.insert(LpmKey::from_slot(slot, &inner), v);
            }
        }
        Ok(out)
    }

    /// Rules per set and family: (slot, entries), for the slots holding a trie.
    pub fn slot_sizes(&mut self) -> Result<Vec<(u32, usize)>, DataplaneError> {
        let mut out = Vec::new();
        for (slot, _) in self.populated()? {
            if let Some(t) = self.trie(slot)? {
                out.push((slot, t.keys().count()));
            }
        }
        Ok(out)
    }

    /// Empties every slot.
    pub fn clear(&mut self) -> Result<(), DataplaneError> {
        let slots: Vec<u32> = self.populated()?.into_iter().map(|(s, _)| s).collect();
        self.drop_slots(&slots)?;
        self.open.clear();
        Ok(())
    }
}

fn check_slot(k: &LpmKey<CidrData>) -> Result<u32, DataplaneError> {
    let slot = k.data.slot();
    if slot >= CIDR_SLOTS {
        return Err(err(MapError::OutOfBounds {
            index: slot,
            max_entries: CIDR_SLOTS,
        }));
    }
    Ok(slot)
}

/// A new, empty trie of the template's exact parameters, named after its set and family.
fn new_trie(k: &LpmKey<CidrData>) -> Result<(u32, CidrTrie), DataplaneError> {
    let name = format!(
        "cidr_{}_{}",
        k.data.policy_set(),
        if k.data.is_v6() { "v6" } else { "v4" }
    );
    let obj = aya_obj::Map::new_from_params(
        bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u32,
        size_of::<Key<Addr>>() as u32,
        size_of::<RuleValue>() as u32,
        MAX_CIDR_RULES_PER_SET,
        BPF_F_NO_PREALLOC,
    );
    let data = MapData::create(obj, &name, None).map_err(err)?;
    let id = data.info().map_err(err)?.id();
    Ok((id, CidrTrie::try_from(Map::LpmTrie(data)).map_err(err)?))
}

/// The descriptor of a trie handle (valid while the handle lives).
fn trie_fd(t: &CidrTrie) -> u32 {
    fn fd_of<M: aya::maps::InnerMap>(m: &M) -> u32 {
        m.fd().as_fd().as_raw_fd() as u32
    }
    fd_of(t)
}

/// Puts tries in their slots: one batch update, or slot by slot without batch support.
fn put_slots(outer: BorrowedFd<'_>, slots: &[u32], fds: &[u32]) -> Result<(), DataplaneError> {
    match batch(outer, BPF_MAP_UPDATE_BATCH, slots, Some(fds)) {
        Ok(()) => Ok(()),
        Err(e) if no_batch(&e) => {
            for (s, fd) in slots.iter().zip(fds) {
                bpf_elem(outer, BPF_MAP_UPDATE_ELEM, s, (fd as *const u32).cast_mut())
                    .map_err(|e| sys("bpf_map_update_elem", e))?;
            }
            Ok(())
        }
        Err(e) => Err(sys("bpf_map_update_batch", e)),
    }
}

/// EINVAL / EOPNOTSUPP / ENOTSUPP (524, kernel-internal): no batch operation here.
fn no_batch(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

/// The id of the map in slot `slot` of an array of maps, if any.
fn slot_id(outer: BorrowedFd<'_>, slot: u32) -> std::io::Result<Option<u32>> {
    let mut id = 0u32;
    match bpf_elem(outer, BPF_MAP_LOOKUP_ELEM, &slot, &mut id) {
        Ok(()) => Ok(Some(id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The populated slots of an array of maps with the id of the map each holds: one batch
/// walk (empty slots are skipped in the kernel), or slot by slot where the kernel has no
/// batch lookup for it.
pub fn populated_slots(outer: BorrowedFd<'_>) -> std::io::Result<Vec<(u32, u32)>> {
    match lookup_batch(outer) {
        Ok(v) => Ok(v),
        Err(e) if no_batch(&e) => {
            let mut out = Vec::new();
            for slot in 0..CIDR_SLOTS {
                if let Some(id) = slot_id(outer, slot)? {
                    out.push((slot, id));
                }
            }
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// What a pinned array of maps says about its inner template, which the kernel does not
/// report: the (type, key size, value size, max entries, flags) of a map it holds, or, when
/// it holds none, whether it accepts a map of `want` (probed on slot 0, which no rule uses:
/// policy-set 0 holds none; the probe is removed at once).
pub(crate) enum InnerTemplate {
    Held([u64; 5]),
    Accepts(bool),
}

pub(crate) fn inner_template(
    outer: BorrowedFd<'_>,
    want: &aya_obj::Map,
) -> std::io::Result<InnerTemplate> {
    let other = |e: MapError| std::io::Error::other(e.to_string());
    if let Some((_, id)) = populated_slots(outer)?.first() {
        let info = MapData::from_id(*id)
            .map_err(other)?
            .info()
            .map_err(other)?;
        let ty = match info.map_type() {
            Ok(aya::maps::MapType::LpmTrie) => bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u64,
            _ => u64::MAX,
        };
        return Ok(InnerTemplate::Held([
            ty,
            info.key_size() as u64,
            info.value_size() as u64,
            info.max_entries() as u64,
            info.map_flags() as u64,
        ]));
    }
    // Without the object's BTF: the kernel compares no BTF between inner maps.
    let plain = aya_obj::Map::new_from_params(
        want.map_type(),
        want.key_size(),
        want.value_size(),
        want.max_entries(),
        want.map_flags(),
    );
    let probe = MapData::create(plain, "cidr_probe", None).map_err(other)?;
    let fd = probe.fd().as_fd().as_raw_fd() as u32;
    match bpf_elem(
        outer,
        BPF_MAP_UPDATE_ELEM,
        &0,
        (&fd as *const u32).cast_mut(),
    ) {
        Ok(()) => {
            bpf_elem(outer, BPF_MAP_DELETE_ELEM, &0, std::ptr::null_mut::<u32>())?;
            Ok(InnerTemplate::Accepts(true))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(InnerTemplate::Accepts(false)),
        Err(e) => Err(e),
    }
}

fn key(k: &CidrKey) -> Key<Addr> {
    Key::new(k.prefixlen, k.data)
}

/// A trie found in a slot must be one the programs were verified against (the kernel
/// checked it against the template when it was put there; this catches a foreign writer
/// or an agent of another layout).
fn check_template(slot: u32, data: &MapData) -> Result<(), DataplaneError> {
    let info = data.info().map_err(err)?;
    let ok = info.map_type().ok() == Some(aya::maps::MapType::LpmTrie)
        && info.key_size() as usize == size_of::<Key<Addr>>()
        && info.value_size() as usize == size_of::<RuleValue>()
        && info.max_entries() == MAX_CIDR_RULES_PER_SET;
    if ok {
        Ok(())
    } else {
        Err(DataplaneError::ForeignTrie {
            slot,
            detail: format!(
                "key {} value {} max_entries {}",
                info.key_size(),
                info.value_size(),
                info.max_entries()
            ),
        })
    }
}

/// Lets the agent keep a few thousand tries open (each handle is a file descriptor): the
/// soft limit goes up to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

// Raw element syscalls on the array of maps: aya 0.14 has no delete for it, and its lookup
// opens every inner map it returns (the walk needs only ids).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem<V>(
    fd: BorrowedFd<'_>,
    cmd: libc::c_long,
    key: &u32,
    value: *mut V,
) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const u32 as u64,
        value: if cmd == BPF_MAP_DELETE_ELEM {
            0
        } else {
            value as u64
        },
        flags: 0,
    };
    // SAFETY: the kernel reads the 4-byte key and reads (update) or writes (lookup) the
    // 4-byte value the attributes point to; both outlive the call.
    unsafe { sys_bpf(cmd, &mut attr) }
}

/// `bpf(cmd, attr)` for commands that return nothing but success.
///
/// # Safety
/// As [`super::bpf_sys::bpf`].
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: passed on from the caller.
    unsafe { super::bpf_sys::bpf(cmd, attr) }.map(drop)
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// (slot, inner map id) of every populated slot, through `BPF_MAP_LOOKUP_BATCH`.
fn lookup_batch(fd: BorrowedFd<'_>) -> std::io::Result<Vec<(u32, u32)>> {
    const CHUNK: usize = 4096;
    let mut out = Vec::new();
    let (mut keys, mut ids) = (vec![0u32; CHUNK], vec![0u32; CHUNK]);
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: ids.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the kernel writes at most `count` 4-byte keys and values into buffers of
        // that many, and a 4-byte token; it reads the 4-byte token given back.
        let err = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(ids[..n].iter().copied()));
        match err {
            None => {}
            // The walk reached the end (with the last elements in this chunk).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// A batch update (`values`: one fd per key) or delete of slots of an array of maps.
fn batch(
    outer: BorrowedFd<'_>,
    cmd: libc::c_long,
    slots: &[u32],
    values: Option<&[u32]>,
) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: slots.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: slots.len() as u32,
        map_fd: outer.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel reads `count` 4-byte keys (and values) from buffers of that many.
    let res = unsafe { sys_bpf(cmd, &mut attr) };
    if let Err(e) = res {
        Err(e)
    } else if attr.count as usize != slots.len() {
        Err(std::io::Error::other(format!(
            "batch wrote {} of {} slots",
            attr.count,
            slots.len()
        )))
    } else {
        Ok(())
    }
}
