//! Seat pools: a small set of holders per customer and feature, changed under the
//! shard's write lock, which makes acquire-if-room atomic.

use std::collections::HashSet;

use dashmap::DashMap;

use super::keys::{Hasher_, Key, KeyView, owned};
use crate::engine::{SeatAction, UsageKey, UsageOutcome};
use crate::policy::Limit;

/// The seat pools, by (customer, feature): the holders of each.
#[derive(Debug, Default)]
pub(super) struct Seats(DashMap<Key, HashSet<Box<str>>, Hasher_>);

impl Seats {
    #[cfg(test)]
    pub(super) fn seat(
        &self,
        key: UsageKey<'_>,
        limit: Limit,
        holder: Option<&str>,
        action: SeatAction,
    ) -> UsageOutcome {
        self.seat_with(key, limit, holder, action, |_, _, _| {})
    }

    /// A seat step; `changed` runs under the pool's lock when a holder is added or
    /// removed, so the journal sees a pool's changes in the order they happened.
    pub(super) fn seat_with<'h>(
        &self,
        key: UsageKey<'_>,
        limit: Limit,
        holder: Option<&'h str>,
        action: SeatAction,
        changed: impl FnOnce(&UsageOutcome, &'h str, bool),
    ) -> UsageOutcome {
        let probe = (key, 0i64);
        let room = |n: usize| match limit {
            Limit::Unlimited => true,
            Limit::Finite(l) => (n as u64) < l,
        };
        match (action, holder) {
            (SeatAction::Check, _) | (_, None) => {
                let (used, holds) = self.0.get(&probe as &dyn KeyView).map_or((0, false), |s| {
                    (s.len(), holder.is_some_and(|h| s.contains(h)))
                });
                UsageOutcome::Seat {
                    admitted: holds || room(used),
                    used: used as u64,
                    unchanged: true,
                }
            }
            (SeatAction::Acquire, Some(h)) => {
                let mut pool = self.0.entry(owned(key, 0)).or_default();
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
                let o = UsageOutcome::Seat {
                    admitted: true,
                    used: pool.len() as u64,
                    unchanged: false,
                };
                changed(&o, h, true);
                o
            }
            (SeatAction::Release, Some(h)) => match self.0.get_mut(&probe as &dyn KeyView) {
                Some(mut pool) => {
                    let removed = pool.remove(h);
                    let o = UsageOutcome::Seat {
                        admitted: true,
                        used: pool.len() as u64,
                        unchanged: !removed,
                    };
                    if removed {
                        changed(&o, h, false);
                    }
                    o
                }
                None => UsageOutcome::Seat {
                    admitted: true,
                    used: 0,
                    unchanged: true,
                },
            },
        }
    }

    /// Takes back a seat change the journal refused: an acquired seat is released,
    /// a released one held again.
    pub(super) fn undo(&self, key: UsageKey<'_>, holder: &str, acquired: bool) {
        if acquired {
            if let Some(mut pool) = self.0.get_mut(&(key, 0i64) as &dyn KeyView) {
                pool.remove(holder);
            }
        } else {
            self.0
                .entry(owned(key, 0))
                .or_default()
                .insert(holder.into());
        }
    }

    /// Drops pools nobody holds a seat in.
    pub(super) fn drop_empty(&self) {
        self.0.retain(|_, p| !p.is_empty());
    }

    /// Loads a recovered pool.
    pub(super) fn insert(&self, key: Key, pool: HashSet<Box<str>>) {
        self.0.insert(key, pool);
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::memory::keys::KEY;

    #[test]
    fn seats_are_idempotent_per_holder() {
        let s = Seats::default();
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
