//! Usage state: quota counters, rate limiters and seat pools.
//!
//! One trait, [`UsageStore`], runs the engine's [`UsageOp`]s atomically. It is
//! asynchronous because a shared store (Redis) is remote and can fail; the in-memory
//! store answers with a ready future, so awaiting it costs nothing.

pub mod memory;

use std::future::Future;

pub use memory::MemoryStore;

use crate::engine::{self, Decision, Op, Request, RequestError, UsageOp, UsageOutcome};
use crate::policy::Snapshot;
use crate::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time: worth retrying, or
    /// answering by the fail mode.
    #[error("usage store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that cannot be right.
    #[error("usage store error: {0}")]
    Fatal(String),
}

/// Runs usage steps atomically: a consume that does not fit counts nothing, and N
/// racing consumes of the last units admit exactly what fits.
pub trait UsageStore: Send + Sync {
    fn apply(
        &self,
        op: &UsageOp<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<UsageOutcome, StoreError>> + Send;

    /// Answers without waiting, when the store can (the in-memory store always can;
    /// a remote store only from a local cache). `None` means "await [`Self::apply`]".
    /// The server uses it to decide inside one synchronous step, with the snapshot
    /// borrowed from the thread's cache instead of cloned.
    fn try_now(
        &self,
        op: &UsageOp<'_>,
        now: Timestamp,
    ) -> Option<Result<UsageOutcome, StoreError>> {
        let _ = (op, now);
        None
    }
}

/// Evaluates and completes a decision against the in-memory store, synchronously: for
/// the CLI, policy tests and benchmarks.
pub fn decide<'a>(
    snap: &'a Snapshot,
    store: &MemoryStore,
    op: Op,
    req: &Request<'a>,
    now: Timestamp,
) -> Result<Decision<'a>, RequestError> {
    engine::decide_with(snap, op, req, now, |u| store.run(u, now))
}
