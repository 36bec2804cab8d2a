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
//! in `http.rs`; Redis, Envoy, nginx and the upstream application in files of their
//! own. [`wait_until`] polls for an asynchronous event (a reload) against a hard
//! deadline; nothing here sleeps to make time pass.

#![allow(dead_code, reason = "each suite uses a different part of the support")]

mod http;
mod proxies;
mod redis;

// One flat namespace for the suites (`super::support::{Server, Resp, Redis, ...}`);
// the files below only sort the helpers by what they stand in for.
pub use http::*;
pub use proxies::*;
pub use redis::*;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
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

    /// The server's working directory (a temporary one): where relative paths land.
    pub fn work_dir(&self) -> &Path {
        self._work.path()
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
