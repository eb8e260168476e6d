//! Verdict reasons and directions: indices of the per-CPU counters and the reason of a deny
//! event.

/// Direction relative to the pod that owns the hook.
///
/// On the host side of a pod's veth, TC ingress sees what the pod sends (its `Egress`) and TC
/// egress sees what is sent to the pod (its `Ingress`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const COUNT: usize = 2;
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Why a packet was passed or dropped. `Reason as u32 + Direction as u32 * Reason::COUNT` is
/// the index in the `COUNTERS` per-CPU array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Not an IP packet (ARP and the like).
    AllowNonIp = 0,
    /// The endpoint is not isolated in this direction.
    AllowNotIsolated = 1,
    /// Conntrack hit: a packet, or a reply, of an allowed connection.
    AllowEstablished = 2,
    /// A rule whose peer selects the peer's identity.
    AllowIdentity = 3,
    /// A rule whose ipBlock covers the peer's address.
    AllowCidr = 4,
    /// Traffic from the node itself to its pods (kubelet probes).
    AllowHost = 5,
    /// An ICMP error quoting an allowed connection.
    AllowRelated = 6,
    /// A non-first fragment whose first fragment was allowed.
    AllowFragment = 7,
    /// IPv6 neighbour discovery, link-local and multicast control traffic.
    AllowLinkLocal = 8,
    /// Egress to a Service virtual IP: deferred to the hook that sees the DNATed packet.
    AllowServicePending = 9,
    /// An uplink packet that involves no local endpoint (the node's own traffic, transit).
    AllowNoEndpoint = 10,
    /// No rule of the endpoint's policies allows it.
    DenyPolicy = 11,
    /// Truncated or malformed headers on an isolated endpoint.
    DenyMalformed = 12,
    /// A non-first fragment without an allowed first fragment.
    DenyFragment = 13,
    /// The pod-side address of the packet is not a known endpoint (spoofed or not yet known).
    DenyUnknownEndpoint = 14,
    /// An ICMP error that quotes no allowed connection, or does not travel the reverse
    /// path of the connection it quotes.
    DenyUnrelated = 15,
    /// A pod's packet whose source is not an address of that pod (its veth binds it), a
    /// link-local source used for anything but neighbour discovery, or a packet arriving
    /// on an uplink with a local pod's address as its source.
    DenySpoofed = 16,
    /// A frame at a pod's hook that is neither IP nor ARP (MPLS, ...): nothing judges it.
    DenyNonIp = 17,
}

impl Reason {
    pub const COUNT: usize = 18;

    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::AllowNonIp,
        Reason::AllowNotIsolated,
        Reason::AllowEstablished,
        Reason::AllowIdentity,
        Reason::AllowCidr,
        Reason::AllowHost,
        Reason::AllowRelated,
        Reason::AllowFragment,
        Reason::AllowLinkLocal,
        Reason::AllowServicePending,
        Reason::AllowNoEndpoint,
        Reason::DenyPolicy,
        Reason::DenyMalformed,
        Reason::DenyFragment,
        Reason::DenyUnknownEndpoint,
        Reason::DenyUnrelated,
        Reason::DenySpoofed,
        Reason::DenyNonIp,
    ];

    #[inline(always)]
    pub const fn is_allow(self) -> bool {
        (self as u8) < (Reason::DenyPolicy as u8)
    }

    pub const fn from_u8(v: u8) -> Option<Reason> {
        if (v as usize) < Reason::COUNT {
            Some(Reason::ALL[v as usize])
        } else {
            None
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AllowNonIp => "non_ip",
            Reason::AllowNotIsolated => "not_isolated",
            Reason::AllowEstablished => "established",
            Reason::AllowIdentity => "identity",
            Reason::AllowCidr => "cidr",
            Reason::AllowHost => "host",
            Reason::AllowRelated => "related",
            Reason::AllowFragment => "fragment",
            Reason::AllowLinkLocal => "link_local",
            Reason::AllowServicePending => "service_pending",
            Reason::AllowNoEndpoint => "no_endpoint",
            Reason::DenyPolicy => "policy",
            Reason::DenyMalformed => "malformed",
            Reason::DenyFragment => "fragment",
            Reason::DenyUnknownEndpoint => "unknown_endpoint",
            Reason::DenyUnrelated => "unrelated_icmp",
            Reason::DenySpoofed => "spoofed",
            Reason::DenyNonIp => "non_ip",
        }
    }

    /// Index in the `COUNTERS` array.
    #[inline(always)]
    pub const fn counter_index(self, dir: Direction) -> u32 {
        self as u32 + dir as u32 * Reason::COUNT as u32
    }
}

/// Entries of the `COUNTERS` per-CPU array.
pub const COUNTERS_LEN: u32 = (Reason::COUNT * Direction::COUNT) as u32;
