//! The `serve` flags as a library type: every flag of `entitled serve` with its name,
//! default and `ENTITLED_*` variable, and their mapping onto a [`Config`].
//!
//! The binary flattens [`ServeArgs`] into its command line; tests parse the same flag
//! lists through it, so what a flag means is defined once and tested in-process.

use std::path::PathBuf;
use std::time::Duration;

use crate::audit::AuditConfig;
use crate::notices::{NoticeConfig, WebhookConfig};
use crate::policy;
use crate::server;
use crate::time::Timestamp;
use crate::usage::StoreConfig;
use crate::usage::durable::DurableConfig;
use crate::usage::durable::journal::Durability;
use crate::usage::redis::{OnError, RedisConfig, StoreMode};

use super::{Config, ConfigError, LiveConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreModeArg {
    Strict,
    Cached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnErrorArg {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityMode {
    /// Journal flushed every --flush-interval; the hot path never waits for the disk.
    Async,
    /// A change is acknowledged only once it is on disk (group commit).
    Sync,
    /// Nothing on disk: usage is lost on restart; the audit log and renewal notices
    /// are off unless --audit-dir or --notices-dir is given.
    Memory,
}

/// Every flag is also an `ENTITLED_*` environment variable.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Policy directory (watched for changes).
    #[arg(long, env = "ENTITLED_POLICIES", default_value = "./policies")]
    pub policies: PathBuf,
    /// Address for the HTTP API.
    #[arg(long, env = "ENTITLED_LISTEN", default_value = "127.0.0.1:4780")]
    pub listen: String,
    /// Address for the gRPC services (Envoy ext_authz and rate limit service);
    /// `off` serves none.
    #[arg(long, env = "ENTITLED_GRPC_LISTEN", default_value = "127.0.0.1:4781")]
    pub grpc_listen: String,
    /// Gateway admission of a request no route matches.
    #[arg(long, env = "ENTITLED_UNMATCHED", value_enum, default_value = "deny")]
    pub unmatched: crate::admission::Unmatched,
    /// Also serve `/metrics` (and health) on this address, e.g. for a scrape port.
    #[arg(long, env = "ENTITLED_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Async worker threads (default: one per core).
    #[arg(long, env = "ENTITLED_WORKERS")]
    pub workers: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, env = "ENTITLED_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub body_limit: usize,
    /// Time allowed to receive request headers; also the HTTP/1 keep-alive idle timeout.
    #[arg(long, env = "ENTITLED_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Time allowed to receive a request's body once its headers are in.
    #[arg(long, env = "ENTITLED_BODY_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub body_read_timeout: Duration,
    /// Most open connections.
    #[arg(long, env = "ENTITLED_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Close a gRPC connection that has had no request in flight for this long.
    #[arg(long, env = "ENTITLED_GRPC_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub grpc_idle_timeout: Duration,
    /// Quiet time after a policy change before reloading.
    #[arg(long, env = "ENTITLED_RELOAD_DEBOUNCE", default_value = "100ms", value_parser = duration)]
    pub reload_debounce: Duration,
    /// Full rescan of the policy directory, for filesystems that lose change events.
    #[arg(long, env = "ENTITLED_RESCAN_INTERVAL", default_value = "30s", value_parser = duration)]
    pub rescan_interval: Duration,
    /// How long a held policy load (one that removes most customers at once, as a file
    /// seen half-written does) must stay unchanged on disk before it is served;
    /// SIGHUP serves it at once.
    #[arg(long, env = "ENTITLED_RELOAD_SETTLE", default_value = "30s", value_parser = duration)]
    pub reload_settle: Duration,
    /// Serve a policy load that removes most customers at once without holding it.
    #[arg(long, env = "ENTITLED_ALLOW_MASS_REMOVAL")]
    pub allow_mass_removal: bool,
    /// Serve a policy directory that defines no features (by default it is refused:
    /// not ready, and a reload to it keeps the last snapshot).
    #[arg(long, env = "ENTITLED_ALLOW_EMPTY")]
    pub allow_empty: bool,
    /// How long a graceful stop waits for requests in flight.
    #[arg(long, env = "ENTITLED_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// Largest policy file in bytes.
    #[arg(long, env = "ENTITLED_MAX_POLICY_FILE", default_value_t = 256 * 1024 * 1024)]
    pub max_policy_file: u64,
    /// Where usage state (journal, checkpoints, ledger) is kept.
    #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
    pub state_dir: PathBuf,
    /// How usage is made durable.
    #[arg(long, env = "ENTITLED_DURABILITY", value_enum, default_value = "async")]
    pub durability: DurabilityMode,
    /// Async durability: how often the journal is written and synced (a crash loses
    /// at most this much).
    #[arg(long, env = "ENTITLED_FLUSH_INTERVAL", default_value = "10ms", value_parser = duration)]
    pub flush_interval: Duration,
    /// Fold the journal into a checkpoint this often (and past 256 MiB of journal).
    #[arg(long, env = "ENTITLED_CHECKPOINT_INTERVAL", default_value = "5m", value_parser = duration)]
    pub checkpoint_interval: Duration,
    /// How long an idempotency key answers retries.
    #[arg(long, env = "ENTITLED_IDEMPOTENCY_TTL", default_value = "24h", value_parser = duration)]
    pub idempotency_ttl: Duration,
    /// Most idempotency keys remembered at once; when full, a new keyed write is
    /// refused (503 `idempotency_keys_full`) rather than the table growing.
    #[arg(long, env = "ENTITLED_IDEMPOTENCY_MAX_KEYS", default_value_t = crate::usage::DEFAULT_IDEMPOTENCY_MAX_KEYS)]
    pub idempotency_max_keys: usize,
    /// Default time to live of a reservation (a reserve's `ttl` overrides it).
    #[arg(long, env = "ENTITLED_RESERVATION_TTL", default_value = "5m", value_parser = duration)]
    pub reservation_ttl: Duration,
    /// Start a new usage ledger segment past this many bytes.
    #[arg(long, env = "ENTITLED_LEDGER_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub ledger_segment_bytes: u64,
    /// Start a new usage ledger segment once the current one is this old.
    #[arg(long, env = "ENTITLED_LEDGER_SEGMENT_AGE", default_value = "1h", value_parser = duration)]
    pub ledger_segment_age: Duration,
    /// Delete usage ledger segments whose events are all older than this.
    #[arg(long, env = "ENTITLED_LEDGER_RETENTION", default_value = "30d", value_parser = duration)]
    pub ledger_retention: Duration,
    /// Most bytes the usage ledger may take (0: no cap). At the cap the ledger stops
    /// appending and the journal keeps the events until segments are acknowledged
    /// (`entitled usage ack`) or expire.
    #[arg(long, env = "ENTITLED_LEDGER_MAX_BYTES", default_value_t = 0)]
    pub ledger_max_bytes: u64,
    /// Share usage with other replicas through Redis (`redis://[user:password@]host:port[/db]`).
    /// Without it, usage is this process's own (made durable in --state-dir).
    #[arg(long, env = "ENTITLED_STORE")]
    pub store: Option<String>,
    /// With `rediss://`: a CA certificate (PEM) to trust instead of the system's roots.
    #[arg(long, env = "ENTITLED_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// `strict`: every step is one atomic server-side script (exact). `cached`: the
    /// local store answers and deltas are flushed in batches (bounded over-admission).
    #[arg(
        long,
        env = "ENTITLED_STORE_MODE",
        value_enum,
        default_value = "strict"
    )]
    pub store_mode: StoreModeArg,
    /// Longest wait for the shared store on a request.
    #[arg(long, env = "ENTITLED_STORE_TIMEOUT", default_value = "50ms", value_parser = duration)]
    pub store_timeout: Duration,
    /// What to do while the shared store is unusable: `local` counts here and
    /// reconciles later, `allow` admits without counting, `deny` answers 503.
    #[arg(
        long,
        env = "ENTITLED_ON_STORE_ERROR",
        value_enum,
        default_value = "local"
    )]
    pub on_store_error: OnErrorArg,
    /// Prefix of every key in the shared store.
    #[arg(long, env = "ENTITLED_STORE_PREFIX", default_value = "entitled")]
    pub store_prefix: String,
    /// How often deltas counted here go to the shared store (cached mode, and
    /// reconciliation after an outage).
    #[arg(long, env = "ENTITLED_STORE_FLUSH_INTERVAL", default_value = "100ms", value_parser = duration)]
    pub store_flush_interval: Duration,
    /// `--store` names a node of a Redis Cluster (the other nodes are found from it).
    #[arg(long, env = "ENTITLED_STORE_CLUSTER")]
    pub store_cluster: bool,
    /// Entries of the shared customer stream kept in Redis (approximately); a replica
    /// further behind reloads from the shared snapshot.
    #[arg(long, env = "ENTITLED_STORE_STREAM_KEEP", default_value_t = 100_000)]
    pub store_stream_keep: u64,
    /// How long a decision with `min_revision` waits for this replica to apply that
    /// revision before answering 503 `stale`.
    #[arg(long, env = "ENTITLED_REVISION_WAIT", default_value = "250ms", value_parser = duration)]
    pub revision_wait: Duration,
    /// For tests and staging: serve time from a clock that starts here (RFC 3339) and
    /// moves only through `POST /v1/test-clock`.
    #[arg(long, env = "ENTITLED_TEST_CLOCK")]
    pub test_clock: Option<String>,
    /// Where the audit log (snapshot changes, decisions) is written; default
    /// `<state-dir>/audit`, none with `--durability memory`.
    #[arg(long, env = "ENTITLED_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// Admin tokens for customer writes (`PUT`/`DELETE /v1/customers/{id}`), one per
    /// line as `name:token` or a bare token; read again when it changes. Without it
    /// the write routes answer 403 `writes_disabled`.
    #[arg(long, env = "ENTITLED_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Tokens the OpenFeature (OFREP) routes require, as `Authorization: Bearer
    /// <token>` or `X-API-Key: <token>`; same format as --admin-token-file, read again
    /// when it changes. Without it the OFREP routes are open, like the rest of the
    /// read API.
    #[arg(long, env = "ENTITLED_OFREP_TOKEN_FILE")]
    pub ofrep_token_file: Option<PathBuf>,
    /// The key that signs customer portal tokens (`/portal`, `entitled portal-token`):
    /// at least 32 bytes, e.g. `head -c 48 /dev/urandom | base64`. Without it the portal
    /// is off.
    #[arg(long, env = "ENTITLED_PORTAL_KEY_FILE")]
    pub portal_key_file: Option<PathBuf>,
    /// Which decisions the audit log records: none, denials, all, or sample:F.
    #[arg(long, env = "ENTITLED_AUDIT_DECISIONS", default_value = "none")]
    pub audit_decisions: crate::audit::Decisions,
    /// Renewal notices: how long before a subscription's, grant's or override's end
    /// each notice is made (whole days, comma-separated).
    #[arg(
        long,
        env = "ENTITLED_NOTICE_THRESHOLDS",
        default_value = "90d,60d,30d"
    )]
    pub notice_thresholds: Thresholds,
    /// Where the notice event log and the notices already made are kept; default
    /// `<state-dir>/notices`; with `--durability memory` renewal notices are off
    /// unless this is given.
    #[arg(long, env = "ENTITLED_NOTICES_DIR")]
    pub notices_dir: Option<PathBuf>,
    /// How often the snapshot is scanned for notices (also after every reload).
    #[arg(long, env = "ENTITLED_NOTICE_SCAN_INTERVAL", default_value = "60s", value_parser = duration)]
    pub notice_scan_interval: Duration,
    /// Also POST each notice to this http:// or https:// URL (CloudEvents, structured mode).
    #[arg(long, env = "ENTITLED_NOTIFY_URL")]
    pub notify_url: Option<String>,
    /// With an https:// webhook: a CA certificate (PEM) to trust instead of the system's roots.
    #[arg(long, env = "ENTITLED_NOTIFY_CA_FILE")]
    pub notify_ca_file: Option<PathBuf>,
    /// First retry delay of a webhook delivery; doubles per attempt, capped at 60 s.
    #[arg(long, env = "ENTITLED_NOTIFY_RETRY_BASE", default_value = "1s", value_parser = duration)]
    pub notify_retry_base: Duration,
    /// Attempts per notice (the first included) before it counts as failed.
    #[arg(long, env = "ENTITLED_NOTIFY_MAX_ATTEMPTS", default_value_t = 8)]
    pub notify_max_attempts: u32,
    /// Bound on one webhook attempt (connect, send, answer).
    #[arg(long, env = "ENTITLED_NOTIFY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub notify_timeout: Duration,
    /// Notices waiting for the webhook, at most; beyond, they are dropped and counted.
    #[arg(long, env = "ENTITLED_NOTIFY_QUEUE", default_value_t = 10_000)]
    pub notify_queue: usize,
    /// Log filter (`info`, `entitled=debug`, ...).
    #[arg(long, env = "ENTITLED_LOG", default_value = "info")]
    pub log: String,
}

/// Notice thresholds in microseconds, widest first (a named type: clap treats a bare
/// `Vec` as a repeatable flag).
#[derive(Debug, Clone)]
pub struct Thresholds(pub Vec<i64>);

impl std::str::FromStr for Thresholds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::notices::parse_thresholds(s).map(Thresholds)
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::policy::units::parse_duration(s).map(|us| Duration::from_micros(us as u64))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl ServeArgs {
    /// The configuration these flags describe. `workers` and `log` are left out: the
    /// runtime and the log subscriber belong to the process, not to a sidecar.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let test_clock = self
            .test_clock
            .as_deref()
            .map(Timestamp::parse)
            .transpose()
            .map_err(ConfigError::TestClock)?;
        if micros(self.reservation_ttl) > crate::usage::MAX_RESERVATION_TTL_US {
            return Err(ConfigError::ReservationTtl(format!(
                "a reservation is held at most {}h",
                crate::usage::MAX_RESERVATION_TTL_US / crate::time::HOUR
            )));
        }
        Ok(Config {
            audit: self.audit()?,
            live: self.live(),
            ofrep_token_file: self.ofrep_token_file.clone(),
            portal_key_file: self.portal_key_file.clone(),
            notices: self.notices()?,
            usage: self.usage(),
            durable: self.durable(),
            store: self.store(),
            policy_limits: policy::Limits {
                max_file_bytes: self.max_policy_file,
                ..policy::Limits::default()
            },
            limits: server::Limits {
                body_limit: self.body_limit,
                header_read_timeout: self.header_read_timeout,
                body_read_timeout: self.body_read_timeout,
                max_connections: self.max_connections,
                grpc_idle_timeout: self.grpc_idle_timeout,
                shutdown_timeout: self.shutdown_timeout,
                ..server::Limits::default()
            },
            grpc_listen: match self.grpc_listen.as_str() {
                "off" => None,
                _ => Some(self.grpc_listen),
            },
            policies: self.policies,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            unmatched: self.unmatched,
            reload_debounce: self.reload_debounce,
            rescan_interval: self.rescan_interval,
            reload_settle: self.reload_settle,
            allow_mass_removal: self.allow_mass_removal,
            allow_empty: self.allow_empty,
            test_clock,
            prometheus: None,
        })
    }

    /// Where a file-writing part keeps its files: the directory its flag names, else
    /// `<state-dir>/<name>`; with `--durability memory` none (the part is off) unless
    /// its flag names one, since memory mode writes nothing to disk by itself.
    fn dir_for(&self, given: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
        match given {
            Some(dir) => Some(dir.clone()),
            None if self.durability == DurabilityMode::Memory => None,
            None => Some(self.state_dir.join(name)),
        }
    }

    fn audit(&self) -> Result<Option<AuditConfig>, ConfigError> {
        let Some(dir) = self.dir_for(&self.audit_dir, "audit") else {
            if self.audit_decisions != crate::audit::Decisions::None {
                return Err(ConfigError::NeedsDir {
                    flag: "--audit-decisions",
                    dir: "--audit-dir",
                });
            }
            return Ok(None);
        };
        let mut audit = AuditConfig::new(dir);
        audit.decisions = self.audit_decisions;
        Ok(Some(audit))
    }

    fn notices(&self) -> Result<Option<NoticeConfig>, ConfigError> {
        let Some(dir) = self.dir_for(&self.notices_dir, "notices") else {
            if self.notify_url.is_some() {
                return Err(ConfigError::NeedsDir {
                    flag: "--notify-url",
                    dir: "--notices-dir",
                });
            }
            return Ok(None);
        };
        let mut notice_cfg = NoticeConfig::new(dir);
        notice_cfg.thresholds = self.notice_thresholds.0.clone();
        notice_cfg.scan_interval = self.notice_scan_interval.max(Duration::from_millis(10));
        if let Some(url) = &self.notify_url {
            let mut w = WebhookConfig::new(url).map_err(ConfigError::NotifyUrl)?;
            w.retry_base = self.notify_retry_base;
            w.max_attempts = self.notify_max_attempts.max(1);
            w.timeout = self.notify_timeout;
            w.queue = self.notify_queue.max(1);
            w.ca_file = self.notify_ca_file.clone();
            notice_cfg.webhook = Some(w);
        }
        Ok(Some(notice_cfg))
    }

    /// Lifetimes and bounds of usage state, for every durability mode.
    fn usage(&self) -> StoreConfig {
        StoreConfig {
            idempotency_ttl_us: micros(self.idempotency_ttl),
            reservation_ttl_us: micros(self.reservation_ttl),
            idempotency_max_keys: self.idempotency_max_keys,
            ..StoreConfig::default()
        }
    }

    /// Customer writes: journaled in `<state-dir>/customers` unless the state
    /// directory is off (`--durability memory`).
    fn live(&self) -> LiveConfig {
        LiveConfig {
            journal_dir: (self.durability != DurabilityMode::Memory)
                .then(|| crate::live::journal_dir(&self.state_dir)),
            admin_token_file: self.admin_token_file.clone(),
            revision_wait: self.revision_wait,
        }
    }

    /// `None` with `--durability memory`.
    fn durable(&self) -> Option<DurableConfig> {
        let mode = self.durability;
        if mode == DurabilityMode::Memory {
            return None;
        }
        let mut cfg = DurableConfig::new(&self.state_dir);
        cfg.journal.durability = match mode {
            DurabilityMode::Sync => Durability::Sync,
            _ => Durability::Async(self.flush_interval),
        };
        cfg.checkpoint_interval = self.checkpoint_interval;
        cfg.store = self.usage();
        cfg.ledger.segment_bytes = self.ledger_segment_bytes;
        cfg.ledger.segment_age_us = micros(self.ledger_segment_age);
        cfg.ledger.retention_us = micros(self.ledger_retention);
        cfg.ledger.max_bytes = self.ledger_max_bytes;
        Some(cfg)
    }

    fn store(&self) -> Option<RedisConfig> {
        let url = self.store.as_ref()?;
        let mut cfg = RedisConfig::new(url);
        cfg.mode = match self.store_mode {
            StoreModeArg::Strict => StoreMode::Strict,
            StoreModeArg::Cached => StoreMode::Cached,
        };
        cfg.timeout = self.store_timeout;
        cfg.on_error = match self.on_store_error {
            OnErrorArg::Local => OnError::Local,
            OnErrorArg::Allow => OnError::Allow,
            OnErrorArg::Deny => OnError::Deny,
        };
        cfg.prefix = self.store_prefix.clone();
        cfg.flush_interval = self.store_flush_interval;
        cfg.ca_file = self.store_ca_file.clone();
        cfg.cluster = self.store_cluster;
        cfg.stream_keep = self.store_stream_keep;
        Some(cfg)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn config(flags: &[&str]) -> Result<Config, ConfigError> {
        let argv = std::iter::once("entitled").chain(flags.iter().copied());
        Serve::try_parse_from(argv).unwrap().args.into_config()
    }

    #[test]
    fn defaults_keep_everything_under_the_state_dir() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:4780");
        assert_eq!(c.grpc_listen.as_deref(), Some("127.0.0.1:4781"));
        assert_eq!(c.metrics_listen, None);
        let durable = c.durable.expect("durable by default");
        assert_eq!(durable.dir, Path::new("./state"));
        assert_eq!(
            durable.journal.durability,
            Durability::Async(Duration::from_millis(10))
        );
        assert_eq!(c.audit.expect("audit").dir, Path::new("./state/audit"));
        let notices = c.notices.expect("notices");
        assert_eq!(notices.dir, Path::new("./state/notices"));
        assert!(notices.webhook.is_none());
        assert!(c.store.is_none() && c.test_clock.is_none() && c.prometheus.is_none());
        assert_eq!(c.limits.body_limit, 64 * 1024);
        assert_eq!(c.policy_limits.max_file_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn flags_reach_their_part() {
        let c = config(&[
            "--grpc-listen",
            "off",
            "--durability",
            "memory",
            "--store",
            "redis://127.0.0.1:1",
            "--store-mode",
            "cached",
            "--on-store-error",
            "deny",
            "--notify-url",
            "http://127.0.0.1:1/hook",
            "--notices-dir",
            "n",
            "--notify-max-attempts",
            "0",
            "--test-clock",
            "2030-01-15T00:00:00Z",
        ])
        .unwrap();
        assert_eq!(c.grpc_listen, None);
        assert!(c.durable.is_none());
        let store = c.store.expect("a shared store");
        assert_eq!(
            (store.mode, store.on_error),
            (StoreMode::Cached, OnError::Deny)
        );
        let hook = c.notices.and_then(|n| n.webhook).expect("a webhook");
        assert_eq!(hook.max_attempts, 1, "at least one attempt");
        assert_eq!(
            c.test_clock.map(|t| t.to_string()).as_deref(),
            Some("2030-01-15T00:00:00Z")
        );
    }

    #[test]
    fn memory_mode_writes_no_file_unless_a_directory_is_given() {
        let c = config(&["--durability", "memory"]).unwrap();
        assert!(c.durable.is_none() && c.audit.is_none() && c.notices.is_none());
        let c = config(&[
            "--durability",
            "memory",
            "--audit-dir",
            "a",
            "--notices-dir",
            "n",
        ])
        .unwrap();
        assert_eq!(c.audit.expect("audit").dir, Path::new("a"));
        assert_eq!(c.notices.expect("notices").dir, Path::new("n"));
        for (flag, value, needs) in [
            ("--audit-decisions", "all", "--audit-dir"),
            ("--notify-url", "http://127.0.0.1:1/hook", "--notices-dir"),
        ] {
            let e = config(&["--durability", "memory", flag, value]).unwrap_err();
            assert!(e.to_string().starts_with(flag), "{e}");
            assert!(e.to_string().contains(needs), "{e}");
        }
    }

    #[test]
    fn a_bad_value_names_its_flag() {
        let e = config(&["--test-clock", "soon"]).unwrap_err();
        assert!(e.to_string().starts_with("--test-clock: "), "{e}");
        let e = config(&["--notify-url", "ftp://x"]).unwrap_err();
        assert!(e.to_string().starts_with("--notify-url: "), "{e}");
        let e = config(&["--reservation-ttl", "25h"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--reservation-ttl: a reservation is held at most 24h"
        );
        assert!(config(&["--reservation-ttl", "24h"]).is_ok());
    }
}
