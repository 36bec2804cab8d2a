//! The record journal: every customer write, one JSON line each, appended to
//! `<state-dir>/customers/journal.ndjson` and synced before the write is acknowledged.
//!
//! Group commit without a thread of its own: a writer that finds no sync running
//! becomes the leader, takes everything appended so far, writes it and syncs it once;
//! writers that appended meanwhile wait on a condition variable and are released by
//! that sync or the next one. At a thousand writes a second each sync carries a
//! handful of records, so a write costs about one `fdatasync`, not a queue of them.
//!
//! A line is only trusted whole: at start the journal is read line by line, and a last
//! line cut short by a crash (no newline, or not JSON) is truncated away; it was never
//! acknowledged. A damaged line before the last one is an error: the journal is not
//! guessed at. The journal is rewritten at start (atomically, as
//! [`crate::files::replace`] does) once most of its lines are superseded.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::files;
use crate::time::Timestamp;

/// The journal's file name in the customers directory.
pub const JOURNAL: &str = "journal.ndjson";

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Put,
    Delete,
    /// The API record dropped: the files' record (if any) serves again.
    Forget,
}

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub revision: u64,
    pub op: Op,
    pub id: String,
    /// The customer record written (a put); absent for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// The admin token's name.
    pub by: String,
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub at: Timestamp,
}

pub(super) fn ser_time<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    t.serialize(s)
}

pub(super) fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
    let s = String::deserialize(d)?;
    Timestamp::parse(&s).map_err(serde::de::Error::custom)
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}:{line}: damaged journal line (not the last one, so not a torn write): {message}", path.display())]
    Damaged {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A sync failed: what reached the disk is unknown, so nothing more is accepted.
    #[error("the customer journal could not be written ({0}); writes are refused until restart")]
    Failed(String),
}

/// What was read at start.
#[derive(Debug, Default)]
pub struct Replayed {
    pub entries: Vec<Entry>,
    /// Bytes of a torn last line that were cut off.
    pub truncated: u64,
}

#[derive(Debug)]
struct State {
    pending: Vec<u8>,
    /// The highest revision in `pending` or written.
    appended: u64,
    /// The highest revision synced.
    durable: u64,
    syncing: bool,
    failed: Option<String>,
}

/// The open journal. Appends from any thread.
#[derive(Debug)]
pub struct RecordLog {
    path: PathBuf,
    state: Mutex<State>,
    synced: Condvar,
    /// Only the leader of a group commit writes; the lock is never contended.
    file: Mutex<File>,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RecordLog {
    /// Opens (creating) the journal in `dir` and reads it back.
    pub fn open(dir: &Path) -> Result<(RecordLog, Replayed), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(JOURNAL);
        let replayed = if path.exists() {
            read(&path)?
        } else {
            Replayed::default()
        };
        let file = files::open_append(&path).map_err(io_err(&path))?;
        let last = replayed.entries.last().map_or(0, |e| e.revision);
        let log = RecordLog {
            path,
            state: Mutex::new(State {
                pending: Vec::new(),
                appended: last,
                durable: last,
                syncing: false,
                failed: None,
            }),
            synced: Condvar::new(),
            file: Mutex::new(file),
        };
        Ok((log, replayed))
    }

    /// Rewrites the journal as `entries` (atomically), when nothing is pending; the
    /// journal then stands at the last of them (which may be behind what it held: a
    /// replica reloading from the shared snapshot).
    pub fn compact(&self, entries: &[&Entry]) -> Result<(), JournalError> {
        let path = &self.path;
        let mut file = self
            .file
            .lock()
            .map_err(|_| JournalError::Failed("journal lock poisoned".into()))?;
        files::replace(path, |w| {
            for e in entries {
                serde_json::to_writer(&mut *w, e)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })
        .map_err(io_err(path))?;
        *file = files::open_append(path).map_err(io_err(path))?;
        drop(file);
        let last = entries.last().map_or(0, |e| e.revision);
        let mut s = self.lock()?;
        s.pending.clear();
        s.appended = last;
        s.durable = last;
        Ok(())
    }

    /// Queues `entry` for the next sync. Revisions must be appended in order.
    pub fn append(&self, entry: &Entry) -> Result<(), JournalError> {
        let mut line =
            serde_json::to_vec(entry).map_err(|e| JournalError::Failed(e.to_string()))?;
        line.push(b'\n');
        let mut s = self.lock()?;
        if let Some(f) = &s.failed {
            return Err(JournalError::Failed(f.clone()));
        }
        s.pending.extend_from_slice(&line);
        s.appended = s.appended.max(entry.revision);
        Ok(())
    }

    /// The highest revision on disk.
    pub fn durable(&self) -> u64 {
        self.lock().map_or(0, |s| s.durable)
    }

    /// Returns once `revision` is on disk: syncing it (and everything appended with
    /// it) if no sync is running, else waiting for the one that carries it.
    pub fn wait_durable(&self, revision: u64) -> Result<(), JournalError> {
        let mut s = self.lock()?;
        loop {
            if let Some(f) = &s.failed {
                return Err(JournalError::Failed(f.clone()));
            }
            if s.durable >= revision {
                return Ok(());
            }
            if s.syncing {
                s = self
                    .synced
                    .wait(s)
                    .map_err(|_| JournalError::Failed("journal lock poisoned".into()))?;
                continue;
            }
            s.syncing = true;
            let batch = std::mem::take(&mut s.pending);
            let upto = s.appended;
            drop(s);
            let written = self.write_batch(&batch);
            s = self.lock()?;
            s.syncing = false;
            match written {
                Ok(()) => s.durable = upto,
                Err(e) => s.failed = Some(e.to_string()),
            }
            self.synced.notify_all();
        }
    }

    fn write_batch(&self, batch: &[u8]) -> io::Result<()> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        f.write_all(batch)?;
        f.sync_data()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, JournalError> {
        self.state
            .lock()
            .map_err(|_| JournalError::Failed("journal lock poisoned".into()))
    }
}

/// Reads every whole line; a torn last line is cut off the file.
fn read(path: &Path) -> Result<Replayed, JournalError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let mut out = Replayed::default();
    let (mut good, mut line_no, mut buf) = (0u64, 0usize, Vec::new());
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let whole = buf.last() == Some(&b'\n');
        match serde_json::from_slice::<Entry>(&buf) {
            Ok(e) if whole => {
                good += n as u64;
                out.entries.push(e);
            }
            parsed => {
                let rest_empty = reader.fill_buf().map_err(io_err(path))?.is_empty();
                if !rest_empty {
                    return Err(JournalError::Damaged {
                        path: path.to_path_buf(),
                        line: line_no,
                        message: parsed.err().map_or("no newline".into(), |e| e.to_string()),
                    });
                }
                out.truncated = n as u64;
                break;
            }
        }
    }
    if out.truncated > 0 {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(good).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(revision: u64) -> Entry {
        Entry {
            revision,
            op: Op::Put,
            id: format!("c{revision}"),
            record: Some(serde_json::json!({"id": format!("c{revision}")})),
            by: "ops".into(),
            at: Timestamp(1_700_000_000_000_000),
        }
    }

    #[test]
    fn appended_entries_come_back_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, r) = RecordLog::open(dir.path()).unwrap();
            assert!(r.entries.is_empty());
            for rev in 1..=3 {
                log.append(&entry(rev)).unwrap();
            }
            log.wait_durable(3).unwrap();
            assert_eq!(log.durable(), 3);
        }
        let path = dir.path().join(JOURNAL);
        let whole = std::fs::metadata(&path).unwrap().len();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"revision":4,"op":"put","id":"c4","rec"#)
            .unwrap();
        drop(f);
        let (log, r) = RecordLog::open(dir.path()).unwrap();
        assert_eq!(r.entries.len(), 3);
        assert_eq!(r.entries[2].revision, 3);
        assert!(r.truncated > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        // Appends go on after the cut.
        log.append(&entry(4)).unwrap();
        log.wait_durable(4).unwrap();
        drop(log);
        let (_, r) = RecordLog::open(dir.path()).unwrap();
        assert_eq!(r.entries.len(), 4);
    }

    #[test]
    fn a_damaged_line_before_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL);
        let good = serde_json::to_string(&entry(2)).unwrap();
        std::fs::write(&path, format!("garbage\n{good}\n")).unwrap();
        let err = RecordLog::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(":1:"), "{err}");
    }

    #[test]
    fn concurrent_writers_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = RecordLog::open(dir.path()).unwrap();
        let next = Mutex::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..25 {
                        let rev = {
                            let mut n = next.lock().unwrap();
                            *n += 1;
                            log.append(&entry(*n)).unwrap();
                            *n
                        };
                        log.wait_durable(rev).unwrap();
                        assert!(log.durable() >= rev);
                    }
                });
            }
        });
        drop(log);
        let (_, r) = RecordLog::open(dir.path()).unwrap();
        let revs: Vec<u64> = r.entries.iter().map(|e| e.revision).collect();
        assert_eq!(revs, (1..=100).collect::<Vec<_>>());
    }
}
