//! The raw policy model: exactly what a file says, as serde reads it.
//!
//! Every struct denies unknown fields (a typo must not silently grant or deny). Values
//! whose meaning depends on something defined elsewhere (a grant's form depends on the
//! feature's kind; times and durations have their own syntax) stay loosely typed here
//! and are checked by the compiler, which knows where each one sits in its file.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

/// One policy file (YAML or JSON): any of the five top-level sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub features: Ordered<Feature>,
    #[serde(default)]
    pub plans: Ordered<Bundle>,
    #[serde(default)]
    pub groups: Ordered<Bundle>,
    #[serde(default)]
    pub customers: Vec<Customer>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Where each of `customers` sits in the file, when entries that failed to parse
    /// were left out (empty: none was).
    #[serde(skip)]
    pub customer_positions: Vec<usize>,
    /// As `customer_positions`, for `routes`.
    #[serde(skip)]
    pub route_positions: Vec<usize>,
}

impl Document {
    /// The position in the file of `customers[i]`.
    pub fn customer_position(&self, i: usize) -> usize {
        self.customer_positions.get(i).copied().unwrap_or(i)
    }

    /// The position in the file of `routes[i]`.
    pub fn route_position(&self, i: usize) -> usize {
        self.route_positions.get(i).copied().unwrap_or(i)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Flag,
    Quota,
    Rate,
    Seats,
    Value,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Flag => "flag",
            Kind::Quota => "quota",
            Kind::Rate => "rate",
            Kind::Seats => "seats",
            Kind::Value => "value",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    Max,
    Sum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Duration,
    Number,
    String,
    Bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    Min,
    Max,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub kind: Kind,
    pub description: Option<String>,
    pub unit: Option<String>,
    pub combine: Option<Combine>,
    #[serde(rename = "type")]
    pub value_type: Option<ValueType>,
    pub prefer: Option<Prefer>,
    /// For `type: string` values: the values from least to most generous.
    pub order: Option<Vec<String>>,
    /// For quotas: the shares of the limit whose crossing sends a usage notice
    /// (`[80%, 100%]` when not written).
    pub notify_at: Option<Vec<String>>,
}

/// A plan or a group: both bundle grants and may include other bundles.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Display name (`Pro`), for people; decisions use the key.
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub includes: Vec<String>,
    #[serde(default)]
    pub grants: Ordered<Grant>,
}

/// A grant as written: a scalar (`true`, `unlimited`, `2h`, `50`) or a mapping
/// (`{limit: 1000, per: month}`). Which of these fits is decided by the feature's kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Map(GrantFields),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFields {
    pub limit: Option<Limit>,
    pub per: Option<String>,
    pub reset: Option<Reset>,
    pub warn_at: Option<String>,
    pub notify_at: Option<Vec<String>>,
    pub overage: Option<Overage>,
    pub burst: Option<u64>,
}

/// `N` or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Finite(u64),
    Unlimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reset {
    Anniversary,
    Calendar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overage {
    Deny,
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    pub id: String,
    pub name: Option<String>,
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    #[serde(default)]
    pub grants: Vec<CustomerGrant>,
    #[serde(default)]
    pub overrides: Vec<Override>,
}

pub type Scope = Ordered<OneOrMany>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub plan: String,
    pub starts: String,
    pub ends: Option<String>,
    pub grace: Option<String>,
    /// The day quota windows count from, when it is not `starts` (a mid-term upgrade
    /// keeps the customer's billing day).
    pub billing_anchor: Option<String>,
    pub quantity: Option<u64>,
    #[serde(default)]
    pub trial: bool,
    pub scope: Option<Scope>,
}

/// A customer-specific contract term: the grant's own fields written inline
/// (`{feature: api.calls, limit: 250000, per: month}`) or as `grant:` (any form).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerGrant {
    pub feature: String,
    pub grant: Option<Grant>,
    pub value: Option<Grant>,
    pub limit: Option<Limit>,
    pub per: Option<String>,
    pub reset: Option<Reset>,
    pub warn_at: Option<String>,
    pub notify_at: Option<Vec<String>>,
    pub overage: Option<Overage>,
    pub burst: Option<u64>,
    pub starts: Option<String>,
    pub ends: Option<String>,
    pub priority: Option<i32>,
    pub scope: Option<Scope>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub feature: String,
    pub grant: Option<Grant>,
    pub starts: Option<String>,
    pub expires: Option<String>,
    pub approved_by: Option<String>,
    pub reason: Option<String>,
    pub ticket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub customer: CustomerSource,
    #[serde(default)]
    pub require: Vec<String>,
    pub consume: Option<RouteConsume>,
    pub rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Ordered<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerSource {
    pub header: Option<String>,
    pub jwt_claim: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConsume {
    pub feature: String,
    pub amount: Option<u64>,
}

/// A scope value: one string or a list of them (`asset: chiller-7` or
/// `asset: [chiller-7, chiller-9]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OneOrMany(pub Vec<String>);

/// A mapping that keeps the file's order (plan order is tier order) and refuses a key
/// written twice.
#[derive(Debug, Clone, PartialEq)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<T> Ordered<T> {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Ordered::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, T)> = Vec::with_capacity(map.size_hint().unwrap_or(0));
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = map.next_value()?;
                    out.push((key, value));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number or `unlimited`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Limit::Finite(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(Limit::Finite)
                    .map_err(|_| E::custom(format!("expected a limit of zero or more, found {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "unlimited" {
                    Ok(Limit::Unlimited)
                } else {
                    Err(E::custom(format!(
                        "expected a whole number or `unlimited`, found `{v}`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Grant {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Grant;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a grant: `true`/`false`, a value, `unlimited` or a mapping like `{limit: 1000, per: month}`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Grant::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Grant::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(Grant::Int)
                    .map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Grant::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Grant::Str(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                GrantFields::deserialize(de::value::MapAccessDeserializer::new(map)).map(Grant::Map)
            }
        }
        d.deserialize_any(V)
    }
}
