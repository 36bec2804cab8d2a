//! Raw documents → compiled [`Snapshot`], with every semantic check.
//!
//! The compiler reports problems as [`Issue`]s: a file, a path into it and a message.
//! It never stops at the first one; `policy::load` turns the paths into line:col once,
//! at the end, for the files that have problems.

use std::collections::HashMap;

use compact_str::CompactString;

use super::raw::{self, Grant, GrantFields};
use super::snapshot::*;
use super::source::{Content, Origin, Seg};
use super::units::{parse_duration, parse_percent};
use crate::time::Timestamp;

/// A compile problem, located by path.
#[derive(Debug, Clone)]
pub struct Issue {
    pub at: Place,
    pub message: String,
    /// For "defined twice": where the first definition is.
    pub first: Option<Place>,
    /// A reference to a name that is not defined. When a file failed to parse, such
    /// issues are left out: the definition is probably in the broken file.
    pub unresolved: bool,
}

/// A place in a file: the file's index, the NDJSON record's line (if any), a path
/// inside the document or record, and whether the key (not the value) is meant.
#[derive(Debug, Clone)]
pub struct Place {
    pub file: usize,
    pub line: Option<u64>,
    pub path: Vec<Seg>,
    pub key: bool,
}

/// A parsed file handed to the compiler.
#[derive(Debug)]
pub struct Unit {
    pub content: Content,
}

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

#[derive(Debug, Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn push(&mut self, at: Place, message: impl Into<String>) {
        self.0.push(Issue {
            at,
            message: message.into(),
            first: None,
            unresolved: false,
        });
    }

    fn unresolved(&mut self, at: Place, message: impl Into<String>) {
        self.0.push(Issue {
            at,
            message: message.into(),
            first: None,
            unresolved: true,
        });
    }
}

fn place(file: usize, path: Vec<Seg>) -> Place {
    Place {
        file,
        line: None,
        path,
        key: false,
    }
}

fn key_place(file: usize, path: Vec<Seg>) -> Place {
    Place {
        file,
        line: None,
        path,
        key: true,
    }
}

fn seg_path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|s| Seg::Key((*s).to_string())).collect()
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

fn k(s: &str) -> Seg {
    Seg::Key(s.to_string())
}

/// Compiles parsed files into a snapshot. `version` is the content hash.
pub fn compile(
    units: &[Unit],
    version: Box<str>,
    files: Vec<SourceInfo>,
) -> Result<Snapshot, Vec<Issue>> {
    let mut issues = Issues::default();
    let docs: Vec<(usize, &raw::Document)> = units
        .iter()
        .enumerate()
        .filter_map(|(i, u)| match &u.content {
            Content::Document(d) => Some((i, d)),
            Content::Customers(_) => None,
        })
        .collect();

    // Features.
    let mut features = Vec::new();
    let mut feature_index: Map<Box<str>, FeatureId> = Map::default();
    let mut feature_at: Vec<Place> = Vec::new();
    for &(file, doc) in &docs {
        for (name, f) in doc.features.iter() {
            let at = key_place(file, seg_path(&["features", name]));
            if let Some(&id) = feature_index.get(name) {
                issues.0.push(Issue {
                    at,
                    message: format!("feature `{name}` is defined twice"),
                    unresolved: false,
                    first: Some(feature_at[id as usize].clone()),
                });
                continue;
            }
            if let Some(feature) = compile_feature(name, f, file, &mut issues) {
                feature_index.insert(name.into(), features.len() as FeatureId);
                features.push(feature);
                feature_at.push(at);
            }
        }
    }

    // Plans and groups share one namespace: `includes` may name either.
    struct RawBundle<'a> {
        name: &'a str,
        is_plan: bool,
        raw: &'a raw::Bundle,
        file: usize,
        section: &'static str,
    }
    let mut raw_bundles: Vec<RawBundle> = Vec::new();
    let mut bundle_index: Map<Box<str>, BundleId> = Map::default();
    for (section, is_plan) in [("plans", true), ("groups", false)] {
        for &(file, doc) in &docs {
            let list = if is_plan { &doc.plans } else { &doc.groups };
            for (name, b) in list.iter() {
                if let Some(&id) = bundle_index.get(name) {
                    let first = &raw_bundles[id as usize];
                    issues.0.push(Issue {
                        at: key_place(file, seg_path(&[section, name])),
                        message: format!(
                            "`{name}` is defined twice (plans and groups share one namespace)"
                        ),
                        unresolved: false,
                        first: Some(key_place(
                            first.file,
                            seg_path(&[first.section, first.name]),
                        )),
                    });
                    continue;
                }
                bundle_index.insert(name.into(), raw_bundles.len() as BundleId);
                raw_bundles.push(RawBundle {
                    name,
                    is_plan,
                    raw: b,
                    file,
                    section,
                });
            }
        }
    }

    // Each bundle's own grants, compiled against the features' kinds.
    let nf = features.len();
    let mut own: Vec<Vec<(FeatureId, GrantValue)>> = Vec::with_capacity(raw_bundles.len());
    for b in &raw_bundles {
        let mut grants = Vec::new();
        for (fname, g) in b.raw.grants.iter() {
            let path = || seg_path(&[b.section, b.name, "grants", fname]);
            let Some(&fid) = feature_index.get(fname) else {
                issues.unresolved(
                    key_place(b.file, path()),
                    unknown_feature(fname, &feature_index),
                );
                continue;
            };
            match compile_grant(&features[fid as usize], g) {
                Ok(v) => grants.push((fid, v)),
                Err((sub, msg)) => {
                    let mut p = path();
                    if let Some(sub) = sub {
                        p.push(k(sub));
                    }
                    issues.push(place(b.file, p), msg)
                }
            }
        }
        own.push(grants);
    }

    // Flatten includes once, depth first, reporting cycles and unknown names.
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Visiting,
        Done,
    }
    type Flat = Vec<Option<(GrantValue, Vec<BundleId>)>>;
    struct Flattener<'a, 'b> {
        raw: &'a [RawBundle<'b>],
        own: &'a [Vec<(FeatureId, GrantValue)>],
        index: &'a Map<Box<str>, BundleId>,
        features: &'a [Feature],
        state: Vec<State>,
        flat: Vec<Flat>,
        stack: Vec<BundleId>,
        issues: &'a mut Issues,
    }
    impl Flattener<'_, '_> {
        fn visit(&mut self, id: BundleId) {
            match self.state[id as usize] {
                State::Done => return,
                State::Visiting => return,
                State::New => {}
            }
            self.state[id as usize] = State::Visiting;
            self.stack.push(id);
            let b = &self.raw[id as usize];
            let mut flat: Flat = vec![None; self.features.len()];
            for (i, inc) in b.raw.includes.iter().enumerate() {
                let at = || {
                    place(
                        b.file,
                        vec![k(b.section), k(b.name), k("includes"), Seg::Index(i)],
                    )
                };
                let Some(&child) = self.index.get(inc.as_str()) else {
                    self.issues
                        .unresolved(at(), format!("unknown plan or group `{inc}` in `includes`"));
                    continue;
                };
                if self.state[child as usize] == State::Visiting {
                    let start = self.stack.iter().position(|&s| s == child).unwrap_or(0);
                    let mut cycle: Vec<&str> = self.stack[start..]
                        .iter()
                        .map(|&s| self.raw[s as usize].name)
                        .collect();
                    cycle.push(self.raw[child as usize].name);
                    self.issues
                        .push(at(), format!("include cycle: {}", cycle.join(" -> ")));
                    continue;
                }
                self.visit(child);
                for (f, g) in self.flat[child as usize].iter().enumerate() {
                    let Some((gv, via)) = g else { continue };
                    let feature = &self.features[f];
                    let better = match &flat[f] {
                        None => true,
                        Some((cur, _)) => gv.cmp_generosity(1, cur, 1, feature).is_gt(),
                    };
                    if better {
                        let mut v = Vec::with_capacity(via.len() + 1);
                        v.push(id);
                        v.extend_from_slice(via);
                        flat[f] = Some((gv.clone(), v));
                    }
                }
            }
            for (f, g) in &self.own[id as usize] {
                flat[*f as usize] = Some((g.clone(), vec![id]));
            }
            self.flat[id as usize] = flat;
            self.stack.pop();
            self.state[id as usize] = State::Done;
        }
    }
    let mut fl = Flattener {
        raw: &raw_bundles,
        own: &own,
        index: &bundle_index,
        features: &features,
        state: vec![State::New; raw_bundles.len()],
        flat: vec![Vec::new(); raw_bundles.len()],
        stack: Vec::new(),
        issues: &mut issues,
    };
    for id in 0..raw_bundles.len() as BundleId {
        fl.visit(id);
    }
    let flat = fl.flat;

    let mut grants: Vec<BundleGrant> = Vec::new();
    let mut bundles: Vec<Bundle> = Vec::with_capacity(raw_bundles.len());
    let mut tier = 0;
    for (id, b) in raw_bundles.iter().enumerate() {
        let mut table = vec![NONE; nf].into_boxed_slice();
        for (f, g) in flat[id].iter().enumerate() {
            if let Some((value, via)) = g {
                table[f] = grants.len() as GrantId;
                grants.push(BundleGrant {
                    value: value.clone(),
                    via: via
                        .iter()
                        .map(|&v| Box::from(raw_bundles[v as usize].name))
                        .collect(),
                });
            }
        }
        bundles.push(Bundle {
            name: b.name.into(),
            is_plan: b.is_plan,
            tier,
            grants: table,
        });
        if b.is_plan {
            tier += 1;
        }
    }

    let upgrades = (0..nf)
        .map(|f| {
            bundles
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_plan)
                .filter_map(|(id, b)| {
                    let g = b.grants[f];
                    (g != NONE && grants[g as usize].value.grants_something())
                        .then_some((id as BundleId, g))
                })
                .collect()
        })
        .collect();

    let mut cc = CustomerCompiler {
        features: &features,
        feature_index: &feature_index,
        bundles: &bundles,
        bundle_index: &bundle_index,
        out: Customers::default(),
        scopes: Vec::new(),
        origins: Vec::new(),
        issues: &mut issues,
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

    let mut routes = Vec::new();
    for &(file, doc) in &docs {
        for (i, r) in doc.routes.iter().enumerate() {
            if let Some(route) = compile_route(r, file, i, &features, &feature_index, &mut issues) {
                routes.push(route);
            }
        }
    }

    if !issues.0.is_empty() {
        return Err(issues.0);
    }
    Ok(Snapshot {
        version,
        features,
        feature_index,
        bundles,
        bundle_index,
        grants,
        customers,
        scopes,
        routes,
        upgrades,
        files,
    })
}

fn unknown_feature(name: &str, index: &Map<Box<str>, FeatureId>) -> String {
    let mut msg = format!("unknown feature `{name}`");
    if let Some(close) = index.keys().find(|k| strsim_close(k, name)) {
        msg.push_str(&format!(" (did you mean `{close}`?)"));
    }
    msg
}

/// A cheap "did you mean": same length ±1 and at most one differing character.
fn strsim_close(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 1 || a == b {
        return false;
    }
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    prefix + suffix + 1 >= a.len().max(b.len())
}

fn compile_feature(
    name: &str,
    f: &raw::Feature,
    file: usize,
    issues: &mut Issues,
) -> Option<Feature> {
    let at = |field: &str| place(file, seg_path(&["features", name, field]));
    let mut ok = true;
    if name.is_empty() {
        issues.push(
            key_place(file, seg_path(&["features", name])),
            "a feature name may not be empty",
        );
        ok = false;
    }
    if f.combine.is_some() && !matches!(f.kind, Kind::Quota | Kind::Seats) {
        issues.push(
            at("combine"),
            format!(
                "`combine` applies to quota and seats features, not to a {} feature",
                f.kind.as_str()
            ),
        );
        ok = false;
    }
    if f.kind == Kind::Value {
        match f.value_type {
            None => {
                issues.push(
                    key_place(file, seg_path(&["features", name])),
                    "a value feature needs `type: duration|number|string|bool`",
                );
                ok = false;
            }
            Some(ValueType::Duration | ValueType::Number) => {}
            Some(ValueType::String) => {
                if f.prefer.is_some() {
                    issues.push(at("prefer"), "`prefer` orders durations and numbers; order strings with `order: [least, .., most generous]`");
                    ok = false;
                }
            }
            Some(ValueType::Bool) => {}
        }
    } else {
        for (field, set) in [
            ("type", f.value_type.is_some()),
            ("prefer", f.prefer.is_some()),
            ("order", f.order.is_some()),
        ] {
            if set {
                issues.push(
                    at(field),
                    format!(
                        "`{field}` applies to value features, not to a {} feature",
                        f.kind.as_str()
                    ),
                );
                ok = false;
            }
        }
    }
    if f.order.is_some() && f.value_type != Some(ValueType::String) && f.kind == Kind::Value {
        issues.push(at("order"), "`order` applies to string values");
        ok = false;
    }
    ok.then(|| Feature {
        name: name.into(),
        kind: f.kind,
        combine: f.combine.unwrap_or(Combine::Max),
        value_type: f.value_type,
        prefer: f.prefer.unwrap_or(Prefer::Max),
        order: f
            .order
            .as_ref()
            .map(|o| o.iter().map(|s| s.as_str().into()).collect()),
        description: f.description.as_deref().map(Into::into),
        unit: f.unit.as_deref().map(Into::into),
    })
}

type GrantError = (Option<&'static str>, String);

/// Checks a grant against its feature's kind and compiles it.
pub fn compile_grant(feature: &Feature, g: &Grant) -> Result<GrantValue, GrantError> {
    let name = &feature.name;
    let kind = feature.kind.as_str();
    let bool_value = feature.kind == Kind::Value && feature.value_type == Some(ValueType::Bool);
    if matches!(g, Grant::Bool(false)) && feature.kind != Kind::Flag && !bool_value {
        return Ok(GrantValue::Revoked);
    }
    match feature.kind {
        Kind::Flag => match g {
            Grant::Bool(b) => Ok(GrantValue::Flag(*b)),
            _ => Err((
                None,
                format!("`{name}` is a flag: expected `true` or `false`"),
            )),
        },
        Kind::Quota => match g {
            Grant::Str(s) if s == "unlimited" => Ok(GrantValue::Quota(QuotaGrant {
                limit: Limit::Unlimited,
                period: Period::Never,
                reset: Reset::Anniversary,
                warn_at: None,
                overage: Overage::Deny,
            })),
            Grant::Map(m) => quota(name, m),
            Grant::Int(_) | Grant::Float(_) => Err((
                None,
                format!(
                    "`{name}` is a quota: a bare number has no period; write `{{limit: N, per: month}}` or `unlimited`"
                ),
            )),
            _ => Err((
                None,
                format!("`{name}` is a quota: expected `{{limit: N, per: month}}` or `unlimited`"),
            )),
        },
        Kind::Rate => match g {
            Grant::Map(m) => rate(name, m),
            _ => Err((
                None,
                format!("`{name}` is a rate limit: expected `{{limit: N, per: 1s, burst: N}}`"),
            )),
        },
        Kind::Seats => match g {
            Grant::Str(s) if s == "unlimited" => Ok(GrantValue::Seats(Limit::Unlimited)),
            Grant::Map(m) => {
                only(m, kind, &["limit"])?;
                m.limit.map(GrantValue::Seats).ok_or((
                    None,
                    format!("`{name}` is seats: expected `{{limit: N}}` or `{{limit: unlimited}}`"),
                ))
            }
            _ => Err((
                None,
                format!("`{name}` is seats: expected `{{limit: N}}` or `{{limit: unlimited}}`"),
            )),
        },
        Kind::Value => value(feature, g).map(GrantValue::Value),
    }
}

/// Refuses fields of a grant mapping that the kind does not use.
fn only(m: &GrantFields, kind: &str, allowed: &[&str]) -> Result<(), GrantError> {
    let present: [(&'static str, bool); 6] = [
        ("limit", m.limit.is_some()),
        ("per", m.per.is_some()),
        ("reset", m.reset.is_some()),
        ("warn_at", m.warn_at.is_some()),
        ("overage", m.overage.is_some()),
        ("burst", m.burst.is_some()),
    ];
    for (field, set) in present {
        if set && !allowed.contains(&field) {
            return Err((
                Some(field),
                format!("`{field}` does not apply to a {kind} grant"),
            ));
        }
    }
    Ok(())
}

fn quota(name: &str, m: &GrantFields) -> Result<GrantValue, GrantError> {
    only(m, "quota", &["limit", "per", "reset", "warn_at", "overage"])?;
    let limit = m
        .limit
        .ok_or((None, format!("`{name}` is a quota: `limit` is required")))?;
    let period = match (&m.per, limit) {
        (Some(p), _) => parse_period(p).map_err(|e| (Some("per"), e))?,
        (None, Limit::Unlimited) => Period::Never,
        (None, Limit::Finite(_)) => {
            return Err((
                None,
                format!(
                    "`{name}` is a quota: `per` is required (hour, day, week, month, year, never or a duration like `14d`)"
                ),
            ));
        }
    };
    let warn_at = match &m.warn_at {
        Some(w) => {
            Some((parse_percent(w).map_err(|e| (Some("warn_at"), e))? * 10_000.0).round() as u32)
        }
        None => None,
    };
    Ok(GrantValue::Quota(QuotaGrant {
        limit,
        period,
        reset: m.reset.unwrap_or(Reset::Anniversary),
        warn_at,
        overage: m.overage.unwrap_or(Overage::Deny),
    }))
}

fn rate(name: &str, m: &GrantFields) -> Result<GrantValue, GrantError> {
    only(m, "rate", &["limit", "per", "burst"])?;
    let limit = match m.limit {
        Some(Limit::Finite(n)) if n > 0 => n,
        Some(Limit::Finite(_)) => {
            return Err((Some("limit"), "a rate limit must be at least 1".into()));
        }
        Some(Limit::Unlimited) => {
            return Err((
                Some("limit"),
                "a rate limit needs a number; grant no rate limit to leave it unlimited".into(),
            ));
        }
        None => {
            return Err((
                None,
                format!("`{name}` is a rate limit: `limit` is required"),
            ));
        }
    };
    let per = m.per.as_deref().ok_or((
        None,
        format!("`{name}` is a rate limit: `per` is required (a duration like `1s`)"),
    ))?;
    let per_us = parse_duration(per).map_err(|e| (Some("per"), e))?;
    let burst = m.burst.unwrap_or(limit);
    if burst == 0 {
        return Err((Some("burst"), "`burst` must be at least 1".into()));
    }
    Ok(GrantValue::Rate(RateGrant {
        limit,
        per_us,
        burst,
    }))
}

fn parse_period(p: &str) -> Result<Period, String> {
    Ok(match p {
        "hour" => Period::Hour,
        "day" => Period::Day,
        "week" => Period::Week,
        "month" => Period::Month,
        "year" => Period::Year,
        "never" => Period::Never,
        other => Period::Fixed(parse_duration(other).map_err(|_| {
            format!("expected a period: hour, day, week, month, year, never or a duration like `14d`, found `{other}`")
        })?),
    })
}

fn value(feature: &Feature, g: &Grant) -> Result<Value, GrantError> {
    let name = &feature.name;
    let ty = feature.value_type.unwrap_or(ValueType::String);
    match (ty, g) {
        (ValueType::Duration, Grant::Str(s)) => {
            let us = parse_duration(s).map_err(|e| (None, e))?;
            Ok(Value {
                repr: ValueRepr::Str(s.as_str().into()),
                key: us as f64,
            })
        }
        (ValueType::Number, Grant::Int(n)) => Ok(Value {
            repr: ValueRepr::Int(*n),
            key: *n as f64,
        }),
        (ValueType::Number, Grant::Float(x)) if x.is_finite() => Ok(Value {
            repr: ValueRepr::Float(*x),
            key: *x,
        }),
        (ValueType::Bool, Grant::Bool(b)) => Ok(Value {
            repr: ValueRepr::Bool(*b),
            key: f64::from(u8::from(*b)),
        }),
        (ValueType::String, Grant::Str(s)) => {
            let key = match &feature.order {
                Some(order) => order.iter().position(|o| **o == **s).ok_or_else(|| {
                    (
                        None,
                        format!(
                            "`{s}` is not one of `{name}`'s values: {}",
                            order.join(", ")
                        ),
                    )
                })? as f64,
                None => 0.0,
            };
            Ok(Value {
                repr: ValueRepr::Str(s.as_str().into()),
                key,
            })
        }
        _ => {
            let expected = match ty {
                ValueType::Duration => "a duration like `2h`",
                ValueType::Number => "a number",
                ValueType::String => "a string",
                ValueType::Bool => "`true` or `false`",
            };
            Err((
                None,
                format!(
                    "`{name}` is a value of type {}: expected {expected}",
                    type_name(ty)
                ),
            ))
        }
    }
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Duration => "duration",
        ValueType::Number => "number",
        ValueType::String => "string",
        ValueType::Bool => "bool",
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
            Some(q) if q >= 1 && q <= u32::MAX as u64 => Some(q as u32),
            Some(q) => {
                self.issues.push(
                    at.place(&with("quantity")),
                    format!("expected a quantity of at least 1, found {q}"),
                );
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

fn compile_route(
    r: &raw::Route,
    file: usize,
    i: usize,
    features: &[Feature],
    index: &Map<Box<str>, FeatureId>,
    issues: &mut Issues,
) -> Option<Route> {
    let at = |rest: &[&str]| {
        let mut p = vec![k("routes"), Seg::Index(i)];
        p.extend(rest.iter().map(|s| k(s)));
        place(file, p)
    };
    let before = issues.0.len();
    let customer = match (&r.customer.header, &r.customer.jwt_claim) {
        (Some(h), None) => Some(CustomerFrom::Header(h.to_ascii_lowercase().into())),
        (Some(h), Some(c)) => Some(CustomerFrom::JwtClaim {
            header: h.to_ascii_lowercase().into(),
            claim: c.as_str().into(),
        }),
        (None, Some(_)) => {
            issues.push(at(&["customer"]), "`jwt_claim` needs `header`: the header carrying the verified JWT payload (e.g. `x-jwt-payload`)");
            None
        }
        (None, None) => {
            issues.push(
                at(&["customer"]),
                "expected `header` or `jwt_claim` + `header`",
            );
            None
        }
    };
    let mut feature = |name: &str, path: Vec<Seg>, kinds: &[Kind]| -> Option<FeatureId> {
        let Some(&f) = index.get(name) else {
            issues.unresolved(place(file, path), unknown_feature(name, index));
            return None;
        };
        let kind = features[f as usize].kind;
        if !kinds.is_empty() && !kinds.contains(&kind) {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            issues.push(
                place(file, path),
                format!(
                    "`{name}` is a {} feature; expected {}",
                    kind.as_str(),
                    names.join(" or ")
                ),
            );
            return None;
        }
        Some(f)
    };
    let base = |rest: &[Seg]| {
        let mut p = vec![k("routes"), Seg::Index(i)];
        p.extend_from_slice(rest);
        p
    };
    let require: Vec<FeatureId> = r
        .require
        .iter()
        .enumerate()
        .filter_map(|(j, n)| feature(n, base(&[k("require"), Seg::Index(j)]), &[]))
        .collect();
    let consume = r.consume.as_ref().and_then(|c| {
        let f = feature(
            &c.feature,
            base(&[k("consume"), k("feature")]),
            &[Kind::Quota, Kind::Rate],
        )?;
        Some((f, c.amount.unwrap_or(1)))
    });
    let rate = r
        .rate
        .as_ref()
        .and_then(|n| feature(n, base(&[k("rate")]), &[Kind::Rate]));
    if let Some(c) = &r.consume
        && c.amount == Some(0)
    {
        issues.push(at(&["consume", "amount"]), "`amount` must be at least 1");
    }
    if issues.0.len() > before {
        return None;
    }
    Some(Route {
        path_prefix: r.matcher.path_prefix.as_deref().map(Into::into),
        path: r.matcher.path.as_deref().map(Into::into),
        methods: r
            .matcher
            .methods
            .iter()
            .map(|m| m.to_ascii_uppercase().into())
            .collect(),
        headers: r
            .matcher
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase().into(), v.as_str().into()))
            .collect(),
        customer: customer?,
        require: require.into_boxed_slice(),
        consume,
        rate,
    })
}
