//! The gRPC port (default 127.0.0.1:4781): Envoy's `ext_authz`
//! (`envoy.service.auth.v3.Authorization/Check`) and rate limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), so Envoy's filters
//! use `entitled` as a drop-in for an authorization server and for
//! envoyproxy/ratelimit, with limits that follow each customer's plan.
//!
//! Both translate to and from gateway admission ([`crate::admission`]), so they answer
//! from the same decisions as the HTTP forward-auth.
//!
//! Connections are capped like the HTTP port's (`--max-connections`, counted apart),
//! one that has not sent its first bytes (the HTTP/2 preface) within
//! `--header-read-timeout` is closed, and so is one with no request in flight for
//! `--grpc-idle-timeout`, so idle sockets cannot pile up until the process runs out of
//! file descriptors. (tonic and hyper offer keep-alive pings, which a live but idle
//! peer answers, and no idle timeout: the connection's reads are cut off here.)

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as PbUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::App;
use crate::admission::{self, Admission, Descriptor, Headers, Unit, Verdict};
use crate::usage::UsageStore;

/// gRPC status codes Envoy reads from a `CheckResponse`.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;

/// Both services, over one shared [`App`].
pub struct Gateway<S> {
    app: Arc<App<S>>,
}

impl<S> std::fmt::Debug for Gateway<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Serves the gRPC services on `listener` until `shutdown` completes.
pub async fn run<S: UsageStore + 'static>(
    listener: TcpListener,
    app: Arc<App<S>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    use tokio_stream::StreamExt as _;
    let permits = Arc::new(Semaphore::new(app.limits.max_connections));
    let preface = app.limits.header_read_timeout;
    // Bounded so that instants computed from it cannot overflow.
    let idle = app
        .limits
        .grpc_idle_timeout
        .min(Duration::from_secs(100 * 365 * 86_400));
    // The next connection is accepted only once a slot is free: at the cap, the
    // others wait in the listen backlog, as on the HTTP port.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .then(move |conn| {
            let permits = permits.clone();
            async move {
                let permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                conn.map(|stream| OneWrite {
                    stream,
                    _permit: permit,
                    preface: Some(Box::pin(tokio::time::sleep(preface))),
                    idle,
                    idle_check: Box::pin(tokio::time::sleep(idle)),
                    activity: Arc::new(Activity::new()),
                })
            }
        });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(app.limits.h2_keepalive))
        .http2_keepalive_timeout(Some(app.limits.h2_keepalive))
        .add_service(AuthorizationServer::new(Gateway { app: app.clone() }))
        .add_service(RateLimitServiceServer::new(Gateway { app }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A gRPC connection that tells h2 it has no vectored writes, so that an answer's
/// HEADERS, DATA and trailers leave in one write and Envoy wakes once per call.
///
/// With vectored writes h2 keeps a DATA payload of 256 bytes or more out of its write
/// buffer (to `writev` it beside the buffer) and accepts no further frame until it has
/// flushed, so the trailers went out in a second write (h2 0.4
/// `codec/framed_write.rs`, `CHAIN_THRESHOLD`; hyperium/h2#711). Without them the
/// threshold is 1 KiB, above every answer here (a Check answer is ~330 bytes).
/// Measured: one send per call instead of two, and 9–16 µs off the p50 of sequential
/// Check calls on one connection.
///
/// It also holds the connection's slot under the cap, and closes a connection that
/// sends nothing before its preface deadline, or that has had no request in flight
/// for the idle timeout (its reads fail, and h2 closes it).
#[derive(Debug)]
struct OneWrite {
    stream: tokio::net::TcpStream,
    /// Released when the connection is dropped.
    _permit: OwnedSemaphorePermit,
    /// Until the first bytes arrive: when the connection is closed if none do.
    preface: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Duration,
    /// When to look again whether the connection has been idle for `idle`.
    idle_check: Pin<Box<tokio::time::Sleep>>,
    /// Shared with the requests (through the connect info), which mark it.
    activity: Arc<Activity>,
}

/// The requests in flight on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    born: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Microseconds after `born` at which the last request ended.
    last_end_us: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            born: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_us: AtomicU64::new(0),
        }
    }

    /// Since when the connection has had no request in flight (`None`: one is).
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let us = self.last_end_us.load(Ordering::Acquire);
        Some(self.born + Duration::from_micros(us))
    }
}

/// A request in flight, for the idle timeout of its connection; ends when dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start<T>(request: &tonic::Request<T>) -> Option<InFlight> {
        let conn = request.extensions().get::<ConnInfo>()?;
        conn.0.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight(conn.0.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let us = a.born.elapsed().as_micros();
        a.last_end_us
            .store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What tonic hands each request of a connection: its activity.
#[derive(Debug, Clone)]
struct ConnInfo(Arc<Activity>);

impl tonic::transport::server::Connected for OneWrite {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo(self.activity.clone())
    }
}

impl OneWrite {
    /// Ready with an error once the connection has had no request in flight for
    /// `idle`; otherwise arms `idle_check` for the next moment that could be true.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let next = match self.activity.idle_since() {
                Some(since) if now >= since + self.idle => {
                    return Poll::Ready(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no gRPC request within the idle timeout",
                    ));
                }
                Some(since) => since + self.idle,
                None => now + self.idle,
            };
            self.idle_check.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for OneWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(deadline) = self.preface.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no HTTP/2 preface before the header read timeout",
            )));
        }
        if self.preface.is_none()
            && let Poll::Ready(e) = self.poll_idle(cx)
        {
            return Poll::Ready(Err(e));
        }
        let filled = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > filled {
            self.preface = None;
        }
        r
    }
}

impl tokio::io::AsyncWrite for OneWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn check_response(a: Admission) -> CheckResponse {
    let headers = a.headers();
    let (code, http) = match a.verdict {
        Verdict::Allowed => {
            // Everything to the upstream; the RateLimit-* also to the client.
            let to_client = headers
                .iter()
                .filter(|(k, _)| k.starts_with("ratelimit-"))
                .map(|(k, v)| header(k, v.clone()))
                .collect();
            let ok = OkHttpResponse {
                headers: headers.iter().map(|(k, v)| header(k, v.clone())).collect(),
                response_headers_to_add: to_client,
                ..Default::default()
            };
            (OK, HttpResponse::OkResponse(ok))
        }
        Verdict::Forbidden | Verdict::TooMany => {
            let mut hs: Vec<HeaderValueOption> =
                headers.iter().map(|(k, v)| header(k, v.clone())).collect();
            hs.push(header("content-type", "application/json".into()));
            let denied = DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(a.status()),
                }),
                headers: hs,
                body: String::from_utf8_lossy(&a.body).into_owned(),
            };
            let code = if a.verdict == Verdict::TooMany {
                RESOURCE_EXHAUSTED
            } else {
                PERMISSION_DENIED
            };
            (code, HttpResponse::DeniedResponse(denied))
        }
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: a.reason.to_string(),
            details: Vec::new(),
        }),
        http_response: Some(http),
        ..Default::default()
    }
}

/// A `CheckRequest`'s headers: `headers` (one value per name, Envoy joins a repeated
/// header's values with commas), or `header_map` with `encode_raw_headers: true`, where
/// a name sent twice comes twice and is [`Headers::repeated`].
struct CheckHeaders {
    map: HashMap<String, String>,
    repeated: Vec<String>,
}

impl CheckHeaders {
    fn new(mut map: HashMap<String, String>, raw: Option<HeaderMap>) -> Self {
        let mut repeated = Vec::new();
        for h in raw.map(|m| m.headers).unwrap_or_default() {
            let value = if h.raw_value.is_empty() {
                h.value
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            let key = h.key.to_ascii_lowercase();
            match map.entry(key) {
                Entry::Occupied(e) => repeated.push(e.key().clone()),
                Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        CheckHeaders { map, repeated }
    }
}

impl Headers for CheckHeaders {
    fn header(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    fn repeated(&self, name: &str) -> bool {
        self.repeated.iter().any(|k| k == name)
    }
}

#[tonic::async_trait]
impl<S: UsageStore + 'static> Authorization for Gateway<S> {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let _in_flight = InFlight::start(&request);
        let http = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .ok_or_else(|| {
                tonic::Status::invalid_argument("`attributes.request.http` is required")
            })?;
        let headers = CheckHeaders::new(http.headers, http.header_map);
        // No decision possible (no snapshot yet, the store unavailable): an RPC error,
        // which Envoy answers by its failure mode (`failure_mode_allow`,
        // `status_on_error`) exactly as it does when the HTTP service answers 5xx.
        let app = &self.app;
        let a = admission::admit(
            &app.decider,
            app.unmatched,
            "authz_grpc",
            &http.method,
            &http.path,
            &headers,
        )
        .await?;
        Ok(tonic::Response::new(check_response(a)))
    }
}

fn unit(u: Unit) -> PbUnit {
    match u {
        Unit::Unknown => PbUnit::Unknown,
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

#[tonic::async_trait]
impl<S: UsageStore + 'static> RateLimitService for Gateway<S> {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let _in_flight = InFlight::start(&request);
        let r = request.into_inner();
        // Unset (0) means 1; a descriptor's own `hits_addend` wins, and 0 there asks
        // for the status without counting. Negative hits (refunds) count nothing.
        let default_hits = u64::from(r.hits_addend.max(1));
        let entries: Vec<HashMap<&str, &str>> = r
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect()
            })
            .collect();
        let descriptors: Vec<Descriptor<'_>> = r
            .descriptors
            .iter()
            .zip(&entries)
            .map(|(d, e)| Descriptor {
                customer: e.get("customer").copied(),
                feature: e.get("feature").copied(),
                ambiguous: ["customer", "feature"]
                    .iter()
                    .any(|k| d.entries.iter().filter(|e| e.key == *k).nth(1).is_some()),
                hits: if d.is_negative_hits {
                    0
                } else {
                    d.hits_addend.as_ref().map_or(default_hits, |h| h.value)
                },
            })
            .collect();
        let answers = admission::rate_limit(&self.app.decider, &descriptors).await?;
        let mut overall = Code::Ok;
        // Envoy's own 429 carries no Retry-After: the headers added here reach the client.
        let retry_after = answers
            .iter()
            .filter(|a| a.over)
            .filter_map(|a| a.retry_after_s)
            .max();
        let statuses = answers
            .into_iter()
            .map(|a| {
                let code = if a.over {
                    overall = Code::OverLimit;
                    Code::OverLimit
                } else {
                    Code::Ok
                };
                crate::metrics::gateway(
                    "ratelimit_grpc",
                    if a.over { 429 } else { 200 },
                    if a.over { "over_limit" } else { "ok" },
                );
                DescriptorStatus {
                    code: code as i32,
                    current_limit: a.limit.map(|(n, u, name)| RateLimit {
                        name,
                        requests_per_unit: u32::try_from(n).unwrap_or(u32::MAX),
                        unit: unit(u) as i32,
                    }),
                    limit_remaining: u32::try_from(a.remaining).unwrap_or(u32::MAX),
                    duration_until_reset: a.reset_s.map(|s| PbDuration {
                        seconds: i64::try_from(s).unwrap_or(i64::MAX),
                        nanos: 0,
                    }),
                    ..Default::default()
                }
            })
            .collect();
        let response_headers_to_add = retry_after
            .map(|s| HeaderValue {
                key: "retry-after".into(),
                value: s.to_string(),
                ..Default::default()
            })
            .into_iter()
            .collect();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add,
            ..Default::default()
        }))
    }
}
