//! Closed usage ledger segments: gzip compression, and the acknowledged position
//! below which a billing system has ingested everything.
//!
//! The ledger appends to its last segment only; once it starts a new one, the closed
//! one is compressed off the writer thread (`usage-<lsn>-<t>.ndjson.gz`, written
//! beside it, synced, renamed into place, then the plain file removed, so a reader
//! always finds one whole form). Readers take either form ([`super::ledger`] lists
//! both and prefers the plain one while both exist).
//!
//! `ACK` in the ledger directory holds the position (an event `id`, which is its
//! lsn) a shipper has acknowledged: `entitled usage ack`. Segments whose every event
//! is at or before it are deleted by the ledger's maintenance (see
//! [`super::ledger::Ledger`]); it never moves back.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use crate::files;

/// The file holding the acknowledged position.
pub const ACK: &str = "ACK";

#[derive(serde::Serialize, serde::Deserialize)]
struct Ack {
    position: u64,
}

/// The acknowledged position in ledger `dir` (0: none).
pub fn acked(dir: &Path) -> io::Result<u64> {
    match fs::read(dir.join(ACK)) {
        Ok(bytes) => serde_json::from_slice::<Ack>(&bytes)
            .map(|a| a.position)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", dir.join(ACK).display()),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Records `position` as acknowledged (durably: replaced by rename, synced). It
/// never moves back: returns the position now recorded.
pub fn acknowledge(dir: &Path, position: u64) -> io::Result<u64> {
    let now = acked(dir)?.max(position);
    let bytes = serde_json::to_vec(&Ack { position: now }).map_err(io::Error::other)?;
    files::replace_with_bytes(&dir.join(ACK), &bytes)?;
    Ok(now)
}

/// The compressed name of segment `path`.
pub fn gz_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".gz");
    path.with_file_name(name)
}

/// Compresses the closed segment `path` into `<path>.gz` and removes `path`.
pub fn compress(path: &Path) -> io::Result<()> {
    let gz = gz_path(path);
    let mut tmp = gz.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut input = File::open(path)?;
    let out = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
    io::copy(&mut input, &mut enc)?;
    let f = enc
        .finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &gz)?;
    fs::remove_file(path)?;
    match path.parent() {
        Some(dir) => files::sync_dir(dir),
        None => Ok(()),
    }
}

/// Compresses `paths` (closed segments) on a thread of its own, in order; failures are
/// logged (the plain segment stays and is read as it is).
pub fn compress_in_background(paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("entitled-ledger-gzip".into())
        .spawn(move || {
            let _ = thread_priority::set_current_thread_priority(
                thread_priority::ThreadPriority::Min,
            );
            for p in paths {
                if let Err(e) = compress(&p) {
                    tracing::warn!(file = %p.display(), error = %e, "compressing a closed usage ledger segment failed; it stays uncompressed");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "starting the ledger compression thread failed");
    }
}

/// A reader of a segment in either form.
pub fn open(path: &Path, gz: bool) -> io::Result<Box<dyn io::BufRead>> {
    let plain = |p: &Path| -> io::Result<Box<dyn io::BufRead>> {
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 16,
            File::open(p)?,
        )))
    };
    let zipped = |p: &Path| -> io::Result<Box<dyn io::BufRead>> {
        let d = flate2::read::MultiGzDecoder::new(File::open(p)?);
        Ok(Box::new(io::BufReader::with_capacity(1 << 16, d)))
    };
    if gz {
        return zipped(path);
    }
    match plain(path) {
        // Compressed between listing and opening.
        Err(e) if e.kind() == io::ErrorKind::NotFound => zipped(&gz_path(path)),
        r => r,
    }
}

/// Removes what a compression cut short by a stop left behind (`*.gz.tmp`).
pub fn remove_leftovers(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.to_str().is_some_and(|p| p.ends_with(".ndjson.gz.tmp")) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}
