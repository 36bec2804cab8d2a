//! Renewal notices: one event when a subscription, customer grant or override comes
//! within each threshold (90, 60 and 30 days by default) of its end, once per
//! threshold, written to an NDJSON event log and, with a webhook, POSTed as CloudEvents.
//!
//! A dedicated thread owns the state and every file, so nothing here runs on a request
//! worker or holds a lock a request could wait on. It scans the served snapshot after
//! every snapshot swap, every scan interval, and when asked (the test clock moved). A
//! notice is identified by (customer, kind, plan or feature, end, threshold); the ones
//! already noticed are remembered in `sent.ndjson`, so a restart or a reload never
//! notices twice and a moved end date (a renewal) starts afresh. Entries whose end has
//! passed are pruned.
//!
//! With a webhook, each event also goes to `outbox.ndjson` before it is queued; a
//! delivery outcome (delivered, failed, dropped) goes to `outbox-done.ndjson`. At start
//! whatever the outbox holds without an outcome is queued again, so delivery is
//! at-least-once across restarts. A tokio task sends the queue (bounded: when it is
//! full the event is dropped and counted) with retries and exponential backoff.
//!
//! One file per part: `config` (settings and thresholds), `rule` (what is due and its
//! id), `sent` (the remembered notices), `outbox` (events awaiting the webhook),
//! `scanner` (the thread that scans and writes) and `delivery` (the webhook sender).
//! This file starts and stops them.

mod config;
mod delivery;
mod line_file;
mod outbox;
mod rule;
mod scanner;
mod sent;
#[cfg(test)]
mod tests;
mod usage;

pub use config::{NoticeConfig, WebhookConfig, parse_thresholds};
pub use delivery::{Outcome, Verdict, retry_after, verdict};
pub use rule::{Due, ItemKey, due, notice_id};
pub use scanner::plan;
pub use sent::Sent;
pub use usage::{Crossing, USAGE_EVENT_TYPE, UsageNotifier, plan_usage, usage_notice_id};

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Sender};

use serde::Serialize;

use crate::files::DirLock;
use crate::rotating_log::Segments;
use crate::snapshot_cell::SnapshotCell;
use crate::time::Clock;
use delivery::deliver_all;
use outbox::Outbox;
use scanner::{Delivery, Scanner};

/// The CloudEvents `type` of a notice.
pub const EVENT_TYPE: &str = "entitled.renewal.notice";
/// The CloudEvents `source` of a notice: the same on every replica, so that the same
/// notice from two replicas carries the same `source` and `id` and dedupes.
pub const EVENT_SOURCE: &str = "urn:entitled:notices";

/// What one scan made.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ScanReport {
    /// Notices emitted.
    pub emitted: usize,
    /// Remembered notices forgotten because their item ended.
    pub pruned: usize,
}

enum Msg {
    Scan(Option<tokio::sync::oneshot::Sender<ScanReport>>),
    /// These customers' records changed (a write): only they need a look.
    Customers(Vec<String>),
    Outcome {
        id: String,
        result: &'static str,
    },
    Usage(Box<usage::Crossing>),
    Stop,
}

/// Wakes the scanner (after a snapshot swap). Cheap, never blocks.
#[derive(Debug, Clone)]
pub struct Trigger(Sender<Msg>);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Scan(_) => "Scan",
            Msg::Customers(_) => "Customers",
            Msg::Outcome { .. } => "Outcome",
            Msg::Usage(_) => "Usage",
            Msg::Stop => "Stop",
        })
    }
}

impl Trigger {
    pub fn poke(&self) {
        let _ = self.0.send(Msg::Scan(None));
    }

    /// These customers' records changed: their notices are planned without a scan of
    /// every customer (a write at a million customers costs one lookup, not a scan).
    pub fn customers_changed(&self, ids: Vec<String>) {
        let _ = self.0.send(Msg::Customers(ids));
    }
}

/// The running notice scanner. Dropping it stops the thread (after the scan in
/// progress, if any).
#[derive(Debug)]
pub struct Notices {
    tx: Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A notices directory taken by this process, before anything in it is read or
/// written: [`Notices::claim`], then [`Claim::start`] once the rest of start-up has
/// succeeded. Scans asked for in between ([`Claim::trigger`]) wait for the scanner.
#[derive(Debug)]
pub struct Claim {
    cfg: NoticeConfig,
    lock: DirLock,
    tx: Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    usage_in_flight: Arc<AtomicUsize>,
}

impl Notices {
    /// Takes the notices directory (creating it, and holding its `LOCK`: two
    /// processes appending to and compacting the same files would lose notices).
    pub fn claim(cfg: NoticeConfig) -> io::Result<Claim> {
        let lock = DirLock::take(&cfg.dir, || {
            io::Error::other(format!(
                "{} is in use by another entitled process (LOCK is held)",
                cfg.dir.display()
            ))
        })?;
        let (tx, rx) = mpsc::channel();
        Ok(Claim {
            cfg,
            lock,
            tx,
            rx,
            usage_in_flight: Arc::default(),
        })
    }

    /// [`Notices::claim`] and [`Claim::start`] at once.
    pub fn start(
        cfg: NoticeConfig,
        cell: SnapshotCell,
        clock: Arc<dyn Clock>,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<Notices> {
        Notices::claim(cfg)?.start(cell, clock, runtime)
    }
}

impl Claim {
    /// A handle that wakes the scanner once it runs, for the reloader.
    pub fn trigger(&self) -> Trigger {
        Trigger(self.tx.clone())
    }

    /// A handle that hands usage-threshold crossings to the notices thread, for the
    /// decision path. Crossings sent before [`Claim::start`] wait for it.
    pub fn usage_notifier(&self) -> UsageNotifier {
        UsageNotifier {
            tx: self.tx.clone(),
            in_flight: self.usage_in_flight.clone(),
            cap: self.cfg.usage_queue.max(1),
        }
    }

    /// Opens the files of the notices directory, starts the scanner thread and, with
    /// a webhook, the delivery task on `runtime` (queueing what the outbox still
    /// holds). The first scan runs at once (and finds nothing until a snapshot is
    /// served).
    pub fn start(
        self,
        cell: SnapshotCell,
        clock: Arc<dyn Clock>,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<Notices> {
        let Claim {
            cfg,
            mut lock,
            tx,
            rx,
            usage_in_flight,
        } = self;
        // Read before any file is made: a bad CA file fails start-up with nothing written.
        let tls = cfg
            .webhook
            .as_ref()
            .map(|w| w.tls_config())
            .transpose()
            .map_err(|e| io::Error::other(format!("--notify-url TLS settings: {e}")))?;
        let now = clock.now();
        let sent = Sent::open(&cfg.dir, now)?;
        let log = Segments::open(&cfg.dir, "events-", cfg.segment_bytes, cfg.keep, true)?;
        let mut delivery = None;
        if let (Some(w), Some(tls)) = (&cfg.webhook, tls) {
            let (outbox, backlog) = Outbox::open(&cfg.dir)?;
            let (qtx, qrx) = tokio::sync::mpsc::channel(w.queue.max(1));
            runtime.spawn(deliver_all(w.clone(), tls, qrx, tx.clone()));
            let mut d = Delivery { outbox, queue: qtx };
            if !backlog.is_empty() {
                tracing::info!(events = backlog.len(), "queueing notices not yet delivered");
            }
            for (id, body) in backlog {
                d.enqueue(id, body);
            }
            delivery = Some(d);
        }
        tracing::info!(
            dir = %cfg.dir.display(),
            remembered = sent.len(),
            webhook = cfg.webhook.as_ref().map(|w| crate::redact::url(&w.url.to_string())),
            "renewal notices on"
        );
        lock.keep();
        let mut scanner = Scanner {
            _lock: lock,
            interval: cfg.scan_interval,
            thresholds: cfg.thresholds,
            cell,
            clock,
            sent,
            log,
            delivery,
            usage_in_flight,
        };
        let thread = std::thread::Builder::new()
            .name("entitled-notices".into())
            .spawn(move || scanner.run(&rx))?;
        Ok(Notices {
            tx,
            thread: Some(thread),
        })
    }
}

impl Notices {
    /// A handle that wakes the scanner, for the reloader.
    pub fn trigger(&self) -> Trigger {
        Trigger(self.tx.clone())
    }

    /// Scans now; resolves once the scan is done (and its events are on disk).
    /// `None` if the scanner has stopped.
    pub async fn scan(&self) -> Option<ScanReport> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Msg::Scan(Some(tx))).ok()?;
        rx.await.ok()
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
