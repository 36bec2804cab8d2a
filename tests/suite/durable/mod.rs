//! Durable usage state, against the real binary and the real files of its state
//! directory.
//!
//! Every test gives `entitled serve` a `--state-dir` of its own and restarts the binary
//! on it: gracefully (SIGTERM), or with `kill -9` at points chosen by a seeded counter
//! of acknowledged requests under concurrent load. What a client was told must survive:
//! an acknowledged consume is counted after any restart (in `--durability sync` even
//! after `kill -9`), nothing unacknowledged is counted twice, idempotency keys answer
//! retries across restarts, and the usage ledger (`entitled usage export`) sums to the
//! counters with unique event ids. Damage is made by hand (a journal cut short, a byte
//! flipped) with distinct power-of-two amounts, so the counter after recovery names the
//! record that was lost. Time moves only through `--test-clock` and
//! `POST /v1/test-clock`; the month window of every test is January 2030, so the real
//! calendar never matters.
//!
//! The helpers the tests share are here; the tests, by topic, in the other files of
//! this folder.

mod crash;
mod damage;
mod export;
mod full_disk;
mod ledger_volume;
mod reservations;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// `self`: the topic files reach the support module as `super::support`.
use super::support::{self, FallibleConn, PolicyDir, Resp, Server, metric_value, output_within};

/// Where the served clock starts: mid-January 2030, far from a month boundary.
const T0: &str = "2030-01-15T00:00:00Z";

const CATALOG: &str = r#"
features:
  api.calls: { kind: quota, unit: call }
  credits: { kind: quota }
  tokens: { kind: quota }
  tokens.strict: { kind: quota }
  seats: { kind: seats }
plans:
  base:
    grants:
      api.calls: { limit: 1000000, per: month }
      credits: { limit: 100, per: month }
      tokens: { limit: 10, per: month, overage: allow }
      tokens.strict: { limit: 10, per: month }
      seats: { limit: 2 }
"#;

const CUSTOMERS: &str = r#"
customers:
  - id: acme
    subscriptions:
      - { plan: base, starts: "2020-01-01T00:00:00Z" }
"#;

const DAMAGE: &str = "state directory damage";
const DAMAGED_METRIC: &str = "entitled_state_damaged_records_total";

fn policy() -> PolicyDir {
    PolicyDir::with(&[("catalog.yaml", CATALOG), ("customers.yaml", CUSTOMERS)])
}

/// `entitled serve` on `state` with the test clock at [`T0`] and `extra` flags.
fn serve(policies: &PolicyDir, state: &Path, extra: &[&str]) -> Server {
    let state = state.to_str().expect("a UTF-8 state path");
    let mut args = vec!["--state-dir", state, "--test-clock", T0];
    args.extend_from_slice(extra);
    Server::spawn_with(policies.path(), &args)
}

fn sync(policies: &PolicyDir, state: &Path) -> Server {
    serve(policies, state, &["--durability", "sync"])
}

/// `kill -9`, then reaps the process (bounded).
fn kill9(s: &mut Server) {
    let ok = Command::new("kill")
        .args(["-KILL", &s.pid().to_string()])
        .status()
        .expect("running kill -KILL");
    assert!(ok.success(), "kill -KILL {} failed", s.pid());
    let status = s
        .wait_exit(Duration::from_secs(10))
        .expect("entitled still running 10 s after kill -9");
    assert!(!status.success(), "killed, yet exited {status}");
}

/// Graceful stop that must succeed.
fn stop(s: &mut Server) {
    let status = s.stop_gracefully();
    assert!(
        status.success(),
        "graceful stop exited {status}:\n{}",
        s.stderr()
    );
}

fn used(s: &Server, feature: &str) -> u64 {
    let d = s.check("acme", feature);
    d["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `used` in {d}"))
}

fn consume(s: &Server, feature: &str, amount: u64) -> Value {
    let d = s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": feature, "amount": amount}),
    );
    assert_eq!(d["allowed"], true, "consume {amount} of {feature}: {d}");
    d
}

/// Amounts 1, 2, 4, ... 2^(n-1): any sum names the records in it.
fn amounts(n: u32) -> Vec<u64> {
    (0..n).map(|i| 1 << i).collect()
}

fn damaged_metric(s: &Server) -> f64 {
    let r = s.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    metric_value(&r.text(), DAMAGED_METRIC)
        .unwrap_or_else(|| panic!("no {DAMAGED_METRIC} in /metrics:\n{}", r.text()))
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
}

/// Runs the binary with `args`, bounded by `timeout` (killed and failed past it).
fn run_bounded(args: &[&str], timeout: Duration) -> Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled"))
            .args(args)
            .env_remove("RUST_LOG"),
        timeout,
    )
}

/// `entitled usage export --state-dir STATE ARGS`, parsed line by line.
fn export(state: &Path, args: &[&str]) -> Vec<Value> {
    let state = state.to_str().expect("a UTF-8 state path");
    let mut all = vec!["usage", "export", "--state-dir", state];
    all.extend_from_slice(args);
    let out = run_bounded(&all, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "usage export {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 export")
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("export line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Per (subject, feature, window_start): the sum of `amount` over consume and commit
/// events.
fn counted(events: &[Value]) -> BTreeMap<(String, String, String), i64> {
    let mut out = BTreeMap::new();
    for e in events {
        let d = &e["data"];
        if !matches!(d["operation"].as_str(), Some("consume" | "commit")) {
            continue;
        }
        let key = (
            e["subject"].as_str().expect("subject").to_string(),
            d["feature"].as_str().expect("feature").to_string(),
            d["window_start"].to_string(),
        );
        *out.entry(key).or_insert(0) += d["amount"].as_i64().expect("integer amount");
    }
    out
}

/// The ledger's total for one feature of acme (every window).
fn ledger_sum(events: &[Value], feature: &str) -> i64 {
    counted(events)
        .iter()
        .filter(|((c, f, _), _)| c == "acme" && f == feature)
        .map(|(_, n)| n)
        .sum()
}

/// Every event is a well-formed CloudEvent of this state directory, ids unique.
fn assert_well_formed(events: &[Value], state: &Path) {
    let format: Value =
        serde_json::from_slice(&std::fs::read(state.join("FORMAT")).expect("reading FORMAT"))
            .expect("FORMAT is JSON");
    let source = format!(
        "urn:entitled:state:{}",
        format["id"].as_str().expect("FORMAT id")
    );
    let mut ids = HashSet::new();
    for e in events {
        assert_eq!(e["specversion"], "1.0", "{e}");
        assert_eq!(e["type"], "entitled.usage", "{e}");
        assert_eq!(e["datacontenttype"], "application/json", "{e}");
        assert_eq!(e["source"], source.as_str(), "{e}");
        let id = e["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no string id: {e}"));
        assert!(id.parse::<u64>().is_ok(), "id is not an lsn: {e}");
        assert!(ids.insert(id.to_string()), "event id {id} appears twice");
    }
}

fn files_in(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn journals(state: &Path) -> Vec<(String, u64)> {
    files_in(state)
        .into_iter()
        .filter(|(n, _)| n.starts_with("journal-") && n.ends_with(".log"))
        .collect()
}

/// After a graceful stop: a checkpoint, and no journal record left outside it.
fn assert_folded(state: &Path) {
    let files = files_in(state);
    assert!(
        files.iter().any(|(n, _)| n.starts_with("checkpoint-")),
        "no checkpoint after a graceful stop: {files:?}"
    );
    let left: Vec<_> = journals(state)
        .into_iter()
        .filter(|(_, l)| *l > 0)
        .collect();
    assert!(
        left.is_empty(),
        "journal left after a graceful stop: {left:?}"
    );
}

// ------------------------------------------------------------ load clients ----

/// What the load threads of one run saw.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Requests written (or attempted): an upper bound on what may be counted.
    sent: u64,
    /// Answered 200 with `allowed: true`.
    acked: u64,
    /// Answers that were neither (must stay 0).
    unexpected: u64,
}

/// `workers` threads doing `consume(1)` of api.calls over keep-alive connections
/// until their connection fails, `stop` is set, or a bound (count and time) is hit.
/// `on_ack` sees the run-wide count of acknowledgements after each one.
fn load(
    addr: SocketAddr,
    workers: usize,
    stop: &Arc<AtomicBool>,
    on_ack: Arc<dyn Fn(u64) + Send + Sync>,
) -> Vec<std::thread::JoinHandle<Tally>> {
    const MAX_PER_WORKER: u64 = 20_000;
    const MAX_TIME: Duration = Duration::from_secs(30);
    let acked_all = Arc::new(AtomicU64::new(0));
    (0..workers)
        .map(|_| {
            let stop = stop.clone();
            let on_ack = on_ack.clone();
            let acked_all = acked_all.clone();
            std::thread::spawn(move || {
                let mut t = Tally::default();
                let Ok(mut c) = FallibleConn::connect(addr) else {
                    return t;
                };
                let body = br#"{"customer":"acme","feature":"api.calls"}"#;
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed)
                    && t.sent < MAX_PER_WORKER
                    && started.elapsed() < MAX_TIME
                {
                    t.sent += 1;
                    match c.post("/v1/consume", body) {
                        Ok((200, b)) => {
                            let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                            if v["allowed"] == true {
                                t.acked += 1;
                                on_ack(acked_all.fetch_add(1, Ordering::SeqCst) + 1);
                            } else {
                                t.unexpected += 1;
                                eprintln!("unexpected consume answer: {v}");
                            }
                        }
                        Ok((status, b)) => {
                            t.unexpected += 1;
                            eprintln!(
                                "unexpected consume answer {status}: {}",
                                String::from_utf8_lossy(&b)
                            );
                            break;
                        }
                        // The server went away under the request: it may or may not
                        // have counted it.
                        Err(_) => break,
                    }
                }
                t
            })
        })
        .collect()
}

fn join(handles: Vec<std::thread::JoinHandle<Tally>>) -> Tally {
    handles
        .into_iter()
        .map(|h| h.join().expect("load thread panicked"))
        .fold(Tally::default(), |a, b| Tally {
            sent: a.sent + b.sent,
            acked: a.acked + b.acked,
            unexpected: a.unexpected + b.unexpected,
        })
}

/// splitmix64: a seeded sequence of kill points, the same on every run.
struct Seq(u64);

impl Seq {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}
