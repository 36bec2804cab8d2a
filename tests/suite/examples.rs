//! The bundled `policies/` load, and answer as `policies/README.md` says they do.

use std::path::Path;

use entitled::decide;
use entitled::engine::{Op, Request};
use entitled::policy::{self, Limits};
use entitled::time::Timestamp;
use entitled::usage::MemoryStore;
use serde_json::{Value, json};

fn subset(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(a), Value::Object(b)) => b
            .iter()
            .all(|(k, v)| subset(a.get(k).unwrap_or(&Value::Null), v)),
        (a, b) => a == b,
    }
}

#[test]
fn bundled_policies_answer_as_documented() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let snap = policy::load_dir(&dir, &Limits::default())
        .unwrap_or_else(|e| panic!("policies/ must load:\n{e}"));
    assert_eq!(
        (
            snap.catalog.features.len(),
            snap.plans().count(),
            snap.customers.len(),
            snap.catalog.routes.len()
        ),
        (20, 9, 17, 3)
    );
    let now = Timestamp::parse("2026-12-01").expect("time");
    assert_eq!(snap.overrides_active(now), 3);

    let fs = |asset: &'static str, loc: &'static str| vec![("asset", asset), ("location", loc)];
    type Row<'a> = (
        u32,
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<&'a str>,
        Value,
    );
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        (1, "acme", "analytics.advanced", vec![], None, json!({"allowed": true, "reason": "granted", "source": {"type": "subscription", "plan": "pro", "via": ["pro", "advanced-analytics"]}, "expires_at": "2027-06-01T00:00:00Z"})),
        (2, "acme", "api.calls", vec![], None, json!({"allowed": true, "limit": 130000})),
        (3, "acme", "api.calls", vec![], Some("2026-03-01"), json!({"allowed": true, "limit": 1000})),
        (4, "globex", "sso", vec![], None, json!({"allowed": true, "trial": true, "source": {"plan": "enterprise", "via": ["enterprise", "security-pack"]}, "expires_at": "2026-12-15T00:00:00Z"})),
        (5, "globex", "sso", vec![], Some("2026-12-15"), json!({"allowed": false, "reason": "expired"})),
        (6, "initech", "analytics.advanced", vec![], None, json!({"allowed": true, "in_grace": true})),
        (7, "initech", "analytics.advanced", vec![], Some("2026-12-10"), json!({"allowed": false, "reason": "expired"})),
        (8, "umbrella", "api.calls", vec![], None, json!({"allowed": true, "limit": 250000, "source": {"type": "grant", "priority": 10}})),
        (9, "umbrella", "api.calls", vec![], Some("2026-05-01"), json!({"allowed": true, "limit": 100000})),
        (10, "umbrella", "seats", vec![], None, json!({"allowed": true, "limit": 35})),
        (11, "umbrella", "max_upload_mb", vec![], None, json!({"allowed": true, "value": 1024})),
        (12, "hooli", "analytics.advanced", vec![], None, json!({"allowed": true, "source": {"type": "override", "ticket": "SUP-1234", "approved_by": "jane@vendor.example"}, "expires_at": "2026-12-31T00:00:00Z"})),
        (13, "hooli", "analytics.advanced", vec![], Some("2026-12-31"), json!({"allowed": false, "upgrade": ["pro", "enterprise"]})),
        (14, "hooli", "sso", vec![], None, json!({"allowed": false, "upgrade": ["enterprise", "sso-addon"]})),
        (15, "stark", "support.tier", vec![], None, json!({"allowed": true, "value": "priority"})),
        (16, "wayne", "sso", vec![], None, json!({"allowed": false, "reason": "not_yet_active"})),
        (17, "wayne", "sso", vec![], Some("2027-01-15"), json!({"allowed": true, "source": {"plan": "enterprise", "via": ["enterprise", "security-pack"]}})),
        (18, "tailspin", "analytics.advanced", vec![], None, json!({"allowed": false, "reason": "expired"})),
        (19, "contoso", "seats", vec![], None, json!({"allowed": true, "limit": 45})),
        (20, "wingtip", "seats", vec![], None, json!({"allowed": true, "limit": 8})),
        (21, "polar-foods", "support.response_time", fs("chiller-7", "plant-2"), None, json!({"allowed": true, "value": "2h", "source": {"plan": "gold-support", "via": ["gold-support", "premium-services"]}})),
        (22, "polar-foods", "support.response_time", fs("chiller-7", "plant-2"), Some("2026-03-15"), json!({"allowed": true, "value": "24h", "source": {"plan": "silver-support", "via": ["silver-support", "standard-services"]}})),
        (23, "polar-foods", "maintenance.visits", fs("chiller-9", "plant-2"), None, json!({"allowed": true, "limit": 4})),
        (24, "kestrel-hospital", "onsite.repair", fs("generator-1", "east-wing"), None, json!({"allowed": true, "in_grace": true, "source": {"via": ["silver-support", "parts-and-labour"]}})),
        (25, "kestrel-hospital", "onsite.repair", fs("generator-1", "east-wing"), Some("2026-12-09"), json!({"allowed": false, "reason": "expired"})),
        (26, "harbor-logistics", "onsite.repair", fs("forklift-12", "dock-a"), None, json!({"allowed": true, "source": {"type": "override", "ticket": "FS-4471"}})),
        (27, "harbor-logistics", "onsite.repair", fs("forklift-12", "dock-a"), Some("2027-01-20"), json!({"allowed": false, "upgrade": ["silver-support", "gold-support"]})),
        (28, "harbor-logistics", "support.incidents", fs("forklift-12", "dock-a"), None, json!({"allowed": true, "limit": 6, "source": {"type": "override", "ticket": "FS-4472"}, "resets_at": "2027-01-01T00:00:00Z"})),
        (29, "harbor-logistics", "support.incidents", fs("forklift-12", "dock-a"), Some("2027-01-05"), json!({"allowed": true, "limit": 2})),
        (30, "harbor-logistics", "parts.covered", fs("forklift-99", "dock-a"), None, json!({"allowed": false, "reason": "out_of_scope"})),
        (31, "meridian-pharma", "support.response_time", fs("cleanroom-ahu-1", "plant-4"), None, json!({"allowed": true, "value": "1h"})),
        (32, "meridian-pharma", "support.response_time", fs("ahu-2", "plant-4"), None, json!({"allowed": true, "value": "24h"})),
        (33, "meridian-pharma", "support.incidents", fs("ahu-2", "plant-4"), None, json!({"allowed": true, "limit": 12, "source": {"type": "grant", "priority": 10}, "resets_at": "2027-01-01T00:00:00Z"})),
        (34, "meridian-pharma", "support.phone_24x7", fs("ahu-2", "plant-4"), None, json!({"allowed": false, "reason": "not_entitled", "upgrade": ["gold-support"]})),
        (35, "aurora-data", "support.phone_24x7", vec![("location", "dc-north")], None, json!({"allowed": false, "reason": "not_yet_active"})),
        (36, "aurora-data", "support.phone_24x7", vec![("location", "dc-north")], Some("2027-02-01"), json!({"allowed": true, "source": {"via": ["gold-support", "premium-services"]}})),
    ];
    let mut failures = Vec::new();
    for (n, customer, feature, ctx, at, want) in &rows {
        let at = at.map(|s| Timestamp::parse(s).expect("time"));
        let req = Request {
            context: ctx,
            at,
            ..Request::new(customer, feature)
        };
        let d =
            decide::in_memory(&snap, &MemoryStore::new(), Op::Check, &req, now).expect("decides");
        let have = serde_json::to_value(&d).expect("json");
        if !subset(&have, want) {
            failures.push(format!(
                "row {n} ({customer} {feature}): want {want}\n   have {have}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn entitled(args: &[&str]) -> std::process::Output {
    super::support::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled")).args(args),
        std::time::Duration::from_secs(30),
    )
}

/// `entitled test` passes on the bundled policies' own tests, and a wrong expectation
/// fails with the step's file:line, the expected and the actual value, and exit 1.
#[test]
fn policy_tests_pass_and_a_wrong_expectation_fails_with_its_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let out = entitled(&["test", dir.to_str().expect("UTF-8 path")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("2 file(s)") && text.contains("0 failure(s)"),
        "{text}"
    );

    let copy = tempfile::tempdir().expect("tempdir");
    for sub in ["saas", "field-service"] {
        let to = copy.path().join(sub);
        std::fs::create_dir_all(to.join("tests")).expect("mkdir");
        for e in std::fs::read_dir(dir.join(sub)).expect("read").flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
        for e in std::fs::read_dir(dir.join(sub).join("tests"))
            .expect("read")
            .flatten()
        {
            std::fs::copy(e.path(), to.join("tests").join(e.file_name())).expect("copy");
        }
    }
    let plans = copy.path().join("saas/tests/plans.yaml");
    let body = std::fs::read_to_string(&plans).expect("plans.yaml");
    assert!(body.contains("expect: { limit: 35 }"));
    std::fs::write(
        &plans,
        body.replace("expect: { limit: 35 }", "expect: { limit: 36 }"),
    )
    .expect("write");
    let step_line = body
        .lines()
        .position(|l| l.contains("limit: 35"))
        .and_then(|i| {
            // The step starts at its `- op:` line, the last one above its `expect`.
            body.lines()
                .take(i)
                .enumerate()
                .filter(|(_, l)| l.trim_start().starts_with("- op:"))
                .last()
                .map(|(n, _)| n + 1)
        })
        .expect("the step");
    let out = entitled(&["test", copy.path().to_str().expect("UTF-8 path")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "saas/tests/plans.yaml:{step_line}: check umbrella seats: `limit`: expected 36, got 35"
        )),
        "{text}"
    );
    assert!(text.contains("1 failure(s)"), "{text}");
}

/// `entitled report expiring` lists what ends within the window, soonest first, as a
/// table or JSON.
#[test]
fn report_expiring_lists_what_ends_soonest_first() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let dir = dir.to_str().expect("UTF-8 path");
    let out = entitled(&[
        "report",
        "expiring",
        dir,
        "--within",
        "31d",
        "--at",
        "2026-12-01",
        "--json",
    ]);
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let items = doc["items"].as_array().expect("items");
    let got: Vec<(&str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["customer"].as_str().unwrap_or(""),
                i["type"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("globex", "subscription"),
            ("harbor-logistics", "override"),
            ("hooli", "override")
        ],
        "{doc}"
    );
    assert_eq!(items[0]["days_left"], 14);
    let table = entitled(&[
        "report",
        "expiring",
        dir,
        "--within",
        "31d",
        "--at",
        "2026-12-01",
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("globex") && text.contains("enterprise (trial)"),
        "{text}"
    );
    assert!(text.contains("3 ending within 31d"), "{text}");
}
