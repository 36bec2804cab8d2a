//! Quota counters, keyed by (customer, feature, window start).
//!
//! A new window is a new key, so a rollover needs no reset race, and a limit change
//! applies to the current window at once (the limit is read from the snapshot on
//! every step, the count from here). A consume is a compare-and-swap loop on one
//! `AtomicU64`: it either adds the whole amount within the limit or adds nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::keys::{Hasher_, Key, KeyView, owned};
use crate::engine::{QuotaMode, UsageKey, UsageOutcome};
use crate::policy::Limit;
use crate::time::Timestamp;

#[derive(Debug)]
pub(super) struct QuotaCell {
    /// Units counted in the window plus units held by open reservations.
    pub(super) used: AtomicU64,
    /// When the window ends: the cell can be dropped after that.
    pub(super) window_end: i64,
}

/// The quota counters of live windows.
#[derive(Debug, Default)]
pub(super) struct Quotas(DashMap<Key, QuotaCell, Hasher_>);

impl Quotas {
    /// Room for `n` counters: growing a large map step by step is slow.
    pub(super) fn with_capacity(n: usize) -> Self {
        Quotas(DashMap::with_capacity_and_hasher(n, Hasher_::default()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn quota(
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
        // A hold must fit, overage or not: it is a promise of units that exist.
        let allow_overage = allow_overage && mode != QuotaMode::Reserve;
        let fits = |used: u64| match limit {
            Limit::Unlimited => true,
            Limit::Finite(l) => used.checked_add(amount).is_some_and(|n| n <= l),
        };
        match mode {
            QuotaMode::Check => {
                let used = self
                    .0
                    .get(&probe as &dyn KeyView)
                    .map_or(0, |c| c.used.load(Ordering::Acquire));
                return UsageOutcome::Quota {
                    admitted: allow_overage || fits(used),
                    used,
                    used_before: used,
                };
            }
            QuotaMode::Consume | QuotaMode::Reserve => {}
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
        if let Some(cell) = self.0.get(&probe as &dyn KeyView) {
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
            .0
            .entry(owned(key, start.0))
            .or_insert_with(|| QuotaCell {
                used: AtomicU64::new(0),
                window_end: end.0,
            })
            .downgrade();
        take(&cell)
    }

    /// The window's cell, created if needed.
    pub(super) fn cell(
        &self,
        key: UsageKey<'_>,
        start: i64,
        end: i64,
    ) -> dashmap::mapref::one::Ref<'_, Key, QuotaCell> {
        if let Some(c) = self.0.get(&(key, start) as &dyn KeyView) {
            return c;
        }
        self.0
            .entry(owned(key, start))
            .or_insert_with(|| QuotaCell {
                used: AtomicU64::new(0),
                window_end: end,
            })
            .downgrade()
    }

    /// Adds `n` units to a window's counter (units counted elsewhere: another
    /// replica, or a shared store's total). Negative to take back.
    pub(super) fn add(&self, key: UsageKey<'_>, start: i64, end: i64, n: i64) {
        let cell = self.cell(key, start, end);
        if n >= 0 {
            cell.used.fetch_add(n as u64, Ordering::AcqRel);
        } else {
            sub(&cell.used, n.unsigned_abs());
        }
    }

    /// Gives `amount` units back to a window's counter, if it still exists.
    pub(super) fn give_back(&self, key: UsageKey<'_>, start: i64, amount: u64) {
        if let Some(cell) = self.0.get(&(key, start) as &dyn KeyView) {
            sub(&cell.used, amount);
        }
    }

    /// Drops the counters of windows that ended before `now`. Returns how many.
    pub(super) fn drop_ended(&self, now: Timestamp) -> usize {
        let before = self.0.len();
        self.0.retain(|_, c| c.window_end > now.0);
        before - self.0.len()
    }

    /// Loads a recovered counter.
    pub(super) fn insert(&self, key: Key, used: u64, window_end: i64) {
        self.0.insert(
            key,
            QuotaCell {
                used: AtomicU64::new(used),
                window_end,
            },
        );
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

pub(super) fn finite(l: Limit) -> Option<u64> {
    match l {
        Limit::Finite(n) => Some(n),
        Limit::Unlimited => None,
    }
}

/// Units of the step from `before` to `after` that lie beyond the limit.
pub(super) fn overage(limit: Limit, before: u64, after: u64) -> u64 {
    match limit {
        Limit::Finite(l) if after > l => after - before.max(l),
        _ => 0,
    }
}

/// Subtracts (saturating at zero); returns the new value.
pub(super) fn sub(a: &AtomicU64, n: u64) -> u64 {
    let mut cur = a.load(Ordering::Acquire);
    loop {
        let next = cur.saturating_sub(n);
        match a.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next,
            Err(actual) => cur = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::memory::keys::KEY;

    fn consume(s: &Quotas, limit: u64, amount: u64, overage: bool) -> UsageOutcome {
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
        let s = Quotas::default();
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
        let s = Quotas::default();
        assert!(matches!(
            consume(&s, 1, 2, false),
            UsageOutcome::Quota {
                admitted: false,
                ..
            }
        ));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn compaction_drops_ended_windows() {
        let s = Quotas::default();
        consume(&s, 10, 1, false);
        assert_eq!(s.drop_ended(Timestamp(50)), 0);
        assert_eq!(s.drop_ended(Timestamp(100)), 1);
    }
}
