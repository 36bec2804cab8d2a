//! The operator console at `/console`: the served snapshot and its reload history
//! (with each failed load's `file:line:col` errors), customer search, one customer's
//! full picture, renewals coming up, and the usage report as charts.
//!
//! It is off unless `--admin-token-file` is configured, and every page needs an
//! admin: either `Authorization: Bearer <admin token>` (scripts, curl) or a console
//! session. A browser gets a session by posting an admin token to the login form
//! (`POST /console/login`); the answer sets the cookie `entitled_console`, an HMAC-
//! signed "admin token name + expiry" ([`crate::portal::Key::mint_session`]) that is
//! `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it)
//! and scoped to `/console`. A session lasts [`SESSION_TTL_US`] of wall-clock time,
//! ends when the process restarts, and ends when its token's name leaves the token
//! file. The console only reads; its two writes (log in, log out) also refuse a
//! request whose `Origin` is another site, so a cross-site form cannot use them.

use std::fmt::Write as _;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::App;
use super::api::{Resp, customer_view, read_body};
use super::error::ApiError;
use super::html::{self, esc, url_param};
use super::portal::{day, render, reshape, str_of};
use crate::time::{DAY, HOUR, Timestamp};
use crate::usage::UsageStore;

/// The session cookie's name.
pub const COOKIE: &str = "entitled_console";
/// How long a console session lasts (wall-clock time, not the test clock: moving
/// the served clock a month ahead must not sign the operator out).
pub const SESSION_TTL_US: i64 = 12 * HOUR;
/// Most customers a search lists.
const SEARCH_LIMIT: usize = 50;
/// Most renewals listed (the counts cover all).
const RENEWALS_LISTED: usize = 100;

pub fn is_route(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

pub async fn route<S: UsageStore>(
    app: &App<S>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    if app.web.admins.is_none() {
        return Ok(html::notice(
            StatusCode::NOT_FOUND,
            "The console is not enabled",
            "Start entitled with --admin-token-file to use the operator console.",
        ));
    }
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/console/login" if method == Method::POST => login(app, req).await,
        "/console/logout" if method == Method::POST => Ok(logout(&req)),
        "/console" | "/console/customer" if get => {
            let Some(who) = admin(app, &req)? else {
                return Ok(login_page(StatusCode::UNAUTHORIZED, None));
            };
            let query = req.uri().query();
            Ok(if path == "/console" {
                overview(app, &who, query).await
            } else {
                customer(app, &who, query).await
            })
        }
        "/console/login" | "/console/logout" => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "POST",
        }),
        "/console" | "/console/customer" => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET, HEAD",
        }),
        _ => Err(ApiError::NotFound {
            path: path.to_string(),
        }),
    }
}

/// The admin behind a console request (a bearer admin token, or a session cookie
/// whose token is still in the file); `None` to show the login form.
fn admin<S>(app: &App<S>, req: &Request<Incoming>) -> Result<Option<String>, ApiError> {
    let admins = app.web.admins.as_ref();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth.is_some() {
        return super::portal::admin(admins, auth).map(Some);
    }
    let Some(session) = cookie(req, COOKIE) else {
        return Ok(None);
    };
    let Ok(claims) = app.web.sessions.verify_session(&session, Timestamp::now()) else {
        return Ok(None);
    };
    let still = admins.map(|a| a.has_name(&claims.subject));
    match still {
        Some(Ok(true)) => Ok(Some(claims.subject)),
        Some(Err(e)) => Err(ApiError::Unavailable(e.to_string())),
        _ => Ok(None),
    }
}

fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A write from another site's page: its `Origin` names a host other than this one.
fn cross_site(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin == "null" || !origin_host.eq_ignore_ascii_case(host)
}

async fn login<S: UsageStore>(app: &App<S>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if cross_site(&req) {
        return Ok(html::notice(
            StatusCode::FORBIDDEN,
            "Refused",
            "A sign-in from another site's page is refused.",
        ));
    }
    let body = read_body(app, req).await?;
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let bearer = format!("Bearer {token}");
    match super::portal::admin(app.web.admins.as_ref(), Some(&bearer)) {
        Ok(name) => {
            let expires = Timestamp::now().saturating_add(SESSION_TTL_US);
            let session = app.web.sessions.mint_session(&name, expires);
            tracing::info!(by = %name, "console session started");
            Ok(redirect(
                "/console",
                Some(format!(
                    "{COOKIE}={session}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
                    SESSION_TTL_US / 1_000_000
                )),
            ))
        }
        Err(ApiError::Unauthorized(_)) => Ok(login_page(
            StatusCode::UNAUTHORIZED,
            Some("That is not one of the admin tokens."),
        )),
        Err(e) => Err(e),
    }
}

fn logout(req: &Request<Incoming>) -> Resp {
    if cross_site(req) {
        return html::notice(
            StatusCode::FORBIDDEN,
            "Refused",
            "A sign-out from another site's page is refused.",
        );
    }
    redirect(
        "/console",
        Some(format!(
            "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"
        )),
    )
}

fn redirect(to: &'static str, cookie: Option<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, header::HeaderValue::from_static(to));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if let Some(c) = cookie.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

fn login_page(status: StatusCode, error: Option<&str>) -> Resp {
    let mut body = String::from(
        "<section class=\"card\" id=\"login\"><h2>Sign in</h2><p>Paste an admin token (a line of the file given to <code>--admin-token-file</code>).</p>",
    );
    if let Some(e) = error {
        let _ = write!(body, "<p class=\"error\" id=\"login-error\">{}</p>", esc(e));
    }
    body.push_str(
        "<form method=\"post\" action=\"/console/login\"><label>Admin token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label> <button type=\"submit\" id=\"sign-in\">Sign in</button></form></section>",
    );
    html::console_page(
        status,
        html::document(
            "entitled console · sign in",
            "<h1>entitled console</h1>",
            &body,
        ),
    )
}

fn top(who: &str) -> String {
    format!(
        "<h1><a href=\"/console\" style=\"color:inherit;text-decoration:none\">entitled console</a></h1>\
         <form method=\"get\" action=\"/console\" role=\"search\"><input type=\"search\" name=\"q\" placeholder=\"customer id or name\" aria-label=\"Search customers\"> <button type=\"submit\">Search</button></form>\
         <span class=\"sub\">signed in as <strong id=\"admin-name\">{}</strong></span>\
         <form class=\"out\" method=\"post\" action=\"/console/logout\"><button class=\"link\" type=\"submit\">Sign out</button></form>",
        esc(who)
    )
}

/// An instant as an operator reads it: to the second, in UTC.
fn when(t: Timestamp) -> String {
    match t.to_jiff() {
        Some(j) => j.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => t.to_string(),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

async fn overview<S: UsageStore>(app: &App<S>, who: &str, query: Option<&str>) -> Resp {
    let (st, snap) = app.reload.observe(|| app.decider.snapshot.load_full());
    let now = app.decider.clock.now();
    let mut s = String::new();

    // The snapshot.
    s.push_str(
        "<section class=\"card\" id=\"snapshot\"><h2>Policy snapshot</h2><div class=\"kpis\">",
    );
    let kpi = |s: &mut String, id: &str, label: &str, value: &str| {
        let _ = write!(
            s,
            "<div class=\"kpi\" id=\"{id}\"><div class=\"label\">{}</div><div class=\"big mono\">{}</div></div>",
            esc(label),
            esc(value)
        );
    };
    match &snap {
        Some(snap) => {
            kpi(&mut s, "snapshot-version", "version", &snap.version);
            kpi(
                &mut s,
                "snapshot-customers",
                "customers",
                &snap.customers.len().to_string(),
            );
            kpi(
                &mut s,
                "snapshot-features",
                "features",
                &snap.catalog.features.len().to_string(),
            );
        }
        None => kpi(&mut s, "snapshot-version", "version", "none loaded"),
    }
    kpi(
        &mut s,
        "reload-generation",
        "generation",
        &st.generation.to_string(),
    );
    kpi(
        &mut s,
        "reload-counts",
        "reloads ok / failed / held",
        &format!(
            "{} / {} / {}",
            st.reloads_ok, st.reloads_failed, st.reloads_held
        ),
    );
    s.push_str("</div>");
    if let Some(t) = st.loaded_at {
        let _ = write!(
            s,
            "<p class=\"muted\">Loaded at {}; server time {}.</p>",
            when(t),
            when(now)
        );
    }
    if let Some(h) = &st.held {
        let _ = write!(
            s,
            "<p class=\"error\" id=\"held\">Held: version <code>{}</code> is not served: {}</p>",
            esc(&h.version),
            esc(&h.reason)
        );
    }
    s.push_str("</section>");

    // The last error, and the history.
    let history = app.reload.history();
    s.push_str("<section class=\"card\" id=\"reload\"><h2>Reloads</h2>");
    match (
        &st.last_error,
        history.iter().find(|a| a.outcome == "failed"),
    ) {
        (Some(e), _) => {
            let _ = write!(
                s,
                "<p class=\"error\"><strong>The last load failed</strong> at {} and the previous snapshot is still served. Errors:</p><ul class=\"plain\" id=\"last-error\">",
                when(e.at)
            );
            for line in &e.errors {
                let _ = write!(s, "<li class=\"diag mono\">{}</li>", esc(line));
            }
            s.push_str("</ul>");
        }
        (None, Some(a)) => {
            let _ = write!(
                s,
                "<p>The last failed load ({}) has been fixed since. Its first error: <code class=\"diag\">{}</code></p>",
                when(a.at),
                esc(a.errors.first().map(String::as_str).unwrap_or(""))
            );
        }
        (None, None) => s.push_str("<p>No failed load since start.</p>"),
    }
    s.push_str("<table class=\"wide\" id=\"reload-history\"><thead><tr><th>When</th><th>Outcome</th><th>Version</th><th>Errors</th></tr></thead><tbody>");
    for a in &history {
        let mut errs = String::new();
        for e in &a.errors {
            let _ = write!(errs, "<div class=\"diag mono\">{}</div>", esc(e));
        }
        if a.error_count > a.errors.len() {
            let _ = write!(
                errs,
                "<div class=\"muted\">and {} more</div>",
                a.error_count - a.errors.len()
            );
        }
        let _ = write!(
            s,
            "<tr data-outcome=\"{o}\"><td data-label=\"When\">{}</td><td data-label=\"Outcome\">{o}</td><td data-label=\"Version\" class=\"mono\">{}</td><td data-label=\"Errors\">{errs}</td></tr>",
            when(a.at),
            esc(a.version.as_deref().unwrap_or("")),
            o = a.outcome,
        );
    }
    if history.is_empty() {
        s.push_str("<tr><td colspan=\"4\">No loads yet.</td></tr>");
    }
    s.push_str("</tbody></table></section>");

    // Search.
    if let Some(q) = query_param(query, "q") {
        s.push_str(&search(snap.as_deref(), &q));
    }

    // Renewals.
    if let Some(snap) = &snap {
        s.push_str(&renewals(snap, now));
    }

    // The report.
    s.push_str(&report_section(usage_report(app).await.as_ref()));

    html::console_page(
        StatusCode::OK,
        html::document("entitled console", &top(who), &s),
    )
}

/// Customers whose id or name contains `q` (case-insensitive), the first
/// [`SEARCH_LIMIT`] in table order: a linear scan of the table (not measured at 1M).
fn search(snap: Option<&crate::policy::Snapshot>, q: &str) -> String {
    let mut s = format!(
        "<section class=\"card\" id=\"search\"><h2>Customers matching “{}”</h2><ul class=\"plain\">",
        esc(q)
    );
    let needle = q.trim();
    let mut found = 0;
    if let Some(snap) = snap.filter(|_| !needle.is_empty()) {
        for c in snap.customers.iter() {
            let hit = contains_ci(c.id, needle) || c.name.is_some_and(|n| contains_ci(n, needle));
            if hit {
                found += 1;
                let _ = write!(
                    s,
                    "<li data-customer=\"{id}\"><a href=\"/console/customer?id={u}\">{id}</a> <span class=\"muted\">{n}</span></li>",
                    id = esc(c.id),
                    u = esc(&url_param(c.id)),
                    n = esc(c.name.unwrap_or("")),
                );
                if found >= SEARCH_LIMIT {
                    let _ = write!(
                        s,
                        "<li class=\"muted\">first {SEARCH_LIMIT} shown; narrow the search</li>"
                    );
                    break;
                }
            }
        }
    }
    if found == 0 {
        s.push_str("<li>No customer matches.</li>");
    }
    s.push_str("</ul></section>");
    s
}

/// Whether `hay` contains `needle`, ASCII letters compared case-insensitively
/// (no allocation per customer).
fn contains_ci(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.len() <= h.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Counts ending within 30, 60 and 90 days, and the list for 90
/// ([`crate::engine::report::expiring`]).
fn renewals(snap: &crate::policy::Snapshot, now: Timestamp) -> String {
    let items = crate::engine::report::expiring(snap, now, 90 * DAY);
    let within = |d: i64| items.iter().filter(|i| i.ends.0 < now.0 + d * DAY).count();
    let mut s = String::from(
        "<section class=\"card\" id=\"renewals\"><h2>Renewals coming up</h2><div class=\"kpis\">",
    );
    for d in [30, 60, 90] {
        let _ = write!(
            s,
            "<div class=\"kpi\" id=\"renewals-{d}\"><div class=\"label\">next {d} days</div><div class=\"big\">{}</div></div>",
            within(d)
        );
    }
    s.push_str("</div><table class=\"wide\"><thead><tr><th>Ends</th><th>Days left</th><th>Customer</th><th>What</th></tr></thead><tbody>");
    for i in items.iter().take(RENEWALS_LISTED) {
        let what = match (i.plan, i.feature) {
            (Some(p), _) => format!("{} {p}{}", i.kind, if i.trial { " (trial)" } else { "" }),
            (_, Some(f)) => format!("{} {f}", i.kind),
            _ => i.kind.to_string(),
        };
        let _ = write!(
            s,
            "<tr data-customer=\"{c}\"><td data-label=\"Ends\">{e}</td><td data-label=\"Days left\">{d}</td><td data-label=\"Customer\"><a href=\"/console/customer?id={u}\">{c}</a></td><td data-label=\"What\">{w}</td></tr>",
            e = esc(&day(&json!(i.ends))),
            d = i.days_left,
            c = esc(i.customer),
            u = esc(&url_param(i.customer)),
            w = esc(&what),
        );
    }
    if items.len() > RENEWALS_LISTED {
        let _ = write!(
            s,
            "<tr><td colspan=\"4\" class=\"muted\">{} more: <code>GET /v1/expiring?within=90d</code></td></tr>",
            items.len() - RENEWALS_LISTED
        );
    }
    if items.is_empty() {
        s.push_str("<tr><td colspan=\"4\">Nothing ends in the next 90 days.</td></tr>");
    }
    s.push_str("</tbody></table></section>");
    s
}

async fn customer<S: UsageStore>(app: &App<S>, who: &str, query: Option<&str>) -> Resp {
    let id = query_param(query, "id").unwrap_or_default();
    let Some(snap) = app.decider.snapshot.load_full() else {
        return html::notice(
            StatusCode::SERVICE_UNAVAILABLE,
            "No policy snapshot loaded yet",
            "See /console for the load errors.",
        );
    };
    let full = match customer_view(app, &snap, &id, &[], None, true).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            let body = format!(
                "<section class=\"card notice\" id=\"notice\"><h1>No customer “{}”</h1><p><a href=\"/console\">Back</a></p></section>",
                esc(&id)
            );
            return html::console_page(
                StatusCode::NOT_FOUND,
                html::document("entitled console", &top(who), &body),
            );
        }
        Err(e) => {
            return html::notice(e.status(), "The customer cannot be shown", &e.to_string());
        }
    };
    let view = reshape(&snap, &full);
    let name = str_of(&full["name"]);
    let mut s = format!(
        "<section class=\"card\" id=\"customer\"><h2>{}</h2><p>Account <code id=\"customer-id\">{}</code> · as of {} · snapshot <code>{}</code></p></section>",
        esc(if name.is_empty() { &id } else { name }),
        esc(&id),
        esc(&day(&full["at"])),
        esc(str_of(&full["snapshot"]))
    );
    s.push_str(&render(&view));
    s.push_str(&sources(&full));
    s.push_str(&overrides(&full));
    s.push_str(&denials_section(recent_denials(app, &id).await.as_ref()));
    html::console_page(
        StatusCode::OK,
        html::document(&format!("entitled console · {id}"), &top(who), &s),
    )
}

/// Where each feature's answer comes from: plan and include chain, grant, override.
fn sources(full: &Value) -> String {
    let mut s = String::from(
        "<section class=\"card\" id=\"sources\"><h2>Sources</h2><table class=\"wide\"><thead><tr><th>Feature</th><th>Answer</th><th>Source</th><th>Via</th></tr></thead><tbody>",
    );
    // Features the customer never had (listed for their upgrades) have no source.
    let had = |e: &&Value| !e["source"].is_null() || e["reason"] != "not_entitled";
    for e in full["entitlements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(had)
    {
        let src = &e["source"];
        let source = match str_of(&src["type"]) {
            "" => "—".to_string(),
            "subscription" => format!("subscription to {}", str_of(&src["plan"])),
            "override" => format!(
                "override approved by {} ({})",
                str_of(&src["approved_by"]),
                str_of(&src["reason"])
            ),
            t => match src["priority"].as_i64() {
                Some(p) => format!("{t} (priority {p})"),
                None => t.to_string(),
            },
        };
        let via: Vec<&str> = src["via"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let answer = if e["allowed"] == true {
            "allowed".to_string()
        } else {
            format!("denied: {}", str_of(&e["reason"]))
        };
        let _ = write!(
            s,
            "<tr data-feature=\"{f}\"><td data-label=\"Feature\">{f}</td><td data-label=\"Answer\">{a}</td><td data-label=\"Source\">{src}</td><td data-label=\"Via\">{v}</td></tr>",
            f = esc(str_of(&e["feature"])),
            a = esc(&answer),
            src = esc(&source),
            v = esc(&via.join(" → ")),
        );
    }
    s.push_str("</tbody></table></section>");
    s
}

fn overrides(full: &Value) -> String {
    let list = full["overrides"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut s = String::from("<section class=\"card\" id=\"overrides\"><h2>Overrides</h2>");
    if list.is_empty() {
        s.push_str("<p>None.</p></section>");
        return s;
    }
    s.push_str("<table class=\"wide\"><thead><tr><th>Feature</th><th>Approved by</th><th>Why</th><th>Ticket</th><th>Expires</th><th>Active</th></tr></thead><tbody>");
    for o in list {
        let _ = write!(
            s,
            "<tr data-feature=\"{f}\"><td data-label=\"Feature\">{f}</td><td data-label=\"Approved by\">{b}</td><td data-label=\"Why\">{r}</td><td data-label=\"Ticket\">{t}</td><td data-label=\"Expires\">{e}</td><td data-label=\"Active\">{a}</td></tr>",
            f = esc(str_of(&o["feature"])),
            b = esc(str_of(&o["approved_by"])),
            r = esc(str_of(&o["reason"])),
            t = esc(str_of(&o["ticket"])),
            e = esc(&day(&o["expires"])),
            a = if o["active"] == true { "yes" } else { "no" },
        );
    }
    s.push_str("</tbody></table></section>");
    s
}

/// The usage report (`GET /v1/reports/usage`'s answer) the charts are drawn from;
/// `None` while this server keeps no report.
async fn usage_report<S>(app: &App<S>) -> Option<Value> {
    let report = super::api::usage_report_since(app, None).await.ok()?;
    serde_json::to_value(report).ok()
}

/// A customer's recent denials (`GET /v1/customers/{id}/denials`'s answer); `None`
/// while this server keeps none.
async fn recent_denials<S>(app: &App<S>, id: &str) -> Option<Value> {
    super::api::recent_denials(app, id).await.ok()
}

/// The report's four charts: limits hit (upsell candidates), granted but unused,
/// overrides by feature and approver, denials by reason.
fn report_section(report: Option<&Value>) -> String {
    let mut s = String::from("<section class=\"card\" id=\"report\"><h2>Monitor and optimize</h2>");
    let Some(r) = report else {
        s.push_str("<p class=\"muted\" id=\"report-empty\">no report data yet</p></section>");
        return s;
    };
    let _ = write!(
        s,
        "<p class=\"muted\">{} until {}.</p><div class=\"grid\">",
        if r["since"].is_null() {
            "Every day kept".to_string()
        } else {
            format!("From {}", esc(&day(&r["since"])))
        },
        esc(&day(&r["until"]))
    );
    let rows = |key: &str, label: &dyn Fn(&Value) -> String, value: &dyn Fn(&Value) -> u64| {
        let mut v: Vec<(String, u64)> = r[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| (label(x), value(x)))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(12);
        v
    };
    let pair = |a: &'static str, b: &'static str| {
        move |x: &Value| format!("{} · {}", str_of(&x[a]), str_of(&x[b]))
    };
    let num = |k: &'static str| move |x: &Value| x[k].as_u64().unwrap_or(0);
    s.push_str(&html::bar_chart(
        "chart-limits",
        "Limits hit (denials), by feature and plan: upsell candidates",
        &rows("limits_hit", &pair("feature", "plan"), &num("denials")),
    ));
    s.push_str(&html::bar_chart(
        "chart-unused",
        "Granted but unused (customers), by feature and plan",
        &rows("unused", &pair("feature", "plan"), &|x: &Value| {
            let granted = x["customers_granted"].as_u64().unwrap_or(0);
            granted.saturating_sub(x["customers_using"].as_u64().unwrap_or(0))
        }),
    ));
    s.push_str(&html::bar_chart(
        "chart-overrides",
        "Overrides, by feature and approver",
        &rows("overrides", &pair("feature", "approved_by"), &num("count")),
    ));
    s.push_str(&html::bar_chart(
        "chart-denials",
        "Denials, by reason",
        &rows(
            "denials",
            &|x: &Value| str_of(&x["reason"]).to_string(),
            &num("count"),
        ),
    ));
    s.push_str("</div></section>");
    s
}

fn denials_section(denials: Option<&Value>) -> String {
    let mut s = String::from("<section class=\"card\" id=\"denials\"><h2>Recent denials</h2>");
    let list = denials.and_then(|d| d["denials"].as_array());
    match list {
        None => s.push_str("<p class=\"muted\" id=\"denials-empty\">no denial data yet</p>"),
        Some(l) if l.is_empty() => s.push_str("<p>None recently.</p>"),
        Some(l) => {
            s.push_str("<table class=\"wide\"><thead><tr><th>When</th><th>Feature</th><th>Reason</th></tr></thead><tbody>");
            for d in l {
                let _ = write!(
                    s,
                    "<tr><td data-label=\"When\">{}</td><td data-label=\"Feature\">{}</td><td data-label=\"Reason\">{}</td></tr>",
                    esc(&day(&d["at"])),
                    esc(str_of(&d["feature"])),
                    esc(str_of(&d["reason"]))
                );
            }
            s.push_str("</tbody></table>");
        }
    }
    s.push_str("</section>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_draws_its_four_charts_from_the_report_json() {
        assert!(report_section(None).contains("no report data yet"));
        let r = json!({
            "since": "2026-11-01T00:00:00Z", "until": "2026-12-01T00:00:00Z",
            "limits_hit": [{"feature": "api.calls", "plan": "free", "denials": 40, "customers": 3},
                           {"feature": "exports", "plan": "<pro>", "denials": 5, "customers": 1}],
            "unused": [{"feature": "sso", "plan": "enterprise", "customers_granted": 10, "customers_using": 4}],
            "overrides": [{"feature": "sso", "approved_by": "jane@vendor.example", "count": 2}],
            "denials": [{"reason": "quota_exhausted", "count": 45}],
        });
        let s = report_section(Some(&r));
        for id in [
            "chart-limits",
            "chart-unused",
            "chart-overrides",
            "chart-denials",
        ] {
            assert!(s.contains(id), "{id}");
        }
        assert!(
            s.contains("data-label=\"api.calls · free\" data-value=\"40\""),
            "{s}"
        );
        assert!(
            s.contains("data-label=\"sso · enterprise\" data-value=\"6\""),
            "{s}"
        );
        assert!(
            s.contains("data-label=\"quota_exhausted\" data-value=\"45\""),
            "{s}"
        );
        assert!(s.contains("&lt;pro&gt;") && !s.contains("<pro>"));
    }

    #[test]
    fn search_ignores_ascii_case() {
        assert!(contains_ci("Acme Corp", "acme c"));
        assert!(contains_ci("acme", "ACM"));
        assert!(!contains_ci("acme", "acmes"));
    }

    #[test]
    fn denials_list_or_say_there_are_none_yet() {
        assert!(denials_section(None).contains("no denial data yet"));
        let d = json!({"customer": "acme", "denials": [
            {"at": "2026-12-01T10:00:00Z", "feature": "<api>", "reason": "quota_exhausted"}]});
        let s = denials_section(Some(&d));
        assert!(s.contains("&lt;api&gt;") && s.contains("quota_exhausted"));
    }
}
