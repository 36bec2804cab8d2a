//! Gateway admission against the real binary: the HTTP forward-auth at
//! `/v1/authz/{path…}` (as Envoy ext_authz HTTP, nginx `auth_request` and Traefik
//! `forwardAuth` call it) and the gRPC `Authorization/Check` and `ShouldRateLimit`
//! services, called with Envoy's own protobuf types. Time moves only through the test
//! clock. The same answers through a real Envoy are in `envoy.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use serde_json::json;

use super::support::{Conn, PolicyDir, Resp, Server, free_port, metric_value, request};

/// 2030-01-10: the month window is January 2030 and resets 2030-02-01T00:00:00Z.
const T0: &str = "2030-01-10T00:00:00Z";
/// Seconds from T0 to the reset of the month window.
const TO_RESET: u64 = 22 * 86_400;

const FEATURES: &str = r#"
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota }
  api.rate: { kind: rate }
  search.rate: { kind: rate }
  storage.gb: { kind: quota }
"#;

const PLANS: &str = r#"
plans:
  free:
    grants:
      api.calls: { limit: 3, per: month, reset: calendar }
      api.rate: { limit: 1, per: 1s, burst: 100 }
      search.rate: { limit: 1, per: 1s, burst: 2 }
      storage.gb: { limit: 1, per: never }
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 5, per: month, reset: calendar }
      api.rate: { limit: 1, per: 10s, burst: 3 }
"#;

const CUSTOMERS: &str = r#"
customers:
  - id: tiny
    subscriptions: [{ plan: free, starts: 2029-01-01 }]
  - id: big
    subscriptions: [{ plan: pro, starts: 2029-01-01 }]
  - id: burst
    subscriptions: [{ plan: pro, starts: 2029-01-01 }]
"#;

const ROUTES: &str = r#"
routes:
  - match: { path_prefix: /api/reports, methods: [GET] }
    customer: { header: x-customer-id }
    require: [analytics.advanced]
    consume: { feature: api.calls, amount: 1 }
  - match: { path_prefix: /api/burst }
    customer: { header: x-customer-id }
    rate: api.rate
  - match: { path: /api/upload, methods: [POST] }
    customer: { header: x-customer-id }
    consume: { feature: storage.gb, amount: 1 }
  - match: { path_prefix: /api/me, headers: { x-tenant-mode: jwt } }
    customer: { jwt_claim: sub, header: x-jwt-payload }
  - match: { path_prefix: /api/ }
    customer: { header: x-customer-id }
"#;

fn policies() -> PolicyDir {
    PolicyDir::with(&[
        ("features.yaml", FEATURES),
        ("plans.yaml", PLANS),
        ("customers.yaml", CUSTOMERS),
        ("routes.yaml", ROUTES),
    ])
}

fn start(extra: &[&str]) -> (PolicyDir, Server) {
    start_by(Server::start_with, extra)
}

/// As [`start`], as a process of its own: `/metrics` is the process's.
fn spawn(extra: &[&str]) -> (PolicyDir, Server) {
    start_by(Server::spawn_with, extra)
}

fn start_by(how: fn(&Path, &[&str]) -> Server, extra: &[&str]) -> (PolicyDir, Server) {
    let dir = policies();
    let mut args = vec!["--durability", "memory", "--test-clock", T0];
    args.extend_from_slice(extra);
    let s = how(dir.path(), &args);
    (dir, s)
}

fn authz(s: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(s.addr, method, &format!("/v1/authz{path}"), headers, b"")
}

fn num(r: &Resp, h: &str) -> u64 {
    r.header(h)
        .unwrap_or_else(|| panic!("no {h} header: {}", r.text()))
        .parse()
        .unwrap_or_else(|e| panic!("{h}: {e}"))
}

#[test]
fn forward_auth_admits_by_plan_and_reports_the_quota() {
    let (_d, s) = start(&[]);
    let ok = authz(
        &s,
        "GET",
        "/api/reports/q1?year=2029",
        &[("x-customer-id", "big")],
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(ok.body.is_empty(), "an admission has no body");
    assert_eq!(num(&ok, "ratelimit-limit"), 5);
    assert_eq!(num(&ok, "ratelimit-remaining"), 4);
    assert_eq!(num(&ok, "ratelimit-reset"), TO_RESET);
    assert_eq!(ok.header("x-entitled-customer"), Some("big"));
    assert_eq!(ok.header("x-entitled-plan"), Some("pro"));
    assert_eq!(ok.header("x-entitled-snapshot"), s.version().as_deref());

    // Free lacks the feature: 403 with the decision and the plan that would lift it.
    let no = authz(&s, "GET", "/api/reports/q1", &[("x-customer-id", "tiny")]);
    assert_eq!(no.status, 403);
    assert_eq!(no.header("content-type"), Some("application/json"));
    assert_eq!(no.header("x-entitled-reason"), Some("not_entitled"));
    let body = no.json();
    assert_eq!(body["reason"], "not_entitled");
    assert_eq!(body["feature"], "analytics.advanced");
    assert_eq!(body["upgrade"], json!(["pro"]));
    assert!(no.header("x-entitled-customer").is_none());
    // The denial counted nothing: the quota the route would consume is untouched.
    let c = s.decide(
        "/v1/check",
        &json!({"customer": "tiny", "feature": "api.calls"}),
    );
    assert_eq!(c["used"], 0, "{c}");
}

#[test]
fn forward_auth_refuses_unknown_customers_and_unmatched_paths() {
    let (_d, s) = start(&[]);
    for (headers, why) in [
        (vec![("x-customer-id", "nobody")], "unknown id"),
        (vec![], "no header"),
        (vec![("x-customer-id", "  ")], "blank header"),
    ] {
        let r = authz(&s, "GET", "/api/things", &headers);
        assert_eq!(r.status, 403, "{why}: {}", r.text());
        assert_eq!(r.json()["reason"], "unknown_customer", "{why}");
    }
    // No route: the default is deny.
    let r = authz(&s, "GET", "/internal/admin", &[("x-customer-id", "big")]);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "no_route");
    // Method mismatch falls through to the next route: GET-only reports, POST → /api/.
    let r = authz(&s, "POST", "/api/reports", &[("x-customer-id", "tiny")]);
    assert_eq!(
        r.status,
        200,
        "the catch-all /api/ route admits it: {}",
        r.text()
    );

    let (_d2, open) = start(&["--unmatched", "allow"]);
    let r = authz(&open, "GET", "/internal/admin", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // Allow applies to unmatched paths only: a matched route still decides.
    let r = authz(&open, "GET", "/api/reports", &[("x-customer-id", "tiny")]);
    assert_eq!(r.status, 403);
}

#[test]
fn forwarded_method_and_uri_are_what_is_checked() {
    let (_d, s) = start(&[]);
    // Traefik forwardAuth: a GET to the bare endpoint, the original in X-Forwarded-*.
    let r = authz(
        &s,
        "GET",
        "",
        &[
            ("x-customer-id", "tiny"),
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/api/upload?name=a.bin"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(num(&r, "ratelimit-limit"), 1);
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    // The same upload again: the lifetime allotment is gone, and never resets, so it
    // cannot be retried later: 403, not 429.
    let r = authz(
        &s,
        "GET",
        "",
        &[
            ("x-customer-id", "tiny"),
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/api/upload"),
        ],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["reason"], "quota_exhausted");
    assert!(r.header("retry-after").is_none());
}

#[test]
fn paths_are_normalized_so_a_route_cannot_be_sidestepped() {
    let (_d, s) = start(&[]);
    for path in [
        "/api/%72eports",
        "/api/%72%65ports/q1",
        "/api/public/%2e%2e/reports",
        "/api//reports",
        "/api/./reports",
        "/api/public/../reports",
        "/api/reports/../reports/x",
    ] {
        let r = authz(&s, "GET", path, &[("x-customer-id", "tiny")]);
        assert_eq!(
            r.status,
            403,
            "{path} must meet the reports route: {}",
            r.text()
        );
        assert_eq!(r.json()["reason"], "not_entitled", "{path}");
    }
}

#[test]
fn quota_running_out_is_429_with_retry_after_until_the_reset() {
    let (_d, s) = start(&[]);
    let h = [("x-customer-id", "big")];
    for left in (0..5).rev() {
        let r = authz(&s, "GET", "/api/reports", &h);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(num(&r, "ratelimit-remaining"), left);
    }
    let r = authz(&s, "GET", "/api/reports", &h);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(num(&r, "retry-after"), TO_RESET);
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    assert_eq!(num(&r, "ratelimit-limit"), 5);
    let body = r.json();
    assert_eq!(body["reason"], "quota_exhausted");
    assert_eq!(body["used"], 5);
    // A day later, Retry-After counts down; at the reset the quota is back.
    s.decide("/v1/test-clock", &json!({"advance": "1d"}));
    let r = authz(&s, "GET", "/api/reports", &h);
    assert_eq!(num(&r, "retry-after"), TO_RESET - 86_400);
    s.decide("/v1/test-clock", &json!({"set": "2030-02-01T00:00:00Z"}));
    let r = authz(&s, "GET", "/api/reports", &h);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(num(&r, "ratelimit-remaining"), 4);
}

#[test]
fn a_burst_trips_the_rate_limit() {
    let (_d, s) = start(&[]);
    let h = [("x-customer-id", "burst")];
    // Pro: 1 per 10 s with a burst of 3. The headers report the capacity (the burst)
    // and the time until it is whole again.
    for left in (0..3).rev() {
        let r = authz(&s, "GET", "/api/burst", &h);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(num(&r, "ratelimit-limit"), 3);
        assert_eq!(num(&r, "ratelimit-remaining"), left);
        assert_eq!(num(&r, "ratelimit-reset"), 10 * (3 - left));
    }
    let r = authz(&s, "GET", "/api/burst", &h);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["reason"], "rate_limited");
    assert_eq!(r.header("x-entitled-reason"), Some("rate_limited"));
    assert_eq!(num(&r, "retry-after"), 10);
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    s.decide("/v1/test-clock", &json!({"advance": "10s"}));
    assert_eq!(authz(&s, "GET", "/api/burst", &h).status, 200);
    // Another customer's limiter is its own.
    assert_eq!(
        authz(&s, "GET", "/api/burst", &[("x-customer-id", "big")]).status,
        200
    );
}

#[test]
fn the_customer_can_come_from_a_forwarded_jwt_payload() {
    let (_d, s) = start(&[]);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.encode(br#"{"sub":"big","iss":"https://id.example"}"#);
    let mode = ("x-tenant-mode", "jwt");
    let r = authz(&s, "GET", "/api/me", &[mode, ("x-jwt-payload", &payload)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-entitled-customer"), Some("big"));
    let bad = b64.encode(br#"{"iss":"https://id.example"}"#);
    let r = authz(&s, "GET", "/api/me", &[mode, ("x-jwt-payload", &bad)]);
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["reason"], "unknown_customer");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("sub")),
        "{body}"
    );
    let r = authz(&s, "GET", "/api/me", &[mode, ("x-jwt-payload", "%%%")]);
    assert_eq!(r.status, 403);
}

#[test]
fn no_snapshot_means_503_never_an_admission() {
    let dir = PolicyDir::with(&[("broken.yaml", "features: [")]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let s = Server::start_with(
        dir.path(),
        &["--durability", "memory", "--grpc-listen", &listen],
    );
    let r = authz(&s, "GET", "/api/reports", &[("x-customer-id", "big")]);
    assert_eq!(r.status, 503, "{}", r.text());
    // Over gRPC: an RPC error, so Envoy applies its failure mode as for an HTTP 5xx.
    runtime().block_on(async {
        let url = format!("http://{listen}");
        let mut c = connect_auth(&url).await;
        let e = c
            .check(reports_request("big"))
            .await
            .expect_err("no snapshot: no decision");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let mut rl = RateLimitServiceClient::connect(url).await.expect("connect");
        let e = rl
            .should_rate_limit(RateLimitRequest::default())
            .await
            .expect_err("no snapshot: no decision");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    });
}

#[test]
fn gateway_answers_are_counted_without_customer_ids() {
    let (_d, s) = spawn(&[]);
    authz(&s, "GET", "/api/reports", &[("x-customer-id", "big")]);
    authz(&s, "GET", "/api/reports", &[("x-customer-id", "tiny")]);
    authz(&s, "GET", "/nowhere", &[]);
    let m = s.get("/metrics").text();
    let series = |status: &str, reason: &str| {
        metric_value(
            &m,
            &format!(
                r#"entitled_gateway_requests_total{{api="authz_http",status="{status}",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(series("200", "granted"), Some(1.0), "{m}");
    assert_eq!(series("403", "not_entitled"), Some(1.0));
    assert_eq!(series("403", "no_route"), Some(1.0));
    assert!(
        !m.contains("\"big\""),
        "customer ids are never label values"
    );
}

// --- gRPC -------------------------------------------------------------------------

fn grpc_server() -> (PolicyDir, Server, String) {
    grpc_server_by(start)
}

fn grpc_server_by(how: fn(&[&str]) -> (PolicyDir, Server)) -> (PolicyDir, Server, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (d, s) = how(&["--grpc-listen", &listen]);
    (d, s, format!("http://{listen}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn connect_auth(url: &str) -> AuthorizationClient<tonic::transport::Channel> {
    // The server prints its address before the gRPC port is bound: bounded retries.
    for _ in 0..200 {
        if let Ok(c) = AuthorizationClient::connect(url.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no gRPC server at {url}");
}

fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// A `Check` of `GET /api/reports` for `customer`.
fn reports_request(customer: &str) -> CheckRequest {
    check_request("GET", "/api/reports", &[("x-customer-id", customer)])
}

/// [`reports_request`], answered.
async fn reports(
    c: &mut AuthorizationClient<tonic::transport::Channel>,
    customer: &str,
) -> CheckResponse {
    c.check(reports_request(customer))
        .await
        .expect("check")
        .into_inner()
}

fn header_of<'a>(hs: &'a [HeaderValueOption], key: &str) -> Option<&'a str> {
    hs.iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

fn status_code(r: &CheckResponse) -> i32 {
    r.status.as_ref().map_or(-1, |s| s.code)
}

#[test]
fn grpc_check_answers_like_the_forward_auth() {
    let (_d, s, url) = grpc_server();
    runtime().block_on(async {
        let mut c = connect_auth(&url).await;
        let ok = c
            .check(check_request(
                "GET",
                "/api/reports/q1?x=1",
                &[("x-customer-id", "big")],
            ))
            .await
            .expect("check")
            .into_inner();
        assert_eq!(status_code(&ok), 0);
        let Some(HttpResponse::OkResponse(okr)) = &ok.http_response else {
            panic!("expected an ok_response: {ok:?}");
        };
        assert_eq!(header_of(&okr.headers, "x-entitled-plan"), Some("pro"));
        assert_eq!(header_of(&okr.headers, "x-entitled-customer"), Some("big"));
        assert_eq!(
            header_of(&okr.response_headers_to_add, "ratelimit-remaining"),
            Some("4")
        );
        assert_eq!(
            header_of(&okr.response_headers_to_add, "ratelimit-limit"),
            Some("5")
        );
        assert_eq!(
            header_of(&okr.response_headers_to_add, "x-entitled-plan"),
            None,
            "the plan goes to the upstream, not to the client"
        );

        let no = reports(&mut c, "tiny").await;
        assert_eq!(status_code(&no), 7, "PERMISSION_DENIED");
        let Some(HttpResponse::DeniedResponse(d)) = &no.http_response else {
            panic!("expected a denied_response: {no:?}");
        };
        assert_eq!(d.status.as_ref().map(|s| s.code), Some(403));
        let body: serde_json::Value = serde_json::from_str(&d.body).expect("JSON body");
        assert_eq!(body["reason"], "not_entitled");
        assert_eq!(body["upgrade"], json!(["pro"]));
        assert_eq!(
            header_of(&d.headers, "content-type"),
            Some("application/json")
        );

        for _ in 0..4 {
            reports(&mut c, "big").await;
        }
        let over = reports(&mut c, "big").await;
        assert_eq!(status_code(&over), 8, "RESOURCE_EXHAUSTED");
        let Some(HttpResponse::DeniedResponse(d)) = &over.http_response else {
            panic!("expected a denied_response: {over:?}");
        };
        assert_eq!(d.status.as_ref().map(|s| s.code), Some(429));
        assert_eq!(
            header_of(&d.headers, "retry-after"),
            Some(&*TO_RESET.to_string())
        );

        // A request without HTTP attributes is the caller's mistake.
        let err = c.check(CheckRequest::default()).await.expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    });
    // The HTTP and gRPC paths share the counters: the quota is spent for both.
    let r = authz(&s, "GET", "/api/reports", &[("x-customer-id", "big")]);
    assert_eq!(r.status, 429);
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
        ..Default::default()
    }
}

async fn should(
    c: &mut RateLimitServiceClient<tonic::transport::Channel>,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest {
        domain: "entitled".into(),
        descriptors,
        hits_addend,
    })
    .await
    .expect("should_rate_limit")
    .into_inner()
}

#[test]
fn grpc_rate_limit_service_follows_each_plan() {
    let (_d, s, url) = grpc_server_by(spawn);
    runtime().block_on(async {
        let _ = connect_auth(&url).await;
        let mut c = RateLimitServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let search =
            |who: &'static str| descriptor(&[("customer", who), ("feature", "search.rate")], None);

        // Free's search.rate: 1/s, burst 2. Two pass, the third is over.
        let r = should(&mut c, vec![search("tiny")], 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        let st = &r.statuses[0];
        let limit = st.current_limit.as_ref().expect("current_limit");
        assert_eq!(limit.requests_per_unit, 1);
        assert_eq!(limit.unit, 1, "SECOND");
        assert_eq!(limit.name, "search.rate");
        assert_eq!(st.limit_remaining, 1);
        should(&mut c, vec![search("tiny")], 0).await;
        let r = should(&mut c, vec![search("tiny")], 0).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let st = &r.statuses[0];
        assert_eq!(st.code, Code::OverLimit as i32);
        assert_eq!(st.limit_remaining, 0);
        // Reset: until the limiter is whole again (2 s for a burst of 2 at 1/s);
        // Retry-After for the client: until one more passes.
        assert_eq!(st.duration_until_reset.as_ref().map(|d| d.seconds), Some(2));
        let retry: Vec<(&str, &str)> = r
            .response_headers_to_add
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(retry, vec![("retry-after", "1")]);

        // hits_addend: the request's, then a descriptor's own; 0 on a descriptor
        // reports without counting.
        let calls = |who: &'static str, hits| {
            descriptor(&[("customer", who), ("feature", "api.calls")], hits)
        };
        let r = should(&mut c, vec![calls("big", None)], 2).await;
        assert_eq!(r.statuses[0].limit_remaining, 3, "{r:?}");
        let month = r.statuses[0].current_limit.as_ref().expect("limit");
        assert_eq!((month.requests_per_unit, month.unit), (5, 5), "5 per MONTH");
        assert_eq!(
            r.statuses[0]
                .duration_until_reset
                .as_ref()
                .map(|d| d.seconds),
            Some(TO_RESET as i64)
        );
        let r = should(&mut c, vec![calls("big", Some(0))], 7).await;
        assert_eq!(
            r.statuses[0].limit_remaining, 3,
            "hits_addend 0 counts nothing"
        );
        let r = should(&mut c, vec![calls("big", Some(3))], 7).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        let r = should(&mut c, vec![calls("big", Some(1))], 0).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);

        // Several descriptors: each answered in its place; one over makes the whole over.
        let r = should(
            &mut c,
            vec![
                descriptor(&[("remote_address", "10.0.0.1")], None),
                descriptor(&[("customer", "nobody"), ("feature", "search.rate")], None),
                descriptor(&[("feature", "search.rate")], None),
                descriptor(&[("customer", "big"), ("feature", "no.such.feature")], None),
                search("big"),
            ],
            0,
        )
        .await;
        let codes: Vec<i32> = r.statuses.iter().map(|s| s.code).collect();
        let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
        assert_eq!(codes, vec![ok, over, over, over, ok], "{r:?}");
        assert_eq!(r.overall_code, over);
        assert!(r.statuses[0].current_limit.is_none(), "not ours to limit");
    });
    let m = s.get("/metrics").text();
    assert!(
        metric_value(
            &m,
            r#"entitled_gateway_requests_total{api="ratelimit_grpc",status="429",reason="over_limit"}"#
        )
        .is_some_and(|v| v >= 3.0),
        "{m}"
    );
}

/// The gRPC port holds at most `--max-connections` connections, and closes one that
/// sends nothing within `--header-read-timeout`: idle sockets cannot pile up. With one
/// slot taken by a client, an idle socket waits unserved in the backlog (it is not even
/// timed out); once the client leaves, it is accepted and closed for its silence, and
/// the port serves again.
#[test]
fn grpc_connections_are_capped_and_silent_ones_closed() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_d, _s) = start(&[
        "--grpc-listen",
        &listen,
        "--max-connections",
        "1",
        "--header-read-timeout",
        "300ms",
    ]);
    let url = format!("http://{listen}");
    let addr: std::net::SocketAddr = listen.parse().expect("address");
    let rt = runtime();

    // Silent from the start: closed at the preface deadline.
    let mut silent = Conn::open(addr);
    assert!(
        silent.closed_within(Duration::from_secs(3)),
        "a gRPC connection that sent nothing was still open after 3 s"
    );

    // A client takes the one slot; a silent socket is not served meanwhile. (The
    // client's connection lives on a runtime of its own: dropping that closes it.)
    let client_rt = runtime();
    let mut client = client_rt.block_on(connect_auth(&url));
    let ok = client_rt.block_on(reports(&mut client, "big"));
    assert_eq!(status_code(&ok), 0, "{ok:?}");
    let mut waiting = Conn::open(addr);
    assert!(
        !waiting.closed_within(Duration::from_secs(1)),
        "a second connection was served past --max-connections 1"
    );
    drop(client);
    drop(client_rt);
    assert!(
        waiting.closed_within(Duration::from_secs(3)),
        "the waiting connection was never accepted (and timed out) after the client left"
    );
    let mut again = rt.block_on(connect_auth(&url));
    let ok = rt.block_on(reports(&mut again, "big"));
    assert_eq!(status_code(&ok), 0, "{ok:?}");
}

/// A customer named twice is refused on every way in, never picked from: the header
/// sent twice to the forward-auth (403, whichever value comes first), the header twice
/// in a gRPC `Check`'s `header_map` (PERMISSION_DENIED), a JWT payload with two `sub`
/// claims (403), and a rate-limit descriptor with two `customer` or `feature` entries
/// (OVER_LIMIT: an RPC error would let Envoy admit by its failure mode). Nothing is
/// counted for any of them.
#[test]
fn an_ambiguous_customer_is_refused_everywhere() {
    let (_d, s, url) = grpc_server();
    let ambiguous = |r: &Resp| {
        assert_eq!(r.status, 403, "{}", r.text());
        let body = r.json();
        assert_eq!(body["reason"], "unknown_customer", "{body}");
        body["message"].as_str().unwrap_or_default().to_string()
    };
    for pair in [["big", "tiny"], ["tiny", "big"], ["big", "big"]] {
        let headers = [("x-customer-id", pair[0]), ("x-customer-id", pair[1])];
        let m = ambiguous(&authz(&s, "GET", "/api/reports", &headers));
        assert!(m.contains("`x-customer-id` is sent more than once"), "{m}");
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let twice = b64.encode(br#"{"sub":"tiny","sub":"big"}"#);
    let mode = ("x-tenant-mode", "jwt");
    let m = ambiguous(&authz(
        &s,
        "GET",
        "/api/me",
        &[mode, ("x-jwt-payload", &twice)],
    ));
    assert!(m.contains("claim `sub` appears twice"), "{m}");
    let once = b64.encode(br#"{"sub":"big"}"#);
    let headers = [
        mode,
        ("x-jwt-payload", once.as_str()),
        ("x-jwt-payload", &once),
    ];
    let m = ambiguous(&authz(&s, "GET", "/api/me", &headers));
    assert!(m.contains("`x-jwt-payload` is sent more than once"), "{m}");

    runtime().block_on(async {
        let mut c = connect_auth(&url).await;
        let mut req = check_request("GET", "/api/reports", &[]);
        if let Some(http) = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            let entry = |v: &str| envoy_types::pb::envoy::config::core::v3::HeaderValue {
                key: "X-Customer-Id".into(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            };
            http.header_map = Some(envoy_types::pb::envoy::config::core::v3::HeaderMap {
                headers: vec![entry("big"), entry("tiny")],
            });
        }
        let r = c.check(req).await.expect("check").into_inner();
        assert_eq!(status_code(&r), 7, "PERMISSION_DENIED: {r:?}");
        let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
            panic!("expected a denied_response: {r:?}");
        };
        assert!(d.body.contains("sent more than once"), "{}", d.body);

        let mut rl = RateLimitServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let calls = [("customer", "big"), ("feature", "api.calls")];
        for extra in [
            ("customer", "tiny"),
            ("feature", "api.rate"),
            ("customer", "big"),
        ] {
            let mut entries = calls.to_vec();
            entries.insert(1, extra);
            let r = should(&mut rl, vec![descriptor(&entries, None)], 1).await;
            assert_eq!(r.overall_code, Code::OverLimit as i32, "{entries:?}: {r:?}");
            assert!(r.statuses[0].current_limit.is_none(), "{r:?}");
        }
        // The same descriptor without the repeat is answered, and is the first count.
        let r = should(&mut rl, vec![descriptor(&calls, Some(0))], 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
        assert_eq!(
            r.statuses[0].limit_remaining, 5,
            "nothing was counted: {r:?}"
        );
    });
}

/// A gRPC connection that sent its preface and then no request is closed at
/// `--grpc-idle-timeout` (keep-alive pings would not do it: a live peer answers
/// them). A client whose connection was closed for idleness connects again.
#[test]
fn an_idle_grpc_connection_is_closed() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_d, _s) = start(&["--grpc-listen", &listen, "--grpc-idle-timeout", "300ms"]);
    let url = format!("http://{listen}");
    let addr: std::net::SocketAddr = listen.parse().expect("address");
    let rt = runtime();
    let mut c = rt.block_on(connect_auth(&url));
    let ok = rt.block_on(reports(&mut c, "big"));
    assert_eq!(status_code(&ok), 0, "{ok:?}");

    let mut idle = Conn::open(addr);
    idle.send_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "a gRPC connection with no request was still open 5 s after a 300 ms idle timeout"
    );
    // The client's own connection went idle too; its next call reconnects.
    let mut answered = false;
    for _ in 0..3 {
        if let Ok(r) = rt.block_on(c.check(reports_request("big"))) {
            assert_eq!(status_code(r.get_ref()), 0, "{r:?}");
            answered = true;
            break;
        }
    }
    assert!(answered, "no answer after the idle connection was closed");
}
