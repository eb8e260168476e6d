//! The prose of the `latency` section of `BENCHMARKS.md`: how it is measured, how to
//! reproduce it, what the numbers say, and the published figures of peers beside them.

pub const TEXT: &str = "\
**How it is measured.** The release agent runs in a node namespace of the test bed; a \
client pod starts a non-blocking TCP connection to a server pod every millisecond, each with \
its own 80 ms deadline (a dropped SYN is retransmitted only after 1 s, so no answer by then \
is a refusal), and every attempt's start and outcome are kept. The server is isolated by a \
NetworkPolicy admitting nothing; a second policy is rewritten in turn to admit the client \
(open) and a pod that does not exist (close). Standalone: the policy is one file of the \
manifest directory, written as an operator's tool writes (a dot temporary, fsync, rename). \
Cluster: the object is applied to the fake API server, whose watch streams it over HTTP to \
the agent running with its defaults (`--debounce-ms 50`). The time taken is from the end of \
the write (the rename returned; the watch event queued) to the start of the first attempt \
after which every attempt has the new outcome, confirmed by the next 100 ms of attempts: \
the first allowed (or first refused) connection, to 1 ms. One open and close after each \
agent start are not counted (in cluster mode the first change can meet the watches still \
opening: up to a few hundred ms). Loaded: the scale bench's cluster, 10,000 pods over 100 \
nodes (the 100 local ones on real veths) and 1,000 policies, beside the two pods. Pod start \
(with the load): the pod's manifest written (or object applied), then its veth, addresses and \
routes made as a CNI plugin does, until the agent's status file lists its interface as \
attached, which it writes after the pod's endpoint is in the maps and its programs on the \
veth; every tenth new pod is also checked end to end (a connection the policy refuses has \
its SYN dropped, not refused by the empty port). It includes the plumbing, shown beside: \
the agent's own share is what follows the route appearing (see `cargo xtask bench attach`).

**Reproduce.** `cargo xtask bench latency` (root; about five minutes). Knobs: \
`LATENCY_CHANGES` (opens and closes each per case, default 100), `LATENCY_PODS` (new pods \
per mode, default 40), `LATENCY_MODES` (`standalone,cluster`), `BENCH_AGENT_LOG` (a \
`RUST_LOG` filter for the agent; its log is kept in `target/bench/`, \
`policy_agent::standalone=debug` times each pass). The console names every change slower \
than 100 ms.

**Reading.**

- *Standalone reacts to the write itself.* The agent polled its directory (every 100 ms by \
default) and woke early only for link changes; it now watches the directory and the \
subdirectories it reads (inotify: a file closed after writing, renamed, deleted; a \
subdirectory appearing) and wakes the same wait, so a change on an empty cluster is enforced \
in a few ms. The poll stays for what no notification reports.
- *Standalone with 10k pods and 1k policies: a change costs what it touches.* Measured by \
this bench before the change (commit fbb0baa): open p50 1,112 ms, p99 1,663 ms; close p50 \
1,115 ms (10 changes each). Every change re-read and re-parsed the whole directory (2.5 MB \
of manifests, about 700 ms), rebuilt the snapshot (15 ms) and compiled from scratch \
(150 ms). Now the loader parses only the files whose bytes changed and updates its manifests \
in place (duplicates, fallbacks to a file's last good version, the object limit and a \
lockdown still take the whole path, so the result always equals a whole parse; a test \
checks it), the snapshot is updated for the touched objects, and the incremental engine \
writes its own diff, as cluster mode does: about 12 ms. What is left per change is mostly \
reading and hashing every file (about 3 ms at 2.5 MB: the generation the status file \
reports is the hash of exactly the bytes read, so a reader never sees a version claimed \
that was not enforced) and the agent's interface pass over its 100 local pods (about 4 ms), \
which follows the map write and does not delay enforcement.
- *Cluster mode's debounce no longer delays a lone change.* It used to wait 50 ms after \
every change before compiling (measured by this bench at commit fbb0baa: open p50 54 ms on \
the empty cluster, 65 ms p50 and 182 ms p99 with the load, 10 changes each); now a change \
after 50 ms of quiet is compiled at once and only changes following a pass within 50 ms \
wait for the rest of it (bursts still coalesce, at most one pass per 50 ms): a few ms. With \
the load a pass still reads every cached object (11,000) to check versions and compute the \
status generation, which puts the loaded p99 around the goal of 20 ms rather than well \
under it (under or over it from run to run on this VM: the table says which for this run; \
cluster mode is the slower of the two); an index of the changed objects kept by the watch (and, standalone, hashing \
only the changed files) would make a pass cost only its change.
- *Outliers.* p99 over 100 changes is the second worst. This is a shared 2-core VM; \
single changes that took 0.1 to 3.5 s were seen while other work ran (the console names \
them, the JSON has the maximum); the same changes take the p50 when the machine is quiet. \
Read the medians against each other and the tails as this machine's.
- *Pod start* is dominated by the test bed's plumbing (`ip` commands, 100 to 200 ms here); \
the agent attaches within a few ms of the route appearing (link notifications).

**Published figures (not measured here).** Cilium's scale tests gate on a p99 policy \
implementation delay under 0.1 s (`cilium_policy_implementation_delay`, ClusterLoader2; \
docs.cilium.io, \"Scalability and Performance Testing\"); the Kubernetes perf-tests \
network-policy enforcement measurement gives 0.7 s from policy creation to the first allowed \
connection as its example (`kubernetes/perf-tests`, clusterloader2 \
`NetworkPolicyEnforcement`). Both include a real API server and the network between nodes; \
ours is one node fed by a fake API server on loopback (or a local directory), so it covers \
the agent and the datapath, not the control plane in front of them.
";
