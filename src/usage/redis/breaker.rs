//! The circuit breaker in front of Redis: consecutive failures open it for a
//! cool-down, during which calls skip Redis (and are answered by `--on-store-error`)
//! instead of each waiting out the timeout. It also tracks whether Redis is degraded,
//! for readiness, the degraded gauge, and one log line per change.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::config::{OnError, RedisConfig};
use crate::usage::StoreError;

#[derive(Debug)]
pub(super) struct Breaker {
    failures: AtomicU32,
    /// Until when calls skip Redis (ms since `epoch`); 0 when closed.
    open_until_ms: AtomicI64,
    epoch: Instant,
    degraded: AtomicBool,
    /// Consecutive failures that open the breaker, and how long it stays open.
    failures_to_open: u32,
    cooldown: Duration,
    /// What answers meanwhile (named in the log).
    on_error: OnError,
}

impl Breaker {
    pub(super) fn new(cfg: &RedisConfig) -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            epoch: Instant::now(),
            degraded: AtomicBool::new(false),
            failures_to_open: cfg.breaker_failures,
            cooldown: cfg.breaker_cooldown,
            on_error: cfg.on_error,
        }
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Whether calls skip Redis now.
    pub(super) fn is_open(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        until != 0 && self.now_ms() < until
    }

    pub(super) fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until_ms.store(0, Ordering::Release);
        if self.degraded.swap(false, Ordering::AcqRel) {
            crate::metrics::store_degraded(false);
            tracing::info!("Redis answers again");
        }
    }

    pub(super) fn failed(&self, e: &StoreError) {
        crate::metrics::store_error();
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.failures_to_open {
            let until = self.now_ms() + self.cooldown.as_millis() as i64;
            self.open_until_ms.store(until, Ordering::Release);
        }
        if !self.degraded.swap(true, Ordering::AcqRel) {
            crate::metrics::store_degraded(true);
            tracing::warn!(error = %e, on_error = ?self.on_error, "Redis unusable; answering by --on-store-error");
        }
    }

    /// Awaits one exchange with Redis for at most `limit`, and feeds the breaker. A
    /// script error is fatal; anything else (refused, reset, timed out) is a fault
    /// worth the fail mode.
    pub(super) async fn bounded<T>(
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

    pub(super) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }
}
