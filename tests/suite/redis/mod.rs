//! Usage shared across replicas through Redis, against real `redis-server`s and the
//! real binary.
//!
//! Every test starts its own `redis-server` on a free loopback port (no persistence)
//! and several `entitled serve --store redis://…` replicas, each with a state directory
//! of its own, all on the test clock at [`T0`] (January 2030, so the real calendar
//! never matters and every counter lives in one known window). The shared counters are
//! read straight from Redis by their documented key, the ledgers with
//! `entitled usage export`. Faults are made for real: the Redis child is killed
//! (`SIGKILL`), paused (`SIGSTOP`) and restarted on the same port, empty.
//!
//! Load threads pace themselves only where a rate is the thing measured (the cached
//! mode's over-admission bound); everything asynchronous is awaited by polling with a
//! deadline.
//!
//! The helpers the tests share are here; the tests, by topic, in the other files of
//! this folder.

mod cached;
mod faults;
mod keys;
mod strict;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// `self`: the topic files reach the support module as `super::support`.
use super::support::{
    self, FallibleConn, PolicyDir, Redis, Resp, Server, metric_value, output_within,
};

/// Where every replica's clock starts: mid-January 2030.
const T0: &str = "2030-01-15T00:00:00Z";
/// The month window of [`T0`].
const WINDOW_START: &str = "2030-01-01T00:00:00Z";
const WINDOW_END: &str = "2030-02-01T00:00:00Z";
const PREFIX: &str = "entitled";

const CATALOG: &str = r#"
features:
  api.calls: { kind: quota, unit: call }
  bulk: { kind: quota }
  credits: { kind: quota }
  cached.calls: { kind: quota }
  seats: { kind: seats }
  api.rate: { kind: rate }
  x: { kind: quota }
  "b:x": { kind: quota }
  "1:x": { kind: quota }
plans:
  base:
    grants:
      api.calls: { limit: 100, per: month }
      bulk: { limit: 100000000, per: month }
      credits: { limit: 100, per: month }
      cached.calls: { limit: 200, per: month }
      seats: { limit: 3 }
      api.rate: { limit: 10, per: 1h, burst: 10 }
      x: { limit: 1000, per: month }
      "b:x": { limit: 1000, per: month }
      "1:x": { limit: 1000, per: month }
"#;

/// Customer ids that a naive `customer:feature` key would confuse, and ones holding
/// the braces of a Redis Cluster hash tag.
const CUSTOMER_IDS: [&str; 6] = ["acme", "a", "a:b", "a:1", "{a}", "}x{y"];

fn customers_yaml() -> String {
    let mut s = String::from("customers:\n");
    for id in CUSTOMER_IDS {
        s.push_str(&format!(
            "  - id: {}\n    subscriptions:\n      - {{ plan: base, starts: \"2020-01-01T00:00:00Z\" }}\n",
            serde_json::to_string(id).expect("a JSON string is a YAML string")
        ));
    }
    s
}

fn policy() -> PolicyDir {
    PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("customers.yaml", &customers_yaml()),
    ])
}

/// The tests of this file run one at a time: a latency bound, a store timeout or a
/// staleness bound measured on two cores must not be another test's CPU contention
/// (each test starts several debug binaries). Together they take ~15 s.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- replicas ----

/// One `entitled serve` replica with its own state directory.
struct Replica {
    server: Server,
    state: tempfile::TempDir,
}

impl std::ops::Deref for Replica {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for Replica {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

/// `entitled serve --store REDIS --state-dir STATE --test-clock T0 EXTRA`, as a
/// process of its own: these tests stop replicas and read their `/metrics`.
fn serve_on(policies: &PolicyDir, redis: &Redis, state: &Path, extra: &[&str]) -> Server {
    serve_by(Server::spawn_with, policies, redis, state, extra)
}

fn serve_by(
    how: fn(&Path, &[&str]) -> Server,
    policies: &PolicyDir,
    redis: &Redis,
    state: &Path,
    extra: &[&str],
) -> Server {
    let url = redis.url();
    let dir = state.to_str().expect("a UTF-8 state path");
    let mut args = vec![
        "--state-dir",
        dir,
        "--test-clock",
        T0,
        "--store",
        url.as_str(),
    ];
    args.extend_from_slice(extra);
    how(policies.path(), &args)
}

/// A replica on a fresh state directory.
fn replica(policies: &PolicyDir, redis: &Redis, extra: &[&str]) -> Replica {
    let state = tempfile::tempdir().expect("state tempdir");
    Replica {
        server: serve_on(policies, redis, state.path(), extra),
        state,
    }
}

/// As [`replica`], in the test process, for a test that neither stops it nor reads
/// its `/metrics`.
fn replica_here(policies: &PolicyDir, redis: &Redis) -> Replica {
    let state = tempfile::tempdir().expect("state tempdir");
    Replica {
        server: serve_by(Server::start_with, policies, redis, state.path(), &[]),
        state,
    }
}

/// Starts the replica again on its own state directory (after a stop).
fn restart(r: &mut Replica, policies: &PolicyDir, redis: &Redis, extra: &[&str]) {
    r.server = serve_on(policies, redis, r.state.path(), extra);
}

fn replicas(n: usize, policies: &PolicyDir, redis: &Redis, extra: &[&str]) -> Vec<Replica> {
    (0..n).map(|_| replica(policies, redis, extra)).collect()
}

/// Graceful stop that must succeed.
fn stop(r: &mut Replica) {
    let status = r.stop_gracefully();
    assert!(
        status.success(),
        "graceful stop exited {status}:\n{}",
        r.stderr()
    );
}

/// The replica's ledger (`entitled usage export`), one JSON value per line.
fn ledger(state: &Path) -> Vec<Value> {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled"))
            .args(["usage", "export", "--state-dir"])
            .arg(state)
            .env_remove("RUST_LOG"),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "usage export exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 export")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Sum of `data.amount` over the events of `operation` for (customer, feature).
fn ledger_amount(events: &[Value], operation: &str, customer: &str, feature: &str) -> i64 {
    events
        .iter()
        .filter(|e| {
            e["data"]["operation"] == operation
                && e["subject"] == customer
                && e["data"]["feature"] == feature
        })
        .map(|e| e["data"]["amount"].as_i64().expect("integer amount"))
        .sum()
}

fn decide(s: &Server, path: &str, body: Value) -> Value {
    s.decide(path, &body)
}

fn consume(s: &Server, customer: &str, feature: &str, amount: u64) -> Value {
    decide(
        s,
        "/v1/consume",
        json!({"customer": customer, "feature": feature, "amount": amount}),
    )
}

fn used(s: &Server, customer: &str, feature: &str) -> u64 {
    let d = s.check(customer, feature);
    d["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `used` in {d}"))
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
}

/// A metric's value on a replica; 0 for a series not exported yet.
fn metric(s: &Server, series: &str) -> f64 {
    let r = s.get("/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    metric_value(&r.text(), series).unwrap_or(0.0)
}

const DEGRADED: &str = "entitled_store_degraded";
const ERRORS: &str = "entitled_store_errors_total";

fn fallbacks(s: &Server, mode: &str) -> f64 {
    metric(
        s,
        &format!("entitled_store_fallbacks_total{{on_error=\"{mode}\"}}"),
    )
}

// ------------------------------------------------------------- Redis keys ----

fn micros(rfc3339: &str) -> i64 {
    rfc3339
        .parse::<jiff::Timestamp>()
        .expect("an RFC 3339 time")
        .as_microsecond()
}

/// The documented hash tag: 16 hex digits of BLAKE3(customer).
fn tag(customer: &str) -> String {
    blake3::hash(customer.as_bytes()).as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `<prefix>:{<tag>}:q:<len>:<customer>:<len>:<feature>:<window_start_us>`.
fn counter_key(prefix: &str, customer: &str, feature: &str) -> String {
    format!(
        "{prefix}:{{{}}}:q:{}:{customer}:{}:{feature}:{}",
        tag(customer),
        customer.len(),
        feature.len(),
        micros(WINDOW_START)
    )
}

/// The shared counter of the January 2030 window, straight from Redis (0 if absent).
fn shared_used(redis: &Redis, customer: &str, feature: &str) -> i64 {
    shared_used_in(redis, PREFIX, customer, feature)
}

fn shared_used_in(redis: &Redis, prefix: &str, customer: &str, feature: &str) -> i64 {
    let key = counter_key(prefix, customer, feature);
    let v = redis.cmd(&["HGET", &key, "used"]);
    match v.text() {
        None => 0,
        Some(t) => t
            .parse()
            .unwrap_or_else(|_| panic!("HGET {key} used: {v:?}")),
    }
}

// ------------------------------------------------------------- load client ----

/// What one load thread does.
#[derive(Debug, Clone)]
struct Spec {
    body: Value,
    /// At most this many requests ...
    max_requests: u64,
    /// ... within this long.
    max_time: Duration,
    /// One request per `pace` (a rate to measure against), or as fast as answered.
    pace: Option<Duration>,
    /// Stop after this many denials in a row.
    stop_after_denials: Option<u64>,
}

impl Spec {
    fn consume(customer: &str, feature: &str) -> Spec {
        Spec {
            body: json!({"customer": customer, "feature": feature}),
            max_requests: 20_000,
            max_time: Duration::from_secs(30),
            pace: None,
            stop_after_denials: None,
        }
    }
}

/// What load threads saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    sent: u64,
    /// 200 and `allowed: true`.
    allowed: u64,
    /// 200 and `allowed: false`.
    denied: u64,
    /// Any other status, by status.
    statuses: BTreeMap<u16, u64>,
    first_unexpected: Option<String>,
    /// Transport failures (the thread stops at the first).
    io_errors: u64,
    latencies: Vec<Duration>,
    first_admit: Option<Instant>,
    last_admit: Option<Instant>,
}

impl Tally {
    fn merge(mut self, o: Tally) -> Tally {
        self.sent += o.sent;
        self.allowed += o.allowed;
        self.denied += o.denied;
        for (s, n) in o.statuses {
            *self.statuses.entry(s).or_insert(0) += n;
        }
        self.first_unexpected = self.first_unexpected.or(o.first_unexpected);
        self.io_errors += o.io_errors;
        self.latencies.extend(o.latencies);
        self.first_admit = match (self.first_admit, o.first_admit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_admit = self.last_admit.max(o.last_admit);
        self
    }

    fn max_latency(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        v[i]
    }

    /// Admitted per second between the first and the last admission.
    fn admit_rate(&self) -> f64 {
        match (self.first_admit, self.last_admit) {
            (Some(a), Some(b)) if self.allowed >= 2 => {
                self.allowed as f64 / (b - a).as_secs_f64().max(0.01)
            }
            _ => 0.0,
        }
    }
}

/// One load thread against `addr`: starts at `start` (after the barrier), runs `spec`
/// until a bound, `stop`, or a transport failure; bumps `acked` per admission.
fn load_thread(
    addr: SocketAddr,
    spec: Spec,
    start: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut t = Tally::default();
        let body = serde_json::to_vec(&spec.body).expect("encoding the body");
        let mut c = FallibleConn::connect(addr);
        start.wait();
        let began = Instant::now();
        let mut denials_in_a_row = 0;
        while !stop.load(Ordering::Relaxed)
            && t.sent < spec.max_requests
            && began.elapsed() < spec.max_time
            && spec.stop_after_denials.is_none_or(|n| denials_in_a_row < n)
        {
            if let Some(p) = spec.pace {
                let due = began + p * t.sent as u32;
                let now = Instant::now();
                if due > now {
                    // Pacing a load generator to a rate; no event is waited for.
                    std::thread::sleep(due - now);
                }
            }
            let conn = match &mut c {
                Ok(c) => c,
                Err(e) => {
                    t.io_errors += 1;
                    t.first_unexpected.get_or_insert(format!("connect: {e}"));
                    break;
                }
            };
            t.sent += 1;
            let sent_at = Instant::now();
            let r = conn.post("/v1/consume", &body);
            let answered_at = Instant::now();
            match r {
                Ok((200, b)) => {
                    t.latencies.push(answered_at - sent_at);
                    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                    match v["allowed"].as_bool() {
                        Some(true) => {
                            t.allowed += 1;
                            denials_in_a_row = 0;
                            t.first_admit.get_or_insert(answered_at);
                            t.last_admit = Some(answered_at);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(false) => {
                            t.denied += 1;
                            denials_in_a_row += 1;
                        }
                        None => {
                            *t.statuses.entry(200).or_insert(0) += 1;
                            t.first_unexpected.get_or_insert(v.to_string());
                        }
                    }
                }
                Ok((status, b)) => {
                    t.latencies.push(answered_at - sent_at);
                    *t.statuses.entry(status).or_insert(0) += 1;
                    t.first_unexpected
                        .get_or_insert(format!("{status}: {}", String::from_utf8_lossy(&b)));
                }
                Err(e) => {
                    t.io_errors += 1;
                    t.first_unexpected
                        .get_or_insert(format!("after {:?}: {e}", answered_at - sent_at));
                    break;
                }
            }
        }
        t
    })
}

/// A running load: threads spread round-robin over `addrs`.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// (replica index, thread)
    threads: Vec<(usize, JoinHandle<Tally>)>,
}

impl Load {
    fn start(addrs: &[SocketAddr], threads: usize, spec: &Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(threads));
        let threads = (0..threads)
            .map(|i| {
                let r = i % addrs.len();
                let h = load_thread(
                    addrs[r],
                    spec.clone(),
                    barrier.clone(),
                    stop.clone(),
                    acked.clone(),
                );
                (r, h)
            })
            .collect();
        Load {
            stop,
            acked,
            threads,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops the threads and joins them: the tally of each replica index.
    fn finish(self) -> BTreeMap<usize, Tally> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Joins the threads as they end by their own bounds.
    fn join(self) -> BTreeMap<usize, Tally> {
        let mut out: BTreeMap<usize, Tally> = BTreeMap::new();
        for (r, h) in self.threads {
            let t = h.join().expect("load thread panicked");
            let e = out.remove(&r).unwrap_or_default();
            out.insert(r, e.merge(t));
        }
        out
    }
}

fn total(per: &BTreeMap<usize, Tally>) -> Tally {
    per.values().cloned().fold(Tally::default(), Tally::merge)
}

fn addrs(rs: &[Replica]) -> Vec<SocketAddr> {
    rs.iter().map(|r| r.addr).collect()
}
