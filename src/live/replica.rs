//! Customer writes shared by every replica through a Redis Stream (`--store redis://…`).
//!
//! One stream per key prefix orders every write of the fleet: a write is appended
//! (`XADD`, by a Lua script) before it is acknowledged, and its entry id `<revision>-0`
//! is the fleet-wide `revision`. The same script keeps, in one hash, each customer's
//! latest entry (the shared snapshot, always at the stream's head revision) and trims
//! the stream to its last `--store-stream-keep` entries. Every replica tails the stream
//! with a blocking `XREAD` on a connection of its own and applies what it reads,
//! in order, through the [`Publisher`] (its own writes included); the local journal
//! holds what it applied, so a restart resumes from its last revision.
//!
//! A replica with nothing applied, or whose position the stream no longer holds
//! (trimmed), loads the snapshot hash (`HSCAN`) and the stream entries written
//! meanwhile, and replaces its records with them: it never applies a gap.
//!
//! The stream's history is named by an epoch (a random id kept in the meta hash beside
//! it, and in every entry). A replica remembers the epoch it follows in its state
//! directory; a Redis restarted empty or replaced has no epoch or another one, and the
//! replica then keeps serving what it applied, refuses writes and says so, rather
//! than taking a new history's revision 1 for its own. Only a replica with nothing
//! applied creates the epoch of an empty Redis.
//!
//! Keys share the hash tag `{<prefix>:customers}`, so every command touches one slot
//! (Redis Cluster puts them on one node).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};

use super::journal::Entry;
use super::publisher::{Base, Publisher};
use crate::time::{Clock, Timestamp};

/// Appends a write: checks the epoch and the record it was built on, appends the
/// entry under the next revision, keeps it as the customer's latest, trims.
/// KEYS: stream, records, meta. ARGV: epoch, id, entry (JSON without revision),
/// base (`` none, `files` no API record, or a revision), entries to keep, and
/// `forget` when the entry drops the customer's API record (it leaves the snapshot).
const APPEND: &str = r"
local epoch = redis.call('HGET', KEYS[3], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('EPOCH ' .. tostring(epoch))
end
if ARGV[4] ~= '' then
  local cur = redis.call('HGET', KEYS[2], ARGV[2])
  local rev = cur and tonumber(string.match(cur, '^(%d+)')) or nil
  if ARGV[4] == 'files' then
    if rev then return redis.error_reply('CHANGED') end
  elseif rev ~= tonumber(ARGV[4]) then
    return redis.error_reply('CHANGED')
  end
end
local rev = tonumber(redis.call('HGET', KEYS[3], 'revision') or '0') + 1
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], rev .. '-0', 'epoch', ARGV[1], 'e', ARGV[3])
if ARGV[6] == 'forget' then
  redis.call('HDEL', KEYS[2], ARGV[2])
else
  redis.call('HSET', KEYS[2], ARGV[2], rev .. ' ' .. ARGV[3])
end
redis.call('HSET', KEYS[3], 'revision', rev)
return rev
";

/// The epoch and head revision; creates them (ARGV[1], when not empty) on a Redis
/// that holds neither stream nor snapshot. Answers `{epoch, revision}`; `{'', '0'}`
/// when there is none, `{'', '-1'}` when there is data without an epoch.
const INIT: &str = r"
local e = redis.call('HGET', KEYS[3], 'epoch')
if e then
  return {e, redis.call('HGET', KEYS[3], 'revision') or '0'}
end
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return {'', '-1'}
end
if ARGV[1] == '' then
  return {'', '0'}
end
redis.call('HSET', KEYS[3], 'epoch', ARGV[1], 'revision', 0)
return {ARGV[1], '0'}
";

/// How replication is set up.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// The URL names a node of a Redis Cluster.
    pub cluster: bool,
    pub prefix: String,
    /// Bound on every command but the blocking read.
    pub timeout: Duration,
    /// How long a blocking read waits for new entries.
    pub block: Duration,
    /// Stream entries kept (approximately: `XADD … MAXLEN ~`).
    pub keep: u64,
    /// How long a write waits for this replica to serve it before answering.
    pub write_wait: Duration,
}

/// Why a write was not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the record changed since it was read")]
    Changed,
    #[error("customer writes are refused: {0}")]
    Unavailable(String),
}

/// Where this replica stands, for `/v1/status` and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// `connecting`, `following`, `unreachable` or `other_history`.
    pub state: &'static str,
    pub epoch: Option<String>,
    pub applied: u64,
    /// The stream's last revision, as last read.
    pub head: u64,
    pub lag_revisions: u64,
    pub lag_seconds: f64,
    pub last_read: Option<Timestamp>,
    pub last_error: Option<String>,
    pub resyncs: u64,
    pub left_out: u64,
    #[serde(skip)]
    pub following: bool,
    #[serde(skip)]
    caught_up_at: Option<Timestamp>,
}

/// A connection to one Redis node, or to a Redis Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens a connection whose replies may take `response` (a blocking read needs more
/// than a command).
pub async fn connect(
    url: &str,
    ca_file: Option<&Path>,
    cluster: bool,
    connect: Duration,
    response: Duration,
) -> Result<Conn, String> {
    let certs = match ca_file {
        None => None,
        Some(p) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(
                std::fs::read(p).map_err(|e| format!("--store-ca-file {}: {e}", p.display()))?,
            ),
        }),
    };
    let bad = |e: redis::RedisError| format!("--store {}: {e}", crate::redact::url(url));
    if cluster {
        let mut b = redis::cluster::ClusterClient::builder(vec![url.to_string()])
            .connection_timeout(connect)
            .response_timeout(response)
            .retries(1);
        if let Some(c) = certs {
            b = b.certs(c);
        }
        let client = b.build().map_err(bad)?;
        let c = tokio::time::timeout(connect, client.get_async_connection())
            .await
            .map_err(|_| format!("--store {}: connecting timed out", crate::redact::url(url)))?
            .map_err(bad)?;
        return Ok(Conn::Cluster(c));
    }
    let client = match certs {
        None => redis::Client::open(url).map_err(bad)?,
        Some(c) => redis::Client::build_with_tls(url, c).map_err(bad)?,
    };
    let mc = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(response))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    let c = redis::aio::ConnectionManager::new_lazy_with_config(client, mc).map_err(bad)?;
    Ok(Conn::Single(c))
}

/// The epoch this replica follows, kept in its state directory.
#[derive(Debug, Serialize, Deserialize)]
struct Followed {
    epoch: String,
}

const FOLLOWED: &str = "replica.json";

/// Replication of customer writes; see the module documentation.
pub struct Replica {
    publisher: Arc<Publisher>,
    cfg: ReplicaConfig,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    keys: [String; 3],
    append: redis::Script,
    init: redis::Script,
    /// Commands; `None` until connected (a cluster connects eagerly).
    conn: tokio::sync::Mutex<Option<Conn>>,
    progress: Mutex<Progress>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

/// One failure of the tail loop.
enum Fault {
    Redis(String),
    /// Redis holds another history than the one this replica applied.
    OtherHistory(String),
    Local(String),
}

impl From<redis::RedisError> for Fault {
    fn from(e: redis::RedisError) -> Self {
        Fault::Redis(e.to_string())
    }
}

impl Replica {
    /// `dir` is the customers directory of the state directory (the journal's).
    pub fn new(
        publisher: Arc<Publisher>,
        cfg: ReplicaConfig,
        clock: Arc<dyn Clock>,
        dir: &Path,
    ) -> Replica {
        let tag = format!("{{{}:customers}}", cfg.prefix);
        let applied = publisher.revision();
        Replica {
            publisher,
            keys: [
                format!("{tag}:stream"),
                format!("{tag}:records"),
                format!("{tag}:meta"),
            ],
            cfg,
            clock,
            dir: dir.to_path_buf(),
            append: redis::Script::new(APPEND),
            init: redis::Script::new(INIT),
            conn: tokio::sync::Mutex::new(None),
            progress: Mutex::new(Progress {
                state: "connecting",
                applied,
                epoch: read_followed(dir),
                ..Progress::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where this replica stands (lag computed now).
    pub fn progress(&self) -> Progress {
        let now = self.clock.now();
        let mut p = self.lock().clone();
        p.applied = self.publisher.revision();
        p.lag_revisions = p.head.saturating_sub(p.applied);
        p.lag_seconds = match (p.lag_revisions, p.following, p.caught_up_at) {
            (0, true, _) => 0.0,
            (_, _, Some(t)) => (now.0.saturating_sub(t.0)).max(0) as f64 / 1e6,
            (_, _, None) => 0.0,
        };
        p
    }

    /// Ready to serve: it has applied the whole stream once, or it restarted with
    /// records applied before (served while it catches up). A new replica is not
    /// ready before it has the fleet's records: it would answer `unknown_customer`.
    pub fn ready(&self) -> Result<(), String> {
        if self.lock().caught_up_at.is_some() || self.publisher.revision() > 0 {
            return Ok(());
        }
        Err("customer records not loaded from the shared stream yet".into())
    }

    fn report(&self) {
        crate::metrics::customers_replication(&self.progress());
    }

    async fn conn(&self) -> Result<Conn, Fault> {
        let mut c = self.conn.lock().await;
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let made = connect(
            &self.cfg.url,
            self.cfg.ca_file.as_deref(),
            self.cfg.cluster,
            self.cfg.timeout.max(Duration::from_secs(1)),
            // Not the usage steps' budget: a snapshot page may take longer than 50 ms.
            self.cfg.timeout.max(Duration::from_secs(1)),
        )
        .await
        .map_err(Fault::Redis)?;
        *c = Some(made.clone());
        Ok(made)
    }

    /// Appends a checked write to the stream; returns its revision once this replica
    /// serves it, or once `write_wait` has passed (it is in the stream either way).
    pub async fn append(&self, entry: &Entry, base: Option<Base>) -> Result<u64, AppendError> {
        let epoch = {
            let p = self.lock();
            match (&p.epoch, p.state) {
                (Some(e), "following" | "unreachable") => e.clone(),
                (_, "other_history") => {
                    return Err(AppendError::Unavailable(
                        p.last_error.clone().unwrap_or_else(|| {
                            "Redis holds another customer history than this replica".into()
                        }),
                    ));
                }
                _ => {
                    return Err(AppendError::Unavailable(
                        "not connected to the shared customer stream yet".into(),
                    ));
                }
            }
        };
        let json = serde_json::to_string(&StreamEntry::of(entry))
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let base = match base {
            None => String::new(),
            Some(Base::Files) => "files".into(),
            Some(Base::Api(r)) => r.to_string(),
        };
        let unavailable = |e: String| {
            AppendError::Unavailable(format!(
                "the shared customer stream cannot be written ({e})"
            ))
        };
        let mut conn = self.conn().await.map_err(|f| match f {
            Fault::Redis(e) | Fault::OtherHistory(e) | Fault::Local(e) => unavailable(e),
        })?;
        let mut inv = self.append.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(&epoch)
            .arg(&entry.id)
            .arg(&json)
            .arg(&base)
            .arg(self.cfg.keep)
            .arg(if entry.op == super::journal::Op::Forget {
                "forget"
            } else {
                ""
            });
        let revision: u64 = match tokio::time::timeout(
            self.cfg.timeout.max(Duration::from_secs(1)),
            inv.invoke_async::<u64>(&mut conn),
        )
        .await
        {
            Err(_) => return Err(unavailable("timed out".into())),
            Ok(Err(e)) if e.code() == Some("CHANGED") => return Err(AppendError::Changed),
            Ok(Err(e)) if e.code() == Some("EPOCH") => {
                return Err(AppendError::Unavailable(format!(
                    "Redis holds another customer history than this replica ({e})"
                )));
            }
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let mut rx = self.publisher.watch_revision();
        let _ = tokio::time::timeout(self.cfg.write_wait, rx.wait_for(|r| *r >= revision)).await;
        Ok(revision)
    }

    /// At start-up, before serving: one round trip for the epoch and head (bounded by
    /// a second), so that a replica with nothing to load is ready at once. Faults are
    /// left to [`Replica::run`], which reports and retries them.
    pub async fn first_contact(&self) {
        let within = self.cfg.timeout.max(Duration::from_secs(1));
        let contact = async {
            let mut conn = self.conn().await?;
            self.check_epoch(&mut conn).await
        };
        match tokio::time::timeout(within, contact).await {
            Ok(Ok(head)) => {
                let now = self.clock.now();
                let mut p = self.lock();
                p.head = head;
                if head <= self.publisher.revision() {
                    p.caught_up_at = Some(now);
                }
            }
            Ok(Err(Fault::Redis(e) | Fault::OtherHistory(e) | Fault::Local(e))) => {
                tracing::warn!("customer stream at start-up: {e}");
            }
            Err(_) => tracing::warn!("customer stream at start-up: no answer within {within:?}"),
        }
    }

    /// Follows the stream until the task is dropped: faults are reported and retried.
    pub async fn run(self: Arc<Self>) {
        let mut tail: Option<Conn> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            let step = self.follow(&mut tail).await;
            let Err(fault) = step else { continue };
            let (state, why) = match fault {
                Fault::Redis(e) => {
                    tail = None;
                    ("unreachable", e)
                }
                Fault::OtherHistory(e) => ("other_history", e),
                Fault::Local(e) => ("unreachable", e),
            };
            {
                let mut p = self.lock();
                if p.state != state || p.last_error.as_deref() != Some(&why) {
                    tracing::warn!(
                        state,
                        "customer stream: {why}; serving the records applied (revision {})",
                        self.publisher.revision()
                    );
                }
                p.state = state;
                p.following = false;
                p.last_error = Some(why);
            }
            self.report();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Connects, checks the epoch, and reads until a fault.
    async fn follow(&self, tail: &mut Option<Conn>) -> Result<(), Fault> {
        let mut conn = self.conn().await?;
        let head = self.check_epoch(&mut conn).await?;
        {
            let mut p = self.lock();
            p.head = head;
        }
        if tail.is_none() {
            *tail = Some(
                connect(
                    &self.cfg.url,
                    self.cfg.ca_file.as_deref(),
                    self.cfg.cluster,
                    self.cfg.timeout.max(Duration::from_secs(1)),
                    self.cfg.block + self.cfg.timeout.max(Duration::from_secs(1)),
                )
                .await
                .map_err(Fault::Redis)?,
            );
        }
        let Some(tail) = tail.as_mut() else {
            return Ok(());
        };
        if self.publisher.revision() == 0 && head > 0 {
            self.resync(&mut conn).await?;
        }
        loop {
            let applied = self.publisher.revision();
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(self.cfg.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.keys[0])
                .arg(format!("{applied}-0"))
                .query_async(tail)
                .await?;
            let entries = reply
                .and_then(|r| r.keys.into_iter().next())
                .map(|k| k.ids)
                .unwrap_or_default();
            let now = self.clock.now();
            let epoch = self.lock().epoch.clone().unwrap_or_default();
            if entries.is_empty() {
                let head = self.check_epoch(&mut conn).await?;
                {
                    let mut p = self.lock();
                    p.head = head;
                    p.last_read = Some(now);
                    p.state = "following";
                    p.following = true;
                    p.last_error = None;
                    if head <= applied {
                        p.caught_up_at = Some(now);
                    }
                }
                self.report();
                if head > applied {
                    // Nothing after our position, yet the head is beyond: trimmed.
                    self.resync(&mut conn).await?;
                }
                continue;
            }
            let mut batch = Vec::with_capacity(entries.len());
            let mut gap = false;
            for (expect, id) in (applied + 1..).zip(entries) {
                let rev = revision_of(&id.id).ok_or_else(|| {
                    Fault::Local(format!("stream entry id `{}` is not `<revision>-0`", id.id))
                })?;
                if rev != expect {
                    gap = true;
                    break;
                }
                let got: Option<String> = id.get("epoch");
                if got.as_deref() != Some(epoch.as_str()) {
                    return Err(Fault::OtherHistory(format!(
                        "stream entry {rev} belongs to epoch {got:?}, not {epoch}"
                    )));
                }
                let text: String = id.get("e").unwrap_or_default();
                let e: StreamEntry = serde_json::from_str(&text).map_err(|e| {
                    Fault::Local(format!("stream entry {rev} is not a customer write: {e}"))
                })?;
                batch.push(e.into_entry(rev));
            }
            if !batch.is_empty() {
                self.apply(batch).await?;
            }
            {
                let mut p = self.lock();
                p.last_read = Some(now);
                p.state = "following";
                p.following = true;
                p.last_error = None;
                let applied = self.publisher.revision();
                p.head = p.head.max(applied);
                if applied >= p.head {
                    p.caught_up_at = Some(now);
                }
            }
            if gap {
                tracing::warn!(
                    applied = self.publisher.revision(),
                    "customer stream trimmed past this replica's position: reloading from the shared snapshot"
                );
                self.resync(&mut conn).await?;
            }
            self.report();
        }
    }

    /// The head revision, once the epoch is checked (and adopted or created when this
    /// replica has applied nothing).
    async fn check_epoch(&self, conn: &mut Conn) -> Result<u64, Fault> {
        let followed = self.lock().epoch.clone();
        let fresh = followed.is_none() && self.publisher.revision() == 0;
        let create = if fresh {
            uuid::Uuid::new_v4().to_string()
        } else {
            String::new()
        };
        let mut inv = self.init.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(&create);
        let (epoch, head): (String, i64) = tokio::time::timeout(
            self.cfg.timeout.max(Duration::from_secs(1)),
            inv.invoke_async(conn),
        )
        .await
        .map_err(|_| Fault::Redis("timed out".into()))??;
        if head < 0 {
            return Err(Fault::OtherHistory(
                "Redis holds customer records without an epoch (damaged, or written by another program)".into(),
            ));
        }
        match followed {
            Some(f) if f == epoch => Ok(head as u64),
            Some(f) if epoch.is_empty() => Err(Fault::OtherHistory(format!(
                "Redis no longer holds the customer stream this replica follows (epoch {f}): restarted empty or replaced"
            ))),
            Some(f) => Err(Fault::OtherHistory(format!(
                "Redis holds another customer history (epoch {epoch}) than the one this replica follows (epoch {f})"
            ))),
            None if !fresh => Err(Fault::OtherHistory(
                "the state directory holds customer writes made without --store; export them (`entitled customers export`) and start from an empty customers directory".into(),
            )),
            None if epoch.is_empty() => Err(Fault::Redis("no epoch yet".into())),
            None => {
                write_followed(&self.dir, &epoch).map_err(Fault::Local)?;
                tracing::info!(epoch, head, "following the shared customer stream");
                self.lock().epoch = Some(epoch);
                Ok(head as u64)
            }
        }
    }

    async fn apply(&self, batch: Vec<Entry>) -> Result<(), Fault> {
        let publisher = self.publisher.clone();
        let left_out = tokio::task::spawn_blocking(move || publisher.apply_replicated(batch))
            .await
            .map_err(|e| Fault::Local(e.to_string()))?
            .map_err(|e| Fault::Local(e.to_string()))?;
        if left_out > 0 {
            crate::metrics::customers_left_out(left_out);
            self.lock().left_out += left_out as u64;
        }
        Ok(())
    }

    /// Replaces every record with the shared snapshot and what was appended while it
    /// was read: the meta revision first, the hash, then the stream after that
    /// revision (each record keeps the newest of what the hash and the stream say).
    async fn resync(&self, conn: &mut Conn) -> Result<(), Fault> {
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let (epoch, start): (Option<String>, Option<u64>) = redis::cmd("HMGET")
                .arg(&self.keys[2])
                .arg("epoch")
                .arg("revision")
                .query_async(conn)
                .await?;
            if epoch != self.lock().epoch {
                return Err(Fault::OtherHistory(
                    "the shared customer history changed while reloading".into(),
                ));
            }
            let start = start.unwrap_or(0);
            let mut latest: HashMap<String, Entry> = HashMap::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, items): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                    .arg(&self.keys[1])
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(5000)
                    .query_async(conn)
                    .await?;
                for (id, value) in items {
                    let e = parse_record(&value)
                        .map_err(|why| Fault::Local(format!("snapshot record `{id}`: {why}")))?;
                    keep_newest(&mut latest, e);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let tail: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
                .arg(&self.keys[0])
                .arg(format!("{}-0", start + 1))
                .arg("+")
                .query_async(conn)
                .await?;
            let mut expect = start + 1;
            let mut gap = false;
            for (id, fields) in tail {
                let rev = revision_of(&id).unwrap_or(0);
                if rev != expect {
                    gap = true;
                    break;
                }
                let e: StreamEntry = serde_json::from_str(fields.get("e").map_or("", |s| s))
                    .map_err(|e| Fault::Local(format!("stream entry {rev}: {e}")))?;
                keep_newest(&mut latest, e.into_entry(rev));
                expect += 1;
            }
            if gap {
                continue;
            }
            let revision = expect - 1;
            let mut entries: Vec<Entry> = latest.into_values().collect();
            entries.sort_by_key(|e| e.revision);
            let records = entries.len();
            let read = started.elapsed();
            let publisher = self.publisher.clone();
            let left_out = tokio::task::spawn_blocking(move || {
                publisher.replace_replicated(entries, revision)
            })
            .await
            .map_err(|e| Fault::Local(e.to_string()))?
            .map_err(|e| Fault::Local(e.to_string()))?;
            crate::metrics::customers_resynced();
            if left_out > 0 {
                crate::metrics::customers_left_out(left_out);
            }
            {
                let mut p = self.lock();
                p.resyncs += 1;
                p.left_out += left_out as u64;
                p.head = p.head.max(revision);
            }
            tracing::info!(
                records,
                revision,
                left_out,
                read_ms = read.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "customer records reloaded from the shared snapshot"
            );
            return Ok(());
        }
        Err(Fault::Redis(
            "the stream kept moving past the snapshot while reloading".into(),
        ))
    }
}

/// A stream entry or snapshot value: the journal entry without its revision (the
/// stream id, or the value's prefix, carries it).
#[derive(Debug, Serialize, Deserialize)]
struct StreamEntry {
    op: super::journal::Op,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<serde_json::Value>,
    by: String,
    #[serde(
        serialize_with = "super::journal::ser_time",
        deserialize_with = "super::journal::de_time"
    )]
    at: Timestamp,
}

impl StreamEntry {
    fn of(e: &Entry) -> StreamEntry {
        StreamEntry {
            op: e.op,
            id: e.id.clone(),
            record: e.record.clone(),
            by: e.by.clone(),
            at: e.at,
        }
    }

    fn into_entry(self, revision: u64) -> Entry {
        Entry {
            revision,
            op: self.op,
            id: self.id,
            record: self.record,
            by: self.by,
            at: self.at,
        }
    }
}

/// `<revision>-0` → revision.
fn revision_of(id: &str) -> Option<u64> {
    let (rev, seq) = id.split_once('-')?;
    (seq == "0").then_some(())?;
    rev.parse().ok()
}

/// A snapshot hash value: `<revision> <entry JSON>`.
fn parse_record(value: &str) -> Result<Entry, String> {
    let (rev, json) = value
        .split_once(' ')
        .ok_or_else(|| "not `<revision> <entry>`".to_string())?;
    let rev: u64 = rev.parse().map_err(|_| format!("bad revision `{rev}`"))?;
    let e: StreamEntry = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok(e.into_entry(rev))
}

fn keep_newest(latest: &mut HashMap<String, Entry>, e: Entry) {
    match latest.get(&e.id) {
        Some(old) if old.revision >= e.revision => {}
        _ => {
            latest.insert(e.id.clone(), e);
        }
    }
}

fn read_followed(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(FOLLOWED)).ok()?;
    serde_json::from_str::<Followed>(&text)
        .ok()
        .map(|f| f.epoch)
}

fn write_followed(dir: &Path, epoch: &str) -> Result<(), String> {
    let path = dir.join(FOLLOWED);
    let bytes = serde_json::to_vec(&Followed {
        epoch: epoch.to_string(),
    })
    .map_err(|e| e.to_string())?;
    crate::files::replace_with_bytes(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_revisions() {
        assert_eq!(revision_of("42-0"), Some(42));
        assert_eq!(revision_of("42-1"), None);
        assert_eq!(revision_of("x-0"), None);
    }

    #[test]
    fn a_snapshot_value_reads_back_as_the_entry() {
        let e = parse_record(r#"7 {"op":"put","id":"acme","record":{"id":"acme"},"by":"ops","at":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!((e.revision, e.id.as_str()), (7, "acme"));
        assert!(parse_record("nope").is_err());
    }

    #[test]
    fn the_newest_record_wins() {
        let mut m = HashMap::new();
        for rev in [3, 9, 5] {
            keep_newest(
                &mut m,
                Entry {
                    revision: rev,
                    op: super::super::journal::Op::Delete,
                    id: "a".into(),
                    record: None,
                    by: "x".into(),
                    at: Timestamp(0),
                },
            );
        }
        assert_eq!(m["a"].revision, 9);
    }
}
