//! NDJSON files kept whole by rewriting: read every line, replace the file atomically
//! (temporary file, sync, rename) and keep appending to the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

/// The lines of a file, as bytes (a torn last line may not be UTF-8); none if the
/// file does not exist.
pub(super) fn lines(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).split(b'\n').collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `lines` (temporary file, sync, rename) and returns it opened
/// for appending.
pub(super) fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> io::Result<File> {
    let tmp = path.with_extension("ndjson.tmp");
    {
        let mut f = io::BufWriter::new(File::create(&tmp)?);
        for l in lines {
            f.write_all(l.as_bytes())?;
        }
        let f = f.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    OpenOptions::new().append(true).open(path)
}
