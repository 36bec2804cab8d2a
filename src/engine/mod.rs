//! Pure decisions: `(&Snapshot, request, now) → Decision`.
//!
//! No I/O, no clock, no locks. A decision that needs usage state (quota, rate, seats)
//! comes back with a [`Pending`]: the [`UsageOp`] to run atomically against a store,
//! and [`Pending::finish`] to complete the decision with the store's answer. Flag and
//! value decisions never touch usage state.
//!
//! Precedence for the grants of a feature active at `t` and in scope (the decision
//! rules of `docs/policy.md`): an override wins; otherwise the highest `priority`;
//! otherwise the most generous (or the sum, for `combine: sum`). The same candidate
//! walk serves decisions ([`evaluate`]) and [`explain`], so the explanation can never
//! disagree with the decision.

pub mod decision;
mod evaluate;
mod explain;
mod grants;
pub mod ops;
mod pending;
pub mod report;
pub mod window;

pub use decision::{Crossed, Decision, Reason, Settlement, Source, SourceType};
pub use evaluate::evaluate;
pub use explain::{ExplainedGrant, Explanation, describe, explain};
pub use grants::{Candidate, Origin, Rule, Status};
pub use ops::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};
pub use pending::Pending;
pub use window::{Window, window};

use crate::policy::Kind;
use crate::time::Timestamp;

/// The operations a request can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Check,
    Consume,
    /// Hold units of a quota (committed or released later by reservation id).
    Reserve,
    SeatAcquire,
    SeatRelease,
}

impl Op {
    pub const ALL: [Op; 5] = [
        Op::Check,
        Op::Consume,
        Op::Reserve,
        Op::SeatAcquire,
        Op::SeatRelease,
    ];

    /// Whether the operation applies to a feature of this kind (any other pairing
    /// is refused as [`RequestError::WrongKind`]).
    pub fn applies_to(self, kind: Kind) -> bool {
        match self {
            Op::Check => true,
            Op::Consume => matches!(kind, Kind::Quota | Kind::Rate),
            Op::Reserve => kind == Kind::Quota,
            Op::SeatAcquire | Op::SeatRelease => kind == Kind::Seats,
        }
    }

    /// The name of the operation in the usage ledger, the metrics, the audit log and
    /// policy tests.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Check => "check",
            Op::Consume => "consume",
            Op::Reserve => "reserve",
            Op::SeatAcquire => "seat_acquire",
            Op::SeatRelease => "seat_release",
        }
    }
}

/// Context pairs (`asset = chiller-7`) matched against scopes.
pub type Context<'a> = &'a [(&'a str, &'a str)];

#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub customer: &'a str,
    pub feature: &'a str,
    pub amount: u64,
    pub context: Context<'a>,
    /// Evaluate as of this time instead of now (checks only).
    pub at: Option<Timestamp>,
    /// Seat holder (seat operations).
    pub holder: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn new(customer: &'a str, feature: &'a str) -> Self {
        Request {
            customer,
            feature,
            amount: 1,
            context: &[],
            at: None,
            holder: None,
        }
    }
}

/// A request the engine refuses to decide: the caller's mistake, not a denial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("`{op}` does not apply to `{feature}`, a {kind} feature")]
    WrongKind {
        op: &'static str,
        feature: String,
        kind: &'static str,
    },
    #[error("`amount` must be at least 1")]
    ZeroAmount,
    #[error("`holder` is required for seat operations")]
    MissingHolder,
    #[error("`at` is only allowed on checks")]
    AtNotAllowed,
}
