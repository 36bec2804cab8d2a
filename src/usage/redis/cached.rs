//! Cached mode: the local store answers at once; deltas are flushed every
//! `flush_interval` in one pipeline and each replica adds what the others counted
//! (the shared total minus what it knew) to its local counters. Over-admission is
//! bounded (README): each replica can admit against a stale view for at most one
//! flush interval plus a round trip.

use super::RedisStore;
use super::deltas::{FLUSH_CALL, Inflight, OP_TTL_MS, expire_at_ms, op_id};
use crate::engine::{UsageKey, UsageOp, UsageOutcome};
use crate::time::Timestamp;
use crate::usage::{Ack, Answered, StepMeta, StoreError};

impl RedisStore {
    /// Cached mode: every live window's units since the last flush, in calls of
    /// [`FLUSH_CALL`] windows; each answer's totals bring the others' counts into the
    /// local counters.
    pub(super) async fn flush_cached(&self, now: Timestamp) -> Result<usize, StoreError> {
        let taken = self.inflight.lock().ok().and_then(|mut f| f.take());
        let batch = match taken {
            Some(b) => b,
            None => {
                let Ok(mut p) = self.pending.lock() else {
                    return Ok(0);
                };
                p.retain(|_, d| d.window_end > now.0);
                let windows = p
                    .iter_mut()
                    .map(|(k, d)| {
                        let units = std::mem::take(&mut d.open);
                        (k.clone(), d.key.clone(), d.window_end, units)
                    })
                    .collect();
                Inflight {
                    id: op_id(),
                    windows,
                }
            }
        };
        if batch.windows.is_empty() {
            if self.breaker.is_degraded() && !self.breaker.is_open() {
                self.probe().await;
            }
            return Ok(0);
        }
        if self.breaker.is_open() {
            if let Ok(mut f) = self.inflight.lock() {
                *f = Some(batch);
            }
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut totals: Vec<i64> = Vec::with_capacity(batch.windows.len());
        for (i, part) in batch.windows.chunks(FLUSH_CALL).enumerate() {
            let mut inv = self.apply_many.prepare_invoke();
            inv.key(format!("{}:o:{:016x}:{i}", self.cfg.prefix, batch.id))
                .arg(OP_TTL_MS);
            for (_, key, end, units) in part {
                inv.key(&**key)
                    .arg(*units)
                    .arg(*end)
                    .arg(expire_at_ms(*end));
            }
            let mut conn = self.conn.clone();
            let r = self
                .breaker
                .bounded(
                    inv.invoke_async::<Vec<i64>>(&mut conn),
                    "flushing deltas",
                    self.cfg.timeout * 4,
                )
                .await;
            match r {
                Ok(t) if t.len() == part.len() => totals.extend(t),
                Ok(_) | Err(_) => {
                    // Sent again as it is: the calls that did land count nothing twice.
                    if let Ok(mut f) = self.inflight.lock() {
                        *f = Some(batch);
                    }
                    return Err(StoreError::Unavailable(
                        "flushing deltas failed or timed out".into(),
                    ));
                }
            }
        }
        self.breaker.succeeded();
        let Ok(mut p) = self.pending.lock() else {
            return Ok(batch.windows.len());
        };
        for (((c, f, start), _, end, units), total) in batch.windows.iter().zip(totals) {
            let k = (c.clone(), f.clone(), *start);
            let Some(d) = p.get_mut(&k) else { continue };
            // Others counted whatever the total grew by beyond our own units.
            let others = total - d.known as i64 - *units as i64;
            if others != 0 {
                self.local.add_to_quota(
                    UsageKey {
                        customer: c,
                        feature: f,
                    },
                    *start,
                    *end,
                    others,
                );
            }
            d.known = total.max(0) as u64;
            d.seen = true;
        }
        Ok(batch.windows.len())
    }

    /// Cached mode: the local store answers; consumes are kept for the next flush.
    pub(super) fn cached(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(Answered<UsageOutcome>, Ack), StoreError> {
        let (o, lsn) = self.local.step_answered(op, meta, now)?;
        if !o.replayed {
            self.remember_delta(op, &o.answer, None);
        }
        Ok((o, Ack(lsn).filter_sync(&self.local)))
    }
}
