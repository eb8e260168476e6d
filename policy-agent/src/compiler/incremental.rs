//! The incremental compiler: keeps the derived state of the last compile (identities, local
//! endpoints, policy-set specs and their tables, reference counts) and turns one change of
//! the snapshot into the map diff it causes, touching only what the change reaches.
//!
//! Its output equals [`super::compile`] of the same snapshot with the same numbering (the
//! property tests check this on random change sequences). Both decide selection through
//! [`super::selector`] and build tables with [`super::table`]; what is the engine's own is
//! knowing what a change reaches: the selector cache kept current, the specs and rows to
//! redo, the numbers to pass on. A table that changes in place
//! keeps its policy-set number, so e.g. a new peer pod adds one `RULES` entry per policy-set
//! that admits it instead of rewriting the sets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use policy_common::maps::*;

use super::portset::{self, PortSet};
use super::selector::{self, SelectorCache};
use super::table;
use super::{
    CompilerState, IdentityKey, MapChanges, MapContents, MapDiff, Table, TableData, addr_of,
    cidr_key, uses_named_ports,
};
use crate::model::{LabelSelector, NetworkPolicy, ObjectKey, Peer, Pod, Protocol, Snapshot};

/// One change of the snapshot, named by the object it concerns (the snapshot passed with it
/// holds the object's new version, or lacks it when deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Pod(ObjectKey),
    Namespace(String),
    Policy(ObjectKey),
    /// `node_addrs` changed.
    NodeAddrs,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Spec {
    ingress: bool,
    policies: Vec<ObjectKey>,
    local_ports: Vec<(String, Protocol, u16)>,
}

#[derive(Clone, Debug)]
struct SpecEntry {
    table: Option<Table>,
    eps: BTreeSet<ObjectKey>,
}

#[derive(Clone, Debug)]
struct Ep {
    ips: Vec<IpAddr>,
    specs: [Option<Spec>; 2],
}

/// Records the old value of every key touched during one change, to emit the exact diff.
struct Tracker<K, V> {
    old: BTreeMap<K, Option<V>>,
}

impl<K: Ord + Copy, V: Copy + PartialEq> Tracker<K, V> {
    fn new() -> Self {
        Tracker {
            old: BTreeMap::new(),
        }
    }
    fn set(&mut self, map: &mut BTreeMap<K, V>, k: K, v: Option<V>) {
        let prev = match v {
            Some(v) => map.insert(k, v),
            None => map.remove(&k),
        };
        self.old.entry(k).or_insert(prev);
    }
    fn finish(self, map: &BTreeMap<K, V>) -> MapChanges<K, V> {
        let mut c = MapChanges::default();
        for (k, old) in self.old {
            let new = map.get(&k).copied();
            if new != old {
                match new {
                    Some(v) => c.upserts.push((k, v)),
                    None => c.deletes.push(k),
                }
            }
        }
        c
    }
}

/// The stateful compiler.
#[derive(Clone, Debug)]
pub struct Engine {
    node: String,
    node_addrs: BTreeSet<IpAddr>,
    numbers: CompilerState,
    contents: MapContents,
    pod_ident: HashMap<ObjectKey, (u32, Vec<IpAddr>)>,
    ident_refs: HashMap<u32, usize>,
    ident_key: BTreeMap<u32, IdentityKey>,
    ident_by_ns: HashMap<String, BTreeSet<u32>>,
    ip_owners: HashMap<IpAddr, BTreeMap<ObjectKey, u32>>,
    eps: BTreeMap<ObjectKey, Ep>,
    eps_by_ns: HashMap<String, BTreeSet<ObjectKey>>,
    ep_ip_owners: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    specs: HashMap<Spec, SpecEntry>,
    specs_by_policy: HashMap<ObjectKey, HashSet<Spec>>,
    table_refs: BTreeMap<Table, usize>,
    set_tables: BTreeMap<u32, Table>,
    portset_refs: BTreeMap<Vec<(u8, u16, u16)>, usize>,
    /// Which identities each peer of a live spec's policies selects.
    selectors: SelectorCache,
}

/// The engine's identities as the selector cache reads them.
struct View<'e> {
    key: &'e BTreeMap<u32, IdentityKey>,
    by_ns: &'e HashMap<String, BTreeSet<u32>>,
}

impl selector::Identities for View<'_> {
    fn key(&self, id: u32) -> Option<&IdentityKey> {
        self.key.get(&id)
    }
    fn all(&self) -> impl Iterator<Item = u32> {
        self.key.keys().copied()
    }
    fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_ns.keys().map(String::as_str)
    }
    fn in_namespace(&self, ns: &str) -> impl Iterator<Item = (u32, &IdentityKey)> {
        self.by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|id| self.key.get(id).map(|k| (*id, k)))
    }
}

impl Engine {
    /// An engine holding `snap` compiled.
    pub fn new(snap: &Snapshot) -> Engine {
        let mut e = Engine {
            node: snap.node.clone(),
            node_addrs: BTreeSet::new(),
            numbers: CompilerState::new(),
            contents: MapContents::default(),
            pod_ident: HashMap::new(),
            ident_refs: HashMap::new(),
            ident_key: BTreeMap::new(),
            ident_by_ns: HashMap::new(),
            ip_owners: HashMap::new(),
            eps: BTreeMap::new(),
            eps_by_ns: HashMap::new(),
            ep_ip_owners: HashMap::new(),
            specs: HashMap::new(),
            specs_by_policy: HashMap::new(),
            table_refs: BTreeMap::new(),
            set_tables: BTreeMap::new(),
            portset_refs: BTreeMap::new(),
            selectors: SelectorCache::default(),
        };
        let mut changes = vec![Change::NodeAddrs];
        changes.extend(snap.pods.keys().cloned().map(Change::Pod));
        changes.extend(snap.policies.keys().cloned().map(Change::Policy));
        e.apply_all(snap, &changes);
        e
    }

    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// The numbering in use (a full [`super::compile`] with a clone of it yields
    /// [`Engine::contents`]).
    pub fn numbers(&self) -> &CompilerState {
        &self.numbers
    }

    /// Applies one change; `snap` is the snapshot after it.
    pub fn apply(&mut self, snap: &Snapshot, change: &Change) -> MapDiff {
        self.apply_all(snap, std::slice::from_ref(change))
    }

    /// Applies several changes at once; `snap` is the snapshot after all of them.
    pub fn apply_all(&mut self, snap: &Snapshot, changes: &[Change]) -> MapDiff {
        if snap.node != self.node {
            // Another node: nothing carries over.
            let fresh = Engine::new(snap);
            let diff = MapContents::diff(&self.contents, &fresh.contents);
            *self = fresh;
            return diff;
        }
        let mut w = Work::default();
        for c in changes {
            match c {
                Change::Pod(k) => self.pod_changed(snap, k, &mut w),
                Change::Namespace(n) => {
                    if let Some(ids) = self.ident_by_ns.get(n) {
                        w.idents_changed.extend(ids.iter().copied());
                    }
                }
                Change::Policy(k) => {
                    w.policies_changed.insert(k.clone());
                    if let Some(eps) = self.eps_by_ns.get(&k.namespace) {
                        w.dirty_eps.extend(eps.iter().cloned());
                    }
                }
                Change::NodeAddrs => {
                    w.ips.extend(self.node_addrs.iter().copied());
                    self.node_addrs = snap.node_addrs.iter().copied().collect();
                    w.ips.extend(self.node_addrs.iter().copied());
                }
            }
        }
        self.propagate(snap, w)
    }

    fn pod_changed(&mut self, snap: &Snapshot, key: &ObjectKey, w: &mut Work) {
        let pod = snap.pods.get(key);
        // Identity.
        let new_ident = pod
            .filter(|p| !p.host_network && !p.ips.is_empty())
            .map(IdentityKey::of);
        let old = self.pod_ident.remove(key);
        if let Some((id, ips)) = &old {
            for ip in ips {
                if let Some(o) = self.ip_owners.get_mut(ip) {
                    o.remove(key);
                    if o.is_empty() {
                        self.ip_owners.remove(ip);
                    }
                }
                w.ips.insert(*ip);
            }
            let same = new_ident
                .as_ref()
                .is_some_and(|k| self.ident_key.get(id) == Some(k));
            if !same {
                self.release_ident(*id, w);
            }
        }
        if let (Some(p), Some(k)) = (pod, new_ident) {
            let id = match old
                .as_ref()
                .filter(|(id, _)| self.ident_key.get(id) == Some(&k))
            {
                Some((id, _)) => *id,
                None => match self.acquire_ident(&k, w) {
                    Some(id) => id,
                    None => return,
                },
            };
            for ip in &p.ips {
                self.ip_owners
                    .entry(*ip)
                    .or_default()
                    .insert(key.clone(), id);
                w.ips.insert(*ip);
            }
            self.pod_ident.insert(key.clone(), (id, p.ips.clone()));
        }
        // Local endpoint.
        let local = pod.filter(|p| snap.is_local(p) && !p.ips.is_empty());
        let old_ep = self.eps.remove(key);
        if let Some(ep) = &old_ep {
            for ip in &ep.ips {
                if let Some(o) = self.ep_ip_owners.get_mut(ip) {
                    o.remove(key);
                    if o.is_empty() {
                        self.ep_ip_owners.remove(ip);
                    }
                }
                w.ep_ips.insert(*ip);
            }
            if let Some(s) = self.eps_by_ns.get_mut(&key.namespace) {
                s.remove(key);
            }
        }
        match local {
            Some(p) => {
                for ip in &p.ips {
                    self.ep_ip_owners
                        .entry(*ip)
                        .or_default()
                        .insert(key.clone());
                    w.ep_ips.insert(*ip);
                }
                self.eps_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(key.clone());
                let specs = old_ep.map(|e| e.specs).unwrap_or_default();
                self.eps.insert(
                    key.clone(),
                    Ep {
                        ips: p.ips.clone(),
                        specs,
                    },
                );
                self.numbers.endpoints.insert(key);
                w.dirty_eps.insert(key.clone());
            }
            None => {
                if let Some(ep) = old_ep {
                    for (d, s) in ep.specs.into_iter().enumerate() {
                        if let Some(s) = s {
                            self.unref_spec(&s, key, d, w);
                        }
                    }
                    self.numbers.endpoints.remove(key);
                }
            }
        }
    }

    fn release_ident(&mut self, id: u32, w: &mut Work) {
        let Some(r) = self.ident_refs.get_mut(&id) else {
            return;
        };
        *r -= 1;
        if *r > 0 {
            return;
        }
        self.ident_refs.remove(&id);
        if let Some(k) = self.ident_key.remove(&id) {
            if let Some(s) = self.ident_by_ns.get_mut(&k.namespace) {
                s.remove(&id);
            }
            self.numbers.identities.remove(&k);
        }
        w.idents_changed.insert(id);
    }

    fn acquire_ident(&mut self, k: &IdentityKey, w: &mut Work) -> Option<u32> {
        let id = self.numbers.identities.insert(k)?;
        let r = self.ident_refs.entry(id).or_insert(0);
        *r += 1;
        if *r == 1 {
            self.ident_key.insert(id, k.clone());
            self.ident_by_ns
                .entry(k.namespace.clone())
                .or_default()
                .insert(id);
            w.idents_changed.insert(id);
        }
        Some(id)
    }

    fn unref_spec(&mut self, s: &Spec, ep: &ObjectKey, _dir: usize, w: &mut Work) {
        let Some(e) = self.specs.get_mut(s) else {
            return;
        };
        e.eps.remove(ep);
        if !e.eps.is_empty() {
            return;
        }
        let e = self.specs.remove(s).expect("present");
        for p in &s.policies {
            if let Some(set) = self.specs_by_policy.get_mut(p) {
                set.remove(s);
                if set.is_empty() {
                    self.specs_by_policy.remove(p);
                }
            }
        }
        if let Some(t) = e.table {
            self.table_unref(&t, w);
        }
    }

    fn table_unref(&mut self, t: &Table, w: &mut Work) {
        if let Some(r) = self.table_refs.get_mut(t) {
            *r -= 1;
            if *r == 0 {
                w.tables_touched.insert(t.clone());
            }
        }
    }

    fn table_ref(&mut self, t: &Table, w: &mut Work) {
        let r = self.table_refs.entry(t.clone()).or_insert(0);
        *r += 1;
        if *r == 1 {
            w.tables_touched.insert(t.clone());
        }
    }

    fn spec_of(&self, snap: &Snapshot, pod: &Pod, ingress: bool) -> Option<Spec> {
        let policies: Vec<&NetworkPolicy> = selector::isolating(snap, pod, ingress).collect();
        if policies.is_empty() {
            return None;
        }
        let local_ports = if ingress && policies.iter().any(|p| uses_named_ports(&p.ingress)) {
            let mut v: Vec<_> = IdentityKey::of(pod).named_ports.into_iter().collect();
            v.sort();
            v
        } else {
            Vec::new()
        };
        Some(Spec {
            ingress,
            policies: policies.iter().map(|p| p.key()).collect(),
            local_ports,
        })
    }

    fn propagate(&mut self, snap: &Snapshot, mut w: Work) -> MapDiff {
        // 0. Selections first: every table compiled below reads them.
        for &id in &w.idents_changed {
            self.selectors
                .identity_changed(id, self.ident_key.get(&id), snap);
        }
        // 1. Endpoints whose specs may have changed.
        let dirty: Vec<ObjectKey> = w.dirty_eps.iter().cloned().collect();
        for key in &dirty {
            let Some(pod) = snap.pods.get(key) else {
                continue;
            };
            if !self.eps.contains_key(key) {
                continue;
            }
            for d in 0..2 {
                let new = self.spec_of(snap, pod, d == 0);
                let old = self.eps.get(key).and_then(|e| e.specs[d].clone());
                if new == old {
                    continue;
                }
                if let Some(o) = &old {
                    self.unref_spec(o, key, d, &mut w);
                }
                if let Some(n) = &new {
                    if !self.specs.contains_key(n) {
                        let table = self.compile_spec(snap, n);
                        if let Some(t) = &table {
                            self.table_ref(t, &mut w);
                        }
                        for p in &n.policies {
                            self.specs_by_policy
                                .entry(p.clone())
                                .or_default()
                                .insert(n.clone());
                        }
                        self.specs.insert(
                            n.clone(),
                            SpecEntry {
                                table,
                                eps: BTreeSet::new(),
                            },
                        );
                    }
                    if let Some(e) = self.specs.get_mut(n) {
                        e.eps.insert(key.clone());
                    }
                }
                if let Some(ep) = self.eps.get_mut(key) {
                    ep.specs[d] = new;
                }
            }
        }

        // 2. Specs whose policies changed: recompile; specs whose peer identities changed:
        //    patch the identities' rows.
        let mut recompile: BTreeSet<Spec> = BTreeSet::new();
        for p in &w.policies_changed {
            if let Some(set) = self.specs_by_policy.get(p) {
                recompile.extend(set.iter().cloned());
            }
        }
        let patch_ids: Vec<u32> = w.idents_changed.iter().copied().collect();
        let all_specs: Vec<Spec> = if patch_ids.is_empty() {
            recompile.iter().cloned().collect()
        } else {
            self.specs.keys().cloned().collect()
        };
        for s in all_specs {
            let Some(entry) = self.specs.get(&s) else {
                continue;
            };
            let old = &entry.table;
            let new = if recompile.contains(&s) {
                let new = self.compile_spec(snap, &s);
                let old = &self.specs[&s].table;
                if new == *old {
                    continue;
                }
                let old = old.clone();
                self.replace_table(&s, old, new, &mut w);
                continue;
            } else {
                let pols: Vec<&NetworkPolicy> = s
                    .policies
                    .iter()
                    .filter_map(|k| snap.policies.get(k))
                    .collect();
                // Rows first: most specs are untouched by an identity, and then the table is
                // neither cloned nor compared.
                let mut patch: Vec<(u32, Option<PortSet>)> = Vec::new();
                for &id in &patch_ids {
                    let r = self
                        .ident_key
                        .get(&id)
                        .map(|k| table::row(snap, &pols, s.ingress, &s.local_ports, k))
                        .filter(|r| !r.is_empty());
                    if old.as_ref().and_then(|t| t.rules.get(&id)) != r.as_ref() {
                        patch.push((id, r));
                    }
                }
                if patch.is_empty() {
                    continue;
                }
                let mut t: TableData = old.as_ref().map(|t| t.data().clone()).unwrap_or_default();
                for (id, r) in patch {
                    match r {
                        Some(r) => t.rules.insert(id, r),
                        None => t.rules.remove(&id),
                    };
                }
                if t.rules.is_empty() && t.cidrs.is_empty() {
                    None
                } else {
                    Some(Table::new(t))
                }
            };
            if new == *old {
                continue;
            }
            let old = old.clone();
            self.replace_table(&s, old, new, &mut w);
        }

        if !w.policies_changed.is_empty() {
            self.prune_selectors(snap);
        }

        // 3. Policy-set numbers: dead tables free theirs (or pass them to the table they
        //    became), new tables take the lowest free ones in order.
        let mut dead: BTreeSet<Table> = BTreeSet::new();
        let mut born: BTreeSet<Table> = BTreeSet::new();
        for t in std::mem::take(&mut w.tables_touched) {
            match self.table_refs.get(&t).copied() {
                Some(0) => {
                    self.table_refs.remove(&t);
                    if self.numbers.policy_sets.get(&t).is_some() {
                        dead.insert(t);
                    }
                }
                Some(_) if self.numbers.policy_sets.get(&t).is_none() => {
                    born.insert(t);
                }
                _ => {}
            }
        }
        let mut old_tables: BTreeMap<u32, Option<Table>> = BTreeMap::new();
        for (o, n) in &w.transitions {
            if dead.contains(o) && born.contains(n) {
                let num = self.numbers.policy_sets.get(o).expect("numbered");
                self.numbers.policy_sets.rename(o, n.clone());
                dead.remove(o);
                born.remove(n);
                old_tables
                    .entry(num)
                    .or_insert_with(|| self.set_tables.get(&num).cloned());
                self.set_tables.insert(num, n.clone());
            }
        }
        for t in &dead {
            if let Some(num) = self.numbers.policy_sets.get(t) {
                self.numbers.policy_sets.remove(t);
                old_tables
                    .entry(num)
                    .or_insert_with(|| self.set_tables.get(&num).cloned());
                self.set_tables.remove(&num);
            }
        }
        for t in &born {
            if let Some(num) = self.numbers.policy_sets.insert(t) {
                old_tables
                    .entry(num)
                    .or_insert_with(|| self.set_tables.get(&num).cloned());
                self.set_tables.insert(num, t.clone());
            }
        }

        // 4. Port-sets of the tables that changed.
        let mut ports_touched: BTreeSet<Vec<(u8, u16, u16)>> = BTreeSet::new();
        for (num, old) in &old_tables {
            if let Some(t) = old {
                for r in trie_sets(t) {
                    if let Some(c) = self.portset_refs.get_mut(&r) {
                        *c -= 1;
                    }
                    ports_touched.insert(r);
                }
            }
            if let Some(t) = self.set_tables.get(num) {
                for r in trie_sets(t) {
                    *self.portset_refs.entry(r.clone()).or_insert(0) += 1;
                    ports_touched.insert(r);
                }
            }
        }
        let mut ports_tr = Tracker::new();
        let mut keys = Vec::new();
        let mut born_ports = Vec::new();
        for r in &ports_touched {
            let live = self.portset_refs.get(r).copied().unwrap_or(0) > 0;
            let num = self.numbers.port_sets.get(r);
            match (live, num) {
                (false, Some(n)) => {
                    self.portset_refs.remove(r);
                    self.numbers.port_sets.remove(r);
                    keys.clear();
                    portset::trie_keys(n, r, &mut keys);
                    for k in &keys {
                        ports_tr.set(&mut self.contents.ports, *k, None);
                    }
                }
                (true, None) => born_ports.push(r.clone()),
                (false, None) => {
                    self.portset_refs.remove(r);
                }
                (true, Some(_)) => {}
            }
        }
        for r in &born_ports {
            if let Some(n) = self.numbers.port_sets.insert(r) {
                keys.clear();
                portset::trie_keys(n, r, &mut keys);
                for k in &keys {
                    ports_tr.set(&mut self.contents.ports, *k, Some(1));
                }
            }
        }

        // 5. RULES and CIDR_RULES of every policy-set number whose table changed.
        let mut rules_tr = Tracker::new();
        let mut cidr_tr = Tracker::new();
        for (num, old) in &old_tables {
            let new = self.set_tables.get(num);
            if let Some(o) = old {
                for id in o.rules.keys() {
                    if new.is_none_or(|n| !n.rules.contains_key(id)) {
                        rules_tr.set(
                            &mut self.contents.rules,
                            RuleKey {
                                policy_set: *num,
                                identity: *id,
                            },
                            None,
                        );
                    }
                }
                for net in o.cidrs.keys() {
                    if new.is_none_or(|n| !n.cidrs.contains_key(net)) {
                        cidr_tr.set(&mut self.contents.cidr_rules, cidr_key(*num, net), None);
                    }
                }
            }
            if let Some(n) = new {
                for (id, ps) in &n.rules {
                    let v = self.numbers.rule_value(ps);
                    let k = RuleKey {
                        policy_set: *num,
                        identity: *id,
                    };
                    if self.contents.rules.get(&k) != Some(&v) {
                        rules_tr.set(&mut self.contents.rules, k, Some(v));
                    }
                }
                for (net, code) in n.cidr_codes() {
                    let v = self.numbers.code_value(code);
                    let k = cidr_key(*num, net);
                    if self.contents.cidr_rules.get(&k) != Some(&v) {
                        cidr_tr.set(&mut self.contents.cidr_rules, k, Some(v));
                    }
                }
            }
        }

        // 6. ENDPOINTS of every endpoint touched.
        let mut ep_tr = Tracker::new();
        for key in &w.dirty_eps {
            if let Some(ep) = self.eps.get(key) {
                w.ep_ips.extend(ep.ips.iter().copied());
            }
        }
        for ip in &w.ep_ips {
            // Every claimant's value, in name order (see `super::shared_endpoint`).
            let owners = self.ep_ip_owners.get(ip).into_iter().flatten();
            let v = super::shared_endpoint(owners.filter_map(|k| self.endpoint_value(k)));
            ep_tr.set(
                &mut self.contents.endpoints,
                EndpointKey { addr: addr_of(*ip) },
                v,
            );
        }

        // 7. IPCACHE of every address touched (an endpoint's address is marked local).
        let mut ipc_tr = Tracker::new();
        w.ips.extend(w.ep_ips.iter().copied());
        for ip in &w.ips {
            let v = if self.node_addrs.contains(ip) {
                Some(IpCacheValue {
                    identity: IDENTITY_HOST,
                    flags: 0,
                })
            } else {
                self.ip_owners
                    .get(ip)
                    .and_then(|o| super::sole_identity(o.values().copied()))
                    .map(|id| IpCacheValue {
                        identity: id,
                        flags: 0,
                    })
            };
            let local = self
                .contents
                .endpoints
                .contains_key(&EndpointKey { addr: addr_of(*ip) });
            let v = super::ipcache_value(v, local);
            ipc_tr.set(
                &mut self.contents.ipcache,
                IpCacheKey { addr: addr_of(*ip) },
                v,
            );
        }

        MapDiff {
            endpoints: ep_tr.finish(&self.contents.endpoints),
            ipcache: ipc_tr.finish(&self.contents.ipcache),
            rules: rules_tr.finish(&self.contents.rules),
            cidr_rules: cidr_tr.finish(&self.contents.cidr_rules),
            ports: ports_tr.finish(&self.contents.ports),
        }
    }

    fn endpoint_value(&self, key: &ObjectKey) -> Option<EndpointValue> {
        let ep = self.eps.get(key)?;
        let tables = ep.specs.each_ref().map(|s| {
            s.as_ref()
                .map(|s| self.specs.get(s).and_then(|e| e.table.as_ref()))
        });
        Some(
            self.numbers
                .endpoint_value(self.numbers.endpoints.get(key).unwrap_or(0), tables),
        )
    }

    /// The table of a spec from scratch: rows of every candidate identity, and ipBlocks.
    /// Drops the cached peers no live spec's policy holds any more.
    fn prune_selectors(&mut self, snap: &Snapshot) {
        let mut used: HashSet<(Option<&LabelSelector>, &str, Option<&LabelSelector>)> =
            HashSet::new();
        for k in self.specs_by_policy.keys() {
            let Some(pol) = snap.policies.get(k) else {
                continue;
            };
            for rule in pol.ingress.iter().chain(&pol.egress) {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::Pods { namespaces, pods } = peer {
                        let own = if namespaces.is_none() {
                            pol.namespace.as_str()
                        } else {
                            ""
                        };
                        used.insert((namespaces.as_ref(), own, pods.as_ref()));
                    }
                }
            }
        }
        self.selectors.retain(|p| {
            let own = if p.namespaces.is_none() {
                p.policy_ns
            } else {
                ""
            };
            used.contains(&(p.namespaces, own, p.pods))
        });
    }

    /// Spec `s` now has table `new` instead of `old`.
    fn replace_table(&mut self, s: &Spec, old: Option<Table>, new: Option<Table>, w: &mut Work) {
        if let Some(o) = &old {
            self.table_unref(o, w);
        }
        if let Some(n) = &new {
            self.table_ref(n, w);
        }
        if let (Some(o), Some(n)) = (&old, &new) {
            w.transitions.push((o.clone(), n.clone()));
        }
        if let Some(entry) = self.specs.get_mut(s) {
            entry.table = new;
            w.dirty_eps.extend(entry.eps.iter().cloned());
        }
    }

    fn compile_spec(&mut self, snap: &Snapshot, s: &Spec) -> Option<Table> {
        let pols: Vec<&NetworkPolicy> = s
            .policies
            .iter()
            .filter_map(|k| snap.policies.get(k))
            .collect();
        let view = View {
            key: &self.ident_key,
            by_ns: &self.ident_by_ns,
        };
        table::build(
            snap,
            &mut self.selectors,
            &view,
            &pols,
            s.ingress,
            &s.local_ports,
        )
    }
}

#[derive(Default)]
struct Work {
    ips: BTreeSet<IpAddr>,
    ep_ips: BTreeSet<IpAddr>,
    dirty_eps: BTreeSet<ObjectKey>,
    idents_changed: BTreeSet<u32>,
    policies_changed: BTreeSet<ObjectKey>,
    tables_touched: BTreeSet<Table>,
    transitions: Vec<(Table, Table)>,
}

/// The distinct port lists of `t` that need a trie.
fn trie_sets(t: &Table) -> BTreeSet<Vec<(u8, u16, u16)>> {
    t.trie_port_lists().map(<[_]>::to_vec).collect()
}
