//! Hot reload: watch the policy directory, debounce, compile off the request path,
//! swap atomically, keep the last good snapshot on any error.
//!
//! A dedicated thread owns all of it, so compiling a million customers never occupies
//! an async worker. Events come from `notify` on the directory itself (not on files:
//! editors replace files by rename, and a Kubernetes ConfigMap swaps its `..data`
//! symlink to a new timestamped folder), and a periodic rescan compares file
//! fingerprints for filesystems that lose events. A burst of events (100 writes)
//! collapses into one reload once the directory has been quiet for the debounce
//! interval; a reload that yields the version already served swaps nothing.
//!
//! Each new snapshot is published to the [`Subscriber`]s the sidecar wires in (the
//! audit log, renewal notices); this module knows none of them.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};

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
    /// Told of every snapshot change.
    pub subscribers: Vec<Subscriber>,
}

/// What `/v1/status` and `/readyz` report about loading.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub version: Option<String>,
    pub loaded_at: Option<Timestamp>,
    /// Successful loads that changed the snapshot.
    pub generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_error: Option<LastError>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    pub at: Timestamp,
    pub errors: Vec<String>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Shared between the reload thread and the server.
#[derive(Debug, Default)]
pub struct ReloadState {
    status: Mutex<Status>,
    /// Bumped whenever the reloader finishes an attempt (tests and operators can wait
    /// for "the reloader has looked at my change").
    attempts: AtomicU64,
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

    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
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
                if let Ok(m) = std::fs::metadata(&f.abs) {
                    m.len().hash(&mut h);
                    m.modified().ok().hash(&mut h);
                    std::os::unix::fs::MetadataExt::ino(&m).hash(&mut h);
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
    _watcher: Option<notify::RecommendedWatcher>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
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
    cell: SnapshotCell,
    state: Arc<ReloadState>,
) -> std::io::Result<Reloader> {
    let (tx, rx) = mpsc::channel::<()>();
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
        state,
        last_fingerprint: 0,
        retired: Vec::new(),
    };
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
        _watcher: Some(watcher),
        thread: Some(thread),
    })
}

struct Worker {
    config: ReloadConfig,
    cell: SnapshotCell,
    state: Arc<ReloadState>,
    last_fingerprint: u64,
    /// Superseded snapshots, dropped here once no request thread holds them: freeing
    /// a million customers takes milliseconds, and must not land on a request.
    retired: Vec<Arc<Snapshot>>,
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
            let until_rescan = next_rescan.saturating_duration_since(Instant::now());
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
                    if Instant::now() >= next_rescan {
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

    fn reload(&mut self) {
        self.last_fingerprint = fingerprint(&self.config.dir);
        let now = Timestamp::now();
        match policy::load_dir(&self.config.dir, &self.config.limits) {
            Ok(snap) => {
                let previous = self.cell.load_full();
                let prev_version = previous.as_ref().map(|p| p.version.to_string());
                if prev_version.as_deref() == Some(&*snap.version) {
                    // Same content (a touch, an editor's save of identical bytes, a
                    // broken change reverted): nothing to swap, but the load succeeded,
                    // and an error it clears is said.
                    let mut cleared = false;
                    self.state.update(|s| {
                        s.reloads_ok += 1;
                        cleared = s.last_error.take().is_some();
                    });
                    crate::metrics::reload("success");
                    crate::metrics::reload_succeeded(now);
                    if cleared {
                        tracing::info!(version = %snap.version, "policy error cleared: the files load again (the served snapshot is unchanged)");
                    }
                    return;
                }
                let snap = Arc::new(snap);
                crate::metrics::snapshot_served(&snap, prev_version.as_deref(), now);
                let change = SnapshotChange {
                    snapshot: &snap,
                    previous: previous.as_deref(),
                    at: now,
                };
                for s in &self.config.subscribers {
                    if let Subscriber::BeforeSwap(tell) = s {
                        tell(&change);
                    }
                }
                crate::metrics::reload("success");
                tracing::info!(version = %snap.version, customers = snap.customers.len(), "policy snapshot loaded");
                // Published under the status lock, so `/v1/status` never pairs this
                // snapshot with the previous one's generation (this thread runs at the
                // lowest priority and can be preempted between the two for long).
                self.state.update(|s| {
                    self.cell.store(snap.clone());
                    s.version = Some(snap.version.to_string());
                    s.loaded_at = Some(now);
                    s.generation += 1;
                    s.reloads_ok += 1;
                    s.last_error = None;
                });
                for s in &self.config.subscribers {
                    if let Subscriber::AfterSwap(tell) = s {
                        tell(&change);
                    }
                }
                // Request threads drop their cached reference on their next read;
                // the last reference (and the freeing) stays on this thread.
                self.retired.extend(previous);
            }
            Err(e) => {
                crate::metrics::reload("failure");
                let errors: Vec<String> = e.diagnostics.iter().map(|d| d.to_string()).collect();
                tracing::warn!(errors = errors.len(), first = %errors.first().map(String::as_str).unwrap_or(""), "policy reload failed; still serving the last good snapshot");
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

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
            subscribers: vec![
                Subscriber::AfterSwap(tell("after")),
                Subscriber::BeforeSwap(tell("before")),
            ],
        };
        // The first load happens before `start` returns.
        let reloader = start(config, cell.clone(), Arc::new(ReloadState::default())).unwrap();
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
