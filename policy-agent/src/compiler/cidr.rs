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

use super::portset::PortSet;

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
pub fn table(rules: &[CidrRule]) -> BTreeMap<IpNet, PortSet> {
    let rules: Vec<&CidrRule> = rules.iter().filter(|r| !r.ports.is_empty()).collect();
    let mut prefixes: Vec<IpNet> = Vec::new();
    for r in &rules {
        prefixes.push(r.cidr);
        prefixes.extend(r.except.iter().copied());
    }
    prefixes.sort_unstable_by_key(|p| (p.prefix_len(), *p));
    prefixes.dedup();

    let mut values: Vec<PortSet> = Vec::with_capacity(prefixes.len());
    for p in &prefixes {
        let mut v = PortSet::default();
        for r in &rules {
            if contains(&r.cidr, p) && !r.except.iter().any(|e| contains(e, p)) {
                v.union_with(&r.ports);
            }
        }
        values.push(v);
    }
    let mut out = BTreeMap::new();
    for (i, p) in prefixes.iter().enumerate() {
        if values[i].is_empty() {
            // Sorted by length: the nearest ancestor is the last containing one before i.
            let ancestor_allows = (0..i)
                .rev()
                .find(|&j| prefixes[j].prefix_len() < p.prefix_len() && contains(&prefixes[j], p))
                .is_some_and(|j| !values[j].is_empty());
            if !ancestor_allows {
                continue;
            }
        }
        out.insert(*p, values[i].clone());
    }
    out
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
