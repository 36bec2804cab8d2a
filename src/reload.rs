//! Hot reload: watch the policy directory, debounce, compile off the request path,
//! swap atomically, keep the last good snapshot on any error.
//!
//! A dedicated thread owns all of it, so compiling a million customers never occupies
//! an async worker. Events come from `notify` on the directory itself (not on files:
//! editors replace files by rename, and a Kubernetes ConfigMap swaps its `..data`
//! symlink to a new timestamped folder), and a periodic rescan compares file
//! fingerprints for filesystems that lose events. A burst of events (100 writes)
//! collapses into one reload once the directory has been quiet for the debounce
//! interval; a reload that yields the version already served swaps nothing. A reload
//! that finds only customer files changed reads just those and applies the records
//! that differ ([`policy::incremental`]); anything else loads the whole directory.
//!
//! A loaded snapshot is served through the [`Publisher`], which puts the customer
//! records written through the API on top of it (and never lets a reload and a
//! write interleave). Each new snapshot is published to the [`Subscriber`]s the sidecar wires in (the
//! audit log, renewal notices); this module knows none of them.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};

use crate::live::Publisher;
use crate::policy::incremental::{self, FileIndex};
use crate::policy::{self, Diagnostic, Limits, Snapshot};
use crate::snapshot_cell::SnapshotCell;
use crate::time::Timestamp;

/// A snapshot about to be served, or just served, and the one it replaces.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotChange<'a> {
    pub snapshot: &'a Snapshot,
    pub previous: Option<&'a Snapshot>,
    /// When it was loaded.
    pub at: Timestamp,
}

type Tell = Box<dyn Fn(&SnapshotChange<'_>) + Send + Sync>;

/// Told of every snapshot change, on the reload thread, either side of the swap.
pub enum Subscriber {
    /// Told before requests can see the new snapshot, so what it records comes before
    /// anything decided on it (the audit log's snapshot record).
    BeforeSwap(Tell),
    /// Told once requests see the new snapshot (and `/v1/status` reports it), for work
    /// that reads the served snapshot (renewal notices scan it).
    AfterSwap(Tell),
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Subscriber::BeforeSwap(_) => "BeforeSwap(..)",
            Subscriber::AfterSwap(_) => "AfterSwap(..)",
        })
    }
}

#[derive(Debug)]
pub struct ReloadConfig {
    pub dir: PathBuf,
    pub limits: Limits,
    /// Quiet time after the last event before compiling.
    pub debounce: Duration,
    /// The longest a steady stream of events can postpone a reload.
    pub max_delay: Duration,
    /// Full rescan interval (file fingerprints), for filesystems that lose events.
    pub rescan: Duration,
    /// How long a held load must stay unchanged on disk before it is served.
    pub settle: Duration,
    /// Serve a load that removes most customers at once without holding it.
    pub allow_mass_removal: bool,
    /// Serve a policy set that defines no features.
    pub allow_empty: bool,
    /// Told of every snapshot change.
    pub subscribers: Vec<Subscriber>,
}

/// A load that removes more than half of the served customers, and at least this
/// many, is held (see [`Held`]).
pub const MASS_REMOVAL_MIN: usize = 100;

/// What `/v1/status` and `/readyz` report about loading.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub version: Option<String>,
    pub loaded_at: Option<Timestamp>,
    /// Successful loads that changed the snapshot.
    pub generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Loads held back (see [`Held`]).
    pub reloads_held: u64,
    pub last_error: Option<LastError>,
    /// A load that is not served yet: the last snapshot keeps serving.
    pub held: Option<Held>,
    /// How the last load that read the files went about it.
    pub last_load: Option<LoadPath>,
}

/// How a load read the policy directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadPath {
    /// `incremental`: only changed customer files were read and applied to the
    /// customer table; `full`: every file was read and compiled.
    pub path: &'static str,
    /// Files read.
    pub files_read: usize,
    /// Why a load was full when the incremental path was tried.
    pub fallback: Option<&'static str>,
}

/// A load, with what the next incremental load starts from.
struct Loaded {
    snap: Snapshot,
    index: FileIndex,
    path: LoadPath,
    /// Customers it removes, when known without comparing the tables.
    removed: Option<usize>,
}

/// A load held back because it removes most customers at once, which is what a policy
/// file seen half-written looks like. It is served once the files have stayed
/// unchanged for the settle time, or at once when an operator confirms (SIGHUP).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Held {
    /// The version loaded and not served.
    pub version: String,
    pub since: Timestamp,
    pub customers_served: usize,
    pub customers_loaded: usize,
    /// Served customers the held version does not have.
    pub customers_removed: usize,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    pub at: Timestamp,
    pub errors: Vec<String>,
    pub diagnostics: Vec<Diagnostic>,
}

/// How many load attempts [`ReloadState::history`] keeps.
pub const HISTORY: usize = 32;
/// How many of a failed load's errors its history entry keeps.
const HISTORY_ERRORS: usize = 20;

/// One load attempt as the operator console lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub at: Timestamp,
    /// `loaded` (a new snapshot served), `unchanged`, `failed` or `held`.
    pub outcome: &'static str,
    /// The version served or held.
    pub version: Option<String>,
    /// A failed load's errors (`file:line:col: message`), the first few.
    pub errors: Vec<String>,
    /// How many errors the load had in all.
    pub error_count: usize,
}

/// Shared between the reload thread and the server.
#[derive(Debug, Default)]
pub struct ReloadState {
    status: Mutex<Status>,
    /// The last [`HISTORY`] load attempts, oldest first: the status keeps only the
    /// last error, and clears it on success.
    history: Mutex<std::collections::VecDeque<Attempt>>,
    /// Bumped whenever the reloader finishes an attempt (tests and operators can wait
    /// for "the reloader has looked at my change").
    attempts: AtomicU64,
    /// Set by an operator's confirmation (SIGHUP): the next load is served even if it
    /// removes most customers.
    confirmed: AtomicBool,
    /// Wakes the reloader (set once it runs).
    wake: Mutex<Option<mpsc::Sender<()>>>,
}

impl ReloadState {
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The status and whatever `f` reads, together: a snapshot is published under the
    /// same lock, so reading the served snapshot in `f` agrees with the status.
    pub fn observe<T>(&self, f: impl FnOnce() -> T) -> (Status, T) {
        match self.status.lock() {
            Ok(s) => (s.clone(), f()),
            Err(_) => (Status::default(), f()),
        }
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// An operator's confirmation: load the directory now and serve it even if it
    /// removes most customers (a held load is released).
    pub fn confirm(&self) {
        self.confirmed.store(true, Ordering::Release);
        if let Ok(wake) = self.wake.lock()
            && let Some(tx) = &*wake
        {
            let _ = tx.send(());
        }
    }

    /// The last load attempts, newest first.
    pub fn history(&self) -> Vec<Attempt> {
        self.history
            .lock()
            .map(|h| h.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    fn remember(&self, a: Attempt) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() >= HISTORY {
                h.pop_front();
            }
            h.push_back(a);
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        self.update_quietly(f);
        self.attempts.fetch_add(1, Ordering::AcqRel);
    }

    /// As `update`, without counting an attempt (the attempt's outcome follows).
    fn update_quietly(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

/// Whether a filesystem event can change the policy set. Access events and files that
/// are neither policy files nor directories (editor swap files, `*.bak`) cannot.
/// Names starting with `..` are Kubernetes' atomic-update machinery and always count.
pub fn is_relevant(event: &notify::Event) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    if event.paths.is_empty() {
        return true;
    }
    event.paths.iter().any(|p| {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            return true;
        };
        if name.starts_with("..") {
            return true;
        }
        if name.starts_with('.') {
            return false;
        }
        match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some(ext) => matches!(ext, "yaml" | "yml" | "json" | "ndjson"),
            // Directories (and extension-less names) may hold policy files.
            None => true,
        }
    })
}

/// A cheap fingerprint of the policy files: paths, sizes, modification times, inodes.
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match policy::source::discover(dir) {
        Ok(files) => {
            for f in files {
                f.rel.hash(&mut h);
                if let Ok(stamp) = crate::files::Stamp::of(&f.abs) {
                    stamp.hash(&mut h);
                }
            }
        }
        Err(e) => e.message.hash(&mut h),
    }
    h.finish()
}

/// The running reloader. Dropping it stops the thread.
#[derive(Debug)]
pub struct Reloader {
    stop: Arc<AtomicBool>,
    /// Holds a sender of the reloader's channel (`confirm`), dropped with the watcher
    /// so that the channel closes and wakes the thread at once.
    state: Arc<ReloadState>,
    _watcher: Option<notify::RecommendedWatcher>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(mut wake) = self.state.wake.lock() {
            wake.take();
        }
        self._watcher.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loads the directory once now (so the first snapshot is there before the server
/// answers, when the policy is good), then watches it.
pub fn start(
    config: ReloadConfig,
    publisher: Arc<Publisher>,
    state: Arc<ReloadState>,
) -> std::io::Result<Reloader> {
    let cell = publisher.cell().clone();
    let (tx, rx) = mpsc::channel::<()>();
    if let Ok(mut wake) = state.wake.lock() {
        *wake = Some(tx.clone());
    }
    let wake_state = state.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if is_relevant(&ev) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            // An overflowed or failed watch: rescan to be safe.
            Err(_) => {
                let _ = tx.send(());
            }
        })
        .map_err(std::io::Error::other)?;
    watcher
        .watch(&config.dir, RecursiveMode::Recursive)
        .map_err(std::io::Error::other)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        config,
        cell,
        publisher,
        state,
        last_fingerprint: 0,
        index: None,
        retired: Vec::new(),
        pending: None,
        retry_at: None,
    };
    crate::metrics::reload_held(false);
    worker.reload();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("entitled-reload".into())
        .spawn(move || {
            // Lowest priority: on a small machine a large compile would otherwise take
            // CPU from the request workers and show up as tail latency. Threads spawned
            // from here (parsing in parallel) inherit it. Failing to lower it is harmless.
            let _ =
                thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
            worker.run(&rx, &stop2)
        })?;
    Ok(Reloader {
        stop,
        state: wake_state,
        _watcher: Some(watcher),
        thread: Some(thread),
    })
}

struct Worker {
    config: ReloadConfig,
    cell: SnapshotCell,
    /// Serves what is loaded, with the API-written records on top.
    publisher: Arc<Publisher>,
    state: Arc<ReloadState>,
    last_fingerprint: u64,
    /// What the served files snapshot was loaded from, for the next incremental load.
    index: Option<FileIndex>,
    /// Superseded snapshots, dropped here once no request thread holds them: freeing
    /// a million customers takes milliseconds, and must not land on a request.
    retired: Vec<Arc<Snapshot>>,
    /// The load being held, until the files settle.
    pending: Option<Pending>,
    /// When to look again without an event: files that changed while they were read,
    /// or a held load whose settle time ends.
    retry_at: Option<Instant>,
}

/// A held load: what was loaded, from which files, since when.
struct Pending {
    version: Box<str>,
    fingerprint: u64,
    since: Instant,
}

impl Worker {
    fn run(&mut self, rx: &mpsc::Receiver<()>, stop: &AtomicBool) {
        // While a superseded snapshot waits to be freed, look for it after a tick,
        // doubling; otherwise sleep until the next rescan (an idle sidecar wakes twice a
        // minute). Stopping drops the watcher, and with it the sender: that wakes the
        // wait at once.
        let tick = Duration::from_millis(200).min(self.config.rescan);
        let mut next_rescan = Instant::now() + self.config.rescan;
        // A worker thread that sees no request keeps its cached reference to the old
        // snapshot until its next one: look again after a tick, then less and less often.
        let mut free_wait = tick;
        while !stop.load(Ordering::Acquire) {
            self.retired.retain(|s| Arc::strong_count(s) > 1);
            let mut until_rescan = next_rescan.saturating_duration_since(Instant::now());
            if let Some(at) = self.retry_at {
                until_rescan = until_rescan.min(at.saturating_duration_since(Instant::now()));
            }
            let wait = if self.retired.is_empty() {
                until_rescan
            } else {
                let w = free_wait.min(until_rescan);
                free_wait = (free_wait * 2).min(self.config.rescan);
                w
            };
            match rx.recv_timeout(wait) {
                Ok(()) => {
                    self.debounce(rx, stop);
                    self.reload();
                    free_wait = tick;
                    next_rescan = Instant::now() + self.config.rescan;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.retry_at.is_some_and(|at| Instant::now() >= at) {
                        self.reload();
                        free_wait = tick;
                    } else if Instant::now() >= next_rescan {
                        next_rescan = Instant::now() + self.config.rescan;
                        if fingerprint(&self.config.dir) != self.last_fingerprint {
                            self.reload();
                            free_wait = tick;
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Waits until no event has arrived for `debounce`, or `max_delay` has passed.
    fn debounce(&self, rx: &mpsc::Receiver<()>, stop: &AtomicBool) {
        let deadline = Instant::now() + self.config.max_delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stop.load(Ordering::Acquire) {
                return;
            }
            match rx.recv_timeout(self.config.debounce.min(left)) {
                Ok(()) => continue,
                Err(_) => return,
            }
        }
    }

    /// Loads the directory, unless its files change while they are read: then it
    /// looks again after a quiet period (a file being written is never compiled).
    fn reload(&mut self) {
        self.retry_at = None;
        let confirmed = self.state.confirmed.swap(false, Ordering::AcqRel);
        let before = fingerprint(&self.config.dir);
        let now = Timestamp::now();
        let started = Instant::now();
        let loaded = self.load();
        let after = fingerprint(&self.config.dir);
        self.last_fingerprint = after;
        if before != after {
            tracing::debug!(
                "policy files changed while they were read; looking again once they are quiet"
            );
            if confirmed {
                self.state.confirmed.store(true, Ordering::Release);
            }
            self.retry_at = Some(Instant::now() + self.config.debounce);
            return;
        }
        match loaded {
            Ok(loaded) => {
                let p = &loaded.path;
                crate::metrics::reload_path(p.path, p.files_read);
                tracing::info!(path = p.path, files_read = p.files_read, fallback = p.fallback.unwrap_or(""), version = %loaded.snap.version, took_ms = started.elapsed().as_millis() as u64, "policy directory loaded");
                self.state
                    .update_quietly(|s| s.last_load = Some(loaded.path.clone()));
                self.loaded(loaded, after, confirmed, now)
            }
            Err(e) => self.failed(e, now),
        }
    }

    /// Reads the changed customer files only, when that is all that changed since the
    /// served files snapshot was loaded; otherwise the whole directory.
    fn load(&self) -> Result<Loaded, policy::LoadError> {
        let (dir, limits) = (&self.config.dir, &self.config.limits);
        let mut fallback = None;
        if let (Some(index), Some(files)) = (&self.index, self.publisher.files()) {
            match incremental::apply_changes(dir, limits, index, &files) {
                Ok(a) => {
                    return Ok(Loaded {
                        snap: a.snapshot,
                        index: a.index,
                        path: LoadPath {
                            path: "incremental",
                            files_read: a.files_read,
                            fallback: None,
                        },
                        removed: Some(a.removed),
                    });
                }
                Err(why) => fallback = Some(why),
            }
        }
        let (snap, index) = incremental::load_dir_indexed(dir, limits)?;
        if !self.config.allow_empty {
            policy::require_features(dir, &snap)?;
        }
        let files_read = snap.files.len();
        Ok(Loaded {
            snap,
            index,
            path: LoadPath {
                path: "full",
                files_read,
                fallback,
            },
            removed: None,
        })
    }

    fn loaded(&mut self, loaded: Loaded, fingerprint: u64, confirmed: bool, now: Timestamp) {
        let Loaded {
            snap,
            index,
            removed,
            ..
        } = loaded;
        // Compared with the last snapshot of the files alone: API-written records
        // are neither a change of the files nor customers the files removed.
        let previous = self.publisher.files();
        if previous.as_ref().map(|p| &p.version) == Some(&snap.version) {
            // The same content: the index is as good, with the files' current stats.
            self.index = Some(index);
            return self.unchanged(&snap, now);
        }
        if let Some(prev) = &previous {
            let removed = removed.unwrap_or_else(|| removed_customers(prev, &snap));
            if let Some(held) = self.hold_reason(prev, &snap, removed, fingerprint, confirmed, now)
            {
                return self.hold(held, fingerprint);
            }
        }
        if self.pending.take().is_some() {
            tracing::info!(version = %snap.version, confirmed, "held policy load released");
            crate::metrics::reload_held(false);
        }
        if self.serve(Arc::new(snap), now) {
            self.index = Some(index);
        }
    }

    /// Same content (a touch, an editor's save of identical bytes, a broken change
    /// reverted, a held change undone): nothing to swap, but the load succeeded, and an
    /// error or a hold it clears is said.
    fn unchanged(&mut self, snap: &Snapshot, now: Timestamp) {
        let mut cleared = false;
        let released = self.pending.take().is_some();
        self.state.update(|s| {
            s.reloads_ok += 1;
            cleared = s.last_error.take().is_some();
            s.held = None;
        });
        self.state.remember(Attempt {
            at: now,
            outcome: "unchanged",
            version: Some(snap.version.to_string()),
            errors: Vec::new(),
            error_count: 0,
        });
        crate::metrics::reload("success");
        crate::metrics::reload_succeeded(now);
        if released {
            crate::metrics::reload_held(false);
            tracing::info!(version = %snap.version, "held policy load dropped: the files are back to the served version");
        }
        if cleared {
            tracing::info!(version = %snap.version, "policy error cleared: the files load again (the served snapshot is unchanged)");
        }
    }

    /// Why `snap` must not be served yet, if so: it removes most of the served
    /// customers, or it follows such a load before the files have settled. A load is
    /// served once the same files have stayed unchanged for the settle time.
    fn hold_reason(
        &self,
        prev: &Snapshot,
        snap: &Snapshot,
        removed: usize,
        fingerprint: u64,
        confirmed: bool,
        now: Timestamp,
    ) -> Option<Held> {
        if confirmed || self.config.allow_mass_removal {
            return None;
        }
        let settled = self.pending.as_ref().is_some_and(|p| {
            p.version == snap.version
                && p.fingerprint == fingerprint
                && p.since.elapsed() >= self.config.settle
        });
        if settled {
            return None;
        }
        let reason = if removed > prev.customers.len() / 2 && removed >= MASS_REMOVAL_MIN {
            format!(
                "the load removes {removed} of {} customers at once; held until the files stay unchanged for {:?}, or confirmed with SIGHUP",
                prev.customers.len(),
                self.config.settle
            )
        } else if self.pending.is_some() {
            format!(
                "the files are still changing after a load that removed most customers; held until they stay unchanged for {:?}, or confirmed with SIGHUP",
                self.config.settle
            )
        } else {
            return None;
        };
        Some(Held {
            version: snap.version.to_string(),
            since: now,
            customers_served: prev.customers.len(),
            customers_loaded: snap.customers.len(),
            customers_removed: removed,
            reason,
        })
    }

    fn hold(&mut self, held: Held, fingerprint: u64) {
        let same = self
            .pending
            .as_ref()
            .is_some_and(|p| *p.version == *held.version && p.fingerprint == fingerprint);
        if !same {
            tracing::warn!(version = %held.version, served = held.customers_served, loaded = held.customers_loaded, "policy load held: {}", held.reason);
            self.pending = Some(Pending {
                version: held.version.as_str().into(),
                fingerprint,
                since: Instant::now(),
            });
        }
        let since = self.pending.as_ref().map_or_else(Instant::now, |p| p.since);
        self.retry_at = Some(since + self.config.settle);
        crate::metrics::reload("held");
        crate::metrics::reload_held(true);
        if !same {
            self.state.remember(Attempt {
                at: held.since,
                outcome: "held",
                version: Some(held.version.clone()),
                errors: vec![held.reason.clone()],
                error_count: 0,
            });
        }
        self.state.update(|s| {
            s.reloads_held += 1;
            s.held = Some(match s.held.take() {
                Some(h) if same => h,
                _ => held,
            });
        });
    }

    /// Serves `files`; whether it is served (it is not when an API-written record
    /// does not compile against it).
    fn serve(&mut self, files: Arc<Snapshot>, now: Timestamp) -> bool {
        let previous = self.cell.load_full();
        let prev_version = previous.as_ref().map(|p| p.version.to_string());
        let (state, cell, subscribers) = (&self.state, &self.cell, &self.config.subscribers);
        // Composed with the API-written records and swapped in under the publisher's
        // lock, so no write interleaves.
        let stored = self.publisher.publish_files(files, |snap| {
            crate::metrics::snapshot_served(snap, prev_version.as_deref(), now);
            let change = SnapshotChange {
                snapshot: snap,
                previous: previous.as_deref(),
                at: now,
            };
            for s in subscribers {
                if let Subscriber::BeforeSwap(tell) = s {
                    tell(&change);
                }
            }
            // Published under the status lock, so `/v1/status` never pairs this
            // snapshot with the previous one's generation (this thread runs at the
            // lowest priority and can be preempted between the two for long).
            state.update(|s| {
                cell.store(snap.clone());
                s.version = Some(snap.version.to_string());
                s.loaded_at = Some(now);
                s.generation += 1;
                s.reloads_ok += 1;
                s.last_error = None;
                s.held = None;
            });
        });
        let snap = match stored {
            Ok(snap) => snap,
            Err(errors) => {
                self.overlay_failed(errors, now);
                return false;
            }
        };
        crate::metrics::reload("success");
        self.state.remember(Attempt {
            at: now,
            outcome: "loaded",
            version: Some(snap.version.to_string()),
            errors: Vec::new(),
            error_count: 0,
        });
        tracing::info!(version = %snap.version, customers = snap.customers.len(), "policy snapshot loaded");
        let change = SnapshotChange {
            snapshot: &snap,
            previous: previous.as_deref(),
            at: now,
        };
        for s in subscribers {
            if let Subscriber::AfterSwap(tell) = s {
                tell(&change);
            }
        }
        // Request threads drop their cached reference on their next read;
        // the last reference (and the freeing) stays on this thread.
        self.retired.extend(previous);
        true
    }

    /// The files loaded, but an API-written record does not compile against them.
    fn overlay_failed(&mut self, errors: Vec<String>, now: Timestamp) {
        let diagnostics = errors
            .iter()
            .map(|e| Diagnostic::at_path(&self.config.dir, e.clone()))
            .collect();
        self.failed(policy::LoadError { diagnostics }, now);
    }

    fn failed(&mut self, e: policy::LoadError, now: Timestamp) {
        crate::metrics::reload("failure");
        let errors: Vec<String> = e.diagnostics.iter().map(|d| d.to_string()).collect();
        tracing::warn!(errors = errors.len(), first = %errors.first().map(String::as_str).unwrap_or(""), "policy reload failed; still serving the last good snapshot");
        self.state.remember(Attempt {
            at: now,
            outcome: "failed",
            version: None,
            errors: errors.iter().take(HISTORY_ERRORS).cloned().collect(),
            error_count: errors.len(),
        });
        self.state.update(|s| {
            s.reloads_failed += 1;
            s.last_error = Some(LastError {
                at: now,
                errors,
                diagnostics: e.diagnostics,
            });
        });
    }
}

/// How many of `prev`'s customers `snap` does not have.
fn removed_customers(prev: &Snapshot, snap: &Snapshot) -> usize {
    if prev.customers.len() < MASS_REMOVAL_MIN {
        return prev.customers.len().saturating_sub(snap.customers.len());
    }
    prev.customers
        .iter()
        .filter(|c| snap.customers.get(c.id).is_none())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

    /// The console's reload history keeps the last [`HISTORY`] attempts, newest first.
    #[test]
    fn the_history_is_bounded_and_newest_first() {
        let state = ReloadState::default();
        for i in 0..(HISTORY as i64 + 8) {
            state.remember(Attempt {
                at: Timestamp(i),
                outcome: if i % 2 == 0 { "loaded" } else { "failed" },
                version: None,
                errors: Vec::new(),
                error_count: 0,
            });
        }
        let h = state.history();
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0].at, Timestamp(HISTORY as i64 + 7));
        assert_eq!(h[HISTORY - 1].at, Timestamp(8));
    }

    fn ev(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn filter_keeps_policy_files_dirs_and_configmap_swaps() {
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(is_relevant(&ev(modify, "/p/plans.yaml")));
        assert!(is_relevant(&ev(modify, "/p/bulk.ndjson")));
        assert!(is_relevant(&ev(
            EventKind::Create(CreateKind::Folder),
            "/p/new-team"
        )));
        assert!(is_relevant(&ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "/p/..data"
        )));
        assert!(!is_relevant(&ev(modify, "/p/.plans.yaml.swp")));
        assert!(!is_relevant(&ev(modify, "/p/notes.txt")));
        assert!(!is_relevant(&ev(modify, "/p/plans.yaml~")));
        assert!(!is_relevant(&ev(
            EventKind::Access(AccessKind::Any),
            "/p/plans.yaml"
        )));
    }

    #[test]
    fn subscribers_are_told_either_side_of_the_swap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "features:\n  f: { kind: flag }\n",
        )
        .unwrap();
        let cell = SnapshotCell::new();
        // (when, the version told, the version served at that moment)
        type Seen = Vec<(&'static str, String, Option<String>)>;
        let seen = Arc::new(Mutex::new(Seen::new()));
        let tell = |when: &'static str| -> Tell {
            let (seen, cell) = (seen.clone(), cell.clone());
            Box::new(move |c: &SnapshotChange<'_>| {
                let served = cell.load_full().map(|s| s.version.to_string());
                let told = c.snapshot.version.to_string();
                seen.lock().unwrap().push((when, told, served));
            })
        };
        let config = ReloadConfig {
            dir: dir.path().to_path_buf(),
            limits: Limits::default(),
            debounce: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            rescan: Duration::from_secs(60),
            settle: Duration::from_secs(30),
            allow_mass_removal: false,
            allow_empty: false,
            subscribers: vec![
                Subscriber::AfterSwap(tell("after")),
                Subscriber::BeforeSwap(tell("before")),
            ],
        };
        // The first load happens before `start` returns.
        let publisher = Arc::new(Publisher::new(cell.clone()));
        let reloader = start(config, publisher, Arc::new(ReloadState::default())).unwrap();
        drop(reloader);
        let version = cell.load_full().unwrap().version.to_string();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("before", version.clone(), None),
                ("after", version.clone(), Some(version)),
            ]
        );
    }

    #[test]
    fn fingerprint_changes_with_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "features: {}\n").unwrap();
        let a = fingerprint(dir.path());
        std::fs::write(dir.path().join("a.yaml"), "features: {}\n# more\n").unwrap();
        assert_ne!(a, fingerprint(dir.path()));
    }
}
