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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::report;
use crate::policy::Snapshot;
use crate::rotating_log::Segments;
use crate::snapshot_cell::SnapshotCell;
use crate::time::{Clock, DAY, Timestamp};

/// The CloudEvents `type` of a notice.
pub const EVENT_TYPE: &str = "entitled.renewal.notice";
/// The CloudEvents `source` of a notice: the same on every replica, so that the same
/// notice from two replicas carries the same `source` and `id` and dedupes.
pub const EVENT_SOURCE: &str = "urn:entitled:notices";

#[derive(Debug, Clone)]
pub struct NoticeConfig {
    /// Where the event log and the remembered notices are kept.
    pub dir: PathBuf,
    /// Thresholds in microseconds (whole days), widest first.
    pub thresholds: Vec<i64>,
    /// How often the snapshot is scanned besides reloads and test-clock moves.
    pub scan_interval: Duration,
    /// Rotate the event log past this size.
    pub segment_bytes: u64,
    /// Event log files kept (the oldest are deleted).
    pub keep: usize,
    pub webhook: Option<WebhookConfig>,
}

impl NoticeConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NoticeConfig {
            dir: dir.into(),
            thresholds: vec![90 * DAY, 60 * DAY, 30 * DAY],
            scan_interval: Duration::from_secs(60),
            segment_bytes: 64 << 20,
            keep: 20,
            webhook: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// An `http://` or `https://` URL.
    pub url: hyper::Uri,
    /// With https: a CA certificate (PEM) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// First retry delay; each further one doubles, up to `retry_cap`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// Bound on one attempt (connect, TLS, request, response).
    pub timeout: Duration,
    /// Events waiting for delivery, at most.
    pub queue: usize,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl WebhookConfig {
    /// Checks the URL: `http[s]://host[:port]/path`.
    pub fn new(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("`{url}`: expected an http:// or https:// URL"));
        }
        if uri.authority().is_none() {
            return Err(format!("`{url}`: no host"));
        }
        Ok(WebhookConfig {
            url: uri,
            ca_file: None,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(60),
            max_attempts: 8,
            timeout: Duration::from_secs(5),
            queue: 10_000,
            concurrency: 16,
        })
    }

    /// The TLS settings, read once when notices start, so that a bad CA file or an
    /// empty trust store is an error at start, not a failure per event. An http://
    /// webhook reads no certificates.
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let https = self.url.scheme_str() == Some("https");
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            _ if !https => {}
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("{}: no certificate in it", path.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no trusted root certificates in the system store ({} errors); use --notify-ca-file",
                        found.errors.len()
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// The wait before the next attempt after `n` failed ones (n ≥ 1): the backoff,
    /// or longer if the receiver asked for it with `Retry-After` (up to the cap).
    pub fn retry_wait(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(n);
        retry_after.map_or(backoff, |asked| {
            asked.min(self.retry_cap.max(backoff)).max(backoff)
        })
    }

    /// The wait before attempt `n + 1` after `n` failed ones (n ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.retry_base
            .checked_mul(factor)
            .unwrap_or(self.retry_cap)
            .min(self.retry_cap)
    }
}

/// Parses `90d,60d,30d`: positive whole days, any order; returned widest first,
/// without repeats.
pub fn parse_thresholds(s: &str) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let us = crate::policy::units::parse_duration(part)?;
        if us <= 0 || us % DAY != 0 {
            return Err(format!(
                "`{part}`: a threshold is a positive whole number of days (`30d`)"
            ));
        }
        out.push(us);
    }
    if out.is_empty() {
        return Err("expected at least one threshold (`90d,60d,30d`)".into());
    }
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}

// ------------------------------------------------------------------ the rule ----

/// What one scan does for one item: the notice to emit, if any, and every threshold
/// to remember as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub emit: Option<i64>,
    pub mark: Vec<i64>,
}

/// The threshold rule. `left` is the time from now to the end (µs); `thresholds` are
/// widest first; `sent(t)` says whether the notice of threshold `t` was already made.
///
/// Every threshold with `left <= t` has been crossed. Only the tightest crossed one is
/// emitted (an item first seen 20 days before its end gets the 30-day notice, not
/// three at once), and only if it was not emitted before; every crossed threshold is
/// remembered, so a wider one is never emitted late. An item at or past its end gets
/// nothing.
pub fn due(left: i64, thresholds: &[i64], sent: impl Fn(i64) -> bool) -> Due {
    let mut mark = Vec::new();
    let mut tightest = None;
    if left > 0 {
        for &t in thresholds.iter().filter(|&&t| left <= t) {
            tightest = Some(tightest.map_or(t, |m: i64| m.min(t)));
            if !sent(t) {
                mark.push(t);
            }
        }
    }
    let emit = tightest.filter(|t| mark.contains(t));
    Due { emit, mark }
}

/// What identifies an item across reloads: the record, not its place in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemKey<'a> {
    pub customer: &'a str,
    pub kind: &'a str,
    /// The plan of a subscription, the feature of a grant or override.
    pub name: &'a str,
    pub ends: Timestamp,
}

/// A notice's id: 32 hex digits of BLAKE3 over the item and the threshold (each part
/// length-prefixed, so no id can be forged from a neighbour's parts).
pub fn notice_id(item: &ItemKey<'_>, threshold: i64) -> String {
    let mut h = blake3::Hasher::new();
    for part in [item.customer, item.kind, item.name] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&item.ends.0.to_le_bytes());
    h.update(&threshold.to_le_bytes());
    let hash = h.finalize();
    let mut s = String::with_capacity(32);
    for b in &hash.as_bytes()[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

// --------------------------------------------------------- remembered state ----

#[derive(Debug, Serialize, Deserialize)]
struct SentLine {
    id: String,
    /// The item's end, in microseconds: the entry is pruned once it has passed.
    ends_us: i64,
}

/// The notices already made (`sent.ndjson`): one line per (item, threshold), appended
/// as they are made, rewritten without the pruned ones when those pile up.
#[derive(Debug)]
pub struct Sent {
    path: PathBuf,
    file: File,
    live: HashMap<String, i64>,
    /// Lines in the file that no longer count (pruned or repeated).
    dead: usize,
}

impl Sent {
    /// Loads the file (a torn or unreadable line is skipped), drops what ended before
    /// `now` and rewrites it compacted.
    pub fn open(dir: &Path, now: Timestamp) -> io::Result<Sent> {
        let path = dir.join("sent.ndjson");
        let mut live = HashMap::new();
        let mut skipped = 0usize;
        for line in lines(&path)? {
            match serde_json::from_slice::<SentLine>(&line) {
                Ok(l) => {
                    live.insert(l.id, l.ends_us);
                }
                Err(_) if line.trim_ascii().is_empty() => {}
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                file = %path.display(),
                lines = skipped,
                "skipped unreadable lines of the remembered notices"
            );
        }
        live.retain(|_, ends| *ends > now.0);
        let file = write_lines(&path, live.iter().map(|(id, ends)| line_of(id, *ends)))?;
        Ok(Sent {
            path,
            file,
            live,
            dead: 0,
        })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.live.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Remembers notices (appended and synced before this returns).
    pub fn record(&mut self, entries: &[(String, i64)]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for (id, ends) in entries {
            buf.push_str(&line_of(id, *ends));
            if self.live.insert(id.clone(), *ends).is_some() {
                self.dead += 1;
            }
        }
        self.file.write_all(buf.as_bytes())?;
        self.file.sync_data()
    }

    /// Forgets notices of items that ended at or before `now`; rewrites the file once
    /// the forgotten lines outnumber the live ones (and are more than a few).
    pub fn prune(&mut self, now: Timestamp) -> io::Result<usize> {
        let before = self.live.len();
        self.live.retain(|_, ends| *ends > now.0);
        let pruned = before - self.live.len();
        self.dead += pruned;
        if self.dead > 1024 && self.dead > self.live.len() {
            self.file = write_lines(
                &self.path,
                self.live.iter().map(|(id, ends)| line_of(id, *ends)),
            )?;
            self.dead = 0;
        }
        Ok(pruned)
    }
}

/// The lines of a file, as bytes (a torn last line may not be UTF-8); none if the
/// file does not exist.
fn lines(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).split(b'\n').collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn line_of(id: &str, ends_us: i64) -> String {
    format!("{{\"id\":\"{id}\",\"ends_us\":{ends_us}}}\n")
}

/// Replaces `path` with `lines` (temporary file, sync, rename) and returns it opened
/// for appending.
fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> io::Result<File> {
    let tmp = path.with_extension("ndjson.tmp");
    {
        let mut f = io::BufWriter::new(File::create(&tmp)?);
        for l in lines {
            f.write_all(l.as_bytes())?;
        }
        let f = f.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    OpenOptions::new().append(true).open(path)
}

// ---------------------------------------------------------------- event log ----

// ------------------------------------------------------------------- outbox ----

#[derive(Debug, Serialize, Deserialize)]
struct DoneLine {
    id: String,
    result: String,
}

/// Events waiting for the webhook, kept on disk until their outcome is known.
#[derive(Debug)]
struct Outbox {
    path: PathBuf,
    done_path: PathBuf,
    file: File,
    done: File,
    /// Events without an outcome yet, by id.
    pending: HashMap<String, Bytes>,
    done_lines: usize,
}

impl Outbox {
    /// Loads the outbox and the outcomes, rewrites the outbox with the events still
    /// pending (oldest first) and returns them.
    fn open(dir: &Path) -> io::Result<(Outbox, Vec<(String, Bytes)>)> {
        let path = dir.join("outbox.ndjson");
        let done_path = dir.join("outbox-done.ndjson");
        let mut finished = HashSet::new();
        for line in lines(&done_path)? {
            if let Ok(d) = serde_json::from_slice::<DoneLine>(&line) {
                finished.insert(d.id);
            }
        }
        let mut order = Vec::new();
        let mut pending = HashMap::new();
        for line in lines(&path)? {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            let Some(id) = v.get("id").and_then(|i| i.as_str()) else {
                continue;
            };
            if finished.contains(id) || pending.contains_key(id) {
                continue;
            }
            let body = Bytes::from(line);
            order.push((id.to_string(), body.clone()));
            pending.insert(id.to_string(), body);
        }
        let file = write_lines(
            &path,
            order
                .iter()
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned() + "\n"),
        )?;
        let done = write_lines(&done_path, std::iter::empty())?;
        Ok((
            Outbox {
                path,
                done_path,
                file,
                done,
                pending,
                done_lines: 0,
            },
            order,
        ))
    }

    fn add(&mut self, events: &[(String, Bytes)]) -> io::Result<()> {
        let mut buf = Vec::new();
        for (id, body) in events {
            buf.extend_from_slice(body);
            buf.push(b'\n');
            self.pending.insert(id.clone(), body.clone());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    fn finish(&mut self, id: &str, result: &str) -> io::Result<()> {
        if self.pending.remove(id).is_none() {
            return Ok(());
        }
        let line = serde_json::to_string(&DoneLine {
            id: id.to_string(),
            result: result.to_string(),
        })
        .map_err(io::Error::other)?;
        self.done.write_all(line.as_bytes())?;
        self.done.write_all(b"\n")?;
        self.done_lines += 1;
        // The outcomes only matter against the outbox: fold both once they pile up.
        if self.done_lines > 1024 && self.done_lines > self.pending.len() {
            self.file = write_lines(
                &self.path,
                self.pending
                    .values()
                    .map(|b| String::from_utf8_lossy(b).into_owned() + "\n"),
            )?;
            self.done = write_lines(&self.done_path, std::iter::empty())?;
            self.done_lines = 0;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ scanner ----

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
    Outcome { id: String, result: &'static str },
    Stop,
}

/// Wakes the scanner (after a snapshot swap). Cheap, never blocks.
#[derive(Debug, Clone)]
pub struct Trigger(Sender<Msg>);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Scan(_) => "Scan",
            Msg::Outcome { .. } => "Outcome",
            Msg::Stop => "Stop",
        })
    }
}

impl Trigger {
    pub fn poke(&self) {
        let _ = self.0.send(Msg::Scan(None));
    }
}

/// The running notice scanner. Dropping it stops the thread (after the scan in
/// progress, if any).
#[derive(Debug)]
pub struct Notices {
    tx: Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notices {
    /// Opens the notices directory, starts the scanner thread and, with a webhook,
    /// the delivery task on `runtime` (queueing what the outbox still holds). The
    /// first scan runs at once (and finds nothing until a snapshot is served).
    pub fn start(
        cfg: NoticeConfig,
        cell: SnapshotCell,
        clock: Arc<dyn Clock>,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<Notices> {
        fs::create_dir_all(&cfg.dir)?;
        // Two processes appending to and compacting the same files would lose notices.
        let lock = File::create(cfg.dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::other(format!(
                "{} is in use by another entitled process (LOCK is held)",
                cfg.dir.display()
            ))
        })?;
        let now = clock.now();
        let sent = Sent::open(&cfg.dir, now)?;
        let log = Segments::open(&cfg.dir, "events-", cfg.segment_bytes, cfg.keep, true)?;
        let (tx, rx) = mpsc::channel();
        let mut delivery = None;
        if let Some(w) = &cfg.webhook {
            let (outbox, backlog) = Outbox::open(&cfg.dir)?;
            let (qtx, qrx) = tokio::sync::mpsc::channel(w.queue.max(1));
            let tls = w
                .tls_config()
                .map_err(|e| io::Error::other(format!("--notify-url TLS settings: {e}")))?;
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
            webhook = cfg.webhook.as_ref().map(|w| w.url.to_string()),
            "renewal notices on"
        );
        let mut scanner = Scanner {
            _lock: lock,
            interval: cfg.scan_interval,
            thresholds: cfg.thresholds,
            cell,
            clock,
            sent,
            log,
            delivery,
        };
        let thread = std::thread::Builder::new()
            .name("entitled-notices".into())
            .spawn(move || scanner.run(&rx))?;
        Ok(Notices {
            tx,
            thread: Some(thread),
        })
    }

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

struct Delivery {
    outbox: Outbox,
    queue: tokio::sync::mpsc::Sender<(String, Bytes)>,
}

impl Delivery {
    fn enqueue(&mut self, id: String, body: Bytes) {
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

struct Scanner {
    /// Held (flock) for as long as the scanner runs.
    _lock: File,
    interval: Duration,
    thresholds: Vec<i64>,
    cell: SnapshotCell,
    clock: Arc<dyn Clock>,
    sent: Sent,
    log: Segments,
    delivery: Option<Delivery>,
}

impl Scanner {
    fn run(&mut self, rx: &Receiver<Msg>) {
        let mut replies = Vec::new();
        let mut scan = true;
        loop {
            if scan {
                let report = self.scan();
                for r in replies.drain(..) {
                    let _: Result<(), _> = tokio::sync::oneshot::Sender::send(r, report);
                }
                scan = false;
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
                    Msg::Outcome { id, result } => {
                        if let Some(d) = &mut self.delivery
                            && let Err(e) = d.outbox.finish(&id, result)
                        {
                            tracing::error!(error = %e, "writing the notice outbox failed");
                        }
                    }
                    Msg::Stop => return,
                }
            }
        }
    }

    fn scan(&mut self) -> ScanReport {
        let now = self.clock.now_background();
        let mut report = ScanReport::default();
        match self.sent.prune(now) {
            Ok(n) => report.pruned = n,
            Err(e) => tracing::error!(error = %e, "compacting the remembered notices failed"),
        }
        let Some(snap) = self.cell.load_full() else {
            return report;
        };
        let (events, marks) = plan(&snap, now, &self.thresholds, |id| self.sent.contains(id));
        if marks.is_empty() {
            return report;
        }
        let mut buf = Vec::new();
        for (_, body) in &events {
            buf.extend_from_slice(body);
            buf.push(b'\n');
        }
        // The event first, then the memory of it: a crash between the two repeats a
        // notice (with the same id) rather than losing it.
        if !buf.is_empty()
            && let Err(e) = self.log.append(&buf).and_then(|()| self.log.sync())
        {
            tracing::error!(error = %e, "writing the notice event log failed; will retry on the next scan");
            return report;
        }
        if let Some(d) = &mut self.delivery
            && !events.is_empty()
        {
            if let Err(e) = d.outbox.add(&events) {
                tracing::error!(error = %e, "writing the notice outbox failed");
            }
            for (id, body) in &events {
                d.enqueue(id.clone(), body.clone());
            }
        }
        if let Err(e) = self.sent.record(&marks) {
            tracing::error!(error = %e, "remembering notices failed; they may repeat after a restart");
        }
        report.emitted = events.len();
        crate::metrics::notices_emitted(events.len() as u64);
        if !events.is_empty() {
            tracing::info!(notices = events.len(), "renewal notices emitted");
        }
        report
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
    let widest = thresholds.iter().copied().max().unwrap_or(0);
    let mut events = Vec::new();
    let mut marks = Vec::new();
    // `expiring` lists ends in [now, now + within): +1 µs takes in an end exactly at
    // the widest threshold.
    for item in report::expiring(snap, now, widest.saturating_add(1)) {
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

// ----------------------------------------------------------------- delivery ----

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// A non-retryable answer, or every attempt used.
    Failed,
}

/// What an answer means: delivered, try again, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    GiveUp,
}

/// 2xx delivered; 429 and 5xx are worth another attempt; any other status is final.
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 500..=599 => Verdict::Retry,
        _ => Verdict::GiveUp,
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// An error with its causes (`client error (Connect): invalid peer certificate: …`):
/// hyper's own message alone does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `Retry-After` in seconds (the form receivers use for 429 and 503); an HTTP date
/// is not read, and falls back to the backoff.
pub fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

async fn deliver_all(
    cfg: WebhookConfig,
    tls: rustls::ClientConfig,
    mut queue: tokio::sync::mpsc::Receiver<(String, Bytes)>,
    outcomes: Sender<Msg>,
) {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(cfg.timeout));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
    let cfg = Arc::new(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    while let Some((id, body)) = queue.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, cfg, outcomes) = (client.clone(), cfg.clone(), outcomes.clone());
        tokio::spawn(async move {
            let outcome = deliver(&client, &cfg, &id, body).await;
            let result = match outcome {
                Outcome::Delivered => "delivered",
                Outcome::Failed => "failed",
            };
            // The outcome is queued for the outbox before the metric moves: whoever
            // sees the count and then stops the process stops it after the outcome.
            let _ = outcomes.send(Msg::Outcome { id, result });
            match outcome {
                Outcome::Delivered => crate::metrics::notice_delivered(),
                Outcome::Failed => crate::metrics::notice_failed(),
            }
            drop(permit);
        });
    }
}

/// POSTs one event (structured CloudEvents) until it is delivered, refused or out of
/// attempts.
async fn deliver(client: &HttpClient, cfg: &WebhookConfig, id: &str, body: Bytes) -> Outcome {
    let attempts = cfg.max_attempts.max(1);
    for attempt in 1..=attempts {
        let req = hyper::Request::post(cfg.url.clone())
            .header(
                hyper::header::CONTENT_TYPE,
                "application/cloudevents+json; charset=utf-8",
            )
            .body(http_body_util::Full::new(body.clone()));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "building the notice request failed");
                return Outcome::Failed;
            }
        };
        let mut asked = None;
        let sent = tokio::time::timeout(cfg.timeout, async {
            let resp = client.request(req).await?;
            let status = resp.status().as_u16();
            asked = retry_after(resp.headers());
            // Read the answer to the end so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            Ok::<u16, hyper_util::client::legacy::Error>(status)
        })
        .await;
        let why = match sent {
            Ok(Ok(status)) => match verdict(status) {
                Verdict::Delivered => return Outcome::Delivered,
                Verdict::GiveUp => {
                    tracing::warn!(id, status, "notice webhook refused the event; not retried");
                    return Outcome::Failed;
                }
                Verdict::Retry => format!("status {status}"),
            },
            Ok(Err(e)) => error_chain(&e),
            Err(_) => format!("no answer within {:?}", cfg.timeout),
        };
        if attempt == attempts {
            tracing::warn!(id, attempts, last = %why, "notice webhook: giving up");
            return Outcome::Failed;
        }
        let wait = cfg.retry_wait(attempt, asked);
        tracing::debug!(id, attempt, error = %why, retry_in = ?wait, "notice webhook attempt failed");
        tokio::time::sleep(wait).await;
    }
    Outcome::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
