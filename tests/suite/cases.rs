//! Data-driven decision cases: every `tests/cases/*.yaml` holds a policy, a clock and
//! a list of requests with the decision fields expected, or a broken policy with the
//! errors expected. Each case runs against the real loader, engine and memory store,
//! through the same step runner as `entitled test` (`src/policy_test.rs`).
//!
//! ```yaml
//! description: what this case shows
//! policy: |                 # written to policy.yaml in a fresh directory
//!   features: ...
//! files: { extra.ndjson: "..." }   # optional further files
//! now: 2026-06-15           # the clock (RFC 3339 or a date)
//! steps:
//!   - op: consume           # check | consume | seat_acquire | seat_release
//!     customer: acme
//!     feature: api.calls
//!     amount: 5             # optional, default 1
//!     context: { asset: chiller-7 }
//!     at: 2026-01-01        # optional (checks)
//!     holder: user-1        # seats
//!     now: 2026-07-01       # optional: set the clock before this step
//!     advance: 10m          # optional: move the clock before this step
//!     repeat: 3             # optional: run N times, expectations apply to the last
//!     expect: { allowed: true, reason: granted, used: 5 }   # subset of the decision JSON
//!     expect_error: does not apply   # or: the request is refused (substring)
//! errors:                   # for broken policies: each diagnostic, in order (substring)
//!   - "policy.yaml:3:5: unknown feature"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use entitled::policy::{self, Limits};
use entitled::test_runner::{Step, run_steps_with};
use entitled::time::Timestamp;
use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    policy: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
    now: Option<String>,
    #[serde(default)]
    steps: Vec<Spanned<Step>>,
    errors: Option<Vec<String>>,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

fn run_case(path: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let case: Case = serde_saphyr::from_str(&text).map_err(|e| format!("bad case file: {e}"))?;
    run_parsed(&case).map_err(|e| format!("[{}]\n  {e}", case.description))
}

fn run_parsed(case: &Case) -> Result<usize, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("policy.yaml"), &case.policy).map_err(|e| e.to_string())?;
    for (name, body) in &case.files {
        std::fs::write(dir.path().join(name), body).map_err(|e| e.to_string())?;
    }
    let loaded = policy::load_dir(dir.path(), &Limits::default());
    if let Some(expected) = &case.errors {
        let err = match loaded {
            Ok(_) => return Err("policy loaded, but errors were expected".into()),
            Err(e) => e,
        };
        let got: Vec<String> = err.diagnostics.iter().map(|d| d.to_string()).collect();
        if got.len() != expected.len() {
            return Err(format!(
                "expected {} errors, got {}:\n  {}",
                expected.len(),
                got.len(),
                got.join("\n  ")
            ));
        }
        for (g, e) in got.iter().zip(expected) {
            if !g.contains(e.as_str()) {
                return Err(format!("expected an error containing\n  {e}\ngot\n  {g}"));
            }
        }
        return Ok(expected.len());
    }
    let snap = loaded.map_err(|e| format!("policy failed to load:\n{e}"))?;
    let now = Timestamp::parse(case.now.as_deref().unwrap_or("2026-06-15"))?;
    let failures = run_steps_with(&snap, now, &case.steps, |d| {
        // The server's direct encoder writes the same document.
        let got = serde_json::to_value(d).map_err(|e| e.to_string())?;
        let mut fast = Vec::new();
        d.write_json(&mut fast);
        let fast: serde_json::Value =
            serde_json::from_slice(&fast).map_err(|e| format!("write_json: {e}"))?;
        if fast != got {
            return Err(format!(
                "write_json differs from Serialize:\n  {fast}\n  {got}"
            ));
        }
        Ok(())
    });
    match failures.first() {
        None => Ok(case.steps.len()),
        Some((line, msg)) => Err(format!("line {line}: {msg}")),
    }
}

#[test]
fn decision_cases() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("tests/cases exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases found");
    let mut failures = Vec::new();
    let mut steps = 0;
    for f in &files {
        match run_case(f) {
            Ok(n) => steps += n,
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} case files failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
    assert!(steps > 0);
    eprintln!("{} case files, {steps} steps/errors checked", files.len());
}
