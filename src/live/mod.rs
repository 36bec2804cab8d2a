//! Customer records written through the API (`PUT`/`DELETE /v1/customers/{id}`),
//! on top of the records the policy files define.
//!
//! - [`journal`]: every write, synced to `<state-dir>/customers/journal.ndjson` before
//!   it is acknowledged, and read back at start;
//! - [`publisher`]: the overlay of written records and the one place snapshots are
//!   published, so reloads and writes never interleave;
//! - [`record`]: a record's JSON read into the policy's raw model, problems by field;
//! - [`replica`]: with `--store redis://…`, every write through a Redis Stream that
//!   every replica applies;
//! - [`tokens`]: who may write (`--admin-token-file`).
//!
//! Precedence: an API record replaces the record the files define for the same id;
//! a delete leaves a tombstone that hides the files' record too; a later `PUT` of the
//! id replaces the tombstone. A reload of the files keeps the API records on top.

pub mod journal;
pub mod publisher;
pub mod record;
pub mod replica;
pub mod tokens;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

pub use publisher::{Base, Counts, Found, Publisher, Write, WriteError, Written};
pub use tokens::{AdminTokens, AuthError};

use crate::policy::Snapshot;

/// Where customer writes stand: enabled with a token file, or disabled and why.
#[derive(Debug)]
pub enum Writes {
    Enabled(AdminTokens),
    Disabled(String),
}

/// The write API's parts, shared by the handlers.
#[derive(Debug)]
pub struct Live {
    pub publisher: Arc<Publisher>,
    pub writes: Writes,
    /// The policy directory, to read a file-defined record back.
    pub policies: PathBuf,
    /// With `--store`: the shared stream every write goes through.
    pub replica: Option<Arc<replica::Replica>>,
    /// How long a decision with `min_revision` waits for it.
    pub revision_wait: std::time::Duration,
}

/// The journal's directory in a state directory.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("customers")
}

/// The record the files define for `id`, and the file (relative to `policies`) that
/// holds it. The compiled table keeps no text, so the files are read again; only
/// those whose text contains the id are parsed, and of an NDJSON file only the lines
/// that do.
pub fn file_record(policies: &Path, files: &Snapshot, id: &str) -> Option<(PathBuf, Value)> {
    files.customers.get(id)?;
    let quoted = serde_json::to_string(id).ok()?;
    for f in files.files.iter() {
        let Ok(text) = std::fs::read_to_string(policies.join(&f.path)) else {
            continue;
        };
        if !text.contains(id) {
            continue;
        }
        let found = if f.path.extension().is_some_and(|e| e == "ndjson") {
            text.lines()
                .filter(|l| l.contains(&quoted))
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["id"] == id)
        } else {
            serde_saphyr::from_str::<Value>(&text)
                .ok()
                .and_then(|doc| match doc.get("customers") {
                    Some(Value::Array(list)) => list.iter().find(|c| c["id"] == id).cloned(),
                    _ => None,
                })
        };
        if let Some(v) = found {
            return Some((f.path.clone(), v));
        }
    }
    None
}

/// The API-written records in a state directory, latest per id, ordered by id:
/// `(records, tombstones)`. Reads the journal without changing it (a server may be
/// appending to it): a torn last line (a write not yet acknowledged) is skipped; a
/// damaged line with more after it is an error naming its line, since skipping it
/// would export an older record as if it were the latest.
pub fn exported(state_dir: &Path) -> std::io::Result<(Vec<Value>, usize)> {
    let path = journal_dir(state_dir).join(journal::JOURNAL);
    let mut reader = std::io::BufReader::new(std::fs::File::open(&path)?);
    let mut latest: std::collections::BTreeMap<String, Option<Value>> = Default::default();
    let (mut buf, mut line) = (Vec::new(), 0usize);
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line += 1;
        let whole = buf.last() == Some(&b'\n');
        match serde_json::from_slice::<journal::Entry>(&buf) {
            Ok(e) if whole => match e.op {
                journal::Op::Put => {
                    latest.insert(e.id, e.record);
                }
                journal::Op::Delete => {
                    latest.insert(e.id, None);
                }
                journal::Op::Forget => {
                    latest.remove(&e.id);
                }
            },
            // The last line: torn by a crash mid-write (the server cuts it at start).
            _ if reader.fill_buf()?.is_empty() => break,
            parsed => {
                let why = parsed.err().map_or_else(String::new, |e| e.to_string());
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}:{line}: damaged journal line (not the last one): {why}",
                        path.display()
                    ),
                ));
            }
        }
    }
    let tombstones = latest.values().filter(|v| v.is_none()).count();
    Ok((latest.into_values().flatten().collect(), tombstones))
}
