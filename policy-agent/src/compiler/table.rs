//! One policy-set's table: what the rules of the policies selecting an endpoint allow, per
//! peer identity (from the selector cache) and per ipBlock prefix. Built here for the full
//! compile and the incremental engine alike; the engine also patches single rows with
//! [`row`] when an identity changes (deciding peers with the same [`selector::Peer::selects`]).

use std::collections::BTreeMap;

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
    // Rule by rule over the selected identities: each rule's ports are worked out once,
    // not once per identity.
    let mut rules: BTreeMap<u32, PortSet> = BTreeMap::new();
    let mut cidr_rules = Vec::new();
    for pol in pols {
        let list = if ingress { &pol.ingress } else { &pol.egress };
        for rule in list {
            let (numeric, named) = split_ports(&rule.ports);
            // Ingress: names resolve on the endpoint itself, the same for every peer;
            // egress: on each pod peer.
            let (base, per_peer_named) = if ingress {
                let mut b = numeric;
                b.union_with(&resolve_named(&named, |n, p| local_port(local_ports, n, p)));
                (b, false)
            } else {
                (numeric, !named.is_empty())
            };
            let add = |rules: &mut BTreeMap<u32, PortSet>, id: u32, k: &IdentityKey| {
                let mut ps = base.clone();
                if per_peer_named {
                    ps.union_with(&resolve_named(&named, |n, p| k.named_port(n, p)));
                }
                if !ps.is_empty() {
                    rules.entry(id).or_default().union_with(&ps);
                }
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
                    if per_peer_named {
                        for id in ids.all() {
                            if let Some(k) = ids.key(id) {
                                let ps = resolve_named(&named, |n, p| k.named_port(n, p));
                                if !ps.is_empty() {
                                    rules.entry(id).or_default().union_with(&ps);
                                }
                            }
                        }
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
                                for &id in selectors.selected(peer, snap, ids) {
                                    if let Some(k) = ids.key(id) {
                                        add(&mut rules, id, k);
                                    }
                                }
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
    let t = TableData {
        rules,
        cidrs: cidr::table(&cidr_rules),
    };
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
pub fn row(
    snap: &Snapshot,
    pols: &[&NetworkPolicy],
    ingress: bool,
    local_ports: &[(String, Protocol, u16)],
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
                        // One identity: the selection rule itself is cheaper than a lookup
                        // of the cached selection (hashing the selectors), and the same.
                        selector::Peer::new(namespaces.as_ref(), &pol.namespace, pods.as_ref())
                            .selects(snap, k)
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
