//! A `redis-server` of the test's own, and a RESP client to look inside it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, output_within};

/// How long a `redis-server` may take to answer PING after it was started.
const REDIS_START_DEADLINE: Duration = Duration::from_secs(10);

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
