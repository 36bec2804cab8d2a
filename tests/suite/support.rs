//! Test support: start the real binary, talk HTTP to it.
//!
//! [`Server`] spawns `entitled serve --listen 127.0.0.1:0` on a policy directory, reads
//! the bound address from its first stdout line (with a deadline), keeps its stderr in
//! a file (so a full pipe can never block it) and kills it on drop. The HTTP client is
//! a few dozen lines over `std::net::TcpStream`: HTTP/1.1 with `Content-Length`, read
//! timeouts always set, `Connection: close` for one-shot requests and a [`Conn`] for
//! keep-alive. [`wait_until`] polls for an asynchronous event (a reload) against a hard
//! deadline; nothing here sleeps to make time pass.

#![allow(dead_code, reason = "each suite uses a different part of the support")]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the binary may take to print its address.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Read/write timeout on every test socket: a hung server fails the test, never hangs it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of [`wait_until`].
const POLL: Duration = Duration::from_millis(20);

/// The real `entitled` binary, serving on a loopback port chosen by the kernel.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    stderr_path: PathBuf,
    /// Holds the stderr file and the working directory of the process.
    _work: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Server {
    /// `entitled serve --policies DIR --listen 127.0.0.1:0`.
    pub fn start(policies: &Path) -> Server {
        Server::start_with(policies, &[])
    }

    /// As [`Server::start`], with extra flags (`--body-limit 1024`, ...).
    pub fn start_with(policies: &Path, extra: &[&str]) -> Server {
        let work = tempfile::tempdir().expect("tempdir for the server");
        let stderr_path = work.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_entitled"))
            .arg("serve")
            .arg("--policies")
            .arg(policies)
            .args(["--listen", "127.0.0.1:0"])
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
            child,
            addr,
            stderr_path,
            _work: work,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
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
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
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
        if self.exited.is_none() {
            // SIGKILL (std sends it to our own unreaped child, so the pid cannot have
            // been reused), then reap.
            let _ = self.child.kill();
            let _ = self.child.wait();
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
