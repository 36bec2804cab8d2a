//! The decision path, one for every protocol: evaluate a request on the served
//! snapshot, run its usage step against the store, finish the decision with the
//! store's answer, and report it to the [`Observer`]. The JSON API (single and batch),
//! gateway admission (forward-auth, ext_authz, the rate limit service) and the
//! customer view decide through a [`Decider`]; the CLI, policy tests and benchmarks
//! through [`in_memory`], the same path with nothing to await.
//!
//! The usage step runs in the same synchronous step as the evaluation whenever the
//! store can answer at once ([`UsageStore::try_now`]: the in-memory store always,
//! Redis in cached mode). Only then can a request decide with the snapshot borrowed
//! from the thread's cache, which cannot be held across an await; otherwise
//! [`Decider::decide`] awaits [`UsageStore::apply`] with an owned snapshot.

mod error;
mod observe;
mod settle;

use std::sync::Arc;

pub use error::DecideError;
pub use observe::Observer;
pub use settle::settled;

use crate::engine::{self, Decision, Op, Pending, UsageOp, UsageOutcome};
use crate::policy::Snapshot;
use crate::snapshot_cell::SnapshotCell;
use crate::time::{Clock, Timestamp};
use crate::usage::{Ack, Answered, IdemKey, MemoryStore, StepMeta, StoreError, UsageStore};

/// The served snapshot, the usage store, the clock and where decisions are reported:
/// everything a decision needs, shared by all connections and protocols.
pub struct Decider<S> {
    /// The served snapshot; read lock-free through a per-thread cache.
    pub snapshot: SnapshotCell,
    pub store: S,
    pub clock: Arc<dyn Clock>,
    pub observer: Observer,
}

impl<S> std::fmt::Debug for Decider<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decider")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

/// One decision asked for: the operation, the request, and what the store keeps
/// beside its usage step.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub op: Op,
    pub req: engine::Request<'a>,
    pub idempotency: Option<IdemKey<'a>>,
    /// A reserve's time to live (microseconds); the store's default otherwise.
    pub ttl_us: Option<i64>,
}

impl<'a> Query<'a> {
    pub fn new(op: Op, req: engine::Request<'a>) -> Self {
        Query {
            op,
            req,
            idempotency: None,
            ttl_us: None,
        }
    }

    /// What the store keeps beside the step: the snapshot version for the ledger, the
    /// idempotency key, a reservation's time to live.
    fn meta(&self, snap: &'a Snapshot) -> StepMeta<'a> {
        StepMeta {
            snapshot: &snap.version,
            idempotency: self.idempotency,
            ttl_us: self.ttl_us,
        }
    }
}

/// How far one synchronous step got.
enum Begun<'a> {
    /// Decided, with the usage step that ran (if there was one).
    Decided(Option<UsageOp<'a>>),
    /// The store cannot answer at once: the step to await.
    Waiting(Pending<'a>),
}

/// Evaluates `q` into `d` and runs its usage step if `try_now` answers at once
/// (adding what the answer must wait for to `ack`).
fn begin<'a>(
    snap: &'a Snapshot,
    q: &Query<'a>,
    now: Timestamp,
    d: &mut Decision<'a>,
    ack: &mut Ack,
    try_now: impl FnOnce(
        &UsageOp<'a>,
        &StepMeta<'a>,
    ) -> Option<Result<(Answered<UsageOutcome>, Ack), StoreError>>,
) -> Result<Begun<'a>, DecideError> {
    let Some(pending) = engine::evaluate(snap, q.op, &q.req, now, d)? else {
        return Ok(Begun::Decided(None));
    };
    match try_now(&pending.op, &q.meta(snap)) {
        Some(answer) => {
            let (outcome, a) = answer?;
            *ack = ack.and(a);
            let op = pending.op;
            finish(pending, outcome, d);
            Ok(Begun::Decided(Some(op)))
        }
        None => Ok(Begun::Waiting(pending)),
    }
}

/// Completes `d` with the store's answer, marking a replay.
fn finish<'a>(pending: Pending<'a>, outcome: Answered<UsageOutcome>, d: &mut Decision<'a>) {
    pending.finish(outcome.answer, d);
    d.idempotent_replay = outcome.replayed;
}

impl<S: UsageStore> Decider<S> {
    /// Decides `q` into `d` within one synchronous step, and reports it. `Ok(false)`:
    /// the store cannot answer at once, nothing was counted or reported, and the
    /// caller awaits [`Self::decide`] with an owned snapshot instead.
    ///
    /// The answer may not be acknowledged yet: the caller awaits
    /// [`UsageStore::ack`] on `ack` before replying.
    #[inline]
    pub fn decide_now<'a>(
        &self,
        snap: &'a Snapshot,
        q: &Query<'a>,
        now: Timestamp,
        d: &mut Decision<'a>,
        ack: &mut Ack,
    ) -> Result<bool, DecideError> {
        let begun = begin(snap, q, now, d, ack, |op, meta| {
            self.store.try_now(op, meta, now)
        })?;
        match begun {
            Begun::Decided(_) => {
                self.observer.decided(q, now, d);
                Ok(true)
            }
            Begun::Waiting(_) => Ok(false),
        }
    }

    /// Decides `q` into `d`, awaiting the store when it cannot answer at once, and
    /// reports it. Returns the usage step that ran, if any. As for
    /// [`Self::decide_now`], the caller awaits `ack` before replying.
    pub async fn decide<'a>(
        &self,
        snap: &'a Snapshot,
        q: &Query<'a>,
        now: Timestamp,
        d: &mut Decision<'a>,
        ack: &mut Ack,
    ) -> Result<Option<UsageOp<'a>>, DecideError> {
        let op = self.evaluate(snap, q, now, d, ack).await?;
        self.observer.decided(q, now, d);
        Ok(op)
    }

    /// [`Self::decide`] without reporting: for views that show entitlements rather
    /// than answer requests for them.
    pub async fn evaluate<'a>(
        &self,
        snap: &'a Snapshot,
        q: &Query<'a>,
        now: Timestamp,
        d: &mut Decision<'a>,
        ack: &mut Ack,
    ) -> Result<Option<UsageOp<'a>>, DecideError> {
        let begun = begin(snap, q, now, d, ack, |op, meta| {
            self.store.try_now(op, meta, now)
        })?;
        match begun {
            Begun::Decided(op) => Ok(op),
            Begun::Waiting(pending) => {
                let outcome = self.store.apply(&pending.op, &q.meta(snap), now).await?;
                let op = pending.op;
                finish(pending, outcome, d);
                Ok(Some(op))
            }
        }
    }
}

/// Decides against an in-memory store in one synchronous step, reporting nothing: for
/// the CLI, policy tests and benchmarks. The decision path of [`Decider`], with a store
/// that always answers at once; a step the store fails (only a journal or an
/// idempotency key can) is answered as not admitted.
pub fn in_memory<'a>(
    snap: &'a Snapshot,
    store: &MemoryStore,
    op: Op,
    req: &engine::Request<'a>,
    now: Timestamp,
) -> Result<Decision<'a>, DecideError> {
    let mut d = Decision::blank(req.feature);
    let run = |op: &UsageOp<'_>, _: &StepMeta<'_>| {
        Some(Ok((Answered::fresh(store.run(op, now)), Ack::default())))
    };
    begin(
        snap,
        &Query::new(op, *req),
        now,
        &mut d,
        &mut Ack::default(),
        run,
    )?;
    Ok(d)
}
