//! How the Redis store is set up: the URL, strict or cached mode, the timeout and
//! circuit breaker, and what to do while Redis is unusable.

use std::time::Duration;

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
    /// `url` names a node of a Redis Cluster.
    pub cluster: bool,
    /// Entries of the shared customer stream kept (approximately).
    pub stream_keep: u64,
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
            cluster: false,
            stream_keep: 100_000,
        }
    }
}
