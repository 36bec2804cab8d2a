//! Idempotency keys: a retry with the same key and the same request gets the first
//! answer again and counts nothing; the same key on another request is refused.
//!
//! A key is claimed (marked in flight) before its step runs and given the step's
//! answer after, so two racing retries cannot both count.

use dashmap::DashMap;

use super::journaling::Logged;
use super::keys::Hasher_;
use crate::time::Timestamp;
use crate::usage::durable::record::{Answer, Record};
use crate::usage::{IdemKey, StoreError};

/// A remembered idempotency key.
#[derive(Debug, Clone)]
pub(super) struct IdemEntry {
    pub(super) fingerprint: u64,
    pub(super) expires: i64,
    /// `None` while the first request is still running.
    pub(super) answer: Option<Answer>,
    /// The journal record that holds it (sync mode waits for it on a retry too).
    pub(super) lsn: Option<u64>,
}

/// Remembered keys, by (scope, key): the scope is the customer, or the reservation
/// for a commit or release.
#[derive(Debug, Default)]
pub(super) struct IdemKeys(DashMap<(Box<str>, Box<str>), IdemEntry, Hasher_>);

impl IdemKeys {
    /// Claims an idempotency key: its answer if it has one, `None` if this request
    /// is the first (the key is now marked in flight).
    pub(super) fn begin(
        &self,
        scope: &str,
        ik: &IdemKey<'_>,
        now: Timestamp,
        ttl_us: i64,
    ) -> Result<Option<(Answer, Logged)>, StoreError> {
        use dashmap::mapref::entry::Entry as E;
        match self.0.entry((scope.into(), ik.key.into())) {
            E::Occupied(mut e) => {
                let v = e.get();
                if v.expires <= now.0 {
                    e.insert(IdemEntry {
                        fingerprint: ik.fingerprint,
                        expires: now.0.saturating_add(ttl_us),
                        answer: None,
                        lsn: None,
                    });
                    return Ok(None);
                }
                if v.fingerprint != ik.fingerprint {
                    return Err(reused(ik.key));
                }
                match &v.answer {
                    Some(a) => {
                        crate::metrics::idempotent_replay();
                        Ok(Some((a.clone(), v.lsn)))
                    }
                    None => Err(StoreError::InFlight(ik.key.to_string())),
                }
            }
            E::Vacant(e) => {
                e.insert(IdemEntry {
                    fingerprint: ik.fingerprint,
                    expires: now.0.saturating_add(ttl_us),
                    answer: None,
                    lsn: None,
                });
                Ok(None)
            }
        }
    }

    /// Records the answer of a claimed key, or frees the key if the step failed.
    pub(super) fn end(&self, scope: &str, ik: &IdemKey<'_>, done: Option<(Answer, Logged)>) {
        let probe: (Box<str>, Box<str>) = (scope.into(), ik.key.into());
        match done {
            Some((answer, lsn)) => {
                if let Some(mut e) = self.0.get_mut(&probe) {
                    e.answer = Some(answer);
                    e.lsn = lsn;
                }
            }
            None => {
                self.0.remove(&probe);
            }
        }
    }

    /// Forgets a key whose answer was taken back (its change was refused by the
    /// journal): a retry is decided afresh.
    pub(super) fn forget(&self, scope: Box<str>, key: Box<str>) {
        self.0.remove(&(scope, key));
    }

    /// Forgets expired keys (never one still in flight).
    pub(super) fn expire(&self, now: Timestamp) {
        self.0
            .retain(|_, e| e.expires > now.0 || e.answer.is_none());
    }

    /// Loads a recovered key.
    pub(super) fn insert(&self, key: (Box<str>, Box<str>), entry: IdemEntry) {
        self.0.insert(key, entry);
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// The journal record that remembers a key's answer.
pub(super) fn record<'a>(
    scope: &'a str,
    ik: &IdemKey<'a>,
    answer: Answer,
    now: Timestamp,
    ttl_us: i64,
) -> Record<'a> {
    Record::Idem {
        customer: scope,
        key: ik.key,
        fingerprint: ik.fingerprint,
        expires: now.0.saturating_add(ttl_us),
        answer,
    }
}

pub(super) fn reused(key: &str) -> StoreError {
    StoreError::KeyReused(key.to_string())
}
