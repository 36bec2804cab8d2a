//! Time as the engine sees it: a UTC instant in microseconds, and the clocks that
//! produce one.
//!
//! Decisions take `now` as a parameter (the engine never reads a clock), so tests pass
//! any instant they like and never sleep for a window to roll over. The server reads a
//! [`CoarseClock`]: reading the system clock costs ~30 ns on a virtual machine, a real
//! share of a 70 ns decision, while an atomic load refreshed every millisecond costs ~1 ns
//! (and the refreshing stops while no requests come).

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
    ///
    /// Times are those of the calendar arithmetic (jiff's range, [`Timestamp::FIRST`]
    /// to [`Timestamp::LAST`]); a valid time outside it is refused saying so.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ts) = s.parse::<jiff::Timestamp>() {
            return Ok(Self::from_jiff(ts));
        }
        let out_of_range = || {
            format!(
                "`{s}` is outside the supported range of times, {} to {}",
                Self::FIRST,
                Self::LAST
            )
        };
        match s.parse::<jiff::civil::Date>() {
            Ok(d) if s.len() == 10 => jiff::tz::Offset::UTC
                .to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))
                .map(Self::from_jiff)
                .map_err(|_| out_of_range()),
            _ => match jiff::fmt::temporal::Pieces::parse(s) {
                Ok(p) if p.time().is_some() && p.to_numeric_offset().is_some() => {
                    Err(out_of_range())
                }
                _ => Err(format!(
                    "expected an RFC 3339 timestamp (`2026-01-15T00:00:00Z`) or a date (`2026-01-15`), found `{s}`"
                )),
            },
        }
    }

    /// The earliest time [`Timestamp::parse`] accepts (-9999-01-02T01:59:59Z).
    pub const FIRST: Timestamp = Timestamp(-377_705_023_201 * SECOND);
    /// The latest time [`Timestamp::parse`] accepts (9999-12-30T22:00:00Z).
    pub const LAST: Timestamp = Timestamp(253_402_207_200 * SECOND);
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

    /// The same time, read by a background task (upkeep, flushing, scans): such a
    /// read is not traffic, and does not keep a [`CoarseClock`]'s sampler awake.
    fn now_background(&self) -> Timestamp {
        self.now()
    }
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
/// Reads are two atomic loads (plain loads on x86). The sampled value never runs ahead of the
/// real time and lags it by at most one resolution (1 ms by default): fine for dates,
/// quota windows and rate limits of up to ~1,000 events per second per key with a
/// burst of at least 2; document it where finer limits are configured.
///
/// An idle sidecar costs nothing: after `idle_after` samples in which no request read
/// the clock, the sampler parks instead of waking a thousand times a second. A read
/// that finds it parked takes the system clock itself (so it is never stale), and a
/// request's read also wakes the sampler: one wake-up per idle period, paid by its
/// first request.
#[derive(Debug)]
pub struct CoarseClock {
    shared: Arc<Sampled>,
    thread: std::thread::Thread,
}

#[derive(Debug)]
struct Sampled {
    now: AtomicI64,
    /// Set by a request's read, cleared by each sample: any reads since the last one?
    read: AtomicBool,
    /// The sampler is parked (or about to be): `now` is not being kept fresh.
    asleep: AtomicBool,
    stop: AtomicBool,
}

impl CoarseClock {
    /// Samples every `resolution`; parks after a second without requests.
    pub fn start(resolution: Duration) -> std::io::Result<Self> {
        let per_second = Duration::from_secs(1).as_nanos() / resolution.as_nanos().max(1);
        Self::start_with(
            resolution,
            u32::try_from(per_second.max(1)).unwrap_or(u32::MAX),
        )
    }

    /// Samples every `resolution`; parks after `idle_after` samples without requests.
    pub fn start_with(resolution: Duration, idle_after: u32) -> std::io::Result<Self> {
        let shared = Arc::new(Sampled {
            now: AtomicI64::new(Timestamp::now().0),
            read: AtomicBool::new(true),
            asleep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("entitled-clock".into())
            .spawn(move || s.sample(resolution, idle_after))?;
        Ok(CoarseClock {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Whether the sampler has parked for want of requests.
    pub fn is_parked(&self) -> bool {
        self.shared.asleep.load(Ordering::Acquire)
    }

    #[cold]
    fn wake(&self) -> Timestamp {
        let s = &self.shared;
        let t = s.fresh();
        s.read.store(true, Ordering::Relaxed);
        if s.asleep.swap(false, Ordering::AcqRel) {
            self.thread.unpark();
        }
        t
    }
}

impl Sampled {
    /// The system clock, folded into the sample. fetch_max: the clock never goes
    /// backwards, even if the system clock is stepped back.
    fn fresh(&self) -> Timestamp {
        let t = Timestamp::now().0;
        Timestamp(self.now.fetch_max(t, Ordering::AcqRel).max(t))
    }

    fn sample(&self, resolution: Duration, idle_after: u32) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(resolution);
            self.now.fetch_max(Timestamp::now().0, Ordering::Release);
            if self.read.swap(false, Ordering::Relaxed) {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < idle_after {
                continue;
            }
            idle = 0;
            // From here on a read takes the system clock itself; one that saw
            // `asleep` still false got a sample at most one resolution old.
            self.asleep.store(true, Ordering::SeqCst);
            if self.read.load(Ordering::SeqCst) {
                // A read slipped in between and may not have seen the flag: stay up.
                self.asleep.store(false, Ordering::SeqCst);
            }
            // A request's read or Drop clears the flag and unparks; a spurious
            // wake-up parks again.
            while self.asleep.load(Ordering::Acquire) && !self.stop.load(Ordering::Relaxed) {
                std::thread::park();
            }
        }
    }
}

impl Clock for CoarseClock {
    #[inline]
    fn now(&self) -> Timestamp {
        let s = &*self.shared;
        // Acquire: a read that sees a waker's `false` also sees its fresh sample.
        if s.asleep.load(Ordering::Acquire) {
            return self.wake();
        }
        // Load before store: under load, one read per sample writes the shared line.
        if !s.read.load(Ordering::Relaxed) {
            s.read.store(true, Ordering::Relaxed);
        }
        Timestamp(s.now.load(Ordering::Acquire))
    }

    fn now_background(&self) -> Timestamp {
        let s = &*self.shared;
        // Acquire: a read that sees a waker's `false` also sees its fresh sample.
        if s.asleep.load(Ordering::Acquire) {
            return s.fresh();
        }
        Timestamp(s.now.load(Ordering::Acquire))
    }
}

impl Drop for CoarseClock {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread.unpark();
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
    fn times_past_the_calendar_range_are_refused_saying_so() {
        assert_eq!(
            Timestamp::FIRST.0 / SECOND,
            jiff::Timestamp::MIN.as_second()
        );
        assert_eq!(Timestamp::LAST.0 / SECOND, jiff::Timestamp::MAX.as_second());
        assert_eq!(Timestamp::LAST.to_string(), "9999-12-30T22:00:00Z");
        assert_eq!(
            Timestamp::parse("9999-12-30T22:00:00Z"),
            Ok(Timestamp::LAST)
        );
        for far in [
            "9999-12-31T23:59:59Z",
            "9999-12-31",
            "-009999-01-01T00:00:00Z",
        ] {
            let e = Timestamp::parse(far).expect_err(far);
            assert!(
                e.contains("outside the supported range") && e.contains("9999-12-30T22:00:00Z"),
                "{far}: {e}"
            );
        }
        let e = Timestamp::parse("yesterday").expect_err("not a time");
        assert!(e.starts_with("expected an RFC 3339"), "{e}");
    }

    #[test]
    fn coarse_clock_parks_when_unread_and_a_read_wakes_it_fresh() {
        let c = CoarseClock::start_with(Duration::from_millis(1), 3).unwrap();
        let before = Timestamp::now();
        assert!(
            c.now() >= Timestamp(before.0 - 2_000),
            "at most a sample behind"
        );
        // Bounded: unread, the thread parks after three samples.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !c.is_parked() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(c.is_parked(), "an unread clock keeps sampling");
        let parked_at = c.shared.now.load(Ordering::Relaxed);
        // Time passes for the system clock (not for the parked sample) ...
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Timestamp::now().0 <= parked_at + 5_000 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let real = Timestamp::now();
        // ... and a background read takes the system clock without waking it ...
        let b = c.now_background();
        assert!(b >= real, "{b:?} is older than {real:?}");
        assert!(c.is_parked(), "a background read woke the sampler");
        // ... and a request's read is fresh too, and wakes it.
        let t = c.now();
        assert!(t >= real, "{t:?} is older than {real:?}");
        assert!(!c.is_parked(), "the read woke the sampler");
        assert!(c.now() >= t, "never backwards");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(10));
        assert_eq!(c.now(), Timestamp(10));
        c.advance(5);
        assert_eq!(c.now(), Timestamp(15));
    }
}
