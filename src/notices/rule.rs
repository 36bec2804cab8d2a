//! The threshold rule (which notice is due for an item, and which thresholds to
//! remember as done) and the notice id that makes every notice identifiable across
//! reloads, restarts and replicas. Pure: no files, no clock.

use crate::time::Timestamp;

/// What one scan does for one item: the notice to emit, if any, and every threshold
/// to remember as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub emit: Option<i64>,
    pub mark: Vec<i64>,
}

/// The threshold rule. `left` is the time from now to the end (µs); `thresholds` are
/// widest first; `sent(t)` says whether the notice of threshold `t` was already made.
///
/// Every threshold with `left <= t` has been crossed. Only the tightest crossed one is
/// emitted (an item first seen 20 days before its end gets the 30-day notice, not
/// three at once), and only if it was not emitted before; every crossed threshold is
/// remembered, so a wider one is never emitted late. An item at or past its end gets
/// nothing.
pub fn due(left: i64, thresholds: &[i64], sent: impl Fn(i64) -> bool) -> Due {
    let mut mark = Vec::new();
    let mut tightest = None;
    if left > 0 {
        for &t in thresholds.iter().filter(|&&t| left <= t) {
            tightest = Some(tightest.map_or(t, |m: i64| m.min(t)));
            if !sent(t) {
                mark.push(t);
            }
        }
    }
    let emit = tightest.filter(|t| mark.contains(t));
    Due { emit, mark }
}

/// What identifies an item across reloads: the record, not its place in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemKey<'a> {
    pub customer: &'a str,
    pub kind: &'a str,
    /// The plan of a subscription, the feature of a grant or override.
    pub name: &'a str,
    pub ends: Timestamp,
}

/// A notice's id: 32 hex digits of BLAKE3 over the item and the threshold (each part
/// length-prefixed, so no id can be forged from a neighbour's parts).
pub fn notice_id(item: &ItemKey<'_>, threshold: i64) -> String {
    let mut h = blake3::Hasher::new();
    for part in [item.customer, item.kind, item.name] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&item.ends.0.to_le_bytes());
    h.update(&threshold.to_le_bytes());
    let hash = h.finalize();
    let mut s = String::with_capacity(32);
    for b in &hash.as_bytes()[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
