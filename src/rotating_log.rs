//! Rotated NDJSON files in a directory, `<prefix><unix seconds>-<n>.ndjson`: appended
//! to, a new file past a size, the newest `keep` kept. The audit log and the renewal
//! notice event log are written through it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::files;
use crate::time::{SECOND, Timestamp};

#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    prefix: &'static str,
    file: File,
    size: u64,
    /// The sequence number of the next file.
    seq: u64,
    segment_bytes: u64,
    keep: usize,
}

impl Segments {
    /// Opens `dir` for appending: to its newest file when `resume` (so restarts do not
    /// leave a file each), else to a new file numbered after it.
    pub fn open(
        dir: &Path,
        prefix: &'static str,
        segment_bytes: u64,
        keep: usize,
        resume: bool,
    ) -> io::Result<Segments> {
        let newest = list(dir, prefix)?.into_iter().last();
        let next = newest.as_deref().and_then(seq_of).map_or(0, |n| n + 1);
        let (file, size, seq) = match newest {
            Some(p) if resume => {
                let f = OpenOptions::new().append(true).open(&p)?;
                let size = f.metadata()?.len();
                (f, size, next)
            }
            _ => (new_file(dir, prefix, next)?, 0, next + 1),
        };
        Ok(Segments {
            dir: dir.to_path_buf(),
            prefix,
            file,
            size,
            seq,
            segment_bytes,
            keep: keep.max(1),
        })
    }

    /// Appends `buf` (whole lines), first starting a new file if the current one has
    /// reached the size limit and deleting the oldest beyond `keep`.
    pub fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.size >= self.segment_bytes {
            self.file.sync_data()?;
            self.file = new_file(&self.dir, self.prefix, self.seq)?;
            self.seq += 1;
            self.size = 0;
            let files = list(&self.dir, self.prefix)?;
            let excess = files.len().saturating_sub(self.keep);
            for p in files.into_iter().take(excess) {
                fs::remove_file(p)?;
            }
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A new segment, its name made durable before anything is appended to it (so an
/// event synced into it cannot be lost with the file's name in a crash).
fn new_file(dir: &Path, prefix: &str, seq: u64) -> io::Result<File> {
    let secs = Timestamp::now().0 / SECOND;
    files::open_append(&dir.join(format!("{prefix}{secs}-{seq:06}.ndjson")))
}

/// The sequence number of a segment: the last part of its name.
fn seq_of(p: &Path) -> Option<u64> {
    p.file_stem()?.to_str()?.rsplit('-').next()?.parse().ok()
}

/// Files `<prefix>*.ndjson` in `dir`, oldest first (by their sequence number).
pub fn list(dir: &Path, prefix: &str) -> io::Result<Vec<PathBuf>> {
    let files = files::list_by(dir, |name| {
        name.strip_prefix(prefix)?.strip_suffix(".ndjson")?;
        seq_of(Path::new(name))
    })?;
    Ok(files.into_iter().map(|(_, p)| p).collect())
}
