//! Webhook delivery: a tokio task POSTs queued events as structured CloudEvents, a
//! bounded number at once, with retries, exponential backoff and `Retry-After`, and
//! reports each outcome back to the scanner thread (which owns the outbox).

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use bytes::Bytes;

use super::Msg;
use super::config::WebhookConfig;

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// A non-retryable answer, or every attempt used.
    Failed,
}

/// What an answer means: delivered, try again, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    GiveUp,
}

/// 2xx delivered; 429 and 5xx are worth another attempt; any other status is final.
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 500..=599 => Verdict::Retry,
        _ => Verdict::GiveUp,
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// An error with its causes (`client error (Connect): invalid peer certificate: …`):
/// hyper's own message alone does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `Retry-After` in seconds (the form receivers use for 429 and 503); an HTTP date
/// is not read, and falls back to the backoff.
pub fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub(super) async fn deliver_all(
    cfg: WebhookConfig,
    tls: rustls::ClientConfig,
    mut queue: tokio::sync::mpsc::Receiver<(String, Bytes)>,
    outcomes: Sender<Msg>,
) {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(cfg.timeout));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
    let cfg = Arc::new(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    while let Some((id, body)) = queue.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, cfg, outcomes) = (client.clone(), cfg.clone(), outcomes.clone());
        tokio::spawn(async move {
            let outcome = deliver(&client, &cfg, &id, body).await;
            let result = match outcome {
                Outcome::Delivered => "delivered",
                Outcome::Failed => "failed",
            };
            // The outcome is queued for the outbox before the metric moves: whoever
            // sees the count and then stops the process stops it after the outcome.
            let _ = outcomes.send(Msg::Outcome { id, result });
            match outcome {
                Outcome::Delivered => crate::metrics::notice_delivered(),
                Outcome::Failed => crate::metrics::notice_failed(),
            }
            drop(permit);
        });
    }
}

/// POSTs one event (structured CloudEvents) until it is delivered, refused or out of
/// attempts.
async fn deliver(client: &HttpClient, cfg: &WebhookConfig, id: &str, body: Bytes) -> Outcome {
    let attempts = cfg.max_attempts.max(1);
    for attempt in 1..=attempts {
        let req = hyper::Request::post(cfg.url.clone())
            .header(
                hyper::header::CONTENT_TYPE,
                "application/cloudevents+json; charset=utf-8",
            )
            .body(http_body_util::Full::new(body.clone()));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "building the notice request failed");
                return Outcome::Failed;
            }
        };
        let mut asked = None;
        let sent = tokio::time::timeout(cfg.timeout, async {
            let resp = client.request(req).await?;
            let status = resp.status().as_u16();
            asked = retry_after(resp.headers());
            // Read the answer to the end so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            Ok::<u16, hyper_util::client::legacy::Error>(status)
        })
        .await;
        let why = match sent {
            Ok(Ok(status)) => match verdict(status) {
                Verdict::Delivered => return Outcome::Delivered,
                Verdict::GiveUp => {
                    tracing::warn!(id, status, "notice webhook refused the event; not retried");
                    return Outcome::Failed;
                }
                Verdict::Retry => format!("status {status}"),
            },
            Ok(Err(e)) => error_chain(&e),
            Err(_) => format!("no answer within {:?}", cfg.timeout),
        };
        if attempt == attempts {
            tracing::warn!(id, attempts, last = %why, "notice webhook: giving up");
            return Outcome::Failed;
        }
        let wait = cfg.retry_wait(attempt, asked);
        tracing::debug!(id, attempt, error = %why, retry_in = ?wait, "notice webhook attempt failed");
        tokio::time::sleep(wait).await;
    }
    Outcome::Failed
}
