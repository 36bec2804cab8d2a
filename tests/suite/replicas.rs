//! Customer writes shared by replicas through a Redis Stream, against real binaries
//! and real `redis-server` processes (a single node, and a three-node Redis Cluster):
//! write on A and read on B and C; `kill -9` of B during a write burst; a replica
//! started later; Redis stopped and back; the stream trimmed behind a stopped replica;
//! Redis restarted empty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Resp, Server, free_port, output_within, request, wait_until};
use super::support::{Redis, RedisValue};

const CATALOG: &str = "\
features:
  sso: { kind: flag }
  api.calls: { kind: quota }
plans:
  free:
    grants:
      api.calls: { limit: 100, per: month }
  pro:
    grants:
      sso: true
      api.calls: { limit: 1000, per: month }
";

const TOKEN: &str = "replica-test-token";
/// Generous: the machine running the tests may be busy; nothing waits this long
/// unless something is wrong.
const WITHIN: Duration = Duration::from_secs(20);

/// The policy files and token file every replica shares; each replica has its own
/// state directory.
struct Fleet {
    policies: PolicyDir,
    dir: tempfile::TempDir,
    store: Vec<String>,
}

impl Fleet {
    fn new(store: &[&str]) -> Fleet {
        let policies = PolicyDir::with(&[("catalog.yaml", CATALOG)]);
        let dir = tempfile::tempdir().expect("fleet dir");
        std::fs::write(dir.path().join("tokens"), format!("billing:{TOKEN}\n")).expect("tokens");
        Fleet {
            policies,
            dir,
            store: store.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replica `name` (its state directory `name`), following the shared stream.
    fn replica(&self, name: &str, extra: &[&str]) -> Server {
        let tokens = self.dir.path().join("tokens").display().to_string();
        let state = self.state(name).display().to_string();
        let mut args: Vec<&str> = vec![
            "--admin-token-file",
            &tokens,
            "--state-dir",
            &state,
            "--store-timeout",
            "500ms",
        ];
        args.extend(self.store.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let s = Server::spawn_with(self.policies.path(), &args);
        assert!(
            wait_until(WITHIN, || replication(&s)["state"] == "following"),
            "replica {name} never followed the stream: {}",
            replication(&s)
        );
        s
    }
}

fn replication(s: &Server) -> Value {
    s.status()["customers_api"]["replication"].clone()
}

fn put(s: &Server, id: &str, plan: &str) -> Resp {
    let body = json!({ "subscriptions": [{ "plan": plan, "starts": "2024-01-01" }] });
    request(
        s.addr,
        "PUT",
        &format!("/v1/customers/{id}"),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ],
        &serde_json::to_vec(&body).expect("body"),
    )
}

fn put_ok(s: &Server, id: &str, plan: &str) -> u64 {
    let r = put(s, id, plan);
    assert_eq!(r.status, 200, "PUT {id}: {}", r.text());
    r.json()["revision"].as_u64().expect("revision")
}

/// A check of `sso` that must be answered once `min_revision` is applied.
fn sso_at(s: &Server, id: &str, min_revision: u64) -> bool {
    let r = s.post(
        "/v1/check",
        &json!({ "customer": id, "feature": "sso", "min_revision": min_revision }),
    );
    assert_eq!(r.status, 200, "check {id} at {min_revision}: {}", r.text());
    r.json()["allowed"] == json!(true)
}

/// The API record of `id` on `s`: (revision, plan), or `None`.
fn api_record(s: &Server, id: &str) -> Option<(u64, String)> {
    let r = s.get(&format!("/v1/customers/{id}/record"));
    if r.status != 200 {
        return None;
    }
    let v = r.json();
    (v["source"] == "api").then(|| {
        (
            v["revision"].as_u64().unwrap_or(0),
            v["record"]["subscriptions"][0]["plan"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    })
}

fn applied(s: &Server) -> u64 {
    s.status()["customers_api"]["revision"]
        .as_u64()
        .unwrap_or(0)
}

fn kill9(s: &mut Server) {
    let ok = Command::new("kill")
        .args(["-KILL", &s.pid().to_string()])
        .status()
        .expect("kill -KILL");
    assert!(ok.success());
    assert!(
        s.wait_exit(Duration::from_secs(10)).is_some(),
        "still running after kill -9"
    );
}

/// The revisions in a replica's customer journal, in file order.
fn journal_revisions(state: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(state.join("customers/journal.ndjson")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["revision"].as_u64())
        .collect()
}

/// Write on A; B and C serve it (a `min_revision` check waits for it); a revision
/// nobody wrote answers 503 `stale` with the revision applied.
fn write_on_a_read_on_b_and_c(fleet: &Fleet) {
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    let c = fleet.replica("c", &["--revision-wait", "10s"]);
    let r1 = put_ok(&a, "acme", "pro");
    assert!(sso_at(&a, "acme", r1), "the writer serves its own write");
    assert!(sso_at(&b, "acme", r1), "B serves A's write");
    assert!(sso_at(&c, "acme", r1), "C serves A's write");
    let r2 = put_ok(&c, "acme", "free");
    assert!(r2 > r1, "revisions are fleet-wide: {r1} then {r2}");
    assert!(!sso_at(&a, "acme", r2), "A serves C's downgrade");
    assert!(!sso_at(&b, "acme", r2), "B serves C's downgrade");
    assert_eq!(api_record(&b, "acme"), Some((r2, "free".into())));
    // A waits --revision-wait (250 ms) for a revision nobody wrote, then says so.
    let r = a.post(
        "/v1/check",
        &json!({ "customer": "acme", "feature": "sso", "min_revision": r2 + 1000 }),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "stale");
    assert_eq!(r.json()["error"]["applied_revision"], json!(r2));
    let rep = replication(&b);
    assert_eq!(rep["applied"], json!(r2), "{rep}");
    assert_eq!(rep["lag_revisions"], json!(0), "{rep}");
    // Dropping the API record on B: no file defines acme, so it is gone everywhere,
    // and a replica started later from the shared snapshot does not have it either.
    let r = request(
        b.addr,
        "DELETE",
        "/v1/customers/acme/record",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(r.status, 200, "forget: {}", r.text());
    let r3 = r.json()["revision"].as_u64().expect("revision");
    assert!(r3 > r2);
    for s in [&a, &c] {
        let d = s.decide(
            "/v1/check",
            &json!({ "customer": "acme", "feature": "sso", "min_revision": r3 }),
        );
        assert_eq!(d["reason"], "unknown_customer", "{d}");
        assert_eq!(api_record(s, "acme"), None);
    }
    let d = fleet.replica("d", &["--revision-wait", "10s"]);
    assert!(
        wait_until(WITHIN, || applied(&d) >= r3),
        "D never caught up"
    );
    assert_eq!(api_record(&d, "acme"), None);
    assert_eq!(d.check("acme", "sso")["reason"], "unknown_customer");
}

#[test]
fn a_write_on_one_replica_is_served_by_the_others() {
    let redis = Redis::start();
    let fleet = Fleet::new(&["--store", &redis.url()]);
    write_on_a_read_on_b_and_c(&fleet);
}

/// A write burst on A while B is killed with SIGKILL and restarted: B ends with
/// every acknowledged write, each applied once; D, started afterwards from nothing,
/// has them all too.
fn kill9_during_a_burst_then_a_late_replica(fleet: &Fleet) {
    let a = Arc::new(fleet.replica("a", &[]));
    let mut b = fleet.replica("b", &[]);
    let acked: Arc<Mutex<BTreeMap<String, (u64, String)>>> = Arc::default();
    let writer = {
        let (a, acked) = (a.clone(), acked.clone());
        std::thread::spawn(move || {
            for i in 0..300 {
                let id = format!("c{}", i % 120);
                let plan = if i % 3 == 0 { "free" } else { "pro" };
                let r = put(&a, &id, plan);
                assert_eq!(r.status, 200, "PUT {id}: {}", r.text());
                let rev = r.json()["revision"].as_u64().expect("revision");
                acked.lock().expect("acked").insert(id, (rev, plan.into()));
            }
        })
    };
    assert!(
        wait_until(WITHIN, || acked.lock().expect("acked").len() >= 40),
        "the burst did not start"
    );
    kill9(&mut b);
    writer.join().expect("the writer");
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    let last = acked
        .lock()
        .expect("acked")
        .values()
        .map(|v| v.0)
        .max()
        .unwrap_or(0);
    assert!(
        wait_until(WITHIN, || applied(&b) >= last),
        "B applied {} of {last}",
        applied(&b)
    );
    let acked = acked.lock().expect("acked").clone();
    for (id, want) in &acked {
        assert_eq!(
            api_record(&b, id).as_ref(),
            Some(want),
            "B's record of {id}"
        );
    }
    let revs = journal_revisions(&fleet.state("b"));
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "B's journal holds a revision twice or out of order"
    );
    let d = fleet.replica("d", &["--revision-wait", "10s"]);
    assert!(
        wait_until(WITHIN, || applied(&d) >= last),
        "D never caught up"
    );
    for (id, want) in &acked {
        assert_eq!(
            api_record(&d, id).as_ref(),
            Some(want),
            "D's record of {id}"
        );
    }
    assert_eq!(
        d.status()["customers_api"]["api_records"],
        json!(acked.len()),
        "D has exactly the written customers"
    );
}

#[test]
fn kill9_during_a_write_burst_loses_nothing_and_a_late_replica_has_everything() {
    let redis = Redis::start();
    let fleet = Fleet::new(&["--store", &redis.url()]);
    kill9_during_a_burst_then_a_late_replica(&fleet);
    // Strict usage counters on the cluster: each customer's keys in its own slot, on
    // whichever node owns it; A's consumes are seen by B.
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &[]);
    for i in 0..12 {
        let id = format!("c{i}");
        let body = json!({ "customer": id, "feature": "api.calls", "amount": 1 });
        let first = a.decide("/v1/consume", &body);
        let second = b.decide("/v1/consume", &body);
        let (r1, r2) = (
            first["remaining"].as_i64().expect("remaining"),
            second["remaining"].as_i64().expect("remaining"),
        );
        assert_eq!(
            r2,
            r1 - 1,
            "{id}: B did not see A's consume ({first} then {second})"
        );
    }
    let metrics = b.get("/metrics").text();
    assert!(
        metrics.contains("entitled_store_errors_total 0"),
        "Redis errors on the cluster: {metrics}"
    );
}

#[test]
fn redis_unreachable_refuses_writes_keeps_deciding_and_catches_up() {
    let redis = Redis::start();
    let fleet = Fleet::new(&["--store", &redis.url()]);
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    let r1 = put_ok(&a, "acme", "pro");
    assert!(sso_at(&b, "acme", r1));
    redis.pause();
    let refused = put(&a, "acme", "free");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        sso_at(&b, "acme", r1),
        "B keeps deciding on what it applied"
    );
    assert!(
        wait_until(WITHIN, || {
            let r = replication(&b);
            r["state"] == "unreachable" && r["lag_seconds"].as_f64().unwrap_or(0.0) > 0.0
        }),
        "B's status never said Redis is unreachable: {}",
        replication(&b)
    );
    let metrics = b.get("/metrics").text();
    assert!(
        metrics.contains("entitled_customers_following 0"),
        "{metrics}"
    );
    redis.resume();
    let r2 = wait_for_put(&a, "acme", "free");
    assert!(
        !sso_at(&b, "acme", r2),
        "B caught up with the write after Redis returned"
    );
    assert!(
        wait_until(WITHIN, || replication(&b)["state"] == "following"),
        "{}",
        replication(&b)
    );
    // The refused write was not acknowledged; sent before Redis stopped answering, it
    // may still have landed (as any timed-out request may): a retry is the same PUT.
    assert!(r2 > r1);
    assert_eq!(api_record(&a, "acme"), api_record(&b, "acme"));
}

/// PUT until Redis answers again (the connection comes back on its own).
fn wait_for_put(s: &Server, id: &str, plan: &str) -> u64 {
    let mut rev = None;
    assert!(
        wait_until(WITHIN, || {
            let r = put(s, id, plan);
            if r.status == 200 {
                rev = r.json()["revision"].as_u64();
            }
            rev.is_some()
        }),
        "writes never succeeded again"
    );
    rev.unwrap_or(0)
}

#[test]
fn a_replica_whose_position_was_trimmed_reloads_from_the_snapshot() {
    let redis = Redis::start();
    let fleet = Fleet::new(&["--store", &redis.url()]);
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    let r = put_ok(&a, "gone", "pro");
    assert!(sso_at(&b, "gone", r));
    let mut b = b;
    b.stop_gracefully();
    let mut last = 0;
    for i in 0..30 {
        last = put_ok(&a, &format!("t{i}"), "pro");
    }
    let deleted = request(
        a.addr,
        "DELETE",
        "/v1/customers/gone",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    last = last.max(deleted.json()["revision"].as_u64().unwrap_or(0));
    // Keep the last 5 entries only: B's position is gone from the stream.
    let stream = "{entitled:customers}:stream";
    redis.cmd(&["XTRIM", stream, "MAXLEN", "5"]);
    assert_eq!(redis.cmd(&["XLEN", stream]), RedisValue::Int(5));
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    assert!(
        wait_until(WITHIN, || applied(&b) >= last),
        "B never caught up"
    );
    let rep = replication(&b);
    assert!(rep["resyncs"].as_u64().unwrap_or(0) >= 1, "{rep}");
    for i in 0..30 {
        assert!(api_record(&b, &format!("t{i}")).is_some(), "t{i} on B");
    }
    let r = b.get("/v1/customers/gone/record");
    assert_eq!(r.json()["deleted"], json!(true), "{}", r.text());
    assert_eq!(b.status()["customers_api"]["api_records"], json!(30));
}

#[test]
fn redis_restarted_empty_is_detected_and_never_taken_for_revision_one() {
    let mut redis = Redis::start();
    let fleet = Fleet::new(&["--store", &redis.url()]);
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &["--revision-wait", "10s"]);
    let r = put_ok(&a, "acme", "pro");
    assert!(sso_at(&b, "acme", r));
    redis.restart();
    for s in [&a, &b] {
        assert!(
            wait_until(WITHIN, || replication(s)["state"] == "other_history"),
            "{}",
            replication(s)
        );
        assert!(sso_at(s, "acme", r), "keeps serving what it applied");
        assert_eq!(applied(s), r);
    }
    let refused = put(&a, "acme", "free");
    assert_eq!(refused.status, 503, "{}", refused.text());
    // A new replica creates a new history on the empty Redis; A and B do not take its
    // revision 1 for theirs.
    let c = fleet.replica("c", &[]);
    let one = put_ok(&c, "other", "pro");
    assert_eq!(one, 1);
    assert!(wait_until(WITHIN, || replication(&c)["applied"] == json!(1)));
    assert_eq!(replication(&a)["state"], "other_history");
    assert!(
        api_record(&b, "other").is_none(),
        "B applied another history"
    );
    assert!(sso_at(&b, "acme", r));
}

/// Three `redis-server` processes in cluster mode, joined by `redis-cli --cluster
/// create`, killed on drop.
struct Cluster {
    nodes: Vec<(u16, Child)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("cluster dir");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let work = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&work).expect("node dir");
            let log = std::fs::File::create(work.join("log")).expect("log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(&work)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("redis-server");
            nodes.push((port, child));
        }
        let c = Cluster { nodes, _dir: dir };
        for (port, _) in &c.nodes {
            assert!(
                wait_until(WITHIN, || c.cli(*port, &["PING"]).trim() == "PONG"),
                "cluster node {port} never answered"
            );
        }
        let addrs: Vec<String> = c
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let out = output_within(
            Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
            WITHIN,
        );
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (port, _) in &c.nodes {
            assert!(
                wait_until(WITHIN, || c
                    .cli(*port, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")),
                "the cluster never became ok"
            );
        }
        c
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = output_within(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(args),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_redis_cluster_of_three_nodes_passes_the_same_checks() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let fleet = Fleet::new(&["--store", &url, "--store-cluster"]);
    write_on_a_read_on_b_and_c(&fleet);
    let fleet = Fleet::new(&[
        "--store",
        &url,
        "--store-cluster",
        "--store-prefix",
        "burst",
    ]);
    kill9_during_a_burst_then_a_late_replica(&fleet);
}
