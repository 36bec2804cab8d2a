//! Usage shared across replicas through Redis (or a Redis-compatible server).
//!
//! **strict** (the default): every quota, reservation, seat, rate-limit and
//! idempotency step is one Lua script run atomically by the server: check and count
//! together, the window key's expiry and its end time set in the same step. Exact
//! across any number of replicas.
//!
//! **cached**: the local store answers at once; deltas are flushed every
//! `flush_interval` in one pipeline and each replica adds what the others counted
//! (the shared total minus what it knew) to its local counters. Over-admission is
//! bounded (README): each replica can admit against a stale view for at most one
//! flush interval plus a round trip.
//!
//! Keys are `<prefix>:{<tag>}:<kind>:<len>:<customer>:<len>:<feature>[:<window>]`:
//! the tag is 16 hex digits of a BLAKE3 hash of the customer id, so one customer's
//! keys share a cluster slot whatever the id contains, and the length-prefixed parts
//! keep `a:b` + `c` and `a` + `b:c` apart. Nothing secret goes into a key.
//!
//! Faults: every call is bounded by `timeout` (50 ms). Consecutive failures open a
//! circuit breaker for a cool-down, during which calls skip Redis. While Redis is
//! unusable, `--on-store-error` decides: `local` counts in this replica's memory and
//! adds the deltas to Redis when it returns (into the windows they were counted in,
//! never a later one; deltas of windows that ended meanwhile are dropped); `allow`
//! admits without counting; `deny` answers 503.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::durable::record::{Record, SettleOutcome, Settled};
use super::memory::{Gcra, MemoryStore};
use super::{Ack, IdemKey, SettleAction, StepMeta, StoreError, UsageStore};
use crate::engine::{QuotaMode, SeatAction, UsageKey, UsageOp, UsageOutcome};
use crate::ids::ReservationId;
use crate::policy::Limit;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    Strict,
    Cached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Count locally; reconcile when Redis returns.
    Local,
    /// Admit without counting.
    Allow,
    /// Answer 503.
    Deny,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub mode: StoreMode,
    pub timeout: Duration,
    pub on_error: OnError,
    pub prefix: String,
    /// Cached mode: how often deltas go to Redis.
    pub flush_interval: Duration,
    /// Consecutive failures that open the breaker, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Most windows with deltas waiting for Redis; beyond, new ones are not kept
    /// for reconciliation (counted in `entitled_store_dropped_deltas_total`).
    pub max_pending: usize,
    /// `rediss://`: trust this CA (PEM) instead of the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            mode: StoreMode::Strict,
            timeout: Duration::from_millis(50),
            on_error: OnError::Local,
            prefix: "entitled".into(),
            flush_interval: Duration::from_millis(100),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_millis(500),
            max_pending: 100_000,
            ca_file: None,
        }
    }
}

/// Prepended to the scripts that take an idempotency key: the answer remembered
/// under `key` for the fingerprint `fp` (`replay`), `reused` for another request's
/// key, or nil for a key not seen (or no key at all).
const REMEMBERED: &str = r#"
local function remembered(key, fp)
  if fp == '' then return nil end
  local prev = redis.call('GET', key)
  if not prev then return nil end
  local pfp, ans = string.match(prev, '^(%S+) (.*)$')
  if pfp ~= fp then return {'reused', ''} end
  return {'replay', ans}
end
"#;

/// Quota check-and-count, and reservations. KEYS: counter, holds, idempotency key,
/// reservation key, operation key. ARGV: amount, limit (-1: unlimited), overage, mode (k check,
/// c consume, r reserve), now µs, window end µs, key expiry (unix ms), idempotency
/// fingerprint ('' for none), idempotency ttl ms, reservation id, hold expiry µs,
/// customer, feature, window start µs, operation ttl ms.
const QUOTA: &str = r#"
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local overage = ARGV[3] == '1'
local mode = ARGV[4]
local now = tonumber(ARGV[5])
local fp = ARGV[8]
local seen = remembered(KEYS[3], fp)
if seen then return seen end
local holds = redis.call('HGETALL', KEYS[2])
for i = 1, #holds, 2 do
  local a, e = string.match(holds[i + 1], '^(%d+) (%-?%d+)')
  if tonumber(e) <= now then
    redis.call('HINCRBY', KEYS[1], 'used', -tonumber(a))
    redis.call('HDEL', KEYS[2], holds[i])
  end
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
if mode == 'c' and not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[15]) then
  -- Already applied (this call timed out and its units were sent again).
  return {'ok', '1 ' .. used .. ' ' .. used}
end
local fits = limit < 0 or used + amount <= limit
local admitted = 0
local after = used
if mode == 'k' then
  if fits or overage then admitted = 1 end
elseif mode == 'c' then
  if fits or overage then
    after = redis.call('HINCRBY', KEYS[1], 'used', amount)
    admitted = 1
  end
elseif fits then
  after = redis.call('HINCRBY', KEYS[1], 'used', amount)
  admitted = 1
  redis.call('HSET', KEYS[2], ARGV[10], amount .. ' ' .. ARGV[11])
  redis.call('PEXPIREAT', KEYS[2], ARGV[7])
  redis.call('HSET', KEYS[4], 'counter', KEYS[1], 'holds', KEYS[2], 'customer', ARGV[12],
    'feature', ARGV[13], 'window_start', ARGV[14], 'window_end', ARGV[6],
    'limit', ARGV[2], 'overage', ARGV[3])
  redis.call('PEXPIREAT', KEYS[4], ARGV[7])
end
if mode ~= 'k' and admitted == 1 then
  redis.call('HSET', KEYS[1], 'window_end', ARGV[6])
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
end
local ans = admitted .. ' ' .. after .. ' ' .. used
if fp ~= '' and mode ~= 'k' then
  redis.call('SET', KEYS[3], fp .. ' ' .. ans, 'PX', ARGV[9])
end
return {'ok', ans}
"#;

/// Commit or release. KEYS: reservation key, counter, holds, idempotency key. ARGV:
/// reservation id, action (c/r), amount, now µs, fingerprint, idempotency ttl ms.
/// Answer: found committed released overage denied used.
const SETTLE: &str = r#"
local fp = ARGV[5]
local seen = remembered(KEYS[4], fp)
if seen then return seen end
local function finish(ans)
  if fp ~= '' then redis.call('SET', KEYS[4], fp .. ' ' .. ans, 'PX', ARGV[6]) end
  return {'ok', ans}
end
local h = redis.call('HGET', KEYS[3], ARGV[1])
local counter = redis.call('HGET', KEYS[1], 'counter')
if (not h) or counter ~= KEYS[2] then return finish('0 0 0 0 0 0') end
local a, e = string.match(h, '^(%d+) (%-?%d+)')
a = tonumber(a)
local now = tonumber(ARGV[4])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or '-1')
local overage = redis.call('HGET', KEYS[1], 'overage') == '1'
if tonumber(e) <= now then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[1])
  redis.call('HINCRBY', KEYS[2], 'used', -a)
  return finish('0 0 0 0 0 0')
end
local actual = tonumber(ARGV[3])
local used
local committed, released, over = 0, 0, 0
if ARGV[2] == 'r' then
  used = redis.call('HINCRBY', KEYS[2], 'used', -a)
  released = a
elseif actual <= a then
  used = redis.call('HINCRBY', KEYS[2], 'used', actual - a)
  committed, released = actual, a - actual
else
  local cur = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
  local extra = actual - a
  if limit >= 0 and cur + extra > limit and not overage then
    return finish('1 0 0 0 1 ' .. cur)
  end
  used = redis.call('HINCRBY', KEYS[2], 'used', extra)
  committed = actual
  if limit >= 0 and used > limit then over = used - math.max(cur, limit) end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
return finish('1 ' .. committed .. ' ' .. released .. ' ' .. over .. ' 0 ' .. used)
"#;

/// Seats. KEYS: pool, idempotency key. ARGV: action (k/a/r), holder ('' none),
/// limit (-1 unlimited), fingerprint, idempotency ttl ms. Answer: admitted used
/// unchanged.
const SEAT: &str = r#"
local fp = ARGV[4]
local seen = remembered(KEYS[2], fp)
if seen then return seen end
local limit = tonumber(ARGV[3])
local n = redis.call('SCARD', KEYS[1])
local holds = ARGV[2] ~= '' and redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1
local ans
if ARGV[1] == 'a' then
  if holds then ans = '1 ' .. n .. ' 1'
  elseif limit >= 0 and n >= limit then ans = '0 ' .. n .. ' 1'
  else redis.call('SADD', KEYS[1], ARGV[2]); ans = '1 ' .. (n + 1) .. ' 0' end
elseif ARGV[1] == 'r' then
  if holds then redis.call('SREM', KEYS[1], ARGV[2]); ans = '1 ' .. (n - 1) .. ' 0'
  else ans = '1 ' .. n .. ' 1' end
else
  local ok = holds or limit < 0 or n < limit
  ans = (ok and '1' or '0') .. ' ' .. n .. ' 1'
end
if fp ~= '' and ARGV[1] ~= 'k' then
  redis.call('SET', KEYS[2], fp .. ' ' .. ans, 'PX', ARGV[5])
end
return {'ok', ans}
"#;

/// GCRA. KEYS: the limiter's theoretical arrival time (µs). ARGV: now µs, cost µs,
/// tau µs, consume (1/0). Answer: admitted tat-before.
const RATE: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local base = math.max(tat, now)
local ok = base + cost - now <= tau
if ok and ARGV[4] == '1' then
  local ttl = math.max(1, math.ceil((base + cost - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%d', base + cost), 'PX', ttl)
end
return {ok and 1 or 0, string.format('%d', tat)}
"#;

/// Lua numbers are doubles: limits and amounts past 2^53 are treated as unlimited.
const LUA_EXACT: u64 = 1 << 53;

fn lua_limit(l: Limit) -> i64 {
    match l {
        Limit::Finite(n) if n < LUA_EXACT => n as i64,
        _ => -1,
    }
}

/// Builds keys (see the module docs).
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn tag(customer: &str) -> String {
        let h = blake3::hash(customer.as_bytes());
        let mut s = String::with_capacity(16);
        for b in &h.as_bytes()[..8] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    fn base(&self, kind: &str, customer: &str, feature: &str) -> String {
        format!(
            "{}:{{{}}}:{kind}:{}:{customer}:{}:{feature}",
            self.prefix,
            Self::tag(customer),
            customer.len(),
            feature.len()
        )
    }

    fn counter(&self, k: UsageKey<'_>, window_start: i64) -> String {
        format!("{}:{window_start}", self.base("q", k.customer, k.feature))
    }

    fn idem(&self, customer: &str, key: &str) -> String {
        format!(
            "{}:{{{}}}:i:{}:{customer}:{}:{key}",
            self.prefix,
            Self::tag(customer),
            customer.len(),
            key.len()
        )
    }

    fn op(&self, customer: &str, id: u64) -> String {
        format!("{}:{{{}}}:o:{id:016x}", self.prefix, Self::tag(customer))
    }

    /// A reservation id carries its customer's tag in its high 64 bits, so the
    /// reservation's key lands in the customer's slot.
    fn reservation_id(customer: &str) -> ReservationId {
        let tag = u64::from_str_radix(&Self::tag(customer), 16).unwrap_or(0);
        let random = uuid::Uuid::new_v4().as_u128() as u64;
        ((tag as u128) << 64) | random as u128
    }

    fn reservation(&self, id: ReservationId) -> String {
        format!("{}:{{{:016x}}}:r:{id:032x}", self.prefix, (id >> 64) as u64)
    }

    fn reservation_idem(&self, id: ReservationId, key: &str) -> String {
        format!(
            "{}:{{{:016x}}}:i:r:{id:032x}:{}:{key}",
            self.prefix,
            (id >> 64) as u64,
            key.len()
        )
    }
}

#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// Until when calls skip Redis (ms since `epoch`); 0 when closed.
    open_until_ms: AtomicI64,
}

/// A window's units counted here and not yet in Redis.
///
/// Units go to Redis in chunks, each with an operation id that Redis remembers for
/// [`OP_TTL_MS`]: a chunk sent twice (a flush that timed out after Redis ran it, and
/// its retry) counts once, and a consume that timed out and was counted here carries
/// the id its original call had, so whichever of the two reaches Redis second does
/// nothing.
#[derive(Debug, Clone, Default)]
struct Delta {
    window_end: i64,
    /// Units counted since the last flush, not in a chunk yet.
    open: u64,
    /// Chunks waiting for Redis: (operation id, units).
    chunks: Vec<(u64, u64)>,
    /// Cached mode: the shared total this replica last saw.
    known: u64,
    /// `known` came from Redis (a flush answered); before that it is this replica's
    /// view before its first delta.
    seen: bool,
    /// The window's key in Redis, built once.
    key: Box<str>,
}

/// How long Redis remembers an operation id: far longer than a call can sit in a
/// socket before Redis runs it (every late execution happens as Redis resumes).
const OP_TTL_MS: i64 = 60_000;

/// Most chunks kept per window; beyond, units join the open chunk.
const MAX_CHUNKS: usize = 10_000;

/// Adds a chunk of units once per operation id. KEYS: counter, operation key. ARGV:
/// units, window end µs, key expiry (unix ms), operation ttl ms. Answers the total.
const APPLY: &str = r#"
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then
  local t = redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
  redis.call('HSET', KEYS[1], 'window_end', ARGV[2])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  return t
end
return tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
"#;

/// Cached mode's flush: many windows in one call, once per operation id. KEYS: the
/// operation key, then counters. ARGV: operation ttl ms, then per counter: units,
/// window end µs, key expiry (unix ms). Answers each counter's total.
const APPLY_MANY: &str = r#"
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local out = {}
for i = 2, #KEYS do
  local j = (i - 2) * 3 + 2
  local u = tonumber(ARGV[j])
  if fresh and u > 0 then
    local t = redis.call('HINCRBY', KEYS[i], 'used', u)
    out[#out + 1] = t
    if t == u then
      -- A new window key: its end and expiry, once.
      redis.call('HSET', KEYS[i], 'window_end', ARGV[j + 1])
      redis.call('PEXPIREAT', KEYS[i], ARGV[j + 2])
    end
  else
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[i], 'used') or '0')
  end
end
return out
"#;

/// Windows per cached-mode flush call.
const FLUSH_CALL: usize = 1_000;

/// A cached-mode flush on its way: its id and, per window, the units it adds.
#[derive(Debug)]
struct Inflight {
    id: u64,
    /// (window, its key, window end, units)
    windows: Vec<(DeltaKey, Box<str>, i64, u64)>,
}

fn op_id() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

type DeltaKey = (Box<str>, Box<str>, i64);

/// The Redis store. See the module docs.
pub struct RedisStore {
    conn: ConnectionManager,
    quota: redis::Script,
    settle: redis::Script,
    seat: redis::Script,
    rate: redis::Script,
    keys: Keys,
    cfg: RedisConfig,
    /// This replica's own view: the fallback in `local` mode, the cache in cached
    /// mode, and (through its journal) the ledger of what this replica admitted.
    local: MemoryStore,
    breaker: Breaker,
    epoch: Instant,
    pending: Mutex<HashMap<DeltaKey, Delta>>,
    /// Cached mode: the flush being sent (retried as it is, under the same
    /// operation ids, until Redis answers).
    inflight: Mutex<Option<Inflight>>,
    apply_many: redis::Script,
    dropped: AtomicU64,
    degraded: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("mode", &self.cfg.mode)
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

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

impl RedisStore {
    /// Connects lazily: a Redis that is down at start-up is a fault like any other.
    /// `local` is this replica's own store (with the state directory's journal, for
    /// the ledger).
    pub fn open(cfg: RedisConfig, local: MemoryStore) -> Result<RedisStore, StoreError> {
        let bad =
            |e: redis::RedisError| StoreError::Fatal(format!("--store {}: {e}", redact(&cfg.url)));
        let client = match &cfg.ca_file {
            None => redis::Client::open(cfg.url.as_str()).map_err(bad)?,
            Some(path) => {
                let root = std::fs::read(path).map_err(|e| {
                    StoreError::Fatal(format!("--store-ca-file {}: {e}", path.display()))
                })?;
                redis::Client::build_with_tls(
                    cfg.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root),
                    },
                )
                .map_err(bad)?
            }
        };
        // Establishing a connection (TCP, TLS handshake, AUTH) may take longer than a
        // call should: every call is bounded by `timeout` on its own, and answered by
        // --on-store-error meanwhile, while the connection attempt is given a second
        // so that a slow handshake completes instead of failing for ever.
        let mc = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, mc)
            .map_err(|e| StoreError::Fatal(format!("--store: {e}")))?;
        crate::metrics::store_degraded(false);
        Ok(RedisStore {
            conn,
            quota: redis::Script::new(&[REMEMBERED, QUOTA].concat()),
            settle: redis::Script::new(&[REMEMBERED, SETTLE].concat()),
            seat: redis::Script::new(&[REMEMBERED, SEAT].concat()),
            rate: redis::Script::new(RATE),
            keys: Keys {
                prefix: cfg.prefix.clone(),
            },
            cfg,
            local,
            breaker: Breaker::default(),
            epoch: Instant::now(),
            pending: Mutex::new(HashMap::new()),
            inflight: Mutex::new(None),
            apply_many: redis::Script::new(APPLY_MANY),
            dropped: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
        })
    }

    pub fn local(&self) -> &MemoryStore {
        &self.local
    }

    pub fn mode(&self) -> StoreMode {
        self.cfg.mode
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    fn breaker_open(&self) -> bool {
        let until = self.breaker.open_until_ms.load(Ordering::Acquire);
        until != 0 && self.now_ms() < until
    }

    fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Release);
        self.breaker.open_until_ms.store(0, Ordering::Release);
        if self.degraded.swap(false, Ordering::AcqRel) {
            crate::metrics::store_degraded(false);
            tracing::info!("Redis answers again");
        }
    }

    fn failed(&self, e: &StoreError) {
        crate::metrics::store_error();
        let n = self.breaker.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.cfg.breaker_failures {
            let until = self.now_ms() + self.cfg.breaker_cooldown.as_millis() as i64;
            self.breaker.open_until_ms.store(until, Ordering::Release);
        }
        if !self.degraded.swap(true, Ordering::AcqRel) {
            crate::metrics::store_degraded(true);
            tracing::warn!(error = %e, on_error = ?self.cfg.on_error, "Redis unusable; answering by --on-store-error");
        }
    }

    /// Runs a script within the timeout, through the breaker.
    async fn call(
        &self,
        inv: redis::ScriptInvocation<'_>,
        what: &str,
    ) -> Result<redis::Value, StoreError> {
        if self.breaker_open() {
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut conn = self.conn.clone();
        self.bounded(
            inv.invoke_async::<redis::Value>(&mut conn),
            what,
            self.cfg.timeout,
        )
        .await
    }

    /// Awaits one exchange with Redis for at most `limit`, and feeds the breaker. A
    /// script error is fatal; anything else (refused, reset, timed out) is a fault
    /// worth the fail mode.
    async fn bounded<T>(
        &self,
        exchange: impl std::future::Future<Output = redis::RedisResult<T>>,
        what: &str,
        limit: Duration,
    ) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(limit, exchange).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "{what}: no answer within {limit:?}"
            ))),
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                Err(StoreError::Fatal(format!("{what}: {e}")))
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("{what}: {e}"))),
            Ok(Ok(v)) => Ok(v),
        };
        match &r {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        r
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

    /// Answers by `--on-store-error` while Redis is unusable.
    fn fallback(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
        err: StoreError,
        op_id: u64,
    ) -> Result<(UsageOutcome, Ack), StoreError> {
        match self.cfg.on_error {
            OnError::Deny => {
                crate::metrics::store_fallback("deny");
                Err(err)
            }
            OnError::Allow => {
                crate::metrics::store_fallback("allow");
                Ok((super::unrun(op, true), Ack::default()))
            }
            OnError::Local => {
                crate::metrics::store_fallback("local");
                let (o, lsn) = self.local.step(op, meta, now)?;
                self.remember_delta(op, &o, Some(op_id));
                Ok((o, Ack(lsn).filter_sync(&self.local)))
            }
        }
    }

    /// Keeps a locally counted consume for Redis (bounded): as a chunk of its own
    /// when its original call may still reach Redis (`op_id`), else in the open chunk.
    fn remember_delta(&self, op: &UsageOp<'_>, o: &UsageOutcome, op_id: Option<u64>) {
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
            if self.is_degraded() && !self.breaker_open() {
                self.probe().await;
            }
            return Ok(0);
        }
        if self.breaker_open() {
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
        self.bounded(
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

    /// Cached mode: every live window's units since the last flush, in calls of
    /// [`FLUSH_CALL`] windows; each answer's totals bring the others' counts into the
    /// local counters.
    async fn flush_cached(&self, now: Timestamp) -> Result<usize, StoreError> {
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
            if self.is_degraded() && !self.breaker_open() {
                self.probe().await;
            }
            return Ok(0);
        }
        if self.breaker_open() {
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
        self.succeeded();
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

    /// One PING within the timeout: clears the degraded state when Redis answers.
    async fn probe(&self) {
        let _ = self.ping(self.cfg.timeout).await;
    }

    async fn ping(&self, within: Duration) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        self.bounded(ping.query_async::<String>(&mut conn), "probe", within)
            .await
    }

    /// At start-up, before serving: establishes the connection (TCP, TLS, AUTH) within
    /// `within`, so that the first requests do not spend their --store-timeout on the
    /// handshake and fall back. A Redis that is not there yet is a fault like any
    /// other: logged, answered by --on-store-error, retried in the background.
    pub async fn connect(&self, within: Duration) {
        if let Err(e) = self.ping(within).await {
            tracing::warn!(error = %e, "Redis not reachable at start-up; serving by --on-store-error until it is");
        }
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

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    async fn strict(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
        op_id: u64,
    ) -> Result<(UsageOutcome, Ack), StoreError> {
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
                let (n, replay) = match Self::reply(v, "quota", meta.idempotency.map(|i| i.key))? {
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
                Ok((o, ack))
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
                    g.outcome(tat_ns, admitted, admitted && consume),
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
                let (n, replay) = match Self::reply(v, "seat", meta.idempotency.map(|i| i.key))? {
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
                Ok((o, ack))
            }
        }
    }

    fn idem_ttl_ms(&self) -> i64 {
        (self.local.config().idempotency_ttl_us / 1_000).max(1)
    }

    async fn settle_strict(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<Settled, StoreError> {
        let rkey = self.keys.reservation(id);
        if self.breaker_open() {
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut conn = self.conn.clone();
        let mut read = redis::cmd("HGETALL");
        read.arg(&rkey);
        let fields = self
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
            return Ok(not_found());
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
        let (n, replay) = match Self::reply(v, "settle", meta.idempotency.map(|i| i.key))? {
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
        Ok(Settled {
            outcome,
            customer,
            feature,
            window_start,
        })
    }
}

fn not_found() -> Settled {
    Settled {
        outcome: SettleOutcome::default(),
        customer: String::new(),
        feature: String::new(),
        window_start: 0,
    }
}

/// Keys outlive their window by a day, for late commits and reads; the reset time
/// itself is stored in the key, not inferred from its expiry.
fn expire_at_ms(window_end_us: i64) -> i64 {
    (window_end_us / 1_000).saturating_add(86_400_000)
}

fn fingerprint(ik: Option<IdemKey<'_>>) -> String {
    ik.map_or(String::new(), |k| format!("{:016x}", k.fingerprint))
}

/// Hides a password in a URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl Ack {
    /// Only sync durability makes a reply wait.
    fn filter_sync(self, local: &MemoryStore) -> Ack {
        match local.journal() {
            Some(j) if j.is_sync() => self,
            _ => Ack(None),
        }
    }
}

impl UsageStore for RedisStore {
    async fn apply(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<UsageOutcome, StoreError> {
        let (o, ack) = match self.cfg.mode {
            StoreMode::Cached => self.cached(op, meta, now)?,
            StoreMode::Strict => {
                let id = op_id();
                match self.strict(op, meta, now, id).await {
                    Ok(r) => r,
                    Err(e @ (StoreError::KeyReused(_) | StoreError::InFlight(_))) => {
                        return Err(e);
                    }
                    Err(e) => self.fallback(op, meta, now, e, id)?,
                }
            }
        };
        self.local.ack(ack).await?;
        Ok(o)
    }

    fn try_now(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Option<Result<(UsageOutcome, Ack), StoreError>> {
        match self.cfg.mode {
            StoreMode::Cached => Some(self.cached(op, meta, now)),
            StoreMode::Strict => None,
        }
    }

    async fn ack(&self, ack: Ack) -> Result<(), StoreError> {
        self.local.ack(ack).await
    }

    async fn settle(
        &self,
        id: ReservationId,
        action: SettleAction,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<Settled, StoreError> {
        match self.cfg.mode {
            StoreMode::Strict => self.settle_strict(id, action, meta, now).await,
            StoreMode::Cached => {
                let (s, lsn) = self.local.settle(id, action, meta, now)?;
                self.local.ack(Ack(lsn).filter_sync(&self.local)).await?;
                Ok(s)
            }
        }
    }

    fn expire(&self, now: Timestamp) -> usize {
        self.local.expire(now)
    }

    fn maintain(&self, now: Timestamp, minute: bool) {
        self.local.maintain(now, minute);
    }

    fn ready(&self) -> Result<(), String> {
        if self.cfg.on_error == OnError::Deny && self.is_degraded() {
            return Err("the shared usage store is unusable and --on-store-error is deny".into());
        }
        Ok(())
    }
}

impl RedisStore {
    /// Cached mode: the local store answers; consumes are kept for the next flush.
    fn cached(
        &self,
        op: &UsageOp<'_>,
        meta: &StepMeta<'_>,
        now: Timestamp,
    ) -> Result<(UsageOutcome, Ack), StoreError> {
        let (o, lsn) = self.local.step(op, meta, now)?;
        self.remember_delta(op, &o, None);
        Ok((o, Ack(lsn).filter_sync(&self.local)))
    }
}
