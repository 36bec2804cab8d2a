//! Usage state rebuilt from the state directory: the newest checkpoint, then every
//! journal record after it, in lsn order.
//!
//! The same replay serves start-up and checkpointing: the checkpointer seals the
//! journal at some lsn, replays checkpoint and sealed segments into a [`State`] off the
//! request path, drops what has ended (windows, reservations, idempotency keys), and
//! writes the result as the next checkpoint. A checkpoint is itself a run of records
//! that rebuilds the state from nothing, so one decoder reads both.
//!
//! Counters hold committed units only; open holds are kept as reservations and added
//! back to their windows when the state is loaded into the store.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::journal;
use super::memory::Hold;
use super::record::{
    self, Answer, Damage, Encoded, Entry, EntryRef, FORMAT_VERSION, Record, ReservationId,
};
use crate::policy::Limit;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// (customer, feature) → holders.
type SeatPools = Map<(Box<str>, Box<str>), HashSet<Box<str>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub end: i64,
    /// Committed units (not counting open holds).
    pub used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemState {
    pub fingerprint: u64,
    pub expires: i64,
    pub answer: Answer,
}

#[derive(Debug, Default)]
pub struct State {
    pub quotas: Map<(Box<str>, Box<str>, i64), QuotaState>,
    pub holds: Map<ReservationId, Hold>,
    pub seats: SeatPools,
    pub idem: Map<(Box<str>, Box<str>), IdemState>,
}

impl State {
    pub fn apply(&mut self, r: &Record<'_>) {
        match *r {
            Record::Consume {
                customer,
                feature,
                window_start,
                window_end,
                amount,
                ..
            } => self.count(customer, feature, window_start, window_end, amount),
            Record::Reserve {
                id,
                customer,
                feature,
                window_start,
                window_end,
                amount,
                limit,
                allow_overage,
                expires,
                ..
            } => {
                self.holds.insert(
                    id,
                    Hold {
                        customer: customer.into(),
                        feature: feature.into(),
                        window_start,
                        window_end,
                        amount,
                        limit: limit.map_or(Limit::Unlimited, Limit::Finite),
                        allow_overage,
                        expires,
                    },
                );
            }
            Record::Settle {
                id,
                customer,
                feature,
                window_start,
                window_end,
                committed,
                ..
            } => {
                self.holds.remove(&id);
                if committed > 0 {
                    self.count(customer, feature, window_start, window_end, committed);
                }
            }
            Record::Seat {
                customer,
                feature,
                holder,
                acquire,
                ..
            } => {
                let key = (Box::from(customer), Box::from(feature));
                if acquire {
                    self.seats.entry(key).or_default().insert(holder.into());
                } else if let Some(pool) = self.seats.get_mut(&key) {
                    pool.remove(holder);
                    if pool.is_empty() {
                        self.seats.remove(&key);
                    }
                }
            }
            Record::Idem {
                customer,
                key,
                fingerprint,
                expires,
                ref answer,
            } => {
                self.idem.insert(
                    (customer.into(), key.into()),
                    IdemState {
                        fingerprint,
                        expires,
                        answer: answer.clone(),
                    },
                );
            }
        }
    }

    fn count(&mut self, customer: &str, feature: &str, start: i64, end: i64, n: u64) {
        let q = self
            .quotas
            .entry((customer.into(), feature.into(), start))
            .or_insert(QuotaState { end, used: 0 });
        q.used = q.used.saturating_add(n);
    }

    /// Drops what has ended by `now`: quota windows, reservations (their units go
    /// back to the quota, which holds committed units only) and idempotency keys.
    pub fn prune(&mut self, now: i64) {
        self.quotas.retain(|_, q| q.end > now);
        self.holds.retain(|_, h| h.expires > now);
        self.idem.retain(|_, e| e.expires > now);
    }

    pub fn len(&self) -> usize {
        self.quotas.len() + self.holds.len() + self.seats.len() + self.idem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records that rebuild this state from nothing.
    fn records(&self) -> impl Iterator<Item = Record<'_>> {
        let quotas = self
            .quotas
            .iter()
            .map(|((c, f, start), q)| Record::Consume {
                customer: c,
                feature: f,
                window_start: *start,
                window_end: q.end,
                amount: q.used,
                overage: 0,
                time: 0,
                snapshot: "",
            });
        let holds = self.holds.iter().map(|(id, h)| Record::Reserve {
            id: *id,
            customer: &h.customer,
            feature: &h.feature,
            window_start: h.window_start,
            window_end: h.window_end,
            amount: h.amount,
            limit: match h.limit {
                Limit::Finite(n) => Some(n),
                Limit::Unlimited => None,
            },
            allow_overage: h.allow_overage,
            expires: h.expires,
            time: 0,
        });
        let seats = self.seats.iter().flat_map(|((c, f), pool)| {
            pool.iter().map(move |h| Record::Seat {
                customer: c,
                feature: f,
                holder: h,
                acquire: true,
                time: 0,
                snapshot: "",
            })
        });
        let idem = self.idem.iter().map(|((c, k), e)| Record::Idem {
            customer: c,
            key: k,
            fingerprint: e.fingerprint,
            expires: e.expires,
            answer: e.answer.clone(),
        });
        quotas.chain(holds).chain(seats).chain(idem)
    }
}

pub fn checkpoint_name(lsn: u64) -> String {
    format!("checkpoint-{lsn:020}.ckpt")
}

/// Files in `dir` named `<prefix><number><suffix>`, by number.
pub fn numbered(dir: &Path, prefix: &str, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push((n, e.path()));
    }
    out.sort();
    Ok(out)
}

/// Checkpoints in `dir`, by lsn.
pub fn checkpoints(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    numbered(dir, "checkpoint-", ".ckpt")
}

/// Writes `state` as the checkpoint of `lsn`: to a temporary file, synced, then
/// renamed into place (and the directory synced), so a checkpoint is whole or absent.
pub fn write_checkpoint(dir: &Path, state: &State, lsn: u64) -> io::Result<PathBuf> {
    let path = dir.join(checkpoint_name(lsn));
    let tmp = dir.join(format!("{}.tmp", checkpoint_name(lsn)));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut enc = Encoded::default();
    let bad = |e: postcard::Error| io::Error::other(e.to_string());
    enc.set(&Entry::CheckpointStart {
        format: FORMAT_VERSION,
        lsn,
    })
    .map_err(bad)?;
    enc.frame(0, &mut buf);
    let mut n = 0u64;
    for r in state.records() {
        enc.set(&EntryRef::Records(&[r])).map_err(bad)?;
        enc.frame(0, &mut buf);
        n += 1;
        if buf.len() >= 1 << 16 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    enc.set(&Entry::CheckpointEnd { records: n }).map_err(bad)?;
    enc.frame(0, &mut buf);
    w.write_all(&buf)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}

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
}

impl Recovered {
    /// Records lost to damage (a torn tail is one partial record).
    pub fn lost_records(&self) -> u64 {
        self.damaged
            .iter()
            .map(|(_, d)| d.regions + u64::from(d.torn_tail))
            .sum()
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

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RecoverError + '_ {
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
        if end != Some(records) && damage.is_clean() {
            // Whole frames missing (a checkpoint cut short): at least one lost.
            damage.regions += 1;
        }
        if !damage.is_clean() {
            rec.damaged.push((path.clone(), damage));
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
    File::open(dir)?.sync_all()?;
    Ok(())
}
