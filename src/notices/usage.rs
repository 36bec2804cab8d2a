//! Usage-threshold notices: one event when a consume (or reserve) brings a customer's
//! quota usage to a `notify_at` share of its limit, once per customer, feature,
//! window, limit and threshold.
//!
//! The request path only finds that a threshold was reached (the engine marks the
//! decision, [`crate::engine::Crossed`]) and hands it to the notices thread through
//! [`UsageNotifier::send`]: an unbounded channel kept bounded by a count of crossings
//! in flight, so a request never blocks or waits on a file, and a crossing that finds
//! the queue full is dropped and counted. The notices thread makes the event, writes
//! it to the event log and the outbox, and remembers it in `sent.ndjson` (until the
//! window ends), so a restart, a counter that is reset, or a release that lets usage
//! cross again never repeats one; the next window has other ids and notifies afresh.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;

use bytes::Bytes;

use super::{EVENT_SOURCE, Msg};
use crate::time::Timestamp;

/// The CloudEvents `type` of a usage-threshold notice.
pub const USAGE_EVENT_TYPE: &str = "entitled.usage.threshold";

/// A threshold reached on the request path, on its way to the notices thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub customer: String,
    pub feature: String,
    /// The plan whose grant set the limit, if a plan did.
    pub plan: Option<String>,
    /// The thresholds reached, in basis points.
    pub thresholds: Vec<u16>,
    pub limit: u64,
    pub used: u64,
    pub window_start: i64,
    pub window_end: i64,
    /// When the step was made (the served clock).
    pub at: Timestamp,
    pub snapshot: String,
}

/// Hands crossings to the notices thread. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct UsageNotifier {
    pub(super) tx: Sender<Msg>,
    /// Crossings sent and not yet taken by the notices thread.
    pub(super) in_flight: Arc<AtomicUsize>,
    pub(super) cap: usize,
}

impl UsageNotifier {
    /// Queues a crossing; `false` (and counted in
    /// `entitled_usage_notices_dropped_total`) when the queue is full or the notices
    /// thread has stopped.
    pub fn send(&self, c: Crossing) -> bool {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::usage_notice_dropped();
            return false;
        }
        if self.tx.send(Msg::Usage(Box::new(c))).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::usage_notice_dropped();
            return false;
        }
        true
    }
}

/// A usage notice's id: 32 hex digits of BLAKE3 over the customer, feature, window,
/// limit and threshold (each part length-prefixed; `usage` first, so no renewal
/// notice shares an id). The same on every restart and every replica.
pub fn usage_notice_id(c: &Crossing, bp: u16) -> String {
    let mut h = blake3::Hasher::new();
    for part in ["usage", &c.customer, &c.feature] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&c.window_start.to_le_bytes());
    h.update(&c.limit.to_le_bytes());
    h.update(&bp.to_le_bytes());
    let hash = h.finalize();
    let mut s = String::with_capacity(32);
    for b in &hash.as_bytes()[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The events for `crossings` not yet made (`sent` says which are), and the (id,
/// window end) of each to remember. A threshold reached twice in one batch is made
/// once.
#[expect(clippy::type_complexity, reason = "two plain lists")]
pub fn plan_usage(
    crossings: &[Crossing],
    sent: impl Fn(&str) -> bool,
) -> (Vec<(String, Bytes)>, Vec<(String, i64)>) {
    let mut events = Vec::new();
    let mut marks: Vec<(String, i64)> = Vec::new();
    for c in crossings {
        for &bp in &c.thresholds {
            let id = usage_notice_id(c, bp);
            if sent(&id) || marks.iter().any(|(m, _)| *m == id) {
                continue;
            }
            let window = |us: i64| Some(Timestamp(us)).filter(|t| t.to_jiff().is_some());
            let mut data = serde_json::json!({
                "customer": c.customer,
                "feature": c.feature,
                "threshold_percent": f64::from(bp) / 100.0,
                "threshold": crate::policy::NotifyAt::units(c.limit, bp),
                "used": c.used,
                "limit": c.limit,
                "window_start": window(c.window_start),
                "resets_at": window(c.window_end).filter(|t| *t != Timestamp::MAX),
                "snapshot": c.snapshot,
            });
            if let Some(p) = &c.plan {
                data["plan"] = p.as_str().into();
            }
            let event = serde_json::json!({
                "specversion": "1.0",
                "id": id,
                "source": EVENT_SOURCE,
                "type": USAGE_EVENT_TYPE,
                "subject": c.customer,
                "time": c.at,
                "datacontenttype": "application/json",
                "data": data,
            });
            events.push((id.clone(), Bytes::from(event.to_string())));
            marks.push((id, c.window_end));
        }
    }
    (events, marks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crossing(window_start: i64, thresholds: Vec<u16>) -> Crossing {
        Crossing {
            customer: "acme".into(),
            feature: "api.calls".into(),
            plan: Some("pro".into()),
            thresholds,
            limit: 10,
            used: 10,
            window_start,
            window_end: window_start + 1_000,
            at: Timestamp(window_start + 5),
            snapshot: "v1".into(),
        }
    }

    #[test]
    fn one_event_per_threshold_and_window_and_none_for_what_was_sent() {
        let c = crossing(0, vec![8_000, 10_000]);
        let (events, marks) = plan_usage(&[c.clone(), c.clone()], |_| false);
        assert_eq!(
            events.len(),
            2,
            "a threshold reached twice in a batch is one notice"
        );
        assert_eq!(marks.len(), 2);
        assert!(marks.iter().all(|(_, end)| *end == 1_000));
        let e: serde_json::Value = serde_json::from_slice(&events[0].1).unwrap();
        assert_eq!(e["type"], USAGE_EVENT_TYPE);
        assert_eq!(e["data"]["threshold"], 8);
        assert_eq!(e["data"]["threshold_percent"], 80.0);
        let sent = usage_notice_id(&c, 8_000);
        let (events, _) = plan_usage(std::slice::from_ref(&c), |id| id == sent);
        assert_eq!(events.len(), 1, "only the 100% one is left");
        let next = crossing(1_000, vec![8_000]);
        assert_ne!(
            usage_notice_id(&next, 8_000),
            sent,
            "a new window, a new id"
        );
        let mut bigger = c.clone();
        bigger.limit = 100;
        assert_ne!(
            usage_notice_id(&bigger, 8_000),
            sent,
            "a new limit, a new id"
        );
    }
}
