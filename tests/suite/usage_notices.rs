//! Usage-threshold notices against the real binary on a test clock, with a webhook
//! receiver of the test's own: consumes that reach 80% and 100% of a monthly quota
//! (and a grant's own `notify_at`) each send one `entitled.usage.threshold` event to
//! the event log and the webhook; a restart whose counters start again from zero
//! (`--durability memory`, so every threshold is reached a second time) repeats none;
//! the next calendar month notifies afresh.
//!
//! Nothing sleeps for time to pass. The consume path hands a crossing to the notices
//! thread and answers at once, so the test waits for it: `POST /v1/test-clock` is a
//! barrier (the notices thread answers it after the crossings queued before it), and
//! webhook delivery is awaited with a bounded poll.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::notices::{Hook, events, metric};
use super::support::{PolicyDir, Server, wait_until};

const DELIVERY: Duration = Duration::from_secs(10);

const POLICY: &str = r#"
features:
  api.calls: { kind: quota }
  exports: { kind: quota, notify_at: [25%] }
  uploads: { kind: quota, notify_at: [] }
plans:
  pro:
    grants:
      api.calls: { limit: 10, per: month, reset: calendar }
      exports: { limit: 4, per: month, reset: calendar, notify_at: [50%] }
      uploads: { limit: 2, per: month, reset: calendar }
customers:
  - id: acme
    subscriptions:
      - { plan: pro, starts: 2026-01-01 }
"#;

fn start(policies: &Path, notices: &Path, clock: &str, hook: &Hook) -> Server {
    let dir = notices.display().to_string();
    let url = hook.url();
    Server::spawn_with(
        policies,
        &[
            "--durability",
            "memory",
            "--notices-dir",
            &dir,
            "--test-clock",
            clock,
            "--notify-url",
            &url,
            "--notify-retry-base",
            "10ms",
        ],
    )
}

fn consume(s: &Server, feature: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let r = s.post(
                "/v1/consume",
                &json!({"customer": "acme", "feature": feature}),
            );
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()
        })
        .collect()
}

/// Moves (or re-sets) the test clock: the notices thread answers after the crossings
/// queued before it, so their events are on disk when this returns.
fn barrier(s: &Server, t: &str) {
    let r = s.post("/v1/test-clock", &json!({ "set": t }));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn usage_events(dir: &Path) -> Vec<Value> {
    events(dir)
        .into_iter()
        .filter(|e| e["type"] == "entitled.usage.threshold")
        .collect()
}

fn delivered(hook: &Hook, n: usize) -> bool {
    wait_until(DELIVERY, || {
        hook.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .count()
            >= n
    })
}

#[test]
fn each_usage_threshold_is_noticed_once_per_window_across_a_restart() {
    let policies = PolicyDir::with(&[("policy.yaml", POLICY)]);
    let notices = tempfile::tempdir().unwrap();
    let hook = Hook::start(|_| 200);
    let now = "2026-03-10T12:00:00Z";
    let mut s = start(policies.path(), notices.path(), now, &hook);
    let version = s.version().expect("a snapshot");

    // 7 of 10: nothing; the 8th reaches 80%; the 10th 100%; the 11th is denied.
    let answers = consume(&s, "api.calls", 11);
    assert!(answers[..10].iter().all(|a| a["allowed"] == true));
    assert_eq!(answers[10]["reason"], "quota_exhausted");
    // exports: the grant's 50% wins over the feature's 25% (2 of 4).
    consume(&s, "exports", 3);
    // uploads: `notify_at: []` notices nothing, even at the limit.
    consume(&s, "uploads", 2);
    barrier(&s, now);

    let ev = usage_events(notices.path());
    assert_eq!(ev.len(), 3, "{ev:#?}");
    for (e, (feature, percent, threshold, used, limit)) in ev.iter().zip([
        ("api.calls", 80.0, 8, 8, 10),
        ("api.calls", 100.0, 10, 10, 10),
        ("exports", 50.0, 2, 2, 4),
    ]) {
        assert_eq!(e["specversion"], "1.0", "{e}");
        assert_eq!(e["source"], "urn:entitled:notices", "{e}");
        assert_eq!(e["subject"], "acme", "{e}");
        assert_eq!(e["time"], now, "{e}");
        let id = e["id"].as_str().expect("an id");
        assert!(id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()));
        let d = &e["data"];
        assert_eq!(d["customer"], "acme", "{e}");
        assert_eq!(d["feature"], feature, "{e}");
        assert_eq!(d["plan"], "pro", "{e}");
        assert_eq!(d["threshold_percent"], percent, "{e}");
        assert_eq!(d["threshold"], threshold, "{e}");
        assert_eq!(d["used"], used, "{e}");
        assert_eq!(d["limit"], limit, "{e}");
        assert_eq!(d["window_start"], "2026-03-01T00:00:00Z", "{e}");
        assert_eq!(d["resets_at"], "2026-04-01T00:00:00Z", "{e}");
        assert_eq!(d["snapshot"], version.as_str(), "{e}");
    }
    assert!(delivered(&hook, 3), "{:#?}", hook.received());
    assert!(wait_until(DELIVERY, || metric(
        &s,
        "entitled_notices_delivered_total"
    ) == 3.0));
    assert_eq!(metric(&s, "entitled_usage_notices_total"), 3.0);
    assert_eq!(metric(&s, "entitled_usage_notices_dropped_total"), 0.0);
    let first_ids: Vec<String> = ev.iter().map(|e| e["id"].to_string()).collect();
    for e in &ev {
        let id = e["id"].as_str().unwrap();
        assert_eq!(hook.count(id), (1, 1), "once at the webhook: {id}");
        let got = hook.received();
        let r = got.iter().find(|r| r.body["id"] == id).unwrap();
        assert_eq!(&r.body, e, "the webhook gets the log's event");
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/cloudevents+json; charset=utf-8")
        );
    }

    // A restart: usage starts from zero in memory, so every threshold is reached
    // again — and remembered, so nothing is noticed again.
    assert!(s.stop_gracefully().success());
    let s = start(policies.path(), notices.path(), now, &hook);
    consume(&s, "api.calls", 10);
    consume(&s, "exports", 2);
    barrier(&s, now);
    assert_eq!(usage_events(notices.path()).len(), 3, "none repeated");
    assert_eq!(metric(&s, "entitled_usage_notices_total"), 0.0);

    // The next calendar month is a new window: its 80% is noticed afresh.
    let april = "2026-04-02T00:00:00Z";
    barrier(&s, april);
    consume(&s, "api.calls", 8);
    barrier(&s, april);
    let ev = usage_events(notices.path());
    assert_eq!(ev.len(), 4, "{ev:#?}");
    let fresh = &ev[3];
    assert_eq!(fresh["data"]["threshold_percent"], 80.0, "{fresh}");
    assert_eq!(fresh["data"]["window_start"], "2026-04-01T00:00:00Z");
    assert_eq!(fresh["data"]["resets_at"], "2026-05-01T00:00:00Z");
    assert_eq!(fresh["time"], april);
    assert!(!first_ids.contains(&fresh["id"].to_string()), "a new id");
    assert!(delivered(&hook, 4), "{:#?}", hook.received());
    assert_eq!(hook.received().len(), 4, "{:#?}", hook.received());
}
