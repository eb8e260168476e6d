//! One policy-set's table: what the rules of the policies selecting an endpoint allow, per
//! peer identity (from the selector cache) and per ipBlock prefix. Built here for the full
//! compile and the incremental engine alike; the engine also patches single rows with
//! [`row`] when an identity changes.

use std::collections::{BTreeMap, BTreeSet};

use super::cidr::{self, CidrRule};
use super::portset::PortSet;
use super::selector::{self, Identities, SelectorCache};
use super::{ALL_V4, ALL_V6, IdentityKey, Table, TableData, resolve_named, split_ports};
use crate::model::{NetworkPolicy, Peer, Protocol, Snapshot};

/// The table of `pols` in one direction (`ingress`), for an endpoint whose own named ports
/// are `local_ports` (ingress named ports resolve on them); `None` when it allows nothing.
pub fn build(
    snap: &Snapshot,
    selectors: &mut SelectorCache,
    ids: &impl Identities,
    pols: &[&NetworkPolicy],
    ingress: bool,
    local_ports: &[(String, Protocol, u16)],
) -> Option<Table> {
    let mut candidates: BTreeSet<u32> = BTreeSet::new();
    let mut cidr_rules = Vec::new();
    let mut all_idents = false;
    for pol in pols {
        let list = if ingress { &pol.ingress } else { &pol.egress };
        for rule in list {
            let (numeric, named) = split_ports(&rule.ports);
            let base = if ingress {
                let mut b = numeric;
                b.union_with(&resolve_named(&named, |n, p| local_port(local_ports, n, p)));
                b
            } else {
                numeric
            };
            match &rule.peers {
                None => {
                    // Every address: numbered ports via the catch-all prefixes; egress named
                    // ports resolve on each pod peer (never on non-pod addresses).
                    if !base.is_empty() {
                        for all in [ALL_V4, ALL_V6] {
                            cidr_rules.push(CidrRule {
                                cidr: all,
                                except: Vec::new(),
                                ports: base.clone(),
                            });
                        }
                    }
                    if !ingress && !named.is_empty() {
                        all_idents = true;
                    }
                }
                Some(peers) => {
                    for peer in peers {
                        match peer {
                            Peer::Pods { namespaces, pods } => {
                                let peer = selector::Peer::new(
                                    namespaces.as_ref(),
                                    &pol.namespace,
                                    pods.as_ref(),
                                );
                                candidates.extend(selectors.selected(peer, snap, ids));
                            }
                            Peer::IpBlock { cidr, except } => {
                                if !base.is_empty() {
                                    cidr_rules.push(CidrRule {
                                        cidr: *cidr,
                                        except: except.clone(),
                                        ports: base.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let mut t = TableData {
        rules: BTreeMap::new(),
        cidrs: cidr::table(&cidr_rules),
    };
    let everyone: Vec<u32>;
    let rows: &mut dyn Iterator<Item = u32> = if all_idents {
        everyone = ids.all().collect();
        &mut everyone.iter().copied()
    } else {
        &mut candidates.iter().copied()
    };
    for id in rows {
        let Some(k) = ids.key(id) else {
            continue;
        };
        let r = row(snap, selectors, pols, ingress, local_ports, id, k);
        if !r.is_empty() {
            t.rules.insert(id, r);
        }
    }
    if t.rules.is_empty() && t.cidrs.is_empty() {
        None
    } else {
        Some(Table::new(t))
    }
}

fn local_port(ports: &[(String, Protocol, u16)], name: &str, proto: Protocol) -> Option<u16> {
    ports
        .iter()
        .find(|(n, p, _)| n == name && *p == proto)
        .map(|x| x.2)
}

/// What the rules of `pols` allow towards one identity (its `RULES` row).
#[allow(clippy::too_many_arguments)]
pub fn row(
    snap: &Snapshot,
    selectors: &SelectorCache,
    pols: &[&NetworkPolicy],
    ingress: bool,
    local_ports: &[(String, Protocol, u16)],
    id: u32,
    k: &IdentityKey,
) -> PortSet {
    let mut out = PortSet::default();
    for pol in pols {
        let list = if ingress { &pol.ingress } else { &pol.egress };
        for rule in list {
            let (numeric, named) = split_ports(&rule.ports);
            let matched = match &rule.peers {
                None => {
                    // Numbered ports go through the catch-all prefixes.
                    if !ingress && !named.is_empty() {
                        out.union_with(&resolve_named(&named, |n, p| k.named_port(n, p)));
                    }
                    continue;
                }
                Some(peers) => peers.iter().any(|peer| match peer {
                    Peer::Pods { namespaces, pods } => {
                        // The cache holds every peer of a live spec; a peer it lacks is
                        // decided by the same rule directly.
                        let peer =
                            selector::Peer::new(namespaces.as_ref(), &pol.namespace, pods.as_ref());
                        selectors
                            .contains(peer, id)
                            .unwrap_or_else(|| peer.selects(snap, k))
                    }
                    Peer::IpBlock { .. } => false,
                }),
            };
            if !matched {
                continue;
            }
            out.union_with(&numeric);
            if ingress {
                out.union_with(&resolve_named(&named, |n, p| local_port(local_ports, n, p)));
            } else {
                out.union_with(&resolve_named(&named, |n, p| k.named_port(n, p)));
            }
        }
    }
    out
}

