//! Pure decisions: `(&Snapshot, request, now) → Decision`.
//!
//! No I/O, no clock, no locks. A decision that needs usage state (quota, rate, seats)
//! comes back as a [`Step::Usage`]: the [`UsageOp`] to run atomically against a store,
//! and a [`Pending`] decision that [`Pending::finish`] completes with the store's
//! answer. Flag and value decisions never touch usage state.
//!
//! Precedence (PRODUCT §2.4) for the grants of a feature active at `t` and in scope:
//! an override wins; otherwise the highest `priority`; otherwise the most generous (or
//! the sum, for `combine: sum`). The same candidate walk serves decisions and
//! [`explain`], so the explanation can never disagree with the decision.

pub mod decision;
pub mod ops;
pub mod report;
pub mod window;

use std::cmp::Ordering;

pub use decision::{Decision, Reason, Source, SourceType};
pub use ops::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};

/// Evaluates and completes a decision with a synchronous usage step (the in-memory
/// store): `run` answers the step.
pub fn decide_with<'a>(
    snap: &'a Snapshot,
    op: Op,
    req: &Request<'a>,
    now: Timestamp,
    run: impl FnOnce(&UsageOp<'a>) -> UsageOutcome,
) -> Result<Decision<'a>, RequestError> {
    let mut d = Decision::blank(req.feature);
    if let Some(p) = evaluate(snap, op, req, now, &mut d)? {
        let outcome = run(&p.op);
        p.finish(outcome, &mut d);
    }
    Ok(d)
}
pub use window::{Window, window};

use crate::policy::{
    Combine, CustomerView, Feature, FeatureId, GrantValue, Kind, Limit, NONE, Overage, Snapshot,
};
use crate::time::{SECOND, Timestamp};

/// The operations of PRODUCT §3.
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
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Check => "check",
            Op::Consume => "consume",
            Op::Reserve => "reserve",
            Op::SeatAcquire => "seats_acquire",
            Op::SeatRelease => "seats_release",
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

/// A decision waiting for its usage step: run [`Pending::op`] against a store, then
/// [`Pending::finish`] the decision with the answer.
#[derive(Debug, Clone, Copy)]
pub struct Pending<'a> {
    pub op: UsageOp<'a>,
    warn_units: Option<u64>,
    now: Timestamp,
    ctx: UpgradeCtx<'a>,
}

/// What an upgrade must beat: the winning grant and the effective limit.
#[derive(Debug, Clone, Copy)]
struct UpgradeCtx<'a> {
    snap: &'a Snapshot,
    /// The customer's index (a view is rebuilt on denial; keeping `Pending` small
    /// keeps it in registers rather than `memmove`).
    customer: Option<u32>,
    feature: FeatureId,
    t: Timestamp,
    current: Option<(&'a GrantValue, u32)>,
    limit: Option<Limit>,
}

impl<'a> Pending<'a> {
    /// Completes `d` (as [`evaluate`] left it) with the store's answer to
    /// [`Pending::op`].
    pub fn finish(self, outcome: UsageOutcome, d: &mut Decision<'a>) {
        let Pending {
            op,
            warn_units,
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
                if !admitted {
                    d.deny(Reason::RateLimited);
                    d.retry_after = retry_after_us.map(|us| us as f64 / SECOND as f64);
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

fn remaining(limit: Limit, used: u64) -> Limit {
    match limit {
        Limit::Finite(l) => Limit::Finite(l.saturating_sub(used)),
        Limit::Unlimited => Limit::Unlimited,
    }
}

/// Why a candidate grant does or does not apply at `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    InGrace,
    NotYetActive,
    Expired,
    OutOfScope,
}

impl Status {
    fn usable(self) -> bool {
        matches!(self, Status::Active | Status::InGrace)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::InGrace => "in grace",
            Status::NotYetActive => "not yet active",
            Status::Expired => "expired",
            Status::OutOfScope => "out of scope",
        }
    }
}

/// Which record a candidate comes from (index into the customer's lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Subscription(u32),
    Grant(u32),
    Override(u32),
}

/// One grant of the feature, as found on the customer.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub origin: Origin,
    pub value: &'a GrantValue,
    pub quantity: u32,
    pub status: Status,
    pub priority: Option<i32>,
    pub starts: Timestamp,
    pub ends: Timestamp,
    pub trial: bool,
}

/// Where `t` falls in a record's life.
pub(crate) fn status(
    starts: Timestamp,
    ends: Timestamp,
    grace_ends: Timestamp,
    t: Timestamp,
) -> Status {
    if t < starts {
        Status::NotYetActive
    } else if t < ends {
        Status::Active
    } else if t < grace_ends {
        Status::InGrace
    } else {
        Status::Expired
    }
}

/// Walks every grant of `feature` on the customer: subscriptions' plans, customer
/// grants, overrides.
fn for_each_candidate<'a>(
    snap: &'a Snapshot,
    c: &CustomerView<'a>,
    feature: FeatureId,
    t: Timestamp,
    ctx: Context<'_>,
    mut visit: impl FnMut(Candidate<'a>),
) {
    let in_scope = |scope: u32| scope == NONE || snap.scope(scope).is_none_or(|s| s.matches(ctx));
    for (i, s) in c.subs.iter().enumerate() {
        let Some(g) = snap.bundle_grant(s.plan, feature) else {
            continue;
        };
        let mut st = status(s.starts, s.ends, s.grace_ends, t);
        if st.usable() && !in_scope(s.scope) {
            st = Status::OutOfScope;
        }
        visit(Candidate {
            origin: Origin::Subscription(i as u32),
            value: &g.value,
            quantity: s.quantity,
            status: st,
            priority: None,
            starts: s.starts,
            ends: s.ends,
            trial: s.trial,
        });
    }
    for (i, g) in c.grants.iter().enumerate() {
        if g.feature != feature {
            continue;
        }
        let mut st = status(g.starts, g.ends, g.ends, t);
        if st.usable() && !in_scope(g.scope) {
            st = Status::OutOfScope;
        }
        visit(Candidate {
            origin: Origin::Grant(i as u32),
            value: &g.value,
            quantity: 1,
            status: st,
            priority: g.priority,
            starts: g.starts,
            ends: g.ends,
            trial: false,
        });
    }
    for (i, o) in c.overrides.iter().enumerate() {
        if o.feature != feature {
            continue;
        }
        visit(Candidate {
            origin: Origin::Override(i as u32),
            value: &o.value,
            quantity: 1,
            status: status(o.starts, o.expires, o.expires, t),
            priority: None,
            starts: o.starts,
            ends: o.expires,
            trial: false,
        });
    }
}

/// Which precedence rule picked the winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Override,
    Priority,
    MostGenerous,
    Sum,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Override => "an active override wins over everything",
            Rule::Priority => "the highest priority wins",
            Rule::MostGenerous => "the most generous grant wins",
            Rule::Sum => "grants add up (combine: sum); the largest names the source",
        }
    }
}

/// Streaming precedence: offered candidates one by one, keeps what it needs.
#[derive(Debug)]
struct Selector<'a> {
    feature: &'a Feature,
    best_override: Option<Candidate<'a>>,
    best_priority: Option<Candidate<'a>>,
    best: Option<Candidate<'a>>,
    sum: Option<Limit>,
    summed: u32,
    saw_scope: bool,
    saw_expired: bool,
    saw_not_yet: bool,
}

impl<'a> Selector<'a> {
    fn new(feature: &'a Feature) -> Self {
        Selector {
            feature,
            best_override: None,
            best_priority: None,
            best: None,
            sum: None,
            summed: 0,
            saw_scope: false,
            saw_expired: false,
            saw_not_yet: false,
        }
    }

    fn more_generous(&self, a: &Candidate<'a>, b: &Candidate<'a>) -> bool {
        a.value
            .cmp_generosity(a.quantity, b.value, b.quantity, self.feature)
            == Ordering::Greater
    }

    fn offer(&mut self, c: Candidate<'a>) {
        match c.status {
            Status::OutOfScope => self.saw_scope = true,
            Status::Expired => self.saw_expired = true,
            Status::NotYetActive => self.saw_not_yet = true,
            Status::Active | Status::InGrace => {}
        }
        if !c.status.usable() {
            return;
        }
        if let Origin::Override(_) = c.origin {
            if self
                .best_override
                .as_ref()
                .is_none_or(|b| self.more_generous(&c, b))
            {
                self.best_override = Some(c);
            }
            return;
        }
        if let Some(p) = c.priority {
            let better = match &self.best_priority {
                None => true,
                Some(b) => {
                    let bp = b.priority.unwrap_or(i32::MIN);
                    p > bp || (p == bp && self.more_generous(&c, b))
                }
            };
            if better {
                self.best_priority = Some(c);
            }
        }
        if self.feature.combine == Combine::Sum
            && let Some(l) = c.value.scaled_limit(c.quantity)
        {
            self.summed += 1;
            self.sum = Some(match (self.sum, l) {
                (None, l) => l,
                (Some(Limit::Unlimited), _) | (_, Limit::Unlimited) => Limit::Unlimited,
                (Some(Limit::Finite(a)), Limit::Finite(b)) => Limit::Finite(a.saturating_add(b)),
            });
        }
        if self.best.as_ref().is_none_or(|b| self.more_generous(&c, b)) {
            self.best = Some(c);
        }
    }

    /// The winner, the rule that chose it, and the effective limit for quota/seats.
    fn winner(&self) -> Option<(Candidate<'a>, Rule, Option<Limit>)> {
        if let Some(o) = self.best_override {
            return Some((o, Rule::Override, o.value.scaled_limit(o.quantity)));
        }
        if let Some(p) = self.best_priority {
            return Some((p, Rule::Priority, p.value.scaled_limit(p.quantity)));
        }
        let b = self.best?;
        if self.feature.combine == Combine::Sum && self.summed > 1 {
            return Some((b, Rule::Sum, self.sum));
        }
        Some((b, Rule::MostGenerous, b.value.scaled_limit(b.quantity)))
    }

    /// The reason for a feature with no usable grant.
    fn absent_reason(&self) -> Reason {
        if self.saw_scope {
            Reason::OutOfScope
        } else if self.saw_expired {
            Reason::Expired
        } else if self.saw_not_yet {
            Reason::NotYetActive
        } else {
            Reason::NotEntitled
        }
    }
}

/// Records on `d` where the winning grant came from and how long it lasts.
fn describe_winner<'a>(
    d: &mut Decision<'a>,
    snap: &'a Snapshot,
    c: &CustomerView<'a>,
    w: &Candidate<'a>,
    feature: FeatureId,
    rule: Rule,
    summed: u32,
) {
    d.source = Some(source(snap, c, w, feature, rule, summed));
    d.expires_at = (w.ends != Timestamp::MAX).then_some(w.ends);
    d.in_grace = w.status == Status::InGrace;
    d.trial = w.trial;
}

fn source<'a>(
    snap: &'a Snapshot,
    c: &CustomerView<'a>,
    w: &Candidate<'a>,
    feature: FeatureId,
    rule: Rule,
    summed: u32,
) -> Source<'a> {
    let mut s = Source {
        kind: SourceType::Subscription,
        plan: None,
        via: None,
        priority: w.priority,
        approval: None,
        combined: (rule == Rule::Sum).then_some(summed),
    };
    match w.origin {
        Origin::Subscription(i) => {
            if let Some(sub) = c.subs.get(i as usize) {
                s.plan = Some(&snap.bundle(sub.plan).name);
                s.via = snap.bundle_grant(sub.plan, feature).map(|g| &*g.via);
            }
        }
        Origin::Grant(_) => s.kind = SourceType::Grant,
        Origin::Override(i) => {
            s.kind = SourceType::Override;
            s.approval = c.overrides.get(i as usize);
        }
    }
    s
}

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
    let fits = match op {
        Op::Check => true,
        Op::Consume => matches!(kind, Kind::Quota | Kind::Rate),
        Op::Reserve => kind == Kind::Quota,
        Op::SeatAcquire | Op::SeatRelease => kind == Kind::Seats,
    };
    if !fits {
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
    let Some(c) = snap.customers.get(req.customer) else {
        d.deny(Reason::UnknownCustomer);
        return Ok(None);
    };
    let t = req.at.unwrap_or(now);
    let mut sel = Selector::new(feature);
    for_each_candidate(snap, &c, fid, t, req.context, |cand| sel.offer(cand));
    let mut uctx = UpgradeCtx {
        snap,
        customer: Some(c.index),
        feature: fid,
        t,
        current: None,
        limit: None,
    };

    // Releasing a seat always frees it, even after the entitlement has lapsed: a holder
    // must never be stuck with a seat it can no longer give back.
    if op == Op::SeatRelease {
        let winner = sel.winner().filter(|(w, ..)| w.value.grants_something());
        if let Some((w, rule, _)) = winner {
            describe_winner(d, snap, &c, &w, fid, rule, sel.summed);
        }
        d.allowed = true;
        d.reason = Reason::Granted;
        d.limit = winner.and_then(|(_, _, l)| l);
        let op = UsageOp::Seat {
            key: UsageKey {
                customer: c.id,
                feature: name,
            },
            limit: d.limit.unwrap_or(Limit::Unlimited),
            holder: req.holder,
            action: SeatAction::Release,
        };
        return Ok(Some(Pending {
            op,
            warn_units: None,
            now,
            ctx: uctx,
        }));
    }
    let Some((w, rule, limit)) = sel.winner() else {
        d.deny(sel.absent_reason());
        d.upgrade = upgrades(uctx);
        return Ok(None);
    };
    describe_winner(d, snap, &c, &w, fid, rule, sel.summed);
    if !w.value.grants_something() {
        d.deny(Reason::NotEntitled);
        d.upgrade = upgrades(uctx);
        return Ok(None);
    }
    uctx.current = Some((w.value, w.quantity));
    uctx.limit = limit;
    d.allowed = true;
    d.reason = Reason::Granted;
    let key = UsageKey {
        customer: c.id,
        feature: name,
    };
    match w.value {
        GrantValue::Flag(_) | GrantValue::Revoked => Ok(None),
        GrantValue::Value(v) => {
            d.value = Some(&v.repr);
            Ok(None)
        }
        GrantValue::Quota(q) => {
            let limit = limit.unwrap_or(q.limit);
            let win = window(q.period, q.reset, w.starts, t);
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
            let mode = match op {
                Op::Consume => QuotaMode::Consume,
                Op::Reserve => QuotaMode::Reserve,
                _ => QuotaMode::Check,
            };
            let op = UsageOp::Quota {
                key,
                window_start: win.start,
                window_end: win.end,
                limit,
                amount: req.amount,
                mode,
                allow_overage: q.overage == Overage::Allow,
            };
            Ok(Some(Pending {
                op,
                warn_units,
                now: t,
                ctx: uctx,
            }))
        }
        GrantValue::Rate(r) => {
            d.limit = Some(Limit::Finite(r.limit));
            if req.at.is_some() {
                return Ok(None);
            }
            let op = UsageOp::Rate {
                key,
                limit: r.limit,
                per_us: r.per_us,
                burst: r.burst,
                amount: req.amount,
                consume: op == Op::Consume,
            };
            Ok(Some(Pending {
                op,
                warn_units: None,
                now,
                ctx: uctx,
            }))
        }
        GrantValue::Seats(_) => {
            let limit = limit.unwrap_or(Limit::Unlimited);
            d.limit = Some(limit);
            if req.at.is_some() {
                return Ok(None);
            }
            let action = match op {
                Op::SeatAcquire => SeatAction::Acquire,
                Op::SeatRelease => SeatAction::Release,
                _ => SeatAction::Check,
            };
            let op = UsageOp::Seat {
                key,
                limit,
                holder: req.holder,
                action,
            };
            Ok(Some(Pending {
                op,
                warn_units: None,
                now,
                ctx: uctx,
            }))
        }
    }
}

/// Plans (tier order) whose grant of the feature would do better than what the
/// customer has now, leaving out plans the customer already holds. Computed on
/// denials only.
fn upgrades<'a>(ctx: UpgradeCtx<'a>) -> Vec<&'a str> {
    let snap = ctx.snap;
    let Some(list) = snap.upgrades.get(ctx.feature as usize) else {
        return Vec::new();
    };
    let feature = snap.feature(ctx.feature);
    let held = |plan: u32| {
        ctx.customer
            .map(|i| snap.customers.view(i))
            .is_some_and(|c| {
                c.subs
                    .iter()
                    .any(|s| s.plan == plan && s.starts <= ctx.t && ctx.t < s.grace_ends)
            })
    };
    list.iter()
        .filter(|(plan, _)| !held(*plan))
        .filter(|(_, g)| {
            let Some(bg) = snap.grants.get(*g as usize) else {
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

/// One candidate in an explanation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExplainedGrant {
    pub source: String,
    pub grant: String,
    pub status: &'static str,
    pub won: bool,
}

/// Which grants were considered for a decision and why the winner won.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub considered: Vec<ExplainedGrant>,
    pub rule: Option<&'static str>,
}

/// Explains the precedence for a request, using the same walk as [`evaluate`].
pub fn explain(snap: &Snapshot, req: &Request<'_>, now: Timestamp) -> Explanation {
    let mut considered = Vec::new();
    let (Some(fid), Some(c)) = (
        snap.feature_id(req.feature),
        snap.customers.get(req.customer),
    ) else {
        return Explanation {
            considered,
            rule: None,
        };
    };
    let feature = snap.feature(fid);
    let t = req.at.unwrap_or(now);
    let mut sel = Selector::new(feature);
    let mut all = Vec::new();
    for_each_candidate(snap, &c, fid, t, req.context, |cand| {
        all.push(cand);
        sel.offer(cand);
    });
    let winner = sel.winner();
    for cand in &all {
        let source = match cand.origin {
            Origin::Subscription(i) => {
                let s = &c.subs[i as usize];
                let via = snap
                    .bundle_grant(s.plan, fid)
                    .map(|g| g.via.join(" > "))
                    .unwrap_or_default();
                let mut text = format!(
                    "subscription `{}` ({} .. {})",
                    snap.bundle(s.plan).name,
                    fmt_t(s.starts),
                    fmt_t(s.ends)
                );
                if via.contains('>') {
                    text.push_str(&format!(" via {via}"));
                }
                if s.quantity > 1 {
                    text.push_str(&format!(" x{}", s.quantity));
                }
                if s.trial {
                    text.push_str(" trial");
                }
                text
            }
            Origin::Grant(_) => match cand.priority {
                Some(p) => format!(
                    "customer grant, priority {p} ({} .. {})",
                    fmt_t(cand.starts),
                    fmt_t(cand.ends)
                ),
                None => format!(
                    "customer grant ({} .. {})",
                    fmt_t(cand.starts),
                    fmt_t(cand.ends)
                ),
            },
            Origin::Override(i) => {
                let o = &c.overrides[i as usize];
                format!(
                    "override until {}, approved by {}: {}",
                    fmt_t(o.expires),
                    o.approved_by,
                    o.reason
                )
            }
        };
        let won = winner.as_ref().is_some_and(|(w, rule, _)| {
            w.origin == cand.origin
                || (*rule == Rule::Sum
                    && cand.status.usable()
                    && !matches!(cand.origin, Origin::Override(_)))
        });
        considered.push(ExplainedGrant {
            source,
            grant: describe(cand.value),
            status: cand.status.as_str(),
            won,
        });
    }
    Explanation {
        considered,
        rule: winner.map(|(_, r, _)| r.as_str()),
    }
}

fn fmt_t(t: Timestamp) -> String {
    match t {
        Timestamp::MIN => "-".into(),
        Timestamp::MAX => "open".into(),
        t => t.to_string(),
    }
}

/// A grant in policy notation, for explanations.
pub fn describe(g: &GrantValue) -> String {
    let lim = |l: &Limit| match l {
        Limit::Finite(n) => n.to_string(),
        Limit::Unlimited => "unlimited".into(),
    };
    match g {
        GrantValue::Flag(b) => b.to_string(),
        GrantValue::Revoked => "false (revoked)".into(),
        GrantValue::Quota(q) => format!("{} per {}", lim(&q.limit), q.period.name()),
        GrantValue::Rate(r) => format!(
            "{} per {}, burst {}",
            r.limit,
            crate::policy::units::format_duration(r.per_us),
            r.burst
        ),
        GrantValue::Seats(l) => format!("{} seats", lim(l)),
        GrantValue::Value(v) => match &v.repr {
            crate::policy::ValueRepr::Str(s) => s.to_string(),
            crate::policy::ValueRepr::Int(n) => n.to_string(),
            crate::policy::ValueRepr::Float(x) => x.to_string(),
            crate::policy::ValueRepr::Bool(b) => b.to_string(),
        },
    }
}
