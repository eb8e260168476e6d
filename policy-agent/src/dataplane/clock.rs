//! The datapath's clock: every stamp the programs write (conntrack `last_seen_ns`, fragment
//! `created_ns`, the deny-event budget) is `(jiffies - jiffies_base) * jiffy_ns`
//! (`policy_common::Config`), one inlined load in the kernel.
//!
//! The contract: that tick clock is the only clock of the stamps. The agent never compares
//! a stamp with `CLOCK_MONOTONIC_COARSE` (the tick clock follows it only to within a tick,
//! and a VM's ticks may lag it further); it reads the datapath's own clock with
//! [`Dataplane::now_ns`], which runs the same formula on the same `jiffies` through the
//! `clock_probe` program, so a stamp written after a reading is never older than it.
//!
//! Calibration only chooses the tick length and base once, so stamps read as nanoseconds
//! close to the coarse clock (logs, an earlier agent's stamps): the kernel's tick length
//! (HZ) is not exposed to userspace, so it is measured: the `clock_probe` program reads the
//! coarse clock and `jiffies` together; two samples a few ticks apart give ns per tick,
//! snapped to the tick of a usual HZ.

use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use policy_common::{ClockSample, Config, PROG_CLOCK_PROBE};

use super::{DataplaneError, DataplaneMaps, loader::Dataplane};

/// The kernel HZ values in use (x86, arm64 and others); a measurement within 3 % of one
/// is taken as it.
const USUAL_HZ: [u64; 6] = [100, 128, 250, 256, 300, 1000];
/// Steps of the coarse clock to see: enough that one of them is a single tick.
const MIN_STEPS: usize = 8;
/// Longest wait for them (HZ 100: 80 ms).
const MAX_WAIT: Duration = Duration::from_millis(500);

/// The calibrated tick clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickClock {
    pub jiffy_ns: u32,
    pub jiffies_base: u64,
}

impl Dataplane {
    /// Now on the datapath's clock (see the module docs): what a packet handled at this
    /// instant would stamp. Stamps the agent writes (conntrack seeding) take it, and a stamp
    /// the programs write later is never older.
    pub fn now_ns(&self, maps: &DataplaneMaps) -> Result<u64, DataplaneError> {
        Ok(datapath_ns(&maps.config()?, &probe(self)?))
    }
}

/// The programs' clock (`policy-ebpf` `clock::now`) at the instant of `s`: the tick clock
/// once calibrated, else the coarse clock the programs then read instead.
pub fn datapath_ns(c: &Config, s: &ClockSample) -> u64 {
    if c.jiffy_ns == 0 {
        return s.coarse_ns;
    }
    s.jiffies
        .wrapping_sub(c.jiffies_base)
        .wrapping_mul(u64::from(c.jiffy_ns))
}

/// One run of the probe program.
fn probe(dp: &Dataplane) -> Result<ClockSample, DataplaneError> {
    let prog = dp.program(PROG_CLOCK_PROBE)?;
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let mut o = TestRunOptions::new();
    o.data_in = Some(&frame);
    o.data_out = Some(&mut out);
    prog.test_run(o)
        .map_err(|e| DataplaneError::program(PROG_CLOCK_PROBE, e))?;
    let word = |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Ok(ClockSample {
        coarse_ns: word(0),
        jiffies: word(1),
        coarse_ns_after: word(2),
    })
}

/// One sample with no tick between its reads.
pub fn sample(dp: &Dataplane) -> Result<ClockSample, DataplaneError> {
    for _ in 0..16 {
        let s = probe(dp)?;
        if s.coarse_ns == s.coarse_ns_after && s.jiffies != 0 {
            return Ok(s);
        }
    }
    Err(DataplaneError::Clock(
        "the clock probe never read both clocks within one tick".into(),
    ))
}

/// Measures the tick and the `jiffies` value at coarse time 0.
///
/// The coarse clock moves only when the kernel's timekeeping runs at a tick, by a whole
/// number of ticks (several after an idle stretch, or when a loaded VM's tick was late);
/// spinning here keeps this CPU ticking, so the smallest step seen is one tick. (Dividing
/// coarse time by jiffies between two samples was off by a quarter on a loaded VM: the two
/// counters are not updated together.)
pub fn calibrate(dp: &Dataplane) -> Result<TickClock, DataplaneError> {
    let start = Instant::now();
    let first = sample(dp)?;
    let mut last = first;
    let mut steps = Vec::with_capacity(MIN_STEPS);
    while steps.len() < MIN_STEPS {
        if start.elapsed() > MAX_WAIT {
            return Err(DataplaneError::Clock(format!(
                "the coarse clock moved {} times in {MAX_WAIT:?}",
                steps.len()
            )));
        }
        let s = sample(dp)?;
        if s.coarse_ns != last.coarse_ns {
            steps.push(s.coarse_ns.saturating_sub(last.coarse_ns));
        }
        last = s;
    }
    tick_clock(&first, &last, &steps)
}

/// The clock that the coarse clock's steps between a first and a last sample give (pure:
/// unit-tested).
///
/// The smallest step is one tick unless every step seen was several (a busy host's
/// vCPU descheduled at each tick; seen: all steps 8 ms at HZ 250, calibrated as HZ 128).
/// The ratio of coarse time to jiffies over the whole window is too rough to give the
/// tick (the two counters are not updated together: off by up to a quarter), but it
/// tells how many ticks the smallest step spans.
pub fn tick_clock(
    first: &ClockSample,
    last: &ClockSample,
    steps: &[u64],
) -> Result<TickClock, DataplaneError> {
    let smallest = steps
        .iter()
        .copied()
        .filter(|&n| n > 0)
        .min()
        .ok_or_else(|| {
            DataplaneError::Clock("the coarse clock never moved between samples".into())
        })?;
    let elapsed_jiffies = last.jiffies.wrapping_sub(first.jiffies);
    let elapsed_ns = last.coarse_ns.saturating_sub(first.coarse_ns);
    let ticks_in_step = if elapsed_jiffies == 0 || elapsed_jiffies > elapsed_ns {
        1
    } else {
        let rough_tick = elapsed_ns as f64 / elapsed_jiffies as f64;
        ((smallest as f64 / rough_tick).round() as u64).max(1)
    };
    let step = smallest / ticks_in_step;
    let measured_hz = (1_000_000_000f64 / step as f64).round() as u64;
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
#[allow(clippy::unwrap_used)]
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
        let t = 1_000_005;
        let c = tick_clock(
            &s((t - 8) * 4_000_000, init + t - 8),
            &s(t * 4_000_000, init + t),
            &[4_000_000; 8],
        )
        .unwrap();
        assert_eq!(c.jiffy_ns, 4_000_000);
        assert_eq!(c.jiffies_base, init);
        // HZ 300: the tick is rounded as the kernel rounds it.
        let c = tick_clock(&s(0, 7), &s(10_000_000, 10), &[3_333_333, 6_666_667]).unwrap();
        assert_eq!(c.jiffy_ns, 3_333_333);
        // NTP slews a step by a few ns: still the usual HZ.
        let c = tick_clock(&s(0, 8), &s(2_000_002, 10), &[1_000_004, 999_998]).unwrap();
        assert_eq!(c.jiffy_ns, 1_000_000);
    }

    /// What a loaded VM showed: late ticks make steps of several ticks; only the smallest
    /// counts (the old two-sample ratio calibrated HZ 250 as 200 here).
    #[test]
    fn steps_of_several_ticks_do_not_stretch_the_tick() {
        let steps = [8_000_001, 20_000_000, 4_000_000, 12_000_000, 8_000_000];
        let c = tick_clock(&s(0, 0), &s(52_000_001, 13), &steps).unwrap();
        assert_eq!(c.jiffy_ns, 4_000_000);
    }

    /// What CI showed three times: every step two ticks (8 ms at HZ 250). The jiffies over
    /// the window, even a tick off at both ends, say each step is two ticks.
    #[test]
    fn steps_that_are_all_two_ticks_still_give_one_tick() {
        let steps = [8_000_000; 8];
        for jiffies in [15, 16, 17] {
            let c = tick_clock(&s(0, 100), &s(64_000_000, 100 + jiffies), &steps).unwrap();
            assert_eq!(c.jiffy_ns, 4_000_000, "{jiffies} jiffies");
        }
        // A real HZ 128 (one tick per step) is not halved by a quarter's error.
        let steps = [7_812_500; 8];
        for jiffies in [6, 8, 10] {
            let c = tick_clock(&s(0, 100), &s(62_500_000, 100 + jiffies), &steps).unwrap();
            assert_eq!(c.jiffy_ns, 7_812_500, "{jiffies} jiffies");
        }
    }

    #[test]
    fn the_datapath_clock_is_the_tick_clock_once_calibrated_and_the_coarse_clock_before() {
        let c = Config {
            jiffy_ns: 4_000_000,
            jiffies_base: 1000,
            ..Config::default()
        };
        assert_eq!(datapath_ns(&c, &s(123, 1010)), 40_000_000);
        // jiffies wrapped past the base (the kernel's arithmetic wraps the same way).
        let c = Config {
            jiffy_ns: 1,
            jiffies_base: u64::MAX,
            ..Config::default()
        };
        assert_eq!(datapath_ns(&c, &s(123, 4)), 5);
        assert_eq!(datapath_ns(&Config::default(), &s(123, 1010)), 123);
    }

    #[test]
    fn no_progress_is_an_error_not_a_division_by_zero() {
        assert!(tick_clock(&s(5, 10), &s(5, 10), &[]).is_err());
        assert!(tick_clock(&s(5, 10), &s(5, 10), &[0, 0]).is_err());
    }
}
