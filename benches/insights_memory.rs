//! Memory of the usage report's aggregation at 1M customers, at its bound.
//!
//! `cargo run --release --example insights_memory [customers]`
//!
//! Day 0: every customer is allowed one feature and denied by a limit once (8
//! features × 4 plans), so the recent-denials memory sees 1M customers and keeps its
//! bound. Each of the other 91 days kept: 300 distinct customers allowed and 300
//! denied by a limit in each (feature, plan) cell, so every sketch is past its exact
//! range (dense): more customers cannot make it larger. Prints jemalloc's live heap
//! (`stats.allocated`) of the aggregation, the add rate, and the size of the file it
//! is saved to.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "measurement tool")]

use std::time::Instant;

use entitled::engine::Reason;
use entitled::insights::{Aggregate, Event, RETAIN_DAYS};
use entitled::time::{DAY, Timestamp};
use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn allocated() -> usize {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap()
}

const FEATURES: [&str; 8] = [
    "api.calls",
    "exports",
    "sso",
    "seats",
    "analytics.advanced",
    "storage.gb",
    "webhooks",
    "audit.log",
];
const PLANS: [&str; 4] = ["free", "starter", "pro", "enterprise"];

fn event(day: i64, customer: &str, cell: usize, reason: Reason) -> Event {
    Event {
        at: Timestamp(day * DAY + 3_600_000_000),
        customer: customer.into(),
        feature: FEATURES[cell % FEATURES.len()].into(),
        plan: Some(PLANS[(cell / FEATURES.len()) % PLANS.len()].into()),
        reason,
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let cells = FEATURES.len() * PLANS.len();
    let before = allocated();
    let mut agg = Aggregate::default();
    let t = Instant::now();
    let mut events = 0u64;
    let first = 20_000;
    for i in 0..n {
        let id = format!("customer-{i:07}");
        agg.add(&event(first, &id, i % cells, Reason::Granted));
        agg.add(&event(first, &id, i % cells, Reason::QuotaExhausted));
        events += 2;
    }
    for day in first + 1..first + RETAIN_DAYS {
        for cell in 0..cells {
            for k in 0..300 {
                let id = format!("customer-{:07}", (k * 7919 + cell * 31 + day as usize) % n);
                agg.add(&event(day, &id, cell, Reason::Granted));
                agg.add(&event(day, &id, cell, Reason::RateLimited));
                events += 2;
            }
        }
    }
    let took = t.elapsed();
    let live = allocated() - before;
    println!(
        "{n} customers, {} days × {cells} (feature, plan) cells, {events} events",
        RETAIN_DAYS
    );
    println!(
        "  aggregation heap: {:.1} MB ({} bytes per customer)",
        live as f64 / 1e6,
        live / n
    );
    println!(
        "  add: {:.0} ns per event ({:.1} s)",
        took.as_nanos() as f64 / events as f64,
        took.as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("insights.bin");
    let t = Instant::now();
    agg.save(&path).unwrap();
    let saved = t.elapsed();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let t = Instant::now();
    let back = Aggregate::load(&path).unwrap().unwrap();
    println!(
        "  saved: {:.1} MB in {:.0} ms, loaded in {:.0} ms",
        bytes as f64 / 1e6,
        saved.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let totals = back.totals(None);
    println!(
        "  report totals over all days: {:.0} ms ({} rows)",
        t.elapsed().as_secs_f64() * 1e3,
        totals.len()
    );
}
