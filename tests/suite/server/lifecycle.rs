//! Start and stop: SIGTERM finishes the request in flight and exits 0, and a policy
//! broken at start-up is 503 until it is fixed.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use super::support::{
    Conn, PolicyDir, Server, get, names_file_line_col, output_within, request_head, wait_until,
};

use super::{assert_error, policy};

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let dir = policy();
    let mut s = Server::spawn(dir.path());
    let addr = s.addr;
    let body = br#"{"customer":"acme","feature":"api.calls","amount":2}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut c = Conn::open(addr);
    let mut head = request_head(
        "POST",
        "/v1/consume",
        &[("content-type", "application/json")],
        body.len(),
        false,
    )
    .into_bytes();
    head.extend_from_slice(first);
    c.send_raw(&head);
    // A full round trip on another connection after our bytes were written: by the
    // time it answers, the server has read the first connection's request head.
    assert_eq!(get(addr, "/healthz").status, 200);

    s.terminate();
    // The listener goes away: new connections are refused while the old one drains.
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect_timeout(
            &addr,
            Duration::from_millis(500)
        )
        .is_err()),
        "new connections were still accepted 5 s after SIGTERM"
    );
    assert!(
        s.wait_exit(Duration::from_millis(0)).is_none(),
        "exited with a request in flight"
    );
    c.stream
        .write_all(rest)
        .expect("sending the rest of the body");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json();
    assert_eq!(d["allowed"], true, "{d}");
    assert_eq!(d["used"], 2, "{d}");
    let status = s
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM; stderr:\n{}", s.stderr()));
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        s.stderr()
    );
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn sigterm_on_an_idle_server_exits_0() {
    let dir = policy();
    let mut s = Server::spawn(dir.path());
    s.check("acme", "sso");
    let status = s.stop_gracefully();
    assert!(status.success(), "{status:?}; stderr:\n{}", s.stderr());
}

// ------------------------------------------------------------------ readiness ----

#[test]
fn a_broken_policy_at_start_is_503_until_fixed() {
    let dir = PolicyDir::with(&[
        (
            "catalog.yaml",
            "features:\n  sso: { kind: flag ]\nplans:\n  pro:\n    grants:\n      sso: true\n",
        ),
        (
            "customers.yaml",
            "customers:\n  - id: acme\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n",
        ),
    ]);
    let s = Server::start_with(dir.path(), &["--reload-debounce", "50ms"]);
    let r = s.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["ready"], false);
    assert_eq!(s.get("/healthz").status, 200, "alive even when not ready");
    for path in ["/v1/check", "/v1/consume"] {
        let r = s.post(path, &json!({"customer": "acme", "feature": "sso"}));
        assert_error(&r, 503, "not_ready", None);
        assert!(!r.text().contains("\"allowed\""), "{}", r.text());
    }
    let r = s.post(
        "/v1/batch",
        &json!({"requests": [{"op": "check", "customer": "acme", "feature": "sso"}]}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.text().contains("\"allowed\""), "{}", r.text());
    let r = s.post(
        "/v1/seats/acquire",
        &json!({"customer": "acme", "feature": "seats", "holder": "u"}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(s.get("/v1/customers/acme").status, 503);
    assert_eq!(s.get("/v1/expiring").status, 503);
    let st = s.status();
    assert_eq!(st["ready"], false, "{st}");
    assert!(st["snapshot"].is_null(), "{st}");
    let errors = st["last_error"]["errors"]
        .as_array()
        .expect("last_error.errors");
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .is_some_and(|e| names_file_line_col(e, "catalog.yaml"))),
        "last_error does not name catalog.yaml:line:col: {st}"
    );

    dir.write(
        "catalog.yaml",
        "features:\n  sso: { kind: flag }\nplans:\n  pro:\n    grants:\n      sso: true\n",
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.get("/readyz").status == 200),
        "not ready 10 s after the fix; status: {}",
        s.status()
    );
    let d = s.check("acme", "sso");
    assert_eq!(d["allowed"], true, "{d}");
    let st = s.status();
    assert!(st["last_error"].is_null(), "{st}");
}

/// At start the soft open-files limit is raised to the hard one, and said so; where
/// the hard limit itself is low, connections are capped so that the state directory
/// keeps descriptors. (Each run stops at the bind of a port that is taken, right after.)
#[test]
fn the_open_files_limit_is_raised_and_connections_fit_in_it() {
    let dir = policy();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let serve = |ulimit: &str| {
        let cmd = format!(
            "ulimit {ulimit} && exec \"$0\" serve --policies \"$1\" --listen \"$2\" \
             --grpc-listen off --durability memory --max-connections 4096"
        );
        let out = output_within(
            std::process::Command::new("sh")
                .args(["-c", &cmd, env!("CARGO_BIN_EXE_entitled")])
                .arg(dir.path())
                .arg(&addr),
            Duration::from_secs(20),
        );
        assert!(!out.status.success(), "the port was taken: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let raised = serve("-S -n 300");
    assert!(
        raised.contains("raised the open files limit") && raised.contains("from=300"),
        "{raised}"
    );
    let capped = serve("-n 300");
    assert!(
        capped.contains("connections capped") && capped.contains("capped_to=22"),
        "{capped}"
    );
}

/// A directory no one can write to, even root (tests often run as root, whom
/// permission bits do not stop): made immutable with `chattr +i` when mode 0555 is not
/// enough, and made writable again when dropped. Panics if neither works, so a test
/// using it never passes without the directory being read-only.
struct ReadOnlyDir {
    dir: tempfile::TempDir,
    immutable: bool,
}

impl ReadOnlyDir {
    fn new() -> ReadOnlyDir {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let mut ro = ReadOnlyDir {
            dir,
            immutable: false,
        };
        if ro.writable() {
            let out = output_within(
                std::process::Command::new("chattr").arg("+i").arg(&path),
                Duration::from_secs(10),
            );
            ro.immutable = out.status.success();
        }
        assert!(
            !ro.writable(),
            "could not make {} read-only (mode 0555, then chattr +i); this test needs a \
             filesystem supporting one of them",
            path.display()
        );
        ro
    }

    fn writable(&self) -> bool {
        let probe = self.dir.path().join("probe");
        let ok = std::fs::File::create(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        if self.immutable {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(self.dir.path())
                .status();
        }
        let _ = std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755));
    }
}

/// A directory that cannot be written stops the start with an error naming the
/// directory or file it could not write, not a bare "Operation not permitted": the
/// state directory's own `LOCK` (opened first), then, with the state directory
/// elsewhere, the audit log's directory inside the read-only one.
#[test]
fn a_read_only_state_directory_is_named_at_start() {
    let dir = policy();
    let read_only = ReadOnlyDir::new();
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let serve = |state: &std::path::Path, extra: &[&std::ffi::OsStr]| {
        let out = output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
                .args(["serve", "--listen", "127.0.0.1:0", "--grpc-listen", "off"])
                .arg("--policies")
                .arg(dir.path())
                .arg("--state-dir")
                .arg(state)
                .args(extra),
            Duration::from_secs(20),
        );
        assert!(
            !out.status.success(),
            "started on a read-only directory: {out:?}"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = serve(read_only.dir.path(), &[]);
    let lock = read_only.dir.path().join("LOCK");
    assert!(
        err.contains(&format!("cannot write {}", lock.display()))
            && err.contains("must be writable"),
        "{err}"
    );
    let audit = read_only.dir.path().join("audit");
    let err = serve(
        &elsewhere.path().join("state"),
        &["--audit-dir".as_ref(), audit.as_os_str()],
    );
    assert!(
        err.contains(&format!("starting the audit log in {}", audit.display())),
        "{err}"
    );
}
