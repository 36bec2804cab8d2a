//! Strict requests: a malformed body is 400 naming the field, an operation on the
//! wrong kind 400, a body over the limit 413, an unknown path 404 and a wrong method
//! 405; none of them counts anything.

use serde_json::{Value, json};

use super::support::{Conn, Server, request, request_head};

use super::{assert_error, policy, used};

#[test]
fn malformed_requests_are_400_naming_the_field_and_count_nothing() {
    let dir = policy();
    let s = Server::start(dir.path());
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 2}),
    );
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"customer":"acme","feature":"api.calls""#, None),
        ("not json", None),
        ("", None),
        ("[1,2]", None),
        (r#"{"feature":"api.calls"}"#, Some("customer")),
        (r#"{"customer":"acme"}"#, Some("feature")),
        (r#"{"customer":7,"feature":"api.calls"}"#, Some("customer")),
        (r#"{"customer":"","feature":"api.calls"}"#, Some("customer")),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":0}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":-1}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":1.5}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":"1"}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":1e30}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amount":null}"#,
            Some("amount"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","amout":1}"#,
            Some("amout"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","context":{"asset":1}}"#,
            Some("context.asset"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","context":"chiller-7"}"#,
            Some("context"),
        ),
        (
            r#"{"customer":"acme","feature":"api.calls","at":"2026-01-01"}"#,
            Some("at"),
        ),
    ];
    for (body, field) in cases {
        let r = s.post_raw("/v1/consume", body);
        assert_eq!(r.status, 400, "{body} -> {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], "bad_request", "{body} -> {v}");
        match field {
            Some(f) => assert_eq!(v["error"]["field"], *f, "{body} -> {v}"),
            None => assert!(
                v["error"].get("field").is_none_or(Value::is_null),
                "{body} -> {v}"
            ),
        }
    }
    // The same on check (a 400 there too) — and nothing was ever counted.
    let r = s.post_raw(
        "/v1/check",
        r#"{"customer":"acme","feature":"api.calls","amount":1.5}"#,
    );
    assert_error(&r, 400, "bad_request", Some("amount"));
    let r = s.post_raw(
        "/v1/check",
        r#"{"customer":"acme","feature":"api.calls","idempotency_key":"k"}"#,
    );
    assert_error(&r, 400, "bad_request", Some("idempotency_key"));
    assert_eq!(used(&s, "acme", "api.calls"), 2);
}

#[test]
fn an_operation_on_the_wrong_kind_is_400_naming_the_kind() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.post(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "analytics.advanced"}),
    );
    let v = assert_error(&r, 400, "bad_request", Some("feature"));
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("flag"),
        "message does not name the kind: {msg}"
    );
    let r = s.post(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "api.calls", "holder": "u1"}),
    );
    let v = assert_error(&r, 400, "bad_request", Some("feature"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("quota"),
        "{v}"
    );
    assert_eq!(used(&s, "acme", "api.calls"), 0);
}

#[test]
fn a_body_over_the_limit_is_413_and_counts_nothing() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--body-limit", "1024"]);
    // Just under the limit: a normal decision (padding in a context value).
    let small =
        json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(900)}});
    let d = s.decide("/v1/consume", &small);
    assert_eq!(d["used"], 1, "{d}");
    // Over it: announced by Content-Length, refused before the body is read (the body
    // is not sent, so the close cannot reset the connection under the answer).
    let big = serde_json::to_vec(
        &json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(2000)}}),
    )
    .expect("encode");
    let mut c = Conn::open(s.addr);
    c.send_raw(
        request_head(
            "POST",
            "/v1/consume",
            &[("content-type", "application/json")],
            big.len(),
            true,
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_error(&r, 413, "payload_too_large", None);
    assert_eq!(used(&s, "acme", "api.calls"), 1);
}

#[test]
fn a_chunked_body_over_the_limit_is_413() {
    let dir = policy();
    let s = Server::start_with(dir.path(), &["--body-limit", "1024"]);
    let big = serde_json::to_vec(
        &json!({"customer": "acme", "feature": "api.calls", "context": {"pad": "x".repeat(2000)}}),
    )
    .expect("encode");
    // No Content-Length: the limit must hold while the body streams in. Sent whole
    // before reading, so the server has all of it (no reset from unread bytes is
    // likely, but tolerate a close right after the answer).
    let mut c = Conn::open(s.addr);
    let mut req = b"POST /v1/consume HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
    req.extend_from_slice(&big);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    c.send_raw(&req);
    let r = c.read_response();
    assert_error(&r, 413, "payload_too_large", None);
    assert_eq!(used(&s, "acme", "api.calls"), 0);
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let dir = policy();
    let s = Server::start(dir.path());
    let r = s.get("/v2/nothing");
    assert_error(&r, 404, "not_found", None);
    let r = s.post("/v1/chek", &json!({}));
    assert_error(&r, 404, "not_found", None);

    let r = s.get("/v1/check");
    assert_error(&r, 405, "method_not_allowed", None);
    assert_eq!(r.header("allow"), Some("POST"), "{:?}", r.headers);
    let r = request(s.addr, "DELETE", "/v1/consume", &[], b"");
    assert_error(&r, 405, "method_not_allowed", None);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = s.post("/v1/status", &json!({}));
    assert_error(&r, 405, "method_not_allowed", None);
    let allow = r.header("allow").unwrap_or_default();
    assert!(allow.contains("GET"), "{allow}");
}
