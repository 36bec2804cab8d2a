//! Redis keys.
//!
//! Keys are `<prefix>:{<tag>}:<kind>:<len>:<customer>:<len>:<feature>[:<window>]`:
//! the tag is 16 hex digits of a BLAKE3 hash of the customer id, so one customer's
//! keys share a cluster slot whatever the id contains, and the length-prefixed parts
//! keep `a:b` + `c` and `a` + `b:c` apart. Nothing secret goes into a key.

use crate::engine::UsageKey;
use crate::ids::ReservationId;

/// Builds keys (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn tag(customer: &str) -> String {
        let h = blake3::hash(customer.as_bytes());
        let mut s = String::with_capacity(16);
        for b in &h.as_bytes()[..8] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub(super) fn base(&self, kind: &str, customer: &str, feature: &str) -> String {
        format!(
            "{}:{{{}}}:{kind}:{}:{customer}:{}:{feature}",
            self.prefix,
            Self::tag(customer),
            customer.len(),
            feature.len()
        )
    }

    pub(super) fn counter(&self, k: UsageKey<'_>, window_start: i64) -> String {
        format!("{}:{window_start}", self.base("q", k.customer, k.feature))
    }

    pub(super) fn idem(&self, customer: &str, key: &str) -> String {
        format!(
            "{}:{{{}}}:i:{}:{customer}:{}:{key}",
            self.prefix,
            Self::tag(customer),
            customer.len(),
            key.len()
        )
    }

    pub(super) fn op(&self, customer: &str, id: u64) -> String {
        format!("{}:{{{}}}:o:{id:016x}", self.prefix, Self::tag(customer))
    }

    /// A reservation id carries its customer's tag in its high 64 bits, so the
    /// reservation's key lands in the customer's slot.
    pub(super) fn reservation_id(customer: &str) -> ReservationId {
        let tag = u64::from_str_radix(&Self::tag(customer), 16).unwrap_or(0);
        let random = uuid::Uuid::new_v4().as_u128() as u64;
        ((tag as u128) << 64) | random as u128
    }

    pub(super) fn reservation(&self, id: ReservationId) -> String {
        format!("{}:{{{:016x}}}:r:{id:032x}", self.prefix, (id >> 64) as u64)
    }

    pub(super) fn reservation_idem(&self, id: ReservationId, key: &str) -> String {
        format!(
            "{}:{{{:016x}}}:i:r:{id:032x}:{}:{key}",
            self.prefix,
            (id >> 64) as u64,
            key.len()
        )
    }
}
