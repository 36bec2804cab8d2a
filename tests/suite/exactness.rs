//! Concurrency: threads racing for the last units of a quota, or the last seats, admit
//! exactly the limit, never one more; denied steps count nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use entitled::decide;
use entitled::engine::{Op, Request};
use entitled::policy::{self, Limits, Snapshot};
use entitled::time::Timestamp;
use entitled::usage::MemoryStore;

fn snapshot(policy: &str) -> Snapshot {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("p.yaml"), policy).expect("write");
    policy::load_dir(dir.path(), &Limits::default()).expect("policy loads")
}

const POLICY: &str = r#"
features:
  api.calls: { kind: quota }
  seats: { kind: seats }
plans:
  pro:
    grants:
      api.calls: { limit: 1000, per: month }
      seats: { limit: 7 }
customers:
  - id: acme
    subscriptions: [{ plan: pro, starts: 2026-01-01 }]
"#;

#[test]
fn racing_consumes_admit_exactly_the_limit() {
    let snap = Arc::new(snapshot(POLICY));
    let store = Arc::new(MemoryStore::new());
    let now = Timestamp::parse("2026-03-10").expect("time");
    let admitted = Arc::new(AtomicU64::new(0));
    let threads = 8;
    let attempts = 400; // 8 × 400 × amounts of 1..=3 ≫ 1000
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (snap, store, admitted) = (snap.clone(), store.clone(), admitted.clone());
            std::thread::spawn(move || {
                for i in 0..attempts {
                    let amount = 1 + ((t + i) % 3) as u64;
                    let req = Request {
                        amount,
                        ..Request::new("acme", "api.calls")
                    };
                    let d =
                        decide::in_memory(&snap, &store, Op::Consume, &req, now).expect("decides");
                    if d.allowed {
                        admitted.fetch_add(amount, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let check = decide::in_memory(
        &snap,
        &store,
        Op::Check,
        &Request::new("acme", "api.calls"),
        now,
    )
    .expect("decides");
    // The sum of admitted amounts is exactly what the counter says, and never above
    // the limit; with amounts of 1 in the mix the last unit is always taken.
    assert_eq!(check.used, Some(admitted.load(Ordering::Relaxed)));
    assert!(admitted.load(Ordering::Relaxed) <= 1000);
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        1000,
        "the last units must be taken"
    );
}

#[test]
fn racing_unit_consumes_admit_exactly_the_limit() {
    let snap = Arc::new(snapshot(POLICY));
    let store = Arc::new(MemoryStore::new());
    let now = Timestamp::parse("2026-03-10").expect("time");
    let admitted = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (snap, store, admitted) = (snap.clone(), store.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..300 {
                    let d = decide::in_memory(
                        &snap,
                        &store,
                        Op::Consume,
                        &Request::new("acme", "api.calls"),
                        now,
                    )
                    .expect("decides");
                    if d.allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 1000);
}

#[test]
fn racing_seat_acquires_admit_exactly_the_limit() {
    let snap = Arc::new(snapshot(POLICY));
    let store = Arc::new(MemoryStore::new());
    let now = Timestamp::parse("2026-03-10").expect("time");
    let admitted = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (snap, store, admitted) = (snap.clone(), store.clone(), admitted.clone());
            std::thread::spawn(move || {
                for i in 0..20 {
                    let holder = format!("user-{t}-{i}");
                    let req = Request {
                        holder: Some(&holder),
                        ..Request::new("acme", "seats")
                    };
                    let d = decide::in_memory(&snap, &store, Op::SeatAcquire, &req, now)
                        .expect("decides");
                    if d.allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 7);
}
