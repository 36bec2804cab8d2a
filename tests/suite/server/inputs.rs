//! Input that cannot be taken at face value: strings whose escapes are no characters,
//! bodies that are not JSON, and values past what the server holds (a reservation's
//! `ttl`, a time past the calendar). Each is a 400 naming the field (or saying where
//! the JSON breaks) and changes nothing.

use serde_json::{Value, json};

use super::support::Server;
use super::{assert_error, policy, used};

/// simd-json decodes a lone surrogate escape to U+0000: without the check, two keys
/// that differ only in it would be one key, and the second consume a replay of the
/// first. Every string field is checked, and the field is named.
#[test]
fn lone_surrogate_escapes_are_refused_naming_the_field() {
    let dir = policy();
    let s = Server::start(dir.path());
    let cases = [
        (
            "/v1/consume",
            r#"{"customer":"acme","feature":"api.calls","idempotency_key":"k-\ud800"}"#,
            "idempotency_key",
        ),
        (
            "/v1/consume",
            r#"{"customer":"acme","feature":"api.calls","idempotency_key":"k-\udc00"}"#,
            "idempotency_key",
        ),
        (
            "/v1/seats/acquire",
            r#"{"customer":"acme","feature":"seats","holder":"u-\uD800x"}"#,
            "holder",
        ),
        (
            "/v1/check",
            r#"{"customer":"acme\ud83d\u0041","feature":"api.calls"}"#,
            "customer",
        ),
        (
            "/v1/check",
            r#"{"customer":"acme","feature":"api.calls","context":{"asset":"\ud800"}}"#,
            "context.asset",
        ),
        (
            "/v1/batch",
            r#"{"requests":[{"op":"check","customer":"acme","feature":"api.calls"},{"op":"consume","customer":"acme","feature":"api.calls","idempotency_key":"\udbff"}]}"#,
            "requests[1].idempotency_key",
        ),
    ];
    for (path, body, field) in cases {
        let r = s.post_raw(path, body);
        let v = assert_error(&r, 400, "bad_request", Some(field));
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains("surrogate"), "{path} {body} -> {v}");
    }
    assert_eq!(used(&s, "acme", "api.calls"), 0);
    // A real pair (U+1F600) is a character like any other, and two keys stay two.
    for key in [r"k-\ud83d\ude00", r"k-\ud83d\ude01"] {
        let body =
            format!(r#"{{"customer":"acme","feature":"api.calls","idempotency_key":"{key}"}}"#);
        let r = s.post_raw("/v1/consume", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(used(&s, "acme", "api.calls"), 2);
}

/// A body that is not JSON is told what is wrong and where, in words: never the
/// parser's internals.
#[test]
fn malformed_json_says_what_is_wrong_and_where() {
    let dir = policy();
    let s = Server::start(dir.path());
    let cases = [
        ("customer=acme", "expected a JSON object at line 1 column 1"),
        (
            r#"{"customer":"acme","feature":"api.calls""#,
            "unexpected end of input inside an object at line 1 column 40",
        ),
        (
            r#"{"customer":"ac\me","feature":"api.calls"}"#,
            "invalid string escape at line 1 column 17",
        ),
        (
            "{\"customer\":\"acme\",\n \"feature\": api.calls}",
            "at line 2 column 13",
        ),
        (
            r#"{"customer":"acme","feature":"api.calls",}"#,
            "expected an object key in double quotes at line 1 column 42",
        ),
        (
            r#"{"customer":"acme" "feature":"api.calls"}"#,
            "expected `,` or `}` after an object member at line 1 column 20",
        ),
        (
            r#"{"customer":"acme","feature":"api.calls"} {}"#,
            "unexpected text after the JSON value",
        ),
    ];
    for (body, wants) in cases {
        let r = s.post_raw("/v1/check", body);
        let v = assert_error(&r, 400, "bad_request", None);
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.starts_with("malformed JSON: "), "{body} -> {m}");
        assert!(m.contains(wants), "{body} -> {m}");
        assert!(!m.contains("Error") && !m.contains("Tape"), "{body} -> {m}");
    }
}

fn reserve(s: &Server, ttl: Value) -> super::support::Resp {
    s.post(
        "/v1/reserve",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 1, "ttl": ttl}),
    )
}

/// A reservation is held at most 24 hours: a longer `ttl` is refused naming it and
/// the maximum, where it used to be shortened to 24 h without a word.
#[test]
fn a_ttl_past_the_longest_reservation_is_refused() {
    let dir = policy();
    let s = Server::start(dir.path());
    for ttl in [json!("25h"), json!("3650d"), json!(86_401), json!(u64::MAX)] {
        let r = reserve(&s, ttl.clone());
        let v = assert_error(&r, 400, "bad_request", Some("ttl"));
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains("24h") && m.contains("86400"), "{ttl} -> {m}");
    }
    assert_eq!(used(&s, "acme", "api.calls"), 0);
    for ttl in [json!("24h"), json!(86_400), json!("30s")] {
        let r = reserve(&s, ttl.clone());
        assert_eq!(r.status, 200, "{ttl} -> {}", r.text());
    }
}

/// `at` takes any RFC 3339 time the calendar arithmetic holds; one past it is a 400
/// that says the range, not "expected an RFC 3339 timestamp". The last time it holds
/// decides (a month window that would end past it included).
#[test]
fn an_at_past_the_calendar_is_refused_saying_the_range() {
    let dir = policy();
    let s = Server::start(dir.path());
    for at in [
        "9999-12-31T23:59:59Z",
        "9999-12-31",
        "-009999-01-01T00:00:00Z",
    ] {
        let r = s.post(
            "/v1/check",
            &json!({"customer": "acme", "feature": "api.calls", "at": at}),
        );
        let v = assert_error(&r, 400, "bad_request", Some("at"));
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("outside the supported range") && m.contains("9999-12-30T22:00:00Z"),
            "{at} -> {m}"
        );
    }
    for at in ["9999-12-30T22:00:00Z", "9999-12-30T21:59:59+05:00"] {
        for feature in ["api.calls", "api.rate", "seats", "sso"] {
            let r = s.post(
                "/v1/check",
                &json!({"customer": "acme", "feature": feature, "at": at}),
            );
            assert_eq!(r.status, 200, "{at} {feature} -> {}", r.text());
        }
    }
    let r = s.get("/v1/customers/acme?at=9999-12-31T23:59:59Z");
    assert_error(&r, 400, "bad_request", Some("at"));
}
