//! The scanner thread: wakes on a snapshot swap, a timer or a request, plans the
//! notices due, writes them (event log, outbox, remembered notices, in that order) and
//! queues them for the webhook.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use bytes::Bytes;

use super::outbox::Outbox;
use super::rule::{ItemKey, due, notice_id};
use super::sent::Sent;
use super::usage::{Crossing, plan_usage};
use super::{EVENT_SOURCE, EVENT_TYPE, Msg, ScanReport};
use crate::engine::report;
use crate::policy::Snapshot;
use crate::rotating_log::Segments;
use crate::snapshot_cell::SnapshotCell;
use crate::time::{Clock, DAY, Timestamp};

pub(super) struct Delivery {
    pub(super) outbox: Outbox,
    pub(super) queue: tokio::sync::mpsc::Sender<(String, Bytes)>,
}

impl Delivery {
    pub(super) fn enqueue(&mut self, id: String, body: Bytes) {
        match self.queue.try_send((id, body)) {
            Ok(()) => {}
            Err(
                tokio::sync::mpsc::error::TrySendError::Full((id, _))
                | tokio::sync::mpsc::error::TrySendError::Closed((id, _)),
            ) => {
                crate::metrics::notice_dropped();
                tracing::warn!(id = %id, "notice webhook queue full: notice dropped (it is in the event log)");
                if let Err(e) = self.outbox.finish(&id, "dropped") {
                    tracing::error!(error = %e, "writing the notice outbox failed");
                }
            }
        }
    }
}

pub(super) struct Scanner {
    /// Held (flock) for as long as the scanner runs.
    pub(super) _lock: crate::files::DirLock,
    pub(super) interval: Duration,
    pub(super) thresholds: Vec<i64>,
    pub(super) cell: SnapshotCell,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) sent: Sent,
    pub(super) log: Segments,
    pub(super) delivery: Option<Delivery>,
    /// Usage crossings sent to this thread and not yet taken (see `UsageNotifier`).
    pub(super) usage_in_flight: Arc<AtomicUsize>,
}

impl Scanner {
    pub(super) fn run(&mut self, rx: &Receiver<Msg>) {
        let mut replies = Vec::new();
        let mut usage: Vec<Crossing> = Vec::new();
        let mut scan = true;
        let mut changed: std::collections::BTreeSet<String> = Default::default();
        loop {
            if !usage.is_empty() {
                self.usage(&usage);
                usage.clear();
            }
            if scan {
                let report = self.scan(None);
                for r in replies.drain(..) {
                    let _: Result<(), _> = tokio::sync::oneshot::Sender::send(r, report);
                }
                scan = false;
                changed.clear();
            } else if !changed.is_empty() {
                self.scan(Some(&changed));
                changed.clear();
            }
            let first = match rx.recv_timeout(self.interval) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    scan = true;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Whatever else is waiting is handled with it: one scan for many wake-ups.
            for m in std::iter::once(first).chain(rx.try_iter()) {
                match m {
                    Msg::Scan(reply) => {
                        scan = true;
                        replies.extend(reply);
                    }
                    Msg::Customers(ids) => changed.extend(ids),
                    Msg::Outcome { id, result } => {
                        if let Some(d) = &mut self.delivery
                            && let Err(e) = d.outbox.finish(&id, result)
                        {
                            tracing::error!(error = %e, "writing the notice outbox failed");
                        }
                    }
                    Msg::Usage(c) => {
                        self.usage_in_flight.fetch_sub(1, Ordering::AcqRel);
                        usage.push(*c);
                    }
                    Msg::Stop => {
                        if !usage.is_empty() {
                            self.usage(&usage);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Plans and writes the notices due: for every customer, or for `only` these.
    fn scan(&mut self, only: Option<&std::collections::BTreeSet<String>>) -> ScanReport {
        let now = self.clock.now_background();
        let mut report = ScanReport::default();
        if only.is_none() {
            match self.sent.prune(now) {
                Ok(n) => report.pruned = n,
                Err(e) => tracing::error!(error = %e, "compacting the remembered notices failed"),
            }
        }
        let Some(snap) = self.cell.load_full() else {
            return report;
        };
        let sent = |id: &str| self.sent.contains(id);
        let (events, marks) = match only {
            None => plan(&snap, now, &self.thresholds, sent),
            Some(ids) => {
                let customers = ids.iter().filter_map(|id| snap.customers.get(id));
                plan_of(&snap, customers, now, &self.thresholds, sent)
            }
        };
        if self.write(&events, &marks) {
            report.emitted = events.len();
            crate::metrics::notices_emitted(events.len() as u64);
            if !events.is_empty() {
                tracing::info!(notices = events.len(), "renewal notices emitted");
            }
        }
        report
    }

    /// Makes the usage-threshold notices of `crossings` not made before.
    fn usage(&mut self, crossings: &[Crossing]) {
        let (events, marks) = plan_usage(crossings, |id| self.sent.contains(id));
        if self.write(&events, &marks) && !events.is_empty() {
            crate::metrics::usage_notices_emitted(events.len() as u64);
            tracing::info!(notices = events.len(), "usage-threshold notices emitted");
        }
    }

    /// Writes `events` to the event log (synced), the outbox and the delivery queue,
    /// then remembers `marks`. `false` if the event log could not be written (nothing
    /// is remembered: a renewal notice is tried again on the next scan).
    fn write(&mut self, events: &[(String, Bytes)], marks: &[(String, i64)]) -> bool {
        if marks.is_empty() {
            return true;
        }
        let mut buf = Vec::new();
        for (_, body) in events {
            buf.extend_from_slice(body);
            buf.push(b'\n');
        }
        // The event first, then the memory of it: a crash between the two repeats a
        // notice (with the same id) rather than losing it.
        if !buf.is_empty()
            && let Err(e) = self.log.append(&buf).and_then(|()| self.log.sync())
        {
            tracing::error!(error = %e, "writing the notice event log failed");
            return false;
        }
        if let Some(d) = &mut self.delivery
            && !events.is_empty()
        {
            if let Err(e) = d.outbox.add(events) {
                tracing::error!(error = %e, "writing the notice outbox failed");
            }
            for (id, body) in events {
                d.enqueue(id.clone(), body.clone());
            }
        }
        if let Err(e) = self.sent.record(marks) {
            tracing::error!(error = %e, "remembering notices failed; they may repeat after a restart");
        }
        true
    }
}

/// Everything one scan of `snap` at `now` emits (id, CloudEvent JSON), and every
/// (id, end) to remember.
#[expect(clippy::type_complexity, reason = "two plain lists")]
pub fn plan(
    snap: &Snapshot,
    now: Timestamp,
    thresholds: &[i64],
    sent: impl Fn(&str) -> bool,
) -> (Vec<(String, Bytes)>, Vec<(String, i64)>) {
    plan_of(snap, snap.customers.iter(), now, thresholds, sent)
}

/// [`plan`] for these customers only.
#[expect(clippy::type_complexity, reason = "two plain lists")]
fn plan_of<'a>(
    snap: &'a Snapshot,
    customers: impl IntoIterator<Item = crate::policy::CustomerView<'a>>,
    now: Timestamp,
    thresholds: &[i64],
    sent: impl Fn(&str) -> bool,
) -> (Vec<(String, Bytes)>, Vec<(String, i64)>) {
    let widest = thresholds.iter().copied().max().unwrap_or(0);
    let mut events = Vec::new();
    let mut marks = Vec::new();
    // `expiring` lists ends in [now, now + within): +1 µs takes in an end exactly at
    // the widest threshold.
    for item in report::expiring_of(snap, customers, now, widest.saturating_add(1)) {
        let key = ItemKey {
            customer: item.customer,
            kind: item.kind,
            name: item.plan.or(item.feature).unwrap_or(""),
            ends: item.ends,
        };
        let d = due(item.ends.0 - now.0, thresholds, |t| {
            sent(&notice_id(&key, t))
        });
        if let Some(t) = d.emit {
            let id = notice_id(&key, t);
            let mut data = serde_json::json!({
                "customer": item.customer,
                "kind": item.kind,
                "ends_at": item.ends,
                "threshold_days": t / DAY,
                "days_left": item.days_left,
                "snapshot": &*snap.version,
            });
            if let Some(p) = item.plan {
                data["plan"] = p.into();
                data["trial"] = item.trial.into();
            }
            if let Some(f) = item.feature {
                data["feature"] = f.into();
            }
            let event = serde_json::json!({
                "specversion": "1.0",
                "id": id,
                "source": EVENT_SOURCE,
                "type": EVENT_TYPE,
                "subject": item.customer,
                "time": now,
                "datacontenttype": "application/json",
                "data": data,
            });
            events.push((id, Bytes::from(event.to_string())));
        }
        for t in d.mark {
            marks.push((notice_id(&key, t), item.ends.0));
        }
    }
    (events, marks)
}
