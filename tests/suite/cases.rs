//! Data-driven decision cases: every `tests/cases/*.yaml` holds a policy, a clock and
//! a list of requests with the decision fields expected, or a broken policy with the
//! errors expected. Each case runs against the real loader, engine and memory store.
//!
//! ```yaml
//! description: what this case shows
//! policy: |                 # written to policy.yaml in a fresh directory
//!   features: ...
//! files: { extra.ndjson: "..." }   # optional further files
//! now: 2026-06-15           # the clock (RFC 3339 or a date)
//! steps:
//!   - op: consume           # check | consume | seats_acquire | seats_release
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

use entitled::engine::{Op, Request};
use entitled::policy::{self, Limits, units::parse_duration};
use entitled::time::Timestamp;
use entitled::usage::{self, MemoryStore};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    policy: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
    now: Option<String>,
    #[serde(default)]
    steps: Vec<StepCase>,
    errors: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepCase {
    op: String,
    customer: String,
    feature: String,
    amount: Option<u64>,
    #[serde(default)]
    context: BTreeMap<String, String>,
    at: Option<String>,
    holder: Option<String>,
    now: Option<String>,
    advance: Option<String>,
    repeat: Option<u32>,
    expect: Option<serde_json::Map<String, serde_json::Value>>,
    expect_error: Option<String>,
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
    let store = MemoryStore::new();
    let parse_t = |s: &str| Timestamp::parse(s);
    let mut now = parse_t(case.now.as_deref().unwrap_or("2026-06-15"))?;
    for (i, step) in case.steps.iter().enumerate() {
        let at_step = |msg: String| {
            format!(
                "step {} ({} {} {}): {msg}",
                i + 1,
                step.op,
                step.customer,
                step.feature
            )
        };
        if let Some(n) = &step.now {
            now = parse_t(n).map_err(at_step)?;
        }
        if let Some(a) = &step.advance {
            now = now.saturating_add(parse_duration(a).map_err(at_step)?);
        }
        let op = match step.op.as_str() {
            "check" => Op::Check,
            "consume" => Op::Consume,
            "seats_acquire" => Op::SeatAcquire,
            "seats_release" => Op::SeatRelease,
            other => return Err(at_step(format!("unknown op `{other}`"))),
        };
        let ctx: Vec<(&str, &str)> = step
            .context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let at = step
            .at
            .as_deref()
            .map(parse_t)
            .transpose()
            .map_err(at_step)?;
        let req = Request {
            customer: &step.customer,
            feature: &step.feature,
            amount: step.amount.unwrap_or(1),
            context: &ctx,
            at,
            holder: step.holder.as_deref(),
        };
        let mut result = None;
        for _ in 0..step.repeat.unwrap_or(1) {
            result = Some(usage::decide(&snap, &store, op, &req, now));
        }
        let Some(result) = result else { continue };
        match (result, &step.expect_error) {
            (Err(e), Some(want)) => {
                if !e.to_string().contains(want.as_str()) {
                    return Err(at_step(format!(
                        "expected error containing `{want}`, got `{e}`"
                    )));
                }
            }
            (Err(e), None) => return Err(at_step(format!("request refused: {e}"))),
            (Ok(d), Some(want)) => {
                return Err(at_step(format!(
                    "expected error `{want}`, got decision {d:?}"
                )));
            }
            (Ok(d), None) => {
                let got = serde_json::to_value(&d).map_err(|e| e.to_string())?;
                // The server's direct encoder writes the same document.
                let mut fast = Vec::new();
                d.write_json(&mut fast);
                let fast: serde_json::Value =
                    serde_json::from_slice(&fast).map_err(|e| format!("write_json: {e}"))?;
                if fast != got {
                    return Err(at_step(format!(
                        "write_json differs from Serialize:\n  {fast}\n  {got}"
                    )));
                }
                for (k, want) in step.expect.iter().flatten() {
                    let have = got.get(k).unwrap_or(&serde_json::Value::Null);
                    if !json_eq(have, want) {
                        return Err(at_step(format!(
                            "`{k}`: expected {want}, got {have}\n  decision: {got}"
                        )));
                    }
                }
            }
        }
    }
    Ok(case.steps.len())
}

/// Equality with numbers compared by value (YAML `1` and JSON `1.0` are the same), and
/// objects compared as subsets (an expectation names only the fields it cares about).
fn json_eq(have: &serde_json::Value, want: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (have, want) {
        (Number(a), Number(b)) => a.as_f64() == b.as_f64(),
        (Object(a), Object(b)) => b.iter().all(|(k, v)| json_eq(a.get(k).unwrap_or(&Null), v)),
        (Array(a), Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| json_eq(x, y)),
        (a, b) => a == b,
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
