//! NDJSON files kept whole by rewriting: read every line, replace the file atomically
//! (through [`crate::files::replace`]) and keep appending to the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use crate::files;

/// The lines of a file, as bytes (a torn last line may not be UTF-8); none if the
/// file does not exist.
pub(super) fn lines(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).split(b'\n').collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `lines` ([`files::replace`]: temporary file, sync, rename,
/// directory sync) and returns it opened for appending.
pub(super) fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> io::Result<File> {
    files::replace(path, |f| {
        for l in lines {
            f.write_all(l.as_bytes())?;
        }
        Ok(())
    })?;
    OpenOptions::new().append(true).open(path)
}
