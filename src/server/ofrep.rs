//! OpenFeature Remote Evaluation Protocol (OFREP): entitlements answered as feature
//! flags, so that any OpenFeature SDK with an OFREP provider asks this sidecar without
//! a hand-written client.
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}`: one feature, decided as `/v1/check` does
//!   (the same [`crate::decide`] path, counted and audited like any check);
//! - `POST /ofrep/v1/evaluate/flags`: every feature of the catalog for the customer,
//!   on one snapshot, with an `ETag` (a hash of the answer) and `304` on
//!   `If-None-Match`;
//! - `GET /ofrep/v1/events`: a server-sent event stream that says `refetchEvaluation`
//!   whenever the served snapshot changes (a policy reload or a customer write), as
//!   advertised by the bulk answer's `eventStreams`;
//! - `GET /ofrep/v1/configuration`: what this server supports.
//!
//! `context.targetingKey` is the customer; the other context keys are the scope
//! context (`asset`, `location`, …). How each feature kind becomes a flag value, and
//! why, is written down in `docs/openfeature.md`; the encoding here follows it.
//!
//! Errors have the protocol's shapes and statuses (400 `PARSE_ERROR`,
//! `TARGETING_KEY_MISSING`, `INVALID_CONTEXT`; 404 `FLAG_NOT_FOUND`; 401/403; 429 with
//! `Retry-After` in seconds while no snapshot can answer; 500 `GENERAL`), mapped in
//! one place, [`OfrepError::response`].

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, header};
use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;
use tokio::sync::{mpsc, watch};

use super::App;
use super::api::{Resp, decide_with, read_body};
use super::error::ApiError;
use super::request::{self, MAX_CONTEXT, MAX_STRING};
use crate::decide::Query;
use crate::engine::decision::{write_limit, write_str, write_time, write_u64};
use crate::engine::{self, Decision, Op, Reason};
use crate::live::tokens::AuthError;
use crate::policy::{Kind, ValueRepr};
use crate::usage::{Ack, UsageStore};

/// Every OFREP route starts here.
pub const PREFIX: &str = "/ofrep/";
const FLAGS: &str = "/ofrep/v1/evaluate/flags";
const FLAG: &str = "/ofrep/v1/evaluate/flags/";
/// The event stream (its address is given to clients in `eventStreams`).
pub const EVENTS: &str = "/ofrep/v1/events";
const CONFIGURATION: &str = "/ofrep/v1/configuration";
/// How long a client waits before retrying while no snapshot can answer.
const RETRY_AFTER_SECONDS: u64 = 1;
/// A comment line on an idle event stream, so that proxies and clients keep it.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Whether `path` is an OFREP route.
pub fn is_route(path: &str) -> bool {
    path.starts_with(PREFIX)
}

/// Why an OFREP request gets no evaluation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OfrepError {
    /// The body is not JSON, not an object, or its `context` is not an object.
    #[error("{0}")]
    Parse(String),
    #[error(
        "`context.targetingKey` is missing: it names the customer whose entitlements are evaluated"
    )]
    TargetingKeyMissing,
    /// A context value that is no scope context (an object, an array, `at`, …).
    #[error("{0}")]
    InvalidContext(String),
    #[error("no feature `{0}` in the catalog")]
    FlagNotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Nothing can answer yet (no snapshot loaded, the usage store unavailable).
    #[error("{0}")]
    RetryLater(String),
    #[error("{0}")]
    General(String),
    #[error("no OFREP route `{0}`")]
    NoRoute(String),
    #[error("method `{method}` not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
}

impl OfrepError {
    pub fn status(&self) -> StatusCode {
        match self {
            OfrepError::Parse(_)
            | OfrepError::TargetingKeyMissing
            | OfrepError::InvalidContext(_) => StatusCode::BAD_REQUEST,
            OfrepError::FlagNotFound(_) | OfrepError::NoRoute(_) => StatusCode::NOT_FOUND,
            OfrepError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            OfrepError::Forbidden(_) => StatusCode::FORBIDDEN,
            OfrepError::RetryLater(_) => StatusCode::TOO_MANY_REQUESTS,
            OfrepError::General(_) => StatusCode::INTERNAL_SERVER_ERROR,
            OfrepError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The OpenFeature error code.
    pub fn code(&self) -> &'static str {
        match self {
            OfrepError::Parse(_) => "PARSE_ERROR",
            OfrepError::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            OfrepError::InvalidContext(_) => "INVALID_CONTEXT",
            OfrepError::FlagNotFound(_) => "FLAG_NOT_FOUND",
            _ => "GENERAL",
        }
    }

    /// `{"key"?, "errorCode", "errorDetails"}`: the protocol's evaluation failure
    /// (with the flag's `key` on the single route), its bulk failure (without), and
    /// its general error (`errorDetails`, here with `errorCode: GENERAL` too).
    pub fn response(&self, key: Option<&str>) -> Resp {
        let mut body = Vec::with_capacity(128);
        body.push(b'{');
        if let Some(k) = key {
            body.extend_from_slice(b"\"key\":");
            write_str(&mut body, k);
            body.push(b',');
        }
        body.extend_from_slice(b"\"errorCode\":\"");
        body.extend_from_slice(self.code().as_bytes());
        body.extend_from_slice(b"\",\"errorDetails\":");
        write_str(&mut body, &self.to_string());
        body.push(b'}');
        let mut r = json(self.status(), body);
        let h = r.headers_mut();
        match self {
            OfrepError::RetryLater(_) => {
                h.insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from(RETRY_AFTER_SECONDS),
                );
            }
            OfrepError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            OfrepError::MethodNotAllowed { allow, .. } => {
                h.insert(header::ALLOW, header::HeaderValue::from_static(allow));
            }
            _ => {}
        }
        r
    }
}

/// The API's errors on the way to a decision, in the protocol's terms: a body that
/// cannot be read is a parse error; no snapshot or no store is "retry later".
impl From<ApiError> for OfrepError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest { .. } | ApiError::TooLarge { .. } | ApiError::BodyTimeout(_) => {
                OfrepError::Parse(e.to_string())
            }
            ApiError::NotReady | ApiError::Unavailable(_) | ApiError::Stale { .. } => {
                OfrepError::RetryLater(format!("{e}; retry in {RETRY_AFTER_SECONDS}s"))
            }
            other => OfrepError::General(other.to_string()),
        }
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The response of an OFREP route: JSON, or the event stream.
pub type OfrepResp = Response<Either<Full<Bytes>, EventBody>>;

/// Routes one OFREP request (`path` starts with [`PREFIX`]).
pub async fn handle<S: UsageStore>(
    app: &App<S>,
    req: Request<Incoming>,
    stop: watch::Receiver<bool>,
) -> OfrepResp {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let evaluation = req.method() == Method::POST && path.starts_with(FLAGS);
    let key = path
        .strip_prefix(FLAG)
        .map(|k| percent_encoding::percent_decode_str(k).decode_utf8_lossy());
    let result = route(app, &path, key.as_deref(), req, stop).await;
    if evaluation {
        app.decider
            .observer
            .metrics
            .duration(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::http_error("ofrep", e.status().as_u16());
            e.response(key.as_deref()).map(Either::Left)
        }
    }
}

async fn route<S: UsageStore>(
    app: &App<S>,
    path: &str,
    key: Option<&str>,
    req: Request<Incoming>,
    stop: watch::Receiver<bool>,
) -> Result<OfrepResp, OfrepError> {
    let method = req.method().clone();
    let allow = |allow: &'static str| OfrepError::MethodNotAllowed {
        method: method.to_string(),
        allow,
    };
    let known = path == FLAGS || key.is_some() || path == EVENTS || path == CONFIGURATION;
    if !known {
        return Err(OfrepError::NoRoute(path.to_string()));
    }
    let get = method == Method::GET || method == Method::HEAD;
    match (path, key) {
        (FLAGS, _) | (_, Some(_)) if method != Method::POST => return Err(allow("POST")),
        (EVENTS | CONFIGURATION, _) if !get => return Err(allow("GET, HEAD")),
        _ => {}
    }
    authorize(app, req.headers())?;
    match (path, key) {
        (_, Some(key)) => {
            let mut body = read_body(app, req).await?;
            Ok(single(app, key, &mut body).await?.map(Either::Left))
        }
        (FLAGS, None) => {
            let tags = if_none_match(req.headers());
            let mut body = read_body(app, req).await?;
            Ok(bulk(app, &mut body, tags.as_deref())
                .await?
                .map(Either::Left))
        }
        (EVENTS, None) => Ok(events(app, req.headers(), stop)),
        _ => Ok(configuration().map(Either::Left)),
    }
}

/// With `--ofrep-token-file`: a token from it, as `Authorization: Bearer` or
/// `X-API-Key`. Missing is 401, not one of them 403, and a token file that cannot be
/// read lets nobody in (500).
fn authorize<S>(app: &App<S>, headers: &HeaderMap) -> Result<(), OfrepError> {
    let Some(tokens) = &app.ofrep_tokens else {
        return Ok(());
    };
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let checked = match (text("x-api-key"), text(header::AUTHORIZATION.as_str())) {
        (Some(key), _) => tokens.check_token(key),
        (None, bearer) => tokens.check(bearer),
    };
    match checked {
        Ok(_) => Ok(()),
        Err(AuthError::Missing) => Err(OfrepError::Unauthorized(
            "missing `Authorization: Bearer <token>` or `X-API-Key: <token>`".into(),
        )),
        Err(AuthError::Wrong) => Err(OfrepError::Forbidden(
            "the token is not one of the OFREP tokens".into(),
        )),
        Err(AuthError::Unreadable(e)) => {
            tracing::error!("--ofrep-token-file {e}: OFREP requests are refused");
            Err(OfrepError::General(
                "the OFREP token file cannot be read; requests are refused until it can".into(),
            ))
        }
    }
}

/// An evaluation context: the customer and the scope context.
#[derive(Debug)]
struct EvalContext<'a> {
    customer: Cow<'a, str>,
    scope: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// Parses a request body; an empty body is an empty request (no targeting key).
/// A macro, not a function: the error path reads the body again to describe it,
/// which a function returning the borrowing value cannot do.
macro_rules! parse_body {
    ($body:expr) => {{
        let body: &mut [u8] = $body;
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(OfrepError::TargetingKeyMissing);
        }
        let parsed = request::parse_body(body);
        match parsed {
            Ok(v) => v,
            Err(_) => {
                let e = request::refused(parsed.err(), body);
                return Err(OfrepError::Parse(e.to_string()));
            }
        }
    }};
}

/// The body's `context`. Members other than `context` are ignored (later protocol
/// versions may add some). Context values that are numbers or booleans are compared
/// as their JSON text; `null` is no value.
fn parse_context<'a>(v: &Value<'a>) -> Result<EvalContext<'a>, OfrepError> {
    let Some(obj) = v.as_object() else {
        return Err(OfrepError::Parse(format!(
            "expected a JSON object with `context`, found {}",
            request::type_name(v)
        )));
    };
    let ctx = match obj.get("context") {
        None | Some(Value::Static(simd_json::StaticNode::Null)) => {
            return Err(OfrepError::TargetingKeyMissing);
        }
        Some(c) => c,
    };
    let Some(ctx) = ctx.as_object() else {
        return Err(OfrepError::Parse(format!(
            "`context` must be an object, found {}",
            request::type_name(ctx)
        )));
    };
    if ctx.len() > MAX_CONTEXT + 1 {
        return Err(OfrepError::InvalidContext(format!(
            "`context` has more than {MAX_CONTEXT} keys besides `targetingKey`"
        )));
    }
    let mut customer = None;
    let mut scope = Vec::new();
    for (k, val) in ctx.iter() {
        let field = || format!("context.{k}");
        if k == "at" {
            return Err(OfrepError::InvalidContext(
                "`context.at` is not accepted: OFREP evaluates now (use `/v1/check` with `at` to ask about another time)".into(),
            ));
        }
        let text: Cow<'_, str> = match val {
            Value::String(s) => s.clone(),
            Value::Static(simd_json::StaticNode::Null) => continue,
            Value::Static(n) => Cow::Owned(n.to_string()),
            other => {
                return Err(OfrepError::InvalidContext(format!(
                    "`{}` must be a string, number or boolean, found {}",
                    field(),
                    request::type_name(other)
                )));
            }
        };
        if text.len() > MAX_STRING {
            return Err(OfrepError::InvalidContext(format!(
                "`{}` is longer than {MAX_STRING} bytes",
                field()
            )));
        }
        if k == "targetingKey" {
            if !matches!(val, Value::String(_)) {
                return Err(OfrepError::InvalidContext(format!(
                    "`context.targetingKey` must be a string (the customer id), found {}",
                    request::type_name(val)
                )));
            }
            customer = Some(text);
        } else {
            scope.push((k.clone(), text));
        }
    }
    match customer {
        Some(c) if !c.is_empty() => Ok(EvalContext { customer: c, scope }),
        _ => Err(OfrepError::TargetingKeyMissing),
    }
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
async fn single<S: UsageStore>(
    app: &App<S>,
    key: &str,
    body: &mut [u8],
) -> Result<Resp, OfrepError> {
    let v = parse_body!(body);
    let ctx = parse_context(&v)?;
    let pairs: Vec<(&str, &str)> = ctx.scope.iter().map(|(k, v)| (&**k, &**v)).collect();
    let q = Query::new(
        Op::Check,
        engine::Request {
            context: &pairs,
            ..engine::Request::new(&ctx.customer, key)
        },
    );
    let mut out = Vec::with_capacity(512);
    let metrics = &app.decider.observer.metrics;
    let found = decide_with(app, &q, |d| {
        metrics.ofrep(false, d.kind, d.reason);
        if d.reason == Reason::UnknownFeature {
            return false;
        }
        write_flag(&mut out, key, d);
        true
    })
    .await?;
    if !found {
        return Err(OfrepError::FlagNotFound(key.to_string()));
    }
    Ok(json(StatusCode::OK, out))
}

/// `POST /ofrep/v1/evaluate/flags`: every feature of the catalog, on one snapshot.
async fn bulk<S: UsageStore>(
    app: &App<S>,
    body: &mut [u8],
    if_none_match: Option<&str>,
) -> Result<Resp, OfrepError> {
    let v = parse_body!(body);
    let ctx = parse_context(&v)?;
    let pairs: Vec<(&str, &str)> = ctx.scope.iter().map(|(k, v)| (&**k, &**v)).collect();
    let decider = &app.decider;
    let snap = decider
        .snapshot
        .load_full()
        .ok_or(OfrepError::from(ApiError::NotReady))?;
    let now = decider.clock.now();
    let mut out = Vec::with_capacity(64 + snap.catalog.features.len() * 320);
    let mut ack = Ack::default();
    out.extend_from_slice(b"{\"flags\":[");
    for (i, f) in snap.catalog.features.as_slice().iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let q = Query::new(
            Op::Check,
            engine::Request {
                context: &pairs,
                ..engine::Request::new(&ctx.customer, &f.name)
            },
        );
        let mut d = Decision::blank(&f.name);
        decider
            .decide(&snap, &q, now, &mut d, &mut ack)
            .await
            .map_err(ApiError::from)?;
        decider.observer.metrics.ofrep(true, d.kind, d.reason);
        write_flag(&mut out, &f.name, &d);
    }
    out.extend_from_slice(b"],\"metadata\":{\"snapshot\":");
    write_str(&mut out, &snap.version);
    out.extend_from_slice(b"},\"eventStreams\":[{\"type\":\"sse\",\"endpoint\":{\"requestUri\":\"");
    out.extend_from_slice(EVENTS.as_bytes());
    out.extend_from_slice(b"\"}}]}");
    if ack.0.is_some() {
        decider.store.ack(ack).await.map_err(ApiError::from)?;
    }
    let tag = etag(&out);
    let mut r = if if_none_match.is_some_and(|h| matches(h, &tag)) {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        json(StatusCode::OK, out)
    };
    if let Ok(v) = header::HeaderValue::from_str(&tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

/// A strong entity tag for a bulk answer: a hash of its bytes. The answer holds the
/// snapshot version, every result and its usage figures, so the tag changes with the
/// policy, the customer's record, the request context and usage alike, and an
/// unchanged tag means an unchanged answer.
pub fn etag(body: &[u8]) -> String {
    let hash = blake3::hash(body);
    let mut s = String::with_capacity(34);
    s.push('"');
    for b in &hash.as_bytes()[..16] {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s.push('"');
    s
}

/// `If-None-Match`, all its values joined (a client may send the header more than
/// once).
fn if_none_match(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Whether `If-None-Match: header` matches `tag` (weak comparison, as RFC 9110 asks
/// for `If-None-Match`: a `W/` prefix is ignored; `*` matches any).
fn matches(header: &str, tag: &str) -> bool {
    header.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t);
        t == "*" || t == tag
    })
}

/// One flag of an answer: `{"key", "value"?, "reason", "variant", "metadata"}`.
///
/// - flag, quota, rate and seats features are booleans: granted, or (for the last
///   three) one more unit would be allowed now — a check, nothing is counted;
/// - a value feature is its value when granted, and has no `value` otherwise, so the
///   caller's default applies (reason `DEFAULT`);
/// - a customer the policy does not know is `false` with reason `DEFAULT`: no
///   targeting happened; a known customer's denial is `TARGETING_MATCH` with `false`,
///   not `DISABLED`, because the feature is on for others and off for this customer.
///
/// The variant is the decision's reason (`granted`, `not_entitled`, …). Metadata
/// values are strings, numbers and booleans only: OpenFeature providers drop others.
pub fn write_flag(out: &mut Vec<u8>, key: &str, d: &Decision<'_>) {
    out.extend_from_slice(b"{\"key\":");
    write_str(out, key);
    let valued = d.kind == Some(Kind::Value);
    if !valued {
        out.extend_from_slice(if d.allowed {
            b",\"value\":true"
        } else {
            b",\"value\":false"
        });
    } else if let (true, Some(v)) = (d.allowed, d.value) {
        out.extend_from_slice(b",\"value\":");
        match v {
            ValueRepr::Str(s) => write_str(out, s),
            ValueRepr::Int(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            ValueRepr::Float(_) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
            ValueRepr::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        }
    }
    let reason: &[u8] = if d.reason == Reason::UnknownCustomer || (valued && !d.allowed) {
        b"DEFAULT"
    } else {
        b"TARGETING_MATCH"
    };
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\",\"variant\":\"");
    out.extend_from_slice(d.reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"metadata\":{\"reason\":\"");
    out.extend_from_slice(d.reason.as_str().as_bytes());
    out.push(b'"');
    if let Some(k) = d.kind {
        out.extend_from_slice(b",\"kind\":\"");
        out.extend_from_slice(k.as_str().as_bytes());
        out.push(b'"');
    }
    if let Some(s) = &d.source {
        out.extend_from_slice(b",\"source\":\"");
        out.extend_from_slice(match s.kind {
            engine::SourceType::Subscription => b"subscription",
            engine::SourceType::Grant => b"grant",
            engine::SourceType::Override => b"override",
        });
        out.push(b'"');
        if let Some(p) = s.plan {
            out.extend_from_slice(b",\"plan\":");
            write_str(out, p);
        }
    }
    if let Some(l) = d.limit {
        out.extend_from_slice(b",\"limit\":");
        write_limit(out, l);
    }
    if let Some(u) = d.used {
        out.extend_from_slice(b",\"used\":");
        write_u64(out, u);
    }
    if let Some(r) = d.remaining {
        out.extend_from_slice(b",\"remaining\":");
        write_limit(out, r);
    }
    if let Some(t) = d.resets_at {
        out.extend_from_slice(b",\"resets_at\":");
        write_time(out, t);
    }
    if let Some(b) = d.burst {
        out.extend_from_slice(b",\"burst\":");
        write_u64(out, b);
    }
    if let Some(r) = d.retry_after {
        out.extend_from_slice(b",\"retry_after\":");
        let _ = serde_json::to_writer(&mut *out, &r);
    }
    if let Some(t) = d.expires_at {
        out.extend_from_slice(b",\"expires_at\":");
        write_time(out, t);
    }
    if d.in_grace {
        out.extend_from_slice(b",\"in_grace\":true");
    }
    if d.trial {
        out.extend_from_slice(b",\"trial\":true");
    }
    if !d.upgrade.is_empty() {
        out.extend_from_slice(b",\"upgrade\":");
        write_str(out, &d.upgrade.join(","));
    }
    out.extend_from_slice(b",\"snapshot\":");
    write_str(out, d.snapshot);
    out.extend_from_slice(b"}}");
}

/// `GET /ofrep/v1/configuration`: the server's name and what it supports.
fn configuration() -> Resp {
    json(
        StatusCode::OK,
        br#"{"name":"entitled","capabilities":{"cacheInvalidation":{"polling":{"enabled":true,"minPollingIntervalMs":1000}},"flagEvaluation":{"supportedTypes":["boolean","string","int","float"]}}}"#
            .to_vec(),
    )
}

/// `GET /ofrep/v1/events`: `refetchEvaluation` after every snapshot change, with the
/// new snapshot's version as `etag` and the change count as the event `id`. A client
/// that reconnects with a `Last-Event-ID` other than the current count is told to
/// refetch at once. Ends when the server shuts down or the client goes.
fn events<S>(app: &App<S>, headers: &HeaderMap, stop: watch::Receiver<bool>) -> OfrepResp {
    let mut changes = app.decider.snapshot.changes();
    let seen = *changes.borrow_and_update();
    let missed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|id| id.trim() != seen.to_string());
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let cell = app.decider.snapshot.clone();
    tokio::spawn(async move {
        let mut stop = stop;
        // `retry`: how long an EventSource waits before reconnecting.
        if tx
            .send(Bytes::from_static(
                b"retry: 1000\n: entitled OFREP events\n\n",
            ))
            .await
            .is_err()
        {
            return;
        }
        let event = |n: u64| {
            let version = cell
                .load_full()
                .map(|s| s.version.to_string())
                .unwrap_or_default();
            let mut etag = Vec::with_capacity(24);
            write_str(&mut etag, &format!("\"{version}\""));
            let etag = String::from_utf8_lossy(&etag).into_owned();
            Bytes::from(format!(
                "id: {n}\nevent: message\ndata: {{\"type\":\"refetchEvaluation\",\"etag\":{etag}}}\n\n"
            ))
        };
        if missed && tx.send(event(seen)).await.is_err() {
            return;
        }
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let frame = tokio::select! {
                changed = changes.changed() => match changed {
                    Ok(()) => event(*changes.borrow_and_update()),
                    Err(_) => return,
                },
                _ = keepalive.tick() => Bytes::from_static(b": keep-alive\n\n"),
                _ = stop.wait_for(|s| *s) => return,
                () = tx.closed() => return,
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(Either::Right(EventBody { rx }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    // nginx buffers responses unless told not to.
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    r
}

/// The body of an event stream: the frames the stream's task sends, until it ends.
#[derive(Debug)]
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists_and_star() {
        let tag = etag(b"{}");
        assert!(matches(&tag, &tag));
        assert!(matches(&format!("W/{tag}"), &tag));
        assert!(matches(&format!("\"x\", {tag}"), &tag));
        assert!(matches("*", &tag));
        assert!(!matches("\"x\"", &tag));
        assert_ne!(etag(b"{}"), etag(b"{ }"));
    }

    #[test]
    fn context_errors_have_the_protocol_codes() {
        fn parse(body: &mut [u8]) -> Result<(), OfrepError> {
            let v = parse_body!(body);
            parse_context(&v).map(|_| ())
        }
        let code = |body: &str| parse(&mut body.as_bytes().to_vec()).map_err(|e| e.code());
        assert_eq!(code(""), Err("TARGETING_KEY_MISSING"));
        assert_eq!(code("{}"), Err("TARGETING_KEY_MISSING"));
        assert_eq!(code(r#"{"context":{}}"#), Err("TARGETING_KEY_MISSING"));
        assert_eq!(
            code(r#"{"context":{"targetingKey":""}}"#),
            Err("TARGETING_KEY_MISSING")
        );
        assert_eq!(code("{"), Err("PARSE_ERROR"));
        assert_eq!(code("[]"), Err("PARSE_ERROR"));
        assert_eq!(code(r#"{"context":[]}"#), Err("PARSE_ERROR"));
        assert_eq!(
            code(r#"{"context":{"targetingKey":7}}"#),
            Err("INVALID_CONTEXT")
        );
        assert_eq!(
            code(r#"{"context":{"targetingKey":"a","at":"2026-01-01T00:00:00Z"}}"#),
            Err("INVALID_CONTEXT")
        );
        assert_eq!(
            code(r#"{"context":{"targetingKey":"a","asset":{"id":1}}}"#),
            Err("INVALID_CONTEXT")
        );
        assert_eq!(
            code(r#"{"context":{"targetingKey":"a","n":3,"b":true,"z":null},"other":1}"#),
            Ok(())
        );
    }
}
