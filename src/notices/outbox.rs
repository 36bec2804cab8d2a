//! The webhook outbox (`outbox.ndjson`) and its outcomes (`outbox-done.ndjson`):
//! events stay on disk until delivered, failed or dropped, so delivery is
//! at-least-once across restarts.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::line_file::{lines, write_lines};

#[derive(Debug, Serialize, Deserialize)]
struct DoneLine {
    id: String,
    result: String,
}

/// Events waiting for the webhook, kept on disk until their outcome is known.
#[derive(Debug)]
pub(super) struct Outbox {
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
    pub(super) fn open(dir: &Path) -> io::Result<(Outbox, Vec<(String, Bytes)>)> {
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

    pub(super) fn add(&mut self, events: &[(String, Bytes)]) -> io::Result<()> {
        let mut buf = Vec::new();
        for (id, body) in events {
            buf.extend_from_slice(body);
            buf.push(b'\n');
            self.pending.insert(id.clone(), body.clone());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    pub(super) fn finish(&mut self, id: &str, result: &str) -> io::Result<()> {
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
