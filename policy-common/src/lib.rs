//! Types shared by the kernel programs (`policy-ebpf`) and the agent (`policy-agent`).
//!
//! Everything that crosses the kernel/user boundary is defined here and only here: map names,
//! capacities, keys and values (`#[repr(C)]`, explicit padding, size asserts), verdict reasons,
//! conntrack timeouts, and the policy decision itself ([`decide`]), which the kernel programs
//! run over BPF maps and the agent's kernel model runs over the compiled map contents.
//!
//! Addresses are 16 bytes in network order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
//! CIDR keys carry a family bit in their first (always exact) word, and each family of a
//! policy-set has its own trie, so an IPv6 prefix such as `::/0` never covers the
//! IPv4-mapped range.
#![no_std]

pub mod addr;
pub mod ct;
pub mod ct_table;
pub mod decide;
pub mod maps;
pub mod reason;

pub use addr::Addr;
pub use maps::*;
pub use reason::{Direction, Reason};

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// TC return codes.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
