//! What a server writes, and where: with `--durability memory` nothing unless a
//! directory is named for the audit log or notices; a directory it writes into is
//! held by one process; a start-up that fails leaves nothing behind; and the start-up
//! log says which store counts usage and what that means for replicas.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::policy;
use super::support::{Redis, Server, output_within, wait_until};

/// Every file and directory under `dir`, as sorted relative paths.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("listing a directory") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            let rel = p.strip_prefix(dir).expect("under the directory");
            out.push(rel.display().to_string());
        }
    }
    out.sort();
    out
}

/// `entitled serve` run to its exit in `cwd`, for start-ups that must fail.
fn serve_to_exit(cwd: &Path, args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .args(["--grpc-listen", "off"])
            .args(args)
            .env_remove("RUST_LOG")
            .current_dir(cwd),
        Duration::from_secs(20),
    )
}

/// A whole run in memory mode — start, decisions, a graceful stop — leaves the
/// working directory as it was (the server's stderr file is the test's own).
#[test]
fn memory_mode_writes_no_file() {
    let dir = policy();
    let mut s = Server::spawn_with(dir.path(), &["--durability", "memory"]);
    s.check("acme", "sso");
    s.decide(
        "/v1/consume",
        &json!({"customer": "acme", "feature": "api.calls"}),
    );
    assert!(s.stop_gracefully().success(), "{}", s.stderr());
    assert_eq!(entries(s.work_dir()), ["stderr.log"], "{}", s.stderr());
    assert!(s.stderr().contains("audit log off"), "{}", s.stderr());
}

/// Named directories are written, and held: a second server given the same audit
/// directory refuses to start, saying why, and makes no audit file of its own.
#[test]
fn an_audit_dir_given_in_memory_mode_is_written_and_held_by_one_process() {
    let dir = policy();
    let audit = tempfile::tempdir().expect("audit dir");
    let audit_arg = audit.path().to_str().expect("UTF-8");
    let s = Server::spawn_with(
        dir.path(),
        &["--durability", "memory", "--audit-dir", audit_arg],
    );
    let audit_files = || {
        entries(audit.path())
            .into_iter()
            .filter(|n| n.starts_with("audit-"))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || audit_files().len() == 1),
        "{:?}",
        entries(audit.path())
    );
    let cwd = tempfile::tempdir().expect("working dir");
    let policies = dir.path().to_str().expect("UTF-8");
    let out = serve_to_exit(
        cwd.path(),
        &[
            "--policies",
            policies,
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "memory",
            "--audit-dir",
            audit_arg,
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another entitled process"), "{err}");
    assert_eq!(audit_files().len(), 1, "{:?}", entries(audit.path()));
    // The first server still writes its own file.
    s.check("acme", "sso");
}

/// A start-up that fails makes nothing: not on a port in use (the default state
/// directory is not created), not on a missing policy directory after the audit and
/// notices directories were taken (they are removed again).
#[test]
fn a_failed_start_leaves_nothing_behind() {
    let dir = policy();
    let policies = dir.path().to_str().expect("UTF-8");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let cwd = tempfile::tempdir().expect("working dir");
    let out = serve_to_exit(cwd.path(), &["--policies", policies, "--listen", &addr]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("binding"),
        "{out:?}"
    );
    assert_eq!(entries(cwd.path()), Vec::<String>::new());

    let out = serve_to_exit(
        cwd.path(),
        &[
            "--policies",
            "missing-policies",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "memory",
            "--audit-dir",
            "logs/audit",
            "--notices-dir",
            "notices",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing-policies"),
        "{out:?}"
    );
    assert_eq!(entries(cwd.path()), Vec::<String>::new());
}

/// The start-up log names the store that counts usage and what it means: the default
/// counts this process's requests only, so replicas multiply quotas; Redis shares.
#[test]
fn the_start_up_log_names_the_usage_store_and_what_it_means() {
    let dir = policy();
    let said =
        |s: &Server, what: &str| wait_until(Duration::from_secs(10), || s.stderr().contains(what));
    let s = Server::spawn_with(dir.path(), &["--durability", "memory"]);
    assert!(
        said(&s, "usage store: this process's memory (lost on restart)"),
        "{}",
        s.stderr()
    );
    assert!(
        s.stderr()
            .contains("N replicas give each customer N times its limits")
            && s.stderr().contains("--store redis://"),
        "{}",
        s.stderr()
    );
    let s = Server::spawn(dir.path());
    assert!(
        said(&s, "usage store: this process's memory (kept in ./state)"),
        "{}",
        s.stderr()
    );
    let redis = Redis::start();
    let url = redis.url();
    let s = Server::spawn_with(dir.path(), &["--durability", "memory", "--store", &url]);
    assert!(
        said(&s, "usage store: Redis, shared by every replica"),
        "{}",
        s.stderr()
    );
    assert!(!s.stderr().contains("N times"), "{}", s.stderr());
}
