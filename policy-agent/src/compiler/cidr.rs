//! ipBlock rules of one policy-set as an LPM table that is exact for the union of many
//! `cidr minus except` blocks.
//!
//! Every cidr and every except becomes a prefix; the value of prefix P is the union of the
//! port-sets of the rules whose cidr contains P and none of whose excepts contains P. For an
//! address, the longest such prefix containing it then carries exactly the union of the rules
//! that admit the address (a rule's cidr or except containing the address is in the table and
//! no shorter than the match, so it contains the match too).

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::portset::{PortCode, PortSet};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrRule {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
    pub ports: PortSet,
}

fn contains(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(o), IpNet::V4(i)) => {
            o.prefix_len() <= i.prefix_len() && o.contains(&i.network())
        }
        (IpNet::V6(o), IpNet::V6(i)) => {
            o.prefix_len() <= i.prefix_len() && o.contains(&i.network())
        }
        _ => false,
    }
}

/// The LPM table of a set of ipBlock rules. An empty port-set is a deny entry, kept only
/// where it shadows a shorter allowing prefix.
///
/// The rules that can contain a prefix are those whose cidr is one of its at most 129
/// supernets, found by lookup: the table costs O(prefixes x prefix length), not
/// O(prefixes x rules) (10,000 rules on one pod took seconds).
pub fn table(rules: &[CidrRule]) -> BTreeMap<IpNet, PortSet> {
    let rules: Vec<&CidrRule> = rules.iter().filter(|r| !r.ports.is_empty()).collect();
    let mut by_cidr: BTreeMap<IpNet, Vec<&CidrRule>> = BTreeMap::new();
    let mut prefixes: Vec<IpNet> = Vec::new();
    for r in &rules {
        by_cidr.entry(r.cidr).or_default().push(r);
        prefixes.push(r.cidr);
        prefixes.extend(r.except.iter().copied());
    }
    prefixes.sort_unstable_by_key(|p| (p.prefix_len(), *p));
    prefixes.dedup();

    let mut out: BTreeMap<IpNet, PortSet> = BTreeMap::new();
    // Shortest first: a prefix's nearest ancestor in the table is already decided.
    for p in &prefixes {
        // Gathered, then merged once (a union per rule re-sorts: quadratic under a /16 of
        // hundreds of rules).
        let mut all = false;
        let mut ranges = Vec::new();
        for len in 0..=p.prefix_len() {
            let Some(up) = supernet(p, len) else { continue };
            for r in by_cidr.get(&up).into_iter().flatten() {
                if !r.except.iter().any(|e| contains(e, p)) {
                    match &r.ports {
                        PortSet::All => all = true,
                        PortSet::Ranges(rs) => ranges.extend_from_slice(rs),
                    }
                }
            }
        }
        let v = if all {
            PortSet::All
        } else {
            PortSet::from_ranges(ranges)
        };
        if v.is_empty() {
            let ancestor_allows = (0..p.prefix_len())
                .rev()
                .find_map(|len| out.get(&supernet(p, len)?))
                .is_some_and(|a| !a.is_empty());
            if !ancestor_allows {
                continue;
            }
        }
        out.insert(*p, v);
    }
    out
}

/// `p` shortened to `len` bits.
fn supernet(p: &IpNet, len: u8) -> Option<IpNet> {
    Some(IpNet::new(p.addr(), len).ok()?.trunc())
}

/// How each prefix of an LPM table is written. A prefix whose ports need the trie shares its
/// nearest covering prefix's trie list (or that prefix's whole port-set as a list) when the
/// rest fits inline: narrow rules inside a broad one then cost the broad one's list once,
/// not once each. Prefixes are coded shortest first, so an ancestor's code is known.
pub fn codes(table: &BTreeMap<IpNet, PortSet>) -> BTreeMap<IpNet, PortCode> {
    let mut order: Vec<(&IpNet, &PortSet)> = table.iter().collect();
    order.sort_by_key(|(p, _)| p.prefix_len());
    let mut out: BTreeMap<IpNet, PortCode> = BTreeMap::new();
    for (p, ports) in order {
        let shared = ports.needs_trie().and_then(|_| {
            let a = nearest_ancestor(table, p)?;
            let ancestor_list = out.get(&a).and_then(|c| c.trie.as_deref());
            let ancestor_ports = match &table[&a] {
                PortSet::Ranges(r) if !r.is_empty() => Some(r.as_slice()),
                _ => None,
            };
            [ancestor_list, ancestor_ports]
                .into_iter()
                .flatten()
                .find_map(|base| ports.code_over(base))
        });
        out.insert(*p, shared.unwrap_or_else(|| ports.code()));
    }
    out
}

/// The longest prefix of `table` strictly containing `p`.
fn nearest_ancestor(table: &BTreeMap<IpNet, PortSet>, p: &IpNet) -> Option<IpNet> {
    (0..p.prefix_len())
        .rev()
        .find_map(|len| supernet(p, len).filter(|up| table.contains_key(up)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn lookup(t: &BTreeMap<IpNet, PortSet>, a: std::net::IpAddr) -> Option<&PortSet> {
        t.iter()
            .filter(|(p, _)| p.contains(&a))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, v)| v)
    }

    /// Many /32 rules of one port inside a /16 rule of many: each /32 shares the /16's trie
    /// list and keeps its own port inline, and every address still gets exactly its union.
    #[test]
    fn narrow_rules_inside_a_broad_one_share_its_trie_list() {
        let broad =
            PortSet::from_ranges((0..50).map(|i| (6, 2000 + 3 * i, 2000 + 3 * i)).collect());
        let mut rules = vec![CidrRule {
            cidr: n("198.18.0.0/16"),
            except: vec![],
            ports: broad.clone(),
        }];
        for i in 0..200u16 {
            rules.push(CidrRule {
                cidr: n(&format!("198.18.{}.{}/32", i / 100, i % 100)),
                except: vec![],
                ports: PortSet::from_ranges(vec![(6, 80 + i % 3, 80 + i % 3)]),
            });
        }
        // A /24 of six more ports: its own rest does not fit inline, so it gets its own list.
        rules.push(CidrRule {
            cidr: n("198.18.7.0/24"),
            except: vec![],
            ports: PortSet::from_ranges((0..6).map(|i| (17, 100 + 2 * i, 100 + 2 * i)).collect()),
        });
        rules.push(CidrRule {
            cidr: n("198.18.7.9/32"),
            except: vec![],
            ports: PortSet::from_ranges(vec![(6, 81, 81)]),
        });
        let t = table(&rules);
        let c = codes(&t);
        let lists: std::collections::BTreeSet<&Vec<(u8, u16, u16)>> =
            c.values().filter_map(|c| c.trie.as_ref()).collect();
        assert_eq!(lists.len(), 2, "the /16's list and the /24's");
        for (p, code) in &c {
            // The code admits exactly the prefix's port-set.
            let mut union = PortSet::from_ranges(code.inline.clone());
            if let Some(l) = &code.trie {
                union.union_with(&PortSet::from_ranges(l.clone()));
            }
            assert_eq!(&union, &t[p], "{p}");
            assert!(
                code.inline.len() <= policy_common::maps::INLINE_PORT_RANGES,
                "{p}"
            );
        }
        assert_eq!(c[&n("198.18.0.5/32")].inline, vec![(6, 82, 82)]);
        assert_eq!(c[&n("198.18.7.9/32")].trie, c[&n("198.18.7.0/24")].trie);
    }

    #[test]
    fn overlapping_blocks_with_excepts() {
        let tcp80 = PortSet::from_ranges(vec![(6, 80, 80)]);
        let udp53 = PortSet::from_ranges(vec![(17, 53, 53)]);
        let t = table(&[
            CidrRule {
                cidr: n("198.18.0.0/16"),
                except: vec![n("198.18.1.0/24")],
                ports: tcp80.clone(),
            },
            CidrRule {
                cidr: n("198.18.1.0/25"),
                except: vec![n("198.18.1.0/26")],
                ports: udp53.clone(),
            },
        ]);
        let at = |s: &str| {
            lookup(&t, s.parse().expect("ip"))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(at("198.18.0.1"), tcp80);
        assert_eq!(at("198.18.1.1"), PortSet::default());
        assert_eq!(at("198.18.1.65"), udp53);
        assert_eq!(at("198.18.1.200"), PortSet::default());
        assert_eq!(at("198.19.0.1"), PortSet::default());
    }
}
