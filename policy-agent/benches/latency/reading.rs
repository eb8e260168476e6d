//! The prose of the `latency` section of `BENCHMARKS.md`: how it is measured, how to
//! reproduce it, what the numbers say, and the published figures of peers beside them.

pub const TEXT: &str = "\
**How.** TODO
";
