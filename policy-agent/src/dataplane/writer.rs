//! Writes a compiled [`MapDiff`] into the kernel maps in an order that never opens traffic
//! mid-way: what a new entry points to is written before the entry that points to it, and
//! removed only after it.
//!
//! Order: ports -> CIDR rules -> identity rules -> ipcache -> endpoints, then deletions in
//! the reverse order. An endpoint moving to a new policy-set thus finds the new set's rules
//! complete when it switches, and the old set's rules disappear only once nothing uses them.
//! An IPCACHE entry marks a local endpoint before its ENDPOINTS entry exists and keeps the
//! mark until that entry is gone.

use crate::compiler::MapDiff;
use crate::dataplane::{DataplaneError, DataplaneMaps};

/// Applies `diff`; stops at the first error (the caller resyncs from a full compile). Then
/// the policy epoch moves, so open connections are judged again under what was written
/// (also after a failure part-way: what was written applies to them too).
pub fn apply(maps: &mut DataplaneMaps, diff: &MapDiff) -> Result<(), DataplaneError> {
    if diff.is_empty() {
        return Ok(());
    }
    let written = write(maps, diff);
    let bumped = maps.bump_policy_epoch();
    written.and(bumped)
}

fn write(maps: &mut DataplaneMaps, diff: &MapDiff) -> Result<(), DataplaneError> {
    for (k, _) in &diff.ports.upserts {
        maps.set_port(*k)?;
    }
    // In one go: a set's new trie enters CIDR_RULES complete, all new sets at once.
    maps.set_cidr_rules(&diff.cidr_rules.upserts)?;
    for (k, v) in &diff.rules.upserts {
        maps.set_rule(*k, *v)?;
    }
    // An address losing its endpoint loses its IPCACHE local mark only after the endpoint
    // is gone (the mark must cover every ENDPOINTS key, see `ipc_flags::LOCAL_ENDPOINT`).
    let gone: std::collections::HashSet<policy_common::Addr> =
        diff.endpoints.deletes.iter().map(|e| e.addr).collect();
    let leaving = |k: &policy_common::IpCacheKey| gone.contains(&k.addr);
    for (k, v) in &diff.ipcache.upserts {
        if !leaving(k) {
            maps.set_ipcache(*k, *v)?;
        }
    }
    // Then one generation bump: no program serves a replaced endpoint from its cache once
    // this returns, before the rules it pointed to go below.
    maps.set_endpoints(&diff.endpoints.upserts, &diff.endpoints.deletes)?;
    for (k, v) in &diff.ipcache.upserts {
        if leaving(k) {
            maps.set_ipcache(*k, *v)?;
        }
    }
    for k in &diff.ipcache.deletes {
        maps.delete_ipcache(k)?;
    }
    for k in &diff.rules.deletes {
        maps.delete_rule(k)?;
    }
    maps.delete_cidr_rules(&diff.cidr_rules.deletes)?;
    for k in &diff.ports.deletes {
        maps.delete_port(*k)?;
    }
    Ok(())
}
