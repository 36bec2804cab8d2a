//! The JSON Schema of policy files (`deploy/schema/policy.schema.json`, for editors)
//! stays in step with the loader: every bundled policy file validates against it, and
//! a set of broken files fails both the schema (checked by the `jsonschema` Python
//! library, `tests/schema_check.py`) and the loader.

use std::path::{Path, PathBuf};

use entitled::policy::{self, Limits};

const CATALOG: &str = "features:\n  sso: { kind: flag }\n  api.calls: { kind: quota }\nplans:\n  pro:\n    grants:\n      sso: true\n      api.calls: { limit: 10, per: month }\n";

/// Broken files: each is refused by the loader and by the schema.
const BROKEN: &[(&str, &str)] = &[
    ("unknown-top-level.yaml", "featurez: {}\n"),
    ("unknown-kind.yaml", "features:\n  x: { kind: toggle }\n"),
    (
        "feature-without-kind.yaml",
        "features:\n  x: { unit: call }\n",
    ),
    (
        "unknown-grant-field.yaml",
        "plans:\n  p:\n    grants:\n      api.calls: { limt: 10 }\n",
    ),
    (
        "bad-limit.yaml",
        "plans:\n  p:\n    grants:\n      api.calls: { limit: lots }\n",
    ),
    (
        "bad-reset.yaml",
        "plans:\n  p:\n    grants:\n      api.calls: { limit: 1, reset: weekly }\n",
    ),
    ("customer-without-id.yaml", "customers:\n  - name: Nobody\n"),
    (
        "subscription-without-starts.yaml",
        "customers:\n  - id: a\n    subscriptions: [{ plan: pro }]\n",
    ),
    (
        "bad-date.yaml",
        "customers:\n  - id: a\n    subscriptions: [{ plan: pro, starts: next tuesday }]\n",
    ),
    (
        "override-without-approval.yaml",
        "customers:\n  - id: a\n    overrides: [{ feature: sso, grant: true, expires: 2027-01-01 }]\n",
    ),
    (
        "unknown-customer-field.yaml",
        "customers:\n  - id: a\n    plan: pro\n",
    ),
    (
        "route-without-customer.yaml",
        "routes:\n  - match: { path_prefix: /api }\n",
    ),
    (
        "customers.ndjson",
        "{\"id\":\"a\",\"subscriptions\":[{\"plan\":\"pro\",\"starts\":\"2026-01-01\",\"colour\":\"red\"}]}\n",
    ),
];

fn policy_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read policies").flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "tests" && !name.starts_with('.') {
                policy_files(&p, out);
            }
        } else if [".yaml", ".yml", ".json", ".ndjson"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            out.push(p);
        }
    }
}

#[test]
fn bundled_policies_validate_and_broken_files_fail_schema_and_loader() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut valid = Vec::new();
    policy_files(&root.join("policies"), &mut valid);
    valid.sort();
    assert!(valid.len() >= 8, "bundled policy files: {valid:?}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut invalid = Vec::new();
    for (name, body) in BROKEN {
        // The loader refuses each, beside a catalog that is fine on its own.
        let dir = tmp.path().join(name.replace('.', "_"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("catalog.yaml"), CATALOG).expect("catalog");
        std::fs::write(dir.join(name), body).expect("broken file");
        assert!(
            policy::load_dir(&dir, &Limits::default()).is_err(),
            "the loader accepts {name}:\n{body}"
        );
        invalid.push(dir.join(name));
    }

    let mut cmd = std::process::Command::new("python3");
    cmd.arg(root.join("tests/schema_check.py"))
        .arg(root.join("deploy/schema/policy.schema.json"))
        .arg("--valid")
        .args(&valid)
        .arg(tmp.path().join("catalog_yaml_fine.yaml"))
        .arg("--invalid")
        .args(&invalid);
    std::fs::write(tmp.path().join("catalog_yaml_fine.yaml"), CATALOG).expect("catalog");
    let out = super::support::output_within(&mut cmd, std::time::Duration::from_secs(60));
    assert!(
        out.status.success(),
        "schema_check.py ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
