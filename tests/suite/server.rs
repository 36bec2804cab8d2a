//! The real binary over real HTTP.
//!
//! Every test starts its own `entitled serve` on its own policy tempdir and talks to
//! it over loopback TCP. Dates in the policy are relative to the real clock, since the
//! binary decides at the time of the request.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::support::{
    Conn, PolicyDir, Server, days_from_now, get, names_file_line_col, parse_time, request,
    request_head, wait_until,
};

const CATALOG: &str = r#"
features:
  analytics.advanced: { kind: flag }
  sso: { kind: flag }
  api.calls: { kind: quota, unit: call }
  exports: { kind: quota, unit: export }
  api.rate: { kind: rate }
  seats: { kind: seats }
  support.tier: { kind: value, type: string, order: [community, standard, priority] }
groups:
  onsite-pack:
    grants:
      sso: true
plans:
  free:
    grants:
      api.calls: { limit: 10, per: month }
      exports: { limit: 10, per: month, warn_at: 50% }
      api.rate: { limit: 100, per: 1s, burst: 100 }
      seats: { limit: 2 }
      support.tier: community
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 1000, per: month }
      seats: { limit: 20 }
      support.tier: standard
  onsite:
    includes: [onsite-pack]
"#;

/// acme: free, plus `onsite` (sso) scoped to asset chiller-7 ending in 20 days, and an
/// override of analytics.advanced expiring in 10 days. globex: pro ending in 5 days.
/// initech: pro ending in 60 days.
fn customers() -> String {
    format!(
        r#"
customers:
  - id: acme
    name: Acme Corp
    subscriptions:
      - {{ plan: free, starts: "{past}" }}
      - {{ plan: onsite, starts: "{past}", ends: "{d20}", scope: {{ asset: [chiller-7] }} }}
    overrides:
      - feature: analytics.advanced
        grant: true
        expires: "{d10}"
        approved_by: jane@vendor.example
        reason: Q4 evaluation
        ticket: SUP-1234
  - id: globex
    name: Globex
    subscriptions:
      - {{ plan: pro, starts: "{past}", ends: "{d5}" }}
  - id: initech
    subscriptions:
      - {{ plan: pro, starts: "{past}", ends: "{d60}" }}
"#,
        past = days_from_now(-40),
        d5 = days_from_now(5),
        d10 = days_from_now(10),
        d20 = days_from_now(20),
        d60 = days_from_now(60),
    )
}

fn policy() -> PolicyDir {
    PolicyDir::with(&[("catalog.yaml", CATALOG), ("customers.yaml", &customers())])
}

fn used(s: &Server, customer: &str, feature: &str) -> u64 {
    let d = s.check(customer, feature);
    d["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `used` in {d}"))
}

/// Asserts a JSON error response `{"error": {"code", "message", "field"?}}`.
fn assert_error(r: &super::support::Resp, status: u16, code: &str, field: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.text()
    );
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    match field {
        Some(f) => assert_eq!(e["field"], f, "{v}"),
        None => assert!(e.get("field").is_none_or(Value::is_null), "{v}"),
    }
    v
}

// ------------------------------------------------------------------ endpoints ----

#[test]
fn check_answers_every_kind_and_counts_nothing() {
    let dir = policy();
    let s = Server::start(dir.path());
    let version = s.version().expect("a snapshot");

    // Flag, through the override (it beats the plan's absence of the flag).
    let d = s.check("acme", "analytics.advanced");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["reason"], "granted");
    assert_eq!(d["kind"], "flag");
    assert_eq!(d["source"]["type"], "override", "{d}");
    assert_eq!(d["source"]["approved_by"], "jane@vendor.example", "{d}");
    assert_eq!(d["snapshot"], version.as_str());

    // Flag via plan, for another customer.
    let d = s.check("globex", "analytics.advanced");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["source"]["type"], "subscription");
    assert_eq!(d["source"]["plan"], "pro");
    assert!(d["expires_at"].is_string(), "{d}");

    // Not entitled: no plan of globex grants sso.
    let d = s.check("globex", "sso");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "not_entitled");

    // Scoped: sso only for the asset in scope.
    let d = s.check("acme", "sso");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "out_of_scope", "{d}");
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": "sso", "context": {"asset": "chiller-7"}}),
    );
    assert_eq!(d["allowed"], true, "{d}");

    // Value.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["kind"], "value");
    assert_eq!(d["value"], "community");

    // Unknowns are decisions, not errors.
    let d = s.check("nobody", "sso");
    assert_eq!(
        (d["allowed"].clone(), d["reason"].clone()),
        (json!(false), json!("unknown_customer")),
        "{d}"
    );
    let d = s.check("acme", "no.such.feature");
    assert_eq!(
        (d["allowed"].clone(), d["reason"].clone()),
        (json!(false), json!("unknown_feature")),
        "{d}"
    );

    // Quota check: would 10 pass? yes; 11? no, with an upgrade. Nothing counted.
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 10}),
    );
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["limit"], 10);
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 11}),
    );
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "quota_exhausted");
    assert!(
        d["upgrade"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("pro"))),
        "{d}"
    );
    assert_eq!(used(&s, "acme", "api.calls"), 0);

    // `at`: before acme's subscriptions started, nothing was granted.
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": "support.tier", "at": days_from_now(-400)}),
    );
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "not_yet_active", "{d}");
}

#[test]
fn consume_reports_limit_used_remaining_and_resets_at() {
    let dir = policy();
    let s = Server::start(dir.path());
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 3}),
    );
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["reason"], "granted");
    assert_eq!(d["kind"], "quota");
    assert_eq!(d["limit"], 10, "{d}");
    assert_eq!(d["used"], 3, "{d}");
    assert_eq!(d["remaining"], 7, "{d}");
    let resets = parse_time(&d["resets_at"]);
    let now = jiff::Timestamp::now();
    assert!(resets > now, "resets_at {resets} is not in the future");
    assert!(
        resets.as_second() - now.as_second() <= 32 * 86_400,
        "a monthly window resets within a month: {resets}"
    );

    // Default amount is 1.
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls"}),
    );
    assert_eq!(
        (d["used"].clone(), d["remaining"].clone()),
        (json!(4), json!(6)),
        "{d}"
    );

    // Over the limit: denied, nothing counted, the bigger plan offered.
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 7}),
    );
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "quota_exhausted");
    assert_eq!(d["used"], 4, "{d}");
    assert!(
        d["upgrade"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("pro"))),
        "{d}"
    );
    // Exactly up to the limit.
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 6}),
    );
    assert_eq!(
        (d["allowed"].clone(), d["remaining"].clone()),
        (json!(true), json!(0)),
        "{d}"
    );
    assert_eq!(used(&s, "acme", "api.calls"), 10);
    // Another customer's counter is its own.
    assert_eq!(used(&s, "globex", "api.calls"), 0);

    // Consume on a rate limit.
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.rate"}),
    );
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["kind"], "rate");
}

#[test]
fn batch_keeps_order_and_answers_around_a_bad_item() {
    let dir = policy();
    let s = Server::start(dir.path());
    let body = json!({"requests": [
        {"op": "check", "customer": "acme", "feature": "support.tier"},
        {"op": "consume", "customer": "acme", "feature": "api.calls", "amount": 2},
        {"op": "consume", "customer": "acme", "feature": "api.calls", "amount": 0},
        {"op": "check", "customer": "globex", "feature": "sso"},
        {"op": "frobnicate", "customer": "acme", "feature": "api.calls"},
        {"op": "consume", "customer": "acme", "feature": "api.calls", "amount": 3},
    ]});
    let r = s.post("/v1/batch", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let results = v["results"].as_array().expect("results array");
    assert_eq!(results.len(), 6, "{v}");
    assert_eq!(results[0]["feature"], "support.tier", "{v}");
    assert_eq!(results[0]["value"], "community");
    assert_eq!(results[1]["allowed"], true);
    assert_eq!(results[1]["used"], 2);
    let e = &results[2]["error"];
    assert_eq!(e["index"], 2, "{v}");
    assert_eq!(e["code"], "bad_request");
    assert_eq!(e["field"], "amount");
    assert_eq!(results[3]["feature"], "sso");
    assert_eq!(results[3]["reason"], "not_entitled");
    assert_eq!(results[4]["error"]["index"], 4, "{v}");
    assert_eq!(results[4]["error"]["field"], "op", "{v}");
    assert_eq!(results[5]["used"], 5, "{v}");
    // What the batch consumed is counted, and only that.
    assert_eq!(used(&s, "acme", "api.calls"), 5);

    // More than 1,000 items: refused whole, nothing counted.
    let item = json!({"op": "consume", "customer": "acme", "feature": "api.calls"});
    let big = json!({"requests": vec![item; 1001]});
    let r = s.post("/v1/batch", &big);
    assert_error(&r, 400, "bad_request", Some("requests"));
    assert_eq!(used(&s, "acme", "api.calls"), 5);

    // Exactly 1,000 is fine.
    let item = json!({"op": "check", "customer": "acme", "feature": "api.calls"});
    let r = s.post("/v1/batch", &json!({"requests": vec![item; 1000]}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["results"].as_array().map(Vec::len), Some(1000));
}

#[test]
fn seats_acquire_is_idempotent_per_holder_and_release_frees() {
    let dir = policy();
    let s = Server::start(dir.path());
    let acquire = |holder: &str| {
        s.decide(
            "/v1/seats/acquire",
            &json!({"customer": "acme", "feature": "seats", "holder": holder}),
        )
    };
    let release = |holder: &str| {
        s.decide(
            "/v1/seats/release",
            &json!({"customer": "acme", "feature": "seats", "holder": holder}),
        )
    };
    let d = acquire("user-1");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["kind"], "seats");
    assert_eq!(
        (d["used"].clone(), d["limit"].clone()),
        (json!(1), json!(2)),
        "{d}"
    );
    let d = acquire("user-1");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(1)),
        "{d}"
    );
    let d = acquire("user-2");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(2)),
        "{d}"
    );
    let d = acquire("user-3");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "seats_exhausted");
    assert_eq!(d["used"], 2);
    assert!(
        d["upgrade"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("pro"))),
        "{d}"
    );
    // A holder already in still gets its seat when the pool is full.
    let d = acquire("user-2");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(2)),
        "{d}"
    );
    let d = release("user-1");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(1)),
        "{d}"
    );
    // Releasing again frees nothing more (user-2 keeps its seat).
    let d = release("user-1");
    assert_eq!(d["used"], 1, "{d}");
    let d = acquire("user-3");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(2)),
        "{d}"
    );
    // Seat operations need a holder.
    let r = s.post(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "seats"}),
    );
    assert_error(&r, 400, "bad_request", Some("holder"));
}

#[test]
fn customer_summary_lists_entitlements_subscriptions_and_overrides() {
    let dir = policy();
    let s = Server::start(dir.path());
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 4}),
    );
    let r = s.get("/v1/customers/acme");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "acme");
    assert_eq!(v["name"], "Acme Corp");
    assert_eq!(v["snapshot"], s.version().expect("version").as_str());
    let ents = v["entitlements"].as_array().expect("entitlements");
    let ent = |f: &str| {
        ents.iter()
            .find(|e| e["feature"] == f)
            .unwrap_or_else(|| panic!("no entitlement `{f}` in {v}"))
            .clone()
    };
    let calls = ent("api.calls");
    assert_eq!(
        (calls["limit"].clone(), calls["used"].clone()),
        (json!(10), json!(4)),
        "{calls}"
    );
    assert!(calls["resets_at"].is_string(), "{calls}");
    assert_eq!(ent("support.tier")["value"], "community");
    assert_eq!(ent("analytics.advanced")["source"]["type"], "override");
    // Without context, the scoped sso is out of scope.
    assert_eq!(ent("sso")["allowed"], false);
    assert_eq!(ent("sso")["reason"], "out_of_scope");

    let subs = v["subscriptions"].as_array().expect("subscriptions");
    let plans: Vec<&str> = subs.iter().filter_map(|s| s["plan"].as_str()).collect();
    assert_eq!(plans, ["free", "onsite"], "{v}");
    assert!(subs.iter().all(|s| s["status"] == "active"), "{v}");
    let ovs = v["overrides"].as_array().expect("overrides");
    assert_eq!(ovs.len(), 1, "{v}");
    assert_eq!(ovs[0]["feature"], "analytics.advanced");
    assert_eq!(ovs[0]["approved_by"], "jane@vendor.example");
    assert_eq!(ovs[0]["active"], true);

    // Context through query parameters.
    let r = s.get("/v1/customers/acme?asset=chiller-7");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let sso = v["entitlements"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["feature"] == "sso"))
        .cloned()
        .unwrap_or_else(|| panic!("no sso in {v}"));
    assert_eq!(sso["allowed"], true, "{sso}");

    // Unknown id: a JSON 404.
    let r = s.get("/v1/customers/nobody");
    assert_error(&r, 404, "unknown_customer", Some("id"));
}

#[test]
fn expiring_lists_soonest_first_and_validates_within() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.get("/v1/expiring?within=30d");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let items = v["items"].as_array().expect("items");
    let got: Vec<(String, String)> = items
        .iter()
        .map(|i| {
            (
                i["customer"].as_str().unwrap_or("").to_string(),
                i["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("globex", "subscription"),
        ("acme", "override"),
        ("acme", "subscription"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{v}");
    let ends: Vec<jiff::Timestamp> = items.iter().map(|i| parse_time(&i["ends"])).collect();
    assert!(
        ends.windows(2).all(|w| w[0] <= w[1]),
        "not soonest first: {v}"
    );
    assert_eq!(items[0]["plan"], "pro");
    assert_eq!(items[1]["feature"], "analytics.advanced");

    // A wider window takes in initech (60 days out), last.
    let v = s.get("/v1/expiring?within=90d").json();
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "{v}");
    assert_eq!(items[3]["customer"], "initech");

    for bad in [
        "/v1/expiring?within=soon",
        "/v1/expiring?within=30",
        "/v1/expiring?within=",
    ] {
        let r = s.get(bad);
        assert_error(&r, 400, "bad_request", Some("within"));
    }
}

#[test]
fn status_reports_version_counts_and_no_error() {
    let dir = policy();
    let s = Server::start(dir.path());
    let v = s.status();
    assert_eq!(v["ready"], true, "{v}");
    let snap = &v["snapshot"];
    let version = snap["version"].as_str().expect("version string");
    assert!(!version.is_empty());
    assert!(snap["loaded_at"].is_string(), "{v}");
    assert_eq!(snap["features"], 7, "{v}");
    assert_eq!(snap["plans"], 3, "{v}");
    assert_eq!(snap["groups"], 1, "{v}");
    assert_eq!(snap["customers"], 3, "{v}");
    assert_eq!(snap["overrides_active"], 1, "{v}");
    assert!(v["generation"].as_u64().is_some_and(|g| g >= 1), "{v}");
    assert!(v["last_error"].is_null(), "{v}");
    // Decisions are stamped with the same version.
    assert_eq!(s.check("acme", "sso")["snapshot"], version);
}

#[test]
fn health_and_readiness() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.get("/healthz");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["ready"], true);
    assert_eq!(v["snapshot"], s.version().expect("version").as_str());
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let dir = policy();
    let s = Server::spawn(dir.path());
    s.check("acme", "sso");
    let r = s.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    let text = r.text();
    assert!(
        text.contains("# TYPE entitled_decisions_total counter"),
        "{text}"
    );
}

// ------------------------------------------------------------ strict requests ----

#[test]
fn malformed_requests_are_400_naming_the_field_and_count_nothing() {
    let dir = policy();
    let s = Server::start(dir.path());
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 2}),
    );
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"customer":"acme","feature":"api.calls""#, None),
        ("not json", None),
        ("", None),
        ("[1,2]", None),
        (r#"{"feature":"api.calls"}"#, Some("customer")),
        (r#"{"customer":"acme"}"#, Some("feature")),
        (r#"{"customer":7,"feature":"api.calls"}"#, Some("customer")),
        (r#"{"customer":"","feature":"api.calls"}"#, Some("customer")),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":0}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":-1}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":1.5}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":"1"}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":1e30}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":null}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amout":1}"#,
            Some("amout"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","context":{"asset":1}}"#,
            Some("context.asset"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","context":"chiller-7"}"#,
            Some("context"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","at":"2026-01-01"}"#,
            Some("at"),
        ),
    ];
    for (body, field) in cases {
        let r = s.post_raw("/v1/consume", body);
        assert_eq!(r.status, 400, "{body} -> {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], "bad_request", "{body} -> {v}");
        match field {
            Some(f) => assert_eq!(v["error"]["field"], *f, "{body} -> {v}"),
            None => assert!(
                v["error"].get("field").is_none_or(Value::is_null),
                "{body} -> {v}"
            ),
        }
    }
    // The same on check (a 400 there too) — and nothing was ever counted.
    let r = s.post_raw(
        "/v1/check",
        r#"{"customer":"acme","feature":"api.calls","amount":1.5}"#,
    );
    assert_error(&r, 400, "bad_request", Some("amount"));
    let r = s.post_raw(
        "/v1/check",
        r#"{"customer":"acme","feature":"api.calls","idempotency_key":"k"}"#,
    );
    assert_error(&r, 400, "bad_request", Some("idempotency_key"));
    assert_eq!(used(&s, "acme", "api.calls"), 2);
}

#[test]
fn an_operation_on_the_wrong_kind_is_400_naming_the_kind() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.post(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "analytics.advanced"}),
    );
    let v = assert_error(&r, 400, "bad_request", Some("feature"));
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("flag"),
        "message does not name the kind: {msg}"
    );
    let r = s.post(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "api.calls", "holder": "u1"}),
    );
    let v = assert_error(&r, 400, "bad_request", Some("feature"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("quota"),
        "{v}"
    );
    assert_eq!(used(&s, "acme", "api.calls"), 0);
}

#[test]
fn a_body_over_the_limit_is_413_and_counts_nothing() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--body-limit", "1024"]);
    // Just under the limit: a normal decision (padding in a context value).
    let small =
        json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(900)}});
    let d = s.decide("/v1/consume", &small);
    assert_eq!(d["used"], 1, "{d}");
    // Over it: announced by Content-Length, refused before the body is read (the body
    // is not sent, so the close cannot reset the connection under the answer).
    let big = serde_json::to_vec(
        &json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(2000)}}),
    )
    .expect("encode");
    let mut c = Conn::open(s.addr);
    c.send_raw(
        request_head(
            "POST",
            "/v1/consume",
            &[("content-type", "application/json")],
            big.len(),
            true,
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_error(&r, 413, "payload_too_large", None);
    assert_eq!(used(&s, "acme", "api.calls"), 1);
}

#[test]
fn a_chunked_body_over_the_limit_is_413() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--body-limit", "1024"]);
    let big = serde_json::to_vec(
        &json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(2000)}}),
    )
    .expect("encode");
    // No Content-Length: the limit must hold while the body streams in. Sent whole
    // before reading, so the server has all of it (no reset from unread bytes is
    // likely, but tolerate a close right after the answer).
    let mut c = Conn::open(s.addr);
    let mut req = b"POST /v1/consume HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
    req.extend_from_slice(&big);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    c.send_raw(&req);
    let r = c.read_response();
    assert_error(&r, 413, "payload_too_large", None);
    assert_eq!(used(&s, "acme", "api.calls"), 0);
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.get("/v2/nothing");
    assert_error(&r, 404, "not_found", None);
    let r = s.post("/v1/chek", &json!({}));
    assert_error(&r, 404, "not_found", None);

    let r = s.get("/v1/check");
    assert_error(&r, 405, "method_not_allowed", None);
    assert_eq!(r.header("allow"), Some("POST"), "{:?}", r.headers);
    let r = request(s.addr, "DELETE", "/v1/consume", &[], b"");
    assert_error(&r, 405, "method_not_allowed", None);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = s.post("/v1/status", &json!({}));
    assert_error(&r, 405, "method_not_allowed", None);
    let allow = r.header("allow").unwrap_or_default();
    assert!(allow.contains("GET"), "{allow}");
}

// ---------------------------------------------------------------- connections ----

#[test]
fn http1_keep_alive_serves_two_requests_on_one_connection() {
    let dir = policy();
    let s = Server::start(dir.path());
    let mut c = Conn::open(s.addr);
    let body = br#"{"customer":"acme","feature":"api.calls","amount":2}"#;
    c.send(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body,
        false,
    );
    let r1 = c.read_response();
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert_eq!(r1.json()["used"], 2);
    assert_ne!(r1.header("connection"), Some("close"), "{:?}", r1.headers);
    c.send(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body,
        false,
    );
    let r2 = c.read_response();
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.json()["used"], 4);
    // And a third, a GET, closing.
    c.send("GET", "/v1/status", &[], b"", true);
    let r3 = c.read_response();
    assert_eq!(r3.status, 200);
    assert!(
        c.closed_within(Duration::from_secs(3)),
        "not closed after Connection: close"
    );
}

#[test]
fn h2c_prior_knowledge_is_served() {
    let has_curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_curl {
        eprintln!("note: curl not found; skipping the h2c test");
        return;
    }
    let dir = policy();
    let s = Server::start(dir.path());
    let out = std::process::Command::new("curl")
        .args([
            "--http2-prior-knowledge",
            "-s",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "%{http_version}",
        ])
        .arg(format!("http://{}/v1/status", s.addr))
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text
        .rsplit_once('}')
        .map_or(("", text.as_str()), |(b, v)| (b, v));
    assert_eq!(version, "2", "curl output: {text}");
    let v: Value = serde_json::from_str(&format!("{body}}}")).expect("status JSON over h2");
    assert_eq!(
        v["snapshot"]["version"],
        s.version().expect("version").as_str()
    );

    // A decision over h2 too.
    let out = std::process::Command::new("curl")
        .args([
            "--http2-prior-knowledge",
            "-s",
            "--max-time",
            "10",
            "-H",
            "content-type: application/json",
        ])
        .args([
            "-d",
            r#"{"customer":"acme","feature":"api.calls","amount":3}"#,
        ])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("http://{}/v1/consume", s.addr))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or((&text, ""));
    assert_eq!(tail, "2 200", "{text}");
    let d: Value = serde_json::from_str(body).expect("decision JSON");
    assert_eq!(d["used"], 3, "{d}");
}

#[test]
fn slowloris_headers_are_cut_off_by_the_header_read_timeout() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--header-read-timeout", "300ms"]);
    let mut slow = Conn::open(s.addr);
    slow.send_raw(b"POST /v1/consume HTTP/1.1\r\nhost: entitled.test\r\ncontent-type: appl");
    let started = Instant::now();
    assert!(
        slow.closed_within(Duration::from_secs(3)),
        "a connection with half its headers was still open after 3 s"
    );
    eprintln!("slow connection closed after {:?}", started.elapsed());
    // The server still answers everyone else.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

#[test]
fn a_connection_that_sends_nothing_is_closed_by_the_header_read_timeout() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--header-read-timeout", "300ms"]);
    // Nothing at all; one byte; part of the HTTP/2 preface (too short to pick h1 or h2).
    for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let mut idle = Conn::open(s.addr);
        idle.send_raw(sent);
        assert!(
            idle.closed_within(Duration::from_secs(3)),
            "a connection that sent only {:?} was still open after 3 s",
            String::from_utf8_lossy(sent)
        );
    }
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

#[test]
fn silent_connections_cannot_starve_the_server() {
    let dir = policy();
    let s = Server::start_with(
        dir.path(),
        &["--header-read-timeout", "300ms", "--max-connections", "2"],
    );
    let _a = Conn::open(s.addr);
    let _b = Conn::open(s.addr);
    // Both permits are taken by connections that say nothing; once the header read
    // timeout closes them, a real request is answered.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let dir = policy();
    let mut s = Server::spawn(dir.path());
    let addr = s.addr;
    let body = br#"{"customer":"acme","feature":"api.calls","amount":2}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut c = Conn::open(addr);
    let mut head = request_head(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body.len(),
        false,
    )
    .into_bytes();
    head.extend_from_slice(first);
    c.send_raw(&head);
    // A full round trip on another connection after our bytes were written: by the
    // time it answers, the server has read the first connection's request head.
    assert_eq!(get(addr, "/healthz").status, 200);

    s.terminate();
    // The listener goes away: new connections are refused while the old one drains.
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect_timeout(
            &addr,
            Duration::from_millis(500)
        )
        .is_err()),
        "new connections were still accepted 5 s after SIGTERM"
    );
    assert!(
        s.wait_exit(Duration::from_millis(0)).is_none(),
        "exited with a request in flight"
    );
    c.stream
        .write_all(rest)
        .expect("sending the rest of the body");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json();
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["used"], 2, "{d}");
    let status = s
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM; stderr:\n{}", s.stderr()));
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        s.stderr()
    );
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn sigterm_on_an_idle_server_exits_0() {
    let dir = policy();
    let mut s = Server::spawn(dir.path());
    s.check("acme", "sso");
    let status = s.stop_gracefully();
    assert!(status.success(), "{status:?}; stderr:\n{}", s.stderr());
}

// ------------------------------------------------------------------ readiness ----

#[test]
fn a_broken_policy_at_start_is_503_until_fixed() {
    let dir = PolicyDir::with(&[
        (
            "catalog.yaml",
            "features:\n  sso: { kind: flag ]\nplans:\n  pro:\n    grants:\n      sso: true\n",
        ),
        (
            "customers.yaml",
            "customers:\n  - id: acme\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n",
        ),
    ]);
    let s = Server::start_with(dir.path(), &["--reload-debounce", "50ms"]);
    let r = s.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["ready"], false);
    assert_eq!(s.get("/healthz").status, 200, "alive even when not ready");
    for path in ["/v1/check", "/v1/consume"] {
        let r = s.post(path, &json!({"customer": "acme", "feature": "sso"}));
        assert_error(&r, 503, "not_ready", None);
        assert!(!r.text().contains("\"allowed\""), "{}", r.text());
    }
    let r = s.post(
        "/v1/batch",
        &json!({"requests": [{"op": "check", "customer": "acme", "feature": "sso"}]}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.text().contains("\"allowed\""), "{}", r.text());
    let r = s.post(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "seats", "holder": "u"}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(s.get("/v1/customers/acme").status, 503);
    assert_eq!(s.get("/v1/expiring").status, 503);
    let st = s.status();
    assert_eq!(st["ready"], false, "{st}");
    assert!(st["snapshot"].is_null(), "{st}");
    let errors = st["last_error"]["errors"]
        .as_array()
        .expect("last_error.errors");
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .is_some_and(|e| names_file_line_col(e, "catalog.yaml"))),
        "last_error does not name catalog.yaml:line:col: {st}"
    );

    dir.write(
        "catalog.yaml",
        "features:\n  sso: { kind: flag }\nplans:\n  pro:\n    grants:\n      sso: true\n",
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.get("/readyz").status == 200),
        "not ready 10 s after the fix; status: {}",
        s.status()
    );
    let d = s.check("acme", "sso");
    assert_eq!(d["allowed"], true, "{d}");
    let st = s.status();
    assert!(st["last_error"].is_null(), "{st}");
}

// -------------------------------------------------------------------- metrics ----

#[test]
fn metrics_parse_as_prometheus_and_carry_no_customer_ids() {
    let dir = policy();
    let s = Server::spawn(dir.path());
    // Granted, denied (several reasons), and a consume crossing warn_at (50% of 10).
    s.check("acme", "support.tier");
    s.check("globex", "sso");
    s.check("zz-unknown-customer-9", "sso");
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 11}),
    );
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "initech", "feature": "exports", "amount": 6}),
    );
    assert_eq!(d["warning"], "soft_limit", "{d}");
    s.decide(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "seats", "holder": "user-1"}),
    );
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prom_check.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .args([
            "acme",
            "globex",
            "initech",
            "zz-unknown-customer-9",
            "user-1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is required for this test (CI installs it with prometheus_client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding the metrics to the script");
    let out = child.wait_with_output().expect("running prom_check.py");
    assert!(
        out.status.success(),
        "prom_check.py failed ({:?}):\n{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The decisions above are counted under their labels.
    assert!(
        super::support::metric_value(&text, r#"entitled_quota_warnings_total{feature="exports"}"#)
            .is_some_and(|v| v >= 1.0),
        "{text}"
    );
}

// ------------------------------------------------------------------ audit ----

/// The audit log records each snapshot change (version, files changed, counts) and,
/// with `--audit-decisions denials`, denials only, each with a decision id.
#[test]
fn audit_log_records_snapshot_changes_and_denials() {
    let dir = policy();
    let audit = tempfile::tempdir().expect("audit dir");
    let s = Server::start_with(
        dir.path(),
        &[
            "--audit-dir",
            audit.path().to_str().expect("UTF-8"),
            "--audit-decisions",
            "denials",
        ],
    );
    let read = || -> Vec<Value> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(audit.path())
            .expect("audit dir")
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
        out
    };
    assert_eq!(s.check("acme", "support.tier")["allowed"], true);
    assert_eq!(s.check("globex", "sso")["allowed"], false);
    let ok = wait_until(Duration::from_secs(10), || {
        read().iter().any(|e| e["type"] == "decision")
    });
    assert!(ok, "no decision in the audit log: {:?}", read());
    let events = read();
    let first = &events[0];
    assert_eq!(first["type"], "snapshot", "{first}");
    assert_eq!(first["version"].as_str(), s.version().as_deref());
    assert!(first["previous"].is_null());
    assert!(!first["files_added"].as_array().expect("files").is_empty());
    let decisions: Vec<&Value> = events.iter().filter(|e| e["type"] == "decision").collect();
    assert_eq!(decisions.len(), 1, "denials only: {decisions:?}");
    let d = decisions[0];
    assert_eq!(
        (
            d["customer"].as_str(),
            d["feature"].as_str(),
            d["allowed"].as_bool()
        ),
        (Some("globex"), Some("sso"), Some(false))
    );
    assert_eq!(d["decision_id"].as_str().map(str::len), Some(32), "{d}");
    assert_eq!(d["snapshot"].as_str(), s.version().as_deref());
    assert!(d["reason"].is_string());

    // A changed file is a new snapshot event naming it.
    let before = s.version();
    let name = std::fs::read_dir(dir.path())
        .expect("policy dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.ends_with(".yaml"))
        .expect("a yaml file");
    let mut text = std::fs::read_to_string(dir.path().join(&name)).expect("read");
    text.push_str("\n# touched\n");
    dir.write(&name, &text);
    assert!(
        wait_until(Duration::from_secs(10), || s.version() != before),
        "the change was not loaded"
    );
    assert!(
        wait_until(Duration::from_secs(10), || read()
            .iter()
            .filter(|e| e["type"] == "snapshot")
            .count()
            == 2),
        "no second snapshot event"
    );
    let snaps: Vec<Value> = read()
        .into_iter()
        .filter(|e| e["type"] == "snapshot")
        .collect();
    let second = &snaps[1];
    assert_eq!(second["previous"].as_str(), before.as_deref());
    let changed: Vec<&str> = second["files_changed"]
        .as_array()
        .expect("files_changed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(changed.iter().any(|f| f.ends_with(&name)), "{second}");
}

/// An override applies until the instant it expires and not a microsecond after, on
/// the served (test) clock; `entitled_overrides_active` follows it.
#[test]
fn an_override_stops_applying_the_instant_it_expires() {
    let dir = PolicyDir::with(&[(
        "policy.yaml",
        r#"
features:
  analytics.advanced: { kind: flag }
plans:
  free:
    grants: {}
customers:
  - id: hooli
    subscriptions: [{ plan: free, starts: 2026-01-01 }]
    overrides:
      - feature: analytics.advanced
        grant: true
        expires: 2026-12-31T00:00:00Z
        approved_by: jane@vendor.example
        reason: pilot
        ticket: SUP-1234
"#,
    )]);
    let s = Server::spawn_with(dir.path(), &["--test-clock", "2026-12-30T23:59:59Z"]);
    let d = s.check("hooli", "analytics.advanced");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["source"]["type"], "override", "{d}");
    assert_eq!(d["source"]["ticket"], "SUP-1234", "{d}");
    let active = |s: &Server| {
        super::support::metric_value(&s.get("/metrics").text(), "entitled_overrides_active")
    };
    assert_eq!(active(&s), Some(1.0));
    let summary = s.get("/v1/customers/hooli").json();
    assert_eq!(
        summary["overrides"][0]["approved_by"], "jane@vendor.example",
        "{summary}"
    );

    let set = |t: &str| {
        let r = s.post("/v1/test-clock", &serde_json::json!({ "set": t }));
        assert_eq!(r.status, 200, "{}", r.text());
    };
    set("2026-12-30T23:59:59.999999Z");
    assert_eq!(s.check("hooli", "analytics.advanced")["allowed"], true);
    set("2026-12-31T00:00:00Z");
    let d = s.check("hooli", "analytics.advanced");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["reason"], "expired", "{d}");
    assert_eq!(active(&s), Some(0.0));
}
