//! Decisions: what the engine answers, as data. A decision always says `allowed` and
//! why; it borrows names from the snapshot it was made on, so building one allocates
//! nothing on the granted path.

use serde::Serialize;

use crate::policy::{Kind, Limit, Override, ValueRepr};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Granted,
    NotEntitled,
    Expired,
    NotYetActive,
    OutOfScope,
    QuotaExhausted,
    RateLimited,
    SeatsExhausted,
    UnknownCustomer,
    UnknownFeature,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Granted,
        Reason::NotEntitled,
        Reason::Expired,
        Reason::NotYetActive,
        Reason::OutOfScope,
        Reason::QuotaExhausted,
        Reason::RateLimited,
        Reason::SeatsExhausted,
        Reason::UnknownCustomer,
        Reason::UnknownFeature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::NotEntitled => "not_entitled",
            Reason::Expired => "expired",
            Reason::NotYetActive => "not_yet_active",
            Reason::OutOfScope => "out_of_scope",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::RateLimited => "rate_limited",
            Reason::SeatsExhausted => "seats_exhausted",
            Reason::UnknownCustomer => "unknown_customer",
            Reason::UnknownFeature => "unknown_feature",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    Subscription,
    Grant,
    Override,
}

/// Where the winning grant came from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub kind: SourceType,
    pub plan: Option<&'a str>,
    /// The include chain: the plan first, then each included group down to the one
    /// that wrote the grant.
    pub via: Option<&'a [Box<str>]>,
    pub priority: Option<i32>,
    /// The override, with its approval fields.
    pub approval: Option<&'a Override>,
    /// With `combine: sum`, how many grants were added up.
    pub combined: Option<u32>,
}

impl Serialize for Source<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", &self.kind)?;
        if let Some(p) = self.plan {
            m.serialize_entry("plan", p)?;
        }
        if let Some(v) = self.via {
            m.serialize_entry("via", v)?;
        }
        if let Some(p) = self.priority {
            m.serialize_entry("priority", &p)?;
        }
        if let Some(o) = self.approval {
            m.serialize_entry("approved_by", &*o.approved_by)?;
            m.serialize_entry("reason", &*o.reason)?;
            if let Some(t) = &o.ticket {
                m.serialize_entry("ticket", &**t)?;
            }
        }
        if let Some(n) = self.combined {
            m.serialize_entry("combined", &n)?;
        }
        m.end()
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Finite(n) => s.serialize_u64(*n),
            Limit::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision<'a> {
    pub allowed: bool,
    pub reason: Reason,
    pub feature: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a ValueRepr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Timestamp>,
    /// Units counted beyond the limit by this consume (`overage: allow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overage: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
    /// Seconds until the request would pass (rate limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source<'a>>,
    pub expires_at: Option<Timestamp>,
    pub in_grace: bool,
    pub trial: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upgrade: Vec<&'a str>,
    pub snapshot: &'a str,
    /// This consume crossed `warn_at` (count it once as an upsell signal).
    #[serde(skip)]
    pub warning_crossed: bool,
}

impl<'a> Decision<'a> {
    /// A decision not made yet: denied until [`crate::engine::evaluate`] says otherwise.
    pub fn blank(feature: &'a str) -> Self {
        Self::new(false, Reason::NotEntitled, feature, "")
    }

    pub fn new(allowed: bool, reason: Reason, feature: &'a str, snapshot: &'a str) -> Self {
        Decision {
            allowed,
            reason,
            feature,
            kind: None,
            value: None,
            limit: None,
            used: None,
            remaining: None,
            resets_at: None,
            overage: None,
            warning: None,
            retry_after: None,
            source: None,
            expires_at: None,
            in_grace: false,
            trial: false,
            upgrade: Vec::new(),
            snapshot,
            warning_crossed: false,
        }
    }

    pub fn deny(&mut self, reason: Reason) {
        self.allowed = false;
        self.reason = reason;
    }
}
