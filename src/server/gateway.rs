//! Gateway admission: a request seen by an API gateway (method, path, headers) is
//! matched against the snapshot's `routes` and answered allowed, forbidden (403) or
//! too many (429). One decision path serves every protocol: the HTTP forward-auth at
//! `/v1/authz/{path…}` (Envoy ext_authz HTTP, nginx `auth_request`, Traefik
//! `forwardAuth`) and the gRPC `Authorization/Check` and `ShouldRateLimit` services.
//!
//! A route runs, in order: each `require` feature as a check, the `rate` limit, then
//! the `consume` quota. A request refused by the quota has still spent its rate-limit
//! token, as with any rate limiter in front of a quota. The body of the original
//! request is never needed.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;

use super::App;
use super::error::ApiError;
use crate::engine::{self, Decision, Op, Reason, UsageOp};
use crate::policy::{CustomerFrom, FeatureId, Limit, Route, Snapshot};
use crate::time::{SECOND, Timestamp};
use crate::usage::{Ack, StepMeta, UsageStore};

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
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for hyper::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Envoy's `CheckRequest` headers: keys are lower-case.
impl Headers for HashMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
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

/// Removes the query and fragment, merges repeated slashes and resolves `.` and `..`
/// segments, so `/api/public/../reports` and `/api//reports` meet the route written
/// for `/api/reports` (the upstream would serve them as that path).
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if path.contains('%') {
        let decoded = decode_unreserved(path);
        return Cow::Owned(resolve(&decoded).into_owned());
    }
    resolve(path)
}

/// Merges repeated slashes and resolves dot segments.
fn resolve(path: &str) -> Cow<'_, str> {
    let clean = path.starts_with('/')
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..");
    if clean {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..") {
        s.push('/');
    }
    Cow::Owned(s)
}

/// Decodes percent-escapes of unreserved characters (RFC 3986 §6.2.2.2: letters,
/// digits, `-._~`), which name the same path as the characters themselves:
/// `/api/%72eports` is `/api/reports` to the application. Other escapes (`%2F`, `%20`)
/// are kept, with upper-case hex.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            )
        {
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push_str(&format!("{c:02X}"));
            }
            i += 3;
            continue;
        }
        // A char boundary: only ASCII bytes are compared above.
        match path.get(i..).and_then(|rest| rest.chars().next()) {
            Some(ch) => {
                out.push(ch);
                i += ch.len_utf8();
            }
            None => break,
        }
    }
    out
}

/// The customer id a route names: a header, or a claim of the JWT payload the gateway
/// verified and forwarded (base64url JSON; a whole `header.payload.signature` token is
/// accepted too, and only its payload read — the signature is the gateway's job).
pub fn customer_id(from: &CustomerFrom, headers: &impl Headers) -> Result<String, String> {
    match from {
        CustomerFrom::Header(h) => match headers.header(h).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(format!("no customer id in header `{h}`")),
        },
        CustomerFrom::JwtClaim { header, claim } => {
            let raw = headers
                .header(header)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("no JWT payload in header `{header}`"))?;
            let raw = raw.strip_prefix("Bearer ").unwrap_or(raw);
            let payload = match raw.split('.').collect::<Vec<_>>()[..] {
                [_, p, _] => p,
                _ => raw,
            };
            let bytes = base64::engine::GeneralPurpose::new(
                &base64::alphabet::URL_SAFE,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            )
            .decode(payload)
            .map_err(|e| format!("header `{header}` is not base64url: {e}"))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("header `{header}` is not a JSON payload: {e}"))?;
            match v.get(&**claim) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                _ => Err(format!(
                    "the JWT payload in `{header}` has no string claim `{claim}`"
                )),
            }
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

/// Decides `op` on `feature` for `customer`, running the usage step against the store
/// (without waiting when it can answer at once), and counts it in metrics and the
/// audit log like any decision.
#[allow(clippy::too_many_arguments)]
async fn step<'a, S: UsageStore>(
    app: &App<S>,
    snap: &'a Snapshot,
    op: Op,
    customer: &'a str,
    feature: FeatureId,
    amount: u64,
    now: Timestamp,
    ack: &mut Ack,
) -> Result<Step<'a>, ApiError> {
    let name = &*snap.features[feature as usize].name;
    let req = engine::Request {
        amount,
        ..engine::Request::new(customer, name)
    };
    let mut d = Decision::blank(name);
    let (mut period_us, mut burst) = (None, None);
    if let Some(p) = engine::evaluate(snap, op, &req, now, &mut d)? {
        (period_us, burst) = match p.op {
            UsageOp::Quota {
                window_start,
                window_end,
                ..
            } => (Some(window_end.0.saturating_sub(window_start.0)), None),
            UsageOp::Rate { per_us, burst, .. } => (Some(per_us), Some(burst)),
            UsageOp::Seat { .. } => (None, None),
        };
        let meta = StepMeta {
            snapshot: &snap.version,
            ..StepMeta::default()
        };
        let outcome = match app.store.try_now(&p.op, &meta, now) {
            Some(r) => {
                let (o, a) = r?;
                *ack = ack.and(a);
                o
            }
            None => app.store.apply(&p.op, &meta, now).await?,
        };
        p.finish(outcome, &mut d);
    }
    super::api::record(app, op, customer, name, amount, &[], now, &d);
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

/// Admits (or not) one request seen by the gateway.
pub async fn admit<S: UsageStore>(
    app: &App<S>,
    api: &'static str,
    method: &str,
    raw_path: &str,
    headers: &impl Headers,
) -> Result<Admission, ApiError> {
    let snap = app.snapshot.load_full().ok_or(ApiError::NotReady)?;
    let now = app.clock.now();
    let path = normalize_path(raw_path);
    let Some(route) = snap
        .routes
        .iter()
        .find(|r| r.matches(method, &path, |k| headers.header(k)))
    else {
        let a = match app.unmatched {
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
    let a = admit_route(app, &snap, route, headers, now).await?;
    crate::metrics::gateway(api, a.status(), a.reason);
    Ok(a)
}

async fn admit_route<S: UsageStore>(
    app: &App<S>,
    snap: &Snapshot,
    route: &Route,
    headers: &impl Headers,
    now: Timestamp,
) -> Result<Admission, ApiError> {
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
            let s = step(app, snap, Op::Check, &customer, f, 1, now, &mut ack).await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            last = Some(s);
        }
        if let Some(f) = route.rate {
            let s = step(app, snap, Op::Consume, &customer, f, 1, now, &mut ack).await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            limited = Some(s);
        }
        if let Some((f, amount)) = route.consume {
            let s = step(app, snap, Op::Consume, &customer, f, amount, now, &mut ack).await?;
            if !s.decision.allowed {
                break 'steps Some(denied(&s, &customer, now));
            }
            quota = Some(s);
        }
        None
    };
    // An answer waits until what its steps counted is acknowledged (sync durability).
    if ack.0.is_some() {
        app.store.ack(ack).await?;
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
/// limit matches); one without a `customer`, or for a customer or feature the policy
/// does not know or entitle, is over the limit (fail closed).
pub async fn rate_limit<S: UsageStore>(
    app: &App<S>,
    descriptors: &[Descriptor<'_>],
) -> Result<Vec<Limited>, ApiError> {
    let snap = app.snapshot.load_full().ok_or(ApiError::NotReady)?;
    let now = app.clock.now();
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
        let kind = snap.features[f as usize].kind;
        let op = if d.hits > 0
            && matches!(kind, crate::policy::Kind::Quota | crate::policy::Kind::Rate)
        {
            Op::Consume
        } else {
            Op::Check
        };
        let s = step(app, &snap, op, customer, f, d.hits.max(1), now, &mut ack).await?;
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
        app.store.ack(ack).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_before_matching() {
        assert_eq!(normalize_path("/api/reports"), "/api/reports");
        assert_eq!(normalize_path("/api/reports?x=1#f"), "/api/reports");
        assert_eq!(normalize_path("/api//reports"), "/api/reports");
        assert_eq!(normalize_path("/api/public/../reports/"), "/api/reports/");
        assert_eq!(normalize_path("/api/./reports"), "/api/reports");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("api"), "/api");
        assert_eq!(normalize_path("/api/.."), "/");
        // Escapes of unreserved characters are the characters; dot segments written
        // as escapes are dot segments.
        assert_eq!(normalize_path("/api/%72eports"), "/api/reports");
        assert_eq!(normalize_path("/api/%72%65ports/x"), "/api/reports/x");
        assert_eq!(normalize_path("/api/public/%2e%2E/reports"), "/api/reports");
        assert_eq!(normalize_path("/api/%7Euser"), "/api/~user");
        // Reserved and other escapes stay escaped (upper-case), and bad ones as written.
        assert_eq!(normalize_path("/api%2freports"), "/api%2Freports");
        assert_eq!(normalize_path("/a%20b"), "/a%20b");
        assert_eq!(normalize_path("/a%zz%4"), "/a%zz%4");
        assert_eq!(normalize_path("/é/%C3%A9"), "/é/%C3%A9");
    }

    #[test]
    fn customer_from_header_and_jwt_claim() {
        let mut h = HashMap::new();
        h.insert("x-customer-id".to_string(), " acme ".to_string());
        let from = CustomerFrom::Header("x-customer-id".into());
        assert_eq!(customer_id(&from, &h).as_deref(), Ok("acme"));
        let missing = CustomerFrom::Header("x-other".into());
        assert!(customer_id(&missing, &h).is_err());

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(br#"{"sub":"globex","org":42}"#);
        h.insert("x-jwt-payload".to_string(), payload.clone());
        let sub = CustomerFrom::JwtClaim {
            header: "x-jwt-payload".into(),
            claim: "sub".into(),
        };
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("globex"));
        let org = CustomerFrom::JwtClaim {
            header: "x-jwt-payload".into(),
            claim: "org".into(),
        };
        assert_eq!(customer_id(&org, &h).as_deref(), Ok("42"));
        // A whole token: only the payload is read.
        h.insert(
            "x-jwt-payload".to_string(),
            format!("Bearer eyJhbGciOiJub25lIn0.{payload}.sig"),
        );
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("globex"));
        // Padded base64url is accepted too.
        h.insert(
            "x-jwt-payload".to_string(),
            base64::engine::general_purpose::URL_SAFE.encode(br#"{"sub":"x"}"#),
        );
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("x"));
        for bad in ["%%%", "bm90IGpzb24", ""] {
            h.insert("x-jwt-payload".to_string(), bad.to_string());
            assert!(customer_id(&sub, &h).is_err(), "{bad}");
        }
    }

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
