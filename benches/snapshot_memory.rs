//! Memory and load time of large snapshots: 1M customers with 2 subscriptions each,
//! from NDJSON, a JSON array and YAML.
//!
//! `cargo run --release --example snapshot_memory [customers]`
//!
//! Memory is jemalloc's `stats.allocated` (live heap bytes) before and after the load,
//! with the raw parse already freed: exactly what the snapshot holds. RSS (from
//! /proc/self/status) is printed beside it; it also counts freed pages the allocator
//! has not returned yet.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "measurement tool")]

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use entitled::policy::{self, Limits};
use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn allocated() -> usize {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let ndjson = common::customers_ndjson(n, 42);
    let id_bytes: usize = (0..n).map(|i| common::customer_id(i).len()).sum();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalog.yaml"), common::CATALOG).unwrap();

    // NDJSON: the bulk format.
    std::fs::write(dir.path().join("customers.ndjson"), &ndjson).unwrap();
    let before = allocated();
    let rss0 = rss_kib();
    let t = Instant::now();
    let snap = policy::load_dir(dir.path(), &Limits::default()).unwrap();
    let load = t.elapsed();
    let live = allocated() - before;
    println!(
        "{n} customers, 2 subscriptions each ({} MB of NDJSON)",
        ndjson.len() / 1_000_000
    );
    println!("  load + compile (NDJSON): {:.2} s", load.as_secs_f64());
    println!(
        "  snapshot heap: {} MB = {} bytes/customer ({} of them the ids themselves; inline when ≤ 24 bytes)",
        live / 1_000_000,
        live / n,
        id_bytes / n
    );
    println!(
        "  RSS growth: {} MB",
        (rss_kib().saturating_sub(rss0)) / 1024
    );
    assert_eq!(snap.customers.len(), n);
    drop(snap);
    std::fs::remove_file(dir.path().join("customers.ndjson")).unwrap();

    // The same customers as one JSON array, and as YAML.
    let customers: Vec<serde_json::Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let json = serde_json::to_string(&serde_json::json!({ "customers": customers })).unwrap();
    std::fs::write(dir.path().join("customers.json"), &json).unwrap();
    let t = Instant::now();
    let snap = policy::load_dir(dir.path(), &Limits::default()).unwrap();
    println!(
        "  load + compile (JSON array, {} MB): {:.2} s",
        json.len() / 1_000_000,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(snap.customers.len(), n);
    drop(snap);
    std::fs::remove_file(dir.path().join("customers.json")).unwrap();

    let mut yaml = String::with_capacity(json.len() * 2);
    yaml.push_str("customers:\n");
    for c in &customers {
        // Flow style per customer: valid YAML, as a converter would write it.
        yaml.push_str("  - ");
        yaml.push_str(&serde_json::to_string(c).unwrap());
        yaml.push('\n');
    }
    std::fs::write(dir.path().join("customers.yaml"), &yaml).unwrap();
    let t = Instant::now();
    let snap = policy::load_dir(dir.path(), &Limits::default()).unwrap();
    println!(
        "  load + compile (YAML, {} MB): {:.2} s",
        yaml.len() / 1_000_000,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(snap.customers.len(), n);
}
