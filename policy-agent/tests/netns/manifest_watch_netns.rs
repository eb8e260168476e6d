//! The standalone agent reacts to a change of its manifest directory itself (inotify), not
//! at its next poll: with the poll at 10 s, changes written to the directory and to a
//! subdirectory added later are enforced well within it. (How fast is the latency bench's
//! business; the bound here only separates "at once" from "at the next poll".)

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use serde_json::Value;

use crate::restart_common::{Agent, TempDir, ingress_from, pod, uninstall, write_manifests};

const TCP_PORT: u16 = 8083;
const UDP_PORT: u16 = 9093;
/// Far below the poll: only a reaction to the change itself meets it.
const POLL: Duration = Duration::from_secs(10);
const WITHIN: Duration = Duration::from_secs(2);
const A: usize = 0;
const B: usize = 1;

/// Waits until a connection from A to B succeeds (`open`) or is refused; fails the test
/// after [`WITHIN`] from `since`.
fn expect_path(bed: &Testbed, to_b: SocketAddr, open: bool, since: Instant, what: &str) {
    loop {
        let ok = tcp_echo(&bed.hosts[A].ns, to_b, Duration::from_millis(150)).is_ok();
        if ok == open {
            return;
        }
        assert!(
            since.elapsed() < WITHIN,
            "{what}: the path is still {} {:?} after the write (poll {POLL:?})",
            if ok { "open" } else { "closed" },
            since.elapsed()
        );
    }
}

/// Writes `docs` as one file at `path` atomically (a dot temporary, then a rename).
fn write_file(path: &Path, docs: &[Value]) {
    let text: Vec<String> = docs.iter().map(Value::to_string).collect();
    let tmp = path.with_file_name(".incoming.tmp");
    std::fs::write(&tmp, text.join("\n---\n")).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn a_change_written_to_the_manifest_directory_is_enforced_long_before_the_next_poll() {
    let mut bed = Testbed::new().expect("node namespace (needs root)");
    bed.add_pod().expect("pod a");
    bed.add_pod().expect("pod b");
    let to_b = SocketAddr::new(bed.hosts[B].ip(false), TCP_PORT);
    let _server = TcpEchoServer::start(&bed.hosts[B].ns, to_b).expect("server on B");
    let dir = TempDir::new("manifest-watch");
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let pods = [pod(&bed, A, "a"), pod(&bed, B, "b")];
    let with = |policy: Value| [pods[0].clone(), pods[1].clone(), policy];
    let generation = write_manifests(
        &dir.manifests(),
        &with(ingress_from("b-in", "b", "a", TCP_PORT, UDP_PORT)),
    );
    let mut agent = Agent::start_polling(&bed, &dir, &fs, POLL, 0);
    agent.wait_generation(&dir.status(), generation, 2);
    expect_path(&bed, to_b, true, Instant::now(), "admitted at start");

    // A rewrite of the file (temp + rename) that refuses A.
    let t = Instant::now();
    write_manifests(
        &dir.manifests(),
        &with(ingress_from("b-in", "b", "c", TCP_PORT, UDP_PORT)),
    );
    expect_path(&bed, to_b, false, t, "refused by a rewrite");

    // A subdirectory moved into place, holding a second policy that admits A again.
    let t = Instant::now();
    let staged = dir.manifests().join(".staged");
    std::fs::create_dir(&staged).expect("staging dir");
    write_file(
        &staged.join("extra.yaml"),
        &[ingress_from("b-in-2", "b", "a", TCP_PORT, UDP_PORT)],
    );
    let sub = dir.manifests().join("more");
    std::fs::rename(&staged, &sub).expect("move the subdirectory in");
    expect_path(&bed, to_b, true, t, "admitted by a new subdirectory");

    // A change inside that subdirectory (watched since it appeared).
    let t = Instant::now();
    write_file(
        &sub.join("extra.yaml"),
        &[ingress_from("b-in-2", "b", "c", TCP_PORT, UDP_PORT)],
    );
    expect_path(
        &bed,
        to_b,
        false,
        t,
        "refused by a change in the subdirectory",
    );

    // A file deleted: with cluster.yaml holding no policy, the subdirectory's is the only
    // one isolating B; deleting it opens the path.
    let generation = write_manifests(&dir.manifests(), &pods);
    agent.wait_generation(&dir.status(), generation, 2);
    let t = Instant::now();
    std::fs::remove_file(sub.join("extra.yaml")).expect("delete");
    expect_path(&bed, to_b, true, t, "a deleted file");
    drop(agent);
    uninstall(&bed, &fs);
}
