//! The candidate walk and precedence, shared by decisions and explanations.
//!
//! [`for_each_candidate`] offers every grant of a feature on a customer (subscribed
//! plans, customer grants, overrides) with its status at `t`; the [`Selector`] keeps
//! the winner as they stream by, so a decision allocates nothing to choose.

use std::cmp::Ordering;

use super::Context;
use super::decision::{Decision, Reason, Source, SourceType};
use crate::policy::{Combine, CustomerView, Feature, FeatureId, GrantValue, Limit, NONE, Snapshot};
use crate::time::Timestamp;

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
    pub(super) fn usable(self) -> bool {
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
    /// Where quota windows count from (a subscription's billing anchor, else `starts`).
    pub anchor: Timestamp,
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
pub(super) fn for_each_candidate<'a>(
    snap: &'a Snapshot,
    c: &CustomerView<'a>,
    feature: FeatureId,
    t: Timestamp,
    ctx: Context<'_>,
    mut visit: impl FnMut(Candidate<'a>),
) {
    let in_scope = |scope: u32| scope == NONE || c.scope(scope).is_none_or(|s| s.matches(ctx));
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
            anchor: s.anchor,
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
            anchor: g.starts,
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
            anchor: o.starts,
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
pub(super) struct Selector<'a> {
    feature: &'a Feature,
    best_override: Option<Candidate<'a>>,
    best_priority: Option<Candidate<'a>>,
    best: Option<Candidate<'a>>,
    sum: Option<Limit>,
    pub(super) summed: u32,
    saw_scope: bool,
    saw_expired: bool,
    saw_not_yet: bool,
}

impl<'a> Selector<'a> {
    pub(super) fn new(feature: &'a Feature) -> Self {
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

    pub(super) fn offer(&mut self, c: Candidate<'a>) {
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
    pub(super) fn winner(&self) -> Option<(Candidate<'a>, Rule, Option<Limit>)> {
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
    pub(super) fn absent_reason(&self) -> Reason {
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
pub(super) fn describe_winner<'a>(
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
