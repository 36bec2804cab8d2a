//! Journaling of the store's changes: every consume, reservation, settle, seat change
//! and idempotency key goes to the state directory's journal (see
//! [`crate::usage::durable`]) when the store has one, and nowhere otherwise.
//!
//! Kept apart from the counting so that what makes memory durable is visible in one
//! place: the store changes its maps, then hands the records here; a change and the
//! idempotency key that remembers its answer travel in one frame. With
//! `--durability sync` a reply waits until its change is on disk ([`Journaling::durable`]).

use std::sync::Arc;

use crate::usage::durable::journal::{Journal, Undo};
use crate::usage::durable::record::{EntryRef, Record};
use crate::usage::{Ack, StoreError};

/// What a step leaves to do after the state changed: wait for the journal.
pub(super) type Logged = Option<u64>;

/// The journal a store writes to, if any.
#[derive(Debug, Default)]
pub(super) struct Journaling(Option<Arc<Journal>>);

impl Journaling {
    pub(super) fn new(journal: Option<Arc<Journal>>) -> Self {
        Journaling(journal)
    }

    pub(super) fn journal(&self) -> Option<&Arc<Journal>> {
        self.0.as_ref()
    }

    /// Refuses early, before any state changes, while the journal refuses appends.
    pub(super) fn accepting(&self) -> Result<(), StoreError> {
        if let Some(j) = &self.0 {
            j.accepting()?;
        }
        Ok(())
    }

    /// Journals `record` (if any) and the idempotency key (if any) in one frame. The
    /// key's record is built only when there is a journal to write it to; `undo`
    /// (how to take `record` back should the write fail) only in sync mode.
    pub(super) fn log<'a>(
        &self,
        record: Option<Record<'a>>,
        idem: Option<impl FnOnce() -> Record<'a>>,
        undo: impl FnOnce() -> Option<Undo>,
    ) -> Result<Logged, StoreError> {
        let Some(j) = &self.0 else {
            return Ok(None);
        };
        let idem = idem.map(|f| f());
        let forget = match &idem {
            Some(Record::Idem { customer, key, .. }) => Some((*customer, *key)),
            _ => None,
        };
        let undo = move || {
            let forget = forget.map(|(scope, key)| Undo::Idem {
                scope: scope.into(),
                key: key.into(),
            });
            undo().into_iter().chain(forget).collect()
        };
        let entry = match (record, idem) {
            (None, None) => return Ok(None),
            (Some(r), None) | (None, Some(r)) => j.append(&EntryRef::Records(&[r]), undo)?,
            (Some(r), Some(i)) => j.append(&EntryRef::Records(&[r, i]), undo)?,
        };
        Ok(Some(entry))
    }

    /// The changes of writes the journal refused in sync mode, for the store to take
    /// back (their requests are answered 503).
    pub(super) fn take_undone(&self) -> Vec<Undo> {
        self.0.as_ref().map(|j| j.take_undone()).unwrap_or_default()
    }

    /// What a reply reporting the change at `lsn` must wait for.
    pub(super) fn ack_for(&self, lsn: Logged) -> Ack {
        match &self.0 {
            Some(j) if j.is_sync() => Ack(lsn),
            _ => Ack(None),
        }
    }

    /// In sync mode, waits until `lsn` is on disk.
    pub(super) async fn durable(&self, lsn: Logged) -> Result<(), StoreError> {
        match (&self.0, lsn) {
            (Some(j), Some(lsn)) if j.is_sync() => j.wait_durable(lsn).await,
            _ => Ok(()),
        }
    }
}
