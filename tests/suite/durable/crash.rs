//! Crashes and signals: `kill -9` under load or between requests, a graceful restart
//! under load and SIGTERM right after start-up keep every acknowledged consume and
//! seat, and count nothing twice.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::support::{Server, wait_until};

use super::{
    DAMAGE, Seq, T0, Tally, amounts, assert_folded, assert_well_formed, consume, export, join,
    kill9, ledger_sum, load, policy, serve, stop, sync, used,
};

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
