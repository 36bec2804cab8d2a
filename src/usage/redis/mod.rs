//! Usage shared across replicas through Redis (or a Redis-compatible server).
//!
//! - `strict` (the default): every step is one Lua script (`scripts`) run
//!   atomically by the server; exact across any number of replicas;
//! - `cached`: the local store answers at once and deltas are flushed in the
//!   background; over-admission is bounded by one flush interval plus a round trip.
//!
//! Keys are built in `keys`. Faults: every call is bounded by `timeout` (50 ms);
//! consecutive failures open a circuit breaker (`breaker`) for a cool-down, during
//! which calls skip Redis. While Redis is unusable, `--on-store-error` decides
//! (`fallback`): `local` counts in this replica's memory and adds the deltas to
//! Redis when it returns, `allow` admits without counting, `deny` answers 503.

mod breaker;
mod cached;
mod config;
mod deltas;
mod fallback;
mod keys;
mod scripts;
mod strict;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::live::replica::Conn;

use self::breaker::Breaker;
pub use self::config::{OnError, RedisConfig, StoreMode};
use self::deltas::{Delta, DeltaKey, Inflight, op_id};
use self::keys::Keys;
use super::{Ack, Answered, IdemKey, MemoryStore, SettleAction, StepMeta, StoreError, UsageStore};
use crate::engine::UsageOp;
use crate::engine::UsageOutcome;
use crate::ids::ReservationId;
use crate::time::Timestamp;
use crate::usage::durable::record::Settled;

/// The Redis store. See the module docs.
pub struct RedisStore {
    conn: Conn,
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
    pending: Mutex<HashMap<DeltaKey, Delta>>,
    /// Cached mode: the flush being sent (retried as it is, under the same
    /// operation ids, until Redis answers).
    inflight: Mutex<Option<Inflight>>,
    apply_many: redis::Script,
    dropped: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("mode", &self.cfg.mode)
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily: a Redis that is down at start-up is a fault like any other.
    /// `local` is this replica's own store (with the state directory's journal, for
    /// the ledger).
    pub fn open(cfg: RedisConfig, local: MemoryStore) -> Result<RedisStore, StoreError> {
        let bad = |e: redis::RedisError| {
            StoreError::Fatal(format!("--store {}: {e}", crate::redact::url(&cfg.url)))
        };
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
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, mc)
            .map_err(|e| StoreError::Fatal(format!("--store: {e}")))?;
        Ok(Self::with_conn(cfg, local, Conn::Single(conn)))
    }

    /// With `--store-cluster`: a cluster client, which follows `MOVED` to the node
    /// owning each customer's slot. The cluster must answer at start-up (its slot map
    /// is read then); afterwards its faults are handled as a single node's.
    pub async fn open_cluster(
        cfg: RedisConfig,
        local: MemoryStore,
    ) -> Result<RedisStore, StoreError> {
        let conn = crate::live::replica::connect(
            &cfg.url,
            cfg.ca_file.as_deref(),
            true,
            cfg.timeout.max(Duration::from_secs(1)),
            cfg.timeout,
        )
        .await
        .map_err(StoreError::Fatal)?;
        Ok(Self::with_conn(cfg, local, conn))
    }

    fn with_conn(cfg: RedisConfig, local: MemoryStore, conn: Conn) -> RedisStore {
        crate::metrics::store_degraded(false);
        RedisStore {
            breaker: Breaker::new(&cfg),
            conn,
            quota: redis::Script::new(&[scripts::REMEMBERED, scripts::QUOTA].concat()),
            settle: redis::Script::new(&[scripts::REMEMBERED, scripts::SETTLE].concat()),
            seat: redis::Script::new(&[scripts::REMEMBERED, scripts::SEAT].concat()),
            rate: redis::Script::new(scripts::RATE),
            keys: Keys {
                prefix: cfg.prefix.clone(),
            },
            cfg,
            local,
            pending: Mutex::new(HashMap::new()),
            inflight: Mutex::new(None),
            apply_many: redis::Script::new(scripts::APPLY_MANY),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn local(&self) -> &MemoryStore {
        &self.local
    }

    pub fn mode(&self) -> StoreMode {
        self.cfg.mode
    }

    /// Runs a script within the timeout, through the breaker.
    async fn call(
        &self,
        inv: redis::ScriptInvocation<'_>,
        what: &str,
    ) -> Result<redis::Value, StoreError> {
        if self.breaker.is_open() {
            return Err(StoreError::Unavailable("circuit breaker open".into()));
        }
        let mut conn = self.conn.clone();
        self.breaker
            .bounded(
                inv.invoke_async::<redis::Value>(&mut conn),
                what,
                self.cfg.timeout,
            )
            .await
    }

    /// One PING within the timeout: clears the degraded state when Redis answers.
    async fn probe(&self) {
        let _ = self.ping(self.cfg.timeout).await;
    }

    async fn ping(&self, within: Duration) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        self.breaker
            .bounded(ping.query_async::<String>(&mut conn), "probe", within)
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

    pub fn is_degraded(&self) -> bool {
        self.breaker.is_degraded()
    }
}

fn fingerprint(ik: Option<IdemKey<'_>>) -> String {
    ik.map_or(String::new(), |k| format!("{:016x}", k.fingerprint))
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
    ) -> Result<Answered<UsageOutcome>, StoreError> {
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
    ) -> Option<Result<(Answered<UsageOutcome>, Ack), StoreError>> {
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
    ) -> Result<Answered<Settled>, StoreError> {
        match self.cfg.mode {
            StoreMode::Strict => self.settle_strict(id, action, meta, now).await,
            StoreMode::Cached => {
                let (s, lsn) = self.local.settle_answered(id, action, meta, now)?;
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
        if self.cfg.on_error == OnError::Deny && self.breaker.is_degraded() {
            return Err("the shared usage store is unusable and --on-store-error is deny".into());
        }
        Ok(())
    }
}
