//! A connection established before the agent first starts survives the agent starting with
//! a policy that admits it only as replies: the agent seeds its conntrack map from the
//! node's connection table. And the control: the same start without seeding cuts it.
//! Network namespaces, the real `policy-agent standalone` binary, real sockets. Needs root,
//! BPF, namespaces and iptables (to turn on connection tracking in the node namespace):
//! fails without.

use crate::restart_common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use restart_common::{Agent, TempDir, files_under, pod, uninstall, write_manifests};
use serde_json::json;

const A: usize = 0;
const B: usize = 1;
const PORT: u16 = 8080;

/// `app=a` may send nothing but replies: egress isolated, no egress rule.
fn egress_isolated_a() -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "a-no-egress", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]},
    })
}

/// A TCP connection from B to a server on A, established and used both ways; returns
/// (A's end, B's end).
fn established(bed: &Testbed, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let to = SocketAddr::new(bed.hosts[A].ip(false), PORT);
    let b_end = bed.hosts[B]
        .ns
        .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .expect("enter B")
        .expect("B connects to A before the agent runs");
    let (a_end, _) = listener.accept().expect("A accepts");
    for s in [&a_end, &b_end] {
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    (a_end, b_end)
}

/// A sends first (its packet is an egress packet of an egress-isolated pod: it passes only
/// as part of a known connection), then B answers. Whether both arrived.
fn a_speaks_first(a_end: &mut TcpStream, b_end: &mut TcpStream) -> bool {
    let mut buf = [0u8; 5];
    a_end.write_all(b"hello").is_ok()
        && b_end.read_exact(&mut buf).is_ok()
        && &buf == b"hello"
        && b_end.write_all(b"world").is_ok()
        && a_end.read_exact(&mut buf).is_ok()
        && &buf == b"world"
}

#[test]
fn restart_first_start_seeds_conntrack_preexisting_connection_survives() {
    let mut bed = Testbed::new().expect("node namespace");
    bed.add_pod().expect("pod A");
    bed.add_pod().expect("pod B");
    // Connection tracking in the node namespace, as kube-proxy's rules turn it on.
    bed.node
        .exec(
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )
        .expect("iptables conntrack rule in the node namespace");
    let listener = bed.hosts[A]
        .ns
        .enter(|| TcpListener::bind(SocketAddr::new(bed.hosts[A].ip(false), PORT)))
        .expect("enter A")
        .expect("listen on A");
    let b_addr = SocketAddr::new(bed.hosts[B].ip(false), 9000);
    let _b_server = TcpEchoServer::start(&bed.hosts[B].ns, b_addr).expect("server on B");
    let dir = TempDir::new("ctseed");
    let generation = write_manifests(
        &dir.manifests(),
        &[pod(&bed, A, "a"), pod(&bed, B, "b"), egress_isolated_a()],
    );

    // 1. Seeded: the connection made before the first start survives.
    let (mut a1, mut b1) = established(&bed, &listener);
    assert!(
        a_speaks_first(&mut a1, &mut b1),
        "the connection works before the agent"
    );
    let table = bed
        .node
        .exec("cat", &["/proc/net/nf_conntrack"])
        .expect("read the node's table");
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains(&format!("dport={PORT}")) && table.contains("ESTABLISHED"),
        "the node namespace tracks the connection: {table}"
    );
    // The agent's ctnetlink dump sees the same established connections as the text table.
    let mut dumped = bed
        .node
        .enter(policy_agent::dataplane::ctnetlink::dump)
        .expect("enter node")
        .expect("ctnetlink dump");
    let mut parsed = policy_agent::dataplane::ctseed::parse_proc(&table);
    dumped.sort_by_key(|c| format!("{c:?}"));
    parsed.sort_by_key(|c| format!("{c:?}"));
    assert!(
        !dumped.is_empty() && dumped == parsed,
        "netlink {dumped:?} vs /proc {parsed:?}"
    );
    {
        let fs = PrivateBpffs::mount().expect("private bpffs");
        let mut agent = Agent::start(&bed, &dir, &fs, &[], 1);
        let s = agent.wait_generation(&dir.status(), generation, 2);
        assert!(!s.adopted, "a first start: {s:?}");
        assert!(
            std::fs::read_to_string(&agent.log)
                .unwrap_or_default()
                .contains("conntrack seeded"),
            "{}",
            agent.log_tail()
        );
        assert!(
            a_speaks_first(&mut a1, &mut b1),
            "the pre-existing connection was cut: {}",
            agent.log_tail()
        );
        // The policy is enforced: A opens nothing; B still reaches A (replies pass).
        assert!(
            tcp_echo(&bed.hosts[A].ns, b_addr, Duration::from_millis(700)).is_err(),
            "A's new connection must be denied"
        );
        let (mut a2, mut b2) = established(&bed, &listener);
        let mut buf = [0u8; 2];
        assert!(
            b2.write_all(b"hi").is_ok()
                && a2.read_exact(&mut buf).is_ok()
                && a2.write_all(b"ok").is_ok()
                && b2.read_exact(&mut buf).is_ok(),
            "a new connection B -> A works (A's packets are replies)"
        );
        agent.kill9();
        uninstall(&bed, &fs);
        assert!(
            files_under(fs.path()).is_empty(),
            "left pinned: {:?}",
            files_under(fs.path())
        );
    }

    // 2. Control: the same with seeding off cuts a connection made the same way, so the
    // first part passed because of the seeds.
    let (mut a3, mut b3) = established(&bed, &listener);
    assert!(
        a_speaks_first(&mut a3, &mut b3),
        "the second connection works before the agent"
    );
    {
        let fs = PrivateBpffs::mount().expect("private bpffs");
        let mut agent = Agent::start(&bed, &dir, &fs, &["--no-seed-conntrack"], 2);
        agent.wait_generation(&dir.status(), generation, 2);
        let mut buf = [0u8; 5];
        let _ = a3.write_all(b"hello");
        assert!(
            b3.read_exact(&mut buf).is_err(),
            "without seeding, A's first packet of an unknown connection must be dropped: {}",
            agent.log_tail()
        );
        agent.kill9();
        uninstall(&bed, &fs);
    }
}
