//! The "monitor and optimize" report against the real binary on a test clock:
//! consumes and checks of four customers on two plans, then `GET /v1/reports/usage`
//! (limits hit by feature and plan, entitlements granted but unused, overrides by
//! feature and approver, denials by reason, with `?since=`), a customer's recent
//! denials, the aggregation kept across a restart, and `entitled report usage` over
//! the state directory answering the same.

use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Server, output_within};

const POLICY: &str = r#"
features:
  api.calls: { kind: quota }
  sso: { kind: flag }
  exports: { kind: quota }
plans:
  basic:
    grants:
      api.calls: { limit: 2, per: month, reset: calendar }
      sso: true
  pro:
    grants:
      api.calls: { limit: 100, per: month, reset: calendar }
      sso: true
      exports: { limit: 5, per: month, reset: calendar }
customers:
  - id: a
    subscriptions: [{ plan: basic, starts: 2026-01-01 }]
  - id: b
    subscriptions: [{ plan: basic, starts: 2026-01-01 }]
  - id: c
    subscriptions: [{ plan: pro, starts: 2026-01-01 }]
    overrides:
      - { feature: exports, grant: { limit: 50, per: month }, expires: 2026-12-31, approved_by: maria, reason: pilot }
  - id: d
    subscriptions: [{ plan: pro, starts: 2026-01-01 }]
    overrides:
      - { feature: exports, grant: { limit: 60, per: month }, expires: 2026-12-31, approved_by: maria, reason: pilot }
      - { feature: sso, grant: false, expires: 2026-12-31, approved_by: li, reason: security review }
"#;

fn start(policies: &std::path::Path, state: &std::path::Path, clock: &str) -> Server {
    let state = state.display().to_string();
    Server::spawn_with(policies, &["--state-dir", &state, "--test-clock", clock])
}

fn decide(s: &Server, path: &str, customer: &str, feature: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = s.post(path, &json!({"customer": customer, "feature": feature}));
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["reason"].as_str().unwrap().to_string()
        })
        .collect()
}

fn report(s: &Server, query: &str) -> Value {
    let r = s.get(&format!("/v1/reports/usage{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn the_usage_report_counts_limits_unused_overrides_and_denials() {
    let policies = PolicyDir::with(&[("policy.yaml", POLICY)]);
    let state = tempfile::tempdir().unwrap();
    let day1 = "2026-03-10T12:00:00Z";
    let mut s = start(policies.path(), state.path(), day1);

    assert_eq!(
        decide(&s, "/v1/consume", "a", "api.calls", 3),
        ["granted", "granted", "quota_exhausted"]
    );
    assert_eq!(
        decide(&s, "/v1/consume", "b", "api.calls", 4),
        ["granted", "granted", "quota_exhausted", "quota_exhausted"]
    );
    decide(&s, "/v1/consume", "c", "api.calls", 1);
    decide(&s, "/v1/check", "c", "sso", 2);
    assert_eq!(decide(&s, "/v1/check", "a", "exports", 1), ["not_entitled"]);
    assert_eq!(
        decide(&s, "/v1/check", "zz", "sso", 1),
        ["unknown_customer"]
    );

    let r = report(&s, "");
    assert_eq!(r["since"], Value::Null);
    assert_eq!(r["until"], day1);
    assert_eq!(
        r["limits_hit"],
        json!([{"feature": "api.calls", "plan": "basic", "denials": 3, "customers": 2}])
    );
    assert_eq!(
        r["denials"],
        json!([
            {"reason": "quota_exhausted", "count": 3},
            {"reason": "not_entitled", "count": 1},
            {"reason": "unknown_customer", "count": 1},
        ])
    );
    // Granted now, against customers seen allowed: most unused first. d's sso is
    // revoked by an override but still granted by its plan (the plan's grant counts).
    assert_eq!(
        r["unused"],
        json!([
            {"feature": "exports", "plan": "pro", "customers_granted": 2, "customers_using": 0},
            {"feature": "sso", "plan": "basic", "customers_granted": 2, "customers_using": 0},
            {"feature": "api.calls", "plan": "pro", "customers_granted": 2, "customers_using": 1},
            {"feature": "sso", "plan": "pro", "customers_granted": 2, "customers_using": 1},
            {"feature": "api.calls", "plan": "basic", "customers_granted": 2, "customers_using": 2},
        ])
    );
    assert_eq!(
        r["overrides"],
        json!([
            {"feature": "exports", "approved_by": "maria", "count": 2},
            {"feature": "sso", "approved_by": "li", "count": 1},
        ])
    );

    // A customer's recent denials, newest first; one never denied has none.
    let d = s.get("/v1/customers/b/denials");
    assert_eq!(d.status, 200, "{}", d.text());
    let want = json!({"at": day1, "feature": "api.calls", "reason": "quota_exhausted"});
    assert_eq!(
        d.json(),
        json!({"customer": "b", "denials": [want.clone(), want]})
    );
    assert_eq!(
        s.get("/v1/customers/c/denials").json(),
        json!({"customer": "c", "denials": []})
    );

    // The next day: `since` leaves the first day out.
    let day2 = "2026-03-11T09:00:00Z";
    let t = s.post("/v1/test-clock", &json!({"set": day2}));
    assert_eq!(t.status, 200, "{}", t.text());
    decide(&s, "/v1/consume", "b", "api.calls", 1);
    let r2 = report(&s, "?since=2026-03-11");
    assert_eq!(r2["since"], "2026-03-11T00:00:00Z");
    assert_eq!(
        r2["limits_hit"],
        json!([{"feature": "api.calls", "plan": "basic", "denials": 1, "customers": 1}])
    );
    assert_eq!(
        r2["denials"],
        json!([{"reason": "quota_exhausted", "count": 1}])
    );
    let bad = s.get("/v1/reports/usage?since=yesterday");
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.json()["error"]["field"], "since", "{}", bad.text());
    let odd = s.get("/v1/reports/usage?until=x");
    assert_eq!(odd.status, 400, "{}", odd.text());

    // The aggregation is kept in the state directory across a restart.
    let before = report(&s, "?since=2026-03-01");
    assert!(s.stop_gracefully().success());
    let s = start(policies.path(), state.path(), day2);
    assert_eq!(report(&s, "?since=2026-03-01"), before);
    assert_eq!(
        s.get("/v1/customers/b/denials").json()["denials"][0]["at"],
        day2
    );
    drop(s);

    // The command line reads the same file and answers the same.
    let out = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .args(["report", "usage"])
            .arg(policies.path())
            .arg("--state-dir")
            .arg(state.path())
            .args(["--since", "2026-03-01", "--at", day2, "--json"]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, before, "{cli:#}");

    let table = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .args(["report", "usage"])
            .arg(policies.path())
            .arg("--state-dir")
            .arg(state.path()),
        Duration::from_secs(20),
    );
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("LIMITS HIT"), "{text}");
    assert!(text.contains("quota_exhausted"), "{text}");

    // No aggregation in a state directory: no answer (exit 2), saying why.
    let empty = tempfile::tempdir().unwrap();
    let none = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .args(["report", "usage"])
            .arg(policies.path())
            .arg("--state-dir")
            .arg(empty.path()),
        Duration::from_secs(20),
    );
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no usage aggregation"));
}
