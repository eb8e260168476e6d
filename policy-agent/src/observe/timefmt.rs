//! Event times: the kernel stamps events with `bpf_ktime_get_ns` (CLOCK_MONOTONIC); operators
//! read wall-clock UTC.

/// CLOCK_MONOTONIC now, in ns (the clock of `DenyEvent::timestamp_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME now, in ns since the epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: all-zero is a valid timespec; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time (ns since the epoch) of monotonic time `mono_ns`, given both clocks
/// read at one instant.
pub fn wall_of(mono_ns: u64, now_mono: u64, now_wall: u64) -> u64 {
    now_wall.saturating_sub(now_mono.saturating_sub(mono_ns))
}

/// RFC 3339 UTC with microseconds: `2024-05-01T12:34:56.123456Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day of a century leap year) 23:59:59.5
        assert_eq!(
            rfc3339(951_868_799_500_000_000),
            "2000-02-29T23:59:59.500000Z"
        );
        assert_eq!(
            rfc3339(1_714_566_896_123_456_789),
            "2024-05-01T12:34:56.123456Z"
        );
    }

    #[test]
    fn wall_of_subtracts_the_age() {
        assert_eq!(wall_of(900, 1_000, 50_000), 49_900);
        // An event stamped "after" the reading (another CPU) is not in the future by much.
        assert_eq!(wall_of(1_100, 1_000, 50_000), 50_000);
    }
}
