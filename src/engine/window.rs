//! Quota windows: which period an instant falls in, for each `per` and `reset`.
//!
//! - `reset: anniversary` (default): windows are anchored at the winning record's
//!   `starts`. Months and years step from the anchor itself, so an anchor on the 31st
//!   gives Jan 31, Feb 28 (29), Mar 31: the day is clamped to the month's last day, as
//!   billing systems do, without drifting.
//! - `reset: calendar`: UTC calendar boundaries (hour, day, ISO week from Monday,
//!   month, year).
//! - `per: <duration>`: fixed windows from the anchor (from the epoch with calendar).
//! - `per: never`: one window for the record's lifetime.

use crate::policy::{Period, Reset};
use crate::time::{DAY, HOUR, Timestamp};

/// `[start, end)`; `end` is `Timestamp::MAX` for a window that never resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Window {
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && t < self.end
    }

    /// When the window resets, if ever.
    pub fn resets_at(&self) -> Option<Timestamp> {
        (self.end != Timestamp::MAX).then_some(self.end)
    }
}

/// 1970-01-05T00:00:00Z, the first Monday after the epoch: calendar weeks start here.
const MONDAY: i64 = 4 * DAY;

/// The last window computed on this thread: consecutive decisions for the same grant
/// (a busy customer, a batch) fall in the same window, and the calendar arithmetic
/// was the largest single cost of a quota consume.
type Memo = Option<(Period, Reset, Timestamp, Window)>;

thread_local! {
    static LAST: std::cell::Cell<Memo> = const { std::cell::Cell::new(None) };
}

/// The window of `period` that contains `t`, anchored at `anchor`.
pub fn window(period: Period, reset: Reset, anchor: Timestamp, t: Timestamp) -> Window {
    if let Some((p, r, a, w)) = LAST.with(|c| c.get())
        && p == period
        && r == reset
        && a == anchor
        && w.contains(t)
    {
        return w;
    }
    let w = compute(period, reset, anchor, t);
    LAST.with(|c| c.set(Some((period, reset, anchor, w))));
    w
}

fn compute(period: Period, reset: Reset, anchor: Timestamp, t: Timestamp) -> Window {
    // Records without a start date are anchored at the epoch.
    let anchor = if anchor == Timestamp::MIN {
        Timestamp(0)
    } else {
        anchor
    };
    let calendar = reset == Reset::Calendar;
    match period {
        // One window from the anchor on, whatever `t` is: a check `at` a time before
        // the anchor must not open a second lifetime counter.
        Period::Never => Window {
            start: anchor,
            end: Timestamp::MAX,
        },
        Period::Hour => fixed(if calendar { 0 } else { anchor.0 }, HOUR, t),
        Period::Day => fixed(if calendar { 0 } else { anchor.0 }, DAY, t),
        Period::Week => fixed(if calendar { MONDAY } else { anchor.0 }, 7 * DAY, t),
        Period::Fixed(len) => fixed(if calendar { 0 } else { anchor.0 }, len, t),
        Period::Month => months(anchor, t, 1, calendar),
        Period::Year => months(anchor, t, 12, calendar),
    }
}

fn fixed(base: i64, len: i64, t: Timestamp) -> Window {
    // 64-bit on the common path; 128-bit only where an instant near the ends of time
    // would overflow.
    if let Some(d) = t.0.checked_sub(base) {
        let start = base + d.div_euclid(len) * len;
        if let Some(end) = start.checked_add(len) {
            return Window {
                start: Timestamp(start),
                end: Timestamp(end),
            };
        }
    }
    let n = (t.0 as i128 - base as i128).div_euclid(len as i128);
    let start = base as i128 + n * len as i128;
    let clamp = |v: i128| Timestamp(v.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    Window {
        start: clamp(start),
        end: clamp(start + len as i128),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`). Quota windows are computed on every quota decision; plain integer
/// calendar arithmetic is ~10× cheaper than going through a date-time library, and
/// the tests cross-check it against jiff.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`]: `(year, month, day)`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A point on the calendar: `(year, month, day)` plus the time of day.
#[derive(Debug, Clone, Copy)]
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    time: i64,
}

fn civil(t: Timestamp) -> Civil {
    let (year, month, day) = civil_from_days(t.0.div_euclid(DAY));
    Civil {
        year,
        month,
        day,
        time: t.0.rem_euclid(DAY),
    }
}

/// `base` moved by `n` months, the day clamped to the month's last day (never
/// chained: the 31st stays the 31st in long months). `None` past the ends of time.
fn add_months(base: Civil, n: i64) -> Option<Timestamp> {
    let total = base
        .year
        .checked_mul(12)?
        .checked_add(base.month - 1)?
        .checked_add(n)?;
    let (y, m) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let d = base.day.min(days_in_month(y, m));
    days_from_civil(y, m, d)
        .checked_mul(DAY)?
        .checked_add(base.time)
        .map(Timestamp)
}

fn months(anchor: Timestamp, t: Timestamp, step: i64, calendar: bool) -> Window {
    let all = Window {
        start: Timestamp::MIN,
        end: Timestamp::MAX,
    };
    let tc = civil(t);
    let base = if calendar {
        Civil {
            year: tc.year,
            month: if step == 12 { 1 } else { tc.month },
            day: 1,
            time: 0,
        }
    } else {
        civil(anchor)
    };
    let elapsed = (tc.year - base.year) * 12 + (tc.month - base.month);
    let mut n = elapsed.div_euclid(step);
    // The n-th anniversary may still be ahead of t within its month (day or time of
    // day later than t's): then t is in the previous window.
    let mut start = add_months(base, n * step);
    if start.is_some_and(|s| s > t) {
        n -= 1;
        start = add_months(base, n * step);
    }
    match (start, add_months(base, (n + 1) * step)) {
        (Some(start), Some(end)) => Window { start, end },
        (Some(start), None) => Window {
            start,
            end: Timestamp::MAX,
        },
        _ => all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap()
    }

    fn w(period: Period, reset: Reset, anchor: &str, t: &str) -> (String, String) {
        let w = window(period, reset, ts(anchor), ts(t));
        (w.start.to_string(), w.end.to_string())
    }

    #[test]
    fn monthly_anniversary_clamps_to_month_end() {
        let a = "2026-01-31";
        assert_eq!(
            w(Period::Month, Reset::Anniversary, a, "2026-02-15"),
            ("2026-01-31T00:00:00Z".into(), "2026-02-28T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Month, Reset::Anniversary, a, "2026-03-01"),
            ("2026-02-28T00:00:00Z".into(), "2026-03-31T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Month, Reset::Anniversary, a, "2026-03-31"),
            ("2026-03-31T00:00:00Z".into(), "2026-04-30T00:00:00Z".into())
        );
        // Leap year.
        assert_eq!(
            w(
                Period::Month,
                Reset::Anniversary,
                "2028-01-30",
                "2028-02-29T12:00:00Z"
            ),
            ("2028-02-29T00:00:00Z".into(), "2028-03-30T00:00:00Z".into())
        );
    }

    #[test]
    fn anniversary_respects_time_of_day() {
        let a = "2026-01-15T10:00:00Z";
        assert_eq!(
            w(Period::Month, Reset::Anniversary, a, "2026-02-15T09:59:59Z").0,
            "2026-01-15T10:00:00Z"
        );
        assert_eq!(
            w(Period::Month, Reset::Anniversary, a, "2026-02-15T10:00:00Z").0,
            "2026-02-15T10:00:00Z"
        );
    }

    #[test]
    fn calendar_windows() {
        let a = "2026-01-15";
        assert_eq!(
            w(Period::Month, Reset::Calendar, a, "2026-12-15T13:00:00Z"),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Year, Reset::Calendar, a, "2026-12-15"),
            ("2026-01-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Day, Reset::Calendar, a, "2026-12-15T13:00:00Z"),
            ("2026-12-15T00:00:00Z".into(), "2026-12-16T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Hour, Reset::Calendar, a, "2026-12-15T13:20:00Z"),
            ("2026-12-15T13:00:00Z".into(), "2026-12-15T14:00:00Z".into())
        );
        // 2026-12-02 is a Wednesday; its ISO week starts Monday 2026-11-30.
        assert_eq!(
            w(Period::Week, Reset::Calendar, a, "2026-12-02"),
            ("2026-11-30T00:00:00Z".into(), "2026-12-07T00:00:00Z".into())
        );
    }

    #[test]
    fn yearly_anniversary_and_leap_day() {
        assert_eq!(
            w(Period::Year, Reset::Anniversary, "2024-02-29", "2025-03-01"),
            ("2025-02-28T00:00:00Z".into(), "2026-02-28T00:00:00Z".into())
        );
        assert_eq!(
            w(Period::Year, Reset::Anniversary, "2024-02-29", "2028-02-29"),
            ("2028-02-29T00:00:00Z".into(), "2029-02-28T00:00:00Z".into())
        );
    }

    #[test]
    fn civil_arithmetic_agrees_with_jiff() {
        // Every day from 1600 to 2400, both directions.
        let first = days_from_civil(1600, 1, 1);
        let last = days_from_civil(2400, 12, 31);
        let mut date = jiff::civil::date(1600, 1, 1);
        for z in first..=last {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(
                (y, m, d),
                (date.year() as i64, date.month() as i64, date.day() as i64),
                "day {z}"
            );
            assert_eq!(days_from_civil(y, m, d), z);
            assert_eq!(days_in_month(y, m), date.days_in_month() as i64);
            date = date.tomorrow().unwrap();
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn fixed_and_never() {
        assert_eq!(
            w(
                Period::Fixed(14 * DAY),
                Reset::Anniversary,
                "2026-01-01",
                "2026-01-20"
            ),
            ("2026-01-15T00:00:00Z".into(), "2026-01-29T00:00:00Z".into())
        );
        let n = window(
            Period::Never,
            Reset::Anniversary,
            ts("2026-01-01"),
            ts("2030-01-01"),
        );
        assert_eq!(n.resets_at(), None);
        assert!(n.contains(ts("2030-01-01")));
    }
}
