//! The Lua scripts the Redis store runs, each one atomic step on the server. The
//! scripts are files beside this one (`scripts/*.lua`), built into the binary.
//!
//! Each script's keys and arguments are documented here, where the Rust side that
//! passes them can see them.

use crate::policy::Limit;

/// Prepended to the scripts that take an idempotency key: the answer remembered
/// under `key` for the fingerprint `fp` (`replay`), `reused` for another request's
/// key, or nil for a key not seen (or no key at all).
pub(super) const REMEMBERED: &str = include_str!("scripts/remembered.lua");

/// Quota check-and-count, and reservations. KEYS: counter, holds, idempotency key,
/// reservation key, operation key. ARGV: amount, limit (-1: unlimited), overage, mode (k check,
/// c consume, r reserve), now µs, window end µs, key expiry (unix ms), idempotency
/// fingerprint ('' for none), idempotency ttl ms, reservation id, hold expiry µs,
/// customer, feature, window start µs, operation ttl ms.
pub(super) const QUOTA: &str = include_str!("scripts/quota.lua");

/// Commit or release. KEYS: reservation key, counter, holds, idempotency key. ARGV:
/// reservation id, action (c/r), amount, now µs, fingerprint, idempotency ttl ms.
/// Answer: found committed released overage denied used.
pub(super) const SETTLE: &str = include_str!("scripts/settle.lua");

/// Seats. KEYS: pool, idempotency key. ARGV: action (k/a/r), holder ('' none),
/// limit (-1 unlimited), fingerprint, idempotency ttl ms. Answer: admitted used
/// unchanged.
pub(super) const SEAT: &str = include_str!("scripts/seat.lua");

/// GCRA. KEYS: the limiter's theoretical arrival time (µs). ARGV: now µs, cost µs,
/// tau µs, consume (1/0). Answer: admitted tat-before.
pub(super) const RATE: &str = include_str!("scripts/rate.lua");

/// Adds a chunk of units once per operation id. KEYS: counter, operation key. ARGV:
/// units, window end µs, key expiry (unix ms), operation ttl ms. Answers the total.
pub(super) const APPLY: &str = include_str!("scripts/apply.lua");

/// Cached mode's flush: many windows in one call, once per operation id. KEYS: the
/// operation key, then counters. ARGV: operation ttl ms, then per counter: units,
/// window end µs, key expiry (unix ms). Answers each counter's total.
pub(super) const APPLY_MANY: &str = include_str!("scripts/apply_many.lua");

/// Lua numbers are doubles: limits and amounts past 2^53 are treated as unlimited.
const LUA_EXACT: u64 = 1 << 53;

pub(super) fn lua_limit(l: Limit) -> i64 {
    match l {
        Limit::Finite(n) if n < LUA_EXACT => n as i64,
        _ => -1,
    }
}
