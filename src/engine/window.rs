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

use jiff::civil::{Date, DateTime};
use jiff::tz::Offset;

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

/// The window of `period` that contains `t`, anchored at `anchor`.
pub fn window(period: Period, reset: Reset, anchor: Timestamp, t: Timestamp) -> Window {
    // Records without a start date are anchored at the epoch.
    let anchor = if anchor == Timestamp::MIN {
        Timestamp(0)
    } else {
        anchor
    };
    let calendar = reset == Reset::Calendar;
    match period {
        Period::Never => Window {
            start: anchor.min(t),
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
    let n = (t.0 as i128 - base as i128).div_euclid(len as i128);
    let start = base as i128 + n * len as i128;
    let clamp = |v: i128| Timestamp(v.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    Window {
        start: clamp(start),
        end: clamp(start + len as i128),
    }
}

fn to_dt(t: Timestamp) -> Option<DateTime> {
    Some(Offset::UTC.to_datetime(t.to_jiff()?))
}

fn to_ts(dt: DateTime) -> Option<Timestamp> {
    Offset::UTC.to_timestamp(dt).ok().map(Timestamp::from_jiff)
}

/// The anchor moved by `n` months, the day clamped to the month's last day. Plain
/// calendar arithmetic on fields: jiff's general `Span` addition was a third of a
/// quota consume's time in profiles.
fn add_months(anchor: DateTime, n: i64) -> Option<Timestamp> {
    let total = anchor.year() as i64 * 12 + (anchor.month() as i64 - 1) + n;
    let year = i16::try_from(total.div_euclid(12)).ok()?;
    let month = (total.rem_euclid(12) + 1) as i8;
    let first = Date::new(year, month, 1).ok()?;
    let date = Date::new(year, month, anchor.day().min(first.days_in_month())).ok()?;
    to_ts(date.to_datetime(anchor.time()))
}

fn months(anchor: Timestamp, t: Timestamp, step: i64, calendar: bool) -> Window {
    // Outside jiff's range (years beyond ±9999) there are no months to speak of:
    // one window covering all time.
    let all = Window {
        start: Timestamp::MIN,
        end: Timestamp::MAX,
    };
    let Some(tdt) = to_dt(t) else { return all };
    let base = if calendar {
        let m = if step == 12 { 1 } else { tdt.month() };
        Date::new(tdt.year(), m, 1)
            .ok()
            .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
    } else {
        to_dt(anchor)
    };
    let Some(base) = base else { return all };
    let elapsed =
        (tdt.year() as i64 - base.year() as i64) * 12 + (tdt.month() as i64 - base.month() as i64);
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
