//! The cluster agent end to end on a real kernel: the scripted API server feeds the watchers,
//! the reconcile loop drives the real `KernelEnforcer` (maps in a private bpffs, programs
//! attached to the pods' host veths found from their addresses), and real TCP between pod
//! namespaces shows each policy change. Needs root, BPF and network namespaces; fails
//! without them. Only 198.18.0.0/15 inside namespaces this test creates.

#![allow(clippy::unwrap_used)]

use crate::kube_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use kube_support::*;
use policy_agent::cluster::{self, KernelEnforcer};
use policy_agent::compiler::addr_of;
use policy_agent::dataplane::{AttachMode, Dataplane, UplinkMode};
use policy_agent::metrics::{Health, Metrics};
use policy_common::{EndpointKey, EndpointValue};
use policy_testkit::testbed::{PrivateBpffs, TcpEchoServer, Testbed, tcp_echo};
use serde_json::json;

fn deny_all_ingress(ns: &str, name: &str, target: &str) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": target}}, "policyTypes": ["Ingress"]},
    })
}

/// Polls an async-free probe, yielding to the agent between tries, for at most `secs`.
async fn until(secs: u64, what: &str, mut probe: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if probe() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn reconcile_kernel_enforcer_programs_real_pods_in_namespaces() {
    let mut bed = Testbed::new().expect("network namespaces (run as root)");
    let a = bed.add_pod().unwrap();
    let b = bed.add_pod().unwrap();
    let (ip_a, ip_b) = (bed.hosts[a].ip(false), bed.hosts[b].ip(false));
    let to_b = SocketAddr::new(ip_b, 8080);
    let _srv = TcpEchoServer::start(&bed.hosts[b].ns, to_b).unwrap();
    let fs = PrivateBpffs::mount().expect("a private bpffs (run as root)");

    let api = FakeApi::default();
    api.apply(Kind::Namespaces, namespace("shop", json!({})));
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "client",
            NODE,
            &ip_a.to_string(),
            json!({"app": "client"}),
        ),
    );
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "web",
            NODE,
            &ip_b.to_string(),
            json!({"app": "web"}),
        ),
    );
    // A pod of another node: an identity, never attached to.
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "far",
            "node-b",
            "198.18.7.7",
            json!({"app": "client"}),
        ),
    );

    let host_a = &bed.hosts[a];
    let fs_path = fs.path().to_path_buf();
    bed.node
        .enter(|| {
            // One thread, in the node namespace: the runtime, the agent and its attaches.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dp = Dataplane::load(&fs_path)
                    .expect("load the eBPF object (cargo xtask build-ebpf)");
                let enforcer =
                    KernelEnforcer::new(dp, AttachMode::Auto, &[], UplinkMode::Auto).unwrap();
                let metrics = Arc::new(Metrics::new());
                let health = Arc::new(Health::new(Duration::from_secs(60)));
                let mut loop_cfg = test_loop_config();
                loop_cfg.resync = Duration::from_secs(2);
                let cfg = cluster::Config {
                    loop_cfg,
                    metrics_addr: None,
                };
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let client = api.client();
                let (m, h) = (metrics.clone(), health.clone());
                let agent = tokio::spawn(async move {
                    cluster::run(client, enforcer, cfg, m, h, |_| {}, async {
                        let _ = stop_rx.await;
                    })
                    .await
                });
                let probe = || tcp_echo(&host_a.ns, to_b, Duration::from_millis(500)).is_ok();

                until(10, "ready", || health.is_ready()).await;
                until(10, "both local veths attached", || {
                    metrics.encode().contains("netpol_attached_interfaces 2\n")
                })
                .await;
                assert!(probe(), "no policy: web is reachable");

                api.apply(Kind::Policies, deny_all_ingress("shop", "deny", "web"));
                until(10, "deny-all enforced", || !probe()).await;

                api.apply(
                    Kind::Policies,
                    policy("shop", "allow", "web", "client", json!(8080)),
                );
                until(10, "client admitted on 8080", probe).await;

                // Drift: web's endpoint entry deleted behind the agent's back; the periodic
                // resync reads the maps back and restores it.
                let endpoints = MapData::from_pin(fs_path.join("ENDPOINTS")).unwrap();
                let mut endpoints: BpfHashMap<MapData, EndpointKey, EndpointValue> =
                    BpfHashMap::try_from(Map::HashMap(endpoints)).unwrap();
                let web = EndpointKey {
                    addr: addr_of(ip_b),
                };
                let want = endpoints.get(&web, 0).unwrap();
                endpoints.remove(&web).unwrap();
                until(10, "resync restored the endpoint", || {
                    endpoints.get(&web, 0).ok() == Some(want)
                })
                .await;
                until(10, "reachable again", probe).await;

                api.delete(Kind::Policies, "shop", "allow");
                until(10, "deny-all again", || !probe()).await;
                api.delete(Kind::Policies, "shop", "deny");
                until(10, "open again", probe).await;

                // The web pod goes: its veth is no longer attached to.
                api.delete(Kind::Pods, "shop", "web");
                until(10, "web detached", || {
                    metrics.encode().contains("netpol_attached_interfaces 1\n")
                })
                .await;

                let _ = stop_tx.send(());
                let mut enforcer = tokio::time::timeout(Duration::from_secs(10), agent)
                    .await
                    .expect("agent stops")
                    .unwrap()
                    .unwrap();
                enforcer.detach_all();
            });
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet's capabilities, proven on the kernel
// ---------------------------------------------------------------------------------------------

const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Restricts the calling thread's capabilities to `caps` (effective and permitted), as the
/// container runtime does for the agent's process. Capabilities are per thread.
fn restrict_thread_caps(caps: &[u32]) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut data = [Data::default(); 2];
    for &c in caps {
        let (i, bit) = ((c / 32) as usize, 1u32 << (c % 32));
        data[i].effective |= bit;
        data[i].permitted |= bit;
    }
    let hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: capset with a v3 header and two data words, as the ABI requires.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

/// In a fresh thread of the node namespace restricted to `caps`: load the object (maps
/// pinned in a private bpffs), write an endpoint, attach to a pod veth, read the counters.
fn agent_work_with(caps: &[u32]) -> Result<(), String> {
    let mut bed = Testbed::new().expect("network namespaces (run as root)");
    let a = bed.add_pod().unwrap();
    let fs = PrivateBpffs::mount().expect("a private bpffs (run as root)");
    let host_if = bed.hosts[a].host_if.clone();
    let ip = bed.hosts[a].ip(false);
    let path = fs.path().to_path_buf();
    bed.node
        .enter(move || {
            restrict_thread_caps(caps);
            let mut dp = Dataplane::load(&path).map_err(|e| format!("load: {e}"))?;
            // With fewer privileges than root the verifier does more: the real headroom.
            for (name, n) in dp.verifier_cost() {
                let n = n.unwrap_or(0);
                eprintln!(
                    "verifier ({caps:?}): {name:>14} {n:>8} instructions ({:.1} % of 1M)",
                    n as f64 / 1e4
                );
            }
            let mut maps = dp.take_maps().map_err(|e| format!("maps: {e}"))?;
            maps.set_endpoint(EndpointKey { addr: addr_of(ip) }, EndpointValue::default())
                .map_err(|e| format!("map write: {e}"))?;
            let ifindex =
                policy_agent::dataplane::netinfo::ifindex(&host_if).ok_or("no interface")?;
            maps.bind(ifindex, &[addr_of(ip)])
                .map_err(|e| format!("bind: {e}"))?;
            let att = dp
                .attach(&host_if, AttachMode::Auto)
                .map_err(|e| format!("attach: {e}"))?;
            maps.counters().map_err(|e| format!("counters: {e}"))?;
            dp.detach(att).map_err(|e| format!("detach: {e}"))?;
            Ok(())
        })
        .unwrap()
}

#[test]
fn kube_daemonset_capabilities_suffice_and_each_is_needed() {
    // Exactly the DaemonSet's set (deploy/daemonset.yaml): everything the agent does works.
    agent_work_with(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])
        .expect("BPF + NET_ADMIN + PERFMON suffice");
    // Without BPF nothing loads (not even the BTF).
    let e = agent_work_with(&[CAP_NET_ADMIN, CAP_PERFMON]).unwrap_err();
    assert!(e.starts_with("load"), "{e}");
    // Without NET_ADMIN the TC programs do not load: sched_cls is a net-admin program type
    // (and attaching needs it too).
    let e = agent_work_with(&[CAP_BPF, CAP_PERFMON]).unwrap_err();
    assert!(
        e.starts_with("load: program from_pod") && e.contains("Operation not permitted"),
        "{e}"
    );
    // Without PERFMON the verifier treats the loader as !root and rejects the programs'
    // packet/stack pointer arithmetic (Spectre v1 sanitation).
    let e = agent_work_with(&[CAP_BPF, CAP_NET_ADMIN]).unwrap_err();
    assert!(
        e.starts_with("load: program from_pod") && e.contains("pointer arithmetic"),
        "{e}"
    );
}
