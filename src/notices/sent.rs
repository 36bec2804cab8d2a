//! The remembered notices (`sent.ndjson`), so that a restart or a reload never
//! notices twice.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::line_file::{lines, write_lines};
use crate::time::Timestamp;

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

fn line_of(id: &str, ends_us: i64) -> String {
    format!("{{\"id\":\"{id}\",\"ends_us\":{ends_us}}}\n")
}
