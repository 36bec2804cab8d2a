//! Renewal notices against the real binary: the test clock crosses each threshold, the
//! NDJSON event log and a webhook receiver of the test's own (std `TcpListener` on a
//! loopback port) see each notice once, across a restart and a renewal.
//!
//! Nothing sleeps for time to pass: `POST /v1/test-clock` scans at once and answers
//! when the scan's events are on disk. Only webhook delivery is asynchronous, and it is
//! awaited with a bounded poll.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Server, metric_value, output_within, wait_until};

/// Bound on waiting for asynchronous webhook deliveries.
const DELIVERY: Duration = Duration::from_secs(10);

/// One POST the receiver got, and the status it answered.
#[derive(Debug, Clone)]
pub(super) struct Received {
    pub(super) content_type: Option<String>,
    pub(super) body: Value,
    pub(super) status: u16,
}

/// A webhook receiver: answers the n-th request (from 0) with `respond(n)`, records
/// every one. The accept thread is detached; it dies with the test process.
pub(super) struct Hook {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    scheme: &'static str,
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Hook {
    pub(super) fn start(respond: impl Fn(usize) -> u16 + Send + 'static) -> Hook {
        Hook::serve(None, respond)
    }

    /// The same over TLS, with the server certificate for 127.0.0.1 in `certs`
    /// (`r.crt`, `r.key`, made by `make_certs`).
    fn start_tls(certs: &Path, respond: impl Fn(usize) -> u16 + Send + 'static) -> Hook {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs.join("r.crt"))
                .expect("server certificate")
                .collect::<Result<_, _>>()
                .expect("server certificate");
        let key = PrivateKeyDer::from_pem_file(certs.join("r.key")).expect("server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server TLS config");
        Hook::serve(Some(Arc::new(config)), respond)
    }

    fn serve(
        tls: Option<Arc<rustls::ServerConfig>>,
        respond: impl Fn(usize) -> u16 + Send + 'static,
    ) -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding the webhook receiver");
        let addr = l.local_addr().expect("receiver address");
        let got = Arc::new(Mutex::new(Vec::new()));
        let log = got.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let n = log.lock().unwrap().len();
                let answer = |stream: &mut dyn ReadWrite| {
                    let (content_type, body) = read_request(stream)?;
                    let status = respond(n);
                    log.lock().unwrap().push(Received {
                        content_type,
                        body,
                        status,
                    });
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    stream.flush().ok()
                };
                match &tls {
                    None => {
                        let mut tcp = tcp;
                        let _ = answer(&mut tcp);
                    }
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                            continue;
                        };
                        let mut stream = rustls::StreamOwned::new(conn, tcp);
                        if answer(&mut stream).is_some() {
                            stream.conn.send_close_notify();
                            let _ = stream.flush();
                        }
                    }
                }
            }
        });
        Hook { addr, got, scheme }
    }

    pub(super) fn url(&self) -> String {
        format!("{}://{}/hooks/renewals", self.scheme, self.addr)
    }

    pub(super) fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// How many POSTs carried notice `id`, and how many of them were answered 2xx.
    pub(super) fn count(&self, id: &str) -> (usize, usize) {
        let r = self.received();
        let of: Vec<&Received> = r.iter().filter(|x| x.body["id"] == id).collect();
        let ok = of.iter().filter(|x| (200..300).contains(&x.status)).count();
        (of.len(), ok)
    }
}

/// Reads one HTTP/1.1 request with a `Content-Length` body: its content type and
/// the body as JSON.
fn read_request(s: &mut dyn ReadWrite) -> Option<(Option<String>, Value)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let len: usize = header("content-length")?.parse().ok()?;
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((header("content-type"), serde_json::from_slice(&body).ok()?))
}

/// Every event of the notice log, in order.
pub(super) fn events(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p: &std::path::PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("events-") && n.ends_with(".ndjson"))
    });
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            out.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")));
        }
    }
    out
}

/// Moves the test clock; returns the number of notices the scan emitted.
fn set_clock(s: &Server, t: &str) -> u64 {
    let r = s.post("/v1/test-clock", &json!({ "set": t }));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    v["notices"]
        .as_u64()
        .unwrap_or_else(|| panic!("no notices count in {v}"))
}

pub(super) fn metric(s: &Server, name: &str) -> f64 {
    let text = s.get("/metrics").text();
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn subscription_policy(ends: &str) -> String {
    format!(
        r#"
features:
  sso: {{ kind: flag }}
plans:
  pro:
    grants:
      sso: true
customers:
  - id: acme
    subscriptions:
      - {{ plan: pro, starts: 2026-01-01, ends: {ends} }}
"#
    )
}

fn start(policies: &Path, state: &Path, clock: &str, hook: Option<&Hook>) -> Server {
    start_retrying(policies, state, clock, hook, "10ms")
}

fn start_retrying(
    policies: &Path,
    state: &Path,
    clock: &str,
    hook: Option<&Hook>,
    retry_base: &str,
) -> Server {
    start_args(
        policies,
        state,
        clock,
        hook,
        &["--notify-retry-base", retry_base],
    )
}

fn start_args(
    policies: &Path,
    state: &Path,
    clock: &str,
    hook: Option<&Hook>,
    extra: &[&str],
) -> Server {
    let state = state.display().to_string();
    let url = hook.map(Hook::url);
    let mut args = vec!["--state-dir", &state, "--test-clock", clock];
    if let Some(url) = &url {
        args.extend(["--notify-url", url]);
    }
    args.extend(extra);
    Server::spawn_with(policies, &args)
}

/// A subscription ending 2027-01-01 gets its 90-, 60- and 30-day notices exactly once
/// each, in the log and at the webhook (whose first answer, a 500, is retried); a
/// restart repeats none; a renewal to 2028-01-01 gets notices of its own, and a jump
/// inside two thresholds emits only the tighter one.
#[test]
fn each_threshold_is_noticed_once_in_the_log_and_at_the_webhook() {
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);
    let state = tempfile::tempdir().unwrap();
    let notices = state.path().join("notices");
    let hook = Hook::start(|n| if n == 0 { 500 } else { 200 });
    let mut s = start(
        policies.path(),
        state.path(),
        "2026-09-01T00:00:00Z",
        Some(&hook),
    );
    let version = s.version().expect("a snapshot");

    assert_eq!(set_clock(&s, "2026-10-02T00:00:00Z"), 0, "91 days left");
    assert_eq!(set_clock(&s, "2026-10-03T00:00:00Z"), 1, "90 days left");
    assert_eq!(set_clock(&s, "2026-10-20T00:00:00Z"), 0);
    assert_eq!(set_clock(&s, "2026-11-02T00:00:00Z"), 1, "60 days left");
    assert_eq!(set_clock(&s, "2026-12-02T00:00:00Z"), 1, "30 days left");
    assert_eq!(set_clock(&s, "2026-12-03T00:00:00Z"), 0);

    let ev = events(&notices);
    assert_eq!(ev.len(), 3, "{ev:#?}");
    let mut ids = Vec::new();
    for (e, (days, time)) in ev.iter().zip([
        (90, "2026-10-03T00:00:00Z"),
        (60, "2026-11-02T00:00:00Z"),
        (30, "2026-12-02T00:00:00Z"),
    ]) {
        assert_eq!(e["specversion"], "1.0", "{e}");
        assert_eq!(e["type"], "entitled.renewal.notice", "{e}");
        assert_eq!(e["source"], "urn:entitled:notices", "{e}");
        assert_eq!(e["subject"], "acme", "{e}");
        assert_eq!(e["datacontenttype"], "application/json", "{e}");
        assert_eq!(e["time"], time, "{e}");
        let id = e["id"].as_str().expect("an id");
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{e}"
        );
        ids.push(id.to_string());
        let d = &e["data"];
        assert_eq!(d["customer"], "acme", "{e}");
        assert_eq!(d["kind"], "subscription", "{e}");
        assert_eq!(d["plan"], "pro", "{e}");
        assert_eq!(d["trial"], false, "{e}");
        assert_eq!(d["ends_at"], "2027-01-01T00:00:00Z", "{e}");
        assert_eq!(d["threshold_days"], days, "{e}");
        assert_eq!(d["days_left"], days, "{e}");
        assert_eq!(d["snapshot"], version.as_str(), "{e}");
        assert!(d.get("feature").is_none(), "{e}");
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids are unique");

    // The webhook: the first POST was answered 500 and retried; each notice landed
    // once, as a structured CloudEvent equal to the log's line.
    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_delivered_total")
            == 3.0),
        "not delivered: {:#?}",
        hook.received()
    );
    let got = hook.received();
    assert_eq!(got.len(), 4, "three notices and one retry: {got:#?}");
    assert_eq!(got[0].status, 500);
    let first = got[0].body["id"].as_str().unwrap();
    assert_eq!(hook.count(first), (2, 1), "the 500 was retried: {got:#?}");
    for r in &got {
        assert!(
            r.content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/cloudevents+json")),
            "{r:?}"
        );
    }
    for e in &ev {
        let id = e["id"].as_str().unwrap();
        assert_eq!(hook.count(id).1, 1, "{id} accepted once");
        let body = got.iter().find(|r| r.body["id"] == id).unwrap();
        assert_eq!(&body.body, e, "the POST carries the logged event");
    }
    assert_eq!(metric(&s, "entitled_notices_total"), 3.0);
    assert_eq!(metric(&s, "entitled_notices_failed_total"), 0.0);
    assert_eq!(metric(&s, "entitled_notices_dropped_total"), 0.0);

    // A restart on the same state directory remembers every notice.
    assert!(s.stop_gracefully().success(), "{}", s.stderr());
    let s = start(
        policies.path(),
        state.path(),
        "2026-12-03T00:00:00Z",
        Some(&hook),
    );
    assert_eq!(set_clock(&s, "2026-12-10T00:00:00Z"), 0, "nothing again");
    assert_eq!(set_clock(&s, "2026-12-31T00:00:00Z"), 0, "nothing again");
    assert_eq!(events(&notices).len(), 3);
    assert_eq!(metric(&s, "entitled_notices_total"), 0.0);

    // Renewed for a year: the new end gets its own notices.
    let before = s.version();
    policies.write("policy.yaml", &subscription_policy("2028-01-01"));
    assert!(
        wait_until(Duration::from_secs(10), || s.version() != before),
        "the renewal was not loaded: {}",
        s.status()
    );
    assert_eq!(set_clock(&s, "2027-10-02T00:00:00Z"), 0, "91 days left");
    assert_eq!(set_clock(&s, "2027-10-03T00:00:00Z"), 1, "90 days left");
    // 12 days left: the 60- and 30-day thresholds are both crossed; only the 30-day
    // notice is made, and the 60-day one never comes later.
    assert_eq!(set_clock(&s, "2027-12-20T00:00:00Z"), 1);
    assert_eq!(set_clock(&s, "2027-12-21T00:00:00Z"), 0);
    let ev = events(&notices);
    assert_eq!(ev.len(), 5, "{ev:#?}");
    let renewed: Vec<(&Value, &Value)> = ev[3..]
        .iter()
        .map(|e| (&e["data"]["ends_at"], &e["data"]["threshold_days"]))
        .collect();
    assert_eq!(
        renewed,
        [
            (&json!("2028-01-01T00:00:00Z"), &json!(90)),
            (&json!("2028-01-01T00:00:00Z"), &json!(30)),
        ]
    );
    assert_eq!(ev[4]["data"]["days_left"], 12);
    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_delivered_total")
            == 2.0),
        "renewal notices not delivered: {:#?}",
        hook.received()
    );
    assert_eq!(hook.received().len(), 6, "{:#?}", hook.received());
    for e in &ev {
        let id = e["id"].as_str().unwrap();
        assert_eq!(hook.count(id).1, 1, "{id} accepted once");
    }
    assert_eq!(metric(&s, "entitled_notices_total"), 2.0);
}

/// A customer grant and an override get notices too; first seen inside several
/// thresholds, each gets only the tightest. A webhook that answers 400 is not
/// retried: every notice counts as failed after one POST.
#[test]
fn grants_and_overrides_are_noticed_and_a_4xx_is_not_retried() {
    let policies = PolicyDir::with(&[(
        "policy.yaml",
        r#"
features:
  sso: { kind: flag }
  analytics.advanced: { kind: flag }
plans:
  free:
    grants: {}
customers:
  - id: hooli
    subscriptions: [{ plan: free, starts: 2026-01-01 }]
    grants:
      - { feature: sso, grant: true, ends: 2027-03-01 }
    overrides:
      - feature: analytics.advanced
        grant: true
        expires: 2027-02-01T00:00:00Z
        approved_by: jane@vendor.example
        reason: pilot
"#,
    )]);
    let state = tempfile::tempdir().unwrap();
    let notices = state.path().join("notices");
    let hook = Hook::start(|_| 400);
    let s = start(
        policies.path(),
        state.path(),
        "2027-01-20T00:00:00Z",
        Some(&hook),
    );
    // The scan after the first snapshot may or may not have run yet: a scan at the
    // same instant makes whatever it has not, so both notices are made at the start
    // time whichever ran first. A later scan makes nothing more.
    assert!(set_clock(&s, "2027-01-20T00:00:00Z") <= 2);
    assert_eq!(set_clock(&s, "2027-01-20T00:00:01Z"), 0);
    let ev = events(&notices);
    let mut got: Vec<(String, String, u64, u64)> = ev
        .iter()
        .map(|e| {
            let d = &e["data"];
            assert!(d.get("plan").is_none(), "{e}");
            assert_eq!(e["subject"], "hooli", "{e}");
            (
                d["kind"].as_str().unwrap().to_string(),
                d["feature"].as_str().unwrap().to_string(),
                d["threshold_days"].as_u64().unwrap(),
                d["days_left"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("grant".into(), "sso".into(), 60, 40),
            ("override".into(), "analytics.advanced".into(), 30, 12),
        ]
    );
    assert_eq!(
        set_clock(&s, "2027-01-30T00:00:00Z"),
        1,
        "grant: 30 days left"
    );
    let ev = events(&notices);
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2]["data"]["kind"], "grant");
    assert_eq!(ev[2]["data"]["threshold_days"], 30);
    assert_eq!(
        set_clock(&s, "2027-02-01T00:00:00Z"),
        0,
        "the override ended"
    );

    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_failed_total")
            == 3.0),
        "not failed: {:#?}",
        hook.received()
    );
    assert_eq!(hook.received().len(), 3, "one POST each, no retry");
    assert_eq!(metric(&s, "entitled_notices_delivered_total"), 0.0);
    assert_eq!(metric(&s, "entitled_notices_total"), 3.0);
}

/// A notice the webhook has not accepted when the process stops is sent again by the
/// next one (at-least-once): the outbox keeps it until an outcome is known.
#[test]
fn an_undelivered_notice_is_sent_after_a_restart() {
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);
    let state = tempfile::tempdir().unwrap();
    let down = Hook::start(|_| 503);
    // The retry waits an hour: the notice is pending when the process stops.
    let mut s = start_retrying(
        policies.path(),
        state.path(),
        "2026-10-03T00:00:00Z",
        Some(&down),
        "1h",
    );
    assert!(
        wait_until(DELIVERY, || down.received().len() == 1),
        "no first attempt: {}",
        s.stderr()
    );
    let id = down.received()[0].body["id"].as_str().unwrap().to_string();
    assert!(s.stop_gracefully().success(), "{}", s.stderr());

    let up = Hook::start(|_| 200);
    let s = start(
        policies.path(),
        state.path(),
        "2026-10-03T00:00:00Z",
        Some(&up),
    );
    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_delivered_total")
            == 1.0),
        "the pending notice was not sent again: {:#?}\n{}",
        up.received(),
        s.stderr()
    );
    assert_eq!(up.count(&id), (1, 1));
    assert_eq!(up.received().len(), 1);
    assert_eq!(
        metric(&s, "entitled_notices_total"),
        0.0,
        "not a new notice"
    );
    assert_eq!(events(&state.path().join("notices")).len(), 1);
}

fn serve_once(policies: &Path, state: &Path, args: &[&str]) -> std::process::Output {
    output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .arg("--policies")
            .arg(policies)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", "127.0.0.1:0"])
            .args(args),
        Duration::from_secs(20),
    )
}

/// A webhook that cannot work is said at start (exit 2), not discovered per event:
/// a scheme other than http(s), or a CA file without a certificate in it.
#[test]
fn a_webhook_that_cannot_work_is_refused_at_start() {
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);
    let state = tempfile::tempdir().unwrap();
    let out = serve_once(
        policies.path(),
        state.path(),
        &["--notify-url", "ftp://billing.example/hooks"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--notify-url") && err.contains("ftp://"),
        "{err}"
    );

    let not_a_ca = state.path().join("empty.pem");
    std::fs::write(&not_a_ca, "not a certificate\n").unwrap();
    let out = serve_once(
        policies.path(),
        state.path(),
        &[
            "--notify-url",
            "https://billing.example/hooks",
            "--notify-ca-file",
            not_a_ca.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS") && err.contains("empty.pem") && err.contains("no certificate"),
        "{err}"
    );
}

/// An https webhook gets its notices over TLS, trusting the CA given with
/// `--notify-ca-file`; trusting another CA, the receiver's certificate does not
/// verify, the handshake fails and nothing is sent (the notice counts as failed after
/// its attempts).
#[test]
fn an_https_webhook_gets_its_notices_over_verified_tls() {
    let certs = tempfile::tempdir().unwrap();
    super::support::make_certs(certs.path());
    let ca = certs.path().join("ca.crt");
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);

    let hook = Hook::start_tls(certs.path(), |_| 200);
    assert!(
        hook.url().starts_with("https://127.0.0.1:"),
        "{}",
        hook.url()
    );
    let state = tempfile::tempdir().unwrap();
    let s = start_args(
        policies.path(),
        state.path(),
        "2026-10-03T00:00:00Z",
        Some(&hook),
        &["--notify-ca-file", ca.to_str().unwrap()],
    );
    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_delivered_total")
            == 1.0),
        "not delivered over TLS: {:#?}\n{}",
        hook.received(),
        s.stderr()
    );
    let ev = events(&state.path().join("notices"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    let got = hook.received();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].body, ev[0], "the POST carries the logged event");
    assert_eq!(
        got[0].content_type.as_deref(),
        Some("application/cloudevents+json; charset=utf-8")
    );

    // The same receiver, trusted through a CA that did not sign its certificate.
    let untrusted = Hook::start_tls(certs.path(), |_| 200);
    let other = tempfile::tempdir().unwrap();
    super::support::make_certs(other.path());
    let other_ca = other.path().join("ca.crt");
    let state = tempfile::tempdir().unwrap();
    let s = start_args(
        policies.path(),
        state.path(),
        "2026-10-03T00:00:00Z",
        Some(&untrusted),
        &[
            "--notify-ca-file",
            other_ca.to_str().unwrap(),
            "--notify-retry-base",
            "10ms",
            "--notify-max-attempts",
            "2",
        ],
    );
    assert!(
        wait_until(DELIVERY, || metric(&s, "entitled_notices_failed_total")
            == 1.0),
        "an unverified receiver was not refused: {}",
        s.stderr()
    );
    assert_eq!(metric(&s, "entitled_notices_delivered_total"), 0.0);
    assert!(
        untrusted.received().is_empty(),
        "{:#?}",
        untrusted.received()
    );
    let log = s.stderr();
    assert!(
        log.contains("giving up") && log.contains("certificate"),
        "the failure does not say why: {log}"
    );
}

/// One process per notices directory: a second one refuses to start rather than
/// compact the files the first is appending to.
#[test]
fn a_second_process_on_the_same_notices_dir_refuses_to_start() {
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);
    let notices = tempfile::tempdir().unwrap();
    let dir = notices.path().to_str().unwrap();
    let _first = Server::start_with(
        policies.path(),
        &["--durability", "memory", "--notices-dir", dir],
    );
    let out = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .arg("--policies")
            .arg(policies.path())
            .args(["--durability", "memory", "--notices-dir", dir])
            // Listeners are bound before the directory is taken: no fixed port here.
            .args(["--listen", "127.0.0.1:0", "--grpc-listen", "off"])
            .current_dir(tempfile::tempdir().unwrap().path()),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another entitled process"), "{err}");
}

/// The webhook URL is logged at start-up without its secrets: the password in its
/// userinfo and the values of its query are replaced by `***`.
#[test]
fn the_webhook_url_is_logged_without_its_secrets() {
    let policies = PolicyDir::with(&[("policy.yaml", &subscription_policy("2027-01-01"))]);
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().display().to_string();
    let s = Server::spawn_with(
        policies.path(),
        &[
            "--state-dir",
            &state_arg,
            "--notify-url",
            "http://billing:s3cr3t-pw@127.0.0.1:9/hook?token=T0K3N&v=2",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || s
            .stderr()
            .contains("renewal notices on")),
        "{}",
        s.stderr()
    );
    let log = s.stderr();
    assert!(!log.contains("s3cr3t-pw"), "{log}");
    assert!(!log.contains("T0K3N"), "{log}");
    assert!(
        log.contains("http://***@127.0.0.1:9/hook?token=***&v=***"),
        "{log}"
    );
}
