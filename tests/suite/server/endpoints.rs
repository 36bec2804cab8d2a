//! Every endpoint in its documented shape: check, consume, batch, seats, the customer
//! summary, expiring, status, health, readiness and metrics.

use serde_json::json;

use super::support::{Server, days_from_now, parse_time};

use super::{assert_error, policy, used};

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

/// The top-level keys of a JSON object, in the order written.
fn keys_in_order(text: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut out = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        out.push(k);
                    }
                    Ok(Keys(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Keys>(text)
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        .0
}

/// Commit and release answer as decisions: a reserve's keys in the same order
/// (`source`, `expires_at`, `in_grace`, `trial` included), with `operation`,
/// `committed` and `released` right after `reservation`; a consume's keys are the
/// reserve's less `reservation`. The grant fields are the reserve's.
#[test]
fn commit_and_release_answer_in_the_decision_shape() {
    let dir = policy();
    let s = Server::start(dir.path());
    let body = json!({"customer": "globex", "feature": "api.calls", "amount": 5});
    let consume = s.post("/v1/consume", &body);
    let reserve = |s: &Server| {
        let r = s.post("/v1/reserve", &body);
        let id = r.json()["reservation"].as_str().expect("an id").to_string();
        (r, id)
    };
    let (reserved, id) = reserve(&s);
    let commit = s.post(
        &format!("/v1/reservations/{id}/commit"),
        &json!({"amount": 3}),
    );
    let (_, id) = reserve(&s);
    let release = s.post_raw(&format!("/v1/reservations/{id}/release"), "");
    for r in [&consume, &reserved, &commit, &release] {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let reserve_keys = keys_in_order(&reserved.text());
    let settle = ["operation", "committed", "released"];
    for (answer, what) in [(&commit, "commit"), (&release, "release")] {
        let keys = keys_in_order(&answer.text());
        let at = keys
            .iter()
            .position(|k| k == "reservation")
            .expect("reservation");
        assert_eq!(keys[at + 1..at + 4], settle, "{what}: {keys:?}");
        let rest: Vec<_> = keys
            .iter()
            .filter(|k| !settle.contains(&k.as_str()))
            .collect();
        assert_eq!(rest, reserve_keys.iter().collect::<Vec<_>>(), "{what}");
        let (a, r) = (answer.json(), reserved.json());
        for field in [
            "source",
            "expires_at",
            "in_grace",
            "trial",
            "kind",
            "limit",
            "resets_at",
        ] {
            assert_eq!(a[field], r[field], "{what}: `{field}` in {a}");
        }
        assert_eq!(a["operation"], what, "{a}");
    }
    let consume_keys: Vec<_> = reserve_keys
        .iter()
        .filter(|k| *k != "reservation")
        .collect();
    assert_eq!(
        keys_in_order(&consume.text()).iter().collect::<Vec<_>>(),
        consume_keys
    );
    assert!(
        reserve_keys.contains(&"source".to_string()),
        "{reserve_keys:?}"
    );
    let (c, r) = (commit.json(), release.json());
    assert_eq!(
        (&c["committed"], &c["released"]),
        (&json!(3), &json!(2)),
        "{c}"
    );
    assert_eq!(
        (&r["committed"], &r["released"]),
        (&json!(0), &json!(5)),
        "{r}"
    );
    assert_eq!(r["used"], 5 + 3, "the consume and the commit: {r}");
}
