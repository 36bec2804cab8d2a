//! The state directory: opening, recovering, checkpointing and closing it.
//!
//! ```text
//! state/
//!   FORMAT                      {"format": 1, "id": "<uuid>"}: refused if newer
//!   LOCK                        held (flock) by the one process using the directory
//!   checkpoint-<lsn>.ckpt       the state as of <lsn>
//!   journal-<first lsn>.log     changes after it, in segments
//!   ledger/usage-<lsn>-<t>.ndjson   the billing ledger (CloudEvents)
//!   damaged/                    files recovery found damaged, kept for inspection
//! ```
//!
//! Start-up replays checkpoint and journal, re-derives ledger events a crash cut off,
//! and if it found damage (a torn tail, flipped bytes) logs and counts what was lost,
//! writes a clean checkpoint at once and moves the damaged files aside, so the next
//! start never meets them again. A background thread folds the journal into a new
//! checkpoint every interval or past a size; a graceful close flushes and folds.
//!
//! The parts, each reading only the ones before it: [`record`] (what a record is and
//! how frames are laid out), [`ledger`] (billing events derived from records),
//! [`journal`] (the writer thread appending frames), [`state`] (the record set a
//! directory holds), [`checkpoint`] (writing it), [`replay`] (rebuilding it from
//! checkpoint and journal) and [`fold`] (the one into the other). This module opens
//! the directory, loads what replay found into a [`MemoryStore`], and runs the
//! checkpointer.

pub mod archive;
pub mod checkpoint;
pub mod fold;
pub mod journal;
pub mod ledger;
pub mod record;
pub mod replay;
pub mod sink;
pub mod state;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use self::journal::{Journal, JournalConfig};
use self::ledger::{Ledger, LedgerConfig};
use self::record::FORMAT_VERSION;
use self::replay::RecoverError;
use self::state::State;
use crate::files;
use crate::time::Clock;
use crate::usage::StoreConfig;
use crate::usage::StoreError;

/// Why the state directory could not be opened, folded or closed. Each message says
/// what was being done; the cause follows as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("{} is in use by another entitled process (LOCK is held)", .0.display())]
    Locked(PathBuf),
    #[error("cannot write {} (the state directory must be writable)", .0.display())]
    Write(PathBuf, #[source] io::Error),
    #[error("reading {}", .0.display())]
    ReadFormat(PathBuf, #[source] io::Error),
    #[error("{}: not a state directory format file", .0.display())]
    NotFormatFile(PathBuf, #[source] serde_json::Error),
    #[error(
        "{}: state directory written by format version {found}; this entitled reads up to version {FORMAT_VERSION}. Run a newer entitled, or point --state-dir at another directory",
        dir.display()
    )]
    NewerFormat { dir: PathBuf, found: u32 },
    #[error("opening the ledger in {}", .0.display())]
    OpenLedger(PathBuf, #[source] io::Error),
    #[error("reading the ledger to heal damaged journal records")]
    Heal(#[source] io::Error),
    #[error("checkpoint lock poisoned")]
    Poisoned,
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error(transparent)]
    Journal(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a state directory recovered: the usage state to serve, and the journal that
/// records every change to it from now on.
#[derive(Debug)]
pub struct Opened {
    pub state: State,
    pub journal: Arc<Journal>,
}

#[derive(Debug, Clone)]
pub struct DurableConfig {
    pub dir: PathBuf,
    pub journal: JournalConfig,
    pub ledger: LedgerConfig,
    pub store: StoreConfig,
    /// Fold the journal into a checkpoint this often...
    pub checkpoint_interval: Duration,
    /// ...or as soon as the journal outgrows this.
    pub checkpoint_bytes: u64,
}

impl DurableConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DurableConfig {
            dir: dir.into(),
            journal: JournalConfig::default(),
            ledger: LedgerConfig::default(),
            store: StoreConfig::default(),
            checkpoint_interval: Duration::from_secs(300),
            checkpoint_bytes: 256 << 20,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Format {
    format: u32,
    id: String,
}

/// What start-up found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub state_id: String,
    pub checkpoint_lsn: u64,
    pub last_lsn: u64,
    pub replayed: u64,
    pub lost_records: u64,
    /// Consumptions lost with damaged journal records but found in the ledger.
    pub healed_from_ledger: u64,
    /// Quota counters a damaged checkpoint lost, restored from the ledger.
    pub checkpoint_counters_restored: u64,
    pub ledger_caught_up: u64,
    pub ledger_truncated_bytes: u64,
    pub quota_counters: usize,
    pub elapsed: Duration,
}

struct Inner {
    dir: PathBuf,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    config: DurableConfig,
    stop: Mutex<bool>,
    wake: Condvar,
    /// One fold at a time (the background thread and close).
    folding: Mutex<()>,
    closed: AtomicBool,
    _lock: File,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// An open state directory. [`StateDir::close`] it for a graceful stop.
#[derive(Debug)]
pub struct StateDir {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Reads and checks `FORMAT` (creating it for a new directory).
fn format(dir: &Path) -> Result<String, StateError> {
    let path = dir.join("FORMAT");
    match fs::read(&path) {
        Ok(bytes) => {
            let f: Format = serde_json::from_slice(&bytes)
                .map_err(|e| StateError::NotFormatFile(path.clone(), e))?;
            if f.format > FORMAT_VERSION {
                return Err(StateError::NewerFormat {
                    dir: dir.to_path_buf(),
                    found: f.format,
                });
            }
            Ok(f.id)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let f = Format {
                format: FORMAT_VERSION,
                id: uuid::Uuid::new_v4().to_string(),
            };
            files::replace_with_bytes(&path, &serde_json::to_vec(&f).map_err(io::Error::other)?)
                .map_err(|e| StateError::Write(path, e))?;
            Ok(f.id)
        }
        Err(e) => Err(StateError::ReadFormat(path, e)),
    }
}

impl StateDir {
    /// Opens (or creates) the state directory, recovers the usage state it holds and
    /// starts the journal that records every change from now on. The in-memory store
    /// is built on what this returns ([`crate::usage::MemoryStore::open_durable`]).
    pub fn open(
        config: DurableConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(StateDir, Opened, OpenReport), StateError> {
        let started = Instant::now();
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| StateError::Create(dir.clone(), e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(|e| StateError::Write(lock_path, e))?;
        lock.try_lock()
            .map_err(|_| StateError::Locked(dir.clone()))?;
        let id = format(&dir)?;
        let source = format!("urn:entitled:state:{id}");
        let mut ledger = Ledger::open(&dir.join("ledger"), source.clone(), config.ledger.clone())
            .map_err(|e| StateError::OpenLedger(dir.clone(), e))?;
        let floor = ledger.last_lsn();
        let mut events = Vec::new();
        let mut first = None;
        let mut last = 0;
        let mut seen = Vec::new();
        let mut rec = replay::recover(&dir, None, |lsn, r| {
            if ledger::counts(r) {
                seen.push(lsn);
            }
            if lsn > floor && ledger::counts(r) {
                first.get_or_insert((lsn, journal::record_time(r)));
                last = lsn;
                ledger::write_event(&mut events, &source, lsn, r);
            }
        })?;
        let caught_up = events.iter().filter(|b| **b == b'\n').count() as u64;
        if let Some(first) = first
            && let Err(e) = ledger
                .append(&events, first, last)
                .and_then(|()| ledger.sync())
        {
            // The journal keeps the events: the writer catches the ledger up from it
            // once the ledger can be written, and keeps the journal until then.
            tracing::error!(error = %e, "bringing the usage ledger up to date failed; retried from the journal");
        }
        let Healed {
            lost,
            from_journal_damage: healed,
            checkpoint_counters: restored,
        } = heal(&dir, &mut rec, floor, &mut seen)?;
        // Never reuse an lsn the ledger has already named an event with (the journal
        // may have lost its tail while the ledger kept it).
        let next_lsn = rec.last_lsn.max(floor) + 1;
        let now = clock.now();
        if !rec.damaged.is_empty() && !ledger.is_behind() {
            // Never meet the same damage twice: fold what was recovered (and healed)
            // into a clean checkpoint now and move the damaged files aside.
            checkpoint::write_checkpoint(&dir, &rec.state, next_lsn - 1)?;
            fold::remove_folded(&dir, next_lsn - 1, &rec)?;
        }
        rec.state.prune(now.0);
        let truncated = ledger.truncated_bytes;
        if truncated > 0 {
            tracing::warn!(
                bytes = truncated,
                "cut a torn last line off the usage ledger; its events are re-derived from the journal"
            );
        }
        let journal = Arc::new(Journal::start(
            &dir,
            next_lsn,
            config.journal.clone(),
            ledger,
        )?);
        let report = OpenReport {
            state_id: id,
            checkpoint_lsn: rec.checkpoint_lsn,
            last_lsn: next_lsn - 1,
            healed_from_ledger: healed,
            checkpoint_counters_restored: restored,
            replayed: rec.replayed,
            lost_records: lost,
            ledger_caught_up: caught_up,
            ledger_truncated_bytes: truncated,
            quota_counters: rec.state.quotas.len(),
            elapsed: Duration::ZERO,
        };
        let opened = Opened {
            state: rec.state,
            journal: journal.clone(),
        };
        let inner = Arc::new(Inner {
            dir,
            journal,
            clock,
            config,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            folding: Mutex::new(()),
            closed: AtomicBool::new(false),
            _lock: lock,
        });
        let bg = inner.clone();
        let thread = std::thread::Builder::new()
            .name("entitled-checkpoint".into())
            .spawn(move || bg.run())?;
        Ok((
            StateDir {
                inner,
                thread: Some(thread),
            },
            opened,
            OpenReport {
                elapsed: started.elapsed(),
                ..report
            },
        ))
    }

    /// Folds the journal into a new checkpoint now. Returns the entries it holds, or
    /// `None` if nothing changed since the last one.
    pub fn checkpoint(&self) -> Result<Option<usize>, StateError> {
        self.inner.fold()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Flushes and syncs the journal, folds it into a checkpoint (so the next start
    /// reads one file) and stops the background thread.
    pub fn close(mut self) -> Result<(), StateError> {
        self.stop_thread();
        let r = self.inner.fold();
        self.inner.journal.close();
        self.inner.closed.store(true, Ordering::Release);
        r.map(|_| ())
    }

    fn stop_thread(&mut self) {
        if let Ok(mut s) = self.inner.stop.lock() {
            *s = true;
        }
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        self.stop_thread();
        self.inner.journal.close();
    }
}

impl Inner {
    fn run(&self) {
        let _ = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
        let mut last = Instant::now();
        loop {
            let stopped = match self.stop.lock() {
                Ok(s) if *s => true,
                Ok(s) => match self.wake.wait_timeout(s, Duration::from_secs(1)) {
                    Ok((s, _)) => *s,
                    Err(_) => return,
                },
                Err(_) => return,
            };
            if stopped {
                return;
            }
            let due = last.elapsed() >= self.config.checkpoint_interval
                || journal_bytes(&self.dir) >= self.config.checkpoint_bytes;
            if due {
                if let Err(e) = self.fold() {
                    tracing::error!(error = %format!("{e:#}"), "checkpoint failed; the journal keeps everything meanwhile");
                }
                last = Instant::now();
            }
        }
    }

    fn fold(&self) -> Result<Option<usize>, StateError> {
        let _one = self.folding.lock().map_err(|_| StateError::Poisoned)?;
        if self.closed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let started = Instant::now();
        let upto = match self.journal.seal() {
            Ok(upto) => upto,
            // Not an error of the state: the journal keeps the events, unfolded, until
            // the ledger can take them (space made, segments acknowledged).
            Err(e) if self.journal.ledger_behind() => {
                tracing::warn!(error = %e, "checkpoint postponed: the usage ledger is behind the journal");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let r = fold::fold(&self.dir, upto, self.clock.now_background().0);
        match &r {
            Ok(Some(n)) => {
                crate::metrics::checkpoint("success", started.elapsed().as_secs_f64());
                tracing::info!(
                    lsn = upto,
                    entries = n,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
            }
            Ok(None) => {}
            Err(_) => crate::metrics::checkpoint("failure", 0.0),
        }
        Ok(r?)
    }
}

/// What recovery made good of the damage it found.
struct Healed {
    /// Records lost to damage (before healing).
    lost: u64,
    /// Consumptions of damaged journal records counted again from the ledger.
    from_journal_damage: u64,
    /// Quota counters of a damaged checkpoint restored from the ledger.
    checkpoint_counters: u64,
}

/// Logs each damaged file, heals from the ledger what it can (damaged journal records
/// after the checkpoint, counters of a damaged checkpoint) and counts the records lost.
fn heal(
    dir: &Path,
    rec: &mut replay::Recovered,
    floor: u64,
    seen: &mut [u64],
) -> Result<Healed, StateError> {
    let lost = rec.lost_records();
    for (path, d) in &rec.damaged {
        tracing::error!(
            file = %path.display(),
            damaged_regions = d.regions,
            torn_tail = d.torn_tail,
            bytes_skipped = d.bytes,
            records_lost = d.lost_records(),
            "state directory damage: the valid records around it were recovered; the damaged ones are lost"
        );
    }
    let mut healed = 0;
    if !rec.damaged.is_empty() && floor > rec.checkpoint_lsn {
        healed = heal_from_ledger(dir, rec, seen)?;
    }
    let mut restored = 0;
    if let Some(checkpoint) = rec.damaged_checkpoint.take() {
        restored = heal_checkpoint(dir, rec, &checkpoint)?;
    }
    // A checkpoint cut short does not say how many records it held; each counter
    // the ledger had to restore was at least one of them.
    let lost = lost.max(restored);
    if lost > 0 {
        crate::metrics::state_damaged(lost);
    }
    Ok(Healed {
        lost,
        from_journal_damage: healed,
        checkpoint_counters: restored,
    })
}

/// Counts again the ledger's events after the checkpoint whose journal records were
/// lost to damage (their lsns are not in `seen`). Returns how many.
fn heal_from_ledger(
    dir: &Path,
    rec: &mut replay::Recovered,
    seen: &mut [u64],
) -> Result<u64, StateError> {
    let mut healed = 0;
    // The ledger may hold events whose journal records were lost: they were
    // served and billed, so count them again rather than give the units away.
    seen.sort_unstable();
    let events =
        ledger::events_after(&dir.join("ledger"), rec.checkpoint_lsn).map_err(StateError::Heal)?;
    for (lsn, v) in &events {
        if seen.binary_search(lsn).is_ok() {
            continue;
        }
        if let Some(r) = ledger::event_record(v) {
            rec.state.apply(&r);
            healed += 1;
        }
    }
    if healed > 0 {
        tracing::warn!(
            events = healed,
            "restored usage lost with damaged journal records from the usage ledger"
        );
    }
    Ok(healed)
}

/// Restores the quota counters a damaged checkpoint lost: the ledger holds every
/// counted consumption up to the checkpoint (within its retention), so each window's
/// sum there, where it exceeds what survived in the checkpoint, is counted again.
/// Returns how many counters were raised. (Seats, holds and idempotency keys are not
/// in the ledger: those lost with the checkpoint stay lost, and are counted as lost.)
fn heal_checkpoint(
    dir: &Path,
    rec: &mut replay::Recovered,
    checkpoint: &State,
) -> Result<u64, StateError> {
    let events = ledger::events_between(&dir.join("ledger"), 0, rec.checkpoint_lsn)
        .map_err(StateError::Heal)?;
    let mut from_ledger = State::default();
    for (_, v) in &events {
        if let Some(r) = ledger::event_record(v) {
            from_ledger.apply(&r);
        }
    }
    let (counters, units) = rec.state.restore_from_ledger(&from_ledger, checkpoint);
    if counters > 0 {
        tracing::warn!(
            counters,
            units,
            "restored quota counters lost with a damaged checkpoint from the usage ledger"
        );
    }
    Ok(counters)
}

fn journal_bytes(dir: &Path) -> u64 {
    journal::segments(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, p)| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};
    use crate::policy::Limit;
    use crate::time::{HOUR, ManualClock, Timestamp};
    use crate::usage::{IdemKey, MemoryStore, SettleAction, StepMeta};

    const T0: i64 = 1_800_000_000 * crate::time::SECOND;

    fn open(dir: &Path, clock: &Arc<ManualClock>) -> (StateDir, MemoryStore) {
        let (d, s, _) = MemoryStore::open_durable(DurableConfig::new(dir), clock.clone()).unwrap();
        (d, s)
    }

    fn consume<'a>(customer: &'a str, start: i64, amount: u64) -> UsageOp<'a> {
        quota(customer, start, amount, QuotaMode::Consume)
    }

    fn quota<'a>(customer: &'a str, start: i64, amount: u64, mode: QuotaMode) -> UsageOp<'a> {
        UsageOp::Quota {
            key: UsageKey {
                customer,
                feature: "api.calls",
            },
            window_start: Timestamp(start),
            window_end: Timestamp(start + HOUR),
            limit: Limit::Finite(1_000),
            amount,
            mode,
            allow_overage: false,
        }
    }

    fn used(s: &MemoryStore, customer: &str, start: i64) -> u64 {
        let op = quota(customer, start, 1, QuotaMode::Check);
        match s.run(&op, Timestamp(start)) {
            UsageOutcome::Quota { used, .. } => used,
            other => panic!("{other:?}"),
        }
    }

    fn meta(key: Option<&str>) -> StepMeta<'_> {
        StepMeta {
            snapshot: "test",
            idempotency: key.map(|key| IdemKey {
                key,
                fingerprint: 7,
            }),
            ttl_us: None,
        }
    }

    /// Counters, holds, seats and idempotency keys come back after a graceful close
    /// (from the checkpoint) and after a crash (from the journal alone).
    #[test]
    fn state_survives_close_and_crash() {
        for graceful in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let clock = Arc::new(ManualClock::new(Timestamp(T0)));
            let now = Timestamp(T0);
            let (dir, s) = open(tmp.path(), &clock);
            s.step(&consume("acme", T0, 5), &meta(Some("k1")), now)
                .unwrap();
            s.step(&consume("acme", T0, 2), &meta(None), now).unwrap();
            let reserve = quota("acme", T0, 10, QuotaMode::Reserve);
            let (o, _) = s.step(&reserve, &meta(None), now).unwrap();
            let UsageOutcome::Reserved {
                reservation: Some(id),
                ..
            } = o
            else {
                panic!("{o:?}")
            };
            let seat = UsageOp::Seat {
                key: UsageKey {
                    customer: "acme",
                    feature: "seats",
                },
                limit: Limit::Finite(3),
                holder: Some("u1"),
                action: SeatAction::Acquire,
            };
            s.step(&seat, &meta(None), now).unwrap();
            assert_eq!(used(&s, "acme", T0), 17);
            if graceful {
                dir.close().unwrap();
            } else {
                drop(dir);
            }
            drop(s);

            let (dir, s) = open(tmp.path(), &clock);
            assert_eq!(used(&s, "acme", T0), 17, "graceful: {graceful}");
            assert_eq!(s.counts().reservations, 1);
            assert_eq!(s.counts().seat_pools, 1);
            // The retry answers as the first request did and counts nothing.
            let (o, _) = s
                .step(&consume("acme", T0, 5), &meta(Some("k1")), now)
                .unwrap();
            assert_eq!(
                o,
                UsageOutcome::Quota {
                    admitted: true,
                    used: 5,
                    used_before: 0
                }
            );
            let (settled, _) = s
                .settle(id, SettleAction::Commit(4), &meta(None), now)
                .unwrap();
            assert!(settled.outcome.found);
            assert_eq!(used(&s, "acme", T0), 11);
            dir.close().unwrap();
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        let mut n = 0;
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            n += if m.is_dir() {
                disk_bytes(&e.path())
            } else {
                m.len()
            };
        }
        n
    }

    /// A million distinct customers across ten hourly windows, with the clock moving
    /// past each window: live counters stay at one window's worth, and so does the
    /// state on disk (the ledger is retained by its own setting and measured apart).
    #[test]
    fn a_million_customers_across_windows_stay_bounded() {
        const PER_WINDOW: usize = 100_000;
        let tmp = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp(T0)));
        let (dir, s) = open(tmp.path(), &clock);
        let names: Vec<String> = (0..PER_WINDOW * 10).map(|i| format!("c{i}")).collect();
        let mut peak_disk = 0;
        for w in 0..10 {
            let start = T0 + w as i64 * HOUR;
            clock.set(Timestamp(start));
            let m = meta(None);
            for c in &names[w * PER_WINDOW..(w + 1) * PER_WINDOW] {
                s.step(&consume(c, start, 1), &m, Timestamp(start)).unwrap();
            }
            // The window is over: memory compaction and a checkpoint drop it.
            clock.set(Timestamp(start + HOUR));
            s.compact(clock.now());
            dir.checkpoint().unwrap();
            let counts = s.counts();
            assert_eq!(counts.quota_counters, 0, "window {w}");
            let state_bytes = disk_bytes(tmp.path()) - disk_bytes(&tmp.path().join("ledger"));
            peak_disk = peak_disk.max(state_bytes);
        }
        // One window's journal is ~7 MB; ten windows unpruned would be ten times that.
        assert!(
            peak_disk < 16 << 20,
            "state on disk peaked at {peak_disk} bytes"
        );
        let ckpts = checkpoint::checkpoints(tmp.path()).unwrap();
        assert_eq!(ckpts.len(), 1);
        dir.close().unwrap();
    }

    /// `--durability sync` on a disk that refuses every write: each refused step is
    /// taken back before it is answered, so nothing counts in memory (counters,
    /// reservations, seats), and an idempotency key does not answer a retry with the
    /// refused answer.
    #[test]
    fn a_refused_sync_write_counts_nothing_in_memory() {
        use crate::usage::UsageStore;
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", tmp.path().join(journal::segment_name(1))).unwrap();
        let ledger = Ledger::open(
            &tmp.path().join("ledger"),
            "test".into(),
            LedgerConfig::default(),
        )
        .unwrap();
        let config = JournalConfig {
            durability: journal::Durability::Sync,
            ..JournalConfig::default()
        };
        let j = Journal::start(tmp.path(), 1, config, ledger).unwrap();
        let s = MemoryStore::with_journal(Some(Arc::new(j)), StoreConfig::default());
        let now = Timestamp(T0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let refused = |op: &UsageOp<'_>, key: Option<&str>| {
            let r = rt.block_on(UsageStore::apply(&s, op, &meta(key), now));
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        };
        for _ in 0..2 {
            refused(&consume("acme", T0, 5), Some("k1"));
            assert_eq!(used(&s, "acme", T0), 0);
        }
        refused(&quota("acme", T0, 10, QuotaMode::Reserve), None);
        assert_eq!(used(&s, "acme", T0), 0);
        assert_eq!(s.counts().reservations, 0);
        let seat = |action| UsageOp::Seat {
            key: UsageKey {
                customer: "acme",
                feature: "seats",
            },
            limit: Limit::Finite(1),
            holder: Some("u1"),
            action,
        };
        refused(&seat(SeatAction::Acquire), None);
        match s.run(&seat(SeatAction::Check), now) {
            UsageOutcome::Seat { used, .. } => assert_eq!(used, 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.counts().idempotency_keys, 0);
    }
}
