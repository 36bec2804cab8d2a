//! Hot reload against the real binary.
//!
//! Each test starts `entitled serve --reload-debounce 50ms` on its own tempdir, changes
//! the directory the way an editor, a deploy script or kubelet does, and waits (with a
//! deadline) until `GET /v1/status` or a decision shows the change.
//!
//! The periodic rescan (`--rescan-interval`) is not tested here: on this machine
//! inotify always sees the change first, so a test could not tell which one reloaded.
//! Its fingerprinting is unit-tested in `src/reload.rs`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Server, metric_value, names_file_line_col, wait_for, wait_until};

/// How long a reload may take to show.
const DEADLINE: Duration = Duration::from_secs(10);

const CATALOG: &str =
    "features:\n  api.calls: { kind: quota, unit: call }\n  sso: { kind: flag }\n";

fn plans(limit: u64) -> String {
    format!("plans:\n  pro:\n    grants:\n      api.calls: {{ limit: {limit}, per: month }}\n")
}

const CUSTOMERS: &str =
    "customers:\n  - id: acme\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n";

fn start(dir: &Path) -> Server {
    Server::start_with(dir, &["--reload-debounce", "50ms"])
}

/// As [`start`], as a process of its own: `/metrics` is the process's.
fn spawn(dir: &Path) -> Server {
    Server::spawn_with(dir, &["--reload-debounce", "50ms"])
}

fn limit(s: &Server, customer: &str) -> Value {
    s.check(customer, "api.calls")["limit"].clone()
}

/// Waits until acme's api.calls limit is `want`; fails with the status if not.
fn await_limit(s: &Server, want: u64) {
    assert!(
        wait_until(DEADLINE, || limit(s, "acme") == json!(want)),
        "limit {want} not served within {DEADLINE:?}; serving {}; status {}",
        limit(s, "acme"),
        s.status()
    );
}

fn generation(s: &Server) -> u64 {
    s.status()["generation"].as_u64().expect("generation")
}

fn standard_dir(limit: u64) -> PolicyDir {
    PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("plans.yaml", &plans(limit)),
        ("customers.yaml", CUSTOMERS),
    ])
}

#[test]
fn an_in_place_write_is_served() {
    let dir = standard_dir(100);
    let s = start(dir.path());
    let v1 = s.version().expect("version");
    let g1 = generation(&s);
    assert_eq!(limit(&s, "acme"), 100);
    // Counters survive the reload and the new limit applies to them.
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls", "amount": 40}),
    );

    dir.write("plans.yaml", &plans(200)); // truncate + write, same inode
    await_limit(&s, 200);
    let st = s.status();
    assert_ne!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert!(st["generation"].as_u64().is_some_and(|g| g > g1), "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    let d = s.check("acme", "api.calls");
    assert_eq!(
        (d["used"].clone(), d["remaining"].clone()),
        (json!(40), json!(160)),
        "{d}"
    );
    assert_ne!(d["snapshot"], v1.as_str());
}

#[test]
fn a_rename_over_the_file_is_served() {
    let dir = standard_dir(100);
    let s = start(dir.path());
    let v1 = s.version().expect("version");
    // What editors and `kubectl cp`-style deploys do: write a temp file, rename it in.
    dir.write("plans.yaml.tmp", &plans(300));
    std::fs::rename(dir.join("plans.yaml.tmp"), dir.join("plans.yaml")).expect("rename");
    await_limit(&s, 300);
    assert_ne!(s.version().expect("version"), v1);

    // Again, through a dot-named temp file (skipped by discovery while it exists).
    dir.write(".plans.yaml.swp", &plans(301));
    std::fs::rename(dir.join(".plans.yaml.swp"), dir.join("plans.yaml")).expect("rename");
    await_limit(&s, 301);
}

#[test]
fn delete_then_recreate_is_served() {
    let dir = standard_dir(100);
    let s = start(dir.path());
    assert_eq!(s.check("acme", "api.calls")["allowed"], true);
    dir.remove("customers.yaml");
    // Without its customers file the set still loads, and acme is gone.
    assert!(
        wait_until(DEADLINE, || s.check("acme", "api.calls")["reason"]
            == "unknown_customer"),
        "the deletion was not served; status {}",
        s.status()
    );
    dir.write(
        "customers.yaml",
        "customers:\n  - id: acme\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n  - id: globex\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n",
    );
    assert!(
        wait_until(DEADLINE, || s.check("globex", "api.calls")["allowed"]
            == true),
        "the recreated file was not served; status {}",
        s.status()
    );
    assert_eq!(s.check("acme", "api.calls")["allowed"], true);
    assert_eq!(s.status()["snapshot"]["customers"], 2);
}

#[test]
fn a_new_file_in_a_new_subdirectory_is_served() {
    let dir = standard_dir(100);
    let s = start(dir.path());
    assert_eq!(s.check("initech", "sso")["reason"], "unknown_customer");
    let files_before = s.status()["snapshot"]["files"].clone();
    dir.write(
        "team-b/eu/more.yaml",
        "plans:\n  sso-addon:\n    grants:\n      sso: true\ncustomers:\n  - id: initech\n    subscriptions:\n      - { plan: sso-addon, starts: 2020-01-01 }\n",
    );
    assert!(
        wait_until(DEADLINE, || s.check("initech", "sso")["allowed"] == true),
        "a file in a new subdirectory was not served; status {}",
        s.status()
    );
    let st = s.status();
    assert_ne!(st["snapshot"]["files"], files_before, "{st}");
    assert_eq!(st["snapshot"]["customers"], 2, "{st}");
}

/// Lays out `dir` as kubelet mounts a ConfigMap: the files live in a timestamped
/// folder, `..data` points at it, and each key is a symlink through `..data`.
fn configmap_version(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    let folder = dir.join(stamp);
    std::fs::create_dir(&folder).expect("timestamped folder");
    for (name, text) in files {
        std::fs::write(folder.join(name), text).expect("writing a configmap key");
    }
}

#[test]
fn a_kubernetes_configmap_swap_is_served() {
    use std::os::unix::fs::symlink;
    let dir = PolicyDir::new();
    let root = dir.path();
    let old = "..2026_01_01_00_00_00.000000001";
    let catalog_and_plans = |limit: u64| format!("{CATALOG}{}", plans(limit));
    configmap_version(
        root,
        old,
        &[
            ("catalog.yaml", &catalog_and_plans(100)),
            ("customers.yaml", CUSTOMERS),
        ],
    );
    symlink(old, root.join("..data")).expect("..data symlink");
    for key in ["catalog.yaml", "customers.yaml"] {
        symlink(format!("..data/{key}"), root.join(key)).expect("key symlink");
    }
    let s = start(root);
    assert_eq!(limit(&s, "acme"), 100, "status {}", s.status());
    // The folder is reached only through the symlinks: no name is defined twice.
    assert_eq!(s.status()["snapshot"]["customers"], 1);
    let g1 = generation(&s);

    // The swap, step by step as kubelet's atomic writer does it.
    let new = "..2026_01_01_00_05_00.000000002";
    configmap_version(
        root,
        new,
        &[
            ("catalog.yaml", &catalog_and_plans(250)),
            ("customers.yaml", CUSTOMERS),
        ],
    );
    symlink(new, root.join("..data_tmp")).expect("..data_tmp symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swapping ..data");
    std::fs::remove_dir_all(root.join(old)).expect("removing the old folder");

    await_limit(&s, 250);
    let st = s.status();
    assert!(st["last_error"].is_null(), "{st}");
    assert!(st["generation"].as_u64().is_some_and(|g| g > g1), "{st}");

    // And a second swap (the watcher still follows after the first).
    let newer = "..2026_01_01_00_10_00.000000003";
    configmap_version(
        root,
        newer,
        &[
            ("catalog.yaml", &catalog_and_plans(275)),
            ("customers.yaml", CUSTOMERS),
        ],
    );
    symlink(newer, root.join("..data_tmp")).expect("..data_tmp symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swapping ..data");
    std::fs::remove_dir_all(root.join(new)).expect("removing the old folder");
    await_limit(&s, 275);
}

#[test]
fn a_burst_of_100_writes_collapses_into_few_reloads() {
    let dir = standard_dir(1);
    let s = start(dir.path());
    let g0 = generation(&s);
    for i in 1..=100u64 {
        dir.write("plans.yaml", &plans(1000 + i));
    }
    await_limit(&s, 1100);
    // Any reload still to come compiles the same final content and swaps nothing.
    let st = s.status();
    let g = st["generation"].as_u64().expect("generation");
    let grew = g - g0;
    eprintln!(
        "100 writes -> {grew} new snapshot(s), {} failed load(s)",
        st["reloads_failed"]
    );
    assert!(grew >= 1, "{st}");
    assert!(
        grew < 20,
        "100 writes made {grew} snapshots: not debounced; {st}"
    );
    assert_eq!(limit(&s, "acme"), 1100);
}

#[test]
fn a_broken_file_keeps_the_last_good_snapshot_until_fixed() {
    let dir = standard_dir(100);
    let s = spawn(dir.path());
    let v1 = s.version().expect("version");
    let before = s.check("acme", "api.calls");
    let failed0 = s.status()["reloads_failed"]
        .as_u64()
        .expect("reloads_failed");

    dir.write(
        "plans.yaml",
        "plans:\n  pro:\n    grants:\n      api.calls: { limit: 500, per: month ]\n",
    );
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        (st["reloads_failed"].as_u64() > Some(failed0) && !st["last_error"].is_null()).then_some(st)
    })
    .unwrap_or_else(|| panic!("the broken file was never reported; status {}", s.status()));
    // Still the old snapshot, still the old decisions.
    assert_eq!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert_eq!(st["ready"], true, "{st}");
    let during = s.check("acme", "api.calls");
    assert_eq!(during["limit"], before["limit"], "{during}");
    assert_eq!(during["snapshot"], v1.as_str(), "{during}");
    assert_eq!(s.get("/readyz").status, 200);
    let errors = st["last_error"]["errors"].as_array().expect("errors");
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .is_some_and(|e| names_file_line_col(e, "plans.yaml"))),
        "last_error does not name plans.yaml:line:col: {st}"
    );
    let metrics = s.get("/metrics").text();
    assert!(
        metric_value(
            &metrics,
            r#"entitled_policy_reloads_total{result="failure"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "no failed reload counted:\n{metrics}"
    );

    dir.write("plans.yaml", &plans(500));
    await_limit(&s, 500);
    let st = s.status();
    assert!(st["last_error"].is_null(), "{st}");
    assert_ne!(st["snapshot"]["version"], v1.as_str(), "{st}");
}

/// A FIFO and a device under policy file names (a FIFO opened for reading waits for a
/// writer; `/dev/zero` reports size 0 and never ends): each is an error naming its
/// path, the last good snapshot keeps serving, later changes still load, and the
/// server still stops on SIGTERM.
#[test]
fn special_files_are_refused_and_reload_goes_on() {
    let dir = standard_dir(100);
    let mut s = spawn(dir.path());
    let v1 = s.version().expect("version");
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("trap.yaml"))
        .status()
        .expect("mkfifo");
    assert!(made.success());
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.yaml")).expect("symlink");
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        let errors = st["last_error"]["errors"].to_string();
        (errors.contains("trap.yaml") && errors.contains("zero.yaml")).then_some(st)
    })
    .unwrap_or_else(|| panic!("special files never reported; status {}", s.status()));
    let errors = st["last_error"]["errors"].to_string();
    assert!(errors.contains("not a regular file (a FIFO)"), "{st}");
    assert!(
        errors.contains("not a regular file (a character device)"),
        "{st}"
    );
    assert_eq!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert_eq!(s.get("/readyz").status, 200);

    dir.remove("trap.yaml");
    dir.remove("zero.yaml");
    dir.write("plans.yaml", &plans(500));
    await_limit(&s, 500);
    assert!(s.status()["last_error"].is_null(), "{}", s.status());
    assert!(s.stop_gracefully().success(), "{}", s.stderr());
}

/// A broken change reverted byte for byte loads the version already served: nothing is
/// swapped, but the load succeeded, so the last-success timestamp moves (the
/// "stuck on a broken change" alert must not fire) and the log says the error cleared.
#[test]
fn a_reverted_broken_change_clears_the_error_and_moves_the_success_time() {
    let dir = standard_dir(100);
    let s = spawn(dir.path());
    let v1 = s.version().expect("version");
    let success = |s: &Server| {
        metric_value(
            &s.get("/metrics").text(),
            "entitled_policy_last_reload_success_timestamp_seconds",
        )
        .expect("the last-success gauge")
    };
    let t1 = success(&s);
    dir.write("plans.yaml", "plans: [\n");
    assert!(
        wait_until(DEADLINE, || !s.status()["last_error"].is_null()),
        "the broken file was never reported; status {}",
        s.status()
    );
    dir.write("plans.yaml", &plans(100));
    assert!(
        wait_until(DEADLINE, || s.status()["last_error"].is_null()),
        "the error never cleared; status {}",
        s.status()
    );
    assert_eq!(s.version().as_deref(), Some(v1.as_str()));
    assert!(success(&s) > t1, "the last-success time did not move");
    assert!(
        wait_until(DEADLINE, || s.stderr().contains("policy error cleared")),
        "{}",
        s.stderr()
    );
}

/// `n` customers on the pro plan, ids `c0000`, `c0001`, ... (one YAML line each).
fn many_customers(n: usize) -> String {
    let mut s = String::from("customers:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - {{ id: c{i:04}, subscriptions: [{{ plan: pro, starts: 2020-01-01 }}] }}\n"
        ));
    }
    s
}

fn customers_served(s: &Server) -> Option<u64> {
    s.status()["snapshot"]["customers"].as_u64()
}

/// Loads the reloader has finished (served, failed or held).
fn reload_attempts(s: &Server) -> u64 {
    let st = s.status();
    ["reloads_ok", "reloads_failed", "reloads_held"]
        .iter()
        .map(|k| st[k].as_u64().unwrap_or(0))
        .sum()
}

/// A file rewritten in place by a slow writer (truncated, then written in ten chunks
/// of whole lines, each pause long enough for the reloader to load what is there) is
/// never served half-written: the first load of it removes most customers and is
/// held, every later part is held until the files stay unchanged for the settle time,
/// and then the whole new file is served, as the one snapshot change.
#[test]
fn a_slow_in_place_writer_never_serves_a_partial_customer_set() {
    use std::io::Write as _;
    const N: usize = 1000;
    let dir = PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("plans.yaml", &plans(100)),
        ("customers.yaml", &many_customers(N)),
    ]);
    let s = start_with_settle(dir.path(), "5s");
    assert_eq!(customers_served(&s), Some(N as u64));
    let g0 = generation(&s);

    let new = many_customers(N + 1);
    let lines: Vec<&str> = new.split_inclusive('\n').collect();
    let mut file = std::fs::File::create(dir.join("customers.yaml")).expect("truncating");
    for chunk in lines.chunks(lines.len() / 10 + 1) {
        let seen = reload_attempts(&s);
        // What the reloader makes of the file so far, before the next part comes.
        wait_until(Duration::from_secs(1), || reload_attempts(&s) > seen);
        let served = customers_served(&s);
        assert_eq!(
            served,
            Some(N as u64),
            "a partial customer set was served; status {}",
            s.status()
        );
        file.write_all(chunk.concat().as_bytes())
            .expect("writing a chunk");
        file.flush().expect("flushing a chunk");
    }
    drop(file);
    assert!(
        wait_until(DEADLINE, || customers_served(&s) == Some(N as u64 + 1)),
        "the finished file was not served; status {}",
        s.status()
    );
    let st = s.status();
    assert_eq!(
        generation(&s),
        g0 + 1,
        "more than one snapshot change: {st}"
    );
    assert!(st["held"].is_null(), "{st}");
    assert!(st["reloads_held"].as_u64().is_some_and(|n| n >= 1), "{st}");
    assert_eq!(s.check(&format!("c{N:04}"), "api.calls")["allowed"], true);
}

fn start_with_settle(dir: &Path, settle: &str) -> Server {
    Server::start_with(
        dir,
        &["--reload-debounce", "50ms", "--reload-settle", settle],
    )
}

/// A load that removes most customers at once is held: the last snapshot keeps
/// serving, `/v1/status` says what is held and why, the metrics show it, and SIGHUP
/// (the operator's confirmation) serves it.
#[test]
fn a_mass_removal_is_held_and_reported_until_sighup_confirms_it() {
    let dir = PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("plans.yaml", &plans(100)),
        ("customers.yaml", &many_customers(300)),
    ]);
    let s = Server::spawn_with(
        dir.path(),
        &["--reload-debounce", "50ms", "--reload-settle", "1h"],
    );
    let v1 = s.version().expect("version");
    dir.write(".customers.yaml.tmp", &many_customers(100));
    std::fs::rename(dir.join(".customers.yaml.tmp"), dir.join("customers.yaml")).expect("rename");
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        (!st["held"].is_null()).then_some(st)
    })
    .unwrap_or_else(|| panic!("the mass removal was not held; status {}", s.status()));
    assert_eq!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert_eq!(st["snapshot"]["customers"], 300, "{st}");
    assert_eq!(
        (
            &st["held"]["customers_served"],
            &st["held"]["customers_loaded"],
            &st["held"]["customers_removed"]
        ),
        (&json!(300), &json!(100), &json!(200)),
        "{st}"
    );
    assert!(
        st["held"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SIGHUP")),
        "{st}"
    );
    assert_eq!(s.check("c0250", "api.calls")["allowed"], true);
    assert_eq!(s.get("/readyz").status, 200);
    let metrics = s.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "entitled_policy_reload_held"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, r#"entitled_policy_reloads_total{result="held"}"#)
            .is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    assert!(s.stderr().contains("policy load held"), "{}", s.stderr());

    assert_eq!(send_signal(s.pid(), "HUP"), 0, "sending SIGHUP");
    assert!(
        wait_until(DEADLINE, || customers_served(&s) == Some(100)),
        "SIGHUP did not serve the held load; status {}",
        s.status()
    );
    let st = s.status();
    assert!(st["held"].is_null(), "{st}");
    assert_eq!(s.check("c0250", "api.calls")["reason"], "unknown_customer");
    let metrics = s.get("/metrics").text();
    assert_eq!(
        metric_value(&metrics, "entitled_policy_reload_held"),
        Some(0.0),
        "{metrics}"
    );
}

/// Sends `signal` (`HUP`) to `pid` with the `kill` command; its exit code.
fn send_signal(pid: u32, signal: &str) -> i32 {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    status.code().unwrap_or(-1)
}

/// Without a confirmation, a held mass removal is served once the files have stayed
/// unchanged for the settle time.
#[test]
fn a_held_mass_removal_is_served_once_the_files_settle() {
    let dir = PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("plans.yaml", &plans(100)),
        ("customers.yaml", &many_customers(300)),
    ]);
    let s = start_with_settle(dir.path(), "300ms");
    let g0 = generation(&s);
    dir.write("customers.yaml", &many_customers(100));
    assert!(
        wait_until(DEADLINE, || customers_served(&s) == Some(100)),
        "the settled load was not served; status {}",
        s.status()
    );
    let st = s.status();
    assert!(st["held"].is_null(), "{st}");
    assert!(
        st["reloads_held"].as_u64().is_some_and(|n| n >= 1),
        "it was never held: {st}"
    );
    assert_eq!(generation(&s), g0 + 1, "{st}");
}

/// A policy directory without features is not ready, and says why; `--allow-empty`
/// serves it.
#[test]
fn a_policy_directory_without_features_is_not_ready() {
    let dir = PolicyDir::with(&[("customers.yaml", "customers: []\n")]);
    let s = start(dir.path());
    let r = s.get("/readyz");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no `features`"), "{}", r.text());
    let st = s.status();
    assert_eq!(st["ready"], false, "{st}");
    let errors = st["last_error"]["errors"].to_string();
    assert!(errors.contains("--allow-empty"), "{st}");
    assert!(
        !errors.contains(":0:0"),
        "a path-level error shows a position: {st}"
    );

    let s = Server::start_with(dir.path(), &["--allow-empty"]);
    assert_eq!(s.get("/readyz").status, 200);
}

/// A rate grant changed by a reload applies to a throttled customer at once: raised
/// from `1/h` to `100/s`, the customer waits the new grant's 10 ms, not the rest of
/// the old grant's hour (time moves only on the test clock).
#[test]
fn a_raised_rate_limit_frees_a_throttled_customer_at_once() {
    let policy = |grant: &str| {
        format!(
            "features:\n  api.rate: {{ kind: rate }}\nplans:\n  pro:\n    grants:\n      api.rate: {grant}\n{CUSTOMERS}"
        )
    };
    let dir = PolicyDir::with(&[("policy.yaml", &policy("{ limit: 1, per: 1h }"))]);
    let s = Server::start_with(
        dir.path(),
        &[
            "--reload-debounce",
            "50ms",
            "--test-clock",
            "2026-06-15T12:00:00Z",
        ],
    );
    let consume = || {
        s.decide(
            "/v1/consume",
            &json!({"customer": "acme", "feature": "api.rate"}),
        )
    };
    assert_eq!(consume()["allowed"], true);
    let d = consume();
    assert_eq!(d["reason"], "rate_limited", "{d}");
    assert_eq!(d["retry_after"], 3600.0, "{d}");

    dir.write("policy.yaml", &policy("{ limit: 100, per: 1s }"));
    assert!(
        wait_until(DEADLINE, || s.check("acme", "api.rate")["limit"] == 100),
        "the new grant was not served; status {}",
        s.status()
    );
    let d = consume();
    assert_eq!(d["reason"], "rate_limited", "{d}");
    assert_eq!(d["retry_after"], 0.01, "waits by the new grant: {d}");
    let advanced = s.post("/v1/test-clock", &json!({"advance": "10ms"}));
    assert_eq!(advanced.status, 200, "{}", advanced.text());
    let d = consume();
    assert_eq!(d["allowed"], true, "{d}");
}
