//! The loops a serving sidecar runs beside its listeners: usage upkeep every second,
//! the metrics recorder's upkeep, and with a shared store the flush of deltas counted
//! here.
//!
//! Both are tokio tasks holding the `App`; the sidecar aborts them once it has
//! drained, so nothing outlives the state directory they write to.

use std::sync::Arc;
use std::time::Duration;

use crate::server::App;
use crate::time::Timestamp;
use crate::usage::redis::RedisStore;
use crate::usage::{MemoryStore, UsageStore};

/// Something that moves usage to a shared store in the background.
pub(super) trait Flush: UsageStore + 'static {
    fn flush(&self, now: Timestamp) -> impl std::future::Future<Output = ()> + Send;
    /// At a graceful stop: everything counted here reaches the shared store (bounded).
    fn drain(&self, now: Timestamp) -> impl std::future::Future<Output = ()> + Send;
}

impl Flush for MemoryStore {
    async fn flush(&self, _now: Timestamp) {}
    async fn drain(&self, _now: Timestamp) {}
}

impl Flush for RedisStore {
    async fn flush(&self, now: Timestamp) {
        if let Err(e) = RedisStore::flush(self, now).await {
            tracing::debug!(error = %e, "deltas wait for Redis");
        }
    }

    async fn drain(&self, now: Timestamp) {
        RedisStore::drain(self, now, Duration::from_secs(5)).await;
    }
}

/// How often the Prometheus recorder folds recorded histogram samples into its
/// buckets when nobody scrapes.
const METRICS_UPKEEP_EVERY_S: u64 = 5;

/// Expired reservations go back to their quotas within a second; counters of
/// ended windows are dead weight, dropped every minute.
///
/// The Prometheus recorder keeps every histogram sample (one per decision) until it
/// folds them into buckets, which a scrape does, or its upkeep: without a scraper, or
/// with one that is down, the samples would pile up for ever (about 2 MB/s at 100k
/// decisions/s). So its upkeep runs here too, whoever scrapes.
pub(super) async fn upkeep<S: Flush>(app: Arc<App<S>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let d = &app.decider;
        d.store
            .maintain(d.clock.now_background(), n.is_multiple_of(60));
        if n.is_multiple_of(METRICS_UPKEEP_EVERY_S)
            && let Some(p) = &app.prometheus
        {
            p.run_upkeep();
        }
    }
}

/// Sends the deltas counted here to the shared store every `every`.
pub(super) async fn flush<S: Flush>(app: Arc<App<S>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let d = &app.decider;
        d.store.flush(d.clock.now_background()).await;
    }
}
