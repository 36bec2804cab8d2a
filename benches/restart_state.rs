//! Time until ready after a restart, with 1M live quota counters in the state
//! directory (1M customers × 1 feature, current calendar month), two ways:
//!
//! - **graceful**: the directory was closed with `StateDir::close`, which folds the
//!   journal into one checkpoint: start-up reads that one file;
//! - **crash**: the process went away without closing (the `StateDir` and store are
//!   dropped: `Drop` flushes and syncs the journal but writes no checkpoint), so
//!   start-up replays 1M journal records.
//!
//! `cargo build --release --bin entitled && cargo run --release --example restart_state [counters] [runs]`
//!
//! Both directories are built through the library (`StateDir::open`, then one
//! `MemoryStore::step` consume per customer, as the server does). Every measurement
//! then runs in a fresh child process (this program re-run with `--open`), so it
//! starts from an empty heap as a restarted server does, and its peak RSS (VmHWM)
//! is that of the start-up alone:
//!
//! 1. `StateDir::open`: wall time around the call and `OpenReport::elapsed`;
//! 2. the phases of the same work, timed one by one through the public API
//!    (ledger open, reading the files, decoding frames, replaying them into the
//!    state, loading the state into a store);
//! 3. the real binary: time from spawning `entitled serve --state-dir DIR` (tiny
//!    policy directory) to its `listening` line, which is what users wait for; the
//!    server is then killed with SIGKILL, so the crash directory stays un-checkpointed.
//!
//! Runs follow each other back to back. `IDLE=<seconds>` waits before each one: on a
//! VM whose balloon device has free page reporting (this one), memory freed a few
//! seconds ago is handed back to the host, and faulting ~500 MB in again costs ~1 s
//! of system time (the OPEN line prints the process's user and system time).
//!
//! Files are in the page cache (a process restart). `COLD=1` also drops the page
//! cache before each run (needs root: writes /proc/sys/vm/drop_caches), as after a
//! reboot. `STATE_BENCH_DIR` picks where the directories go and keeps them (its
//! `graceful/` and `crash/` are rebuilt); by default they go to a temporary directory
//! under /tmp, removed at the end (~1 GB: the usage ledger is most of it).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "measurement tool")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use entitled::engine::{self, QuotaMode, UsageKey, UsageOp};
use entitled::policy::{Limit, Period, Reset};
use entitled::time::{ManualClock, Timestamp};
use entitled::usage::durable::{DurableConfig, checkpoint, journal, ledger, record, replay};
use entitled::usage::{MemoryStore, StepMeta};
use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const FEATURE: &str = "api.calls";

fn customer(i: usize) -> String {
    format!("cust-{i:07}")
}

fn status_kib(pid: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (user ms, system ms, minor faults, major faults) of this process so far.
fn cpu_self() -> (f64, f64, u64, u64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the command name: state is field 0, minflt 7, majflt 9, utime 11, stime 12.
    let tick = 1000.0 / 100.0; // USER_HZ: /proc counts in 1/100 s on Linux
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    (get(11) as f64 * tick, get(12) as f64 * tick, get(7), get(9))
}

fn allocated_mb() -> f64 {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap() as f64 / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn dir_bytes(dir: &Path, prefix: &str) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += dir_bytes(&p, prefix);
        } else if e.file_name().to_string_lossy().starts_with(prefix) {
            n += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    n
}

/// Builds a state directory holding `n` live counters; closes it gracefully or not.
fn build(dir: &Path, n: usize, graceful: bool) {
    let now = Timestamp::now();
    let clock = Arc::new(ManualClock::new(now));
    let (state_dir, store, _) = MemoryStore::open_durable(DurableConfig::new(dir), clock).unwrap();
    let w = engine::window(Period::Month, Reset::Calendar, Timestamp(0), now);
    let meta = StepMeta {
        snapshot: "bench",
        ..Default::default()
    };
    let t = Instant::now();
    for i in 0..n {
        let c = customer(i);
        let op = UsageOp::Quota {
            key: UsageKey {
                customer: &c,
                feature: FEATURE,
            },
            window_start: w.start,
            window_end: w.end,
            limit: Limit::Finite(1_000_000_000_000),
            amount: 1 + (i % 7) as u64,
            mode: QuotaMode::Consume,
            allow_overage: false,
        };
        // The journal refuses (fail closed) past 256 MiB pending: wait and retry.
        while store.step(&op, &meta, now).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let stepped = t.elapsed();
    assert_eq!(store.quota_counters(), n);
    let t = Instant::now();
    if graceful {
        drop(store);
        state_dir.close().unwrap();
    } else {
        // A crash after the last flush: nothing folded into a checkpoint.
        drop(store);
        drop(state_dir);
    }
    println!(
        "  built {}: {n} consumes in {:.2} s, then {} in {:.2} s; checkpoint {:.1} MB, journal {:.1} MB, ledger {:.1} MB",
        dir.display(),
        stepped.as_secs_f64(),
        if graceful {
            "close (flush + checkpoint)"
        } else {
            "drop without close (flush only)"
        },
        t.elapsed().as_secs_f64(),
        dir_bytes(dir, "checkpoint-") as f64 / 1e6,
        dir_bytes(dir, "journal-") as f64 / 1e6,
        dir_bytes(&dir.join("ledger"), "usage-") as f64 / 1e6,
    );
}

/// Child: one `StateDir::open`, timed; prints one `OPEN k=v ...` line.
fn child_open(dir: &Path) {
    let clock = Arc::new(ManualClock::new(Timestamp::now()));
    let t = Instant::now();
    let (state_dir, store, report) =
        MemoryStore::open_durable(DurableConfig::new(dir), clock).unwrap();
    let wall = t.elapsed();
    let (user, sys, minflt, majflt) = cpu_self();
    let hwm = status_kib("self", "VmHWM:");
    let rss = status_kib("self", "VmRSS:");
    let heap = allocated_mb();
    println!(
        "OPEN wall_ms={:.1} elapsed_ms={:.1} counters={} store_counters={} checkpoint_lsn={} replayed={} last_lsn={} ledger_caught_up={} lost={} peak_rss_mb={:.0} rss_mb={:.0} heap_mb={:.0} process_user_ms={user:.0} process_sys_ms={sys:.0} minor_faults={minflt} major_faults={majflt}",
        ms(wall),
        ms(report.elapsed),
        report.quota_counters,
        store.quota_counters(),
        report.checkpoint_lsn,
        report.replayed,
        report.last_lsn,
        report.ledger_caught_up,
        report.lost_records,
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        heap,
    );
    // Not closed: a graceful close would checkpoint the crash directory. Dropping the
    // StateDir only stops its threads; the 1M-entry store is left to process exit.
    drop(state_dir);
    std::process::exit(0);
}

/// Child: the same work as `StateDir::open`, phase by phase.
fn child_phases(dir: &Path) {
    let t = Instant::now();
    let ledger = ledger::Ledger::open(
        &dir.join("ledger"),
        "urn:entitled:state:bench".into(),
        ledger::LedgerConfig::default(),
    )
    .unwrap();
    let ledger_open = t.elapsed();
    let floor = ledger.last_lsn();
    drop(ledger);

    // Reading and decoding the files alone (what `recover` does before applying).
    let mut files: Vec<PathBuf> = checkpoint::checkpoints(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.extend(journal::segments(dir).unwrap().into_iter().map(|(_, p)| p));
    let (mut read, mut decode, mut free, mut bytes, mut frames) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0, 0);
    let mut frames_heap = 0.0f64;
    for f in &files {
        let t = Instant::now();
        let buf = std::fs::read(f).unwrap();
        read += t.elapsed();
        bytes += buf.len();
        let t = Instant::now();
        let before = allocated_mb();
        let (fr, _) = record::decode_all(&buf);
        decode += t.elapsed();
        frames += fr.len();
        // Heap the decoded frames of one file hold besides the file itself.
        frames_heap = frames_heap.max(allocated_mb() - before);
        let t = Instant::now();
        drop(fr);
        drop(buf);
        free += t.elapsed();
    }

    // The whole replay (read + decode + apply), as start-up runs it.
    let t = Instant::now();
    let mut events = 0u64;
    let mut rec = replay::recover(dir, None, |lsn, r| {
        if lsn > floor && ledger::counts(r) {
            events += 1;
        }
    })
    .unwrap();
    let recover = t.elapsed();
    let hwm_recover = status_kib("self", "VmHWM:");
    let state_heap = allocated_mb();
    let t = Instant::now();
    rec.state.prune(Timestamp::now().0);
    let prune = t.elapsed();
    let counters = rec.state.quotas.len();
    let t = Instant::now();
    let mut store = MemoryStore::new();
    store.restore(rec.state);
    let restore = t.elapsed();
    let apply = recover.saturating_sub(read + decode + free);
    println!(
        "PHASES ledger_open_ms={:.1} read_ms={:.1} decode_ms={:.1} free_frames_ms={:.1} apply_ms={:.1} recover_ms={:.1} prune_ms={:.1} restore_ms={:.1} sum_ms={:.1} files={} mb={:.1} frames={} counters={} ledger_events_behind={} frames_heap_mb={frames_heap:.0} state_heap_mb={state_heap:.0} store_heap_mb={:.0} peak_rss_after_recover_mb={:.0} peak_rss_mb={:.0}",
        ms(ledger_open),
        ms(read),
        ms(decode),
        ms(free),
        ms(apply),
        ms(recover),
        ms(prune),
        ms(restore),
        ms(ledger_open + recover + prune + restore),
        files.len(),
        bytes as f64 / 1e6,
        frames,
        counters,
        events,
        allocated_mb(),
        hwm_recover as f64 / 1024.0,
        status_kib("self", "VmHWM:") as f64 / 1024.0,
    );
    assert_eq!(store.quota_counters(), counters);
    std::process::exit(0);
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("COLD=1: cannot drop the page cache ({e}); this run is warm");
    }
}

/// `IDLE=<seconds>`: wait before each run (see the note on idle VMs in the report).
fn idle() {
    if let Some(s) = std::env::var("IDLE").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_secs(s));
    }
}

fn run_child(mode: &str, dir: &Path, cold: bool) -> String {
    idle();
    if cold {
        drop_caches();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .arg(mode)
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{mode} {} failed", dir.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("OPEN ") || l.starts_with("PHASES "))
        .unwrap_or_default()
        .to_string()
}

/// Spawns the real binary on `dir` and times it to its `listening` line.
fn run_binary(bin: &Path, policies: &Path, dir: &Path, cold: bool) -> String {
    idle();
    if cold {
        drop_caches();
    }
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--grpc-listen", "off"])
        .args(["--log", "info"])
        .arg("--policies")
        .arg(policies)
        .arg("--state-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        // The server's own report of the recovery ("usage state recovered ... elapsed_ms=").
        let mut recovered = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("usage state recovered") {
                recovered = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("elapsed_ms="))
                    .unwrap_or("?")
                    .to_string();
            }
        }
        recovered
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut ready = None;
    while stdout.read_line(&mut line).unwrap_or(0) > 0 {
        if line.contains("listening on") {
            ready = Some(t.elapsed());
            break;
        }
        line.clear();
    }
    let pid = child.id().to_string();
    let hwm = status_kib(&pid, "VmHWM:");
    // SIGKILL: a graceful stop would fold the journal into a checkpoint.
    child.kill().unwrap();
    child.wait().unwrap();
    let recovered_ms = log.join().unwrap();
    match ready {
        Some(d) => format!(
            "BIN ready_ms={:.1} server_logged_recovery_ms={recovered_ms} peak_rss_mb={:.0}",
            ms(d),
            hwm as f64 / 1024.0
        ),
        None => "BIN never printed its listening line".into(),
    }
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn range(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = s[s.len() / 2];
    format!("{med:.0} ms [{:.0}..{:.0}]", s[0], s[s.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--open") => return child_open(Path::new(&args[2])),
        Some("--phases") => return child_phases(Path::new(&args[2])),
        _ => {}
    }
    let n: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let cold = std::env::var("COLD").is_ok_and(|v| v == "1");
    let tmp;
    let base = match std::env::var("STATE_BENCH_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => {
            tmp = tempfile::Builder::new()
                .prefix("entitled-restart.")
                .tempdir_in("/tmp")
                .unwrap();
            tmp.path().to_path_buf()
        }
    };
    let bin = std::env::var("ENTITLED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            // target/release/examples/restart_state -> target/release/entitled
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("entitled")
        });

    let policies = base.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("catalog.yaml"),
        "features:\n  api.calls: { kind: quota, combine: sum }\nplans:\n  bench:\n    grants:\n      api.calls: { limit: 1000000000000, per: month, reset: calendar }\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("customers.ndjson"),
        "{\"id\": \"cust-0000000\", \"subscriptions\": [{\"plan\": \"bench\", \"starts\": \"2025-01-01\"}]}\n",
    )
    .unwrap();

    println!(
        "building two state directories with {n} live quota counters each (1 feature, current month)"
    );
    let graceful = base.join("graceful");
    let crash = base.join("crash");
    for d in [&graceful, &crash] {
        let _ = std::fs::remove_dir_all(d);
    }
    build(&graceful, n, true);
    build(&crash, n, false);
    // Writeback of the ~1 GB just written is not left to compete with the first
    // measured start-up.
    let t = Instant::now();
    let _ = Command::new("sync").status();
    println!(
        "  sync (writeback of the build): {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let mut summary = Vec::new();
    for (name, dir) in [("graceful", &graceful), ("crash", &crash)] {
        println!(
            "\n== restart after {name}: {}{}",
            if name == "graceful" {
                "one checkpoint"
            } else {
                "everything in the journal"
            },
            if cold { ", page cache dropped" } else { "" }
        );
        let mut opens = Vec::new();
        let mut bins = Vec::new();
        for _ in 0..runs {
            let o = run_child("--open", dir, cold);
            println!("  {o}");
            opens.push(o);
        }
        let p = run_child("--phases", dir, cold);
        println!("  {p}");
        if bin.exists() {
            for _ in 0..runs {
                let b = run_binary(&bin, &policies, dir, cold);
                println!("  {b}");
                bins.push(b);
            }
        } else {
            println!(
                "  (no binary at {}: cargo build --release --bin entitled)",
                bin.display()
            );
        }
        let wall: Vec<f64> = opens.iter().map(|l| field(l, "wall_ms")).collect();
        let el: Vec<f64> = opens.iter().map(|l| field(l, "elapsed_ms")).collect();
        let hwm: Vec<f64> = opens.iter().map(|l| field(l, "peak_rss_mb")).collect();
        let ready: Vec<f64> = bins.iter().map(|l| field(l, "ready_ms")).collect();
        summary.push(format!(
            "{name:<9} StateDir::open wall {}, OpenReport.elapsed {}, peak RSS {:.0} MB; binary spawn -> listening {}",
            range(&wall),
            range(&el),
            hwm.iter().cloned().fold(0.0, f64::max),
            if ready.is_empty() {
                "-".into()
            } else {
                range(&ready)
            },
        ));
        let worst = wall.iter().chain(&ready).cloned().fold(0.0, f64::max);
        summary.push(format!(
            "          target ready <= 2 s with {n} counters: {} (worst {:.2} s)",
            if worst <= 2000.0 { "met" } else { "MISSED" },
            worst / 1e3
        ));
    }
    println!("\n== summary (median [min..max] over {runs} runs)");
    for s in summary {
        println!("{s}");
    }
}
