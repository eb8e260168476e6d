//! Layout of the conntrack tables: set-associative hash tables in BPF array maps.
//!
//! An LRU hash map costs a conntrack lookup four nested kernel calls (lookup, hash, bucket
//! walk, key compare); on CPUs with return-stack mitigations each is dear, and the lookup was
//! most of an established flow's cost. Here a key hashes ([`bucket4`], [`bucket6`]) to one
//! bucket of [`CT_WAYS`] slots in an array map: the array step is inlined by the verifier and
//! the slots are compared in the program itself, so a lookup makes no call at all.
//!
//! A slot is guarded by its `seq` word (a sequence lock):
//! - 0: never used (or cleared); even: holds `key`; odd: being written.
//! - A writer claims a slot by compare-and-swap `s -> s + 1` from an even `s` it read (on
//!   failure it gives up: someone else is writing), writes key and value, then adds 1
//!   (atomically: an ordering point). Clearing ends with `seq = 0`.
//! - A reader takes a slot only when `seq` is even and non-zero, the key matches, and `seq`
//!   reads the same after the key was read.
//! - `value` fields of a slot holding its key are updated in place (flags, stamps), as in a
//!   hash map's value; a lost race loses one refresh, which the next packet repeats.
//!
//! Eviction is per bucket: a new connection takes the least recently seen slot (an empty one
//! reads as seen at 0): the LRU map's policy, within a bucket. A connection whose tuple is
//! already in the table (expired, or closed and reused) is rewritten in its own slot. The hash is seeded
//! (`Config::ct_seed`, random per table) so nobody can aim a flood at another flow's bucket.

use crate::maps::{CtKey, CtKey4, CtValue, MAX_CONNTRACK};

/// Slots per bucket.
pub const CT_WAYS: usize = 4;
/// Slots of a bucket one owner (`CtValue::owner`) may hold: a new entry of an owner holding
/// this many replaces one of its own. So a pod flooding the table with flows, answered or
/// not, holds at most half of it, and once it holds its share of a bucket it evicts nobody
/// else's there.
pub const CT_OWNER_SHARE: u32 = 2;
/// Buckets per table (a power of two).
pub const CT_BUCKETS: u32 = MAX_CONNTRACK / CT_WAYS as u32;
const _: () = assert!(CT_BUCKETS.is_power_of_two());

/// A `CONNTRACK4` slot (both addresses IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtSlot4 {
    pub seq: u64,
    pub key: CtKey4,
    pub value: CtValue,
}

/// A `CONNTRACK4` element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtBucket4 {
    pub slots: [CtSlot4; CT_WAYS],
}

/// A `CONNTRACK` slot (an IPv6 address on either side).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtSlot6 {
    pub seq: u64,
    pub key: CtKey,
    pub value: CtValue,
}

/// A `CONNTRACK` element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtBucket6 {
    pub slots: [CtSlot6; CT_WAYS],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<CtSlot4>() == 40);
    assert!(offset_of!(CtSlot4, key) == 8);
    assert!(offset_of!(CtSlot4, value) == 24);
    assert!(size_of::<CtBucket4>() == 160);
    assert!(size_of::<CtSlot6>() == 64);
    assert!(offset_of!(CtSlot6, key) == 8);
    assert!(offset_of!(CtSlot6, value) == 48);
    assert!(size_of::<CtBucket6>() == 256);
};

/// One murmur3 round: mixes a word into the state.
#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: every input bit reaches the low bits the bucket index takes.
#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Both ports as one word.
#[inline(always)]
const fn ports(port_a: u16, port_b: u16) -> u32 {
    port_a as u32 | (port_b as u32) << 16
}

/// The last step: the protocol and the key length go in before the finaliser.
#[inline(always)]
const fn last(h: u32, proto: u8, len: u32) -> u32 {
    finish(h ^ ((proto as u32) << 8 | len)) & (CT_BUCKETS - 1)
}

/// The bucket of a `CONNTRACK4` key.
#[inline(always)]
pub const fn bucket4(k: &CtKey4, seed: u32) -> u32 {
    let mut h = mix(seed, k.addr_a);
    h = mix(h, k.addr_b);
    h = mix(h, ports(k.port_a, k.port_b));
    last(h, k.proto, 16)
}

/// The bucket of a `CONNTRACK` key.
#[inline(always)]
pub const fn bucket6(k: &CtKey, seed: u32) -> u32 {
    let a = &k.addr_a.0;
    let b = &k.addr_b.0;
    let mut h = seed;
    h = mix(h, a[0]);
    h = mix(h, a[1]);
    h = mix(h, a[2]);
    h = mix(h, a[3]);
    h = mix(h, b[0]);
    h = mix(h, b[1]);
    h = mix(h, b[2]);
    h = mix(h, b[3]);
    h = mix(h, ports(k.port_a, k.port_b));
    last(h, k.proto, 40)
}

/// A slot holds a key (and is not being written).
#[inline(always)]
pub const fn seq_holds_key(seq: u64) -> bool {
    seq != 0 && seq & 1 == 0
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers and arrays of such types only, no implicit padding
    // (sizes asserted above).
    unsafe impl aya::Pod for CtBucket4 {}
    unsafe impl aya::Pod for CtBucket6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Addr;

    #[test]
    fn nearby_tuples_spread_over_the_buckets() {
        // 64k connections from one client to one server port: consecutive source ports.
        let mut used = [0u8; CT_BUCKETS as usize];
        for port in 0..65_535u16 {
            let k = CtKey4 {
                addr_a: 0x0a00_0001,
                addr_b: 0x0a00_0002,
                port_a: port,
                port_b: 80,
                proto: 6,
                _pad: [0; 3],
            };
            let b = bucket4(&k, 7) as usize;
            used[b] = used[b].saturating_add(1);
        }
        // A good hash leaves about 1/e of the buckets empty at load factor 1.
        let empty = used.iter().filter(|&&n| n == 0).count() as f64 / CT_BUCKETS as f64;
        assert!((0.30..0.45).contains(&empty), "empty share {empty}");
        assert!(used.iter().all(|&n| n < 12), "a bucket holds too many");
    }

    #[test]
    fn many_clients_of_one_service_spread_over_the_buckets() {
        // 64k IPv6 clients (consecutive addresses) of one server port, as TCP and as UDP.
        let mut used = [0u8; CT_BUCKETS as usize];
        for i in 0..32_768u32 {
            for proto in [6u8, 17] {
                let k = CtKey {
                    addr_a: Addr([0xfd, 0, 0, (i + 1).to_be()]),
                    addr_b: Addr([0xfd, 0, 1, 1]),
                    port_a: 40_000,
                    port_b: 443,
                    proto,
                    _pad: [0; 3],
                };
                let b = bucket6(&k, 99) as usize;
                used[b] = used[b].saturating_add(1);
            }
        }
        let empty = used.iter().filter(|&&n| n == 0).count() as f64 / CT_BUCKETS as f64;
        assert!((0.30..0.45).contains(&empty), "empty share {empty}");
    }

    #[test]
    fn the_seed_moves_a_key_to_another_bucket() {
        let k = CtKey {
            addr_a: Addr([0xfd, 0, 0, 1]),
            addr_b: Addr([0xfd, 0, 0, 2]),
            port_a: 1,
            port_b: 2,
            proto: 17,
            _pad: [0; 3],
        };
        let moved = (0..16)
            .filter(|s| bucket6(&k, *s) != bucket6(&k, s + 100))
            .count();
        assert!(moved >= 14, "{moved}");
    }
}
