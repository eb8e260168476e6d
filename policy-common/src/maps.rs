//! Map names, capacities, keys and values.
//!
//! Lookup order per packet (see [`crate::decide`]): at a pod hook `CONNTRACK` first
//! (`CONNTRACK4` for two IPv4 addresses; an entry holding every grant it recorded as needed
//! settles the packet); else `ENDPOINTS` for
//! both addresses -> `CONNTRACK` grants -> `IPCACHE` (peer address -> identity) -> `RULES`
//! (policy-set, identity) and/or `CIDR_RULES` (policy-set, peer prefix) -> `PORTS` only for
//! rules with more port ranges than fit inline, once per missing grant (source's egress,
//! destination's ingress). `SERVICE_CIDRS` / `SERVICE_PENDING` only for egress to a Service
//! range. A bounded number of lookups, whatever the number of pods, policies or CIDRs.

use crate::addr::Addr;

// ---- names (the `static` names in policy-ebpf; a test checks the object has each) ----
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Connections with an IPv6 address (and the agent's view of all of them: see [`CtKey::v4`]).
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// Connections between two IPv4 addresses, under the compact [`CtKey4`]: a 16-byte key
/// hashes and compares in less than half the time of the 40-byte one on every packet.
pub const MAP_CONNTRACK4: &str = "CONNTRACK4";
pub const MAP_IPCACHE: &str = "IPCACHE";
pub const MAP_RULES: &str = "RULES";
pub const MAP_CIDR_RULES: &str = "CIDR_RULES";
pub const MAP_PORTS: &str = "PORTS";
pub const MAP_FRAGMENTS: &str = "FRAGMENTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_EVENT_BUDGET: &str = "EVENT_BUDGET";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_SERVICE_CIDRS: &str = "SERVICE_CIDRS";
pub const MAP_SERVICE_PENDING: &str = "SERVICE_PENDING";
/// (interface, address) pairs: which addresses a pod's veth may carry as its own.
pub const MAP_BINDINGS: &str = "BINDINGS";
/// The Service grant programs the hooks tail-call (index [`GRANT_ETHERNET`], [`GRANT_L3`]).
pub const MAP_GRANTS: &str = "GRANTS";
/// `GRANTS` index of [`PROG_GRANT`].
pub const GRANT_ETHERNET: u32 = 0;
/// `GRANTS` index of [`PROG_GRANT_L3`].
pub const GRANT_L3: u32 = 1;
/// The re-judgement programs the hooks tail-call for a reply on a conntrack entry of an
/// older policy epoch (index [`REJUDGE_ETHERNET`], [`REJUDGE_L3`]).
pub const MAP_REJUDGES: &str = "REJUDGES";
/// `REJUDGES` index of [`PROG_REJUDGE`].
pub const REJUDGE_ETHERNET: u32 = 0;
/// `REJUDGES` index of [`PROG_REJUDGE_L3`].
pub const REJUDGE_L3: u32 = 1;

/// Program names (functions in policy-ebpf).
/// Attached at TC ingress of the pod's host-side veth: packets the pod sends.
pub const PROG_FROM_POD: &str = "from_pod";
/// Attached at TC egress of the pod's host-side veth: packets sent to the pod.
pub const PROG_TO_POD: &str = "to_pod";
/// Attached at TC ingress of a non-pod interface (uplink): judges a local destination's
/// ingress; passes everything that involves no local endpoint.
pub const PROG_FROM_WORLD: &str = "from_world";
/// Attached at TC egress of a non-pod interface: judges a local source's egress not yet
/// granted (e.g. a Service DNATed to a remote backend).
pub const PROG_TO_WORLD: &str = "to_world";
/// `from_world` for an uplink without a link header (tun, WireGuard, IPIP, GRE, SIT).
pub const PROG_FROM_WORLD_L3: &str = "from_world_l3";
/// `to_world` for an uplink without a link header.
pub const PROG_TO_WORLD_L3: &str = "to_world_l3";
/// A socket filter an iptables rule runs (`-m bpf`) on translated Service traffic after
/// DNAT: judges the egress a pod hook deferred. Pinned under this name in the pin directory.
pub const PROG_SERVICE_JUDGE: &str = "service_judge";
/// Tail-called by a hook whose verdict granted a deferred Service egress: grants the
/// client's virtual tuple (re-parsing the packet). Never attached.
pub const PROG_GRANT: &str = "grant";
/// [`PROG_GRANT`] for hooks without a link header.
pub const PROG_GRANT_L3: &str = "grant_l3";
/// Tail-called by a hook for a reply on a conntrack entry of an older policy epoch: judges
/// the connection again from its originator's side, counts and reports. Never attached.
pub const PROG_REJUDGE: &str = "rejudge";
/// [`PROG_REJUDGE`] for hooks without a link header.
pub const PROG_REJUDGE_L3: &str = "rejudge_l3";
/// A program that does nothing: the baseline of the datapath benchmark.
pub const PROG_BENCH_EMPTY: &str = "bench_empty";
/// Test-run only: writes a [`ClockSample`] into its packet (clock calibration).
pub const PROG_CLOCK_PROBE: &str = "clock_probe";

// ---- capacities ----
pub const MAX_ENDPOINTS: u32 = 16_384;
pub const MAX_IPCACHE: u32 = 262_144;
pub const MAX_RULES: u32 = 524_288;
/// CIDR rules of all policy-sets together (the agent enforces this total: the kernel only
/// bounds each set's own trie, see [`MAX_CIDR_RULES_PER_SET`]).
pub const MAX_CIDR_RULES: u32 = 524_288;
/// Entries one policy-set's trie (per family) may hold: any single set may use the whole
/// budget. The tries are not preallocated, so this bound costs no memory.
pub const MAX_CIDR_RULES_PER_SET: u32 = MAX_CIDR_RULES;
/// Policy-set numbers are below this. Live sets are at most two per endpoint (one per
/// direction, numbered densely from 1), and a restarted agent may need as many again for
/// sets that changed while it was down: 2 x 2 x [`MAX_ENDPOINTS`].
pub const MAX_POLICY_SETS: u32 = 4 * MAX_ENDPOINTS;
/// Slots of the `CIDR_RULES` array of maps: one trie per policy-set and family
/// ([`cidr_slot`]).
pub const CIDR_SLOTS: u32 = 2 * MAX_POLICY_SETS;
pub const MAX_PORTS: u32 = 65_536;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_FRAGMENTS: u32 = 8_192;
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
pub const MAX_SERVICE_CIDRS: u32 = 64;
pub const MAX_SERVICE_PENDING: u32 = 32_768;
/// Two addresses (one per family) per endpoint, with room for a pod moving interfaces.
pub const MAX_BINDINGS: u32 = 4 * MAX_ENDPOINTS;

/// What the pinned maps mean, beyond their shapes: bumped whenever a flag, a key or a hash
/// changes meaning, so an agent never adopts maps whose contents it would misread (it
/// migrates them instead). Stored in `Config::format`.
pub const FORMAT_VERSION: u32 = 2;

// ---- identities and policy-sets ----
/// Peer address not in `IPCACHE`: outside the cluster; only ipBlocks can match it.
pub const IDENTITY_WORLD: u32 = 0;
/// The node's own addresses (and hostNetwork pods on it).
pub const IDENTITY_HOST: u32 = 1;
/// First identity number the compiler hands to a pod label set.
pub const IDENTITY_FIRST_POD: u32 = 256;
/// Policy-set 0 holds no rule: an endpoint isolated with it denies everything.
pub const POLICY_SET_EMPTY: u32 = 0;

/// `ENDPOINTS` key: a local pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EndpointKey {
    pub addr: Addr,
}

/// `EndpointValue::flags`.
pub mod ep_flags {
    /// Some policy selecting the pod has Ingress in its policyTypes.
    pub const ISOLATED_INGRESS: u32 = 1 << 0;
    pub const ISOLATED_EGRESS: u32 = 1 << 1;
    /// The ingress policy-set has `RULES` entries (else the lookup is skipped).
    pub const INGRESS_HAS_IDENTITY_RULES: u32 = 1 << 2;
    /// The ingress policy-set has `CIDR_RULES` entries.
    pub const INGRESS_HAS_CIDR_RULES: u32 = 1 << 3;
    pub const EGRESS_HAS_IDENTITY_RULES: u32 = 1 << 4;
    pub const EGRESS_HAS_CIDR_RULES: u32 = 1 << 5;
}

/// `ENDPOINTS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EndpointValue {
    /// Stable number of the pod on this node (events and metrics name it).
    pub endpoint_id: u32,
    pub ingress_policy_set: u32,
    pub egress_policy_set: u32,
    /// [`ep_flags`].
    pub flags: u32,
}

impl EndpointValue {
    #[inline(always)]
    pub const fn isolated(&self, dir: crate::Direction) -> bool {
        match dir {
            crate::Direction::Ingress => self.flags & ep_flags::ISOLATED_INGRESS != 0,
            crate::Direction::Egress => self.flags & ep_flags::ISOLATED_EGRESS != 0,
        }
    }
    #[inline(always)]
    pub const fn policy_set(&self, dir: crate::Direction) -> u32 {
        match dir {
            crate::Direction::Ingress => self.ingress_policy_set,
            crate::Direction::Egress => self.egress_policy_set,
        }
    }
    #[inline(always)]
    pub const fn has_identity_rules(&self, dir: crate::Direction) -> bool {
        match dir {
            crate::Direction::Ingress => self.flags & ep_flags::INGRESS_HAS_IDENTITY_RULES != 0,
            crate::Direction::Egress => self.flags & ep_flags::EGRESS_HAS_IDENTITY_RULES != 0,
        }
    }
    #[inline(always)]
    pub const fn has_cidr_rules(&self, dir: crate::Direction) -> bool {
        match dir {
            crate::Direction::Ingress => self.flags & ep_flags::INGRESS_HAS_CIDR_RULES != 0,
            crate::Direction::Egress => self.flags & ep_flags::EGRESS_HAS_CIDR_RULES != 0,
        }
    }
}

/// `BINDINGS` key: an address a local pod's host-side interface carries as the pod's own.
/// The pod hooks trust a packet's pod-side address only when its (interface, address) pair
/// is here: a pod sending with another pod's address is refused before anything else.
/// Written by the node side from the routes to each local pod; the value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BindingKey {
    pub ifindex: u32,
    pub addr: Addr,
}

/// `IPCACHE` key: any pod or node address of the cluster (exact match, hash map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IpCacheKey {
    pub addr: Addr,
}

/// `IPCACHE` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IpCacheValue {
    /// [`IDENTITY_HOST`] or a pod identity (>= [`IDENTITY_FIRST_POD`]); [`IDENTITY_WORLD`]
    /// for a local endpoint the cluster gave no identity (never a rule's peer).
    pub identity: u32,
    /// [`ipc_flags`].
    pub flags: u32,
}

/// `IpCacheValue::flags`.
pub mod ipc_flags {
    /// The address is a key of `ENDPOINTS` (a pod on this node). A hook looks the far side
    /// of a packet up here first (its identity is what the decision needs) and in
    /// `ENDPOINTS` only when this bit says it is there: one lookup, not two, for every peer
    /// off the node. The agent writes this bit before the `ENDPOINTS` entry and removes the
    /// entry before the bit.
    pub const LOCAL_ENDPOINT: u32 = 1 << 0;
}

/// `RULES` key: (policy-set, peer identity). Policy-set numbers are unique across directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RuleKey {
    pub policy_set: u32,
    pub identity: u32,
}

/// One inline port range of a [`RuleValue`]; `proto == 0` marks an unused slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Ranges held inline in a rule value; larger port-sets go to the `PORTS` trie.
pub const INLINE_PORT_RANGES: usize = 4;

/// `RuleValue::flags`.
pub mod rule_flags {
    /// Any protocol, any port (a rule without `ports`).
    pub const ALL: u32 = 1 << 0;
    /// Consult the `PORTS` trie with `port_set` (in addition to the inline ranges).
    pub const PORT_SET: u32 = 1 << 1;
}

/// Value of `RULES` and `CIDR_RULES`: which protocols and ports the matched peer may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RuleValue {
    /// [`rule_flags`].
    pub flags: u32,
    pub port_set: u32,
    pub ranges: [PortRange; INLINE_PORT_RANGES],
}

/// A key of an LPM trie map as the kernel lays it out: prefix length, then the data.
/// (aya's `lpm_trie::Key<D>` has the same layout; this one is for the compiler's output.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LpmKey<D> {
    /// Significant bits of `data`, counted from its first byte.
    pub prefixlen: u32,
    pub data: D,
}

/// A CIDR rule's key as the compiler and `decide()` name it: (policy-set, family, prefix).
/// The prefix length counts 32 for `set_family` (always exact) plus the address prefix, an
/// IPv4 prefix being expressed on the mapped address (`/24` is 32 + 96 + 24): see
/// [`cidr_prefixlen`].
///
/// In the kernel, `CIDR_RULES` is an array of maps: slot [`CidrData::slot`] (policy-set and
/// family) holds that set's own LPM trie, keyed by the address prefix alone
/// ([`CidrData::inner_key`]). A lookup thus walks only its own set's prefixes, whatever
/// other sets hold, and an IPv6 prefix such as `::/0` never covers an IPv4-mapped address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CidrData {
    /// Big-endian policy-set number, with [`CIDR_FAMILY_V6`] set for IPv6 prefixes.
    pub set_family_be: u32,
    pub addr: Addr,
}

/// Bit of the policy-set word marking an IPv6 prefix. Policy-set numbers stay below it.
pub const CIDR_FAMILY_V6: u32 = 1 << 31;

/// The LPM prefix length of a CIDR of `addr_prefix` bits (`v4`: counted on the IPv4 address).
#[inline(always)]
pub const fn cidr_prefixlen(v4: bool, addr_prefix: u8) -> u32 {
    32 + if v4 { 96 } else { 0 } + addr_prefix as u32
}

impl CidrData {
    #[inline(always)]
    pub const fn new(policy_set: u32, addr: Addr) -> Self {
        let fam = if addr.is_v4() { 0 } else { CIDR_FAMILY_V6 };
        CidrData {
            set_family_be: (policy_set | fam).to_be(),
            addr,
        }
    }
}

/// Prefix length of a full-address lookup in `CIDR_RULES`.
pub const CIDR_LOOKUP_PREFIXLEN: u32 = 32 + 128;

/// Key of a policy-set's own `CIDR_RULES` trie: the address prefix (IPv4 on the mapped
/// address, `/24` being 96 + 24).
pub type CidrKey = LpmKey<Addr>;

/// The `CIDR_RULES` slot of a policy-set's trie for one family.
#[inline(always)]
pub const fn cidr_slot(policy_set: u32, v6: bool) -> u32 {
    (policy_set << 1) | v6 as u32
}

impl CidrData {
    /// The policy-set number.
    #[inline(always)]
    pub const fn policy_set(&self) -> u32 {
        u32::from_be(self.set_family_be) & !CIDR_FAMILY_V6
    }

    #[inline(always)]
    pub const fn is_v6(&self) -> bool {
        u32::from_be(self.set_family_be) & CIDR_FAMILY_V6 != 0
    }

    /// The slot of `CIDR_RULES` holding this set's trie of this family (out of range, and
    /// so never matching, for a number at or above [`MAX_POLICY_SETS`]).
    #[inline(always)]
    pub const fn slot(&self) -> u32 {
        let w = u32::from_be(self.set_family_be);
        ((w & !CIDR_FAMILY_V6) << 1) | (w >> 31)
    }
}

impl LpmKey<CidrData> {
    /// The key within the set's own trie: the same prefix without the policy-set word.
    #[inline(always)]
    pub const fn inner_key(&self) -> CidrKey {
        LpmKey {
            prefixlen: self.prefixlen.saturating_sub(32),
            data: self.data.addr,
        }
    }

    /// The inverse of ([`CidrData::slot`], [`Self::inner_key`]).
    #[inline(always)]
    pub const fn from_slot(slot: u32, inner: &CidrKey) -> Self {
        let fam = if slot & 1 != 0 { CIDR_FAMILY_V6 } else { 0 };
        LpmKey {
            prefixlen: inner.prefixlen + 32,
            data: CidrData {
                set_family_be: ((slot >> 1) | fam).to_be(),
                addr: inner.data,
            },
        }
    }
}

// Slot numbers fit the array and never wrap.
const _: () = {
    assert!(CIDR_SLOTS == cidr_slot(MAX_POLICY_SETS - 1, true) + 1);
    assert!(MAX_POLICY_SETS < CIDR_FAMILY_V6);
    assert!(MAX_CIDR_RULES_PER_SET <= MAX_CIDR_RULES);
    assert!(core::mem::size_of::<CidrKey>() == 20);
};

/// `PORTS` key data (LPM trie): prefix length = 48 + port prefix bits (the port-set word,
/// the protocol byte and the zero pad byte are always exact): see [`port_prefixlen`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PortData {
    /// Big-endian port-set number.
    pub port_set_be: u32,
    pub proto: u8,
    pub _pad: u8,
    /// Big-endian port.
    pub port_be: u16,
}

impl PortData {
    #[inline(always)]
    pub const fn new(port_set: u32, proto: u8, port: u16) -> Self {
        PortData {
            port_set_be: port_set.to_be(),
            proto,
            _pad: 0,
            port_be: port.to_be(),
        }
    }
}

/// The LPM prefix length of a port prefix of `port_bits` bits.
#[inline(always)]
pub const fn port_prefixlen(port_bits: u8) -> u32 {
    48 + port_bits as u32
}

/// Prefix length of a full-port lookup in `PORTS`.
pub const PORT_LOOKUP_PREFIXLEN: u32 = 64;

/// `CONNTRACK` key: the 5-tuple normalised so both directions of a connection share one
/// entry: `(addr_a, port_a) <= (addr_b, port_b)` comparing address bytes then port.
/// ICMP echo uses the identifier as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CtKey {
    pub addr_a: Addr,
    pub addr_b: Addr,
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK4` key: a [`CtKey`] whose two addresses are IPv4, compacted (same order, same
/// normalisation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CtKey4 {
    /// The IPv4 addresses as network-order words (`Addr::0[3]`).
    pub addr_a: u32,
    pub addr_b: u32,
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The compact key when both addresses are IPv4: such an entry lives in `CONNTRACK4`.
    #[inline(always)]
    pub const fn v4(&self) -> Option<CtKey4> {
        if self.addr_a.is_v4() && self.addr_b.is_v4() {
            Some(CtKey4 {
                addr_a: self.addr_a.0[3],
                addr_b: self.addr_b.0[3],
                port_a: self.port_a,
                port_b: self.port_b,
                proto: self.proto,
                _pad: [0; 3],
            })
        } else {
            None
        }
    }
}

impl CtKey4 {
    /// The full key of the same connection.
    #[inline(always)]
    pub const fn widen(&self) -> CtKey {
        CtKey {
            addr_a: Addr::from_v4_raw(self.addr_a),
            addr_b: Addr::from_v4_raw(self.addr_b),
            port_a: self.port_a,
            port_b: self.port_b,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `CtValue::flags`.
pub mod ct_flags {
    /// The connection was originated by the `a` side of the key (else by `b`).
    pub const ORIG_IS_A: u32 = 1 << 0;
    /// The originator's egress was checked and allowed (at the originator's hook).
    pub const EGRESS_OK: u32 = 1 << 1;
    /// The responder's ingress was checked and allowed (at the responder's hook).
    pub const INGRESS_OK: u32 = 1 << 2;
    /// A packet went in the reply direction (TCP: handshake answered).
    pub const SEEN_REPLY: u32 = 1 << 3;
    /// FIN seen from the originator / from the responder.
    pub const FIN_ORIG: u32 = 1 << 4;
    pub const FIN_REPLY: u32 = 1 << 5;
    /// RST seen: the entry lives only for [`crate::ct::TIMEOUT_CLOSING_NS`].
    pub const RST: u32 = 1 << 6;
    /// Seeded by the agent from the kernel's connection table at start.
    pub const SEEDED: u32 = 1 << 7;
    /// The grants this connection needs, as of its last decision: `EGRESS_OK` when the
    /// originator is a local endpoint isolated for egress, `INGRESS_OK` when the responder is
    /// one isolated for ingress. Stored shifted by [`REQ_SHIFT`].
    pub const REQ_EGRESS: u32 = EGRESS_OK << REQ_SHIFT;
    pub const REQ_INGRESS: u32 = INGRESS_OK << REQ_SHIFT;
    pub const REQ_SHIFT: u32 = 7;
    /// Both grants.
    pub const GRANTS: u32 = EGRESS_OK | INGRESS_OK;
    /// Both required-grant bits.
    pub const REQ_MASK: u32 = GRANTS << REQ_SHIFT;
    /// The policy epoch the entry's grants were decided under (`Config::policy_epoch`),
    /// in the top [`EPOCH_BITS`] bits.
    pub const EPOCH_SHIFT: u32 = 12;
    pub const EPOCH_BITS: u32 = 32 - EPOCH_SHIFT;
    pub const EPOCH_MASK: u32 = u32::MAX << EPOCH_SHIFT;
}

/// `CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last refresh.
    pub last_seen_ns: u64,
    /// [`ct_flags`].
    pub flags: u32,
    /// The endpoint (`EndpointValue::endpoint_id`) on whose behalf the entry was made, 0 for
    /// none known (seeded or migrated): one owner holds at most
    /// [`crate::ct_table::CT_OWNER_SHARE`] slots of a bucket, so no pod's flows fill the
    /// table.
    pub owner: u32,
}

/// `SERVICE_CIDRS` key data (LPM trie, value 1): a Service ClusterIP range. The prefix length
/// counts on the 16-byte address (an IPv4 `/17` is 96 + 17): see [`service_prefixlen`].
/// A destination in such a range is a virtual IP that DNAT replaces after the pod's hook:
/// its egress is judged where the translated packet next meets a hook.
pub type ServiceCidrKey = LpmKey<Addr>;

/// The LPM prefix length of a service range of `addr_prefix` bits.
#[inline(always)]
pub const fn service_prefixlen(v4: bool, addr_prefix: u8) -> u32 {
    if v4 {
        96 + addr_prefix as u32
    } else {
        addr_prefix as u32
    }
}

/// `SERVICE_PENDING` key (LRU hash): what of a client's deferred packet survives DNAT.
/// A TCP SYN is keyed by its sequence number (`by_seq` 1, `id` = seq): DNAT may also change
/// the source port (when the translated tuple would clash with a live one, e.g. a recent
/// direct connection from the same port), never the sequence number. Anything else is keyed
/// by its source port (`by_seq` 0, `id` = port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PendingKey {
    pub src: Addr,
    pub id: u32,
    pub proto: u8,
    pub by_seq: u8,
    pub _pad: u16,
}

/// How many virtual tuples one pending key may hold at once: a client may send from one
/// source port to several virtual IPs at the same time (the kernel only keeps the whole
/// 4-tuple unique), so one slot per key would let one flow's grant land on another's tuple.
pub const PENDING_SLOTS: usize = 4;

/// How long a deferred virtual tuple may wait for its DNATed packet to be judged: a packet
/// crosses the node in microseconds; a retransmission defers again and refreshes the slot.
pub const PENDING_WINDOW_NS: u64 = 2_000_000_000;

/// One deferred virtual tuple: what the client addressed, from which port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PendingSlot {
    pub vip: Addr,
    pub vport: u16,
    /// The client's source port before DNAT (which may change it).
    pub sport: u16,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` when deferred; 0 = empty slot.
    pub seen_ns: u64,
}

/// `SERVICE_PENDING` value: the virtual tuples deferred under one key, so the hook that
/// judges the DNATed packet can grant the client's conntrack entry of the virtual tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PendingValue {
    pub slots: [PendingSlot; PENDING_SLOTS],
}

/// `FRAGMENTS` key: a fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `FRAGMENTS` value, written when a first fragment passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FragValue {
    pub created_ns: u64,
    /// The first fragment's [`crate::Reason`].
    pub reason: u32,
    pub _pad: u32,
}

/// One deny event in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyEvent {
    pub timestamp_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`crate::Direction`] of the endpoint.
    pub direction: u8,
    /// [`crate::Reason`].
    pub reason: u8,
    pub _pad: u8,
    pub endpoint_id: u32,
    pub ifindex: u32,
}

/// `EVENT_BUDGET` per-CPU token bucket bounding deny events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventBudget {
    pub tokens: u64,
    pub last_refill_ns: u64,
}

/// `CONFIG` array, index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Deny events per second per CPU (0 = no events).
    pub events_per_sec: u32,
    /// Burst size of the event budget.
    pub events_burst: u32,
    /// Nanoseconds per kernel tick. The datapath's clock (conntrack and fragment stamps,
    /// the event budget) is `(jiffies - jiffies_base) * jiffy_ns`: reading `jiffies` is one
    /// load, where a clock helper is a call chain (the dearest part of a conntrack hit).
    /// 0 = not calibrated: the datapath reads `bpf_ktime_get_coarse_ns` instead.
    pub jiffy_ns: u32,
    /// Seed of the conntrack tables' hash (`ct_table`), random per table; 0 in a `CONFIG`
    /// written before it existed (still a valid seed).
    pub ct_seed: u32,
    /// `jiffies` when `CLOCK_MONOTONIC_COARSE` read 0, so both clocks agree (the agent
    /// calibrates it; stamps written under the helper clock stay meaningful).
    pub jiffies_base: u64,
    /// Bumped by the agent after every change to `ENDPOINTS` and every removal from
    /// `BINDINGS`: the programs' per-CPU cache of each interface's own endpoint trusts only
    /// entries filled under the current value. A Gray-code counter (one bit changes per
    /// bump), so a read racing the update sees the old or the new value, never a mix.
    pub endpoints_gen: u64,
    /// [`FORMAT_VERSION`] of the agent that created the maps (0: before it existed).
    pub format: u32,
    /// The policy epoch: bumped by the agent after every complete write of the policy maps
    /// (`--established revalidate`; never with `keep`). A conntrack entry stamped with
    /// another epoch is judged again, as a new connection would be, on its next packet
    /// ([`crate::ct::current`]). A Gray-code counter of [`ct_flags::EPOCH_BITS`] bits (one
    /// bit changes per bump), so a read racing the update sees the old or the new epoch.
    /// Was padding (0) before it existed: entries of older agents carry epoch 0.
    pub policy_epoch: u32,
}

/// What the `clock_probe` program writes over the start of its test packet: the coarse
/// clock, `jiffies`, the coarse clock again (equal when no tick fell between the reads).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClockSample {
    pub coarse_ns: u64,
    pub jiffies: u64,
    pub coarse_ns_after: u64,
}

/// Defaults the agent writes into `CONFIG`.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 1_000;
pub const DEFAULT_EVENTS_BURST: u32 = 100;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<EndpointKey>() == 16);
    assert!(size_of::<EndpointValue>() == 16);
    assert!(size_of::<IpCacheKey>() == 16);
    assert!(size_of::<IpCacheValue>() == 8);
    assert!(size_of::<RuleKey>() == 8);
    assert!(size_of::<PortRange>() == 8);
    assert!(size_of::<RuleValue>() == 8 + 8 * INLINE_PORT_RANGES);
    assert!(size_of::<CidrData>() == 20);
    assert!(offset_of!(CidrData, addr) == 4);
    assert!(size_of::<LpmKey<CidrData>>() == 24);
    assert!(size_of::<PortData>() == 8);
    assert!(offset_of!(PortData, port_be) == 6);
    assert!(size_of::<LpmKey<PortData>>() == 12);
    assert!(size_of::<CtKey>() == 40);
    assert!(offset_of!(CtKey, proto) == 36);
    assert!(size_of::<CtValue>() == 16);
    assert!(size_of::<CtKey4>() == 16);
    assert!(offset_of!(CtKey4, proto) == 12);
    assert!(size_of::<FragKey>() == 40);
    assert!(size_of::<FragValue>() == 16);
    assert!(size_of::<DenyEvent>() == 56);
    assert!(offset_of!(DenyEvent, endpoint_id) == 48);
    assert!(size_of::<EventBudget>() == 16);
    assert!(size_of::<Config>() == 40);
    assert!(offset_of!(Config, policy_epoch) == 36);
    assert!(offset_of!(Config, format) == 32);
    assert!(size_of::<BindingKey>() == 20);
    assert!(offset_of!(BindingKey, addr) == 4);
    assert!(offset_of!(Config, endpoints_gen) == 24);
    assert!(offset_of!(Config, jiffies_base) == 16);
    assert!(size_of::<ClockSample>() == 24);
    assert!(size_of::<PendingKey>() == 24);
    assert!(offset_of!(PendingKey, proto) == 20);
    assert!(size_of::<PendingSlot>() == 32);
    assert!(offset_of!(PendingSlot, sport) == 18);
    assert!(offset_of!(PendingSlot, seen_ns) == 24);
    assert!(size_of::<PendingValue>() == 128);
    assert!(size_of::<LpmKey<Addr>>() == 20);
};

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made of integers with explicit padding fields,
    // so any bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for BindingKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for IpCacheKey {}
    unsafe impl aya::Pod for IpCacheValue {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for CidrData {}
    unsafe impl aya::Pod for PortData {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for DenyEvent {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for PendingKey {}
    unsafe impl aya::Pod for PendingValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_key_splits_into_slot_and_inner_key_and_back() {
        let v4 = LpmKey {
            prefixlen: cidr_prefixlen(true, 24),
            data: CidrData::new(7, Addr::from_v4_octets([198, 19, 0, 0])),
        };
        assert_eq!(v4.data.slot(), cidr_slot(7, false));
        assert_eq!(v4.inner_key().prefixlen, 96 + 24);
        assert_eq!(LpmKey::from_slot(v4.data.slot(), &v4.inner_key()), v4);
        let v6 = LpmKey {
            prefixlen: cidr_prefixlen(false, 0),
            data: CidrData::new(MAX_POLICY_SETS - 1, Addr::from_v6_octets([0; 16])),
        };
        assert_eq!(v6.data.slot(), CIDR_SLOTS - 1);
        assert_eq!(v6.inner_key().prefixlen, 0);
        assert_eq!(LpmKey::from_slot(v6.data.slot(), &v6.inner_key()), v6);
        // A number beyond the bound lands beyond the array: no trie, no match.
        assert!(CidrData::new(MAX_POLICY_SETS, Addr::default()).slot() >= CIDR_SLOTS);
        assert!(CidrData::new(CIDR_FAMILY_V6 - 1, Addr::default()).slot() >= CIDR_SLOTS);
    }
}
