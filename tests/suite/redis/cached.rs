//! Cached mode: replicas count locally and flush to Redis; the over-admission stays
//! within the documented bound, and a restarted replica keeps the shared view.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::support::{Redis, wait_until};

use super::{
    Load, Spec, Tally, addrs, consume, ledger, ledger_amount, policy, replicas, restart, serial,
    shared_used, stop, total, used,
};

/// Cached mode, three replicas, flush every 100 ms, limit 200, each replica consuming
/// at a paced ~100/s: the admitted total exceeds the limit by no more than the
/// documented bound (R−1)·λ·(T+RTT), with λ measured per replica during the test and
/// T+RTT taken as T + 50 ms. After the flushes converge, the shared counter, every
/// replica's view and the ledgers all equal the admitted total.
#[test]
fn cached_over_admission_stays_within_the_documented_bound() {
    const R: usize = 3;
    const LIMIT: i64 = 200;
    const FLUSH: Duration = Duration::from_millis(100);
    const SLACK: Duration = Duration::from_millis(50);
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let mut rs = replicas(
        R,
        &dir,
        &redis,
        &["--store-mode", "cached", "--store-flush-interval", "100ms"],
    );
    // Two threads per replica, each 50/s: ~100 admissions/s per replica, so the
    // limit is reached after several flushes.
    let mut spec = Spec::consume("acme", "cached.calls");
    spec.pace = Some(Duration::from_millis(20));
    spec.max_requests = 1_000;
    spec.max_time = Duration::from_secs(15);
    // 25 denials in a row (0.5 s): the replica's view has passed the limit for good.
    spec.stop_after_denials = Some(25);
    let rtt = {
        let t = Instant::now();
        redis.cmd(&["PING"]);
        t.elapsed()
    };
    let per = Load::start(&addrs(&rs), 2 * R, &spec).join();
    let all = total(&per);
    assert!(
        all.statuses.is_empty() && all.io_errors == 0,
        "unexpected answers: {:?} {:?}",
        all.statuses,
        all.first_unexpected
    );
    for (i, t) in &per {
        // Both threads of every replica ended on 25 denials in a row.
        assert!(
            t.denied >= 50,
            "replica {i} never settled on denying: {t:?}"
        );
    }
    let admitted = all.allowed as i64;
    let rates: Vec<f64> = per.values().map(Tally::admit_rate).collect();
    let lambda = rates.iter().copied().fold(0.0, f64::max);
    let window = (FLUSH + SLACK).as_secs_f64();
    let bound = (R as f64 - 1.0) * lambda * window;
    let over = admitted - LIMIT;
    eprintln!(
        "cached, {R} replicas, T = {FLUSH:?} (+{SLACK:?} for the round trip; measured PING {rtt:?}): \
         admitted {admitted} of limit {LIMIT} (per replica {:?}), λ per replica {:.1?}/s, \
         over-admission {over}, bound (R−1)·λ·(T+RTT) = {bound:.1}",
        per.values().map(|t| t.allowed).collect::<Vec<_>>(),
        rates
    );
    assert!(admitted >= LIMIT, "under-admitted: {admitted} of {LIMIT}");
    assert!(
        over as f64 <= bound,
        "over-admission {over} beyond the documented bound {bound:.1}"
    );

    // Convergence: Redis holds every admission; each replica (all consumed in the
    // window) reads the shared total back.
    let converged = wait_until(Duration::from_secs(10), || {
        shared_used(&redis, "acme", "cached.calls") == admitted
    });
    assert!(
        converged,
        "shared counter {} never reached the {admitted} admitted",
        shared_used(&redis, "acme", "cached.calls")
    );
    for (i, r) in rs.iter().enumerate() {
        let ok = wait_until(Duration::from_secs(10), || {
            used(r, "acme", "cached.calls") == admitted as u64
        });
        assert!(
            ok,
            "replica {i} reads {} after convergence, not {admitted}",
            used(r, "acme", "cached.calls")
        );
    }
    let mut sum = 0;
    for r in &mut rs {
        stop(r);
        sum += ledger_amount(&ledger(r.state.path()), "consume", "acme", "cached.calls");
    }
    assert_eq!(sum, admitted, "ledgers against the admitted total");
    assert_eq!(
        shared_used(&redis, "acme", "cached.calls"),
        admitted,
        "the final flushes at stop counted something twice"
    );
}

/// Cached mode: a replica restarted on its state directory must read the shared
/// total again, not the shared total on top of what it recovered from its own state.
#[test]
fn cached_replica_restart_keeps_the_shared_view() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let flags = ["--store-mode", "cached", "--store-flush-interval", "100ms"];
    let mut rs = replicas(2, &dir, &redis, &flags);
    consume(&rs[0], "acme", "credits", 50);
    consume(&rs[1], "acme", "credits", 30);
    for r in &rs {
        assert!(
            wait_until(Duration::from_secs(10), || used(r, "acme", "credits") == 80),
            "never converged on 80: {}",
            used(r, "acme", "credits")
        );
    }
    stop(&mut rs[0]);
    restart(&mut rs[0], &dir, &redis, &flags);
    let recovered = used(&rs[0], "acme", "credits");
    consume(&rs[0], "acme", "credits", 1);
    let shared = || shared_used(&redis, "acme", "credits");
    assert!(
        wait_until(Duration::from_secs(10), || shared() == 81),
        "shared {}",
        shared()
    );
    // Two more flush rounds of A, observed through B's view (B consumed here too).
    assert!(wait_until(Duration::from_secs(10), || used(
        &rs[1], "acme", "credits"
    ) == 81));
    let mut views = Vec::new();
    let settled = wait_until(Duration::from_secs(3), || {
        views.push(used(&rs[0], "acme", "credits"));
        views.len() >= 20 && views[views.len() - 20..].iter().all(|v| *v == 81)
    });
    let seen: BTreeSet<u64> = views.iter().copied().collect();
    eprintln!("cached restart: A recovered {recovered}, shared 81, A reads {seen:?} afterwards");
    assert!(settled, "A's view after its restart: {seen:?}, shared 81");
    let d = consume(&rs[0], "acme", "credits", 19);
    assert_eq!(d["allowed"], true, "19 of the 100 are left: {d}");
}
