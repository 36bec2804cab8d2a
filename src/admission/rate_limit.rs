//! The rate limit service's question: descriptors naming a customer and a feature,
//! each answered over or under its limit, with the limit and unit Envoy reports.

use super::{rate_info, retry_after, step};
use crate::decide::{DecideError, Decider};
use crate::engine::Op;
use crate::policy::Limit;
use crate::time::SECOND;
use crate::usage::{Ack, UsageStore};

/// A rate-limit unit, as Envoy's `RateLimit.Unit` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Unknown,
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// The unit a window or period of `us` microseconds is; `Unknown` when it is none
    /// of them (`per: 90m`), in which case the limit's name says the period.
    pub fn of(us: i64) -> Unit {
        const DAY: i64 = 86_400 * SECOND;
        match us {
            x if x == SECOND => Unit::Second,
            x if x == 60 * SECOND => Unit::Minute,
            x if x == 3_600 * SECOND => Unit::Hour,
            x if x == DAY => Unit::Day,
            x if x == 7 * DAY => Unit::Week,
            x if (28 * DAY..=31 * DAY).contains(&x) => Unit::Month,
            x if (365 * DAY..=366 * DAY).contains(&x) => Unit::Year,
            _ => Unit::Unknown,
        }
    }
}

/// One rate-limit descriptor: the customer and feature its entries name, and the
/// hits it adds (0: report without counting).
#[derive(Debug, Clone, Copy)]
pub struct Descriptor<'a> {
    pub customer: Option<&'a str>,
    pub feature: Option<&'a str>,
    pub hits: u64,
    /// Its entries name the customer or the feature twice: over the limit, whatever
    /// the values (no entry is picked over another).
    pub ambiguous: bool,
}

/// The answer for one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub over: bool,
    /// `None`: no limit applies (a descriptor that names no feature).
    pub limit: Option<(u64, Unit, String)>,
    pub remaining: u64,
    /// Until the window resets or the limiter is whole again.
    pub reset_s: Option<u64>,
    /// Until a request would pass again (over the limit only).
    pub retry_after_s: Option<u64>,
}

/// Answers Envoy's `ShouldRateLimit`: each descriptor naming a `customer` and a
/// `feature` (a quota or a rate limit) consumes `hits` of it. A descriptor without a
/// `feature` is not ours to limit (as envoyproxy/ratelimit answers a descriptor no
/// limit matches); one without a `customer`, one naming the customer or the feature
/// twice, or one for a customer or feature the policy does not know or entitle, is over
/// the limit (fail closed: an error would let Envoy admit by its failure mode).
pub async fn rate_limit<S: UsageStore>(
    decider: &Decider<S>,
    descriptors: &[Descriptor<'_>],
) -> Result<Vec<Limited>, DecideError> {
    let snap = decider.snapshot.load_full().ok_or(DecideError::NotReady)?;
    let now = decider.clock.now();
    let mut ack = Ack::default();
    let mut out = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        let over = Limited {
            over: true,
            limit: None,
            remaining: 0,
            reset_s: None,
            retry_after_s: None,
        };
        if d.ambiguous {
            out.push(over);
            continue;
        }
        let Some(feature) = d.feature else {
            out.push(Limited {
                over: false,
                ..over
            });
            continue;
        };
        let (Some(customer), Some(f)) = (d.customer, snap.feature_id(feature)) else {
            out.push(over);
            continue;
        };
        let kind = snap.catalog.features[f as usize].kind;
        let op = if d.hits > 0
            && matches!(kind, crate::policy::Kind::Quota | crate::policy::Kind::Rate)
        {
            Op::Consume
        } else {
            Op::Check
        };
        let s = step(
            decider,
            &snap,
            op,
            customer,
            f,
            d.hits.max(1),
            now,
            &mut ack,
        )
        .await?;
        let dec = &s.decision;
        let info = rate_info(&s, now);
        out.push(Limited {
            over: !dec.allowed,
            // The configured limit per unit, not the burst (Envoy's model is a fixed
            // window): a rate limit with a burst can show more remaining than its limit.
            limit: match dec.limit {
                Some(Limit::Finite(n)) => {
                    let unit = s.period_us.map_or(Unit::Unknown, Unit::of);
                    Some((n, unit, feature.to_string()))
                }
                _ => None,
            },
            remaining: info.map_or(0, |i| i.remaining),
            reset_s: info.map(|i| i.reset_s),
            retry_after_s: retry_after(dec, now),
        });
    }
    if ack.0.is_some() {
        decider.store.ack(ack).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_period() {
        assert_eq!(Unit::of(SECOND), Unit::Second);
        assert_eq!(Unit::of(60 * SECOND), Unit::Minute);
        assert_eq!(Unit::of(3_600 * SECOND), Unit::Hour);
        assert_eq!(Unit::of(86_400 * SECOND), Unit::Day);
        assert_eq!(Unit::of(30 * 86_400 * SECOND), Unit::Month);
        assert_eq!(Unit::of(366 * 86_400 * SECOND), Unit::Year);
        assert_eq!(Unit::of(90 * 60 * SECOND), Unit::Unknown);
    }
}
