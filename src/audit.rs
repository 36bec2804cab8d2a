//! The audit log: every policy snapshot change, every customer record written
//! through the API and, as configured, decisions, as NDJSON in rotated files.
//!
//! Requests never wait for it: a decision is handed to a bounded queue with
//! `try_send`, and when the queue is full the record is dropped and counted in
//! `entitled_audit_dropped_total`. One thread encodes and writes. Files are
//! `audit-<unix seconds>-<n>.ndjson` in the audit directory, rotated past a size and
//! kept up to a count. The directory's `LOCK` is held while the process runs, and the
//! run's file is made only once start-up has succeeded ([`Audit::begin`]).

use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use serde::Serialize;

use crate::files::DirLock;
use crate::policy::Snapshot;
use crate::rotating_log::Segments;
use crate::time::Timestamp;

/// Which decisions are recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decisions {
    None,
    Denials,
    All,
    /// This fraction of decisions, at random.
    Sample(f64),
}

impl std::str::FromStr for Decisions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Decisions::None),
            "denials" => Ok(Decisions::Denials),
            "all" => Ok(Decisions::All),
            _ => match s.strip_prefix("sample:").map(str::parse::<f64>) {
                Some(Ok(f)) if (0.0..=1.0).contains(&f) => Ok(Decisions::Sample(f)),
                _ => Err(format!(
                    "`{s}`: expected none, denials, all or sample:F with F from 0 to 1"
                )),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub decisions: Decisions,
    /// Records waiting for the writer, at most.
    pub queue: usize,
    pub segment_bytes: u64,
    /// Files kept (the oldest are deleted).
    pub keep: usize,
}

impl AuditConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            dir: dir.into(),
            decisions: Decisions::None,
            queue: 65_536,
            segment_bytes: 64 << 20,
            keep: 20,
        }
    }
}

/// One decision, as the audit log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub decision_id: String,
    pub time: Timestamp,
    pub snapshot: String,
    pub op: &'static str,
    pub customer: String,
    pub feature: String,
    pub amount: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<(String, String)>,
    pub allowed: bool,
    pub reason: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Snapshot {
        time: Timestamp,
        version: String,
        previous: Option<String>,
        files_added: Vec<String>,
        files_changed: Vec<String>,
        files_removed: Vec<String>,
        features: usize,
        plans: usize,
        customers: usize,
        routes: usize,
    },
    Decision(DecisionRecord),
    CustomerWrite(CustomerWrite),
    PortalToken(PortalToken),
}

/// A customer record written or deleted through the API.
#[derive(Debug, Clone, Serialize)]
pub struct CustomerWrite {
    pub time: Timestamp,
    pub revision: u64,
    /// `put`, `delete` or `override`.
    pub op: &'static str,
    pub customer: String,
    /// The admin token's name.
    pub by: String,
    /// The snapshot version serving it.
    pub snapshot: String,
}

/// A portal token minted through the API (`POST /v1/portal/tokens`). The token
/// itself is not recorded: the log would become a list of working links.
#[derive(Debug, Clone, Serialize)]
pub struct PortalToken {
    pub time: Timestamp,
    pub customer: String,
    /// The admin token's name.
    pub by: String,
    pub expires: Timestamp,
}

/// The audit log's handle.
#[derive(Debug)]
pub struct Audit {
    tx: SyncSender<Event>,
    decisions: Decisions,
    /// Until [`Audit::begin`]: the queue's receiving end and the held directory.
    waiting: Mutex<Option<Waiting>>,
}

#[derive(Debug)]
struct Waiting {
    rx: Receiver<Event>,
    cfg: AuditConfig,
    lock: DirLock,
}

impl Audit {
    /// Takes the directory (creating it, and holding its `LOCK`: two processes
    /// appending to one audit file would interleave their records) and opens the
    /// queue. Nothing is written until [`Audit::begin`]: records queue up, and if
    /// start-up fails the handle is dropped with no audit file made.
    pub fn claim(cfg: AuditConfig) -> io::Result<Audit> {
        let lock = DirLock::take(&cfg.dir, || {
            io::Error::other(format!(
                "{} is in use by another entitled process (LOCK is held)",
                cfg.dir.display()
            ))
        })?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
        Ok(Audit {
            tx,
            decisions: cfg.decisions,
            waiting: Mutex::new(Some(Waiting { rx, cfg, lock })),
        })
    }

    /// Opens this run's audit file and starts the writer (once; later calls do
    /// nothing).
    pub fn begin(&self) -> io::Result<()> {
        let Some(Waiting { rx, cfg, mut lock }) = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        lock.keep();
        let mut w = Writer::open(cfg, lock)?;
        std::thread::Builder::new()
            .name("entitled-audit".into())
            .spawn(move || w.run(rx))?;
        Ok(())
    }

    /// Whether a decision with this outcome is recorded (cheap: one branch, and for
    /// sampling one random draw).
    pub fn wants(&self, allowed: bool) -> bool {
        match self.decisions {
            Decisions::None => false,
            Decisions::Denials => !allowed,
            Decisions::All => true,
            Decisions::Sample(f) => random_unit() < f,
        }
    }

    /// Queues a decision; drops (and counts) it if the queue is full. Returns
    /// whether it was queued.
    pub fn decision(&self, rec: DecisionRecord) -> bool {
        self.send(Event::Decision(rec))
    }

    /// Records a customer write. Writes are few and each is on disk before it is
    /// answered, so this one is queued like a snapshot change (dropped and counted
    /// only if the queue is full).
    pub fn customer_written(&self, w: CustomerWrite) -> bool {
        self.send(Event::CustomerWrite(w))
    }

    /// Records a portal token minted for a customer.
    pub fn portal_token(&self, t: PortalToken) -> bool {
        self.send(Event::PortalToken(t))
    }

    /// Records a new snapshot and what changed since the one before.
    pub fn snapshot_changed(&self, new: &Snapshot, previous: Option<&Snapshot>, at: Timestamp) {
        let files = |s: &Snapshot| -> Vec<(String, String)> {
            s.files
                .iter()
                .map(|f| (f.path.display().to_string(), f.hash.clone()))
                .collect()
        };
        let now = files(new);
        let before = previous.map(files).unwrap_or_default();
        let find = |list: &[(String, String)], p: &str| {
            list.iter().find(|(q, _)| q == p).map(|(_, h)| h.clone())
        };
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for (p, h) in &now {
            match find(&before, p) {
                None => added.push(p.clone()),
                Some(old) if old != *h => changed.push(p.clone()),
                Some(_) => {}
            }
        }
        let removed = before
            .iter()
            .filter(|(p, _)| find(&now, p).is_none())
            .map(|(p, _)| p.clone())
            .collect();
        self.send(Event::Snapshot {
            time: at,
            version: new.version.to_string(),
            previous: previous.map(|p| p.version.to_string()),
            files_added: added,
            files_changed: changed,
            files_removed: removed,
            features: new.catalog.features.len(),
            plans: new.plans().count(),
            customers: new.customers.len(),
            routes: new.catalog.routes.len(),
        });
    }

    fn send(&self, e: Event) -> bool {
        match self.tx.try_send(e) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                crate::metrics::audit_dropped();
                false
            }
        }
    }
}

/// A decision id: 128 random bits in hex.
pub fn decision_id() -> String {
    format!("{:032x}", uuid::Uuid::new_v4().as_u128())
}

/// A uniform draw in [0, 1) from a per-thread xorshift generator seeded at random.
fn random_unit() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> =
            std::cell::Cell::new((uuid::Uuid::new_v4().as_u128() as u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

struct Writer {
    log: Segments,
    buf: Vec<u8>,
    /// The directory stays this process's while the writer runs.
    _lock: DirLock,
}

impl Writer {
    fn open(cfg: AuditConfig, lock: DirLock) -> io::Result<Writer> {
        // A new file each run, numbered after the ones already there.
        let log = Segments::open(&cfg.dir, "audit-", cfg.segment_bytes, cfg.keep, false)?;
        Ok(Writer {
            log,
            buf: Vec::with_capacity(1 << 16),
            _lock: lock,
        })
    }

    fn run(&mut self, rx: Receiver<Event>) {
        while let Ok(first) = rx.recv() {
            self.buf.clear();
            let push = |e: &Event, buf: &mut Vec<u8>| {
                if serde_json::to_writer(&mut *buf, e).is_ok() {
                    buf.push(b'\n');
                }
            };
            push(&first, &mut self.buf);
            // Everything already queued goes out in the same write.
            while let Ok(e) = rx.try_recv() {
                push(&e, &mut self.buf);
                if self.buf.len() >= 1 << 20 {
                    break;
                }
            }
            if let Err(e) = self.log.append(&self.buf) {
                tracing::error!(error = %e, "writing the audit log failed");
            }
        }
        let _ = self.log.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> DecisionRecord {
        DecisionRecord {
            decision_id: decision_id(),
            time: Timestamp(0),
            snapshot: "v".into(),
            op: "check",
            customer: "acme".into(),
            feature: "sso".into(),
            amount: n,
            context: Vec::new(),
            allowed: false,
            reason: "not_entitled",
        }
    }

    /// A full queue drops the record at once: the caller never waits.
    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let (tx, rx) = mpsc::sync_channel(2);
        let a = Audit {
            tx,
            decisions: Decisions::All,
            waiting: Mutex::new(None),
        };
        assert!(a.decision(record(1)));
        assert!(a.decision(record(2)));
        let started = std::time::Instant::now();
        assert!(!a.decision(record(3)), "a third record fits a queue of two");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        drop(rx);
        assert!(!a.decision(record(4)), "a stopped writer drops too");
    }

    #[test]
    fn modes_parse_and_select() {
        let d = |s: &str| s.parse::<Decisions>();
        assert_eq!(d("denials"), Ok(Decisions::Denials));
        assert_eq!(d("sample:0.25"), Ok(Decisions::Sample(0.25)));
        assert!(d("sample:2").is_err() && d("some").is_err());
        let (tx, _rx) = mpsc::sync_channel(1);
        let denials = Audit {
            tx,
            decisions: Decisions::Denials,
            waiting: Mutex::new(None),
        };
        assert!(denials.wants(false) && !denials.wants(true));
        let (tx, _rx) = mpsc::sync_channel(1);
        let sample = Audit {
            tx,
            decisions: Decisions::Sample(0.25),
            waiting: Mutex::new(None),
        };
        let n = (0..20_000).filter(|_| sample.wants(true)).count();
        assert!((4_000..6_000).contains(&n), "sampled {n} of 20000 at 0.25");
    }
}
