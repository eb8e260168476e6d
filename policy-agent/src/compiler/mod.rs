//! The policy compiler: a pure function from a [`Snapshot`] of the cluster to the desired
//! content of every policy map ([`MapContents`]), deterministic for a given [`CompilerState`].
//!
//! Pipeline:
//! 1. identities: one per distinct (namespace, labels, named container ports) of the pods that
//!    have addresses and are not hostNetwork; `IPCACHE` maps their addresses to it (an
//!    address pods of different identities claim to none, see [`shared_endpoint`]), and the
//!    node's own addresses (and local hostNetwork pods) to `IDENTITY_HOST`;
//! 2. local endpoints and, per direction, the policies selecting each (policies that select no
//!    local pod are never looked at again);
//! 3. a policy-set spec per endpoint and direction (its selecting policies, plus for ingress
//!    the endpoint's own named ports, on which ingress named ports resolve), compiled once per
//!    distinct spec into a table: identity -> port-set and ipBlock prefix -> port-set;
//! 4. identical tables share a policy-set number; port-sets too large to be inline get a
//!    port-set number and `PORTS` entries.
//!
//! Numbers (identities, policy-sets, port-sets, endpoint ids) live in the state and keep
//! their value while their key stays live, so two compiles differ only where objects changed.
//!
//! Selection (which policies isolate a pod, which identities a peer selects) is decided in
//! one place, [`selector`], for this full compile and the incremental [`Engine`] alike; the
//! engine keeps its [`selector::SelectorCache`] current across changes.

pub mod capacity;
pub mod cidr;
pub mod incremental;
mod numbering;
pub mod portset;
pub mod selector;
mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use policy_common::Addr;
use policy_common::maps::*;

use crate::model::{Labels, NetworkPolicy, ObjectKey, Pod, PortRef, PortSpec, Protocol, Snapshot};
pub use incremental::{Change, Engine};
use numbering::Numbering;
use portset::PortSet;
use selector::SelectorCache;

/// The desired content of every policy map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub ipcache: BTreeMap<IpCacheKey, IpCacheValue>,
    pub rules: BTreeMap<RuleKey, RuleValue>,
    pub cidr_rules: BTreeMap<LpmKey<CidrData>, RuleValue>,
    /// `PORTS` entries; the value is always 1 (presence allows).
    pub ports: BTreeMap<LpmKey<PortData>, u8>,
}

/// Upserts and deletes of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapChanges<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapChanges<K, V> {
    fn default() -> Self {
        MapChanges {
            upserts: Vec::new(),
            deletes: Vec::new(),
        }
    }
}

impl<K: Ord + Copy, V: PartialEq + Copy> MapChanges<K, V> {
    fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let mut c = MapChanges::default();
        for (k, v) in new {
            if old.get(k) != Some(v) {
                c.upserts.push((*k, *v));
            }
        }
        for k in old.keys() {
            if !new.contains_key(k) {
                c.deletes.push(*k);
            }
        }
        c
    }

    pub fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the changes to a map.
    pub fn apply(&self, map: &mut BTreeMap<K, V>) {
        for k in &self.deletes {
            map.remove(k);
        }
        for (k, v) in &self.upserts {
            map.insert(*k, *v);
        }
    }
}

/// What to write to the kernel to go from one [`MapContents`] to another. A writer should
/// apply upserts before deletes per map, and `PORTS` upserts first / deletes last, so no
/// lookup ever sees a rule whose port-set is missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub endpoints: MapChanges<EndpointKey, EndpointValue>,
    pub ipcache: MapChanges<IpCacheKey, IpCacheValue>,
    pub rules: MapChanges<RuleKey, RuleValue>,
    pub cidr_rules: MapChanges<LpmKey<CidrData>, RuleValue>,
    pub ports: MapChanges<LpmKey<PortData>, u8>,
}

impl MapDiff {
    pub fn len(&self) -> usize {
        self.endpoints.len()
            + self.ipcache.len()
            + self.rules.len()
            + self.cidr_rules.len()
            + self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the diff to map contents (what the writer does to the kernel maps).
    pub fn apply(&self, m: &mut MapContents) {
        self.endpoints.apply(&mut m.endpoints);
        self.ipcache.apply(&mut m.ipcache);
        self.rules.apply(&mut m.rules);
        self.cidr_rules.apply(&mut m.cidr_rules);
        self.ports.apply(&mut m.ports);
    }
}

impl MapContents {
    pub fn diff(old: &MapContents, new: &MapContents) -> MapDiff {
        MapDiff {
            endpoints: MapChanges::between(&old.endpoints, &new.endpoints),
            ipcache: MapChanges::between(&old.ipcache, &new.ipcache),
            rules: MapChanges::between(&old.rules, &new.rules),
            cidr_rules: MapChanges::between(&old.cidr_rules, &new.cidr_rules),
            ports: MapChanges::between(&old.ports, &new.ports),
        }
    }

    /// (map name, entries, key + value bytes) per map.
    pub fn sizes(&self) -> [(&'static str, usize, usize); 5] {
        use core::mem::size_of;
        fn row<K, V>(name: &'static str, m: &BTreeMap<K, V>) -> (&'static str, usize, usize) {
            (name, m.len(), m.len() * (size_of::<K>() + size_of::<V>()))
        }
        [
            row(MAP_ENDPOINTS, &self.endpoints),
            row(MAP_IPCACHE, &self.ipcache),
            row(MAP_RULES, &self.rules),
            row(MAP_CIDR_RULES, &self.cidr_rules),
            row(MAP_PORTS, &self.ports),
        ]
    }
}

/// What one identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    /// Named container ports (egress named ports resolve on the peer).
    pub named_ports: BTreeSet<(String, Protocol, u16)>,
}

impl IdentityKey {
    pub fn of(pod: &Pod) -> Self {
        IdentityKey {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports: pod
                .ports
                .iter()
                .filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port)))
                .collect(),
        }
    }

    fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == protocol)
            .map(|x| x.2)
    }
}

/// A compiled policy-set: what one endpoint allows in one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableData {
    /// Peer identity -> allowed ports (never empty).
    pub rules: BTreeMap<u32, PortSet>,
    /// ipBlock prefix -> allowed ports (empty = deny entry shadowing a shorter prefix).
    pub cidrs: BTreeMap<IpNet, PortSet>,
}

/// A shared, hashed [`TableData`]: tables are keys of the policy-set numbering and are
/// compared often; the hash settles most comparisons without walking thousands of rows.
/// It also holds how its ipBlock prefixes are written ([`cidr::codes`]), worked out once.
#[derive(Clone, Debug)]
pub struct Table {
    hash: u64,
    data: std::sync::Arc<TableData>,
    cidr_codes: std::sync::Arc<BTreeMap<IpNet, portset::PortCode>>,
}

impl Table {
    pub fn new(data: TableData) -> Table {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data.hash(&mut h);
        Table {
            hash: h.finish(),
            cidr_codes: std::sync::Arc::new(cidr::codes(&data.cidrs)),
            data: std::sync::Arc::new(data),
        }
    }

    pub fn data(&self) -> &TableData {
        &self.data
    }

    /// Each ipBlock prefix and how its port-set is written.
    pub fn cidr_codes(&self) -> &BTreeMap<IpNet, portset::PortCode> {
        &self.cidr_codes
    }

    /// The port lists that need a `PORTS` trie (what port-set numbers are given to).
    pub fn trie_port_lists(&self) -> impl Iterator<Item = &[(u8, u16, u16)]> {
        self.rules
            .values()
            .filter_map(PortSet::needs_trie)
            .chain(self.cidr_codes.values().filter_map(|c| c.trie.as_deref()))
    }
}

impl Default for Table {
    fn default() -> Self {
        Table::new(TableData::default())
    }
}

impl std::ops::Deref for Table {
    type Target = TableData;
    fn deref(&self) -> &TableData {
        &self.data
    }
}

impl PartialEq for Table {
    fn eq(&self, o: &Table) -> bool {
        self.hash == o.hash && (std::sync::Arc::ptr_eq(&self.data, &o.data) || self.data == o.data)
    }
}

impl Eq for Table {}

impl PartialOrd for Table {
    fn partial_cmp(&self, o: &Table) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Table {
    fn cmp(&self, o: &Table) -> std::cmp::Ordering {
        self.hash.cmp(&o.hash).then_with(|| {
            if std::sync::Arc::ptr_eq(&self.data, &o.data) {
                std::cmp::Ordering::Equal
            } else {
                self.data.cmp(&o.data)
            }
        })
    }
}

impl std::hash::Hash for Table {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.hash.hash(h);
    }
}

/// Numbers that must survive between compiles.
#[derive(Clone, Debug)]
pub struct CompilerState {
    identities: Numbering<IdentityKey>,
    policy_sets: Numbering<Table>,
    port_sets: Numbering<Vec<(u8, u16, u16)>>,
    endpoints: Numbering<ObjectKey>,
    /// Each spec's table at the last full compile: a table that changes keeps its
    /// policy-set number, so a recompile rewrites only the rows that changed.
    last_tables: BTreeMap<StableSpec, Table>,
}

/// A spec named by policy keys rather than positions, comparable across compiles.
type StableSpec = (bool, Vec<ObjectKey>, Vec<(String, Protocol, u16)>);

impl Default for CompilerState {
    fn default() -> Self {
        CompilerState {
            identities: Numbering::new(IDENTITY_FIRST_POD, u32::MAX),
            // Bounded by the slots of `CIDR_RULES`; a table past them gets no number and its
            // endpoints deny (fail closed).
            policy_sets: Numbering::new(POLICY_SET_EMPTY + 1, MAX_POLICY_SETS),
            port_sets: Numbering::new(1, u32::MAX),
            endpoints: Numbering::new(1, u32::MAX),
            last_tables: BTreeMap::new(),
        }
    }
}

impl CompilerState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A rule's value: its port-set written alone.
    fn rule_value(&self, ps: &PortSet) -> RuleValue {
        self.code_value(&ps.code())
    }

    /// A written port-set's value, with the number of its trie list when it has one (0, which
    /// no list has, if the list got no number: the list admits nothing then).
    fn code_value(&self, code: &portset::PortCode) -> RuleValue {
        let n = code
            .trie
            .as_ref()
            .and_then(|r| self.port_sets.get(r))
            .unwrap_or(0);
        code.rule_value(n)
    }

    /// The `ENDPOINTS` value of a local pod with this endpoint number whose ingress and
    /// egress are decided by these tables (`None`: no policy selects it for that
    /// direction; `Some(None)`: selected, with nothing allowed).
    fn endpoint_value(
        &self,
        endpoint_id: u32,
        tables: [Option<Option<&Table>>; 2],
    ) -> EndpointValue {
        let mut v = EndpointValue {
            endpoint_id,
            ..Default::default()
        };
        for (d, table) in tables.into_iter().enumerate() {
            let Some(table) = table else { continue };
            let set = table
                .and_then(|t| self.policy_sets.get(t))
                .unwrap_or(POLICY_SET_EMPTY);
            let (iso, identity_rules, cidr_rules) = if d == 0 {
                v.ingress_policy_set = set;
                (
                    ep_flags::ISOLATED_INGRESS,
                    ep_flags::INGRESS_HAS_IDENTITY_RULES,
                    ep_flags::INGRESS_HAS_CIDR_RULES,
                )
            } else {
                v.egress_policy_set = set;
                (
                    ep_flags::ISOLATED_EGRESS,
                    ep_flags::EGRESS_HAS_IDENTITY_RULES,
                    ep_flags::EGRESS_HAS_CIDR_RULES,
                )
            };
            v.flags |= iso;
            if table.is_some_and(|t| !t.rules.is_empty()) {
                v.flags |= identity_rules;
            }
            if table.is_some_and(|t| !t.cidrs.is_empty()) {
                v.flags |= cidr_rules;
            }
        }
        v
    }
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6_octets(v6.octets()),
    }
}

/// The `CIDR_RULES` key of a prefix in a policy-set. The family comes from the prefix as
/// written: an IPv6 prefix never matches IPv4 packets (as in Go's `IPNet.Contains`), even
/// an IPv4-mapped one.
pub fn cidr_key(set: u32, net: &IpNet) -> LpmKey<CidrData> {
    match net {
        IpNet::V4(n) => LpmKey {
            prefixlen: cidr_prefixlen(true, n.prefix_len()),
            data: CidrData::new(set, Addr::from_v4_octets(n.network().octets())),
        },
        IpNet::V6(n) => LpmKey {
            prefixlen: cidr_prefixlen(false, n.prefix_len()),
            data: CidrData {
                set_family_be: (set | CIDR_FAMILY_V6).to_be(),
                addr: Addr::from_v6_octets(n.network().octets()),
            },
        },
    }
}

struct Ident<'a> {
    id: u32,
    key: &'a IdentityKey,
}

/// Per-compile lookup structures over identities and namespaces.
struct Universe<'a> {
    idents: Vec<Ident<'a>>,
    by_ns: HashMap<&'a str, Vec<usize>>,
    by_id: HashMap<u32, usize>,
    /// Peer selector results, shared by every policy using the same peer.
    selectors: SelectorCache,
}

/// The compile's identities as the selector cache reads them.
struct View<'u, 'a> {
    idents: &'u [Ident<'a>],
    by_ns: &'u HashMap<&'a str, Vec<usize>>,
    by_id: &'u HashMap<u32, usize>,
}

impl selector::Identities for View<'_, '_> {
    fn key(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id).map(|&i| self.idents[i].key)
    }
    fn all(&self) -> impl Iterator<Item = u32> {
        self.idents.iter().map(|x| x.id)
    }
    fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_ns.keys().copied()
    }
    fn in_namespace(&self, ns: &str) -> impl Iterator<Item = (u32, &IdentityKey)> {
        self.by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .map(|&i| (self.idents[i].id, self.idents[i].key))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

/// Everything that determines one endpoint's table in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Spec {
    ingress: bool,
    policies: Vec<usize>,
    /// Ingress: the endpoint's named ports (only when some rule names a port).
    local_ports: Vec<(String, Protocol, u16)>,
}

fn uses_named_ports(rules: &[crate::model::Rule]) -> bool {
    rules.iter().any(|r| {
        r.ports
            .iter()
            .any(|p| matches!(p.port, Some(PortRef::Name(_))))
    })
}

/// Port ranges of numbered ports, plus the named ones left to resolve.
fn split_ports(ports: &[PortSpec]) -> (PortSet, Vec<(&str, Protocol)>) {
    if ports.is_empty() {
        return (PortSet::All, Vec::new());
    }
    let mut ranges = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        let proto = p.protocol.number();
        match &p.port {
            None => ranges.push((proto, 0, u16::MAX)),
            Some(PortRef::Number(n)) => ranges.push((proto, *n, p.end_port.unwrap_or(*n).max(*n))),
            Some(PortRef::Name(name)) => named.push((name.as_str(), p.protocol)),
        }
    }
    (PortSet::from_ranges(ranges), named)
}

fn resolve_named(
    named: &[(&str, Protocol)],
    lookup: impl Fn(&str, Protocol) -> Option<u16>,
) -> PortSet {
    let ranges: Vec<_> = named
        .iter()
        .filter_map(|&(n, p)| lookup(n, p).map(|port| (p.number(), port, port)))
        .collect();
    PortSet::from_ranges(ranges)
}

const ALL_V4: IpNet = IpNet::V4(
    match ipnet::Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 0) {
        Ok(n) => n,
        Err(_) => unreachable!(),
    },
);
const ALL_V6: IpNet = IpNet::V6(
    match ipnet::Ipv6Net::new(std::net::Ipv6Addr::UNSPECIFIED, 0) {
        Ok(n) => n,
        Err(_) => unreachable!(),
    },
);

/// Compiles a snapshot into the content of every policy map. Numbers are taken from and
/// recorded in `state`.
pub fn compile(snap: &Snapshot, state: &mut CompilerState) -> MapContents {
    let mut out = MapContents::default();

    // 1. identities and IPCACHE.
    let mut pod_keys: Vec<(&Pod, IdentityKey)> = Vec::new();
    for pod in snap.pods.values() {
        if !pod.host_network && !pod.ips.is_empty() {
            pod_keys.push((pod, IdentityKey::of(pod)));
        }
    }
    let live: BTreeSet<&IdentityKey> = pod_keys.iter().map(|(_, k)| k).collect();
    state.identities.sync(live.iter().copied());
    let mut idents: Vec<Ident<'_>> = Vec::with_capacity(live.len());
    let mut by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
    for k in &live {
        let Some(id) = state.identities.get(k) else {
            continue;
        };
        by_ns
            .entry(k.namespace.as_str())
            .or_default()
            .push(idents.len());
        idents.push(Ident { id, key: k });
    }
    let mut claims: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
    for (pod, key) in &pod_keys {
        let Some(id) = state.identities.get(key) else {
            continue;
        };
        for ip in &pod.ips {
            claims.entry(*ip).or_default().insert(id);
        }
    }
    for (ip, ids) in claims {
        if let Some(id) = sole_identity(ids) {
            out.ipcache.insert(
                IpCacheKey { addr: addr_of(ip) },
                IpCacheValue {
                    identity: id,
                    flags: 0,
                },
            );
        }
    }
    let host = IpCacheValue {
        identity: IDENTITY_HOST,
        flags: 0,
    };
    for ip in &snap.node_addrs {
        out.ipcache.insert(IpCacheKey { addr: addr_of(*ip) }, host);
    }
    // hostNetwork pods use their node's addresses: this node's are in `node_addrs`, other
    // nodes' are outside the cluster's identities (only ipBlocks match them).

    // 2. local endpoints and the policies selecting them.
    let local: Vec<&Pod> = snap
        .pods
        .values()
        .filter(|p| snap.is_local(p) && !p.ips.is_empty())
        .collect();
    let policies: Vec<&NetworkPolicy> = snap.policies.values().collect();
    let index: HashMap<&ObjectKey, usize> = snap
        .policies
        .keys()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    let selecting: Vec<[Vec<usize>; 2]> = local
        .iter()
        .map(|pod| {
            [true, false].map(|ingress| {
                selector::isolating(snap, pod, ingress)
                    .filter_map(|p| index.get(&p.key()).copied())
                    .collect()
            })
        })
        .collect();

    // 3. specs and their tables.
    let by_id = idents.iter().enumerate().map(|(i, x)| (x.id, i)).collect();
    let mut u = Universe {
        idents,
        by_ns,
        by_id,
        selectors: SelectorCache::default(),
    };
    let mut spec_tables: HashMap<Spec, Option<Table>> = HashMap::new();
    let mut ep_specs: Vec<[Option<Spec>; 2]> = Vec::with_capacity(local.len());
    for (li, pod) in local.iter().enumerate() {
        let mut pair: [Option<Spec>; 2] = [None, None];
        for (d, dir) in [Dir::Ingress, Dir::Egress].into_iter().enumerate() {
            let pols = &selecting[li][d];
            if pols.is_empty() {
                continue;
            }
            let ingress = dir == Dir::Ingress;
            let local_ports = if ingress
                && pols
                    .iter()
                    .any(|&pi| uses_named_ports(&policies[pi].ingress))
            {
                let mut v: Vec<_> = IdentityKey::of(pod).named_ports.into_iter().collect();
                v.sort();
                v
            } else {
                Vec::new()
            };
            let spec = Spec {
                ingress,
                policies: pols.clone(),
                local_ports,
            };
            if !spec_tables.contains_key(&spec) {
                let pols: Vec<&NetworkPolicy> =
                    spec.policies.iter().map(|&pi| policies[pi]).collect();
                let view = View {
                    idents: &u.idents,
                    by_ns: &u.by_ns,
                    by_id: &u.by_id,
                };
                let t = table::build(
                    snap,
                    &mut u.selectors,
                    &view,
                    &pols,
                    spec.ingress,
                    &spec.local_ports,
                );
                spec_tables.insert(spec.clone(), t);
            }
            pair[d] = Some(spec);
        }
        ep_specs.push(pair);
    }

    // 4. numbers for policy-sets and port-sets.
    let tables: BTreeSet<&Table> = spec_tables.values().flatten().collect();
    let mut now: BTreeMap<StableSpec, Table> = BTreeMap::new();
    for (spec, t) in &spec_tables {
        if let Some(t) = t {
            let keys = spec.policies.iter().map(|&pi| policies[pi].key()).collect();
            now.insert((spec.ingress, keys, spec.local_ports.clone()), t.clone());
        }
    }
    // A spec whose table changed passes its number on, when nothing else still uses it.
    let mut born: BTreeSet<&Table> = tables
        .iter()
        .copied()
        .filter(|t| state.policy_sets.get(t).is_none())
        .collect();
    for (spec, new) in &now {
        let Some(old) = state.last_tables.get(spec) else {
            continue;
        };
        if old != new
            && !tables.contains(old)
            && born.contains(new)
            && state.policy_sets.get(old).is_some()
        {
            state.policy_sets.rename(old, new.clone());
            born.remove(new);
        }
    }
    state.last_tables = now;
    state.policy_sets.sync(tables.iter().copied());
    let trie_lists: BTreeSet<Vec<(u8, u16, u16)>> = tables
        .iter()
        .flat_map(|t| t.trie_port_lists())
        .map(<[_]>::to_vec)
        .collect();
    state.port_sets.sync(trie_lists.iter());
    let mut keys = Vec::new();
    for r in &trie_lists {
        if let Some(n) = state.port_sets.get(r) {
            keys.clear();
            portset::trie_keys(n, r, &mut keys);
            for k in &keys {
                out.ports.insert(*k, 1);
            }
        }
    }
    for t in &tables {
        let Some(set) = state.policy_sets.get(t) else {
            continue;
        };
        for (id, ps) in &t.rules {
            out.rules.insert(
                RuleKey {
                    policy_set: set,
                    identity: *id,
                },
                state.rule_value(ps),
            );
        }
        for (net, code) in t.cidr_codes() {
            out.cidr_rules
                .insert(cidr_key(set, net), state.code_value(code));
        }
    }

    // 5. endpoints.
    state
        .endpoints
        .sync(local.iter().map(|p| p.key()).collect::<Vec<_>>().iter());
    let mut ep_claims: BTreeMap<EndpointKey, Vec<EndpointValue>> = BTreeMap::new();
    for (li, pod) in local.iter().enumerate() {
        let tables = ep_specs[li].each_ref().map(|s| {
            s.as_ref()
                .map(|s| spec_tables.get(s).and_then(Option::as_ref))
        });
        let v = state.endpoint_value(state.endpoints.get(&pod.key()).unwrap_or(0), tables);
        for ip in &pod.ips {
            ep_claims
                .entry(EndpointKey { addr: addr_of(*ip) })
                .or_default()
                .push(v);
        }
    }
    for (k, claims) in ep_claims {
        if let Some(v) = shared_endpoint(claims) {
            out.endpoints.insert(k, v);
        }
    }
    // 6. every endpoint address is marked in IPCACHE.
    for k in out.endpoints.keys() {
        let key = IpCacheKey { addr: k.addr };
        let v = ipcache_value(out.ipcache.get(&key).copied(), true);
        if let Some(v) = v {
            out.ipcache.insert(key, v);
        }
    }
    out
}

// Two pods claiming one address (a stale pod object, or a forged status): which one really
// has it cannot be known, so neither may get anything the other would not. As a peer the
// address gets no identity when the claimants' identities differ: it is then admitted by
// ipBlocks only, and `decide` applies those to an address whatever its identity, so the
// address gets no more than either pod would (first-by-name would hand the real pod's
// traffic the other's grants). As a local endpoint it gets the claimants' value when they
// agree, else one isolated both ways with no rule: everything denied but the node's own
// traffic (the owner's policies for the impostor's value would open what they close).

/// The identity of an address claimed by pods of `ids`: `None` unless they agree.
pub(crate) fn sole_identity(ids: impl IntoIterator<Item = u32>) -> Option<u32> {
    let mut ids = ids.into_iter();
    let first = ids.next()?;
    ids.all(|id| id == first).then_some(first)
}

/// The `ENDPOINTS` value of an address claimed by local endpoints of these values (in name
/// order; the first one's number names it in events): theirs when they agree, else deny-all.
pub(crate) fn shared_endpoint(
    claims: impl IntoIterator<Item = EndpointValue>,
) -> Option<EndpointValue> {
    let mut claims = claims.into_iter();
    let first = claims.next()?;
    let same = |v: &EndpointValue| {
        EndpointValue {
            endpoint_id: first.endpoint_id,
            ..*v
        } == first
    };
    if claims.all(|v| same(&v)) {
        return Some(first);
    }
    Some(EndpointValue {
        endpoint_id: first.endpoint_id,
        ingress_policy_set: POLICY_SET_EMPTY,
        egress_policy_set: POLICY_SET_EMPTY,
        flags: ep_flags::ISOLATED_INGRESS | ep_flags::ISOLATED_EGRESS,
    })
}

/// An address's `IPCACHE` value from its identity entry (`base`) and whether it is a local
/// endpoint ([`ipc_flags::LOCAL_ENDPOINT`]; with no identity, [`IDENTITY_WORLD`]).
pub(crate) fn ipcache_value(base: Option<IpCacheValue>, local: bool) -> Option<IpCacheValue> {
    if !local {
        return base;
    }
    let mut v = base.unwrap_or(IpCacheValue {
        identity: IDENTITY_WORLD,
        flags: 0,
    });
    v.flags |= ipc_flags::LOCAL_ENDPOINT;
    Some(v)
}

#[cfg(test)]
mod tests;
