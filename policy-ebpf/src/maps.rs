//! The maps, named exactly as `policy_common::MAP_*` (the agent's tests check the object),
//! all pinned by name so a restarted agent adopts them with their state.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS},
    btf_maps,
    helpers::bpf_map_lookup_elem,
    macros::{btf_map, map},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key,
    },
};
use policy_common::{
    Addr, BindingKey, CIDR_SLOTS, CidrData, Config, CtKey, CtKey4, EVENTS_RING_BYTES, EndpointKey,
    EndpointValue, EventBudget, FragKey, FragValue, IpCacheKey, IpCacheValue, LpmKey, MAX_BINDINGS,
    MAX_CIDR_RULES_PER_SET, MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_IPCACHE, MAX_PORTS, MAX_RULES,
    MAX_SERVICE_CIDRS, MAX_SERVICE_PENDING, PendingKey, PendingValue, PortData, RuleKey, RuleValue,
    ct_table::{CT_BUCKETS, CtBucket4, CtBucket6},
    decide::PolicyMaps,
    reason::COUNTERS_LEN,
};

#[map]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(MAX_ENDPOINTS, 0);
/// (pod interface, address) pairs the node side found by the routes to each local pod: a
/// pod hook trusts its pod-side address only when the pair is here. Looked up only when the
/// interface's `EP_CACHE` slot misses (a slot is filled only for a bound pair).
#[map]
pub static BINDINGS: HashMap<BindingKey, u32> = HashMap::pinned(MAX_BINDINGS, 0);
/// Connections with an IPv6 address: a set-associative table (`crate::ct_table`), mmapable
/// so the agent reads and writes slots under the same protocol.
#[map]
pub static CONNTRACK: Array<CtBucket6> = Array::pinned(CT_BUCKETS, BPF_F_MMAPABLE);
/// Connections between two IPv4 addresses (compact key); `CONNTRACK` holds the others.
#[map]
pub static CONNTRACK4: Array<CtBucket4> = Array::pinned(CT_BUCKETS, BPF_F_MMAPABLE);
#[map]
pub static IPCACHE: HashMap<IpCacheKey, IpCacheValue> = HashMap::pinned(MAX_IPCACHE, 0);
// Not preallocated: the capacity is large and most nodes use a small part of it.
#[map]
pub static RULES: HashMap<RuleKey, RuleValue> = HashMap::pinned(MAX_RULES, BPF_F_NO_PREALLOC);
/// One LPM trie per policy-set and family, keyed by the address prefix alone, in the slot
/// `CidrData::slot` names (the agent creates a set's trie when it gets its first rule). A
/// lookup walks only its own set's prefixes, whatever other sets hold; the array lookup is
/// inlined by the verifier (no helper call). A BTF map definition: the legacy `maps`
/// section cannot describe the inner template.
#[btf_map]
pub static CIDR_RULES: CidrRules = CidrRules::new();

/// The template of every per-set trie.
pub type CidrTrie = btf_maps::LpmTrie<Addr, RuleValue, { MAX_CIDR_RULES_PER_SET as usize }>;

/// `CIDR_RULES`' BTF definition, as libbpf and aya-obj read it (`values` names the inner
/// template; aya-ebpf's own `ArrayOfMaps` has no `pinning` member).
#[repr(C)]
pub struct CidrRules {
    r#type: *const [i32; BPF_MAP_TYPE_ARRAY_OF_MAPS as usize],
    key: *const u32,
    max_entries: *const [i32; CIDR_SLOTS as usize],
    /// LIBBPF_PIN_BY_NAME: a restarted agent adopts the array and the tries it holds.
    pinning: *const [i32; 1],
    values: [*const CidrTrie; 0],
}

// SAFETY: a placeholder the loader relocates; its fields are never read or written.
unsafe impl Sync for CidrRules {}

impl CidrRules {
    const fn new() -> Self {
        CidrRules {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            max_entries: core::ptr::null(),
            pinning: core::ptr::null(),
            values: [],
        }
    }

    /// The trie of a slot, if the slot holds one.
    #[inline(always)]
    fn trie(&self, slot: u32) -> Option<&CidrTrie> {
        // SAFETY: a map lookup on this map-of-maps returns null or a map pointer the
        // verifier types as the inner template; it is only used as a map argument.
        unsafe {
            let p = bpf_map_lookup_elem(
                self as *const Self as *mut c_void,
                &slot as *const u32 as *const c_void,
            );
            (p as *const CidrTrie).as_ref()
        }
    }
}
/// Value: 1 (presence is what counts).
#[map]
pub static PORTS: LpmTrie<PortData, u8> = LpmTrie::pinned(MAX_PORTS, 0);
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(MAX_FRAGMENTS, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Service ClusterIP ranges (value 1): egress to them is judged after DNAT.
#[map]
pub static SERVICE_CIDRS: LpmTrie<Addr, u8> = LpmTrie::pinned(MAX_SERVICE_CIDRS, 0);
/// Client sockets whose egress to a virtual IP awaits the DNATed packet's hook.
#[map]
pub static SERVICE_PENDING: LruHashMap<PendingKey, PendingValue> =
    LruHashMap::pinned(MAX_SERVICE_PENDING, 0);

/// The Service grant, tail-called after a verdict (see `verdict::grant`): verified on its
/// own, it costs the hooks nothing of their instruction budget. Pinned so it outlives the
/// agent (a prog array loses its entries when no process or pin holds it) and so a
/// restarted agent's programs replace the old ones in place.
#[map]
pub static GRANTS: ProgramArray = ProgramArray::pinned(2, 0);

/// The re-judgement of a reply on a stale conntrack entry (see `verdict::rejudge`), tail-
/// called like `GRANTS`, pinned for the same reasons.
#[map]
pub static REJUDGES: ProgramArray = ProgramArray::pinned(2, 0);

/// All zeros, never written: the initial value of a new `SERVICE_PENDING` entry, inserted
/// from here because the BPF stack has no room for it. Private, not pinned.
#[map]
pub static PENDING_ZERO: Array<PendingValue> = Array::with_max_entries(1, 0);

/// Slots of `EP_CACHE` (a power of two): an interface has one per family (a dual-stack
/// pod's packets alternate between its two addresses), at `(ifindex * 2 + v6) % SLOTS`.
pub const EP_CACHE_SLOTS: u32 = 512;

/// Per CPU, per interface and family (see [`EP_CACHE_SLOTS`]): the hook's own endpoint,
/// bound to the interface by `BINDINGS`, as `ENDPOINTS` held it when `Config::endpoints_gen` had the value stored here. A pod's
/// veth always carries the same pod, so its packets skip the `ENDPOINTS` lookup (a hash
/// map's nested kernel calls) while nothing in `ENDPOINTS` changes. Private, not pinned:
/// the generation that validates it is in the pinned `CONFIG`.
#[map]
pub static EP_CACHE: PerCpuArray<EpCacheSlot> = PerCpuArray::with_max_entries(EP_CACHE_SLOTS, 0);

#[repr(C)]
pub struct EpCacheSlot {
    pub ifindex: u32,
    pub _pad: u32,
    pub generation: u64,
    pub addr: Addr,
    pub value: EndpointValue,
}

/// Per-CPU: the way a conntrack lookup found (`ct_table::find`). Private, not pinned.
#[map]
pub static CT_WAY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch for the parsed packet and its conntrack key: the BPF stack (512 bytes)
/// cannot hold them beside the other keys, and map memory needs no zeroing before use.
/// Private to the object, not pinned, not part of the contract.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch {
    pub pkt: crate::parse::Pkt,
    pub keys: CtKeys,
    pub known: Known,
}

/// The packet's normalised conntrack key, written by its lookup: `key4` for two IPv4
/// addresses, else `key`.
#[repr(C)]
pub struct CtKeys {
    pub key: CtKey,
    pub key4: CtKey4,
}

/// `IPCACHE` entries of the packet's own addresses, as the endpoint lookups found them:
/// the decision reuses them instead of looking the peer up again.
#[repr(C)]
pub struct Known {
    pub src: IpCacheValue,
    pub dst: IpCacheValue,
    /// [`Known::UNSEEN`], [`Known::MISS`] or [`Known::HIT`].
    pub src_state: u32,
    pub dst_state: u32,
}

impl Known {
    pub const UNSEEN: u32 = 0;
    pub const MISS: u32 = 1;
    pub const HIT: u32 = 2;
}

/// `decide()` over the BPF maps, for one packet.
pub struct BpfMaps<'a> {
    pub pkt: &'a crate::parse::Pkt,
    pub known: &'a Known,
}

#[inline(always)]
pub fn same_addr(a: &Addr, b: &Addr) -> bool {
    // Word by word: a derived comparison may become a `bcmp` call, which BPF lacks.
    a.0[0] == b.0[0] && a.0[1] == b.0[1] && a.0[2] == b.0[2] && a.0[3] == b.0[3]
}

#[inline(always)]
fn known_value(state: u32, v: &IpCacheValue) -> Option<IpCacheValue> {
    if state == Known::HIT { Some(*v) } else { None }
}

impl PolicyMaps for BpfMaps<'_> {
    #[inline(always)]
    fn ipcache(&self, key: &IpCacheKey) -> Option<IpCacheValue> {
        let k = self.known;
        if k.src_state != Known::UNSEEN && same_addr(&key.addr, &self.pkt.src) {
            return known_value(k.src_state, &k.src);
        }
        if k.dst_state != Known::UNSEEN && same_addr(&key.addr, &self.pkt.dst) {
            return known_value(k.dst_state, &k.dst);
        }
        // SAFETY: the value is copied out at once; a concurrent update may at worst give a
        // value that was valid a moment ago.
        unsafe { IPCACHE.get(key).copied() }
    }

    #[inline(always)]
    fn rule(&self, key: &RuleKey) -> Option<RuleValue> {
        // SAFETY: as above; RULES is not preallocated so entries are never aliased.
        unsafe { RULES.get(key).copied() }
    }

    #[inline(always)]
    fn cidr_rule(&self, key: &LpmKey<CidrData>) -> Option<RuleValue> {
        let inner = key.inner_key();
        CIDR_RULES
            .trie(key.data.slot())?
            .get(&Key::new(inner.prefixlen, inner.data))
            .copied()
    }

    #[inline(always)]
    fn port(&self, key: &LpmKey<PortData>) -> bool {
        PORTS.get(Key::new(key.prefixlen, key.data)).is_some()
    }
}
