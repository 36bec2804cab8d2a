//! OpenFeature Remote Evaluation Protocol (OFREP) against the real binary: every
//! error shape and status of the protocol over HTTP, tokens, metrics, the event
//! stream over a real socket, and the real providers — the Python SDK's
//! (`openfeature-provider-ofrep`, tests/ofrep/python_client.py) and the web SDK's on
//! Node (`@openfeature/ofrep-web-provider`, tests/ofrep/node/bulk_refresh.mjs).
//!
//! The providers are installed by `.ci/run`; outside CI a test whose client is
//! missing says so and passes, under `CI=true` it fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::support::{PolicyDir, Resp, Server, metric_value, output_within, request, wait_until};

const FEATURES: &str = r#"
features:
  sso: { kind: flag }
  api.calls: { kind: quota, unit: call }
  api.rate: { kind: rate }
  seats: { kind: seats }
  max_upload_mb: { kind: value, type: number, prefer: max }
  cpu.share: { kind: value, type: number, prefer: max }
  support.tier: { kind: value, type: string, order: [community, standard, priority] }
"#;

const PLANS: &str = r#"
plans:
  free:
    grants:
      api.calls: { limit: 100, per: month }
  pro:
    includes: [free]
    grants:
      sso: true
      api.calls: { limit: 1000, per: month }
      api.rate: { limit: 10, per: 1s, burst: 20 }
      seats: { limit: 5 }
      max_upload_mb: 250
      cpu.share: 2.5
      support.tier: standard
"#;

const CUSTOMERS: &str = r#"
customers:
  - id: acme
    subscriptions:
      - plan: pro
        starts: 2026-01-01
  - id: northwind
    subscriptions:
      - plan: free
        starts: 2026-01-01
"#;

/// How many features the catalog above has: a bulk answer has one flag each.
const FEATURE_COUNT: usize = 7;

fn policies() -> PolicyDir {
    PolicyDir::with(&[
        ("features.yaml", FEATURES),
        ("plans.yaml", PLANS),
        ("customers.yaml", CUSTOMERS),
    ])
}

fn serve(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--durability",
        "memory",
        "--test-clock",
        "2026-12-01T00:00:00Z",
    ];
    args.extend_from_slice(extra);
    let s = Server::spawn_with(dir, &args);
    assert!(
        wait_until(Duration::from_secs(20), || s.get("/readyz").status == 200),
        "not ready: {}",
        s.stderr()
    );
    s
}

fn post(s: &Server, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    request(s.addr, "POST", path, &h, body.as_bytes())
}

fn flag(s: &Server, key: &str, context: Value) -> Resp {
    post(
        s,
        &format!("/ofrep/v1/evaluate/flags/{key}"),
        &[],
        &json!({ "context": context }).to_string(),
    )
}

fn bulk(s: &Server, headers: &[(&str, &str)], context: Value) -> Resp {
    post(
        s,
        "/ofrep/v1/evaluate/flags",
        headers,
        &json!({ "context": context }).to_string(),
    )
}

/// An error answer: the status, JSON, and exactly the members the protocol gives it
/// (`key` on the single route, `errorCode`, `errorDetails`).
fn assert_error(r: &Resp, status: u16, code: &str, key: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["errorCode"], code, "{v}");
    assert!(
        v["errorDetails"].as_str().is_some_and(|d| !d.is_empty()),
        "{v}"
    );
    let mut members: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    members.sort_unstable();
    let want: &[&str] = if key.is_some() {
        &["errorCode", "errorDetails", "key"]
    } else {
        &["errorCode", "errorDetails"]
    };
    assert_eq!(members, want, "{v}");
    if let Some(k) = key {
        assert_eq!(v["key"], k, "{v}");
    }
}

/// Every metadata value is a string, number or boolean (providers drop the rest).
fn assert_primitive_metadata(v: &Value) {
    let m = v["metadata"].as_object().unwrap_or_else(|| panic!("{v}"));
    for (k, val) in m {
        assert!(
            val.is_string() || val.is_number() || val.is_boolean(),
            "metadata `{k}` is {val}"
        );
    }
}

#[test]
fn single_evaluation_maps_every_kind() {
    let dir = policies();
    let s = serve(dir.path(), &[]);
    let acme = json!({ "targetingKey": "acme" });

    let r = flag(&s, "sso", acme.clone());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["key"], "sso");
    assert_eq!(v["value"], true);
    assert_eq!(v["reason"], "TARGETING_MATCH");
    assert_eq!(v["variant"], "granted");
    assert_eq!(v["metadata"]["plan"], "pro");
    assert_eq!(v["metadata"]["source"], "subscription");
    assert_eq!(v["metadata"]["kind"], "flag");
    assert_eq!(v["metadata"]["snapshot"], s.version().unwrap().as_str());
    assert_primitive_metadata(&v);

    // Not entitled: decided false for this customer; the plans that grant it as one
    // comma-separated string.
    let v = flag(&s, "sso", json!({ "targetingKey": "northwind" })).json();
    assert_eq!(
        (&v["value"], &v["reason"]),
        (&json!(false), &json!("TARGETING_MATCH"))
    );
    assert_eq!(v["variant"], "not_entitled");
    assert_eq!(v["metadata"]["upgrade"], "pro");

    // Values: number, fraction, string; absent (the caller's default) when not granted.
    assert_eq!(flag(&s, "max_upload_mb", acme.clone()).json()["value"], 250);
    assert_eq!(flag(&s, "cpu.share", acme.clone()).json()["value"], 2.5);
    assert_eq!(
        flag(&s, "support.tier", acme.clone()).json()["value"],
        "standard"
    );
    let v = flag(&s, "support.tier", json!({ "targetingKey": "northwind" })).json();
    assert!(v.get("value").is_none(), "{v}");
    assert_eq!(v["reason"], "DEFAULT");

    // A quota is "one more unit allowed now", with its figures; a check counts nothing.
    let v = flag(&s, "api.calls", acme.clone()).json();
    assert_eq!(v["value"], true);
    assert_eq!(v["metadata"]["limit"], 1000);
    assert_eq!(v["metadata"]["used"], 0);
    assert_eq!(v["metadata"]["remaining"], 1000);
    assert_eq!(v["metadata"]["resets_at"], "2027-01-01T00:00:00Z");
    assert_primitive_metadata(&v);
    assert_eq!(
        flag(&s, "api.calls", acme.clone()).json()["metadata"]["used"],
        0
    );
    let v = flag(&s, "api.rate", acme.clone()).json();
    assert_eq!(
        (&v["value"], &v["metadata"]["burst"]),
        (&json!(true), &json!(20))
    );
    let v = flag(&s, "seats", acme.clone()).json();
    assert_eq!(
        (&v["value"], &v["metadata"]["remaining"]),
        (&json!(true), &json!(5))
    );

    // Consumed to the limit through the JSON API, the quota answers false.
    let used = s.decide(
        "/v1/consume",
        &json!({ "customer": "northwind", "feature": "api.calls", "amount": 100 }),
    );
    assert_eq!(used["allowed"], true, "{used}");
    let v = flag(&s, "api.calls", json!({ "targetingKey": "northwind" })).json();
    assert_eq!(v["value"], false, "{v}");
    assert_eq!(v["variant"], "quota_exhausted");
    assert_eq!(v["metadata"]["remaining"], 0);

    // An unknown customer is a decision: false, DEFAULT, and why.
    let v = flag(&s, "sso", json!({ "targetingKey": "nobody" })).json();
    assert_eq!(
        (&v["value"], &v["reason"]),
        (&json!(false), &json!("DEFAULT"))
    );
    assert_eq!(v["metadata"]["reason"], "unknown_customer");

    // Other context keys are scope context; numbers and booleans are taken as text,
    // members beside `context` ignored.
    let r = post(
        &s,
        "/ofrep/v1/evaluate/flags/sso",
        &[],
        r#"{"context":{"targetingKey":"acme","asset":"chiller-7","n":3,"b":true},"extra":1}"#,
    );
    assert_eq!(r.json()["value"], true, "{}", r.text());
}

#[test]
fn every_error_has_the_protocol_shape_and_status() {
    let dir = policies();
    let s = serve(dir.path(), &[]);
    let path = "/ofrep/v1/evaluate/flags/sso";
    let single = |body: &str| post(&s, path, &[], body);

    assert_error(&single("{"), 400, "PARSE_ERROR", Some("sso"));
    assert_error(&single("[1]"), 400, "PARSE_ERROR", Some("sso"));
    assert_error(
        &single(r#"{"context":"acme"}"#),
        400,
        "PARSE_ERROR",
        Some("sso"),
    );
    assert_error(&single(""), 400, "TARGETING_KEY_MISSING", Some("sso"));
    assert_error(&single("{}"), 400, "TARGETING_KEY_MISSING", Some("sso"));
    assert_error(
        &single(r#"{"context":{"asset":"a"}}"#),
        400,
        "TARGETING_KEY_MISSING",
        Some("sso"),
    );
    assert_error(
        &single(r#"{"context":{"targetingKey":42}}"#),
        400,
        "INVALID_CONTEXT",
        Some("sso"),
    );
    let r = single(r#"{"context":{"targetingKey":"acme","at":"2026-01-01T00:00:00Z"}}"#);
    assert_error(&r, 400, "INVALID_CONTEXT", Some("sso"));
    assert!(
        r.json()["errorDetails"]
            .as_str()
            .unwrap()
            .contains("`context.at`")
    );
    assert_error(
        &single(r#"{"context":{"targetingKey":"acme","asset":["a"]}}"#),
        400,
        "INVALID_CONTEXT",
        Some("sso"),
    );
    let too_long = "x".repeat(2000);
    assert_error(
        &single(&json!({ "context": { "targetingKey": "acme", "asset": too_long } }).to_string()),
        400,
        "INVALID_CONTEXT",
        Some("sso"),
    );

    let r = flag(&s, "no.such.flag", json!({ "targetingKey": "acme" }));
    assert_error(&r, 404, "FLAG_NOT_FOUND", Some("no.such.flag"));
    // A key is percent-decoded from the path.
    let r = post(
        &s,
        "/ofrep/v1/evaluate/flags/no%20such",
        &[],
        r#"{"context":{"targetingKey":"acme"}}"#,
    );
    assert_error(&r, 404, "FLAG_NOT_FOUND", Some("no such"));

    // Bulk failures carry no key.
    assert_error(
        &post(&s, "/ofrep/v1/evaluate/flags", &[], "{}"),
        400,
        "TARGETING_KEY_MISSING",
        None,
    );
    assert_error(
        &post(&s, "/ofrep/v1/evaluate/flags", &[], "{"),
        400,
        "PARSE_ERROR",
        None,
    );

    // Neither route nor method: GENERAL, with the protocol's statuses.
    let r = request(s.addr, "GET", path, &[], b"");
    assert_error(&r, 405, "GENERAL", Some("sso"));
    assert_eq!(r.header("allow"), Some("POST"));
    assert_error(&s.get("/ofrep/v1/nothing"), 404, "GENERAL", None);
    let r = post(&s, "/ofrep/v1/events", &[], "{}");
    assert_error(&r, 405, "GENERAL", None);

    // The configuration extension.
    let v = s.get("/ofrep/v1/configuration").json();
    assert_eq!(v["name"], "entitled");
    assert_eq!(
        v["capabilities"]["cacheInvalidation"]["polling"]["enabled"],
        true
    );
}

#[test]
fn no_snapshot_is_429_with_retry_after_in_seconds() {
    let dir = PolicyDir::with(&[("features.yaml", "features: [")]);
    let s = Server::spawn_with(dir.path(), &["--durability", "memory"]);
    let r = flag(&s, "sso", json!({ "targetingKey": "acme" }));
    assert_error(&r, 429, "GENERAL", Some("sso"));
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = bulk(&s, &[], json!({ "targetingKey": "acme" }));
    assert_error(&r, 429, "GENERAL", None);
    assert_eq!(r.header("retry-after"), Some("1"));
}

#[test]
fn bulk_answers_every_feature_with_an_etag_and_304_when_unchanged() {
    let dir = policies();
    let s = serve(dir.path(), &[]);
    let acme = json!({ "targetingKey": "acme" });
    let r = bulk(&s, &[], acme.clone());
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let flags = v["flags"].as_array().unwrap();
    assert_eq!(flags.len(), FEATURE_COUNT, "{v}");
    for f in flags {
        assert!(f["key"].is_string() && f["reason"].is_string() && f["variant"].is_string());
        assert_primitive_metadata(f);
        // The same answer as the single route.
        let one = flag(&s, f["key"].as_str().unwrap(), acme.clone()).json();
        assert_eq!(&one, f);
    }
    assert_eq!(v["metadata"]["snapshot"], s.version().unwrap().as_str());
    assert_eq!(
        v["eventStreams"],
        json!([{ "type": "sse", "endpoint": { "requestUri": "/ofrep/v1/events" } }])
    );
    let tag = r.header("etag").expect("ETag").to_string();
    assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");

    // Unchanged: 304, empty, with the tag; also as a weak tag, or one of a list.
    for inm in [
        tag.clone(),
        format!("W/{tag}"),
        format!("\"other\", {tag}"),
        "*".into(),
    ] {
        let r = bulk(&s, &[("if-none-match", &inm)], acme.clone());
        assert_eq!(r.status, 304, "If-None-Match: {inm}: {}", r.text());
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(tag.as_str()));
    }
    // Another context (another customer) is another answer.
    let r = bulk(
        &s,
        &[("if-none-match", &tag)],
        json!({ "targetingKey": "northwind" }),
    );
    assert_eq!(r.status, 200);
    assert_ne!(r.header("etag"), Some(tag.as_str()));

    // Usage changes the answer (a quota's figures), so the tag.
    s.decide(
        "/v1/consume",
        &json!({ "customer": "acme", "feature": "api.calls", "amount": 1 }),
    );
    let r = bulk(&s, &[("if-none-match", &tag)], acme.clone());
    assert_eq!(r.status, 200);
    let tag = r.header("etag").unwrap().to_string();

    // A policy change is a new snapshot: a fresh answer.
    let version = s.version();
    dir.write(
        "plans.yaml",
        &PLANS.replace("support.tier: standard", "support.tier: priority"),
    );
    assert!(wait_until(Duration::from_secs(20), || s.version() != version));
    let r = bulk(&s, &[("if-none-match", &tag)], acme.clone());
    assert_eq!(r.status, 200);
    let tier = r.json()["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "support.tier")
        .cloned()
        .unwrap();
    assert_eq!(tier["value"], "priority");
}

#[test]
fn tokens_guard_the_ofrep_routes_only() {
    let dir = policies();
    let work = tempfile::tempdir().unwrap();
    let tokens = work.path().join("ofrep-tokens");
    std::fs::write(&tokens, "web:pk-123\n").unwrap();
    let s = serve(
        dir.path(),
        &["--ofrep-token-file", tokens.to_str().unwrap()],
    );
    let body = r#"{"context":{"targetingKey":"acme"}}"#;
    let path = "/ofrep/v1/evaluate/flags/sso";

    let r = post(&s, path, &[], body);
    assert_error(&r, 401, "GENERAL", Some("sso"));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_error(
        &post(&s, path, &[("authorization", "Bearer nope")], body),
        403,
        "GENERAL",
        Some("sso"),
    );
    assert_error(
        &post(&s, path, &[("x-api-key", "nope")], body),
        403,
        "GENERAL",
        Some("sso"),
    );
    let r = post(&s, path, &[("authorization", "Bearer pk-123")], body);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(&s, path, &[("x-api-key", "pk-123")], body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_error(&s.get("/ofrep/v1/events"), 401, "GENERAL", None);
    // The JSON API stays open, as before.
    assert_eq!(s.check("acme", "sso")["allowed"], true);

    // Rotated by editing the file; gone, nobody is let in.
    std::fs::write(&tokens, "web:pk-456\n").unwrap();
    assert_eq!(post(&s, path, &[("x-api-key", "pk-123")], body).status, 403);
    assert_eq!(post(&s, path, &[("x-api-key", "pk-456")], body).status, 200);
    std::fs::remove_file(&tokens).unwrap();
    assert_error(
        &post(&s, path, &[("x-api-key", "pk-456")], body),
        500,
        "GENERAL",
        Some("sso"),
    );
}

#[test]
fn evaluations_are_counted_by_mode_kind_and_reason() {
    let dir = policies();
    let s = serve(dir.path(), &[]);
    flag(&s, "sso", json!({ "targetingKey": "acme" }));
    flag(&s, "sso", json!({ "targetingKey": "northwind" }));
    bulk(&s, &[], json!({ "targetingKey": "acme" }));
    let text = s.get("/metrics").text();
    let count = |labels: &str| {
        metric_value(
            &text,
            &format!("entitled_ofrep_evaluations_total{{{labels}}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        count(r#"mode="single",kind="flag",reason="granted""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"mode="single",kind="flag",reason="not_entitled""#),
        1.0
    );
    assert_eq!(count(r#"mode="bulk",kind="flag",reason="granted""#), 1.0);
    assert_eq!(count(r#"mode="bulk",kind="value",reason="granted""#), 3.0);
    // Each is a check like any other.
    let checks = |labels: &str| {
        metric_value(&text, &format!("entitled_decisions_total{{{labels}}}")).unwrap_or(0.0)
    };
    assert_eq!(
        checks(r#"op="check",kind="flag",allowed="true",reason="granted""#),
        2.0,
        "{text}"
    );
    assert!(!text.contains("acme"), "a customer id in the metrics");
}

/// An open event stream: the response head, then what arrives.
struct Stream {
    sock: TcpStream,
    seen: String,
}

impl Stream {
    fn open(s: &Server, headers: &str) -> Stream {
        let mut sock = TcpStream::connect(s.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(
            sock,
            "GET /ofrep/v1/events HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n{headers}\r\n"
        )
        .unwrap();
        let mut st = Stream {
            sock,
            seen: String::new(),
        };
        assert!(
            st.wait_for("retry: 1000", Duration::from_secs(10)),
            "{}",
            st.seen
        );
        st
    }

    /// Reads until `what` has arrived or `within` has passed.
    fn wait_for(&mut self, what: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(what) && Instant::now() < deadline {
            match self.sock.read(&mut buf) {
                Ok(0) => return self.seen.contains(what),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {} // the read timeout: look at the deadline again
            }
        }
        self.seen.contains(what)
    }
}

#[test]
fn event_stream_says_refetch_when_the_snapshot_changes() {
    let dir = policies();
    let mut s = serve(dir.path(), &[]);
    let mut st = Stream::open(&s, "");
    let head = st.seen.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    assert!(!st.seen.contains("refetchEvaluation"), "{}", st.seen);

    let version = s.version();
    dir.write(
        "plans.yaml",
        &PLANS.replace("max_upload_mb: 250", "max_upload_mb: 500"),
    );
    assert!(
        st.wait_for("\"type\":\"refetchEvaluation\"", Duration::from_secs(20)),
        "{}",
        st.seen
    );
    let now = s.version().unwrap();
    assert_ne!(Some(now.clone()), version);
    assert!(
        st.seen.contains(&format!("\"etag\":\"\\\"{now}\\\"\"")),
        "{}",
        st.seen
    );
    assert!(st.seen.contains("event: message"), "{}", st.seen);

    // A client that reconnects having missed a change is told at once.
    let mut again = Stream::open(&s, "last-event-id: 0\r\n");
    assert!(
        again.wait_for("refetchEvaluation", Duration::from_secs(10)),
        "{}",
        again.seen
    );

    // Open streams do not hold up a graceful shutdown.
    let started = Instant::now();
    assert!(s.stop_gracefully().success());
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Whether a client's packages are installed; under CI they must be.
fn installed(what: &str, ok: bool, how: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("CI is set but {what} is not installed ({how}; .ci/run installs it)");
    }
    eprintln!("SKIP: {what} is not installed ({how}); this OFREP client test did not run");
    false
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_sdk_with_the_ofrep_provider() {
    let has = Command::new("python3")
        .args([
            "-c",
            "import openfeature, openfeature.contrib.provider.ofrep",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed(
        "openfeature-sdk + openfeature-provider-ofrep",
        has,
        "pip install openfeature-sdk openfeature-provider-ofrep",
    ) {
        return;
    }
    let dir = policies();
    let s = serve(dir.path(), &[]);
    let out = output_within(
        Command::new("python3")
            .arg(repo().join("tests/ofrep/python_client.py"))
            .arg(format!("http://{}", s.addr)),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("python_client.py: {}", text.trim());
    assert!(out.status.success(), "python_client.py failed:\n{text}");
    assert!(text.contains("ok"), "{text}");
}

#[test]
fn web_provider_bulk_304_and_refresh_on_node() {
    let node_dir = repo().join("tests/ofrep/node");
    let has_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let has_modules = node_dir
        .join("node_modules/@openfeature/ofrep-web-provider")
        .is_dir()
        && node_dir.join("node_modules/eventsource").is_dir();
    if !installed(
        "node with @openfeature/ofrep-web-provider",
        has_node && has_modules,
        "npm ci --prefix tests/ofrep/node",
    ) {
        return;
    }
    let dir = policies();
    let s = serve(dir.path(), &[]);
    let out = output_within(
        Command::new("node")
            .arg(node_dir.join("bulk_refresh.mjs"))
            .arg(format!("http://{}", s.addr))
            .arg(dir.join("plans.yaml")),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("bulk_refresh.mjs: {}", text.trim());
    assert!(out.status.success(), "bulk_refresh.mjs failed:\n{text}");
    assert!(text.contains("ok:"), "{text}");
}
