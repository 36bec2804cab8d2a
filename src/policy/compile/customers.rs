//! Customers: ids defined once, subscriptions to known plans, customer grants and
//! overrides with their dates and scopes, into the flat customer tables.
//!
//! A customer record's problems are placed on demand from where the record sits (a
//! document's `customers` list or an NDJSON line), so a clean load builds no paths.

use compact_str::CompactString;

use super::features::unknown_feature;
use super::grants::compile_grant;
use super::{Issue, Issues, Map, Place, Unit, k};
use crate::policy::raw::{self, Grant, GrantFields};
use crate::policy::snapshot::*;
use crate::policy::source::{Content, Origin, Seg};
use crate::policy::units::parse_duration;
use crate::time::Timestamp;

/// Compiles every file's customers, in file order, into the customer tables and the
/// scopes they use (each distinct scope stored once).
pub(super) fn compile_customers(
    units: &[Unit],
    features: &[Feature],
    feature_index: &Map<Box<str>, FeatureId>,
    bundles: &[Bundle],
    bundle_index: &Map<Box<str>, BundleId>,
    issues: &mut Issues,
) -> (Customers, Vec<Scope>) {
    let mut cc = CustomerCompiler {
        features,
        feature_index,
        bundles,
        bundle_index,
        out: Customers::default(),
        scopes: Vec::new(),
        origins: Vec::new(),
        issues,
    };
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
                            origin: Origin::Document { index },
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
    let CustomerCompiler {
        out: customers,
        scopes,
        ..
    } = cc;
    (customers, scopes)
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
    out: Customers,
    scopes: Vec<Scope>,
    origins: Vec<CustAt>,
    issues: &'a mut Issues,
}

impl CustomerCompiler<'_> {
    fn reserve(&mut self, n: usize) {
        self.out.records.reserve_exact(n);
        self.out.subs.reserve(n * 2);
        self.out.index.reserve(n, |_| 0);
        self.origins.reserve_exact(n);
    }

    fn customer(&mut self, c: &raw::Customer, at: CustAt) {
        if c.id.is_empty() {
            self.issues
                .push(at.place(&[k("id")]), "a customer id may not be empty");
            return;
        }
        let h = self.out.hash(&c.id);
        let records = &self.out.records;
        if let Some(&first) = self
            .out
            .index
            .find(h, |&i| records[i as usize].id == c.id.as_str())
        {
            self.issues.0.push(Issue {
                at: at.place(&[k("id")]),
                message: format!("customer `{}` is defined twice", c.id),
                unresolved: false,
                first: Some(self.origins[first as usize].place(&[k("id")])),
            });
            return;
        }
        let subs_start = self.out.subs.len() as u32;
        for (i, s) in c.subscriptions.iter().enumerate() {
            if let Some(sub) = self.subscription(s, &at, i) {
                self.out.subs.push(sub);
            }
        }
        let subs = (subs_start, self.out.subs.len() as u32 - subs_start);

        let extras = if c.grants.is_empty() && c.overrides.is_empty() {
            NONE
        } else {
            let gs = self.out.grants.len() as u32;
            for (i, g) in c.grants.iter().enumerate() {
                if let Some(g) = self.customer_grant(g, &at, i) {
                    self.out.grants.push(g);
                }
            }
            let os = self.out.overrides.len() as u32;
            for (i, o) in c.overrides.iter().enumerate() {
                if let Some(o) = self.override_(o, &at, i) {
                    self.out.overrides.push(o);
                }
            }
            let x = Extras {
                grants: (gs, self.out.grants.len() as u32 - gs),
                overrides: (os, self.out.overrides.len() as u32 - os),
            };
            self.out.extras.push(x);
            self.out.extras.len() as u32 - 1
        };

        let name = match &c.name {
            Some(n) if !n.is_empty() => {
                let off = self.out.names.len() as u32;
                self.out.names.push_str(n);
                (off, n.len() as u32)
            }
            _ => (0, 0),
        };
        let idx = self.out.records.len() as u32;
        self.out.records.push(CustomerRec {
            id: CompactString::from(c.id.as_str()),
            name,
            subs,
            extras,
        });
        self.origins.push(at);
        let (records, hasher) = (&self.out.records, &self.out.hasher);
        self.out.index.insert_unique(h, idx, |&i| {
            use std::hash::BuildHasher;
            hasher.hash_one(records[i as usize].id.as_str())
        });
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
        if let Some(i) = self.scopes.iter().position(|x| *x == s) {
            return Some(i as ScopeId);
        }
        self.scopes.push(s);
        Some(self.scopes.len() as ScopeId - 1)
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
                self.issues.unresolved(
                    at.place(&with("plan")),
                    format!("unknown plan `{}`", s.plan),
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
        let (plan, (starts, ends), grace, quantity, scope) =
            (plan?, dates?, grace?, quantity?, scope?);
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
            scope,
            trial: s.trial,
        })
    }

    fn feature(&mut self, name: &str, at: &CustAt, path: &[Seg]) -> Option<FeatureId> {
        match self.feature_index.get(name) {
            Some(&f) => Some(f),
            None => {
                let msg = unknown_feature(name, self.feature_index);
                self.issues.unresolved(at.place(path), msg);
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
