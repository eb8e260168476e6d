//! Port-sets: what a matched peer may use, and their encoding in `RuleValue`s and the `PORTS`
//! trie.

use policy_common::maps::{
    INLINE_PORT_RANGES, LpmKey, PortData, PortRange, RuleValue, port_prefixlen, rule_flags,
};

/// Allowed protocols and ports towards one peer. `Ranges` holds sorted, merged, inclusive
/// `(protocol, first, last)` ranges; an empty `Ranges` allows nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSet {
    /// Every protocol and port (a rule without `ports`).
    All,
    Ranges(Vec<(u8, u16, u16)>),
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet::Ranges(Vec::new())
    }
}

impl PortSet {
    pub fn is_empty(&self) -> bool {
        matches!(self, PortSet::Ranges(r) if r.is_empty())
    }

    /// Adds everything `other` allows.
    pub fn union_with(&mut self, other: &PortSet) {
        match (&mut *self, other) {
            (PortSet::All, _) => {}
            (_, PortSet::All) => *self = PortSet::All,
            (PortSet::Ranges(a), PortSet::Ranges(b)) => {
                if b.is_empty() {
                    return;
                }
                a.extend_from_slice(b);
                normalize(a);
            }
        }
    }

    pub fn from_ranges(mut ranges: Vec<(u8, u16, u16)>) -> PortSet {
        normalize(&mut ranges);
        PortSet::Ranges(ranges)
    }

    /// The rule value; `port_set` is the number of its `PORTS` entries when it has more
    /// ranges than fit inline (see [`needs_trie`]).
    pub fn rule_value(&self, port_set: u32) -> RuleValue {
        let mut v = RuleValue::default();
        match self {
            PortSet::All => v.flags = rule_flags::ALL,
            PortSet::Ranges(r) if r.len() <= INLINE_PORT_RANGES => {
                for (slot, &(proto, first, last)) in v.ranges.iter_mut().zip(r) {
                    *slot = PortRange {
                        first,
                        last,
                        proto,
                        _pad: [0; 3],
                    };
                }
            }
            PortSet::Ranges(_) => {
                v.flags = rule_flags::PORT_SET;
                v.port_set = port_set;
            }
        }
        v
    }

    /// The ranges that go to the `PORTS` trie, if they do not fit inline.
    pub fn needs_trie(&self) -> Option<&[(u8, u16, u16)]> {
        match self {
            PortSet::Ranges(r) if r.len() > INLINE_PORT_RANGES => Some(r),
            _ => None,
        }
    }
}

fn normalize(r: &mut Vec<(u8, u16, u16)>) {
    r.sort_unstable();
    let mut out: Vec<(u8, u16, u16)> = Vec::with_capacity(r.len());
    for &(p, f, l) in r.iter() {
        if let Some(last) = out.last_mut()
            && last.0 == p
            && u32::from(f) <= u32::from(last.2) + 1
        {
            last.2 = last.2.max(l);
            continue;
        }
        out.push((p, f, l));
    }
    *r = out;
}

/// The `PORTS` keys of a port-set: each range as the minimal set of aligned prefixes.
pub fn trie_keys(port_set: u32, ranges: &[(u8, u16, u16)], out: &mut Vec<LpmKey<PortData>>) {
    for &(proto, first, last) in ranges {
        let (mut lo, hi) = (u32::from(first), u32::from(last));
        while lo <= hi {
            // Largest aligned block starting at lo that stays within hi.
            let mut bits = if lo == 0 {
                16
            } else {
                lo.trailing_zeros().min(16)
            };
            while bits > 0 && lo + (1 << bits) - 1 > hi {
                bits -= 1;
            }
            out.push(LpmKey {
                prefixlen: port_prefixlen(16 - bits as u8),
                data: PortData::new(port_set, proto, lo as u16),
            });
            lo += 1 << bits;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_adjacent_ranges() {
        let mut a = PortSet::from_ranges(vec![(6, 80, 80), (6, 82, 90)]);
        a.union_with(&PortSet::from_ranges(vec![(6, 81, 81), (17, 53, 53)]));
        assert_eq!(a, PortSet::Ranges(vec![(6, 80, 90), (17, 53, 53)]));
        a.union_with(&PortSet::All);
        assert_eq!(a, PortSet::All);
    }

    #[test]
    fn prefixes_cover_exactly() {
        for &(f, l) in &[
            (0u16, 65535u16),
            (1, 65535),
            (80, 80),
            (1000, 2000),
            (65535, 65535),
            (3, 4),
        ] {
            let mut keys = Vec::new();
            trie_keys(7, &[(6, f, l)], &mut keys);
            let mut covered = 0u32;
            for k in &keys {
                let bits = 64 - k.prefixlen;
                let start = u32::from(u16::from_be(k.data.port_be));
                assert_eq!(start & ((1 << bits) - 1), 0);
                assert!(start >= u32::from(f) && start + (1 << bits) - 1 <= u32::from(l));
                covered += 1 << bits;
            }
            assert_eq!(covered, u32::from(l) - u32::from(f) + 1);
        }
    }
}
