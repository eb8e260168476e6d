//! The agent keeping programs on the right interfaces: a veth whose pod is not known yet is
//! an uplink (`--uplink auto`); once its pod appears it carries the pod programs and only
//! those (attached before the uplink pair goes, so never bare), with the pod's addresses
//! bound to it. Real agent (standalone) in namespaces. Needs root, BPF and namespaces:
//! fails without them.

use crate::restart_common;

use std::path::Path;
use std::time::Duration;

use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use restart_common::{Agent, TempDir, pod, write_manifests};

/// The program pins under the interface's link directory.
fn pinned_programs(fs: &Path, iface: &str, ifindex: u32) -> Vec<String> {
    let dir = fs.join("links").join(format!("{iface}@{ifindex}"));
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_veth_whose_pod_appears_changes_role_from_uplink_to_pod() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    let a = bed.add_pod().expect("pod a");
    let b = bed.add_pod().expect("pod b");
    let dir = TempDir::new("roles");
    let fs = PrivateBpffs::mount().expect("private bpffs");
    // Only b is known: a's veth is just another interface of the node.
    let first = write_manifests(&dir.manifests(), &[pod(&bed, b, "b")]);
    let mut agent = Agent::start(&bed, &dir, &fs, &[], 0);
    let s = agent.wait_generation(&dir.status(), first, 1);
    let a_if = bed.hosts[a].host_if.clone();
    let a_idx = bed.host_ifindex(a).expect("ifindex");
    assert!(
        s.uplinks.contains(&a_if),
        "a's veth is an uplink first: {s:?}"
    );
    assert_eq!(
        pinned_programs(fs.path(), &a_if, a_idx),
        ["from_world", "to_world"]
    );

    // a appears: its veth becomes a pod's.
    let second = write_manifests(&dir.manifests(), &[pod(&bed, a, "a"), pod(&bed, b, "b")]);
    let s = agent.wait_generation(&dir.status(), second, 2);
    assert!(
        s.attached.contains(&a_if) && !s.uplinks.contains(&a_if),
        "{s:?}"
    );
    assert_eq!(
        pinned_programs(fs.path(), &a_if, a_idx),
        ["from_pod", "to_pod"],
        "the uplink pair is gone, the pod pair stays"
    );
    // a's own packets pass its hook (its addresses are bound to the veth), both families.
    for v6 in [false, true] {
        let to_b = std::net::SocketAddr::new(bed.hosts[b].ip(v6), 8080);
        let _srv = TcpEchoServer::start(&bed.hosts[b].ns, to_b).expect("server");
        tcp_echo(&bed.hosts[a].ns, to_b, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("a reaches b (v6={v6}): {e}"));
    }
}
