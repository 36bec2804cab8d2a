//! Rate limits: GCRA on one `AtomicI64` (the theoretical arrival time, in
//! nanoseconds) per customer and feature.
//!
//! A step is a compare-and-swap loop on that one atomic, so racing requests take
//! exactly what the limit allows. The arithmetic ([`Gcra`]) is shared with the Redis
//! store, which runs it in a script against the shared arrival time.

use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;

use super::keys::{Hasher_, Key, KeyView, owned};
use crate::engine::{UsageKey, UsageOutcome};
use crate::time::Timestamp;

/// `a × b / c` (rounded up or down), saturating at `i64::MAX`.
fn mul_div(a: u64, b: u64, c: u64, round_up: bool) -> i64 {
    let c = c.max(1);
    let q = match a.checked_mul(b) {
        Some(p) => p / c + u64::from(round_up && p % c != 0),
        None => {
            let p = a as u128 * b as u128;
            let q = p / c as u128 + u128::from(round_up && !p.is_multiple_of(c as u128));
            u64::try_from(q).unwrap_or(u64::MAX)
        }
    };
    i64::try_from(q).unwrap_or(i64::MAX)
}

/// GCRA arithmetic for one request: `limit` per `per_us`, up to `burst` at once, in
/// nanoseconds of theoretical arrival time (TAT).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    now_ns: i64,
    per_ns: u64,
    limit: u64,
    /// What the request costs in time (rounded up: fail closed).
    pub cost: i64,
    /// How much backlog the burst allows.
    pub tau: i64,
}

impl Gcra {
    pub fn new(limit: u64, per_us: i64, burst: u64, amount: u64, now: Timestamp) -> Self {
        let per_ns = (per_us.max(1) as u64).saturating_mul(1_000);
        // 64-bit unless the product overflows: an i128 division on every check was a
        // third of its time.
        Gcra {
            now_ns: now.0.saturating_mul(1_000),
            per_ns,
            limit,
            cost: mul_div(amount, per_ns, limit, true),
            tau: mul_div(burst, per_ns, limit, false),
        }
    }

    /// The stored `tat` as these parameters can hold it: at most a full backlog
    /// (`tau`) ahead of now. A limiter written under another grant (a slower rate, a
    /// larger burst) would otherwise keep its customer waiting by the old grant's
    /// measure; clamped, a changed grant applies at once, and an unchanged one is
    /// never affected (its backlog never exceeds `tau`).
    fn base(&self, tat: i64) -> i64 {
        tat.min(self.now_ns.saturating_add(self.tau))
            .max(self.now_ns)
    }

    /// The state to store instead of `tat` when `tat` is more than a full backlog
    /// ahead (written under another grant): a full backlog from now, so the limiter
    /// refills from here by this grant's measure.
    pub fn rederived(&self, tat: i64) -> Option<i64> {
        let cap = self.now_ns.saturating_add(self.tau);
        (tat > cap).then_some(cap)
    }

    /// Would the request pass with the limiter at `tat`? Fails closed where the
    /// arithmetic would overflow.
    pub fn admits(&self, tat: i64) -> bool {
        self.base(tat)
            .checked_add(self.cost)
            .is_some_and(|after| after - self.now_ns <= self.tau)
    }

    /// The TAT after taking the request.
    pub fn after(&self, tat: i64) -> i64 {
        self.base(tat).saturating_add(self.cost)
    }

    /// The outcome reported with the limiter at `tat` before the step.
    pub fn outcome(&self, tat: i64, admitted: bool, took: bool) -> UsageOutcome {
        let base = self.base(tat);
        let after = if took {
            base.saturating_add(self.cost)
        } else {
            base
        };
        let backlog = after - self.now_ns;
        UsageOutcome::Rate {
            admitted,
            remaining: mul_div(
                (self.tau - backlog).max(0) as u64,
                self.limit,
                self.per_ns,
                false,
            ) as u64,
            reset_after_us: backlog.div_euclid(1_000),
            retry_after_us: (!admitted).then(|| {
                let ns = (base.saturating_add(self.cost) - self.now_ns - self.tau).max(0);
                (ns + 999) / 1_000
            }),
        }
    }
}

/// One consume against the limiter `cell`: a compare-and-swap loop, so racing
/// requests take exactly what the limit allows. A denial changes nothing, unless the
/// limiter holds more than this grant can ([`Gcra::rederived`]): then it is cut back.
fn take(g: &Gcra, cell: &AtomicI64) -> UsageOutcome {
    let mut tat = cell.load(Ordering::Acquire);
    loop {
        let (next, admitted) = match (g.admits(tat), g.rederived(tat)) {
            (true, _) => (g.after(tat), true),
            (false, Some(cap)) => (cap, false),
            (false, None) => return g.outcome(tat, false, false),
        };
        match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) if admitted => return g.outcome(tat, true, true),
            Ok(_) => return g.outcome(next, false, false),
            Err(actual) => tat = actual,
        }
    }
}

/// The rate limiters, by (customer, feature).
#[derive(Debug, Default)]
pub(super) struct Rates(DashMap<Key, AtomicI64, Hasher_>);

impl Rates {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rate(
        &self,
        key: UsageKey<'_>,
        limit: u64,
        per_us: i64,
        burst: u64,
        amount: u64,
        consume: bool,
        now: Timestamp,
    ) -> UsageOutcome {
        let g = Gcra::new(limit, per_us, burst, amount, now);
        let probe = (key, 0i64);
        if !consume {
            let tat = self
                .0
                .get(&probe as &dyn KeyView)
                .map_or(0, |c| c.load(Ordering::Acquire));
            // A check takes nothing: report what is left before this request.
            return g.outcome(tat, g.admits(tat), false);
        }
        if let Some(cell) = self.0.get(&probe as &dyn KeyView) {
            return take(&g, &cell);
        }
        let cell = self
            .0
            .entry(owned(key, 0))
            .or_insert_with(|| AtomicI64::new(0))
            .downgrade();
        take(&g, &cell)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SECOND;
    use crate::usage::memory::keys::KEY;

    #[test]
    fn gcra_allows_burst_then_paces() {
        let s = Rates::default();
        let now = Timestamp(1_000 * SECOND);
        // 10 per second, burst 2.
        let r = |t: Timestamp| s.rate(KEY, 10, SECOND, 2, 1, true, t);
        assert!(matches!(
            r(now),
            UsageOutcome::Rate {
                admitted: true,
                remaining: 1,
                ..
            }
        ));
        assert!(matches!(
            r(now),
            UsageOutcome::Rate {
                admitted: true,
                remaining: 0,
                ..
            }
        ));
        match r(now) {
            UsageOutcome::Rate {
                admitted: false,
                retry_after_us: Some(us),
                ..
            } => assert_eq!(us, 100_000),
            other => panic!("expected a denial, got {other:?}"),
        }
        // 100 ms later one token has come back.
        assert!(matches!(
            r(now.saturating_add(100_000)),
            UsageOutcome::Rate { admitted: true, .. }
        ));
    }

    fn retry_after(o: UsageOutcome) -> Option<i64> {
        match o {
            UsageOutcome::Rate { retry_after_us, .. } => retry_after_us,
            other => panic!("not a rate outcome: {other:?}"),
        }
    }

    /// A limiter written under another grant follows the current one: one pushed to
    /// the end of `i64` nanoseconds by a huge period waits an hour under
    /// `1/h`, and one throttled under `1/h` waits one 100th of a second under `100/s`.
    #[test]
    fn a_changed_grant_rederives_the_limiter() {
        let s = Rates::default();
        let now = Timestamp(1_800_000_000 * SECOND);
        // What `per: 90000d` once left behind: an arrival time saturated at the end
        // of i64 nanoseconds (2262).
        s.0.insert(owned(KEY, 0), AtomicI64::new(i64::MAX));
        let hour = 3600 * SECOND;
        let o = s.rate(KEY, 1, hour, 1, 1, true, now);
        assert_eq!(retry_after(o), Some(hour), "{o:?}");
        let o = s.rate(KEY, 1, hour, 1, 1, true, now.saturating_add(hour));
        assert!(
            matches!(o, UsageOutcome::Rate { admitted: true, .. }),
            "an hour later under 1/h: {o:?}"
        );

        let k = UsageKey {
            customer: "c",
            feature: "f",
        };
        s.rate(k, 1, hour, 1, 1, true, now);
        let o = s.rate(k, 1, hour, 1, 1, true, now);
        assert_eq!(retry_after(o), Some(hour), "throttled under 1/h: {o:?}");
        let o = s.rate(k, 100, SECOND, 100, 1, true, now);
        assert_eq!(retry_after(o), Some(SECOND / 100), "under 100/s: {o:?}");
        let o = s.rate(
            k,
            100,
            SECOND,
            100,
            1,
            true,
            now.saturating_add(SECOND / 100),
        );
        assert!(
            matches!(o, UsageOutcome::Rate { admitted: true, .. }),
            "10 ms later under 100/s: {o:?}"
        );
    }

    /// Where the arithmetic would overflow, the limiter denies rather than admits.
    #[test]
    fn overflow_fails_closed() {
        // 90000 days: policies refuse it, but the arithmetic must not admit anyway.
        let per = 90_000 * 24 * 3600 * SECOND;
        let g = Gcra::new(1, per, 1, 1, Timestamp(1_800_000_000 * SECOND));
        assert!(!g.admits(i64::MAX), "a limiter at the end of time");
        assert!(!g.admits(0), "a fresh limiter whose next arrival overflows");
    }

    #[test]
    fn rate_checks_take_nothing_and_extreme_limits_hold() {
        let s = Rates::default();
        let now = Timestamp(1_000 * SECOND);
        let full = s.rate(KEY, 10, SECOND, 10, 1, false, now);
        assert!(
            matches!(
                full,
                UsageOutcome::Rate {
                    admitted: true,
                    remaining: 10,
                    ..
                }
            ),
            "{full:?}"
        );
        // A burst beyond i64 is "no burst limit", not "deny everything".
        let big = s.rate(KEY, 10, SECOND, u64::MAX, 1, true, now);
        assert!(
            matches!(big, UsageOutcome::Rate { admitted: true, .. }),
            "{big:?}"
        );
        // Two billion per second: the bucket is full again one second later.
        let k = UsageKey {
            customer: "b",
            feature: "f",
        };
        let n = 2_000_000_000;
        assert!(matches!(
            s.rate(k, n, SECOND, n, n, true, now),
            UsageOutcome::Rate { admitted: true, .. }
        ));
        let later = s.rate(
            k,
            n,
            SECOND,
            n,
            1_500_000_000,
            true,
            now.saturating_add(1_200_000),
        );
        assert!(
            matches!(later, UsageOutcome::Rate { admitted: true, .. }),
            "{later:?}"
        );
    }
}
