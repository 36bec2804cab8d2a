//! Customers: ids defined once, subscriptions to known plans, customer grants and
//! overrides with their dates and scopes, into the flat customer tables.
//!
//! A customer record's problems are placed on demand from where the record sits (a
//! document's `customers` list or an NDJSON line), so a clean load builds no paths.

use super::features::unknown_feature;
use super::grants::compile_grant;
use super::{Issue, Issues, Map, Place, Unit, k};
use crate::policy::customers::{Parts, SHARDS, Shard, locate};
use crate::policy::raw::{self, Grant, GrantFields};
use crate::policy::snapshot::*;
use crate::policy::source::{Content, Origin, Seg};
use crate::policy::units::parse_duration;
use crate::time::Timestamp;

/// Compiles every file's customers, in file order, into the customer table.
pub(super) fn compile_customers(
    units: &[Unit],
    catalog: &Catalog,
    issues: &mut Issues,
) -> Customers {
    let mut cc = CustomerCompiler::new(catalog, issues);
    let total: usize = units
        .iter()
        .map(|u| match &u.content {
            Content::Document(d) => d.customers.len(),
            Content::Customers(c) => c.len(),
        })
        .sum();
    cc.reserve(total);
    for (file, u) in units.iter().enumerate() {
        match &u.content {
            Content::Document(d) => {
                for (index, c) in d.customers.iter().enumerate() {
                    cc.customer(
                        c,
                        CustAt {
                            file,
                            origin: Origin::Document {
                                index: d.customer_position(index),
                            },
                        },
                    );
                }
            }
            Content::Customers(list) => {
                for (line, c) in list {
                    cc.customer(
                        c,
                        CustAt {
                            file,
                            origin: Origin::Line { line: *line },
                        },
                    );
                }
            }
        }
    }
    Customers::from_shards(cc.out)
}

/// One change to a compiled customer table.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Sets the customer `record.id` to `record` (added or replaced); `file` and
    /// `origin` say where the record sits, for its errors.
    Set {
        record: &'a raw::Customer,
        file: usize,
        origin: Origin,
    },
    /// Removes the customer with this id (nothing when there is none).
    Remove(&'a str),
    /// Sets the customer with this id to its compiled record in `from` (a table
    /// compiled against the same catalog), or removes it when `from` has none: an
    /// API record dropped, the files' record served again.
    Restore { id: &'a str, from: &'a Customers },
}

impl Change<'_> {
    fn id(&self) -> &str {
        match self {
            Change::Set { record, .. } => &record.id,
            Change::Remove(id) | Change::Restore { id, .. } => id,
        }
    }
}

/// Applies `changes`, in order, to `table`: only the shards holding a changed id are
/// rebuilt (their other customers copied as compiled), every other shard is shared.
/// A record with problems changes nothing: the problems come back instead, located
/// as a full compile would locate them.
pub fn update_customers(
    catalog: &Catalog,
    table: &Customers,
    changes: &[Change<'_>],
) -> Result<Customers, Vec<Issue>> {
    // The last change of an id wins: a batch is a sequence of writes.
    let mut last: Map<&str, usize> = Map::default();
    for (i, c) in changes.iter().enumerate() {
        last.insert(c.id(), i);
    }
    let mut by_shard: std::collections::BTreeMap<usize, Vec<&Change<'_>>> = Default::default();
    for (i, c) in changes.iter().enumerate() {
        if last.get(c.id()) == Some(&i) {
            by_shard.entry(locate(c.id()).1).or_default().push(c);
        }
    }
    let mut issues = Issues::default();
    let mut cc = CustomerCompiler::new(catalog, &mut issues);
    let mut rebuilt = Vec::with_capacity(by_shard.len());
    for (shard, list) in by_shard {
        let drop: Vec<&str> = list.iter().map(|c| c.id()).collect();
        cc.out[shard] = table.shard_without(shard, &drop);
        for c in list {
            match *c {
                Change::Set {
                    record,
                    file,
                    origin,
                } => cc.customer(record, CustAt { file, origin }),
                Change::Restore { id, from } => from.copy_into(id, &mut cc.out[shard]),
                Change::Remove(_) => {}
            }
        }
        rebuilt.push((shard, std::mem::take(&mut cc.out[shard])));
    }
    if !issues.0.is_empty() {
        return Err(issues.0);
    }
    Ok(table.with_shards(rebuilt))
}

/// Where a customer record sits, for building error paths on demand.
#[derive(Debug, Clone, Copy)]
struct CustAt {
    file: usize,
    origin: Origin,
}

impl CustAt {
    fn place(&self, rest: &[Seg]) -> Place {
        match self.origin {
            Origin::Document { index } => {
                let mut path = vec![Seg::Key("customers".into()), Seg::Index(index)];
                path.extend_from_slice(rest);
                Place {
                    file: self.file,
                    line: None,
                    path,
                    key: false,
                }
            }
            Origin::Line { line } => Place {
                file: self.file,
                line: Some(line),
                path: rest.to_vec(),
                key: false,
            },
        }
    }
}

/// Parses a time, trying the bare-date form first (it is the common one and the
/// cheaper one to reject).
fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse(s)
}

struct CustomerCompiler<'a> {
    features: &'a [Feature],
    feature_index: &'a Map<Box<str>, FeatureId>,
    bundles: &'a [Bundle],
    bundle_index: &'a Map<Box<str>, BundleId>,
    /// The shards being filled, each customer in the one [`locate`] picks.
    out: Vec<Shard>,
    /// Per shard, where each of its customers was defined (for "defined twice").
    origins: Vec<Vec<CustAt>>,
    /// The shard of the customer being compiled (its scopes are interned there).
    cur: usize,
    /// One customer's compiled parts, reused from customer to customer.
    subs: Vec<Subscription>,
    grants: Vec<CustomerGrant>,
    overrides: Vec<Override>,
    issues: &'a mut Issues,
}

impl<'a> CustomerCompiler<'a> {
    fn new(catalog: &'a Catalog, issues: &'a mut Issues) -> Self {
        CustomerCompiler {
            features: &catalog.features,
            feature_index: &catalog.feature_index,
            bundles: &catalog.bundles,
            bundle_index: &catalog.bundle_index,
            out: (0..SHARDS).map(|_| Shard::default()).collect(),
            origins: vec![Vec::new(); SHARDS],
            cur: 0,
            subs: Vec::new(),
            grants: Vec::new(),
            overrides: Vec::new(),
            issues,
        }
    }

    fn reserve(&mut self, n: usize) {
        let per = n / SHARDS + n / (SHARDS * 8) + 1;
        for (shard, origins) in self.out.iter_mut().zip(&mut self.origins) {
            shard.reserve(per);
            origins.reserve_exact(per);
        }
    }

    fn customer(&mut self, c: &raw::Customer, at: CustAt) {
        if c.id.is_empty() {
            self.issues
                .push(at.place(&[k("id")]), "a customer id may not be empty");
            return;
        }
        let (h, shard) = locate(&c.id);
        let twice = self.out[shard].find(h, &c.id);
        if let Some(first) = twice {
            self.issues.0.push(Issue {
                at: at.place(&[k("id")]),
                message: format!("customer `{}` is defined twice", c.id),
                unresolved: None,
                first: self.origins[shard]
                    .get(first as usize)
                    .map(|o| o.place(&[k("id")])),
            });
        }
        self.cur = shard;
        self.compile_parts(c, &at);
        if twice.is_some() {
            // Its subscriptions and grants were checked (their errors are reported
            // too); the load fails, so nothing of it is kept.
            return;
        }
        let parts = Parts {
            id: &c.id,
            name: c.name.as_deref(),
            subs: &self.subs,
            grants: &self.grants,
            overrides: &self.overrides,
        };
        self.out[shard].push(h, parts);
        self.origins[shard].push(at);
    }

    /// Compiles one customer's subscriptions, grants and overrides into the reused
    /// buffers, reporting what is wrong with them.
    fn compile_parts(&mut self, c: &raw::Customer, at: &CustAt) {
        self.subs.clear();
        self.grants.clear();
        self.overrides.clear();
        for (i, s) in c.subscriptions.iter().enumerate() {
            if let Some(sub) = self.subscription(s, at, i) {
                self.subs.push(sub);
            }
        }
        for (i, g) in c.grants.iter().enumerate() {
            if let Some(g) = self.customer_grant(g, at, i) {
                self.grants.push(g);
            }
        }
        for (i, o) in c.overrides.iter().enumerate() {
            if let Some(o) = self.override_(o, at, i) {
                self.overrides.push(o);
            }
        }
    }

    fn time(&mut self, s: &str, at: &CustAt, path: &[Seg]) -> Option<Timestamp> {
        match parse_time(s) {
            Ok(t) => Some(t),
            Err(e) => {
                self.issues.push(at.place(path), e);
                None
            }
        }
    }

    fn dates(
        &mut self,
        starts: Option<&str>,
        ends: Option<&str>,
        at: &CustAt,
        base: &[Seg],
        ends_key: &str,
    ) -> Option<(Timestamp, Timestamp)> {
        let with = |f: &str| {
            let mut p = base.to_vec();
            p.push(k(f));
            p
        };
        let s = match starts {
            Some(s) => self.time(s, at, &with("starts")),
            None => Some(Timestamp::MIN),
        };
        let e = match ends {
            Some(e) => self.time(e, at, &with(ends_key)),
            None => Some(Timestamp::MAX),
        };
        let (s, e) = (s?, e?);
        if s >= e {
            self.issues.push(
                at.place(&with(ends_key)),
                format!("`{ends_key}` must be after `starts`"),
            );
            return None;
        }
        Some((s, e))
    }

    fn scope(&mut self, scope: Option<&raw::Scope>, at: &CustAt, base: &[Seg]) -> Option<ScopeId> {
        let Some(scope) = scope else {
            return Some(NONE);
        };
        let mut keys = Vec::new();
        for (key, values) in scope.iter() {
            if values.0.is_empty() {
                let mut p = base.to_vec();
                p.extend([k("scope"), k(key)]);
                self.issues
                    .push(at.place(&p), format!("scope `{key}` lists no values"));
                return None;
            }
            keys.push((
                Box::from(key),
                values.0.iter().map(|v| Box::from(v.as_str())).collect(),
            ));
        }
        let s = Scope {
            keys: keys.into_boxed_slice(),
        };
        Some(self.out[self.cur].intern_scope(s))
    }

    fn subscription(
        &mut self,
        s: &raw::Subscription,
        at: &CustAt,
        i: usize,
    ) -> Option<Subscription> {
        let base = [k("subscriptions"), Seg::Index(i)];
        let with = |f: &str| [base[0].clone(), base[1].clone(), k(f)];
        let plan = match self.bundle_index.get(s.plan.as_str()) {
            Some(&p) if self.bundles[p as usize].is_plan => Some(p),
            Some(_) => {
                self.issues.push(
                    at.place(&with("plan")),
                    format!("`{}` is a group; customers subscribe to plans", s.plan),
                );
                None
            }
            None => {
                let plans = self.bundles.iter().filter(|b| b.is_plan);
                let hint = super::names::did_you_mean(&s.plan, plans.map(|b| &*b.name));
                self.issues.unresolved(
                    at.place(&with("plan")),
                    &s.plan,
                    format!("unknown plan `{}`{hint}", s.plan),
                );
                None
            }
        };
        let dates = self.dates(Some(&s.starts), s.ends.as_deref(), at, &base, "ends");
        let grace = match &s.grace {
            Some(g) => match parse_duration(g) {
                Ok(us) => Some(us),
                Err(e) => {
                    self.issues.push(at.place(&with("grace")), e);
                    None
                }
            },
            None => Some(0),
        };
        let quantity = match s.quantity {
            None => Some(1),
            Some(q) if q >= 1 && q <= u64::from(u32::MAX) => Some(q as u32),
            Some(q) => {
                let message = if q == 0 {
                    "expected a quantity of at least 1, found 0".to_string()
                } else {
                    format!("quantity {q} is too large: at most {}", u32::MAX)
                };
                self.issues.push(at.place(&with("quantity")), message);
                None
            }
        };
        let scope = self.scope(s.scope.as_ref(), at, &base);
        let anchor = match &s.billing_anchor {
            Some(a) => self.time(a, at, &with("billing_anchor")).map(Some),
            None => Some(None),
        };
        let (plan, (starts, ends), grace, quantity, scope, anchor) =
            (plan?, dates?, grace?, quantity?, scope?, anchor?);
        Some(Subscription {
            plan,
            quantity,
            starts,
            ends,
            grace_ends: if ends == Timestamp::MAX {
                ends
            } else {
                ends.saturating_add(grace)
            },
            anchor: anchor.unwrap_or(starts),
            scope,
            trial: s.trial,
        })
    }

    fn feature(&mut self, name: &str, at: &CustAt, path: &[Seg]) -> Option<FeatureId> {
        match self.feature_index.get(name) {
            Some(&f) => Some(f),
            None => {
                let msg = unknown_feature(name, self.feature_index);
                self.issues.unresolved(at.place(path), name, msg);
                None
            }
        }
    }

    fn grant_value(
        &mut self,
        fid: FeatureId,
        g: &Grant,
        at: &CustAt,
        base: &[Seg],
    ) -> Option<GrantValue> {
        match compile_grant(&self.features[fid as usize], g) {
            Ok(v) => Some(v),
            Err((sub, msg)) => {
                let mut p = base.to_vec();
                if let Some(sub) = sub {
                    p.push(k(sub));
                }
                self.issues.push(at.place(&p), msg);
                None
            }
        }
    }

    fn customer_grant(
        &mut self,
        g: &raw::CustomerGrant,
        at: &CustAt,
        i: usize,
    ) -> Option<CustomerGrant> {
        let base = vec![k("grants"), Seg::Index(i)];
        let with = |f: &str| {
            let mut p = base.clone();
            p.push(k(f));
            p
        };
        let fid = self.feature(&g.feature, at, &with("feature"));
        let inline = GrantFields {
            limit: g.limit,
            per: g.per.clone(),
            reset: g.reset,
            warn_at: g.warn_at.clone(),
            notify_at: g.notify_at.clone(),
            overage: g.overage,
            burst: g.burst,
        };
        let has_inline = inline != GrantFields::default();
        let forms = [g.grant.is_some(), g.value.is_some(), has_inline]
            .iter()
            .filter(|&&b| b)
            .count();
        let raw_grant = match forms {
            0 => {
                self.issues.push(
                    at.place(&base),
                    "a customer grant needs `grant:`, `value:` or its fields (`limit`, `per`, ..)",
                );
                None
            }
            1 => Some(
                g.grant
                    .clone()
                    .or_else(|| g.value.clone())
                    .unwrap_or(Grant::Map(inline)),
            ),
            _ => {
                self.issues.push(at.place(&base), "write a customer grant one way: `grant:`, `value:` or inline fields, not several");
                None
            }
        };
        let value = match (fid, &raw_grant) {
            (Some(f), Some(rg)) => {
                let sub = if g.grant.is_some() {
                    with("grant")
                } else if g.value.is_some() {
                    with("value")
                } else {
                    base.clone()
                };
                self.grant_value(f, rg, at, &sub)
            }
            _ => None,
        };
        let dates = self.dates(g.starts.as_deref(), g.ends.as_deref(), at, &base, "ends");
        let scope = self.scope(g.scope.as_ref(), at, &base);
        let (feature, value, (starts, ends), scope) = (fid?, value?, dates?, scope?);
        Some(CustomerGrant {
            feature,
            value,
            starts,
            ends,
            priority: g.priority,
            scope,
        })
    }

    fn override_(&mut self, o: &raw::Override, at: &CustAt, i: usize) -> Option<Override> {
        let base = vec![k("overrides"), Seg::Index(i)];
        let with = |f: &str| {
            let mut p = base.clone();
            p.push(k(f));
            p
        };
        let fid = self.feature(&o.feature, at, &with("feature"));
        let mut missing = false;
        for (field, present) in [
            ("grant", o.grant.is_some()),
            ("expires", o.expires.is_some()),
            (
                "approved_by",
                o.approved_by
                    .as_deref()
                    .is_some_and(|s| !s.trim().is_empty()),
            ),
            (
                "reason",
                o.reason.as_deref().is_some_and(|s| !s.trim().is_empty()),
            ),
        ] {
            if !present {
                self.issues.push(at.place(&base), format!("an override needs `{field}` (overrides must say what, until when, who approved and why)"));
                missing = true;
            }
        }
        let value = match (fid, &o.grant) {
            (Some(f), Some(g)) => self.grant_value(f, g, at, &with("grant")),
            _ => None,
        };
        let dates = match &o.expires {
            Some(e) => self.dates(o.starts.as_deref(), Some(e), at, &base, "expires"),
            None => None,
        };
        if missing {
            return None;
        }
        let (feature, value, (starts, expires)) = (fid?, value?, dates?);
        Some(Override {
            feature,
            value,
            starts,
            expires,
            approved_by: o.approved_by.as_deref().unwrap_or_default().into(),
            reason: o.reason.as_deref().unwrap_or_default().into(),
            ticket: o.ticket.as_deref().map(Into::into),
        })
    }
}
