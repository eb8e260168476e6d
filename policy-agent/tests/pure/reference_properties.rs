//! Properties the NetworkPolicy spec implies, checked on the reference evaluator over random
//! clusters (the compiler's generators): they judge the evaluator without trusting its code.

use crate::compiler_common;

use std::net::IpAddr;

use compiler_common::*;
use policy_agent::model::*;
use policy_agent::reference::{Endpoint, allowed};
use proptest::prelude::*;

const PORTS: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 8080),
    (Protocol::Udp, 53),
    (Protocol::Tcp, 1030),
    (Protocol::Sctp, 1050),
    (Protocol::Tcp, 9090),
];

/// Every pod at each of its addresses, and the external hosts.
fn endpoints(snap: &Snapshot) -> Vec<Endpoint> {
    let mut eps: Vec<Endpoint> = snap
        .pods
        .values()
        .flat_map(|p| {
            p.ips.iter().map(|a| Endpoint::Pod {
                key: p.key(),
                addr: *a,
            })
        })
        .collect();
    eps.extend(
        EXTERNAL
            .iter()
            .map(|s| Endpoint::Host(s.parse::<IpAddr>().expect("external"))),
    );
    eps
}

/// Every (src, dst, protocol, port) between endpoints of one family, with its verdict.
fn verdicts(snap: &Snapshot) -> Vec<((Endpoint, Endpoint, Protocol, u16), bool)> {
    let eps = endpoints(snap);
    let mut out = Vec::new();
    for s in &eps {
        for d in &eps {
            if s == d || s.addr().is_ipv6() != d.addr().is_ipv6() {
                continue;
            }
            if matches!((s, d), (Endpoint::Host(_), Endpoint::Host(_))) {
                continue;
            }
            for (proto, port) in PORTS {
                let v = allowed(snap, s, d, proto, port);
                out.push(((s.clone(), d.clone(), proto, port), v));
            }
        }
    }
    out
}

fn allow_all(ns: &str) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: "zz-allow-all".into(),
        pod_selector: LabelSelector::everything(),
        ingress_isolation: true,
        egress_isolation: true,
        ingress: vec![Rule::default()],
        egress: vec![Rule::default()],
        declared: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Policies are additive: removing a rule never admits anything new.
    #[test]
    fn removing_a_rule_never_allows_more(snap in snapshot(8, 5), pick in any::<prop::sample::Index>(), egress in any::<bool>()) {
        prop_assume!(!snap.policies.is_empty());
        let key = snap.policies.keys().nth(pick.index(snap.policies.len())).cloned().expect("key");
        let mut reduced = snap.clone();
        let p = reduced.policies.get_mut(&key).expect("policy");
        let rules = if egress { &mut p.egress } else { &mut p.ingress };
        prop_assume!(!rules.is_empty());
        rules.remove(pick.index(rules.len()));
        let full = verdicts(&snap);
        for ((probe, v_reduced), (_, v_full)) in verdicts(&reduced).iter().zip(full.iter()) {
            prop_assert!(!v_reduced || *v_full, "{probe:?} allowed only without the rule");
        }
    }

    /// Lifting egress isolation (dropping policyType Egress everywhere) never denies more.
    #[test]
    fn dropping_egress_isolation_never_denies_more(snap in snapshot(8, 5)) {
        let mut lifted = snap.clone();
        for p in lifted.policies.values_mut() {
            p.egress_isolation = false;
        }
        for ((probe, v_lifted), (_, v_full)) in verdicts(&lifted).iter().zip(verdicts(&snap).iter()) {
            prop_assert!(*v_lifted || !v_full, "{probe:?} denied once egress is lifted");
        }
    }

    /// A policy admitting everything in both directions in every namespace admits every
    /// connection, whatever else exists (union).
    #[test]
    fn an_allow_all_policy_everywhere_admits_everything(snap in snapshot(8, 5)) {
        let mut open = snap.clone();
        for ns in snap.namespaces.keys() {
            let p = allow_all(ns);
            open.policies.insert(p.key(), p);
        }
        for (probe, v) in verdicts(&open) {
            prop_assert!(v, "{probe:?} denied despite allow-all policies");
        }
    }

    /// Without policies nothing is isolated.
    #[test]
    fn no_policy_admits_everything(snap in snapshot(8, 0)) {
        for (probe, v) in verdicts(&snap) {
            prop_assert!(v, "{probe:?} denied without any policy");
        }
    }

    /// A policy only affects connections of pods it selects: removing one changes verdicts only
    /// for connections whose source or destination is a non-hostNetwork pod of its namespace
    /// selected by its podSelector.
    #[test]
    fn a_policy_only_affects_pods_it_selects(snap in snapshot(8, 5), pick in any::<prop::sample::Index>()) {
        prop_assume!(!snap.policies.is_empty());
        let key = snap.policies.keys().nth(pick.index(snap.policies.len())).cloned().expect("key");
        let policy = snap.policies[&key].clone();
        let mut without = snap.clone();
        without.policies.remove(&key);
        let selected = |ep: &Endpoint| match ep {
            Endpoint::Pod { key, .. } => {
                let pod = &snap.pods[key];
                !pod.host_network && pod.namespace == policy.namespace && policy.pod_selector.matches(&pod.labels)
            }
            Endpoint::Host(_) => false,
        };
        for (((s, d, proto, port), v_with), (_, v_without)) in verdicts(&snap).iter().zip(verdicts(&without).iter()) {
            if v_with != v_without {
                prop_assert!(selected(s) || selected(d), "{s:?} -> {d:?} {proto} {port} changed by an unrelated policy");
            }
        }
    }
}
