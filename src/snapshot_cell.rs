//! The current snapshot, shared by every request.
//!
//! Writers (the reloader) swap a new `Arc<Snapshot>` in with `arc-swap`; readers never
//! lock. Each thread keeps an `arc_swap::Cache` of the last snapshot it saw, so a read
//! is one atomic load compared with the cached pointer (~2 ns) instead of a full
//! `ArcSwap::load` (~20 ns here). The cost: an idle thread holds the previous snapshot
//! until its next request, so up to one superseded snapshot per thread stays alive.
//!
//! Every swap, from a policy reload or a customer write alike, also bumps a change
//! count on a `tokio::sync::watch` channel, so that whoever must tell clients about a
//! change (the OFREP event stream) learns of it without polling or a hook in each
//! writer.

use std::cell::RefCell;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use arc_swap::cache::Cache;
use tokio::sync::watch;

use crate::policy::Snapshot;

type Slot = Arc<ArcSwapOption<Snapshot>>;

/// A shareable handle to "the current snapshot, if any".
#[derive(Debug, Clone)]
pub struct SnapshotCell {
    slot: Slot,
    /// How many snapshots were stored: watchers wake on each. A `watch` keeps only the
    /// latest count, so a slow watcher sees one change for several swaps, never a
    /// queue.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for SnapshotCell {
    fn default() -> Self {
        SnapshotCell {
            slot: Slot::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

thread_local! {
    /// Per thread: one cache per cell (tests run several servers in one process).
    static CACHES: RefCell<Vec<Cache<Slot, Option<Arc<Snapshot>>>>> = const { RefCell::new(Vec::new()) };
}

impl SnapshotCell {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes a new snapshot. Readers see it on their next read.
    pub fn store(&self, snapshot: Arc<Snapshot>) {
        self.slot.store(Some(snapshot));
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver woken after every [`Self::store`]; its value counts the stores.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// An owned reference, for work that outlives one synchronous step (awaiting a
    /// remote store).
    pub fn load_full(&self) -> Option<Arc<Snapshot>> {
        self.slot.load_full()
    }

    /// Runs `f` with the current snapshot, read through this thread's cache.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(Option<&Snapshot>) -> R) -> R {
        CACHES.with(|caches| match caches.try_borrow_mut() {
            Ok(mut caches) => {
                let i = match caches
                    .iter()
                    .position(|c| std::ptr::eq(c.arc_swap(), &*self.slot))
                {
                    Some(i) => i,
                    None => {
                        caches.push(Cache::new(self.slot.clone()));
                        caches.len() - 1
                    }
                };
                f(caches[i].load().as_deref())
            }
            // Re-entered from inside `f`: read without the cache.
            Err(_) => f(self.slot.load().as_deref()),
        })
    }
}
