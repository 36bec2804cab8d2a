//! A damaged journal (cut short, a byte flipped) loses only the damaged records,
//! heals them from the ledger where it can and keeps the ledger whole; a state
//! directory of a newer format is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::support::{PolicyDir, wait_until};

use super::{
    DAMAGE, DAMAGED_METRIC, amounts, assert_well_formed, consume, damaged_metric, export, files_in,
    journals, kill9, ledger_sum, policy, run_bounded, stop, sync, used,
};

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

/// The checkpoint a graceful stop folded the journal into (the only one).
fn checkpoint_of(state: &Path) -> PathBuf {
    let found: Vec<PathBuf> = files_in(state)
        .into_iter()
        .filter(|(n, _)| n.starts_with("checkpoint-") && n.ends_with(".ckpt"))
        .map(|(n, _)| state.join(n))
        .collect();
    assert_eq!(found.len(), 1, "checkpoints: {found:?}");
    found[0].clone()
}

/// A damaged checkpoint — a byte flipped inside one counter's record, cut in half, or
/// emptied — loses no quota counter: what it held is counted again from the usage
/// ledger, the counters equal the ledger, the records lost are counted, and a restart
/// after the recovery finds the same counters.
#[test]
fn a_damaged_checkpoint_is_restored_from_the_ledger() {
    for damage in ["flip", "half", "empty"] {
        let dir = policy();
        let state = tempfile::tempdir().expect("state tempdir");
        let mut s = sync(&dir, state.path());
        for a in amounts(6) {
            consume(&s, "api.calls", a);
        }
        consume(&s, "credits", 5);
        stop(&mut s);
        let ckpt = checkpoint_of(state.path());
        let mut buf = std::fs::read(&ckpt).expect("reading the checkpoint");
        match damage {
            "flip" => {
                // Inside the last record frame (the end frame is the last 20 + a few
                // bytes; the records sit between it and the start frame).
                let i = buf.len() - 40;
                buf[i] ^= 0x40;
            }
            "half" => buf.truncate(buf.len() / 2),
            _ => buf.clear(),
        }
        std::fs::write(&ckpt, &buf).expect("damaging the checkpoint");

        let mut s = sync(&dir, state.path());
        assert_eq!(used(&s, "api.calls"), 63, "{damage}: {}", s.stderr());
        assert_eq!(used(&s, "credits"), 5, "{damage}: {}", s.stderr());
        assert!(
            wait_until(Duration::from_secs(5), || s
                .stderr()
                .contains("restored quota counters lost with a damaged checkpoint")),
            "{damage}: {}",
            s.stderr()
        );
        // A flipped byte loses the one record it hit (the end frame says how many the
        // checkpoint held); an emptied checkpoint lost both counters the ledger
        // restored; one cut in half lost at least one (which records sit in which half
        // varies from run to run).
        let lost = if damage == "empty" { 2.0 } else { 1.0 };
        assert!(
            damaged_metric(&s) >= lost,
            "{damage}: {}",
            damaged_metric(&s)
        );
        let events = export(state.path(), &[]);
        assert_eq!(ledger_sum(&events, "api.calls"), 63, "{damage}");
        assert_eq!(ledger_sum(&events, "credits"), 5, "{damage}");
        stop(&mut s);
        let s = sync(&dir, state.path());
        assert_eq!(used(&s, "api.calls"), 63, "{damage}, after a restart");
        assert_eq!(used(&s, "credits"), 5, "{damage}, after a restart");
    }
}
