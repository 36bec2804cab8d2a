//! Every metric the sidecar exports: names, help texts and label sets, in one place.
//!
//! Recorded through the `metrics` facade and rendered by
//! `metrics-exporter-prometheus`. Customer ids are never label values (a million
//! customers would be a million series); features, plans and reasons are bounded by
//! the catalog.

use std::sync::OnceLock;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::{Op, Reason};
use crate::policy::{Kind, Snapshot};
use crate::time::{DAY, Timestamp};

pub const DECISIONS: &str = "entitled_decisions_total";
pub const DECISION_DURATION: &str = "entitled_decision_duration_seconds";
pub const RELOADS: &str = "entitled_policy_reloads_total";
pub const PORTAL_ACCESS: &str = "entitled_portal_access_total";
pub const LAST_RELOAD_SUCCESS: &str = "entitled_policy_last_reload_success_timestamp_seconds";
pub const RELOAD_HELD: &str = "entitled_policy_reload_held";
pub const RELOAD_PATHS: &str = "entitled_policy_loads_total";
pub const FILES_READ: &str = "entitled_policy_files_read_total";
pub const SNAPSHOT_INFO: &str = "entitled_policy_snapshot_info";
pub const CUSTOMERS: &str = "entitled_customers";
pub const OVERRIDES_ACTIVE: &str = "entitled_overrides_active";
pub const QUOTA_WARNINGS: &str = "entitled_quota_warnings_total";
pub const SUBSCRIPTIONS_EXPIRING: &str = "entitled_subscriptions_expiring";
pub const STORE_ERRORS: &str = "entitled_store_errors_total";
pub const AUDIT_DROPPED: &str = "entitled_audit_dropped_total";
pub const HTTP_ERRORS: &str = "entitled_http_errors_total";
pub const CONNECTIONS_REJECTED: &str = "entitled_connections_rejected_total";
pub const JOURNAL_FLUSHES: &str = "entitled_journal_flushes_total";
pub const JOURNAL_BYTES: &str = "entitled_journal_bytes_total";
pub const JOURNAL_FLUSH_DURATION: &str = "entitled_journal_flush_duration_seconds";
pub const JOURNAL_ERRORS: &str = "entitled_journal_errors_total";
pub const JOURNAL_REFUSED: &str = "entitled_journal_refused_changes_total";
pub const LEDGER_BYTES: &str = "entitled_ledger_bytes";
pub const LEDGER_MAX_BYTES: &str = "entitled_ledger_max_bytes";
pub const LEDGER_BEHIND: &str = "entitled_ledger_behind";
pub const STATE_DAMAGED: &str = "entitled_state_damaged_records_total";
pub const CHECKPOINTS: &str = "entitled_state_checkpoints_total";
pub const CHECKPOINT_DURATION: &str = "entitled_state_checkpoint_duration_seconds";
pub const USAGE_STATE: &str = "entitled_usage_state_entries";
pub const IDEMPOTENT_REPLAYS: &str = "entitled_idempotent_replays_total";
pub const IDEMPOTENCY_KEYS_REFUSED: &str = "entitled_idempotency_keys_refused_total";
pub const STORE_DEGRADED: &str = "entitled_store_degraded";
pub const STORE_FALLBACKS: &str = "entitled_store_fallbacks_total";
pub const STORE_DROPPED_DELTAS: &str = "entitled_store_dropped_deltas_total";
pub const NOTICES: &str = "entitled_notices_total";
pub const NOTICES_DELIVERED: &str = "entitled_notices_delivered_total";
pub const NOTICES_FAILED: &str = "entitled_notices_failed_total";
pub const NOTICES_DROPPED: &str = "entitled_notices_dropped_total";
pub const USAGE_NOTICES: &str = "entitled_usage_notices_total";
pub const USAGE_NOTICES_DROPPED: &str = "entitled_usage_notices_dropped_total";
pub const INSIGHTS_DROPPED: &str = "entitled_insights_dropped_total";
pub const GATEWAY: &str = "entitled_gateway_requests_total";
pub const CUSTOMERS_REVISION: &str = "entitled_customers_revision";
pub const CUSTOMERS_STREAM_HEAD: &str = "entitled_customers_stream_head";
pub const CUSTOMERS_LAG_REVISIONS: &str = "entitled_customers_lag_revisions";
pub const CUSTOMERS_LAG_SECONDS: &str = "entitled_customers_lag_seconds";
pub const CUSTOMERS_LAST_READ: &str = "entitled_customers_last_read_timestamp_seconds";
pub const CUSTOMERS_FOLLOWING: &str = "entitled_customers_following";
pub const CUSTOMERS_RESYNCS: &str = "entitled_customers_resyncs_total";
pub const CUSTOMERS_LEFT_OUT: &str = "entitled_customers_left_out_total";
pub const OFREP_EVALUATIONS: &str = "entitled_ofrep_evaluations_total";

/// The thresholds reported by `entitled_subscriptions_expiring{within}`, in days.
pub const EXPIRING_WINDOWS: [i64; 3] = [30, 60, 90];

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    // Decisions take microseconds; policy-driven latency alerts need the low buckets.
    let buckets = [
        0.000_001,
        0.000_002_5,
        0.000_005,
        0.000_01,
        0.000_025,
        0.000_05,
        0.000_1,
        0.000_25,
        0.000_5,
        0.001,
        0.002_5,
        0.005,
        0.01,
        0.05,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DECISION_DURATION.into()), &buckets)?
        // A journal batch (write + fdatasync) and a checkpoint: milliseconds to seconds.
        .set_buckets_for_metric(
            Matcher::Full(JOURNAL_FLUSH_DURATION.into()),
            &[
                0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(CHECKPOINT_DURATION.into()),
            &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Describes every metric once, at start-up: a flat list, one entry per metric, kept
/// together so that the exported names, types and help texts can be read in one place.
fn describe() {
    describe_counter!(
        DECISIONS,
        "Decisions made, by operation, feature kind, outcome and reason."
    );
    describe_counter!(
        OFREP_EVALUATIONS,
        "OpenFeature (OFREP) flag evaluations, by mode (single or bulk), feature kind and reason; each is also a check in entitled_decisions_total."
    );
    describe_histogram!(
        DECISION_DURATION,
        Unit::Seconds,
        "Time to answer a decision request, from parsed request to encoded response."
    );
    describe_counter!(
        RELOADS,
        "Policy reload attempts, by result (success: the directory loaded, whether or not the served version changed; failure; held: a load removing most customers, held back)."
    );
    describe_counter!(
        PORTAL_ACCESS,
        "Customer portal requests (page and JSON), by result: ok, missing, forged or expired token."
    );
    describe_counter!(
        RELOAD_PATHS,
        "Loads of the policy directory, by path (incremental: only changed customer files were read and applied; full: every file was read and compiled)."
    );
    describe_counter!(
        FILES_READ,
        "Policy files read by loads, by path (incremental or full)."
    );
    describe_gauge!(
        RELOAD_HELD,
        "1 while a policy load that removes most customers is held back (the last snapshot serves)."
    );
    describe_gauge!(
        LAST_RELOAD_SUCCESS,
        Unit::Seconds,
        "Unix time of the last successful policy load."
    );
    describe_gauge!(
        SNAPSHOT_INFO,
        "1 for the policy snapshot version being served, 0 for versions served before."
    );
    describe_gauge!(CUSTOMERS, "Customers in the served snapshot.");
    describe_gauge!(OVERRIDES_ACTIVE, "Overrides in effect now.");
    describe_counter!(
        QUOTA_WARNINGS,
        "Consumes that crossed a quota's warn_at threshold (an upsell signal), by feature."
    );
    describe_gauge!(
        SUBSCRIPTIONS_EXPIRING,
        "Subscriptions ending within the window (30d, 60d, 90d)."
    );
    describe_counter!(STORE_ERRORS, "Usage store operations that failed.");
    describe_counter!(
        AUDIT_DROPPED,
        "Audit records dropped because the audit queue was full."
    );
    describe_counter!(
        HTTP_ERRORS,
        "Requests answered with an error status (4xx, 5xx), by route and status."
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections closed at accept because the connection cap was reached."
    );
    describe_counter!(
        JOURNAL_FLUSHES,
        "Batches of usage changes written and synced to the journal."
    );
    describe_counter!(JOURNAL_BYTES, Unit::Bytes, "Bytes written to the journal.");
    describe_histogram!(
        JOURNAL_FLUSH_DURATION,
        Unit::Seconds,
        "Time to write and fdatasync one journal batch."
    );
    describe_counter!(
        JOURNAL_ERRORS,
        "Failed writes to the state directory (journal, ledger, segments)."
    );
    describe_counter!(
        JOURNAL_REFUSED,
        "Changes dropped in --durability sync because the journal could not be written (answered 503, taken back in memory)."
    );
    describe_gauge!(
        LEDGER_BYTES,
        Unit::Bytes,
        "Bytes of the usage ledger's files (segments, compressed or not)."
    );
    describe_gauge!(
        LEDGER_MAX_BYTES,
        Unit::Bytes,
        "The usage ledger's cap (--ledger-max-bytes; 0: none)."
    );
    describe_gauge!(
        LEDGER_BEHIND,
        "1 while the usage ledger is behind the journal (a write failed, or it is at its cap); the journal keeps the events."
    );
    describe_counter!(
        STATE_DAMAGED,
        "Damaged or torn records found in the state directory at start-up (each lost)."
    );
    describe_counter!(CHECKPOINTS, "State checkpoints written, by result.");
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "Time to fold the journal into a new checkpoint."
    );
    describe_gauge!(
        USAGE_STATE,
        "Live usage state entries, by kind (quota counters, reservations, seats, idempotency keys)."
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Requests answered from an idempotency key instead of counted again."
    );
    describe_counter!(
        IDEMPOTENCY_KEYS_REFUSED,
        "Keyed writes refused (503) because the idempotency key table was full (--idempotency-max-keys)."
    );
    // Exported from the start, so an alert on its increase sees 0 before the first.
    counter!(IDEMPOTENCY_KEYS_REFUSED).increment(0);
    describe_gauge!(
        STORE_DEGRADED,
        "1 while the shared usage store (Redis) is unusable and --on-store-error answers."
    );
    describe_counter!(
        STORE_FALLBACKS,
        "Usage steps answered by --on-store-error instead of the shared store, by mode."
    );
    describe_counter!(
        STORE_DROPPED_DELTAS,
        "Locally counted windows not kept for reconciliation because the backlog was full."
    );
    describe_counter!(
        NOTICES,
        "Renewal notices emitted to the notice event log (one per item and threshold)."
    );
    describe_counter!(
        NOTICES_DELIVERED,
        "Notices (renewal and usage-threshold) the webhook accepted (2xx)."
    );
    describe_counter!(
        NOTICES_FAILED,
        "Notices (renewal and usage-threshold) the webhook refused (4xx other than 429) or that ran out of attempts."
    );
    describe_counter!(
        NOTICES_DROPPED,
        "Notices (renewal and usage-threshold) not sent to the webhook because its queue was full."
    );
    describe_counter!(
        USAGE_NOTICES,
        "Usage-threshold notices emitted to the notice event log (one per customer, feature, window, limit and threshold)."
    );
    describe_counter!(
        USAGE_NOTICES_DROPPED,
        "Usage thresholds reached on the request path but not noticed because the queue to the notices thread was full."
    );
    describe_counter!(
        INSIGHTS_DROPPED,
        "Decisions left out of the usage report's aggregation because its queue was full."
    );
    describe_counter!(
        GATEWAY,
        "Gateway admissions (forward-auth, ext_authz, rate limit service), by api, status and reason."
    );
    describe_gauge!(
        CUSTOMERS_REVISION,
        "The revision of customer records this replica serves (the stream's, with --store)."
    );
    describe_gauge!(
        CUSTOMERS_STREAM_HEAD,
        "The last revision in the shared customer stream, as last read from Redis."
    );
    describe_gauge!(
        CUSTOMERS_LAG_REVISIONS,
        "Revisions in the shared customer stream this replica has not applied yet."
    );
    describe_gauge!(
        CUSTOMERS_LAG_SECONDS,
        Unit::Seconds,
        "Seconds since this replica last had every revision of the shared customer stream applied (0 when it has)."
    );
    describe_gauge!(
        CUSTOMERS_LAST_READ,
        Unit::Seconds,
        "When this replica last read the shared customer stream successfully (Unix seconds)."
    );
    describe_gauge!(
        CUSTOMERS_FOLLOWING,
        "1 while this replica follows the shared customer stream; 0 while Redis is unreachable or holds another history (the replica serves what it applied)."
    );
    describe_counter!(
        CUSTOMERS_RESYNCS,
        "Reloads of every customer record from the shared snapshot (a new replica, or the stream trimmed past this one's position)."
    );
    describe_counter!(
        CUSTOMERS_LEFT_OUT,
        "Customer records from the shared stream left out because they do not compile against this replica's policy files."
    );
    start_at_zero();
}

/// Creates every series whose label values are known before anything happens, at 0:
/// `increase()` over a series that appears with its first event sees no increase (the
/// first failure, refusal or replay would go unnoticed), and an alert on a series
/// that does not exist yet has no data. Features are known only once a snapshot is
/// served ([`snapshot_served`]). Adding 0 never resets a series already counting.
fn start_at_zero() {
    for name in [
        NOTICES,
        NOTICES_DELIVERED,
        NOTICES_FAILED,
        NOTICES_DROPPED,
        USAGE_NOTICES,
        USAGE_NOTICES_DROPPED,
        INSIGHTS_DROPPED,
        STORE_ERRORS,
        JOURNAL_ERRORS,
        JOURNAL_REFUSED,
        STATE_DAMAGED,
        AUDIT_DROPPED,
        IDEMPOTENT_REPLAYS,
        CUSTOMERS_RESYNCS,
        CUSTOMERS_LEFT_OUT,
    ] {
        counter!(name).increment(0);
    }
    for result in PORTAL_RESULTS {
        counter!(PORTAL_ACCESS, "result" => result).increment(0);
    }
    for result in ["success", "failure"] {
        counter!(RELOADS, "result" => result).increment(0);
        counter!(CHECKPOINTS, "result" => result).increment(0);
    }
    for (op, kind, reason) in decision_series() {
        decision_counter(op, kind, reason).increment(0);
    }
    for (api, status, reason) in GATEWAY_SERIES {
        counter!(GATEWAY, "api" => api, "status" => status, "reason" => reason).increment(0);
    }
    for route in DECISION_ROUTES {
        for status in [400, 503] {
            http_error_counter(route, status).increment(0);
        }
    }
}

/// The decisions each operation can make: per kind it applies to, granted, the
/// denials every grant can give, and the kind's own exhaustion; an unknown feature
/// (no kind); and a seat release, which is always granted once the customer is known.
fn decision_series() -> Vec<(Op, Option<Kind>, Reason)> {
    const KNOWN: [Reason; 6] = [
        Reason::Granted,
        Reason::UnknownCustomer,
        Reason::NotEntitled,
        Reason::Expired,
        Reason::NotYetActive,
        Reason::OutOfScope,
    ];
    let mut out = Vec::new();
    for op in Op::ALL {
        out.push((op, None, Reason::UnknownFeature));
        for kind in KINDS.into_iter().flatten().filter(|k| op.applies_to(*k)) {
            let reasons = match op {
                Op::SeatRelease => &KNOWN[..2],
                _ => &KNOWN[..],
            };
            out.extend(reasons.iter().map(|r| (op, Some(kind), *r)));
            let exhausted = match kind {
                Kind::Quota => Some(Reason::QuotaExhausted),
                Kind::Rate => Some(Reason::RateLimited),
                Kind::Seats => Some(Reason::SeatsExhausted),
                Kind::Flag | Kind::Value => None,
            };
            if let Some(r) = exhausted.filter(|_| op != Op::SeatRelease) {
                out.push((op, Some(kind), r));
            }
        }
    }
    out
}

/// The gateway answers known in advance: admissions, and the refusals of forward-auth
/// and ext_authz by reason (`unknown_customer` rising means requests name customers
/// the policy does not have: customer data out of sync); the rate limit service's two.
const GATEWAY_SERIES: [(&str, &str, &str); 20] = [
    ("authz_http", "200", "granted"),
    ("authz_http", "403", "no_route"),
    ("authz_http", "403", "unknown_customer"),
    ("authz_http", "403", "not_entitled"),
    ("authz_http", "403", "expired"),
    ("authz_http", "403", "not_yet_active"),
    ("authz_http", "403", "out_of_scope"),
    ("authz_http", "429", "quota_exhausted"),
    ("authz_http", "429", "rate_limited"),
    ("authz_grpc", "200", "granted"),
    ("authz_grpc", "403", "no_route"),
    ("authz_grpc", "403", "unknown_customer"),
    ("authz_grpc", "403", "not_entitled"),
    ("authz_grpc", "403", "expired"),
    ("authz_grpc", "403", "not_yet_active"),
    ("authz_grpc", "403", "out_of_scope"),
    ("authz_grpc", "429", "quota_exhausted"),
    ("authz_grpc", "429", "rate_limited"),
    ("ratelimit_grpc", "200", "ok"),
    ("ratelimit_grpc", "429", "over_limit"),
];

/// The `route` labels of the decision endpoints, whose 400 and 503 series start at 0.
const DECISION_ROUTES: [&str; 8] = [
    "check",
    "consume",
    "reserve",
    "batch",
    "seat_acquire",
    "seat_release",
    "reservations",
    "authz",
];

const KINDS: [Option<Kind>; 6] = [
    None,
    Some(Kind::Flag),
    Some(Kind::Quota),
    Some(Kind::Rate),
    Some(Kind::Seats),
    Some(Kind::Value),
];

/// Pre-resolved metric handles for the request path: incrementing one is an atomic
/// add, with no label hashing or registry lookup per decision.
#[derive(Debug)]
pub struct DecisionMetrics {
    counters: Vec<OnceLock<Counter>>,
    /// OFREP evaluations by mode (single, bulk), kind and reason.
    ofrep: Vec<OnceLock<Counter>>,
    duration: Histogram,
}

impl Default for DecisionMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DecisionMetrics {
    pub fn new() -> Self {
        DecisionMetrics {
            counters: (0..Op::ALL.len() * KINDS.len() * Reason::ALL.len())
                .map(|_| OnceLock::new())
                .collect(),
            ofrep: (0..2 * KINDS.len() * Reason::ALL.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration: histogram!(DECISION_DURATION),
        }
    }

    #[inline]
    pub fn decision(&self, op: Op, kind: Option<Kind>, reason: Reason) {
        let o = Op::ALL.iter().position(|x| *x == op).unwrap_or(0);
        let k = KINDS.iter().position(|x| *x == kind).unwrap_or(0);
        let r = Reason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        let i = (o * KINDS.len() + k) * Reason::ALL.len() + r;
        let Some(slot) = self.counters.get(i) else {
            return;
        };
        slot.get_or_init(|| decision_counter(op, kind, reason))
            .increment(1);
    }

    /// Counts one OFREP evaluation (`bulk`: one flag of a bulk evaluation).
    #[inline]
    pub fn ofrep(&self, bulk: bool, kind: Option<Kind>, reason: Reason) {
        let k = KINDS.iter().position(|x| *x == kind).unwrap_or(0);
        let r = Reason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        let i = (usize::from(bulk) * KINDS.len() + k) * Reason::ALL.len() + r;
        let Some(slot) = self.ofrep.get(i) else {
            return;
        };
        slot.get_or_init(|| {
            let mode = if bulk { "bulk" } else { "single" };
            let kind = kind.map_or("none", Kind::as_str);
            counter!(OFREP_EVALUATIONS, "mode" => mode, "kind" => kind, "reason" => reason.as_str())
        })
        .increment(1);
    }

    pub fn duration(&self, seconds: f64) {
        self.duration.record(seconds);
    }
}

fn decision_counter(op: Op, kind: Option<Kind>, reason: Reason) -> Counter {
    let allowed = if reason == Reason::Granted {
        "true"
    } else {
        "false"
    };
    let kind = kind.map_or("none", Kind::as_str);
    counter!(DECISIONS, "op" => op.as_str(), "kind" => kind, "allowed" => allowed, "reason" => reason.as_str())
}

pub fn quota_warning(feature: &str) {
    counter!(QUOTA_WARNINGS, "feature" => feature.to_string()).increment(1);
}

/// The results [`portal_access`] counts.
pub const PORTAL_RESULTS: [&str; 4] = ["ok", "missing", "forged", "expired"];

/// Counts a customer portal request by how its token fared (no customer id: the
/// label set stays four values).
pub fn portal_access(result: &'static str) {
    counter!(PORTAL_ACCESS, "result" => result).increment(1);
}

pub fn reload(result: &'static str) {
    counter!(RELOADS, "result" => result).increment(1);
}

/// Records a load of the policy directory: which path it took and how many files it read.
pub fn reload_path(path: &'static str, files_read: usize) {
    counter!(RELOAD_PATHS, "path" => path).increment(1);
    counter!(FILES_READ, "path" => path).increment(files_read as u64);
}

/// Whether a policy load is held back (see `reload::Held`).
pub fn reload_held(held: bool) {
    gauge!(RELOAD_HELD).set(if held { 1.0 } else { 0.0 });
}

/// Records a successful load of the policy directory, whether or not it changed the
/// served snapshot (a reverted broken change loads the version already served).
pub fn reload_succeeded(at: Timestamp) {
    gauge!(LAST_RELOAD_SUCCESS).set(at.as_secs_f64());
}

/// Records a newly served snapshot: its version, size and load time.
pub fn snapshot_served(snap: &Snapshot, previous: Option<&str>, at: Timestamp) {
    if let Some(prev) = previous {
        gauge!(SNAPSHOT_INFO, "version" => prev.to_string()).set(0.0);
    }
    gauge!(SNAPSHOT_INFO, "version" => snap.version.to_string()).set(1.0);
    reload_succeeded(at);
    gauge!(CUSTOMERS).set(snap.customers.len() as f64);
    for f in snap
        .catalog
        .features
        .iter()
        .filter(|f| f.kind == Kind::Quota)
    {
        counter!(QUOTA_WARNINGS, "feature" => f.name.to_string()).increment(0);
    }
}

/// Refreshes the gauges that move with time rather than with reloads (overrides that
/// expire, subscriptions approaching their end). Called before each scrape.
pub fn refresh_time_gauges(snap: &Snapshot, now: Timestamp) {
    gauge!(OVERRIDES_ACTIVE).set(snap.overrides_active(now) as f64);
    let mut counts = [0u64; EXPIRING_WINDOWS.len()];
    for s in snap.customers.subscriptions() {
        if s.ends <= now || s.ends == Timestamp::MAX {
            continue;
        }
        for (i, days) in EXPIRING_WINDOWS.iter().enumerate() {
            if s.ends.0 - now.0 < days * DAY {
                counts[i] += 1;
            }
        }
    }
    for (i, days) in EXPIRING_WINDOWS.iter().enumerate() {
        gauge!(SUBSCRIPTIONS_EXPIRING, "within" => format!("{days}d")).set(counts[i] as f64);
    }
}

pub fn store_error() {
    counter!(STORE_ERRORS).increment(1);
}

/// A gateway answer: `api` is `authz_http`, `authz_grpc` or `ratelimit_grpc`.
pub fn gateway(api: &'static str, status: u16, reason: &'static str) {
    let status = match status {
        200 => "200",
        403 => "403",
        429 => "429",
        _ => "other",
    };
    counter!(GATEWAY, "api" => api, "status" => status, "reason" => reason).increment(1);
}

pub fn http_error(route: &'static str, status: u16) {
    http_error_counter(route, status).increment(1);
}

fn http_error_counter(route: &'static str, status: u16) -> Counter {
    counter!(HTTP_ERRORS, "route" => route, "status" => status.to_string())
}

pub fn journal_flush(bytes: usize, seconds: f64) {
    counter!(JOURNAL_FLUSHES).increment(1);
    counter!(JOURNAL_BYTES).increment(bytes as u64);
    histogram!(JOURNAL_FLUSH_DURATION).record(seconds);
}

pub fn journal_error() {
    counter!(JOURNAL_ERRORS).increment(1);
}

/// The usage ledger's size, cap, and whether it is behind the journal.
pub fn ledger(bytes: u64, max_bytes: u64, behind: bool) {
    gauge!(LEDGER_BYTES).set(bytes as f64);
    gauge!(LEDGER_MAX_BYTES).set(max_bytes as f64);
    gauge!(LEDGER_BEHIND).set(f64::from(u8::from(behind)));
}

/// Journal records of a batch dropped in sync mode (their requests answered 503).
pub fn journal_dropped(records: u64) {
    counter!(JOURNAL_REFUSED).increment(records);
}

pub fn state_damaged(records: u64) {
    counter!(STATE_DAMAGED).increment(records);
}

pub fn checkpoint(result: &'static str, seconds: f64) {
    counter!(CHECKPOINTS, "result" => result).increment(1);
    if result == "success" {
        histogram!(CHECKPOINT_DURATION).record(seconds);
    }
}

/// How much live usage state a store holds: one gauge per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageState {
    pub quota_counters: usize,
    pub rate_limiters: usize,
    pub seat_pools: usize,
    pub reservations: usize,
    pub idempotency_keys: usize,
}

pub fn usage_state(c: &UsageState) {
    gauge!(USAGE_STATE, "kind" => "quota_counters").set(c.quota_counters as f64);
    gauge!(USAGE_STATE, "kind" => "rate_limiters").set(c.rate_limiters as f64);
    gauge!(USAGE_STATE, "kind" => "seat_pools").set(c.seat_pools as f64);
    gauge!(USAGE_STATE, "kind" => "reservations").set(c.reservations as f64);
    gauge!(USAGE_STATE, "kind" => "idempotency_keys").set(c.idempotency_keys as f64);
}

pub fn audit_dropped() {
    counter!(AUDIT_DROPPED).increment(1);
}

pub fn idempotent_replay() {
    counter!(IDEMPOTENT_REPLAYS).increment(1);
}

pub fn idempotency_key_refused() {
    counter!(IDEMPOTENCY_KEYS_REFUSED).increment(1);
}

pub fn store_degraded(on: bool) {
    gauge!(STORE_DEGRADED).set(if on { 1.0 } else { 0.0 });
}

pub fn store_fallback(mode: &'static str) {
    counter!(STORE_FALLBACKS, "on_error" => mode).increment(1);
}

pub fn store_dropped_delta() {
    counter!(STORE_DROPPED_DELTAS).increment(1);
}

pub fn notices_emitted(n: u64) {
    counter!(NOTICES).increment(n);
}

pub fn notice_delivered() {
    counter!(NOTICES_DELIVERED).increment(1);
}

pub fn notice_failed() {
    counter!(NOTICES_FAILED).increment(1);
}

pub fn notice_dropped() {
    counter!(NOTICES_DROPPED).increment(1);
}

pub fn usage_notices_emitted(n: u64) {
    counter!(USAGE_NOTICES).increment(n);
}

pub fn insights_dropped() {
    counter!(INSIGHTS_DROPPED).increment(1);
}

pub fn usage_notice_dropped() {
    counter!(USAGE_NOTICES_DROPPED).increment(1);
}

/// Where this replica stands in the shared customer stream.
pub fn customers_replication(p: &crate::live::replica::Progress) {
    gauge!(CUSTOMERS_REVISION).set(p.applied as f64);
    gauge!(CUSTOMERS_STREAM_HEAD).set(p.head as f64);
    gauge!(CUSTOMERS_LAG_REVISIONS).set(p.head.saturating_sub(p.applied) as f64);
    gauge!(CUSTOMERS_LAG_SECONDS).set(p.lag_seconds);
    if let Some(t) = p.last_read {
        gauge!(CUSTOMERS_LAST_READ).set(t.as_secs_f64());
    }
    gauge!(CUSTOMERS_FOLLOWING).set(if p.following { 1.0 } else { 0.0 });
}

pub fn customers_resynced() {
    counter!(CUSTOMERS_RESYNCS).increment(1);
}

pub fn customers_left_out(n: usize) {
    counter!(CUSTOMERS_LEFT_OUT).increment(n as u64);
}
