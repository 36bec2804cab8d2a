//! The bundled `policies/` load, and answer as `policies/README.md` says they do.

use std::path::Path;

use entitled::engine::{Op, Request};
use entitled::policy::{self, Limits};
use entitled::time::Timestamp;
use entitled::usage::{self, MemoryStore};
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
            snap.features.len(),
            snap.plans().count(),
            snap.customers.len(),
            snap.routes.len()
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
        let d = usage::decide(&snap, &MemoryStore::new(), Op::Check, &req, now).expect("decides");
        let have = serde_json::to_value(&d).expect("json");
        if !subset(&have, want) {
            failures.push(format!(
                "row {n} ({customer} {feature}): want {want}\n   have {have}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
