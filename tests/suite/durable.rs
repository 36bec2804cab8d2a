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

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::support::{
    FallibleConn, PolicyDir, Resp, Server, metric_value, output_within, wait_until,
};

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

// ----------------------------------------------------------------- crashes ----

/// 20 rounds of concurrent consumes in sync mode, each ended by `kill -9` after a
/// seeded number of acknowledgements (issued by the load thread that got it, so the
/// other threads are mid-request). After every restart, and after a final graceful
/// stop: acknowledged ≤ counted ≤ sent, and the ledger sums to the counter with
/// unique ids.
#[test]
fn kill_9_under_load_in_sync_mode_keeps_every_acknowledged_consume() {
    const ROUNDS: usize = 20;
    const WORKERS: usize = 8;
    let seed = std::env::var("ENTITLED_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_D00D_u64);
    let mut seq = Seq(seed);
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut total = Tally::default();
    let mut damaged_restarts = 0;
    for round in 0..ROUNDS {
        let mut s = sync(&dir, state.path());
        if s.stderr().contains(DAMAGE) {
            // A write cut by the kill (never acknowledged) is a torn tail.
            damaged_restarts += 1;
        }
        let now = used(&s, "api.calls");
        assert!(
            total.acked <= now && now <= total.sent,
            "round {round} (seed {seed:#x}): counter {now} outside [acked {}, sent {}]",
            total.acked,
            total.sent
        );
        let events = export(state.path(), &[]);
        assert_well_formed(&events, state.path());
        assert_eq!(
            ledger_sum(&events, "api.calls"),
            now as i64,
            "round {round} (seed {seed:#x}): ledger against counter after a restart"
        );

        let target = seq.between(5, 150);
        let pid = s.pid().to_string();
        let killed = Arc::new(AtomicBool::new(false));
        let k = killed.clone();
        let on_ack: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
            if n == target && !k.swap(true, Ordering::SeqCst) {
                // Our unreaped child: the pid cannot have been reused.
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let stop_flag = Arc::new(AtomicBool::new(false));
        let t = join(load(s.addr, WORKERS, &stop_flag, on_ack));
        assert!(
            killed.load(Ordering::SeqCst),
            "round {round}: only {} of {target} consumes acknowledged before the load ended",
            t.acked
        );
        let status = s
            .wait_exit(Duration::from_secs(10))
            .expect("entitled still running 10 s after kill -9");
        assert!(
            !status.success(),
            "round {round}: killed, yet exited {status}"
        );
        assert_eq!(t.unexpected, 0, "round {round}: unexpected answers");
        assert!(t.acked >= target, "round {round}: {t:?}, target {target}");
        assert!(t.sent - t.acked <= WORKERS as u64, "round {round}: {t:?}");
        total.sent += t.sent;
        total.acked += t.acked;
    }

    let mut s = sync(&dir, state.path());
    let counter = used(&s, "api.calls");
    eprintln!(
        "{ROUNDS} kills (seed {seed:#x}): {} acknowledged, {} sent, {counter} counted, {damaged_restarts} restarts reported damage",
        total.acked, total.sent
    );
    assert!(
        total.acked <= counter,
        "lost acknowledged consumes: {} acknowledged, {counter} counted",
        total.acked
    );
    assert!(
        counter <= total.sent,
        "counted more than was sent: {} sent, {counter} counted",
        total.sent
    );
    stop(&mut s);
    assert_folded(state.path());
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert!(
        events.iter().all(|e| e["data"]["operation"] == "consume"
            && e["data"]["amount"] == 1
            && e["subject"] == "acme"
            && e["data"]["feature"] == "api.calls"),
        "unexpected ledger events"
    );
    assert_eq!(
        ledger_sum(&events, "api.calls"),
        counter as i64,
        "ledger against counter"
    );
    assert_eq!(events.len() as u64, counter, "one event per unit consumed");
}

/// SIGTERM in the default (async) mode while load threads run: every acknowledged
/// consume is there after the restart, and the ledger sums to the counter.
#[test]
fn graceful_restart_under_load_in_async_mode_loses_nothing() {
    const WORKERS: usize = 6;
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    let on_ack: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| a.store(n, Ordering::SeqCst));
    let stop_flag = Arc::new(AtomicBool::new(false));
    let handles = load(s.addr, WORKERS, &stop_flag, on_ack);
    let loaded = wait_until(Duration::from_secs(30), || {
        acked.load(Ordering::SeqCst) >= 300
    });
    if !loaded {
        stop_flag.store(true, Ordering::SeqCst);
    }
    assert!(loaded, "300 consumes not acknowledged within 30 s");
    stop(&mut s);
    // The load threads end on their own: the server closed their connections.
    let t = join(handles);
    assert_eq!(t.unexpected, 0, "unexpected answers");
    assert_folded(state.path());

    let mut s = serve(&dir, state.path(), &[]);
    assert!(!s.stderr().contains(DAMAGE), "{}", s.stderr());
    let counter = used(&s, "api.calls");
    eprintln!(
        "graceful stop under load: {} acknowledged, {} sent, {counter} counted",
        t.acked, t.sent
    );
    assert!(
        t.acked <= counter && counter <= t.sent,
        "counter {counter} outside [acked {}, sent {}]",
        t.acked,
        t.sent
    );
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(ledger_sum(&events, "api.calls"), counter as i64);
    stop(&mut s);
}

// ------------------------------------------------------------------ damage ----

/// One journal frame as found on disk.
#[derive(Debug, Clone, Copy)]
struct FrameAt {
    offset: usize,
    payload: usize,
    lsn: u64,
}

impl FrameAt {
    fn end(&self) -> usize {
        self.offset + 20 + self.payload
    }
}

/// The frames of an undamaged journal segment (magic, u32 length, u32 crc, u64 lsn,
/// payload).
fn frames(buf: &[u8]) -> Vec<FrameAt> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let head = &buf[at..at + 20];
        assert_eq!(
            head[..4],
            [0xE7, 0x1D, 0xA7, 0x5E],
            "no frame magic at {at}"
        );
        let payload = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        let lsn = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        let f = FrameAt {
            offset: at,
            payload,
            lsn,
        };
        at = f.end();
        out.push(f);
    }
    assert_eq!(at, buf.len(), "a frame runs past the end of the segment");
    out
}

/// Amounts 1, 2, 4, ... 2^(n-1): any sum names the records in it.
fn amounts(n: u32) -> Vec<u64> {
    (0..n).map(|i| 1 << i).collect()
}

/// `amounts` consumed one by one in sync mode, then `kill -9`: returns the one
/// journal segment holding them and its frames (one per consume, in order).
fn journal_of_killed_run(
    dir: &PolicyDir,
    state: &Path,
    amounts: &[u64],
) -> (PathBuf, Vec<FrameAt>) {
    let mut s = sync(dir, state);
    for (i, &n) in amounts.iter().enumerate() {
        let d = consume(&s, "api.calls", n);
        let expected: u64 = amounts[..=i].iter().sum();
        assert_eq!(d["used"], expected, "{d}");
    }
    // The journal writer appends the ledger events just after the acknowledgement:
    // kill once they are there, so every run starts from the same files.
    assert!(
        wait_until(Duration::from_secs(10), || export(state, &[]).len()
            == amounts.len()),
        "the ledger did not show the {} consumes within 10 s",
        amounts.len()
    );
    kill9(&mut s);
    let segs: Vec<_> = journals(state)
        .into_iter()
        .filter(|(_, l)| *l > 0)
        .collect();
    assert_eq!(segs.len(), 1, "journal segments after the run: {segs:?}");
    let path = state.join(&segs[0].0);
    let fs = frames(&std::fs::read(&path).expect("reading the journal"));
    assert_eq!(fs.len(), amounts.len(), "one frame per consume: {fs:?}");
    for w in fs.windows(2) {
        assert_eq!(w[1].lsn, w[0].lsn + 1, "lsns in order: {fs:?}");
    }
    (path, fs)
}

/// Restarts on a damaged journal: the counter is `expect`, the damage is logged,
/// counted in the metric and the file moved to `damaged/`. A second restart meets
/// no damage and the same counter.
fn assert_recovers(dir: &PolicyDir, state: &Path, segment: &Path, expect: u64) {
    let name = segment.file_name().expect("segment name").to_owned();
    let mut s = sync(dir, state);
    assert_eq!(used(&s, "api.calls"), expect, "counter after recovery");
    assert!(
        s.stderr().contains(DAMAGE),
        "damage not logged:\n{}",
        s.stderr()
    );
    assert!(damaged_metric(&s) >= 1.0, "{DAMAGED_METRIC} not counted");
    assert!(
        state.join("damaged").join(&name).is_file(),
        "damaged segment not moved aside: {:?} / damaged: {:?}",
        files_in(state),
        files_in(&state.join("damaged"))
    );
    assert!(
        !segment.exists(),
        "damaged segment still in the state directory"
    );
    stop(&mut s);

    let mut s = sync(dir, state);
    assert!(
        !s.stderr().contains(DAMAGE),
        "damage reported again:\n{}",
        s.stderr()
    );
    assert_eq!(damaged_metric(&s), 0.0);
    assert_eq!(
        used(&s, "api.calls"),
        expect,
        "counter on the second restart"
    );
    stop(&mut s);
}

/// Removes the ledger's event for journal record `lsn`, as if the crash had come
/// before the ledger was written: the journal is then the only copy of it.
fn drop_ledger_event(state: &Path, lsn: u64) {
    let id = format!("\"id\":\"{lsn}\"");
    let mut found = false;
    for (name, _) in files_in(&state.join("ledger")) {
        let path = state.join("ledger").join(name);
        let text = std::fs::read_to_string(&path).expect("reading a ledger segment");
        let kept: String = text
            .lines()
            .filter(|l| {
                let hit = l.contains(&id);
                found |= hit;
                !hit
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).expect("writing a ledger segment back");
    }
    assert!(found, "no ledger event with id {lsn}");
}

fn truncate_tail(segment: &Path, fs: &[FrameAt]) {
    let len = fs.last().expect("frames").end() as u64;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .expect("opening the journal");
    f.set_len(len - 3).expect("truncating the journal");
}

fn flip_middle(segment: &Path, victim: FrameAt) {
    let mut buf = std::fs::read(segment).expect("reading the journal");
    buf[victim.offset + 20 + victim.payload / 2] ^= 0x5A;
    std::fs::write(segment, &buf).expect("writing the journal back");
}

/// A journal cut a few bytes short loses exactly its last record (when the ledger
/// never saw it either).
#[test]
fn truncated_journal_tail_loses_only_the_last_record() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let amounts = amounts(8);
    let (segment, fs) = journal_of_killed_run(&dir, state.path(), &amounts);
    truncate_tail(&segment, &fs);
    drop_ledger_event(state.path(), fs[7].lsn);
    let total: u64 = amounts.iter().sum();
    assert_recovers(&dir, state.path(), &segment, total - amounts[7]);
}

/// One flipped byte inside a middle record loses that record only: the records
/// after it are recovered.
#[test]
fn flipped_byte_in_a_middle_record_loses_only_that_record() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let amounts = amounts(8);
    let (segment, fs) = journal_of_killed_run(&dir, state.path(), &amounts);
    flip_middle(&segment, fs[3]);
    drop_ledger_event(state.path(), fs[3].lsn);
    let total: u64 = amounts.iter().sum();
    assert_recovers(&dir, state.path(), &segment, total - amounts[3]);
}

/// A consumption whose journal record is damaged but whose ledger event was written
/// is counted again from the ledger: it was served and billed, so the units are not
/// given away, and the ledger still sums to the counter.
#[test]
fn damaged_records_are_healed_from_the_ledger() {
    for flip in [false, true] {
        let dir = policy();
        let state = tempfile::tempdir().expect("state tempdir");
        let amounts = amounts(8);
        let (segment, fs) = journal_of_killed_run(&dir, state.path(), &amounts);
        if flip {
            flip_middle(&segment, fs[3]);
        } else {
            truncate_tail(&segment, &fs);
        }
        let total: u64 = amounts.iter().sum();
        assert_recovers(&dir, state.path(), &segment, total);
        let s = sync(&dir, state.path());
        let events = export(state.path(), &[]);
        assert_well_formed(&events, state.path());
        assert_eq!(ledger_sum(&events, "api.calls"), total as i64);
        assert_eq!(used(&s, "api.calls"), total);
    }
}

/// After recovering from a damaged tail, new consumes still reach the ledger, under
/// ids of their own (never one the ledger already used), and the ledger sums to the
/// counter.
#[test]
fn ledger_stays_complete_after_recovering_a_damaged_tail() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let amounts = amounts(4);
    let (segment, fs) = journal_of_killed_run(&dir, state.path(), &amounts);
    truncate_tail(&segment, &fs);

    let mut s = sync(&dir, state.path());
    assert_eq!(
        used(&s, "api.calls"),
        15,
        "1 + 2 + 4 from the journal, 8 healed from the ledger"
    );
    consume(&s, "api.calls", 16);
    assert_eq!(used(&s, "api.calls"), 31);
    stop(&mut s);

    let events = export(state.path(), &[]);
    let by_amount: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["data"]["amount"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        by_amount.iter().any(|(_, a)| *a == 16),
        "the consume of 16 after recovery is missing from the ledger: {by_amount:?}"
    );
    assert_well_formed(&events, state.path());
    assert_eq!(ledger_sum(&events, "api.calls"), 31, "{by_amount:?}");
    let s = sync(&dir, state.path());
    assert_eq!(used(&s, "api.calls"), 31);
}

/// In async mode, once a consume is in the ledger it is on disk in the journal (the
/// ledger is written after the journal's flush): `kill -9` keeps it.
#[test]
fn kill_9_in_async_mode_keeps_what_was_flushed() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    for n in amounts(6) {
        consume(&s, "api.calls", n);
    }
    let flushed = wait_until(Duration::from_secs(10), || {
        ledger_sum(&export(state.path(), &[]), "api.calls") == 63
    });
    assert!(flushed, "the ledger did not show the consumes within 10 s");
    kill9(&mut s);
    let mut s = serve(&dir, state.path(), &[]);
    assert_eq!(used(&s, "api.calls"), 63);
    stop(&mut s);
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(events.len(), 6, "{events:?}");
}

/// Seat holders survive `kill -9` (sync mode); seat events sum to the seats held.
#[test]
fn seats_survive_kill_9() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let seat = |s: &Server, op: &str, holder: &str| {
        s.decide(
            &format!("/v1/seats/{op}"),
            &json!({"customer": "acme", "feature": "seats", "holder": holder}),
        )
    };
    let mut s = sync(&dir, state.path());
    let d = seat(&s, "acquire", "u1");
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(seat(&s, "acquire", "u2")["allowed"], true);
    assert_eq!(seat(&s, "release", "u1")["used"], 1);
    kill9(&mut s);

    let mut s = sync(&dir, state.path());
    let d = seat(&s, "acquire", "u2");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(1)),
        "u2 kept: {d}"
    );
    let d = seat(&s, "acquire", "u3");
    assert_eq!(
        (d["allowed"].clone(), d["used"].clone()),
        (json!(true), json!(2)),
        "{d}"
    );
    let d = seat(&s, "acquire", "u1");
    assert_eq!(d["allowed"], false, "u1 was released before the kill: {d}");
    assert_eq!(d["reason"], "seats_exhausted", "{d}");
    stop(&mut s);

    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    let ops: Vec<(String, String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["data"]["operation"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["data"]["holder"].as_str().unwrap_or_default().to_string(),
                e["data"]["amount"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    let expect = [
        ("seat_acquire", "u1", 1),
        ("seat_acquire", "u2", 1),
        ("seat_release", "u1", -1),
        ("seat_acquire", "u3", 1),
    ]
    .map(|(o, h, a)| (o.to_string(), h.to_string(), a));
    assert_eq!(ops, expect);
    assert!(
        events.iter().all(|e| e["data"]["window_start"].is_null()),
        "{events:?}"
    );
}

// ------------------------------------------------------------- idempotency ----

/// A keyed consume answers its retry the same way after `kill -9` (sync mode) and
/// after a graceful restart, counting nothing; the key with another amount is 422.
#[test]
fn idempotent_retries_answer_the_same_across_restarts() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let keyed = json!({"customer": "acme", "feature": "api.calls", "amount": 5, "idempotency_key": "order-1"});
    let other = json!({"customer": "acme", "feature": "api.calls", "amount": 6, "idempotency_key": "order-1"});
    let mut s = sync(&dir, state.path());
    let first = s.decide("/v1/consume", &keyed);
    assert_eq!(first["allowed"], true, "{first}");
    assert_eq!(first["used"], 5, "{first}");
    consume(&s, "api.calls", 3);
    assert_eq!(
        s.decide("/v1/consume", &keyed),
        first,
        "retry before a restart"
    );
    assert_eq!(used(&s, "api.calls"), 8);
    kill9(&mut s);

    for how in ["kill -9", "graceful stop"] {
        let mut s = sync(&dir, state.path());
        let again = s.decide("/v1/consume", &keyed);
        assert_eq!(again, first, "retry after {how}");
        assert_eq!(again["used"], 5, "{again}");
        assert_eq!(used(&s, "api.calls"), 8, "retry after {how} counted");
        assert_error(
            &s.post("/v1/consume", &other),
            422,
            "idempotency_key_reused",
        );
        assert_eq!(used(&s, "api.calls"), 8);
        stop(&mut s);
    }
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(events.len(), 2, "one event per counted consume: {events:?}");
    assert_eq!(ledger_sum(&events, "api.calls"), 8);
}

// ------------------------------------------------------------ reservations ----

fn reserve(s: &Server, feature: &str, amount: u64, ttl: &str) -> String {
    let d = s.decide(
        "/v1/reserve",
        &json!({"customer": "acme", "feature": feature, "amount": amount, "ttl": ttl}),
    );
    assert_eq!(d["allowed"], true, "reserve {amount} of {feature}: {d}");
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

fn commit(s: &Server, id: &str, amount: u64) -> Resp {
    s.post(
        &format!("/v1/reservations/{id}/commit"),
        &json!({ "amount": amount }),
    )
}

fn release(s: &Server, id: &str) -> Resp {
    s.post_raw(&format!("/v1/reservations/{id}/release"), "")
}

fn would_allow(s: &Server, feature: &str, amount: u64) -> bool {
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": feature, "amount": amount}),
    );
    d["allowed"].as_bool().unwrap_or_else(|| panic!("{d}"))
}

/// A hold counts for everyone until the test clock passes its ttl; then it is back
/// in the quota at once and the reservation is unknown.
#[test]
fn reservation_expires_on_the_test_clock() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let id = reserve(&s, "credits", 30, "5m");
    assert_eq!(used(&s, "credits"), 30);
    assert!(would_allow(&s, "credits", 70));
    assert!(!would_allow(&s, "credits", 71), "the hold is not counted");

    // Not yet: 4 minutes in, the hold stands.
    let r = s.decide("/v1/test-clock", &json!({"advance": "4m"}));
    assert_eq!(r["reservations_expired"], 0, "{r}");
    assert_eq!(used(&s, "credits"), 30);

    let r = s.decide("/v1/test-clock", &json!({"advance": "2m"}));
    assert_eq!(r["reservations_expired"], 1, "{r}");
    assert_eq!(parse_now(&r), "2030-01-15T00:06:00Z");
    assert_eq!(used(&s, "credits"), 0, "expired hold not returned");
    assert!(would_allow(&s, "credits", 100));
    assert_error(&commit(&s, &id, 30), 404, "unknown_reservation");
    assert_error(&release(&s, &id), 404, "unknown_reservation");
    assert_eq!(used(&s, "credits"), 0);
    stop(&mut s);
    let events = export(state.path(), &[]);
    assert!(events.is_empty(), "an expired hold billed: {events:?}");
}

fn parse_now(r: &Value) -> String {
    let t: jiff::Timestamp = r["now"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `now` in {r}"));
    t.to_string()
}

/// An open reservation survives a graceful restart (and `kill -9` in sync mode) and
/// is committed after it: counted once, the rest of the hold given back.
#[test]
fn reservation_survives_restarts_and_commits_after_them() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let graceful = reserve(&s, "credits", 20, "5m");
    let lapsing = reserve(&s, "credits", 10, "5m");
    assert_eq!(used(&s, "credits"), 30);
    stop(&mut s);

    let mut s = sync(&dir, state.path());
    assert_eq!(used(&s, "credits"), 30, "holds lost in a graceful restart");
    let killed = reserve(&s, "credits", 30, "5m");
    assert_eq!(used(&s, "credits"), 60);
    kill9(&mut s);

    let mut s = sync(&dir, state.path());
    assert_eq!(
        used(&s, "credits"),
        60,
        "holds lost in a restart after kill -9"
    );
    let r = commit(&s, &graceful, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["operation"], "commit", "{v}");
    assert_eq!(v["reservation"], graceful.as_str(), "{v}");
    assert_eq!(v["committed"], 15, "{v}");
    assert_eq!(v["released"], 5, "{v}");
    assert_eq!(v["used"], 55, "15 committed + 30 + 10 still held: {v}");
    assert_eq!(v["limit"], 100, "{v}");
    assert_eq!(v["remaining"], 45, "{v}");
    assert_error(&commit(&s, &graceful, 15), 404, "unknown_reservation");
    let r = release(&s, &killed);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["committed"].clone(), v["released"].clone()),
        (json!(0), json!(30)),
        "{v}"
    );
    assert_eq!(used(&s, "credits"), 25);
    // A restored hold still expires on the clock.
    let r = s.decide("/v1/test-clock", &json!({"advance": "6m"}));
    assert_eq!(r["reservations_expired"], 1, "{r}");
    assert_eq!(used(&s, "credits"), 15);
    assert_error(&commit(&s, &lapsing, 10), 404, "unknown_reservation");
    stop(&mut s);

    let s = sync(&dir, state.path());
    assert_eq!(used(&s, "credits"), 15, "after the last restart");
    drop(s);
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(events.len(), 1, "only the commit is billed: {events:?}");
    let e = &events[0];
    assert_eq!(e["data"]["operation"], "commit", "{e}");
    assert_eq!(e["data"]["amount"], 15, "{e}");
    assert_eq!(e["data"]["reservation"], graceful.as_str(), "{e}");
    assert_eq!(ledger_sum(&events, "credits"), 15);
}

/// A keyed commit answers its retry the same way after `kill -9` (sync mode), though
/// the reservation is settled by then; the key on another amount is 422.
#[test]
fn idempotent_commit_answers_the_same_after_kill_9() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = sync(&dir, state.path());
    let id = reserve(&s, "credits", 40, "5m");
    let path = format!("/v1/reservations/{id}/commit");
    let keyed = json!({"amount": 25, "idempotency_key": "job-7"});
    let r = s.post(&path, &keyed);
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json();
    assert_eq!(
        (first["committed"].clone(), first["used"].clone()),
        (json!(25), json!(25)),
        "{first}"
    );
    kill9(&mut s);

    let mut s = sync(&dir, state.path());
    let r = s.post(&path, &keyed);
    assert_eq!(r.status, 200, "retry after kill -9: {}", r.text());
    assert_eq!(r.json(), first, "retry after kill -9");
    assert_eq!(used(&s, "credits"), 25, "the retry counted");
    assert_error(
        &s.post(&path, &json!({"amount": 26, "idempotency_key": "job-7"})),
        422,
        "idempotency_key_reused",
    );
    // Without the key, the settled reservation is unknown.
    assert_error(&commit(&s, &id, 25), 404, "unknown_reservation");
    stop(&mut s);
    let events = export(state.path(), &[]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(ledger_sum(&events, "credits"), 25);
}

/// A commit above its hold: with `overage: allow` it counts all of it and reports the
/// units past the limit; with overage denied it is refused, counts nothing and leaves
/// the hold, which can still be released (or committed within what fits).
#[test]
fn commit_above_the_hold_follows_the_overage_rule() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);

    let id = reserve(&s, "tokens", 8, "5m");
    let r = commit(&s, &id, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["committed"], 15, "{v}");
    assert_eq!(v["overage"], 5, "{v}");
    assert_eq!(v["used"], 15, "{v}");
    assert_eq!(v["kind"], "quota", "{v}");
    assert_eq!(used(&s, "tokens"), 15);

    let id = reserve(&s, "tokens.strict", 8, "5m");
    let r = commit(&s, &id, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(v["reason"], "quota_exhausted", "{v}");
    assert_eq!(v["committed"], 0, "{v}");
    assert!(v.get("overage").is_none_or(Value::is_null), "{v}");
    assert_eq!(used(&s, "tokens.strict"), 8, "the hold must stay");
    let r = release(&s, &id);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["operation"], "release", "{v}");
    assert_eq!(
        (v["committed"].clone(), v["released"].clone()),
        (json!(0), json!(8)),
        "{v}"
    );
    assert_eq!(used(&s, "tokens.strict"), 0);
    assert_error(&release(&s, &id), 404, "unknown_reservation");

    // Above the hold but within the limit: counted.
    let id = reserve(&s, "tokens.strict", 4, "5m");
    let r = commit(&s, &id, 9);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["allowed"].clone(), v["committed"].clone()),
        (json!(true), json!(9)),
        "{v}"
    );
    assert_eq!(used(&s, "tokens.strict"), 9);
    stop(&mut s);

    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(ledger_sum(&events, "tokens"), 15);
    assert_eq!(ledger_sum(&events, "tokens.strict"), 9);
    let over = events
        .iter()
        .find(|e| e["data"]["feature"] == "tokens")
        .expect("the tokens commit");
    assert_eq!(over["data"]["overage"], 5, "{over}");
}

// --------------------------------------------------------------- signals -----

/// Once the address is printed, SIGTERM is a graceful stop: exit 0. Ten starts, each
/// sent SIGTERM the moment its address line is read, by a shell already waiting with
/// its builtin `kill` (spawning `kill` would take longer than the window it probes):
/// the handler is installed before the address is announced.
#[test]
fn sigterm_right_after_start_up_is_a_graceful_stop() {
    use std::io::BufRead as _;
    let dir = policy();
    let mut failures = Vec::new();
    for round in 0..10 {
        let state = tempfile::tempdir().expect("state tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .arg("--policies")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--test-clock", T0])
            .args(["--grpc-listen", "off"])
            .arg("--state-dir")
            .arg(state.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning entitled");
        let mut trigger = Command::new("sh")
            .args(["-c", &format!("read _ && kill -TERM {}", child.id())])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning sh");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        let mut go = trigger.stdin.take().expect("piped stdin");
        if line.is_ok() {
            let _ = go.write_all(b"\n");
        }
        drop(go);
        let _ = trigger.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for entitled") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("start {round}: no exit within 10 s of SIGTERM");
        };
        let line = line.unwrap_or_else(|e| panic!("start {round}: no address line ({e})"));
        assert!(line.contains("listening on"), "{line}");
        if !status.success() {
            failures.push(format!("start {round}: {status}"));
        }
    }
    assert!(
        failures.is_empty(),
        "SIGTERM right after the address line killed the process instead of stopping it \
         (the handler is installed after the line is printed): {failures:?}"
    );
}

// ----------------------------------------------------------------- format -----

/// A state directory of a newer format is refused, not misread or rewritten.
#[test]
fn newer_state_format_is_refused() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let format = r#"{"format":99,"id":"6f0c9a52-1d1e-4c53-9a55-5f2c1f0e9b11"}"#;
    std::fs::write(state.path().join("FORMAT"), format).expect("writing FORMAT");
    let out = run_bounded(
        &[
            "serve",
            "--policies",
            dir.path().to_str().expect("UTF-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "off",
            "--state-dir",
            state.path().to_str().expect("UTF-8 path"),
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served a format 99 directory: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "listened on a format 99 directory"
    );
    assert!(stderr.contains("format version"), "{stderr}");
    assert!(
        stderr.contains("99"),
        "the version found is not named: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(state.path().join("FORMAT")).expect("FORMAT"),
        format,
        "FORMAT rewritten"
    );
}

// ------------------------------------------------------------------ export ----

/// `usage export --since/--until` filter by event time (inclusive since, exclusive
/// until), across ledger segments.
#[test]
fn usage_export_filters_by_time() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    consume(&s, "api.calls", 1); // 00:00
    s.decide("/v1/test-clock", &json!({"advance": "10m"}));
    consume(&s, "api.calls", 2); // 00:10
    s.decide("/v1/test-clock", &json!({"advance": "110m"}));
    consume(&s, "api.calls", 4); // 02:00, a new segment (past the 1h age)
    stop(&mut s);

    let amounts = |events: &[Value]| -> Vec<i64> {
        events
            .iter()
            .map(|e| e["data"]["amount"].as_i64().expect("amount"))
            .collect()
    };
    let all = export(state.path(), &[]);
    assert_well_formed(&all, state.path());
    assert_eq!(amounts(&all), [1, 2, 4]);
    let times: Vec<String> = all
        .iter()
        .map(|e| super::support::parse_time(&e["time"]).to_string())
        .collect();
    assert_eq!(
        times,
        [
            "2030-01-15T00:00:00Z",
            "2030-01-15T00:10:00Z",
            "2030-01-15T02:00:00Z"
        ]
    );
    let cases: &[(&[&str], &[i64])] = &[
        (&["--since", "2030-01-15T00:05:00Z"], &[2, 4]),
        (&["--since", "2030-01-15T00:10:00Z"], &[2, 4]),
        (&["--since", "2030-01-15T01:00:00Z"], &[4]),
        (&["--since", "2030-01-15T03:00:00Z"], &[]),
        (&["--until", "2030-01-15T00:10:00Z"], &[1]),
        (
            &[
                "--since",
                "2030-01-15T00:05:00Z",
                "--until",
                "2030-01-15T01:00:00Z",
            ],
            &[2],
        ),
        (&["--since", "2030-01-14"], &[1, 2, 4]),
    ];
    for (args, expect) in cases {
        assert_eq!(
            amounts(&export(state.path(), args)),
            *expect,
            "export {args:?}"
        );
    }
}
