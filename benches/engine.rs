//! Decision and compile benchmarks (criterion).
//!
//! Each decision benchmark includes what a request pays for besides the decision: the
//! `ArcSwap` snapshot load and the clock read (the server's `CoarseClock`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

mod common;

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use entitled::engine::{self, Decision, Op, Request};
use entitled::policy::{self, Limits, Snapshot};
use entitled::snapshot_cell::SnapshotCell;
use entitled::time::{Clock, CoarseClock, Timestamp};
use entitled::usage::MemoryStore;

/// A decision the way the server makes one: evaluated into a decision on the stack,
/// the usage step run against the memory store, completed in place.
#[inline(always)]
fn server_path(
    snap: &Snapshot,
    store: &MemoryStore,
    op: Op,
    req: &Request<'_>,
    now: Timestamp,
) -> bool {
    let mut d = Decision::blank(req.feature);
    match engine::evaluate(snap, op, req, now, &mut d) {
        Ok(Some(p)) => {
            let outcome = store.run(&p.op, now);
            p.finish(outcome, &mut d);
        }
        Ok(None) => {}
        Err(_) => return false,
    }
    black_box(&d);
    d.allowed
}

fn load(n: usize) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(dir.path(), n);
    policy::load_dir(dir.path(), &Limits::default()).unwrap()
}

fn decisions(c: &mut Criterion) {
    let clock = CoarseClock::start(Duration::from_millis(1)).unwrap();
    let store = MemoryStore::new();
    for n in [10_000usize, 1_000_000] {
        let snap = SnapshotCell::new();
        snap.store(Arc::new(load(n)));
        // A random sequence over all customers: every lookup is cache-cold. The ids sit
        // in one buffer, as a request's id sits in its (hot) request buffer.
        let mut rng = common::Rng::new(7);
        let count = n.min(1 << 20);
        let ids: String = (0..count)
            .map(|_| common::customer_id((rng.next() % n as u64) as usize))
            .collect();
        let width = common::customer_id(0).len();
        let id = |i: usize| &ids[i * width..(i + 1) * width];
        let mut i = 0;
        c.bench_function(&format!("flag check, random customer of {n}"), |b| {
            b.iter(|| {
                i = (i + 1) % count;
                snap.with(|s| {
                    let req = Request::new(id(i), "analytics.advanced");
                    black_box(server_path(
                        s.unwrap(),
                        &store,
                        Op::Check,
                        &req,
                        clock.now(),
                    ))
                })
            })
        });
        if n != 1_000_000 {
            continue;
        }
        let hot = common::customer_id(1);
        // Floors, for reading the figures below: what a decision pays before deciding.
        c.bench_function("floor: snapshot read + clock", |b| {
            b.iter(|| {
                snap.with(|s| {
                    black_box(s.map(|s| s.catalog.features.len()))
                        .map(|n| n as i64 + clock.now().as_micros())
                })
            })
        });
        c.bench_function("floor: + feature lookup", |b| {
            b.iter(|| {
                snap.with(|s| black_box(s.unwrap().feature_id(black_box("analytics.advanced"))))
            })
        });
        c.bench_function("floor: + hot customer lookup", |b| {
            b.iter(|| {
                snap.with(|s| {
                    black_box(
                        s.unwrap()
                            .customers
                            .get(black_box(&hot))
                            .map(|c| c.subs.len()),
                    )
                })
            })
        });
        c.bench_function("floor: + feature and hot customer lookups", |b| {
            b.iter(|| {
                snap.with(|s| {
                    let s = s.unwrap();
                    let now = clock.now();
                    black_box((
                        s.feature_id(black_box("analytics.advanced")),
                        s.customers.get(black_box(&hot)).map(|c| c.subs.len()),
                        now,
                    ))
                })
            })
        });
        // Hot-customer decisions of every kind, and consumes over random customers.
        // The quota limit is effectively unreachable, so every consume takes the
        // admitting path with its limit check.
        let hot_cases = [
            ("flag check, hot customer", "analytics.advanced", Op::Check),
            (
                "value check, hot customer",
                "support.response_time",
                Op::Check,
            ),
            ("quota consume, hot customer", "api.calls", Op::Consume),
            ("rate check, hot customer", "api.rate", Op::Check),
            ("rate consume, hot customer", "api.rate", Op::Consume),
        ];
        for (name, feature, op) in hot_cases {
            c.bench_function(name, |b| {
                b.iter(|| {
                    snap.with(|s| {
                        let req = Request::new(black_box(&hot), feature);
                        black_box(server_path(s.unwrap(), &store, op, &req, clock.now()))
                    })
                })
            });
        }
        c.bench_function("quota consume, random customer of 1M", |b| {
            b.iter(|| {
                i = (i + 1) % count;
                snap.with(|s| {
                    let req = Request::new(id(i), "api.calls");
                    black_box(server_path(
                        s.unwrap(),
                        &store,
                        Op::Consume,
                        &req,
                        clock.now(),
                    ))
                })
            })
        });
        // Two threads consuming the same counter: time per operation, both running.
        let shared = Arc::new((snap, MemoryStore::new()));
        c.bench_function("quota consume, same counter, 2 threads (per op)", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let shared = shared.clone();
                        let (clock, hot) = (&clock, &hot);
                        s.spawn(move || {
                            for _ in 0..iters {
                                shared.0.with(|s| {
                                    let req = Request::new(hot, "api.calls");
                                    black_box(server_path(
                                        s.unwrap(),
                                        &shared.1,
                                        Op::Consume,
                                        &req,
                                        clock.now(),
                                    ))
                                });
                            }
                        });
                    }
                });
                // Each thread did `iters` operations in the elapsed time, side by side.
                start.elapsed()
            })
        });
    }
}

/// An OFREP bulk answer as the server makes one, minus HTTP: every feature of the
/// bundled example policies (20) decided for one customer on one snapshot, each
/// encoded as an OFREP flag, and the answer's ETag hashed.
fn ofrep_bulk(c: &mut Criterion) {
    use entitled::server::ofrep::{etag, write_flag};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let snap = policy::load_dir(&dir, &Limits::default()).unwrap();
    let store = MemoryStore::new();
    let clock = CoarseClock::start(Duration::from_millis(1)).unwrap();
    let features = snap.catalog.features.len();
    let mut out = Vec::with_capacity(8192);
    c.bench_function(
        &format!("ofrep bulk, {features} features, one customer"),
        |b| {
            b.iter(|| {
                out.clear();
                let now = clock.now();
                out.extend_from_slice(b"{\"flags\":[");
                for (i, f) in snap.catalog.features.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let req = Request::new("acme", &f.name);
                    let d =
                        entitled::decide::in_memory(&snap, &store, Op::Check, &req, now).unwrap();
                    write_flag(&mut out, &f.name, &d);
                }
                out.extend_from_slice(b"]}");
                black_box(etag(&out))
            })
        },
    );
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for n in [100_000usize, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        common::write_policy(dir.path(), n);
        g.bench_function(
            format!("{n} customers, NDJSON, 2 subscriptions each"),
            |b| {
                b.iter(|| {
                    black_box(
                        policy::load_dir(dir.path(), &Limits::default())
                            .unwrap()
                            .customers
                            .len(),
                    )
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, decisions, ofrep_bulk, compile);
criterion_main!(benches);
