//! What operators see: Prometheus metrics without customer ids, the audit log of
//! snapshot changes and denials, and the overrides gauge as an override expires.

use std::io::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Server, wait_until};

use super::policy;

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

    prom_check(
        &text,
        &[
            "acme",
            "globex",
            "initech",
            "zz-unknown-customer-9",
            "user-1",
        ],
    );

    // The decisions above are counted under their labels, seats under the ledger's
    // name for the operation.
    let acquired = r#"entitled_decisions_total{op="seat_acquire",kind="seats",allowed="true",reason="granted"}"#;
    assert_eq!(
        super::support::metric_value(&text, acquired),
        Some(1.0),
        "{text}"
    );
    assert!(
        super::support::metric_value(&text, r#"entitled_quota_warnings_total{feature="exports"}"#)
            .is_some_and(|v| v >= 1.0),
        "{text}"
    );
}

/// Runs tests/prom_check.py (the real Prometheus text parser) on a scrape; fails the
/// test with what it found.
fn prom_check(text: &str, args: &[&str]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prom_check.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .args(args)
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
}

/// The series alerts and dashboards use exist at 0 from start-up, before the first
/// decision, refusal, error, replay or checkpoint: `increase()` over a series that
/// appears with its first event sees nothing, so the first failure would go unseen.
#[test]
fn counters_exist_at_zero_right_after_start() {
    let dir = policy();
    let s = Server::spawn(dir.path());
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    prom_check(&text, &["--at-start"]);
    for feature in ["api.calls", "exports"] {
        let series = format!(r#"entitled_quota_warnings_total{{feature="{feature}"}}"#);
        assert_eq!(
            super::support::metric_value(&text, &series),
            Some(0.0),
            "{text}"
        );
    }
    assert!(
        text.contains("entitled_policy_reloads_total Policy reload attempts, by result (success")
            && !text.contains("unchanged"),
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
