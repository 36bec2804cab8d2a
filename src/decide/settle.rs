//! The answer to a reservation's commit or release, as a decision: the same fields in
//! the same order as the reserve that took the hold, with what the settlement did
//! (`operation`, `committed`, `released`) after `reservation`.
//!
//! The usage fields come from the store's outcome, in the reservation's window; where
//! the units came from (`source`, `expires_at`, `in_grace`, `trial`) is the customer's
//! grant of the feature on the served snapshot now, found by the engine as a check
//! finds it. A grant that has lapsed since the reserve leaves `source` out, as a
//! denial does; the settlement still counts (a hold is settled, not decided again).

use crate::engine::{self, Decision, Op, Reason, Settlement};
use crate::policy::{Kind, Limit, Snapshot};
use crate::time::Timestamp;
use crate::usage::Settled;

/// The decision answering a settlement `s` of reservation `id` (`commit` or
/// `release`), made on `snap` at `now`.
pub fn settled<'a>(
    snap: &'a Snapshot,
    s: &'a Settled,
    id: u128,
    operation: &'static str,
    now: Timestamp,
) -> Decision<'a> {
    let mut d = Decision::blank(&s.feature);
    // A check never fails for its kind: only the grant's description is kept.
    let _ = engine::evaluate(
        snap,
        Op::Check,
        &engine::Request::new(&s.customer, &s.feature),
        now,
        &mut d,
    );
    let o = &s.outcome;
    d.allowed = !o.denied;
    d.reason = if o.denied {
        Reason::QuotaExhausted
    } else {
        Reason::Granted
    };
    d.kind = Some(Kind::Quota);
    d.value = None;
    let limit = o.limit.map_or(Limit::Unlimited, Limit::Finite);
    d.limit = Some(limit);
    d.used = Some(o.used);
    d.remaining = Some(match limit {
        Limit::Finite(l) => Limit::Finite(l.saturating_sub(o.used)),
        Limit::Unlimited => Limit::Unlimited,
    });
    d.resets_at =
        Some(Timestamp(o.window_end)).filter(|t| t.to_jiff().is_some() && *t != Timestamp::MAX);
    d.overage = (o.overage > 0).then_some(o.overage);
    d.warning = None;
    d.retry_after = None;
    d.reservation = Some(id);
    d.settlement = Some(Settlement {
        operation,
        committed: o.committed,
        released: o.released,
    });
    d.upgrade.clear();
    d
}
