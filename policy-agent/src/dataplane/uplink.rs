//! Uplinks: the node's non-pod interfaces, where `from_world` / `to_world` judge what the
//! pod hooks cannot (a pod whose veth has no program yet, a Service DNATed to a remote
//! backend). They pass everything that involves no local endpoint, so the node's own
//! traffic is never affected.

use std::collections::BTreeSet;
use std::str::FromStr;

/// Which interfaces get the uplink programs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum UplinkMode {
    /// Every interface of the namespace that is neither `lo` nor a local pod's veth,
    /// recomputed as pods come and go.
    #[default]
    Auto,
    /// No uplink programs.
    None,
    /// Exactly these interfaces (those present).
    List(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--uplink {value:?}: expected auto, none or a comma-separated list of interface names ({reason})"
)]
pub struct UplinkParseError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for UplinkMode {
    type Err = UplinkParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UplinkParseError {
            value: s.to_string(),
            reason,
        };
        match s.trim() {
            "auto" => Ok(UplinkMode::Auto),
            "none" => Ok(UplinkMode::None),
            "" => Err(err("empty")),
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                for n in &names {
                    if n.is_empty() {
                        return Err(err("empty interface name"));
                    }
                    if n.len() >= libc::IF_NAMESIZE || n.contains(['/', ' ']) {
                        return Err(err("not an interface name"));
                    }
                }
                Ok(UplinkMode::List(names))
            }
        }
    }
}

/// Interface names of the calling thread's network namespace.
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed once below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

/// The uplinks among `present` interfaces, given the local pods' interfaces.
pub fn select(
    mode: &UplinkMode,
    present: &[String],
    pod_ifaces: &BTreeSet<String>,
) -> BTreeSet<String> {
    match mode {
        UplinkMode::None => BTreeSet::new(),
        UplinkMode::Auto => present
            .iter()
            .filter(|i| i.as_str() != "lo" && !pod_ifaces.contains(*i))
            .cloned()
            .collect(),
        // Named explicitly, but a pod's veth still gets the pod programs, never both.
        UplinkMode::List(names) => names
            .iter()
            .filter(|n| present.contains(n) && !pod_ifaces.contains(*n))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag() {
        assert_eq!("auto".parse(), Ok(UplinkMode::Auto));
        assert_eq!("none".parse(), Ok(UplinkMode::None));
        assert_eq!(
            "eth0, bond0".parse(),
            Ok(UplinkMode::List(vec!["eth0".into(), "bond0".into()]))
        );
        assert!("".parse::<UplinkMode>().is_err());
        assert!("eth0,,eth1".parse::<UplinkMode>().is_err());
        assert!("averyveryverylongname".parse::<UplinkMode>().is_err());
    }

    #[test]
    fn auto_is_everything_but_lo_and_pod_veths() {
        let present: Vec<String> = ["lo", "eth0", "vpod1", "vext1"].map(String::from).to_vec();
        let pods: BTreeSet<String> = ["vpod1".to_string()].into();
        let got = select(&UplinkMode::Auto, &present, &pods);
        assert_eq!(got, ["eth0", "vext1"].map(String::from).into());
        assert!(select(&UplinkMode::None, &present, &pods).is_empty());
        let list = UplinkMode::List(vec!["eth0".into(), "vpod1".into(), "gone0".into()]);
        assert_eq!(select(&list, &present, &pods), ["eth0".to_string()].into());
    }

    #[test]
    fn lists_this_namespaces_interfaces() {
        assert!(
            interfaces().iter().any(|i| i == "lo"),
            "every namespace has lo"
        );
    }
}
