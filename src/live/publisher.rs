//! The one way a snapshot is published: policy reloads and customer writes both go
//! through [`Publisher`], under one mutex, so they never interleave.
//!
//! The publisher keeps the last snapshot compiled from the files alone and the
//! overlay of API-written records (id → record or tombstone). A reload publishes the
//! new files snapshot with the whole overlay applied on top; a write publishes the
//! latest snapshot with that one change applied. Either way only the customer shards
//! the change touches are rebuilt ([`update_customers`]).
//!
//! A write is compiled and journaled under the mutex (microseconds), then waits for
//! its sync outside it, so concurrent writes share one sync (group commit). Snapshots
//! staged that way are published in revision order once the journal holds them: a
//! check never sees a write that a crash could still take back. If the journal fails,
//! every staged write is undone and refused.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::journal::{Entry, JournalError, Op, RecordLog, Replayed};
use super::record::{self, Problem};
use crate::policy::compile::{Change, Issue, update_customers};
use crate::policy::source::{Origin, path_to_string};
use crate::policy::{Snapshot, raw};
use crate::snapshot_cell::SnapshotCell;
use crate::time::Timestamp;

/// An API-written record, or a tombstone (`record: None`) that hides the id.
#[derive(Debug, Clone)]
pub struct Written {
    pub record: Option<Arc<raw::Customer>>,
    /// The record as written (JSON), for reading back and exporting.
    pub json: Option<Arc<Value>>,
    pub revision: u64,
    pub by: Arc<str>,
    pub at: Timestamp,
}

/// A change asked for through the API.
#[derive(Debug)]
pub enum Write {
    Put {
        record: raw::Customer,
        json: Value,
    },
    /// A tombstone: the id is gone, whatever the files say.
    Delete {
        id: String,
    },
    /// The API record (or tombstone) dropped: the files' record serves again.
    Forget {
        id: String,
    },
}

impl Write {
    pub fn id(&self) -> &str {
        match self {
            Write::Put { record, .. } => &record.id,
            Write::Delete { id } | Write::Forget { id } => id,
        }
    }

    /// The change to the customer table; a forget restores the record of `files`
    /// (the table compiled from the policy files alone).
    fn change<'a>(&'a self, files: &'a crate::policy::customers::Customers) -> Change<'a> {
        match self {
            Write::Put { record, .. } => Change::Set {
                record,
                file: 0,
                origin: Origin::Line { line: 0 },
            },
            Write::Delete { id } => Change::Remove(id),
            Write::Forget { id } => Change::Restore { id, from: files },
        }
    }
}

/// Why a write was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no policy snapshot loaded yet")]
    NotReady,
    #[error("the record has problems")]
    Invalid(Vec<Problem>),
    #[error("customer writes are disabled: {0}")]
    Disabled(String),
    /// The record changed since it was read (see [`Base`]).
    #[error("the record changed since it was read")]
    Changed,
    /// A forget of an id the API never wrote (or already forgot).
    #[error("no record written through the API")]
    NoApiRecord,
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// The record a write was built on, checked under the lock (read-modify-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// No API record: the files' record (or none).
    Files,
    /// The API record (or tombstone) of this revision.
    Api(u64),
}

/// The overlay's counts, for `/v1/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// The last write applied (and the revision decisions see).
    pub revision: u64,
    /// Customers whose record comes from the API.
    pub api_records: usize,
    /// Of those, how many replace a record the files define.
    pub shadowing_files: usize,
    /// Deleted ids (tombstones).
    pub tombstones: usize,
    /// Of those, how many hide a record the files define.
    pub hiding_files: usize,
}

impl Counts {
    fn count(&mut self, w: &Written, in_files: bool, add: bool) {
        let step = |n: &mut usize| {
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        match (&w.record, in_files) {
            (Some(_), true) => {
                step(&mut self.api_records);
                step(&mut self.shadowing_files);
            }
            (Some(_), false) => step(&mut self.api_records),
            (None, true) => {
                step(&mut self.tombstones);
                step(&mut self.hiding_files);
            }
            (None, false) => step(&mut self.tombstones),
        }
    }
}

/// A write compiled and journaled, waiting for its sync before it is served.
#[derive(Debug)]
struct Staged {
    revision: u64,
    snapshot: Arc<Snapshot>,
    id: String,
    /// The overlay entry it replaced, restored if the journal fails.
    undo: Option<Written>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last snapshot compiled from the files alone.
    files: Option<Arc<Snapshot>>,
    /// The latest snapshot, staged writes included (what the next write builds on).
    head: Option<Arc<Snapshot>>,
    overlay: HashMap<String, Written>,
    queue: VecDeque<Staged>,
    next_revision: u64,
    counts: Counts,
}

/// Told the ids of the customers whose written records were just served (renewal
/// notices look at them); called under the publisher's lock, so it must not block.
pub type OnServed = Box<dyn Fn(Vec<String>) + Send + Sync>;

/// Publishes every snapshot; see the module documentation.
pub struct Publisher {
    cell: SnapshotCell,
    /// `None`: writes are disabled (no state directory).
    log: Option<RecordLog>,
    inner: Mutex<Inner>,
    /// The revision decisions see, for requests waiting on `min_revision`.
    applied: tokio::sync::watch::Sender<u64>,
    on_served: Option<OnServed>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("log", &self.log)
            .field("applied", &self.applied)
            .field("watched", &self.on_served.is_some())
            .finish_non_exhaustive()
    }
}

/// What a lookup of one id finds.
#[derive(Debug)]
pub enum Found {
    /// Written through the API (a record, or a tombstone).
    Api(Written),
    /// Not written through the API: the files snapshot says whether it defines it.
    Files(Option<Arc<Snapshot>>),
}

impl Publisher {
    /// A publisher without a journal: reloads only.
    pub fn new(cell: SnapshotCell) -> Publisher {
        Publisher {
            cell,
            log: None,
            inner: Mutex::new(Inner {
                next_revision: 1,
                ..Inner::default()
            }),
            applied: tokio::sync::watch::Sender::new(0),
            on_served: None,
        }
    }

    /// Calls `f` with the ids of each batch of written records once it is served.
    pub fn on_served(mut self, f: OnServed) -> Publisher {
        self.on_served = Some(f);
        self
    }

    /// A publisher with the journal in `dir`, its writes read back into the overlay
    /// (they are applied when the first files snapshot is published).
    pub fn open(cell: SnapshotCell, dir: &std::path::Path) -> Result<Publisher, JournalError> {
        let (log, replayed) = RecordLog::open(dir)?;
        let Replayed { entries, truncated } = replayed;
        if truncated > 0 {
            tracing::warn!(
                bytes = truncated,
                "customer journal: a torn last write was cut off (it had not been acknowledged)"
            );
        }
        let mut inner = Inner {
            next_revision: 1,
            ..Inner::default()
        };
        let path = dir.join(super::journal::JOURNAL);
        for e in &entries {
            if e.op == Op::Forget {
                inner.overlay.remove(&e.id);
            } else {
                let written = replayed_entry(e).map_err(|message| JournalError::Damaged {
                    path: path.clone(),
                    line: 0,
                    message: format!("revision {}: {message}", e.revision),
                })?;
                inner.overlay.insert(e.id.clone(), written);
            }
            inner.next_revision = e.revision + 1;
            inner.counts.revision = e.revision;
        }
        tracing::info!(
            writes = entries.len(),
            records = inner.overlay.len(),
            revision = inner.counts.revision,
            "customer journal replayed"
        );
        // Most lines superseded: keep one per id (their revisions unchanged), and the
        // last line whatever it is (a forget has no overlay entry), so the revision
        // never goes back after a restart.
        if entries.len() > 1024 && entries.len() > 2 * inner.overlay.len() {
            let mut live: std::collections::HashSet<u64> =
                inner.overlay.values().map(|w| w.revision).collect();
            live.insert(inner.counts.revision);
            let keep: Vec<&Entry> = entries
                .iter()
                .filter(|e| live.contains(&e.revision))
                .collect();
            log.compact(&keep)?;
        }
        let applied = tokio::sync::watch::Sender::new(inner.counts.revision);
        Ok(Publisher {
            cell,
            log: Some(log),
            inner: Mutex::new(inner),
            applied,
            on_served: None,
        })
    }

    /// The cell this publisher stores into.
    pub fn cell(&self) -> &SnapshotCell {
        &self.cell
    }

    pub fn writable(&self) -> bool {
        self.log.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock cannot leave the overlay half-changed in a way the
        // next publish would serve: keep going with what is there.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last snapshot compiled from the files alone.
    pub fn files(&self) -> Option<Arc<Snapshot>> {
        self.lock().files.clone()
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// The applied revision, watched (it only grows, except when a replica reloads
    /// from a shared snapshot of another history).
    pub fn watch_revision(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// What the API wrote for `id`, or the files snapshot to look in.
    pub fn find(&self, id: &str) -> Found {
        let inner = self.lock();
        match inner.overlay.get(id) {
            Some(w) => Found::Api(w.clone()),
            None => Found::Files(inner.files.clone()),
        }
    }

    /// Publishes a snapshot compiled from the files, with the overlay applied on
    /// top; `store` swaps it in, under the publisher's lock. An API record that no
    /// longer compiles against the new files (a plan removed) fails the reload: the
    /// served snapshot stays, and the problems are returned.
    pub fn publish_files(
        &self,
        files: Arc<Snapshot>,
        store: impl FnOnce(&Arc<Snapshot>),
    ) -> Result<Arc<Snapshot>, Vec<String>> {
        let mut inner = self.lock();
        self.settle(&mut inner);
        let composed = compose(&files, &inner.overlay, inner.counts.revision)?;
        let mut counts = Counts {
            revision: inner.counts.revision,
            ..Counts::default()
        };
        for (id, w) in &inner.overlay {
            counts.count(w, files.customers.get(id).is_some(), true);
        }
        inner.counts = counts;
        inner.files = Some(files);
        inner.head = Some(composed.clone());
        store(&composed);
        self.applied.send_replace(composed.revision);
        Ok(composed)
    }

    /// Applies one write: compiled against the latest snapshot (a bad record changes
    /// nothing), journaled, synced, then served. Returns its revision.
    pub fn write(
        &self,
        w: Write,
        base: Option<Base>,
        by: &str,
        at: Timestamp,
    ) -> Result<u64, WriteError> {
        let log = self
            .log
            .as_ref()
            .ok_or_else(|| WriteError::Disabled("no state directory".into()))?;
        let revision = self.stage(log, w, base, by, at)?;
        let synced = log.wait_durable(revision);
        let mut inner = self.lock();
        match synced {
            Ok(()) => {
                self.publish_durable(&mut inner, log.durable());
                Ok(revision)
            }
            Err(e) => {
                self.roll_back(&mut inner);
                Err(e.into())
            }
        }
    }

    fn stage(
        &self,
        log: &RecordLog,
        w: Write,
        base: Option<Base>,
        by: &str,
        at: Timestamp,
    ) -> Result<u64, WriteError> {
        let mut inner = self.lock();
        let (Some(head), Some(files)) = (inner.head.clone(), inner.files.clone()) else {
            return Err(WriteError::NotReady);
        };
        let now = match inner.overlay.get(w.id()) {
            Some(old) => Base::Api(old.revision),
            None => Base::Files,
        };
        if base.is_some_and(|b| b != now) {
            return Err(WriteError::Changed);
        }
        if matches!(w, Write::Forget { .. }) && now == Base::Files {
            return Err(WriteError::NoApiRecord);
        }
        let change = w.change(&files.customers);
        let customers = update_customers(&head.catalog, &head.customers, &[change])
            .map_err(|issues| WriteError::Invalid(problems(&issues)))?;
        let revision = inner.next_revision;
        let id = w.id().to_string();
        let (op, record, json) = match w {
            Write::Put { record, json } => (Op::Put, Some(Arc::new(record)), Some(Arc::new(json))),
            Write::Delete { .. } => (Op::Delete, None, None),
            Write::Forget { .. } => (Op::Forget, None, None),
        };
        log.append(&Entry {
            revision,
            op,
            id: id.clone(),
            record: json.as_deref().cloned(),
            by: by.to_string(),
            at,
        })?;
        inner.next_revision += 1;
        let snapshot = Arc::new(Snapshot {
            version: tagged(&files.version, revision),
            customers,
            revision,
            ..(*head).clone()
        });
        let in_files = files.customers.get(&id).is_some();
        let undo = if op == Op::Forget {
            inner.overlay.remove(&id)
        } else {
            let written = Written {
                record,
                json,
                revision,
                by: by.into(),
                at,
            };
            inner.counts.count(&written, in_files, true);
            inner.overlay.insert(id.clone(), written)
        };
        if let Some(old) = &undo {
            inner.counts.count(old, in_files, false);
        }
        inner.head = Some(snapshot.clone());
        inner.queue.push_back(Staged {
            revision,
            snapshot,
            id,
            undo,
        });
        Ok(revision)
    }

    /// Serves the staged writes the journal now holds, in order.
    fn publish_durable(&self, inner: &mut Inner, durable: u64) {
        let mut last = None;
        let mut ids = Vec::new();
        while inner.queue.front().is_some_and(|s| s.revision <= durable) {
            last = inner.queue.pop_front();
            if let Some(s) = &mut last {
                ids.push(std::mem::take(&mut s.id));
            }
        }
        if let Some(s) = last {
            inner.counts.revision = s.revision;
            self.cell.store(s.snapshot);
            self.applied.send_replace(s.revision);
        }
        if let Some(f) = &self.on_served
            && !ids.is_empty()
        {
            f(ids);
        }
    }

    /// Waits for every staged write to be synced and serves them (before a reload
    /// replaces the snapshot they were built on).
    fn settle(&self, inner: &mut Inner) {
        let (Some(log), Some(last)) = (&self.log, inner.queue.back().map(|s| s.revision)) else {
            return;
        };
        match log.wait_durable(last) {
            Ok(()) => self.publish_durable(inner, log.durable()),
            Err(_) => self.roll_back(inner),
        }
    }

    /// Undoes every staged write (the journal failed: none of them is acknowledged).
    fn roll_back(&self, inner: &mut Inner) {
        let files = inner.files.clone();
        let in_files = |id: &str| {
            files
                .as_ref()
                .is_some_and(|f| f.customers.get(id).is_some())
        };
        while let Some(s) = inner.queue.pop_back() {
            let f = in_files(&s.id);
            if let Some(w) = inner.overlay.remove(&s.id) {
                inner.counts.count(&w, f, false);
            }
            if let Some(old) = s.undo {
                inner.counts.count(&old, f, true);
                inner.overlay.insert(s.id, old);
            }
        }
        inner.head = self.cell.load_full();
    }
}

/// A snapshot version with the revision applied on top of the files.
fn tagged(files_version: &str, revision: u64) -> Box<str> {
    let base = files_version.split('+').next().unwrap_or(files_version);
    format!("{base}+r{revision}").into()
}

fn replayed_entry(e: &Entry) -> Result<Written, String> {
    let (record, json) = match (e.op, &e.record) {
        (Op::Put, Some(v)) => {
            let c = record::parse(v).map_err(|p| {
                p.iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            (Some(Arc::new(c)), Some(Arc::new(v.clone())))
        }
        (Op::Put, None) => return Err("a put without a record".into()),
        (Op::Delete | Op::Forget, _) => (None, None),
    };
    Ok(Written {
        record,
        json,
        revision: e.revision,
        by: e.by.as_str().into(),
        at: e.at,
    })
}

/// The files snapshot with every overlay entry applied.
fn compose(
    files: &Arc<Snapshot>,
    overlay: &HashMap<String, Written>,
    revision: u64,
) -> Result<Arc<Snapshot>, Vec<String>> {
    if overlay.is_empty() && revision == 0 {
        return Ok(files.clone());
    }
    fn change<'a>((id, w): (&'a String, &'a Written)) -> Change<'a> {
        match &w.record {
            Some(r) => Change::Set {
                record: r,
                file: 0,
                origin: Origin::Line { line: 0 },
            },
            None => Change::Remove(id),
        }
    }
    let changes: Vec<Change<'_>> = overlay.iter().map(change).collect();
    match update_customers(&files.catalog, &files.customers, &changes) {
        Ok(customers) => Ok(Arc::new(Snapshot {
            version: tagged(&files.version, revision),
            customers,
            revision,
            ..(**files).clone()
        })),
        // Which records: compiled one by one (the failing path only).
        Err(_) => Err(overlay
            .iter()
            .filter_map(|entry| {
                let (id, w) = entry;
                let issues = update_customers(&files.catalog, &files.customers, &[change(entry)]).err()?;
                let what = problems(&issues)
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                Some(format!(
                    "customer `{id}` written through the API (revision {}) does not compile against the policy files: {what}",
                    w.revision
                ))
            })
            .collect()),
    }
}

/// Compile issues of one record as field problems.
fn problems(issues: &[Issue]) -> Vec<Problem> {
    issues
        .iter()
        .map(|i| Problem::new(path_to_string(&i.at.path), i.message.clone()))
        .collect()
}

/// The change an overlay entry makes.
fn change_of<'a>(id: &'a str, w: &'a Written) -> Change<'a> {
    match &w.record {
        Some(r) => Change::Set {
            record: r,
            file: 0,
            origin: Origin::Line { line: 0 },
        },
        None => Change::Remove(id),
    }
}

/// The change an applied stream entry makes: a forget serves the files' record again.
fn entry_change<'a>(e: &'a Entry, w: &'a Written, files: Option<&'a Snapshot>) -> Change<'a> {
    match (e.op, files) {
        (Op::Forget, Some(f)) => Change::Restore {
            id: &e.id,
            from: &f.customers,
        },
        (Op::Forget, None) => Change::Remove(&e.id),
        _ => change_of(&e.id, w),
    }
}

/// Replicated mode (`--store redis://…`): the shared stream orders the writes, and
/// this replica applies what it reads from it, its own writes included. The local
/// journal then holds what this replica applied, under the stream's revisions; its
/// last revision is where reading resumes after a restart.
impl Publisher {
    /// Checks `w` against the latest snapshot (a bad record is refused and changes
    /// nothing) and returns it as a journal entry for the stream, which gives it its
    /// revision (0 here).
    pub fn prepare(&self, w: Write, by: &str, at: Timestamp) -> Result<Entry, WriteError> {
        if self.log.is_none() {
            return Err(WriteError::Disabled("no state directory".into()));
        }
        let (head, files) = {
            let inner = self.lock();
            (inner.head.clone(), inner.files.clone())
        };
        let (Some(head), Some(files)) = (head, files) else {
            return Err(WriteError::NotReady);
        };
        let change = w.change(&files.customers);
        update_customers(&head.catalog, &head.customers, &[change])
            .map_err(|issues| WriteError::Invalid(problems(&issues)))?;
        let id = w.id().to_string();
        let (op, record) = match w {
            Write::Put { json, .. } => (Op::Put, Some(json)),
            Write::Delete { .. } => (Op::Delete, None),
            Write::Forget { .. } => (Op::Forget, None),
        };
        Ok(Entry {
            revision: 0,
            op,
            id,
            record,
            by: by.to_string(),
            at,
        })
    }

    /// Applies entries read from the stream, in revision order: compiled on top of
    /// the latest snapshot, journaled and synced, then served. Entries at or below
    /// the applied revision are skipped (read twice); an entry that does not compile
    /// against this replica's policy files is left out and counted in the result.
    /// Returns how many were left out.
    pub fn apply_replicated(&self, entries: Vec<Entry>) -> Result<usize, WriteError> {
        let log = self
            .log
            .as_ref()
            .ok_or_else(|| WriteError::Disabled("no state directory".into()))?;
        let mut inner = self.lock();
        self.settle(&mut inner);
        let Some(last) = entries.last().map(|e| e.revision) else {
            return Ok(0);
        };
        if last <= inner.counts.revision {
            return Ok(0);
        }
        let applied = inner.counts.revision;
        let mut accepted: Vec<(Entry, Written)> = Vec::with_capacity(entries.len());
        let mut refused = 0;
        for e in entries.into_iter().filter(|e| e.revision > applied) {
            match replayed_entry(&e) {
                Ok(w) => accepted.push((e, w)),
                Err(why) => {
                    refused += 1;
                    tracing::error!(revision = e.revision, customer = %e.id, "customer record from the stream left out: {why}");
                }
            }
        }
        let files = inner.files.clone();
        let head = inner.head.clone();
        let customers = match &head {
            None => None,
            Some(head) => {
                let changes: Vec<Change<'_>> = accepted
                    .iter()
                    .map(|(e, w)| entry_change(e, w, files.as_deref()))
                    .collect();
                match update_customers(&head.catalog, &head.customers, &changes) {
                    Ok(c) => Some(c),
                    Err(_) => {
                        // Which records: one by one (the failing path only).
                        let mut table = head.customers.clone();
                        let mut kept = Vec::with_capacity(accepted.len());
                        for (e, w) in accepted.drain(..) {
                            let change = entry_change(&e, &w, files.as_deref());
                            match update_customers(&head.catalog, &table, &[change]) {
                                Ok(t) => {
                                    table = t;
                                    kept.push((e, w));
                                }
                                Err(issues) => {
                                    refused += 1;
                                    let what = problems(&issues)
                                        .iter()
                                        .map(|p| format!("{}: {}", p.field, p.message))
                                        .collect::<Vec<_>>()
                                        .join("; ");
                                    tracing::error!(revision = e.revision, customer = %e.id, "customer record from the stream does not compile against this replica's policy files, left out: {what}");
                                }
                            }
                        }
                        accepted = kept;
                        Some(table)
                    }
                }
            }
        };
        for (e, _) in &accepted {
            log.append(e)?;
        }
        if let Some((e, _)) = accepted.last() {
            log.wait_durable(e.revision)?;
        }
        let mut ids = Vec::with_capacity(accepted.len());
        for (e, w) in accepted {
            let in_files = files
                .as_ref()
                .is_some_and(|f| f.customers.get(&e.id).is_some());
            let old = if e.op == Op::Forget {
                inner.overlay.remove(&e.id)
            } else {
                inner.counts.count(&w, in_files, true);
                inner.overlay.insert(e.id.clone(), w)
            };
            if let Some(old) = old {
                inner.counts.count(&old, in_files, false);
            }
            ids.push(e.id);
        }
        inner.counts.revision = last;
        inner.next_revision = last + 1;
        if let (Some(head), Some(customers)) = (head, customers) {
            let snapshot = Arc::new(Snapshot {
                version: tagged(&head.version, last),
                customers,
                revision: last,
                ..(*head).clone()
            });
            inner.head = Some(snapshot.clone());
            self.cell.store(snapshot);
        }
        self.applied.send_replace(last);
        if let Some(f) = &self.on_served
            && !ids.is_empty()
        {
            f(ids);
        }
        Ok(refused)
    }

    /// Replaces every API record with `entries` (the shared snapshot, in revision
    /// order) standing at `revision`: the journal is rewritten to hold them, and the
    /// snapshot is served. Returns how many records were left out (they do not
    /// compile against this replica's policy files).
    pub fn replace_replicated(
        &self,
        entries: Vec<Entry>,
        revision: u64,
    ) -> Result<usize, WriteError> {
        let log = self
            .log
            .as_ref()
            .ok_or_else(|| WriteError::Disabled("no state directory".into()))?;
        let started = std::time::Instant::now();
        let mut inner = self.lock();
        self.settle(&mut inner);
        let mut refused = 0;
        let mut overlay: HashMap<String, Written> = HashMap::with_capacity(entries.len());
        let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
        for e in entries {
            // A forget leaves the shared snapshot, but may come in the stream's tail.
            if e.op == Op::Forget {
                overlay.remove(&e.id);
                kept.retain(|k| k.id != e.id);
                continue;
            }
            match replayed_entry(&e) {
                Ok(w) => {
                    overlay.insert(e.id.clone(), w);
                    kept.push(e);
                }
                Err(why) => {
                    refused += 1;
                    tracing::error!(revision = e.revision, customer = %e.id, "customer record from the shared snapshot left out: {why}");
                }
            }
        }
        let files = inner.files.clone();
        let composed = match &files {
            None => None,
            Some(files) => match compose(files, &overlay, revision) {
                Ok(s) => Some(s),
                Err(problems) => {
                    for p in &problems {
                        tracing::error!("{p}; left out");
                    }
                    overlay.retain(|id, w| {
                        let ok =
                            update_customers(&files.catalog, &files.customers, &[change_of(id, w)])
                                .is_ok();
                        refused += usize::from(!ok);
                        ok
                    });
                    kept.retain(|e| overlay.contains_key(&e.id));
                    compose(files, &overlay, revision).ok()
                }
            },
        };
        let compiled = started.elapsed();
        let refs: Vec<&Entry> = kept.iter().collect();
        log.compact(&refs)?;
        tracing::info!(
            records = kept.len(),
            compile_ms = compiled.as_millis() as u64,
            journal_ms = (started.elapsed() - compiled).as_millis() as u64,
            "customer records replaced"
        );
        let mut counts = Counts {
            revision,
            ..Counts::default()
        };
        for (id, w) in &overlay {
            let in_files = files
                .as_ref()
                .is_some_and(|f| f.customers.get(id).is_some());
            counts.count(w, in_files, true);
        }
        inner.counts = counts;
        inner.overlay = overlay;
        inner.next_revision = revision + 1;
        if let Some(s) = composed {
            inner.head = Some(s.clone());
            self.cell.store(s);
        }
        self.applied.send_replace(revision);
        Ok(refused)
    }

    /// The applied revision.
    pub fn revision(&self) -> u64 {
        self.lock().counts.revision
    }
}
