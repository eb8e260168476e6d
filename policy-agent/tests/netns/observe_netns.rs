//! `policy-agent status` and `policy-agent monitor` against the real datapath: the
//! standalone agent enforces a deny policy in a namespace test bed, real TCP connections are
//! denied, and the two commands (the real binary, run in the node namespace) must show the
//! endpoint isolated, the deny counted under its reason, and the denied 5-tuple; through the
//! running agent (two monitors at once) and, with the agent killed, straight from the pinned
//! ring (one reader only). Needs root, BPF and namespaces: fails without.

use crate::restart_common;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use policy_agent::observe::event::MonitorEvent;
use policy_agent::observe::status::NodeStatus;
use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use restart_common::{Agent, TempDir, ingress_from, pod, uninstall, write_manifests};

const PORT: u16 = 8080;
const SERVER: usize = 0;
const CLIENT: usize = 1;

/// `policy-agent <args>` in the node namespace, bounded by `timeout(1)`.
fn agent_cmd(bed: &Testbed, args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["60", "ip", "netns", "exec", bed.node.name()])
        .arg(env!("CARGO_BIN_EXE_policy-agent"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    c
}

struct Ctx<'a> {
    bed: &'a Testbed,
    bpf: String,
    dir: &'a TempDir,
}

impl Ctx<'_> {
    fn run(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--bpf-dir", &self.bpf]);
        agent_cmd(self.bed, &all)
            .output()
            .expect("run policy-agent")
    }

    fn status(&self) -> NodeStatus {
        let out = self.run(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not a NodeStatus ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A monitor printing JSON to files: (child, stdout file, stderr file).
    fn monitor(&self, n: u32, extra: &[&str]) -> (Child, PathBuf, PathBuf) {
        let (o, e) = (
            self.dir.0.join(format!("monitor-{n}.out")),
            self.dir.0.join(format!("monitor-{n}.err")),
        );
        let mut args = vec!["monitor", "--json", "--bpf-dir", &self.bpf];
        args.extend(extra);
        let child = agent_cmd(self.bed, &args)
            .env("RUST_LOG", "info")
            .stdout(File::create(&o).expect("out"))
            .stderr(File::create(&e).expect("err"))
            .spawn()
            .expect("start monitor");
        (child, o, e)
    }
}

/// Kills a monitor still running when the test fails.
struct Reap(Vec<Child>);
impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Makes denied connection attempts client -> server until every monitor exited.
fn deny_until_exited(
    bed: &Testbed,
    monitors: &mut [Child],
    to: SocketAddr,
) -> Vec<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: Vec<_> = monitors
            .iter_mut()
            .map(|c| c.try_wait().expect("wait"))
            .collect();
        if done.iter().all(Option::is_some) {
            return done.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "monitors did not report the denied connection in 30 s"
        );
        assert!(
            tcp_echo(&bed.hosts[CLIENT].ns, to, Duration::from_millis(300)).is_err(),
            "the policy must deny client -> server"
        );
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The one JSON line a `--count 1` monitor printed.
fn one_event(out: &Path, err: &Path) -> MonitorEvent {
    let text = read(out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one event expected: {text}\nstderr: {}",
        read(err)
    );
    serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("not a MonitorEvent ({e}): {}", lines[0]))
}

fn assert_denied_tuple(ev: &MonitorEvent, bed: &Testbed) {
    assert_eq!(ev.src, bed.hosts[CLIENT].ipv4.to_string(), "{ev:?}");
    assert_eq!(ev.dst, bed.hosts[SERVER].ipv4.to_string(), "{ev:?}");
    assert_eq!(ev.dst_port, PORT, "{ev:?}");
    assert_ne!(ev.src_port, 0, "{ev:?}");
    assert_eq!(ev.protocol, "tcp", "{ev:?}");
    assert_eq!(
        (ev.direction.as_str(), ev.reason.as_str()),
        ("ingress", "policy"),
        "{ev:?}"
    );
    assert!(
        ev.endpoint.contains(&bed.hosts[SERVER].ipv4.to_string()),
        "{ev:?}"
    );
    assert!(ev.time.ends_with('Z') && ev.time.len() == 27, "{ev:?}");
    assert!(ev.interface.is_some(), "{ev:?}");
}

#[test]
fn observe_status_and_monitor_show_a_real_deny() {
    let mut bed = Testbed::new().expect("test bed (needs root and namespaces)");
    let server = bed.add_pod().expect("pod");
    let client = bed.add_pod().expect("pod");
    assert_eq!((server, client), (SERVER, CLIENT));
    let fs = PrivateBpffs::mount().expect("bpffs (needs root)");
    let dir = TempDir::new("observe");
    let ctx = Ctx {
        bed: &bed,
        bpf: fs.path().display().to_string(),
        dir: &dir,
    };
    let to = SocketAddr::new(bed.hosts[SERVER].ip(false), PORT);
    let _srv = TcpEchoServer::start(&bed.hosts[SERVER].ns, to).expect("echo server");

    // The server admits only app=nobody: the client is denied by policy at ingress.
    let generation = write_manifests(
        &dir.manifests(),
        &[
            pod(&bed, SERVER, "server"),
            pod(&bed, CLIENT, "client"),
            ingress_from("only-nobody", "server", "nobody", PORT, 9090),
        ],
    );
    let mut agent = Agent::start(&bed, &dir, &fs, &[], 1);
    agent.wait_generation(&dir.status(), generation, 2);

    // --- through the agent: two monitors at once both see the whole stream ---
    let t0 = Instant::now();
    while !bed
        .node
        .enter(|| policy_agent::observe::connect(fs.path()).is_ok())
        .expect("enter the node namespace")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no monitor socket: {}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not from the test's own namespace: the socket belongs to the agent's.
    assert!(policy_agent::observe::connect(fs.path()).is_err());
    let (m1, o1, e1) = ctx.monitor(1, &["--count", "1", "--timeout", "30"]);
    let (m2, o2, e2) = ctx.monitor(2, &["--count", "1", "--timeout", "30"]);
    let mut reap = Reap(vec![m1, m2]);
    let exits = deny_until_exited(&bed, &mut reap.0, to);
    for (i, (x, (o, e))) in exits.iter().zip([(&o1, &e1), (&o2, &e2)]).enumerate() {
        assert!(x.success(), "monitor {} failed ({x}): {}", i + 1, read(e));
        assert!(
            read(e).contains("deny events from the agent"),
            "{}",
            read(e)
        );
        assert_denied_tuple(&one_event(o, e), &bed);
    }

    // --- status while the agent runs ---
    let s = ctx.status();
    assert!(s.agent_running);
    assert_eq!(s.endpoint_count, 2, "{s:#?}");
    let ep = |i: usize| {
        let ip = bed.hosts[i].ipv4.to_string();
        s.endpoints
            .iter()
            .find(|e| e.addresses.contains(&ip))
            .unwrap_or_else(|| panic!("no endpoint for {ip}: {s:#?}"))
            .clone()
    };
    let (srv, cli) = (ep(SERVER), ep(CLIENT));
    assert!(srv.isolated_ingress && !srv.isolated_egress, "{srv:?}");
    assert!(!cli.isolated_ingress && !cli.isolated_egress, "{cli:?}");
    assert!(
        srv.addresses.contains(&bed.hosts[SERVER].ipv6.to_string()),
        "{srv:?}"
    );
    assert_eq!(
        srv.interface.as_deref(),
        Some(bed.hosts[SERVER].host_if.as_str())
    );
    let deny = |s: &NodeStatus| {
        s.counters
            .iter()
            .find(|c| {
                (c.direction.as_str(), c.verdict.as_str(), c.reason.as_str())
                    == ("ingress", "deny", "policy")
            })
            .expect("counter")
            .packets
    };
    assert!(deny(&s) > 0, "{:#?}", s.counters);
    let denied_total: u64 = s
        .counters
        .iter()
        .filter(|c| c.verdict == "deny")
        .map(|c| c.packets)
        .sum();
    assert_eq!(
        denied_total,
        deny(&s),
        "only policy denies happened: {:#?}",
        s.counters
    );
    let endpoints = s
        .maps
        .iter()
        .find(|m| m.name == "ENDPOINTS")
        .expect("ENDPOINTS");
    assert_eq!(
        (
            endpoints.kind.as_str(),
            endpoints.entries,
            endpoints.capacity
        ),
        ("hash", Some(4), 16_384)
    );
    assert!(s.maps.iter().all(|m| m.kind != "missing"), "{:#?}", s.maps);
    let cidr = s
        .maps
        .iter()
        .find(|m| m.name == "CIDR_RULES")
        .expect("CIDR_RULES");
    assert_eq!(
        (cidr.kind.as_str(), cidr.entries, cidr.capacity),
        ("lpm_tries", Some(0), policy_common::MAX_CIDR_RULES as u64),
        "no ipBlock in this policy: no trie"
    );
    for name in ["CONNTRACK", "CONNTRACK4"] {
        let ct = s.maps.iter().find(|m| m.name == name).expect(name);
        assert_eq!(
            (ct.kind.as_str(), ct.entries, ct.capacity),
            ("ct_table", Some(0), policy_common::MAX_CONNTRACK as u64),
            "{name}: only denied connections, so none tracked"
        );
    }
    for h in [SERVER, CLIENT] {
        let i = s
            .interfaces
            .iter()
            .find(|i| i.name == bed.hosts[h].host_if)
            .unwrap_or_else(|| panic!("{} not listed: {:#?}", bed.hosts[h].host_if, s.interfaces));
        assert_eq!(i.role, "pod");
        assert_eq!(i.programs, vec!["from_pod", "to_pod"]);
        assert!(i.present);
    }
    let human = ctx.run(&["status"]);
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("ENDPOINTS (2)") && text.contains("agent: running"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["ingress", "deny", "policy", &deny(&s).to_string()]),
        "{text}"
    );

    // --- no agent: the pinned programs keep denying; one monitor reads the ring itself ---
    agent.kill9();
    let (m3, o3, e3) = ctx.monitor(3, &["--count", "1", "--timeout", "30"]);
    reap.0.push(m3);
    let t0 = Instant::now();
    while !read(&e3).contains("reading") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "monitor 3: {}",
            read(&e3)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(read(&e3).contains("no agent running"), "{}", read(&e3));
    // A second direct reader would steal events from the first: refused, naming the holder.
    let busy = ctx.run(&["monitor", "--count", "1", "--timeout", "10"]);
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("is reading the deny events") && !err.contains("panicked"),
        "{err}"
    );
    let m3 = reap.0.pop().expect("m3");
    let mut last = vec![m3];
    let exits = deny_until_exited(&bed, &mut last, to);
    reap.0.extend(last);
    assert!(exits[0].success(), "monitor 3: {}", read(&e3));
    let ev = one_event(&o3, &e3);
    assert_denied_tuple(&ev, &bed);
    eprintln!("status:\n{text}\nmonitor: {}\n{}", ev.line(), ev.json());
    let after = ctx.status();
    assert!(!after.agent_running);
    assert!(deny(&after) > deny(&s), "still counting with no agent");

    // --- a timeout with too few events is a failure ---
    let idle = ctx.run(&["monitor", "--count", "1", "--timeout", "0.5"]);
    assert!(!idle.status.success());
    assert!(String::from_utf8_lossy(&idle.stderr).contains("timed out with 0 of 1 events"));

    uninstall(&bed, &fs);
}

#[test]
fn observe_bad_bpf_dir_is_a_clear_error() {
    let dir = TempDir::new("observe-bad");
    // Needs nothing from the kernel: no namespace either; but a bpffs without pins is the
    // realistic mistake (the default dir on a node where the agent never ran).
    let fs = PrivateBpffs::mount().expect("bpffs (needs root)");
    for (bpf, want) in [
        (fs.path().to_path_buf(), "nothing is pinned under"),
        (dir.0.join("missing"), "nothing is pinned under"),
        (dir.0.clone(), "is not a directory on a bpffs mount"),
    ] {
        for cmd in [
            &["status"][..],
            &["status", "--json"],
            &["monitor", "--count", "1"],
        ] {
            let out = Command::new("timeout")
                .arg("20")
                .arg(env!("CARGO_BIN_EXE_policy-agent"))
                .args(cmd)
                .arg("--bpf-dir")
                .arg(&bpf)
                .env("RUST_BACKTRACE", "0")
                .output()
                .expect("run");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{cmd:?} {}: {err}",
                bpf.display()
            );
            assert!(err.contains(want), "{cmd:?} {}: {err}", bpf.display());
            assert!(!err.contains("panicked"), "{err}");
            assert!(out.stdout.is_empty());
        }
    }
}
