//! The customer portal, its tokens and the operator console: over plain HTTP (token
//! minting, expiry on the test clock, forged and swapped tokens, escaping, console
//! sign-in), and in a real headless Chromium driving the real binary
//! (tests/browser/portal_check.py): what a person sees on the pages.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Resp, Server, output_within, request, wait_until};

const FEATURES: &str = "features:
  reports: { kind: flag, description: Scheduled reports }
  sso: { kind: flag, description: Single sign-on }
  audit.export: { kind: flag, description: Audit log export }
  api.calls: { kind: quota, unit: call, description: Public API calls }
  seats: { kind: seats, description: Named user seats }
";

const PLANS: &str = "plans:
  starter:
    grants:
      reports: true
      api.calls: { limit: 10, per: month }
      seats: { limit: 5 }
  business:
    grants:
      reports: true
      sso: true
      audit.export: true
      api.calls: { limit: 1000, per: month }
      seats: { limit: 50 }
  '<script>alert(3)</script>':
    grants:
      reports: true
";

const CUSTOMERS: &str = r#"customers:
  - id: acme
    name: Acme Corp
    subscriptions:
      - { plan: starter, starts: 2026-01-01, ends: 2027-01-01 }
    overrides:
      - feature: sso
        grant: true
        expires: 2026-03-01T00:00:00Z
        approved_by: jane@vendor.example
        reason: SSO pilot
  - id: globex
    name: Globex Secret Name
    subscriptions:
      - { plan: business, starts: 2026-01-01 }
  - id: "<script>alert(1)</script>"
    name: "<img src=x onerror=alert(2)>"
    subscriptions:
      - { plan: starter, starts: 2026-01-01 }
      - { plan: "<script>alert(3)</script>", starts: 2026-01-01, ends: 2026-06-01 }
"#;

const CLOCK: &str = "2026-01-10T00:00:00Z";
const ADMIN: &str = "ops-admin-token-0123456789";

struct Setup {
    policies: PolicyDir,
    secrets: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let policies = PolicyDir::with(&[
            ("features.yaml", FEATURES),
            ("plans.yaml", PLANS),
            ("customers.yaml", CUSTOMERS),
        ]);
        let secrets = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            secrets.path().join("portal.key"),
            "c2VjcmV0LXBvcnRhbC1rZXktZm9yLXRlc3RzLW9ubHktMDEyMzQ1Njc4OQ==\n",
        )
        .expect("key");
        std::fs::write(
            secrets.path().join("admins"),
            format!("# admins\nops:{ADMIN}\n"),
        )
        .expect("admins");
        Setup { policies, secrets }
    }

    fn key(&self) -> String {
        self.secrets.path().join("portal.key").display().to_string()
    }

    fn admins(&self) -> String {
        self.secrets.path().join("admins").display().to_string()
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--test-clock".into(),
            CLOCK.into(),
            "--portal-key-file".into(),
            self.key(),
            "--admin-token-file".into(),
            self.admins(),
            "--reload-debounce".into(),
            "20ms".into(),
        ]
    }

    fn start(&self) -> Server {
        let flags = self.flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Server::start_with(self.policies.path(), &flags)
    }
}

fn bearer(s: &Server, method: &str, path: &str, token: &str, body: &[u8]) -> Resp {
    let auth = format!("Bearer {token}");
    request(
        s.addr,
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
}

fn mint(s: &Server, body: Value) -> Resp {
    bearer(
        s,
        "POST",
        "/v1/portal/tokens",
        ADMIN,
        body.to_string().as_bytes(),
    )
}

fn token(s: &Server, customer: &str, ttl: Option<&str>) -> String {
    let mut body = json!({ "customer": customer });
    if let Some(t) = ttl {
        body["ttl"] = json!(t);
    }
    let r = mint(s, body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().expect("token").to_string()
}

fn portal_json(s: &Server, token: &str) -> Resp {
    bearer(s, "GET", "/v1/portal/customer", token, b"")
}

fn portal_page(s: &Server, token: &str) -> Resp {
    let q: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    s.get(&format!("/portal?token={q}"))
}

/// Minting needs an admin token; a token shows its customer as JSON until it
/// expires on the server's clock, then 401.
#[test]
fn a_portal_token_shows_its_customer_until_it_expires_on_the_test_clock() {
    let setup = Setup::new();
    let s = setup.start();
    for auth in ["", "Bearer wrong"] {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth)]
        };
        let r = request(
            s.addr,
            "POST",
            "/v1/portal/tokens",
            &headers,
            br#"{"customer":"acme"}"#,
        );
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let r = mint(&s, json!({ "customer": "nobody" }));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unknown_customer");
    for (body, field) in [
        (json!({ "customer": "acme", "ttl": "soon" }), "ttl"),
        (json!({ "customer": "acme", "ttl": "400d" }), "ttl"),
        (json!({ "customer": "" }), "customer"),
        (json!({ "customer": "acme", "scope": "all" }), "scope"),
    ] {
        let r = mint(&s, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["field"], field, "{body}");
    }

    let r = mint(&s, json!({ "customer": "acme" }));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["expires_at"], "2026-01-11T00:00:00Z", "24 h by default");
    let t = v["token"].as_str().expect("token");
    let r = portal_json(&s, t);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["customer"]["id"], "acme");
    assert_eq!(v["renewal"]["ends"], "2027-01-01T00:00:00Z");
    assert_eq!(v["renewal"]["days_left"], 356);
    assert_eq!(v["upgrade_options"], json!(["business"]));
    let calls = v["features"]
        .as_array()
        .expect("features")
        .iter()
        .find(|f| f["feature"] == "api.calls")
        .expect("api.calls listed");
    assert_eq!(
        (&calls["limit"], &calls["used"], &calls["percent"]),
        (&json!(10), &json!(0), &json!(0))
    );
    assert_eq!(calls["resets_at"], "2026-02-01T00:00:00Z");
    assert!(
        !r.text().contains("jane@vendor.example"),
        "approvals stay with the operator"
    );

    let short = token(&s, "acme", Some("1h"));
    s.post("/v1/test-clock", &json!({ "advance": "59m" }));
    assert_eq!(portal_json(&s, &short).status, 200);
    s.post("/v1/test-clock", &json!({ "advance": "1m" }));
    let r = portal_json(&s, &short);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("expired"), "{}", r.text());
    let page = portal_page(&s, &short);
    assert_eq!(page.status, 401);
    assert!(
        page.text().contains("This link has expired"),
        "{}",
        page.text()
    );
    // The 24-hour token still works.
    assert_eq!(portal_json(&s, t).status, 200);
}

/// A token signed with another key, with its customer swapped or its expiry pushed
/// out, or a console session used as a portal token, is refused; a token for one
/// customer never shows another.
#[test]
fn forged_and_swapped_tokens_are_refused_and_never_show_another_customer() {
    let setup = Setup::new();
    let s = setup.start();
    let t = token(&s, "acme", None);
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 4, "{t}");
    let b64 = |x: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x)
    };
    let other_key = entitled::portal::Key::new(&[9; 32]);
    let exp = entitled::time::Timestamp::parse("2026-01-11T00:00:00Z").expect("time");
    let forged = [
        other_key.mint_portal("acme", exp),
        format!("{}.{}.{}.{}", parts[0], b64("globex"), parts[2], parts[3]),
        format!("{}.{}.{}.{}", parts[0], parts[1], "4102444800", parts[3]),
        format!("{}.{}.{}.{}", "ecs1", parts[1], parts[2], parts[3]),
        "not-a-token".to_string(),
    ];
    for f in &forged {
        let r = portal_json(&s, f);
        assert_eq!(r.status, 401, "{f}: {}", r.text());
        let page = portal_page(&s, f);
        assert_eq!(page.status, 401, "{f}");
        assert!(page.text().contains("This link is not valid"), "{f}");
        assert!(!page.text().contains("Globex"), "{f}");
    }
    let r = s.get("/portal");
    assert_eq!(r.status, 401);
    assert!(r.text().contains("Sign-in link required"));

    // The genuine token, with another customer asked for beside it.
    for path in [
        format!("/portal?customer=globex&token={t}"),
        format!("/portal?token={t}&id=globex"),
    ] {
        let r = s.get(&path);
        assert_eq!(r.status, 200, "{path}");
        let html = r.text();
        assert!(html.contains("Acme Corp"), "{path}");
        assert!(
            !html.contains("Globex") && !html.contains("globex"),
            "{path}"
        );
    }
    let v = portal_json(&s, &t).json();
    assert!(!v.to_string().contains("globex"), "{v}");
}

/// A customer id and name made of markup reach the page as text, and the page
/// forbids scripts (Content-Security-Policy) besides.
#[test]
fn customer_text_is_escaped_on_the_portal_and_the_console() {
    let setup = Setup::new();
    let s = setup.start();
    let id = "<script>alert(1)</script>";
    let r = portal_page(&s, &token(&s, id, None));
    assert_eq!(r.status, 200, "{}", r.text());
    let html = r.text();
    assert!(
        !html.contains("<script") && !html.contains("<img"),
        "{html}"
    );
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(
        html.contains("&lt;img src=x onerror=alert(2)&gt;"),
        "{html}"
    );
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(
        !csp.contains("script-src"),
        "no script source is allowed: {csp}"
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let q: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let r = bearer(&s, "GET", &format!("/console/customer?id={q}"), ADMIN, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("<script") && !r.text().contains("<img"));
    let r = bearer(&s, "GET", &format!("/console?q={q}"), ADMIN, b"");
    assert!(!r.text().contains("<script") && r.text().contains("&lt;script&gt;"));
}

/// The console: off without an admin token file; with one, a sign-in form, a
/// session cookie (HttpOnly, SameSite=Strict) from a good admin token only, bearer
/// access for scripts, and sign-in refused from another site's page.
#[test]
fn the_console_needs_an_admin_and_signs_in_with_a_strict_cookie() {
    let setup = Setup::new();
    let off = Server::start_with(setup.policies.path(), &["--portal-key-file", &setup.key()]);
    let r = off.get("/console");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("The console is not enabled"));
    let r = mint(&off, json!({ "customer": "acme" }));
    assert_eq!(
        r.status,
        403,
        "no admin token file: no minting: {}",
        r.text()
    );
    // And the portal is off without its key.
    let nokey = Server::start_with(
        setup.policies.path(),
        &["--admin-token-file", &setup.admins()],
    );
    assert_eq!(nokey.get("/portal?token=x").status, 404);
    assert_eq!(mint(&nokey, json!({ "customer": "acme" })).status, 404);

    let s = setup.start();
    let r = s.get("/console");
    assert_eq!(r.status, 401);
    assert!(
        r.text().contains("action=\"/console/login\""),
        "{}",
        r.text()
    );
    let form = |token: &str, origin: Option<&str>| {
        let body = format!("token={token}");
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(o) = origin {
            h.push(("origin", o));
        }
        request(s.addr, "POST", "/console/login", &h, body.as_bytes())
    };
    let r = form("wrong", None);
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    let r = form(ADMIN, Some("http://evil.example"));
    assert_eq!(r.status, 403, "a cross-site sign-in is refused");
    assert!(r.header("set-cookie").is_none());
    let r = form(ADMIN, Some("http://entitled.test"));
    assert_eq!(r.status, 303, "{}", r.text());
    let cookie = r
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let session = cookie.split(';').next().expect("name=value");
    let r = request(s.addr, "GET", "/console", &[("cookie", session)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("id=\"admin-name\">ops<"));
    // A tampered session is a sign-in form again.
    let tampered = format!("{}x", session);
    let r = request(s.addr, "GET", "/console", &[("cookie", &tampered)], b"");
    assert_eq!(r.status, 401);
    // Removing the admin's token ends the session.
    std::fs::write(setup.admins(), "other:another-token-0123456789\n").expect("rewrite");
    let r = request(s.addr, "GET", "/console", &[("cookie", session)], b"");
    assert_eq!(r.status, 401, "a session whose token was removed is over");
    let r = bearer(&s, "GET", "/console", "another-token-0123456789", b"");
    assert_eq!(r.status, 200);
    let r = bearer(&s, "GET", "/console", ADMIN, b"");
    assert_eq!(r.status, 401);
}

/// The console keeps a failed reload in its history, with the file:line:col of each
/// error, after the status has forgotten it (a later good load clears `last_error`).
#[test]
fn the_console_lists_a_broken_reload_with_its_position_and_keeps_it() {
    let setup = Setup::new();
    let s = setup.start();
    let console = || bearer(&s, "GET", "/console", ADMIN, b"").text();
    assert!(console().contains("No failed load since start."));
    setup.policies.write(
        "features.yaml",
        &format!("{FEATURES}  broken: {{ kind: nonsense }}\n"),
    );
    assert!(
        wait_until(Duration::from_secs(20), || !s.status()["last_error"]
            .is_null()),
        "the reload did not fail"
    );
    let d = &s.status()["last_error"]["diagnostics"][0];
    let at = format!("features.yaml:{}:{}", d["line"], d["column"]);
    assert!(d["line"].as_u64().is_some_and(|l| l > 0), "{d}");
    let html = console();
    assert!(html.contains("The last load failed"), "{html}");
    assert!(html.contains(&at), "{at} not in {html}");
    setup.policies.write("features.yaml", FEATURES);
    assert!(
        wait_until(Duration::from_secs(20), || s.status()["last_error"]
            .is_null()),
        "the fixed file did not load"
    );
    let html = console();
    assert!(html.contains("has been fixed since"), "{html}");
    assert!(html.contains(&at), "the history keeps {at}: {html}");
    assert!(html.contains("data-outcome=\"failed\""));
}

/// `entitled portal-token` mints, offline, a token the server accepts.
#[test]
fn the_cli_mints_a_token_the_server_accepts() {
    let setup = Setup::new();
    let s = setup.start();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled")).args([
            "portal-token",
            "--customer",
            "acme",
            "--ttl",
            "2h",
            "--key-file",
            &setup.key(),
            "--from",
            CLOCK,
        ]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let r = portal_json(&s, &t);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["token_expires_at"], "2026-01-10T02:00:00Z");
    let short = std::fs::write(setup.key(), "short").map(|_| setup.key());
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled")).args([
            "portal-token",
            "--customer",
            "acme",
            "--key-file",
            &short.expect("written"),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 are needed"));
}

/// Chromium, chromedriver and Selenium, or why not.
fn browser_missing() -> Option<String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .any(|p| Path::new(p).exists());
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .any(|p| Path::new(p).exists());
    let selenium = Command::new("python3")
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    match (chromium, driver, selenium) {
        (true, true, true) => None,
        _ => Some(format!(
            "chromium: {chromium}, chromedriver: {driver}, python3 selenium: {selenium} (bash .ci/run installs them)"
        )),
    }
}

/// The portal and the console in headless Chromium against the real binary: the
/// features, a quota bar at 30% after 3 of 10 consumes, the renewal date, the 401
/// pages, no other customer's data, escaped markup, phone width, and a broken
/// reload's file:line:col on the console (tests/browser/portal_check.py).
#[test]
fn the_portal_and_the_console_in_a_real_browser() {
    if let Some(why) = browser_missing() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the browser test cannot run under CI: {why}");
        }
        eprintln!("skipping the browser test: {why}");
        return;
    }
    let setup = Setup::new();
    let flags = setup.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = Server::spawn_with(setup.policies.path(), &flags);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/portal_check.py");
    let out = output_within(
        Command::new("python3")
            .arg(&script)
            .arg("check")
            .args(["--base", &format!("http://{}", s.addr)])
            .args(["--admin-token", ADMIN])
            .arg("--policies")
            .arg(setup.policies.path()),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all browser checks passed"), "{stdout}");
    eprintln!("{stdout}");
    // The refusals the browser met are counted, by result and never by customer.
    let metrics = s.get("/metrics").text();
    for result in ["ok", "forged", "expired", "missing"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "entitled_portal_access_total{{result=\"{result}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {result} series in:\n{metrics}"));
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(n >= 1.0, "{line}");
    }
}
