use super::*;
use crate::kernel_model::KernelModel;
use crate::model::{ContainerPort, Namespace, Rule};
use crate::model::{LabelSelector, Peer};
use policy_common::proto;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn snap() -> Snapshot {
    let mut s = Snapshot {
        node: "n1".into(),
        node_addrs: vec![ip("198.18.255.1")],
        ..Default::default()
    };
    for ns in ["a", "b"] {
        let mut l = labels(&[("team", ns)]);
        l.insert("kubernetes.io/metadata.name".into(), ns.into());
        s.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: l,
            },
        );
    }
    let pods = [
        ("a", "web", "web", "198.18.0.1", "n1"),
        ("a", "db", "db", "198.18.0.2", "n1"),
        ("b", "cli", "cli", "198.18.0.3", "n2"),
    ];
    for (ns, name, app, addr, node) in pods {
        s.pods.insert(
            ObjectKey::new(ns, name),
            Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(&[("app", app)]),
                ips: vec![ip(addr)],
                ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                host_network: false,
                node: Some(node.into()),
            },
        );
    }
    s
}

fn policy(ns: &str, name: &str, sel: LabelSelector, ingress: Vec<Rule>) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: sel,
        ingress_isolation: true,
        egress_isolation: false,
        ingress,
        egress: Vec::new(),
        declared: None,
    }
}

fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: Vec::new(),
    }
}

#[test]
fn unselected_pods_are_open_and_no_policy_costs_nothing() {
    let s = snap();
    let m = compile(&s, &mut CompilerState::new());
    assert_eq!(m.endpoints.len(), 2);
    assert!(m.rules.is_empty() && m.cidr_rules.is_empty());
    let k = KernelModel::new(&m);
    assert!(k.allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
}

#[test]
fn named_port_resolves_on_local_pod_for_ingress() {
    let mut s = snap();
    let rule = Rule {
        peers: Some(vec![Peer::Pods {
            namespaces: Some(LabelSelector::everything()),
            pods: None,
        }]),
        ports: vec![PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Name("http".into())),
            end_port: None,
        }],
    };
    let p = policy("a", "p", sel(&[("app", "web")]), vec![rule]);
    s.policies.insert(p.key(), p);
    let m = compile(&s, &mut CompilerState::new());
    let k = KernelModel::new(&m);
    assert!(k.allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 8080));
    assert!(!k.allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
    assert!(!k.allowed(ip("198.18.9.9"), ip("198.18.0.1"), proto::TCP, 8080));
    // The node is always admitted.
    assert!(k.allowed(ip("198.18.255.1"), ip("198.18.0.1"), proto::TCP, 1));
}

#[test]
fn numbers_are_stable_across_recompiles() {
    let mut s = snap();
    let p = policy(
        "a",
        "deny",
        LabelSelector::everything(),
        vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: None,
                pods: Some(sel(&[("app", "web")])),
            }]),
            ports: Vec::new(),
        }],
    );
    s.policies.insert(p.key(), p);
    let mut st = CompilerState::new();
    let m1 = compile(&s, &mut st);
    let mut s2 = s.clone();
    s2.pods.insert(
        ObjectKey::new("b", "new"),
        Pod {
            namespace: "b".into(),
            name: "new".into(),
            labels: labels(&[("app", "new")]),
            ips: vec![ip("198.18.0.9")],
            ports: Vec::new(),
            host_network: false,
            node: Some("n2".into()),
        },
    );
    let m2 = compile(&s2, &mut st);
    let d = MapContents::diff(&m1, &m2);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d.ipcache.upserts.len(), 1);
    let m3 = compile(&s, &mut st);
    assert_eq!(m1, m3);
}

#[test]
fn many_ports_go_to_the_trie() {
    let mut s = snap();
    let ports = (0..6)
        .map(|i| PortSpec {
            protocol: Protocol::Udp,
            port: Some(PortRef::Number(1000 + 10 * i)),
            end_port: Some(1003 + 10 * i),
        })
        .collect();
    let p = policy(
        "a",
        "p",
        LabelSelector::everything(),
        vec![Rule { peers: None, ports }],
    );
    s.policies.insert(p.key(), p);
    let m = compile(&s, &mut CompilerState::new());
    assert!(!m.ports.is_empty());
    let k = KernelModel::new(&m);
    for port in 990..1070u16 {
        let want = (1000..1060).contains(&port) && (port - 1000) % 10 <= 3;
        assert_eq!(
            k.allowed(ip("203.0.113.1"), ip("198.18.0.2"), proto::UDP, port),
            want,
            "{port}"
        );
    }
    assert!(!k.allowed(ip("203.0.113.1"), ip("198.18.0.2"), proto::TCP, 1000));
}

#[test]
fn capacity_is_checked() {
    let mut m = MapContents::default();
    let cap = super::capacity::Capacity::default();
    assert!(cap.overflow(&m).is_empty());
    for i in 0..=MAX_ENDPOINTS {
        let a = Addr::from_v4_octets((0x0a00_0000u32 + i).to_be_bytes());
        m.endpoints
            .insert(EndpointKey { addr: a }, EndpointValue::default());
    }
    assert_eq!(
        cap.overflow(&m),
        vec![(
            MAP_ENDPOINTS,
            MAX_ENDPOINTS as usize + 1,
            MAX_ENDPOINTS as usize
        )]
    );
}

#[test]
fn a_changed_table_keeps_its_number_in_full_recompiles() {
    let mut s = snap();
    let p = policy(
        "a",
        "p",
        sel(&[("app", "db")]),
        vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: Some(LabelSelector::everything()),
                pods: None,
            }]),
            ports: Vec::new(),
        }],
    );
    s.policies.insert(p.key(), p);
    let mut st = CompilerState::new();
    let m1 = compile(&s, &mut st);
    s.pods.insert(
        ObjectKey::new("b", "new"),
        Pod {
            namespace: "b".into(),
            name: "new".into(),
            labels: labels(&[("app", "new")]),
            ips: vec![ip("198.18.0.9")],
            ports: Vec::new(),
            host_network: false,
            node: Some("n2".into()),
        },
    );
    let m2 = compile(&s, &mut st);
    let d = MapContents::diff(&m1, &m2);
    // The new pod's address and one row in the one policy-set: nothing renumbered.
    assert_eq!(
        (d.ipcache.len(), d.rules.upserts.len(), d.len()),
        (1, 1, 2),
        "{d:?}"
    );
}

#[test]
fn every_local_endpoint_and_only_those_are_marked_local_in_ipcache() {
    let mut s = snap();
    s.policies.insert(
        ObjectKey::new("a", "deny"),
        policy("a", "deny", sel(&[("app", "web")]), vec![]),
    );
    let out = compile(&s, &mut CompilerState::new());
    assert!(!out.endpoints.is_empty());
    for k in out.endpoints.keys() {
        let v = out.ipcache[&IpCacheKey { addr: k.addr }];
        assert_ne!(v.flags & ipc_flags::LOCAL_ENDPOINT, 0, "{k:?}");
    }
    for (k, v) in &out.ipcache {
        let local = out.endpoints.contains_key(&EndpointKey { addr: k.addr });
        assert_eq!(v.flags & ipc_flags::LOCAL_ENDPOINT != 0, local, "{k:?}");
    }
    // The remote pod and the node's address are not local endpoints.
    let remote = out.ipcache[&IpCacheKey {
        addr: addr_of(ip("198.18.0.3")),
    }];
    assert_eq!(remote.flags, 0);
    assert!(remote.identity >= IDENTITY_FIRST_POD);
    let node = out.ipcache[&IpCacheKey {
        addr: addr_of(ip("198.18.255.1")),
    }];
    assert_eq!((node.identity, node.flags), (IDENTITY_HOST, 0));
}

/// A pod of `snap()`'s shape: `app` label, one address, on `node`.
fn extra_pod(ns: &str, name: &str, app: &str, addr: &str, node: &str) -> Pod {
    let like = &snap().pods[&ObjectKey::new("a", "web")];
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip(addr)],
        node: Some(node.into()),
        ..like.clone()
    }
}

/// Ingress to `a/web` from `app` pods of any namespace only.
fn web_admits(app: &str) -> NetworkPolicy {
    let rule = Rule {
        peers: Some(vec![Peer::Pods {
            namespaces: Some(LabelSelector::everything()),
            pods: Some(sel(&[("app", app)])),
        }]),
        ports: Vec::new(),
    };
    policy("a", "web-admits", sel(&[("app", "web")]), vec![rule])
}

/// The full compile of `s`, checked against the incremental engine given `added` last, and
/// taking it away again.
fn compile_both_ways(s: &Snapshot, added: &ObjectKey) -> MapContents {
    let mut before = s.clone();
    before.pods.remove(added);
    let mut inc = Engine::new(&before);
    inc.apply(s, &Change::Pod(added.clone()));
    let m = compile(s, &mut inc.numbers().clone());
    assert_eq!(&m, inc.contents());
    inc.apply(&before, &Change::Pod(added.clone()));
    assert_eq!(
        &compile(&before, &mut inc.numbers().clone()),
        inc.contents()
    );
    m
}

#[test]
fn an_address_claimed_by_pods_of_two_identities_has_neither() {
    // b/admin claims cli's address (a stale or forged status): whichever pod is the real
    // one, traffic from the address must not get admin's grants.
    let mut s = snap();
    let p = web_admits("admin");
    s.policies.insert(p.key(), p);
    let admin = extra_pod("b", "admin", "admin", "198.18.0.3", "n2");
    let key = admin.key();
    s.pods.insert(key.clone(), admin);
    let m = compile_both_ways(&s, &key);
    let k = KernelModel::new(&m);
    assert!(!k.allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
    assert!(!m.ipcache.contains_key(&IpCacheKey {
        addr: addr_of(ip("198.18.0.3"))
    }));
    // An ipBlock admits the address whoever claims it, as it admits any address.
    let mut p = web_admits("admin");
    p.ingress.push(Rule {
        peers: Some(vec![Peer::IpBlock {
            cidr: "198.18.0.0/24".parse().expect("net"),
            except: Vec::new(),
        }]),
        ports: Vec::new(),
    });
    s.policies.insert(p.key(), p);
    let m = compile_both_ways(&s, &key);
    assert!(KernelModel::new(&m).allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
}

#[test]
fn an_address_claimed_by_pods_of_one_identity_keeps_it() {
    // Two pods alike (a stale replica): no ambiguity, nothing to take away.
    let mut s = snap();
    let p = web_admits("cli");
    s.policies.insert(p.key(), p);
    let twin = extra_pod("b", "cli-old", "cli", "198.18.0.3", "n2");
    let key = twin.key();
    s.pods.insert(key.clone(), twin);
    let m = compile_both_ways(&s, &key);
    assert!(KernelModel::new(&m).allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
}

#[test]
fn a_local_address_claimed_by_two_pods_denies_all_but_the_node() {
    // a/web is isolated (only cli may connect); a/evil, selected by no policy, claims its
    // address: the address must not become open, nor keep either pod's grants.
    let mut s = snap();
    let p = web_admits("cli");
    s.policies.insert(p.key(), p);
    let evil = extra_pod("a", "evil", "evil", "198.18.0.1", "n1");
    let key = evil.key();
    s.pods.insert(key.clone(), evil);
    let m = compile_both_ways(&s, &key);
    let k = KernelModel::new(&m);
    let web = ip("198.18.0.1");
    assert!(!k.allowed(ip("198.18.9.9"), web, proto::TCP, 80));
    assert!(!k.allowed(ip("198.18.0.3"), web, proto::TCP, 80));
    assert!(!k.allowed(web, ip("198.18.9.9"), proto::TCP, 80));
    assert!(k.allowed(ip("198.18.255.1"), web, proto::TCP, 80));
    // The other local pod is untouched.
    assert!(k.allowed(ip("198.18.9.9"), ip("198.18.0.2"), proto::TCP, 80));
}

#[test]
fn a_local_address_claimed_by_two_alike_pods_keeps_their_policy() {
    let mut s = snap();
    let p = web_admits("cli");
    s.policies.insert(p.key(), p);
    let twin = extra_pod("a", "web-old", "web", "198.18.0.1", "n1");
    let key = twin.key();
    s.pods.insert(key.clone(), twin);
    let m = compile_both_ways(&s, &key);
    let k = KernelModel::new(&m);
    assert!(k.allowed(ip("198.18.0.3"), ip("198.18.0.1"), proto::TCP, 80));
    assert!(!k.allowed(ip("198.18.9.9"), ip("198.18.0.1"), proto::TCP, 80));
}
