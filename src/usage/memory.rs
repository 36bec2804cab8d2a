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

use std::sync::Arc;

use super::journal::Journal;
use super::record::{
    Answer, EntryRef, Record, ReservationId, SettleOutcome, Settled, reservation_name,
};
use super::{Ack, IdemKey, SettleAction, StepMeta, StoreError, UsageStore};
use crate::engine::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};
use crate::policy::Limit;
use crate::time::{SECOND, Timestamp};

type Hasher_ = foldhash::fast::RandomState;

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

    /// Would the request pass with the limiter at `tat`?
    pub fn admits(&self, tat: i64) -> bool {
        tat.max(self.now_ns).saturating_add(self.cost) - self.now_ns <= self.tau
    }

    /// The TAT after taking the request.
    pub fn after(&self, tat: i64) -> i64 {
        tat.max(self.now_ns).saturating_add(self.cost)
    }

    /// The outcome reported with the limiter at `tat` before the step.
    pub fn outcome(&self, tat: i64, admitted: bool, took: bool) -> UsageOutcome {
        let base = tat.max(self.now_ns);
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
    /// Units counted in the window plus units held by open reservations.
    used: AtomicU64,
    /// When the window ends: the cell can be dropped after that.
    window_end: i64,
}

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

/// A remembered idempotency key.
#[derive(Debug, Clone)]
struct IdemEntry {
    fingerprint: u64,
    expires: i64,
    /// `None` while the first request is still running.
    answer: Option<Answer>,
    /// The journal record that holds it (sync mode waits for it on a retry too).
    lsn: Option<u64>,
}

/// Lifetimes the store applies (microseconds).
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    pub reservation_ttl_us: i64,
    pub max_reservation_ttl_us: i64,
    pub idempotency_ttl_us: i64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            reservation_ttl_us: 5 * 60 * SECOND,
            max_reservation_ttl_us: 24 * 3600 * SECOND,
            idempotency_ttl_us: 24 * 3600 * SECOND,
        }
    }
}

/// How much live state the store holds (for metrics and soak tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub quota_counters: usize,
    pub rate_limiters: usize,
    pub seat_pools: usize,
    pub reservations: usize,
    pub idempotency_keys: usize,
}

/// Usage in memory, made durable by an optional [`Journal`]. Cheap to share behind an
/// `Arc`; every method takes `&self`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    quotas: DashMap<Key, QuotaCell, Hasher_>,
    rates: DashMap<Key, AtomicI64, Hasher_>,
    seats: DashMap<Key, HashSet<Box<str>>, Hasher_>,
    holds: DashMap<ReservationId, Hold, Hasher_>,
    idem: DashMap<(Box<str>, Box<str>), IdemEntry, Hasher_>,
    journal: Option<Arc<Journal>>,
    config: StoreConfig,
}

/// What a step leaves to do after the state changed: wait for the journal.
type Logged = Option<u64>;

impl MemoryStore {
    /// Memory only: usage is lost on restart.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes every change to `journal` (see [`super::durable`]).
    pub fn with_journal(journal: Option<Arc<Journal>>, config: StoreConfig) -> Self {
        MemoryStore {
            journal,
            config,
            ..Self::default()
        }
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
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
        if let Some(j) = &self.journal {
            j.accepting()?;
        }
        let Some(ik) = meta.idempotency else {
            return self.step_inner(op, meta, None, now);
        };
        let scope = op_key(op).customer;
        match self.idem_begin(scope, &ik, now)? {
            Some((Answer::Usage(o), lsn)) => return Ok((o, lsn)),
            Some((Answer::Settle(_), _)) => return Err(reused(ik.key)),
            None => {}
        }
        let r = self.step_inner(op, meta, Some((scope, ik)), now);
        self.idem_end(
            scope,
            &ik,
            r.as_ref().ok().map(|(o, l)| (Answer::Usage(*o), *l)),
        );
        r
    }

    /// Claims an idempotency key: its answer if it has one, `None` if this request
    /// is the first (the key is now marked in flight).
    fn idem_begin(
        &self,
        scope: &str,
        ik: &IdemKey<'_>,
        now: Timestamp,
    ) -> Result<Option<(Answer, Logged)>, StoreError> {
        use dashmap::mapref::entry::Entry as E;
        match self.idem.entry((scope.into(), ik.key.into())) {
            E::Occupied(mut e) => {
                let v = e.get();
                if v.expires <= now.0 {
                    e.insert(IdemEntry {
                        fingerprint: ik.fingerprint,
                        expires: now.0.saturating_add(self.config.idempotency_ttl_us),
                        answer: None,
                        lsn: None,
                    });
                    return Ok(None);
                }
                if v.fingerprint != ik.fingerprint {
                    return Err(reused(ik.key));
                }
                match &v.answer {
                    Some(a) => {
                        crate::metrics::idempotent_replay();
                        Ok(Some((a.clone(), v.lsn)))
                    }
                    None => Err(StoreError::InFlight(ik.key.to_string())),
                }
            }
            E::Vacant(e) => {
                e.insert(IdemEntry {
                    fingerprint: ik.fingerprint,
                    expires: now.0.saturating_add(self.config.idempotency_ttl_us),
                    answer: None,
                    lsn: None,
                });
                Ok(None)
            }
        }
    }

    /// Records the answer of a claimed key, or frees the key if the step failed.
    fn idem_end(&self, scope: &str, ik: &IdemKey<'_>, done: Option<(Answer, Logged)>) {
        let probe: (Box<str>, Box<str>) = (scope.into(), ik.key.into());
        match done {
            Some((answer, lsn)) => {
                if let Some(mut e) = self.idem.get_mut(&probe) {
                    e.answer = Some(answer);
                    e.lsn = lsn;
                }
            }
            None => {
                self.idem.remove(&probe);
            }
        }
    }

    fn idem_record<'a>(
        &self,
        scope: &'a str,
        ik: &IdemKey<'a>,
        answer: Answer,
        now: Timestamp,
    ) -> Record<'a> {
        Record::Idem {
            customer: scope,
            key: ik.key,
            fingerprint: ik.fingerprint,
            expires: now.0.saturating_add(self.config.idempotency_ttl_us),
            answer,
        }
    }

    /// Journals `record` (if any) and the idempotency key (if any) in one frame.
    fn log(
        &self,
        record: Option<Record<'_>>,
        idem: Option<(&str, IdemKey<'_>)>,
        answer: impl FnOnce() -> Answer,
        now: Timestamp,
    ) -> Result<Logged, StoreError> {
        let Some(j) = &self.journal else {
            return Ok(None);
        };
        let idem = idem.map(|(scope, ik)| self.idem_record(scope, &ik, answer(), now));
        let entry = match (record, idem) {
            (None, None) => return Ok(None),
            (Some(r), None) | (None, Some(r)) => j.append(&EntryRef::Records(&[r]))?,
            (Some(r), Some(i)) => j.append(&EntryRef::Records(&[r, i]))?,
        };
        Ok(Some(entry))
    }

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
                let o = self.quota(
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
                        let lsn = self.log(record, idem, || Answer::Usage(o), now)?;
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
                            let lsn = self.log(None, idem, || Answer::Usage(o), now)?;
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
                        let lsn = self.log(Some(record), idem, || Answer::Usage(o), now)?;
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
                let o = self.rate(key, limit, per_us, burst, amount, consume, now);
                let lsn = self.log(None, idem, || Answer::Usage(o), now)?;
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
                let o = self.seat_with(key, limit, holder, action, |o, h, acquire| {
                    wrote = true;
                    let record = Record::Seat {
                        customer: key.customer,
                        feature: key.feature,
                        holder: h,
                        acquire,
                        time: now.0,
                        snapshot: meta.snapshot,
                    };
                    logged = self.log(Some(record), idem, || Answer::Usage(*o), now);
                });
                if !wrote {
                    logged = self.log(None, idem, || Answer::Usage(o), now);
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
        if let Some(j) = &self.journal {
            j.accepting()?;
        }
        let scope = reservation_name(id);
        let Some(ik) = meta.idempotency else {
            return self.settle_inner(id, action, meta, None, now);
        };
        match self.idem_begin(&scope, &ik, now)? {
            Some((Answer::Settle(s), lsn)) => return Ok((s, lsn)),
            Some((Answer::Usage(_), _)) => return Err(reused(ik.key)),
            None => {}
        }
        let r = self.settle_inner(id, action, meta, Some((&scope, ik)), now);
        self.idem_end(
            &scope,
            &ik,
            r.as_ref()
                .ok()
                .map(|(s, l)| (Answer::Settle(s.clone()), *l)),
        );
        r
    }

    fn settle_inner(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        idem: Option<(&str, IdemKey<'_>)>,
        now: Timestamp,
    ) -> Result<(Settled, Logged), StoreError> {
        let not_found = |o: SettleOutcome| Settled {
            outcome: o,
            customer: String::new(),
            feature: String::new(),
            window_start: 0,
        };
        let Some((_, hold)) = self.holds.remove(&id) else {
            let s = not_found(SettleOutcome::default());
            let lsn = self.log(None, idem, || Answer::Settle(s.clone()), now)?;
            return Ok((s, lsn));
        };
        let key = UsageKey {
            customer: &hold.customer,
            feature: &hold.feature,
        };
        let cell = self.cell(key, hold.window_start, hold.window_end);
        if hold.expires <= now.0 {
            // Expired before the sweep got to it: it returns to the quota all the same.
            sub(&cell.used, hold.amount);
            let s = not_found(SettleOutcome::default());
            drop(cell);
            let lsn = self.log(None, idem, || Answer::Settle(s.clone()), now)?;
            return Ok((s, lsn));
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
            self.holds.insert(id, hold);
            let lsn = self.log(None, idem, || Answer::Settle(settled.clone()), now)?;
            return Ok((settled, lsn));
        }
        let record = Record::Settle {
            id,
            customer: &hold.customer,
            feature: &hold.feature,
            window_start: hold.window_start,
            window_end: hold.window_end,
            committed: o.committed,
            overage: o.overage,
            time: now.0,
            snapshot: meta.snapshot,
        };
        let lsn = self.log(Some(record), idem, || Answer::Settle(settled.clone()), now)?;
        Ok((settled, lsn))
    }

    /// The window's cell, created if needed.
    fn cell(
        &self,
        key: UsageKey<'_>,
        start: i64,
        end: i64,
    ) -> dashmap::mapref::one::Ref<'_, Key, QuotaCell> {
        if let Some(c) = self.quotas.get(&(key, start) as &dyn KeyView) {
            return c;
        }
        self.quotas
            .entry(owned(key, start))
            .or_insert_with(|| QuotaCell {
                used: AtomicU64::new(0),
                window_end: end,
            })
            .downgrade()
    }

    /// Returns expired reservations to their quotas. Returns how many.
    pub fn expire(&self, now: Timestamp) -> usize {
        let mut expired = Vec::new();
        self.holds.retain(|_, h| {
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
            if let Some(cell) = self.quotas.get(&(key, *start) as &dyn KeyView) {
                sub(&cell.used, *amount);
            }
        }
        self.idem
            .retain(|_, e| e.expires > now.0 || e.answer.is_none());
        expired.len()
    }

    /// Appends a record to the journal without changing state here: a shared store
    /// decided it, and this replica's ledger records it.
    pub fn journal_record(&self, record: Record<'_>) -> Result<Logged, StoreError> {
        self.log(Some(record), None, unreachable_answer, Timestamp(0))
    }

    /// Adds `n` units to a window's counter (units counted elsewhere: another
    /// replica, or a shared store's total). Negative to take back.
    pub fn add_to_quota(&self, key: UsageKey<'_>, start: i64, end: i64, n: i64) {
        let cell = self.cell(key, start, end);
        if n >= 0 {
            cell.used.fetch_add(n as u64, Ordering::AcqRel);
        } else {
            sub(&cell.used, n.unsigned_abs());
        }
    }

    /// The open reservation `id`, if any.
    pub fn hold(&self, id: ReservationId) -> Option<Hold> {
        self.holds.get(&id).map(|h| h.clone())
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
        // A hold must fit, overage or not: it is a promise of units that exist.
        let allow_overage = allow_overage && mode != QuotaMode::Reserve;
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
        let g = Gcra::new(limit, per_us, burst, amount, now);
        let outcome = |tat: i64, admitted: bool, took: bool| g.outcome(tat, admitted, took);
        let decide = |tat: i64| g.admits(tat);
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
                let next = g.after(tat);
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

    #[cfg(test)]
    fn seat(
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
    fn seat_with<'h>(
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
                let o = UsageOutcome::Seat {
                    admitted: true,
                    used: pool.len() as u64,
                    unchanged: false,
                };
                changed(&o, h, true);
                o
            }
            (SeatAction::Release, Some(h)) => match self.seats.get_mut(&probe as &dyn KeyView) {
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

    /// Drops quota counters of windows that ended before `now` and empty seat pools.
    /// Returns how many counters.
    pub fn compact(&self, now: Timestamp) -> usize {
        let before = self.quotas.len();
        self.quotas.retain(|_, c| c.window_end > now.0);
        self.seats.retain(|_, p| !p.is_empty());
        before - self.quotas.len()
    }

    /// Expires reservations; once a minute also drops ended windows. Updates the
    /// state gauges.
    pub fn maintain(&self, now: Timestamp, minute: bool) {
        self.expire(now);
        if minute {
            let dropped = self.compact(now);
            if dropped > 0 {
                tracing::debug!(dropped, "dropped quota counters of ended windows");
            }
        }
        crate::metrics::usage_state(&self.counts());
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

    /// Loads recovered state (see [`super::state`]): counters with their open holds,
    /// seats and idempotency keys.
    pub fn restore(&mut self, state: super::state::State) {
        let super::state::State {
            quotas,
            holds,
            seats,
            idem,
            ..
        } = state;
        // Sized once: growing a million-entry map step by step was a third of a
        // restart.
        if self.quotas.is_empty() {
            self.quotas = DashMap::with_capacity_and_hasher(quotas.len(), Hasher_::default());
        }
        for ((c, f, start), q) in quotas {
            self.quotas.insert(
                Key {
                    customer: c,
                    feature: f,
                    window: start,
                },
                QuotaCell {
                    used: AtomicU64::new(q.used),
                    window_end: q.end,
                },
            );
        }
        for (id, h) in holds {
            let key = UsageKey {
                customer: &h.customer,
                feature: &h.feature,
            };
            self.cell(key, h.window_start, h.window_end)
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
    ) -> Result<UsageOutcome, StoreError> {
        let (o, lsn) = self.step(op, meta, now)?;
        self.durable(lsn).await?;
        Ok(o)
    }

    fn try_now(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Option<Result<(UsageOutcome, Ack), StoreError>> {
        Some(
            self.step(op, meta, now)
                .map(|(o, lsn)| (o, self.ack_for(lsn))),
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
    ) -> Result<Settled, StoreError> {
        let (s, lsn) = MemoryStore::settle(self, id, action, meta, now)?;
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

impl MemoryStore {
    /// What a reply reporting the change at `lsn` must wait for.
    fn ack_for(&self, lsn: Logged) -> Ack {
        match &self.journal {
            Some(j) if j.is_sync() => Ack(lsn),
            _ => Ack(None),
        }
    }

    /// In sync mode, waits until `lsn` is on disk.
    async fn durable(&self, lsn: Logged) -> Result<(), StoreError> {
        match (&self.journal, lsn) {
            (Some(j), Some(lsn)) if j.is_sync() => j.wait_durable(lsn).await,
            _ => Ok(()),
        }
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

fn reused(key: &str) -> StoreError {
    StoreError::KeyReused(key.to_string())
}

fn finite(l: Limit) -> Option<u64> {
    match l {
        Limit::Finite(n) => Some(n),
        Limit::Unlimited => None,
    }
}

/// Units of the step from `before` to `after` that lie beyond the limit.
fn overage(limit: Limit, before: u64, after: u64) -> u64 {
    match limit {
        Limit::Finite(l) if after > l => after - before.max(l),
        _ => 0,
    }
}

/// Subtracts (saturating at zero); returns the new value.
fn sub(a: &AtomicU64, n: u64) -> u64 {
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
