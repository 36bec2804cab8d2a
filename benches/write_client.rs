//! A paced client for `benches/write_load.sh`: `PUT /v1/customers/{id}` at a fixed rate
//! over a few keep-alive HTTP/1 connections and, optionally, `POST /v1/check` of random
//! customers at a fixed rate beside them. Each request's latency is measured from the
//! moment it was due (open loop: a slow answer delays the ones behind it on its
//! connection, and they count that wait, so there is no coordinated omission).
//!
//!     cargo run --release --example write_client -- \
//!         PORT TOKEN RATE SECONDS CONNS CUSTOMERS [CHECK_RATE CHECK_CONNS]
//!
//! Prints one JSON line per stream (writes, then checks): requests, errors and the
//! latency percentiles in milliseconds. In Rust rather than Python so the client's own
//! scheduling (a GIL switch interval is 5 ms) does not show up in the tail it measures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark client"
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({name}) missing or malformed"))
}

#[derive(Clone, Copy)]
enum Kind {
    Write,
    Check,
}

/// One stream of requests: `total` of them at `rate` a second from `start`, request n
/// on connection n % conns.
#[derive(Clone)]
struct Stream {
    kind: Kind,
    port: u16,
    token: String,
    rate: f64,
    total: u64,
    conns: u64,
    customers: u64,
    start: Instant,
}

impl Stream {
    fn request(&self, n: u64) -> Request<Full<Bytes>> {
        let b = Request::builder()
            .header("host", "127.0.0.1")
            .header("content-type", "application/json");
        match self.kind {
            Kind::Write => {
                let id = (n * 104_729) % self.customers;
                let plan = if n % 2 == 1 { "pro" } else { "free" };
                let body =
                    format!(r#"{{"subscriptions":[{{"plan":"{plan}","starts":"2025-06-01"}}]}}"#);
                b.method("PUT")
                    .uri(format!("/v1/customers/cust-{id:07}"))
                    .header("authorization", format!("Bearer {}", self.token))
                    .body(Full::new(Bytes::from(body)))
            }
            Kind::Check => {
                let id = (n * 7_919 + n / 3) % self.customers;
                let body =
                    format!(r#"{{"customer":"cust-{id:07}","feature":"analytics.advanced"}}"#);
                b.method("POST")
                    .uri("/v1/check")
                    .body(Full::new(Bytes::from(body)))
            }
        }
        .unwrap()
    }

    async fn connection(self, c: u64) -> (Vec<(Duration, Duration)>, u64) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (mut lat, mut errors) = (Vec::new(), 0u64);
        let mut n = c;
        while n < self.total {
            let due = self.start + Duration::from_secs_f64(n as f64 / self.rate);
            tokio::time::sleep_until(due.into()).await;
            let res = send.send_request(self.request(n)).await.unwrap();
            let ok = res.status().is_success();
            res.into_body().collect().await.unwrap();
            if ok {
                lat.push((due.elapsed(), due - self.start));
            } else {
                errors += 1;
            }
            n += self.conns;
        }
        (lat, errors)
    }

    async fn run(self) -> String {
        let tasks: Vec<_> = (0..self.conns)
            .map(|c| tokio::spawn(self.clone().connection(c)))
            .collect();
        let (mut lat, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        lat.sort();
        let ms = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |d| d.0.as_secs_f64() * 1e3)
        };
        let name = match self.kind {
            Kind::Write => "writes",
            Kind::Check => "checks",
        };
        // Where the tail is: the slowest requests and when (from the start) they were due.
        if std::env::var_os("SHOW_SLOWEST").is_some() {
            for (l, at) in lat.iter().rev().take(5) {
                eprintln!(
                    "{name}: {:.2} ms, due at {:.3} s",
                    l.as_secs_f64() * 1e3,
                    at.as_secs_f64()
                );
            }
        }
        format!(
            r#"{{"stream":"{name}","ok":{},"errors":{errors},"rate":{},"p50_ms":{:.2},"p99_ms":{:.2},"p999_ms":{:.2},"max_ms":{:.2}}}"#,
            lat.len(),
            self.rate,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            ms(1.0),
        )
    }
}

/// Two runtime threads: enough to keep both streams on time without taking the
/// cores the server needs.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = arg(&args, 4, "seconds");
    let writes = Stream {
        kind: Kind::Write,
        port: arg(&args, 1, "port"),
        token: arg(&args, 2, "token"),
        rate: arg(&args, 3, "rate"),
        total: 0,
        conns: arg(&args, 5, "connections"),
        customers: arg(&args, 6, "customers"),
        start: Instant::now() + Duration::from_millis(200),
    };
    let writes = Stream {
        total: (writes.rate * seconds) as u64,
        ..writes
    };
    let checks = (args.len() > 7).then(|| {
        let rate: f64 = arg(&args, 7, "check rate");
        Stream {
            kind: Kind::Check,
            rate,
            total: (rate * seconds) as u64,
            conns: arg(&args, 8, "check connections"),
            ..writes.clone()
        }
    });
    let checks = checks.map(|c| tokio::spawn(c.run()));
    println!("{}", writes.run().await);
    if let Some(c) = checks {
        println!("{}", c.await.unwrap());
    }
}
