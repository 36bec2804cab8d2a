//! The HTTP adapter: hyper 1 on tokio, HTTP/1.1 keep-alive and h2c on one port.
//!
//! `run` takes a bound listener and a shutdown future (as mini-redis does), so tests
//! bind `127.0.0.1:0` and run many servers side by side. The server owns no policy
//! logic: it parses, asks the decision path ([`crate::decide`]), encodes.

mod api;
mod authz;
mod console;
mod customers;
pub mod error;
pub mod grpc;
mod html;
mod json_text;
pub mod ofrep;
mod portal;
pub mod request;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admission::Unmatched;
use crate::decide::Decider;
use crate::reload::ReloadState;
use crate::usage::UsageStore;

pub use portal::Web;

/// Server limits. Every one is on by default: a sidecar in front of every request
/// must not be held open by slow or abusive clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (413 beyond).
    pub body_limit: usize,
    /// Time to receive a request's headers. hyper starts it whenever an HTTP/1
    /// connection waits for a request, so it is also the keep-alive idle timeout.
    pub header_read_timeout: Duration,
    /// Time to receive a request's body once its headers are in: a client that
    /// declares a body and sends it slowly, or never, is answered 408 and closed.
    pub body_read_timeout: Duration,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within the same
    /// time is dropped.
    pub h2_keepalive: Duration,
    /// Most open connections; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// A gRPC connection with no request in flight for this long is closed.
    pub grpc_idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_limit: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            h2_keepalive: Duration::from_secs(30),
            max_connections: 4096,
            grpc_idle_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything a request handler needs. Shared by all connections.
pub struct App<S> {
    /// The served snapshot, the store, the clock and the decisions' observer.
    pub decider: Decider<S>,
    pub reload: Arc<ReloadState>,
    pub prometheus: Option<PrometheusHandle>,
    pub limits: Limits,
    /// With `--test-clock`: the clock `POST /v1/test-clock` moves (also the
    /// decider's).
    pub test_clock: Option<Arc<crate::time::ManualClock>>,
    /// Renewal notices: a test-clock move scans at once and waits for the scan.
    pub notices: Option<Arc<crate::notices::Notices>>,
    /// The usage report's aggregation and each customer's recent denials.
    pub insights: Option<Arc<crate::insights::Insights>>,
    /// Gateway admission of a request no route matches (`--unmatched`).
    pub unmatched: Unmatched,
    /// Customer records written through the API, and who may write them.
    pub live: Arc<crate::live::Live>,
    /// Who may use the OFREP routes (`--ofrep-token-file`); `None`: anyone.
    pub ofrep_tokens: Option<crate::live::AdminTokens>,
    /// The customer portal's key and the console's admins.
    pub web: Web,
}

impl<S> std::fmt::Debug for App<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Serves `listener` until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish (up to `shutdown_timeout`) and returns.
pub async fn run<S: UsageStore + 'static>(
    listener: TcpListener,
    app: Arc<App<S>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(app.limits.h2_keepalive)
        .keep_alive_timeout(app.limits.h2_keepalive)
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    // Tells long-lived responses (OFREP event streams) to end, so that graceful
    // shutdown does not wait on them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(Semaphore::new(app.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            // hyper's header read timeout starts only once it knows the protocol; a
            // client that sends nothing (or half an HTTP/2 preface) would hold its
            // connection slot for ever. Wait for enough bytes to tell, with a deadline.
            let timeout = app.limits.header_read_timeout;
            if sniff(&stream, timeout).await.is_ok() {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    let stop = stop.clone();
                    async move {
                        let r = if ofrep::is_route(req.uri().path()) {
                            ofrep::handle(&app, req, stop).await
                        } else {
                            api::handle(&app, req).await.map(Either::Left)
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let _ = watcher.watch(conn).await;
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(builder);
    let _ = stop_tx.send(true);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(app.limits.shutdown_timeout) => {
            tracing::warn!("shutdown timeout: closing connections with requests still in flight");
        }
    }
    Ok(())
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the first bytes of a connection tell HTTP/1 from HTTP/2 (a byte that
/// leaves the HTTP/2 preface, or the whole preface), without consuming them. Fails on
/// EOF, error or when `within` runs out.
async fn sniff(stream: &tokio::net::TcpStream, within: Duration) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 24];
    loop {
        // `timeout_at` polls its future first, and a socket with bytes waiting is
        // always readable: check the deadline explicitly.
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::timeout_at(deadline, stream.readable())
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Err(()),
        };
        if n == 0 {
            return Err(());
        }
        if buf[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            return Ok(());
        }
        // A strict prefix of the preface: more is coming (or the peer is stalling).
        // `readable` would answer at once with the bytes already there, so pause.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
