//! Gateway admission: a request seen by an API gateway (method, path, headers) is
//! matched against the snapshot's `routes` and answered allowed, forbidden (403) or
//! too many (429). One decision path serves every protocol: the HTTP forward-auth at
//! `/v1/authz/{path…}` (Envoy ext_authz HTTP, nginx `auth_request`, Traefik
//! `forwardAuth`) and the gRPC `Authorization/Check` and `ShouldRateLimit` services.
//! This module knows none of them: the server's adapters translate each protocol to
//! and from [`admit`] and [`rate_limit()`].
//!
//! A route runs, in order: each `require` feature as a check, the `rate` limit, then
//! the `consume` quota. A request refused by the quota has still spent its rate-limit
//! token, as with any rate limiter in front of a quota. The body of the original
//! request is never needed.

mod rate_limit;
mod request;

use std::collections::HashMap;

pub use rate_limit::{Descriptor, Limited, Unit, rate_limit};
pub use request::{customer_id, normalize_path};

use crate::decide::{DecideError, Decider, Query};
use crate::engine::{self, Decision, Op, Reason, UsageOp};
use crate::policy::{FeatureId, Limit, Route, Snapshot};
use crate::time::{SECOND, Timestamp};
use crate::usage::{Ack, UsageStore};

/// What to answer for a request no route matches (`--unmatched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Unmatched {
    Allow,
    /// Fail closed: a path nobody wrote a route for is not admitted.
    #[default]
    Deny,
}

/// Request headers as the gateway forwarded them, looked up by lower-case name.
pub trait Headers: Sync {
    /// The (first) value of header `name`.
    fn header(&self, name: &str) -> Option<&str>;
    /// Whether header `name` was sent more than once: a customer id read from it is
    /// ambiguous and refused.
    fn repeated(&self, name: &str) -> bool;
}

/// Envoy's `CheckRequest` headers: keys are lower-case, one value each (Envoy joins a
/// repeated header's values with commas).
impl Headers for HashMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }

    fn repeated(&self, _: &str) -> bool {
        false
    }
}

/// The limit a gateway answer reports in `RateLimit-*` headers (the route's quota, or
/// its rate limit when it has no quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    /// Whole seconds until the window resets (or the limiter is replenished).
    pub reset_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// 403: not entitled, unknown customer, no route.
    Forbidden,
    /// 429: quota exhausted or rate limited.
    TooMany,
}

/// The answer to one admission, owned, for any protocol to encode.
#[derive(Debug, Clone)]
pub struct Admission {
    pub verdict: Verdict,
    pub reason: &'static str,
    /// The customer the route named (when it could be read).
    pub customer: Option<String>,
    /// The customer's plan (the winning grant's, or the current subscription's).
    pub plan: Option<String>,
    pub rate: Option<RateInfo>,
    /// Whole seconds, at least 1 (429 only).
    pub retry_after_s: Option<u64>,
    /// A denial's JSON body: the deciding decision, or `{allowed, reason, message}`.
    pub body: Vec<u8>,
    pub snapshot: String,
}

impl Admission {
    pub fn status(&self) -> u16 {
        match self.verdict {
            Verdict::Allowed => 200,
            Verdict::Forbidden => 403,
            Verdict::TooMany => 429,
        }
    }

    /// The headers an answer carries: `RateLimit-*`, `Retry-After` on 429, and on an
    /// admission the `x-entitled-*` headers the upstream can use.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::with_capacity(6);
        if let Some(r) = self.rate {
            h.push(("ratelimit-limit", r.limit.to_string()));
            h.push(("ratelimit-remaining", r.remaining.to_string()));
            h.push(("ratelimit-reset", r.reset_s.to_string()));
        }
        if let Some(s) = self.retry_after_s {
            h.push(("retry-after", s.to_string()));
        }
        if self.verdict != Verdict::Allowed {
            // For gateways that drop a refusal's body (nginx `auth_request`).
            h.push(("x-entitled-reason", self.reason.to_string()));
        }
        if self.verdict == Verdict::Allowed {
            if let Some(c) = &self.customer {
                h.push(("x-entitled-customer", c.clone()));
            }
            if let Some(p) = &self.plan {
                h.push(("x-entitled-plan", p.clone()));
            }
            h.push(("x-entitled-snapshot", self.snapshot.clone()));
        }
        h
    }

    fn refused(verdict: Verdict, reason: &'static str, message: String, snap: &Snapshot) -> Self {
        let body = serde_json::to_vec(&serde_json::json!({
            "allowed": false,
            "reason": reason,
            "message": message,
            "snapshot": &*snap.version,
        }))
        .unwrap_or_default();
        Admission {
            verdict,
            reason,
            customer: None,
            plan: None,
            rate: None,
            retry_after_s: None,
            body,
            snapshot: snap.version.to_string(),
        }
    }
}

/// One decision of an admission, with the length of its window or rate period and,
/// for a rate limit, its burst.
struct Step<'a> {
    decision: Decision<'a>,
    period_us: Option<i64>,
    burst: Option<u64>,
}

/// Decides `op` on `feature` for `customer` on the decision path, as any decision
/// (the usage step without waiting when the store can answer at once; counted in
/// metrics and the audit log).
#[allow(clippy::too_many_arguments)]
async fn step<'a, S: UsageStore>(
    decider: &Decider<S>,
    snap: &'a Snapshot,
    op: Op,
    customer: &'a str,
    feature: FeatureId,
    amount: u64,
    now: Timestamp,
    ack: &mut Ack,
) -> Result<Step<'a>, DecideError> {
    let name = &*snap.catalog.features[feature as usize].name;
    let q = Query::new(
        op,
        engine::Request {
            amount,
            ..engine::Request::new(customer, name)
        },
    );
    let mut d = Decision::blank(name);
    let ran = decider.decide(snap, &q, now, &mut d, ack).await?;
    let (period_us, burst) = match ran {
        Some(UsageOp::Quota {
            window_start,
            window_end,
            ..
        }) => (Some(window_end.0.saturating_sub(window_start.0)), None),
        Some(UsageOp::Rate { per_us, burst, .. }) => (Some(per_us), Some(burst)),
        Some(UsageOp::Seat { .. }) | None => (None, None),
    };
    Ok(Step {
        decision: d,
        period_us,
        burst,
    })
}

/// Whole seconds from `now` to `t`, rounded up, at least 1.
fn secs_until(now: Timestamp, t: Timestamp) -> u64 {
    let us = t.0.saturating_sub(now.0).max(1);
    (us as u64).div_ceil(SECOND as u64)
}

/// What the `RateLimit-*` headers say: for a quota its limit per window, for a rate
/// limit its capacity (the burst: what may pass at once, so `remaining` never exceeds
/// `limit`); `reset` is when the window resets or the capacity is whole again.
fn rate_info(s: &Step<'_>, now: Timestamp) -> Option<RateInfo> {
    let d = &s.decision;
    let Some(Limit::Finite(limit)) = d.limit else {
        return None;
    };
    let limit = s.burst.map_or(limit, |b| b.max(limit));
    let remaining = match d.remaining {
        Some(Limit::Finite(r)) => r,
        _ => limit,
    };
    Some(RateInfo {
        limit,
        remaining,
        reset_s: d.resets_at.map_or(0, |t| secs_until(now, t)),
    })
}

/// The plan to tell the upstream: the deciding grant's, else the customer's current
/// subscription.
fn plan_of(
    snap: &Snapshot,
    customer: &str,
    d: Option<&Decision<'_>>,
    now: Timestamp,
) -> Option<String> {
    if let Some(p) = d.and_then(|d| d.source.as_ref()).and_then(|s| s.plan) {
        return Some(p.to_string());
    }
    let c = snap.customers.get(customer)?;
    c.subs
        .iter()
        .filter(|s| s.starts <= now && now < s.grace_ends)
        .max_by_key(|s| snap.bundle(s.plan).tier)
        .map(|s| snap.bundle(s.plan).name.to_string())
}

/// Whole seconds until a refused request would pass: the rate limiter's wait, or the
/// quota window's reset (`None` for a quota that never resets, and for other reasons).
fn retry_after(d: &Decision<'_>, now: Timestamp) -> Option<u64> {
    match d.reason {
        Reason::RateLimited => Some(d.retry_after.map_or(1, |s| (s.ceil() as u64).max(1))),
        Reason::QuotaExhausted => d.resets_at.map(|t| secs_until(now, t)),
        _ => None,
    }
}

/// A denial answered from the deciding decision.
fn denied(s: &Step<'_>, customer: &str, now: Timestamp) -> Admission {
    let d = &s.decision;
    let mut body = Vec::with_capacity(384);
    d.write_json(&mut body);
    let too_many = matches!(d.reason, Reason::QuotaExhausted | Reason::RateLimited);
    let retry_after_s = retry_after(d, now);
    Admission {
        // A quota that never resets (`per: never`) cannot be retried: 403, not 429.
        verdict: if too_many && retry_after_s.is_some() {
            Verdict::TooMany
        } else {
            Verdict::Forbidden
        },
        reason: d.reason.as_str(),
        customer: Some(customer.to_string()),
        plan: None,
        rate: rate_info(s, now),
        retry_after_s,
        body,
        snapshot: d.snapshot.to_string(),
    }
}

/// Admits (or not) one request seen by the gateway. `api` names the protocol it came
/// by in the gateway metrics (`authz_http`, `authz_grpc`).
pub async fn admit<S: UsageStore>(
    decider: &Decider<S>,
    unmatched: Unmatched,
    api: &'static str,
    method: &str,
    raw_path: &str,
    headers: &impl Headers,
) -> Result<Admission, DecideError> {
    let snap = decider.snapshot.load_full().ok_or(DecideError::NotReady)?;
    let now = decider.clock.now();
    let path = normalize_path(raw_path);
    let Some(route) = snap
        .catalog
        .routes
        .iter()
        .find(|r| r.matches(method, &path, |k| headers.header(k)))
    else {
        let a = match unmatched {
            Unmatched::Deny => Admission::refused(
                Verdict::Forbidden,
                "no_route",
                format!("no route matches {method} {path}"),
                &snap,
            ),
            Unmatched::Allow => Admission {
                verdict: Verdict::Allowed,
                reason: "granted",
                customer: None,
                plan: None,
                rate: None,
                retry_after_s: None,
                body: Vec::new(),
                snapshot: snap.version.to_string(),
            },
        };
        crate::metrics::gateway(api, a.status(), a.reason);
        return Ok(a);
    };
    let a = admit_route(decider, &snap, route, headers, now).await?;
    crate::metrics::gateway(api, a.status(), a.reason);
    Ok(a)
}

async fn admit_route<S: UsageStore>(
    decider: &Decider<S>,
    snap: &Snapshot,
    route: &Route,
    headers: &impl Headers,
    now: Timestamp,
) -> Result<Admission, DecideError> {
    let customer = match customer_id(&route.customer, headers) {
        Ok(c) => c,
        Err(message) => {
            return Ok(Admission::refused(
                Verdict::Forbidden,
                "unknown_customer",
                message,
                snap,
            ));
        }
    };
    if snap.customers.get(&customer).is_none() {
        let mut a = Admission::refused(
            Verdict::Forbidden,
            "unknown_customer",
            format!("no customer `{customer}` in the policy snapshot"),
            snap,
        );
        a.customer = Some(customer);
        return Ok(a);
    }
    let mut ack = Ack::default();
    let (mut last, mut limited, mut quota): (Option<Step<'_>>, _, _) = (None, None, None);
    let refused = 'steps: {
        for &f in route.require.iter() {
            let s = step(decider, snap, Op::Check, &customer, f, 1, now, &mut ack).await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            last = Some(s);
        }
        if let Some(f) = route.rate {
            let s = step(decider, snap, Op::Consume, &customer, f, 1, now, &mut ack).await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            limited = Some(s);
        }
        if let Some((f, amount)) = route.consume {
            let s = step(
                decider,
                snap,
                Op::Consume,
                &customer,
                f,
                amount,
                now,
                &mut ack,
            )
            .await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            quota = Some(s);
        }
        None
    };
    // An answer waits until what its steps counted is acknowledged (sync durability).
    if ack.0.is_some() {
        decider.store.ack(ack).await?;
    }
    if let Some(a) = refused {
        return Ok(a);
    }
    // The quota's numbers when it has a limit, else the rate limit's.
    let rate = quota
        .as_ref()
        .and_then(|s| rate_info(s, now))
        .or_else(|| limited.as_ref().and_then(|s| rate_info(s, now)));
    let deciding = quota
        .as_ref()
        .or(limited.as_ref())
        .or(last.as_ref())
        .map(|s| &s.decision);
    Ok(Admission {
        verdict: Verdict::Allowed,
        reason: "granted",
        plan: plan_of(snap, &customer, deciding, now),
        rate,
        customer: Some(customer),
        retry_after_s: None,
        body: Vec::new(),
        snapshot: snap.version.to_string(),
    })
}
