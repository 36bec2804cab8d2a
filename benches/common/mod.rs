//! Policy sets for benchmarks, generated with a fixed seed so every run measures the
//! same thing.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup"
)]

use std::fmt::Write as _;
use std::path::Path;

pub const CATALOG: &str = r#"
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota, unit: call, combine: sum }
  api.rate: { kind: rate }
  seats: { kind: seats, combine: sum }
  support.response_time: { kind: value, type: duration, prefer: min }
plans:
  free:
    grants:
      api.calls: { limit: 1000, per: month }
      api.rate: { limit: 10, per: 1s, burst: 20 }
      seats: { limit: 3 }
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 100000000000, per: month, warn_at: 80%, overage: deny }
      api.rate: { limit: 100000000, per: 1s, burst: 100000000 }
      support.response_time: 24h
  enterprise:
    includes: [pro]
    grants:
      api.calls: unlimited
      seats: { limit: unlimited }
      support.response_time: 2h
  api-pack-10k:
    grants:
      api.calls: { limit: 10000, per: month }
"#;

/// Tiny deterministic PRNG (xorshift64*): benchmarks need a fixed sequence, not
/// statistical quality.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

pub fn customer_id(i: usize) -> String {
    format!("cust-{i:07}")
}

/// One NDJSON line per customer, each with two subscriptions (a base plan and an
/// add-on), as a billing export would have them. Customer 1 is always on `pro`.
pub fn customers_ndjson(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(n * 200);
    let plans = ["free", "pro", "enterprise"];
    for i in 0..n {
        let plan = if i == 1 {
            "pro"
        } else {
            plans[(rng.next() % 3) as usize]
        };
        let day = 1 + rng.next() % 28;
        let month = 1 + rng.next() % 12;
        let _ = writeln!(
            out,
            r#"{{"id":"{}","name":"Customer {i}","subscriptions":[{{"plan":"{plan}","starts":"2025-{month:02}-{day:02}"}},{{"plan":"api-pack-10k","quantity":{},"starts":"2025-{month:02}-{day:02}","ends":"2027-{month:02}-{day:02}"}}]}}"#,
            customer_id(i),
            1 + rng.next() % 5,
        );
    }
    out
}

/// Writes the catalog and `n` customers into `dir`.
pub fn write_policy(dir: &Path, n: usize) {
    std::fs::write(dir.join("catalog.yaml"), CATALOG).unwrap();
    std::fs::write(dir.join("customers.ndjson"), customers_ndjson(n, 42)).unwrap();
}
