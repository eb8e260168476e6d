//! What becomes of open connections when the policy changes.

/// `--established`: whether connections admitted earlier are judged again after each
/// policy change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Established {
    /// Every complete map write bumps `Config::policy_epoch`: each conntrack entry of an
    /// older epoch is judged again, as a new connection would be, on its next packet, so a
    /// connection the policies no longer admit stops at once, and one admitted again flows
    /// again.
    #[default]
    Revalidate,
    /// Connections keep the verdict they were opened with until they end or idle out (what
    /// Calico, Antrea and the AWS agent do): the epoch never moves.
    Keep,
}
