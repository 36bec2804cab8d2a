//! Idempotency keys: a retry with the same key and the same request gets the first
//! answer again and counts nothing; the same key on another request is refused.
//!
//! A key is claimed (marked in flight) before its step runs and given the step's
//! answer after, so two racing retries cannot both count.
//!
//! Only an answer that changed something is remembered ([`remembered`]): a denial
//! counts nothing, so its key is freed and a retry is decided afresh. Otherwise
//! every refused request with a fresh key would grow the table and the journal. The
//! table holds at most `--idempotency-max-keys`; when it is full a new key is
//! refused ([`StoreError::KeysFull`]) instead of the table growing.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use super::journaling::Logged;
use super::keys::Hasher_;
use crate::time::Timestamp;
use crate::usage::durable::record::{Answer, Record};
use crate::usage::{IdemKey, StoreConfig, StoreError};

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
pub(super) struct IdemKeys {
    map: DashMap<(Box<str>, Box<str>), IdemEntry, Hasher_>,
    /// Entries in `map`, kept beside it: the cap is checked on every new key, and
    /// `DashMap::len` locks every shard.
    live: AtomicUsize,
}

impl IdemKeys {
    /// Claims an idempotency key: its answer if it has one, `None` if this request
    /// is the first (the key is now marked in flight). A new key is refused while
    /// the table holds `config.idempotency_max_keys`.
    pub(super) fn begin(
        &self,
        scope: &str,
        ik: &IdemKey<'_>,
        now: Timestamp,
        config: &StoreConfig,
    ) -> Result<Option<(Answer, Logged)>, StoreError> {
        use dashmap::mapref::entry::Entry as E;
        let ttl_us = config.idempotency_ttl_us;
        match self.map.entry((scope.into(), ik.key.into())) {
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
                let max = config.idempotency_max_keys;
                if self.live.fetch_add(1, Ordering::AcqRel) >= max {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                    crate::metrics::idempotency_key_refused();
                    return Err(StoreError::KeysFull(max));
                }
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

    /// Records the answer of a claimed key, or frees the key if the step failed or
    /// its answer is not worth remembering.
    pub(super) fn end(&self, scope: &str, ik: &IdemKey<'_>, done: Option<(Answer, Logged)>) {
        let probe: (Box<str>, Box<str>) = (scope.into(), ik.key.into());
        match done {
            Some((answer, lsn)) if remembered(&answer) => {
                if let Some(mut e) = self.map.get_mut(&probe) {
                    e.answer = Some(answer);
                    e.lsn = lsn;
                }
            }
            _ => {
                if self.map.remove(&probe).is_some() {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Forgets a key whose answer was taken back (its change was refused by the
    /// journal): a retry is decided afresh.
    pub(super) fn forget(&self, scope: Box<str>, key: Box<str>) {
        if self.map.remove(&(scope, key)).is_some() {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Forgets expired keys (never one still in flight).
    pub(super) fn expire(&self, now: Timestamp) {
        let mut dropped = 0;
        self.map.retain(|_, e| {
            let keep = e.expires > now.0 || e.answer.is_none();
            dropped += usize::from(!keep);
            keep
        });
        self.live.fetch_sub(dropped, Ordering::AcqRel);
    }

    /// Loads a recovered key (whatever the cap: it holds an answer given already).
    pub(super) fn insert(&self, key: (Box<str>, Box<str>), entry: IdemEntry) {
        if self.map.insert(key, entry).is_none() {
            self.live.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

/// Whether a key keeps this answer for its retries: only when the request changed
/// something. A denied consume, reserve or seat acquisition, and a commit or release
/// of a reservation that is not open (or a commit that did not fit), changed
/// nothing: deciding a retry afresh is as safe, and keeps refused traffic from
/// growing the table and the journal.
pub(super) fn remembered(answer: &Answer) -> bool {
    use crate::engine::UsageOutcome as U;
    match answer {
        Answer::Usage(
            U::Quota { admitted, .. }
            | U::Reserved { admitted, .. }
            | U::Rate { admitted, .. }
            | U::Seat { admitted, .. },
        ) => *admitted,
        Answer::Settle(s) => s.outcome.found && !s.outcome.denied,
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

#[cfg(test)]
mod tests {
    use crate::engine::{QuotaMode, UsageOp, UsageOutcome};
    use crate::policy::Limit;
    use crate::time::{HOUR, Timestamp};
    use crate::usage::memory::keys::KEY;
    use crate::usage::{IdemKey, MemoryStore, StepMeta, StoreConfig, StoreError};

    const NOW: Timestamp = Timestamp(1_800_000_000_000_000);

    fn consume(limit: u64) -> UsageOp<'static> {
        UsageOp::Quota {
            key: KEY,
            window_start: Timestamp(0),
            window_end: Timestamp::MAX,
            limit: Limit::Finite(limit),
            amount: 1,
            mode: QuotaMode::Consume,
            allow_overage: false,
        }
    }

    fn keyed(key: &str) -> StepMeta<'_> {
        StepMeta {
            idempotency: Some(IdemKey {
                key,
                fingerprint: 1,
            }),
            ..StepMeta::default()
        }
    }

    fn admitted(o: UsageOutcome) -> bool {
        matches!(o, UsageOutcome::Quota { admitted: true, .. })
    }

    #[test]
    fn denied_steps_leave_no_key() {
        let s = MemoryStore::new();
        assert!(admitted(s.run(&consume(1), NOW)));
        for i in 0..100 {
            let (o, _) = s.step(&consume(1), &keyed(&format!("k{i}")), NOW).unwrap();
            assert!(!admitted(o), "{o:?}");
        }
        assert_eq!(s.counts().idempotency_keys, 0, "denials were remembered");
    }

    #[test]
    fn a_full_table_refuses_new_keys_until_some_expire() {
        let s = MemoryStore::with_journal(
            None,
            StoreConfig {
                idempotency_max_keys: 2,
                idempotency_ttl_us: HOUR,
                ..StoreConfig::default()
            },
        );
        for k in ["a", "b"] {
            assert!(admitted(s.step(&consume(10), &keyed(k), NOW).unwrap().0));
        }
        let full = s.step(&consume(10), &keyed("c"), NOW);
        assert_eq!(full.unwrap_err(), StoreError::KeysFull(2));
        let (replay, _) = s.step_answered(&consume(10), &keyed("a"), NOW).unwrap();
        assert!(replay.replayed, "{replay:?}");
        assert_eq!(s.quota_counters(), 1);
        assert_eq!(s.counts().idempotency_keys, 2);
        s.expire(NOW.saturating_add(HOUR));
        assert_eq!(s.counts().idempotency_keys, 0);
        assert!(admitted(
            s.step(&consume(10), &keyed("c"), NOW.saturating_add(HOUR))
                .unwrap()
                .0
        ));
    }
}
