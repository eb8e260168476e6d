//! The latency bench's console lines, `target/bench/latency.json` and its section of
//! `BENCHMARKS.md`.

use std::time::Duration;

use anyhow::Result;
use policy_testkit::bench_report::{machine, quantile_ms, table, write_json, write_section};
use serde_json::{Map, Value, json};

use crate::objects::Load;
use crate::{Case, Mode};

fn p(v: &[Duration], q: f64) -> f64 {
    quantile_ms(v, q)
}

fn max_ms(v: &[Duration]) -> f64 {
    v.iter().max().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

pub fn print_case(mode: Mode, load: Load, c: &Case) {
    let load = if load == Load::Full {
        "loaded"
    } else {
        "empty"
    };
    println!(
        "  {:<10} {load:<6} open p50 {:7.1} p99 {:7.1} max {:7.1} | close p50 {:7.1} p99 {:7.1} \
         max {:7.1} ms | {} missed | started in {:.1} s",
        mode.name(),
        p(&c.open, 0.5),
        p(&c.open, 0.99),
        max_ms(&c.open),
        p(&c.close, 0.5),
        p(&c.close, 0.99),
        max_ms(&c.close),
        c.missed,
        c.started.as_secs_f64()
    );
    if !c.pod_start.is_empty() {
        println!(
            "  {:<10} {load:<6} pod start p50 {:7.1} p99 {:7.1} max {:7.1} ms (plumbing alone \
             p50 {:.1} p99 {:.1})",
            mode.name(),
            p(&c.pod_start, 0.5),
            p(&c.pod_start, 0.99),
            max_ms(&c.pod_start),
            p(&c.plumbing, 0.5),
            p(&c.plumbing, 0.99)
        );
    }
}

/// One mode's figures under the key names.
fn mode_json(cases: &[(Mode, Load, Case)], mode: Mode) -> Map<String, Value> {
    let mut m = Map::new();
    for (md, load, c) in cases {
        if *md != mode {
            continue;
        }
        let prefix = if *load == Load::Full { "loaded_" } else { "" };
        for (what, v) in [("open", &c.open), ("close", &c.close)] {
            m.insert(format!("{prefix}{what}_p50_ms"), json!(p(v, 0.5)));
            m.insert(format!("{prefix}{what}_p99_ms"), json!(p(v, 0.99)));
            m.insert(format!("{prefix}{what}_max_ms"), json!(max_ms(v)));
            m.insert(format!("{prefix}{what}_samples"), json!(v.len()));
        }
        m.insert(format!("{prefix}missed"), json!(c.missed));
        m.insert(
            format!("{prefix}agent_start_ms"),
            json!(c.started.as_secs_f64() * 1e3),
        );
        if !c.pod_start.is_empty() {
            m.insert("pod_start_p50_ms".into(), json!(p(&c.pod_start, 0.5)));
            m.insert("pod_start_p99_ms".into(), json!(p(&c.pod_start, 0.99)));
            m.insert("pod_start_samples".into(), json!(c.pod_start.len()));
            m.insert("pod_plumbing_p50_ms".into(), json!(p(&c.plumbing, 0.5)));
            m.insert("pod_plumbing_p99_ms".into(), json!(p(&c.plumbing, 0.99)));
        }
    }
    m
}

fn cell(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.1} / {:.1} / {:.1}", p(v, 0.5), p(v, 0.99), max_ms(v))
}

/// Writes the JSON (standalone at the top level, cluster mode beside it) and the section.
pub fn write(cases: &[(Mode, Load, Case)], changes: usize, took: Duration) -> Result<()> {
    let mut top = mode_json(cases, Mode::Standalone);
    top.insert(
        "cluster".into(),
        Value::Object(mode_json(cases, Mode::Cluster)),
    );
    top.insert(
        "method".into(),
        json!({"attempt_every_ms": 1, "attempt_deadline_ms": crate::DEADLINE.as_millis() as u64,
               "settle_ms": crate::SETTLE.as_millis() as u64, "changes_per_direction": changes,
               "loaded": "10000 pods over 100 nodes (100 local), 1000 policies"}),
    );
    write_json("latency", &Value::Object(top))?;
    let mut rows = Vec::new();
    for (mode, load, c) in cases {
        let load = if *load == Load::Full {
            "10k pods, 1k policies"
        } else {
            "empty"
        };
        rows.push(vec![
            mode.name().to_string(),
            load.to_string(),
            cell(&c.open),
            cell(&c.close),
            if c.pod_start.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} (plumbing {:.1})",
                    cell(&c.pod_start),
                    p(&c.plumbing, 0.5)
                )
            },
            format!("{} + {}", c.open.len(), c.close.len()),
            c.missed.to_string(),
        ]);
    }
    let body = format!(
        "## Enforcement latency\n\n{}\n\nMeasured by `cargo xtask bench latency` in {:.0} s \
         (ms, p50 / p99 / max):\n\n{}\n{}",
        machine(),
        took.as_secs_f64(),
        table(
            &[
                "mode",
                "cluster",
                "change written -> first allowed",
                "change written -> first refused",
                "pod written -> programs enforcing",
                "changes",
                "missed",
            ],
            &rows
        ),
        crate::reading::TEXT,
    );
    write_section("latency", &body)?;
    Ok(())
}
