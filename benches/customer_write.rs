//! One customer changed among a million (criterion): `update_customers` with one
//! record set (the work a `PUT /v1/customers/{id}` does under the publisher's lock),
//! one removed, and a batch of 100 (the overlay applied on top of a reload).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

mod common;

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use entitled::policy::compile::{Change, update_customers};
use entitled::policy::source::Origin;
use entitled::policy::{self, Limits, raw};

fn record(id: &str, plan: &str) -> raw::Customer {
    serde_json::from_str(&format!(
        r#"{{"id":"{id}","subscriptions":[{{"plan":"{plan}","starts":"2025-01-01"}}]}}"#
    ))
    .unwrap()
}

fn set(record: &raw::Customer) -> Change<'_> {
    Change::Set {
        record,
        file: 0,
        origin: Origin::Line { line: 0 },
    }
}

fn one_change(c: &mut Criterion) {
    let n = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(dir.path(), n);
    let snap = policy::load_dir(dir.path(), &Limits::default()).unwrap();
    let mut g = c.benchmark_group("update_customers, 1M customers");
    let upgrade = record(&common::customer_id(1), "enterprise");
    g.bench_function("one customer replaced", |b| {
        b.iter(|| {
            black_box(update_customers(&snap.catalog, &snap.customers, &[set(&upgrade)]).unwrap())
        })
    });
    let new = record("brand-new-customer", "pro");
    g.bench_function("one customer added", |b| {
        b.iter(|| {
            black_box(update_customers(&snap.catalog, &snap.customers, &[set(&new)]).unwrap())
        })
    });
    let gone = common::customer_id(2);
    g.bench_function("one customer removed", |b| {
        b.iter(|| {
            black_box(
                update_customers(&snap.catalog, &snap.customers, &[Change::Remove(&gone)]).unwrap(),
            )
        })
    });
    let batch: Vec<raw::Customer> = (0..100)
        .map(|i| record(&common::customer_id(i * 9_973), "pro"))
        .collect();
    let changes: Vec<Change<'_>> = batch.iter().map(set).collect();
    g.sample_size(20);
    g.bench_function("100 customers replaced (an overlay on a reload)", |b| {
        b.iter(|| black_box(update_customers(&snap.catalog, &snap.customers, &changes).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, one_change);
criterion_main!(benches);
