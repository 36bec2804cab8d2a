//! Tests of the threshold rule, notice ids, the remembered notices, the outbox and
//! the webhook retry policy.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;

use super::outbox::Outbox;
use super::*;
use crate::time::{DAY, Timestamp};

const D: i64 = DAY;

fn th() -> Vec<i64> {
    vec![90 * D, 60 * D, 30 * D]
}

#[test]
fn thresholds_parse_widest_first_whole_days_only() {
    assert_eq!(parse_thresholds("30d,90d, 60d,30d"), Ok(th()));
    assert!(parse_thresholds("36h").is_err());
    assert!(parse_thresholds("0d").is_err());
    assert!(parse_thresholds("").is_err());
    assert!(parse_thresholds("soon").is_err());
}

#[test]
fn outside_every_threshold_nothing_is_due() {
    let d = due(91 * D, &th(), |_| false);
    assert_eq!(
        d,
        Due {
            emit: None,
            mark: vec![]
        }
    );
    // At or past the end: nothing either.
    assert_eq!(due(0, &th(), |_| false).emit, None);
    assert_eq!(due(-D, &th(), |_| false).mark, Vec::<i64>::new());
}

#[test]
fn a_threshold_is_crossed_at_exactly_its_distance() {
    let d = due(90 * D, &th(), |_| false);
    assert_eq!(d.emit, Some(90 * D));
    assert_eq!(d.mark, vec![90 * D]);
    assert_eq!(due(90 * D + 1, &th(), |_| false).emit, None);
}

#[test]
fn first_seen_inside_several_only_the_tightest_is_emitted_and_all_are_marked() {
    let d = due(20 * D, &th(), |_| false);
    assert_eq!(d.emit, Some(30 * D));
    assert_eq!(d.mark, vec![90 * D, 60 * D, 30 * D]);
}

#[test]
fn each_threshold_once_even_when_scans_repeat() {
    let mut sent: Vec<i64> = Vec::new();
    let mut emitted = Vec::new();
    // Daily scans from 100 days before the end to the end, twice per day.
    for half_days in (0..=200).rev() {
        let left = half_days * D / 2;
        let d = due(left, &th(), |t| sent.contains(&t));
        emitted.extend(d.emit);
        sent.extend(d.mark);
    }
    assert_eq!(emitted, th());
    assert_eq!(sent, th());
}

#[test]
fn a_wider_threshold_is_never_emitted_after_a_tighter_one() {
    // 90 noticed, then the clock jumps to 10 days left: only the 30-day notice.
    let sent = [90 * D];
    let d = due(10 * D, &th(), |t| sent.contains(&t));
    assert_eq!(d.emit, Some(30 * D));
    assert_eq!(d.mark, vec![60 * D, 30 * D]);
    // A threshold added after the tighter one was sent is marked, not emitted.
    let sent = [30 * D];
    let d = due(10 * D, &th(), |t| sent.contains(&t));
    assert_eq!(d.emit, None);
    assert_eq!(d.mark, vec![90 * D, 60 * D]);
}

#[test]
fn ids_are_stable_and_differ_by_every_part() {
    let k = ItemKey {
        customer: "acme",
        kind: "subscription",
        name: "pro",
        ends: Timestamp(5),
    };
    assert_eq!(notice_id(&k, 30 * D), notice_id(&k, 30 * D));
    assert_eq!(notice_id(&k, 30 * D).len(), 32);
    let others = [
        ItemKey {
            customer: "acmf",
            ..k
        },
        ItemKey { kind: "grant", ..k },
        ItemKey { name: "free", ..k },
        ItemKey {
            ends: Timestamp(6),
            ..k
        },
    ];
    for o in others {
        assert_ne!(notice_id(&k, 30 * D), notice_id(&o, 30 * D));
    }
    assert_ne!(notice_id(&k, 30 * D), notice_id(&k, 60 * D));
    // Length prefixes: moving a character between parts changes the id.
    let a = ItemKey {
        customer: "ab",
        name: "c",
        ..k
    };
    let b = ItemKey {
        customer: "a",
        name: "bc",
        ..k
    };
    assert_ne!(notice_id(&a, D), notice_id(&b, D));
}

#[test]
fn sent_survives_reopen_prunes_ended_items_and_skips_torn_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sent::open(dir.path(), Timestamp(0)).unwrap();
    assert!(s.is_empty());
    s.record(&[("a".into(), 100), ("b".into(), 200)]).unwrap();
    drop(s);
    // A torn last line (a crash mid-write) is skipped.
    let path = dir.path().join("sent.ndjson");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"id\":\"c\",\"en\xe2\x82").unwrap();
    drop(f);
    let mut s = Sent::open(dir.path(), Timestamp(50)).unwrap();
    assert!(s.contains("a") && s.contains("b") && !s.contains("c"));
    // `a` ends at 100: forgotten once the clock reaches it.
    assert_eq!(s.prune(Timestamp(100)).unwrap(), 1);
    assert!(!s.contains("a") && s.contains("b"));
    drop(s);
    // Reopened later: ended entries are pruned and the file compacted.
    let s = Sent::open(dir.path(), Timestamp(150)).unwrap();
    assert!(!s.contains("a") && s.contains("b"));
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let s = Sent::open(dir.path(), Timestamp(200)).unwrap();
    assert!(s.is_empty());
}

#[test]
fn outbox_keeps_only_what_has_no_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (mut o, backlog) = Outbox::open(dir.path()).unwrap();
    assert!(backlog.is_empty());
    let ev = |id: &str| (id.to_string(), Bytes::from(format!("{{\"id\":\"{id}\"}}")));
    o.add(&[ev("x"), ev("y"), ev("z")]).unwrap();
    o.finish("y", "delivered").unwrap();
    o.finish("unknown", "delivered").unwrap();
    drop(o);
    let (_o, backlog) = Outbox::open(dir.path()).unwrap();
    let ids: Vec<&str> = backlog.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, ["x", "z"]);
    // Reopening again changes nothing: the rewrite kept both.
    drop(_o);
    let (_o, backlog) = Outbox::open(dir.path()).unwrap();
    assert_eq!(backlog.len(), 2);
}

#[test]
fn backoff_doubles_up_to_the_cap_and_statuses_classify() {
    let mut w = WebhookConfig::new("http://127.0.0.1:9/hook").unwrap();
    w.retry_base = Duration::from_secs(1);
    let waits: Vec<u64> = (1..=8).map(|n| w.backoff(n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(w.backoff(100), Duration::from_secs(60));
    assert_eq!(verdict(204), Verdict::Delivered);
    assert_eq!(verdict(429), Verdict::Retry);
    assert_eq!(verdict(503), Verdict::Retry);
    assert_eq!(verdict(400), Verdict::GiveUp);
    assert_eq!(verdict(301), Verdict::GiveUp);
    assert!(WebhookConfig::new("https://example.test/").is_ok());
    assert!(WebhookConfig::new("ftp://example.test/").is_err());
    assert!(WebhookConfig::new("/relative").is_err());
}

/// A receiver's `Retry-After` (seconds) lengthens the wait up to the cap; it never
/// shortens the backoff, and a date or garbage leaves the backoff alone.
#[test]
fn retry_after_lengthens_the_backoff_up_to_the_cap() {
    let w = WebhookConfig::new("http://127.0.0.1:9/hook").unwrap();
    let s = Duration::from_secs;
    assert_eq!(w.retry_wait(1, None), s(1));
    assert_eq!(w.retry_wait(1, Some(s(30))), s(30));
    assert_eq!(w.retry_wait(1, Some(s(3600))), s(60), "capped");
    assert_eq!(w.retry_wait(4, Some(s(0))), s(8), "never below the backoff");
    let mut h = hyper::HeaderMap::new();
    assert_eq!(retry_after(&h), None);
    h.insert(hyper::header::RETRY_AFTER, "120".parse().unwrap());
    assert_eq!(retry_after(&h), Some(s(120)));
    h.insert(
        hyper::header::RETRY_AFTER,
        "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
    );
    assert_eq!(retry_after(&h), None);
}
