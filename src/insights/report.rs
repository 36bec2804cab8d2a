//! The usage report: the aggregation's totals joined with the served snapshot (who is
//! granted what now, which overrides were in effect), sorted most-first. Pure.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::aggregate::Totals;
use crate::policy::{NONE, Snapshot};
use crate::time::Timestamp;

/// `GET /v1/reports/usage` and `entitled report usage --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    pub since: Option<Timestamp>,
    pub until: Timestamp,
    /// Features and plans whose customers were denied by a limit, most denials first.
    pub limits_hit: Vec<LimitHit>,
    /// Entitlements granted now, with how many of their customers used them; most
    /// unused first.
    pub unused: Vec<Unused>,
    /// Overrides in effect during the period, by feature and approver; most first.
    pub overrides: Vec<OverrideCount>,
    /// Denials by reason; most first.
    pub denials: Vec<DenialCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitHit {
    pub feature: String,
    pub plan: Option<String>,
    pub denials: u64,
    pub customers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unused {
    pub feature: String,
    pub plan: Option<String>,
    pub customers_granted: u64,
    pub customers_using: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverrideCount {
    pub feature: String,
    pub approved_by: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenialCount {
    pub reason: String,
    pub count: u64,
}

type Key = (String, Option<String>);

/// The report for `[since, until]` from the aggregation's `totals` and `denials`
/// (already taken for `since`) and the snapshot served at `until`.
pub fn build(
    totals: &BTreeMap<Key, Totals>,
    denials: &[(&'static str, u64)],
    snap: Option<&Snapshot>,
    since: Option<Timestamp>,
    until: Timestamp,
) -> UsageReport {
    let mut limits_hit: Vec<LimitHit> = totals
        .iter()
        .filter(|(_, t)| t.limit_denials > 0)
        .map(|((f, p), t)| LimitHit {
            feature: f.clone(),
            plan: p.clone(),
            denials: t.limit_denials,
            customers: t.customers_limited,
        })
        .collect();
    limits_hit.sort_by(|a, b| {
        (b.denials, b.customers)
            .cmp(&(a.denials, a.customers))
            .then_with(|| (&a.feature, &a.plan).cmp(&(&b.feature, &b.plan)))
    });
    let mut denials: Vec<DenialCount> = denials
        .iter()
        .map(|(r, n)| DenialCount {
            reason: (*r).to_string(),
            count: *n,
        })
        .collect();
    denials.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    let (unused, overrides) = match snap {
        Some(s) => (unused(totals, s, until), overrides(s, since, until)),
        None => (Vec::new(), Vec::new()),
    };
    UsageReport {
        since,
        until,
        limits_hit,
        unused,
        overrides,
        denials,
    }
}

/// Customers granted each (feature, plan) at `until` (subscriptions in effect, their
/// plans' grants; customer grants with no plan), against those the aggregation saw
/// allowed it.
fn unused(totals: &BTreeMap<Key, Totals>, snap: &Snapshot, until: Timestamp) -> Vec<Unused> {
    let mut granted: HashMap<(u32, u32), u64> = HashMap::new();
    let mut mine: Vec<(u32, u32)> = Vec::new();
    for c in snap.customers.iter() {
        mine.clear();
        for s in c.subs {
            if !(s.starts <= until && until < s.grace_ends) {
                continue;
            }
            let b = snap.bundle(s.plan);
            for (f, &g) in b.grants.iter().enumerate() {
                if g == NONE {
                    continue;
                }
                if snap
                    .catalog
                    .grants
                    .get(g as usize)
                    .is_some_and(|bg| bg.value.grants_something())
                {
                    mine.push((f as u32, s.plan));
                }
            }
        }
        for g in c.grants {
            if g.starts <= until && until < g.ends && g.value.grants_something() {
                mine.push((g.feature, NONE));
            }
        }
        mine.sort_unstable();
        mine.dedup();
        for k in &mine {
            *granted.entry(*k).or_default() += 1;
        }
    }
    let mut out: Vec<Unused> = granted
        .into_iter()
        .map(|((f, p), n)| {
            let feature = snap.feature(f).name.to_string();
            let plan = (p != NONE).then(|| snap.bundle(p).name.to_string());
            let using = totals
                .get(&(feature.clone(), plan.clone()))
                .map_or(0, |t| t.customers_using)
                .min(n);
            Unused {
                feature,
                plan,
                customers_granted: n,
                customers_using: using,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (b.customers_granted - b.customers_using)
            .cmp(&(a.customers_granted - a.customers_using))
            .then_with(|| (&a.feature, &a.plan).cmp(&(&b.feature, &b.plan)))
    });
    out
}

/// Overrides in effect at some time in `[since, until]`, by feature and approver.
fn overrides(snap: &Snapshot, since: Option<Timestamp>, until: Timestamp) -> Vec<OverrideCount> {
    let mut by: HashMap<(u32, &str), u64> = HashMap::new();
    for o in snap.customers.overrides() {
        if o.starts <= until && since.is_none_or(|s| o.expires > s) {
            *by.entry((o.feature, &o.approved_by)).or_default() += 1;
        }
    }
    let mut out: Vec<OverrideCount> = by
        .into_iter()
        .map(|((f, who), count)| OverrideCount {
            feature: snap.feature(f).name.to_string(),
            approved_by: who.to_string(),
            count,
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| (&a.feature, &a.approved_by).cmp(&(&b.feature, &b.approved_by)))
    });
    out
}
