//! Long-lived connections in scenario files (`open`, `close`, `expect.established`): every
//! file error is named by file, step and field; plans resolve connections like probes; the
//! simulation answers a check with the verdict a new connection gets; checks count in the
//! report; runners are driven in the order close, apply, open, probe, check and left with no
//! connection open.

use policy_agent::model::ObjectKey;
use policy_testkit::scenario::apply::State;
use policy_testkit::scenario::connections::Connection;
use policy_testkit::scenario::format::{IpFamily, Liveness, Via};
use policy_testkit::scenario::narrate::Narration;
use policy_testkit::scenario::report::Counts;
use policy_testkit::scenario::simulate::{CheckedSimulation, KernelModelOracle, ReferenceOracle};
use policy_testkit::scenario::topology::{EndpointName, Topology};
use policy_testkit::scenario::{
    Oracle, OracleError, Plan, Probe, ScenarioError, run_plan, run_plan_narrated,
};

const HEAD: &str = r#"name: t
namespaces: {x: {}, y: {}}
pods:
  - {namespace: x, name: a, labels: {pod: a}, ports: [{port: 80}]}
  - {namespace: x, name: b, labels: {pod: b}, ports: [{port: 80}, {port: 80, protocol: UDP}]}
  - {namespace: y, name: a, labels: {pod: a}, ports: [{port: 80}]}
externals:
  - {name: inet, ip: 198.19.0.10}
steps:
"#;

/// x/b's ingress admits nothing.
const DENY_B: &str = r#"      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: deny-b, namespace: x}
      spec: {podSelector: {matchLabels: {pod: b}}}
"#;

const OPEN_WEB: &str = "  - open: [{name: web, from: x/a, to: x/b, port: TCP/80}]\n";

fn file(steps: &str) -> String {
    format!("{HEAD}{steps}")
}

fn parse_err(text: &str) -> ScenarioError {
    match Plan::parse("t.yaml", text) {
        Ok(_) => panic!("accepted an invalid file:\n{text}"),
        Err(e) => e,
    }
}

fn assert_err(steps: &str, step: usize, field: &str, message_part: &str) {
    let e = parse_err(&file(steps));
    assert_eq!(e.file, "t.yaml");
    assert_eq!((e.step, e.field.as_str()), (Some(step), field), "{e}");
    assert!(
        e.message.contains(message_part),
        "message {:?} lacks {message_part:?}",
        e.message
    );
    assert!(
        e.to_string().starts_with(&format!(
            "t.yaml: step {} (steps[{step}]), field {field}: ",
            step + 1
        )),
        "{e}"
    );
}

#[test]
fn invalid_open_entries_are_named() {
    let open = |entry: &str| format!("  - open: [{entry}]\n");
    assert_err(
        &open("{name: Web, from: x/a, to: x/b, port: TCP/80}"),
        0,
        "open[0].name",
        "not a connection name",
    );
    assert_err(
        &open("{name: web, from: x/z, to: x/b, port: TCP/80}"),
        0,
        "open[0].from",
        "no pod x/z",
    );
    assert_err(
        &open("{name: web, from: x/a, to: external:nope, port: TCP/80}"),
        0,
        "open[0].to",
        "no external",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x-b, port: TCP/80}"),
        0,
        "open[0].to",
        "not ns/pod or external:name",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x/a, port: TCP/80}"),
        0,
        "open[0].to",
        "two different endpoints",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x/b, port: TCP/0}"),
        0,
        "open[0].port",
        "not a port",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x/b, port: ICMP/80}"),
        0,
        "open[0].port",
        "not a protocol",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x/b, port: TCP/81}"),
        0,
        "open[0].port",
        "does not serve TCP/81",
    );
    assert_err(
        &open("{name: web, from: x/b, to: x/a, port: UDP/80}"),
        0,
        "open[0].port",
        "does not serve UDP/80",
    );
    assert_err(
        &open("{name: web, from: x/a, to: external:inet, port: TCP/80, via: service}"),
        0,
        "open[0].via",
        "no Service",
    );
    assert_err(
        &open("{name: web, from: x/a, to: x/b, port: TCP/80, family: IPv6}"),
        0,
        "open[0].family",
        "do not include IPv6",
    );
    // The file has both families, the external only an IPv4 address.
    let both = HEAD.replace("steps:\n", "ipFamilies: [IPv4, IPv6]\nsteps:\n");
    let e = parse_err(
        &(both + &open("{name: up, from: external:inet, to: x/b, port: TCP/80, family: IPv6}")),
    );
    assert_eq!((e.step, e.field.as_str()), (Some(0), "open[0].from"), "{e}");
    assert!(e.message.contains("no IPv6 address"), "{e}");
    let e = parse_err(&file(
        "  - open: [{name: web, from: x/a, to: x/b, port: TCP/80, proto: x}]\n",
    ));
    assert_eq!(
        (e.step, e.field.as_str()),
        (Some(0), "open[0].proto"),
        "{e}"
    );
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn opening_needs_an_admitting_policy_and_a_free_name() {
    assert_err(
        &format!(
            "  - apply: |\n{DENY_B}    open: [{{name: web, from: x/a, to: x/b, port: TCP/80}}]\n"
        ),
        0,
        "open[0]",
        "deny web x/a -> x/b TCP/80 IPv4 via pod as a new connection",
    );
    assert_err(
        "  - open: [{name: web, from: x/a, to: x/b, port: TCP/80}, {name: web, from: y/a, to: x/b, port: TCP/80}]\n",
        0,
        "open[1].name",
        "already open",
    );
    assert_err(
        &format!("{OPEN_WEB}  - open: [{{name: web, from: y/a, to: x/b, port: TCP/80}}]\n"),
        1,
        "open[0].name",
        "already open",
    );
    // Closed, the name is free again (in the same step, and later).
    let plan = Plan::parse(
        "t.yaml",
        &file(&format!(
            "{OPEN_WEB}  - close: [web]\n    open: [{{name: web, from: y/a, to: x/b, port: TCP/80}}]\n  - close: [web]\n  - open: [{{name: web, from: x/a, to: x/b, port: UDP/80}}]\n"
        )),
    )
    .expect("a closed name may be used again");
    assert_eq!(plan.steps[1].connections.close, vec!["web".to_string()]);
    assert_eq!(plan.steps[3].connections.open[0].port.to_string(), "UDP/80");
}

#[test]
fn invalid_closes_and_expectations_are_named() {
    assert_err(
        "  - close: [web]\n",
        0,
        "close[0]",
        "no connection \"web\" is open",
    );
    assert_err(
        &format!("{OPEN_WEB}  - close: [web, web]\n"),
        1,
        "close[1]",
        "listed twice",
    );
    assert_err(
        &format!("{OPEN_WEB}  - expect: {{default: allow}}\n"),
        1,
        "expect.established",
        "missing: connections are open (web)",
    );
    // Opened in the step that expects: checked in that step already.
    assert_err(
        "  - open: [{name: web, from: x/a, to: x/b, port: TCP/80}]\n    expect: {default: allow}\n",
        0,
        "expect.established",
        "missing",
    );
    assert_err(
        "  - expect: {established: {default: alive}}\n",
        0,
        "expect.established",
        "no connection is open",
    );
    assert_err(
        &format!("{OPEN_WEB}  - expect: {{established: {{cut: [dns]}}}}\n"),
        1,
        "expect.established.cut[0]",
        "no connection \"dns\" is open",
    );
    assert_err(
        &format!("{OPEN_WEB}  - expect: {{established: {{cut: [web], alive: [web]}}}}\n"),
        1,
        "expect.established.alive[0]",
        "both cut and alive",
    );
    assert_err(
        &format!("{OPEN_WEB}  - expect: {{established: {{alive: [web, web]}}}}\n"),
        1,
        "expect.established.alive[1]",
        "listed twice",
    );
    assert_err(
        &format!("{OPEN_WEB}  - expect: {{established: {{default: dead}}}}\n"),
        1,
        "expect.established.default",
        "unknown variant",
    );
    // Closed connections are not expected any more.
    assert_err(
        &format!("{OPEN_WEB}  - close: [web]\n    expect: {{established: {{cut: [web]}}}}\n"),
        1,
        "expect.established",
        "no connection is open",
    );
}

#[test]
fn a_moved_pod_takes_its_connections_with_it() {
    let head = HEAD.replace("steps:\n", "nodes: 2\nsteps:\n");
    let e = parse_err(&format!("{head}{OPEN_WEB}  - move: {{x/b: node-1}}\n"));
    assert_eq!((e.step, e.field.as_str()), (Some(1), "move.x/b"), "{e}");
    assert!(e.message.contains("connection web is open on x/b"), "{e}");
    // Closed in the step that moves the pod: fine, and it may open again afterwards.
    Plan::parse(
        "t.yaml",
        &format!("{head}{OPEN_WEB}  - move: {{x/b: node-1}}\n    close: [web]\n    open: [{{name: web, from: x/a, to: x/b, port: TCP/80}}]\n"),
    )
    .expect("closed before the move");
}

#[test]
fn connections_resolve_like_probes() {
    let plan = Plan::parse(
        "t.yaml",
        &(HEAD.replace("steps:\n", "ipFamilies: [IPv6, IPv4]\nsteps:\n")
            + "  - open:\n      - {name: web, from: x/a, to: x/b, port: TCP/80, via: service}\n      - {name: v4, from: y/a, to: x/a, port: TCP/80, family: IPv4}\n  - expect: {established: {cut: []}}\n"),
    )
    .expect("valid");
    let topo = &plan.topology;
    let b = topo
        .pods
        .iter()
        .find(|p| p.key.to_string() == "x/b")
        .expect("x/b");
    let web = &plan.steps[0].connections.open[0];
    assert_eq!(web.family, IpFamily::V6, "the file's first family");
    assert_eq!(web.via, Via::Service);
    assert_eq!(web.target_addr, b.service_addr(IpFamily::V6));
    assert_eq!(web.dst_addr, b.addr(IpFamily::V6), "judged on the backend");
    let v4 = &plan.steps[0].connections.open[1];
    assert_eq!(v4.family, IpFamily::V4);
    assert!(v4.src_addr.is_ipv4() && v4.target_addr == v4.dst_addr);
    // A step without expect checks nothing; the next one checks both, in opening order.
    assert!(plan.steps[0].connections.checks.is_empty());
    let checks = &plan.steps[1].connections.checks;
    assert_eq!(
        checks
            .iter()
            .map(|c| (c.conn.name.as_str(), c.expect))
            .collect::<Vec<_>>(),
        vec![("web", Liveness::Alive), ("v4", Liveness::Alive)]
    );
}

/// web is open through a deny on x/b (cut), its deletion (alive again) and a policy of
/// another pod (alive); the file says so.
fn revalidation_file(expect_after_deny: &str) -> String {
    file(&format!(
        "{OPEN_WEB}    expect: {{established: {{default: alive}}}}\n  - apply: |\n{DENY_B}    expect:\n      deny: [\"* -> x/b\"]\n      established: {expect_after_deny}\n  - delete: [networkpolicy/x/deny-b]\n    expect: {{established: {{alive: [web]}}}}\n"
    ))
}

fn run_on(plan: &Plan, oracle: &mut dyn Oracle) -> (Counts, String) {
    let mut out = Vec::new();
    let counts = run_plan(plan, oracle, &mut out).expect("runs");
    (counts, String::from_utf8(out).expect("utf-8"))
}

#[test]
fn simulations_answer_a_check_as_a_new_connection_would_be_judged() {
    let plan = Plan::parse("t.yaml", &revalidation_file("{cut: [web]}")).expect("valid");
    let oracles: Vec<Box<dyn Oracle>> = vec![
        Box::new(ReferenceOracle::default()),
        Box::new(KernelModelOracle::default()),
        Box::new(CheckedSimulation::default()),
    ];
    for mut oracle in oracles {
        let (counts, report) = run_on(&plan, &mut oracle);
        assert_eq!(counts.failed, 0, "{report}");
        // 12 probes per step (three pods, one external), and one check in each.
        assert_eq!(counts.passed, 3 * 12 + 3, "{report}");
        assert!(
            report.contains("established connections: 1 passed, 0 failed\n  web x/a -> x/b TCP/80 IPv4 via pod: cut (expected cut)\n"),
            "{report}"
        );
        assert_eq!(
            report
                .matches("  web x/a -> x/b TCP/80 IPv4 via pod: alive (expected alive)\n")
                .count(),
            2,
            "{report}"
        );
    }
}

#[test]
fn a_wrong_expectation_fails_its_check_and_counts() {
    let plan = Plan::parse("t.yaml", &revalidation_file("{default: alive}")).expect("valid");
    let (counts, report) = run_on(&plan, &mut CheckedSimulation::default());
    assert_eq!((counts.passed, counts.failed), (3 * 12 + 2, 1), "{report}");
    assert!(
        report.contains("established connections: 0 passed, 1 failed\n  FAIL web x/a -> x/b TCP/80 IPv4 via pod: cut (expected alive)\n"),
        "{report}"
    );
    assert!(report.ends_with("t: 38 passed, 1 failed\n"), "{report}");

    let mut out = Vec::new();
    let counts = run_plan_narrated(
        &plan,
        &mut CheckedSimulation::default(),
        &mut out,
        &Narration { color: false },
    )
    .expect("runs");
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!((counts.passed, counts.failed), (38, 1), "{text}");
    assert!(
        text.contains(
            "opens (kept open across the next steps): web x/a -> x/b TCP/80 IPv4 via pod"
        ),
        "{text}"
    );
    assert!(
        text.contains("  X web x/a -> x/b TCP/80 IPv4 via pod: cut (expected alive)"),
        "{text}"
    );
    assert!(
        text.contains(
            "open connection web x/a -> x/b TCP/80 IPv4 via pod: expected alive, got cut"
        ),
        "{text}"
    );
}

/// Records what a runner is asked, answering like the reference evaluator.
#[derive(Default)]
struct Recorder {
    inner: ReferenceOracle,
    calls: Vec<String>,
    /// Fail the n-th apply (from 0).
    fail_apply: Option<usize>,
    applies: usize,
}

impl Oracle for Recorder {
    fn describe(&self) -> String {
        "recorder".into()
    }
    fn setup(&mut self, t: &Topology) -> Result<(), OracleError> {
        self.inner.setup(t)
    }
    fn apply(&mut self, t: &Topology, s: &State) -> Result<(), OracleError> {
        self.calls.push("apply".into());
        self.applies += 1;
        if self.fail_apply == Some(self.applies - 1) {
            return Err(OracleError::Failed("apply failed".into()));
        }
        self.inner.apply(t, s)
    }
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        self.calls.push("probe".into());
        self.inner.probe(probes)
    }
    fn open_connections(&mut self, conns: &[&Connection]) -> Result<(), OracleError> {
        let names: Vec<&str> = conns.iter().map(|c| c.name.as_str()).collect();
        self.calls.push(format!("open {}", names.join(",")));
        self.inner.open_connections(conns)
    }
    fn check_connections(&mut self, conns: &[&Connection]) -> Result<Vec<bool>, OracleError> {
        let names: Vec<&str> = conns.iter().map(|c| c.name.as_str()).collect();
        self.calls.push(format!("check {}", names.join(",")));
        self.inner.check_connections(conns)
    }
    fn close_connections(&mut self, names: &[String]) -> Result<(), OracleError> {
        self.calls.push(format!("close {}", names.join(",")));
        self.inner.close_connections(names)
    }
    fn teardown(&mut self) -> Result<(), OracleError> {
        self.calls.push("teardown".into());
        self.inner.teardown()
    }
}

const TWO_CONNECTIONS: &str = "  - open:\n      - {name: web, from: x/a, to: x/b, port: TCP/80}\n      - {name: up, from: external:inet, to: x/a, port: TCP/80}\n    expect: {established: {}}\n  - close: [web]\n    open: [{name: dns, from: x/a, to: x/b, port: UDP/80}]\n    expect: {established: {}}\n";

#[test]
fn runners_are_driven_in_order_and_left_without_connections() {
    let plan = Plan::parse("t.yaml", &file(TWO_CONNECTIONS)).expect("valid");
    let mut rec = Recorder::default();
    let (counts, report) = run_on(&plan, &mut rec);
    assert_eq!(counts.failed, 0, "{report}");
    assert_eq!(
        rec.calls,
        [
            "apply",
            "open web,up",
            "probe",
            "check web,up",
            "close web",
            "apply",
            "open dns",
            "probe",
            "check up,dns",
            "close up,dns",
            "teardown",
        ]
    );

    // A failing step still closes what is open before the teardown.
    let mut rec = Recorder {
        fail_apply: Some(1),
        ..Recorder::default()
    };
    let mut out = Vec::new();
    let err = run_plan(&plan, &mut rec, &mut out).expect_err("apply fails");
    assert!(err.to_string().contains("apply failed"), "{err}");
    assert_eq!(
        rec.calls[rec.calls.len() - 3..],
        ["apply", "close up", "teardown"]
    );
}

/// An oracle that keeps no connections: the trait's defaults.
#[derive(Default)]
struct NoConnections(ReferenceOracle);

impl Oracle for NoConnections {
    fn describe(&self) -> String {
        "a probe-only oracle".into()
    }
    fn setup(&mut self, t: &Topology) -> Result<(), OracleError> {
        self.0.setup(t)
    }
    fn apply(&mut self, t: &Topology, s: &State) -> Result<(), OracleError> {
        self.0.apply(t, s)
    }
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<bool>, OracleError> {
        self.0.probe(probes)
    }
}

#[test]
fn an_oracle_without_connections_says_so() {
    let plan = Plan::parse("t.yaml", &file(TWO_CONNECTIONS)).expect("valid");
    let mut out = Vec::new();
    let err = run_plan(&plan, &mut NoConnections::default(), &mut out).expect_err("unsupported");
    assert!(
        err.to_string()
            .contains("a probe-only oracle cannot keep long-lived connections (connection web)"),
        "{err}"
    );
}

#[test]
fn simulations_refuse_to_open_a_denied_connection() {
    // Valid when opened; the oracle is then asked to open it again under the deny.
    let plan = Plan::parse("t.yaml", &revalidation_file("{cut: [web]}")).expect("valid");
    let web = plan.steps[0].connections.open[0].clone();
    assert_eq!(web.dst, EndpointName::Pod(ObjectKey::new("x", "b")));
    for mut oracle in [
        Box::new(ReferenceOracle::default()) as Box<dyn Oracle>,
        Box::new(KernelModelOracle::default()),
        Box::new(CheckedSimulation::default()),
    ] {
        oracle.setup(&plan.topology).expect("setup");
        oracle
            .apply(&plan.topology, &plan.steps[1].state)
            .expect("apply");
        let err = oracle.open_connections(&[&web]).expect_err("denied");
        assert!(
            err.to_string()
                .contains("connection web x/a -> x/b TCP/80 IPv4 via pod cannot be opened"),
            "{err}"
        );
        // Checking a connection never opened is the runner's bug, not a verdict.
        let err = oracle.check_connections(&[&web]).expect_err("not open");
        assert!(err.to_string().contains("was not opened"), "{err}");
    }
}
