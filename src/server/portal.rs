//! The customer portal: `GET /portal?token=…` (a page), `GET /v1/portal/customer`
//! (the same data as JSON, `Authorization: Bearer <portal token>`), and
//! `POST /v1/portal/tokens` (an admin mints a token).
//!
//! A portal token names one customer ([`crate::portal`]); the page shows that
//! customer and nothing else, whatever else the request says. The data is what
//! `GET /v1/customers/{id}` answers (each feature decided as `/v1/check` decides it,
//! at the server's clock), reshaped for a customer: plans and their dates, each
//! feature's state, quota and seat usage against limits, renewal dates with days
//! left, and the plans that would lift a denial. Sources and overrides (who approved
//! what) stay on the operator's side.

use std::fmt::Write as _;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use super::App;
use super::api::{Resp, customer_view, json_value, read_body};
use super::error::ApiError;
use super::html::{self, esc};
use crate::live::{AdminTokens, AuthError};
use crate::portal::{self, Key, TokenError};
use crate::time::{DAY, Timestamp};
use crate::usage::UsageStore;

/// The portal's and the console's keys, and who may use the console.
#[derive(Debug)]
pub struct Web {
    /// `--portal-key-file`: signs portal tokens; `None` turns the portal off.
    pub portal_key: Option<Key>,
    /// `--admin-token-file`: who may mint portal tokens and open the console;
    /// `None` turns both off. Read again when the file changes, as for writes.
    pub admins: Option<AdminTokens>,
    /// Signs console sessions; drawn at random at start.
    pub sessions: Key,
}

impl Web {
    /// Everything off.
    pub fn off() -> Web {
        Web {
            portal_key: None,
            admins: None,
            sessions: Key::random(),
        }
    }
}

/// Whether this module answers `path`.
pub fn is_route(path: &str) -> bool {
    matches!(
        path,
        "/portal" | "/v1/portal/customer" | "/v1/portal/tokens"
    )
}

pub async fn route<S: UsageStore>(
    app: &App<S>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/portal" if get => Ok(page(app, req.uri().query()).await),
        "/v1/portal/customer" if get => customer_json(app, &req).await,
        "/v1/portal/tokens" if method == Method::POST => mint(app, req).await,
        "/v1/portal/tokens" => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "POST",
        }),
        _ => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET, HEAD",
        }),
    }
}

/// The admin token's name, or why the request may not use admin routes.
pub(super) fn admin(
    admins: Option<&AdminTokens>,
    header: Option<&str>,
) -> Result<String, ApiError> {
    let Some(admins) = admins else {
        return Err(ApiError::WritesDisabled(
            "no --admin-token-file is configured".into(),
        ));
    };
    admins.check(header).map_err(|e| match e {
        AuthError::Missing | AuthError::Wrong => ApiError::Unauthorized(e.to_string()),
        AuthError::Unreadable(why) => {
            tracing::error!("admin request refused: admin token file {why}");
            ApiError::Unavailable(format!("the admin token file cannot be read ({why})"))
        }
    })
}

fn portal_off() -> ApiError {
    ApiError::NotFound {
        path: "/v1/portal (the portal is off: no --portal-key-file)".into(),
    }
}

/// `POST /v1/portal/tokens` `{"customer": "acme", "ttl": "24h"}` → `201
/// {token, customer, expires_at, portal_path}`. Admin-authenticated and audited.
async fn mint<S: UsageStore>(app: &App<S>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let by = admin(app.web.admins.as_ref(), auth)?;
    let key = app.web.portal_key.as_ref().ok_or_else(portal_off)?;
    let body = read_body(app, req).await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("malformed JSON: {e}"),
    })?;
    let obj = v.as_object().ok_or_else(|| ApiError::BadRequest {
        field: None,
        message: "expected a JSON object with `customer` and optionally `ttl`".into(),
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["customer", "ttl"].contains(&k.as_str()))
    {
        return Err(ApiError::field(
            k,
            format!("unknown field `{k}`; expected `customer` or `ttl`"),
        ));
    }
    let customer = obj
        .get("customer")
        .ok_or_else(|| ApiError::field("customer", "missing field `customer`"))?
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::field("customer", "`customer` must be a non-empty string"))?;
    let ttl = match obj.get("ttl") {
        None => portal::DEFAULT_TTL_US,
        Some(t) => t
            .as_str()
            .and_then(|s| crate::policy::units::parse_duration(s).ok())
            .ok_or_else(|| ApiError::field("ttl", "`ttl` must be a duration (\"24h\")"))?,
    };
    let snap = app.decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    if snap.customers.get(customer).is_none() {
        return Err(ApiError::UnknownCustomer(customer.to_string()));
    }
    let now = app.decider.clock.now();
    let expires = portal::expiry(now, ttl).map_err(|e| ApiError::field("ttl", e))?;
    let token = key.mint_portal(customer, expires);
    if let Some(audit) = &app.decider.observer.audit {
        audit.portal_token(crate::audit::PortalToken {
            time: now,
            customer: customer.to_string(),
            by: by.clone(),
            expires,
        });
    }
    tracing::info!(by = %by, expires = %expires, "portal token minted");
    Ok(json_value(
        StatusCode::CREATED,
        &json!({
            "token": token,
            "customer": customer,
            "expires_at": expires,
            "portal_path": format!("/portal?token={}", html::url_param(&token)),
        }),
    ))
}

/// The customer a request's portal token names, or why there is none.
fn claims<S>(app: &App<S>, token: Option<&str>) -> Result<portal::Claims, PortalRefusal> {
    let key = app.web.portal_key.as_ref().ok_or(PortalRefusal::Off)?;
    let verified = match token {
        Some(t) => key.verify_portal(t, app.decider.clock.now()),
        None => Err(TokenError::Missing),
    };
    crate::metrics::portal_access(match &verified {
        Ok(_) => "ok",
        Err(TokenError::Missing) => "missing",
        Err(TokenError::Forged) => "forged",
        Err(TokenError::Expired(_)) => "expired",
    });
    verified.map_err(PortalRefusal::Token)
}

enum PortalRefusal {
    Off,
    Token(TokenError),
}

/// `GET /v1/portal/customer` with the portal token as a bearer token.
async fn customer_json<S: UsageStore>(
    app: &App<S>,
    req: &Request<Incoming>,
) -> Result<Resp, ApiError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let c = match claims(app, token) {
        Ok(c) => c,
        Err(PortalRefusal::Off) => return Err(portal_off()),
        Err(PortalRefusal::Token(e)) => return Err(ApiError::Unauthorized(e.to_string())),
    };
    match view(app, &c.subject).await? {
        Some(mut v) => {
            v["token_expires_at"] = json!(c.expires);
            Ok(json_value(StatusCode::OK, &v))
        }
        None => Err(ApiError::UnknownCustomer(c.subject)),
    }
}

/// `GET /portal?token=…`: the page, or a page saying why not (401 for a missing,
/// forged or expired token).
async fn page<S: UsageStore>(app: &App<S>, query: Option<&str>) -> Resp {
    let token = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let c = match claims(app, token.as_deref()) {
        Ok(c) => c,
        Err(PortalRefusal::Off) => {
            return html::notice(
                StatusCode::NOT_FOUND,
                "The customer portal is not enabled",
                "This server has no portal key configured (--portal-key-file).",
            );
        }
        Err(PortalRefusal::Token(e)) => {
            let (title, message) = match e {
                TokenError::Missing => (
                    "Sign-in link required",
                    "Open the portal with the link you were given: it carries your access token.".to_string(),
                ),
                TokenError::Forged => (
                    "This link is not valid",
                    "The access token in this link is not genuine. Ask your account team for a new link.".to_string(),
                ),
                TokenError::Expired(at) => (
                    "This link has expired",
                    format!("The access token in this link expired at {at}. Ask your account team for a new link."),
                ),
            };
            return html::notice(StatusCode::UNAUTHORIZED, title, &message);
        }
    };
    match view(app, &c.subject).await {
        Ok(Some(v)) => html::page(
            StatusCode::OK,
            html::document(
                &format!("Entitlements · {}", str_of(&v["customer"]["name"])),
                &top(&v, Some(c.expires)),
                &render(&v),
            ),
        ),
        Ok(None) => html::notice(
            StatusCode::NOT_FOUND,
            "No entitlements found",
            "This account has no entitlements on record any more.",
        ),
        Err(e) => html::notice(
            e.status(),
            "The portal is not available right now",
            &e.to_string(),
        ),
    }
}

/// The portal view of customer `id` at the server's clock, `None` if the served
/// snapshot has no such customer.
pub(super) async fn view<S: UsageStore>(app: &App<S>, id: &str) -> Result<Option<Value>, ApiError> {
    let snap = app.decider.snapshot.load_full().ok_or(ApiError::NotReady)?;
    let Some(full) = customer_view(app, &snap, id, &[], None, true).await? else {
        return Ok(None);
    };
    Ok(Some(reshape(&snap, &full)))
}

/// `GET /v1/customers/{id}`'s answer reshaped for the customer: no sources, no
/// overrides' approvals; percentages and days left worked out.
pub(super) fn reshape(snap: &crate::policy::Snapshot, full: &Value) -> Value {
    let now = Timestamp::parse(str_of(&full["at"])).unwrap_or_default();
    let days_left = |t: &Value| -> Value {
        match t.as_str().and_then(|s| Timestamp::parse(s).ok()) {
            Some(t) if t >= now => json!((t.0 - now.0) / DAY),
            Some(_) => json!(0),
            None => Value::Null,
        }
    };
    let mut plans = Vec::new();
    let mut renewal: Option<(Timestamp, Value)> = None;
    for s in full["subscriptions"].as_array().into_iter().flatten() {
        let p = json!({
            "plan": s["plan"], "status": s["status"], "starts": s["starts"], "ends": s["ends"],
            "grace_ends": s["grace_ends"], "quantity": s["quantity"], "trial": s["trial"],
            "days_left": days_left(&s["ends"]),
        });
        let live = matches!(str_of(&s["status"]), "active" | "in_grace");
        if let (true, Some(ends)) = (
            live,
            s["ends"].as_str().and_then(|e| Timestamp::parse(e).ok()),
        ) && renewal.as_ref().is_none_or(|(t, _)| ends < *t)
        {
            renewal = Some((ends, p.clone()));
        }
        plans.push(p);
    }
    let mut upgrades: Vec<String> = Vec::new();
    let mut features = Vec::new();
    for e in full["entitlements"].as_array().into_iter().flatten() {
        let name = str_of(&e["feature"]);
        let f = snap.feature_id(name).map(|id| snap.feature(id));
        let mut out = json!({
            "feature": name,
            "description": f.and_then(|f| f.description.as_deref()),
            "unit": f.and_then(|f| f.unit.as_deref()),
            "kind": e["kind"],
            "allowed": e["allowed"],
            "reason": e["reason"],
            "state": state(e),
        });
        for k in [
            "value",
            "limit",
            "burst",
            "used",
            "remaining",
            "resets_at",
            "expires_at",
            "in_grace",
            "trial",
            "upgrade",
        ] {
            if let Some(v) = e.get(k).filter(|v| !v.is_null()) {
                out[k] = v.clone();
            }
        }
        if let (Some(used), Some(limit)) = (e["used"].as_u64(), e["limit"].as_u64())
            && e["kind"] != "rate"
        {
            out["percent"] = json!(html::percent(used, limit));
        }
        for u in e["upgrade"].as_array().into_iter().flatten() {
            if let Some(u) = u.as_str()
                && !upgrades.iter().any(|x| x == u)
            {
                upgrades.push(u.to_string());
            }
        }
        features.push(out);
    }
    // What the customer has first; what a plan would add after.
    features.sort_by_key(|f| f["state"] == "not included");
    json!({
        "customer": { "id": full["id"], "name": full["name"] },
        "now": full["at"],
        "snapshot": full["snapshot"],
        "plans": plans,
        "renewal": renewal.map(|(_, p)| p),
        "features": features,
        "upgrade_options": upgrades,
    })
}

/// A feature's state in words a customer reads.
fn state(e: &Value) -> &'static str {
    match (
        e["allowed"].as_bool().unwrap_or(false),
        str_of(&e["reason"]),
    ) {
        (true, _) if e["in_grace"] == true => "in grace period",
        (true, _) if e["trial"] == true => "trial",
        (true, _) => "active",
        (false, "quota_exhausted") => "used up",
        (false, "seats_exhausted") => "all seats in use",
        (false, "rate_limited") => "rate limited now",
        (false, "expired") => "expired",
        (false, "not_yet_active") => "not started yet",
        (false, "out_of_scope") => "not for this scope",
        (false, _) => "not included",
    }
}

pub(super) fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A date as a customer reads it: the day, and the time when it is not midnight.
pub(super) fn day(v: &Value) -> String {
    let s = str_of(v);
    match s.strip_suffix("T00:00:00Z") {
        Some(d) => d.to_string(),
        None => s.replace('T', " ").replace('Z', " UTC"),
    }
}

fn top(v: &Value, token_expires: Option<Timestamp>) -> String {
    let name = str_of(&v["customer"]["name"]);
    let id = str_of(&v["customer"]["id"]);
    let mut s = format!(
        "<h1 id=\"customer-name\">{}</h1><span class=\"sub\">Account <code id=\"customer-id\">{}</code></span>",
        esc(if name.is_empty() { id } else { name }),
        esc(id)
    );
    let _ = write!(
        s,
        "<span class=\"sub\">As of {}</span>",
        esc(&day(&v["now"]))
    );
    if let Some(t) = token_expires {
        let _ = write!(
            s,
            "<span class=\"sub\">This link works until {}</span>",
            esc(&day(&json!(t)))
        );
    }
    s
}

/// The body of the portal page (also the top of the console's customer page).
pub(super) fn render(v: &Value) -> String {
    let mut s = String::new();
    // Renewal first: the date a customer most needs.
    s.push_str("<section class=\"card\" id=\"renewal\"><h2>Renewal</h2>");
    match v["renewal"].as_object() {
        Some(r) => {
            let days = r.get("days_left").and_then(Value::as_i64).unwrap_or(0);
            let plan = plan_label(&Value::Object(r.clone()));
            let what = if r.get("status").and_then(Value::as_str) == Some("in_grace") {
                "ended and is in its grace period; renew by"
            } else if r.get("trial") == Some(&Value::Bool(true)) {
                "trial ends on"
            } else {
                "renews or expires on"
            };
            let _ = write!(
                s,
                "<p class=\"big\" data-renewal=\"{d}\">{d}</p><p>Your {plan} plan {what} <strong>{d}</strong>: <span data-days-left=\"{days}\">{days} day{plural} left</span>.</p>",
                d = esc(&day(r.get("ends").unwrap_or(&Value::Null))),
                plan = esc(&plan),
                plural = if days == 1 { "" } else { "s" },
            );
        }
        None => s.push_str("<p>No plan of yours has an end date: nothing to renew.</p>"),
    }
    s.push_str("</section>");

    s.push_str("<section class=\"card\" id=\"plans\"><h2>Plans</h2><table class=\"wide\"><thead><tr><th>Plan</th><th>Status</th><th>Starts</th><th>Ends</th><th>Days left</th></tr></thead><tbody>");
    let plans = v["plans"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for p in plans {
        let qty = p["quantity"].as_u64().unwrap_or(1);
        let mut label = plan_label(p);
        if qty > 1 {
            let _ = write!(label, " × {qty}");
        }
        if p["trial"] == true {
            label.push_str(" (trial)");
        }
        let status = str_of(&p["status"]).replace('_', " ");
        let ends = if p["ends"].is_null() {
            "no end date".to_string()
        } else {
            day(&p["ends"])
        };
        let days = match p["days_left"].as_i64() {
            Some(d) if str_of(&p["status"]) != "expired" => d.to_string(),
            _ => "—".into(),
        };
        let _ = write!(
            s,
            "<tr data-plan=\"{pl}\"><td data-label=\"Plan\">{l}</td><td data-label=\"Status\">{st}</td><td data-label=\"Starts\">{a}</td><td data-label=\"Ends\">{e}</td><td data-label=\"Days left\">{days}</td></tr>",
            pl = esc(str_of(&p["plan"])),
            l = esc(&label),
            st = esc(&status),
            a = esc(&day(&p["starts"])),
            e = esc(&ends),
        );
    }
    if plans.is_empty() {
        s.push_str("<tr><td colspan=\"5\">No plans.</td></tr>");
    }
    s.push_str("</tbody></table></section>");

    s.push_str(
        "<section class=\"card\" id=\"features\"><h2>Features and usage</h2><div class=\"grid\">",
    );
    for f in v["features"].as_array().into_iter().flatten() {
        s.push_str(&feature_card(f));
    }
    s.push_str("</div></section>");

    let ups = v["upgrade_options"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    s.push_str("<section class=\"card\" id=\"upgrades\"><h2>Upgrade options</h2>");
    if ups.is_empty() {
        s.push_str("<p>You have every feature a plan offers.</p>");
    } else {
        s.push_str("<p>These plans would add what you do not have now:</p><ul>");
        for u in ups {
            let _ = write!(s, "<li data-upgrade=\"{0}\">{0}</li>", esc(str_of(u)));
        }
        s.push_str("</ul>");
    }
    s.push_str("</section>");
    s
}

fn plan_label(p: &Value) -> String {
    str_of(&p["plan"]).to_string()
}

fn feature_card(f: &Value) -> String {
    let name = str_of(&f["feature"]);
    let state = str_of(&f["state"]);
    let class = match state {
        "active" | "trial" => "on",
        "in grace period" | "not started yet" => "warn",
        "not included" | "expired" | "not for this scope" => "info",
        _ => "off",
    };
    let mut s = format!(
        "<div class=\"feature\" data-feature=\"{n}\" data-state=\"{st}\"><h3>{n}</h3>",
        n = esc(name),
        st = esc(state)
    );
    if let Some(d) = f["description"].as_str() {
        let _ = write!(s, "<p class=\"desc\">{}</p>", esc(d));
    }
    let _ = write!(s, "<span class=\"state {class}\">{}</span>", esc(state));
    let unit = f["unit"].as_str();
    let resets = f["resets_at"].as_str().map(|r| day(&json!(r)));
    match (str_of(&f["kind"]), f["used"].as_u64(), &f["limit"]) {
        ("quota" | "seats", Some(used), Value::Number(n)) => {
            let limit = n.as_u64().unwrap_or(0);
            let label = if f["kind"] == "seats" {
                Some(unit.unwrap_or("seats"))
            } else {
                unit
            };
            s.push_str(&html::usage_bar(
                name,
                used,
                limit,
                label,
                resets.as_deref(),
            ));
        }
        ("quota" | "seats", used, Value::String(_)) => {
            let _ = write!(
                s,
                "<p class=\"figure\" data-usage=\"{}\">{} used · unlimited</p>",
                esc(name),
                used.unwrap_or(0)
            );
        }
        ("rate", _, Value::Number(n)) => {
            let _ = write!(s, "<p class=\"figure\">Rate limit {n}");
            if let Some(b) = f["burst"].as_u64() {
                let _ = write!(s, ", bursts of {b}");
            }
            s.push_str("</p>");
        }
        ("value", _, _) if !f["value"].is_null() => {
            let value = match &f["value"] {
                Value::String(v) => v.clone(),
                other => other.to_string(),
            };
            let unit = unit.map(|u| format!(" {u}")).unwrap_or_default();
            let _ = write!(
                s,
                "<p class=\"figure\">Value: <strong>{}{}</strong></p>",
                esc(&value),
                esc(&unit)
            );
        }
        _ => {}
    }
    if let Some(t) = f["expires_at"].as_str() {
        let _ = write!(
            s,
            "<p class=\"figure muted\">Until {}</p>",
            esc(&day(&json!(t)))
        );
    }
    if let Some(ups) = f["upgrade"].as_array().filter(|u| !u.is_empty()) {
        let names: Vec<String> = ups.iter().map(|u| esc(str_of(u))).collect();
        let _ = write!(
            s,
            "<p class=\"figure\">Available with: {}</p>",
            names.join(", ")
        );
    }
    s.push_str("</div>");
    s
}
