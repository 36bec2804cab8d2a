//! Usage state: quota counters, rate limiters and seat pools.
//!
//! One trait, [`UsageStore`], runs the engine's [`UsageOp`]s atomically. It is
//! asynchronous because a shared store (Redis) is remote and can fail; the in-memory
//! store answers with a ready future, so awaiting it costs nothing.
//!
//! Three stores, each a folder, and imports run one way between them:
//!
//! - [`durable`]'s record format and journal know nothing of the stores;
//! - [`memory`] counts in this process and hands its changes to a journal, if any;
//! - [`durable`]'s state directory recovers a [`MemoryStore`] from checkpoint and
//!   journal, and folds the journal into checkpoints;
//! - [`redis`] shares usage across replicas, with a [`MemoryStore`] as its local view.

pub mod durable;
pub mod memory;
pub mod redis;

use std::future::Future;

pub use crate::ids::{ReservationId, parse_reservation, reservation_name};
pub use durable::record::{SettleOutcome, Settled};
pub use memory::MemoryStore;

use crate::engine::{UsageOp, UsageOutcome};
use crate::time::{SECOND, Timestamp};

/// The longest a reservation may be held (24 h): a reserve asking for more is refused,
/// and so is a longer `--reservation-ttl`.
pub const MAX_RESERVATION_TTL_US: i64 = 24 * 3600 * SECOND;

/// Lifetimes the store applies (microseconds).
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    pub reservation_ttl_us: i64,
    pub max_reservation_ttl_us: i64,
    pub idempotency_ttl_us: i64,
    /// Most idempotency keys remembered at once (`--idempotency-max-keys`).
    pub idempotency_max_keys: usize,
}

/// The default `--idempotency-max-keys`: about 200 MB of keys and answers at most.
pub const DEFAULT_IDEMPOTENCY_MAX_KEYS: usize = 1_000_000;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            reservation_ttl_us: 5 * 60 * SECOND,
            max_reservation_ttl_us: MAX_RESERVATION_TTL_US,
            idempotency_ttl_us: 24 * 3600 * SECOND,
            idempotency_max_keys: DEFAULT_IDEMPOTENCY_MAX_KEYS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time: worth retrying, or
    /// answering by the fail mode.
    #[error("usage store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that cannot be right.
    #[error("usage store error: {0}")]
    Fatal(String),
    /// The first request with this idempotency key is still running.
    #[error("a request with idempotency key `{0}` is still in flight; retry shortly")]
    InFlight(String),
    /// The idempotency key was used before for a different request.
    #[error("idempotency key `{0}` was already used for a different request")]
    KeyReused(String),
    /// The idempotency key table holds its maximum: a new key is refused rather than
    /// the table growing.
    #[error(
        "the table of idempotency keys is full ({0} keys, --idempotency-max-keys); retry later"
    )]
    KeysFull(usize),
}

/// What a reply must wait for before it is sent: the journal position of the last
/// change it reports (sync durability), or nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack(pub Option<u64>);

impl Ack {
    /// Both acknowledged: the later journal position.
    pub fn and(self, other: Ack) -> Ack {
        Ack(self.0.max(other.0))
    }
}

/// An idempotency key and what it must match: a retry is the same request (same
/// operation, customer, feature, amount, holder) with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdemKey<'a> {
    pub key: &'a str,
    pub fingerprint: u64,
}

/// A store's answer, and whether it is a replay: the answer remembered under the
/// request's idempotency key, repeated without running anything again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered<T> {
    pub answer: T,
    pub replayed: bool,
}

impl<T> Answered<T> {
    /// An answer from running the step.
    pub fn fresh(answer: T) -> Self {
        Answered {
            answer,
            replayed: false,
        }
    }
}

/// What a store keeps beside a usage step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMeta<'a> {
    /// The snapshot the decision was made on (recorded in the ledger).
    pub snapshot: &'a str,
    pub idempotency: Option<IdemKey<'a>>,
    /// A reserve's time to live (microseconds); the store's default otherwise.
    pub ttl_us: Option<i64>,
}

/// Ending a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleAction {
    /// Count this many units (the rest of the hold returns to the quota).
    Commit(u64),
    /// Count nothing.
    Release,
}

/// Runs usage steps atomically: a consume that does not fit counts nothing, and N
/// racing consumes of the last units admit exactly what fits.
pub trait UsageStore: Send + Sync {
    fn apply(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Answered<UsageOutcome>, StoreError>> + Send;

    /// Commits or releases the reservation `id`.
    fn settle(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Answered<Settled>, StoreError>> + Send;

    /// Answers without waiting, when the store can (the in-memory store always can;
    /// a remote store only from a local cache). `None` means "await [`Self::apply`]".
    /// The server uses it to decide inside one synchronous step, with the snapshot
    /// borrowed from the thread's cache instead of cloned.
    ///
    /// The answer may not be acknowledged yet (`--durability sync`: not on disk yet):
    /// the caller must await [`Self::ack`] before replying. A batch answers every item
    /// and then acknowledges once, so its items share one sync.
    fn try_now(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Option<Result<(Answered<UsageOutcome>, Ack), StoreError>> {
        let _ = (op, meta, now);
        None
    }

    /// Waits until the steps behind `ack` are acknowledged (durable).
    fn ack(&self, ack: Ack) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = ack;
        std::future::ready(Ok(()))
    }

    /// Returns expired reservations to their quotas and forgets expired idempotency
    /// keys. Returns how many reservations expired.
    fn expire(&self, now: Timestamp) -> usize {
        let _ = now;
        0
    }

    /// Periodic upkeep, every second (`minute` once a minute): expiry, compaction,
    /// state gauges.
    fn maintain(&self, now: Timestamp, minute: bool) {
        let _ = minute;
        self.expire(now);
    }

    /// Whether decisions can be answered (`/readyz`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The outcome of a step no store ran, answered by policy instead (`admitted`):
/// nothing counted, nothing known about usage.
pub(crate) fn unrun(op: &UsageOp<'_>, admitted: bool) -> UsageOutcome {
    match *op {
        UsageOp::Quota { .. } => UsageOutcome::Quota {
            admitted,
            used: 0,
            used_before: 0,
        },
        UsageOp::Rate { limit, .. } => UsageOutcome::Rate {
            admitted,
            remaining: if admitted { limit } else { 0 },
            reset_after_us: 0,
            retry_after_us: None,
        },
        UsageOp::Seat { .. } => UsageOutcome::Seat {
            admitted,
            used: 0,
            unchanged: true,
        },
    }
}
