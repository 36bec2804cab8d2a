//! The baseline for `benches/load.sh`: a bare hyper server that reads the request body
//! and answers a constant JSON body, built the way `entitled serve` builds its server
//! (hyper-util auto builder, tokio, same worker count), so the ratio between the two
//! is the cost of everything `entitled` adds: routing, parsing, the decision, metrics.
//!
//! `cargo run --release --example bare_hyper -- 127.0.0.1:4799 1`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark baseline"
)]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const BODY: &[u8] = br#"{"allowed":true,"reason":"granted","feature":"analytics.advanced","kind":"flag","snapshot":"000000000000"}"#;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4799".into());
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        println!(
            "bare hyper: listening on http://{}",
            listener.local_addr().unwrap()
        );
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
