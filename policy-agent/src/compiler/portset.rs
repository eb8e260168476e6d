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

    /// The ranges that go to the `PORTS` trie, if they do not fit inline.
    pub fn needs_trie(&self) -> Option<&[(u8, u16, u16)]> {
        match self {
            PortSet::Ranges(r) if r.len() > INLINE_PORT_RANGES => Some(r),
            _ => None,
        }
    }

    /// Written alone: inline when it fits, else all of it in the trie.
    pub fn code(&self) -> PortCode {
        match self.needs_trie() {
            Some(r) => PortCode {
                inline: Vec::new(),
                all: false,
                trie: Some(r.to_vec()),
            },
            None => PortCode {
                inline: match self {
                    PortSet::All => Vec::new(),
                    PortSet::Ranges(r) => r.clone(),
                },
                all: matches!(self, PortSet::All),
                trie: None,
            },
        }
    }

    /// Written as the trie list `base` (which it must contain) plus what `base` lacks,
    /// inline; `None` when that does not fit inline. A more specific prefix thus shares its
    /// covering prefix's list instead of a copy of it with its own ports added: what keeps
    /// many narrow rules inside a broad one from multiplying the trie.
    pub fn code_over(&self, base: &[(u8, u16, u16)]) -> Option<PortCode> {
        let PortSet::Ranges(mine) = self else {
            return None;
        };
        let rest = subtract(mine, base)?;
        (rest.len() <= INLINE_PORT_RANGES).then(|| PortCode {
            inline: rest,
            all: false,
            trie: Some(base.to_vec()),
        })
    }
}

/// How a port-set is written into a `RuleValue`: up to [`INLINE_PORT_RANGES`] ranges inline
/// and, for more, a list in the `PORTS` trie (numbered by content, so equal lists are one).
/// A port is admitted when an inline range or the list holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortCode {
    pub inline: Vec<(u8, u16, u16)>,
    /// Every protocol and port.
    pub all: bool,
    pub trie: Option<Vec<(u8, u16, u16)>>,
}

impl PortCode {
    /// The rule value; `port_set` is the number of the trie list, if it has one.
    pub fn rule_value(&self, port_set: u32) -> RuleValue {
        let mut v = RuleValue::default();
        if self.all {
            v.flags = rule_flags::ALL;
            return v;
        }
        for (slot, &(proto, first, last)) in v.ranges.iter_mut().zip(&self.inline) {
            *slot = PortRange {
                first,
                last,
                proto,
                _pad: [0; 3],
            };
        }
        if self.trie.is_some() {
            v.flags = rule_flags::PORT_SET;
            v.port_set = port_set;
        }
        v
    }
}

/// `mine` minus `base` (both sorted and merged), or `None` when `base` is not within
/// `mine`: each of its ranges must lie inside one of `mine`'s. One merge walk of both.
fn subtract(mine: &[(u8, u16, u16)], base: &[(u8, u16, u16)]) -> Option<Vec<(u8, u16, u16)>> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(p, f, l) in mine {
        // A base range starting before this one was not inside an earlier one either.
        if base.get(j).is_some_and(|b| (b.0, b.1) < (p, f)) {
            return None;
        }
        let mut next = u32::from(f);
        while let Some(&(_, bf, bl)) = base.get(j).filter(|b| b.0 == p && b.1 <= l) {
            if bl > l {
                return None;
            }
            if u32::from(bf) > next {
                out.push((p, next as u16, bf - 1));
            }
            next = u32::from(bl) + 1;
            j += 1;
        }
        if next <= u32::from(l) {
            out.push((p, next as u16, l));
        }
    }
    (j == base.len()).then_some(out)
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
    fn a_port_set_over_its_base_keeps_only_the_rest_inline() {
        let base = vec![
            (6, 100, 100),
            (6, 200, 300),
            (6, 400, 400),
            (6, 500, 500),
            (17, 53, 53),
        ];
        let mut mine = base.clone();
        mine.extend([(6, 80, 80), (6, 301, 310), (6, 350, 360)]);
        let ps = PortSet::from_ranges(mine);
        let code = ps.code_over(&base).expect("fits");
        assert_eq!(code.inline, vec![(6, 80, 80), (6, 301, 310), (6, 350, 360)]);
        assert_eq!(code.trie.as_deref(), Some(&base[..]));
        let v = code.rule_value(9);
        assert_eq!((v.flags, v.port_set), (rule_flags::PORT_SET, 9));
        assert_eq!(
            (v.ranges[0].first, v.ranges[2].last, v.ranges[3].proto),
            (80, 360, 0)
        );
        // A base reaching outside the set cannot be used; nor can a rest past the inline slots.
        assert!(ps.code_over(&[(6, 1, 2)]).is_none());
        let wide =
            PortSet::from_ranges((0..6).map(|i| (6, 1000 + 10 * i, 1000 + 10 * i)).collect());
        assert!(wide.code_over(&[(6, 1000, 1000)]).is_none());
        assert!(PortSet::All.code_over(&base).is_none());
        assert!(PortSet::All.code().rule_value(0).flags == rule_flags::ALL);
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
