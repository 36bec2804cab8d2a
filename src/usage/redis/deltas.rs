//! Units counted in this replica and not yet in Redis: what the `local` fallback
//! counted while Redis was unusable, and cached mode's counts between flushes.

/// A window's units counted here and not yet in Redis.
///
/// Units go to Redis in chunks, each with an operation id that Redis remembers for
/// [`OP_TTL_MS`]: a chunk sent twice (a flush that timed out after Redis ran it, and
/// its retry) counts once, and a consume that timed out and was counted here carries
/// the id its original call had, so whichever of the two reaches Redis second does
/// nothing.
#[derive(Debug, Clone, Default)]
pub(super) struct Delta {
    pub(super) window_end: i64,
    /// Units counted since the last flush, not in a chunk yet.
    pub(super) open: u64,
    /// Chunks waiting for Redis: (operation id, units).
    pub(super) chunks: Vec<(u64, u64)>,
    /// Cached mode: the shared total this replica last saw.
    pub(super) known: u64,
    /// `known` came from Redis (a flush answered); before that it is this replica's
    /// view before its first delta.
    pub(super) seen: bool,
    /// The window's key in Redis, built once.
    pub(super) key: Box<str>,
}

/// How long Redis remembers an operation id: far longer than a call can sit in a
/// socket before Redis runs it (every late execution happens as Redis resumes).
pub(super) const OP_TTL_MS: i64 = 60_000;

/// Most chunks kept per window; beyond, units join the open chunk.
pub(super) const MAX_CHUNKS: usize = 10_000;

/// Windows per cached-mode flush call.
pub(super) const FLUSH_CALL: usize = 1_000;

/// A cached-mode flush on its way: its id and, per window, the units it adds.
#[derive(Debug)]
pub(super) struct Inflight {
    pub(super) id: u64,
    /// (window, its key, window end, units)
    pub(super) windows: Vec<(DeltaKey, Box<str>, i64, u64)>,
}

pub(super) fn op_id() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

pub(super) type DeltaKey = (Box<str>, Box<str>, i64);

/// Keys outlive their window by a day, for late commits and reads; the reset time
/// itself is stored in the key, not inferred from its expiry.
pub(super) fn expire_at_ms(window_end_us: i64) -> i64 {
    (window_end_us / 1_000).saturating_add(86_400_000)
}
