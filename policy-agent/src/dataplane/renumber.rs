//! Bringing the kernel maps to a desired state from whatever they hold: read back, diff,
//! write only the difference in the writer's order (never opening traffic mid-way).
//!
//! Two entry points:
//! - [`reconcile_with_kernel`]: the desired contents' numbers are authoritative (the agent's
//!   compiler produced what is in the kernel); repairs drift (an entry lost or changed
//!   behind the agent's back).
//! - [`renumber_with`] keeps the renamings ([`Translation`]) so the incremental engine's later
//!   diffs are written translated, without renumbering whole contents per change.
//! - [`adopt_kernel_state`]: a restarted agent's fresh compiler numbers identities,
//!   policy-sets and port-sets its own way; [`renumber_onto`] first renames the desired
//!   numbers to the ones the kernel already uses for the same content, so an unchanged
//!   policy writes nothing, and a changed table gets a number nothing uses: endpoints switch
//!   to it atomically, once it is complete (never a set edited in place while in use).

use std::collections::{BTreeMap, BTreeSet};

use policy_common::{
    CIDR_FAMILY_V6, CidrData, EndpointValue, IDENTITY_FIRST_POD, LpmKey, MAX_POLICY_SETS,
    POLICY_SET_EMPTY, PortData, RuleKey, RuleValue, rule_flags,
};

use super::{DataplaneError, DataplaneMaps};
use crate::compiler::{MapContents, MapDiff};

/// What a reconcile read and wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileStats {
    /// Policy-map entries found in the kernel.
    pub read: usize,
    pub upserts: usize,
    pub deletes: usize,
}

impl ReconcileStats {
    fn of(read: &MapContents, diff: &MapDiff) -> Self {
        let upserts = diff.endpoints.upserts.len()
            + diff.ipcache.upserts.len()
            + diff.rules.upserts.len()
            + diff.cidr_rules.upserts.len()
            + diff.ports.upserts.len();
        ReconcileStats {
            read: read.sizes().iter().map(|(_, n, _)| n).sum(),
            upserts,
            deletes: diff.len() - upserts,
        }
    }
}

/// Reads the policy maps back, and writes what differs from `desired` (whose numbers are
/// taken as they are) in the ordered way of [`super::writer`]. Contents over a map's
/// capacity are refused before anything is written.
pub fn reconcile_with_kernel(
    maps: &mut DataplaneMaps,
    desired: &MapContents,
) -> Result<ReconcileStats, DataplaneError> {
    check_capacity(desired)?;
    let kernel = maps.read_contents()?;
    let diff = MapContents::diff(&kernel, desired);
    super::writer::apply(maps, &diff)?;
    Ok(ReconcileStats::of(&kernel, &diff))
}

/// Reads the policy maps back, renames `desired`'s numbers onto the kernel's
/// ([`renumber_onto`]) and writes the difference. Returns what the kernel holds now.
pub fn adopt_kernel_state(
    maps: &mut DataplaneMaps,
    desired: &MapContents,
) -> Result<(MapContents, ReconcileStats), DataplaneError> {
    check_capacity(desired)?;
    let kernel = maps.read_contents()?;
    let target = renumber_onto(&kernel, desired);
    let diff = MapContents::diff(&kernel, &target);
    super::writer::apply(maps, &diff)?;
    Ok((target, ReconcileStats::of(&kernel, &diff)))
}

fn check_capacity(desired: &MapContents) -> Result<(), DataplaneError> {
    match crate::compiler::capacity::Capacity::default()
        .overflow(desired)
        .first()
    {
        Some(&(map, entries, capacity)) => Err(DataplaneError::OverCapacity {
            map,
            entries,
            capacity,
        }),
        None => Ok(()),
    }
}

/// `desired` with its identity, policy-set, port-set and endpoint numbers renamed, one to
/// one, so that whatever `current` already holds with the same meaning keeps its number:
/// - a port-set keeps the number of a current port-set with the same entries;
/// - an identity takes the current identity of its addresses (most of them);
/// - a policy-set keeps the number of a current set with the same rows (after the two
///   renamings above), else gets a number `current` does not use;
/// - an endpoint keeps its current endpoint id.
///
/// The renaming is a bijection on each kind of number, so every decision over the result
/// equals the decision over `desired`.
pub fn renumber_onto(current: &MapContents, desired: &MapContents) -> MapContents {
    renumber_with(current, desired).0
}

/// The renamings [`renumber_onto`] chose, kept to translate later diffs in the desired
/// numbering ([`Translation::translate`]): each is one to one, and a number first seen later
/// gets one nothing uses, so translated diffs keep the kernel a renaming of the desired
/// contents without diffing them whole.
pub struct Translation {
    ports: Renaming,
    ids: Renaming,
    sets: Renaming,
    eps: Renaming,
}

impl Translation {
    /// `diff`, taken between two contents of the desired numbering (each number keeping
    /// its meaning, as the incremental engine's diffs do), in the kernel's numbering.
    pub fn translate(&mut self, diff: &MapDiff) -> MapDiff {
        let mut out = MapDiff::default();
        let port_key = |ps: &mut Renaming, k: &LpmKey<PortData>| {
            let mut k = *k;
            k.data.port_set_be = ps.get(u32::from_be(k.data.port_set_be)).to_be();
            k
        };
        for (k, v) in &diff.ports.upserts {
            out.ports.upserts.push((port_key(&mut self.ports, k), *v));
        }
        for k in &diff.ports.deletes {
            out.ports.deletes.push(port_key(&mut self.ports, k));
        }
        let cidr_key = |sets: &mut Renaming, k: &LpmKey<CidrData>| {
            let mut k = *k;
            let (set, fam) = cidr_set(&k.data);
            k.data.set_family_be = (map_set(sets, set) | fam).to_be();
            k
        };
        for (k, v) in &diff.cidr_rules.upserts {
            let k = cidr_key(&mut self.sets, k);
            out.cidr_rules
                .upserts
                .push((k, rename_ports(&mut self.ports, v)));
        }
        for k in &diff.cidr_rules.deletes {
            out.cidr_rules.deletes.push(cidr_key(&mut self.sets, k));
        }
        let rule_key = |sets: &mut Renaming, ids: &mut Renaming, k: &RuleKey| {
            let mut k = *k;
            k.policy_set = map_set(sets, k.policy_set);
            k.identity = map_id(ids, k.identity);
            k
        };
        for (k, v) in &diff.rules.upserts {
            let k = rule_key(&mut self.sets, &mut self.ids, k);
            out.rules
                .upserts
                .push((k, rename_ports(&mut self.ports, v)));
        }
        for k in &diff.rules.deletes {
            out.rules
                .deletes
                .push(rule_key(&mut self.sets, &mut self.ids, k));
        }
        for (k, v) in &diff.ipcache.upserts {
            let mut v = *v;
            v.identity = map_id(&mut self.ids, v.identity);
            out.ipcache.upserts.push((*k, v));
        }
        out.ipcache.deletes = diff.ipcache.deletes.clone();
        for (k, v) in &diff.endpoints.upserts {
            out.endpoints.upserts.push((*k, self.endpoint(v)));
        }
        out.endpoints.deletes = diff.endpoints.deletes.clone();
        out
    }

    fn endpoint(&mut self, v: &EndpointValue) -> EndpointValue {
        let mut v = *v;
        v.endpoint_id = self.eps.get(v.endpoint_id);
        v.ingress_policy_set = map_set(&mut self.sets, v.ingress_policy_set);
        v.egress_policy_set = map_set(&mut self.sets, v.egress_policy_set);
        v
    }
}

fn map_id(ids: &mut Renaming, i: u32) -> u32 {
    if i < IDENTITY_FIRST_POD {
        i
    } else {
        ids.get(i)
    }
}

fn map_set(sets: &mut Renaming, s: u32) -> u32 {
    if s == POLICY_SET_EMPTY {
        s
    } else {
        sets.get(s)
    }
}

/// [`renumber_onto`], and the renamings it chose.
pub fn renumber_with(current: &MapContents, desired: &MapContents) -> (MapContents, Translation) {
    // Port-sets, by content.
    let cur_ports = port_sets(current);
    let want_ports = port_sets(desired);
    let mut by_content: BTreeMap<&Vec<(u32, u8, u16)>, Vec<u32>> = BTreeMap::new();
    for (n, c) in &cur_ports {
        by_content.entry(c).or_default().push(*n);
    }
    let mut ps = Renaming::new(1, u32::MAX, used_port_sets(current));
    for (d, c) in &want_ports {
        if let Some(k) = by_content
            .get(c)
            .and_then(|ks| ks.iter().find(|k| !ps.taken(**k)))
        {
            ps.set(*d, *k);
        }
    }

    // Identities, by the addresses they hold.
    let mut votes: BTreeMap<u32, BTreeMap<u32, usize>> = BTreeMap::new();
    for (k, v) in &desired.ipcache {
        if v.identity < IDENTITY_FIRST_POD {
            continue;
        }
        if let Some(cur) = current.ipcache.get(k)
            && cur.identity >= IDENTITY_FIRST_POD
        {
            *votes
                .entry(v.identity)
                .or_default()
                .entry(cur.identity)
                .or_default() += 1;
        }
    }
    let mut ids = Renaming::new(IDENTITY_FIRST_POD, u32::MAX, used_identities(current));
    for (d, v) in &votes {
        let mut cands: Vec<(usize, u32)> = v.iter().map(|(k, n)| (*n, *k)).collect();
        cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        if let Some((_, k)) = cands.into_iter().find(|(_, k)| !ids.taken(*k)) {
            ids.set(*d, k);
        }
    }

    // Policy-sets, by their rows once identities and port-sets are renamed.
    let renamed_rows = |c: &MapContents, ids: &mut Renaming, ps: &mut Renaming, rename: bool| {
        let mut sets: BTreeMap<u32, SetRows> = BTreeMap::new();
        for (k, v) in &c.rules {
            let (i, v) = if rename {
                (map_id(ids, k.identity), rename_ports(ps, v))
            } else {
                (k.identity, *v)
            };
            sets.entry(k.policy_set).or_default().ids.push((i, v));
        }
        for (k, v) in &c.cidr_rules {
            let (set, fam) = cidr_set(&k.data);
            let v = if rename { rename_ports(ps, v) } else { *v };
            sets.entry(set)
                .or_default()
                .cidrs
                .push((k.prefixlen, fam, k.data.addr, v));
        }
        for e in c.endpoints.values() {
            sets.entry(e.ingress_policy_set).or_default();
            sets.entry(e.egress_policy_set).or_default();
        }
        for s in sets.values_mut() {
            s.ids.sort();
            s.cidrs.sort();
        }
        sets
    };
    let cur_sets = renamed_rows(current, &mut ids, &mut ps, false);
    let want_sets = renamed_rows(desired, &mut ids, &mut ps, true);
    let mut by_rows: BTreeMap<&SetRows, Vec<u32>> = BTreeMap::new();
    for (n, r) in &cur_sets {
        if *n != POLICY_SET_EMPTY {
            by_rows.entry(r).or_default().push(*n);
        }
    }
    let mut sets = Renaming::new(
        POLICY_SET_EMPTY + 1,
        MAX_POLICY_SETS,
        cur_sets.keys().copied().collect(),
    );
    for (d, r) in &want_sets {
        if *d == POLICY_SET_EMPTY {
            continue;
        }
        if let Some(k) = by_rows
            .get(r)
            .and_then(|ks| ks.iter().find(|k| !sets.taken(**k)))
        {
            sets.set(*d, *k);
        }
    }

    // Endpoint ids, by address (names in events and metrics stay stable).
    let mut eps = Renaming::new(
        1,
        u32::MAX,
        current.endpoints.values().map(|v| v.endpoint_id).collect(),
    );
    for (k, v) in &desired.endpoints {
        if let Some(cur) = current.endpoints.get(k)
            && !eps.taken(cur.endpoint_id)
            && !eps.has(v.endpoint_id)
        {
            eps.set(v.endpoint_id, cur.endpoint_id);
        }
    }

    let mut out = MapContents::default();
    for (k, v) in &desired.ports {
        let mut k = *k;
        k.data.port_set_be = ps.get(u32::from_be(k.data.port_set_be)).to_be();
        out.ports.insert(k, *v);
    }
    for (k, v) in &desired.cidr_rules {
        let mut k = *k;
        let (set, fam) = cidr_set(&k.data);
        k.data.set_family_be = (map_set(&mut sets, set) | fam).to_be();
        out.cidr_rules.insert(k, rename_ports(&mut ps, v));
    }
    for (k, v) in &desired.rules {
        let mut k = *k;
        k.policy_set = map_set(&mut sets, k.policy_set);
        k.identity = map_id(&mut ids, k.identity);
        out.rules.insert(k, rename_ports(&mut ps, v));
    }
    for (k, v) in &desired.ipcache {
        let mut v = *v;
        v.identity = map_id(&mut ids, v.identity);
        out.ipcache.insert(*k, v);
    }
    let mut numbering = Translation {
        ports: ps,
        ids,
        sets,
        eps,
    };
    for (k, v) in &desired.endpoints {
        out.endpoints.insert(*k, numbering.endpoint(v));
    }
    (out, numbering)
}

/// A policy-set's rows: identity rules and CIDR rules (prefix length, family bit, address).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct SetRows {
    ids: Vec<(u32, RuleValue)>,
    cidrs: Vec<(u32, u32, policy_common::Addr, RuleValue)>,
}

fn cidr_set(d: &CidrData) -> (u32, u32) {
    let w = u32::from_be(d.set_family_be);
    (w & !CIDR_FAMILY_V6, w & CIDR_FAMILY_V6)
}

fn rename_ports(ps: &mut Renaming, v: &RuleValue) -> RuleValue {
    let mut v = *v;
    if v.flags & rule_flags::PORT_SET != 0 {
        v.port_set = ps.get(v.port_set);
    }
    v
}

/// Port-set number -> its sorted entries (prefix length, protocol, port).
fn port_sets(c: &MapContents) -> BTreeMap<u32, Vec<(u32, u8, u16)>> {
    let mut out: BTreeMap<u32, Vec<(u32, u8, u16)>> = BTreeMap::new();
    for k in c.ports.keys() {
        let LpmKey {
            prefixlen,
            data:
                PortData {
                    port_set_be,
                    proto,
                    port_be,
                    ..
                },
        } = *k;
        out.entry(u32::from_be(port_set_be))
            .or_default()
            .push((prefixlen, proto, port_be));
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

fn used_port_sets(c: &MapContents) -> BTreeSet<u32> {
    let mut s: BTreeSet<u32> = port_sets(c).into_keys().collect();
    for v in c.rules.values().chain(c.cidr_rules.values()) {
        if v.flags & rule_flags::PORT_SET != 0 {
            s.insert(v.port_set);
        }
    }
    s
}

fn used_identities(c: &MapContents) -> BTreeSet<u32> {
    c.ipcache
        .values()
        .map(|v| v.identity)
        .chain(c.rules.keys().map(|k| k.identity))
        .collect()
}

/// A one-to-one renaming of numbers: fixed pairs, and for the others the lowest number in
/// `first..limit` that is neither in use (`avoid`) nor given out.
struct Renaming {
    map: BTreeMap<u32, u32>,
    given: BTreeSet<u32>,
    avoid: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl Renaming {
    fn new(first: u32, limit: u32, avoid: BTreeSet<u32>) -> Self {
        Renaming {
            map: BTreeMap::new(),
            given: BTreeSet::new(),
            avoid,
            next: first,
            limit,
        }
    }
    fn taken(&self, k: u32) -> bool {
        self.given.contains(&k)
    }
    fn has(&self, d: u32) -> bool {
        self.map.contains_key(&d)
    }
    fn set(&mut self, d: u32, k: u32) {
        self.map.insert(d, k);
        self.given.insert(k);
    }
    fn get(&mut self, d: u32) -> u32 {
        if let Some(k) = self.map.get(&d) {
            return *k;
        }
        while self.next < self.limit
            && (self.avoid.contains(&self.next) || self.given.contains(&self.next))
        {
            self.next += 1;
        }
        // Out of numbers (not reachable below the maps' capacities): keep the desired
        // number, which is still one to one with the others left as they are.
        let k = if self.next < self.limit { self.next } else { d };
        self.set(d, k);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::{
        Addr, EndpointKey, EndpointValue, IDENTITY_HOST, IpCacheKey, IpCacheValue, PortRange,
        RuleKey, cidr_prefixlen, ep_flags, proto,
    };

    fn ip(n: u8) -> Addr {
        Addr::from_v4_octets([198, 18, 0, n])
    }

    fn allow_tcp(port: u16) -> RuleValue {
        let mut v = RuleValue::default();
        v.ranges[0] = PortRange {
            first: port,
            last: port,
            proto: proto::TCP,
            _pad: [0; 3],
        };
        v
    }

    /// Pods 1..=3; endpoint 1 ingress set `s1` allows identity `ida` (pod 2) on 80 and a
    /// CIDR; endpoint 3 ingress set `s3` allows identity `idb` (pod 3) via port-set `pset`.
    fn contents(ida: u32, idb: u32, s1: u32, s3: u32, pset: u32, ep: [u32; 2]) -> MapContents {
        let mut c = MapContents::default();
        c.ipcache.insert(
            IpCacheKey { addr: ip(1) },
            IpCacheValue {
                identity: ida,
                flags: 0,
            },
        );
        c.ipcache.insert(
            IpCacheKey { addr: ip(2) },
            IpCacheValue {
                identity: ida,
                flags: 0,
            },
        );
        c.ipcache.insert(
            IpCacheKey { addr: ip(3) },
            IpCacheValue {
                identity: idb,
                flags: 0,
            },
        );
        c.ipcache.insert(
            IpCacheKey { addr: ip(254) },
            IpCacheValue {
                identity: IDENTITY_HOST,
                flags: 0,
            },
        );
        c.rules.insert(
            RuleKey {
                policy_set: s1,
                identity: ida,
            },
            allow_tcp(80),
        );
        c.cidr_rules.insert(
            LpmKey {
                prefixlen: cidr_prefixlen(true, 24),
                data: CidrData::new(s1, Addr::from_v4_octets([198, 19, 0, 0])),
            },
            allow_tcp(443),
        );
        let mut pv = RuleValue {
            flags: rule_flags::PORT_SET,
            port_set: pset,
            ..Default::default()
        };
        pv.ranges[0] = PortRange::default();
        c.rules.insert(
            RuleKey {
                policy_set: s3,
                identity: idb,
            },
            pv,
        );
        for port in [1000u16, 2000, 3000, 4000, 5000] {
            c.ports.insert(
                LpmKey {
                    prefixlen: 64,
                    data: PortData::new(pset, proto::UDP, port),
                },
                1,
            );
        }
        let flags = ep_flags::ISOLATED_INGRESS | ep_flags::INGRESS_HAS_IDENTITY_RULES;
        c.endpoints.insert(
            EndpointKey { addr: ip(1) },
            EndpointValue {
                endpoint_id: ep[0],
                ingress_policy_set: s1,
                egress_policy_set: 0,
                flags: flags | ep_flags::INGRESS_HAS_CIDR_RULES,
            },
        );
        c.endpoints.insert(
            EndpointKey { addr: ip(3) },
            EndpointValue {
                endpoint_id: ep[1],
                ingress_policy_set: s3,
                egress_policy_set: 0,
                flags,
            },
        );
        c
    }

    #[test]
    fn reconcile_renumber_same_meaning_keeps_kernel_numbers() {
        let kernel = contents(300, 301, 5, 6, 9, [7, 8]);
        let fresh = contents(256, 257, 1, 2, 1, [1, 2]);
        assert_eq!(renumber_onto(&kernel, &fresh), kernel);
        assert!(MapContents::diff(&kernel, &renumber_onto(&kernel, &fresh)).is_empty());
    }

    #[test]
    fn reconcile_renumber_swapped_numbers_are_undone() {
        let kernel = contents(256, 257, 1, 2, 1, [1, 2]);
        let fresh = contents(257, 256, 2, 1, 1, [2, 1]);
        assert_eq!(renumber_onto(&kernel, &fresh), kernel);
    }

    #[test]
    fn reconcile_renumber_changed_table_gets_an_unused_number() {
        let kernel = contents(256, 257, 1, 2, 1, [1, 2]);
        let mut fresh = contents(256, 257, 1, 2, 1, [1, 2]);
        // The table of set 1 changes: port 80 -> 81.
        fresh.rules.insert(
            RuleKey {
                policy_set: 1,
                identity: 256,
            },
            allow_tcp(81),
        );
        let out = renumber_onto(&kernel, &fresh);
        let ep1 = out.endpoints[&EndpointKey { addr: ip(1) }];
        assert!(
            ep1.ingress_policy_set != 1 && ep1.ingress_policy_set != 2,
            "{ep1:?}"
        );
        // The unchanged set and everything else keep their numbers.
        assert_eq!(
            out.endpoints[&EndpointKey { addr: ip(3) }],
            kernel.endpoints[&EndpointKey { addr: ip(3) }]
        );
        assert_eq!(out.ipcache, kernel.ipcache);
        // Decisions are those of the desired contents.
        let want = crate::kernel_model::KernelModel::new(&fresh);
        let got = crate::kernel_model::KernelModel::new(&out);
        for port in [80, 81, 443] {
            for src in [2u8, 3] {
                let s = std::net::IpAddr::from([198, 18, 0, src]);
                let d = std::net::IpAddr::from([198, 18, 0, 1]);
                assert_eq!(
                    got.allowed(s, d, proto::TCP, port),
                    want.allowed(s, d, proto::TCP, port)
                );
            }
        }
    }

    #[test]
    fn reconcile_renumber_is_one_to_one_when_identities_merge() {
        // The kernel had pods 1, 2 as identity 256 and pod 3 as 257; now all three share
        // one identity and a new one appears: no two desired numbers may share a number.
        let kernel = contents(256, 257, 1, 2, 1, [1, 2]);
        let fresh = contents(300, 300, 4, 5, 3, [1, 2]);
        let out = renumber_onto(&kernel, &fresh);
        let ids: BTreeSet<u32> = out.ipcache.values().map(|v| v.identity).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(out.rules.len(), fresh.rules.len());
        assert_eq!(out.ports.len(), fresh.ports.len());
    }
}
