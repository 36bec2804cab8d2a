//! What a decision needs from usage state, as data.
//!
//! The engine never touches counters: it describes the one atomic step it needs
//! ([`UsageOp`]) and turns the store's answer ([`UsageOutcome`]) into a decision. A
//! store may run the step in memory, against a journal or in Redis, synchronously or
//! not, without the decision code changing.

use crate::policy::Limit;
use crate::time::Timestamp;

/// Usage is kept per customer and feature (names, not snapshot ids, so counters
/// survive reloads), and for quotas per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageKey<'a> {
    pub customer: &'a str,
    pub feature: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Would `amount` fit now? Counts nothing.
    Check,
    /// Count `amount` if it fits (or always, with overage allowed).
    Consume,
    /// Hold `amount` if it fits (overage or not) until committed, released or expired.
    Reserve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatAction {
    Check,
    Acquire,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageOp<'a> {
    Quota {
        key: UsageKey<'a>,
        window_start: Timestamp,
        window_end: Timestamp,
        limit: Limit,
        amount: u64,
        mode: QuotaMode,
        /// `overage: allow`: past the limit is admitted (and counted, on consume).
        allow_overage: bool,
    },
    /// GCRA: `limit` per `per_us`, up to `burst` at once.
    Rate {
        key: UsageKey<'a>,
        limit: u64,
        per_us: i64,
        burst: u64,
        amount: u64,
        consume: bool,
    },
    Seat {
        key: UsageKey<'a>,
        limit: Limit,
        holder: Option<&'a str>,
        action: SeatAction,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UsageOutcome {
    Quota {
        admitted: bool,
        /// Units used in the window after the step (unchanged when not admitted or a
        /// check), including units held by open reservations.
        used: u64,
        /// Units used before the step.
        used_before: u64,
    },
    /// A reservation: as `Quota`, with the hold's id when admitted.
    Reserved {
        admitted: bool,
        used: u64,
        used_before: u64,
        reservation: Option<u128>,
    },
    Rate {
        admitted: bool,
        /// Whole requests that would still pass right now after the step.
        remaining: u64,
        /// Microseconds until the limiter is fully replenished.
        reset_after_us: i64,
        /// Microseconds until `amount` would pass, when it did not.
        retry_after_us: Option<i64>,
    },
    Seat {
        admitted: bool,
        used: u64,
        /// The holder already held a seat (acquire is idempotent) / held none (release).
        unchanged: bool,
    },
}
