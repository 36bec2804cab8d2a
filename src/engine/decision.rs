//! Decisions: what the engine answers, as data. A decision always says `allowed` and
//! why; it borrows names from the snapshot it was made on, so building one allocates
//! nothing on the granted path.

use serde::Serialize;

use crate::policy::{Kind, Limit, NotifyAt, Override, ValueRepr};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Granted,
    NotEntitled,
    Expired,
    NotYetActive,
    OutOfScope,
    QuotaExhausted,
    RateLimited,
    /// More at once than the rate limit's burst: it can never pass.
    ExceedsBurst,
    SeatsExhausted,
    UnknownCustomer,
    UnknownFeature,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Granted,
        Reason::NotEntitled,
        Reason::Expired,
        Reason::NotYetActive,
        Reason::OutOfScope,
        Reason::QuotaExhausted,
        Reason::RateLimited,
        Reason::ExceedsBurst,
        Reason::SeatsExhausted,
        Reason::UnknownCustomer,
        Reason::UnknownFeature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::NotEntitled => "not_entitled",
            Reason::Expired => "expired",
            Reason::NotYetActive => "not_yet_active",
            Reason::OutOfScope => "out_of_scope",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::RateLimited => "rate_limited",
            Reason::ExceedsBurst => "exceeds_burst",
            Reason::SeatsExhausted => "seats_exhausted",
            Reason::UnknownCustomer => "unknown_customer",
            Reason::UnknownFeature => "unknown_feature",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    Subscription,
    Grant,
    Override,
}

/// Where the winning grant came from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub kind: SourceType,
    pub plan: Option<&'a str>,
    /// The include chain: the plan first, then each included group down to the one
    /// that wrote the grant.
    pub via: Option<&'a [Box<str>]>,
    pub priority: Option<i32>,
    /// The override, with its approval fields.
    pub approval: Option<&'a Override>,
    /// With `combine: sum`, how many grants were added up.
    pub combined: Option<u32>,
}

impl Serialize for Source<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", &self.kind)?;
        if let Some(p) = self.plan {
            m.serialize_entry("plan", p)?;
        }
        if let Some(v) = self.via {
            m.serialize_entry("via", v)?;
        }
        if let Some(p) = self.priority {
            m.serialize_entry("priority", &p)?;
        }
        if let Some(o) = self.approval {
            m.serialize_entry("approved_by", &*o.approved_by)?;
            m.serialize_entry("reason", &*o.reason)?;
            if let Some(t) = &o.ticket {
                m.serialize_entry("ticket", &**t)?;
            }
        }
        if let Some(n) = self.combined {
            m.serialize_entry("combined", &n)?;
        }
        m.end()
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Finite(n) => s.serialize_u64(*n),
            Limit::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

/// The settlement of a reservation, carried by the answers to its commit and release
/// after `reservation`: every other field is a decision's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// `commit` or `release`.
    pub operation: &'static str,
    /// Units counted.
    pub committed: u64,
    /// Units of the hold given back to the quota.
    pub released: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision<'a> {
    pub allowed: bool,
    pub reason: Reason,
    pub feature: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a ValueRepr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// A rate limit's burst: what may pass at once (`remaining` counts against it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Timestamp>,
    /// Units counted beyond the limit by this consume (`overage: allow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overage: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
    /// The hold taken by a reserve.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_reservation"
    )]
    pub reservation: Option<u128>,
    /// What a commit or release of the reservation did.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<Settlement>,
    /// Seconds until the request would pass (rate limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source<'a>>,
    pub expires_at: Option<Timestamp>,
    pub in_grace: bool,
    pub trial: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upgrade: Vec<&'a str>,
    pub snapshot: &'a str,
    /// The answer was remembered under the request's idempotency key: the first
    /// request's answer, repeated; nothing was counted again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub idempotent_replay: bool,
    /// This consume crossed `warn_at` (count it once as an upsell signal).
    #[serde(skip)]
    pub warning_crossed: bool,
    /// The usage-notice thresholds this consume or reserve reached (rare: set only
    /// when one was).
    #[serde(skip)]
    pub crossed: Option<Crossed>,
}

/// Usage-notice thresholds a quota step reached: which of the quota's `notify_at`,
/// and the window they were reached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossed {
    pub notify: NotifyAt,
    /// Bit `i` set: `notify.basis_points()[i]` was reached by this step.
    pub mask: u8,
    pub limit: u64,
    /// Usage after the step.
    pub used: u64,
    pub window_start: i64,
    pub window_end: i64,
}

impl Crossed {
    /// The thresholds reached, in basis points, lowest first.
    pub fn thresholds(&self) -> impl Iterator<Item = u16> + '_ {
        self.notify
            .basis_points()
            .iter()
            .enumerate()
            .filter(|(i, _)| self.mask & (1 << i) != 0)
            .map(|(_, &bp)| bp)
    }
}

impl<'a> Decision<'a> {
    /// A decision not made yet: denied until [`crate::engine::evaluate`] says otherwise.
    pub fn blank(feature: &'a str) -> Self {
        Self::new(false, Reason::NotEntitled, feature, "")
    }

    pub fn new(allowed: bool, reason: Reason, feature: &'a str, snapshot: &'a str) -> Self {
        Decision {
            allowed,
            reason,
            feature,
            kind: None,
            value: None,
            limit: None,
            burst: None,
            used: None,
            remaining: None,
            resets_at: None,
            overage: None,
            warning: None,
            reservation: None,
            settlement: None,
            retry_after: None,
            source: None,
            expires_at: None,
            in_grace: false,
            trial: false,
            upgrade: Vec::new(),
            snapshot,
            idempotent_replay: false,
            warning_crossed: false,
            crossed: None,
        }
    }

    pub fn deny(&mut self, reason: Reason) {
        self.allowed = false;
        self.reason = reason;
    }
}

fn serialize_reservation<S: serde::Serializer>(id: &Option<u128>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&crate::ids::reservation_name(*id)),
        None => s.serialize_none(),
    }
}

/// Appends `s` as a JSON string. Names from policies and requests almost never need
/// escaping, so the common case is one scan and one copy.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Appends `n` as a JSON number.
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a limit: its number, or `"unlimited"`.
pub fn write_limit(out: &mut Vec<u8>, l: Limit) {
    match l {
        Limit::Finite(n) => write_u64(out, n),
        Limit::Unlimited => out.extend_from_slice(b"\"unlimited\""),
    }
}

/// RFC 3339 in UTC, whole seconds without a fraction (as `Timestamp`'s `Display`),
/// without going through a formatter.
pub fn write_time(out: &mut Vec<u8>, t: Timestamp) {
    let Some(ts) = t.to_jiff() else {
        let _ = serde_json::to_writer(&mut *out, &t.to_string());
        return;
    };
    let dt = jiff::tz::Offset::UTC.to_datetime(ts);
    let two = |out: &mut Vec<u8>, v: i8| {
        out.push(b'0' + (v / 10) as u8);
        out.push(b'0' + (v % 10) as u8);
    };
    let year = dt.year();
    if !(0..=9999).contains(&year) {
        let _ = serde_json::to_writer(&mut *out, &t.to_string());
        return;
    }
    out.push(b'"');
    let y = year as u16;
    out.extend_from_slice(&[
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
    ]);
    out.push(b'-');
    two(out, dt.month());
    out.push(b'-');
    two(out, dt.day());
    out.push(b'T');
    two(out, dt.hour());
    out.push(b':');
    two(out, dt.minute());
    out.push(b':');
    two(out, dt.second());
    let us = dt.subsec_nanosecond() / 1_000;
    if us != 0 {
        // jiff prints the shortest fraction that is exact; match it.
        let mut frac = format!("{:06}", us);
        while frac.ends_with('0') {
            frac.pop();
        }
        out.push(b'.');
        out.extend_from_slice(frac.as_bytes());
    }
    out.extend_from_slice(b"Z\"");
}

impl Decision<'_> {
    /// The decision as JSON, appended to `out`: the same document as its `Serialize`
    /// implementation, written directly. Serialization through serde was a quarter of
    /// the server's time on batches (every field name escaped, every option matched
    /// twice); this is the request path's encoder, and a test keeps the two equal.
    ///
    /// One function for the whole document, field after field in the order of the
    /// `Serialize` output: split, it would only scatter one sequence of writes and make
    /// the comparison with the serde form harder to read.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self.allowed {
            b"{\"allowed\":true,\"reason\":\""
        } else {
            b"{\"allowed\":false,\"reason\":\""
        });
        out.extend_from_slice(self.reason.as_str().as_bytes());
        out.extend_from_slice(b"\",\"feature\":");
        write_str(out, self.feature);
        if let Some(k) = self.kind {
            out.extend_from_slice(b",\"kind\":\"");
            out.extend_from_slice(k.as_str().as_bytes());
            out.push(b'"');
        }
        if let Some(v) = self.value {
            out.extend_from_slice(b",\"value\":");
            match v {
                ValueRepr::Str(s) => write_str(out, s),
                ValueRepr::Int(n) => {
                    out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes())
                }
                ValueRepr::Float(_) => {
                    let _ = serde_json::to_writer(&mut *out, v);
                }
                ValueRepr::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            }
        }
        if let Some(l) = self.limit {
            out.extend_from_slice(b",\"limit\":");
            write_limit(out, l);
        }
        if let Some(b) = self.burst {
            out.extend_from_slice(b",\"burst\":");
            write_u64(out, b);
        }
        if let Some(u) = self.used {
            out.extend_from_slice(b",\"used\":");
            write_u64(out, u);
        }
        if let Some(r) = self.remaining {
            out.extend_from_slice(b",\"remaining\":");
            write_limit(out, r);
        }
        if let Some(t) = self.resets_at {
            out.extend_from_slice(b",\"resets_at\":");
            write_time(out, t);
        }
        if let Some(o) = self.overage {
            out.extend_from_slice(b",\"overage\":");
            write_u64(out, o);
        }
        if let Some(w) = self.warning {
            out.extend_from_slice(b",\"warning\":");
            write_str(out, w);
        }
        if let Some(id) = self.reservation {
            out.extend_from_slice(b",\"reservation\":");
            write_str(out, &crate::ids::reservation_name(id));
        }
        if let Some(st) = &self.settlement {
            out.extend_from_slice(b",\"operation\":");
            write_str(out, st.operation);
            out.extend_from_slice(b",\"committed\":");
            write_u64(out, st.committed);
            out.extend_from_slice(b",\"released\":");
            write_u64(out, st.released);
        }
        if let Some(r) = self.retry_after {
            out.extend_from_slice(b",\"retry_after\":");
            let _ = serde_json::to_writer(&mut *out, &r);
        }
        if let Some(s) = &self.source {
            out.extend_from_slice(b",\"source\":{\"type\":\"");
            out.extend_from_slice(match s.kind {
                SourceType::Subscription => b"subscription\"",
                SourceType::Grant => b"grant\"",
                SourceType::Override => b"override\"",
            });
            if let Some(p) = s.plan {
                out.extend_from_slice(b",\"plan\":");
                write_str(out, p);
            }
            if let Some(via) = s.via {
                out.extend_from_slice(b",\"via\":[");
                for (i, v) in via.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, v);
                }
                out.push(b']');
            }
            if let Some(p) = s.priority {
                out.extend_from_slice(b",\"priority\":");
                out.extend_from_slice(itoa::Buffer::new().format(p).as_bytes());
            }
            if let Some(o) = s.approval {
                out.extend_from_slice(b",\"approved_by\":");
                write_str(out, &o.approved_by);
                out.extend_from_slice(b",\"reason\":");
                write_str(out, &o.reason);
                if let Some(t) = &o.ticket {
                    out.extend_from_slice(b",\"ticket\":");
                    write_str(out, t);
                }
            }
            if let Some(n) = s.combined {
                out.extend_from_slice(b",\"combined\":");
                write_u64(out, n as u64);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b",\"expires_at\":");
        match self.expires_at {
            Some(t) => write_time(out, t),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(if self.in_grace {
            b",\"in_grace\":true"
        } else {
            b",\"in_grace\":false"
        });
        out.extend_from_slice(if self.trial {
            b",\"trial\":true"
        } else {
            b",\"trial\":false"
        });
        if !self.upgrade.is_empty() {
            out.extend_from_slice(b",\"upgrade\":[");
            for (i, p) in self.upgrade.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, p);
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"snapshot\":");
        write_str(out, self.snapshot);
        if self.idempotent_replay {
            out.extend_from_slice(b",\"idempotent_replay\":true");
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_time_encoding_matches_display() {
        for us in [
            0i64,
            1,
            10,
            120_000,
            123_456,
            500_000,
            999_999,
            1_796_116_088_969_372,
            -1,
            253_402_300_799_000_000,
        ] {
            let t = Timestamp(us);
            let mut out = Vec::new();
            write_time(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&t).unwrap(),
                "{us}"
            );
        }
    }
}
