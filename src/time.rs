//! Time as the engine sees it: a UTC instant in microseconds, and the clocks that
//! produce one.
//!
//! Decisions take `now` as a parameter (the engine never reads a clock), so tests pass
//! any instant they like and never sleep for a window to roll over. The server reads a
//! [`CoarseClock`]: reading the system clock costs ~30 ns on a virtual machine, a real
//! share of a 70 ns decision, while an atomic load refreshed every millisecond costs ~1 ns.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// A UTC instant, microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

/// Microseconds per second, minute, hour and day.
pub const SECOND: i64 = 1_000_000;
pub const MINUTE: i64 = 60 * SECOND;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

impl Timestamp {
    /// Far past: the start of an open-ended record.
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// Far future: the end of an open-ended record.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    pub const fn from_micros(us: i64) -> Self {
        Timestamp(us)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Seconds since the epoch, for Prometheus gauges and log lines.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / SECOND as f64
    }

    pub fn now() -> Self {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Timestamp(us)
    }

    pub fn saturating_add(self, us: i64) -> Self {
        Timestamp(self.0.saturating_add(us))
    }

    /// The jiff timestamp, when this instant is within jiff's range (years -9999..=9999).
    pub fn to_jiff(self) -> Option<jiff::Timestamp> {
        jiff::Timestamp::from_microsecond(self.0).ok()
    }

    pub fn from_jiff(ts: jiff::Timestamp) -> Self {
        Timestamp(ts.as_microsecond())
    }

    /// Parses RFC 3339 (`2026-01-15T10:00:00Z`, offsets allowed) or a bare date
    /// (`2026-01-15`, meaning 00:00:00 UTC).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ts) = s.parse::<jiff::Timestamp>() {
            return Ok(Self::from_jiff(ts));
        }
        match s.parse::<jiff::civil::Date>() {
            Ok(d) if s.len() == 10 => jiff::tz::Offset::UTC
                .to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))
                .map(Self::from_jiff)
                .map_err(|e| e.to_string()),
            _ => Err(format!(
                "expected an RFC 3339 timestamp (`2026-01-15T00:00:00Z`) or a date (`2026-01-15`), found `{s}`"
            )),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_jiff() {
            Some(ts) => {
                // Whole seconds print without a fraction, as policies are written.
                if ts.subsec_microsecond() == 0 {
                    write!(f, "{}", ts.strftime("%Y-%m-%dT%H:%M:%SZ"))
                } else {
                    write!(f, "{ts}")
                }
            }
            None if self.0 == i64::MAX => f.write_str("never"),
            None => write!(f, "@{}us", self.0),
        }
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where the current time comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system clock, read on every call.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to: for tests and for `entitled check --at`.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(t: Timestamp) -> Self {
        ManualClock(AtomicI64::new(t.0))
    }

    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::Release);
    }

    pub fn advance(&self, us: i64) {
        self.0.fetch_add(us, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::Acquire))
    }
}

/// The system clock sampled by a background thread every `resolution`.
///
/// Reads are a single relaxed atomic load. The sampled value never runs ahead of the
/// real time and lags it by at most one resolution (1 ms by default): fine for dates,
/// quota windows and rate limits of up to ~1,000 events per second per key with a
/// burst of at least 2; document it where finer limits are configured.
#[derive(Debug)]
pub struct CoarseClock {
    now: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
}

impl CoarseClock {
    pub fn start(resolution: Duration) -> std::io::Result<Self> {
        let now = Arc::new(AtomicI64::new(Timestamp::now().0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (now.clone(), stop.clone());
        std::thread::Builder::new()
            .name("entitled-clock".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(resolution);
                    // fetch_max: the sampled clock never goes backwards, even if the
                    // system clock is stepped back.
                    n.fetch_max(Timestamp::now().0, Ordering::Relaxed);
                }
            })?;
        Ok(CoarseClock { now, stop })
    }
}

impl Clock for CoarseClock {
    #[inline]
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::Relaxed))
    }
}

impl Drop for CoarseClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dates_and_rfc3339() {
        let d = Timestamp::parse("2026-01-15").unwrap();
        let t = Timestamp::parse("2026-01-15T00:00:00Z").unwrap();
        assert_eq!(d, t);
        let o = Timestamp::parse("2026-01-15T02:00:00+02:00").unwrap();
        assert_eq!(o, t);
        assert_eq!(t.to_string(), "2026-01-15T00:00:00Z");
        assert!(Timestamp::parse("2026-13-01").is_err());
        assert!(Timestamp::parse("15/01/2026").is_err());
        assert!(Timestamp::parse("2026-01-15T25:00:00Z").is_err());
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(10));
        assert_eq!(c.now(), Timestamp(10));
        c.advance(5);
        assert_eq!(c.now(), Timestamp(15));
    }
}
