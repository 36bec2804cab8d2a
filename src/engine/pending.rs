//! A decision waiting for its usage step, and how the store's answer completes it.
//!
//! The engine stays free of storage: [`evaluate`](super::evaluate()) hands back the
//! [`UsageOp`] to run, and [`Pending::finish`] writes the outcome (used, remaining,
//! overage, warnings, denial and upgrade suggestions) into the decision.

use super::decision::{Crossed, Decision, Reason};
use super::ops::{QuotaMode, UsageOp, UsageOutcome};
use crate::policy::{FeatureId, GrantValue, Limit, NotifyAt, Snapshot};
use crate::time::{SECOND, Timestamp};

/// A decision waiting for its usage step: run [`Pending::op`] against a store, then
/// [`Pending::finish`] the decision with the answer.
#[derive(Debug, Clone, Copy)]
pub struct Pending<'a> {
    pub op: UsageOp<'a>,
    pub(super) warn_units: Option<u64>,
    /// The quota's usage-notice thresholds (none for rates and seats).
    pub(super) notify: NotifyAt,
    pub(super) now: Timestamp,
    pub(super) ctx: UpgradeCtx<'a>,
}

/// What an upgrade must beat: the winning grant and the effective limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct UpgradeCtx<'a> {
    pub(super) snap: &'a Snapshot,
    /// The customer's index (a view is rebuilt on denial; keeping `Pending` small
    /// keeps it in registers rather than `memmove`).
    pub(super) customer: Option<u32>,
    pub(super) feature: FeatureId,
    pub(super) t: Timestamp,
    pub(super) current: Option<(&'a GrantValue, u32)>,
    pub(super) limit: Option<Limit>,
}

impl<'a> Pending<'a> {
    /// Completes `d` (as [`evaluate`](super::evaluate()) left it) with the store's
    /// answer to [`Pending::op`].
    pub fn finish(self, outcome: UsageOutcome, d: &mut Decision<'a>) {
        let Pending {
            op,
            warn_units,
            notify,
            now,
            ctx,
        } = self;
        let limit = d.limit;
        match outcome {
            UsageOutcome::Quota {
                admitted,
                used,
                used_before,
            }
            | UsageOutcome::Reserved {
                admitted,
                used,
                used_before,
                ..
            } => {
                if let UsageOutcome::Reserved { reservation, .. } = outcome {
                    d.reservation = reservation;
                }
                d.used = Some(used);
                d.remaining = limit.map(|l| remaining(l, used));
                if let (
                    Some(Limit::Finite(l)),
                    UsageOp::Quota {
                        mode: QuotaMode::Consume,
                        ..
                    },
                ) = (limit, op)
                    && admitted
                    && used > l
                {
                    d.overage = Some(used - used_before.max(l));
                }
                if let Some(w) = warn_units
                    && used >= w
                {
                    d.warning = Some("soft_limit");
                    d.warning_crossed = used_before < w && used > used_before;
                }
                if let (
                    Some(Limit::Finite(l)),
                    UsageOp::Quota {
                        window_start,
                        window_end,
                        mode: QuotaMode::Consume | QuotaMode::Reserve,
                        ..
                    },
                ) = (limit, op)
                    && used > used_before
                {
                    d.crossed = crossed(notify, l, used_before, used, window_start.0, window_end.0);
                }
                if !admitted {
                    d.deny(Reason::QuotaExhausted);
                }
            }
            UsageOutcome::Rate {
                admitted,
                remaining: r,
                reset_after_us,
                retry_after_us,
            } => {
                d.remaining = Some(Limit::Finite(r));
                d.resets_at =
                    Some(now.saturating_add(reset_after_us)).filter(|t| t.to_jiff().is_some());
                match op {
                    // More than the burst never passes: no wait would help.
                    UsageOp::Rate { amount, burst, .. } if !admitted && amount > burst => {
                        d.deny(Reason::ExceedsBurst);
                    }
                    _ if !admitted => {
                        d.deny(Reason::RateLimited);
                        d.retry_after = retry_after_us.map(|us| us as f64 / SECOND as f64);
                    }
                    _ => {}
                }
            }
            UsageOutcome::Seat { admitted, used, .. } => {
                d.used = Some(used);
                d.remaining = limit.map(|l| remaining(l, used));
                if !admitted {
                    d.deny(Reason::SeatsExhausted);
                }
            }
        }
        if !d.allowed {
            d.upgrade = upgrades(ctx);
        }
    }
}

/// The usage-notice thresholds of `notify` that a step from `before` to `used` units of
/// `limit` reached, if any.
fn crossed(
    notify: NotifyAt,
    limit: u64,
    before: u64,
    used: u64,
    window_start: i64,
    window_end: i64,
) -> Option<Crossed> {
    let mut mask = 0u8;
    for (i, &bp) in notify.basis_points().iter().enumerate() {
        let at = NotifyAt::units(limit, bp);
        if at > 0 && before < at && used >= at {
            mask |= 1 << i;
        }
    }
    (mask != 0).then_some(Crossed {
        notify,
        mask,
        limit,
        used,
        window_start,
        window_end,
    })
}

fn remaining(limit: Limit, used: u64) -> Limit {
    match limit {
        Limit::Finite(l) => Limit::Finite(l.saturating_sub(used)),
        Limit::Unlimited => Limit::Unlimited,
    }
}

/// Plans (tier order) whose grant of the feature would do better than what the
/// customer has now, leaving out plans the customer already holds or has booked (a
/// subscription not ended at `t`, started or not: suggesting a plan that starts next
/// month would sell it twice). Computed on denials only.
pub(super) fn upgrades<'a>(ctx: UpgradeCtx<'a>) -> Vec<&'a str> {
    let snap = ctx.snap;
    let Some(list) = snap.catalog.upgrades.get(ctx.feature as usize) else {
        return Vec::new();
    };
    let feature = snap.feature(ctx.feature);
    let held_or_booked = |plan: u32| {
        ctx.customer
            .map(|i| snap.customers.view(i))
            .is_some_and(|c| {
                c.subs
                    .iter()
                    .any(|s| s.plan == plan && ctx.t < s.grace_ends)
            })
    };
    list.iter()
        .filter(|(plan, _)| !held_or_booked(*plan))
        .filter(|(_, g)| {
            let Some(bg) = snap.catalog.grants.get(*g as usize) else {
                return false;
            };
            match (ctx.limit, bg.value.scaled_limit(1), ctx.current) {
                // Quota and seats: against the effective (possibly summed) limit.
                (Some(Limit::Finite(cur)), Some(Limit::Finite(n)), _) => n > cur,
                (Some(Limit::Finite(_)), Some(Limit::Unlimited), _) => true,
                (Some(Limit::Unlimited), _, _) => false,
                // Rates and values: by generosity against the winning grant.
                (_, _, Some((cur, q))) => bg.value.cmp_generosity(1, cur, q, feature).is_gt(),
                (_, _, None) => true,
            }
        })
        .map(|(plan, _)| &*snap.bundle(*plan).name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(list: &[&str]) -> NotifyAt {
        NotifyAt::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_step_crosses_the_thresholds_between_before_and_after() {
        let n = at(&["100%", "80%"]);
        assert_eq!(crossed(n, 10, 6, 7, 0, 1), None);
        let c = crossed(n, 10, 7, 8, 0, 1).unwrap();
        assert_eq!(c.thresholds().collect::<Vec<_>>(), [8_000]);
        assert_eq!(crossed(n, 10, 8, 9, 0, 1), None, "past 80% already");
        let both = crossed(n, 10, 0, 12, 0, 1).unwrap();
        assert_eq!(both.thresholds().collect::<Vec<_>>(), [8_000, 10_000]);
        assert_eq!(crossed(NotifyAt::NONE, 10, 0, 10, 0, 1), None);
        assert_eq!(
            crossed(n, 0, 0, 1, 0, 1),
            None,
            "a zero limit has no thresholds"
        );
        // Exact integers: 7% of 100 is 7.
        let c = crossed(at(&["7%"]), 100, 6, 7, 0, 1).unwrap();
        assert_eq!(c.used, 7);
    }
}
