//! [`evaluate`]: one request against one snapshot, as a list of steps: the request's
//! shape, the feature, the customer, the candidate walk, the winner, then the answer
//! its kind gives (a value, or the usage step for quota, rate and seats).
//!
//! This is the hot path. The steps are functions for reading; they are `#[inline]` so
//! a decision costs what it cost as one function: no allocation, no extra copies of
//! the decision, which is written in place.

use super::decision::{Decision, Reason};
use super::grants::{Candidate, Selector, describe_winner, for_each_candidate};
use super::ops::{QuotaMode, SeatAction, UsageKey, UsageOp};
use super::pending::{Pending, UpgradeCtx, upgrades};
use super::window::window;
use super::{Op, Request, RequestError};
use crate::policy::{
    CustomerView, Feature, FeatureId, GrantValue, Limit, NotifyAt, Overage, QuotaGrant, RateGrant,
    Snapshot,
};
use crate::time::Timestamp;

/// Evaluates a request into `d` (a fresh [`Decision::blank`]). Returns the usage step
/// still to run, if the feature's kind needs one. Fails only for requests that are
/// malformed for the feature (an operation its kind does not support); every other
/// outcome is a decision.
///
/// The decision is written in place rather than returned: it is a few hundred bytes,
/// and moving it through `Result`/`Option` layers showed up as `memmove` in profiles.
pub fn evaluate<'a>(
    snap: &'a Snapshot,
    op: Op,
    req: &Request<'a>,
    now: Timestamp,
    d: &mut Decision<'a>,
) -> Result<Option<Pending<'a>>, RequestError> {
    let Some((fid, feature)) = feature_for(snap, op, req, d)? else {
        return Ok(None);
    };
    let Some(c) = snap.customers.get(req.customer) else {
        d.deny(Reason::UnknownCustomer);
        return Ok(None);
    };
    let t = req.at.unwrap_or(now);
    let mut sel = Selector::new(feature);
    for_each_candidate(snap, &c, fid, t, req.context, |cand| sel.offer(cand));
    let mut step = Step {
        op,
        req,
        key: UsageKey {
            customer: c.id,
            feature: &feature.name,
        },
        now,
        ctx: UpgradeCtx {
            snap,
            customer: Some(c.index),
            feature: fid,
            t,
            current: None,
            limit: None,
        },
    };
    if op == Op::SeatRelease {
        return Ok(Some(release_seat(step, &c, &sel, d)));
    }
    let Some((w, limit)) = winner(&mut step, &c, &sel, d) else {
        return Ok(None);
    };
    Ok(answer(step, &w, limit, d))
}

/// What the steps after the candidate walk share: the request, whose usage it is, the
/// clock, and what an upgrade must beat (`ctx.t` is the time evaluated at).
struct Step<'r, 'a> {
    op: Op,
    req: &'r Request<'a>,
    key: UsageKey<'a>,
    now: Timestamp,
    ctx: UpgradeCtx<'a>,
}

/// Refuses malformed requests and finds the feature, checking the operation fits its
/// kind. `None` when the feature is unknown (`d` is denied).
#[inline]
fn feature_for<'a>(
    snap: &'a Snapshot,
    op: Op,
    req: &Request<'a>,
    d: &mut Decision<'a>,
) -> Result<Option<(FeatureId, &'a Feature)>, RequestError> {
    if req.amount == 0 {
        return Err(RequestError::ZeroAmount);
    }
    if req.at.is_some() && op != Op::Check {
        return Err(RequestError::AtNotAllowed);
    }
    d.snapshot = &snap.version;
    d.feature = req.feature;
    let Some(fid) = snap.feature_id(req.feature) else {
        d.deny(Reason::UnknownFeature);
        return Ok(None);
    };
    let feature = snap.feature(fid);
    let kind = feature.kind;
    if !op.applies_to(kind) {
        return Err(RequestError::WrongKind {
            op: op.as_str(),
            feature: feature.name.to_string(),
            kind: kind.as_str(),
        });
    }
    if matches!(op, Op::SeatAcquire | Op::SeatRelease) && req.holder.is_none() {
        return Err(RequestError::MissingHolder);
    }
    let name: &'a str = &feature.name;
    d.feature = name;
    d.kind = Some(kind);
    Ok(Some((fid, feature)))
}

/// Releasing a seat always frees it, even after the entitlement has lapsed: a holder
/// must never be stuck with a seat it can no longer give back.
#[inline]
fn release_seat<'a>(
    s: Step<'_, 'a>,
    c: &CustomerView<'a>,
    sel: &Selector<'a>,
    d: &mut Decision<'a>,
) -> Pending<'a> {
    let winner = sel.winner().filter(|(w, ..)| w.value.grants_something());
    if let Some((w, rule, _)) = winner {
        describe_winner(d, s.ctx.snap, c, &w, s.ctx.feature, rule, sel.summed);
    }
    d.allowed = true;
    d.reason = Reason::Granted;
    d.limit = winner.and_then(|(_, _, l)| l);
    let op = UsageOp::Seat {
        key: s.key,
        limit: d.limit.unwrap_or(Limit::Unlimited),
        holder: s.req.holder,
        action: SeatAction::Release,
    };
    Pending {
        op,
        warn_units: None,
        notify: NotifyAt::NONE,
        now: s.now,
        ctx: s.ctx,
    }
}

/// The winning grant and the effective limit, recorded on `d` as granted; or `None`
/// with `d` denied (nothing usable, or the winner grants nothing) and upgrades
/// suggested.
#[inline]
fn winner<'a>(
    s: &mut Step<'_, 'a>,
    c: &CustomerView<'a>,
    sel: &Selector<'a>,
    d: &mut Decision<'a>,
) -> Option<(Candidate<'a>, Option<Limit>)> {
    let Some((w, rule, limit)) = sel.winner() else {
        d.deny(sel.absent_reason());
        d.upgrade = upgrades(s.ctx);
        return None;
    };
    describe_winner(d, s.ctx.snap, c, &w, s.ctx.feature, rule, sel.summed);
    if !w.value.grants_something() {
        d.deny(Reason::NotEntitled);
        d.upgrade = upgrades(s.ctx);
        return None;
    }
    s.ctx.current = Some((w.value, w.quantity));
    s.ctx.limit = limit;
    d.allowed = true;
    d.reason = Reason::Granted;
    Some((w, limit))
}

/// What the winner's kind answers: flags and values are decided; quota, rate and
/// seats need their usage step.
#[inline]
fn answer<'a>(
    s: Step<'_, 'a>,
    w: &Candidate<'a>,
    limit: Option<Limit>,
    d: &mut Decision<'a>,
) -> Option<Pending<'a>> {
    match w.value {
        GrantValue::Flag(_) | GrantValue::Revoked => None,
        GrantValue::Value(v) => {
            d.value = Some(&v.repr);
            None
        }
        GrantValue::Quota(q) => Some(quota(s, q, w.anchor, limit, d)),
        GrantValue::Rate(r) => rate(s, r, d),
        GrantValue::Seats(_) => seats(s, limit, d),
    }
}

/// A quota's window (anchored at the winning record's billing anchor or start for
/// anniversary resets), its effective limit and soft-limit threshold, and the counter
/// step.
#[inline]
fn quota<'a>(
    s: Step<'_, 'a>,
    q: &QuotaGrant,
    anchor: Timestamp,
    limit: Option<Limit>,
    d: &mut Decision<'a>,
) -> Pending<'a> {
    let t = s.ctx.t;
    let limit = limit.unwrap_or(q.limit);
    let win = window(q.period, q.reset, anchor, t);
    d.limit = Some(limit);
    // Past year 9999 there is no RFC 3339 to write: report no reset.
    d.resets_at = win.resets_at().filter(|t| t.to_jiff().is_some());
    let warn_units = match (q.warn_at, limit) {
        (Some(bp), Limit::Finite(l)) => {
            let units = (l as u128 * bp as u128).div_ceil(10_000);
            Some(u64::try_from(units).unwrap_or(u64::MAX))
        }
        _ => None,
    };
    let mode = match s.op {
        Op::Consume => QuotaMode::Consume,
        Op::Reserve => QuotaMode::Reserve,
        _ => QuotaMode::Check,
    };
    let op = UsageOp::Quota {
        key: s.key,
        window_start: win.start,
        window_end: win.end,
        limit,
        amount: s.req.amount,
        mode,
        allow_overage: q.overage == Overage::Allow,
    };
    Pending {
        op,
        warn_units,
        notify: q.notify_at,
        now: t,
        ctx: s.ctx,
    }
}

/// A rate limit's bucket step; a check as of another time (`at`) reports the limit
/// only.
#[inline]
fn rate<'a>(s: Step<'_, 'a>, r: &RateGrant, d: &mut Decision<'a>) -> Option<Pending<'a>> {
    d.limit = Some(Limit::Finite(r.limit));
    d.burst = Some(r.burst);
    if s.req.at.is_some() {
        return None;
    }
    let op = UsageOp::Rate {
        key: s.key,
        limit: r.limit,
        per_us: r.per_us,
        burst: r.burst,
        amount: s.req.amount,
        consume: s.op == Op::Consume,
    };
    Some(Pending {
        op,
        warn_units: None,
        notify: NotifyAt::NONE,
        now: s.now,
        ctx: s.ctx,
    })
}

/// A seat check or acquisition against the effective limit; a check as of another
/// time (`at`) reports the limit only.
#[inline]
fn seats<'a>(s: Step<'_, 'a>, limit: Option<Limit>, d: &mut Decision<'a>) -> Option<Pending<'a>> {
    let limit = limit.unwrap_or(Limit::Unlimited);
    d.limit = Some(limit);
    if s.req.at.is_some() {
        return None;
    }
    let action = match s.op {
        Op::SeatAcquire => SeatAction::Acquire,
        Op::SeatRelease => SeatAction::Release,
        _ => SeatAction::Check,
    };
    let op = UsageOp::Seat {
        key: s.key,
        limit,
        holder: s.req.holder,
        action,
    };
    Some(Pending {
        op,
        warn_units: None,
        notify: NotifyAt::NONE,
        now: s.now,
        ctx: s.ctx,
    })
}
