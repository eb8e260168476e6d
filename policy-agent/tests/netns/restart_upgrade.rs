//! An upgrade whose maps changed layout meets the old agent's pins: the new agent must see
//! it before loading anything and refuse clearly (fail closed: the attached programs keep
//! enforcing their own maps), never adopt a map of another layout. Needs root and BPF:
//! fails without.

use crate::restart_common;

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::Command;

use policy_agent::dataplane::{Dataplane, DataplaneError, PinState};
use policy_common::{MAP_ENDPOINTS, MAP_PORTS, MAX_ENDPOINTS};
use policy_testkit::testbed::PrivateBpffs;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Creates a hash map of the given layout and pins it at `path` (raw syscalls: aya creates
/// maps only from an object).
fn pin_raw_hash(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, max_entries]);
    // SAFETY: a zeroed bpf_attr with the map-create fields set; its size is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd this test owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut pin = [0u64; 4];
    pin[0] = c.as_ptr() as u64;
    pin[1] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    // SAFETY: a zeroed bpf_attr with pathname and bpf_fd set; `c` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            pin.as_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

#[test]
fn restart_incompatible_pinned_map_is_refused_before_loading() {
    let fs = PrivateBpffs::mount().expect("private bpffs");
    {
        let dp = Dataplane::load(fs.path()).expect("first load creates the pins");
        assert_eq!(dp.pin_state(), PinState::Fresh);
    }
    assert_eq!(
        Dataplane::load(fs.path())
            .expect("same object adopts")
            .pin_state(),
        PinState::Adopted
    );

    // An "old agent" left ENDPOINTS with 8-byte values where this object has 16.
    let endpoints = fs.path().join(MAP_ENDPOINTS);
    std::fs::remove_file(&endpoints).expect("unpin");
    pin_raw_hash(&endpoints, 16, 8, MAX_ENDPOINTS);
    match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(
                detail.contains("ENDPOINTS.value_size: pinned 8 but the object wants 16"),
                "{detail}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an incompatible map was adopted"),
    }

    // The agent binary says so and exits non-zero instead of running.
    let dir = restart_common::TempDir::new("upgrade");
    let out = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_policy-agent"))
        .arg("standalone")
        .arg("--manifests")
        .arg(dir.manifests())
        .arg("--bpf-dir")
        .arg(fs.path())
        .arg("--no-migrate")
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "the agent must refuse: {err}"
    );
    assert!(
        err.contains("cannot be adopted") && err.contains("ENDPOINTS.value_size"),
        "{err}"
    );

    // Some maps pinned and others not (a partial cleanup) is refused too.
    std::fs::remove_file(&endpoints).expect("unpin");
    std::fs::remove_file(fs.path().join(MAP_PORTS)).expect("unpin");
    match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(
                detail.contains("others are not") && detail.contains(MAP_PORTS),
                "{detail}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a partial pin directory was adopted"),
    }
}

fn bpf(cmd: libc::c_long, attr: &[u64]) -> i64 {
    // SAFETY: a zeroed bpf_attr with the command's fields set; its size is passed, and every
    // pointer in it outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

fn create(
    map_type: u32,
    key: u32,
    value: u32,
    max_entries: u32,
    flags: u32,
    inner: i32,
) -> OwnedFd {
    let mut attr = [0u64; 16];
    attr[0] = map_type as u64 | (key as u64) << 32;
    attr[1] = value as u64 | (max_entries as u64) << 32;
    attr[2] = flags as u64 | (inner.max(0) as u64) << 32;
    let fd = bpf(BPF_MAP_CREATE, &attr);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd this test owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The pinned `CIDR_RULES` array was created with an older per-set trie (the 24-byte key
/// of a single shared trie): the kernel does not report an array's inner template, so the
/// loader reads it off a trie the array holds, or, holding none, asks the kernel whether it
/// takes one of the object's: either way the upgrade is caught before anything loads.
#[test]
fn restart_cidr_array_of_another_inner_template_is_refused() {
    use policy_common::{CIDR_SLOTS, MAP_CIDR_RULES, MAX_CIDR_RULES};
    use std::os::fd::AsRawFd as _;
    const ARRAY_OF_MAPS: u32 = 12;
    const LPM_TRIE: u32 = 11;
    const NO_PREALLOC: u32 = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

    let fs = PrivateBpffs::mount().expect("private bpffs");
    drop(Dataplane::load(fs.path()).expect("first load creates the pins"));
    let path = fs.path().join(MAP_CIDR_RULES);
    let old_trie = || create(LPM_TRIE, 24, 40, MAX_CIDR_RULES, NO_PREALLOC, -1);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // The agent before per-set tries pinned one shared trie under this name: refused on
    // its type alone (its slots are never walked).
    std::fs::remove_file(&path).expect("unpin");
    let shared = old_trie();
    let rc = bpf(
        BPF_OBJ_PIN,
        &[c.as_ptr() as u64, shared.as_raw_fd() as u64, 0, 0],
    );
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(detail.contains("CIDR_RULES.type"), "{detail}");
            assert!(!detail.contains("inner"), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("the shared trie was adopted as an array of maps"),
    }

    let template = old_trie();
    let outer = create(ARRAY_OF_MAPS, 4, 4, CIDR_SLOTS, 0, template.as_raw_fd());
    std::fs::remove_file(&path).expect("unpin");
    let rc = bpf(
        BPF_OBJ_PIN,
        &[c.as_ptr() as u64, outer.as_raw_fd() as u64, 0, 0],
    );
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());

    let refused = |want: &str| match Dataplane::load(fs.path()) {
        Err(DataplaneError::Incompatible { detail, .. }) => {
            assert!(detail.contains(want), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an array of another inner template was adopted"),
    };
    // Empty: the kernel refuses the object's trie.
    refused("CIDR_RULES.inner.template");
    // Holding a trie of the old layout: its key size says so.
    let inner = old_trie();
    let (slot, fd) = (4u32, inner.as_raw_fd() as u32);
    let rc = bpf(
        BPF_MAP_UPDATE_ELEM,
        &[
            outer.as_raw_fd() as u64,
            &slot as *const u32 as u64,
            &fd as *const u32 as u64,
            0,
        ],
    );
    assert_eq!(
        rc,
        0,
        "put a trie in the array: {}",
        std::io::Error::last_os_error()
    );
    refused("CIDR_RULES.inner.key_size: pinned 24 but the object wants 20");
}

/// An upgrade that changed a map's layout (simulated: the old agent's ENDPOINTS pin is
/// swapped for one of another layout; its programs keep the real map): the new agent stages
/// new maps, fills them, switches each pinned link to its programs in place and moves the
/// new pins over the old. Traffic is judged throughout: A reaches B, C never does, and a
/// long-lived connection survives (its conntrack entry is copied).
#[test]
fn restart_upgrade_migrates_incompatible_maps_without_a_gap() {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use aya::programs::{SchedClassifier, TcAttachType};
    use policy_testkit::testbed::{TcpClient, TcpEchoServer, Testbed, tcp_echo};
    use restart_common::{Agent, files_under, ingress_from, pod, uninstall, write_manifests};

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    let mut bed = Testbed::new().expect("node namespace");
    for _ in 0..3 {
        bed.add_pod().expect("pod");
    }
    let fs = PrivateBpffs::mount().expect("private bpffs");
    let dir = restart_common::TempDir::new("migrate");
    let to_b = SocketAddr::new(bed.hosts[B].ip(false), 8080);
    let _srv = TcpEchoServer::start(&bed.hosts[B].ns, to_b).expect("server on B");
    let generation = write_manifests(
        &dir.manifests(),
        &[
            pod(&bed, A, "a"),
            pod(&bed, B, "b"),
            pod(&bed, C, "c"),
            ingress_from("b", "b", "a", 8080, 9090),
        ],
    );
    let progs = |bed: &Testbed| -> Vec<u32> {
        let iface = bed.hosts[B].host_if.clone();
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|at| {
                let (_, p) = bed
                    .node
                    .enter(|| SchedClassifier::query_tcx(&iface, at))
                    .expect("enter")
                    .expect("query");
                p.iter().map(|p| p.id()).collect::<Vec<_>>()
            })
            .collect()
    };

    // With the Service judge: while migrating the old judge runs beside the new one (the
    // old programs defer into the old maps), then only the new one is left.
    let agent_args = ["--attach", "tcx", "--service-cidr", "198.19.200.0/24"];
    let judges = |bed: &Testbed| -> Vec<String> {
        let out = bed
            .node
            .exec("iptables", &["-w", "-S", "NETPOL-SERVICE"])
            .expect("iptables -S");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect()
    };
    let mut agent1 = Agent::start(&bed, &dir, &fs, &agent_args, 1);
    agent1.wait_generation(&dir.status(), generation, 3);
    assert_eq!(judges(&bed).len(), 1, "{:?}", judges(&bed));
    let progs1 = progs(&bed);
    let mut long = TcpClient::connect(&bed.hosts[A].ns, to_b, Duration::from_secs(2))
        .expect("long-lived A -> B");
    long.round_trip(b"before").expect("round trip");
    agent1.kill9();
    let endpoints = fs.path().join(MAP_ENDPOINTS);
    std::fs::remove_file(&endpoints).expect("unpin");
    pin_raw_hash(&endpoints, 16, 8, MAX_ENDPOINTS);

    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<(usize, bool)>> = Mutex::new(Vec::new());
    let bed_ref = &bed;
    let status = std::thread::scope(|sc| {
        let _stop_guard = restart_common::StopOnDrop(&stop);
        for src in [A, C] {
            let (stop, results) = (&stop, &results);
            sc.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok =
                        tcp_echo(&bed_ref.hosts[src].ns, to_b, Duration::from_millis(700)).is_ok();
                    results.lock().expect("lock").push((src, ok));
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(700));
        let mut agent2 = Agent::start(bed_ref, &dir, &fs, &agent_args, 2);
        let s = agent2.wait_generation(&dir.status(), generation, 3);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            long.round_trip(b"after")
                .expect("the long-lived connection survives the migration");
        }
        drop(std::mem::replace(&mut agent1, agent2));
        s
    });
    assert!(
        status.migrated && !status.adopted,
        "{status:?}: {}",
        agent1.log_tail()
    );
    let results = results.into_inner().expect("lock");
    let wrong: Vec<&(usize, bool)> = results
        .iter()
        .filter(|(src, ok)| *ok != (*src == A))
        .collect();
    let from = |s: usize| results.iter().filter(|(src, _)| *src == s).count();
    eprintln!(
        "migration under traffic: {} probes (A {}, C {}), wrong {}",
        results.len(),
        from(A),
        from(C),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "wrong verdicts during the migration: {wrong:?}"
    );
    assert!(from(A) > 20 && from(C) > 2, "too few probes: {results:?}");
    let progs2 = progs(&bed);
    assert_eq!(progs2.len(), 2, "one program per hook: {progs2:?}");
    assert!(
        progs1.iter().all(|p| !progs2.contains(p)),
        "programs not replaced: {progs1:?} -> {progs2:?}"
    );
    assert!(
        !fs.path().join("upgrade").exists(),
        "staging directory left behind"
    );
    let after = judges(&bed);
    assert_eq!(after.len(), 1, "only the new judge is left: {after:?}");
    assert!(
        after[0].contains(&format!("{}/service_judge", fs.path().display())),
        "{after:?}"
    );
    // (The log is coloured: escape sequences dropped before reading it.)
    let mut log = String::new();
    let mut in_escape = false;
    for ch in agent1.log_text().chars() {
        match (in_escape, ch) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    assert!(
        log.contains("with_old=true"),
        "the old judge ran beside the new one while migrating: {}",
        agent1.log_tail()
    );
    // The pins are the new maps now: a later agent adopts them.
    assert_eq!(
        Dataplane::load(fs.path())
            .expect("adopt after migration")
            .pin_state(),
        PinState::Adopted
    );

    drop(long);
    agent1.kill9();
    uninstall(&bed, &fs);
    assert!(
        files_under(fs.path()).is_empty(),
        "left pinned: {:?}",
        files_under(fs.path())
    );
}

/// Cluster mode goes through the same node side as standalone: a DaemonSet upgrade that
/// changed a map's layout migrates (no crash loop), or with `--no-migrate` refuses cleanly.
#[test]
fn cluster_mode_migrates_incompatible_maps_through_the_shared_node_side() {
    use policy_agent::cluster::{Enforcer, KernelEnforcer, Write};
    use policy_agent::compiler::MapContents;
    use policy_agent::dataplane::UplinkMode;
    use policy_agent::node::NodeOptions;
    use policy_testkit::testbed::Netns;

    let fs = PrivateBpffs::mount().expect("private bpffs");
    drop(Dataplane::load(fs.path()).expect("first load creates the pins"));
    let endpoints = fs.path().join(MAP_ENDPOINTS);
    std::fs::remove_file(&endpoints).expect("unpin");
    pin_raw_hash(&endpoints, 16, 8, MAX_ENDPOINTS);

    // In a namespace of the test's own: the interface pass looks at its interfaces only.
    let ns = Netns::create(&format!("pa-upg-{}", std::process::id())).expect("namespace");
    let path = fs.path().to_path_buf();
    ns.enter(move || {
        let mut opts = NodeOptions::new(&path);
        opts.uplink_mode = UplinkMode::None;
        opts.migrate = false;
        match KernelEnforcer::start(&opts) {
            Err(e) => assert!(e.to_string().contains("cannot be adopted"), "{e}"),
            Ok(_) => panic!("--no-migrate adopted an incompatible map"),
        }
        opts.migrate = true;
        let mut enforcer = KernelEnforcer::start(&opts).expect("migrates");
        let empty = MapContents::default();
        enforcer.apply(&empty, Write::Whole).expect("write");
        assert!(!enforcer.migrated(), "not before the links are taken over");
        let report = enforcer.sync_interfaces(&[]);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert!(
            enforcer.migrated(),
            "the interface pass finishes the migration"
        );
        enforcer.release_all();
    })
    .expect("enter the namespace");
    // The new maps are pinned in place of the old: the next agent adopts them.
    assert_eq!(
        Dataplane::load(fs.path()).expect("adopts").pin_state(),
        PinState::Adopted
    );
}
