//! Idempotency keys and reservations across restarts (graceful and `kill -9`),
//! reservation expiry on the test clock, and commits above their hold.

use serde_json::{Value, json};

use super::support::{Resp, Server};

use super::{
    assert_error, assert_well_formed, consume, export, kill9, ledger_sum, policy, serve, stop,
    sync, used,
};

/// A keyed consume answers its retry the same way after `kill -9` (sync mode) and
/// after a graceful restart, counting nothing; the key with another amount is 422.
#[test]
fn idempotent_retries_answer_the_same_across_restarts() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let keyed = json!({"customer": "acme", "feature": "api.calls", "amount": 5, "idempotency_key": "order-1"});
    let other = json!({"customer": "acme", "feature": "api.calls", "amount": 6, "idempotency_key": "order-1"});
    let mut s = sync(&dir, state.path());
    let first = s.decide("/v1/consume", &keyed);
    assert_eq!(first["allowed"], true, "{first}");
    assert_eq!(first["used"], 5, "{first}");
    consume(&s, "api.calls", 3);
    assert_eq!(replay(&s, &keyed), first, "retry before a restart");
    assert_eq!(used(&s, "api.calls"), 8);
    kill9(&mut s);

    for how in ["kill -9", "graceful stop"] {
        let mut s = sync(&dir, state.path());
        let again = replay(&s, &keyed);
        assert_eq!(again, first, "retry after {how}");
        assert_eq!(again["used"], 5, "{again}");
        assert_eq!(used(&s, "api.calls"), 8, "retry after {how} counted");
        assert_error(
            &s.post("/v1/consume", &other),
            422,
            "idempotency_key_reused",
        );
        assert_eq!(used(&s, "api.calls"), 8);
        stop(&mut s);
    }
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(events.len(), 2, "one event per counted consume: {events:?}");
    assert_eq!(ledger_sum(&events, "api.calls"), 8);
}

/// A keyed consume's retry: marked a replay (header and body), and otherwise the
/// first answer; returned without the mark, to compare with it.
fn replay(s: &Server, body: &Value) -> Value {
    let r = s.post("/v1/consume", body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("idempotent-replayed"),
        Some("true"),
        "{}",
        r.text()
    );
    let mut v = r.json();
    assert_eq!(v["idempotent_replay"], true, "{v}");
    v.as_object_mut().map(|o| o.remove("idempotent_replay"));
    v
}

fn journal_bytes(state: &std::path::Path) -> u64 {
    super::journals(state).iter().map(|(_, n)| n).sum()
}

/// A denied keyed consume changes nothing, so its key is neither remembered nor
/// journaled: thousands of refused requests with fresh keys leave the journal as it
/// was, and a retry is decided afresh (admitted once the units are there).
#[test]
fn denied_keyed_consumes_are_not_remembered_or_journaled() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = sync(&dir, state.path());
    consume(&s, "credits", 100);
    let before = journal_bytes(state.path());
    assert!(before > 0, "the admitted consume is journaled");
    for i in 0..200 {
        let r = s.post(
            "/v1/consume",
            &json!({"customer": "acme", "feature": "credits", "idempotency_key": format!("denied-{i}")}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("idempotent-replayed"), None);
        let d = r.json();
        assert_eq!(d["reason"], "quota_exhausted", "{d}");
        assert!(d.get("idempotent_replay").is_none(), "{d}");
    }
    assert_eq!(
        journal_bytes(state.path()),
        before,
        "denied keyed consumes were journaled"
    );
    // A month later the units are there: the retry of a denied key is decided afresh.
    let moved = s.post("/v1/test-clock", &json!({"advance": "31d"}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    let retry = json!({"customer": "acme", "feature": "credits", "idempotency_key": "denied-7"});
    let d = s.decide("/v1/consume", &retry);
    assert_eq!(
        d["allowed"], true,
        "the retry of a denial was answered from its key: {d}"
    );
    assert_eq!(replay(&s, &retry), d, "and is remembered once admitted");
    stop(&mut s);
}

/// With `--idempotency-max-keys 3`, a fourth key is refused with 503 and counts
/// nothing, the refusal is counted in `/metrics`, remembered keys still replay, and
/// room comes back when keys expire.
#[test]
fn a_full_key_table_refuses_new_keys_with_503() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(
        &dir,
        state.path(),
        &["--idempotency-max-keys", "3", "--idempotency-ttl", "1h"],
    );
    let keyed = |k: &str| json!({"customer": "acme", "feature": "api.calls", "amount": 1, "idempotency_key": k});
    for k in ["k1", "k2", "k3"] {
        assert_eq!(s.decide("/v1/consume", &keyed(k))["allowed"], true);
    }
    let r = s.post("/v1/consume", &keyed("k4"));
    assert_error(&r, 503, "idempotency_keys_full");
    assert_eq!(r.json()["error"]["field"], "idempotency_key");
    assert_eq!(used(&s, "api.calls"), 3, "a refused request counted");
    let refused = super::metric_value(
        &s.get("/metrics").text(),
        "entitled_idempotency_keys_refused_total",
    );
    assert_eq!(refused, Some(1.0));
    assert_eq!(replay(&s, &keyed("k1"))["used"], 1);
    consume(&s, "api.calls", 1);
    let moved = s.post("/v1/test-clock", &json!({"advance": "61m"}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert_eq!(s.decide("/v1/consume", &keyed("k4"))["allowed"], true);
    assert_eq!(used(&s, "api.calls"), 5);
    stop(&mut s);
}

// ------------------------------------------------------------ reservations ----

fn reserve(s: &Server, feature: &str, amount: u64, ttl: &str) -> String {
    let d = s.decide(
        "/v1/reserve",
        &json!({"customer": "acme", "feature": feature, "amount": amount, "ttl": ttl}),
    );
    assert_eq!(d["allowed"], true, "reserve {amount} of {feature}: {d}");
    let id = d["reservation"]
        .as_str()
        .unwrap_or_else(|| panic!("no reservation in {d}"))
        .to_string();
    assert!(
        id.len() == 36 && id.starts_with("rsv_") && id[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "reservation id {id}"
    );
    id
}

fn commit(s: &Server, id: &str, amount: u64) -> Resp {
    s.post(
        &format!("/v1/reservations/{id}/commit"),
        &json!({ "amount": amount }),
    )
}

fn release(s: &Server, id: &str) -> Resp {
    s.post_raw(&format!("/v1/reservations/{id}/release"), "")
}

fn would_allow(s: &Server, feature: &str, amount: u64) -> bool {
    let d = s.decide(
        "/v1/check",
        &json!({"customer": "acme", "feature": feature, "amount": amount}),
    );
    d["allowed"].as_bool().unwrap_or_else(|| panic!("{d}"))
}

/// A hold counts for everyone until the test clock passes its ttl; then it is back
/// in the quota at once and the reservation is unknown.
#[test]
fn reservation_expires_on_the_test_clock() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let id = reserve(&s, "credits", 30, "5m");
    assert_eq!(used(&s, "credits"), 30);
    assert!(would_allow(&s, "credits", 70));
    assert!(!would_allow(&s, "credits", 71), "the hold is not counted");

    // Not yet: 4 minutes in, the hold stands.
    let r = s.decide("/v1/test-clock", &json!({"advance": "4m"}));
    assert_eq!(r["reservations_expired"], 0, "{r}");
    assert_eq!(used(&s, "credits"), 30);

    let r = s.decide("/v1/test-clock", &json!({"advance": "2m"}));
    assert_eq!(r["reservations_expired"], 1, "{r}");
    assert_eq!(parse_now(&r), "2030-01-15T00:06:00Z");
    assert_eq!(used(&s, "credits"), 0, "expired hold not returned");
    assert!(would_allow(&s, "credits", 100));
    assert_error(&commit(&s, &id, 30), 404, "unknown_reservation");
    assert_error(&release(&s, &id), 404, "unknown_reservation");
    assert_eq!(used(&s, "credits"), 0);
    stop(&mut s);
    let events = export(state.path(), &[]);
    assert!(events.is_empty(), "an expired hold billed: {events:?}");
}

fn parse_now(r: &Value) -> String {
    let t: jiff::Timestamp = r["now"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `now` in {r}"));
    t.to_string()
}

/// An open reservation survives a graceful restart (and `kill -9` in sync mode) and
/// is committed after it: counted once, the rest of the hold given back.
#[test]
fn reservation_survives_restarts_and_commits_after_them() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let graceful = reserve(&s, "credits", 20, "5m");
    let lapsing = reserve(&s, "credits", 10, "5m");
    assert_eq!(used(&s, "credits"), 30);
    stop(&mut s);

    let mut s = sync(&dir, state.path());
    assert_eq!(used(&s, "credits"), 30, "holds lost in a graceful restart");
    let killed = reserve(&s, "credits", 30, "5m");
    assert_eq!(used(&s, "credits"), 60);
    kill9(&mut s);

    let mut s = sync(&dir, state.path());
    assert_eq!(
        used(&s, "credits"),
        60,
        "holds lost in a restart after kill -9"
    );
    let r = commit(&s, &graceful, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["operation"], "commit", "{v}");
    assert_eq!(v["reservation"], graceful.as_str(), "{v}");
    assert_eq!(v["committed"], 15, "{v}");
    assert_eq!(v["released"], 5, "{v}");
    assert_eq!(v["used"], 55, "15 committed + 30 + 10 still held: {v}");
    assert_eq!(v["limit"], 100, "{v}");
    assert_eq!(v["remaining"], 45, "{v}");
    assert_error(&commit(&s, &graceful, 15), 404, "unknown_reservation");
    let r = release(&s, &killed);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["committed"].clone(), v["released"].clone()),
        (json!(0), json!(30)),
        "{v}"
    );
    assert_eq!(used(&s, "credits"), 25);
    // A restored hold still expires on the clock.
    let r = s.decide("/v1/test-clock", &json!({"advance": "6m"}));
    assert_eq!(r["reservations_expired"], 1, "{r}");
    assert_eq!(used(&s, "credits"), 15);
    assert_error(&commit(&s, &lapsing, 10), 404, "unknown_reservation");
    stop(&mut s);

    let s = sync(&dir, state.path());
    assert_eq!(used(&s, "credits"), 15, "after the last restart");
    drop(s);
    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(events.len(), 1, "only the commit is billed: {events:?}");
    let e = &events[0];
    assert_eq!(e["data"]["operation"], "commit", "{e}");
    assert_eq!(e["data"]["amount"], 15, "{e}");
    assert_eq!(e["data"]["reservation"], graceful.as_str(), "{e}");
    assert_eq!(ledger_sum(&events, "credits"), 15);
}

/// A keyed commit answers its retry the same way after `kill -9` (sync mode), though
/// the reservation is settled by then; the key on another amount is 422.
#[test]
fn idempotent_commit_answers_the_same_after_kill_9() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = sync(&dir, state.path());
    let id = reserve(&s, "credits", 40, "5m");
    let path = format!("/v1/reservations/{id}/commit");
    let keyed = json!({"amount": 25, "idempotency_key": "job-7"});
    let r = s.post(&path, &keyed);
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json();
    assert_eq!(
        (first["committed"].clone(), first["used"].clone()),
        (json!(25), json!(25)),
        "{first}"
    );
    kill9(&mut s);

    let mut s = sync(&dir, state.path());
    let r = s.post(&path, &keyed);
    assert_eq!(r.status, 200, "retry after kill -9: {}", r.text());
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    let mut again = r.json();
    assert_eq!(again["idempotent_replay"], true, "{again}");
    again.as_object_mut().map(|o| o.remove("idempotent_replay"));
    assert_eq!(again, first, "retry after kill -9");
    assert_eq!(used(&s, "credits"), 25, "the retry counted");
    assert_error(
        &s.post(&path, &json!({"amount": 26, "idempotency_key": "job-7"})),
        422,
        "idempotency_key_reused",
    );
    // Without the key, the settled reservation is unknown.
    assert_error(&commit(&s, &id, 25), 404, "unknown_reservation");
    stop(&mut s);
    let events = export(state.path(), &[]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(ledger_sum(&events, "credits"), 25);
}

/// A commit above its hold: with `overage: allow` it counts all of it and reports the
/// units past the limit; with overage denied it is refused, counts nothing and leaves
/// the hold, which can still be released (or committed within what fits).
#[test]
fn commit_above_the_hold_follows_the_overage_rule() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);

    let id = reserve(&s, "tokens", 8, "5m");
    let r = commit(&s, &id, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["committed"], 15, "{v}");
    assert_eq!(v["overage"], 5, "{v}");
    assert_eq!(v["used"], 15, "{v}");
    assert_eq!(v["kind"], "quota", "{v}");
    assert_eq!(used(&s, "tokens"), 15);

    let id = reserve(&s, "tokens.strict", 8, "5m");
    let r = commit(&s, &id, 15);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(v["reason"], "quota_exhausted", "{v}");
    assert_eq!(v["committed"], 0, "{v}");
    assert!(v.get("overage").is_none_or(Value::is_null), "{v}");
    assert_eq!(used(&s, "tokens.strict"), 8, "the hold must stay");
    let r = release(&s, &id);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["operation"], "release", "{v}");
    assert_eq!(
        (v["committed"].clone(), v["released"].clone()),
        (json!(0), json!(8)),
        "{v}"
    );
    assert_eq!(used(&s, "tokens.strict"), 0);
    assert_error(&release(&s, &id), 404, "unknown_reservation");

    // Above the hold but within the limit: counted.
    let id = reserve(&s, "tokens.strict", 4, "5m");
    let r = commit(&s, &id, 9);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["allowed"].clone(), v["committed"].clone()),
        (json!(true), json!(9)),
        "{v}"
    );
    assert_eq!(used(&s, "tokens.strict"), 9);
    stop(&mut s);

    let events = export(state.path(), &[]);
    assert_well_formed(&events, state.path());
    assert_eq!(ledger_sum(&events, "tokens"), 15);
    assert_eq!(ledger_sum(&events, "tokens.strict"), 9);
    let over = events
        .iter()
        .find(|e| e["data"]["feature"] == "tokens")
        .expect("the tokens commit");
    assert_eq!(over["data"]["overage"], 5, "{over}");
}

/// A commit retried with its idempotency key answers as the first did, counts
/// nothing, and says it is a replay (`Idempotent-Replayed: true`, and in the body);
/// the first answer says neither.
#[test]
fn a_retried_commit_is_marked_a_replay() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    let id = reserve(&s, "credits", 10, "5m");
    let body = json!({"amount": 4, "idempotency_key": "commit-1"});
    let path = format!("/v1/reservations/{id}/commit");
    let first = s.post(&path, &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    assert!(
        first.json().get("idempotent_replay").is_none(),
        "{}",
        first.text()
    );
    let again = s.post(&path, &body);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let v = again.json();
    assert_eq!(v["idempotent_replay"], true, "{v}");
    assert_eq!(v["committed"], 4, "{v}");
    assert_eq!(used(&s, "credits"), 4, "the replay counted");
    stop(&mut s);
}
