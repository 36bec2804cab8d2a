//! The usage state a state directory holds, as plain maps: what replaying records
//! builds, what a checkpoint writes, and what the in-memory store loads at start-up.
//!
//! Counters hold committed units only; open holds are kept as reservations and added
//! back to their windows when the state is loaded into the store. This module owns
//! the [`State`] type; replay fills it, checkpoints write it, and neither needs the
//! other to do so.

use std::collections::{HashMap, HashSet};

use super::record::{Answer, Record};
use crate::ids::ReservationId;
use crate::policy::Limit;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// (customer, feature) → holders.
type SeatPools = Map<(Box<str>, Box<str>), HashSet<Box<str>>>;

/// An open reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub customer: Box<str>,
    pub feature: Box<str>,
    pub window_start: i64,
    pub window_end: i64,
    pub amount: u64,
    pub limit: Limit,
    pub allow_overage: bool,
    pub expires: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub end: i64,
    /// Committed units (not counting open holds).
    pub used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemState {
    pub fingerprint: u64,
    pub expires: i64,
    pub answer: Answer,
}

#[derive(Debug, Default, Clone)]
pub struct State {
    pub quotas: Map<(Box<str>, Box<str>, i64), QuotaState>,
    pub holds: Map<ReservationId, Hold>,
    pub seats: SeatPools,
    pub idem: Map<(Box<str>, Box<str>), IdemState>,
}

impl State {
    pub fn apply(&mut self, r: &Record<'_>) {
        match *r {
            Record::Consume {
                customer,
                feature,
                window_start,
                window_end,
                amount,
                ..
            } => self.count(customer, feature, window_start, window_end, amount),
            Record::Reserve {
                id,
                customer,
                feature,
                window_start,
                window_end,
                amount,
                limit,
                allow_overage,
                expires,
                ..
            } => {
                self.holds.insert(
                    id,
                    Hold {
                        customer: customer.into(),
                        feature: feature.into(),
                        window_start,
                        window_end,
                        amount,
                        limit: limit.map_or(Limit::Unlimited, Limit::Finite),
                        allow_overage,
                        expires,
                    },
                );
            }
            Record::Settle {
                id,
                customer,
                feature,
                window_start,
                window_end,
                committed,
                ..
            } => {
                self.holds.remove(&id);
                if committed > 0 {
                    self.count(customer, feature, window_start, window_end, committed);
                }
            }
            Record::Seat {
                customer,
                feature,
                holder,
                acquire,
                ..
            } => {
                let key = (Box::from(customer), Box::from(feature));
                if acquire {
                    self.seats.entry(key).or_default().insert(holder.into());
                } else if let Some(pool) = self.seats.get_mut(&key) {
                    pool.remove(holder);
                    if pool.is_empty() {
                        self.seats.remove(&key);
                    }
                }
            }
            Record::Idem {
                customer,
                key,
                fingerprint,
                expires,
                ref answer,
            } => {
                self.idem.insert(
                    (customer.into(), key.into()),
                    IdemState {
                        fingerprint,
                        expires,
                        answer: answer.clone(),
                    },
                );
            }
        }
    }

    fn count(&mut self, customer: &str, feature: &str, start: i64, end: i64, n: u64) {
        let q = self
            .quotas
            .entry((customer.into(), feature.into(), start))
            .or_insert(QuotaState { end, used: 0 });
        q.used = q.used.saturating_add(n);
    }

    /// Restores counters a damaged checkpoint lost: where the usage ledger counted more
    /// in a window up to the checkpoint (`ledger`) than what was left of the checkpoint
    /// (`checkpoint`), the difference is counted again here. Returns the counters raised
    /// and the units added.
    pub fn restore_from_ledger(&mut self, ledger: &State, checkpoint: &State) -> (u64, u64) {
        let (mut counters, mut units) = (0, 0);
        for ((customer, feature, start), q) in &ledger.quotas {
            let key = (customer.clone(), feature.clone(), *start);
            let had = checkpoint.quotas.get(&key).map_or(0, |c| c.used);
            if q.used > had {
                self.count(customer, feature, *start, q.end, q.used - had);
                counters += 1;
                units += q.used - had;
            }
        }
        (counters, units)
    }

    /// Drops what has ended by `now`: quota windows, reservations (their units go
    /// back to the quota, which holds committed units only) and idempotency keys.
    pub fn prune(&mut self, now: i64) {
        self.quotas.retain(|_, q| q.end > now);
        self.holds.retain(|_, h| h.expires > now);
        self.idem.retain(|_, e| e.expires > now);
    }

    pub fn len(&self) -> usize {
        self.quotas.len() + self.holds.len() + self.seats.len() + self.idem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
