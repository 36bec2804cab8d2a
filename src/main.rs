//! The `entitled` command: parse the command line into a configuration, build, run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc, built with transparent huge pages on (`.cargo/config.toml`): a
/// 1M-customer snapshot spans ~150 MB, and with 4 KiB pages nearly every customer
/// lookup also misses the TLB (measured here: 233 ns per random dependent load over
/// 256 MiB with glibc malloc, 156 ns with jemalloc and huge pages).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::process::ExitCode;

/// `println!` that never panics: a reader that went away (`| head`) is not an error
/// worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use entitled::engine::{self, Op, Request};
use entitled::metrics::DecisionMetrics;
use entitled::policy::{self, Limits};
use entitled::reload::{self, ReloadConfig, ReloadState};
use entitled::server::{self, App};
use entitled::snapshot_cell::SnapshotCell;
use entitled::time::{Clock, CoarseClock, ManualClock, Timestamp};
use entitled::usage::durable::journal::Durability;
use entitled::usage::durable::{DurableConfig, StateDir};
use entitled::usage::redis::{OnError, RedisConfig, RedisStore, StoreMode, redact};
use entitled::usage::{self, MemoryStore, UsageStore};

#[derive(Debug, Parser)]
#[command(name = "entitled", version, about = "Entitlement decision sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve decisions over HTTP from the policy directory, reloading it on change.
    Serve(Box<Serve>),
    /// Load and compile a policy directory; print every error with file:line:col.
    Validate {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Make one decision offline and explain it.
    Check {
        dir: PathBuf,
        #[arg(long)]
        customer: String,
        #[arg(long)]
        feature: String,
        /// Evaluate as of this time (RFC 3339 or a date); default now.
        #[arg(long)]
        at: Option<String>,
        /// Context for scoped grants, `key=value` (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// Units asked for (quota and rate checks).
        #[arg(long, default_value_t = 1)]
        amount: u64,
        /// Print the decision as JSON only.
        #[arg(long)]
        json: bool,
    },
    /// Run the policy tests (`tests/*.yaml`) of a policy directory; exit 1 on failure.
    Test {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Reports over a policy directory.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Read the usage ledger of a state directory.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ReportCommand {
    /// Subscriptions, grants and overrides ending soon, soonest first.
    Expiring {
        dir: PathBuf,
        /// How far ahead (`90d`, `2w`, `36h`).
        #[arg(long, default_value = "90d")]
        within: String,
        /// As of this time (RFC 3339 or a date); default now.
        #[arg(long)]
        at: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Print usage events (CloudEvents, one JSON object per line), oldest first: for
    /// OpenMeter, Lago or a billing job.
    Export {
        /// The state directory of a (running or stopped) `entitled serve`.
        #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
        state_dir: PathBuf,
        /// Only events at or after this time (RFC 3339 or a date).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this time.
        #[arg(long)]
        until: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreModeArg {
    Strict,
    Cached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnErrorArg {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DurabilityMode {
    /// Journal flushed every --flush-interval; the hot path never waits for the disk.
    Async,
    /// A change is acknowledged only once it is on disk (group commit).
    Sync,
    /// No state directory: usage is lost on restart.
    Memory,
}

/// Every flag is also an `ENTITLED_*` environment variable.
#[derive(Debug, clap::Args)]
struct Serve {
    /// Policy directory (watched for changes).
    #[arg(long, env = "ENTITLED_POLICIES", default_value = "./policies")]
    policies: PathBuf,
    /// Address for the HTTP API.
    #[arg(long, env = "ENTITLED_LISTEN", default_value = "127.0.0.1:4780")]
    listen: String,
    /// Address for the gRPC services (Envoy ext_authz and rate limit service);
    /// `off` serves none.
    #[arg(long, env = "ENTITLED_GRPC_LISTEN", default_value = "127.0.0.1:4781")]
    grpc_listen: String,
    /// Gateway admission of a request no route matches.
    #[arg(long, env = "ENTITLED_UNMATCHED", value_enum, default_value = "deny")]
    unmatched: entitled::server::gateway::Unmatched,
    /// Also serve `/metrics` (and health) on this address, e.g. for a scrape port.
    #[arg(long, env = "ENTITLED_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Async worker threads (default: one per core).
    #[arg(long, env = "ENTITLED_WORKERS")]
    workers: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, env = "ENTITLED_BODY_LIMIT", default_value_t = 64 * 1024)]
    body_limit: usize,
    /// Time allowed to receive request headers; also the HTTP/1 keep-alive idle timeout.
    #[arg(long, env = "ENTITLED_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    header_read_timeout: Duration,
    /// Most open connections.
    #[arg(long, env = "ENTITLED_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Quiet time after a policy change before reloading.
    #[arg(long, env = "ENTITLED_RELOAD_DEBOUNCE", default_value = "100ms", value_parser = duration)]
    reload_debounce: Duration,
    /// Full rescan of the policy directory, for filesystems that lose change events.
    #[arg(long, env = "ENTITLED_RESCAN_INTERVAL", default_value = "30s", value_parser = duration)]
    rescan_interval: Duration,
    /// How long a graceful stop waits for requests in flight.
    #[arg(long, env = "ENTITLED_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// Largest policy file in bytes.
    #[arg(long, env = "ENTITLED_MAX_POLICY_FILE", default_value_t = 256 * 1024 * 1024)]
    max_policy_file: u64,
    /// Where usage state (journal, checkpoints, ledger) is kept.
    #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
    state_dir: PathBuf,
    /// How usage is made durable.
    #[arg(long, env = "ENTITLED_DURABILITY", value_enum, default_value = "async")]
    durability: DurabilityMode,
    /// Async durability: how often the journal is written and synced (a crash loses
    /// at most this much).
    #[arg(long, env = "ENTITLED_FLUSH_INTERVAL", default_value = "10ms", value_parser = duration)]
    flush_interval: Duration,
    /// Fold the journal into a checkpoint this often (and past 256 MiB of journal).
    #[arg(long, env = "ENTITLED_CHECKPOINT_INTERVAL", default_value = "5m", value_parser = duration)]
    checkpoint_interval: Duration,
    /// How long an idempotency key answers retries.
    #[arg(long, env = "ENTITLED_IDEMPOTENCY_TTL", default_value = "24h", value_parser = duration)]
    idempotency_ttl: Duration,
    /// Default time to live of a reservation (a reserve's `ttl` overrides it).
    #[arg(long, env = "ENTITLED_RESERVATION_TTL", default_value = "5m", value_parser = duration)]
    reservation_ttl: Duration,
    /// Start a new usage ledger segment past this many bytes.
    #[arg(long, env = "ENTITLED_LEDGER_SEGMENT_BYTES", default_value_t = 64 << 20)]
    ledger_segment_bytes: u64,
    /// Start a new usage ledger segment once the current one is this old.
    #[arg(long, env = "ENTITLED_LEDGER_SEGMENT_AGE", default_value = "1h", value_parser = duration)]
    ledger_segment_age: Duration,
    /// Delete usage ledger segments whose events are all older than this.
    #[arg(long, env = "ENTITLED_LEDGER_RETENTION", default_value = "30d", value_parser = duration)]
    ledger_retention: Duration,
    /// Share usage with other replicas through Redis (`redis://[user:password@]host:port[/db]`).
    /// Without it, usage is this process's own (made durable in --state-dir).
    #[arg(long, env = "ENTITLED_STORE")]
    store: Option<String>,
    /// With `rediss://`: a CA certificate (PEM) to trust instead of the system's roots.
    #[arg(long, env = "ENTITLED_STORE_CA_FILE")]
    store_ca_file: Option<PathBuf>,
    /// `strict`: every step is one atomic server-side script (exact). `cached`: the
    /// local store answers and deltas are flushed in batches (bounded over-admission).
    #[arg(
        long,
        env = "ENTITLED_STORE_MODE",
        value_enum,
        default_value = "strict"
    )]
    store_mode: StoreModeArg,
    /// Longest wait for the shared store on a request.
    #[arg(long, env = "ENTITLED_STORE_TIMEOUT", default_value = "50ms", value_parser = duration)]
    store_timeout: Duration,
    /// What to do while the shared store is unusable: `local` counts here and
    /// reconciles later, `allow` admits without counting, `deny` answers 503.
    #[arg(
        long,
        env = "ENTITLED_ON_STORE_ERROR",
        value_enum,
        default_value = "local"
    )]
    on_store_error: OnErrorArg,
    /// Prefix of every key in the shared store.
    #[arg(long, env = "ENTITLED_STORE_PREFIX", default_value = "entitled")]
    store_prefix: String,
    /// How often deltas counted here go to the shared store (cached mode, and
    /// reconciliation after an outage).
    #[arg(long, env = "ENTITLED_STORE_FLUSH_INTERVAL", default_value = "100ms", value_parser = duration)]
    store_flush_interval: Duration,
    /// For tests and staging: serve time from a clock that starts here (RFC 3339) and
    /// moves only through `POST /v1/test-clock`.
    #[arg(long, env = "ENTITLED_TEST_CLOCK")]
    test_clock: Option<String>,
    /// Where the audit log (snapshot changes, decisions) is written; default
    /// `<state-dir>/audit`.
    #[arg(long, env = "ENTITLED_AUDIT_DIR")]
    audit_dir: Option<PathBuf>,
    /// Which decisions the audit log records: none, denials, all, or sample:F.
    #[arg(long, env = "ENTITLED_AUDIT_DECISIONS", default_value = "none")]
    audit_decisions: entitled::audit::Decisions,
    /// Renewal notices: how long before a subscription's, grant's or override's end
    /// each notice is made (whole days, comma-separated).
    #[arg(
        long,
        env = "ENTITLED_NOTICE_THRESHOLDS",
        default_value = "90d,60d,30d"
    )]
    notice_thresholds: Thresholds,
    /// Where the notice event log and the notices already made are kept; default
    /// `<state-dir>/notices`.
    #[arg(long, env = "ENTITLED_NOTICES_DIR")]
    notices_dir: Option<PathBuf>,
    /// How often the snapshot is scanned for notices (also after every reload).
    #[arg(long, env = "ENTITLED_NOTICE_SCAN_INTERVAL", default_value = "60s", value_parser = duration)]
    notice_scan_interval: Duration,
    /// Also POST each notice to this http:// or https:// URL (CloudEvents, structured mode).
    #[arg(long, env = "ENTITLED_NOTIFY_URL")]
    notify_url: Option<String>,
    /// With an https:// webhook: a CA certificate (PEM) to trust instead of the system's roots.
    #[arg(long, env = "ENTITLED_NOTIFY_CA_FILE")]
    notify_ca_file: Option<PathBuf>,
    /// First retry delay of a webhook delivery; doubles per attempt, capped at 60 s.
    #[arg(long, env = "ENTITLED_NOTIFY_RETRY_BASE", default_value = "1s", value_parser = duration)]
    notify_retry_base: Duration,
    /// Attempts per notice (the first included) before it counts as failed.
    #[arg(long, env = "ENTITLED_NOTIFY_MAX_ATTEMPTS", default_value_t = 8)]
    notify_max_attempts: u32,
    /// Bound on one webhook attempt (connect, send, answer).
    #[arg(long, env = "ENTITLED_NOTIFY_TIMEOUT", default_value = "5s", value_parser = duration)]
    notify_timeout: Duration,
    /// Notices waiting for the webhook, at most; beyond, they are dropped and counted.
    #[arg(long, env = "ENTITLED_NOTIFY_QUEUE", default_value_t = 10_000)]
    notify_queue: usize,
    /// Log filter (`info`, `entitled=debug`, ...).
    #[arg(long, env = "ENTITLED_LOG", default_value = "info")]
    log: String,
}

/// Notice thresholds in microseconds, widest first (a named type: clap treats a bare
/// `Vec` as a repeatable flag).
#[derive(Debug, Clone)]
struct Thresholds(Vec<i64>);

impl std::str::FromStr for Thresholds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        entitled::notices::parse_thresholds(s).map(Thresholds)
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    entitled::policy::units::parse_duration(s).map(|us| Duration::from_micros(us as u64))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Test { dir } => {
            let snap = match policy::load_dir(&dir, &Limits::default()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let report = entitled::test_runner::run_dir(&dir, &snap)
                .with_context(|| format!("reading the tests of {}", dir.display()))?;
            for f in &report.failures {
                out!("FAIL {f}");
            }
            out!(
                "{} file(s), {} step(s), {} failure(s)",
                report.files,
                report.steps,
                report.failures.len()
            );
            Ok(if report.failures.is_empty() && report.files > 0 {
                ExitCode::SUCCESS
            } else {
                if report.files == 0 {
                    eprintln!("no tests/*.yaml under {}", dir.display());
                }
                ExitCode::FAILURE
            })
        }
        Command::Report {
            command:
                ReportCommand::Expiring {
                    dir,
                    within,
                    at,
                    json,
                },
        } => {
            let us = entitled::policy::units::parse_duration(&within)
                .map_err(anyhow::Error::msg)
                .context("--within")?;
            let now = at
                .map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
                .transpose()
                .context("--at")?
                .unwrap_or_else(Timestamp::now);
            let snap = match policy::load_dir(&dir, &Limits::default()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let items = engine::report::expiring(&snap, now, us);
            if json {
                let doc = serde_json::json!({ "now": now, "within": within, "snapshot": &*snap.version, "items": items });
                out!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                out!(
                    "{:<24} {:<13} {:<24} {:<21} {:>9}",
                    "CUSTOMER",
                    "TYPE",
                    "PLAN / FEATURE",
                    "ENDS",
                    "DAYS LEFT"
                );
                for i in &items {
                    let what = i.plan.or(i.feature).unwrap_or("-");
                    let trial = if i.trial { " (trial)" } else { "" };
                    out!(
                        "{:<24} {:<13} {:<24} {:<21} {:>9}",
                        i.customer,
                        i.kind,
                        format!("{what}{trial}"),
                        i.ends.to_string(),
                        i.days_left
                    );
                }
                out!("{} ending within {within} of {now}", items.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Usage {
            command:
                UsageCommand::Export {
                    state_dir,
                    since,
                    until,
                },
        } => {
            let time = |s: Option<String>, flag: &str| {
                s.map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
                    .transpose()
                    .with_context(|| flag.to_string())
            };
            let since = time(since, "--since")?;
            let until = time(until, "--until")?;
            let dir = state_dir.join("ledger");
            if !dir.is_dir() {
                anyhow::bail!("{}: no usage ledger here", dir.display());
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            usage::durable::ledger::export(&dir, since, until, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { dir } => match policy::load_dir(&dir, &Limits::default()) {
            Ok(s) => {
                out!(
                    "ok: {} features, {} plans, {} customers, {} routes (snapshot {})",
                    s.features.len(),
                    s.plans().count(),
                    s.customers.len(),
                    s.routes.len(),
                    s.version
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for d in &e.diagnostics {
                    eprintln!(
                        "{}: {}",
                        dir.join(&d.file).display().to_string().replace("/./", "/")
                            + &format!(":{}:{}", d.line, d.column),
                        d.message
                    );
                }
                eprintln!("{} error(s)", e.diagnostics.len());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Check {
            dir,
            customer,
            feature,
            at,
            context,
            amount,
            json,
        } => {
            let snap = match policy::load_dir(&dir, &Limits::default()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let at = at
                .map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
                .transpose()
                .context("--at")?;
            let pairs: Vec<(String, String)> = context
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect::<Option<_>>()
                .context("--context expects key=value")?;
            let ctx: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let req = Request {
                customer: &customer,
                feature: &feature,
                amount,
                context: &ctx,
                at,
                holder: None,
            };
            let now = Timestamp::now();
            let store = MemoryStore::new();
            let decision = usage::decide(&snap, &store, Op::Check, &req, now)?;
            let body = serde_json::to_string_pretty(&decision)?;
            out!("{body}");
            if !json {
                let ex = engine::explain(&snap, &req, now);
                out!("\nas of {}:", at.unwrap_or(now));
                if ex.considered.is_empty() {
                    out!("  no grant of `{feature}` on `{customer}`");
                }
                for g in &ex.considered {
                    let mark = if g.won { "=>" } else { "  " };
                    out!("{mark} {:<16} {} — {}", g.status, g.source, g.grant);
                }
                if let Some(rule) = ex.rule {
                    out!("rule: {rule}");
                }
            }
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn serve(args: Serve) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let prometheus = entitled::metrics::install().context("installing the metrics recorder")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("entitled-worker");
    if let Some(n) = args.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the runtime")?;

    let cell = SnapshotCell::new();
    let state = Arc::new(ReloadState::default());
    let limits = Limits {
        max_file_bytes: args.max_policy_file,
        ..Limits::default()
    };
    let mut audit_cfg = entitled::audit::AuditConfig::new(
        args.audit_dir
            .clone()
            .unwrap_or_else(|| args.state_dir.join("audit")),
    );
    audit_cfg.decisions = args.audit_decisions;
    let audit = Arc::new(
        entitled::audit::Audit::start(audit_cfg)
            .with_context(|| "starting the audit log".to_string())?,
    );
    let (clock, test_clock): (Arc<dyn Clock>, _) = match &args.test_clock {
        Some(t) => {
            let t = Timestamp::parse(t)
                .map_err(anyhow::Error::msg)
                .context("--test-clock")?;
            let c = Arc::new(ManualClock::new(t));
            tracing::warn!(now = %t, "serving time from a test clock: POST /v1/test-clock moves it");
            (c.clone(), Some(c))
        }
        None => (
            Arc::new(CoarseClock::start(Duration::from_millis(1)).context("starting the clock")?),
            None,
        ),
    };
    let mut notice_cfg = entitled::notices::NoticeConfig::new(
        args.notices_dir
            .clone()
            .unwrap_or_else(|| args.state_dir.join("notices")),
    );
    notice_cfg.thresholds = args.notice_thresholds.0.clone();
    notice_cfg.scan_interval = args.notice_scan_interval.max(Duration::from_millis(10));
    if let Some(url) = &args.notify_url {
        let mut w = entitled::notices::WebhookConfig::new(url)
            .map_err(anyhow::Error::msg)
            .context("--notify-url")?;
        w.retry_base = args.notify_retry_base;
        w.max_attempts = args.notify_max_attempts.max(1);
        w.timeout = args.notify_timeout;
        w.queue = args.notify_queue.max(1);
        w.ca_file = args.notify_ca_file.clone();
        notice_cfg.webhook = Some(w);
    }
    let notices = Arc::new(
        entitled::notices::Notices::start(notice_cfg, cell.clone(), clock.clone(), rt.handle())
            .context("starting renewal notices")?,
    );
    let config = ReloadConfig {
        audit: Some(audit.clone()),
        notices: Some(notices.trigger()),
        dir: args.policies.clone(),
        limits,
        debounce: args.reload_debounce,
        max_delay: Duration::from_secs(1).max(args.reload_debounce),
        rescan: args.rescan_interval,
    };
    let _reloader = reload::start(config, cell.clone(), state.clone())
        .with_context(|| format!("watching policy directory {}", args.policies.display()))?;
    if let Some(e) = state.status().last_error {
        for line in &e.errors {
            tracing::error!("{line}");
        }
        tracing::error!(
            "no valid policy yet: decisions answer 503 until the policy directory loads"
        );
    }
    let (state_dir, store) = match args.durability {
        DurabilityMode::Memory => {
            tracing::warn!("--durability memory: usage is not kept across restarts");
            (None, MemoryStore::new())
        }
        mode => {
            let mut cfg = DurableConfig::new(&args.state_dir);
            cfg.journal.durability = match mode {
                DurabilityMode::Sync => Durability::Sync,
                _ => Durability::Async(args.flush_interval),
            };
            cfg.checkpoint_interval = args.checkpoint_interval;
            cfg.store.idempotency_ttl_us = micros(args.idempotency_ttl);
            cfg.store.reservation_ttl_us = micros(args.reservation_ttl);
            cfg.ledger.segment_bytes = args.ledger_segment_bytes;
            cfg.ledger.segment_age_us = micros(args.ledger_segment_age);
            cfg.ledger.retention_us = micros(args.ledger_retention);
            let (dir, store, report) = StateDir::open(cfg, clock.clone())
                .with_context(|| format!("opening state directory {}", args.state_dir.display()))?;
            tracing::info!(
                dir = %args.state_dir.display(),
                checkpoint_lsn = report.checkpoint_lsn,
                replayed = report.replayed,
                last_lsn = report.last_lsn,
                quota_counters = report.quota_counters,
                lost_records = report.lost_records,
                ledger_caught_up = report.ledger_caught_up,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "usage state recovered"
            );
            (Some(dir), store)
        }
    };
    let parts = Parts {
        snapshot: cell,
        clock,
        test_clock,
        audit,
        notices,
        reload: state,
        prometheus,
        limits: server::Limits {
            body_limit: args.body_limit,
            header_read_timeout: args.header_read_timeout,
            max_connections: args.max_connections,
            shutdown_timeout: args.shutdown_timeout,
            ..server::Limits::default()
        },
    };
    match &args.store {
        None => rt.block_on(run_with(&args, parts, store, None))?,
        Some(url) => {
            let mut cfg = RedisConfig::new(url);
            cfg.mode = match args.store_mode {
                StoreModeArg::Strict => StoreMode::Strict,
                StoreModeArg::Cached => StoreMode::Cached,
            };
            cfg.timeout = args.store_timeout;
            cfg.on_error = match args.on_store_error {
                OnErrorArg::Local => OnError::Local,
                OnErrorArg::Allow => OnError::Allow,
                OnErrorArg::Deny => OnError::Deny,
            };
            cfg.prefix = args.store_prefix.clone();
            cfg.flush_interval = args.store_flush_interval;
            cfg.ca_file = args.store_ca_file.clone();
            // rustls is built with ring only: make it the process's provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let shared = rt.block_on(async {
                let s = RedisStore::open(cfg, store)?;
                s.connect(Duration::from_secs(1)).await;
                Ok::<_, entitled::usage::StoreError>(s)
            })?;
            tracing::info!(store = %redact(url), mode = ?args.store_mode, on_error = ?args.on_store_error, "usage shared through Redis");
            let interval = args.store_flush_interval;
            rt.block_on(run_with(&args, parts, shared, Some(interval)))?;
        }
    }
    if let Some(dir) = state_dir {
        // Nothing is in flight now: flush, sync and fold the journal.
        dir.close().context("closing the state directory")?;
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What `App` needs besides the store.
struct Parts {
    snapshot: SnapshotCell,
    clock: Arc<dyn Clock>,
    test_clock: Option<Arc<ManualClock>>,
    audit: Arc<entitled::audit::Audit>,
    notices: Arc<entitled::notices::Notices>,
    reload: Arc<ReloadState>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    limits: server::Limits,
}

/// Something that moves usage to a shared store in the background.
trait Flush: UsageStore + 'static {
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

/// Serves until SIGTERM or SIGINT, then lets requests in flight finish.
async fn run_with<S: Flush>(
    args: &Serve,
    parts: Parts,
    store: S,
    flush_every: Option<Duration>,
) -> anyhow::Result<()> {
    let app = Arc::new(App {
        snapshot: parts.snapshot,
        store,
        clock: parts.clock,
        test_clock: parts.test_clock,
        audit: Some(parts.audit),
        notices: Some(parts.notices),
        reload: parts.reload,
        metrics: DecisionMetrics::new(),
        prometheus: Some(parts.prometheus),
        limits: parts.limits,
        unmatched: args.unmatched,
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let grpc_listener = match args.grpc_listen.as_str() {
        "off" => None,
        a => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a} (--grpc-listen)"))?,
        ),
    };
    let stop = shutdown_signal()?;
    // A plain line on stdout, for scripts and tests that start us on port 0.
    out!("entitled: listening on http://{addr}");
    tracing::info!(%addr, policies = %args.policies.display(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Expired reservations go back to their quotas within a second; counters of
    // ended windows are dead weight, dropped every minute.
    let upkeep = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            upkeep
                .store
                .maintain(upkeep.clock.now_background(), n.is_multiple_of(60));
        }
    });
    if let Some(every) = flush_every {
        let flusher = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                flusher.store.flush(flusher.clock.now_background()).await;
            }
        });
    }
    let mut extra = None;
    if let Some(m) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("binding {m}"))?;
        out!("entitled: metrics on http://{}", l.local_addr()?);
        let mut rx = stop_rx.clone();
        extra = Some(tokio::spawn(server::run(l, app.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    let mut grpc = None;
    if let Some(l) = grpc_listener {
        out!("entitled: grpc on http://{}", l.local_addr()?);
        let mut rx = stop_rx.clone();
        grpc = Some(tokio::spawn(server::grpc::run(
            l,
            app.clone(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
    }
    let mut rx = stop_rx.clone();
    let main = tokio::spawn(server::run(listener, app.clone(), async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    stop.await;
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    main.await.context("server task")??;
    if let Some(e) = extra {
        e.await.context("metrics server task")??;
    }
    if let Some(g) = grpc {
        g.await.context("gRPC server task")??;
    }
    // Last deltas counted here go to the shared store before the state is closed.
    app.store.drain(app.clock.now()).await;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now (before the address is announced, so
/// a stop sent the moment we are up is graceful) and returns the wait for either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
