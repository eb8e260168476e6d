//! Calibrating the datapath's tick clock (`policy_common::Config::jiffy_ns`,
//! `jiffies_base`) against `CLOCK_MONOTONIC_COARSE`, so stamps the programs write agree with
//! the agent's clock (conntrack seeding, ages) and with stamps an earlier agent wrote.
//!
//! The kernel's tick length (HZ) is not exposed to userspace, so it is measured: the
//! `clock_probe` program reads the coarse clock and `jiffies` together; two samples a few
//! ticks apart give ns per tick, snapped to the tick of a usual HZ.

use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use policy_common::{ClockSample, PROG_CLOCK_PROBE};

use super::{DataplaneError, loader::Dataplane};

/// The kernel HZ values in use (x86, arm64 and others); a measurement within 3 % of one
/// is taken as it.
const USUAL_HZ: [u64; 6] = [100, 128, 250, 256, 300, 1000];
/// Ticks between the two samples: enough for 1 % precision at any HZ.
const MIN_TICKS: u64 = 4;
/// Longest wait for them (HZ 100: 40 ms).
const MAX_WAIT: Duration = Duration::from_millis(500);

/// The calibrated tick clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickClock {
    pub jiffy_ns: u32,
    pub jiffies_base: u64,
}

/// One sample with no tick between its reads.
pub fn sample(dp: &Dataplane) -> Result<ClockSample, DataplaneError> {
    let prog = dp.program(PROG_CLOCK_PROBE)?;
    for _ in 0..16 {
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        let mut o = TestRunOptions::new();
        o.data_in = Some(&frame);
        o.data_out = Some(&mut out);
        prog.test_run(o)
            .map_err(|e| DataplaneError::program(PROG_CLOCK_PROBE, e))?;
        let word =
            |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let s = ClockSample {
            coarse_ns: word(0),
            jiffies: word(1),
            coarse_ns_after: word(2),
        };
        if s.coarse_ns == s.coarse_ns_after && s.jiffies != 0 {
            return Ok(s);
        }
    }
    Err(DataplaneError::Clock(
        "the clock probe never read both clocks within one tick".into(),
    ))
}

/// Measures the tick and the `jiffies` value at coarse time 0.
pub fn calibrate(dp: &Dataplane) -> Result<TickClock, DataplaneError> {
    let first = sample(dp)?;
    let start = Instant::now();
    let last = loop {
        std::thread::sleep(Duration::from_millis(2));
        let s = sample(dp)?;
        if s.jiffies.wrapping_sub(first.jiffies) >= MIN_TICKS {
            break s;
        }
        if start.elapsed() > MAX_WAIT {
            return Err(DataplaneError::Clock(format!(
                "jiffies advanced {} ticks in {MAX_WAIT:?}",
                s.jiffies.wrapping_sub(first.jiffies)
            )));
        }
    };
    tick_clock(&first, &last)
}

/// The clock two samples give (pure: unit-tested).
pub fn tick_clock(first: &ClockSample, last: &ClockSample) -> Result<TickClock, DataplaneError> {
    let ticks = last.jiffies.wrapping_sub(first.jiffies);
    let ns = last.coarse_ns.saturating_sub(first.coarse_ns);
    if ticks == 0 || ns == 0 {
        return Err(DataplaneError::Clock(format!(
            "no progress between samples ({ticks} ticks, {ns} ns)"
        )));
    }
    let measured_hz = (1_000_000_000f64 * ticks as f64 / ns as f64).round() as u64;
    let hz = USUAL_HZ
        .iter()
        .copied()
        .find(|&h| measured_hz.abs_diff(h) * 100 <= h * 3)
        .unwrap_or(measured_hz)
        .max(1);
    // The kernel's TICK_NSEC: jiffies advance once per this much monotonic time.
    let jiffy_ns = (1_000_000_000 + hz / 2) / hz;
    let jiffy_ns_u32 = u32::try_from(jiffy_ns)
        .map_err(|_| DataplaneError::Clock(format!("a tick of {jiffy_ns} ns")))?;
    // Rounded: the coarse clock holds the time of the last tick.
    let ticks_since_zero = (last.coarse_ns + jiffy_ns / 2) / jiffy_ns;
    Ok(TickClock {
        jiffy_ns: jiffy_ns_u32,
        jiffies_base: last.jiffies.wrapping_sub(ticks_since_zero),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(coarse_ns: u64, jiffies: u64) -> ClockSample {
        ClockSample {
            coarse_ns,
            jiffies,
            coarse_ns_after: coarse_ns,
        }
    }

    #[test]
    fn a_usual_hz_is_recognised_and_the_base_maps_coarse_time_onto_ticks() {
        // HZ 250, jiffies started at the kernel's INITIAL_JIFFIES.
        let init = (1u64 << 32) - 300 * 250;
        let at = |t: u64| s(t * 4_000_000, init + t);
        let c = tick_clock(&at(1_000_000), &at(1_000_005)).unwrap();
        assert_eq!(c.jiffy_ns, 4_000_000);
        assert_eq!(c.jiffies_base, init);
        // HZ 300: the tick is rounded as the kernel rounds it.
        let c = tick_clock(&s(0, 10), &s(4 * 3_333_333, 14)).unwrap();
        assert_eq!(c.jiffy_ns, 3_333_333);
        // A slightly late second sample (the coarse clock moved a bit more) still snaps.
        let c = tick_clock(&s(0, 10), &s(4 * 1_000_000 + 20_000, 14)).unwrap();
        assert_eq!(c.jiffy_ns, 1_000_000);
    }

    #[test]
    fn no_progress_is_an_error_not_a_division_by_zero() {
        assert!(tick_clock(&s(5, 10), &s(5, 10)).is_err());
        assert!(tick_clock(&s(5, 10), &s(9, 10)).is_err());
    }
}
