//! Scenario files (scenarios/FORMAT.md): parse, run against an oracle, report.
