//! What the state directory holds, record by record, and how records are framed.
//!
//! A frame is `magic (4) | payload length (u32 LE) | crc32 (u32 LE) | lsn (u64 LE) |
//! payload`, where the checksum covers the payload and then the lsn (so the payload can
//! be encoded and summed before the lsn is assigned), and the payload is one
//! [`Entry`] in postcard. A frame is the unit of atomicity: a consume and the
//! idempotency key that remembers its answer travel in one frame, so a crash keeps both
//! or neither.
//!
//! Reading never trusts a length: a frame whose checksum fails is skipped by scanning
//! for the next magic that starts a valid frame, so one flipped byte costs one record,
//! not the rest of the file, and a torn tail costs only the partial record.

use serde::{Deserialize, Serialize};

use crate::engine::UsageOutcome;
use crate::ids::ReservationId;

/// Bumped when the on-disk format changes incompatibly. A state directory written by
/// a newer version is refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: [u8; 4] = [0xE7, 0x1D, 0xA7, 0x5E];
pub const FRAME_HEADER: usize = 20;
/// No honest record comes near this; a larger length is damage.
const MAX_PAYLOAD: usize = 1 << 20;

/// One change to usage state. Journal records describe what happened; checkpoint
/// records describe what is (a checkpoint is the journal that rebuilds the state from
/// nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record<'a> {
    /// Units counted in a quota window (a consume, or a checkpoint's total).
    Consume {
        customer: &'a str,
        feature: &'a str,
        window_start: i64,
        window_end: i64,
        amount: u64,
        /// Of `amount`, units beyond the limit (`overage: allow`).
        overage: u64,
        time: i64,
        snapshot: &'a str,
    },
    /// Units held against a quota until committed, released or expired.
    Reserve {
        id: ReservationId,
        customer: &'a str,
        feature: &'a str,
        window_start: i64,
        window_end: i64,
        amount: u64,
        /// `None`: unlimited.
        limit: Option<u64>,
        allow_overage: bool,
        expires: i64,
        time: i64,
    },
    /// A reservation ended: `committed` units counted (0 for a release).
    Settle {
        id: ReservationId,
        customer: &'a str,
        feature: &'a str,
        window_start: i64,
        window_end: i64,
        committed: u64,
        overage: u64,
        time: i64,
        snapshot: &'a str,
    },
    /// A seat taken or given back.
    Seat {
        customer: &'a str,
        feature: &'a str,
        holder: &'a str,
        acquire: bool,
        time: i64,
        snapshot: &'a str,
    },
    /// An idempotency key and the answer it returns on retry.
    Idem {
        customer: &'a str,
        key: &'a str,
        fingerprint: u64,
        expires: i64,
        answer: Answer,
    },
}

/// What an idempotent request answered, enough to answer a retry the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Usage(UsageOutcome),
    Settle(Settled),
}

/// A settled reservation, with what the answer names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub outcome: SettleOutcome,
    pub customer: String,
    pub feature: String,
    pub window_start: i64,
}

impl Settled {
    /// The answer for a reservation that was not open (unknown, settled or expired).
    pub fn not_found() -> Settled {
        Settled {
            outcome: SettleOutcome::default(),
            customer: String::new(),
            feature: String::new(),
            window_start: 0,
        }
    }
}

/// The result of committing or releasing a reservation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleOutcome {
    /// The reservation was open (not unknown, settled or expired).
    pub found: bool,
    /// Units counted (the commit's amount when admitted; 0 for a release).
    pub committed: u64,
    /// Units the hold gave back to the quota.
    pub released: u64,
    /// Of `committed`, units beyond the limit.
    pub overage: u64,
    /// A commit above the hold that did not fit: nothing counted, the hold stays.
    pub denied: bool,
    /// The window's usage after the step, open holds included.
    pub used: u64,
    pub limit: Option<u64>,
    pub window_end: i64,
}

/// The payload of one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry<'a> {
    /// One atomic change: usually one record, or a record and its idempotency key.
    #[serde(borrow)]
    Records(Vec<Record<'a>>),
    /// First frame of a checkpoint: it holds the state as of `lsn`.
    CheckpointStart { format: u32, lsn: u64 },
    /// Last frame of a checkpoint: `records` frames came between.
    CheckpointEnd { records: u64 },
}

/// [`Entry::Records`] from a borrowed slice: encodes exactly as the owned form, so the
/// hot path builds no `Vec`.
#[derive(Debug, Serialize)]
pub enum EntryRef<'a, 'b> {
    Records(&'b [Record<'a>]),
}

/// A payload encoded and summed, waiting for its lsn: the expensive part of framing,
/// done before taking the journal's lock.
#[derive(Debug, Default)]
pub struct Encoded {
    payload: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl Encoded {
    pub fn new(entry: &impl Serialize) -> Result<Self, postcard::Error> {
        let mut e = Encoded::default();
        e.set(entry)?;
        Ok(e)
    }

    /// Re-encodes into the same buffer (no allocation once it is large enough).
    pub fn set(&mut self, entry: &impl Serialize) -> Result<(), postcard::Error> {
        self.payload.clear();
        self.payload = postcard::to_extend(entry, std::mem::take(&mut self.payload))?;
        self.crc = crc32fast::Hasher::new();
        self.crc.update(&self.payload);
        Ok(())
    }

    /// Appends the frame with `lsn` to `out`.
    pub fn frame(&self, lsn: u64, out: &mut Vec<u8>) {
        let mut crc = self.crc.clone();
        let lsn = lsn.to_le_bytes();
        crc.update(&lsn);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&lsn);
        out.extend_from_slice(&self.payload);
    }

    pub fn frame_len(&self) -> usize {
        FRAME_HEADER + self.payload.len()
    }
}

/// Appends one frame holding `entry` to `out`.
pub fn encode(out: &mut Vec<u8>, lsn: u64, entry: &Entry<'_>) -> Result<(), postcard::Error> {
    Encoded::new(entry)?.frame(lsn, out);
    Ok(())
}

/// One frame read back.
#[derive(Debug)]
pub struct Frame<'a> {
    pub lsn: u64,
    pub entry: Entry<'a>,
    /// Offset just past the frame.
    pub end: usize,
}

/// What reading a file found besides its frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    /// Damaged regions skipped (each is at least one lost record).
    pub regions: u64,
    /// Bytes skipped.
    pub bytes: u64,
    /// The file ended inside a frame (a torn write).
    pub torn_tail: bool,
    /// Records known lost, where the file says how many it holds (a checkpoint's end
    /// frame); 0 where only the damaged regions are known.
    pub records: u64,
}

impl Damage {
    pub fn is_clean(&self) -> bool {
        self.regions == 0 && !self.torn_tail && self.records == 0
    }

    /// Records lost: as many as the file says are missing, else at least one per
    /// damaged region and one for a torn tail.
    pub fn lost_records(&self) -> u64 {
        self.records.max(self.regions + u64::from(self.torn_tail))
    }
}

/// Reads every valid frame of `buf`, skipping damage.
pub fn decode_all(buf: &[u8]) -> (Vec<Frame<'_>>, Damage) {
    let mut frames = Vec::new();
    let mut damage = Damage::default();
    let mut at = 0;
    while at < buf.len() {
        match decode_at(buf, at) {
            Ok(f) => {
                at = f.end;
                frames.push(f);
            }
            Err(Incomplete) => {
                // Either a torn last frame, or damage whose next frame never comes.
                match next_frame(buf, at + 1) {
                    Some(next) => {
                        damage.regions += 1;
                        damage.bytes += (next - at) as u64;
                        at = next;
                    }
                    None => {
                        if looks_like_torn_tail(buf, at) {
                            damage.torn_tail = true;
                        } else {
                            damage.regions += 1;
                        }
                        damage.bytes += (buf.len() - at) as u64;
                        break;
                    }
                }
            }
        }
    }
    (frames, damage)
}

#[derive(Debug)]
struct Incomplete;

fn decode_at(buf: &[u8], at: usize) -> Result<Frame<'_>, Incomplete> {
    let head = buf.get(at..at + FRAME_HEADER).ok_or(Incomplete)?;
    if head[..4] != MAGIC {
        return Err(Incomplete);
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if len > MAX_PAYLOAD {
        return Err(Incomplete);
    }
    let payload = buf
        .get(at + FRAME_HEADER..at + FRAME_HEADER + len)
        .ok_or(Incomplete)?;
    let mut lsn = [0; 8];
    lsn.copy_from_slice(&head[12..20]);
    let mut sum = crc32fast::Hasher::new();
    sum.update(payload);
    sum.update(&lsn);
    if sum.finalize() != crc {
        return Err(Incomplete);
    }
    let entry: Entry<'_> = postcard::from_bytes(payload).map_err(|_| Incomplete)?;
    Ok(Frame {
        lsn: u64::from_le_bytes(lsn),
        entry,
        end: at + FRAME_HEADER + len,
    })
}

/// The next offset from `from` where a valid frame starts.
fn next_frame(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + FRAME_HEADER <= buf.len() {
        let rel = buf[at..].windows(4).position(|w| w == MAGIC)?;
        at += rel;
        if decode_at(buf, at).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// A frame header whose declared length runs past the end of the file: what a write
/// cut short leaves.
fn looks_like_torn_tail(buf: &[u8], at: usize) -> bool {
    let rest = &buf[at..];
    if rest.len() < FRAME_HEADER {
        return MAGIC.starts_with(&rest[..rest.len().min(4)]);
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    rest[..4] == MAGIC && len <= MAX_PAYLOAD && FRAME_HEADER + len > rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consume(n: u64) -> Entry<'static> {
        Entry::Records(vec![Record::Consume {
            customer: "acme",
            feature: "api.calls",
            window_start: 0,
            window_end: 10,
            amount: n,
            overage: 0,
            time: 5,
            snapshot: "abc",
        }])
    }

    fn file(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 1..=n {
            encode(&mut out, i, &consume(i)).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        let buf = file(3);
        let (frames, damage) = decode_all(&buf);
        assert!(damage.is_clean());
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2].lsn, 3);
        assert_eq!(frames[1].entry, consume(2));
    }

    #[test]
    fn a_torn_tail_loses_only_the_partial_frame() {
        let buf = file(5);
        let (whole, _) = decode_all(&buf);
        for cut in whole[3].end + 1..buf.len() {
            let (frames, damage) = decode_all(&buf[..cut]);
            assert_eq!(frames.len(), 4, "cut at {cut}");
            assert!(damage.torn_tail, "cut at {cut}: {damage:?}");
            assert_eq!(damage.regions, 0);
        }
    }

    #[test]
    fn a_flipped_byte_loses_one_frame_and_reading_resumes() {
        let buf = file(5);
        let (whole, _) = decode_all(&buf);
        for at in whole[1].end..whole[2].end {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            let (frames, damage) = decode_all(&bad);
            let lsns: Vec<u64> = frames.iter().map(|f| f.lsn).collect();
            assert_eq!(lsns, [1, 2, 4, 5], "flip at {at}");
            assert_eq!(damage.regions, 1);
        }
    }

    #[test]
    fn garbage_is_damage_not_a_panic() {
        let (frames, damage) = decode_all(&[0xE7, 0x1D, 0xA7, 0x5E, 0xff, 0xff, 0xff, 0xff]);
        assert!(frames.is_empty());
        assert!(!damage.is_clean());
        let (frames, damage) = decode_all(b"not a journal at all, just text");
        assert!(frames.is_empty());
        assert_eq!(damage.regions, 1);
    }
}
