//! What the comparative benches (`peers`, `latency`, `scale`) write besides their console
//! table: `target/bench/<name>.json` and their own section of `BENCHMARKS.md` at the
//! workspace root, between `<!-- bench:<name> -->` and `<!-- /bench:<name> -->`. Each section
//! names the machine, kernel, date and commit it was measured on, since sections are
//! refreshed one bench at a time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes `target/bench/<name>.json` (pretty) and returns its path.
pub fn write_json(name: &str, body: &serde_json::Value) -> io::Result<PathBuf> {
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(context(format!("creating {}", dir.display())))?;
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(body)?;
    std::fs::write(&path, text).map_err(context(format!("writing {}", path.display())))?;
    println!("wrote {}", path.display());
    Ok(path)
}

/// One line naming where and when the figures were taken.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, v)| v.trim())
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        );
    format!(
        "{cpu}, {cpus} CPUs, {mem_gib:.0} GiB; Linux {kernel}; {}; commit {commit}",
        utc_now()
    )
}

/// The current time as `YYYY-MM-DD HH:MM UTC` (no date crate for one line).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Replaces the section `name` of `BENCHMARKS.md` with `body` (appended at the end when
/// the file has no such section yet). The body should start with its own heading.
pub fn write_section(name: &str, body: &str) -> io::Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = replace_section(&old, name, body);
    std::fs::write(&path, new).map_err(context(format!("writing {}", path.display())))?;
    println!("updated the `{name}` section of {}", path.display());
    Ok(())
}

fn replace_section(old: &str, name: &str, body: &str) -> String {
    let open = format!("<!-- bench:{name} -->");
    let close = format!("<!-- /bench:{name} -->");
    let block = format!("{open}\n{}\n{close}", body.trim_end());
    match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &old[..a], &old[b + close.len()..])
        }
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}{block}\n")
        }
    }
}

/// Median, least and greatest of some samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// The `q`-quantile (0..=1) of some durations, in milliseconds (nearest rank).
pub fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1].as_secs_f64() * 1e3
}

/// A Markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n", header.join(" | "));
    s += &format!("|{}\n", "---|".repeat(header.len()));
    for r in rows {
        s += &format!("| {} |\n", r.join(" | "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let doc = "# B\n\nintro\n";
        let one = replace_section(doc, "peers", "## Peers\nv1");
        assert_eq!(
            one,
            "# B\n\nintro\n\n<!-- bench:peers -->\n## Peers\nv1\n<!-- /bench:peers -->\n"
        );
        let two = replace_section(&one, "latency", "## Latency");
        let three = replace_section(&two, "peers", "## Peers\nv2\n");
        assert!(three.contains("## Peers\nv2\n<!-- /bench:peers -->"));
        assert!(!three.contains("v1"));
        assert!(three.ends_with("<!-- /bench:latency -->\n"));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&v, 0.5), 50.0);
        assert_eq!(quantile_ms(&v, 0.99), 99.0);
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    }
}
