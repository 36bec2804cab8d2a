//! The in-memory store: dashmap shards of atomics, one map per kind of usage.
//!
//! - `quota`: counters per (customer, feature, window start), compare-and-swap;
//! - `rate`: GCRA limiters per (customer, feature);
//! - `seats`: holder sets per (customer, feature);
//! - `reservations`: units held against a window until committed or released;
//! - `idempotency`: remembered keys and their answers;
//! - `journaling`: how every change reaches the state directory's journal, when
//!   the store has one;
//! - `keys`: the maps' keys, probed with borrowed strings (no allocation).
//!
//! This module puts them together: a step claims its idempotency key, changes one
//! map, journals the change and remembers the answer. Lookups borrow the request's
//! strings; only the first use of a key allocates it.

mod idempotency;
mod journaling;
mod keys;
mod quota;
mod rate;
mod reservations;
mod seats;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use self::idempotency::{IdemEntry, IdemKeys, reused};
use self::journaling::{Journaling, Logged};
use self::keys::Key;
use self::quota::{Quotas, finite, overage};
use self::rate::Rates;
use self::seats::Seats;
use super::durable::journal::{Journal, Undo};
use super::durable::record::{Answer, Record, SettleOutcome, Settled};
use super::durable::state::State;
use super::durable::{DurableConfig, OpenReport, StateDir, StateError};
use super::{Ack, Answered, IdemKey, SettleAction, StepMeta, StoreConfig, StoreError, UsageStore};
use crate::engine::{QuotaMode, UsageKey, UsageOp, UsageOutcome};
use crate::ids::{ReservationId, reservation_name};
use crate::time::Timestamp;

pub(crate) use self::rate::Gcra;
pub use self::reservations::Hold;
use self::reservations::Holds;

/// How much live state the store holds (for metrics and soak tests): the state
/// gauges' own record, so that metrics needs nothing from the store.
pub type Counts = crate::metrics::UsageState;

/// Usage in memory, made durable by an optional [`Journal`]. Cheap to share behind an
/// `Arc`; every method takes `&self`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    quotas: Quotas,
    rates: Rates,
    seats: Seats,
    holds: Holds,
    idem: IdemKeys,
    journal: Journaling,
    config: StoreConfig,
}

impl MemoryStore {
    /// Memory only: usage is lost on restart.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the state directory `config.dir`, recovers the store from it, and journals
    /// every change from now on.
    pub fn open_durable(
        config: DurableConfig,
        clock: Arc<dyn crate::time::Clock>,
    ) -> Result<(StateDir, MemoryStore, OpenReport), StateError> {
        let started = std::time::Instant::now();
        let store_config = config.store;
        let (dir, opened, report) = StateDir::open(config, clock)?;
        let mut store = MemoryStore::with_journal(Some(opened.journal), store_config);
        store.restore(opened.state);
        let report = OpenReport {
            elapsed: started.elapsed(),
            ..report
        };
        Ok((dir, store, report))
    }

    /// Writes every change to `journal` (see [`super::durable`]).
    pub fn with_journal(journal: Option<Arc<Journal>>, config: StoreConfig) -> Self {
        MemoryStore {
            journal: Journaling::new(journal),
            config,
            ..Self::default()
        }
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.journal()
    }

    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// Runs one usage step. Infallible without a journal.
    pub fn run(&self, op: &UsageOp<'_>, now: Timestamp) -> UsageOutcome {
        let meta = StepMeta::default();
        match self.step(op, &meta, now) {
            Ok((o, _)) => o,
            // Only a journal or an idempotency key can fail a step.
            Err(_) => super::unrun(op, false),
        }
    }

    /// Runs one usage step with its metadata: the idempotency key is looked up and
    /// remembered, and the change is journaled, in one atomic step per key.
    pub fn step(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(UsageOutcome, Logged), StoreError> {
        self.step_answered(op, meta, now)
            .map(|(a, lsn)| (a.answer, lsn))
    }

    /// [`Self::step`], saying whether the answer is a replay.
    pub fn step_answered(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(Answered<UsageOutcome>, Logged), StoreError> {
        self.journal.accepting()?;
        let fresh = |r: (UsageOutcome, Logged)| (Answered::fresh(r.0), r.1);
        let Some(ik) = meta.idempotency else {
            return self.step_inner(op, meta, None, now).map(fresh);
        };
        let scope = op_key(op).customer;
        match self.idem.begin(scope, &ik, now, &self.config)? {
            Some((Answer::Usage(answer), lsn)) => {
                return Ok((
                    Answered {
                        answer,
                        replayed: true,
                    },
                    lsn,
                ));
            }
            Some((Answer::Settle(_), _)) => return Err(reused(ik.key)),
            None => {}
        }
        let r = self.step_inner(op, meta, Some((scope, ik)), now);
        self.idem.end(
            scope,
            &ik,
            r.as_ref().ok().map(|(o, l)| (Answer::Usage(*o), *l)),
        );
        r.map(fresh)
    }

    /// Journals `record` (if any) and the idempotency key (if any) in one frame;
    /// `undo` says how to take `record` back should the journal refuse it. A key is
    /// journaled only with an answer worth remembering ([`idempotency::remembered`]):
    /// a denial changed nothing.
    fn log<'a>(
        &self,
        record: Option<Record<'a>>,
        idem: Option<(&'a str, IdemKey<'a>)>,
        answer: impl FnOnce() -> Answer,
        now: Timestamp,
        undo: impl FnOnce() -> Option<Undo>,
    ) -> Result<Logged, StoreError> {
        let ttl = self.config.idempotency_ttl_us;
        let idem = idem
            .map(|(scope, ik)| (scope, ik, answer()))
            .filter(|(_, _, a)| idempotency::remembered(a));
        self.journal.log(
            record,
            idem.map(|(scope, ik, a)| move || idempotency::record(scope, &ik, a, now, ttl)),
            undo,
        )
    }

    /// One arm per kind of step, each the whole of its step: change the state, then
    /// journal the change (with the idempotency key, in one frame). Kept in one
    /// function so that the order of the two is visible for every kind.
    fn step_inner(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        idem: Option<(&str, IdemKey<'_>)>,
        now: Timestamp,
    ) -> Result<(UsageOutcome, Logged), StoreError> {
        match *op {
            UsageOp::Quota {
                key,
                window_start,
                window_end,
                limit,
                amount,
                mode,
                allow_overage,
            } => {
                let o = self.quotas.quota(
                    key,
                    window_start,
                    window_end,
                    limit,
                    amount,
                    mode,
                    allow_overage,
                );
                let UsageOutcome::Quota {
                    admitted,
                    used,
                    used_before,
                } = o
                else {
                    return Ok((o, None));
                };
                match mode {
                    QuotaMode::Check => Ok((o, None)),
                    QuotaMode::Consume => {
                        let record = admitted.then(|| Record::Consume {
                            customer: key.customer,
                            feature: key.feature,
                            window_start: window_start.0,
                            window_end: window_end.0,
                            amount,
                            overage: overage(limit, used_before, used),
                            time: now.0,
                            snapshot: meta.snapshot,
                        });
                        let undo = || {
                            admitted.then(|| Undo::Count {
                                customer: key.customer.into(),
                                feature: key.feature.into(),
                                window_start: window_start.0,
                                amount,
                            })
                        };
                        let lsn = self.log(record, idem, || Answer::Usage(o), now, undo)?;
                        Ok((o, lsn))
                    }
                    QuotaMode::Reserve => {
                        let reservation = admitted.then(|| uuid::Uuid::new_v4().as_u128());
                        let o = UsageOutcome::Reserved {
                            admitted,
                            used,
                            used_before,
                            reservation,
                        };
                        let Some(id) = reservation else {
                            let lsn = self.log(None, idem, || Answer::Usage(o), now, || None)?;
                            return Ok((o, lsn));
                        };
                        let ttl = meta
                            .ttl_us
                            .unwrap_or(self.config.reservation_ttl_us)
                            .clamp(1, self.config.max_reservation_ttl_us);
                        let hold = Hold {
                            customer: key.customer.into(),
                            feature: key.feature.into(),
                            window_start: window_start.0,
                            window_end: window_end.0,
                            amount,
                            limit,
                            allow_overage,
                            expires: now.0.saturating_add(ttl),
                        };
                        let record = Record::Reserve {
                            id,
                            customer: key.customer,
                            feature: key.feature,
                            window_start: window_start.0,
                            window_end: window_end.0,
                            amount,
                            limit: finite(limit),
                            allow_overage,
                            expires: hold.expires,
                            time: now.0,
                        };
                        self.holds.insert(id, hold);
                        let undo = || Some(Undo::Reserve { id });
                        let lsn = self.log(Some(record), idem, || Answer::Usage(o), now, undo)?;
                        Ok((o, lsn))
                    }
                }
            }
            UsageOp::Rate {
                key,
                limit,
                per_us,
                burst,
                amount,
                consume,
            } => {
                // Rate limiters are not journaled: their state is worth a second at most.
                let o = self
                    .rates
                    .rate(key, limit, per_us, burst, amount, consume, now);
                let lsn = self.log(None, idem, || Answer::Usage(o), now, || None)?;
                Ok((o, lsn))
            }
            UsageOp::Seat {
                key,
                limit,
                holder,
                action,
            } => {
                let mut logged = Ok(None);
                let mut wrote = false;
                let o = self
                    .seats
                    .seat_with(key, limit, holder, action, |o, h, acquire| {
                        wrote = true;
                        let record = Record::Seat {
                            customer: key.customer,
                            feature: key.feature,
                            holder: h,
                            acquire,
                            time: now.0,
                            snapshot: meta.snapshot,
                        };
                        let undo = || {
                            Some(Undo::Seat {
                                customer: key.customer.into(),
                                feature: key.feature.into(),
                                holder: h.into(),
                                acquired: acquire,
                            })
                        };
                        logged = self.log(Some(record), idem, || Answer::Usage(*o), now, undo);
                    });
                if !wrote {
                    logged = self.log(None, idem, || Answer::Usage(o), now, || None);
                }
                Ok((o, logged?))
            }
        }
    }

    /// Commits or releases a reservation.
    pub fn settle(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(Settled, Logged), StoreError> {
        self.settle_answered(id, action, meta, now)
            .map(|(a, lsn)| (a.answer, lsn))
    }

    /// [`Self::settle`], saying whether the answer is a replay.
    pub fn settle_answered(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(Answered<Settled>, Logged), StoreError> {
        self.journal.accepting()?;
        let fresh = |r: (Settled, Logged)| (Answered::fresh(r.0), r.1);
        let scope = reservation_name(id);
        let Some(ik) = meta.idempotency else {
            return self.settle_inner(id, action, meta, None, now).map(fresh);
        };
        match self.idem.begin(&scope, &ik, now, &self.config)? {
            Some((Answer::Settle(answer), lsn)) => {
                return Ok((
                    Answered {
                        answer,
                        replayed: true,
                    },
                    lsn,
                ));
            }
            Some((Answer::Usage(_), _)) => return Err(reused(ik.key)),
            None => {}
        }
        let r = self.settle_inner(id, action, meta, Some((&scope, ik)), now);
        self.idem.end(
            &scope,
            &ik,
            r.as_ref()
                .ok()
                .map(|(s, l)| (Answer::Settle(s.clone()), *l)),
        );
        r.map(fresh)
    }

    fn settle_inner(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        idem: Option<(&str, IdemKey<'_>)>,
        now: Timestamp,
    ) -> Result<(Settled, Logged), StoreError> {
        let (settled, hold) = self.holds.settle(&self.quotas, id, action, now);
        let o: SettleOutcome = settled.outcome;
        let record = hold.as_ref().map(|hold| Record::Settle {
            id,
            customer: &hold.customer,
            feature: &hold.feature,
            window_start: hold.window_start,
            window_end: hold.window_end,
            committed: o.committed,
            overage: o.overage,
            time: now.0,
            snapshot: meta.snapshot,
        });
        let undo = || {
            hold.clone().map(|hold| Undo::Settle {
                id,
                hold,
                committed: o.committed,
            })
        };
        let lsn = self.log(record, idem, || Answer::Settle(settled.clone()), now, undo)?;
        Ok((settled, lsn))
    }

    /// Returns expired reservations to their quotas and forgets expired idempotency
    /// keys. Returns how many reservations expired.
    pub fn expire(&self, now: Timestamp) -> usize {
        let expired = self.holds.expire(&self.quotas, now);
        self.idem.expire(now);
        expired
    }

    /// Appends a record to the journal without changing state here: a shared store
    /// decided it, and this replica's ledger records it.
    pub fn journal_record(&self, record: Record<'_>) -> Result<Logged, StoreError> {
        self.log(Some(record), None, unreachable_answer, Timestamp(0), || {
            None
        })
    }

    /// Adds `n` units to a window's counter (units counted elsewhere: another
    /// replica, or a shared store's total). Negative to take back.
    pub fn add_to_quota(&self, key: UsageKey<'_>, start: i64, end: i64, n: i64) {
        self.quotas.add(key, start, end, n);
    }

    /// The open reservation `id`, if any.
    pub fn hold(&self, id: ReservationId) -> Option<Hold> {
        self.holds.get(id)
    }

    /// Drops quota counters of windows that ended before `now` and empty seat pools.
    /// Returns how many counters.
    pub fn compact(&self, now: Timestamp) -> usize {
        let dropped = self.quotas.drop_ended(now);
        self.seats.drop_empty();
        dropped
    }

    /// Expires reservations; once a minute also drops ended windows. Updates the
    /// state gauges.
    pub fn maintain(&self, now: Timestamp, minute: bool) {
        self.take_back();
        self.expire(now);
        if minute {
            let dropped = self.compact(now);
            if dropped > 0 {
                tracing::debug!(dropped, "dropped quota counters of ended windows");
            }
        }
        crate::metrics::usage_state(&self.counts());
    }

    /// Takes back the changes whose journal writes were refused in sync mode (their
    /// requests are answered 503): the latest first. Run by each refused request
    /// before it answers, and by maintenance, so none is left behind.
    pub fn take_back(&self) {
        for u in self.journal.take_undone().into_iter().rev() {
            self.undo(u);
        }
    }

    fn undo(&self, u: Undo) {
        let key = |c, f| UsageKey {
            customer: c,
            feature: f,
        };
        match u {
            Undo::Count {
                customer,
                feature,
                window_start,
                amount,
            } => self
                .quotas
                .give_back(key(&customer, &feature), window_start, amount),
            Undo::Reserve { id } => {
                if let Some(h) = self.holds.remove(id) {
                    let k = key(&h.customer, &h.feature);
                    self.quotas.give_back(k, h.window_start, h.amount);
                }
            }
            Undo::Settle {
                id,
                hold,
                committed,
            } => {
                // Held again: its units are back in its window, less what it counted.
                let back = i128::from(hold.amount) - i128::from(committed);
                let back = i64::try_from(back).unwrap_or(0);
                let k = key(&hold.customer, &hold.feature);
                self.quotas.add(k, hold.window_start, hold.window_end, back);
                self.holds.insert(id, hold);
            }
            Undo::Seat {
                customer,
                feature,
                holder,
                acquired,
            } => self.seats.undo(key(&customer, &feature), &holder, acquired),
            Undo::Idem { scope, key } => self.idem.forget(scope, key),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            quota_counters: self.quotas.len(),
            rate_limiters: self.rates.len(),
            seat_pools: self.seats.len(),
            reservations: self.holds.len(),
            idempotency_keys: self.idem.len(),
        }
    }

    /// Loads recovered state (see [`super::durable::replay`]): counters with their
    /// open holds, seats and idempotency keys.
    pub fn restore(&mut self, state: State) {
        let State {
            quotas,
            holds,
            seats,
            idem,
            ..
        } = state;
        // Sized once: growing a million-entry map step by step was a third of a
        // restart.
        if self.quotas.is_empty() {
            self.quotas = Quotas::with_capacity(quotas.len());
        }
        for ((c, f, start), q) in quotas {
            self.quotas.insert(
                Key {
                    customer: c,
                    feature: f,
                    window: start,
                },
                q.used,
                q.end,
            );
        }
        for (id, h) in holds {
            let key = UsageKey {
                customer: &h.customer,
                feature: &h.feature,
            };
            self.quotas
                .cell(key, h.window_start, h.window_end)
                .used
                .fetch_add(h.amount, Ordering::AcqRel);
            self.holds.insert(id, h);
        }
        for ((c, f), pool) in seats {
            self.seats.insert(
                Key {
                    customer: c,
                    feature: f,
                    window: 0,
                },
                pool,
            );
        }
        for (k, e) in idem {
            self.idem.insert(
                k,
                IdemEntry {
                    fingerprint: e.fingerprint,
                    expires: e.expires,
                    answer: Some(e.answer),
                    lsn: None,
                },
            );
        }
    }

    /// In sync mode, waits until the change at `lsn` is on disk; if the journal
    /// refused it, takes it back before the refusal is answered.
    async fn durable(&self, lsn: Logged) -> Result<(), StoreError> {
        let r = self.journal.durable(lsn).await;
        if r.is_err() {
            self.take_back();
        }
        r
    }

    /// Number of live quota counters.
    pub fn quota_counters(&self) -> usize {
        self.quotas.len()
    }
}

impl UsageStore for MemoryStore {
    async fn apply(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<Answered<UsageOutcome>, StoreError> {
        let (o, lsn) = self.step_answered(op, meta, now)?;
        self.durable(lsn).await?;
        Ok(o)
    }

    fn try_now(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Option<Result<(Answered<UsageOutcome>, Ack), StoreError>> {
        Some(
            self.step_answered(op, meta, now)
                .map(|(o, lsn)| (o, self.journal.ack_for(lsn))),
        )
    }

    async fn ack(&self, ack: Ack) -> Result<(), StoreError> {
        self.durable(ack.0).await
    }

    async fn settle(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<Answered<Settled>, StoreError> {
        let (s, lsn) = MemoryStore::settle_answered(self, id, action, meta, now)?;
        self.durable(lsn).await?;
        Ok(s)
    }

    fn expire(&self, now: Timestamp) -> usize {
        MemoryStore::expire(self, now)
    }

    fn maintain(&self, now: Timestamp, minute: bool) {
        MemoryStore::maintain(self, now, minute);
    }
}

fn op_key<'a>(op: &UsageOp<'a>) -> UsageKey<'a> {
    match *op {
        UsageOp::Quota { key, .. } | UsageOp::Rate { key, .. } | UsageOp::Seat { key, .. } => key,
    }
}

/// `log` asks for an answer only with an idempotency key, which `journal_record`
/// never passes.
fn unreachable_answer() -> Answer {
    Answer::Usage(UsageOutcome::Quota {
        admitted: false,
        used: 0,
        used_before: 0,
    })
}
