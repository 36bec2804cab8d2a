//! Usage state rebuilt from the state directory: the newest checkpoint, then every
//! journal record after it, in lsn order.
//!
//! The same replay serves start-up and checkpointing: the checkpointer seals the
//! journal at some lsn, replays checkpoint and sealed segments into a [`State`] off the
//! request path (see [`super::fold`]), drops what has ended (windows, reservations,
//! idempotency keys), and writes the result as the next checkpoint.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::checkpoint::checkpoints;
use super::journal;
use super::record::{self, Damage, Entry, FORMAT_VERSION, Record};
use super::state::State;

/// What a replay found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub state: State,
    /// The checkpoint it started from (0: none).
    pub checkpoint_lsn: u64,
    /// The last lsn replayed.
    pub last_lsn: u64,
    /// Journal records replayed after the checkpoint.
    pub replayed: u64,
    /// Files with damage, and what was lost in each.
    pub damaged: Vec<(PathBuf, Damage)>,
    /// Journal segments read (first lsn, path).
    pub segments: Vec<(u64, PathBuf)>,
    /// When the checkpoint was damaged: the state read from what was left of it, before
    /// any journal record (what the ledger is compared with to restore the rest).
    pub damaged_checkpoint: Option<State>,
}

impl Recovered {
    /// Records lost to damage (a torn tail is one partial record).
    pub fn lost_records(&self) -> u64 {
        self.damaged.iter().map(|(_, d)| d.lost_records()).sum()
    }
}

/// The state directory holds something this version cannot read.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(
        "{path}: written by state format version {found}; this entitled reads up to version {FORMAT_VERSION}. Run a newer entitled, or point --state-dir at another directory"
    )]
    NewerFormat { path: String, found: u32 },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

pub(super) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RecoverError + '_ {
    move |source| RecoverError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Replays the newest checkpoint and the journal segments after it, up to `upto`
/// (everything if `None`). `each` sees every journal record replayed, in order.
pub fn recover(
    dir: &Path,
    upto: Option<u64>,
    mut each: impl FnMut(u64, &Record<'_>),
) -> Result<Recovered, RecoverError> {
    let mut rec = Recovered::default();
    let ckpts = checkpoints(dir).map_err(io_at(dir))?;
    if let Some((lsn, path)) = ckpts
        .iter()
        .rev()
        .find(|(l, _)| upto.is_none_or(|u| *l <= u))
    {
        let buf = fs::read(path).map_err(io_at(path))?;
        let (frames, mut damage) = record::decode_all(&buf);
        rec.state.quotas.reserve(frames.len());
        let mut records = 0u64;
        let mut end = None;
        for f in &frames {
            match &f.entry {
                Entry::CheckpointStart { format, .. } if *format > FORMAT_VERSION => {
                    return Err(RecoverError::NewerFormat {
                        path: path.display().to_string(),
                        found: *format,
                    });
                }
                Entry::CheckpointStart { .. } => {}
                Entry::CheckpointEnd { records } => end = Some(*records),
                Entry::Records(rs) => {
                    for r in rs {
                        rec.state.apply(r);
                    }
                    records += 1;
                }
            }
        }
        match end {
            // The end frame says how many records the checkpoint holds.
            Some(n) => damage.records = n.saturating_sub(records),
            // No end frame (a checkpoint cut short, or empty): at least one lost.
            None if damage.is_clean() => damage.regions += 1,
            None => {}
        }
        if !damage.is_clean() {
            rec.damaged.push((path.clone(), damage));
            rec.damaged_checkpoint = Some(rec.state.clone());
        }
        rec.checkpoint_lsn = *lsn;
        rec.last_lsn = *lsn;
    }
    for (first, path) in journal::segments(dir).map_err(io_at(dir))? {
        if upto.is_some_and(|u| first > u) {
            continue;
        }
        let buf = fs::read(&path).map_err(io_at(&path))?;
        let (frames, damage) = record::decode_all(&buf);
        for f in &frames {
            if f.lsn <= rec.last_lsn || upto.is_some_and(|u| f.lsn > u) {
                continue;
            }
            if let Entry::Records(rs) = &f.entry {
                for r in rs {
                    rec.state.apply(r);
                    each(f.lsn, r);
                }
            }
            rec.last_lsn = f.lsn;
            rec.replayed += 1;
        }
        if !damage.is_clean() {
            rec.damaged.push((path.clone(), damage));
        }
        rec.segments.push((first, path));
    }
    Ok(rec)
}
