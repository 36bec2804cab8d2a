//! Routing and handlers. Each handler turns a request into JSON; errors become HTTP
//! statuses only in `ApiError::response`.

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};

use super::App;
use super::error::ApiError;
use super::request::{self, MAX_BATCH, Parsed, Shape};
use crate::decide::{DecideError, Query};
use crate::engine::{self, Decision, Op, Reason};
use crate::policy::Kind;
use crate::time::Timestamp;
use crate::usage::{Ack, Answered, IdemKey, SettleAction, StepMeta, UsageStore};
use crate::usage::{parse_reservation, reservation_name};

pub(super) type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn json_value(status: StatusCode, v: &impl serde::Serialize) -> Resp {
    json(status, serde_json::to_vec(v).unwrap_or_default())
}

/// Marks an answer repeated from an idempotency key (`Idempotent-Replayed: true`,
/// as Stripe does), so a client can tell a replay from a fresh answer.
fn mark_replay(mut r: Resp, replayed: bool) -> Resp {
    if replayed {
        r.headers_mut().insert(
            "idempotent-replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    r
}

/// Routes one request.
pub async fn handle<S: UsageStore>(app: &App<S>, req: Request<Incoming>) -> Resp {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let decision_route = matches!(
        path.as_str(),
        "/v1/check"
            | "/v1/consume"
            | "/v1/reserve"
            | "/v1/batch"
            | "/v1/seats/acquire"
            | "/v1/seats/release"
    ) || path.starts_with("/v1/reservations/")
        || is_authz(&path);
    let result = route(app, &method, &path, req).await;
    if decision_route {
        app.decider
            .observer
            .metrics
            .duration(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::http_error(route_label(&path), e.status().as_u16());
            e.response()
        }
    }
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/check" => "check",
        "/v1/consume" => "consume",
        "/v1/reserve" => "reserve",
        "/v1/batch" => "batch",
        "/v1/test-clock" => "test_clock",
        "/v1/seats/acquire" => "seat_acquire",
        "/v1/seats/release" => "seat_release",
        "/v1/expiring" => "expiring",
        "/v1/reports/usage" => "reports",
        "/v1/status" => "status",
        "/healthz" | "/readyz" => "health",
        "/metrics" => "metrics",
        "/portal" | "/v1/portal/customer" => "portal",
        "/v1/portal/tokens" => "portal_tokens",
        p if p.starts_with("/console") => "console",
        p if p.starts_with("/v1/customers/") => "customers",
        p if p.starts_with("/v1/reservations/") => "reservations",
        p if is_authz(p) => "authz",
        _ => "other",
    }
}

async fn route<S: UsageStore>(
    app: &App<S>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let allow = |allow: &'static str| ApiError::MethodNotAllowed {
        method: method.to_string(),
        allow,
    };
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/v1/check" | "/v1/consume" | "/v1/reserve" | "/v1/seats/acquire" | "/v1/seats/release"
        | "/v1/batch" => {
            if method != Method::POST {
                return Err(allow("POST"));
            }
            let mut body = read_body(app, req).await?;
            let shape = match path {
                "/v1/check" => Shape::Check,
                "/v1/consume" => Shape::Consume,
                "/v1/reserve" => Shape::Reserve,
                "/v1/seats/acquire" => Shape::Seat(Op::SeatAcquire),
                "/v1/seats/release" => Shape::Seat(Op::SeatRelease),
                _ => return batch(app, &mut body).await,
            };
            single(app, shape, &mut body).await
        }
        p if is_authz(p) => super::authz::authz(app, method, p, &req).await,
        p if p.starts_with("/v1/reservations/") => {
            if method != Method::POST {
                return Err(allow("POST"));
            }
            let rest = &p["/v1/reservations/".len()..];
            let (id, commit) = match rest.rsplit_once('/') {
                Some((id, "commit")) => (id, true),
                Some((id, "release")) => (id, false),
                _ => {
                    return Err(ApiError::NotFound {
                        path: path.to_string(),
                    });
                }
            };
            let id = id.to_string();
            let mut body = read_body(app, req).await?;
            settle(app, &id, commit, &mut body).await
        }
        "/v1/test-clock" if app.test_clock.is_some() => {
            if method != Method::POST {
                return Err(allow("POST"));
            }
            let mut body = read_body(app, req).await?;
            test_clock(app, &mut body).await
        }
        "/healthz" if get => Ok(json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())),
        "/readyz" if get => Ok(readyz(app)),
        "/v1/status" if get => Ok(status(app)),
        "/v1/expiring" if get => expiring(app, req.uri().query()),
        "/v1/reports/usage" if get => usage_report(app, req.uri().query()).await,
        "/metrics" if get => Ok(metrics(app)),
        p if super::portal::is_route(p) => super::portal::route(app, method, p, req).await,
        p if super::console::is_route(p) => super::console::route(app, method, p, req).await,
        p if super::customers::is_route(method, p) => {
            super::customers::route(app, method, p, req).await
        }
        p if p.starts_with("/v1/customers/") && p.ends_with("/denials") && get => {
            let raw = &p["/v1/customers/".len()..p.len() - "/denials".len()];
            denials(app, raw).await
        }
        p if p.starts_with("/v1/customers/") && get => {
            customer(app, &p["/v1/customers/".len()..], req.uri().query()).await
        }
        "/healthz" | "/readyz" | "/v1/status" | "/v1/expiring" | "/v1/reports/usage"
        | "/metrics" => Err(allow("GET, HEAD")),
        p if p.starts_with("/v1/customers/") => Err(allow("GET, HEAD, PUT, DELETE")),
        _ => Err(ApiError::NotFound {
            path: path.to_string(),
        }),
    }
}

fn is_authz(path: &str) -> bool {
    path == "/v1/authz" || path.starts_with("/v1/authz/")
}

pub(super) async fn read_body<S>(
    app: &App<S>,
    req: Request<Incoming>,
) -> Result<Vec<u8>, ApiError> {
    let limit = app.limits.body_limit;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let within = app.limits.body_read_timeout;
    let read = tokio::time::timeout(within, Limited::new(req.into_body(), limit).collect());
    match read.await.map_err(|_| ApiError::BodyTimeout(within))? {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge { limit })
        }
        Err(e) => Err(ApiError::BadRequest {
            field: None,
            message: format!("could not read the request body: {e}"),
        }),
    }
}

fn context<'p>(p: &'p Parsed<'_>) -> Vec<(&'p str, &'p str)> {
    p.context
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .collect()
}

/// The decision `p` asks for, with `ctx` its context pairs.
fn query<'p>(p: &'p Parsed<'_>, ctx: &'p [(&'p str, &'p str)]) -> Query<'p> {
    Query {
        op: p.op,
        req: engine::Request {
            customer: &p.customer,
            feature: &p.feature,
            amount: p.amount,
            context: ctx,
            at: p.at,
            holder: p.holder.as_deref(),
        },
        idempotency: p.idempotency_key.as_deref().map(|key| IdemKey {
            key,
            fingerprint: p.fingerprint(),
        }),
        ttl_us: p.ttl_us,
    }
}

/// One decision: within one synchronous step on the thread's cached snapshot when the
/// store can answer at once, else awaiting it with an owned snapshot.
async fn single<S: UsageStore>(
    app: &App<S>,
    shape: Shape,
    body: &mut [u8],
) -> Result<Resp, ApiError> {
    let parsed = request::parse_body(body);
    let mut v = match parsed {
        Ok(v) => v,
        Err(_) => return Err(request::refused(parsed.err(), body)),
    };
    let wanted = request::take_min_revision(&mut v)?;
    fresh(app, wanted).await?;
    let p = request::parse_request(&v, shape)?;
    let ctx = context(&p);
    let q = query(&p, &ctx);
    let mut out = Vec::with_capacity(512);
    let replayed = decide_with(app, &q, |d| {
        d.write_json(&mut out);
        d.idempotent_replay
    })
    .await?;
    Ok(mark_replay(json(StatusCode::OK, out), replayed))
}

/// Decides `q` and hands the decision to `f` (which encodes it): within one
/// synchronous step on the thread's cached snapshot when the store can answer at
/// once, else awaiting the store with an owned snapshot. Returns once the answer is
/// acknowledged by the store.
pub(super) async fn decide_with<S: UsageStore, R>(
    app: &App<S>,
    q: &Query<'_>,
    mut f: impl FnMut(&Decision<'_>) -> R,
) -> Result<R, ApiError> {
    let decider = &app.decider;
    let now = decider.clock.now();
    let mut ack = Ack::default();
    let mut answer = None;
    decider.snapshot.with(|snap| {
        let snap = snap.ok_or(DecideError::NotReady)?;
        let mut d = Decision::blank(q.req.feature);
        if decider.decide_now(snap, q, now, &mut d, &mut ack)? {
            answer = Some(f(&d));
        }
        Ok::<_, DecideError>(())
    })?;
    let answer = match answer {
        Some(a) => a,
        None => {
            let snap = decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
            let mut d = Decision::blank(q.req.feature);
            decider.decide(&snap, q, now, &mut d, &mut ack).await?;
            f(&d)
        }
    };
    if ack.0.is_some() {
        decider.store.ack(ack).await?;
    }
    Ok(answer)
}

/// Answers `stale` when this node has not applied the write `wanted` names (the
/// applied revision only grows, so a decision made after this check sees it).
async fn fresh<S>(app: &App<S>, wanted: Option<u64>) -> Result<(), ApiError> {
    let Some(w) = wanted else {
        return Ok(());
    };
    let applied = app.decider.snapshot.with(|s| s.map(|s| s.revision));
    if applied.is_some_and(|a| a >= w) {
        return Ok(());
    }
    super::customers::wait_for(&app.live, w).await;
    let applied = app.decider.snapshot.with(|s| s.map(|s| s.revision));
    super::customers::fresh(applied, wanted)
}

/// `{requests: [...]}` → `{results: [...]}`, in order; a bad item is an error result in
/// its place and the others still answer. All items see the same snapshot.
async fn batch<S: UsageStore>(app: &App<S>, body: &mut [u8]) -> Result<Resp, ApiError> {
    let parsed = request::parse_body(body);
    let mut v = match parsed {
        Ok(v) => v,
        Err(_) => return Err(request::refused(parsed.err(), body)),
    };
    let wanted = request::take_min_revision(&mut v)?;
    use simd_json::prelude::*;
    let obj = v.as_object().ok_or_else(|| ApiError::BadRequest {
        field: None,
        message: "expected a JSON object with `requests`".into(),
    })?;
    if let Some(k) = obj.keys().find(|k| k.as_ref() != "requests") {
        return Err(ApiError::field(
            k,
            format!("unknown field `{k}`; expected `requests`"),
        ));
    }
    let items = obj
        .get("requests")
        .ok_or_else(|| ApiError::field("requests", "missing field `requests`"))?
        .as_array()
        .ok_or_else(|| ApiError::field("requests", "`requests` must be an array"))?;
    // Collected up front: the container's iterator is not `Send` across the awaits below.
    let items: Vec<&simd_json::BorrowedValue> = items.iter().collect();
    if items.len() > MAX_BATCH {
        return Err(ApiError::field(
            "requests",
            format!(
                "a batch holds at most {MAX_BATCH} requests, found {}",
                items.len()
            ),
        ));
    }
    fresh(app, wanted).await?;
    let decider = &app.decider;
    let snap = decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    super::customers::fresh(Some(snap.revision), wanted)?;
    let now = decider.clock.now();
    let mut out = Vec::with_capacity(64 + items.len() * 256);
    let mut ack = Ack::default();
    out.extend_from_slice(b"{\"results\":[");
    for (i, item) in items.as_slice().iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mark = out.len();
        let result = match request::parse_request(item, Shape::BatchItem) {
            Ok(p) => {
                let ctx = context(&p);
                let q = query(&p, &ctx);
                let mut d = Decision::blank(q.req.feature);
                match decider.decide(&snap, &q, now, &mut d, &mut ack).await {
                    Ok(_) => {
                        d.write_json(&mut out);
                        Ok(())
                    }
                    Err(e) => Err(ApiError::from(e)),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                out.truncate(mark);
                let mut body = e.body();
                body["index"] = serde_json::json!(i);
                out.extend_from_slice(
                    &serde_json::to_vec(&serde_json::json!({ "error": body })).unwrap_or_default(),
                );
            }
        }
    }
    out.extend_from_slice(b"]}");
    // One acknowledgement for the whole batch: its changes share one sync.
    if ack.0.is_some() {
        decider.store.ack(ack).await?;
    }
    Ok(json(StatusCode::OK, out))
}

fn readyz<S: UsageStore>(app: &App<S>) -> Resp {
    let replica = app.live.replica.as_ref().map_or(Ok(()), |r| r.ready());
    if let Err(reason) = app.decider.store.ready().and(replica) {
        return json_value(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "ready": false, "reason": reason }),
        );
    }
    match app.decider.snapshot.load_full() {
        Some(s) => json_value(
            StatusCode::OK,
            &serde_json::json!({ "ready": true, "snapshot": &*s.version }),
        ),
        None => {
            let st = app.reload.status();
            json_value(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "ready": false, "reason": not_ready_reason(&st), "last_error": st.last_error }),
            )
        }
    }
}

/// Why no snapshot is served: the first error of the last load, if there is one.
fn not_ready_reason(st: &crate::reload::Status) -> String {
    match st.last_error.as_ref().and_then(|e| e.errors.first()) {
        Some(first) => format!("no policy snapshot loaded yet: {first}"),
        None => "no policy snapshot loaded yet".into(),
    }
}

fn status<S>(app: &App<S>) -> Resp {
    let (st, snap) = app.reload.observe(|| app.decider.snapshot.load_full());
    let now = app.decider.clock.now();
    let snap_revision = snap.as_ref().map_or(0, |s| s.revision);
    let snapshot = snap.map(|s| {
        serde_json::json!({
            "version": &*s.version,
            "loaded_at": st.loaded_at,
            "features": s.catalog.features.len(),
            "plans": s.plans().count(),
            "groups": s.catalog.bundles.iter().filter(|b| !b.is_plan).count(),
            "customers": s.customers.len(),
            "routes": s.catalog.routes.len(),
            "overrides_active": s.overrides_active(now),
            "files": &*s.files,
        })
    });
    json_value(
        StatusCode::OK,
        &serde_json::json!({
            "ready": snapshot.is_some(),
            "snapshot": snapshot,
            "generation": st.generation,
            "reloads_ok": st.reloads_ok,
            "reloads_failed": st.reloads_failed,
            "reloads_held": st.reloads_held,
            "last_error": st.last_error,
            "held": st.held,
            "last_load": st.last_load,
            "revision": snap_revision,
            "customers_api": super::customers::status(&app.live),
        }),
    )
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn expiring<S>(app: &App<S>, query: Option<&str>) -> Result<Resp, ApiError> {
    let mut within = "90d".to_string();
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "within" => within = v,
            other => {
                return Err(ApiError::field(
                    other,
                    format!("unknown parameter `{other}`; expected `within`"),
                ));
            }
        }
    }
    let us = crate::policy::units::parse_duration(&within)
        .map_err(|e| ApiError::field("within", format!("`within`: {e}")))?;
    let snap = app.decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    let now = app.decider.clock.now();
    let items = engine::report::expiring(&snap, now, us);
    Ok(json_value(
        StatusCode::OK,
        &serde_json::json!({ "now": now, "within": within, "snapshot": &*snap.version, "items": items }),
    ))
}

/// The "monitor and optimize" report: limits hit, entitlements unused, overrides and
/// denials since `?since=` (a date or RFC 3339 time; all the days kept without it),
/// up to now. Answers once every decision made before the request is counted.
async fn usage_report<S>(app: &App<S>, query: Option<&str>) -> Result<Resp, ApiError> {
    let mut since = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "since" => {
                since = Some(
                    Timestamp::parse(&v)
                        .map_err(|e| ApiError::field("since", format!("`since`: {e}")))?,
                );
            }
            other => {
                return Err(ApiError::field(
                    other,
                    format!("unknown parameter `{other}`; expected `since`"),
                ));
            }
        }
    }
    Ok(json_value(
        StatusCode::OK,
        &usage_report_since(app, since).await?,
    ))
}

/// The usage report from `since` (all the days kept without it) until now, once
/// every decision made before the call is counted (the console draws it too).
pub(super) async fn usage_report_since<S>(
    app: &App<S>,
    since: Option<Timestamp>,
) -> Result<crate::insights::UsageReport, ApiError> {
    let insights = app.insights.clone().ok_or(ApiError::NotReady)?;
    insights.sync().await;
    let (totals, denials) = {
        let agg = insights.read();
        (agg.totals(since), agg.denials(since))
    };
    let snap = app.decider.snapshot.load_full();
    let until = app.decider.clock.now();
    // Joining with a snapshot of a million customers takes a while: off the workers.
    tokio::task::spawn_blocking(move || {
        crate::insights::build(&totals, &denials, snap.as_deref(), since, until)
    })
    .await
    .map_err(|_| ApiError::NotReady)
}

/// A customer's recent denials, newest first (the last
/// [`crate::insights::RECENT_PER_CUSTOMER`], for customers denied recently).
async fn denials<S>(app: &App<S>, raw_id: &str) -> Result<Resp, ApiError> {
    let id: Cow<str> = percent_encoding::percent_decode_str(raw_id).decode_utf8_lossy();
    Ok(json_value(StatusCode::OK, &recent_denials(app, &id).await?))
}

/// `{"customer", "denials": [...]}`, newest first, once every decision made before
/// the call is counted (the console shows it too).
pub(super) async fn recent_denials<S>(
    app: &App<S>,
    id: &str,
) -> Result<serde_json::Value, ApiError> {
    let insights = app.insights.clone().ok_or(ApiError::NotReady)?;
    insights.sync().await;
    let list = insights.read().recent(id);
    Ok(serde_json::json!({ "customer": id, "denials": list }))
}

/// Every entitlement of a customer now: value or limit, usage, resets, expiry, source.
/// Query parameters are the context for scoped grants (`?asset=chiller-7`); `at`
/// evaluates as of another time.
async fn customer<S: UsageStore>(
    app: &App<S>,
    raw_id: &str,
    query: Option<&str>,
) -> Result<Resp, ApiError> {
    let id: Cow<str> = percent_encoding::percent_decode_str(raw_id).decode_utf8_lossy();
    let pairs = query_pairs(query);
    let mut at = None;
    let mut wanted = None;
    let mut ctx: Vec<(&str, &str)> = Vec::new();
    for (k, v) in &pairs {
        if k == "at" {
            at =
                Some(Timestamp::parse(v).map_err(|e| ApiError::field("at", format!("`at`: {e}")))?);
        } else if k == "min_revision" {
            wanted = Some(v.parse::<u64>().map_err(|_| {
                ApiError::field(
                    "min_revision",
                    "`min_revision` must be a non-negative integer (the `revision` a write answered)",
                )
            })?);
        } else {
            ctx.push((k, v));
        }
    }
    fresh(app, wanted).await?;
    let snap = app.decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    match customer_view(app, &snap, &id, &ctx, at, false).await? {
        Some(v) => Ok(json_value(StatusCode::OK, &v)),
        None => Ok(json_value(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": { "code": "unknown_customer", "message": format!("no customer `{id}`"), "field": "id" } }),
        )),
    }
}

/// What `GET /v1/customers/{id}` answers, `None` for a customer `snap` does not
/// have. Each feature is decided as `/v1/check` decides it (a view: not counted or
/// audited). With `upgrades`, features the customer does not have but a plan would
/// give (`upgrade` not empty) are listed too, as the portal shows them.
pub(super) async fn customer_view<S: UsageStore>(
    app: &App<S>,
    snap: &crate::policy::Snapshot,
    id: &str,
    ctx: &[(&str, &str)],
    at: Option<Timestamp>,
    upgrades: bool,
) -> Result<Option<serde_json::Value>, ApiError> {
    let now = app.decider.clock.now();
    let Some(c) = snap.customers.get(id) else {
        return Ok(None);
    };
    let t = at.unwrap_or(now);
    let mut entitlements = Vec::new();
    let mut ack = Ack::default();
    for f in &snap.catalog.features {
        let req = engine::Request {
            context: ctx,
            at,
            ..engine::Request::new(id, &f.name)
        };
        let mut d = Decision::blank(&f.name);
        // A view, not a decision asked for: not counted or audited.
        let q = Query::new(Op::Check, req);
        app.decider
            .evaluate(snap, &q, now, &mut d, &mut ack)
            .await?;
        // A summary shows what the customer has or had, not every feature there is.
        let relevant = d.source.is_some()
            || matches!(
                d.reason,
                Reason::Expired | Reason::NotYetActive | Reason::OutOfScope
            );
        // Seats: a check with no holder says whether one more seat fits.
        if relevant || (f.kind == Kind::Seats && d.allowed) || (upgrades && !d.upgrade.is_empty()) {
            entitlements.push(serde_json::to_value(&d).unwrap_or_default());
        }
    }
    if ack.0.is_some() {
        app.decider.store.ack(ack).await?;
    }
    let (subscriptions, overrides) = engine::report::records(snap, &c, t);
    Ok(Some(serde_json::json!({
        "id": c.id,
        "name": c.name,
        "at": t,
        "snapshot": &*snap.version,
        "subscriptions": subscriptions,
        "overrides": overrides,
        "entitlements": entitlements,
    })))
}

fn metrics<S>(app: &App<S>) -> Resp {
    let Some(handle) = &app.prometheus else {
        return ApiError::NotFound {
            path: "/metrics".into(),
        }
        .response();
    };
    if let Some(snap) = app.decider.snapshot.load_full() {
        crate::metrics::refresh_time_gauges(&snap, app.decider.clock.now());
    }
    let mut r = Response::new(Full::new(Bytes::from(handle.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// `POST /v1/reservations/{id}/commit` (`{amount}`) and `/release`: the final usage.
async fn settle<S: UsageStore>(
    app: &App<S>,
    raw_id: &str,
    commit: bool,
    body: &mut [u8],
) -> Result<Resp, ApiError> {
    let parsed;
    let b = if body.iter().all(|b| b.is_ascii_whitespace()) && !commit {
        request::SettleBody {
            amount: None,
            idempotency_key: None,
        }
    } else {
        let result = request::parse_body(body);
        parsed = match result {
            Ok(v) => v,
            Err(_) => return Err(request::refused(result.err(), body)),
        };
        request::parse_settle(&parsed, commit)?
    };
    let id = parse_reservation(raw_id).ok_or_else(|| {
        ApiError::field(
            "reservation",
            format!("`{raw_id}` is not a reservation id (rsv_ and 32 hex digits)"),
        )
    })?;
    let snap = app.decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    let now = app.decider.clock.now();
    let (action, op) = match b.amount {
        Some(n) => (SettleAction::Commit(n), "commit"),
        None => (SettleAction::Release, "release"),
    };
    let fingerprint = {
        let mut h = blake3::Hasher::new();
        h.update(op.as_bytes());
        h.update(&id.to_le_bytes());
        h.update(&b.amount.unwrap_or(0).to_le_bytes());
        let mut out = [0; 8];
        out.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(out)
    };
    let meta = StepMeta {
        snapshot: &snap.version,
        idempotency: b
            .idempotency_key
            .as_deref()
            .map(|key| IdemKey { key, fingerprint }),
        ttl_us: None,
    };
    let Answered {
        answer: s,
        replayed,
    } = app.decider.store.settle(id, action, &meta, now).await?;
    if !s.outcome.found {
        return Err(ApiError::UnknownReservation(reservation_name(id)));
    }
    let mut d = crate::decide::settled(&snap, &s, id, op, now);
    d.idempotent_replay = replayed;
    let mut out = Vec::with_capacity(512);
    d.write_json(&mut out);
    Ok(mark_replay(json(StatusCode::OK, out), replayed))
}

/// `POST /v1/test-clock` (only with `--test-clock`): `{"advance": "6m"}` or
/// `{"set": "2026-01-01T00:00:00Z"}` moves the served clock; reservations that expire
/// return to their quotas at once, and renewal notices are scanned for at once (the
/// answer's `notices` counts those emitted; the events are on disk when it comes).
async fn test_clock<S: UsageStore>(app: &App<S>, body: &mut [u8]) -> Result<Resp, ApiError> {
    use simd_json::prelude::*;
    let Some(clock) = &app.test_clock else {
        return Err(ApiError::NotFound {
            path: "/v1/test-clock".into(),
        });
    };
    let parsed = request::parse_body(body);
    let v = match parsed {
        Ok(v) => v,
        Err(_) => return Err(request::refused(parsed.err(), body)),
    };
    let obj = v.as_object().ok_or_else(|| ApiError::BadRequest {
        field: None,
        message: "expected a JSON object with `advance` or `set`".into(),
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["advance", "set"].contains(&k.as_ref()))
    {
        return Err(ApiError::field(
            k,
            format!("unknown field `{k}`; expected `advance` or `set`"),
        ));
    }
    if let Some(a) = obj.get("advance") {
        let us = a
            .as_str()
            .and_then(|s| crate::policy::units::parse_duration(s).ok())
            .ok_or_else(|| ApiError::field("advance", "`advance` must be a duration (\"6m\")"))?;
        clock.advance(us);
    }
    if let Some(t) = obj.get("set") {
        let t = t
            .as_str()
            .and_then(|s| Timestamp::parse(s).ok())
            .ok_or_else(|| ApiError::field("set", "`set` must be an RFC 3339 timestamp"))?;
        clock.set(t);
    }
    let now = app.decider.clock.now();
    let expired = app.decider.store.expire(now);
    let mut v = serde_json::json!({ "now": now, "reservations_expired": expired });
    if let Some(n) = &app.notices {
        let scan = tokio::time::timeout(std::time::Duration::from_secs(10), n.scan()).await;
        v["notices"] = match scan {
            Ok(Some(r)) => r.emitted.into(),
            _ => serde_json::Value::Null,
        };
    }
    Ok(json_value(StatusCode::OK, &v))
}
