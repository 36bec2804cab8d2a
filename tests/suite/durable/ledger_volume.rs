//! The ledger's volume under an operator's control: closed segments are gzipped and
//! read back by `usage export`; `usage ack` lets what billing ingested be deleted;
//! past `--ledger-max-bytes` the ledger pauses, the journal keeps the events, and
//! nothing acknowledged is lost when it catches up.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::support::metric_value;
use super::{assert_well_formed, consume, export, files_in, ledger_sum, policy, serve, stop, used};

fn ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["id"].as_str().and_then(|i| i.parse().ok()).expect("id"))
        .collect()
}

/// `entitled usage ARGS --state-dir STATE`: (success, stderr).
fn usage(state: &Path, args: &[&str]) -> (bool, String) {
    let state = state.to_str().expect("UTF-8 path");
    let mut all = vec!["usage"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--state-dir", state]);
    let out = super::run_bounded(&all, Duration::from_secs(20));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ledger_files(state: &Path) -> Vec<String> {
    files_in(&state.join("ledger"))
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("usage-"))
        .collect()
}

fn gauge(s: &super::support::Server, name: &str) -> f64 {
    let text = s.get("/metrics").text();
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Closed segments are gzipped; export reads both forms; an acknowledged position
/// deletes the segments wholly at or before it and nothing after it; export --after
/// resumes there; a position past the last event is refused.
#[test]
fn closed_segments_are_gzipped_and_acknowledged_ones_deleted() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state");
    // Sync: one consume per journal batch, so segments rotate between any two events.
    let flags = ["--durability", "sync", "--ledger-segment-bytes", "1000"];
    let mut s = serve(&dir, state.path(), &flags);
    for _ in 0..40 {
        consume(&s, "api.calls", 1);
    }
    stop(&mut s);
    // A start compresses what a stop left closed and plain.
    let mut s = serve(&dir, state.path(), &flags);
    stop(&mut s);
    let files = ledger_files(state.path());
    let plain = files.iter().filter(|n| n.ends_with(".ndjson")).count();
    let gz = files.iter().filter(|n| n.ends_with(".ndjson.gz")).count();
    assert!(plain <= 1 && gz >= 5, "{files:?}");

    let all = export(state.path(), &[]);
    assert_well_formed(&all, state.path());
    assert_eq!(ledger_sum(&all, "api.calls"), 40);
    let all_ids = ids(&all);
    let p = all_ids[19];
    let (ok, err) = usage(state.path(), &["export"]);
    assert!(
        ok && err.contains(&format!("last position {}", all_ids[39])),
        "{err}"
    );

    let past = (all_ids[39] + 1).to_string();
    let (ok, err) = usage(state.path(), &["ack", &past]);
    assert!(!ok && err.contains("past the ledger's last event"), "{err}");
    let (ok, err) = usage(state.path(), &["ack", &p.to_string()]);
    assert!(ok, "{err}");

    let mut s = serve(&dir, state.path(), &flags);
    assert_eq!(used(&s, "api.calls"), 40, "acknowledging deletes no usage");
    stop(&mut s);
    let left = export(state.path(), &[]);
    assert!(
        left.len() < 30,
        "acknowledged segments were kept: {}",
        left.len()
    );
    let kept = ids(&left);
    assert!(kept.iter().all(|i| *i >= all_ids[16]), "{kept:?}");
    let after = export(state.path(), &["--after", &p.to_string()]);
    assert_eq!(ids(&after), all_ids[20..]);
}

/// Past --ledger-max-bytes the ledger stops appending (bytes at most the cap, a gauge
/// says it is behind) while consumes go on being acknowledged; once the exported
/// events are acknowledged, it catches up from the journal: every event once.
#[test]
fn at_its_cap_the_ledger_pauses_and_catches_up_once_acknowledged() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state");
    let flags = [
        "--durability",
        "sync",
        "--ledger-segment-bytes",
        "1000",
        "--ledger-max-bytes",
        "4000",
    ];
    let mut s = serve(&dir, state.path(), &flags);
    // Closed segments shrink as they are gzipped: consume until the cap is reached.
    let mut total = 0;
    while gauge(&s, "entitled_ledger_behind") == 0.0 {
        assert!(total < 300, "the ledger never reached its cap");
        consume(&s, "api.calls", 1);
        total += 1;
    }
    for _ in 0..3 {
        consume(&s, "api.calls", 1);
        total += 1;
        let bytes = gauge(&s, "entitled_ledger_bytes");
        assert!(bytes > 2000.0 && bytes <= 4000.0, "{bytes}");
    }
    assert_eq!(gauge(&s, "entitled_ledger_max_bytes"), 4000.0);
    // (Closed segments shrinking as they are gzipped may make room for a catch-up in
    // the meantime: what matters is that every event ends up in the ledger once.)
    let first = export(state.path(), &[]);
    let p = *ids(&first).last().expect("some events");
    let (ok, err) = usage(state.path(), &["ack", &p.to_string()]);
    assert!(ok, "{err}");
    // The stop's checkpoint catches the ledger up (after deleting what was acked).
    stop(&mut s);
    let rest = export(state.path(), &["--after", &p.to_string()]);
    assert_well_formed(&rest, state.path());
    assert_eq!((first.len() + rest.len()) as u64, total);
    assert_eq!(
        ledger_sum(&first, "api.calls") + ledger_sum(&rest, "api.calls"),
        total as i64
    );
    let s = serve(&dir, state.path(), &flags);
    assert_eq!(used(&s, "api.calls"), total);
    assert_eq!(gauge(&s, "entitled_ledger_behind"), 0.0);
}
