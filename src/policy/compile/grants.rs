//! Grants checked against their feature's kind and compiled to [`GrantValue`]s.
//!
//! Plans, groups, customer grants and overrides all write grants the same way, so one
//! function compiles them all; each caller places the error where its grant sits.

use crate::policy::raw::{Grant, GrantFields};
use crate::policy::snapshot::*;
use crate::policy::units::{parse_duration, parse_percent};

/// A grant's problem: the field it is about (if one), and the message.
pub(super) type GrantError = (Option<&'static str>, String);

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
                notify_at: NotifyAt::NONE,
                overage: Overage::Deny,
            })),
            Grant::Map(m) => quota(feature, m),
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
    let present: [(&'static str, bool); 7] = [
        ("limit", m.limit.is_some()),
        ("per", m.per.is_some()),
        ("reset", m.reset.is_some()),
        ("warn_at", m.warn_at.is_some()),
        ("notify_at", m.notify_at.is_some()),
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

fn quota(feature: &Feature, m: &GrantFields) -> Result<GrantValue, GrantError> {
    let name = &feature.name;
    only(
        m,
        "quota",
        &["limit", "per", "reset", "warn_at", "notify_at", "overage"],
    )?;
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
    let notify_at = match &m.notify_at {
        Some(list) => NotifyAt::parse(list).map_err(|e| (Some("notify_at"), e))?,
        None => feature.notify_at,
    };
    Ok(GrantValue::Quota(QuotaGrant {
        limit,
        period,
        reset: m.reset.unwrap_or(Reset::Anniversary),
        warn_at,
        notify_at,
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
    rate_span(per_us, limit, burst, m.burst.is_some())?;
    Ok(GrantValue::Rate(RateGrant {
        limit,
        per_us,
        burst,
    }))
}

/// Refuses a rate limit whose arithmetic the limiter cannot hold: a `per`, or a time
/// to refill from empty (`burst × per ÷ limit`), beyond [`MAX_RATE_SPAN_US`].
fn rate_span(per_us: i64, limit: u64, burst: u64, burst_given: bool) -> Result<(), GrantError> {
    const MAX_DAYS: i64 = MAX_RATE_SPAN_US / crate::time::DAY;
    if per_us > MAX_RATE_SPAN_US {
        return Err((
            Some("per"),
            format!(
                "a rate limit's `per` is at most {MAX_DAYS}d (100 years): the limiter counts nanoseconds in 64 bits; use a quota for longer periods"
            ),
        ));
    }
    let refill_us = burst as u128 * per_us as u128 / limit as u128;
    if refill_us > MAX_RATE_SPAN_US as u128 {
        let days = refill_us / crate::time::DAY as u128;
        return Err((
            Some(if burst_given { "burst" } else { "per" }),
            format!(
                "an empty rate limit would take {days}d to refill (`burst` × `per` ÷ `limit`); at most {MAX_DAYS}d (100 years) fits the limiter's arithmetic"
            ),
        ));
    }
    Ok(())
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
