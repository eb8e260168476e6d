//! Continuous traffic while an agent is killed, a policy changes and an agent restarts, and
//! the judgement of every connection against the policy in force when it ran. Shared by the
//! one-node restart tests and the cross-node one.
//!
//! Each pair of pods probes over TCP and UDP every 10 ms (short connections, each UDP probe
//! from a source port of its own), and one long-lived TCP connection makes a round trip every
//! 20 ms. The caller's script kills, changes and restarts, and says when: probes that ended
//! before the kill or before the restart began are judged by generation 1; probes that
//! started once the restarted agent reported generation 2, by generation 2; probes in
//! between may see either.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use policy_testkit::testbed::{Netns, TcpClient, tcp_echo};

use crate::restart_common::StopOnDrop;

/// A denied probe costs this much; allowed ones answer in well under a millisecond.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A pod as a probe sees it: its namespace and address.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub ns: &'a Netns,
    pub ip: IpAddr,
}

/// The ports every server pod serves.
#[derive(Clone, Copy)]
pub struct Ports {
    pub tcp: u16,
    pub udp: u16,
}

/// One short connection: when it ran and whether it got its echo.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub pair: (usize, usize),
    pub proto: Proto,
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

/// When the script killed the agent, began the restart, and saw generation 2 enforced.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    pub kill: Instant,
    pub restart: Instant,
    pub switch: Instant,
}

/// What the traffic saw.
pub struct Observed {
    pub probes: Vec<Probe>,
    pub long_trips: u64,
    pub long_failures: Vec<String>,
}

/// One datagram from `from` to `to` and its echo within [`PROBE_TIMEOUT`].
pub fn udp_probe(ns: &Netns, from: SocketAddr, to: SocketAddr) -> bool {
    let Ok(Ok(sock)) = ns.enter(|| std::net::UdpSocket::bind(from)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(PROBE_TIMEOUT));
    if sock.send_to(b"probe", to).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(sock.recv_from(&mut buf), Ok((5, f)) if f == to && &buf[..5] == b"probe")
}

/// Runs `script` while `pairs` (indexes into `pods`) probe and `long` (already open) makes
/// round trips; returns the script's result and what the traffic saw.
pub fn run<'a, T>(
    pods: &[Endpoint<'a>],
    pairs: &[(usize, usize)],
    ports: Ports,
    long: &mut TcpClient,
    script: impl FnOnce() -> T,
) -> (T, Observed) {
    let stop = AtomicBool::new(false);
    let probes: Mutex<Vec<Probe>> = Mutex::new(Vec::new());
    let long_trips = AtomicU64::new(0);
    let long_failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let result = std::thread::scope(|sc| {
        let _stop_guard = StopOnDrop(&stop);
        for (i, &pair) in pairs.iter().enumerate() {
            for proto in [Proto::Tcp, Proto::Udp] {
                let (stop, probes) = (&stop, &probes);
                let (src, dst) = (pods[pair.0], pods[pair.1]);
                sc.spawn(move || {
                    let mut n = 0u16;
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        // A datagram reusing the 5-tuple of an earlier allowed flow belongs
                        // to that flow (its conntrack entry lives 60 s): not what is judged.
                        let sport = 20_000 + 5_000 * i as u16 + n % 5_000;
                        n += 1;
                        let ok = match proto {
                            Proto::Tcp => {
                                tcp_echo(src.ns, SocketAddr::new(dst.ip, ports.tcp), PROBE_TIMEOUT)
                                    .is_ok()
                            }
                            Proto::Udp => udp_probe(
                                src.ns,
                                SocketAddr::new(src.ip, sport),
                                SocketAddr::new(dst.ip, ports.udp),
                            ),
                        };
                        let end = Instant::now();
                        probes.lock().expect("lock").push(Probe {
                            pair,
                            proto,
                            start,
                            end,
                            ok,
                        });
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
        }
        {
            let (stop, long_trips, long_failures) = (&stop, &long_trips, &long_failures);
            sc.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("long-lived round trip {n}");
                    if let Err(e) = long.round_trip(msg.as_bytes()) {
                        long_failures
                            .lock()
                            .expect("lock")
                            .push(format!("{msg}: {e}"));
                        return;
                    }
                    n += 1;
                    long_trips.store(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let r = script();
        stop.store(true, Ordering::Relaxed);
        r
    });
    (
        result,
        Observed {
            probes: probes.into_inner().expect("lock"),
            long_trips: long_trips.load(Ordering::Relaxed),
            long_failures: long_failures.into_inner().expect("lock"),
        },
    )
}

/// The judgement of every probe; phases: 0 before the kill, 1 agent down, 2 restarting,
/// 3 after generation 2 is enforced.
pub struct Judged {
    pub wrongly_allowed: Vec<(usize, Probe)>,
    pub wrongly_dropped: Vec<(usize, Probe)>,
    /// Probes per (pair, phase).
    pub counts: BTreeMap<((usize, usize), usize), usize>,
}

/// Judges every probe against `allowed(generation, pair)` for its phase of `t`.
pub fn judge(
    probes: &[Probe],
    t: Timeline,
    allowed: impl Fn(u8, (usize, usize)) -> bool,
) -> Judged {
    let mut j = Judged {
        wrongly_allowed: Vec::new(),
        wrongly_dropped: Vec::new(),
        counts: BTreeMap::new(),
    };
    for p in probes {
        let phase = if p.end < t.kill {
            0
        } else if p.end < t.restart {
            1
        } else if p.start < t.switch {
            2
        } else {
            3
        };
        *j.counts.entry((p.pair, phase)).or_default() += 1;
        let expect: Vec<bool> = match phase {
            0 | 1 => vec![allowed(1, p.pair)],
            2 => vec![allowed(1, p.pair), allowed(2, p.pair)],
            _ => vec![allowed(2, p.pair)],
        };
        if !expect.contains(&p.ok) {
            if p.ok {
                j.wrongly_allowed.push((phase, *p));
            } else {
                j.wrongly_dropped.push((phase, *p));
            }
        }
    }
    j
}

/// The checks every restart test makes: no probe decided against the policy in force, the
/// long-lived connection unbroken and busy, every pair probed before, during and after, and
/// generation 2 seen in force (`switched`: a pair generation 2 opened and one it closed).
pub fn assert_held(
    what: &str,
    seen: &Observed,
    t: Timeline,
    pairs: &[(usize, usize)],
    allowed: impl Fn(u8, (usize, usize)) -> bool,
    switched: ((usize, usize), (usize, usize)),
) {
    let j = judge(&seen.probes, t, &allowed);
    let udp = seen.probes.iter().filter(|p| p.proto == Proto::Udp).count();
    eprintln!(
        "{what}: {} probes ({udp} UDP), downtime {:?}, restart to new generation {:?}, \
         wrongly allowed {}, wrongly dropped {}, long-lived round trips {}, per (pair, phase) {:?}",
        seen.probes.len(),
        t.restart - t.kill,
        t.switch - t.restart,
        j.wrongly_allowed.len(),
        j.wrongly_dropped.len(),
        seen.long_trips,
        j.counts,
    );
    assert!(
        j.wrongly_allowed.is_empty(),
        "{what}: wrongly allowed: {:#?}",
        j.wrongly_allowed
    );
    assert!(
        j.wrongly_dropped.is_empty(),
        "{what}: wrongly dropped: {:#?}",
        j.wrongly_dropped
    );
    assert!(
        seen.long_failures.is_empty(),
        "{what}: the long-lived connection broke: {:?}",
        seen.long_failures
    );
    assert!(
        seen.long_trips > 100,
        "{what}: the long-lived connection ran only {} round trips",
        seen.long_trips
    );
    for &pair in pairs {
        for phase in [0, 1, 3] {
            assert!(
                j.counts.get(&(pair, phase)).copied().unwrap_or(0) > 0,
                "{what}: no probe of {pair:?} in phase {phase}: {:?}",
                j.counts
            );
        }
    }
    let after = |pair, ok| {
        seen.probes
            .iter()
            .any(|p| p.pair == pair && p.start >= t.switch && p.ok == ok)
    };
    let (opened, closed) = switched;
    assert!(
        allowed(2, opened) && !allowed(2, closed),
        "{what}: the pairs named to check generation 2 do not show it"
    );
    assert!(
        after(opened, true) && after(closed, false),
        "{what}: generation 2 not enforced"
    );
}
