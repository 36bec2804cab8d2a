//! The customer write API against the real binary: `PUT`/`DELETE /v1/customers/{id}`,
//! overrides, reading a record back, tokens, durability across restarts and
//! `kill -9`, precedence over the files, `min_revision`, and `customers export`.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{PolicyDir, Resp, Server, output_within, request, wait_until};

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

const ACME_FREE: &str = "\
customers:
  - id: acme
    subscriptions:
      - { plan: free, starts: 2024-01-01 }
";

const TOKEN: &str = "s3cret-billing-token";

/// A policy directory (catalog + acme on free), a token file and a state directory.
struct Setup {
    policies: PolicyDir,
    state: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let policies = PolicyDir::with(&[("catalog.yaml", CATALOG), ("customers.yaml", ACME_FREE)]);
        let state = tempfile::tempdir().expect("state dir");
        std::fs::write(state.path().join("tokens"), format!("billing:{TOKEN}\n")).expect("tokens");
        Setup { policies, state }
    }

    fn tokens(&self) -> String {
        self.state.path().join("tokens").display().to_string()
    }

    fn state_dir(&self) -> String {
        self.state.path().join("state").display().to_string()
    }

    /// The binary with writes enabled.
    fn spawn(&self, extra: &[&str]) -> Server {
        let (tokens, state) = (self.tokens(), self.state_dir());
        let mut args = vec![
            "--admin-token-file",
            &tokens,
            "--state-dir",
            &state,
            "--reload-debounce",
            "50ms",
        ];
        args.extend_from_slice(extra);
        Server::spawn_with(self.policies.path(), &args)
    }
}

fn send(s: &Server, method: &str, path: &str, token: Option<&str>, body: &Value) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).expect("body")
    };
    request(s.addr, method, path, &headers, &bytes)
}

fn put(s: &Server, id: &str, record: &Value) -> Resp {
    send(
        s,
        "PUT",
        &format!("/v1/customers/{id}"),
        Some(TOKEN),
        record,
    )
}

fn put_ok(s: &Server, id: &str, record: &Value) -> u64 {
    let r = put(s, id, record);
    assert_eq!(r.status, 200, "PUT {id}: {}", r.text());
    r.json()["revision"].as_u64().expect("revision")
}

fn pro() -> Value {
    json!({ "subscriptions": [{ "plan": "pro", "starts": "2024-01-01" }] })
}

fn sso(s: &Server, id: &str) -> bool {
    s.check(id, "sso")["allowed"] == json!(true)
}

fn record(s: &Server, id: &str) -> Value {
    let r = s.get(&format!("/v1/customers/{id}/record"));
    assert_eq!(r.status, 200, "GET record {id}: {}", r.text());
    r.json()
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

#[test]
fn a_write_is_served_by_the_next_request_and_read_back() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    assert!(!sso(&s, "acme"), "acme is on free in the files");
    assert_eq!(record(&s, "acme")["source"], "file");
    assert_eq!(record(&s, "acme")["file"], "customers.yaml");
    let rev = put_ok(&s, "acme", &pro());
    assert_eq!(rev, 1);
    assert!(sso(&s, "acme"), "the next request sees the write");
    let new = put_ok(
        &s,
        "newco",
        &json!({ "id": "newco", "subscriptions": [{ "plan": "pro", "starts": "2024-01-01" }] }),
    );
    assert_eq!(new, 2);
    assert!(sso(&s, "newco"));
    let r = record(&s, "acme");
    assert_eq!(r["source"], "api");
    assert_eq!(r["revision"], 1);
    assert_eq!(r["by"], "billing");
    assert_eq!(r["shadows_file_record"], true);
    assert_eq!(r["record"]["subscriptions"][0]["plan"], "pro");
    let st = s.status();
    assert_eq!(st["revision"], 2, "{st}");
    assert_eq!(st["customers_api"]["api_records"], 2, "{st}");
    assert_eq!(st["customers_api"]["shadowing_files"], 1, "{st}");
    assert_eq!(st["snapshot"]["customers"], 2, "{st}");
}

#[test]
fn acknowledged_writes_survive_a_restart_and_kill_9() {
    let setup = Setup::new();
    let mut s = setup.spawn(&["--durability", "async"]);
    put_ok(&s, "newco", &pro());
    let status = s.stop_gracefully();
    assert!(status.success());
    let mut s = setup.spawn(&["--durability", "async"]);
    assert!(sso(&s, "newco"), "restart lost the write");
    assert_eq!(put_ok(&s, "acme", &pro()), 2);
    kill9(&mut s);
    let s = setup.spawn(&[]);
    assert!(
        sso(&s, "newco") && sso(&s, "acme"),
        "kill -9 lost an acknowledged write"
    );
    assert_eq!(s.status()["revision"], 2);
    assert_eq!(
        put_ok(&s, "third", &pro()),
        3,
        "revisions go on after a restart"
    );
}

#[test]
fn a_bad_record_is_400_naming_the_field_and_changes_nothing() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    let cases = [
        (
            json!({ "subscriptions": [{ "plan": "prp", "starts": "2024-01-01" }] }),
            "subscriptions[0].plan",
            "pro",
        ),
        (
            json!({ "subscriptions": [{ "plan": "pro", "strts": "2024-01-01" }] }),
            "subscriptions[0].strts",
            "unknown field",
        ),
        (
            json!({ "id": "other", "subscriptions": [] }),
            "id",
            "differs",
        ),
        (
            json!({ "subscriptions": [{ "plan": "pro", "starts": "soon" }] }),
            "subscriptions[0].starts",
            "",
        ),
        (
            json!({ "grants": [{ "feature": "sso", "value": 3 }] }),
            "grants[0].value",
            "",
        ),
    ];
    for (body, field, says) in cases {
        let r = put(&s, "acme", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["field"], field, "{body}: {e}");
        assert!(
            e["problems"][0]["message"]
                .as_str()
                .unwrap_or("")
                .contains(says),
            "{e}"
        );
    }
    let r = request(
        s.addr,
        "PUT",
        "/v1/customers/acme",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        b"{not json",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!sso(&s, "acme"));
    assert_eq!(record(&s, "acme")["source"], "file");
    assert_eq!(s.status()["revision"], 0);
}

#[test]
fn writes_need_a_configured_state_dir_and_a_valid_token() {
    let setup = Setup::new();
    // No token file: writes are off.
    let off = Server::spawn_with(setup.policies.path(), &[]);
    let r = put(&off, "acme", &pro());
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "writes_disabled");
    // No state directory: writes are off too, and say why.
    let tokens = setup.tokens();
    let mem = Server::spawn_with(
        setup.policies.path(),
        &["--admin-token-file", &tokens, "--durability", "memory"],
    );
    let r = put(&mem, "acme", &pro());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("--durability memory"), "{}", r.text());
    // Enabled: a missing or wrong token is 401, and nothing changes.
    let s = setup.spawn(&[]);
    for token in [None, Some("wrong")] {
        let r = send(&s, "PUT", "/v1/customers/acme", token, &pro());
        assert_eq!(r.status, 401, "{token:?}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let r = send(
        &s,
        "DELETE",
        "/v1/customers/acme",
        Some("wrong"),
        &Value::Null,
    );
    assert_eq!(r.status, 401);
    assert!(!sso(&s, "acme"));
    // The token file is read again when it changes.
    std::fs::write(setup.state.path().join("tokens"), "crm:rotated-token-2\n").expect("tokens");
    assert_eq!(
        put(&s, "acme", &pro()).status,
        401,
        "the old token still works"
    );
    let r = send(
        &s,
        "PUT",
        "/v1/customers/acme",
        Some("rotated-token-2"),
        &pro(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(record(&s, "acme")["by"], "crm");
}

#[test]
fn an_api_record_stays_on_top_of_the_files_across_reloads() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    put_ok(&s, "acme", &pro());
    let generation = s.status()["generation"].as_u64().expect("generation");
    // The files change acme (still free) and add beta.
    setup.policies.write(
        "customers.yaml",
        &format!("{ACME_FREE}  - id: beta\n    subscriptions:\n      - {{ plan: pro, starts: 2024-01-01 }}\n"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.status()["generation"]
            .as_u64()
            > Some(generation)),
        "the reload did not happen: {}",
        s.status()
    );
    assert!(sso(&s, "beta"), "the reload is served");
    assert!(
        sso(&s, "acme"),
        "the API record is kept on top of the reloaded files"
    );
    let st = s.status();
    assert_eq!(st["customers_api"]["shadowing_files"], 1, "{st}");
    assert_eq!(st["revision"], 1, "{st}");
}

#[test]
fn min_revision_is_answered_stale_until_applied() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    let rev = put_ok(&s, "acme", &pro());
    let d = s.decide(
        "/v1/check",
        &json!({ "customer": "acme", "feature": "sso", "min_revision": rev }),
    );
    assert_eq!(d["allowed"], true);
    let r = s.post(
        "/v1/check",
        &json!({ "customer": "acme", "feature": "sso", "min_revision": rev + 5 }),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "stale");
    assert_eq!(r.json()["error"]["applied_revision"], rev);
    let r = s.post(
        "/v1/consume",
        &json!({ "customer": "acme", "feature": "api.calls", "min_revision": rev + 1 }),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    let r = s.post("/v1/batch", &json!({ "requests": [{ "op": "check", "customer": "acme", "feature": "sso" }], "min_revision": rev + 1 }));
    assert_eq!(r.status, 503, "{}", r.text());
    let r = s.post(
        "/v1/check",
        &json!({ "customer": "acme", "feature": "sso", "min_revision": "one" }),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["field"], "min_revision");
}

#[test]
fn a_delete_hides_the_file_record_until_written_again() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    assert_eq!(s.check("acme", "api.calls")["allowed"], true);
    let r = send(
        &s,
        "DELETE",
        "/v1/customers/acme",
        Some(TOKEN),
        &Value::Null,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revision"], 1);
    let d = s.check("acme", "api.calls");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(record(&s, "acme")["deleted"], true);
    // Retried: the same answer, no new revision.
    let again = send(
        &s,
        "DELETE",
        "/v1/customers/acme",
        Some(TOKEN),
        &Value::Null,
    );
    assert_eq!(again.json()["revision"], 1);
    let r = send(
        &s,
        "DELETE",
        "/v1/customers/nobody",
        Some(TOKEN),
        &Value::Null,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(s.status()["customers_api"]["hiding_files"], 1);
    assert_eq!(put_ok(&s, "acme", &pro()), 2);
    assert!(sso(&s, "acme"));
}

#[test]
fn an_override_is_added_to_the_current_record() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    let path = "/v1/customers/acme/overrides";
    let o = json!({ "feature": "sso", "grant": true, "expires": "2099-01-01", "reason": "pilot" });
    let r = send(&s, "POST", path, Some(TOKEN), &o);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "approved_by");
    assert!(!sso(&s, "acme"));
    let mut o = o;
    o["approved_by"] = json!("cfo");
    let r = send(&s, "POST", path, Some(TOKEN), &o);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(sso(&s, "acme"), "the override is served");
    let rec = record(&s, "acme")["record"].clone();
    assert_eq!(
        rec["subscriptions"][0]["plan"], "free",
        "the file's record is kept: {rec}"
    );
    assert_eq!(rec["overrides"][0]["approved_by"], "cfo", "{rec}");
    assert_eq!(s.check("acme", "api.calls")["limit"], 100);
}

#[test]
fn exported_records_load_as_a_policy_file_with_the_same_decisions() {
    let setup = Setup::new();
    let mut s = setup.spawn(&[]);
    put_ok(&s, "acme", &pro());
    put_ok(
        &s,
        "newco",
        &json!({ "grants": [{ "feature": "api.calls", "limit": 7, "per": "day" }] }),
    );
    put_ok(&s, "gone", &pro());
    let r = send(
        &s,
        "DELETE",
        "/v1/customers/gone",
        Some(TOKEN),
        &Value::Null,
    );
    assert_eq!(r.status, 200);
    let before: Vec<Value> = ["acme", "newco", "gone"]
        .iter()
        .flat_map(|c| [s.check(c, "sso"), s.check(c, "api.calls")])
        .map(|d| json!([d["allowed"], d["reason"], d["limit"]]))
        .collect();
    assert!(s.stop_gracefully().success());
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled")).args([
            "customers",
            "export",
            "--state-dir",
            &setup.state_dir(),
        ]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ndjson = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(ndjson.lines().count(), 2, "{ndjson}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 customer(s) deleted"));
    // The catalog and the export alone: the same decisions, with no state directory.
    let files = PolicyDir::with(&[("catalog.yaml", CATALOG), ("exported.ndjson", &ndjson)]);
    let t = Server::spawn_with(files.path(), &["--durability", "memory"]);
    let after: Vec<Value> = ["acme", "newco", "gone"]
        .iter()
        .flat_map(|c| [t.check(c, "sso"), t.check(c, "api.calls")])
        .map(|d| json!([d["allowed"], d["reason"], d["limit"]]))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn forgetting_the_api_record_serves_the_file_record_again() {
    let setup = Setup::new();
    let mut s = setup.spawn(&[]);
    let forget = |s: &Server, id: &str| {
        send(
            s,
            "DELETE",
            &format!("/v1/customers/{id}/record"),
            Some(TOKEN),
            &Value::Null,
        )
    };
    // Nothing written through the API yet: nothing to forget.
    let r = forget(&s, "acme");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_api_record");
    assert_eq!(r.json()["error"]["field"], "id");
    assert_eq!(
        send(
            &s,
            "DELETE",
            "/v1/customers/acme/record",
            None,
            &Value::Null
        )
        .status,
        401
    );

    put_ok(&s, "acme", &pro());
    put_ok(&s, "newco", &pro());
    assert!(sso(&s, "acme"));
    let r = forget(&s, "acme");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["op"], "forget");
    let rev = r.json()["revision"].as_u64().expect("revision");
    assert_eq!(rev, 3);
    // The file's record (free) again, on the next request.
    assert!(!sso(&s, "acme"));
    assert_eq!(s.check("acme", "api.calls")["limit"], 100);
    assert_eq!(record(&s, "acme")["source"], "file");
    // An id only the API defined is gone with its record.
    assert_eq!(forget(&s, "newco").status, 200);
    assert_eq!(s.check("newco", "sso")["reason"], "unknown_customer");
    let status = s.status();
    assert_eq!(status["customers_api"]["api_records"], 0, "{status}");
    assert_eq!(status["customers_api"]["shadowing_files"], 0, "{status}");

    // Durable: after kill -9 the forgets hold and the revision goes on from 4.
    kill9(&mut s);
    let s = setup.spawn(&[]);
    assert!(!sso(&s, "acme"));
    assert_eq!(s.check("newco", "sso")["reason"], "unknown_customer");
    assert_eq!(put_ok(&s, "acme", &pro()), 5);
    assert!(sso(&s, "acme"));
}

#[test]
fn a_customer_summary_honours_min_revision() {
    let setup = Setup::new();
    let s = setup.spawn(&[]);
    let rev = put_ok(&s, "acme", &pro());
    let r = s.get(&format!("/v1/customers/acme?min_revision={rev}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.get(&format!("/v1/customers/acme?min_revision={}", rev + 1));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "stale");
    assert_eq!(r.json()["error"]["applied_revision"], rev);
    let r = s.get("/v1/customers/acme?min_revision=-1");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "min_revision");
}

#[test]
fn export_refuses_a_damaged_journal_line_and_names_it() {
    let setup = Setup::new();
    let mut s = setup.spawn(&[]);
    put_ok(&s, "acme", &pro());
    put_ok(&s, "newco", &pro());
    put_ok(
        &s,
        "acme",
        &json!({ "subscriptions": [{ "plan": "free", "starts": "2024-01-01" }] }),
    );
    assert!(s.stop_gracefully().success());
    let journal = std::path::Path::new(&setup.state_dir()).join("customers/journal.ndjson");
    let text = std::fs::read_to_string(&journal).expect("journal");
    assert_eq!(text.lines().count(), 3, "{text}");
    let export = || {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_entitled")).args([
                "customers",
                "export",
                "--state-dir",
                &setup.state_dir(),
            ]),
            Duration::from_secs(20),
        )
    };
    // A torn last line (a write never acknowledged) is left out.
    std::fs::write(&journal, format!("{text}{{\"revision\":4,\"op\"")).expect("tear");
    let out = export();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    // A damaged middle line: skipping it could export an older record as the latest.
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = "{\"revision\":2,\"op\":\"put\",\"id\":\"new";
    std::fs::write(&journal, lines.join("\n") + "\n").expect("damage");
    let out = export();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("journal.ndjson:2:"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing exported from a damaged journal"
    );
}

#[test]
fn a_written_record_gets_its_renewal_notice_without_waiting_for_a_scan() {
    let setup = Setup::new();
    let notices = setup.state.path().join("notices");
    let notices_arg = notices.display().to_string();
    // Scans an hour apart: only the write itself can bring the notice.
    let s = setup.spawn(&[
        "--test-clock",
        "2026-12-01T00:00:00Z",
        "--notices-dir",
        &notices_arg,
        "--notice-scan-interval",
        "1h",
    ]);
    let events = || -> Vec<Value> {
        let Ok(dir) = std::fs::read_dir(&notices) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("events-"))
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<Value>>()
            })
            .collect()
    };
    put_ok(
        &s,
        "newco",
        &json!({ "subscriptions": [{ "plan": "pro", "starts": "2026-01-01", "ends": "2026-12-20" }] }),
    );
    assert!(
        wait_until(Duration::from_secs(10), || !events().is_empty()),
        "no notice for the written record"
    );
    let ev = events();
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0]["data"]["customer"], "newco");
    assert_eq!(ev[0]["data"]["threshold_days"], 30);
}
