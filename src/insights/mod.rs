//! The "monitor and optimize" report: which features and plans have customers hitting
//! their limits (upsell candidates), which entitlements are granted but unused, where
//! overrides are made and by whom, and why requests are denied; and each customer's
//! recent denials.
//!
//! The decision path reports to an [`InsightsSink`]: denials always, an allowed
//! decision once per customer, feature, plan and day per worker thread (a small
//! direct-mapped cache of hashes, so a busy customer costs a hash and a compare). It
//! only enqueues to this module's thread — bounded by a count in flight, drops counted
//! in `entitled_insights_dropped_total` — which folds the events into an
//! [`Aggregate`] bounded whatever the number of customers (see its docs) and, with a
//! state directory, saves it there (`insights.bin`) every [`SAVE_EVERY`] and at stop.
//! No customer id ever becomes a metric label. The report joins the aggregation with
//! the served snapshot (who is granted what, which overrides exist) when asked.

mod aggregate;
mod hll;
mod report;

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use aggregate::{
    Aggregate, CELLS_PER_DAY, Event, NAMES, RECENT_CUSTOMERS, RECENT_PER_CUSTOMER, RETAIN_DAYS,
    RecentDenial, Totals, is_limit,
};
pub use hll::{Hll, customer_hash};
pub use report::{DenialCount, LimitHit, OverrideCount, Unused, UsageReport, build};

use crate::engine::Reason;
use crate::time::{DAY, Timestamp};

/// The file the aggregation is kept in, in the state directory.
pub const FILE: &str = "insights.bin";
/// How often a changed aggregation is saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);
/// Events waiting for the aggregation thread, at most.
pub const QUEUE: usize = 65_536;

enum Msg {
    Event(Event),
    /// Answered once every event sent before it is folded in.
    Sync(tokio::sync::oneshot::Sender<()>),
    /// As `Sync`, and saved before the answer.
    Save(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// The running aggregation: its thread and the state it folds events into.
#[derive(Debug)]
pub struct Insights {
    state: Arc<Mutex<Aggregate>>,
    tx: Sender<Msg>,
    in_flight: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the decision path reports. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct InsightsSink {
    tx: Sender<Msg>,
    in_flight: Arc<AtomicUsize>,
}

impl std::fmt::Debug for InsightsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InsightsSink").finish_non_exhaustive()
    }
}

/// Slots of the per-thread cache of allowed (customer, feature, plan, day) already
/// reported (64 KiB per worker thread).
const SEEN_SLOTS: usize = 8192;

thread_local! {
    static SEEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

impl InsightsSink {
    /// Reports a decision: `plan` is the plan whose grant decided, if one did.
    pub fn decided(
        &self,
        customer: &str,
        feature: &str,
        plan: Option<&str>,
        reason: Reason,
        now: Timestamp,
    ) {
        if reason == Reason::Granted {
            let day = now.0.div_euclid(DAY);
            let h = foldhash::fast::FixedState::with_seed(0x5eed)
                .hash_one((customer, feature, plan, day))
                | 1;
            let fresh = SEEN.with(|s| {
                let mut s = s.borrow_mut();
                if s.is_empty() {
                    s.resize(SEEN_SLOTS, 0);
                }
                match s.get_mut((h as usize) % SEEN_SLOTS) {
                    Some(slot) if *slot == h => false,
                    Some(slot) => {
                        *slot = h;
                        true
                    }
                    None => true,
                }
            });
            if !fresh {
                return;
            }
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= QUEUE {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::insights_dropped();
            return;
        }
        let e = Event {
            at: now,
            customer: customer.into(),
            feature: feature.into(),
            plan: plan.map(Into::into),
            reason,
        };
        if self.tx.send(Msg::Event(e)).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Insights {
    /// Starts the aggregation thread, with the aggregation read back from
    /// `state_dir` (`None`: kept in memory only). An unreadable file is set aside
    /// (`insights.bin.bad`) and the aggregation starts empty: it is a report, not
    /// state a decision depends on.
    pub fn start(state_dir: Option<&Path>) -> std::io::Result<Insights> {
        let path = state_dir.map(|d| d.join(FILE));
        let agg = match &path {
            None => Aggregate::default(),
            Some(p) => match Aggregate::load(p) {
                Ok(a) => a.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "the usage aggregation could not be read; starting a new one");
                    let _ = std::fs::rename(p, p.with_extension("bin.bad"));
                    Aggregate::default()
                }
            },
        };
        let state = Arc::new(Mutex::new(agg));
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            state: state.clone(),
            in_flight: in_flight.clone(),
            path,
        };
        let thread = std::thread::Builder::new()
            .name("entitled-insights".into())
            .spawn(move || worker.run(&rx))?;
        Ok(Insights {
            state,
            tx,
            in_flight,
            thread: Some(thread),
        })
    }

    pub fn sink(&self) -> InsightsSink {
        InsightsSink {
            tx: self.tx.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Waits until every event reported before this call is folded in.
    pub async fn sync(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Folds in every event reported before this call and saves the aggregation (with
    /// a state directory): at shutdown, after the last request.
    pub async fn save(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Save(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The aggregation, locked (briefly: the thread folds events under this lock).
    pub fn read(&self) -> MutexGuard<'_, Aggregate> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Insights {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    state: Arc<Mutex<Aggregate>>,
    in_flight: Arc<AtomicUsize>,
    path: Option<PathBuf>,
}

impl Worker {
    fn run(&self, rx: &mpsc::Receiver<Msg>) {
        let mut dirty = false;
        let mut saved = Instant::now();
        loop {
            let first = match rx.recv_timeout(SAVE_EVERY) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut replies = Vec::new();
            let mut save_now = false;
            let mut stop = false;
            {
                let mut agg = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for m in first.into_iter().chain(rx.try_iter()) {
                    match m {
                        Msg::Event(e) => {
                            self.in_flight.fetch_sub(1, Ordering::AcqRel);
                            agg.add(&e);
                            dirty = true;
                        }
                        Msg::Sync(r) => replies.push(r),
                        Msg::Save(r) => {
                            replies.push(r);
                            save_now = true;
                        }
                        Msg::Stop => stop = true,
                    }
                }
            }
            if dirty && (stop || save_now || saved.elapsed() >= SAVE_EVERY) {
                self.save();
                dirty = false;
                saved = Instant::now();
            }
            for r in replies {
                let _ = r.send(());
            }
            if stop {
                return;
            }
        }
        if dirty {
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let copy = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Err(e) = copy.save(path) {
            tracing::error!(error = %e, file = %path.display(), "saving the usage aggregation failed");
        }
    }
}
