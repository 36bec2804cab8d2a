//! The compiled policy: immutable, `Send + Sync`, built once per reload and shared by
//! every request through an `Arc`.
//!
//! Names are interned into dense ids; plans are flattened through `includes` once, so a
//! decision reads a plan's grant for a feature with one array index. A snapshot is a
//! [`Catalog`] (features, plans, groups, routes: what every customer's meaning depends
//! on) and a [`Customers`] table sharded by id hash (see [`super::customers`]), each
//! shared by reference: a change to some customers publishes a new snapshot that
//! rebuilds only the shards it touched.

use std::cmp::Ordering;
use std::path::PathBuf;
use std::sync::Arc;

pub use super::customers::{CustomerView, Customers};
pub use super::raw::{Combine, Kind, Limit, Overage, Prefer, Reset, ValueType};
use crate::time::Timestamp;

pub type FeatureId = u32;
pub type BundleId = u32;
pub type GrantId = u32;
pub type ScopeId = u32;

/// "No such entry" in the compact tables.
pub const NONE: u32 = u32::MAX;

#[derive(Debug)]
pub struct Feature {
    pub name: Box<str>,
    pub kind: Kind,
    pub combine: Combine,
    pub value_type: Option<ValueType>,
    pub prefer: Prefer,
    pub order: Option<Box<[Box<str>]>>,
    pub description: Option<Box<str>>,
    pub unit: Option<Box<str>>,
    /// For quotas: where usage notices are sent, unless a grant says otherwise.
    pub notify_at: NotifyAt,
}

/// The shares of a quota's limit whose crossing by a consume sends a usage-threshold
/// notice: up to [`NotifyAt::MAX`] of them, in basis points (1/100 of a percent),
/// ascending, without repeats. Inline and `Copy`, so a grant carries its own without an
/// allocation and the decision path copies it into the pending step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyAt {
    bp: [u16; NotifyAt::MAX],
    len: u8,
}

impl NotifyAt {
    /// At most this many thresholds per quota.
    pub const MAX: usize = 6;
    /// `[80%, 100%]`: what a quota notifies at unless its feature or grant says.
    pub const DEFAULT: NotifyAt = NotifyAt {
        bp: [8_000, 10_000, 0, 0, 0, 0],
        len: 2,
    };
    /// `notify_at: []`: no usage notices.
    pub const NONE: NotifyAt = NotifyAt {
        bp: [0; NotifyAt::MAX],
        len: 0,
    };

    /// Parses `[80%, 100%]` (percentages in `(0%, 100%]`, any order; repeats are one
    /// threshold). The error names the entry.
    pub fn parse(list: &[String]) -> Result<NotifyAt, String> {
        let mut bp = Vec::with_capacity(list.len());
        for s in list {
            let p = super::units::parse_percent(s)?;
            bp.push((p * 10_000.0).round() as u16);
        }
        bp.sort_unstable();
        bp.dedup();
        if bp.len() > NotifyAt::MAX {
            return Err(format!(
                "at most {} thresholds, found {}",
                NotifyAt::MAX,
                bp.len()
            ));
        }
        let mut out = NotifyAt::NONE;
        for (slot, v) in out.bp.iter_mut().zip(&bp) {
            *slot = *v;
        }
        out.len = bp.len() as u8;
        Ok(out)
    }

    /// The thresholds in basis points, lowest first.
    pub fn basis_points(&self) -> &[u16] {
        &self.bp[..usize::from(self.len).min(NotifyAt::MAX)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The usage at which threshold `bp` of `limit` is reached: exact integers, rounded
    /// up, as `warn_at` is (80% of 10 is 8).
    pub fn units(limit: u64, bp: u16) -> u64 {
        let units = (u128::from(limit) * u128::from(bp)).div_ceil(10_000);
        u64::try_from(units).unwrap_or(u64::MAX)
    }
}

/// How long a quota window lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
    Never,
    /// A fixed length in microseconds (`per: 14d`).
    Fixed(i64),
}

impl Period {
    pub fn name(self) -> String {
        match self {
            Period::Hour => "hour".into(),
            Period::Day => "day".into(),
            Period::Week => "week".into(),
            Period::Month => "month".into(),
            Period::Year => "year".into(),
            Period::Never => "never".into(),
            Period::Fixed(us) => super::units::format_duration(us),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuotaGrant {
    pub limit: Limit,
    pub period: Period,
    pub reset: Reset,
    /// Share of the limit at which `warning: soft_limit` starts, in basis points
    /// (1/100 of a percent): integers, so 7% of 100 is 7, not 8.
    pub warn_at: Option<u32>,
    /// Where usage-threshold notices are sent (the grant's own, else its feature's).
    pub notify_at: NotifyAt,
    pub overage: Overage,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateGrant {
    pub limit: u64,
    pub per_us: i64,
    pub burst: u64,
}

/// The longest span a rate limit may take: its `per`, and the time an empty limit
/// takes to refill (`burst × per ÷ limit`), are at most 100 years. The limiter keeps
/// its arrival time in nanoseconds since 1970 in 64 bits, which end in April 2262;
/// a span of 100 years keeps every limiter's time inside that range until 2160,
/// instead of saturating there and admitting every request.
pub const MAX_RATE_SPAN_US: i64 = 36_500 * crate::time::DAY;

/// A value as the policy wrote it, for decisions to echo back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum ValueRepr {
    Str(Box<str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub repr: ValueRepr,
    /// The ordering key used by `prefer` (microseconds for durations, the number,
    /// the position in `order` for strings, 0/1 for bools).
    pub key: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GrantValue {
    Flag(bool),
    Quota(QuotaGrant),
    Rate(RateGrant),
    Seats(Limit),
    Value(Value),
    /// `false` written for a non-flag feature: the bundle withdraws what it includes.
    Revoked,
}

impl GrantValue {
    /// Whether this grant gives anything at all.
    pub fn grants_something(&self) -> bool {
        !matches!(self, GrantValue::Flag(false) | GrantValue::Revoked)
    }

    /// The limit after a subscription's `quantity` (quota and seats only).
    pub fn scaled_limit(&self, quantity: u32) -> Option<Limit> {
        let scale = |l: Limit| match l {
            Limit::Finite(n) => Limit::Finite(n.saturating_mul(quantity as u64)),
            Limit::Unlimited => Limit::Unlimited,
        };
        match self {
            GrantValue::Quota(q) => Some(scale(q.limit)),
            GrantValue::Seats(l) => Some(scale(*l)),
            _ => None,
        }
    }

    /// Orders two grants of the same feature by generosity (`Greater`: `self` gives
    /// more), `quantity` applied. This is the last rule of precedence: with no override
    /// and no `priority` among the grants, the most generous wins.
    pub fn cmp_generosity(
        &self,
        qa: u32,
        other: &GrantValue,
        qb: u32,
        feature: &Feature,
    ) -> Ordering {
        use GrantValue::*;
        match (self, other) {
            (Revoked, Revoked) => Ordering::Equal,
            (Revoked, _) => Ordering::Less,
            (_, Revoked) => Ordering::Greater,
            (Flag(a), Flag(b)) => a.cmp(b),
            (Quota(_), Quota(_)) | (Seats(_), Seats(_)) => {
                cmp_limit(self.scaled_limit(qa), other.scaled_limit(qb))
            }
            (Rate(a), Rate(b)) => {
                // Compare rates per unit time (a/pa vs b/pb) without floats, then burst.
                let lhs = (a.limit as u128) * (b.per_us as u128);
                let rhs = (b.limit as u128) * (a.per_us as u128);
                lhs.cmp(&rhs).then(a.burst.cmp(&b.burst))
            }
            (Value(a), Value(b)) => {
                let o = a.key.partial_cmp(&b.key).unwrap_or(Ordering::Equal);
                match feature.prefer {
                    Prefer::Max => o,
                    Prefer::Min => o.reverse(),
                }
            }
            _ => Ordering::Equal,
        }
    }
}

fn cmp_limit(a: Option<Limit>, b: Option<Limit>) -> Ordering {
    match (a, b) {
        (Some(Limit::Unlimited), Some(Limit::Unlimited)) => Ordering::Equal,
        (Some(Limit::Unlimited), _) => Ordering::Greater,
        (_, Some(Limit::Unlimited)) => Ordering::Less,
        (Some(Limit::Finite(x)), Some(Limit::Finite(y))) => x.cmp(&y),
        _ => Ordering::Equal,
    }
}

/// A flattened grant of a bundle, with the include chain it came through.
#[derive(Debug)]
pub struct BundleGrant {
    pub value: GrantValue,
    /// The bundle itself first, then each include down to the one that wrote it.
    pub via: Box<[Box<str>]>,
}

/// A plan (subscribable) or a group (a building block).
#[derive(Debug)]
pub struct Bundle {
    pub name: Box<str>,
    pub is_plan: bool,
    /// Position among plans in catalog order: tier order.
    pub tier: u32,
    /// Flattened grants, indexed by feature id; `NONE` where the bundle grants nothing.
    pub grants: Box<[GrantId]>,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub plan: BundleId,
    pub quantity: u32,
    pub starts: Timestamp,
    /// Exclusive; `Timestamp::MAX` when open-ended.
    pub ends: Timestamp,
    /// `ends` plus the grace period.
    pub grace_ends: Timestamp,
    /// Where quota windows count from: `billing_anchor`, or `starts`.
    pub anchor: Timestamp,
    pub scope: ScopeId,
    pub trial: bool,
}

#[derive(Debug, Clone)]
pub struct CustomerGrant {
    pub feature: FeatureId,
    pub value: GrantValue,
    pub starts: Timestamp,
    pub ends: Timestamp,
    pub priority: Option<i32>,
    pub scope: ScopeId,
}

#[derive(Debug, Clone)]
pub struct Override {
    pub feature: FeatureId,
    pub value: GrantValue,
    pub starts: Timestamp,
    pub expires: Timestamp,
    pub approved_by: Box<str>,
    pub reason: Box<str>,
    pub ticket: Option<Box<str>>,
}

/// One scope key and the values it accepts.
pub type ScopeKey = (Box<str>, Box<[Box<str>]>);

/// Scope: every key must match one of its values in the request's context.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub keys: Box<[ScopeKey]>,
}

impl Scope {
    pub fn matches(&self, context: &[(&str, &str)]) -> bool {
        self.keys.iter().all(|(k, values)| {
            context
                .iter()
                .any(|(ck, cv)| *ck == &**k && values.iter().any(|v| &**v == *cv))
        })
    }
}

/// Where a route takes the customer id from.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomerFrom {
    Header(Box<str>),
    /// A claim of a base64url JSON payload forwarded by the gateway, which has
    /// verified the token's signature.
    JwtClaim {
        header: Box<str>,
        claim: Box<str>,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path_prefix: Option<Box<str>>,
    pub path: Option<Box<str>>,
    /// Upper-case; empty means any method.
    pub methods: Box<[Box<str>]>,
    /// Lower-case header names with the exact value required.
    pub headers: Box<[(Box<str>, Box<str>)]>,
    pub customer: CustomerFrom,
    pub require: Box<[FeatureId]>,
    pub consume: Option<(FeatureId, u64)>,
    pub rate: Option<FeatureId>,
}

impl Route {
    pub fn matches<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> bool {
        if let Some(p) = &self.path
            && path != &**p
        {
            return false;
        }
        if let Some(p) = &self.path_prefix
            && !path.starts_with(&**p)
        {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        self.headers.iter().all(|(k, v)| header(k) == Some(&**v))
    }
}

/// A policy file that went into the snapshot, for `/v1/status` and the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub hash: String,
}

/// What the policy files define for everyone: features, plans and groups, routes.
/// Compiled as a whole; every customer's meaning depends on it.
#[derive(Debug)]
pub struct Catalog {
    pub features: Vec<Feature>,
    pub(crate) feature_index:
        std::collections::HashMap<Box<str>, FeatureId, foldhash::fast::FixedState>,
    pub bundles: Vec<Bundle>,
    pub(crate) bundle_index:
        std::collections::HashMap<Box<str>, BundleId, foldhash::fast::FixedState>,
    pub grants: Vec<BundleGrant>,
    pub routes: Vec<Route>,
    /// Per feature: the plans granting it, in tier order.
    pub upgrades: Vec<Box<[(BundleId, GrantId)]>>,
}

impl Catalog {
    #[inline]
    pub fn feature_id(&self, name: &str) -> Option<FeatureId> {
        self.feature_index.get(name).copied()
    }

    pub fn feature(&self, id: FeatureId) -> &Feature {
        &self.features[id as usize]
    }

    pub fn bundle_id(&self, name: &str) -> Option<BundleId> {
        self.bundle_index.get(name).copied()
    }

    pub fn bundle(&self, id: BundleId) -> &Bundle {
        &self.bundles[id as usize]
    }

    pub fn plans(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.iter().filter(|b| b.is_plan)
    }

    #[inline]
    pub fn bundle_grant(&self, bundle: BundleId, feature: FeatureId) -> Option<&BundleGrant> {
        let g = *self
            .bundles
            .get(bundle as usize)?
            .grants
            .get(feature as usize)?;
        self.grants.get(g as usize)
    }
}

/// The compiled policy a request reads: the catalog and the customer table, each
/// shared by reference, so a snapshot that changes customers only (an incremental
/// reload, a customer written through the API) shares the catalog and every customer
/// shard it did not touch.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Content hash of every file (path and bytes): the same files give the same
    /// version on every replica.
    pub version: Box<str>,
    pub catalog: Arc<Catalog>,
    pub customers: Customers,
    pub files: Arc<[SourceInfo]>,
    /// The last customer write (through the API) applied on top of the files; 0 when
    /// none has been. A request's `min_revision` is compared with it.
    pub revision: u64,
}

impl Snapshot {
    #[inline]
    pub fn feature_id(&self, name: &str) -> Option<FeatureId> {
        self.catalog.feature_id(name)
    }

    pub fn feature(&self, id: FeatureId) -> &Feature {
        self.catalog.feature(id)
    }

    pub fn bundle_id(&self, name: &str) -> Option<BundleId> {
        self.catalog.bundle_id(name)
    }

    pub fn bundle(&self, id: BundleId) -> &Bundle {
        self.catalog.bundle(id)
    }

    pub fn plans(&self) -> impl Iterator<Item = &Bundle> {
        self.catalog.plans()
    }

    #[inline]
    pub fn bundle_grant(&self, bundle: BundleId, feature: FeatureId) -> Option<&BundleGrant> {
        self.catalog.bundle_grant(bundle, feature)
    }

    pub fn overrides_active(&self, now: Timestamp) -> usize {
        self.customers
            .overrides()
            .filter(|o| o.starts <= now && now < o.expires)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn snapshot_is_send_and_sync() {
        assert_send_sync::<Snapshot>();
    }
}
