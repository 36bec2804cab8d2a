//! Read-only reports over a snapshot: what ends soon, and a customer's records.

use serde::Serialize;

use super::grants::{Status, status};
use crate::policy::{CustomerView, Snapshot};
use crate::time::Timestamp;

/// A subscription, customer grant or override that ends within a window.
#[derive(Debug, Clone, Serialize)]
pub struct Expiring<'a> {
    pub customer: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<&'a str>,
    pub ends: Timestamp,
    /// Whole days from `now` to `ends`, rounded down.
    pub days_left: i64,
    pub trial: bool,
}

/// Everything that ends in `[now, now + within)`, soonest first.
pub fn expiring(snap: &Snapshot, now: Timestamp, within_us: i64) -> Vec<Expiring<'_>> {
    expiring_of(snap, snap.customers.iter(), now, within_us)
}

/// What of these customers' records ends in `[now, now + within)`, soonest first.
pub fn expiring_of<'a>(
    snap: &'a Snapshot,
    customers: impl IntoIterator<Item = CustomerView<'a>>,
    now: Timestamp,
    within_us: i64,
) -> Vec<Expiring<'a>> {
    let until = now.saturating_add(within_us);
    let soon = |t: Timestamp| t >= now && t < until && t != Timestamp::MAX;
    let days = |t: Timestamp| (t.0 - now.0) / crate::time::DAY;
    let mut out = Vec::new();
    for c in customers {
        for s in c.subs {
            if soon(s.ends) {
                out.push(Expiring {
                    customer: c.id,
                    kind: "subscription",
                    plan: Some(&snap.bundle(s.plan).name),
                    feature: None,
                    ends: s.ends,
                    days_left: days(s.ends),
                    trial: s.trial,
                });
            }
        }
        for g in c.grants {
            if soon(g.ends) {
                out.push(Expiring {
                    customer: c.id,
                    kind: "grant",
                    plan: None,
                    feature: Some(&snap.feature(g.feature).name),
                    ends: g.ends,
                    days_left: days(g.ends),
                    trial: false,
                });
            }
        }
        for o in c.overrides {
            if soon(o.expires) {
                out.push(Expiring {
                    customer: c.id,
                    kind: "override",
                    plan: None,
                    feature: Some(&snap.feature(o.feature).name),
                    ends: o.expires,
                    days_left: days(o.expires),
                    trial: false,
                });
            }
        }
    }
    out.sort_by(|a, b| (a.ends, a.customer).cmp(&(b.ends, b.customer)));
    out
}

#[derive(Debug, Serialize)]
pub struct SubscriptionInfo<'a> {
    pub plan: &'a str,
    pub starts: Timestamp,
    pub ends: Option<Timestamp>,
    pub grace_ends: Option<Timestamp>,
    pub quantity: u32,
    pub trial: bool,
    pub status: &'static str,
}

#[derive(Debug, Serialize)]
pub struct OverrideInfo<'a> {
    pub feature: &'a str,
    pub expires: Timestamp,
    pub approved_by: &'a str,
    pub reason: &'a str,
    pub ticket: Option<&'a str>,
    pub active: bool,
}

/// A customer's subscriptions and overrides, with their state at `now`.
pub fn records<'a>(
    snap: &'a Snapshot,
    c: &CustomerView<'a>,
    now: Timestamp,
) -> (Vec<SubscriptionInfo<'a>>, Vec<OverrideInfo<'a>>) {
    let open = |t: Timestamp| (t != Timestamp::MAX).then_some(t);
    let subs = c
        .subs
        .iter()
        .map(|s| SubscriptionInfo {
            plan: &snap.bundle(s.plan).name,
            starts: s.starts,
            ends: open(s.ends),
            grace_ends: (s.grace_ends != s.ends).then_some(s.grace_ends),
            quantity: s.quantity,
            trial: s.trial,
            status: match status(s.starts, s.ends, s.grace_ends, now) {
                Status::NotYetActive => "not_yet_active",
                Status::Active => "active",
                Status::InGrace => "in_grace",
                Status::Expired | Status::OutOfScope => "expired",
            },
        })
        .collect();
    let overrides = c
        .overrides
        .iter()
        .map(|o| OverrideInfo {
            feature: &snap.feature(o.feature).name,
            expires: o.expires,
            approved_by: &o.approved_by,
            reason: &o.reason,
            ticket: o.ticket.as_deref(),
            active: o.starts <= now && now < o.expires,
        })
        .collect();
    (subs, overrides)
}
