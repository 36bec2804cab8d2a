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
//! After each batch is written the writer appends its events to the usage ledger.
//! Segments are `journal-<first lsn>.log`; the writer starts a new one past a size, or
//! when the checkpointer asks for everything so far to be sealed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::ledger::{self, Ledger};
use super::record::{self, Encoded, Entry};
use crate::files;
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

#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    next_lsn: u64,
    stop: bool,
    /// Why the disk refused the last write, while it does.
    failed: Option<String>,
    /// Writes the disk refused, in all.
    refused: u64,
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
    flushed: tokio::sync::Notify,
    config: JournalConfig,
}

/// The journal's handle. Appends from any thread; dropped or [`Journal::close`]d, it
/// flushes and syncs everything.
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    seal: Mutex<mpsc::Sender<mpsc::Sender<u64>>>,
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(1 << 16),
                next_lsn,
                stop: false,
                failed: None,
                refused: 0,
                idle: false,
            }),
            wake: Condvar::new(),
            durable: AtomicU64::new(next_lsn.saturating_sub(1)),
            refusing: std::sync::atomic::AtomicBool::new(false),
            flushed: tokio::sync::Notify::new(),
            config,
        });
        let file = open_segment(dir, next_lsn)?;
        let (seal_tx, seal_rx) = mpsc::channel();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            shared: shared.clone(),
            file,
            size: 0,
            ledger,
            seal: seal_rx,
            spare: Vec::with_capacity(1 << 16),
            unwritten: Vec::new(),
            events: Vec::new(),
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
    /// the backlog is full, or after close.
    pub fn append(&self, entry: &impl serde::Serialize) -> Result<u64, StoreError> {
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

    /// Is `lsn` on disk?
    pub fn is_durable(&self, lsn: u64) -> bool {
        self.shared.durable.load(Ordering::Acquire) >= lsn
    }

    /// Waits until `lsn` is on disk (sync mode's acknowledgement).
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StoreError> {
        loop {
            let notified = self.shared.flushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_durable(lsn) {
                return Ok(());
            }
            if let Ok(p) = self.shared.pending.lock() {
                if let Some(why) = &p.failed {
                    return Err(StoreError::Unavailable(format!(
                        "state directory not writable: {why}"
                    )));
                }
                if p.stop {
                    return Err(StoreError::Unavailable("the journal is closed".into()));
                }
            }
            notified.await;
        }
    }

    /// Writes everything appended so far, starts a new segment and returns the last
    /// lsn of the sealed ones: segments up to it are complete and in the ledger.
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
            .map_err(|_| StoreError::Unavailable("the journal writer did not answer".into()))
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
fn open_segment(dir: &Path, first_lsn: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(segment_name(first_lsn)))?;
    files::sync_dir(dir)?;
    Ok(f)
}

struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    file: File,
    size: u64,
    ledger: Ledger,
    seal: mpsc::Receiver<mpsc::Sender<u64>>,
    spare: Vec<u8>,
    /// A batch the disk refused, retried before anything newer.
    unwritten: Vec<u8>,
    events: Vec<u8>,
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
                (p.stop, p.next_lsn - 1)
            };
            last_flush = Instant::now();
            let batch = std::mem::take(&mut self.spare);
            self.flush(batch, last_lsn);
            if let Some(s) = seal {
                self.answer_seal(s);
            }
            if stop {
                let _ = self.ledger.sync();
                self.shared.flushed.notify_waiters();
                return;
            }
        }
    }

    /// Writes a batch (and any batch refused before it), syncs, publishes the
    /// durable lsn and derives the ledger events.
    fn flush(&mut self, mut batch: Vec<u8>, last_lsn: u64) {
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
        let written = self
            .file
            .write_all(&batch)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            crate::metrics::journal_error();
            let why = e.to_string();
            let new = match self.shared.pending.lock() {
                Ok(mut p) => {
                    p.refused += 1;
                    p.failed.replace(why.clone()).as_ref() != Some(&why)
                }
                Err(_) => true,
            };
            // Retried every flush interval while the disk refuses: logged when the
            // failure starts or changes (and its end below), counted every time.
            if new {
                tracing::error!(error = %why, "writing the usage journal failed; retrying");
            }
            self.shared.flushed.notify_waiters();
            self.unwritten = batch;
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
        self.size += batch.len() as u64;
        self.shared.durable.store(last_lsn, Ordering::Release);
        self.shared.flushed.notify_waiters();
        self.write_ledger(&batch);
        if self.size >= self.shared.config.segment_bytes {
            self.rotate(last_lsn + 1);
        }
        batch.clear();
        self.spare = batch;
    }

    fn write_ledger(&mut self, batch: &[u8]) {
        let (frames, _) = record::decode_all(batch);
        self.events.clear();
        let mut first = None;
        let mut last = 0;
        let floor = self.ledger.last_lsn();
        for f in &frames {
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
        if let Some(first) = first {
            let events = std::mem::take(&mut self.events);
            if let Err(e) = self.ledger.append(&events, first, last) {
                // The journal holds the records: the ledger catches up on restart.
                tracing::error!(error = %e, "writing the usage ledger failed");
                crate::metrics::journal_error();
            }
            self.events = events;
        }
    }

    fn rotate(&mut self, next_lsn: u64) {
        match open_segment(&self.dir, next_lsn) {
            Ok(f) => {
                self.file = f;
                self.size = 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "starting a new journal segment failed");
                crate::metrics::journal_error();
            }
        }
    }

    fn answer_seal(&mut self, reply: mpsc::Sender<u64>) {
        // Everything appended before the request is written by now, or is in the
        // buffer: write it, then start a new segment.
        let (batch, last_lsn) = match self.shared.pending.lock() {
            Ok(mut p) => {
                std::mem::swap(&mut p.bytes, &mut self.spare);
                (std::mem::take(&mut self.spare), p.next_lsn - 1)
            }
            Err(_) => return,
        };
        self.flush(batch, last_lsn);
        if self.unwritten.is_empty() {
            let _ = self.ledger.sync();
            self.rotate(last_lsn + 1);
            let _ = reply.send(last_lsn);
        }
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
    use crate::usage::durable::ledger::LedgerConfig;
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
        let lsn = j.append(&consume()).unwrap();
        within("the append reaching the disk", || j.is_durable(lsn));
        within("the writer going idle again", || idle(&j));
        // A seal finds it asleep and is answered (a lost wake-up would be an error
        // after the seal's 30 s timeout).
        assert_eq!(j.seal().unwrap(), lsn);
        within("the writer going idle after the seal", || idle(&j));
        let next = j.append(&consume()).unwrap();
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
        let lsn = j.append(&consume()).unwrap();
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
}
