//! `rediss://` with a password against a TLS-only Redis; a wrong password is a store
//! fault, not a crash.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use super::support::{Server, wait_until};

use super::{DEGRADED, T0, consume, fallbacks, metric, policy, serial};

/// `rediss://` with a password against a TLS-only redis-server, trusting the test CA
/// through `--store-ca-file`: consumes are counted in Redis with no fallback. A wrong
/// password is a store fault like any other (local fallback, degraded), never a crash.
#[test]
fn tls_and_password_reach_redis() {
    let _one = serial();
    let dir = tempfile::tempdir().expect("tls tempdir");
    super::support::make_certs(dir.path());
    let port = super::support::free_port();
    let port_s = port.to_string();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "r.crt",
            "--tls-key-file",
            "r.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "redis-server did not listen on its TLS port"
    );
    let policies = policy();
    let ca = dir.path().join("ca.crt");
    let ca = ca.to_str().expect("UTF-8 path");
    let start = |password: &str| {
        let url = format!("rediss://:{password}@127.0.0.1:{port}");
        Server::spawn_with(
            policies.path(),
            &[
                "--test-clock",
                T0,
                "--store",
                &url,
                "--store-ca-file",
                ca,
                "--durability",
                "memory",
            ],
        )
    };
    let mut s = start("s3cret");
    for n in 1..=3u64 {
        let d = consume(&s, "acme", "api.calls", 1);
        assert_eq!(d["allowed"], true, "{d}");
        assert_eq!(d["used"], n, "{d}");
    }
    assert_eq!(metric(&s, DEGRADED), 0.0);
    assert_eq!(fallbacks(&s, "local"), 0.0);
    assert!(!s.stderr().contains("s3cret"), "the password is in the log");
    s.stop_gracefully();

    let mut wrong = start("not-it");
    let d = consume(&wrong, "acme", "api.calls", 1);
    assert_eq!(d["allowed"], true, "answered by the local fallback: {d}");
    assert_eq!(metric(&wrong, DEGRADED), 1.0);
    assert!(fallbacks(&wrong, "local") >= 1.0);
    wrong.stop_gracefully();
    let _ = child.kill();
    let _ = child.wait();
}
