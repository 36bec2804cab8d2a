//! Redis killed, paused or away across a window's end: each `--on-store-error` mode
//! answers fast, readiness and counts recover by themselves, and nothing is counted
//! twice or in the wrong window.

use std::time::{Duration, Instant};

use serde_json::json;

use super::support::{Redis, wait_until};

use super::{
    DEGRADED, ERRORS, Load, PREFIX, Spec, WINDOW_END, WINDOW_START, addrs, assert_error, consume,
    fallbacks, ledger, ledger_amount, metric, micros, policy, replica, replicas, serial,
    shared_used, stop, total,
};

/// Latency bound on every request while Redis is dead or stuck: the 50 ms store
/// timeout plus a generous margin for a debug build on two busy cores.
const LATENCY_BOUND: Duration = Duration::from_secs(1);

/// Redis killed under load (`--on-store-error local`): every request is answered 200
/// well within the bound, the replicas report `entitled_store_degraded 1` and count
/// fallbacks; restarted empty on the same port, the replicas recover by themselves
/// (degraded 0) and Redis then holds exactly the units counted locally during the
/// outage, in the same window key. The ledgers hold every admission.
#[test]
fn redis_killed_under_load_local_fallback_reconciles_after_restart() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(2, &dir, &redis, &["--store-timeout", "50ms"]);
    let load = Load::start(&addrs(&rs), 4, &Spec::consume("acme", "bulk"));
    assert!(
        wait_until(Duration::from_secs(20), || load.acked() >= 300),
        "300 consumes not admitted before the fault"
    );
    let before = load.acked();
    redis.kill();
    let killed = Instant::now();
    // Long enough for the breaker to open and be probed again twice (500 ms
    // cool-down): 3 failures to open it, one per probe.
    let degraded = wait_until(Duration::from_secs(10), || {
        rs.iter()
            .all(|r| metric(r, DEGRADED) == 1.0 && metric(r, ERRORS) >= 5.0)
            && rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() >= 300.0
    });
    let outage_acked = load.acked() - before;
    let per = load.finish();
    let outage = killed.elapsed();
    assert!(
        degraded,
        "degraded {:?}, local fallbacks {:?}",
        rs.iter().map(|r| metric(r, DEGRADED)).collect::<Vec<_>>(),
        rs.iter().map(|r| fallbacks(r, "local")).collect::<Vec<_>>()
    );
    let all = total(&per);
    assert!(
        all.statuses.is_empty() && all.io_errors == 0 && all.denied == 0,
        "answers other than 200 allowed: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    let local: Vec<f64> = rs.iter().map(|r| fallbacks(r, "local")).collect();
    let errors: Vec<f64> = rs.iter().map(|r| metric(r, ERRORS)).collect();
    let counted_locally = local.iter().sum::<f64>() as i64;
    eprintln!(
        "Redis killed after {before} strict consumes: {} admitted in {outage:?} of outage \
         ({counted_locally} counted locally, store errors {errors:?}); latency p50 {:?} p99 {:?} max {:?}",
        outage_acked,
        all.percentile(0.5),
        all.percentile(0.99),
        all.max_latency()
    );
    assert!(
        all.max_latency() < LATENCY_BOUND,
        "a request took {:?} while Redis was down",
        all.max_latency()
    );
    assert!(errors.iter().all(|e| *e > 0.0), "store errors {errors:?}");
    for r in &rs {
        let d = r.check("acme", "bulk");
        assert_eq!(d["allowed"], true, "checks answer locally: {d}");
    }
    let local_after_checks: i64 = rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() as i64;

    redis.restart();
    let restarted = Instant::now();
    let recovered = wait_until(Duration::from_secs(10), || {
        rs.iter().all(|r| metric(r, DEGRADED) == 0.0)
            && shared_used(&redis, "acme", "bulk") == counted_locally
    });
    assert!(
        recovered,
        "after the restart: degraded {:?}, shared counter {} (counted locally {counted_locally})",
        rs.iter().map(|r| metric(r, DEGRADED)).collect::<Vec<_>>(),
        shared_used(&redis, "acme", "bulk")
    );
    eprintln!(
        "recovered {:?} after the restart; {} checks answered locally too",
        restarted.elapsed(),
        local_after_checks - counted_locally
    );
    // Strict again: each replica counts in Redis, on top of the reconciled deltas.
    for (i, r) in rs.iter().enumerate() {
        let d = consume(r, "acme", "bulk", 1);
        assert_eq!(d["used"], json!(counted_locally + 1 + i as i64), "{d}");
    }
    assert_eq!(shared_used(&redis, "acme", "bulk"), counted_locally + 2);

    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    }
    assert_eq!(
        sum,
        all.allowed as i64 + 2,
        "the ledgers hold every admission"
    );
    assert_eq!(
        shared_used(&redis, "acme", "bulk"),
        counted_locally + 2,
        "the final flushes at stop counted something twice"
    );
}

/// Redis paused with SIGSTOP (a stuck server that keeps its connections): requests
/// still answer 200 within the bound, the replicas degrade, and after SIGCONT they
/// recover by themselves. Nothing admitted is lost from the shared counter.
#[test]
fn redis_stopped_requests_stay_fast_and_recover() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(2, &dir, &redis, &["--store-timeout", "50ms"]);
    let load = Load::start(&addrs(&rs), 4, &Spec::consume("acme", "bulk"));
    assert!(
        wait_until(Duration::from_secs(20), || load.acked() >= 200),
        "200 consumes not admitted before the fault"
    );
    redis.pause();
    let paused = Instant::now();
    // Long enough for the breaker to open and be probed again (500 ms cool-down).
    let degraded = wait_until(Duration::from_secs(10), || {
        rs.iter()
            .all(|r| metric(r, DEGRADED) == 1.0 && metric(r, ERRORS) >= 6.0)
            && rs.iter().map(|r| fallbacks(r, "local")).sum::<f64>() >= 300.0
    });
    let stuck = paused.elapsed();
    redis.resume();
    let recovered = wait_until(Duration::from_secs(10), || {
        rs.iter().all(|r| metric(r, DEGRADED) == 0.0)
    });
    let after = load.acked();
    let more = wait_until(Duration::from_secs(20), || load.acked() >= after + 200);
    let per = load.finish();
    let all = total(&per);
    let errors: Vec<f64> = rs.iter().map(|r| metric(r, ERRORS)).collect();
    let local: Vec<f64> = rs.iter().map(|r| fallbacks(r, "local")).collect();
    eprintln!(
        "Redis stopped for {stuck:?}: store errors {errors:?}, local fallbacks {local:?}; \
         latency p50 {:?} p99 {:?} max {:?}",
        all.percentile(0.5),
        all.percentile(0.99),
        all.max_latency()
    );
    assert!(
        degraded,
        "never degraded: errors {errors:?}, fallbacks {local:?}"
    );
    assert!(recovered, "still degraded 10 s after SIGCONT");
    assert!(more, "consumes did not resume after SIGCONT");
    assert!(
        all.statuses.is_empty() && all.io_errors == 0 && all.denied == 0,
        "answers other than 200 allowed: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    assert!(
        all.max_latency() < LATENCY_BOUND,
        "a request took {:?} while Redis was stopped",
        all.max_latency()
    );

    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    }
    let shared = shared_used(&redis, "acme", "bulk");
    eprintln!(
        "after SIGCONT and graceful stops: {} admitted, ledgers {sum}, shared counter {shared} ({:+})",
        all.allowed,
        shared - sum
    );
    assert_eq!(sum, all.allowed as i64, "the ledgers hold every admission");
    assert!(
        shared >= sum,
        "admissions lost from the shared counter: {shared} < {sum}"
    );
}

/// A stalled Redis applies what it was sent once it runs again; a call that timed
/// out must therefore not be counted a second time. One replica, Redis paused: the
/// first consumes time out (their scripts wait in the socket), the rest are counted
/// locally; the background flush of those deltas reaches the paused server, times out
/// and is kept for a retry. After SIGCONT and a graceful stop, the shared counter must
/// equal what was admitted (the ledger).
#[test]
fn redis_stall_counts_nothing_twice() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut r = replica(&dir, &redis, &["--store-timeout", "50ms"]);
    assert_eq!(consume(&r, "acme", "bulk", 1)["used"], 1);
    redis.pause();
    for _ in 0..10 {
        assert_eq!(consume(&r, "acme", "bulk", 1)["allowed"], true);
    }
    let errors = metric(&r, ERRORS);
    // Two flush attempts after breaker cool-downs, each timed out.
    let flushed = wait_until(Duration::from_secs(5), || {
        metric(&r, ERRORS) >= errors + 2.0
    });
    redis.resume();
    assert!(flushed, "no flush attempt reached the paused Redis");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&r, DEGRADED) == 0.0),
        "still degraded after SIGCONT"
    );
    stop(&mut r);
    let billed = ledger_amount(&ledger(r.state.path()), "consume", "acme", "bulk");
    let shared = shared_used(&redis, "acme", "bulk");
    eprintln!(
        "stalled Redis: 11 consumes admitted, ledger {billed}, shared counter {shared} ({} store errors)",
        errors + 2.0
    );
    assert_eq!(billed, 11);
    assert_eq!(
        shared, billed,
        "the shared counter counted timed-out calls twice"
    );
}

/// `--on-store-error deny`: while Redis is down, decisions answer 503
/// `store_unavailable` (fast) and `/readyz` 503; `allow` admits without counting and
/// stays ready. Once Redis is back, both answer from it again.
#[test]
fn deny_answers_503_and_unready_allow_admits_uncounted() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let deny = replica(&dir, &redis, &["--on-store-error", "deny"]);
    let allow = replica(&dir, &redis, &["--on-store-error", "allow"]);
    for r in [&deny, &allow] {
        assert_eq!(consume(r, "acme", "credits", 1)["allowed"], true);
        assert_eq!(r.get("/readyz").status, 200);
    }
    assert_eq!(shared_used(&redis, "acme", "credits"), 2);

    redis.kill();
    let body = json!({"customer": "acme", "feature": "credits", "amount": 1});
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r = deny.post("/v1/consume", &body);
        slowest = slowest.max(t.elapsed());
        assert_error(&r, 503, "store_unavailable");
    }
    let r = deny.post(
        "/v1/check",
        &json!({"customer": "acme", "feature": "credits"}),
    );
    assert_error(&r, 503, "store_unavailable");
    let r = deny.get("/readyz");
    assert_eq!(
        r.status,
        503,
        "readyz while degraded in deny mode: {}",
        r.text()
    );
    assert_eq!(r.json()["ready"], false);
    assert_eq!(metric(&deny, DEGRADED), 1.0);
    assert!(
        fallbacks(&deny, "deny") >= 11.0,
        "deny fallbacks not counted"
    );

    for _ in 0..10 {
        let t = Instant::now();
        let d = consume(&allow, "acme", "credits", 1);
        slowest = slowest.max(t.elapsed());
        assert_eq!(d["allowed"], true, "{d}");
    }
    // Past the limit, too: nothing is counted.
    let d = consume(&allow, "acme", "credits", 100);
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(allow.get("/readyz").status, 200, "allow mode stays ready");
    assert_eq!(metric(&allow, DEGRADED), 1.0);
    assert!(
        fallbacks(&allow, "allow") >= 11.0,
        "allow fallbacks not counted"
    );
    eprintln!("deny/allow while Redis is down: slowest answer {slowest:?}");
    assert!(slowest < LATENCY_BOUND, "an answer took {slowest:?}");

    redis.restart();
    // A decision reaches Redis again (the first may still meet the open breaker).
    let back = wait_until(Duration::from_secs(10), || {
        deny.post("/v1/consume", &body).status == 200
    });
    assert!(back, "deny mode never answered 200 after the restart");
    assert_eq!(
        deny.get("/readyz").status,
        200,
        "ready again once Redis answers"
    );
    assert_eq!(metric(&deny, DEGRADED), 0.0);
    // The allow replica's breaker may stay open a moment longer (its last failure came
    // later): wait until it answers from Redis again. A check counts nothing; answered
    // from Redis it sees the unit the deny replica just counted, from the fallback none.
    let check = json!({"customer": "acme", "feature": "credits"});
    let reached = wait_until(Duration::from_secs(10), || {
        allow.post("/v1/check", &check).json()["used"] == 1
    });
    assert!(
        reached,
        "allow mode never answered from Redis after the restart"
    );
    let d = consume(&allow, "acme", "credits", 1);
    assert_eq!(
        d["used"], 2,
        "allow mode kept nothing for Redis while it was down: {d}"
    );
    let (mut deny, mut allow) = (deny, allow);
    stop(&mut deny);
    stop(&mut allow);
    let events = ledger(allow.state.path());
    assert_eq!(
        ledger_amount(&events, "consume", "acme", "credits"),
        2,
        "allow mode billed what it admitted uncounted: {events:?}"
    );
}

/// `--on-store-error deny` marks the replica unready while Redis is down; once Redis
/// is back, readiness must return by itself: a load balancer sends no decision
/// traffic to an unready replica, so waiting for a decision to succeed never ends.
#[test]
fn deny_mode_readiness_returns_without_decision_traffic() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let deny = replica(&dir, &redis, &["--on-store-error", "deny"]);
    assert_eq!(deny.get("/readyz").status, 200);
    redis.kill();
    let r = deny.post(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "credits"}),
    );
    assert_error(&r, 503, "store_unavailable");
    assert_eq!(deny.get("/readyz").status, 503);
    redis.restart();
    let restarted = Instant::now();
    let ready = wait_until(Duration::from_secs(5), || deny.get("/readyz").status == 200);
    eprintln!(
        "deny mode: /readyz {} {:?} after Redis came back (only /readyz and /metrics polled)",
        if ready { "200" } else { "still 503" },
        restarted.elapsed()
    );
    assert!(
        ready,
        "/readyz still 503 5 s after Redis answers again (degraded {})",
        metric(&deny, DEGRADED)
    );
}

// ------------------------------------------------------- ended windows ----

/// A partition that outlasts its window: units counted locally in January while Redis
/// is away never land in February's counter when Redis returns in February — they are
/// dropped with their window, and February starts from what February counted.
#[test]
fn deltas_of_an_ended_window_never_land_in_the_next() {
    let _serial = serial();
    let mut redis = Redis::start();
    let dir = policy();
    let r = replica(&dir, &redis, &["--store-timeout", "50ms"]);
    assert_eq!(consume(&r, "acme", "bulk", 5)["used"], 5);
    redis.kill();
    for _ in 0..3 {
        let d = consume(&r, "acme", "bulk", 7);
        assert_eq!(d["allowed"], true, "counted locally: {d}");
    }
    assert!(fallbacks(&r, "local") >= 3.0);
    // February 1st has come and gone while Redis was away.
    let moved = r.post("/v1/test-clock", &json!({"set": "2030-02-10T00:00:00Z"}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = r.check("acme", "bulk");
            metric(&r, DEGRADED) == 0.0
        }),
        "Redis was not used again"
    );
    let d = consume(&r, "acme", "bulk", 1);
    assert_eq!(d["used"], 1, "February holds only February's unit: {d}");
    // February's counter in Redis is 1. A January call that timed out may still have
    // run when Redis came back (the client library resends what it had queued), but
    // only into January's own key: no unit of January is in February.
    let keys = redis.cli(&[
        "--scan",
        "--pattern",
        &format!("{PREFIX}:*:q:4:acme:4:bulk:*"),
    ]);
    let keys: Vec<&str> = keys
        .lines()
        .filter(|k| !k.is_empty() && !k.ends_with(":h"))
        .collect();
    let feb = format!(":{}", micros("2030-02-01T00:00:00Z"));
    let jan = format!(":{}", micros(WINDOW_START));
    for k in &keys {
        assert!(
            k.ends_with(&feb) || k.ends_with(&jan),
            "a counter of another window: {k}"
        );
    }
    let feb_key = keys
        .iter()
        .find(|k| k.ends_with(&feb))
        .expect("February's counter");
    assert_eq!(
        redis.cmd(&["HGET", feb_key, "used"]).text().as_deref(),
        Some("1")
    );
    if let Some(jan_key) = keys.iter().find(|k| k.ends_with(&jan)) {
        let end = redis.cmd(&["HGET", jan_key, "window_end"]).text();
        assert_eq!(
            end,
            Some(micros(WINDOW_END).to_string()),
            "January's key ends in January"
        );
    }
}
