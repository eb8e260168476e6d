//! Uplinks: the node's non-pod interfaces, where `from_world` / `to_world` judge what the
//! pod hooks cannot (a pod whose veth has no program yet, a Service DNATed to a remote
//! backend). They pass everything that involves no local endpoint, so the node's own
//! traffic is never affected.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use super::{AttachMode, Attachment, Dataplane};

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
#[error("--uplink {value:?}: expected auto, none or a comma-separated list of interface names ({reason})")]
pub struct UplinkParseError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for UplinkMode {
    type Err = UplinkParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UplinkParseError { value: s.to_string(), reason };
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
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

/// The uplinks among `present` interfaces, given the local pods' interfaces.
pub fn select(mode: &UplinkMode, present: &[String], pod_ifaces: &BTreeSet<String>) -> BTreeSet<String> {
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

/// The uplink attachments of one agent, kept in step with the interfaces present.
#[derive(Debug, Default)]
pub struct Uplinks {
    /// Interface name -> (ifindex when attached, the attachment).
    attached: BTreeMap<String, (u32, Attachment)>,
    /// Attach failures by ifindex: not retried until the interface changes.
    failed: BTreeMap<String, u32>,
}

impl Uplinks {
    /// Interfaces with the uplink programs attached.
    pub fn names(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    pub fn contains(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    /// Records an attachment taken over from an earlier agent's pins.
    pub fn adopt(&mut self, iface: String, ifindex: u32, a: Attachment) {
        self.attached.insert(iface, (ifindex, a));
    }

    /// Attaches the uplink programs where `mode` wants them now and detaches them where
    /// not (gone interfaces, or ones that turned out to be a pod's veth).
    pub fn sync(
        &mut self,
        dp: &mut Dataplane,
        mode: &UplinkMode,
        attach: AttachMode,
        pod_ifaces: &BTreeSet<String>,
    ) {
        let want = select(mode, &interfaces(), pod_ifaces);
        let drop: Vec<String> = self
            .attached
            .iter()
            .filter(|(iface, (idx, _))| {
                !want.contains(*iface) || crate::netinfo::ifindex(iface) != Some(*idx)
            })
            .map(|(iface, _)| iface.clone())
            .collect();
        for iface in drop {
            if let Some((_, a)) = self.attached.remove(&iface)
                && let Err(e) = dp.detach(a)
            {
                tracing::debug!(interface = %iface, error = %e, "detach uplink");
            }
        }
        for iface in &want {
            if self.attached.contains_key(iface) {
                continue;
            }
            let Some(idx) = crate::netinfo::ifindex(iface) else { continue };
            if self.failed.get(iface) == Some(&idx) {
                continue;
            }
            match dp.attach_uplink(iface, attach) {
                Ok(a) => {
                    tracing::info!(interface = %iface, "uplink programs attached");
                    self.failed.remove(iface);
                    self.attached.insert(iface.clone(), (idx, a));
                }
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "uplink attach failed");
                    self.failed.insert(iface.clone(), idx);
                }
            }
        }
    }

    /// Leaves every attachment in place for the next agent.
    pub fn release_all(&mut self, dp: &mut Dataplane) {
        for (_, (_, a)) in std::mem::take(&mut self.attached) {
            dp.release(a);
        }
    }

    /// Detaches (and unpins) every attachment.
    pub fn detach_all(&mut self, dp: &mut Dataplane) {
        for (iface, (_, a)) in std::mem::take(&mut self.attached) {
            if let Err(e) = dp.detach(a) {
                tracing::debug!(interface = %iface, error = %e, "detach uplink");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag() {
        assert_eq!("auto".parse(), Ok(UplinkMode::Auto));
        assert_eq!("none".parse(), Ok(UplinkMode::None));
        assert_eq!("eth0, bond0".parse(), Ok(UplinkMode::List(vec!["eth0".into(), "bond0".into()])));
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
        assert!(interfaces().iter().any(|i| i == "lo"), "every namespace has lo");
    }
}
