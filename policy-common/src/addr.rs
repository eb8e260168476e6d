//! The 16-byte address used in every key.

/// An IP address as 16 bytes in network order. IPv4 is IPv4-mapped (`::ffff:a.b.c.d`).
///
/// Stored as four `u32` words holding network-order bytes (so loads are word-sized in the
/// kernel); compare and hash it as bytes, never do arithmetic on the words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Addr(pub [u32; 4]);

const _: () = assert!(core::mem::size_of::<Addr>() == 16);

impl Addr {
    /// The IPv4-mapped prefix word `0000:ffff` in network order.
    const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// From the raw network-order word of an IPv4 header field.
    #[inline(always)]
    pub const fn from_v4_raw(word: u32) -> Self {
        Addr([0, 0, Self::V4_MAPPED_WORD2, word])
    }

    /// From IPv4 octets.
    #[inline(always)]
    pub const fn from_v4_octets(o: [u8; 4]) -> Self {
        Self::from_v4_raw(u32::from_ne_bytes(o))
    }

    /// From the 16 bytes of an IPv6 address.
    #[inline(always)]
    pub const fn from_v6_octets(o: [u8; 16]) -> Self {
        Addr([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// The 16 bytes in network order.
    #[inline(always)]
    pub const fn octets(&self) -> [u8; 16] {
        let a = self.0[0].to_ne_bytes();
        let b = self.0[1].to_ne_bytes();
        let c = self.0[2].to_ne_bytes();
        let d = self.0[3].to_ne_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// True for `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == Self::V4_MAPPED_WORD2
    }

    /// The IPv4 octets when this is a mapped IPv4 address.
    pub const fn v4_octets(&self) -> Option<[u8; 4]> {
        if self.is_v4() {
            Some(self.0[3].to_ne_bytes())
        } else {
            None
        }
    }
}
