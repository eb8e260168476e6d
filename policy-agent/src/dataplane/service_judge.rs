//! Service egress judged where no pod or uplink hook sees it.
//!
//! A pod hook defers egress to a Service ClusterIP (the real destination exists only after
//! kube-proxy's DNAT); the hook the translated packet meets next judges it. When the
//! backend is the node itself (a hostNetwork pod, an API server endpoint) the packet is
//! delivered locally and meets no TC hook; when it leaves through an interface without
//! programs, none either. So the `service_judge` program (a socket filter over the same
//! maps) is run by one iptables rule in the node's namespace, in INPUT and FORWARD, on the
//! original direction of DNATed connections only: after DNAT, on the real destination. It
//! drops what the client's egress policy refuses and grants the virtual tuple otherwise.
//!
//! Why this mechanism: netfilter is the only place after DNAT that every translated
//! packet crosses, and `xt_bpf` runs a pinned program there with no kernel module of ours
//! and no kfunc (a BPF netfilter link would need kfunc relocations the loader lacks). The
//! conntrack match keeps it off every other packet of the node.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Our chain in the filter table of both families.
pub const CHAIN: &str = "NETPOL-SERVICE";
/// The built-in chains that jump to it: local delivery and forwarding, both after DNAT.
const PARENTS: [&str; 2] = ["INPUT", "FORWARD"];
const TOOLS: [&str; 2] = ["iptables", "ip6tables"];

#[derive(Debug, thiserror::Error)]
pub enum ServiceJudgeError {
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} {args}: {stderr}")]
    Failed {
        tool: String,
        args: String,
        stderr: String,
    },
}

/// The ruleset `iptables-restore --noflush` applies in one commit: the chain (emptied if
/// it exists) with a rule per judge, so a restart swaps the program without a moment
/// unjudged. Two judges during a map migration: the old programs defer into the old maps,
/// which only the old judge reads; a packet is dropped if either refuses it, and a judge
/// that finds no deferral of its own passes it on.
pub fn ruleset(pins: &[&Path]) -> String {
    let mut r = format!("*filter\n:{CHAIN} - [0:0]\n");
    for pin in pins {
        r.push_str(&format!(
            "-A {CHAIN} -m conntrack --ctstate DNAT --ctdir ORIGINAL \
             -m bpf --object-pinned {} -j DROP\n",
            pin.display()
        ));
    }
    r.push_str("COMMIT\n");
    r
}

/// Installs (or replaces) the rules running the programs pinned at `pins`, for both
/// families, and the jumps to them (calling thread's namespace).
pub fn install(pins: &[&Path]) -> Result<(), ServiceJudgeError> {
    for tool in TOOLS {
        restore(&format!("{tool}-restore"), &ruleset(pins))?;
        for parent in PARENTS {
            if run(tool, &["-w", "-C", parent, "-j", CHAIN]).is_err() {
                run(tool, &["-w", "-I", parent, "1", "-j", CHAIN])?;
            }
        }
    }
    Ok(())
}

/// Removes the jumps and the chain (nothing left to remove is not an error).
pub fn remove() -> Result<(), ServiceJudgeError> {
    for tool in TOOLS {
        for parent in PARENTS {
            while run(tool, &["-w", "-D", parent, "-j", CHAIN]).is_ok() {}
        }
        if run(tool, &["-w", "-F", CHAIN]).is_ok() {
            run(tool, &["-w", "-X", CHAIN])?;
        }
    }
    Ok(())
}

fn run(tool: &str, args: &[&str]) -> Result<(), ServiceJudgeError> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ServiceJudgeError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServiceJudgeError::Failed {
            tool: tool.to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn restore(tool: &str, rules: &str) -> Result<(), ServiceJudgeError> {
    let spawn_err = |source| ServiceJudgeError::Spawn {
        tool: tool.to_string(),
        source,
    };
    let mut child = Command::new(tool)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServiceJudgeError::Failed {
            tool: tool.to_string(),
            args: "--noflush".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_the_chain_in_one_commit_and_judges_only_translated_originals() {
        let r = ruleset(&[Path::new("/sys/fs/bpf/netpol/service_judge")]);
        assert!(r.starts_with("*filter\n:NETPOL-SERVICE - [0:0]\n"), "{r}");
        assert!(r.contains("--ctstate DNAT --ctdir ORIGINAL"), "{r}");
        assert!(
            r.contains("-m bpf --object-pinned /sys/fs/bpf/netpol/service_judge -j DROP"),
            "{r}"
        );
        assert!(r.ends_with("COMMIT\n"), "{r}");
    }

    #[test]
    fn a_migration_judges_with_the_old_and_the_new_program_in_one_commit() {
        let (old, new) = (
            Path::new("/sys/fs/bpf/netpol/service_judge"),
            Path::new("/sys/fs/bpf/netpol/upgrade/service_judge"),
        );
        let r = ruleset(&[old, new]);
        let rules: Vec<&str> = r.lines().filter(|l| l.starts_with("-A ")).collect();
        assert_eq!(rules.len(), 2, "{r}");
        assert!(rules[0].contains(&format!("--object-pinned {} -j DROP", old.display())));
        assert!(rules[1].contains(&format!("--object-pinned {} -j DROP", new.display())));
        assert_eq!(r.matches("COMMIT").count(), 1, "{r}");
    }
}
