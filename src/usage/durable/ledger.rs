//! The usage ledger: every counted consumption as one CloudEvents 1.0 JSON line, for
//! billing (OpenMeter, Lago or a billing job read it as it is).
//!
//! The journal is the source of truth and the ledger is derived from it: the journal's
//! writer appends the events of each flushed batch after the batch is in the journal,
//! so the ledger is never ahead of the journal. An event's `id` is the journal record's
//! sequence number (lsn) and `source` names the state directory, so on start-up the
//! ledger resumes after the last lsn it holds and re-derives whatever a crash cut off:
//! each consumption appears exactly once, across restarts.
//!
//! Segments are `ledger/usage-<first lsn>-<start unix seconds>.ndjson`, rotated by
//! size and age, gzipped once closed (see [`super::archive`]), and deleted after the
//! retention period (measured in event time, so a test clock drives it too) or once
//! acknowledged. Past `max_bytes` the ledger stops appending: it falls behind (the
//! journal keeps the events) and catches up once segments are deleted.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::archive;
use super::record::Record;
use super::sink::Appender;
use crate::files;
use crate::ids::{parse_reservation, reservation_name};
use crate::time::{SECOND, Timestamp};

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Rotate a segment past this size.
    pub segment_bytes: u64,
    /// Rotate a segment once its first event is this old (microseconds).
    pub segment_age_us: i64,
    /// Delete segments whose events are all older than this (microseconds).
    pub retention_us: i64,
    /// Most bytes the ledger's files may take (0: no cap).
    pub max_bytes: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            segment_bytes: 64 << 20,
            segment_age_us: 3600 * SECOND,
            retention_us: 30 * 86_400 * SECOND,
            max_bytes: 0,
        }
    }
}

#[derive(Serialize)]
struct Event<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    subject: &'a str,
    time: Timestamp,
    datacontenttype: &'static str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    feature: &'a str,
    /// Units counted; a seat release is -1, so a sum is the seats held.
    amount: i64,
    window_start: Option<Timestamp>,
    window_end: Option<Timestamp>,
    overage: u64,
    snapshot: &'a str,
    operation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<&'a str>,
}

/// Appends the event for `record` (if it counts usage) to `out`.
pub fn write_event(out: &mut Vec<u8>, source: &str, lsn: u64, record: &Record<'_>) {
    let mut id = itoa::Buffer::new();
    let id = id.format(lsn);
    let (subject, time, data) = match *record {
        Record::Consume {
            customer,
            feature,
            window_start,
            window_end,
            amount,
            overage,
            time,
            snapshot,
        } => (
            customer,
            time,
            Data {
                feature,
                amount: i64::try_from(amount).unwrap_or(i64::MAX),
                window_start: Some(Timestamp(window_start)),
                window_end: Some(Timestamp(window_end)),
                overage,
                snapshot,
                operation: "consume",
                reservation: None,
                holder: None,
            },
        ),
        Record::Settle {
            id: rid,
            customer,
            feature,
            window_start,
            window_end,
            committed,
            overage,
            time,
            snapshot,
        } if committed > 0 => (
            customer,
            time,
            Data {
                feature,
                amount: i64::try_from(committed).unwrap_or(i64::MAX),
                window_start: Some(Timestamp(window_start)),
                window_end: Some(Timestamp(window_end)),
                overage,
                snapshot,
                operation: "commit",
                reservation: Some(reservation_name(rid)),
                holder: None,
            },
        ),
        Record::Seat {
            customer,
            feature,
            holder,
            acquire,
            time,
            snapshot,
        } => (
            customer,
            time,
            Data {
                feature,
                amount: if acquire { 1 } else { -1 },
                window_start: None,
                window_end: None,
                overage: 0,
                snapshot,
                operation: if acquire {
                    "seat_acquire"
                } else {
                    "seat_release"
                },
                reservation: None,
                holder: Some(holder),
            },
        ),
        _ => return,
    };
    let ev = Event {
        specversion: "1.0",
        id,
        source,
        ty: "entitled.usage",
        subject,
        time: Timestamp(time),
        datacontenttype: "application/json",
        data,
    };
    if serde_json::to_writer(&mut *out, &ev).is_ok() {
        out.push(b'\n');
    }
}

/// Whether `record` produces a ledger event.
pub fn counts(record: &Record<'_>) -> bool {
    match record {
        Record::Consume { .. } | Record::Seat { .. } => true,
        Record::Settle { committed, .. } => *committed > 0,
        _ => false,
    }
}

#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    first_lsn: u64,
    start_secs: i64,
    /// Compressed (closed).
    gz: bool,
}

/// The segments of ledger `dir`, oldest first, in either form (the plain one while
/// both exist: its compression is not finished).
fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let named = files::list_by(dir, |name| {
        let rest = name.strip_prefix("usage-")?;
        let (stem, gz) = match rest.strip_suffix(".ndjson.gz") {
            Some(stem) => (stem, true),
            None => (rest.strip_suffix(".ndjson")?, false),
        };
        let (lsn, secs) = stem.split_once('-')?;
        Some((lsn.parse::<u64>().ok()?, secs.parse::<i64>().ok()?, gz))
    })?;
    let mut out: Vec<Segment> = Vec::with_capacity(named.len());
    for ((first_lsn, start_secs, gz), path) in named {
        if out
            .last()
            .is_some_and(|s| s.first_lsn == first_lsn && s.start_secs == start_secs)
        {
            continue;
        }
        out.push(Segment {
            path,
            first_lsn,
            start_secs,
            gz,
        });
    }
    Ok(out)
}

/// The ledger's writer. Lives on the journal's writer thread.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    source: String,
    config: LedgerConfig,
    file: Option<Appender>,
    /// The segment `file` appends to.
    path: Option<PathBuf>,
    /// Bytes of the ledger's files (recounted from the directory at maintenance).
    bytes: u64,
    start_us: i64,
    /// The last lsn the ledger holds an event for (0: none). Never past an event that
    /// was not written: re-derivation from the journal resumes after it.
    last_lsn: u64,
    /// An append failed: events after `last_lsn` are in the journal only, and later
    /// batches must not be appended before them (see [`Self::is_behind`]).
    behind: bool,
    /// Torn bytes cut off the last segment when it was opened.
    pub truncated_bytes: u64,
}

impl Ledger {
    /// Opens `dir` (creating it), cuts a torn last line and finds the last lsn.
    pub fn open(dir: &Path, source: String, config: LedgerConfig) -> io::Result<Ledger> {
        fs::create_dir_all(dir)?;
        archive::remove_leftovers(dir)?;
        let mut ledger = Ledger {
            dir: dir.to_path_buf(),
            source,
            config,
            file: None,
            path: None,
            bytes: segment_bytes(dir)?,
            start_us: 0,
            last_lsn: 0,
            behind: false,
            truncated_bytes: 0,
        };
        let segs = segments(dir)?;
        for seg in segs.iter().rev() {
            if seg.gz {
                // Closed: whole, never appended to.
                ledger.last_lsn = last_event(seg)?.unwrap_or(0);
                if ledger.last_lsn > 0 {
                    break;
                }
                continue;
            }
            let buf = fs::read(&seg.path)?;
            let keep = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if keep < buf.len() {
                ledger.truncated_bytes += (buf.len() - keep) as u64;
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(keep as u64)?;
                f.sync_data()?;
            }
            let last_line = buf[..keep]
                .split(|&b| b == b'\n')
                .rev()
                .find(|l| !l.is_empty());
            if let Some(line) = last_line {
                ledger.last_lsn = event_lsn(line).unwrap_or(0);
            }
            if ledger.file.is_none() && seg.path == segs[segs.len() - 1].path {
                let f = OpenOptions::new().append(true).open(&seg.path)?;
                ledger.file = Some(Appender::new(f, keep as u64));
                ledger.path = Some(seg.path.clone());
                ledger.start_us = seg.start_secs.saturating_mul(SECOND);
            }
            if ledger.last_lsn > 0 {
                break;
            }
            ledger.last_lsn = ledger.last_lsn.max(seg.first_lsn.saturating_sub(1));
        }
        // Never name an event again that was acknowledged (its segment may be gone).
        ledger.last_lsn = ledger.last_lsn.max(archive::acked(dir)?);
        // Segments acknowledged while stopped go; closed ones a stop left plain are
        // compressed now (at most the one the writer had just closed, normally).
        ledger.prune(None)?;
        for seg in segments(dir)? {
            if !seg.gz && Some(&seg.path) != ledger.path.as_ref() {
                archive::compress(&seg.path)?;
            }
        }
        ledger.prune(None)?;
        Ok(ledger)
    }

    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// Appends to `file` (standing for the last segment) from now on.
    #[cfg(test)]
    pub fn with_file(mut self, file: Appender) -> Ledger {
        self.file = Some(file);
        self
    }

    /// Whether an append failed since the ledger last caught up: the events after
    /// [`Self::last_lsn`] must be re-derived from the journal before anything newer is
    /// appended.
    pub fn is_behind(&self) -> bool {
        self.behind
    }

    /// Every event the journal holds is in the ledger again.
    pub fn caught_up(&mut self) {
        self.behind = false;
        crate::metrics::ledger(self.bytes, self.config.max_bytes, false);
    }

    /// Appends encoded event lines (all with lsn > [`Self::last_lsn`]) whose last lsn
    /// is `last`; `first` is the first event's (lsn, time), used to name a new segment.
    /// Whole or not at all: a failed append leaves the segment as it was, the last lsn
    /// where it was, and the ledger behind.
    pub fn append(&mut self, lines: &[u8], first: (u64, i64), last: u64) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        match self.write(lines, first) {
            Ok(()) => {
                self.last_lsn = last;
                self.bytes += lines.len() as u64;
                crate::metrics::ledger(self.bytes, self.config.max_bytes, self.behind);
                Ok(())
            }
            Err(e) => {
                self.behind = true;
                crate::metrics::ledger(self.bytes, self.config.max_bytes, true);
                Err(e)
            }
        }
    }

    /// Refuses `n` more bytes past the cap, after deleting what maintenance may.
    fn make_room(&mut self, n: usize, now_us: i64) -> io::Result<()> {
        let max = self.config.max_bytes;
        if max == 0 || self.bytes + n as u64 <= max {
            return Ok(());
        }
        self.prune(Some(now_us))?;
        if self.bytes + n as u64 <= max {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "the usage ledger is at its cap (--ledger-max-bytes {max}; {} bytes): acknowledge what billing ingested (entitled usage ack), or raise the cap",
            self.bytes
        )))
    }

    fn write(&mut self, lines: &[u8], (first_lsn, first_time): (u64, i64)) -> io::Result<()> {
        self.make_room(lines.len(), first_time)?;
        let stale = first_time.saturating_sub(self.start_us) >= self.config.segment_age_us;
        let full = self
            .file
            .as_ref()
            .is_none_or(|f| f.len() >= self.config.segment_bytes);
        if full || stale {
            self.rotate(first_lsn, first_time)?;
        }
        match &mut self.file {
            Some(f) => f.append(lines, false),
            None => Err(io::Error::other("no ledger segment open")),
        }
    }

    fn rotate(&mut self, first_lsn: u64, time_us: i64) -> io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync()?;
        }
        if let Some(closed) = self.path.take() {
            archive::compress_in_background(vec![closed]);
        }
        let secs = time_us.div_euclid(SECOND);
        let path = self
            .dir
            .join(format!("usage-{first_lsn:020}-{secs}.ndjson"));
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = f.metadata()?.len();
        self.file = Some(Appender::new(f, len));
        self.path = Some(path);
        self.start_us = time_us;
        self.prune(Some(time_us))?;
        Ok(())
    }

    /// Deletes the segments whose every event is older than the retention (as of
    /// `now_us`, if given), or at or before the acknowledged position (a segment's
    /// events end where the next one starts; the last segment is never deleted), and
    /// recounts the ledger's bytes.
    fn prune(&mut self, now_us: Option<i64>) -> io::Result<()> {
        let segs = segments(&self.dir)?;
        let horizon = now_us.map_or(i64::MIN, |n| n.saturating_sub(self.config.retention_us));
        let acked = archive::acked(&self.dir)?;
        for pair in segs.windows(2) {
            let expired = pair[1].start_secs.saturating_mul(SECOND) < horizon;
            let ingested = pair[1].first_lsn <= acked.saturating_add(1);
            if expired || ingested {
                remove_segment(&pair[0].path)?;
            }
        }
        self.bytes = segment_bytes(&self.dir)?;
        crate::metrics::ledger(self.bytes, self.config.max_bytes, self.behind);
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync(),
            None => Ok(()),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Events with an lsn above `after`, read back as the records that made them (for
/// healing counters whose journal records were lost to damage). Segments that end at
/// or before `after` are skipped unread.
pub fn events_after(dir: &Path, after: u64) -> io::Result<Vec<(u64, serde_json::Value)>> {
    events_between(dir, after, u64::MAX)
}

/// The events with `after < lsn <= upto`, in file order. Segments wholly outside the
/// range are skipped unread.
pub fn events_between(
    dir: &Path,
    after: u64,
    upto: u64,
) -> io::Result<Vec<(u64, serde_json::Value)>> {
    let segs = segments(dir)?;
    let mut out = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        if segs
            .get(i + 1)
            .is_some_and(|next| next.first_lsn <= after + 1)
        {
            continue;
        }
        if seg.first_lsn > upto {
            break;
        }
        let r = archive::open(&seg.path, seg.gz)?;
        for line in r.split(b'\n') {
            let line = line?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match v["id"].as_str().and_then(|id| id.parse::<u64>().ok()) {
                Some(lsn) if lsn > after && lsn <= upto => out.push((lsn, v)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The record an event line was derived from (its counting part), if it parses.
pub fn event_record(v: &serde_json::Value) -> Option<Record<'_>> {
    let d = &v["data"];
    let time = |k: &str| {
        d[k].as_str()
            .and_then(|t| Timestamp::parse(t).ok())
            .map(|t| t.0)
    };
    let customer = v["subject"].as_str()?;
    let feature = d["feature"].as_str()?;
    let snapshot = d["snapshot"].as_str().unwrap_or("");
    let overage = d["overage"].as_u64().unwrap_or(0);
    let at = v["time"]
        .as_str()
        .and_then(|t| Timestamp::parse(t).ok())
        .map_or(0, |t| t.0);
    match d["operation"].as_str()? {
        "consume" => Some(Record::Consume {
            customer,
            feature,
            window_start: time("window_start")?,
            window_end: time("window_end")?,
            amount: d["amount"].as_u64()?,
            overage,
            time: at,
            snapshot,
        }),
        "commit" => Some(Record::Settle {
            id: d["reservation"].as_str().and_then(parse_reservation)?,
            customer,
            feature,
            window_start: time("window_start")?,
            window_end: time("window_end")?,
            committed: d["amount"].as_u64()?,
            overage,
            time: at,
            snapshot,
        }),
        op @ ("seat_acquire" | "seat_release") => Some(Record::Seat {
            customer,
            feature,
            holder: d["holder"].as_str()?,
            acquire: op == "seat_acquire",
            time: at,
            snapshot,
        }),
        _ => None,
    }
}

/// Bytes of the segments of ledger `dir` (each in the form a reader takes, so a
/// compression under way is not counted twice).
fn segment_bytes(dir: &Path) -> io::Result<u64> {
    let mut n = 0;
    for seg in segments(dir)? {
        n += fs::metadata(&seg.path).map_or(0, |m| m.len());
    }
    Ok(n)
}

/// Deletes a segment, in both forms (its compression may be under way).
fn remove_segment(path: &Path) -> io::Result<()> {
    for p in [path.to_path_buf(), archive::gz_path(path)] {
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The lsn of a segment's last event, if it has one.
fn last_event(seg: &Segment) -> io::Result<Option<u64>> {
    let mut last = None;
    for line in archive::open(&seg.path, seg.gz)?.split(b'\n') {
        let line = line?;
        if let Some(lsn) = event_lsn(&line) {
            last = Some(lsn);
        }
    }
    Ok(last)
}

/// The id (lsn) of the last event in ledger `dir`, if any.
pub fn last_position(dir: &Path) -> io::Result<Option<u64>> {
    for seg in segments(dir)?.iter().rev() {
        if let Some(lsn) = last_event(seg)? {
            return Ok(Some(lsn));
        }
    }
    Ok(None)
}

/// The lsn in an event line's `id`.
pub(super) fn event_lsn(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: &'a str,
    }
    serde_json::from_slice::<Id<'_>>(line).ok()?.id.parse().ok()
}

/// Which events [`export`] prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    /// At or after this event time.
    pub since: Option<Timestamp>,
    /// Before this event time.
    pub until: Option<Timestamp>,
    /// After this position (event id): what a shipper has not yet ingested.
    pub after: Option<u64>,
}

/// What [`export`] printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exported {
    pub events: u64,
    /// The id of the last event printed: the position to acknowledge once ingested.
    pub last_position: Option<u64>,
}

/// Prints the events `filter` selects to `out`, oldest first, from segments in either
/// form. Segments that end before `since` or at `after` are skipped unread. A line
/// that is not an event (damage) fails the export, naming its file and line: a
/// billing export that silently left events out would under-bill.
pub fn export(dir: &Path, filter: Filter, out: &mut impl Write) -> io::Result<Exported> {
    let segs = segments(dir)?;
    let mut done = Exported::default();
    for (i, seg) in segs.iter().enumerate() {
        let next = segs.get(i + 1);
        let ends = next.map(|s| s.start_secs.saturating_mul(SECOND));
        if let (Some(since), Some(ends)) = (filter.since, ends)
            && ends < since.0
        {
            continue;
        }
        if let (Some(after), Some(next)) = (filter.after, next)
            && next.first_lsn <= after.saturating_add(1)
        {
            continue;
        }
        export_segment(seg, filter, out, &mut done)?;
    }
    Ok(done)
}

fn export_segment(
    seg: &Segment,
    filter: Filter,
    out: &mut impl Write,
    done: &mut Exported,
) -> io::Result<()> {
    let r = archive::open(&seg.path, seg.gz)?;
    for (no, line) in r.split(b'\n').enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let (id, t) = event_head(&line).map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}:{}: not a usage event ({why}); the ledger is damaged here",
                    seg.path.display(),
                    no + 1
                ),
            )
        })?;
        let keep = filter.since.is_none_or(|s| t >= s)
            && filter.until.is_none_or(|u| t < u)
            && filter.after.is_none_or(|a| id > a);
        if keep {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
            done.events += 1;
            done.last_position = Some(id);
        }
    }
    Ok(())
}

/// The `id` and `time` of an event line, or why it is not one.
fn event_head(line: &[u8]) -> Result<(u64, Timestamp), String> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        id: &'a str,
        #[serde(borrow)]
        time: &'a str,
    }
    let h = serde_json::from_slice::<Head<'_>>(line).map_err(|e| e.to_string())?;
    let id =
        h.id.parse()
            .map_err(|_| format!("`id` {:?} is not a position", h.id))?;
    let t = Timestamp::parse(h.time).map_err(|e| format!("`time`: {e}"))?;
    Ok((id, t))
}
