//! Notice settings: the directory, thresholds and scan interval, the optional
//! webhook with its retry policy and TLS trust, and the `--notify-thresholds` parser.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::time::DAY;

#[derive(Debug, Clone)]
pub struct NoticeConfig {
    /// Where the event log and the remembered notices are kept.
    pub dir: PathBuf,
    /// Thresholds in microseconds (whole days), widest first.
    pub thresholds: Vec<i64>,
    /// How often the snapshot is scanned besides reloads and test-clock moves.
    pub scan_interval: Duration,
    /// Rotate the event log past this size.
    pub segment_bytes: u64,
    /// Event log files kept (the oldest are deleted).
    pub keep: usize,
    pub webhook: Option<WebhookConfig>,
    /// Usage-threshold crossings waiting for the notices thread, at most (more are
    /// dropped and counted).
    pub usage_queue: usize,
}

impl NoticeConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NoticeConfig {
            dir: dir.into(),
            thresholds: vec![90 * DAY, 60 * DAY, 30 * DAY],
            scan_interval: Duration::from_secs(60),
            segment_bytes: 64 << 20,
            keep: 20,
            webhook: None,
            usage_queue: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// An `http://` or `https://` URL.
    pub url: hyper::Uri,
    /// With https: a CA certificate (PEM) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// First retry delay; each further one doubles, up to `retry_cap`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// Bound on one attempt (connect, TLS, request, response).
    pub timeout: Duration,
    /// Events waiting for delivery, at most.
    pub queue: usize,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl WebhookConfig {
    /// Checks the URL: `http[s]://host[:port]/path`.
    pub fn new(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("`{}` is not a URL: {e}", crate::redact::url(url)))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!(
                "`{}`: expected an http:// or https:// URL",
                crate::redact::url(url)
            ));
        }
        if uri.authority().is_none() {
            return Err(format!("`{}`: no host", crate::redact::url(url)));
        }
        Ok(WebhookConfig {
            url: uri,
            ca_file: None,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(60),
            max_attempts: 8,
            timeout: Duration::from_secs(5),
            queue: 10_000,
            concurrency: 16,
        })
    }

    /// The TLS settings, read once when notices start, so that a bad CA file or an
    /// empty trust store is an error at start, not a failure per event. An http://
    /// webhook reads no certificates.
    pub(super) fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let https = self.url.scheme_str() == Some("https");
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            _ if !https => {}
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("{}: no certificate in it", path.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no trusted root certificates in the system store ({} errors); use --notify-ca-file",
                        found.errors.len()
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// The wait before the next attempt after `n` failed ones (n ≥ 1): the backoff,
    /// or longer if the receiver asked for it with `Retry-After` (up to the cap).
    pub fn retry_wait(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(n);
        retry_after.map_or(backoff, |asked| {
            asked.min(self.retry_cap.max(backoff)).max(backoff)
        })
    }

    /// The wait before attempt `n + 1` after `n` failed ones (n ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.retry_base
            .checked_mul(factor)
            .unwrap_or(self.retry_cap)
            .min(self.retry_cap)
    }
}

/// Parses `90d,60d,30d`: positive whole days, any order; returned widest first,
/// without repeats.
pub fn parse_thresholds(s: &str) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let us = crate::policy::units::parse_duration(part)?;
        if us <= 0 || us % DAY != 0 {
            return Err(format!(
                "`{part}`: a threshold is a positive whole number of days (`30d`)"
            ));
        }
        out.push(us);
    }
    if out.is_empty() {
        return Err("expected at least one threshold (`90d,60d,30d`)".into());
    }
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}
