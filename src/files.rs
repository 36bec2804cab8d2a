//! File plumbing shared by everything that keeps state on disk (the usage journal,
//! the ledger, checkpoints, the audit log, notices): replacing a file atomically,
//! making a directory entry durable, and listing numbered files; and, for everything
//! that watches files (policy reloads, the admin token file), a file's [`Stamp`].
//!
//! Written once here so that every writer gets the same crash guarantees: a file
//! replaced with [`replace`] is whole or absent after a crash, and a file created or
//! renamed is only durable once its directory is synced ([`sync_dir`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// What tells a file's content changed without reading it: its size, modification time
/// and inode (a file replaced by rename is a new inode; one written in place changes
/// size or time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
    pub ino: u64,
}

impl Stamp {
    /// The stamp of the file at `path` (symlinks followed).
    pub fn of(path: &Path) -> io::Result<Stamp> {
        let m = fs::metadata(path)?;
        Ok(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            ino: std::os::unix::fs::MetadataExt::ino(&m),
        })
    }
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with what `write` writes: into `<path>.tmp` beside it, synced,
/// renamed into place, and the directory synced, so that after a crash `path` holds
/// either the old content or the new, never a mix.
pub fn replace(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut w = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
    write(&mut w)?;
    let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// [`replace`] with a byte string.
pub fn replace_with_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, |w| w.write_all(bytes))
}

/// The temporary name [`replace`] writes to: `<file name>.tmp` in the same directory
/// (a rename is atomic only within one file system).
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Opens `path` for appending, creating it if needed; a new file's directory entry is
/// synced before it is returned, so appends to it cannot outlive its name in a crash.
pub fn open_append(path: &Path) -> io::Result<File> {
    let existed = path.exists();
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    if !existed && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir)?;
    }
    Ok(f)
}

/// The files in `dir` whose name `parse` accepts, sorted by what it returns.
pub fn list_by<K: Ord>(
    dir: &Path,
    parse: impl Fn(&str) -> Option<K>,
) -> io::Result<Vec<(K, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if let Some(k) = name.to_str().and_then(&parse) {
            out.push((k, e.path()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Files in `dir` named `<prefix><number><suffix>`, by number.
pub fn numbered(dir: &Path, prefix: &str, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    list_by(dir, |name| {
        name.strip_prefix(prefix)?
            .strip_suffix(suffix)?
            .parse::<u64>()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_no_temporary_and_overwrites() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("FORMAT");
        replace_with_bytes(&p, b"one")?;
        replace_with_bytes(&p, b"two")?;
        assert_eq!(fs::read(&p)?, b"two");
        assert!(!tmp_path(&p).exists());
        Ok(())
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("state");
        replace_with_bytes(&p, b"old")?;
        let r = replace(&p, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p)?, b"old");
        Ok(())
    }

    #[test]
    fn numbered_sorts_by_number_and_skips_others() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for n in [
            "checkpoint-10.ckpt",
            "checkpoint-9.ckpt",
            "checkpoint-x.ckpt",
            "other",
        ] {
            fs::write(dir.path().join(n), b"")?;
        }
        let got: Vec<u64> = numbered(dir.path(), "checkpoint-", ".ckpt")?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, [9, 10]);
        Ok(())
    }
}

/// A directory this process holds: created if missing, with `LOCK` in it held
/// (`flock`) for as long as the value lives, so that two processes never write into
/// the same files. Until [`DirLock::keep`] is called, dropping it undoes what taking
/// it made (the `LOCK` file, the directories created for it), so that a start-up that
/// fails afterwards leaves nothing behind.
#[derive(Debug)]
pub struct DirLock {
    /// Dropped first: the lock is released before what was made is removed.
    _file: File,
    made: Made,
}

/// What [`DirLock::take`] created, removed on drop unless kept.
#[derive(Debug)]
struct Made {
    lock: Option<PathBuf>,
    /// Deepest first.
    dirs: Vec<PathBuf>,
    kept: bool,
}

impl DirLock {
    /// Creates `dir` if needed and takes its `LOCK`; `in_use` is the error when
    /// another process holds it.
    pub fn take(dir: &Path, in_use: impl FnOnce() -> io::Error) -> io::Result<DirLock> {
        let dirs = dir
            .ancestors()
            .filter(|d| !d.as_os_str().is_empty())
            .take_while(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect();
        let mut made = Made {
            lock: None,
            dirs,
            kept: false,
        };
        fs::create_dir_all(dir)?;
        let lock = dir.join("LOCK");
        if !lock.exists() {
            made.lock = Some(lock.clone());
        }
        let file = File::create(&lock)?;
        if file.try_lock().is_err() {
            // Another process holds it: its lock file is not ours to remove.
            made.lock = None;
            return Err(in_use());
        }
        Ok(DirLock { _file: file, made })
    }

    /// Start-up succeeded: the directory and its `LOCK` stay.
    pub fn keep(&mut self) {
        self.made.kept = true;
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(lock) = &self.lock {
            let _ = fs::remove_file(lock);
        }
        // Only empty directories go: whatever else is in them is not ours to remove.
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
    }
}
