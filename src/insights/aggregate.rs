//! The aggregation itself, pure (no thread, no clock, no files but `save`/`load`):
//! per day, per (feature, plan), a sketch of the customers who were allowed it and of
//! those denied by a limit, the limit denials, and denials by reason; per customer,
//! the last [`RECENT_PER_CUSTOMER`] denials for the most recently denied
//! [`RECENT_CUSTOMERS`] customers.
//!
//! Bounded whatever the number of customers: [`RETAIN_DAYS`] days of at most
//! [`CELLS_PER_DAY`] cells of two 1 KiB sketches (at most ~94 MiB, a few MiB for a
//! catalog of tens of features and plans), at most [`NAMES`] feature and plan names,
//! and [`RECENT_CUSTOMERS`] × [`RECENT_PER_CUSTOMER`] recent denials.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hll::{Hll, customer_hash};
use crate::engine::Reason;
use crate::time::{DAY, Timestamp};

/// Days kept (the oldest are dropped as new ones begin).
pub const RETAIN_DAYS: i64 = 92;
/// (feature, plan) cells per day at most; decisions beyond are counted by reason only.
pub const CELLS_PER_DAY: usize = 512;
/// Distinct feature names and plan names kept at most.
pub const NAMES: usize = 4096;
/// Customers whose recent denials are kept (the least recently denied is forgotten).
pub const RECENT_CUSTOMERS: usize = 10_000;
/// Denials kept per customer.
pub const RECENT_PER_CUSTOMER: usize = 20;

/// One decision, as the aggregation takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Timestamp,
    pub customer: Box<str>,
    pub feature: Box<str>,
    /// The plan whose grant decided, if a plan did.
    pub plan: Option<Box<str>>,
    pub reason: Reason,
}

/// Denials that mean "the customer hit a limit": upsell signals.
pub fn is_limit(r: Reason) -> bool {
    matches!(
        r,
        Reason::QuotaExhausted
            | Reason::RateLimited
            | Reason::ExceedsBurst
            | Reason::SeatsExhausted
    )
}

fn reason_index(r: Reason) -> usize {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cell {
    /// Customers allowed the feature (through this plan) that day.
    using: Hll,
    /// Customers denied it by a limit that day.
    limited: Hll,
    limit_denials: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Day {
    /// Keyed by (feature name index, plan name index + 1; 0: no plan).
    cells: HashMap<(u16, u16), Cell>,
    /// Denials by reason (index in `Reason::ALL`).
    denials: Vec<u64>,
}

/// One recent denial of a customer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Recent {
    at: i64,
    feature: u16,
    reason: u8,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RecentOf {
    /// Newest last.
    list: VecDeque<Recent>,
    /// When the last one was added, to forget the least recently denied customer.
    seq: u64,
}

/// The aggregation. See the module docs for its bounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Aggregate {
    features: Vec<Box<str>>,
    plans: Vec<Box<str>>,
    #[serde(skip)]
    feature_ix: HashMap<Box<str>, u16>,
    #[serde(skip)]
    plan_ix: HashMap<Box<str>, u16>,
    /// Day number (days since 1970-01-01, UTC) → that day.
    days: BTreeMap<i64, Day>,
    recent: HashMap<Box<str>, RecentOf>,
    /// Customers of `recent` in the order they were last denied (an entry whose `seq`
    /// is not the customer's any more is stale and skipped): the least recently
    /// denied is found without a scan. Rebuilt from `recent` after a load.
    #[serde(skip)]
    order: VecDeque<(u64, Box<str>)>,
    seq: u64,
}

/// A (feature, plan) row of the report: limit denials, customers denied by a limit,
/// customers allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub limit_denials: u64,
    pub customers_limited: u64,
    pub customers_using: u64,
}

/// One recent denial, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentDenial {
    pub at: Timestamp,
    pub feature: String,
    pub reason: &'static str,
}

fn intern(names: &mut Vec<Box<str>>, ix: &mut HashMap<Box<str>, u16>, name: &str) -> Option<u16> {
    if let Some(&i) = ix.get(name) {
        return Some(i);
    }
    if names.len() >= NAMES {
        return None;
    }
    let i = names.len() as u16;
    names.push(name.into());
    ix.insert(name.into(), i);
    Some(i)
}

impl Aggregate {
    /// Takes one decision in.
    pub fn add(&mut self, e: &Event) {
        let day = e.at.0.div_euclid(DAY);
        self.retire(day);
        let d = self.days.entry(day).or_default();
        if e.reason != Reason::Granted {
            if d.denials.len() < Reason::ALL.len() {
                d.denials.resize(Reason::ALL.len(), 0);
            }
            if let Some(n) = d.denials.get_mut(reason_index(e.reason)) {
                *n += 1;
            }
        }
        // A name the request made up is not kept: only the reason is counted.
        if matches!(e.reason, Reason::UnknownCustomer | Reason::UnknownFeature) {
            return;
        }
        let Some(f) = intern(&mut self.features, &mut self.feature_ix, &e.feature) else {
            return;
        };
        let plan = match &e.plan {
            None => Some(0),
            Some(p) => intern(&mut self.plans, &mut self.plan_ix, p).map(|i| i + 1),
        };
        if e.reason != Reason::Granted {
            self.remember_denial(e, f);
        }
        let Some(plan) = plan else { return };
        let Some(d) = self.days.get_mut(&day) else {
            return;
        };
        if !d.cells.contains_key(&(f, plan)) && d.cells.len() >= CELLS_PER_DAY {
            return;
        }
        let cell = d.cells.entry((f, plan)).or_default();
        let h = customer_hash(&e.customer);
        if e.reason == Reason::Granted {
            cell.using.add(h);
        } else if is_limit(e.reason) {
            cell.limit_denials += 1;
            cell.limited.add(h);
        }
    }

    /// Drops the days older than [`RETAIN_DAYS`] before `today`.
    fn retire(&mut self, today: i64) {
        while let Some((&first, _)) = self.days.first_key_value() {
            if first > today - RETAIN_DAYS {
                break;
            }
            self.days.pop_first();
        }
    }

    fn remember_denial(&mut self, e: &Event, feature: u16) {
        self.seq += 1;
        while !self.recent.contains_key(&*e.customer) && self.recent.len() >= RECENT_CUSTOMERS {
            // The least recently denied customer is forgotten.
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.recent.get(&id).is_some_and(|r| r.seq == seq) {
                self.recent.remove(&id);
            }
        }
        let r = self.recent.entry(e.customer.clone()).or_default();
        r.seq = self.seq;
        r.list.push_back(Recent {
            at: e.at.0,
            feature,
            reason: reason_index(e.reason) as u8,
        });
        while r.list.len() > RECENT_PER_CUSTOMER {
            r.list.pop_front();
        }
        self.order.push_back((self.seq, e.customer.clone()));
        if self.order.len() > 4 * RECENT_CUSTOMERS.max(self.recent.len()) {
            self.rebuild_order();
        }
    }

    /// `order` without stale entries, from `recent`.
    fn rebuild_order(&mut self) {
        let mut v: Vec<(u64, Box<str>)> = self
            .recent
            .iter()
            .map(|(k, r)| (r.seq, k.clone()))
            .collect();
        v.sort_unstable();
        self.order = v.into();
    }

    /// The first day kept, if any.
    pub fn first_day(&self) -> Option<Timestamp> {
        self.days.keys().next().map(|d| Timestamp(d * DAY))
    }

    /// Per (feature, plan), summed over the days from the one holding `since` (all
    /// kept days without it).
    pub fn totals(&self, since: Option<Timestamp>) -> BTreeMap<(String, Option<String>), Totals> {
        let from = since.map_or(i64::MIN, |t| t.0.div_euclid(DAY));
        let mut merged: HashMap<(u16, u16), (u64, Hll, Hll)> = HashMap::new();
        for (_, d) in self.days.range(from..) {
            for (k, c) in &d.cells {
                let m = merged.entry(*k).or_default();
                m.0 += c.limit_denials;
                m.1.merge(&c.limited);
                m.2.merge(&c.using);
            }
        }
        let mut out = BTreeMap::new();
        for ((f, p), (denials, limited, using)) in merged {
            let Some(feature) = self.features.get(usize::from(f)) else {
                continue;
            };
            let plan = match p {
                0 => None,
                p => self.plans.get(usize::from(p - 1)).map(|s| s.to_string()),
            };
            out.insert(
                (feature.to_string(), plan),
                Totals {
                    limit_denials: denials,
                    customers_limited: limited.count(),
                    customers_using: using.count(),
                },
            );
        }
        out
    }

    /// Denials by reason over the days from the one holding `since`.
    pub fn denials(&self, since: Option<Timestamp>) -> Vec<(&'static str, u64)> {
        let from = since.map_or(i64::MIN, |t| t.0.div_euclid(DAY));
        let mut by = [0u64; Reason::ALL.len()];
        for (_, d) in self.days.range(from..) {
            for (n, c) in by.iter_mut().zip(&d.denials) {
                *n += c;
            }
        }
        Reason::ALL
            .iter()
            .zip(by)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str(), n))
            .collect()
    }

    /// A customer's recent denials, newest first.
    pub fn recent(&self, customer: &str) -> Vec<RecentDenial> {
        let Some(r) = self.recent.get(customer) else {
            return Vec::new();
        };
        r.list
            .iter()
            .rev()
            .map(|x| RecentDenial {
                at: Timestamp(x.at),
                feature: self
                    .features
                    .get(usize::from(x.feature))
                    .map_or_else(String::new, |f| f.to_string()),
                reason: Reason::ALL
                    .get(usize::from(x.reason))
                    .map_or("", |r| r.as_str()),
            })
            .collect()
    }

    /// Writes the aggregation to `path` (a temporary file synced, then renamed over it).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::io::Write as _;
        let bytes = postcard::to_stdvec(self).map_err(io::Error::other)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(FORMAT)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads what [`Aggregate::save`] wrote; `Ok(None)` if there is no file.
    pub fn load(path: &Path) -> io::Result<Option<Aggregate>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = bytes.strip_prefix(FORMAT).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a usage aggregation file", path.display()),
            )
        })?;
        let mut a: Aggregate = postcard::from_bytes(body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        a.feature_ix = a
            .features
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u16))
            .collect();
        a.plan_ix = a
            .plans
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u16))
            .collect();
        a.rebuild_order();
        Ok(Some(a))
    }
}

/// The first bytes of the file: what it is and its format's version.
const FORMAT: &[u8] = b"entitled-usage-aggregate-1\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(day: i64, customer: &str, feature: &str, plan: Option<&str>, reason: Reason) -> Event {
        Event {
            at: Timestamp(day * DAY + 3_600_000_000),
            customer: customer.into(),
            feature: feature.into(),
            plan: plan.map(Into::into),
            reason,
        }
    }

    #[test]
    fn totals_by_feature_and_plan_since_a_day() {
        let mut a = Aggregate::default();
        let day = 20_000;
        a.add(&ev(day, "a", "api", Some("pro"), Reason::Granted));
        a.add(&ev(day, "a", "api", Some("pro"), Reason::QuotaExhausted));
        a.add(&ev(
            day + 1,
            "a",
            "api",
            Some("pro"),
            Reason::QuotaExhausted,
        ));
        a.add(&ev(
            day + 1,
            "b",
            "api",
            Some("pro"),
            Reason::QuotaExhausted,
        ));
        a.add(&ev(day + 1, "b", "sso", None, Reason::Granted));
        a.add(&ev(day + 1, "x", "nope", None, Reason::UnknownFeature));
        let all = a.totals(None);
        let api = &all[&("api".to_string(), Some("pro".to_string()))];
        assert_eq!(
            *api,
            Totals {
                limit_denials: 3,
                customers_limited: 2,
                customers_using: 1
            }
        );
        assert!(
            !all.contains_key(&("nope".to_string(), None)),
            "made-up names are not kept"
        );
        let later = a.totals(Some(Timestamp((day + 1) * DAY)));
        assert_eq!(
            later[&("api".to_string(), Some("pro".to_string()))].limit_denials,
            2
        );
        assert_eq!(
            later[&("api".to_string(), Some("pro".to_string()))].customers_using,
            0
        );
        assert_eq!(
            a.denials(None),
            vec![("quota_exhausted", 3), ("unknown_feature", 1)]
        );
        let r = a.recent("a");
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].at,
            Timestamp((day + 1) * DAY + 3_600_000_000),
            "newest first"
        );
    }

    #[test]
    fn old_days_are_dropped_and_recent_denials_are_bounded() {
        let mut a = Aggregate::default();
        for day in 0..200 {
            a.add(&ev(day, "a", "api", None, Reason::QuotaExhausted));
        }
        assert_eq!(a.days.len(), RETAIN_DAYS as usize);
        assert_eq!(a.recent("a").len(), RECENT_PER_CUSTOMER);
        assert_eq!(a.first_day(), Some(Timestamp((200 - RETAIN_DAYS) * DAY)));
        for i in 0..RECENT_CUSTOMERS + 5 {
            a.add(&ev(
                300,
                &format!("c{i}"),
                "api",
                None,
                Reason::QuotaExhausted,
            ));
        }
        a.add(&ev(300, "c5", "api", None, Reason::QuotaExhausted));
        a.add(&ev(300, "new", "api", None, Reason::QuotaExhausted));
        assert_eq!(a.recent.len(), RECENT_CUSTOMERS);
        assert!(a.recent("c5").len() == 2, "denied again: kept");
        assert!(
            a.recent("c6").is_empty(),
            "the least recently denied is forgotten"
        );
        assert_eq!(a.recent("new").len(), 1);
        assert!(a.order.len() <= 4 * RECENT_CUSTOMERS + 1);
    }

    #[test]
    fn saved_and_loaded_it_answers_the_same() {
        let mut a = Aggregate::default();
        a.add(&ev(5, "a", "api", Some("pro"), Reason::RateLimited));
        a.add(&ev(5, "b", "api", Some("pro"), Reason::Granted));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.bin");
        a.save(&path).unwrap();
        let mut b = Aggregate::load(&path).unwrap().unwrap();
        assert_eq!(a.totals(None), b.totals(None));
        assert_eq!(a.recent("a"), b.recent("a"));
        b.add(&ev(5, "c", "api", Some("pro"), Reason::Granted));
        assert_eq!(b.features.len(), 1, "names are found again after a load");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Aggregate::load(&path).is_err());
    }
}
