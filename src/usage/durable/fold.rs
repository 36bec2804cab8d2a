//! Folding the journal into a checkpoint: replay up to a sealed lsn, drop what has
//! ended, write the next checkpoint, then remove the files it replaces (damaged ones
//! are moved aside instead, for inspection).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::checkpoint::{checkpoints, write_checkpoint};
use super::replay::{RecoverError, Recovered, io_at, recover};
use crate::files;

/// Folds the journal up to `upto` into a new checkpoint, pruned as of `now`, and
/// deletes the files it replaces. Returns the state's size, or `None` if there was
/// nothing new to fold.
pub fn fold(dir: &Path, upto: u64, now: i64) -> Result<Option<usize>, RecoverError> {
    let mut rec = recover(dir, Some(upto), |_, _| {})?;
    if rec.replayed == 0 && rec.damaged.is_empty() {
        // Nothing after the checkpoint: the sealed segments are empty or folded.
        let stale: Vec<PathBuf> = rec.segments.iter().map(|(_, p)| p.clone()).collect();
        for p in stale {
            let _ = fs::remove_file(p);
        }
        return Ok(None);
    }
    rec.state.prune(now);
    write_checkpoint(dir, &rec.state, upto).map_err(io_at(dir))?;
    remove_folded(dir, upto, &rec).map_err(io_at(dir))?;
    Ok(Some(rec.state.len()))
}

/// Deletes checkpoints older than `lsn` and the segments `rec` read (all at or
/// below `lsn`); damaged files are kept aside in `damaged/` for inspection.
pub fn remove_folded(dir: &Path, lsn: u64, rec: &Recovered) -> io::Result<()> {
    let damaged: HashSet<&PathBuf> = rec.damaged.iter().map(|(p, _)| p).collect();
    let aside = dir.join("damaged");
    let mut gone: Vec<PathBuf> = rec.segments.iter().map(|(_, p)| p.clone()).collect();
    gone.extend(
        checkpoints(dir)?
            .into_iter()
            .filter(|(l, _)| *l < lsn)
            .map(|(_, p)| p),
    );
    for p in gone {
        if damaged.contains(&p) {
            fs::create_dir_all(&aside)?;
            if let Some(name) = p.file_name() {
                fs::rename(&p, aside.join(name))?;
            }
        } else {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    files::sync_dir(dir)
}
