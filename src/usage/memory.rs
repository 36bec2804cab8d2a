//! The in-memory store: dashmap shards of atomics.
//!
//! Quota counters are keyed by (customer, feature, window start): a new window is a
//! new key, so a rollover needs no reset race, and a limit change applies to the
//! current window at once (the limit is read from the snapshot on every step, the
//! count from here). A consume is a compare-and-swap loop on one `AtomicU64`: it
//! either adds the whole amount within the limit or adds nothing. Lookups borrow the
//! request's strings (no allocation); only the first use of a key allocates it.
//!
//! Rate limits are GCRA on one `AtomicI64` (the theoretical arrival time, in
//! nanoseconds) per customer and feature. Seat pools are small sets under the
//! shard's write lock, which makes acquire-if-room atomic.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

use super::{StoreError, UsageStore};
use crate::engine::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};
use crate::policy::Limit;
use crate::time::Timestamp;

type Hasher_ = foldhash::fast::RandomState;

/// `a × b / c` (rounded up or down), saturating at `i64::MAX`.
fn mul_div(a: u64, b: u64, c: u64, round_up: bool) -> i64 {
    let c = c.max(1);
    let q = match a.checked_mul(b) {
        Some(p) => p / c + u64::from(round_up && p % c != 0),
        None => {
            let p = a as u128 * b as u128;
            let q = p / c as u128 + u128::from(round_up && p % c as u128 != 0);
            u64::try_from(q).unwrap_or(u64::MAX)
        }
    };
    i64::try_from(q).unwrap_or(i64::MAX)
}

/// An owned usage key.
#[derive(Debug, Clone)]
pub struct Key {
    customer: Box<str>,
    feature: Box<str>,
    window: i64,
}

/// A key as either owned or borrowed, so maps can be probed with `&str`s.
trait KeyView {
    fn parts(&self) -> (&str, &str, i64);
}

impl KeyView for Key {
    fn parts(&self) -> (&str, &str, i64) {
        (&self.customer, &self.feature, self.window)
    }
}

impl KeyView for (UsageKey<'_>, i64) {
    fn parts(&self) -> (&str, &str, i64) {
        (self.0.customer, self.0.feature, self.1)
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let (c, f, w) = self.parts();
        c.hash(h);
        f.hash(h);
        w.hash(h);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn KeyView).hash(h)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

fn owned(k: UsageKey<'_>, window: i64) -> Key {
    Key {
        customer: k.customer.into(),
        feature: k.feature.into(),
        window,
    }
}

#[derive(Debug)]
struct QuotaCell {
    used: AtomicU64,
    /// When the window ends: the cell can be dropped after that.
    window_end: i64,
}

/// Usage in memory. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    quotas: DashMap<Key, QuotaCell, Hasher_>,
    rates: DashMap<Key, AtomicI64, Hasher_>,
    seats: DashMap<Key, HashSet<Box<str>>, Hasher_>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one usage step. Infallible: memory is always there.
    pub fn run(&self, op: &UsageOp<'_>, now: Timestamp) -> UsageOutcome {
        match *op {
            UsageOp::Quota {
                key,
                window_start,
                window_end,
                limit,
                amount,
                mode,
                allow_overage,
            } => self.quota(
                key,
                window_start,
                window_end,
                limit,
                amount,
                mode,
                allow_overage,
            ),
            UsageOp::Rate {
                key,
                limit,
                per_us,
                burst,
                amount,
                consume,
            } => self.rate(key, limit, per_us, burst, amount, consume, now),
            UsageOp::Seat {
                key,
                limit,
                holder,
                action,
            } => self.seat(key, limit, holder, action),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn quota(
        &self,
        key: UsageKey<'_>,
        start: Timestamp,
        end: Timestamp,
        limit: Limit,
        amount: u64,
        mode: QuotaMode,
        allow_overage: bool,
    ) -> UsageOutcome {
        let probe = (key, start.0);
        let fits = |used: u64| match limit {
            Limit::Unlimited => true,
            Limit::Finite(l) => used.checked_add(amount).is_some_and(|n| n <= l),
        };
        match mode {
            QuotaMode::Check => {
                let used = self
                    .quotas
                    .get(&probe as &dyn KeyView)
                    .map_or(0, |c| c.used.load(Ordering::Acquire));
                return UsageOutcome::Quota {
                    admitted: allow_overage || fits(used),
                    used,
                    used_before: used,
                };
            }
            QuotaMode::Consume => {}
        }
        let take = |cell: &QuotaCell| {
            let mut cur = cell.used.load(Ordering::Acquire);
            loop {
                if !fits(cur) && !allow_overage {
                    return UsageOutcome::Quota {
                        admitted: false,
                        used: cur,
                        used_before: cur,
                    };
                }
                let Some(next) = cur.checked_add(amount) else {
                    return UsageOutcome::Quota {
                        admitted: false,
                        used: cur,
                        used_before: cur,
                    };
                };
                match cell.used.compare_exchange_weak(
                    cur,
                    next,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        return UsageOutcome::Quota {
                            admitted: true,
                            used: next,
                            used_before: cur,
                        };
                    }
                    Err(actual) => cur = actual,
                }
            }
        };
        if let Some(cell) = self.quotas.get(&probe as &dyn KeyView) {
            return take(&cell);
        }
        // A denied first consume must not leave an entry behind: check before insert.
        if !fits(0) && !allow_overage {
            return UsageOutcome::Quota {
                admitted: false,
                used: 0,
                used_before: 0,
            };
        }
        let cell = self
            .quotas
            .entry(owned(key, start.0))
            .or_insert_with(|| QuotaCell {
                used: AtomicU64::new(0),
                window_end: end.0,
            })
            .downgrade();
        take(&cell)
    }

    #[allow(clippy::too_many_arguments)]
    fn rate(
        &self,
        key: UsageKey<'_>,
        limit: u64,
        per_us: i64,
        burst: u64,
        amount: u64,
        consume: bool,
        now: Timestamp,
    ) -> UsageOutcome {
        let now_ns = now.0.saturating_mul(1_000);
        let per_ns = (per_us.max(1) as u64).saturating_mul(1_000);
        // What `amount` requests cost in time (rounded up: fail closed), and how much
        // backlog the burst allows. 64-bit unless the product overflows: an i128
        // division on every check was a third of its time.
        let cost = mul_div(amount, per_ns, limit, true);
        let tau = mul_div(burst, per_ns, limit, false);
        let outcome = |tat: i64, admitted: bool, took: bool| {
            let base = tat.max(now_ns);
            let after = if took {
                base.saturating_add(cost)
            } else {
                base
            };
            let backlog = after - now_ns;
            UsageOutcome::Rate {
                admitted,
                remaining: mul_div((tau - backlog).max(0) as u64, limit, per_ns, false) as u64,
                reset_after_us: backlog.div_euclid(1_000),
                retry_after_us: (!admitted).then(|| {
                    let ns = (base.saturating_add(cost) - now_ns - tau).max(0);
                    (ns + 999) / 1_000
                }),
            }
        };
        let decide = |tat: i64| tat.max(now_ns).saturating_add(cost) - now_ns <= tau;
        let probe = (key, 0i64);
        if !consume {
            let tat = self
                .rates
                .get(&probe as &dyn KeyView)
                .map_or(0, |c| c.load(Ordering::Acquire));
            // A check takes nothing: report what is left before this request.
            return outcome(tat, decide(tat), false);
        }
        let step = |cell: &AtomicI64| {
            let mut tat = cell.load(Ordering::Acquire);
            loop {
                if !decide(tat) {
                    return outcome(tat, false, false);
                }
                let next = tat.max(now_ns).saturating_add(cost);
                match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return outcome(tat, true, true),
                    Err(actual) => tat = actual,
                }
            }
        };
        if let Some(cell) = self.rates.get(&probe as &dyn KeyView) {
            return step(&cell);
        }
        let cell = self
            .rates
            .entry(owned(key, 0))
            .or_insert_with(|| AtomicI64::new(0))
            .downgrade();
        step(&cell)
    }

    fn seat(
        &self,
        key: UsageKey<'_>,
        limit: Limit,
        holder: Option<&str>,
        action: SeatAction,
    ) -> UsageOutcome {
        let probe = (key, 0i64);
        let room = |n: usize| match limit {
            Limit::Unlimited => true,
            Limit::Finite(l) => (n as u64) < l,
        };
        match (action, holder) {
            (SeatAction::Check, _) | (_, None) => {
                let (used, holds) = self
                    .seats
                    .get(&probe as &dyn KeyView)
                    .map_or((0, false), |s| {
                        (s.len(), holder.is_some_and(|h| s.contains(h)))
                    });
                UsageOutcome::Seat {
                    admitted: holds || room(used),
                    used: used as u64,
                    unchanged: true,
                }
            }
            (SeatAction::Acquire, Some(h)) => {
                let mut pool = self.seats.entry(owned(key, 0)).or_default();
                if pool.contains(h) {
                    return UsageOutcome::Seat {
                        admitted: true,
                        used: pool.len() as u64,
                        unchanged: true,
                    };
                }
                if !room(pool.len()) {
                    return UsageOutcome::Seat {
                        admitted: false,
                        used: pool.len() as u64,
                        unchanged: true,
                    };
                }
                pool.insert(h.into());
                UsageOutcome::Seat {
                    admitted: true,
                    used: pool.len() as u64,
                    unchanged: false,
                }
            }
            (SeatAction::Release, Some(h)) => match self.seats.get_mut(&probe as &dyn KeyView) {
                Some(mut pool) => {
                    let removed = pool.remove(h);
                    UsageOutcome::Seat {
                        admitted: true,
                        used: pool.len() as u64,
                        unchanged: !removed,
                    }
                }
                None => UsageOutcome::Seat {
                    admitted: true,
                    used: 0,
                    unchanged: true,
                },
            },
        }
    }

    /// Drops quota counters of windows that ended before `now`. Returns how many.
    pub fn compact(&self, now: Timestamp) -> usize {
        let before = self.quotas.len();
        self.quotas.retain(|_, c| c.window_end > now.0);
        before - self.quotas.len()
    }

    /// Number of live quota counters.
    pub fn quota_counters(&self) -> usize {
        self.quotas.len()
    }
}

impl UsageStore for MemoryStore {
    fn apply(
        &self,
        op: &UsageOp<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<UsageOutcome, StoreError>> + Send {
        std::future::ready(Ok(self.run(op, now)))
    }

    fn try_now(
        &self,
        op: &UsageOp<'_>,
        now: Timestamp,
    ) -> Option<Result<UsageOutcome, StoreError>> {
        Some(Ok(self.run(op, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SECOND;

    const KEY: UsageKey<'static> = UsageKey {
        customer: "acme",
        feature: "api.calls",
    };

    fn consume(s: &MemoryStore, limit: u64, amount: u64, overage: bool) -> UsageOutcome {
        s.quota(
            KEY,
            Timestamp(0),
            Timestamp(100),
            Limit::Finite(limit),
            amount,
            QuotaMode::Consume,
            overage,
        )
    }

    #[test]
    fn quota_admits_up_to_the_limit_and_denied_counts_nothing() {
        let s = MemoryStore::new();
        assert_eq!(
            consume(&s, 3, 2, false),
            UsageOutcome::Quota {
                admitted: true,
                used: 2,
                used_before: 0
            }
        );
        assert_eq!(
            consume(&s, 3, 2, false),
            UsageOutcome::Quota {
                admitted: false,
                used: 2,
                used_before: 2
            }
        );
        assert_eq!(
            consume(&s, 3, 1, false),
            UsageOutcome::Quota {
                admitted: true,
                used: 3,
                used_before: 2
            }
        );
        assert_eq!(
            consume(&s, 3, 5, true),
            UsageOutcome::Quota {
                admitted: true,
                used: 8,
                used_before: 3
            }
        );
    }

    #[test]
    fn first_denied_consume_leaves_no_counter() {
        let s = MemoryStore::new();
        assert!(matches!(
            consume(&s, 1, 2, false),
            UsageOutcome::Quota {
                admitted: false,
                ..
            }
        ));
        assert_eq!(s.quota_counters(), 0);
    }

    #[test]
    fn compaction_drops_ended_windows() {
        let s = MemoryStore::new();
        consume(&s, 10, 1, false);
        assert_eq!(s.compact(Timestamp(50)), 0);
        assert_eq!(s.compact(Timestamp(100)), 1);
    }

    #[test]
    fn gcra_allows_burst_then_paces() {
        let s = MemoryStore::new();
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

    #[test]
    fn rate_checks_take_nothing_and_extreme_limits_hold() {
        let s = MemoryStore::new();
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

    #[test]
    fn seats_are_idempotent_per_holder() {
        let s = MemoryStore::new();
        let acq = |h| s.seat(KEY, Limit::Finite(2), Some(h), SeatAction::Acquire);
        assert!(matches!(
            acq("u1"),
            UsageOutcome::Seat {
                admitted: true,
                used: 1,
                unchanged: false
            }
        ));
        assert!(matches!(
            acq("u1"),
            UsageOutcome::Seat {
                admitted: true,
                used: 1,
                unchanged: true
            }
        ));
        assert!(matches!(
            acq("u2"),
            UsageOutcome::Seat {
                admitted: true,
                used: 2,
                ..
            }
        ));
        assert!(matches!(
            acq("u3"),
            UsageOutcome::Seat {
                admitted: false,
                used: 2,
                ..
            }
        ));
        s.seat(KEY, Limit::Finite(2), Some("u1"), SeatAction::Release);
        assert!(matches!(
            acq("u3"),
            UsageOutcome::Seat {
                admitted: true,
                used: 2,
                ..
            }
        ));
    }
}
