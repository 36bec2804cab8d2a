//! Policy tests: `tests/*.yaml` beside the policies, run by `entitled test DIR` (as
//! `opa test` or `cerbos compile` run theirs).
//!
//! ```yaml
//! description: acme's plan after the upgrade    # optional
//! now: 2026-12-01                               # the clock (RFC 3339 or a date)
//! steps:
//!   - op: check             # check | consume | seat_acquire | seat_release
//!     customer: acme
//!     feature: analytics.advanced
//!     expect: { allowed: true, reason: granted, source: { plan: pro } }
//!   - op: consume
//!     customer: acme
//!     feature: api.calls
//!     amount: 5             # optional, default 1
//!     context: { asset: chiller-7 }   # optional
//!     at: 2026-01-01        # optional (checks)
//!     holder: user-1        # seats
//!     now: 2026-12-02       # optional: set the clock before this step
//!     advance: 10m          # optional: move the clock before this step
//!     repeat: 3             # optional: run N times, expectations apply to the last
//!     expect: { used: 15 }  # fields of the decision JSON (objects: a subset)
//!     expect_error: does not apply   # or: the request is refused (substring)
//! ```
//!
//! Each file starts with fresh usage counters and runs its steps in order against
//! the real engine and the in-memory store. A failure names the step's file:line and
//! what was expected against what the decision said.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::decide;
use crate::engine::{Op, Request};
use crate::policy::{Snapshot, units::parse_duration};
use crate::time::Timestamp;
use crate::usage::MemoryStore;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub op: String,
    pub customer: String,
    pub feature: String,
    pub amount: Option<u64>,
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    pub at: Option<String>,
    pub holder: Option<String>,
    pub now: Option<String>,
    pub advance: Option<String>,
    pub repeat: Option<u32>,
    pub expect: Option<serde_json::Map<String, serde_json::Value>>,
    pub expect_error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for the reader of the file")]
    description: Option<String>,
    now: Option<String>,
    #[serde(default)]
    steps: Vec<Spanned<Step>>,
}

/// One step that did not do what its file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub steps: usize,
    pub failures: Vec<Failure>,
}

/// Runs `steps` in order from `now` against fresh counters; returns the failures,
/// each with its step's line.
pub fn run_steps(snap: &Snapshot, now: Timestamp, steps: &[Spanned<Step>]) -> Vec<(usize, String)> {
    run_steps_with(snap, now, steps, |_| Ok(()))
}

/// As [`run_steps`], with a further check of every decision (the test suite uses it
/// to hold the server's direct encoder to the `Serialize` form).
pub fn run_steps_with(
    snap: &Snapshot,
    now: Timestamp,
    steps: &[Spanned<Step>],
    mut also: impl FnMut(&crate::engine::Decision<'_>) -> Result<(), String>,
) -> Vec<(usize, String)> {
    let store = MemoryStore::new();
    let mut now = now;
    let mut failures = Vec::new();
    for spanned in steps {
        let step = &spanned.value;
        let line = spanned.referenced.line().max(1) as usize;
        let at_step = |msg: String| {
            (
                line,
                format!("{} {} {}: {msg}", step.op, step.customer, step.feature),
            )
        };
        if let Some(n) = &step.now {
            match Timestamp::parse(n) {
                Ok(t) => now = t,
                Err(e) => {
                    failures.push(at_step(format!("`now`: {e}")));
                    continue;
                }
            }
        }
        if let Some(a) = &step.advance {
            match parse_duration(a) {
                Ok(us) => now = now.saturating_add(us),
                Err(e) => {
                    failures.push(at_step(format!("`advance`: {e}")));
                    continue;
                }
            }
        }
        let Some(op) = step_op(&step.op) else {
            failures.push(at_step(format!(
                "unknown op `{}` (check, consume, seat_acquire, seat_release)",
                step.op
            )));
            continue;
        };
        let ctx: Vec<(&str, &str)> = step
            .context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let at = match step.at.as_deref().map(Timestamp::parse).transpose() {
            Ok(at) => at,
            Err(e) => {
                failures.push(at_step(format!("`at`: {e}")));
                continue;
            }
        };
        let req = Request {
            customer: &step.customer,
            feature: &step.feature,
            amount: step.amount.unwrap_or(1),
            context: &ctx,
            at,
            holder: step.holder.as_deref(),
        };
        let mut result = None;
        for _ in 0..step.repeat.unwrap_or(1).max(1) {
            result = Some(decide::in_memory(snap, &store, op, &req, now));
        }
        let Some(result) = result else { continue };
        match (result, &step.expect_error) {
            (Err(e), Some(want)) => {
                if !e.to_string().contains(want.as_str()) {
                    failures.push(at_step(format!(
                        "expected an error containing `{want}`, got `{e}`"
                    )));
                }
            }
            (Err(e), None) => failures.push(at_step(format!("the request is refused: {e}"))),
            (Ok(d), Some(want)) => failures.push(at_step(format!(
                "expected the error `{want}`, got a decision: {}",
                serde_json::to_string(&d).unwrap_or_default()
            ))),
            (Ok(d), None) => {
                if let Err(e) = also(&d) {
                    failures.push(at_step(e));
                }
                let got = serde_json::to_value(&d).unwrap_or_default();
                for (k, want) in step.expect.iter().flatten() {
                    let have = got.get(k).unwrap_or(&serde_json::Value::Null);
                    if !json_eq(have, want) {
                        failures.push(at_step(format!(
                            "`{k}`: expected {want}, got {have}\n    decision: {got}"
                        )));
                    }
                }
            }
        }
    }
    failures
}

/// Equality with numbers compared by value (YAML `1` and JSON `1.0` are the same), and
/// objects compared as subsets (an expectation names only the fields it cares about).
pub fn json_eq(have: &serde_json::Value, want: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (have, want) {
        (Number(a), Number(b)) => a.as_f64() == b.as_f64(),
        (Object(a), Object(b)) => b.iter().all(|(k, v)| json_eq(a.get(k).unwrap_or(&Null), v)),
        (Array(a), Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| json_eq(x, y)),
        (a, b) => a == b,
    }
}

/// A step's operation, named as the ledger and the metrics name it. `seats_acquire`
/// and `seats_release` (after the `/v1/seats/...` paths) are accepted too: policy
/// tests written with them keep running.
fn step_op(name: &str) -> Option<Op> {
    Some(match name {
        "check" => Op::Check,
        "consume" => Op::Consume,
        "seat_acquire" | "seats_acquire" => Op::SeatAcquire,
        "seat_release" | "seats_release" => Op::SeatRelease,
        _ => return None,
    })
}

/// Runs every `tests/*.yaml` under `dir` (at any depth: each policy set may carry its
/// own) against the snapshot compiled from `dir`.
pub fn run_dir(dir: &Path, snap: &Snapshot) -> std::io::Result<Report> {
    let mut files = Vec::new();
    find(dir, &mut files)?;
    files.sort();
    let mut report = Report::default();
    for path in files {
        report.files += 1;
        let shown = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
        let shown = dir.join(shown);
        let text = std::fs::read_to_string(&path)?;
        let file: File = match serde_saphyr::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                report.failures.push(Failure {
                    file: shown,
                    line: 1,
                    message: format!("not a policy test file: {e}"),
                });
                continue;
            }
        };
        let now = match Timestamp::parse(file.now.as_deref().unwrap_or("")) {
            Ok(t) => t,
            Err(e) => {
                report.failures.push(Failure {
                    file: shown,
                    line: 1,
                    message: format!("`now` is required (the clock the steps run at): {e}"),
                });
                continue;
            }
        };
        report.steps += file.steps.len();
        for (line, message) in run_steps(snap, now, &file.steps) {
            report.failures.push(Failure {
                file: shown.clone(),
                line,
                message,
            });
        }
    }
    Ok(report)
}

/// `tests/*.yaml` files under `dir`, following the loader's rule for hidden names.
fn find(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            if name == "tests" {
                for t in std::fs::read_dir(&path)? {
                    let t = t?.path();
                    let yaml = t.extension().is_some_and(|x| x == "yaml" || x == "yml");
                    if yaml && t.is_file() {
                        out.push(t);
                    }
                }
            } else {
                find(&path, out)?;
            }
        }
    }
    Ok(())
}
