//! Checkpoints: the state as of one lsn, written as a run of records that rebuilds it
//! from nothing (so one decoder reads checkpoints and journal segments alike).
//!
//! A checkpoint is written to a temporary file, synced, renamed into place and its
//! directory synced ([`files::replace`]), so after a crash it is whole or absent.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::record::{Encoded, Entry, EntryRef, FORMAT_VERSION, Record};
use super::state::State;
use crate::files;
use crate::policy::Limit;

impl State {
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

/// Checkpoints in `dir`, by lsn.
pub fn checkpoints(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    files::numbered(dir, "checkpoint-", ".ckpt")
}

/// Writes `state` as the checkpoint of `lsn`: to a temporary file, synced, then
/// renamed into place (and the directory synced), so a checkpoint is whole or absent.
pub fn write_checkpoint(dir: &Path, state: &State, lsn: u64) -> io::Result<PathBuf> {
    let path = dir.join(checkpoint_name(lsn));
    files::replace(&path, |w| {
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
        w.write_all(&buf)
    })?;
    Ok(path)
}
