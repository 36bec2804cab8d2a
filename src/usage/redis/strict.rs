//! Strict mode: every quota, reservation, seat, rate-limit and idempotency step is
//! one Lua script run atomically by the server: check and count together, the window
//! key's expiry and its end time set in the same step. Exact across any number of
//! replicas. This replica's own store journals what it admitted, for its ledger.

use std::collections::HashMap;

use super::deltas::{OP_TTL_MS, expire_at_ms};
use super::keys::Keys;
use super::scripts::lua_limit;
use super::{RedisStore, fingerprint};
use crate::engine::{QuotaMode, SeatAction, UsageOp, UsageOutcome};
use crate::ids::ReservationId;
use crate::time::Timestamp;
use crate::usage::durable::record::{Record, SettleOutcome, Settled};
use crate::usage::memory::Gcra;
use crate::usage::{Ack, Answered, SettleAction, StepMeta, StoreError, UsageStore};

/// What a script answered.
enum Reply {
    Ok(Vec<u64>),
    Replay(Vec<u64>),
}

fn numbers(s: &str) -> Vec<u64> {
    s.split(' ')
        .map(|p| p.parse::<i64>().map_or(0, |n| n.max(0) as u64))
        .collect()
}

fn fatal(what: &str) -> StoreError {
    StoreError::Fatal(format!("unexpected answer from Redis to {what}"))
}

fn reply(v: redis::Value, what: &str, key: Option<&str>) -> Result<Reply, StoreError> {
    let items: Vec<redis::Value> = redis::from_redis_value(v).map_err(|_| fatal(what))?;
    let text = |v: &redis::Value| -> Option<String> { redis::from_redis_value(v.clone()).ok() };
    let status = items.first().and_then(text).ok_or_else(|| fatal(what))?;
    let body = items.get(1).and_then(text).unwrap_or_default();
    match status.as_str() {
        "ok" => Ok(Reply::Ok(numbers(&body))),
        "replay" => {
            crate::metrics::idempotent_replay();
            Ok(Reply::Replay(numbers(&body)))
        }
        "reused" => Err(StoreError::KeyReused(key.unwrap_or_default().to_string())),
        _ => Err(fatal(what)),
    }
}

impl RedisStore {
    /// Runs one step as one script. One arm per kind of step, each the whole of its
    /// exchange (keys, arguments, answer, and this replica's own record of what it
    /// admitted), kept side by side so the three read alike.
    pub(super) async fn strict(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
        op_id: u64,
    ) -> Result<(Answered<UsageOutcome>, Ack), StoreError> {
        match *op {
            UsageOp::Quota {
                key,
                window_start,
                window_end,
                limit,
                amount,
                mode,
                allow_overage,
            } => {
                let counter = self.keys.counter(key, window_start.0);
                let holds = format!("{counter}:h");
                let idem = meta
                    .idempotency
                    .map(|ik| self.keys.idem(key.customer, ik.key));
                let reservation =
                    (mode == QuotaMode::Reserve).then(|| Keys::reservation_id(key.customer));
                let ttl = meta
                    .ttl_us
                    .unwrap_or(self.local.config().reservation_ttl_us)
                    .clamp(1, self.local.config().max_reservation_ttl_us);
                let hold_expires = now.0.saturating_add(ttl);
                let mut inv = self.quota.prepare_invoke();
                inv.key(&counter)
                    .key(&holds)
                    .key(idem.as_deref().unwrap_or(&counter))
                    .key(reservation.map_or(counter.clone(), |id| self.keys.reservation(id)))
                    .key(self.keys.op(key.customer, op_id))
                    .arg(amount)
                    .arg(lua_limit(limit))
                    .arg(u8::from(allow_overage))
                    .arg(match mode {
                        QuotaMode::Check => "k",
                        QuotaMode::Consume => "c",
                        QuotaMode::Reserve => "r",
                    })
                    .arg(now.0)
                    .arg(window_end.0)
                    .arg(expire_at_ms(window_end.0.max(hold_expires)))
                    .arg(fingerprint(meta.idempotency))
                    .arg(self.idem_ttl_ms())
                    .arg(reservation.map_or(String::new(), |id| format!("{id:032x}")))
                    .arg(hold_expires)
                    .arg(key.customer)
                    .arg(key.feature)
                    .arg(window_start.0)
                    .arg(OP_TTL_MS);
                let v = self.call(inv, "quota").await?;
                let (n, replay) = match reply(v, "quota", meta.idempotency.map(|i| i.key))? {
                    Reply::Ok(n) => (n, false),
                    Reply::Replay(n) => (n, true),
                };
                let (admitted, used, used_before) = (
                    n.first().copied().unwrap_or(0) == 1,
                    n.get(1).copied().unwrap_or(0),
                    n.get(2).copied().unwrap_or(0),
                );
                let o = match mode {
                    QuotaMode::Reserve => UsageOutcome::Reserved {
                        admitted,
                        used,
                        used_before,
                        reservation: reservation.filter(|_| admitted && !replay),
                    },
                    _ => UsageOutcome::Quota {
                        admitted,
                        used,
                        used_before,
                    },
                };
                let mut ack = Ack::default();
                if mode == QuotaMode::Consume && admitted && !replay {
                    // This replica's ledger (and own view) of what it admitted.
                    let local_op = UsageOp::Quota {
                        key,
                        window_start,
                        window_end,
                        limit,
                        amount,
                        mode,
                        allow_overage: true,
                    };
                    let local_meta = StepMeta {
                        idempotency: None,
                        ..*meta
                    };
                    if let Ok((_, lsn)) = self.local.step(&local_op, &local_meta, now) {
                        ack = Ack(lsn).filter_sync(&self.local);
                    }
                }
                Ok((
                    Answered {
                        answer: o,
                        replayed: replay,
                    },
                    ack,
                ))
            }
            UsageOp::Rate {
                key,
                limit,
                per_us,
                burst,
                amount,
                consume,
            } => {
                let g = Gcra::new(limit, per_us, burst, amount, now);
                let cost_us = (g.cost.saturating_add(999)) / 1_000;
                let tau_us = g.tau / 1_000;
                let mut inv = self.rate.prepare_invoke();
                inv.key(self.keys.base("g", key.customer, key.feature))
                    .arg(now.0)
                    .arg(cost_us)
                    .arg(tau_us)
                    .arg(u8::from(consume));
                let v = self.call(inv, "rate").await?;
                let items: (i64, String) = redis::from_redis_value(v).map_err(|_| fatal("rate"))?;
                let tat_ns = items.1.parse::<i64>().unwrap_or(0).saturating_mul(1_000);
                let admitted = items.0 == 1;
                Ok((
                    Answered::fresh(g.outcome(tat_ns, admitted, admitted && consume)),
                    Ack::default(),
                ))
            }
            UsageOp::Seat {
                key,
                limit,
                holder,
                action,
            } => {
                let pool = self.keys.base("s", key.customer, key.feature);
                let idem = meta
                    .idempotency
                    .map(|ik| self.keys.idem(key.customer, ik.key));
                let mut inv = self.seat.prepare_invoke();
                inv.key(&pool)
                    .key(idem.as_deref().unwrap_or(&pool))
                    .arg(match (action, holder) {
                        (SeatAction::Acquire, Some(_)) => "a",
                        (SeatAction::Release, Some(_)) => "r",
                        _ => "k",
                    })
                    .arg(holder.unwrap_or(""))
                    .arg(lua_limit(limit))
                    .arg(fingerprint(meta.idempotency))
                    .arg(self.idem_ttl_ms());
                let v = self.call(inv, "seat").await?;
                let (n, replay) = match reply(v, "seat", meta.idempotency.map(|i| i.key))? {
                    Reply::Ok(n) => (n, false),
                    Reply::Replay(n) => (n, true),
                };
                let o = UsageOutcome::Seat {
                    admitted: n.first().copied().unwrap_or(0) == 1,
                    used: n.get(1).copied().unwrap_or(0),
                    unchanged: n.get(2).copied().unwrap_or(1) == 1,
                };
                let mut ack = Ack::default();
                if let (
                    UsageOutcome::Seat {
                        unchanged: false, ..
                    },
                    Some(h),
                    false,
                ) = (o, holder, replay)
                {
                    let record = Record::Seat {
                        customer: key.customer,
                        feature: key.feature,
                        holder: h,
                        acquire: action == SeatAction::Acquire,
                        time: now.0,
                        snapshot: meta.snapshot,
                    };
                    if let Ok(lsn) = self.local.journal_record(record) {
                        ack = Ack(lsn).filter_sync(&self.local);
                    }
                }
                Ok((
                    Answered {
                        answer: o,
                        replayed: replay,
                    },
                    ack,
                ))
            }
        }
    }

    pub(super) fn idem_ttl_ms(&self) -> i64 {
        (self.local.config().idempotency_ttl_us / 1_000).max(1)
    }

    pub(super) async fn settle_strict(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<Answered<Settled>, StoreError> {
        let rkey = self.keys.reservation(id);
        if self.breaker.is_open() {
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut conn = self.conn.clone();
        let mut read = redis::cmd("HGETALL");
        read.arg(&rkey);
        let fields = self
            .breaker
            .bounded(
                read.query_async::<HashMap<String, String>>(&mut conn),
                "reservation",
                self.cfg.timeout,
            )
            .await?;
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let counter = get("counter");
        let holds = get("holds");
        let customer = get("customer");
        let feature = get("feature");
        let window_start: i64 = get("window_start").parse().unwrap_or(0);
        let window_end: i64 = get("window_end").parse().unwrap_or(0);
        let limit = get("limit")
            .parse::<i64>()
            .ok()
            .filter(|l| *l >= 0)
            .map(|l| l as u64);
        let idem = meta
            .idempotency
            .map(|ik| self.keys.reservation_idem(id, ik.key));
        if counter.is_empty() && idem.is_none() {
            return Ok(Answered::fresh(Settled::not_found()));
        }
        let (counter, holds) = if counter.is_empty() {
            // Maybe a replay of a settled reservation: the idempotency key answers.
            (rkey.clone(), rkey.clone())
        } else {
            (counter, holds)
        };
        let mut inv = self.settle.prepare_invoke();
        inv.key(&rkey)
            .key(&counter)
            .key(&holds)
            .key(idem.as_deref().unwrap_or(&rkey))
            .arg(format!("{id:032x}"))
            .arg(match action {
                SettleAction::Commit(_) => "c",
                SettleAction::Release => "r",
            })
            .arg(match action {
                SettleAction::Commit(n) => n,
                SettleAction::Release => 0,
            })
            .arg(now.0)
            .arg(fingerprint(meta.idempotency))
            .arg(self.idem_ttl_ms());
        let v = self.call(inv, "settle").await?;
        let (n, replay) = match reply(v, "settle", meta.idempotency.map(|i| i.key))? {
            Reply::Ok(n) => (n, false),
            Reply::Replay(n) => (n, true),
        };
        let at = |i: usize| n.get(i).copied().unwrap_or(0);
        let outcome = SettleOutcome {
            found: at(0) == 1,
            committed: at(1),
            released: at(2),
            overage: at(3),
            denied: at(4) == 1,
            used: at(5),
            limit,
            window_end,
        };
        if outcome.found && !outcome.denied && outcome.committed > 0 && !replay {
            let record = Record::Settle {
                id,
                customer: &customer,
                feature: &feature,
                window_start,
                window_end,
                committed: outcome.committed,
                overage: outcome.overage,
                time: now.0,
                snapshot: meta.snapshot,
            };
            if let Ok(lsn) = self.local.journal_record(record) {
                self.local.ack(Ack(lsn).filter_sync(&self.local)).await?;
            }
        }
        Ok(Answered {
            answer: Settled {
                outcome,
                customer,
                feature,
                window_start,
            },
            replayed: replay,
        })
    }
}
