//! The `policy-scenario` binary (it belongs to this crate, so only its tests see
//! `CARGO_BIN_EXE_policy-scenario`): exit codes, the count line, mismatch marks, and invalid
//! files named before anything is built. The runner itself is tested in policy-agent's
//! `scenario_*` tests.

use std::path::{Path, PathBuf};
use std::process::Command;

const GOOD_STEP: &str = "  - expect: {default: allow}\n";

/// The workspace root (this crate is policy-agent/testkit).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

fn scenario_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_policy-scenario"))
        .args(args)
        .output()
        .expect("run policy-scenario");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scenario-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write temp file");
    p
}

#[test]
fn binary_passes_seed_files_and_ends_with_the_count_line() {
    let seed = workspace().join("scenarios/seed/seed-000-tenant-isolation.yaml");
    let (code, out, err) = scenario_bin(&["--simulate", seed.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().last(), Some("12 passed, 0 failed"), "{out}");
    assert!(out.contains("compiler + kernel model"), "{out}");
}

#[test]
fn binary_marks_mismatches_and_fails() {
    // Wrong on purpose: x/a -> x/b is allowed (expected deny: `!`), x/b -> x/a denied
    // (expected allow: `X`).
    let text = r#"
name: wrong
namespaces: {x: {}}
pods:
  - {namespace: x, name: a, labels: {pod: a}, ports: [{port: 80}]}
  - {namespace: x, name: b, labels: {pod: b}, ports: [{port: 80}]}
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: p, namespace: x}
      spec: {podSelector: {matchLabels: {pod: a}}}
    expect:
      default: deny
      allow: ["x/b -> x/a"]
"#;
    let f = temp_file("wrong.yaml", text);
    let (code, out, err) = scenario_bin(&["--simulate", f.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert_eq!(out.lines().last(), Some("0 passed, 2 failed"), "{out}");
    assert!(
        out.contains("FAIL x/b -> x/a TCP/80 IPv4: expected allow, got deny"),
        "{out}"
    );
    assert!(
        out.contains("FAIL x/a -> x/b TCP/80 IPv4: expected deny, got allow"),
        "{out}"
    );
    let row_a = out
        .lines()
        .find(|l| l.starts_with("x/a "))
        .expect("row x/a");
    let row_b = out
        .lines()
        .find(|l| l.starts_with("x/b "))
        .expect("row x/b");
    assert!(row_a.contains('!') && row_b.contains('X'), "{out}");
}

#[test]
fn binary_reports_invalid_files_and_usage() {
    let f = temp_file(
        "bad.yaml",
        &format!("name: t\nsteps:\n{GOOD_STEP}  - expect: {{default: allow, via: carrier}}\n"),
    );
    let (code, out, err) = scenario_bin(&["--simulate", f.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("bad.yaml: step 2 (steps[1]), field expect.via"),
        "{err}"
    );
    assert_eq!(out.lines().last(), Some("0 passed, 0 failed"), "{out}");

    let (code, _, err) = scenario_bin(&["--simulate", "/nonexistent/x.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/x.yaml") && err.contains("cannot read"),
        "{err}"
    );

    // The kernel runner checks the file before building anything.
    let (code, _, err) = scenario_bin(&[f.to_str().expect("path")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.yaml: step 2 (steps[1]), field expect.via"),
        "{err}"
    );

    let (code, _, _) = scenario_bin(&["--simulate"]);
    assert_eq!(code, 2);
}

#[test]
fn binary_checks_long_lived_connections_and_names_connection_errors() {
    let text = r#"
name: conns
namespaces: {x: {}}
pods:
  - {namespace: x, name: a, labels: {pod: a}, ports: [{port: 80}]}
  - {namespace: x, name: b, labels: {pod: b}, ports: [{port: 80}]}
steps:
  - open: [{name: web, from: x/a, to: x/b, port: TCP/80}]
    expect: {established: {default: alive}}
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: deny, namespace: x}
      spec: {podSelector: {matchLabels: {pod: b}}}
    expect:
      deny: ["* -> x/b"]
      established: {default: alive}
"#;
    let f = temp_file("conns.yaml", text);
    let (code, out, err) = scenario_bin(&["--simulate", f.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("  FAIL web x/a -> x/b TCP/80 IPv4 via pod: cut (expected alive)\n"),
        "{out}"
    );
    // 2 probes per step, one check per step.
    assert_eq!(out.lines().last(), Some("5 passed, 1 failed"), "{out}");

    // Closing a connection that is not open: named before anything runs.
    let bad_text = text.replace(
        "    expect: {established: {default: alive}}\n  - apply",
        "    expect: {established: {default: alive}}\n  - close: [dns]\n    apply",
    );
    let bad = temp_file("bad-conns.yaml", &bad_text);
    let (code, _, err) = scenario_bin(&["--simulate", bad.to_str().expect("path")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "bad-conns.yaml: step 2 (steps[1]), field close[0]: no connection \"dns\" is open"
        ),
        "{err}"
    );
}
