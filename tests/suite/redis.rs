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

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::support::{
    FallibleConn, PolicyDir, Redis, Resp, Server, metric_value, output_within, post_json,
    wait_until,
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

// ------------------------------------------------------------------ strict ----

/// Three replicas, one Redis, strict mode: 2,000 concurrent consume(1) over 16
/// keep-alive connections against a limit of 100 admit exactly 100; every replica
/// reads the shared counter as 100; the counter key has the documented name, window
/// end and expiry; each replica's ledger holds exactly what it admitted.
#[test]
fn strict_replicas_admit_exactly_the_limit_together() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    // Exactness is the strict path's: a store timeout would be a fault answered by
    // `--on-store-error local` (counted in the replica's own view, so past the shared
    // limit). A debug build under this load on two cores can miss the default 50 ms,
    // so the timeout is long here and the test checks no fallback happened.
    let mut rs = replicas(3, &dir, &redis, &["--store-timeout", "2s"]);
    let mut spec = Spec::consume("acme", "api.calls");
    spec.max_requests = 125; // 16 × 125 = 2,000
    let began = Instant::now();
    let per = Load::start(&addrs(&rs), 16, &spec).join();
    let elapsed = began.elapsed();
    let all = total(&per);
    assert_eq!(all.sent, 2_000, "{all:?}");
    assert!(
        all.statuses.is_empty() && all.io_errors == 0,
        "unexpected answers: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    eprintln!(
        "strict, 3 replicas: 2,000 consumes in {elapsed:?} ({:.0}/s), admitted per replica {:?}, p50 {:?} p99 {:?} max {:?}",
        2_000.0 / elapsed.as_secs_f64(),
        per.values().map(|t| t.allowed).collect::<Vec<_>>(),
        all.percentile(0.5),
        all.percentile(0.99),
        all.max_latency()
    );
    let fell_back: Vec<f64> = rs.iter().map(|r| fallbacks(r, "local")).collect();
    assert!(
        fell_back.iter().all(|n| *n == 0.0),
        "store fallbacks {fell_back:?}, store errors {:?}",
        rs.iter().map(|r| metric(r, ERRORS)).collect::<Vec<_>>()
    );
    assert_eq!(
        all.allowed,
        100,
        "admitted across replicas: {:?}",
        per.values().map(|t| t.allowed).collect::<Vec<_>>()
    );
    assert_eq!(all.denied, 1_900);

    for r in &rs {
        let d = r.check("acme", "api.calls");
        assert_eq!(
            (
                d["used"].clone(),
                d["remaining"].clone(),
                d["allowed"].clone()
            ),
            (json!(100), json!(0), json!(false)),
            "{d}"
        );
    }
    let key = counter_key(PREFIX, "acme", "api.calls");
    assert_eq!(shared_used(&redis, "acme", "api.calls"), 100);
    let end_us = micros(WINDOW_END);
    assert_eq!(
        redis.cmd(&["HGET", &key, "window_end"]).int(),
        Some(end_us),
        "window_end of {key}"
    );
    assert_eq!(
        redis.cmd(&["PEXPIRETIME", &key]).int(),
        Some(end_us / 1_000 + 86_400_000),
        "{key} must expire a day after its window"
    );

    let mut sum = 0;
    for (i, r) in rs.iter_mut().enumerate() {
        stop(r);
        let events = ledger(r.state.path());
        let n = ledger_amount(&events, "consume", "acme", "api.calls");
        assert_eq!(
            n as u64, per[&i].allowed,
            "replica {i}'s ledger against what it admitted"
        );
        sum += n;
    }
    assert_eq!(sum, 100, "the ledgers sum to the shared counter");
}

/// Seats across replicas: 10 holders acquiring at once over three replicas get
/// exactly 3 seats; a holder's acquire on another replica is idempotent; a release on
/// one replica frees the seat for another; the ledgers sum to the seats held.
#[test]
fn strict_seats_are_exact_across_replicas() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(3, &dir, &redis, &[]);
    let seat = |r: &Replica, op: &str, holder: &str| {
        decide(
            r,
            &format!("/v1/seats/{op}"),
            json!({"customer": "acme", "feature": "seats", "holder": holder}),
        )
    };

    let barrier = Arc::new(Barrier::new(10));
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let addr = rs[i % 3].addr;
            let b = barrier.clone();
            std::thread::spawn(move || {
                let body =
                    json!({"customer": "acme", "feature": "seats", "holder": format!("u{i}")});
                b.wait();
                let r = post_json(addr, "/v1/seats/acquire", &body);
                assert_eq!(r.status, 200, "{}", r.text());
                (i, r.json())
            })
        })
        .collect();
    let answers: Vec<(usize, Value)> = handles
        .into_iter()
        .map(|h| h.join().expect("acquire thread panicked"))
        .collect();
    let winners: Vec<usize> = answers
        .iter()
        .filter(|(_, d)| d["allowed"] == true)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 3, "seats admitted: {answers:?}");
    for (_, d) in answers.iter().filter(|(_, d)| d["allowed"] == false) {
        assert_eq!(d["reason"], "seats_exhausted", "{d}");
    }
    let losers: Vec<usize> = (0..10).filter(|i| !winners.contains(i)).collect();

    // The same holder on another replica: admitted, nothing more taken.
    let w = winners[0];
    let d = seat(&rs[(w + 1) % 3], "acquire", &format!("u{w}"));
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(3)),
        "re-acquire on another replica: {d}"
    );
    let l = losers[0];
    let d = seat(&rs[(l + 1) % 3], "acquire", &format!("u{l}"));
    assert_eq!(d["allowed"], false, "the pool is full: {d}");

    // Released on a third replica, the seat is free for anyone on any replica.
    let d = seat(&rs[(w + 2) % 3], "release", &format!("u{w}"));
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(2)),
        "{d}"
    );
    let d = seat(&rs[w % 3], "acquire", &format!("u{l}"));
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(3)),
        "{d}"
    );
    let mut held: BTreeSet<String> = winners[1..].iter().map(|i| format!("u{i}")).collect();
    held.insert(format!("u{l}"));
    let pool = format!("{PREFIX}:{{{}}}:s:4:acme:5:seats", tag("acme"));
    let members: BTreeSet<String> = redis
        .cmd(&["SMEMBERS", &pool])
        .items()
        .iter()
        .filter_map(|v| v.text())
        .collect();
    assert_eq!(members, held, "holders in {pool}");

    let mut events = Vec::new();
    for r in &mut rs {
        stop(r);
        events.extend(ledger(r.state.path()));
    }
    let count = |op: &str| {
        events
            .iter()
            .filter(|e| e["data"]["operation"] == op)
            .count()
    };
    // 3 winners + the late one acquired; one release; the idempotent re-acquire and
    // the denied acquires are no events.
    assert_eq!(
        (count("seat_acquire"), count("seat_release")),
        (4, 1),
        "{events:?}"
    );
    assert_eq!(
        ledger_amount(&events, "seat_acquire", "acme", "seats")
            + ledger_amount(&events, "seat_release", "acme", "seats"),
        3,
        "seat events sum to the seats held"
    );
}

/// Idempotency keys are shared: a keyed consume retried on another replica answers
/// the same and counts nothing; the key with another amount is 422 on any replica;
/// the same new key sent to all three replicas at once is counted once.
#[test]
fn strict_idempotency_keys_answer_across_replicas() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(3, &dir, &redis, &[]);
    let keyed = json!({"customer": "acme", "feature": "credits", "amount": 5, "idempotency_key": "order-1"});
    let first = decide(&rs[0], "/v1/consume", keyed.clone());
    assert_eq!(
        (first["allowed"].clone(), first["used"].clone()),
        (json!(true), json!(5)),
        "{first}"
    );
    for r in &rs[1..] {
        assert_eq!(
            decide(r, "/v1/consume", keyed.clone()),
            first,
            "a retry on another replica"
        );
    }
    for r in &rs {
        assert_eq!(used(r, "acme", "credits"), 5, "the retries counted");
    }
    let other = json!({"customer": "acme", "feature": "credits", "amount": 6, "idempotency_key": "order-1"});
    for r in &rs {
        assert_error(
            &r.post("/v1/consume", &other),
            422,
            "idempotency_key_reused",
        );
    }
    consume(&rs[2], "acme", "credits", 3);
    assert_eq!(
        decide(&rs[1], "/v1/consume", keyed.clone()),
        first,
        "a retry after other consumes"
    );
    assert_eq!(used(&rs[0], "acme", "credits"), 8);

    // One new key, nine copies at once over the three replicas: counted once.
    let racing = json!({"customer": "acme", "feature": "credits", "amount": 7, "idempotency_key": "order-2"});
    let barrier = Arc::new(Barrier::new(9));
    let handles: Vec<_> = (0..9)
        .map(|i| {
            let addr = rs[i % 3].addr;
            let b = barrier.clone();
            let body = racing.clone();
            std::thread::spawn(move || {
                b.wait();
                post_json(addr, "/v1/consume", &body)
            })
        })
        .collect();
    let answers: Vec<Resp> = handles
        .into_iter()
        .map(|h| h.join().expect("retry thread panicked"))
        .collect();
    let bodies: BTreeSet<String> = answers
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            r.text()
        })
        .collect();
    assert_eq!(
        bodies.len(),
        1,
        "racing copies answered differently: {bodies:?}"
    );
    assert_eq!(used(&rs[2], "acme", "credits"), 15, "5 + 3 + 7, once each");
    assert_eq!(shared_used(&redis, "acme", "credits"), 15);

    let mut events = Vec::new();
    for r in &mut rs {
        stop(r);
        events.extend(ledger(r.state.path()));
    }
    assert_eq!(
        events.len(),
        3,
        "one ledger event per counted consume, over all replicas: {events:?}"
    );
    assert_eq!(ledger_amount(&events, "consume", "acme", "credits"), 15);
}

fn reserve(r: &Server, amount: u64) -> String {
    let d = decide(
        r,
        "/v1/reserve",
        json!({"customer": "acme", "feature": "credits", "amount": amount, "ttl": "5m"}),
    );
    assert_eq!(d["allowed"], true, "reserve {amount}: {d}");
    let id = d["reservation"]
        .as_str()
        .unwrap_or_else(|| panic!("no reservation in {d}"))
        .to_string();
    assert!(
        id.len() == 36 && id.starts_with("rsv_") && id[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "reservation id {id}"
    );
    id
}

fn settle(r: &Server, id: &str, how: &str, amount: Option<u64>) -> Resp {
    let path = format!("/v1/reservations/{id}/{how}");
    match amount {
        Some(n) => r.post(&path, &json!({ "amount": n })),
        None => r.post_raw(&path, ""),
    }
}

fn would_allow(r: &Server, amount: u64) -> bool {
    let d = decide(
        r,
        "/v1/check",
        json!({"customer": "acme", "feature": "credits", "amount": amount}),
    );
    d["allowed"].as_bool().unwrap_or_else(|| panic!("{d}"))
}

/// Reservations are shared: reserved on A, the hold counts on B and C; committed on
/// B (the rest of the hold given back), it is unknown everywhere after; another is
/// released on A; a commit beyond the hold takes the extra if it fits. Only commits
/// are billed, in the ledger of the replica that committed; no hold is left in Redis.
#[test]
fn strict_reservations_settle_on_any_replica() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(3, &dir, &redis, &[]);
    let id = reserve(&rs[0], 30);
    for r in &rs {
        assert_eq!(
            used(r, "acme", "credits"),
            30,
            "the hold counts for everyone"
        );
        assert!(would_allow(r, 70));
        assert!(!would_allow(r, 71), "the hold is not counted");
    }
    let d = consume(&rs[2], "acme", "credits", 71);
    assert_eq!(d["allowed"], false, "{d}");

    let r = settle(&rs[1], &id, "commit", Some(20));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["allowed"].clone(),
            v["committed"].clone(),
            v["released"].clone(),
            v["used"].clone(),
            v["limit"].clone(),
            v["remaining"].clone()
        ),
        (
            json!(true),
            json!(20),
            json!(10),
            json!(20),
            json!(100),
            json!(80)
        ),
        "{v}"
    );
    for r in &rs {
        assert_error(
            &settle(r, &id, "commit", Some(20)),
            404,
            "unknown_reservation",
        );
        assert_error(&settle(r, &id, "release", None), 404, "unknown_reservation");
    }
    assert_eq!(used(&rs[2], "acme", "credits"), 20);

    let other = reserve(&rs[2], 50);
    assert_eq!(used(&rs[1], "acme", "credits"), 70);
    let r = settle(&rs[0], &other, "release", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["committed"].clone(), v["released"].clone()),
        (json!(0), json!(50)),
        "{v}"
    );
    assert_eq!(used(&rs[1], "acme", "credits"), 20);

    // Committing more than the hold takes the extra when it fits.
    let small = reserve(&rs[1], 10);
    let r = settle(&rs[2], &small, "commit", Some(15));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["committed"].clone(), v["used"].clone()),
        (json!(15), json!(35)),
        "{v}"
    );
    assert_eq!(shared_used(&redis, "acme", "credits"), 35);
    let left = redis.cli(&["--scan", "--pattern", &format!("{PREFIX}:*:r:*")]);
    assert_eq!(left.trim(), "", "settled reservations left in Redis");
    let holds = format!("{}:h", counter_key(PREFIX, "acme", "credits"));
    assert_eq!(redis.cmd(&["HLEN", &holds]).int(), Some(0), "holds left");

    let mut per = Vec::new();
    for r in &mut rs {
        stop(r);
        per.push(ledger(r.state.path()));
    }
    let commits = |events: &[Value]| ledger_amount(events, "commit", "acme", "credits");
    assert_eq!(
        per.iter().map(|e| commits(e)).collect::<Vec<_>>(),
        vec![0, 20, 15],
        "commits billed by the replica that committed: {per:?}"
    );
    let b = per[1]
        .iter()
        .find(|e| e["data"]["operation"] == "commit")
        .expect("B's commit event");
    assert_eq!(b["data"]["reservation"], id.as_str(), "{b}");
    assert!(
        per.iter()
            .flatten()
            .all(|e| e["data"]["operation"] == "commit"),
        "reserves and releases are not billed: {per:?}"
    );
}

// ------------------------------------------------------------------ cached ----

/// Cached mode, three replicas, flush every 100 ms, limit 200, each replica consuming
/// at a paced ~100/s: the admitted total exceeds the limit by no more than the
/// documented bound (R−1)·λ·(T+RTT), with λ measured per replica during the test and
/// T+RTT taken as T + 50 ms. After the flushes converge, the shared counter, every
/// replica's view and the ledgers all equal the admitted total.
#[test]
fn cached_over_admission_stays_within_the_documented_bound() {
    const R: usize = 3;
    const LIMIT: i64 = 200;
    const FLUSH: Duration = Duration::from_millis(100);
    const SLACK: Duration = Duration::from_millis(50);
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(
        R,
        &dir,
        &redis,
        &["--store-mode", "cached", "--store-flush-interval", "100ms"],
    );
    // Two threads per replica, each 50/s: ~100 admissions/s per replica, so the
    // limit is reached after several flushes.
    let mut spec = Spec::consume("acme", "cached.calls");
    spec.pace = Some(Duration::from_millis(20));
    spec.max_requests = 1_000;
    spec.max_time = Duration::from_secs(15);
    // 25 denials in a row (0.5 s): the replica's view has passed the limit for good.
    spec.stop_after_denials = Some(25);
    let rtt = {
        let t = Instant::now();
        redis.cmd(&["PING"]);
        t.elapsed()
    };
    let per = Load::start(&addrs(&rs), 2 * R, &spec).join();
    let all = total(&per);
    assert!(
        all.statuses.is_empty() && all.io_errors == 0,
        "unexpected answers: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    for (i, t) in &per {
        // Both threads of every replica ended on 25 denials in a row.
        assert!(
            t.denied >= 50,
            "replica {i} never settled on denying: {t:?}"
        );
    }
    let admitted = all.allowed as i64;
    let rates: Vec<f64> = per.values().map(Tally::admit_rate).collect();
    let lambda = rates.iter().copied().fold(0.0, f64::max);
    let window = (FLUSH + SLACK).as_secs_f64();
    let bound = (R as f64 - 1.0) * lambda * window;
    let over = admitted - LIMIT;
    eprintln!(
        "cached, {R} replicas, T = {FLUSH:?} (+{SLACK:?} for the round trip; measured PING {rtt:?}): \
         admitted {admitted} of limit {LIMIT} (per replica {:?}), λ per replica {:.1?}/s, \
         over-admission {over}, bound (R−1)·λ·(T+RTT) = {bound:.1}",
        per.values().map(|t| t.allowed).collect::<Vec<_>>(),
        rates
    );
    assert!(admitted >= LIMIT, "under-admitted: {admitted} of {LIMIT}");
    assert!(
        over as f64 <= bound,
        "over-admission {over} beyond the documented bound {bound:.1}"
    );

    // Convergence: Redis holds every admission; each replica (all consumed in the
    // window) reads the shared total back.
    let converged = wait_until(Duration::from_secs(10), || {
        shared_used(&redis, "acme", "cached.calls") == admitted
    });
    assert!(
        converged,
        "shared counter {} never reached the {admitted} admitted",
        shared_used(&redis, "acme", "cached.calls")
    );
    for (i, r) in rs.iter().enumerate() {
        let ok = wait_until(Duration::from_secs(10), || {
            used(r, "acme", "cached.calls") == admitted as u64
        });
        assert!(
            ok,
            "replica {i} reads {} after convergence, not {admitted}",
            used(r, "acme", "cached.calls")
        );
    }
    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "cached.calls");
    }
    assert_eq!(sum, admitted, "ledgers against the admitted total");
    assert_eq!(
        shared_used(&redis, "acme", "cached.calls"),
        admitted,
        "the final flushes at stop counted something twice"
    );
}

/// Cached mode: a replica restarted on its state directory must read the shared
/// total again, not the shared total on top of what it recovered from its own state.
#[test]
fn cached_replica_restart_keeps_the_shared_view() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let flags = ["--store-mode", "cached", "--store-flush-interval", "100ms"];
    let mut rs = replicas(2, &dir, &redis, &flags);
    consume(&rs[0], "acme", "credits", 50);
    consume(&rs[1], "acme", "credits", 30);
    for r in &rs {
        assert!(
            wait_until(Duration::from_secs(10), || used(r, "acme", "credits") == 80),
            "never converged on 80: {}",
            used(r, "acme", "credits")
        );
    }
    stop(&mut rs[0]);
    restart(&mut rs[0], &dir, &redis, &flags);
    let recovered = used(&rs[0], "acme", "credits");
    consume(&rs[0], "acme", "credits", 1);
    let shared = || shared_used(&redis, "acme", "credits");
    assert!(
        wait_until(Duration::from_secs(10), || shared() == 81),
        "shared {}",
        shared()
    );
    // Two more flush rounds of A, observed through B's view (B consumed here too).
    assert!(wait_until(Duration::from_secs(10), || used(
        &rs[1], "acme", "credits"
    ) == 81));
    let mut views = Vec::new();
    let settled = wait_until(Duration::from_secs(3), || {
        views.push(used(&rs[0], "acme", "credits"));
        views.len() >= 20 && views[views.len() - 20..].iter().all(|v| *v == 81)
    });
    let seen: BTreeSet<u64> = views.iter().copied().collect();
    eprintln!("cached restart: A recovered {recovered}, shared 81, A reads {seen:?} afterwards");
    assert!(settled, "A's view after its restart: {seen:?}, shared 81");
    let d = consume(&rs[0], "acme", "credits", 19);
    assert_eq!(d["allowed"], true, "19 of the 100 are left: {d}");
}

// ------------------------------------------------------------------ faults ----

/// Latency bound on every request while Redis is dead or stuck: the 50 ms store
/// timeout plus a generous margin for a debug build on two busy cores.
const LATENCY_BOUND: Duration = Duration::from_secs(1);

/// Redis killed under load (`--on-store-error local`): every request is answered 200
/// well within the bound, the replicas report `entitled_store_degraded 1` and count
/// fallbacks; restarted empty on the same port, the replicas recover by themselves
/// (degraded 0) and Redis then holds exactly the units counted locally during the
/// outage, in the same window key. The ledgers hold every admission.
#[test]
fn redis_killed_under_load_local_fallback_reconciles_after_restart() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(2, &dir, &redis, &["--store-timeout", "50ms"]);
    let load = Load::start(&addrs(&rs), 4, &Spec::consume("acme", "bulk"));
    assert!(
        wait_until(Duration::from_secs(20), || load.acked() >= 300),
        "300 consumes not admitted before the fault"
    );
    let before = load.acked();
    redis.kill();
    let killed = Instant::now();
    // Long enough for the breaker to open and be probed again twice (500 ms
    // cool-down): 3 failures to open it, one per probe.
    let degraded = wait_until(Duration::from_secs(10), || {
        rs.iter()
            .all(|r| metric(r, DEGRADED) == 1.0 && metric(r, ERRORS) >= 5.0)
            && rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() >= 300.0
    });
    let outage_acked = load.acked() - before;
    let per = load.finish();
    let outage = killed.elapsed();
    assert!(
        degraded,
        "degraded {:?}, local fallbacks {:?}",
        rs.iter().map(|r| metric(r, DEGRADED)).collect::<Vec<_>>(),
        rs.iter().map(|r| fallbacks(r, "local")).collect::<Vec<_>>()
    );
    let all = total(&per);
    assert!(
        all.statuses.is_empty() && all.io_errors == 0 && all.denied == 0,
        "answers other than 200 allowed: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    let local: Vec<f64> = rs.iter().map(|r| fallbacks(r, "local")).collect();
    let errors: Vec<f64> = rs.iter().map(|r| metric(r, ERRORS)).collect();
    let counted_locally = local.iter().sum::<f64>() as i64;
    eprintln!(
        "Redis killed after {before} strict consumes: {} admitted in {outage:?} of outage \
         ({counted_locally} counted locally, store errors {errors:?}); latency p50 {:?} p99 {:?} max {:?}",
        outage_acked,
        all.percentile(0.5),
        all.percentile(0.99),
        all.max_latency()
    );
    assert!(
        all.max_latency() < LATENCY_BOUND,
        "a request took {:?} while Redis was down",
        all.max_latency()
    );
    assert!(errors.iter().all(|e| *e > 0.0), "store errors {errors:?}");
    for r in &rs {
        let d = r.check("acme", "bulk");
        assert_eq!(d["allowed"], true, "checks answer locally: {d}");
    }
    let local_after_checks: i64 = rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() as i64;

    redis.restart();
    let restarted = Instant::now();
    let recovered = wait_until(Duration::from_secs(10), || {
        rs.iter().all(|r| metric(r, DEGRADED) == 0.0)
            && shared_used(&redis, "acme", "bulk") == counted_locally
    });
    assert!(
        recovered,
        "after the restart: degraded {:?}, shared counter {} (counted locally {counted_locally})",
        rs.iter().map(|r| metric(r, DEGRADED)).collect::<Vec<_>>(),
        shared_used(&redis, "acme", "bulk")
    );
    eprintln!(
        "recovered {:?} after the restart; {} checks answered locally too",
        restarted.elapsed(),
        local_after_checks - counted_locally
    );
    // Strict again: each replica counts in Redis, on top of the reconciled deltas.
    for (i, r) in rs.iter().enumerate() {
        let d = consume(r, "acme", "bulk", 1);
        assert_eq!(d["used"], json!(counted_locally + 1 + i as i64), "{d}");
    }
    assert_eq!(shared_used(&redis, "acme", "bulk"), counted_locally + 2);

    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    }
    assert_eq!(
        sum,
        all.allowed as i64 + 2,
        "the ledgers hold every admission"
    );
    assert_eq!(
        shared_used(&redis, "acme", "bulk"),
        counted_locally + 2,
        "the final flushes at stop counted something twice"
    );
}

/// Redis paused with SIGSTOP (a stuck server that keeps its connections): requests
/// still answer 200 within the bound, the replicas degrade, and after SIGCONT they
/// recover by themselves. Nothing admitted is lost from the shared counter.
#[test]
fn redis_stopped_requests_stay_fast_and_recover() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(2, &dir, &redis, &["--store-timeout", "50ms"]);
    let load = Load::start(&addrs(&rs), 4, &Spec::consume("acme", "bulk"));
    assert!(
        wait_until(Duration::from_secs(20), || load.acked() >= 200),
        "200 consumes not admitted before the fault"
    );
    redis.pause();
    let paused = Instant::now();
    // Long enough for the breaker to open and be probed again (500 ms cool-down).
    let degraded = wait_until(Duration::from_secs(10), || {
        rs.iter()
            .all(|r| metric(r, DEGRADED) == 1.0 && metric(r, ERRORS) >= 6.0)
            && rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() >= 300.0
    });
    let stuck = paused.elapsed();
    redis.resume();
    let recovered = wait_until(Duration::from_secs(10), || {
        rs.iter().all(|r| metric(r, DEGRADED) == 0.0)
    });
    let after = load.acked();
    let more = wait_until(Duration::from_secs(20), || load.acked() >= after + 200);
    let per = load.finish();
    let all = total(&per);
    let errors: Vec<f64> = rs.iter().map(|r| metric(r, ERRORS)).collect();
    let local: Vec<f64> = rs.iter().map(|r| fallbacks(r, "local")).collect();
    eprintln!(
        "Redis stopped for {stuck:?}: store errors {errors:?}, local fallbacks {local:?}; \
         latency p50 {:?} p99 {:?} max {:?}",
        all.percentile(0.5),
        all.percentile(0.99),
        all.max_latency()
    );
    assert!(
        degraded,
        "never degraded: errors {errors:?}, fallbacks {local:?}"
    );
    assert!(recovered, "still degraded 10 s after SIGCONT");
    assert!(more, "consumes did not resume after SIGCONT");
    assert!(
        all.statuses.is_empty() && all.io_errors == 0 && all.denied == 0,
        "answers other than 200 allowed: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    assert!(
        all.max_latency() < LATENCY_BOUND,
        "a request took {:?} while Redis was stopped",
        all.max_latency()
    );

    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    }
    let shared = shared_used(&redis, "acme", "bulk");
    eprintln!(
        "after SIGCONT and graceful stops: {} admitted, ledgers {sum}, shared counter {shared} ({:+})",
        all.allowed,
        shared - sum
    );
    assert_eq!(sum, all.allowed as i64, "the ledgers hold every admission");
    assert!(
        shared >= sum,
        "admissions lost from the shared counter: {shared} < {sum}"
    );
}

/// A stalled Redis applies what it was sent once it runs again; a call that timed
/// out must therefore not be counted a second time. One replica, Redis paused: the
/// first consumes time out (their scripts wait in the socket), the rest are counted
/// locally; the background flush of those deltas reaches the paused server, times out
/// and is kept for a retry. After SIGCONT and a graceful stop, the shared counter must
/// equal what was admitted (the ledger).
#[test]
fn redis_stall_counts_nothing_twice() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut r = replica(&dir, &redis, &["--store-timeout", "50ms"]);
    assert_eq!(consume(&r, "acme", "bulk", 1)["used"], 1);
    redis.pause();
    for _ in 0..10 {
        assert_eq!(consume(&r, "acme", "bulk", 1)["allowed"], true);
    }
    let errors = metric(&r, ERRORS);
    // Two flush attempts after breaker cool-downs, each timed out.
    let flushed = wait_until(Duration::from_secs(5), || {
        metric(&r, ERRORS) >= errors + 2.0
    });
    redis.resume();
    assert!(flushed, "no flush attempt reached the paused Redis");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&r, DEGRADED) == 0.0),
        "still degraded after SIGCONT"
    );
    stop(&mut r);
    let billed = ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    let shared = shared_used(&redis, "acme", "bulk");
    eprintln!(
        "stalled Redis: 11 consumes admitted, ledger {billed}, shared counter {shared} ({} store errors)",
        errors + 2.0
    );
    assert_eq!(billed, 11);
    assert_eq!(
        shared, billed,
        "the shared counter counted timed-out calls twice"
    );
}

/// `--on-store-error deny`: while Redis is down, decisions answer 503
/// `store_unavailable` (fast) and `/readyz` 503; `allow` admits without counting and
/// stays ready. Once Redis is back, both answer from it again.
#[test]
fn deny_answers_503_and_unready_allow_admits_uncounted() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let deny = replica(&dir, &redis, &["--on-store-error", "deny"]);
    let allow = replica(&dir, &redis, &["--on-store-error", "allow"]);
    for r in [&deny, &allow] {
        assert_eq!(consume(r, "acme", "credits", 1)["allowed"], true);
        assert_eq!(r.get("/readyz").status, 200);
    }
    assert_eq!(shared_used(&redis, "acme", "credits"), 2);

    redis.kill();
    let body = json!({"customer": "acme", "feature": "credits", "amount": 1});
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r = deny.post("/v1/consume", &body);
        slowest = slowest.max(t.elapsed());
        assert_error(&r, 503, "store_unavailable");
    }
    let r = deny.post(
        "/v1/check",
        &json!({"customer": "acme", "feature": "credits"}),
    );
    assert_error(&r, 503, "store_unavailable");
    let r = deny.get("/readyz");
    assert_eq!(
        r.status,
        503,
        "readyz while degraded in deny mode: {}",
        r.text()
    );
    assert_eq!(r.json()["ready"], false);
    assert_eq!(metric(&deny, DEGRADED), 1.0);
    assert!(
        fallbacks(&deny, "deny") >= 11.0,
        "deny fallbacks not counted"
    );

    for _ in 0..10 {
        let t = Instant::now();
        let d = consume(&allow, "acme", "credits", 1);
        slowest = slowest.max(t.elapsed());
        assert_eq!(d["allowed"], true, "{d}");
    }
    // Past the limit, too: nothing is counted.
    let d = consume(&allow, "acme", "credits", 100);
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(allow.get("/readyz").status, 200, "allow mode stays ready");
    assert_eq!(metric(&allow, DEGRADED), 1.0);
    assert!(
        fallbacks(&allow, "allow") >= 11.0,
        "allow fallbacks not counted"
    );
    eprintln!("deny/allow while Redis is down: slowest answer {slowest:?}");
    assert!(slowest < LATENCY_BOUND, "an answer took {slowest:?}");

    redis.restart();
    // A decision reaches Redis again (the first may still meet the open breaker).
    let back = wait_until(Duration::from_secs(10), || {
        deny.post("/v1/consume", &body).status == 200
    });
    assert!(back, "deny mode never answered 200 after the restart");
    assert_eq!(
        deny.get("/readyz").status,
        200,
        "ready again once Redis answers"
    );
    assert_eq!(metric(&deny, DEGRADED), 0.0);
    // The allow replica's breaker may stay open a moment longer (its last failure came
    // later): wait until it answers from Redis again. A check counts nothing; answered
    // from Redis it sees the unit the deny replica just counted, from the fallback none.
    let check = json!({"customer": "acme", "feature": "credits"});
    let reached = wait_until(Duration::from_secs(10), || {
        allow.post("/v1/check", &check).json()["used"] == 1
    });
    assert!(
        reached,
        "allow mode never answered from Redis after the restart"
    );
    let d = consume(&allow, "acme", "credits", 1);
    assert_eq!(
        d["used"], 2,
        "allow mode kept nothing for Redis while it was down: {d}"
    );
    let (mut deny, mut allow) = (deny, allow);
    stop(&mut deny);
    stop(&mut allow);
    let events = ledger(allow.state.path());
    assert_eq!(
        ledger_amount(&events, "consume", "acme", "credits"),
        2,
        "allow mode billed what it admitted uncounted: {events:?}"
    );
}

/// `--on-store-error deny` marks the replica unready while Redis is down; once Redis
/// is back, readiness must return by itself: a load balancer sends no decision
/// traffic to an unready replica, so waiting for a decision to succeed never ends.
#[test]
fn deny_mode_readiness_returns_without_decision_traffic() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let deny = replica(&dir, &redis, &["--on-store-error", "deny"]);
    assert_eq!(deny.get("/readyz").status, 200);
    redis.kill();
    let r = deny.post(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "credits"}),
    );
    assert_error(&r, 503, "store_unavailable");
    assert_eq!(deny.get("/readyz").status, 503);
    redis.restart();
    let restarted = Instant::now();
    let ready = wait_until(Duration::from_secs(5), || deny.get("/readyz").status == 200);
    eprintln!(
        "deny mode: /readyz {} {:?} after Redis came back (only /readyz and /metrics polled)",
        if ready { "200" } else { "still 503" },
        restarted.elapsed()
    );
    assert!(
        ready,
        "/readyz still 503 5 s after Redis answers again (degraded {})",
        metric(&deny, DEGRADED)
    );
}

// ------------------------------------------------------------ key encoding ----

/// A key of the documented shape, taken apart.
#[derive(Debug)]
struct ParsedKey {
    tag: String,
    kind: String,
    /// The customer (length-prefixed part), or for a reservation its id.
    customer: Option<String>,
    name: Option<String>,
}

fn take_len_prefixed<'a>(s: &'a str, key: &str) -> (&'a str, &'a str) {
    let (len, rest) = s
        .split_once(':')
        .unwrap_or_else(|| panic!("no length in {key}"));
    let len: usize = len
        .parse()
        .unwrap_or_else(|_| panic!("bad length {len:?} in {key}"));
    assert!(rest.len() >= len, "{key}: part shorter than its length");
    let (part, rest) = rest.split_at(len);
    (part, rest.strip_prefix(':').unwrap_or(rest))
}

fn parse_key(prefix: &str, key: &str) -> ParsedKey {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(":{"))
        .unwrap_or_else(|| panic!("{key} does not start with {prefix}:{{"));
    let (tag, rest) = rest
        .split_once("}:")
        .unwrap_or_else(|| panic!("no tag in {key}"));
    assert!(
        tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()),
        "tag {tag:?} of {key}"
    );
    // The first `{…}` of the key is the tag: what Redis Cluster hashes.
    let open = key.find('{').expect("a brace");
    let close = open + key[open..].find('}').expect("a closing brace");
    assert_eq!(&key[open + 1..close], tag, "the cluster hash tag of {key}");
    let (kind, rest) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("no kind in {key}"));
    if kind == "r" || kind == "o" {
        return ParsedKey {
            tag: tag.to_string(),
            kind: kind.to_string(),
            customer: None,
            name: Some(rest.to_string()),
        };
    }
    let (customer, rest) = take_len_prefixed(rest, key);
    let (name, _) = take_len_prefixed(rest, key);
    ParsedKey {
        tag: tag.to_string(),
        kind: kind.to_string(),
        customer: Some(customer.to_string()),
        name: Some(name.to_string()),
    }
}

/// Customers and features chosen so that a naive `customer:feature` key collides
/// (`a:b`+`x` and `a`+`b:x`; `a:1`+`x` and `a`+`1:x`), and customers holding `{`/`}`:
/// every counter is its own (power-of-two amounts name each one), the keys have the
/// documented length-prefixed shape, and every key of one customer (counter, holds,
/// idempotency key, reservation, seat pool, rate limiter) carries that customer's
/// hash tag as its first `{…}`. Another `--store-prefix` is another namespace.
#[test]
fn keys_never_collide_and_share_the_customer_tag() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let a = replica_here(&dir, &redis);
    let pairs = [
        ("a:b", "x"),
        ("a", "b:x"),
        ("a:1", "x"),
        ("a", "1:x"),
        ("a", "x"),
        ("{a}", "x"),
        ("}x{y", "x"),
        ("}x{y", "b:x"),
    ];
    for (i, (c, f)) in pairs.iter().enumerate() {
        let d = consume(&a, c, f, 1 << i);
        assert_eq!(d["allowed"], true, "{c} {f}: {d}");
    }
    for (i, (c, f)) in pairs.iter().enumerate() {
        assert_eq!(used(&a, c, f), 1 << i, "counter of {c:?} / {f:?}");
        assert_eq!(
            shared_used(&redis, c, f),
            1 << i,
            "{}",
            counter_key(PREFIX, c, f)
        );
    }
    // Every other kind of key, for the customers with braces (and one colon).
    let mut reservations = BTreeMap::new();
    for c in ["{a}", "}x{y", "a:b"] {
        let d = decide(
            &a,
            "/v1/consume",
            json!({"customer": c, "feature": "x", "amount": 1, "idempotency_key": "k:1"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/seats/acquire",
            json!({"customer": c, "feature": "seats", "holder": "h"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/consume",
            json!({"customer": c, "feature": "api.rate"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/reserve",
            json!({"customer": c, "feature": "b:x", "amount": 1, "ttl": "5m"}),
        );
        let id = d["reservation"].as_str().unwrap_or_else(|| panic!("{d}"));
        reservations.insert(id[4..].to_string(), c.to_string());
    }
    // The same idempotency key for two customers is two keys.
    assert_eq!(used(&a, "{a}", "x"), 32 + 1);
    assert_eq!(used(&a, "a:b", "x"), 1 + 1);

    let scan = redis.cli(&["--scan", "--pattern", &format!("{PREFIX}:*")]);
    let keys: Vec<&str> = scan.lines().filter(|l| !l.is_empty()).collect();
    let mut kinds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Operation keys (`o`, the ids that make a resent consume count once) name no
    // customer: their tag must be one of a customer's.
    let mut op_tags = BTreeSet::new();
    for key in &keys {
        let p = parse_key(PREFIX, key);
        if p.kind == "o" {
            op_tags.insert(p.tag);
            continue;
        }
        let customer = match (&p.customer, p.kind.as_str()) {
            (Some(c), _) => c.clone(),
            (None, "r") => {
                let id = p.name.as_deref().expect("reservation id");
                assert_eq!(&id[..16], p.tag, "a reservation id carries its tag: {key}");
                reservations
                    .get(id)
                    .unwrap_or_else(|| panic!("unknown reservation key {key}"))
                    .clone()
            }
            _ => panic!("unexpected key {key}"),
        };
        let kind = if key.ends_with(":h") {
            "q:h".to_string()
        } else {
            p.kind.clone()
        };
        kinds.entry(customer.clone()).or_default().insert(kind);
        tags.entry(customer).or_default().insert(p.tag);
    }
    for (c, t) in &tags {
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![&tag(c)],
            "keys of {c:?} must all carry its tag"
        );
    }
    let all_tags: BTreeSet<&String> = tags.values().flatten().collect();
    assert_eq!(all_tags.len(), tags.len(), "two customers share a tag");
    assert!(!op_tags.is_empty(), "consumes leave operation keys");
    for t in &op_tags {
        assert!(
            all_tags.contains(t),
            "operation key with a stranger's tag {t}"
        );
    }
    for c in ["{a}", "}x{y", "a:b"] {
        assert_eq!(
            kinds[c].iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["g", "i", "q", "q:h", "r", "s"],
            "key kinds of {c:?}: {keys:?}"
        );
    }
    eprintln!(
        "{} keys, e.g. {}",
        keys.len(),
        keys.iter()
            .filter(|k| k.contains(":}x{y:"))
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Another prefix: its own counters.
    let b = replica(&dir, &redis, &["--store-prefix", "tenant2"]);
    assert_eq!(used(&b, "a", "x"), 0, "another prefix sees nothing");
    consume(&b, "a", "x", 1000);
    assert_eq!(shared_used_in(&redis, "tenant2", "a", "x"), 1000);
    assert_eq!(used(&a, "a", "x"), 16, "the default prefix is untouched");
}

// --------------------------------------------------------------------- TLS ----

/// `rediss://` with a password against a TLS-only redis-server, trusting the test CA
/// through `--store-ca-file`: consumes are counted in Redis with no fallback. A wrong
/// password is a store fault like any other (local fallback, degraded), never a crash.
#[test]
fn tls_and_password_reach_redis() {
    let _one = serial();
    let dir = tempfile::tempdir().expect("tls tempdir");
    super::support::make_certs(dir.path());
    let port = super::support::free_port();
    let port_s = port.to_string();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "r.crt",
            "--tls-key-file",
            "r.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "redis-server did not listen on its TLS port"
    );
    let policies = policy();
    let ca = dir.path().join("ca.crt");
    let ca = ca.to_str().expect("UTF-8 path");
    let start = |password: &str| {
        let url = format!("rediss://:{password}@127.0.0.1:{port}");
        Server::spawn_with(
            policies.path(),
            &[
                "--test-clock",
                T0,
                "--store",
                &url,
                "--store-ca-file",
                ca,
                "--durability",
                "memory",
            ],
        )
    };
    let mut s = start("s3cret");
    for n in 1..=3u64 {
        let d = consume(&s, "acme", "api.calls", 1);
        assert_eq!(d["allowed"], true, "{d}");
        assert_eq!(d["used"], n, "{d}");
    }
    assert_eq!(metric(&s, DEGRADED), 0.0);
    assert_eq!(fallbacks(&s, "local"), 0.0);
    assert!(!s.stderr().contains("s3cret"), "the password is in the log");
    s.stop_gracefully();

    let mut wrong = start("not-it");
    let d = consume(&wrong, "acme", "api.calls", 1);
    assert_eq!(d["allowed"], true, "answered by the local fallback: {d}");
    assert_eq!(metric(&wrong, DEGRADED), 1.0);
    assert!(fallbacks(&wrong, "local") >= 1.0);
    wrong.stop_gracefully();
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------- ended windows ----

/// A partition that outlasts its window: units counted locally in January while Redis
/// is away never land in February's counter when Redis returns in February — they are
/// dropped with their window, and February starts from what February counted.
#[test]
fn deltas_of_an_ended_window_never_land_in_the_next() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let r = replica(&dir, &redis, &["--store-timeout", "50ms"]);
    assert_eq!(consume(&r, "acme", "bulk", 5)["used"], 5);
    redis.kill();
    for _ in 0..3 {
        let d = consume(&r, "acme", "bulk", 7);
        assert_eq!(d["allowed"], true, "counted locally: {d}");
    }
    assert!(fallbacks(&r, "local") >= 3.0);
    // February 1st has come and gone while Redis was away.
    let moved = r.post("/v1/test-clock", &json!({"set": "2030-02-10T00:00:00Z"}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = r.check("acme", "bulk");
            metric(&r, DEGRADED) == 0.0
        }),
        "Redis was not used again"
    );
    let d = consume(&r, "acme", "bulk", 1);
    assert_eq!(d["used"], 1, "February holds only February's unit: {d}");
    // February's counter in Redis is 1. A January call that timed out may still have
    // run when Redis came back (the client library resends what it had queued), but
    // only into January's own key: no unit of January is in February.
    let keys = redis.cli(&[
        "--scan",
        "--pattern",
        &format!("{PREFIX}:*:q:4:acme:4:bulk:*"),
    ]);
    let keys: Vec<&str> = keys
        .lines()
        .filter(|k| !k.is_empty() && !k.ends_with(":h"))
        .collect();
    let feb = format!(":{}", micros("2030-02-01T00:00:00Z"));
    let jan = format!(":{}", micros(WINDOW_START));
    for k in &keys {
        assert!(
            k.ends_with(&feb) || k.ends_with(&jan),
            "a counter of another window: {k}"
        );
    }
    let feb_key = keys
        .iter()
        .find(|k| k.ends_with(&feb))
        .expect("February's counter");
    assert_eq!(
        redis.cmd(&["HGET", feb_key, "used"]).text().as_deref(),
        Some("1")
    );
    if let Some(jan_key) = keys.iter().find(|k| k.ends_with(&jan)) {
        let end = redis.cmd(&["HGET", jan_key, "window_end"]).text();
        assert_eq!(
            end,
            Some(micros(WINDOW_END).to_string()),
            "January's key ends in January"
        );
    }
}
