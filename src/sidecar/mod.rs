//! The sidecar assembled: policy reload, audit log, renewal notices, usage state
//! (in memory, on disk, or shared through Redis) and the HTTP, gRPC and metrics
//! listeners, from one [`Config`].
//!
//! [`Sidecar::start`] opens and binds everything, so the caller learns the bound
//! addresses before anything is served; [`Sidecar::serve`] serves until a shutdown
//! future completes, then drains (requests in flight, deltas for the shared store)
//! and closes the state directory — the shape of mini-redis's `server::run(listener,
//! shutdown)`. What belongs to the process stays with its owner: the tokio runtime
//! (a sidecar runs on whichever runtime calls it), the log subscriber, the
//! Prometheus recorder (passed in as [`Config::prometheus`]) and the signals. Tests
//! start many sidecars side by side in one process.

mod args;
mod background;
mod config;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use args::{DurabilityMode, OnErrorArg, ServeArgs, StoreModeArg, Thresholds};
pub use config::{Config, ConfigError, LiveConfig};

use crate::audit::Audit;
use crate::decide::{Decider, Observer};
use crate::insights::Insights;
use crate::live::replica::{Replica, ReplicaConfig};
use crate::live::{AdminTokens, Live, Publisher, Writes};
use crate::metrics::DecisionMetrics;
use crate::notices::{self, Notices};
use crate::reload::{self, ReloadConfig, ReloadState, Reloader};
use crate::server::{self, App};
use crate::snapshot_cell::SnapshotCell;
use crate::time::{Clock, CoarseClock, ManualClock};
use crate::usage::MemoryStore;
use crate::usage::StoreError;
use crate::usage::durable::{StateDir, StateError};
use crate::usage::redis::RedisStore;
use background::Flush;

/// Why a sidecar did not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("starting the audit log in {}", dir.display())]
    Audit {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the clock")]
    Clock(#[source] std::io::Error),
    #[error("starting renewal notices in {}", dir.display())]
    Notices {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching policy directory {}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    PortalKey(crate::portal::KeyError),
    #[error("opening the customer journal")]
    Journal(#[source] crate::live::journal::JournalError),
    #[error("opening state directory {}", dir.display())]
    StateDir {
        dir: PathBuf,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `what` names the flag for the listeners other than the HTTP API.
    #[error("binding {addr}{what}")]
    Bind {
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error(transparent)]
    Grpc(#[from] tonic::transport::Error),
    #[error("closing the state directory")]
    Close(#[source] StateError),
}

/// A started sidecar: everything open, every listener bound, nothing served yet.
#[derive(Debug)]
pub struct Sidecar {
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    policies: PathBuf,
    serving: Serving,
    /// Closed after the listeners have drained: nothing is in flight by then.
    state_dir: Option<StateDir>,
    /// Watches the policy directory until the sidecar has stopped.
    _reloader: Reloader,
    reload: Arc<ReloadState>,
    /// Follows the shared customer stream until the sidecar is dropped.
    _replication: Option<Following>,
}

/// The task following the shared customer stream, stopped when dropped.
#[derive(Debug)]
struct Following(tokio::task::JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The app is generic over its store (no dynamic dispatch on the request path), so
/// a sidecar holds one of the two assemblies.
#[derive(Debug)]
enum Serving {
    Local(Assembly<MemoryStore>),
    Shared(Assembly<RedisStore>),
}

/// An app and its bound listeners.
#[derive(Debug)]
struct Assembly<S> {
    app: Arc<App<S>>,
    listeners: Listeners,
    /// With a shared store: how often deltas counted here are flushed to it.
    flush_every: Option<std::time::Duration>,
}

/// What `App` needs besides the store.
struct Parts {
    snapshot: SnapshotCell,
    clock: Arc<dyn Clock>,
    test_clock: Option<Arc<ManualClock>>,
    audit: Option<Arc<Audit>>,
    notices: Option<Arc<Notices>>,
    usage_notices: Option<notices::UsageNotifier>,
    insights: Arc<Insights>,
    reload: Arc<ReloadState>,
    live: Arc<Live>,
    web: crate::server::Web,
}

impl Sidecar {
    /// Binds the listeners, opens the usage state (connecting to Redis when shared),
    /// takes the audit and notices directories, loads the policy directory and starts
    /// watching it; then starts the audit log and renewal notices. Start-up does
    /// blocking file work (recovering the state directory) on the calling task:
    /// nothing is served yet. The steps that fail most (a port in use, a state or
    /// audit directory held by another process, a missing policy directory) come
    /// before any audit or notice file is made, and a directory made for them is
    /// removed again when start-up fails.
    pub async fn start(config: Config) -> Result<Sidecar, SidecarError> {
        let (clock, test_clock) = clock(&config)?;
        let web = web(&config)?;
        let listeners = Listeners::bind(&config).await?;
        let (state_dir, local) = open_usage(&config, clock.clone())?;
        let (audit, notices) = claim_files(&config)?;
        log_files_off(&config);
        let cell = SnapshotCell::new();
        let state = Arc::new(ReloadState::default());
        let trigger = notices.as_ref().map(notices::Claim::trigger);
        let usage_notices = notices.as_ref().map(notices::Claim::usage_notifier);
        let live = Arc::new(live(&config, &cell, &clock, trigger.clone())?);
        if let Some(r) = &live.replica {
            r.first_contact().await;
        }
        let replication = live
            .replica
            .clone()
            .map(|r| Following(tokio::spawn(r.run())));
        let reloader = reload::start(
            reload_config(&config, audit.clone(), trigger),
            live.publisher.clone(),
            state.clone(),
        )
        .map_err(|source| SidecarError::Watch {
            dir: config.policies.clone(),
            source,
        })?;
        log_load_error(&state);
        let reload = state.clone();
        let store = open_store(&config, local).await?;
        let notices = start_files(&config, audit.as_deref(), notices, &cell, &clock)?;
        let insights = Arc::new(
            Insights::start(config.durable.as_ref().map(|d| d.dir.as_path()))
                .map_err(SidecarError::Io)?,
        );
        let parts = Parts {
            snapshot: cell,
            clock,
            test_clock,
            audit,
            notices,
            usage_notices,
            insights,
            reload: state,
            live,
            web,
        };
        let serving = Serving::assemble(&config, parts, store, listeners);
        let (addr, grpc_addr, metrics_addr) = serving.addrs()?;
        Ok(Sidecar {
            addr,
            grpc_addr,
            metrics_addr,
            policies: config.policies,
            serving,
            state_dir,
            _reloader: reloader,
            reload,
            _replication: replication,
        })
    }

    /// The reloader's state: `confirm()` is the operator's confirmation of a held load.
    pub fn reload_state(&self) -> Arc<ReloadState> {
        self.reload.clone()
    }

    /// The bound address of the HTTP API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the gRPC services, if served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The bound address of the metrics listener, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish, sends
    /// the last deltas to the shared store and closes the state directory.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
        tracing::info!(addr = %self.addr, policies = %self.policies.display(), "serving");
        match self.serving {
            Serving::Local(a) => a.serve(shutdown).await?,
            Serving::Shared(a) => a.serve(shutdown).await?,
        }
        if let Some(dir) = self.state_dir {
            // Nothing is in flight now: flush, sync and fold the journal.
            dir.close().map_err(SidecarError::Close)?;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The one place an `App` is put together.
fn app<S>(config: &Config, parts: Parts, store: S) -> Arc<App<S>> {
    Arc::new(App {
        decider: Decider {
            snapshot: parts.snapshot,
            store,
            clock: parts.clock,
            observer: Observer {
                metrics: DecisionMetrics::new(),
                audit: parts.audit,
                usage_notices: parts.usage_notices,
                insights: Some(parts.insights.sink()),
            },
        },
        test_clock: parts.test_clock,
        notices: parts.notices,
        insights: Some(parts.insights),
        live: parts.live,
        web: parts.web,
        reload: parts.reload,
        prometheus: config.prometheus.clone(),
        limits: config.limits.clone(),
        unmatched: config.unmatched,
        ofrep_tokens: config.ofrep_token_file.as_ref().map(AdminTokens::new),
    })
}

/// The write API: the publisher (with the customer journal read back when there is
/// a state directory, and the notice scanner told of each write), whether writes
/// are allowed, and with a Redis store the replica that follows the shared stream.
fn live(
    config: &Config,
    cell: &SnapshotCell,
    clock: &Arc<dyn Clock>,
    notices: Option<notices::Trigger>,
) -> Result<Live, SidecarError> {
    let mut publisher = match &config.live.journal_dir {
        Some(dir) => Publisher::open(cell.clone(), dir).map_err(SidecarError::Journal)?,
        None => Publisher::new(cell.clone()),
    };
    // A written record's renewal notices are due as soon as it is served, not at the
    // next scan interval.
    if let Some(t) = notices {
        publisher = publisher.on_served(Box::new(move |ids| t.customers_changed(ids)));
    }
    let publisher = Arc::new(publisher);
    let replica = match (&config.store, &config.live.journal_dir) {
        (Some(store), Some(dir)) => {
            let cfg = ReplicaConfig {
                url: store.url.clone(),
                ca_file: store.ca_file.clone(),
                cluster: store.cluster,
                prefix: store.prefix.clone(),
                timeout: store.timeout,
                block: Duration::from_secs(1),
                keep: store.stream_keep,
                write_wait: Duration::from_secs(1),
            };
            tracing::info!(
                "customer records: written through the shared Redis stream and applied from it by every replica"
            );
            Some(Arc::new(Replica::new(
                publisher.clone(),
                cfg,
                clock.clone(),
                dir,
            )))
        }
        (Some(_), None) => {
            tracing::warn!(
                "customer records: --durability memory keeps no state directory, so this replica does not follow the shared customer stream (it serves the policy files only)"
            );
            None
        }
        _ => None,
    };
    let writes = match (&config.live.journal_dir, &config.live.admin_token_file) {
        (None, _) => Writes::Disabled(
            "--durability memory keeps no state directory, and a customer write is acknowledged only once it is on disk there".into(),
        ),
        (Some(_), None) => Writes::Disabled("no --admin-token-file is configured".into()),
        (Some(_), Some(path)) => Writes::Enabled(AdminTokens::new(path)),
    };
    Ok(Live {
        publisher,
        writes,
        policies: config.policies.clone(),
        replica,
        revision_wait: config.live.revision_wait,
    })
}

/// The portal's key (read once, at start) and the console's admins.
fn web(config: &Config) -> Result<crate::server::Web, SidecarError> {
    let mut web = crate::server::Web::off();
    if let Some(path) = &config.portal_key_file {
        web.portal_key =
            Some(crate::portal::Key::from_file(path).map_err(SidecarError::PortalKey)?);
    }
    web.admins = config.live.admin_token_file.as_ref().map(AdminTokens::new);
    Ok(web)
}

/// The one place the reloader's configuration is put together: a new snapshot is
/// recorded in the audit log before it is served, and wakes the notice scanner after.
fn reload_config(
    config: &Config,
    audit: Option<Arc<Audit>>,
    trigger: Option<notices::Trigger>,
) -> ReloadConfig {
    let mut subscribers = Vec::new();
    if let Some(audit) = audit {
        subscribers.push(reload::Subscriber::BeforeSwap(Box::new(move |c| {
            audit.snapshot_changed(c.snapshot, c.previous, c.at)
        })));
    }
    if let Some(trigger) = trigger {
        subscribers.push(reload::Subscriber::AfterSwap(Box::new(move |_| {
            trigger.poke()
        })));
    }
    ReloadConfig {
        subscribers,
        dir: config.policies.clone(),
        limits: config.policy_limits.clone(),
        debounce: config.reload_debounce,
        max_delay: Duration::from_secs(1).max(config.reload_debounce),
        rescan: config.rescan_interval,
        settle: config.reload_settle,
        allow_mass_removal: config.allow_mass_removal,
        allow_empty: config.allow_empty,
    }
}

/// Takes the audit and notices directories (each held by this process from here
/// on), without writing anything in them yet.
fn claim_files(
    config: &Config,
) -> Result<(Option<Arc<Audit>>, Option<notices::Claim>), SidecarError> {
    let audit = match config.audit.clone() {
        Some(cfg) => {
            let dir = cfg.dir.clone();
            Some(Arc::new(
                Audit::claim(cfg).map_err(|source| SidecarError::Audit { dir, source })?,
            ))
        }
        None => None,
    };
    let notices = match config.notices.clone() {
        Some(cfg) => {
            let dir = cfg.dir.clone();
            Some(Notices::claim(cfg).map_err(|source| SidecarError::Notices { dir, source })?)
        }
        None => None,
    };
    Ok((audit, notices))
}

/// Start-up has succeeded this far: starts renewal notices and the audit log's
/// writer, which make their files.
fn start_files(
    config: &Config,
    audit: Option<&Audit>,
    notices: Option<notices::Claim>,
    cell: &SnapshotCell,
    clock: &Arc<dyn Clock>,
) -> Result<Option<Arc<Notices>>, SidecarError> {
    let runtime = tokio::runtime::Handle::current();
    let dir = |d: Option<&PathBuf>| d.cloned().unwrap_or_default();
    let notices = notices
        .map(|n| n.start(cell.clone(), clock.clone(), &runtime))
        .transpose()
        .map_err(|source| SidecarError::Notices {
            dir: dir(config.notices.as_ref().map(|n| &n.dir)),
            source,
        })?;
    if let Some(a) = audit {
        a.begin().map_err(|source| SidecarError::Audit {
            dir: dir(config.audit.as_ref().map(|a| &a.dir)),
            source,
        })?;
    }
    Ok(notices.map(Arc::new))
}

/// Says which file-writing parts are off (`--durability memory` without their
/// directory), so that nobody looks for files that were never meant to be written.
fn log_files_off(config: &Config) {
    if config.audit.is_none() {
        tracing::info!(
            "audit log off: --durability memory writes no files; --audit-dir DIR keeps one"
        );
    }
    if config.notices.is_none() {
        tracing::info!(
            "renewal notices off: --durability memory writes no files; --notices-dir DIR turns them on"
        );
    }
}

/// A first load that failed: every error, then what it means until fixed.
fn log_load_error(state: &ReloadState) {
    if let Some(e) = state.status().last_error {
        for line in &e.errors {
            tracing::error!("{line}");
        }
        tracing::error!(
            "no valid policy yet: decisions answer 503 until the policy directory loads"
        );
    }
}

/// The usage store a sidecar serves from: this process's own, or shared through
/// Redis (with how often deltas counted here are flushed to it).
#[expect(
    clippy::large_enum_variant,
    reason = "one value at start-up, moved once into the app"
)]
enum Store {
    Local(MemoryStore),
    Shared(RedisStore, Duration),
}

/// With `--store`: connects to Redis (the local store answers while it cannot).
/// Either way says which store counts usage and what that means for replicas: the
/// default counts per process, so replicas do not share quotas.
async fn open_store(config: &Config, local: MemoryStore) -> Result<Store, SidecarError> {
    let Some(cfg) = config.store.clone() else {
        let kept = match &config.durable {
            Some(d) => format!("kept in {}", d.dir.display()),
            None => "lost on restart".to_string(),
        };
        tracing::info!(
            "usage store: this process's memory ({kept}); quotas, rate limits and seats count \
             this process's requests only, so N replicas give each customer N times its \
             limits: use --store redis://HOST:PORT to share usage between replicas"
        );
        return Ok(Store::Local(local));
    };
    let url = crate::redact::url(&cfg.url);
    let (mode, on_error, every) = (cfg.mode, cfg.on_error, cfg.flush_interval);
    let shared = if cfg.cluster {
        RedisStore::open_cluster(cfg, local).await?
    } else {
        RedisStore::open(cfg, local)?
    };
    shared.connect(Duration::from_secs(1)).await;
    tracing::info!(
        store = %url,
        ?mode,
        ?on_error,
        "usage store: Redis, shared by every replica pointed at it"
    );
    Ok(Store::Shared(shared, every))
}

/// The served clock, and with `--test-clock` the handle that moves it.
type Clocks = (Arc<dyn Clock>, Option<Arc<ManualClock>>);

fn clock(config: &Config) -> Result<Clocks, SidecarError> {
    Ok(match config.test_clock {
        Some(t) => {
            let c = Arc::new(ManualClock::new(t));
            tracing::warn!(now = %t, "serving time from a test clock: POST /v1/test-clock moves it");
            (c.clone(), Some(c))
        }
        None => (
            Arc::new(CoarseClock::start(Duration::from_millis(1)).map_err(SidecarError::Clock)?),
            None,
        ),
    })
}

/// Opens the state directory and recovers usage from it, or starts from nothing.
fn open_usage(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> Result<(Option<StateDir>, MemoryStore), SidecarError> {
    let Some(cfg) = config.durable.clone() else {
        tracing::warn!("--durability memory: usage is not kept across restarts");
        return Ok((None, MemoryStore::with_journal(None, config.usage)));
    };
    let dir = cfg.dir.clone();
    let (state_dir, store, report) =
        MemoryStore::open_durable(cfg, clock).map_err(|e| SidecarError::StateDir {
            dir: dir.clone(),
            source: e,
        })?;
    tracing::info!(
        dir = %dir.display(),
        checkpoint_lsn = report.checkpoint_lsn,
        replayed = report.replayed,
        last_lsn = report.last_lsn,
        quota_counters = report.quota_counters,
        lost_records = report.lost_records,
        ledger_caught_up = report.ledger_caught_up,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "usage state recovered"
    );
    Ok((Some(state_dir), store))
}

/// The listeners, bound before anything else starts.
#[derive(Debug)]
struct Listeners {
    http: TcpListener,
    grpc: Option<TcpListener>,
    metrics: Option<TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, SidecarError> {
        let http = bind(&config.listen, "").await?;
        let grpc = match &config.grpc_listen {
            None => None,
            Some(a) => Some(bind(a, " (--grpc-listen)").await?),
        };
        let metrics = match &config.metrics_listen {
            None => None,
            Some(m) => Some(bind(m, "").await?),
        };
        Ok(Listeners {
            http,
            grpc,
            metrics,
        })
    }
}

impl Serving {
    /// The app on its store, with the listeners bound for it.
    fn assemble(config: &Config, parts: Parts, store: Store, listeners: Listeners) -> Serving {
        match store {
            Store::Local(s) => {
                Serving::Local(Assembly::new(app(config, parts, s), listeners, None))
            }
            Store::Shared(s, every) => {
                Serving::Shared(Assembly::new(app(config, parts, s), listeners, Some(every)))
            }
        }
    }

    fn addrs(&self) -> std::io::Result<(SocketAddr, Option<SocketAddr>, Option<SocketAddr>)> {
        let l = match self {
            Serving::Local(a) => &a.listeners,
            Serving::Shared(a) => &a.listeners,
        };
        Ok((
            l.http.local_addr()?,
            l.grpc.as_ref().map(TcpListener::local_addr).transpose()?,
            l.metrics
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
        ))
    }
}

impl<S: Flush> Assembly<S> {
    fn new(app: Arc<App<S>>, listeners: Listeners, flush_every: Option<Duration>) -> Self {
        Assembly {
            app,
            listeners,
            flush_every,
        }
    }

    async fn serve(self, stop: impl Future<Output = ()>) -> Result<(), SidecarError> {
        let (app, l) = (self.app, self.listeners);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let upkeep = tokio::spawn(background::upkeep(app.clone()));
        let flush = self
            .flush_every
            .map(|every| tokio::spawn(background::flush(app.clone(), every)));
        let extra = l
            .metrics
            .map(|l| tokio::spawn(server::run(l, app.clone(), stopped(stop_rx.clone()))));
        let grpc = l
            .grpc
            .map(|l| tokio::spawn(server::grpc::run(l, app.clone(), stopped(stop_rx.clone()))));
        let main = tokio::spawn(server::run(l.http, app.clone(), stopped(stop_rx)));
        stop.await;
        tracing::info!("shutting down: finishing requests in flight");
        let _ = stop_tx.send(true);
        main.await
            .map_err(|e| SidecarError::Task("server task", e))??;
        if let Some(e) = extra {
            e.await
                .map_err(|e| SidecarError::Task("metrics server task", e))??;
        }
        if let Some(g) = grpc {
            g.await
                .map_err(|e| SidecarError::Task("gRPC server task", e))??;
        }
        // Last deltas counted here go to the shared store before the state is closed.
        app.decider.store.drain(app.decider.clock.now()).await;
        if let Some(i) = &app.insights {
            i.save().await;
        }
        // The loops hold the app (and with it the store): stop them before the state
        // directory closes.
        upkeep.abort();
        let _ = upkeep.await;
        if let Some(f) = flush {
            f.abort();
            let _ = f.await;
        }
        Ok(())
    }
}

/// Binds `addr`; `what` names the flag in the error for the secondary listeners.
async fn bind(addr: &str, what: &'static str) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind {
            addr: addr.to_string(),
            what,
            source,
        })
}
