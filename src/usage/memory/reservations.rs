//! Reservations: units held against a quota window until committed, released or
//! expired. The held units count in the window's counter while the hold is open, so
//! a reserve admits only what exists; settling gives back what was not committed.

use std::sync::atomic::Ordering;

use dashmap::DashMap;

use super::keys::Hasher_;
use super::quota::{Quotas, finite, overage, sub};
use crate::engine::UsageKey;
use crate::ids::ReservationId;
use crate::policy::Limit;
use crate::time::Timestamp;
use crate::usage::SettleAction;
use crate::usage::durable::record::{SettleOutcome, Settled};
pub use crate::usage::durable::state::Hold;

/// The open reservations, by id.
#[derive(Debug, Default)]
pub(super) struct Holds(DashMap<ReservationId, Hold, Hasher_>);

impl Holds {
    /// Commits or releases the reservation `id` against its window in `quotas`.
    /// Returns the answer, and the hold when it ended (committed or released) and
    /// the change must be journaled; `None` when nothing changed: the reservation
    /// was unknown, had expired (its units go back all the same), or a commit did not
    /// fit (the hold stays for a smaller commit or a release).
    pub(super) fn settle(
        &self,
        quotas: &Quotas,
        id: ReservationId,
        action: SettleAction,
        now: Timestamp,
    ) -> (Settled, Option<Hold>) {
        let Some((_, hold)) = self.0.remove(&id) else {
            return (Settled::not_found(), None);
        };
        let key = UsageKey {
            customer: &hold.customer,
            feature: &hold.feature,
        };
        let cell = quotas.cell(key, hold.window_start, hold.window_end);
        if hold.expires <= now.0 {
            // Expired before the sweep got to it: it returns to the quota all the same.
            sub(&cell.used, hold.amount);
            drop(cell);
            return (Settled::not_found(), None);
        }
        let mut o = SettleOutcome {
            found: true,
            limit: finite(hold.limit),
            window_end: hold.window_end,
            ..SettleOutcome::default()
        };
        match action {
            SettleAction::Release => {
                o.released = hold.amount;
                o.used = sub(&cell.used, hold.amount);
            }
            SettleAction::Commit(actual) if actual <= hold.amount => {
                o.committed = actual;
                o.released = hold.amount - actual;
                o.used = sub(&cell.used, hold.amount - actual);
            }
            SettleAction::Commit(actual) => {
                let extra = actual - hold.amount;
                let mut cur = cell.used.load(Ordering::Acquire);
                loop {
                    let next = cur.saturating_add(extra);
                    let fits = match hold.limit {
                        Limit::Unlimited => true,
                        Limit::Finite(l) => next <= l,
                    };
                    if !fits && !hold.allow_overage {
                        o.denied = true;
                        o.used = cur;
                        break;
                    }
                    match cell.used.compare_exchange_weak(
                        cur,
                        next,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            o.committed = actual;
                            o.used = next;
                            // Units past the limit: the hold's own units fitted when taken.
                            o.overage = overage(hold.limit, cur, next);
                            break;
                        }
                        Err(now_used) => cur = now_used,
                    }
                }
            }
        }
        drop(cell);
        let settled = Settled {
            outcome: o,
            customer: hold.customer.to_string(),
            feature: hold.feature.to_string(),
            window_start: hold.window_start,
        };
        if o.denied {
            // Nothing counted: the hold stays for a smaller commit or a release.
            self.0.insert(id, hold);
            return (settled, None);
        }
        (settled, Some(hold))
    }

    /// Returns expired reservations to their quotas. Returns how many.
    pub(super) fn expire(&self, quotas: &Quotas, now: Timestamp) -> usize {
        let mut expired = Vec::new();
        self.0.retain(|_, h| {
            let keep = h.expires > now.0;
            if !keep {
                expired.push((
                    h.customer.clone(),
                    h.feature.clone(),
                    h.window_start,
                    h.amount,
                ));
            }
            keep
        });
        for (c, f, start, amount) in &expired {
            let key = UsageKey {
                customer: c,
                feature: f,
            };
            quotas.give_back(key, *start, *amount);
        }
        expired.len()
    }

    pub(super) fn insert(&self, id: ReservationId, hold: Hold) {
        self.0.insert(id, hold);
    }

    /// Drops the reservation `id` (a reserve taken back); returns it if it was open.
    pub(super) fn remove(&self, id: ReservationId) -> Option<Hold> {
        self.0.remove(&id).map(|(_, h)| h)
    }

    /// The open reservation `id`, if any.
    pub(super) fn get(&self, id: ReservationId) -> Option<Hold> {
        self.0.get(&id).map(|h| h.clone())
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
