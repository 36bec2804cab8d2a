//! The journal: usage changes appended to segment files by one writer thread.
//!
//! A request thread encodes its change and checksums it outside any lock, then takes
//! the journal's mutex only to get the next lsn and copy the frame into the pending
//! buffer. The writer thread swaps the buffer out and writes it:
//!
//! - **async** (the default): every flush interval (10 ms), so a crash loses at most
//!   one interval and the hot path never waits for the disk;
//! - **sync**: as soon as anything is pending; requests wait until their lsn is on
//!   disk. Everything appended while one `fdatasync` runs goes out in the next one
//!   (group commit), so many concurrent requests share each sync.
//!
//! A batch the disk refuses (full, failing) is cut off the segment again (see
//! [`super::sink`]), so no partial frame stays behind. In async mode its changes were
//! already acknowledged: the batch is kept and retried until the disk takes it. In sync
//! mode nobody was told yet: the batch is dropped, its requests are answered 503, and
//! what they changed in memory is handed back to the store to take back ([`Undo`]), so
//! a refused change counts nowhere, ever.
//!
//! After each batch is written the writer appends its events to the usage ledger. If
//! the ledger refuses, it is left behind at its last whole event and caught up from the
//! journal's segments (kept until then) once it can be written again.
//! Segments are `journal-<first lsn>.log`; the writer starts a new one past a size, or
//! when the checkpointer asks for everything so far to be sealed.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::ledger::{self, Ledger};
use super::record::{self, Encoded, Entry, Frame};
use super::sink::Appender;
use super::state::Hold;
use crate::files;
use crate::ids::ReservationId;
use crate::usage::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed every interval; a crash loses at most one interval.
    Async(Duration),
    /// Acknowledged only once on disk.
    Sync,
}

#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub durability: Durability,
    /// Start a new segment past this size.
    pub segment_bytes: u64,
    /// Most bytes waiting for the disk: past it, changes are refused (fail closed)
    /// rather than held in memory without bound.
    pub max_pending: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            durability: Durability::Async(Duration::from_millis(10)),
            segment_bytes: 64 << 20,
            max_pending: 256 << 20,
        }
    }
}

pub fn segment_name(first_lsn: u64) -> String {
    format!("journal-{first_lsn:020}.log")
}

/// Journal segments in `dir`, by first lsn.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    files::numbered(dir, "journal-", ".log")
}

/// How to take back, in memory, a change the journal could not write in sync mode
/// (its request is answered 503 and must count nothing). The store that made the
/// change says how when it appends it; the journal hands it back if the write fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// Units counted in a window: give them back.
    Count {
        customer: Box<str>,
        feature: Box<str>,
        window_start: i64,
        amount: u64,
    },
    /// A reservation taken: drop it (its units go back with it).
    Reserve { id: ReservationId },
    /// A reservation committed (`committed` units) or released (0): open it again.
    Settle {
        id: ReservationId,
        hold: Hold,
        committed: u64,
    },
    /// A seat acquired (or released): release (or hold) it again.
    Seat {
        customer: Box<str>,
        feature: Box<str>,
        holder: Box<str>,
        acquired: bool,
    },
    /// An idempotency key given its answer: forget it, so a retry is decided afresh.
    Idem { scope: Box<str>, key: Box<str> },
}

/// The lsns of batches dropped in sync mode (their requests answered 503), as ranges;
/// only the most recent are kept: a waiter looks within a moment of the drop.
#[derive(Debug, Default)]
struct Discarded(VecDeque<(u64, u64)>);

impl Discarded {
    const KEPT: usize = 4096;

    fn add(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        if let Some(r) = self.0.back_mut()
            && r.1 + 1 == first
        {
            r.1 = last;
            return;
        }
        self.0.push_back((first, last));
        if self.0.len() > Self::KEPT {
            self.0.pop_front();
        }
    }

    fn contains(&self, lsn: u64) -> bool {
        self.0.iter().rev().any(|&(a, b)| a <= lsn && lsn <= b)
    }
}

#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    next_lsn: u64,
    stop: bool,
    /// Why the disk refused the last write, while it does.
    failed: Option<String>,
    /// Writes the disk refused, in all.
    refused: u64,
    /// How to take back each pending change (sync mode only), by lsn.
    undo: Vec<(u64, Undo)>,
    /// Changes of dropped batches, for the store to take back ([`Journal::take_undone`]).
    undone: Vec<Undo>,
    discarded: Discarded,
    /// Why the last dropped batch was refused.
    refusal: String,
    /// The writer has written (or dropped) its last batch and stopped.
    done: bool,
    /// The writer sleeps until woken: there was nothing to write. The first append
    /// after that wakes it; the others of its batch do not (no syscall per request).
    idle: bool,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    durable: AtomicU64,
    /// Set while the backlog is full; cleared by the next successful flush.
    refusing: std::sync::atomic::AtomicBool,
    /// The ledger is behind the journal (a write failed, or it is at its cap).
    ledger_behind: std::sync::atomic::AtomicBool,
    flushed: tokio::sync::Notify,
    config: JournalConfig,
}

/// The journal's handle. Appends from any thread; dropped or [`Journal::close`]d, it
/// flushes and syncs everything.
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    seal: Mutex<mpsc::Sender<mpsc::Sender<Result<u64, String>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Encoded> = std::cell::RefCell::new(Encoded::default());
}

impl Journal {
    /// Starts the writer on `dir`, appending from `next_lsn` into a new segment.
    pub fn start(
        dir: &Path,
        next_lsn: u64,
        config: JournalConfig,
        ledger: Ledger,
    ) -> io::Result<Journal> {
        let file = open_segment(dir, next_lsn)?;
        Self::start_on(dir, next_lsn, config, ledger, file)
    }

    /// [`Journal::start`] with the first segment already open as `file`.
    fn start_on(
        dir: &Path,
        next_lsn: u64,
        config: JournalConfig,
        ledger: Ledger,
        file: Appender,
    ) -> io::Result<Journal> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(1 << 16),
                next_lsn,
                stop: false,
                failed: None,
                refused: 0,
                undo: Vec::new(),
                undone: Vec::new(),
                discarded: Discarded::default(),
                refusal: String::new(),
                done: false,
                idle: false,
            }),
            wake: Condvar::new(),
            durable: AtomicU64::new(next_lsn.saturating_sub(1)),
            refusing: std::sync::atomic::AtomicBool::new(false),
            ledger_behind: std::sync::atomic::AtomicBool::new(ledger.is_behind()),
            flushed: tokio::sync::Notify::new(),
            config,
        });
        let (seal_tx, seal_rx) = mpsc::channel();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            shared: shared.clone(),
            file,
            ledger,
            seal: seal_rx,
            spare: Vec::with_capacity(1 << 16),
            spare_undo: Vec::new(),
            unwritten: Vec::new(),
            first_lsn: next_lsn,
            events: Vec::new(),
            ledger_tried: None,
        };
        let thread = std::thread::Builder::new()
            .name("entitled-journal".into())
            .spawn(move || writer.run())?;
        Ok(Journal {
            shared,
            seal: Mutex::new(seal_tx),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn is_sync(&self) -> bool {
        self.shared.config.durability == Durability::Sync
    }

    /// Appends one entry; returns its lsn. Refused while the disk refuses writes and
    /// the backlog is full, or after close. In sync mode, `undo` says how to take the
    /// change back should its write fail (see [`Journal::take_undone`]).
    pub fn append(
        &self,
        entry: &impl serde::Serialize,
        undo: impl FnOnce() -> Vec<Undo>,
    ) -> Result<u64, StoreError> {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            scratch
                .set(entry)
                .map_err(|e| StoreError::Fatal(format!("encoding a journal record: {e}")))?;
            let mut p = self
                .shared
                .pending
                .lock()
                .map_err(|_| StoreError::Fatal("journal lock poisoned".into()))?;
            if p.stop {
                return Err(StoreError::Unavailable("the journal is closed".into()));
            }
            if p.bytes.len() + scratch.frame_len() > self.shared.config.max_pending {
                self.shared.refusing.store(true, Ordering::Relaxed);
                let why = p.failed.clone().unwrap_or_else(|| "disk too slow".into());
                return Err(StoreError::Unavailable(format!(
                    "state directory backlog full ({why})"
                )));
            }
            let lsn = p.next_lsn;
            p.next_lsn += 1;
            scratch.frame(lsn, &mut p.bytes);
            if self.is_sync() {
                p.undo.extend(undo().into_iter().map(|u| (lsn, u)));
            }
            let wake = std::mem::take(&mut p.idle) || self.is_sync();
            drop(p);
            if wake {
                self.shared.wake.notify_one();
            }
            Ok(lsn)
        })
    }

    /// Refuses early, before any state changes, while appends are being refused
    /// (the backlog is full because the disk refuses writes or cannot keep up).
    pub fn accepting(&self) -> Result<(), StoreError> {
        if self.shared.refusing.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "state directory backlog full: the disk is refusing or too slow".into(),
            ));
        }
        Ok(())
    }

    /// Whether the usage ledger is behind the journal (a write failed, or it is at
    /// its cap): the journal keeps the events, and is not folded, until it catches up.
    pub fn ledger_behind(&self) -> bool {
        self.shared.ledger_behind.load(Ordering::Relaxed)
    }

    /// Is `lsn` on disk?
    pub fn is_durable(&self, lsn: u64) -> bool {
        self.shared.durable.load(Ordering::Acquire) >= lsn
    }

    /// Waits until `lsn` is on disk (sync mode's acknowledgement). Fails if its batch
    /// was refused by the disk and dropped (in async mode: while writes fail).
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StoreError> {
        loop {
            let notified = self.shared.flushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(answer) = self.fate(lsn) {
                return answer;
            }
            notified.await;
        }
    }

    /// What became of `lsn`: on disk, dropped, or (`None`) not known yet.
    fn fate(&self, lsn: u64) -> Option<Result<(), StoreError>> {
        // Read before the dropped ranges: a batch is dropped before any later one is
        // published durable, so a durable mark past `lsn` is seen with the drop.
        let durable = self.is_durable(lsn);
        let Ok(p) = self.shared.pending.lock() else {
            return Some(Err(StoreError::Fatal("journal lock poisoned".into())));
        };
        if p.discarded.contains(lsn) {
            return Some(Err(StoreError::Unavailable(format!(
                "state directory not writable: {}; the change was not counted",
                p.refusal
            ))));
        }
        if durable {
            return Some(Ok(()));
        }
        if let Some(why) = p.failed.as_ref().filter(|_| !self.is_sync()) {
            return Some(Err(StoreError::Unavailable(format!(
                "state directory not writable: {why}"
            ))));
        }
        if p.done {
            return Some(Err(StoreError::Unavailable("the journal is closed".into())));
        }
        None
    }

    /// What the store must take back: the changes of batches dropped in sync mode,
    /// oldest first.
    pub fn take_undone(&self) -> Vec<Undo> {
        self.shared
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut p.undone))
            .unwrap_or_default()
    }

    /// Writes everything appended so far, starts a new segment and returns the last
    /// lsn of the sealed ones: segments up to it are complete and in the ledger.
    /// Refused while the journal cannot be written or the ledger is behind it (the
    /// segments are the ledger's source until it catches up).
    pub fn seal(&self) -> Result<u64, StoreError> {
        let (tx, rx) = mpsc::channel();
        self.seal
            .lock()
            .map_err(|_| StoreError::Fatal("journal lock poisoned".into()))?
            .send(tx)
            .map_err(|_| StoreError::Unavailable("the journal is closed".into()))?;
        // Through the lock: the writer looks at the channel and waits under it, so
        // the wake-up cannot fall between its look and its wait and be lost.
        drop(self.shared.pending.lock());
        self.shared.wake.notify_one();
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| StoreError::Unavailable("the journal writer did not answer".into()))?
            .map_err(StoreError::Unavailable)
    }

    /// Flushes, syncs and stops the writer.
    pub fn close(&self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.stop = true;
        }
        self.shared.wake.notify_one();
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// Opens a segment for appending; the directory is synced every time (not only when
/// the file is new), so no append can outlive the segment's name in a crash.
fn open_segment(dir: &Path, first_lsn: u64) -> io::Result<Appender> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(segment_name(first_lsn)))?;
    files::sync_dir(dir)?;
    let len = f.metadata()?.len();
    Ok(Appender::new(f, len))
}

struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    file: Appender,
    ledger: Ledger,
    seal: mpsc::Receiver<mpsc::Sender<Result<u64, String>>>,
    spare: Vec<u8>,
    spare_undo: Vec<(u64, Undo)>,
    /// A batch the disk refused, retried before anything newer (async mode).
    unwritten: Vec<u8>,
    /// The first lsn of the next batch (of `unwritten`, if any).
    first_lsn: u64,
    events: Vec<u8>,
    /// When the ledger, behind, was last caught up from the journal (or tried).
    ledger_tried: Option<Instant>,
}

impl Writer {
    fn run(&mut self) {
        let interval = match self.shared.config.durability {
            Durability::Async(d) => d.max(Duration::from_micros(100)),
            Durability::Sync => Duration::from_millis(100),
        };
        let sync = self.shared.config.durability == Durability::Sync;
        let mut last_flush = Instant::now();
        loop {
            let mut seal = None;
            let (stop, last_lsn) = {
                let Ok(mut p) = self.shared.pending.lock() else {
                    return;
                };
                loop {
                    // Looked for under the lock: `seal()` passes through the lock
                    // before it notifies, so a request is either seen here or wakes
                    // the wait below.
                    if seal.is_none() {
                        seal = self.seal.try_recv().ok();
                    }
                    // A batch the disk refused is retried without waiting for more.
                    let work = !p.bytes.is_empty() || !self.unwritten.is_empty();
                    let due = sync || last_flush.elapsed() >= interval;
                    if p.stop || seal.is_some() || (due && work) {
                        break;
                    }
                    if work {
                        let wait = interval.saturating_sub(last_flush.elapsed());
                        p = match self.shared.wake.wait_timeout(p, wait) {
                            Ok((p, _)) => p,
                            Err(_) => return,
                        };
                    } else {
                        // Nothing to write: no timer, so an idle sidecar's writer
                        // costs no wake-ups. An append, a seal or close wakes it.
                        p.idle = true;
                        p = match self.shared.wake.wait(p) {
                            Ok(p) => p,
                            Err(_) => return,
                        };
                        p.idle = false;
                        // A batch starts with its first record.
                        last_flush = Instant::now();
                    }
                }
                std::mem::swap(&mut p.bytes, &mut self.spare);
                std::mem::swap(&mut p.undo, &mut self.spare_undo);
                (p.stop, p.next_lsn - 1)
            };
            last_flush = Instant::now();
            let batch = std::mem::take(&mut self.spare);
            let undo = std::mem::take(&mut self.spare_undo);
            self.flush(batch, undo, last_lsn);
            if let Some(s) = seal {
                self.answer_seal(s);
            }
            if stop {
                let _ = self.ledger.sync();
                if let Ok(mut p) = self.shared.pending.lock() {
                    p.done = true;
                }
                self.shared.flushed.notify_waiters();
                return;
            }
        }
    }

    /// Writes a batch (and any batch refused before it), syncs, publishes the
    /// durable lsn and derives the ledger events. A batch the disk refuses is cut
    /// off the segment again, then retried (async) or dropped (sync).
    fn flush(&mut self, mut batch: Vec<u8>, undo: Vec<(u64, Undo)>, last_lsn: u64) {
        if !self.unwritten.is_empty() {
            let mut all = std::mem::take(&mut self.unwritten);
            all.extend_from_slice(&batch);
            batch = all;
        }
        if batch.is_empty() {
            self.spare = batch;
            return;
        }
        let started = Instant::now();
        if let Err(e) = self.file.append(&batch, true) {
            self.refused(&e);
            if self.shared.config.durability == Durability::Sync {
                self.discard(last_lsn, undo, &e);
                batch.clear();
                self.spare = batch;
            } else {
                self.unwritten = batch;
            }
            self.shared.flushed.notify_waiters();
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        crate::metrics::journal_flush(batch.len(), started.elapsed().as_secs_f64());
        if let Ok(mut p) = self.shared.pending.lock()
            && p.failed.take().is_some()
        {
            tracing::info!("writing the usage journal works again");
        }
        self.shared.refusing.store(false, Ordering::Relaxed);
        self.first_lsn = last_lsn + 1;
        self.shared.durable.store(last_lsn, Ordering::Release);
        self.shared.flushed.notify_waiters();
        self.write_ledger(&batch);
        if self.file.len() >= self.shared.config.segment_bytes {
            self.rotate(last_lsn + 1);
        }
        batch.clear();
        self.spare = batch;
    }

    /// Counts a refused write; logs when the failure starts or changes (its end is
    /// logged by the next write that works).
    fn refused(&self, e: &io::Error) {
        crate::metrics::journal_error();
        let why = e.to_string();
        let new = match self.shared.pending.lock() {
            Ok(mut p) => {
                p.refused += 1;
                p.failed.replace(why.clone()).as_ref() != Some(&why)
            }
            Err(_) => true,
        };
        if new {
            let what = match self.shared.config.durability {
                Durability::Sync => "its requests are refused and count nothing",
                Durability::Async(_) => "retrying",
            };
            tracing::error!(error = %why, "writing the usage journal failed; {what}");
        }
    }

    /// Drops a refused batch (sync mode): its lsns are marked dropped, so that their
    /// requests are answered 503, and its changes handed to the store to take back.
    fn discard(&mut self, last_lsn: u64, undo: Vec<(u64, Undo)>, e: &io::Error) {
        crate::metrics::journal_dropped(last_lsn + 1 - self.first_lsn);
        if let Ok(mut p) = self.shared.pending.lock() {
            p.discarded.add(self.first_lsn, last_lsn);
            p.undone.extend(undo.into_iter().map(|(_, u)| u));
            p.refusal = e.to_string();
        }
        self.first_lsn = last_lsn + 1;
    }

    /// Appends the batch's events to the ledger; while the ledger is behind (an
    /// append failed), catches it up from the journal's segments instead, at most
    /// once a second.
    fn write_ledger(&mut self, batch: &[u8]) {
        if self.ledger.is_behind() {
            let recent = self
                .ledger_tried
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
            if !recent {
                let _ = self.catch_up_ledger();
            }
            return;
        }
        let (frames, _) = record::decode_all(batch);
        if let Err(e) = self.append_events(&frames) {
            self.ledger_failed(&e);
        }
    }

    fn publish_ledger_state(&self) {
        let behind = self.ledger.is_behind();
        self.shared.ledger_behind.store(behind, Ordering::Relaxed);
    }

    fn ledger_failed(&mut self, e: &io::Error) {
        self.ledger_tried = Some(Instant::now());
        self.publish_ledger_state();
        tracing::error!(
            error = %e,
            last_lsn = self.ledger.last_lsn(),
            "writing the usage ledger failed; the journal keeps the events, re-derived once the ledger can be written"
        );
        crate::metrics::journal_error();
    }

    /// Appends the events of `frames` after the ledger's last lsn.
    fn append_events(&mut self, frames: &[Frame<'_>]) -> io::Result<()> {
        self.events.clear();
        let mut first = None;
        let mut last = 0;
        let floor = self.ledger.last_lsn();
        for f in frames {
            let Entry::Records(records) = &f.entry else {
                continue;
            };
            if f.lsn <= floor {
                continue;
            }
            for r in records.iter().filter(|r| ledger::counts(r)) {
                let time = record_time(r);
                first.get_or_insert((f.lsn, time));
                last = f.lsn;
                ledger::write_event(&mut self.events, self.ledger.source(), f.lsn, r);
            }
        }
        let Some(first) = first else {
            return Ok(());
        };
        let events = std::mem::take(&mut self.events);
        let r = self.ledger.append(&events, first, last);
        self.events = events;
        r
    }

    /// Re-derives the ledger's missing events from the journal's segments, segment by
    /// segment, up to the durable lsn. The ledger is caught up when all are in.
    fn catch_up_ledger(&mut self) -> io::Result<()> {
        self.ledger_tried = Some(Instant::now());
        let upto = self.shared.durable.load(Ordering::Acquire);
        let r = (|| {
            let segs = segments(&self.dir)?;
            for (i, (_, path)) in segs.iter().enumerate() {
                let floor = self.ledger.last_lsn();
                if segs.get(i + 1).is_some_and(|(next, _)| *next <= floor + 1) {
                    continue;
                }
                let buf = fs::read(path)?;
                let (mut frames, _) = record::decode_all(&buf);
                frames.retain(|f| f.lsn <= upto);
                self.append_events(&frames)?;
            }
            Ok(())
        })();
        match &r {
            Ok(()) => {
                self.ledger.caught_up();
                self.publish_ledger_state();
                tracing::info!(
                    last_lsn = self.ledger.last_lsn(),
                    "the usage ledger caught up with the journal"
                );
            }
            Err(e) => self.ledger_failed(e),
        }
        r
    }

    fn rotate(&mut self, next_lsn: u64) {
        match open_segment(&self.dir, next_lsn) {
            Ok(f) => self.file = f,
            Err(e) => {
                tracing::error!(error = %e, "starting a new journal segment failed");
                crate::metrics::journal_error();
            }
        }
    }

    fn answer_seal(&mut self, reply: mpsc::Sender<Result<u64, String>>) {
        // Everything appended before the request is written by now, or is in the
        // buffer: write it, then start a new segment.
        let (batch, undo, last_lsn) = match self.shared.pending.lock() {
            Ok(mut p) => {
                std::mem::swap(&mut p.bytes, &mut self.spare);
                std::mem::swap(&mut p.undo, &mut self.spare_undo);
                (
                    std::mem::take(&mut self.spare),
                    std::mem::take(&mut self.spare_undo),
                    p.next_lsn - 1,
                )
            }
            Err(_) => return,
        };
        self.flush(batch, undo, last_lsn);
        let answer = if !self.unwritten.is_empty() {
            Err("the journal cannot be written".to_string())
        } else if self.ledger.is_behind() && self.catch_up_ledger().is_err() {
            Err("the usage ledger is behind the journal, which is kept until it catches up".into())
        } else {
            let _ = self.ledger.sync();
            self.rotate(last_lsn + 1);
            Ok(last_lsn)
        };
        let _ = reply.send(answer);
    }
}

pub fn record_time(r: &record::Record<'_>) -> i64 {
    use record::Record;
    match *r {
        Record::Consume { time, .. }
        | Record::Reserve { time, .. }
        | Record::Settle { time, .. }
        | Record::Seat { time, .. } => time,
        Record::Idem { expires, .. } => expires,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::durable::ledger::{LedgerConfig, event_lsn};
    use crate::usage::durable::record::{Entry, Record};

    fn consume() -> Entry<'static> {
        Entry::Records(vec![Record::Consume {
            customer: "acme",
            feature: "api.calls",
            window_start: 0,
            window_end: 10,
            amount: 1,
            overage: 0,
            time: 5,
            snapshot: "abc",
        }])
    }

    /// A journal in `dir` from lsn 1, with the default (async) settings.
    fn start(dir: &Path) -> Journal {
        let ledger =
            Ledger::open(&dir.join("ledger"), "test".into(), LedgerConfig::default()).unwrap();
        Journal::start(dir, 1, JournalConfig::default(), ledger).unwrap()
    }

    fn idle(j: &Journal) -> bool {
        j.shared.pending.lock().map(|p| p.idle).unwrap_or(false)
    }

    /// Bounded wait for a state another thread reaches.
    fn within(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::yield_now();
        }
    }

    /// With nothing to write the writer sleeps without a timer; an append, a seal and
    /// close each wake it.
    #[test]
    fn an_idle_writer_sleeps_until_an_append_or_a_seal_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = start(dir.path());
        within("the writer going idle", || idle(&j));
        let lsn = j.append(&consume(), Vec::new).unwrap();
        within("the append reaching the disk", || j.is_durable(lsn));
        within("the writer going idle again", || idle(&j));
        // A seal finds it asleep and is answered (a lost wake-up would be an error
        // after the seal's 30 s timeout).
        assert_eq!(j.seal().unwrap(), lsn);
        within("the writer going idle after the seal", || idle(&j));
        let next = j.append(&consume(), Vec::new).unwrap();
        assert_eq!(next, lsn + 1);
        j.close();
        assert!(j.is_durable(next), "close writes what is pending");
    }

    /// A disk that refuses writes (the segment is `/dev/full`): the change is never
    /// acknowledged as durable, a sync-mode wait fails naming the cause, and the writer
    /// keeps retrying the refused batch on its own, without another append.
    #[test]
    fn a_refusing_disk_fails_waits_and_is_retried_without_new_appends() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(segment_name(1))).unwrap();
        let j = start(dir.path());
        let lsn = j.append(&consume(), Vec::new).unwrap();
        let failed = || j.shared.pending.lock().ok().and_then(|p| p.failed.clone());
        within("the write failing", || failed().is_some());
        assert!(
            failed().unwrap().contains("No space left"),
            "{:?}",
            failed()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(j.wait_durable(lsn)).unwrap_err().to_string();
        assert!(
            err.contains("not writable") && err.contains("No space left"),
            "{err}"
        );
        assert!(!j.is_durable(lsn));
        // One append, and the writer retries it on its own (not idling until the next).
        let refused = || j.shared.pending.lock().map(|p| p.refused).unwrap_or(0);
        within("the refused batch being retried", || refused() >= 3);
        j.close();
        assert!(!j.is_durable(lsn), "nothing was ever written");
    }

    /// A file in `dir` that takes `budget` more bytes, then fails part-way through a
    /// write, as a filling disk does.
    fn filling(path: &Path, budget: usize) -> (Appender, Arc<std::sync::atomic::AtomicUsize>) {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        let budget = Arc::new(std::sync::atomic::AtomicUsize::new(budget));
        let f = super::super::sink::Filling {
            file,
            budget: budget.clone(),
        };
        (Appender::new(f, 0), budget)
    }

    fn sync_config() -> JournalConfig {
        JournalConfig {
            durability: Durability::Sync,
            ..JournalConfig::default()
        }
    }

    fn frame_len() -> usize {
        let mut one = Vec::new();
        record::encode(&mut one, 1, &consume()).unwrap();
        one.len()
    }

    fn count(n: u64) -> Undo {
        Undo::Count {
            customer: "acme".into(),
            feature: "api.calls".into(),
            window_start: 0,
            amount: n,
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Sync mode, the disk filling up part-way through a batch: the batch is cut off
    /// the segment (no partial frame), its waiter fails, its change is handed back to
    /// be taken back, and once space returns the next batch follows the last whole
    /// frame. The refused change stays refused even after later lsns are durable.
    #[test]
    fn sync_mode_drops_a_refused_batch_whole_and_hands_its_change_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let (file, budget) = filling(&path, frame_len() + frame_len() / 2);
        let ledger = Ledger::open(
            &dir.path().join("ledger"),
            "test".into(),
            LedgerConfig::default(),
        )
        .unwrap();
        let j = Journal::start_on(dir.path(), 1, sync_config(), ledger, file).unwrap();
        let a = j.append(&consume(), || vec![count(1)]).unwrap();
        block_on(j.wait_durable(a)).unwrap();
        let b = j.append(&consume(), || vec![count(2)]).unwrap();
        let err = block_on(j.wait_durable(b)).unwrap_err().to_string();
        assert!(
            err.contains("not counted") && err.contains("No space"),
            "{err}"
        );
        assert_eq!(j.take_undone(), vec![count(2)]);
        assert!(j.take_undone().is_empty(), "handed back once");
        let on_disk = |n: usize| {
            let buf = fs::read(&path).unwrap();
            let (frames, damage) = record::decode_all(&buf);
            assert!(damage.is_clean(), "{damage:?}");
            assert_eq!(buf.len(), n * frame_len(), "whole frames only");
            frames.iter().map(|f| f.lsn).collect::<Vec<_>>()
        };
        assert_eq!(on_disk(1), [a]);
        budget.store(1 << 20, std::sync::atomic::Ordering::SeqCst);
        let c = j.append(&consume(), || vec![count(4)]).unwrap();
        block_on(j.wait_durable(c)).unwrap();
        assert_eq!(on_disk(2), [a, c]);
        assert!(j.is_durable(b), "the durable mark passed b...");
        assert!(
            block_on(j.wait_durable(b)).is_err(),
            "...yet b stays refused"
        );
        j.close();
    }

    /// The ledger refusing part-way through a batch: its segment is cut back to the
    /// last whole line, its last lsn stays before the refused events, checkpointing
    /// (seal) is refused while it is behind, and once it can be written it is caught
    /// up from the journal: every event once, in order, no line torn.
    #[test]
    fn a_refused_ledger_write_is_cut_back_and_caught_up_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut line = Vec::new();
        let Entry::Records(rs) = consume() else {
            unreachable!()
        };
        ledger::write_event(&mut line, "test", 1, &rs[0]);
        let ledger_dir = dir.path().join("ledger");
        fs::create_dir_all(&ledger_dir).unwrap();
        let (file, budget) = filling(&ledger_dir.join("usage-1-0.ndjson"), 0);
        budget.store(
            line.len() + line.len() / 2,
            std::sync::atomic::Ordering::SeqCst,
        );
        let ledger = Ledger::open(&ledger_dir, "test".into(), LedgerConfig::default())
            .unwrap()
            .with_file(file);
        let j = Journal::start(dir.path(), 1, sync_config(), ledger).unwrap();
        for _ in 0..2 {
            let lsn = j.append(&consume(), Vec::new).unwrap();
            block_on(j.wait_durable(lsn)).unwrap();
        }
        let lines = || {
            let text = fs::read_to_string(ledger_dir.join("usage-1-0.ndjson")).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'), "torn: {text}");
            text.lines()
                .map(|l| event_lsn(l.as_bytes()).expect("an event line"))
                .collect::<Vec<_>>()
        };
        assert_eq!(lines(), [1]);
        let err = j.seal().unwrap_err().to_string();
        assert!(err.contains("ledger is behind"), "{err}");
        budget.store(1 << 20, std::sync::atomic::Ordering::SeqCst);
        let lsn = j.append(&consume(), Vec::new).unwrap();
        block_on(j.wait_durable(lsn)).unwrap();
        assert_eq!(j.seal().unwrap(), 3);
        assert_eq!(lines(), [1, 2, 3]);
        j.close();
    }
}
