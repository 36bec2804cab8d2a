//! Answering while Redis is unusable, by `--on-store-error`: `local` counts in this
//! replica's memory and adds the deltas to Redis when it returns (into the windows
//! they were counted in, never a later one; deltas of windows that ended meanwhile
//! are dropped); `allow` admits without counting; `deny` answers 503.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::RedisStore;
use super::config::{OnError, StoreMode};
use super::deltas::{Delta, DeltaKey, MAX_CHUNKS, OP_TTL_MS, expire_at_ms, op_id};
use super::scripts::APPLY;
use crate::engine::{QuotaMode, UsageKey, UsageOp, UsageOutcome};
use crate::time::Timestamp;
use crate::usage::{Ack, Answered, StepMeta, StoreError};

impl RedisStore {
    /// Answers by `--on-store-error` while Redis is unusable.
    pub(super) fn fallback(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
        err: StoreError,
        op_id: u64,
    ) -> Result<(Answered<UsageOutcome>, Ack), StoreError> {
        match self.cfg.on_error {
            OnError::Deny => {
                crate::metrics::store_fallback("deny");
                Err(err)
            }
            OnError::Allow => {
                crate::metrics::store_fallback("allow");
                Ok((
                    Answered::fresh(crate::usage::unrun(op, true)),
                    Ack::default(),
                ))
            }
            OnError::Local => {
                crate::metrics::store_fallback("local");
                let (o, lsn) = self.local.step_answered(op, meta, now)?;
                if !o.replayed {
                    self.remember_delta(op, &o.answer, Some(op_id));
                }
                Ok((o, Ack(lsn).filter_sync(&self.local)))
            }
        }
    }

    /// Keeps a locally counted consume for Redis (bounded): as a chunk of its own
    /// when its original call may still reach Redis (`op_id`), else in the open chunk.
    pub(super) fn remember_delta(&self, op: &UsageOp<'_>, o: &UsageOutcome, op_id: Option<u64>) {
        let (
            UsageOp::Quota {
                key,
                window_start,
                window_end,
                amount,
                mode: QuotaMode::Consume,
                ..
            },
            UsageOutcome::Quota {
                admitted: true,
                used_before,
                ..
            },
        ) = (op, o)
        else {
            return;
        };
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        let k: DeltaKey = (key.customer.into(), key.feature.into(), window_start.0);
        if !p.contains_key(&k) {
            if p.len() >= self.cfg.max_pending {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                crate::metrics::store_dropped_delta();
                return;
            }
            // What this replica saw before its first delta is its view of the shared
            // total (after a restart: what it counted itself before).
            p.insert(
                k.clone(),
                Delta {
                    window_end: window_end.0,
                    known: *used_before,
                    key: self.keys.counter(*key, window_start.0).into(),
                    ..Delta::default()
                },
            );
        }
        if let Some(d) = p.get_mut(&k) {
            // Consumes count locally before they reach this lock, in any order: the
            // view before the first of them is the lowest `used_before` (taking the
            // first to arrive here would leave the others' units counted twice in the
            // baseline, and the replica reading low once Redis answers).
            if !d.seen {
                d.known = d.known.min(*used_before);
            }
            match op_id {
                Some(id) if d.chunks.len() < MAX_CHUNKS => d.chunks.push((id, *amount)),
                _ => d.open += amount,
            }
        }
    }

    /// Sends deltas counted here to Redis, into the windows they were counted in
    /// (dropping windows that have ended); in cached mode, brings the others' counts
    /// back into the local counters. While Redis is degraded and nothing waits, it
    /// probes Redis so that readiness returns without traffic. Returns how many
    /// windows were sent.
    pub async fn flush(&self, now: Timestamp) -> Result<usize, StoreError> {
        if self.cfg.mode == StoreMode::Cached {
            return self.flush_cached(now).await;
        }
        // Strict mode: what is pending here are units a fallback counted locally (or
        // steps whose call timed out), sent into their own windows.
        type Batch = Vec<(DeltaKey, i64, Vec<(u64, u64)>)>;
        let batch: Batch = {
            let Ok(mut p) = self.pending.lock() else {
                return Ok(0);
            };
            // Windows that ended are never moved into another one: dropped.
            p.retain(|_, d| d.window_end > now.0);
            p.iter_mut()
                .filter_map(|(k, d)| {
                    if d.open > 0 {
                        d.chunks.push((op_id(), d.open));
                        d.open = 0;
                    }
                    (!d.chunks.is_empty()).then(|| (k.clone(), d.window_end, d.chunks.clone()))
                })
                .collect()
        };
        if batch.is_empty() {
            if self.breaker.is_degraded() && !self.breaker.is_open() {
                self.probe().await;
            }
            return Ok(0);
        }
        if self.breaker.is_open() {
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut pipe = redis::pipe();
        for ((c, f, start), end, chunks) in &batch {
            let key = self.keys.counter(
                UsageKey {
                    customer: c,
                    feature: f,
                },
                *start,
            );
            for (id, units) in chunks {
                pipe.cmd("EVAL")
                    .arg(APPLY)
                    .arg(2)
                    .arg(&key)
                    .arg(self.keys.op(c, *id))
                    .arg(*units)
                    .arg(*end)
                    .arg(expire_at_ms(*end))
                    .arg(OP_TTL_MS);
            }
        }
        let mut conn = self.conn.clone();
        // A timeout leaves it unknown whether Redis applied the pipeline: the chunks
        // stay, and their ids make the retry count each once.
        self.breaker
            .bounded(
                pipe.query_async::<Vec<i64>>(&mut conn),
                "flushing deltas",
                self.cfg.timeout * 4,
            )
            .await?;
        let Ok(mut p) = self.pending.lock() else {
            return Ok(batch.len());
        };
        for (k, _, chunks) in &batch {
            let drained = p.get_mut(k).is_some_and(|e| {
                e.chunks
                    .retain(|(id, _)| !chunks.iter().any(|(s, _)| s == id));
                e.chunks.is_empty() && e.open == 0
            });
            if drained {
                p.remove(k);
            }
        }
        Ok(batch.len())
    }

    /// At a graceful stop: flushes until nothing counted here waits for Redis, or
    /// `within` has passed (deltas still waiting are then lost, and logged).
    pub async fn drain(&self, now: Timestamp, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let sent = self.flush(now).await;
            let waiting = match self.cfg.mode {
                StoreMode::Strict => self.pending_windows(),
                StoreMode::Cached => usize::from(sent.is_err()),
            };
            if waiting == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    windows = waiting,
                    "stopping with usage counted here that Redis never received"
                );
                return;
            }
            tokio::time::sleep(self.cfg.breaker_cooldown.min(Duration::from_millis(100))).await;
        }
    }

    /// Windows whose deltas wait for Redis.
    pub fn pending_windows(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }
}
