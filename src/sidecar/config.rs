//! What a sidecar is asked to be, as plain data: addresses, limits and the settings
//! of each part, with no open file, thread or socket in it.
//!
//! A [`Config`] is built from the `serve` flags ([`super::ServeArgs::into_config`]) or
//! by hand; [`super::Sidecar::start`] turns it into running parts.

use std::path::PathBuf;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::admission::Unmatched;
use crate::audit::AuditConfig;
use crate::notices::NoticeConfig;
use crate::policy;
use crate::server;
use crate::time::Timestamp;
use crate::usage::StoreConfig;
use crate::usage::durable::DurableConfig;
use crate::usage::redis::RedisConfig;

/// Everything a [`super::Sidecar`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Policy directory (watched for changes).
    pub policies: PathBuf,
    /// Address of the HTTP API (`host:port`; port 0 lets the kernel choose).
    pub listen: String,
    /// Address of the gRPC services; `None` serves none.
    pub grpc_listen: Option<String>,
    /// A second address serving `/metrics` (and health).
    pub metrics_listen: Option<String>,
    /// Gateway admission of a request no route matches.
    pub unmatched: Unmatched,
    /// Connection and request limits of every listener.
    pub limits: server::Limits,
    /// Limits on the policy files read.
    pub policy_limits: policy::Limits,
    /// Quiet time after a policy change before reloading.
    pub reload_debounce: Duration,
    /// Full rescan of the policy directory, for filesystems that lose change events.
    pub rescan_interval: Duration,
    /// How long a held policy load must stay unchanged before it is served.
    pub reload_settle: Duration,
    /// Serve a policy load that removes most customers at once without holding it.
    pub allow_mass_removal: bool,
    /// Serve a policy directory that defines no features.
    pub allow_empty: bool,
    /// The audit log; `None` writes none.
    pub audit: Option<AuditConfig>,
    /// Renewal notices; `None` makes none.
    pub notices: Option<NoticeConfig>,
    /// Serve time from a clock that starts here and moves only through
    /// `POST /v1/test-clock`; `None` serves the system time.
    pub test_clock: Option<Timestamp>,
    /// Lifetimes and bounds of usage state (idempotency keys, reservations), kept in
    /// memory or durable alike (with `durable`, its `store` is this).
    pub usage: StoreConfig,
    /// Customer records written through the API.
    pub live: LiveConfig,
    /// Tokens the OFREP routes require (`Authorization: Bearer` or `X-API-Key`);
    /// `None` leaves them open, like the rest of the read API.
    pub ofrep_token_file: Option<PathBuf>,
    /// The key signing portal tokens (`/portal`); `None` turns the portal off. The
    /// console is on when `live.admin_token_file` is set.
    pub portal_key_file: Option<PathBuf>,
    /// Where usage is made durable; `None` keeps it in memory only.
    pub durable: Option<DurableConfig>,
    /// Share usage with other replicas through Redis.
    pub store: Option<RedisConfig>,
    /// The process's Prometheus recorder, rendered by `/metrics` (404 without). The
    /// recorder is process-wide, so whoever owns the process installs it.
    pub prometheus: Option<PrometheusHandle>,
}

/// Customer writes through the API.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Where written records are journaled; `None` (no state directory) disables
    /// writes.
    pub journal_dir: Option<PathBuf>,
    /// The admin tokens; `None` disables writes.
    pub admin_token_file: Option<PathBuf>,
    /// How long a decision with `min_revision` waits for it to be applied.
    pub revision_wait: Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            journal_dir: None,
            admin_token_file: None,
            revision_wait: Duration::from_millis(250),
        }
    }
}

/// A flag value that does not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--test-clock: {0}")]
    TestClock(String),
    #[error("--notify-url: {0}")]
    NotifyUrl(String),
    #[error("--reservation-ttl: {0}")]
    ReservationTtl(String),
    /// A flag that writes files, with `--durability memory` and no directory for them.
    #[error(
        "{flag} writes files, and --durability memory keeps nothing on disk by itself: give {dir} DIR"
    )]
    NeedsDir {
        flag: &'static str,
        dir: &'static str,
    },
}
