//! A userspace model of the kernel's lookups over compiled map contents: hash maps looked up
//! exactly, LPM tries by longest-prefix match, and the shared [`decide`] on top. Property
//! tests compare it with the reference evaluator.

use std::collections::HashMap;
use std::net::IpAddr;

use policy_common::decide::{PolicyMaps, decide};
use policy_common::maps::*;
use policy_common::{Direction, Reason};

use crate::compiler::{MapContents, addr_of};

/// LPM entries of one exact leading part: (prefix length, key bytes, value).
type CidrEntries = Vec<(u32, [u8; 20], RuleValue)>;
type PortEntries = Vec<(u32, [u8; 8])>;

pub struct KernelModel<'a> {
    pub maps: &'a MapContents,
    /// LPM entries grouped by their always-exact leading word(s), for quick scans.
    cidr_by_set: HashMap<u32, CidrEntries>,
    ports_by_set: HashMap<(u32, u8), PortEntries>,
}

/// Whether the first `bits` bits of two byte strings agree.
fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    a[full] & mask == b[full] & mask
}

fn cidr_bytes(d: &CidrData) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&u32::from_be(d.set_family_be).to_be_bytes());
    b[4..].copy_from_slice(&d.addr.octets());
    b
}

fn port_bytes(d: &PortData) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&u32::from_be(d.port_set_be).to_be_bytes());
    b[4] = d.proto;
    b[5] = d._pad;
    b[6..].copy_from_slice(&u16::from_be(d.port_be).to_be_bytes());
    b
}

impl<'a> KernelModel<'a> {
    pub fn new(maps: &'a MapContents) -> Self {
        let mut cidr_by_set: HashMap<u32, CidrEntries> = HashMap::new();
        for (k, v) in &maps.cidr_rules {
            cidr_by_set.entry(k.data.set_family_be).or_default().push((
                k.prefixlen,
                cidr_bytes(&k.data),
                *v,
            ));
        }
        let mut ports_by_set: HashMap<(u32, u8), PortEntries> = HashMap::new();
        for k in maps.ports.keys() {
            ports_by_set
                .entry((k.data.port_set_be, k.data.proto))
                .or_default()
                .push((k.prefixlen, port_bytes(&k.data)));
        }
        KernelModel {
            maps,
            cidr_by_set,
            ports_by_set,
        }
    }

    /// The decision for a new flow at one endpoint, `None` when `local` is not an endpoint.
    pub fn decide_at(
        &self,
        local: IpAddr,
        dir: Direction,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<Reason> {
        let ep = self.maps.endpoints.get(&EndpointKey {
            addr: addr_of(local),
        })?;
        Some(decide(self, ep, dir, &addr_of(peer), proto, port))
    }

    /// Whether a new flow from `src` to `dst` passes: the source's egress if it is a local
    /// endpoint, and the destination's ingress if it is one.
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: u8, dst_port: u16) -> bool {
        let egress = self.decide_at(src, Direction::Egress, dst, proto, dst_port);
        let ingress = self.decide_at(dst, Direction::Ingress, src, proto, dst_port);
        egress.is_none_or(Reason::is_allow) && ingress.is_none_or(Reason::is_allow)
    }
}

impl PolicyMaps for KernelModel<'_> {
    fn ipcache(&self, key: &IpCacheKey) -> Option<IpCacheValue> {
        self.maps.ipcache.get(key).copied()
    }

    fn rule(&self, key: &RuleKey) -> Option<RuleValue> {
        self.maps.rules.get(key).copied()
    }

    fn cidr_rule(&self, key: &LpmKey<CidrData>) -> Option<RuleValue> {
        let want = cidr_bytes(&key.data);
        // Entries of other policy-sets or families differ in the first 32 bits, which every
        // key covers (prefixlen >= 32), so they can never match.
        self.cidr_by_set
            .get(&key.data.set_family_be)?
            .iter()
            .filter(|(len, bytes, _)| *len <= key.prefixlen && prefix_eq(bytes, &want, *len))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, v)| *v)
    }

    fn port(&self, key: &LpmKey<PortData>) -> bool {
        let want = port_bytes(&key.data);
        self.ports_by_set
            .get(&(key.data.port_set_be, key.data.proto))
            .is_some_and(|v| {
                v.iter()
                    .any(|(len, bytes)| *len <= key.prefixlen && prefix_eq(bytes, &want, *len))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::{cidr_key, portset};

    fn rv(port: u16) -> RuleValue {
        let mut v = RuleValue::default();
        v.ranges[0] = PortRange {
            first: port,
            last: port,
            proto: 6,
            _pad: [0; 3],
        };
        v
    }

    fn lookup(m: &KernelModel<'_>, set: u32, a: &str) -> Option<u16> {
        let addr = addr_of(a.parse().expect("ip"));
        m.cidr_rule(&LpmKey {
            prefixlen: CIDR_LOOKUP_PREFIXLEN,
            data: CidrData::new(set, addr),
        })
        .map(|v| v.ranges[0].first)
    }

    #[test]
    fn longest_prefix_wins_within_set_and_family() {
        let mut c = MapContents::default();
        for (set, net, port) in [
            (1, "198.18.0.0/15", 1),
            (1, "198.18.0.0/17", 2),
            (1, "198.18.0.0/25", 3),
            (2, "0.0.0.0/0", 4),
            (1, "::/0", 5),
            (1, "fd00::/9", 6),
        ] {
            c.cidr_rules
                .insert(cidr_key(set, &net.parse().expect("net")), rv(port));
        }
        let m = KernelModel::new(&c);
        assert_eq!(lookup(&m, 1, "198.18.0.1"), Some(3));
        assert_eq!(lookup(&m, 1, "198.18.0.200"), Some(2));
        assert_eq!(lookup(&m, 1, "198.18.200.1"), Some(1));
        assert_eq!(lookup(&m, 1, "198.19.255.255"), Some(1));
        assert_eq!(lookup(&m, 1, "198.20.0.0"), None, "::/0 never covers IPv4");
        assert_eq!(lookup(&m, 2, "198.20.0.0"), Some(4));
        assert_eq!(lookup(&m, 2, "fd00::1"), None);
        assert_eq!(lookup(&m, 1, "fd00::1"), Some(6));
        assert_eq!(lookup(&m, 1, "fd80::1"), Some(5), "/9 splits inside a byte");
        assert_eq!(lookup(&m, 3, "198.18.0.1"), None);
    }

    #[test]
    fn port_trie_matches_prefixes_of_its_own_set_and_protocol() {
        let mut c = MapContents::default();
        let mut keys = Vec::new();
        portset::trie_keys(7, &[(17, 1000, 1999)], &mut keys);
        for k in keys {
            c.ports.insert(k, 1);
        }
        let m = KernelModel::new(&c);
        let q = |set: u32, proto: u8, port: u16| {
            m.port(&LpmKey {
                prefixlen: PORT_LOOKUP_PREFIXLEN,
                data: PortData::new(set, proto, port),
            })
        };
        assert!(q(7, 17, 1000) && q(7, 17, 1999) && q(7, 17, 1500));
        assert!(!q(7, 17, 999) && !q(7, 17, 2000) && !q(7, 6, 1500) && !q(8, 17, 1500));
    }

    #[test]
    fn unknown_addresses_are_not_endpoints() {
        let c = MapContents::default();
        let m = KernelModel::new(&c);
        let a: IpAddr = "198.18.0.1".parse().expect("ip");
        assert!(m.decide_at(a, Direction::Ingress, a, 6, 80).is_none());
        assert!(m.allowed(a, a, 6, 80));
    }
}
