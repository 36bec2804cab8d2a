//! Connections: HTTP/1 keep-alive, h2c with prior knowledge, and the header read
//! timeout that cuts off slow and silent clients.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{Conn, Server};

use super::policy;

#[test]
fn http1_keep_alive_serves_two_requests_on_one_connection() {
    let dir = policy();
    let s = Server::start(dir.path());
    let mut c = Conn::open(s.addr);
    let body = br#"{"customer":"acme","feature":"api.calls","amount":2}"#;
    c.send(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body,
        false,
    );
    let r1 = c.read_response();
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert_eq!(r1.json()["used"], 2);
    assert_ne!(r1.header("connection"), Some("close"), "{:?}", r1.headers);
    c.send(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body,
        false,
    );
    let r2 = c.read_response();
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.json()["used"], 4);
    // And a third, a GET, closing.
    c.send("GET", "/v1/status", &[], b"", true);
    let r3 = c.read_response();
    assert_eq!(r3.status, 200);
    assert!(
        c.closed_within(Duration::from_secs(3)),
        "not closed after Connection: close"
    );
}

#[test]
fn h2c_prior_knowledge_is_served() {
    let has_curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_curl {
        eprintln!("note: curl not found; skipping the h2c test");
        return;
    }
    let dir = policy();
    let s = Server::start(dir.path());
    let out = std::process::Command::new("curl")
        .args([
            "--http2-prior-knowledge",
            "-s",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "%{http_version}",
        ])
        .arg(format!("http://{}/v1/status", s.addr))
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text
        .rsplit_once('}')
        .map_or(("", text.as_str()), |(b, v)| (b, v));
    assert_eq!(version, "2", "curl output: {text}");
    let v: Value = serde_json::from_str(&format!("{body}}}")).expect("status JSON over h2");
    assert_eq!(
        v["snapshot"]["version"],
        s.version().expect("version").as_str()
    );

    // A decision over h2 too.
    let out = std::process::Command::new("curl")
        .args([
            "--http2-prior-knowledge",
            "-s",
            "--max-time",
            "10",
            "-H",
            "content-type: application/json",
        ])
        .args([
            "-d",
            r#"{"customer":"acme","feature":"api.calls","amount":3}"#,
        ])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("http://{}/v1/consume", s.addr))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or((&text, ""));
    assert_eq!(tail, "2 200", "{text}");
    let d: Value = serde_json::from_str(body).expect("decision JSON");
    assert_eq!(d["used"], 3, "{d}");
}

#[test]
fn slowloris_headers_are_cut_off_by_the_header_read_timeout() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--header-read-timeout", "300ms"]);
    let mut slow = Conn::open(s.addr);
    slow.send_raw(b"POST /v1/consume HTTP/1.1\r\nhost: entitled.test\r\ncontent-type: appl");
    let started = Instant::now();
    assert!(
        slow.closed_within(Duration::from_secs(3)),
        "a connection with half its headers was still open after 3 s"
    );
    eprintln!("slow connection closed after {:?}", started.elapsed());
    // The server still answers everyone else.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

#[test]
fn a_connection_that_sends_nothing_is_closed_by_the_header_read_timeout() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--header-read-timeout", "300ms"]);
    // Nothing at all; one byte; part of the HTTP/2 preface (too short to pick h1 or h2).
    for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let mut idle = Conn::open(s.addr);
        idle.send_raw(sent);
        assert!(
            idle.closed_within(Duration::from_secs(3)),
            "a connection that sent only {:?} was still open after 3 s",
            String::from_utf8_lossy(sent)
        );
    }
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

#[test]
fn silent_connections_cannot_starve_the_server() {
    let dir = policy();
    let s = Server::start_with(
        dir.path(),
        &["--header-read-timeout", "300ms", "--max-connections", "2"],
    );
    let _a = Conn::open(s.addr);
    let _b = Conn::open(s.addr);
    // Both permits are taken by connections that say nothing; once the header read
    // timeout closes them, a real request is answered.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}

/// A request that declares a body and then sends none of it (or only a little) is
/// answered 408 once `--body-read-timeout` has passed and its connection closed, so it
/// cannot hold a connection slot for ever (`--header-read-timeout` only bounds the
/// headers).
#[test]
fn a_body_that_never_arrives_is_cut_off_by_the_body_read_timeout() {
    let dir = policy();
    let s = Server::start_with(
        dir.path(),
        &["--body-read-timeout", "300ms", "--max-connections", "2"],
    );
    for sent in [&b""[..], b"{\"customer\":\"ac"] {
        let mut slow = Conn::open(s.addr);
        let mut req = b"POST /v1/consume HTTP/1.1\r\nhost: entitled.test\r\n\
            content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
            .to_vec();
        req.extend_from_slice(sent);
        slow.send_raw(&req);
        let r = slow.read_response();
        assert_eq!(r.status, 408, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "request_timeout", "{}", r.text());
        assert!(
            slow.closed_within(Duration::from_secs(3)),
            "the connection stayed open after its 408"
        );
    }
    // Both connection slots are free again.
    let d = s.check("acme", "support.tier");
    assert_eq!(d["allowed"], true, "{d}");
}
