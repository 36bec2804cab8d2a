//! A full disk under `--durability sync`, on a real (tmpfs) file system filled until
//! writes fail: a consume answered 503 counts nothing, in memory, in the journal or
//! in the ledger, before or after space returns; and `entitled usage export` fails,
//! naming file and line, on a ledger line a failed write could once leave torn.
//!
//! Mounting a tmpfs needs root (as CI runs): without it these tests fail, saying so,
//! rather than pass without having filled anything.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{FallibleConn, metric_value};
use super::{assert_well_formed, export, ledger_sum, policy, run_bounded, stop, sync, used};

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs at {} failed: this test fills a real file system and needs root (CI runs it as root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with `filler`, then frees all but `keep` bytes of room.
    fn fill_leaving(&self, keep: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        // Bounded by the mount's size; the write that fails is the disk being full.
        while written < 64 << 20 {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        f.set_len(written.saturating_sub(keep))
            .expect("freeing room");
        f.sync_all().expect("sync filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// What the load threads saw.
#[derive(Debug, Default)]
struct Seen {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

/// `workers` threads consuming 1 of api.calls until `refusals` 503s were seen (or a
/// bound in count and time is hit). Every answer must be 200 allowed or 503
/// `store_unavailable`.
fn consume_until_refused(addr: std::net::SocketAddr, workers: usize, refusals: u64) -> Seen {
    let seen = Arc::new(Seen::default());
    let done = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (seen, done) = (seen.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = FallibleConn::connect(addr).expect("connecting");
                let body = br#"{"customer":"acme","feature":"api.calls"}"#;
                let started = Instant::now();
                for _ in 0..20_000 {
                    if done.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    let (status, b) = c.post("/v1/consume", body).expect("an answer");
                    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                    match status {
                        200 if v["allowed"] == true => {
                            seen.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        503 if v["error"]["code"] == "store_unavailable" => {
                            if seen.refused.fetch_add(1, Ordering::SeqCst) + 1 >= refusals {
                                done.store(true, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            eprintln!("unexpected answer {status}: {v}");
                            seen.other.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("load thread");
    }
    Arc::into_inner(seen).expect("threads joined")
}

/// The state directory fills up under concurrent sync-mode consumes: every 503 counts
/// nothing and every 200 counts once, in memory at once, after space returns, after
/// a restart, and in the ledger (which caught up from the journal with no gap and no
/// torn line).
#[test]
fn a_full_disk_in_sync_mode_counts_exactly_the_acknowledged_consumes() {
    let fs = Tmpfs::mount("2m");
    let state = fs.path().join("state");
    let dir = policy();
    let mut s = sync(&dir, &state);
    let filler = fs.fill_leaving(96 << 10);

    let full = consume_until_refused(s.addr, 4, 200);
    assert_eq!(full.other.load(Ordering::SeqCst), 0, "only 200 or 503");
    let ok = full.ok.load(Ordering::SeqCst);
    let refused = full.refused.load(Ordering::SeqCst);
    assert!(
        ok > 0 && refused >= 200,
        "{ok} acknowledged, {refused} refused"
    );
    assert_eq!(
        used(&s, "api.calls"),
        ok,
        "refused consumes counted in memory"
    );
    let metrics = s.get("/metrics").text();
    let dropped = metric_value(&metrics, "entitled_journal_refused_changes_total");
    assert!(dropped.is_some_and(|d| d >= refused as f64), "{dropped:?}");

    fs::remove_file(&filler).expect("freeing the disk");
    let mut after = 0;
    for _ in 0..50 {
        super::consume(&s, "api.calls", 1);
        after += 1;
    }
    let total = ok + after;
    assert_eq!(used(&s, "api.calls"), total, "after space returned");
    stop(&mut s);

    let events = export(&state, &[]);
    assert_well_formed(&events, &state);
    assert_eq!(ledger_sum(&events, "api.calls"), total as i64, "the ledger");
    let s = sync(&dir, &state);
    assert_eq!(used(&s, "api.calls"), total, "after a restart");
    drop(s);
}

/// A ledger line cut in half with the next event glued onto it (what a failed
/// partial write once left): export fails, naming the segment and the line, instead
/// of leaving the event out.
#[test]
fn export_fails_naming_file_and_line_on_a_torn_ledger_line() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state");
    let mut s = sync(&dir, state.path());
    for _ in 0..3 {
        super::consume(&s, "api.calls", 1);
    }
    stop(&mut s);
    let ledger = state.path().join("ledger");
    let seg = fs::read_dir(&ledger)
        .expect("ledger dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .expect("a ledger segment");
    let text = fs::read_to_string(&seg).expect("segment");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let torn = format!(
        "{}\n{}{}\n",
        lines[0],
        &lines[1][..lines[1].len() / 2],
        lines[2]
    );
    fs::write(&seg, torn).expect("tearing a line");
    let state_arg = state.path().to_str().expect("UTF-8 path");
    let out = run_bounded(
        &["usage", "export", "--state-dir", state_arg],
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "export of a torn ledger succeeded");
    let name = seg.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        err.contains(&format!("{name}:2:")) && err.contains("damaged"),
        "the error names neither file nor line: {err}"
    );
}
