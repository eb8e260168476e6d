//! Fitting compiled map contents into the kernel maps' fixed capacities, failing closed.
//!
//! The writer must never apply contents partly (a half-written policy-set could allow what
//! the whole would not, or an endpoint could switch to a set whose rules are missing). When
//! the desired contents do not fit, whole policy-sets are dropped, largest first, and every
//! endpoint using a dropped set is rewritten to deny everything in that direction (isolated,
//! the empty policy-set). Endpoints beyond `ENDPOINTS` capacity are left out, which the
//! kernel also denies (unknown endpoint) once their interface carries the programs.
//! Addresses beyond `IPCACHE` capacity lose their identity: identity rules no longer admit
//! them, so nothing is opened either.

use std::collections::{BTreeMap, BTreeSet};

use policy_common::maps::*;

use crate::compiler::MapContents;

/// Entries each map can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub endpoints: usize,
    pub ipcache: usize,
    pub rules: usize,
    pub cidr_rules: usize,
    pub ports: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            endpoints: MAX_ENDPOINTS as usize,
            ipcache: MAX_IPCACHE as usize,
            rules: MAX_RULES as usize,
            cidr_rules: MAX_CIDR_RULES as usize,
            ports: MAX_PORTS as usize,
        }
    }
}

impl Capacity {
    /// The maps `c` holds more entries of than they can: (map, entries, capacity).
    pub fn overflow(&self, c: &MapContents) -> Vec<(&'static str, usize, usize)> {
        [
            (MAP_ENDPOINTS, c.endpoints.len(), self.endpoints),
            (MAP_IPCACHE, c.ipcache.len(), self.ipcache),
            (MAP_RULES, c.rules.len(), self.rules),
            (MAP_CIDR_RULES, c.cidr_rules.len(), self.cidr_rules),
            (MAP_PORTS, c.ports.len(), self.ports),
        ]
        .into_iter()
        .filter(|(_, n, max)| n > max)
        .collect()
    }
}

/// Contents that fit, and what was given up to get there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    pub contents: MapContents,
    /// Maps the desired contents overflowed: (map, desired entries, capacity).
    pub overflowed: Vec<(&'static str, usize, usize)>,
    /// Policy-sets left out.
    pub dropped_sets: BTreeSet<u32>,
    /// Endpoints denied everything in some direction, or left out, because of it.
    pub failclosed: BTreeSet<EndpointKey>,
}

fn cidr_set(k: &LpmKey<CidrData>) -> u32 {
    u32::from_be(k.data.set_family_be) & !CIDR_FAMILY_V6
}

fn port_set_of(k: &LpmKey<PortData>) -> u32 {
    u32::from_be(k.data.port_set_be)
}

/// Fits `desired` into `cap`. Contents that fit are returned unchanged.
pub fn fit(desired: &MapContents, cap: Capacity) -> Fitted {
    let mut out = Fitted {
        contents: desired.clone(),
        ..Default::default()
    };
    out.overflowed = cap.overflow(&out.contents);
    if out.overflowed.is_empty() {
        return out;
    }
    let c = &mut out.contents;

    // Policy-sets, largest contribution to an overflowing map first.
    loop {
        let (rules_over, cidr_over, ports_over) = (
            c.rules.len() > cap.rules,
            c.cidr_rules.len() > cap.cidr_rules,
            c.ports.len() > cap.ports,
        );
        if !(rules_over || cidr_over || ports_over) {
            break;
        }
        let mut port_set_size: BTreeMap<u32, usize> = BTreeMap::new();
        for k in c.ports.keys() {
            *port_set_size.entry(port_set_of(k)).or_default() += 1;
        }
        let mut weight: BTreeMap<u32, usize> = BTreeMap::new();
        let uses_port_set =
            |v: &RuleValue| (v.flags & rule_flags::PORT_SET != 0).then_some(v.port_set);
        for (k, v) in &c.rules {
            let w = weight.entry(k.policy_set).or_default();
            if rules_over {
                *w += 1;
            }
            if ports_over && let Some(ps) = uses_port_set(v) {
                *w += port_set_size.get(&ps).copied().unwrap_or(0);
            }
        }
        for (k, v) in &c.cidr_rules {
            let w = weight.entry(cidr_set(k)).or_default();
            if cidr_over {
                *w += 1;
            }
            if ports_over && let Some(ps) = uses_port_set(v) {
                *w += port_set_size.get(&ps).copied().unwrap_or(0);
            }
        }
        // Ties: the higher (newer) number goes first, so long-standing sets survive.
        let Some((&set, _)) = weight
            .iter()
            .filter(|(_, w)| **w > 0)
            .max_by_key(|(s, w)| (**w, **s))
        else {
            break;
        };
        c.rules.retain(|k, _| k.policy_set != set);
        c.cidr_rules.retain(|k, _| cidr_set(k) != set);
        out.dropped_sets.insert(set);
        let used: BTreeSet<u32> = c
            .rules
            .values()
            .chain(c.cidr_rules.values())
            .filter_map(uses_port_set)
            .collect();
        c.ports.retain(|k, _| used.contains(&port_set_of(k)));
    }

    // Endpoints on a dropped set: deny everything in that direction.
    for (k, v) in c.endpoints.iter_mut() {
        let mut hit = false;
        if v.flags & ep_flags::ISOLATED_INGRESS != 0
            && out.dropped_sets.contains(&v.ingress_policy_set)
        {
            v.ingress_policy_set = POLICY_SET_EMPTY;
            v.flags &= !(ep_flags::INGRESS_HAS_IDENTITY_RULES | ep_flags::INGRESS_HAS_CIDR_RULES);
            hit = true;
        }
        if v.flags & ep_flags::ISOLATED_EGRESS != 0
            && out.dropped_sets.contains(&v.egress_policy_set)
        {
            v.egress_policy_set = POLICY_SET_EMPTY;
            v.flags &= !(ep_flags::EGRESS_HAS_IDENTITY_RULES | ep_flags::EGRESS_HAS_CIDR_RULES);
            hit = true;
        }
        if hit {
            out.failclosed.insert(*k);
        }
    }

    // Endpoints past capacity: left out (the kernel denies unknown endpoints).
    while c.endpoints.len() > cap.endpoints {
        if let Some((k, _)) = c.endpoints.pop_last() {
            out.failclosed.insert(k);
        }
    }
    // Peer addresses past capacity lose their identity; the node's own entries stay.
    if c.ipcache.len() > cap.ipcache {
        let excess = c.ipcache.len() - cap.ipcache;
        let drop: Vec<IpCacheKey> = c
            .ipcache
            .iter()
            .rev()
            .filter(|(_, v)| v.identity != IDENTITY_HOST)
            .take(excess)
            .map(|(k, _)| *k)
            .collect();
        for k in drop {
            c.ipcache.remove(&k);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::compiler;
    use crate::model::{LabelSelector, NetworkPolicy, Peer, Pod, Rule, Snapshot};

    fn pod(ns: &str, name: &str, ip: &str, app: &str, local: bool) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            ports: vec![],
            host_network: false,
            node: Some(if local { "n1" } else { "n2" }.into()),
        }
    }

    fn allow_from(ns: &str, name: &str, target: &str, from: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector: LabelSelector {
                match_labels: [("app".into(), target.into())].into(),
                ..Default::default()
            },
            ingress_isolation: true,
            egress_isolation: false,
            ingress: vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: None,
                    pods: Some(LabelSelector {
                        match_labels: [("app".into(), from.into())].into(),
                        ..Default::default()
                    }),
                }]),
                ports: vec![],
            }],
            egress: vec![],
            declared: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            node: "n1".into(),
            ..Default::default()
        };
        for p in [
            pod("a", "web", "198.18.0.1", "web", true),
            pod("a", "db", "198.18.0.2", "db", true),
            pod("a", "c1", "198.18.0.3", "c1", false),
            pod("a", "c2", "198.18.0.4", "c2", false),
            pod("a", "c3", "198.18.0.5", "c3", false),
        ] {
            s.pods.insert(p.key(), p);
        }
        // web admits c1 (1 rule); db admits c1, c2, c3 via three policies (3 rules).
        for np in [
            allow_from("a", "web", "web", "c1"),
            allow_from("a", "db1", "db", "c1"),
            allow_from("a", "db2", "db", "c2"),
            allow_from("a", "db3", "db", "c3"),
        ] {
            s.policies.insert(np.key(), np);
        }
        s
    }

    #[test]
    fn contents_that_fit_are_unchanged() {
        let desired = compiler::compile(&snapshot(), &mut compiler::CompilerState::new());
        let f = fit(&desired, Capacity::default());
        assert_eq!(f.contents, desired);
        assert!(f.overflowed.is_empty() && f.failclosed.is_empty());
    }

    #[test]
    fn overflowing_rules_drop_the_largest_set_and_deny_its_endpoints() {
        let desired = compiler::compile(&snapshot(), &mut compiler::CompilerState::new());
        assert_eq!(desired.rules.len(), 4);
        let cap = Capacity {
            rules: 2,
            ..Capacity::default()
        };
        let f = fit(&desired, cap);
        assert_eq!(f.overflowed, vec![(MAP_RULES, 4, 2)]);
        assert!(f.contents.rules.len() <= 2);
        let db: EndpointKey = EndpointKey {
            addr: compiler::addr_of("198.18.0.2".parse().unwrap()),
        };
        let web: EndpointKey = EndpointKey {
            addr: compiler::addr_of("198.18.0.1".parse().unwrap()),
        };
        // db's set (3 rules) went; db now denies all ingress; web keeps its rule.
        assert_eq!(f.failclosed, [db].into());
        let v = f.contents.endpoints[&db];
        assert_eq!(v.ingress_policy_set, POLICY_SET_EMPTY);
        assert_ne!(v.flags & ep_flags::ISOLATED_INGRESS, 0);
        assert_eq!(v.flags & ep_flags::INGRESS_HAS_IDENTITY_RULES, 0);
        assert_eq!(f.contents.endpoints[&web], desired.endpoints[&web]);
        // No rule of a dropped set is left behind.
        assert!(
            f.contents
                .rules
                .keys()
                .all(|k| !f.dropped_sets.contains(&k.policy_set))
        );
    }

    #[test]
    fn endpoints_past_capacity_are_left_out_and_reported() {
        let desired = compiler::compile(&snapshot(), &mut compiler::CompilerState::new());
        let f = fit(
            &desired,
            Capacity {
                endpoints: 1,
                ..Capacity::default()
            },
        );
        assert_eq!(f.contents.endpoints.len(), 1);
        assert_eq!(f.failclosed.len(), 1);
        assert!(
            !f.contents
                .endpoints
                .contains_key(f.failclosed.iter().next().unwrap())
        );
    }
}
