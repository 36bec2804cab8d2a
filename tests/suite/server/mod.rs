//! The real binary over real HTTP.
//!
//! Every test starts its own `entitled serve` on its own policy tempdir and talks to
//! it over loopback TCP. Dates in the policy are relative to the real clock, since the
//! binary decides at the time of the request.
//!
//! The helpers the tests share are here; the tests, by topic, in the other files of
//! this folder.

mod connections;
mod disk;
mod endpoints;
mod inputs;
mod lifecycle;
mod observability;
mod requests;

use serde_json::Value;

// `self`: the topic files reach the support module as `super::support`.
use super::support::{self, PolicyDir, Server, days_from_now};

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
