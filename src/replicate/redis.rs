//! `wallet replicate redis`: keeps hash-partitioned Redis nodes equal to the engine's balances.
//!
//! Per node, the keys are
//! - `wallet:balance:<account id>`: a hash, field = ISO currency code, value = minor units;
//! - `wallet:applied_seq`: every event at or below it is reflected on this node;
//! - `wallet:applied_record`: the identity (`<transaction uuid>@<timestamp_ns>`, see
//!   [`RecordId`]) of the source record that ends at `wallet:applied_seq`, written together
//!   with it; a restarted replicator checks it against its source and refuses to continue on a
//!   mismatch (the node was fed by another journal, or by a tail the engine lost) unless told
//!   to `--rebuild` such nodes;
//! - `wallet:map_version`: the partition map version whose routing this node's keys follow.
//!
//! Exactly once: a node's balances and its `wallet:applied_seq` change in one Lua script, which
//! also refuses to write when the node's `wallet:map_version` is not the expected one or its
//! `wallet:applied_seq` is behind what the replicator last saw there (the node lost data, e.g.
//! a restart without persistence). Such a node is rebuilt ("resync") from the replicator's own
//! copy of every balance. Balances are written as absolute values, so a batch applied again
//! after a lost reply changes nothing; events at or below a node's `wallet:applied_seq` are never
//! written there. A restarted replicator needs its copy of every balance again: it loads the
//! newest snapshot of the engine (`serve --snapshot-every`, `wallet snapshot`) at or before the
//! lowest applied sequence of its nodes and reads the journal from there (whole earlier
//! segments are skipped). From an engine URL, when every node follows the map, it reads the
//! balances the nodes hold and the stream from after their lowest applied sequence. Otherwise
//! it reads the source from sequence 1. Either way it writes only what each node has not
//! applied.
//!
//! Reader protocol (see `docs/zookeeper-layout.md`): read the map (version v) from ZooKeeper,
//! route the account, then on that node `MULTI; GET wallet:map_version; HGETALL
//! wallet:balance:<id>; EXEC`. The answer is valid only if the version read equals v; otherwise
//! re-read the map and retry. During a map change, moved balances are first copied to their new
//! nodes (invisible there: those nodes still claim the old version), then each node atomically
//! deletes what moved away and switches its version. No node ever claims a version for which it
//! lacks a balance, so a reader that checks the version never sees a half-moved balance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;

use super::source::{AccountRef, Item, RecordId, SHORT_SOURCE_PATIENCE, Source, SourceRetry};
use super::zk::{self, Layout, PartitionMap};
use super::{failpoint, failpoint_armed, failpoint_panic};
use crate::core::Currency;

pub const BALANCE_PREFIX: &str = "wallet:balance:";
pub const APPLIED_SEQ_KEY: &str = "wallet:applied_seq";
pub const APPLIED_RECORD_KEY: &str = "wallet:applied_record";
pub const MAP_VERSION_KEY: &str = "wallet:map_version";
/// How often, by default, nodes believed current are asked whether they still are while the
/// source has nothing new (`Replicator::check_idle_nodes`).
pub const DEFAULT_IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long a node removed from the map that could not be emptied waits before it is tried
/// again.
const RETIRED_RETRY: Duration = Duration::from_secs(30);
/// Accounts per pipelined chunk when whole nodes are rebuilt or keys moved.
const CHUNK_ACCOUNTS: usize = 2000;

/// Applies one batch to one node. KEYS: map version, applied sequence, applied record. ARGV:
/// expected map version, the applied sequence the replicator last saw on the node, the new
/// applied sequence, the identity of the record ending there, the highest applied sequence
/// this replicator may have left there (`Node::sent_seq`), then per account: key, field count,
/// and field/value pairs. A node below what the replicator saw lost data (`WALLET_STALE`: it is
/// rebuilt); one beyond anything the replicator sent it was written by someone else
/// (`WALLET_CONFLICT`: the run stops, rather than skip the batches that node claims to hold).
static APPLY_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local version = redis.call('GET', KEYS[1])
if version ~= ARGV[1] then
  return redis.error_reply('WALLET_STALE map_version is ' .. tostring(version) .. ', expected ' .. ARGV[1])
end
local applied = tonumber(redis.call('GET', KEYS[2]) or '0')
local target = tonumber(ARGV[3])
if applied < tonumber(ARGV[2]) then
  return redis.error_reply('WALLET_STALE applied_seq is ' .. applied .. ', expected at least ' .. ARGV[2])
end
if applied > tonumber(ARGV[5]) then
  return redis.error_reply('WALLET_CONFLICT applied_seq is ' .. applied .. ', but this replicator wrote no further than ' .. ARGV[5])
end
if applied >= target then
  return 0
end
local i = 6
local n = #ARGV
while i <= n do
  local key = ARGV[i]
  local fields = tonumber(ARGV[i + 1])
  for j = 0, fields - 1 do
    redis.call('HSET', key, ARGV[i + 2 + 2 * j], ARGV[i + 3 + 2 * j])
  end
  i = i + 2 + 2 * fields
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
return 1
",
    )
});

/// Marks a node `resync` before it is rebuilt, or `retired:N` before it is emptied (its readers
/// retry, or re-read the map), unless a newer partition map stamped it (`WALLET_NEWER_MAP`:
/// map versions only go up, so this replicator's map is stale, and pulling the node back to
/// it, or emptying it, would take it from the newer map's readers). KEYS: map version. ARGV:
/// this replicator's map version, the new value.
static INVALIDATE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local version = redis.call('GET', KEYS[1])
if version then
  local n = tonumber(string.match(version, '^retired:(%d+)$') or version)
  if n and n > tonumber(ARGV[1]) then
    return redis.error_reply('WALLET_NEWER_MAP map_version is ' .. version .. ', above ' .. ARGV[1])
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
",
    )
});

/// The map version a node's `wallet:map_version` names (`retired:N` names N), if it is above
/// `ours`: a newer map's replicator feeds the node.
fn newer_map(version: Option<&str>, ours: u64) -> Option<u64> {
    let version = version?;
    version
        .strip_prefix("retired:")
        .unwrap_or(version)
        .parse::<u64>()
        .ok()
        .filter(|v| *v > ours)
}

/// The error that stops a replicator whose map is older than a node's.
fn newer_map_error(address: &str, theirs: &str, ours: u64, partitions: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "Redis node {address} says partition map version {theirs}, above this map's {ours} \
         ({partitions}): another cluster root's replicator (a newer map) feeds it. Check \
         --zk-root; this replicator leaves it as it is"
    )
}

/// The version a `WALLET_NEWER_MAP` error names.
fn stamped_version(error: &anyhow::Error) -> String {
    let text = error.to_string();
    text.split("map_version is ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("?")
        .to_string()
}

fn is_newer_map(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<redis::RedisError>()
        .is_some_and(|e| e.to_string().contains("WALLET_NEWER_MAP"))
}

/// Switches one node to a new partition map version (step 2 of a map change), only if the
/// node is still what the replicator believes (a node emptied or rewritten behind its back must
/// not be stamped as holding the new map's balances). KEYS: map version, applied sequence,
/// applied record. ARGV: the version the node must say, the applied sequence it must say
/// (empty: any), the new applied sequence, the record identity there (empty: none), the new
/// version, then the balance keys that moved away (deleted).
static SWITCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local version = redis.call('GET', KEYS[1])
if version ~= ARGV[1] then
  return redis.error_reply('WALLET_STALE map_version is ' .. tostring(version) .. ', expected ' .. ARGV[1])
end
local applied = redis.call('GET', KEYS[2]) or '0'
if ARGV[2] ~= '' and applied ~= ARGV[2] then
  return redis.error_reply('WALLET_STALE applied_seq is ' .. applied .. ', expected ' .. ARGV[2])
end
local n = #ARGV
local i = 6
while i <= n do
  local last = math.min(i + 999, n)
  redis.call('DEL', unpack(ARGV, i, last))
  i = last + 1
end
redis.call('SET', KEYS[2], ARGV[3])
if ARGV[4] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[5])
return 1
",
    )
});

pub fn balance_key(account: &str) -> String {
    format!("{BALANCE_PREFIX}{account}")
}

/// Opens a connection that fails fast when the node is down.
pub async fn connect(address: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{address}/"))
        .with_context(|| format!("bad Redis address {address:?}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| {
            format!("Redis node {address} is unreachable (start it with tools/services start)")
        })
}

/// Refuses a node list that names one Redis server twice under two spellings
/// (`localhost:6379` and `127.0.0.1:6379`): both "nodes" would share one
/// `wallet:applied_seq`, and the second one's writes would be taken as already applied and
/// silently skipped. Servers are told apart by their `run_id`; a node that does not answer now
/// (within `SLOW_WRITE`: the replicator checks at start-up and on each map change, and a node
/// that stopped answering must not hold it for the response timeout) cannot be checked and is
/// let through. (Emptying a removed node, `clean_retired`, asks the same question with the
/// same bound, but there a node that does not answer keeps the removed node from being
/// emptied: it might be that node under another name.)
pub async fn check_distinct_servers(nodes: &[String]) -> anyhow::Result<()> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for address in nodes {
        let Ok(mut conn) = connect(address).await else {
            continue;
        };
        let run_id = match tokio::time::timeout(SLOW_WRITE, server_id(&mut conn, address)).await {
            Ok(Some(run_id)) => run_id,
            Ok(None) => continue,
            Err(_) => {
                tracing::warn!(node = %address, "no answer to INFO server within 1 s: this node is not checked for a second name");
                continue;
            }
        };
        if let Some(other) = seen.insert(run_id.clone(), address) {
            bail!(
                "Redis nodes {other} and {address} are the same server (run_id {run_id}): a partition map must name each server once",
            );
        }
    }
    Ok(())
}

/// One more than the highest partition map version any of `nodes` shows (`N`, or
/// `retired:N`), 0 if none shows one: a map written for these nodes must be numbered above it.
/// Otherwise a map deleted and created again (version 1) would meet nodes still saying 5, and a
/// map reusing a version those nodes were stamped with would be trusted by readers holding an
/// older node list. A node that does not answer cannot be asked: it is refused, naming it
/// (a map numbered without it could reuse a version it was stamped with), unless
/// `allow_unreachable`, when it is skipped with a warning.
pub async fn next_map_version(nodes: &[String], allow_unreachable: bool) -> anyhow::Result<u64> {
    let mut next = 0;
    let mut unreachable = Vec::new();
    for address in nodes {
        let mut conn = match connect(address).await {
            Ok(conn) => conn,
            Err(e) => {
                unreachable.push(format!("{address} ({e:#})"));
                continue;
            }
        };
        let mut cmd = redis::cmd("GET");
        cmd.arg(MAP_VERSION_KEY);
        let get = cmd.query_async::<Option<String>>(&mut conn);
        let version = match tokio::time::timeout(Duration::from_secs(2), get).await {
            Ok(Ok(version)) => version,
            // LOADING, NOAUTH, an ACL without GET: it cannot say its version either.
            Ok(Err(e)) => {
                unreachable.push(format!("{address} (GET {MAP_VERSION_KEY}: {e})"));
                continue;
            }
            Err(_) => {
                unreachable.push(format!("{address} (no answer to GET within 2 s)"));
                continue;
            }
        };
        if let Some(v) = version
            .as_deref()
            .and_then(|v| v.strip_prefix("retired:").unwrap_or(v).parse::<u64>().ok())
        {
            next = next.max(v.saturating_add(1));
        }
    }
    if !unreachable.is_empty() {
        let named = unreachable.join(", ");
        if !allow_unreachable {
            bail!(
                "Redis node(s) {named} cannot say their map version: the version they were stamped with cannot be read, and a map numbered without it could reuse it; start them, or pass --allow-unreachable to number the map without them"
            );
        }
        tracing::warn!(nodes = %named, "these nodes did not answer; the map is numbered without their versions (--allow-unreachable)");
    }
    Ok(next)
}

/// The `run_id` of the Redis server behind `conn` (tells one server apart from another whatever
/// the address it is reached by). `None` when it cannot be read: a node that cannot answer
/// INFO (an ACL without it, a renamed command, a dropped connection) cannot be checked, as one
/// that is down.
async fn server_id(conn: &mut MultiplexedConnection, address: &str) -> Option<String> {
    let info: String = match redis::cmd("INFO").arg("server").query_async(conn).await {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(node = %address, error = %e, "INFO server failed: this node is not checked for a second name");
            return None;
        }
    };
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_string())
}

/// `server_id` of the node at `address`, over a new connection; `None` if it does not answer.
async fn server_id_at(address: &str) -> Option<String> {
    let mut conn = connect(address).await.ok()?;
    server_id(&mut conn, address).await
}

/// What a node says about itself: its applied sequence and map version.
pub async fn probe(conn: &mut MultiplexedConnection) -> redis::RedisResult<(u64, Option<String>)> {
    let (applied, version, _) = probe_record(conn).await?;
    Ok((applied, version))
}

/// `probe` plus the stored identity of the record at the applied sequence.
pub async fn probe_record(
    conn: &mut MultiplexedConnection,
) -> redis::RedisResult<(u64, Option<String>, Option<String>)> {
    let (applied, version, record): (Option<u64>, Option<String>, Option<String>) = redis::pipe()
        .atomic()
        .cmd("GET")
        .arg(APPLIED_SEQ_KEY)
        .cmd("GET")
        .arg(MAP_VERSION_KEY)
        .cmd("GET")
        .arg(APPLIED_RECORD_KEY)
        .query_async(conn)
        .await?;
    Ok((applied.unwrap_or(0), version, record))
}

/// The replicator's copy of every account and balance, at `seq`.
#[derive(Default)]
pub struct Directory {
    /// `wallet:balance:<account id>` of every account, by index.
    keys: Vec<Box<str>>,
    pub balances: Vec<Vec<(Currency, u64)>>,
    by_name: HashMap<Box<str>, u32>,
    /// The last event applied (0: none).
    pub seq: u64,
    /// The identity of the source record that ends at `seq`.
    pub record: Option<RecordId>,
}

impl Directory {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, account: u32) -> &str {
        &self.keys[account as usize]
    }

    pub fn name(&self, account: u32) -> &str {
        &self.keys[account as usize][BALANCE_PREFIX.len()..]
    }

    fn open(&mut self, index: Option<u32>, name: &str) -> anyhow::Result<u32> {
        let next = self.keys.len() as u32;
        if index.is_some_and(|i| i != next) {
            bail!("account {name:?} opened as index {index:?}, expected {next}");
        }
        if self.by_name.contains_key(name) {
            bail!("account {name:?} opened twice");
        }
        self.keys.push(balance_key(name).into());
        self.balances.push(Vec::new());
        self.by_name.insert(name.into(), next);
        Ok(next)
    }

    fn resolve(&self, account: &AccountRef) -> anyhow::Result<u32> {
        match account {
            AccountRef::Index(i) if (*i as usize) < self.keys.len() => Ok(*i),
            AccountRef::Index(i) => bail!("event for unknown account index {i}"),
            AccountRef::Name(name) => self
                .by_name
                .get(name.as_str())
                .copied()
                .ok_or_else(|| anyhow::anyhow!("event for unknown account {name:?}")),
        }
    }

    fn set(&mut self, account: u32, currency: Currency, balance: u64) {
        let balances = &mut self.balances[account as usize];
        match balances.iter_mut().find(|(c, _)| *c == currency) {
            Some(entry) => entry.1 = balance,
            None => {
                balances.push((currency, balance));
                balances.sort_unstable_by_key(|(c, _)| *c);
            }
        }
    }

    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Every account and balance of `ledger` (a snapshot), at its last sequence.
    pub fn from_ledger(ledger: &crate::core::Ledger) -> anyhow::Result<Directory> {
        let mut dir = Directory::default();
        for index in 0..ledger.account_count() {
            let name = ledger
                .account_name(index)
                .ok_or_else(|| anyhow::anyhow!("snapshot: account index {index} has no id"))?;
            dir.open(Some(index), name.as_str())?;
            for (currency, balance) in ledger.balances(index) {
                dir.set(index, currency, balance);
            }
        }
        dir.seq = ledger.next_seq() - 1;
        Ok(dir)
    }
}

struct Node {
    address: String,
    conn: Option<MultiplexedConnection>,
    /// The applied sequence last confirmed on the node (meaningless while `needs_resync`).
    applied_seq: u64,
    /// The highest applied sequence this replicator may have left on the node: `applied_seq`,
    /// or the target of a write whose answer was lost. The node saying more was written by
    /// someone else (`WALLET_CONFLICT`).
    sent_seq: u64,
    /// The node's content cannot be trusted (unknown, lost data, interrupted move): rebuild it.
    needs_resync: bool,
    /// The node could not be read at start-up (down, or its probe failed, e.g. `LOADING`): it
    /// is probed and compared with the source, as the others were, before anything is written
    /// there (`probe_late_nodes`); it may hold newer balances than the other nodes.
    unprobed: bool,
    /// Accounts changed since `applied_seq`.
    dirty: Vec<u32>,
    /// When the source read began after which the oldest change in `dirty` appeared.
    dirty_since: Option<Instant>,
    /// Accounts of the write in flight (back to `dirty` if it fails).
    inflight: Vec<u32>,
    /// The write in flight to the node (`Job`), if any. Each node has at most one, and the
    /// others do not wait for it: a node that hangs holds back only its own balances.
    write: Option<Write>,
    /// Lag of the last write the node completed (see `Write::since`).
    lag: Duration,
    /// Set while the node is down: when to try again.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The connect and probe of an `unprobed` node, run as a task so that a node that does not
    /// answer (a dropped route, a paused server) holds back nothing else.
    probe: Option<tokio::task::JoinHandle<anyhow::Result<Probed>>>,
}

/// The map's nodes by server (`run_id`, address), and those that did not say which server they
/// are.
type CurrentServers = (Vec<(String, String)>, Vec<String>);

/// A connection to a node and what `probe_record` read there.
type Probed = (MultiplexedConnection, (u64, Option<String>, Option<String>));

/// A write in flight to one node: a script write of its changed accounts, a rebuild, or a
/// connect before one.
struct Write {
    /// Its task in `Replicator::inflight` (none for writes awaited in place).
    task: Option<tokio::task::Id>,
    started: Instant,
    /// When the source read began after which the oldest change it carries appeared.
    since: Option<Instant>,
}

/// What a write task returns.
struct WriteDone {
    node: usize,
    /// The sequence the node holds once the write is applied.
    target: u64,
    /// The connection (made by the task if the node had none).
    conn: Option<MultiplexedConnection>,
    result: anyhow::Result<()>,
    /// What the task did.
    kind: JobKind,
}

/// Keys and balances of some accounts, copied out of the directory: a write task cannot
/// borrow the directory, which goes on changing while the task runs.
type Entries = Vec<(Box<str>, Vec<(Currency, u64)>)>;

fn entries(dir: &Directory, accounts: impl Iterator<Item = u32>) -> Entries {
    accounts
        .map(|a| {
            (
                dir.keys[a as usize].clone(),
                dir.balances[a as usize].clone(),
            )
        })
        .collect()
}

/// Node `node`'s share of the balances under `route`: its accounts with a balance, sorted by
/// key (`resync` looks keys up in it).
fn share(dir: &Directory, route: &[u16], node: u16) -> Entries {
    let mut share = entries(
        dir,
        (0..dir.len() as u32)
            .filter(|&a| route[a as usize] == node && !dir.balances[a as usize].is_empty()),
    );
    share.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    share
}

/// What a finished rebuild stamps on its node, in one transaction.
struct Finish {
    version: u64,
    seq: u64,
    record: Option<RecordId>,
}

/// How long the replicator waits for a write before it goes on without it: the next batches
/// go to the other nodes meanwhile, and to that node once its write is done.
const SLOW_WRITE: Duration = Duration::from_secs(1);

/// Which writes `complete_writes` waits for.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    /// Every write in flight.
    All,
    /// Those started less than `SLOW_WRITE` ago; finished ones are booked too.
    Fresh,
}

impl Node {
    fn new(address: &str) -> Node {
        Node {
            address: address.to_string(),
            conn: None,
            applied_seq: 0,
            sent_seq: 0,
            needs_resync: true,
            unprobed: false,
            dirty: Vec::new(),
            dirty_since: None,
            inflight: Vec::new(),
            write: None,
            lag: Duration::ZERO,
            retry_at: None,
            backoff: Duration::from_millis(50),
            probe: None,
        }
    }

    /// The node holds `seq` (read there, or written with a confirmed answer).
    fn know_applied(&mut self, seq: u64) {
        self.applied_seq = seq;
        self.sent_seq = seq;
    }

    fn is_up_and_current(&self) -> bool {
        self.conn.is_some() && self.retry_at.is_none() && !self.needs_resync
    }

    fn mark_down(&mut self, error: &anyhow::Error) {
        tracing::warn!(node = %self.address, error = %format!("{error:#}"), retry_in = ?self.backoff, "Redis node failed; will retry");
        self.conn = None;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }

    fn mark_up(&mut self) {
        if self.retry_at.take().is_some() {
            tracing::info!(node = %self.address, "Redis node is back");
        }
        self.backoff = Duration::from_millis(50);
    }

    /// Connects if needed and allowed by the backoff; false if the node is (still) down.
    async fn ensure_connected(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        match connect(&self.address).await {
            Ok(conn) => {
                self.conn = Some(conn);
                self.retry_at = None;
                true
            }
            Err(e) => {
                self.mark_down(&e);
                false
            }
        }
    }
}

/// What a node's write task does.
enum Job {
    /// Runs the apply script (`EVALSHA`) of its changed accounts.
    Apply(redis::Cmd),
    /// Rebuilds the node from its share of the balances (`resync`) and stamps `Finish`.
    Rebuild(Entries, Finish),
    /// Only connects: a node to rebuild is connected first, so that its share is copied only
    /// for a node that answers.
    Connect,
}

#[derive(Clone, Copy, PartialEq)]
enum JobKind {
    Apply,
    Rebuild,
    Connect,
}

/// One node's write task: connects if the node has no connection, then does `job`; the node
/// then holds sequence `target`.
async fn node_task(
    i: usize,
    target: u64,
    conn: Option<MultiplexedConnection>,
    address: String,
    job: Job,
) -> WriteDone {
    let mut done = WriteDone {
        node: i,
        target,
        conn: None,
        result: Ok(()),
        kind: match job {
            Job::Apply(_) => JobKind::Apply,
            Job::Rebuild(..) => JobKind::Rebuild,
            Job::Connect => JobKind::Connect,
        },
    };
    let mut conn = match conn {
        Some(conn) => conn,
        None => match connect(&address).await {
            Ok(conn) => conn,
            Err(e) => {
                done.result = Err(e);
                return done;
            }
        },
    };
    done.result = match job {
        Job::Apply(cmd) => eval_apply(&mut conn, &cmd)
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
        Job::Rebuild(share, finish) => {
            resync(&mut conn, &share, finish.version, Some(&finish)).await
        }
        Job::Connect => Ok(()),
    };
    done.conn = Some(conn);
    done
}

/// Runs a prepared `EVALSHA` of the apply script, loading the script first if the node does
/// not know it (a restarted node).
async fn eval_apply(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> redis::RedisResult<i64> {
    match cmd.query_async(conn).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            APPLY_SCRIPT.prepare_invoke().load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// Marks a node `resync` (its readers retry) before it is rebuilt, through `INVALIDATE_SCRIPT`:
/// one that a newer map stamped meanwhile is left alone, and the run stops with
/// `newer_map_error` (a plain `SET` here pulled such a node back to this, older, map).
async fn invalidate(
    conn: &mut MultiplexedConnection,
    address: &str,
    ours: u64,
    partitions: &str,
) -> Result<(), Invalidate> {
    let result = INVALIDATE_SCRIPT
        .prepare_invoke()
        .key(MAP_VERSION_KEY)
        .arg(ours)
        .arg("resync")
        .invoke_async::<i64>(conn)
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = anyhow::Error::new(e);
            if is_newer_map(&e) {
                Err(Invalidate::NewerMap(newer_map_error(
                    address,
                    &stamped_version(&e),
                    ours,
                    partitions,
                )))
            } else {
                Err(Invalidate::Down(e))
            }
        }
    }
}

/// Why `invalidate` did not mark a node.
enum Invalidate {
    /// A newer map stamped the node: the run stops.
    NewerMap(anyhow::Error),
    /// The node did not answer: marked down, probed again.
    Down(anyhow::Error),
}

fn is_stale(error: &redis::RedisError) -> bool {
    error.to_string().contains("WALLET_STALE")
}

fn is_conflict(error: &redis::RedisError) -> bool {
    error.to_string().contains("WALLET_CONFLICT")
}

/// The error that stops a run when a node holds more than this replicator wrote there.
/// Logs `error` and records it as the reason the run stops (the first reason is kept).
fn stop_run(stopped_by: &mut Option<anyhow::Error>, error: anyhow::Error) {
    tracing::error!(error = %format!("{error:#}"));
    stopped_by.get_or_insert(error);
}

fn another_writer(address: &str, detail: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "Redis node {address} was written by someone other than this replicator ({detail}): another replicator feeds this partition map (run one per map), the node was edited by hand, or (rarely) a write of an earlier run of this replicator arrived late; its balances cannot be trusted, and this replicator stops rather than skip what the node claims to hold (`wallet reconcile redis` shows the differences; `--rebuild` on a single replicator clears such a node)"
    )
}

/// Options of one replicator run.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    pub zk: String,
    pub zk_root: String,
    /// A data directory, or an engine URL `http://host:port`.
    pub source: String,
    /// Most events read and written per batch.
    pub batch_events: usize,
    /// Stop once every node has caught up with the end of the source.
    pub once: bool,
    /// Where to publish progress (for a `/metrics` endpoint); updated after every batch.
    pub metrics: Option<Arc<Metrics>>,
    /// A node whose stored record identity differs from the source's is rebuilt from
    /// sequence 1 instead of stopping the run with an error.
    pub rebuild: bool,
    /// With `once`: how long to wait, after the source is read to its end, for nodes that are
    /// down or behind before giving up with an error.
    pub once_wait: Duration,
    /// While the source is idle, how often nodes believed current are asked whether they still
    /// are (`Replicator::check_idle_nodes`); zero: never.
    pub idle_check: Duration,
}

/// The replicator's progress, readable from other threads.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The last event read from the source.
    pub source_seq: AtomicU64,
    /// The lowest `wallet:applied_seq` over the nodes of the map.
    pub min_applied_seq: AtomicU64,
    /// Nodes down or being rebuilt.
    pub nodes_unavailable: AtomicU64,
    pub lag_ms: AtomicU64,
    pub lag_ms_max: AtomicU64,
    pub map_version: AtomicU64,
    /// Times the in-process replicator (`serve --replicate-redis`) stopped with an error or a
    /// panic and was started again.
    pub restarts: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let source = get(&self.source_seq);
        let applied = get(&self.min_applied_seq);
        format!(
            "# TYPE wallet_redis_source_seq gauge\nwallet_redis_source_seq {source}\n\
             # TYPE wallet_redis_applied_seq gauge\nwallet_redis_applied_seq {applied}\n\
             # TYPE wallet_redis_lag_events gauge\nwallet_redis_lag_events {}\n\
             # TYPE wallet_redis_lag_ms gauge\nwallet_redis_lag_ms {}\n\
             # TYPE wallet_redis_lag_ms_max gauge\nwallet_redis_lag_ms_max {}\n\
             # TYPE wallet_redis_nodes_unavailable gauge\nwallet_redis_nodes_unavailable {}\n\
             # TYPE wallet_redis_map_version gauge\nwallet_redis_map_version {}\n\
             # TYPE wallet_redis_restarts_total counter\nwallet_redis_restarts_total {}\n",
            source.saturating_sub(applied),
            get(&self.lag_ms),
            get(&self.lag_ms_max),
            get(&self.nodes_unavailable),
            get(&self.map_version),
            get(&self.restarts),
        )
    }
}

/// For `serve --replicate-redis`: runs the replicator on its own thread and runtime until the
/// process ends, starting it again (after a pause) whenever it stops with an error or a panic
/// (counted in `wallet_redis_restarts_total`). Starting again is safe: a run resumes from what
/// the nodes say they applied.
pub fn spawn(mut options: ReplicateOptions) -> (Arc<Metrics>, std::thread::JoinHandle<()>) {
    let metrics = options.metrics.get_or_insert_with(Default::default).clone();
    options.once = false;
    let thread_metrics = metrics.clone();
    let handle = std::thread::spawn(move || {
        loop {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(run(&options)))
            }))
            .unwrap_or_else(|panic| {
                Err(anyhow::anyhow!(
                    "panicked: {}",
                    crate::engine::panic_text(panic.as_ref())
                ))
            });
            if let Err(e) = result {
                thread_metrics.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %format!("{e:#}"), "Redis replicator stopped; restarting in 1 s");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    (metrics, handle)
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    pub elapsed: Duration,
    pub nodes: usize,
    /// The longest replication lag seen (`lag_ms_max` of the status line).
    pub lag_max: Duration,
}

impl Report {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct Replicator {
    map: PartitionMap,
    nodes: Vec<Node>,
    dir: Directory,
    /// The directory was read from the nodes (an HTTP source resumed after sequence 1): it
    /// lacks accounts that never had a balance, and may already know accounts opened after its
    /// sequence (on nodes ahead of it). Such events are taken as they come.
    dir_from_nodes: bool,
    /// Node index of every account under `map`.
    route: Vec<u16>,
    /// Whether the account is in its node's `dirty` list.
    marked: Vec<bool>,
    /// Nodes removed from the map whose keys are still to be deleted.
    retired: Vec<Node>,
    /// Writes in flight (script writes, rebuilds, connects), at most one per node
    /// (`Node::write`).
    inflight: tokio::task::JoinSet<WriteDone>,
    /// The largest replication lag seen (`lag`): from the start of the source read before an
    /// event appeared to a node having applied it (an upper bound, omitting only the moment
    /// between a journal append and our read).
    lag_max: Duration,
    /// Start of the previous source read (events of the current batch appeared after it).
    last_read_started: Option<Instant>,
    /// The sequence the replicator's copy of the balances starts from (an engine snapshot's;
    /// 0 when it was built from sequence 1): changes before it are in the copy but were never
    /// marked to be written, so a node that applied less than this cannot be continued.
    copy_from: u64,
    /// Where the list of nodes still to be emptied is kept (`zk::update_retiring`): ZooKeeper's
    /// address and the layout.
    zk: (String, Layout),
    /// The highest sequence a node showed at start-up from this source (following the map or
    /// not, its record identity checked). Until the replicator has read this far, no node is
    /// rebuilt and no map change is carried out: either would publish balances older than
    /// what that node already showed (readers would see balances go back in time, under a map
    /// version they trust). Nodes waiting for a rebuild say `resync` to readers meanwhile.
    floor: u64,
    /// Set when a node shows a writer other than this replicator (`another_writer`): the run
    /// stops with it.
    stopped_by: Option<anyhow::Error>,
}

fn route_of(map: &PartitionMap, name: &str) -> u16 {
    map.route(name).0 as u16
}

impl Replicator {
    fn version(&self) -> String {
        self.map.version.to_string()
    }

    /// While the source is idle: asks each node believed current whether it still is. A node
    /// emptied (`FLUSHALL`, a restart without persistence) or rewound (an older dump) behind
    /// the replicator's back would otherwise keep serving that state under the current map
    /// version, and be reported up, until the next event touched it. One that no longer says
    /// the map version, or says an applied sequence below what was written there, is rebuilt.
    /// A node that does not answer within `SLOW_WRITE` is taken as down (the check must not
    /// hold back the other nodes). A node taken as down (by this check or by a write) is
    /// connected again once its backoff has passed and asked the same: a restart ends the
    /// connection, and nothing else would reach a node with nothing to write, so one back
    /// empty stayed empty (and reported down) until an event touched it.
    async fn check_idle_nodes(&mut self) {
        let version = self.version();
        for node in &mut self.nodes {
            if node.unprobed || node.needs_resync || node.write.is_some() {
                continue;
            }
            match tokio::time::timeout(SLOW_WRITE, node.ensure_connected()).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => {
                    node.mark_down(&anyhow::anyhow!(
                        "no connection within {SLOW_WRITE:?} for the idle check"
                    ));
                    continue;
                }
            }
            let Some(conn) = node.conn.as_mut() else {
                continue;
            };
            match tokio::time::timeout(SLOW_WRITE, probe(conn)).await {
                Ok(Ok((applied, v)))
                    if v.as_deref() == Some(version.as_str()) && applied > node.sent_seq =>
                {
                    let error = another_writer(
                        &node.address,
                        &format!(
                            "its applied sequence is {applied}, but this replicator wrote no further than {}",
                            node.sent_seq
                        ),
                    );
                    stop_run(&mut self.stopped_by, error);
                }
                Ok(Ok((applied, v)))
                    if v.as_deref() == Some(version.as_str()) && applied >= node.applied_seq =>
                {
                    node.mark_up();
                }
                Ok(Ok((_, Some(v)))) if newer_map(Some(&v), self.map.version).is_some() => {
                    let error = newer_map_error(
                        &node.address,
                        &v,
                        self.map.version,
                        &self.zk.1.partitions(),
                    );
                    stop_run(&mut self.stopped_by, error);
                }
                Ok(Ok((applied, v))) => {
                    tracing::warn!(node = %node.address, applied, version = ?v, expected_applied = node.applied_seq, expected_version = %version, "node lost what was written there (emptied or rewound while idle); rebuilding it");
                    node.mark_up();
                    node.needs_resync = true;
                }
                Ok(Err(e)) => node.mark_down(&e.into()),
                Err(_) => node.mark_down(&anyhow::anyhow!(
                    "no answer to the idle check within {SLOW_WRITE:?}"
                )),
            }
        }
    }

    fn ingest(&mut self, items: &[Item]) -> anyhow::Result<()> {
        for item in items {
            let seq = item.seq();
            if seq != self.dir.seq + 1 {
                bail!(
                    "the source skipped from sequence {} to {seq}",
                    self.dir.seq + 1
                );
            }
            match item {
                Item::Opened { name, .. }
                    if self.dir_from_nodes && self.dir.index_of(name).is_some() => {}
                Item::Opened { index, name, .. } => {
                    self.open_account(*index, name)?;
                }
                Item::Balance {
                    account,
                    currency,
                    balance,
                    ..
                } => {
                    let account = match (self.dir.resolve(account), account) {
                        (Ok(a), _) => a,
                        (Err(_), AccountRef::Name(name)) if self.dir_from_nodes => {
                            self.open_account(None, name)?
                        }
                        (Err(e), _) => return Err(e),
                    };
                    self.dir.set(account, *currency, *balance);
                    let node = &mut self.nodes[self.route[account as usize] as usize];
                    if seq > node.applied_seq && !self.marked[account as usize] {
                        self.marked[account as usize] = true;
                        node.dirty.push(account);
                        if node.dirty_since.is_none() {
                            node.dirty_since = self.last_read_started;
                        }
                    }
                }
                Item::Other { .. } => {}
            }
            self.dir.seq = seq;
        }
        Ok(())
    }

    fn open_account(&mut self, index: Option<u32>, name: &str) -> anyhow::Result<u32> {
        let account = self.dir.open(index, name)?;
        self.route.push(route_of(&self.map, name));
        self.marked.push(false);
        Ok(account)
    }

    /// Replaces the directory with what the nodes hold (every node follows the map; each is at
    /// its own applied sequence, at least `seq`). Reading the source from `seq + 1` on then
    /// makes it exact: balances are absolute values, and every event after `seq` comes again.
    async fn directory_from_nodes(&mut self, seq: u64) -> anyhow::Result<()> {
        let mut dir = Directory::default();
        for node in &mut self.nodes {
            let Some(conn) = node.conn.as_mut() else {
                bail!("Redis node {} is not connected", node.address);
            };
            let keys = scan_balance_keys(conn).await?;
            for chunk in keys.chunks(CHUNK_ACCOUNTS) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("HGETALL").arg(key);
                }
                let values: Vec<HashMap<String, u64>> =
                    pipe.query_async(conn).await.with_context(|| {
                        format!("reading the balances of Redis node {}", node.address)
                    })?;
                for (key, fields) in chunk.iter().zip(values) {
                    let name = key.strip_prefix(BALANCE_PREFIX).unwrap_or(key);
                    let account = dir
                        .open(None, name)
                        .with_context(|| format!("Redis node {}: {key}", node.address))?;
                    for (code, balance) in fields {
                        let currency = Currency::new(&code).map_err(|e| {
                            anyhow::anyhow!(
                                "Redis node {}: {key} field {code:?}: {e}",
                                node.address
                            )
                        })?;
                        dir.set(account, currency, balance);
                    }
                }
            }
        }
        dir.seq = seq;
        self.route = (0..dir.len() as u32)
            .map(|a| route_of(&self.map, dir.name(a)))
            .collect();
        self.marked = vec![false; dir.len()];
        self.dir = dir;
        self.dir_from_nodes = true;
        Ok(())
    }

    fn clear_dirty(&mut self, node: usize) {
        self.nodes[node].dirty_since = None;
        for account in std::mem::take(&mut self.nodes[node].dirty) {
            self.marked[account as usize] = false;
        }
    }

    /// Whether every node holds everything read so far.
    fn caught_up(&self) -> bool {
        self.inflight.is_empty()
            && self.nodes.iter().all(|n| {
                n.is_up_and_current() && n.applied_seq >= self.dir.seq && n.dirty.is_empty()
            })
    }

    /// Brings every reachable node up to `dir.seq` and waits for it.
    async fn flush(&mut self) {
        self.complete_writes(Wait::All).await;
        self.start_writes().await;
        self.complete_writes(Wait::All).await;
    }

    /// Waits for writes in flight (`wait` says which) and books the outcome of every write
    /// that is done.
    async fn complete_writes(&mut self, wait: Wait) {
        let mut done = 0;
        loop {
            while let Some(joined) = self.inflight.try_join_next_with_id() {
                self.book(joined, &mut done);
            }
            if self.inflight.is_empty() {
                break;
            }
            let joined = match wait {
                Wait::All => self.inflight.join_next_with_id().await,
                Wait::Fresh => {
                    let now = Instant::now();
                    let Some(deadline) = self
                        .nodes
                        .iter()
                        .filter_map(|n| n.write.as_ref())
                        .map(|w| w.started + SLOW_WRITE)
                        .filter(|&d| d > now)
                        .min()
                    else {
                        break;
                    };
                    let deadline = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(deadline, self.inflight.join_next_with_id()).await
                    {
                        Ok(joined) => joined,
                        Err(_) => continue,
                    }
                }
            };
            if let Some(joined) = joined {
                self.book(joined, &mut done);
            }
        }
        if done > 0 {
            failpoint("redis-after-batch");
            failpoint_panic("redis-panic");
        }
    }

    fn book(
        &mut self,
        joined: Result<(tokio::task::Id, WriteDone), tokio::task::JoinError>,
        done: &mut usize,
    ) {
        match joined {
            Ok((_, write)) => self.on_applied(write, done),
            Err(e) => {
                // A task that failed (panicked) booked nothing: its node's accounts are still
                // to be written there (the script is atomic, so resending them is right
                // either way).
                tracing::error!(error = %e, "a Redis write task failed");
                let task = Some(e.id());
                if let Some(i) = self
                    .nodes
                    .iter()
                    .position(|n| n.write.as_ref().is_some_and(|w| w.task == task))
                {
                    let write = self.nodes[i].write.take();
                    let accounts = std::mem::take(&mut self.nodes[i].inflight);
                    self.redirty(i, accounts, write.and_then(|w| w.since));
                }
            }
        }
    }

    /// The replication lag now: per node, that of its last completed write, or the age of the
    /// oldest change not yet applied there if greater (none for a node holding everything read
    /// so far); the largest over the nodes.
    fn lag(&self) -> Duration {
        self.nodes
            .iter()
            .filter(|n| {
                !(n.is_up_and_current()
                    && n.applied_seq >= self.dir.seq
                    && n.dirty.is_empty()
                    && n.write.is_none())
            })
            .map(|n| {
                let oldest = [n.write.as_ref().and_then(|w| w.since), n.dirty_since]
                    .into_iter()
                    .flatten()
                    .min();
                n.lag.max(oldest.map_or(Duration::ZERO, |t| t.elapsed()))
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Starts a rebuild of each node that needs one, and sends each other node without a
    /// write in flight its changed accounts in one script; all concurrently, without waiting:
    /// the caller reads the next batch from the source meanwhile and calls `complete_writes`
    /// before the next `start_writes`. A rebuild is a write like the others: a node whose
    /// rebuild hangs holds back only its own balances.
    async fn start_writes(&mut self) {
        let now = Instant::now();
        let inline = failpoint_armed("redis-after-node-1");
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if !node.needs_resync
                || node.unprobed
                || node.write.is_some()
                || self.dir.seq < self.floor
                || (node.conn.is_none() && node.retry_at.is_some_and(|at| now < at))
            {
                continue;
            }
            if node.conn.is_none() {
                // Connected first (by a task: connecting must not hold back the other nodes);
                // the rebuild starts once it answers.
                let target = node.applied_seq;
                self.nodes[i].write = Some(Write {
                    task: None,
                    started: now,
                    since: None,
                });
                self.launch(i, target, Job::Connect, inline, &mut 0).await;
                continue;
            }
            tracing::info!(node = %node.address, seq = self.dir.seq, "rebuilding node from the replicator's balances");
            let share = share(&self.dir, &self.route, i as u16);
            let finish = Finish {
                version: self.map.version,
                seq: self.dir.seq,
                record: self.dir.record,
            };
            let since = self.nodes[i].dirty_since.or(self.last_read_started);
            // The rebuild carries every change so far; later ones are marked from here on and
            // written after it, as to any node.
            self.clear_dirty(i);
            let node = &mut self.nodes[i];
            node.know_applied(self.dir.seq);
            node.write = Some(Write {
                task: None,
                started: now,
                since,
            });
            let target = self.dir.seq;
            self.launch(i, target, Job::Rebuild(share, finish), inline, &mut 0)
                .await;
        }
        let version = self.version();
        let target = self.dir.seq;
        let record = self.dir.record.map(|r| r.to_string()).unwrap_or_default();
        let mut writes = Vec::new();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if node.needs_resync
                || node.write.is_some()
                || (node.applied_seq >= target && node.dirty.is_empty())
            {
                continue;
            }
            // A node that is down is connected by its write task, once its backoff has passed
            // (connecting must not hold back the other nodes either).
            if node.conn.is_none() && node.retry_at.is_some_and(|at| now < at) {
                continue;
            }
            // EVALSHA with the arguments packed into one buffer (no allocation per argument).
            // The write may be applied even if its answer is lost.
            node.sent_seq = node.sent_seq.max(target);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(APPLY_SCRIPT.get_hash())
                .arg(3)
                .arg(MAP_VERSION_KEY)
                .arg(APPLIED_SEQ_KEY)
                .arg(APPLIED_RECORD_KEY)
                .arg(&version)
                .arg(node.applied_seq)
                .arg(target)
                .arg(&record)
                .arg(node.sent_seq);
            node.inflight = std::mem::take(&mut node.dirty);
            node.write = Some(Write {
                task: None,
                started: now,
                since: node.dirty_since.take().or(self.last_read_started),
            });
            for &account in &node.inflight {
                self.marked[account as usize] = false;
                let balances = &self.dir.balances[account as usize];
                cmd.arg(self.dir.key(account)).arg(balances.len());
                for (currency, balance) in balances {
                    cmd.arg(&currency.code()[..]).arg(*balance);
                }
            }
            writes.push((i, cmd));
        }
        let mut done = 0;
        for (i, cmd) in writes {
            self.launch(i, target, Job::Apply(cmd), inline, &mut done)
                .await;
        }
    }

    /// Runs `job` as node `i`'s write (already in `Node::write`): a task in `inflight`, or,
    /// while the crash tests' failpoint is armed (`inline`), awaited in place, one node at a
    /// time, so that the failpoint stops the process with exactly one node ahead (concurrent
    /// writes would usually all land first).
    async fn launch(&mut self, i: usize, target: u64, job: Job, inline: bool, done: &mut usize) {
        let node = &self.nodes[i];
        let task = node_task(i, target, node.conn.clone(), node.address.clone(), job);
        if inline {
            let write = task.await;
            self.on_applied(write, done);
        } else {
            let task = self.inflight.spawn(task);
            if let Some(write) = self.nodes[i].write.as_mut() {
                write.task = Some(task.id());
            }
        }
    }

    /// Books the lag of a write node `i` completed (`since`: when the oldest change it
    /// carried appeared).
    fn book_lag(&mut self, i: usize, since: Option<Instant>) {
        if let Some(since) = since {
            let node = &mut self.nodes[i];
            node.lag = since.elapsed();
            self.lag_max = self.lag_max.max(node.lag);
        }
    }

    fn on_applied(&mut self, write: WriteDone, done: &mut usize) {
        let WriteDone {
            node: i,
            target,
            conn,
            result,
            kind,
        } = write;
        let write = self.nodes[i].write.take();
        let since = write.and_then(|w| w.since);
        let accounts = std::mem::take(&mut self.nodes[i].inflight);
        if conn.is_some() {
            self.nodes[i].conn = conn;
        }
        match (kind, result) {
            (JobKind::Connect, Ok(())) => self.nodes[i].mark_up(),
            (JobKind::Connect, Err(e)) => self.nodes[i].mark_down(&e),
            (JobKind::Rebuild, Ok(())) => {
                let node = &mut self.nodes[i];
                node.needs_resync = false;
                node.mark_up();
                self.book_lag(i, since);
            }
            (JobKind::Rebuild, Err(e)) if is_newer_map(&e) => {
                let error = newer_map_error(
                    &self.nodes[i].address,
                    &stamped_version(&e),
                    self.map.version,
                    &self.zk.1.partitions(),
                );
                stop_run(&mut self.stopped_by, error);
            }
            (JobKind::Rebuild, Err(e)) => {
                // Still to be rebuilt; its oldest change not yet there stays counted in its
                // lag (the changes themselves are cleared when the next rebuild starts).
                self.nodes[i].mark_down(&e);
                self.redirty(i, Vec::new(), since);
            }
            (JobKind::Apply, result) => self.apply_done(i, target, accounts, since, result, done),
        }
    }

    fn apply_done(
        &mut self,
        i: usize,
        target: u64,
        accounts: Vec<u32>,
        since: Option<Instant>,
        result: anyhow::Result<()>,
        done: &mut usize,
    ) {
        match result {
            Ok(_) => {
                *done += 1;
                if *done == 1 {
                    failpoint("redis-after-node-1");
                }
                let node = &mut self.nodes[i];
                node.applied_seq = target;
                node.mark_up();
                self.book_lag(i, since);
                return;
            }
            Err(e) if e.downcast_ref::<redis::RedisError>().is_some_and(is_stale) => {
                tracing::warn!(node = %self.nodes[i].address, error = %e, "node disagrees with the replicator; rebuilding it");
                self.nodes[i].needs_resync = true;
            }
            Err(e)
                if e.downcast_ref::<redis::RedisError>()
                    .is_some_and(is_conflict) =>
            {
                let error = another_writer(&self.nodes[i].address, &e.to_string());
                stop_run(&mut self.stopped_by, error);
            }
            Err(e) => self.nodes[i].mark_down(&e),
        }
        // Not applied: those accounts are still to be written there.
        self.redirty(i, accounts, since);
    }

    /// Puts the accounts of a write that was not applied back into its node's `dirty`
    /// (`since`: when the oldest change among them appeared).
    fn redirty(&mut self, node: usize, accounts: Vec<u32>, since: Option<Instant>) {
        let node_state = &mut self.nodes[node];
        node_state.dirty_since = match (node_state.dirty_since, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for account in accounts {
            if !self.marked[account as usize] {
                self.marked[account as usize] = true;
                self.nodes[node].dirty.push(account);
            }
        }
    }

    /// Moves to `new_map`: places every balance on its new node, then switches each node
    /// (deleting what moved away and setting the new version in one transaction).
    async fn migrate(&mut self, new_map: PartitionMap) {
        tracing::info!(from = self.map.version, to = new_map.version, nodes = ?new_map.nodes, seq = self.dir.seq, "moving balances to the new partition map");
        // Everything reachable first reaches the same sequence, so moved copies are current.
        self.flush().await;
        let seq = self.dir.seq;
        let new_route: Vec<u16> = (0..self.dir.len() as u32)
            .map(|a| route_of(&new_map, self.dir.name(a)))
            .collect();
        let mut old_nodes: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        let respelled = self.respelled_nodes(&new_map, &mut old_nodes).await;
        let mut nodes = Vec::with_capacity(new_map.nodes.len());
        // For each new node: its old index, if it was current under the old map.
        let mut incremental: Vec<Option<u16>> = Vec::new();
        for (j, address) in new_map.nodes.iter().enumerate() {
            let old = self
                .map
                .nodes
                .iter()
                .position(|a| a == address)
                .or_else(|| respelled.get(&j).copied());
            let retired = self
                .retired
                .iter()
                .position(|n| n.address == *address)
                .map(|k| self.retired.swap_remove(k));
            let mut node = match old.and_then(|k| old_nodes[k].take()) {
                Some(node) => node,
                None => retired.unwrap_or_else(|| Node::new(address)),
            };
            // A respelled node keeps its state under its new name (the same server).
            node.address.clone_from(address);
            let current =
                node.is_up_and_current() && node.applied_seq == seq && node.dirty.is_empty();
            incremental.push(if current { old.map(|k| k as u16) } else { None });
            node.needs_resync = !current;
            node.dirty.clear();
            node.dirty_since = None;
            nodes.push(node);
        }
        for m in self.marked.iter_mut() {
            *m = false;
        }
        let version = new_map.version.to_string();
        let old_version = self.version();
        // 1. Place. Old-version readers never look for a moved key on its new node, and
        // new-version readers wait until that node switches.
        let mut placed = vec![false; nodes.len()];
        for (j, node) in nodes.iter_mut().enumerate() {
            // Not read yet (down at start-up): probed first, then rebuilt (`probe_late_nodes`).
            if node.unprobed || !node.ensure_connected().await {
                continue;
            }
            let Some(mut conn) = node.conn.clone() else {
                continue;
            };
            let result = match incremental[j] {
                Some(old) => {
                    let moved_in: Vec<u32> = (0..self.dir.len() as u32)
                        .filter(|&a| {
                            new_route[a as usize] == j as u16 && self.route[a as usize] != old
                        })
                        .collect();
                    write_accounts(&mut conn, &entries(&self.dir, moved_in.into_iter())).await
                }
                None => {
                    let share = share(&self.dir, &new_route, j as u16);
                    resync(&mut conn, &share, new_map.version, None).await
                }
            };
            match result {
                Ok(()) => placed[j] = true,
                // Stamped by a map newer still than the one this replicator moves to.
                Err(e) if is_newer_map(&e) => {
                    let error = newer_map_error(
                        &node.address,
                        &stamped_version(&e),
                        new_map.version,
                        &self.zk.1.partitions(),
                    );
                    stop_run(&mut self.stopped_by, error);
                    node.needs_resync = true;
                }
                Err(e) => {
                    node.needs_resync = true;
                    node.mark_down(&e);
                }
            }
        }
        failpoint("redis-migrate-after-copy");
        // 2. Switch, node by node, only after every reachable node holds its new balances.
        let mut switched = 0;
        for (j, node) in nodes.iter_mut().enumerate() {
            if !placed[j] {
                continue;
            }
            let Some(mut conn) = node.conn.clone() else {
                continue;
            };
            let moved_out: Vec<String> = match incremental[j] {
                Some(old) => (0..self.dir.len())
                    .filter(|&a| {
                        self.route[a] == old
                            && new_route[a] != j as u16
                            && !self.dir.balances[a].is_empty()
                    })
                    .map(|a| self.dir.key(a as u32).to_string())
                    .collect(),
                None => Vec::new(),
            };
            // What the node must still say: a node switched incrementally is current under
            // the old map at `seq`; a rebuilt one says `resync` (any applied sequence). A node
            // that lost its data since (a FLUSHALL, a restart without persistence) is refused
            // and rebuilt rather than stamped with the new version.
            let (expected_version, expected_applied) = match incremental[j] {
                Some(_) => (old_version.clone(), seq.to_string()),
                None => ("resync".to_string(), String::new()),
            };
            let record = self.dir.record.map(|r| r.to_string()).unwrap_or_default();
            let mut switch = SWITCH_SCRIPT.prepare_invoke();
            switch
                .key(MAP_VERSION_KEY)
                .key(APPLIED_SEQ_KEY)
                .key(APPLIED_RECORD_KEY)
                .arg(&expected_version)
                .arg(&expected_applied)
                .arg(seq)
                .arg(&record)
                .arg(&version);
            for key in &moved_out {
                switch.arg(key);
            }
            match switch.invoke_async::<i64>(&mut conn).await {
                Err(e) if is_stale(&e) => {
                    tracing::warn!(node = %node.address, error = %e, "node is not what the replicator believed at the map switch; rebuilding it");
                    node.needs_resync = true;
                }
                Ok(_) => {
                    node.know_applied(seq);
                    node.needs_resync = false;
                    node.mark_up();
                    switched += 1;
                    if switched == 1 {
                        failpoint("redis-migrate-after-switch-1");
                    }
                }
                Err(e) => {
                    node.needs_resync = true;
                    node.mark_down(&e.into());
                }
            }
        }
        // 3. Nodes no longer in the map: tell old-version readers to look again, drop the keys.
        for node in old_nodes.into_iter().flatten() {
            self.retired.push(node);
        }
        self.map = new_map;
        self.route = new_route;
        self.nodes = nodes;
        self.clean_retired().await;
        tracing::info!(version = self.map.version, "partition map switched");
    }

    /// New-map nodes (by index) that are an old-map node under another spelling
    /// (`localhost:6379` for `127.0.0.1:6379`), with that old node's index: the same server,
    /// told apart by its `run_id`, so the same node; it must not be rebuilt as a new one and
    /// then retired (emptied) under its old name. Nodes that do not answer are not matched
    /// (`clean_retired` checks again before it empties a node).
    async fn respelled_nodes(
        &self,
        new_map: &PartitionMap,
        old_nodes: &mut [Option<Node>],
    ) -> HashMap<usize, usize> {
        let mut respelled = HashMap::new();
        let mut gone = Vec::new();
        for (k, slot) in old_nodes.iter_mut().enumerate() {
            let Some(node) = slot.as_mut() else { continue };
            if new_map.nodes.contains(&node.address) || !node.ensure_connected().await {
                continue;
            }
            let Some(conn) = node.conn.as_mut() else {
                continue;
            };
            if let Some(id) = server_id(conn, &node.address).await {
                gone.push((id, k));
            }
        }
        if gone.is_empty() {
            return respelled;
        }
        for (j, address) in new_map.nodes.iter().enumerate() {
            if self.map.nodes.contains(address) {
                continue;
            }
            let Some(id) = server_id_at(address).await else {
                continue;
            };
            if let Some(&(_, k)) = gone.iter().find(|(g, _)| *g == id) {
                tracing::warn!(old = %self.map.nodes[k], new = %address, "the new map names a node under another address (the same server): it keeps its balances and is not retired");
                respelled.insert(j, k);
            }
        }
        respelled
    }

    async fn clean_retired(&mut self) {
        let mut kept = Vec::new();
        // The servers of the current map (and the nodes that did not say), read once the first
        // retired node answers.
        let mut current_ids: Option<CurrentServers> = None;
        for mut node in std::mem::take(&mut self.retired) {
            // A removed node is often a decommissioned host: each try can wait for a connect
            // timeout inside the main loop, so it is tried again only every `RETIRED_RETRY`.
            let before = node.retry_at;
            if !node.ensure_connected().await {
                if node.retry_at != before {
                    // It tried, and failed.
                    node.retry_at = Some(Instant::now() + RETIRED_RETRY);
                }
                kept.push(node);
                continue;
            }
            let Some(mut conn) = node.conn.clone() else {
                continue;
            };
            // A removed address whose server is in the map under another spelling (it did not
            // answer when the map changed) is that map node: emptying it would empty the node.
            // So it is emptied only once it is known not to be: it says which server it is,
            // and so does every node of the map (one that cannot say might be it).
            // Each question is bounded by `SLOW_WRITE`: a node that does not answer in time
            // counts as one that cannot say, which only keeps the removed node for later.
            let own = tokio::time::timeout(SLOW_WRITE, server_id(&mut conn, &node.address));
            let Some(id) = own.await.ok().flatten() else {
                tracing::warn!(node = %node.address, retry_in = ?RETIRED_RETRY, "removed node does not say which server it is (INFO server failed): it may be a node of the map under another name, so it is not emptied yet");
                node.conn = None;
                node.retry_at = Some(Instant::now() + RETIRED_RETRY);
                kept.push(node);
                continue;
            };
            if current_ids.is_none() {
                // All at once: a map node that never answers (it answered the connection's
                // setup, then nothing) held the loop for the 30 s response timeout, at the map
                // switch and again at every retry while it stayed silent.
                let answers =
                    futures_util::future::join_all(self.nodes.iter().map(|current| async move {
                        let id = tokio::time::timeout(SLOW_WRITE, server_id_at(&current.address));
                        (id.await.ok().flatten(), current.address.clone())
                    }))
                    .await;
                let mut ids = Vec::new();
                let mut unknown = Vec::new();
                for (id, address) in answers {
                    match id {
                        Some(current_id) => ids.push((current_id, address)),
                        None => unknown.push(address),
                    }
                }
                current_ids = Some((ids, unknown));
            }
            let Some((ids, unknown)) = current_ids.as_ref() else {
                continue;
            };
            if let Some((_, current)) = ids.iter().find(|(current_id, _)| *current_id == id) {
                tracing::warn!(node = %node.address, same_as = %current, "removed node is the same server as a node of the map: not retired");
                self.forget_retiring(&node.address).await;
                continue;
            }
            if !unknown.is_empty() {
                tracing::warn!(node = %node.address, unknown = ?unknown, retry_in = ?RETIRED_RETRY, "nodes of the map do not say which server they are: the removed node may be one of them under another name, so it is not emptied yet");
                node.conn = None;
                node.retry_at = Some(Instant::now() + RETIRED_RETRY);
                kept.push(node);
                continue;
            }
            match retire(&mut conn, self.map.version).await {
                Ok(()) => {
                    tracing::info!(node = %node.address, "removed node emptied");
                    self.forget_retiring(&node.address).await;
                }
                // Removed from this map and now stamped by a newer one (its address reused by
                // another cluster root): not emptied, and not this replicator's to stop over;
                // it stays on the retiring list and is asked again later.
                Err(e) if is_newer_map(&e) => {
                    tracing::error!(node = %node.address, stamp = %stamped_version(&e), version = self.map.version, retry_in = ?RETIRED_RETRY, "a node removed from this partition map is stamped by a newer map (another cluster root uses the server now): it is not emptied; take it off this root's retiring list once that is meant");
                    node.conn = None;
                    node.retry_at = Some(Instant::now() + RETIRED_RETRY);
                    kept.push(node);
                }
                Err(e) => {
                    node.mark_down(&e);
                    node.retry_at = Some(Instant::now() + RETIRED_RETRY);
                    kept.push(node);
                }
            }
        }
        self.retired = kept;
    }

    /// Takes an emptied node off the retiring list in ZooKeeper. If that fails (ZooKeeper down),
    /// the entry stays and a later start empties the node again, which changes nothing.
    async fn forget_retiring(&self, address: &str) {
        let (zk_address, layout) = &self.zk;
        let remove = [address.to_string()];
        let update = async {
            let client = zk::connect(zk_address).await?;
            zk::update_retiring(&client, layout, &[], &remove).await
        };
        match tokio::time::timeout(Duration::from_secs(10), update).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(node = %address, error = %format!("{e:#}"), "could not take the emptied node off the retiring list; it is emptied again at the next start")
            }
            Err(_) => {
                tracing::warn!(node = %address, "ZooKeeper did not answer: the emptied node stays on the retiring list; it is emptied again at the next start")
            }
        }
    }

    fn publish(&self, metrics: &Metrics) {
        let min_applied = self
            .nodes
            .iter()
            .map(|n| if n.needs_resync { 0 } else { n.applied_seq })
            .min()
            .unwrap_or(0);
        let unavailable = self
            .nodes
            .iter()
            .filter(|n| n.retry_at.is_some() || n.needs_resync)
            .count();
        metrics.source_seq.store(self.dir.seq, Ordering::Relaxed);
        metrics
            .min_applied_seq
            .store(min_applied, Ordering::Relaxed);
        metrics
            .nodes_unavailable
            .store(unavailable as u64, Ordering::Relaxed);
        let lag = self.lag();
        metrics
            .lag_ms
            .store(lag.as_millis() as u64, Ordering::Relaxed);
        metrics
            .lag_ms_max
            .store(self.lag_max.max(lag).as_millis() as u64, Ordering::Relaxed);
        metrics
            .map_version
            .store(self.map.version, Ordering::Relaxed);
    }

    fn log_status(&self, source_seq: u64) {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let state = if n.retry_at.is_some() {
                    "down"
                } else if n.needs_resync {
                    "resync"
                } else {
                    "up"
                };
                format!("{}={}@{}", n.address, state, n.applied_seq)
            })
            .collect();
        tracing::info!(
            seq = source_seq,
            map_version = self.map.version,
            lag_ms = self.lag().as_millis() as u64,
            lag_ms_max = self.lag_max.max(self.lag()).as_millis() as u64,
            nodes = %nodes.join(" "),
            "replicator status"
        );
    }
}

/// Writes the full balances of `accounts` (replacing each hash), pipelined in chunks.
async fn write_accounts(
    conn: &mut MultiplexedConnection,
    accounts: &Entries,
) -> anyhow::Result<()> {
    for chunk in accounts.chunks(CHUNK_ACCOUNTS) {
        let mut pipe = redis::pipe();
        for (key, balances) in chunk {
            let key = &key[..];
            pipe.cmd("DEL").arg(key).ignore();
            if !balances.is_empty() {
                let cmd = pipe.cmd("HSET").arg(key);
                for (currency, balance) in balances {
                    cmd.arg(&currency.code()[..]).arg(*balance);
                }
                cmd.ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
        failpoint("redis-write-chunk");
    }
    Ok(())
}

/// Every balance key on a node.
pub async fn scan_balance_keys(
    conn: &mut MultiplexedConnection,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{BALANCE_PREFIX}*"))
            .arg("COUNT")
            .arg(2000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Rebuilds a node from its `share` of the balances: invalidates its version (readers retry),
/// drops every key that does not belong there, writes every balance that does. With `finish`,
/// then sets the applied sequence, record and version in one transaction.
async fn resync(
    conn: &mut MultiplexedConnection,
    share: &Entries,
    version: u64,
    finish: Option<&Finish>,
) -> anyhow::Result<()> {
    INVALIDATE_SCRIPT
        .prepare_invoke()
        .key(MAP_VERSION_KEY)
        .arg(version)
        .arg("resync")
        .invoke_async::<i64>(conn)
        .await?;
    let strays: Vec<String> = scan_balance_keys(conn)
        .await?
        .into_iter()
        .filter(|key| {
            share
                .binary_search_by(|(k, _)| (**k).cmp(key.as_str()))
                .is_err()
        })
        .collect();
    for keys in strays.chunks(1000) {
        redis::cmd("DEL").arg(keys).query_async::<()>(conn).await?;
    }
    write_accounts(conn, share).await?;
    if let Some(finish) = finish {
        // Tests: `redis-before-stamp:<ms>` holds every rebuild that long before its stamp.
        if let Some(ms) = crate::replicate::failpoint_value("redis-before-stamp") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        // Only if the node still says `resync`: one emptied while the share was written
        // (a FLUSHALL, a restart without persistence) lacks the chunks written before, and
        // stamped current it would keep lacking them (nothing rewrites untouched accounts).
        let record = finish.record.map(|r| r.to_string()).unwrap_or_default();
        SWITCH_SCRIPT
            .prepare_invoke()
            .key(MAP_VERSION_KEY)
            .key(APPLIED_SEQ_KEY)
            .key(APPLIED_RECORD_KEY)
            .arg("resync")
            .arg("")
            .arg(finish.seq)
            .arg(&record)
            .arg(finish.version)
            .invoke_async::<i64>(conn)
            .await
            .context("the node changed while it was rebuilt; rebuilding it again")?;
    }
    Ok(())
}

/// Empties a node that left the map; its version tells old-map readers to re-read the map.
/// Not one a newer map stamped (`WALLET_NEWER_MAP`): another root's replicator uses it.
async fn retire(conn: &mut MultiplexedConnection, new_version: u64) -> anyhow::Result<()> {
    INVALIDATE_SCRIPT
        .prepare_invoke()
        .key(MAP_VERSION_KEY)
        .arg(new_version)
        .arg(format!("retired:{new_version}"))
        .invoke_async::<i64>(conn)
        .await?;
    let keys = scan_balance_keys(conn).await?;
    for chunk in keys.chunks(1000) {
        redis::cmd("DEL").arg(chunk).query_async::<()>(conn).await?;
    }
    Ok(())
}

/// `Source::record_at`, retried as the main loop retries its reads (`SourceRetry`): an engine
/// URL that is down, starting or busy (`Unavailable`) for up to the source's outage limit.
/// The replicator reads records at start-up (to check the nodes' identities) and when a node
/// that was down at start-up answers; an engine restarting alongside the replicator must not
/// make it exit.
async fn record_at_patiently(
    source: &mut Source,
    seq: u64,
    patience: Duration,
) -> anyhow::Result<Option<(RecordId, bool)>> {
    let mut retry = SourceRetry::new(patience);
    loop {
        match source.record_at(seq).await {
            Ok(found) => return Ok(found),
            Err(e) => {
                let pause = retry.failed(e)?;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Checks that the record each node names as the one at its applied sequence is the source's
/// record there. A node fed by another journal, or by a journal tail the engine lost in a power
/// failure, would otherwise skip the source's events up to its applied sequence for good.
async fn check_identities(
    replicator: &mut Replicator,
    source: &mut Source,
    stored: Vec<(usize, Option<String>)>,
    options: &ReplicateOptions,
    patience: Duration,
) -> anyhow::Result<()> {
    for (i, stored) in stored {
        let node = &mut replicator.nodes[i];
        let seq = node.applied_seq;
        if seq == 0 {
            continue;
        }
        let Some(stored) = stored else {
            tracing::warn!(node = %node.address, seq, "node has no {APPLIED_RECORD_KEY} (written by an older replicator): its journal identity cannot be checked; it is stored with the next batch");
            continue;
        };
        let ours = record_at_patiently(source, seq, patience)
            .await
            .with_context(|| format!("reading the source's record at sequence {seq}"))?;
        let problem = match RecordId::parse(&stored) {
            // Unreadable: it cannot be checked, so it is a mismatch (`--rebuild` repairs it).
            Err(e) => format!(
                "Redis node {} has applied up to sequence {seq}, but its {APPLIED_RECORD_KEY} {stored:?} is unreadable ({e:#})",
                node.address
            ),
            Ok(theirs) => match ours {
                Some((ours, true)) if ours == theirs => continue,
                Some((ours, ends)) => format!(
                    "Redis node {} has applied up to sequence {seq}, recorded as {theirs}, but the source's record there is {ours}{}: the node holds data from another journal, or from a tail this journal lost",
                    node.address,
                    if ends {
                        ""
                    } else {
                        " (which does not even end there)"
                    }
                ),
                None => format!(
                    "Redis node {} has applied up to sequence {seq} (record {theirs}), but the source {} does not reach it: wrong source, or a journal that lost its tail",
                    node.address, options.source
                ),
            },
        };
        if !options.rebuild {
            bail!(
                "{problem}; rerun with --rebuild to clear that node and replay it from sequence 1"
            );
        }
        tracing::warn!("{problem}; rebuilding it (--rebuild)");
        node.needs_resync = true;
        node.know_applied(0);
        if let Some(conn) = node.conn.as_mut() {
            redis::cmd("SET")
                .arg(MAP_VERSION_KEY)
                .arg("resync")
                .query_async::<()>(conn)
                .await
                .with_context(|| format!("invalidating Redis node {}", node.address))?;
        }
    }
    Ok(())
}

/// The catch-up floor (`Replicator::floor`): the highest applied sequence among the nodes that
/// follow the map whose identities were checked (`verified`) and those that do not but hold
/// records of this source (identity checked here; a node fed by another journal is rebuilt
/// from scratch and sets no floor).
async fn catch_up_floor(
    replicator: &Replicator,
    verified: &[usize],
    source: &mut Source,
    behind_map: Vec<(String, u64, Option<String>)>,
    patience: Duration,
) -> anyhow::Result<u64> {
    let mut floor = verified
        .iter()
        .map(|&i| &replicator.nodes[i])
        .filter(|n| !n.needs_resync)
        .map(|n| n.applied_seq)
        .max()
        .unwrap_or(0);
    for (address, applied, record) in behind_map {
        if applied <= floor {
            continue;
        }
        let theirs = record.as_deref().and_then(|r| RecordId::parse(r).ok());
        let ours = record_at_patiently(source, applied, patience)
            .await
            .with_context(|| format!("reading the source's record at sequence {applied}"))?;
        match (theirs, ours) {
            (Some(theirs), Some((ours, true))) if theirs == ours => floor = applied,
            _ => {
                tracing::info!(node = %address, applied, "node's record is not this source's: it sets no catch-up floor")
            }
        }
    }
    Ok(floor)
}

/// Nodes that could not be read at start-up, once they answer: probed and compared with the
/// source as start-up does with the others, before anything is written there. One that follows
/// the map with this source's record at its applied sequence continues from there (it may be
/// ahead of the others); one that does not is invalidated (`resync`) and rebuilt, not before
/// the replicator has read as far as it had applied (the catch-up floor rises to it). Rebuilding
/// it at once, at the other nodes' sequence, would show balances older than it already showed,
/// under the same map version.
async fn probe_late_nodes(
    replicator: &mut Replicator,
    source: &mut Source,
    options: &ReplicateOptions,
) -> anyhow::Result<()> {
    let version = replicator.version();
    let copy_from = replicator.copy_from;
    for i in 0..replicator.nodes.len() {
        let node = &mut replicator.nodes[i];
        if !node.unprobed {
            continue;
        }
        // The connect and probe run as a task, looked at again on the next pass: one that
        // waited here for a node that does not answer (up to its connect and response
        // timeouts) stopped every read and write meanwhile.
        let probed = match &node.probe {
            None => {
                if node.retry_at.is_some_and(|at| Instant::now() < at) {
                    continue;
                }
                let address = node.address.clone();
                let existing = node.conn.take();
                node.probe = Some(tokio::spawn(async move {
                    let mut conn = match existing {
                        Some(conn) => conn,
                        None => connect(&address).await?,
                    };
                    let state = probe_record(&mut conn).await?;
                    Ok((conn, state))
                }));
                continue;
            }
            Some(task) if !task.is_finished() => continue,
            Some(_) => match node.probe.take() {
                Some(task) => task.await,
                None => continue,
            },
        };
        let (conn, (applied, v, record)) = match probed {
            Ok(Ok(probed)) => probed,
            Ok(Err(e)) => {
                node.mark_down(&e);
                continue;
            }
            Err(e) => {
                node.mark_down(&anyhow::Error::new(e).context("probing the node"));
                continue;
            }
        };
        node.mark_up();
        let conn = node.conn.insert(conn);
        // A node behind where the replicator's copy starts (a snapshot taken while it was
        // down) would miss the changes between the two, which were never marked to be
        // written: rebuilt, like one that does not follow the map.
        if v.as_deref() == Some(version.as_str()) && applied >= copy_from {
            tracing::info!(node = %node.address, applied, "node that could not be read at start-up answers; it follows the map");
            node.unprobed = false;
            node.know_applied(applied);
            node.needs_resync = false;
            let verified = record.is_some();
            // One try: an engine URL that is away now leaves the node to a later pass, while
            // the loop goes on writing to the others (waiting here held them all).
            let checked = check_identities(
                replicator,
                source,
                vec![(i, record)],
                options,
                Duration::ZERO,
            )
            .await;
            if let Err(e) = checked {
                return_to_unprobed(&mut replicator.nodes[i], e)?;
                continue;
            }
            if verified && !replicator.nodes[i].needs_resync {
                replicator.floor = replicator.floor.max(applied);
            }
        } else {
            tracing::info!(node = %node.address, applied, version = ?v, expected = %version, copy_from, "node that could not be read at start-up does not follow the current map, or is behind the snapshot the replicator started from; it will be rebuilt");
            let partitions = replicator.zk.1.partitions();
            match invalidate(conn, &node.address, replicator.map.version, &partitions).await {
                Ok(()) => {}
                Err(Invalidate::NewerMap(error)) => return Err(error),
                Err(Invalidate::Down(e)) => {
                    node.mark_down(&e);
                    continue;
                }
            }
            node.unprobed = false;
            let behind = vec![(node.address.clone(), applied, record)];
            let floor = match catch_up_floor(replicator, &[], source, behind, Duration::ZERO).await
            {
                Ok(floor) => floor,
                Err(e) => {
                    return_to_unprobed(&mut replicator.nodes[i], e)?;
                    continue;
                }
            };
            replicator.floor = replicator.floor.max(floor);
        }
    }
    Ok(())
}

/// After a late node's check against the source failed: an engine URL that is away
/// (`Unavailable`) puts the node back among those to probe, after its backoff; any other error
/// stops the run, as at start-up.
fn return_to_unprobed(node: &mut Node, error: anyhow::Error) -> anyhow::Result<()> {
    if !error.is::<crate::replicate::source::Unavailable>() {
        return Err(error);
    }
    node.unprobed = true;
    node.needs_resync = true;
    node.know_applied(0);
    node.mark_down(&error.context("checking the node against the source; probed again later"));
    Ok(())
}

/// Runs the replicator until the process stops (or, with `once`, until caught up).
pub async fn run(options: &ReplicateOptions) -> anyhow::Result<Report> {
    let layout = Layout::new(&options.zk_root)?;
    // The source is checked first: before any node is touched (a replicator that cannot read
    // it must leave the nodes as they are), and before waiting for ZooKeeper (a mistyped URL
    // is an error at once).
    let mut source = Source::open(&options.source)?;
    let client = zk::connect_patiently(&options.zk, Duration::from_secs(30)).await?;
    let map = zk::get_partition_map(&client, &layout)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no partition map at {}: run `wallet cluster init` first",
                layout.partitions()
            )
        })?;
    // Nodes removed from the map but maybe not emptied yet (a replicator stopped before it did).
    let retiring = zk::get_retiring(&client, &layout).await?;
    drop(client);
    check_distinct_servers(&map.nodes).await?;
    let (sender, mut map_changes) = watch::channel(map.clone());
    tokio::spawn(zk::watch_partition_map(
        options.zk.clone(),
        layout.clone(),
        sender,
    ));

    let retired: Vec<Node> = retiring
        .iter()
        .filter(|a| !map.nodes.contains(a))
        .map(|a| Node::new(a))
        .collect();
    if !retired.is_empty() {
        tracing::info!(nodes = ?retiring, "nodes removed from the map are still to be emptied");
    }
    let mut replicator = Replicator {
        map,
        nodes: Vec::new(),
        dir: Directory::default(),
        route: Vec::new(),
        marked: Vec::new(),
        retired,
        zk: (options.zk.clone(), layout.clone()),
        inflight: tokio::task::JoinSet::new(),
        lag_max: Duration::ZERO,
        last_read_started: None,
        copy_from: 0,
        dir_from_nodes: false,
        floor: 0,
        stopped_by: None,
    };
    let version = replicator.version();
    // Per node that follows the map: its stored record identity, checked against the source.
    let mut stored_records = Vec::new();
    // Per node that does not: where it was and its identity, for the catch-up floor.
    let mut behind_map = Vec::new();
    for address in replicator.map.nodes.clone() {
        let mut node = Node::new(&address);
        if node.ensure_connected().await
            && let Some(conn) = node.conn.as_mut()
        {
            // A node that does not answer within `SLOW_WRITE` is left to `probe_late_nodes`,
            // which does not hold back the others (start-up waited out the response timeout).
            let probed = tokio::time::timeout(SLOW_WRITE, probe_record(conn))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no answer to the start-up probe",
                    )))
                });
            match probed {
                Ok((applied, Some(v), record)) if v == version => {
                    node.know_applied(applied);
                    node.needs_resync = false;
                    stored_records.push((replicator.nodes.len(), record));
                }
                // Stamped by a newer map than this one (map versions only go up): this
                // replicator's map is stale (another --zk-root naming the same servers, or a
                // map recreated without asking the nodes). Pulling the node back to it would
                // take it from the readers of the newer map.
                Ok((_, Some(v), _)) if newer_map(Some(&v), replicator.map.version).is_some() => {
                    return Err(newer_map_error(
                        &address,
                        &v,
                        replicator.map.version,
                        &layout.partitions(),
                    ));
                }
                Ok((applied, v, record)) => {
                    tracing::info!(node = %address, applied, version = ?v, expected = %version, "node does not follow the current map; it will be rebuilt");
                    behind_map.push((address.clone(), applied, record));
                    // Readers must stop trusting it now, before anything else moves.
                    let ours = replicator.map.version;
                    match invalidate(conn, &address, ours, &layout.partitions()).await {
                        Ok(()) => {}
                        Err(Invalidate::NewerMap(error)) => return Err(error),
                        Err(Invalidate::Down(e)) => node.mark_down(&e),
                    }
                }
                Err(e) => {
                    node.unprobed = true;
                    node.mark_down(&e.into());
                }
            }
        } else {
            node.unprobed = true;
        }
        replicator.nodes.push(node);
    }
    // Nodes following the map whose record identity is checked below (one without a stored
    // identity, written by an older replicator, is not: it sets no catch-up floor).
    let verified: Vec<usize> = stored_records
        .iter()
        .filter(|(_, record)| record.is_some())
        .map(|(i, _)| *i)
        .collect();
    // At start-up nothing is written yet: an engine URL that is away is waited for.
    let patience = crate::replicate::source::source_outage_limit(options.once);
    // The identity each node stores of its last record, before `check_identities` consumes them:
    // an engine-URL replicator resumed from the nodes confirms the stored one with the engine.
    let stored_identities: Vec<(usize, Option<RecordId>)> = stored_records
        .iter()
        .map(|(i, r)| (*i, r.as_deref().and_then(|r| RecordId::parse(r).ok())))
        .collect();
    check_identities(
        &mut replicator,
        &mut source,
        stored_records,
        options,
        patience,
    )
    .await?;
    replicator.floor =
        catch_up_floor(&replicator, &verified, &mut source, behind_map, patience).await?;
    if replicator.floor > 0 {
        tracing::info!(
            floor = replicator.floor,
            "no node is rebuilt and no map change carried out before the replicator has read this far"
        );
    }
    let resume = replicator
        .nodes
        .iter()
        .filter(|n| !n.needs_resync)
        .map(|n| n.applied_seq)
        .min()
        .unwrap_or(0);
    // The replicator's copy of every balance must be complete before the first write: from a
    // snapshot of the engine at or before `resume` (the journal segments before it are not
    // read), else from sequence 1. When no node follows the map (it changed while no
    // replicator ran, or the nodes were emptied), every node is rebuilt whole once the
    // replicator has read as far as `floor`: a snapshot at or before the floor will do, where
    // `resume` (0) would mean replaying the whole journal while every node answers `resync`.
    // (A node that could not be read may follow the map from below the floor: it keeps
    // `resume`, as before, so that it is continued rather than rebuilt when it answers.)
    let snapshot_bound = if replicator
        .nodes
        .iter()
        .all(|n| n.needs_resync && !n.unprobed)
    {
        replicator.floor
    } else {
        resume
    };
    if let Some(ledger) = source.start_from_snapshot(snapshot_bound)? {
        let dir = Directory::from_ledger(&ledger)?;
        replicator.route = (0..dir.len() as u32)
            .map(|a| route_of(&replicator.map, dir.name(a)))
            .collect();
        replicator.marked = vec![false; dir.len()];
        replicator.dir = dir;
        let seq = replicator.dir.seq;
        replicator.copy_from = seq;
        if seq > 0 {
            replicator.dir.record = record_at_patiently(&mut source, seq, patience)
                .await?
                .map(|(id, _)| id);
        }
        tracing::info!(
            snapshot_seq = seq,
            accounts = replicator.dir.len(),
            "starting from the engine's snapshot; the journal before it is not read"
        );
    } else if resume > 0
        && matches!(source, Source::Http(_))
        && replicator.nodes.iter().all(|n| !n.needs_resync)
    {
        // An engine URL has no snapshot, but every node follows the map: together they hold
        // every balance, each as of its own applied sequence, all at or after `resume`.
        replicator.directory_from_nodes(resume).await?;
        // What the nodes at `resume` store (checked against the engine above): the engine is
        // asked again below, and one swapped meanwhile (reading the nodes takes a while) must
        // not supply the record it is confirmed by. A node written by an older replicator
        // stores none: then the engine's record there.
        let stored = stored_identities.iter().find_map(|(i, record)| {
            (replicator.nodes[*i].applied_seq == resume && !replicator.nodes[*i].needs_resync)
                .then_some(*record)
                .flatten()
        });
        replicator.dir.record = match stored {
            Some(record) => Some(record),
            None => record_at_patiently(&mut source, resume, patience)
                .await?
                .map(|(id, _)| id),
        };
        source.resume_after(resume, replicator.dir.record)?;
        tracing::info!(
            from_nodes_seq = resume,
            accounts = replicator.dir.len(),
            "starting from the balances on the Redis nodes; the event stream is read from after it"
        );
    }
    tracing::info!(resume_after = resume, from_seq = replicator.dir.seq + 1, nodes = replicator.nodes.len(), source = %options.source, "replicator starting");

    let started = Instant::now();
    let mut items = Vec::with_capacity(options.batch_events);
    let mut last_status = Instant::now();
    let mut source_retry =
        SourceRetry::new(crate::replicate::source::source_outage_limit(options.once));
    let mut previous_read_started = Instant::now();
    // With `once`: since when the source has had nothing more while some node is not caught up.
    let mut once_waiting_since: Option<Instant> = None;
    // Since when the source has had nothing more while the replicator is still short of what
    // the nodes have applied (`resume`).
    let mut short_since: Option<Instant> = None;
    // Test hook: the first read yields nothing, as a read racing the rewrite of the durable
    // watermark does.
    let mut empty_first_read = failpoint_armed("redis-empty-first-read");
    let mut last_idle_check = Instant::now();
    loop {
        if let Some(error) = replicator.stopped_by.take() {
            return Err(error);
        }
        if replicator.dir.seq >= replicator.floor && map_changes.has_changed().unwrap_or(false) {
            let new_map = map_changes.borrow_and_update().clone();
            if new_map != replicator.map {
                match check_distinct_servers(&new_map.nodes).await {
                    Ok(()) => replicator.migrate(new_map).await,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), version = new_map.version, "refusing the new partition map; keeping the current one")
                    }
                }
            }
        }
        items.clear();
        let read_started = Instant::now();
        // While rebuilding the directory up to what the nodes already hold, do not wait.
        let wait = if options.once || replicator.dir.seq < resume {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(200)
        };
        let fetched = if std::mem::take(&mut empty_first_read) {
            Ok(())
        } else {
            source.fetch(options.batch_events, wait, &mut items).await
        };
        match fetched {
            Ok(()) => source_retry.succeeded(),
            Err(e) => {
                if matches!(source, Source::Journal(_)) {
                    return Err(e.context("reading the source"));
                }
                let pause = source_retry
                    .failed(e)
                    .map_err(|e| e.context("reading the source"))?;
                // The source's patience for reads that stay empty starts again after an outage.
                short_since = None;
                // What was read before the engine went away still goes out: a node that
                // comes back while the engine is down gets it now, not after the outage.
                replicator.complete_writes(Wait::Fresh).await;
                replicator.start_writes().await;
                if let Some(metrics) = &options.metrics {
                    replicator.publish(metrics);
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        }
        // The events just read appeared after the previous read that reached the source's
        // end started: a read that stopped at its limit (catching up) did not reach it, and
        // what the next one finds may have been there long before (counting from that read
        // showed a catch-up of many batches as one batch's lag).
        replicator.last_read_started = Some(previous_read_started);
        if items.len() < source.read_limit(options.batch_events) {
            previous_read_started = read_started;
        }
        replicator.ingest(&items)?;
        if !items.is_empty() {
            replicator.dir.record = source.last_record();
            once_waiting_since = None;
            short_since = None;
        }
        if replicator.nodes.iter().any(|n| n.unprobed) {
            probe_late_nodes(&mut replicator, &mut source, options).await?;
        }
        // Pipelined: this batch's writes run while the next batch is read. A node whose write
        // takes longer than `SLOW_WRITE` does not hold back the others.
        replicator.complete_writes(Wait::Fresh).await;
        replicator.start_writes().await;
        if !replicator.retired.is_empty() {
            replicator.clean_retired().await;
        }
        if let Some(metrics) = &options.metrics {
            replicator.publish(metrics);
        }
        if last_status.elapsed() > Duration::from_secs(5) {
            replicator.log_status(source.next_seq() - 1);
            last_status = Instant::now();
        }
        if items.is_empty() {
            if replicator.dir.seq < resume {
                // One empty read is not the end of the source (a read of the durable
                // watermark racing its rewrite yields nothing for a moment, as does an HTTP
                // read that had to reconnect): only one that stays empty.
                let since = *short_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SHORT_SOURCE_PATIENCE {
                    bail!(
                        "the source ends at sequence {} but the Redis nodes have applied up to {resume}: wrong source, or a journal that lost its tail; flush the nodes to start over",
                        replicator.dir.seq
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            if options.once {
                replicator.flush().await;
                if replicator.caught_up() {
                    break;
                }
                let waiting = *once_waiting_since.get_or_insert_with(Instant::now);
                if waiting.elapsed() > options.once_wait {
                    let behind: Vec<String> = replicator
                        .nodes
                        .iter()
                        .filter(|n| !n.is_up_and_current() || n.applied_seq < replicator.dir.seq)
                        .map(|n| format!("{} (applied {})", n.address, n.applied_seq))
                        .collect();
                    bail!(
                        "--once: the source ends at sequence {}, but after waiting {:?} these Redis nodes are still down or behind: {}",
                        replicator.dir.seq,
                        options.once_wait,
                        behind.join(", ")
                    );
                }
            }
            if replicator.nodes.iter().any(|n| n.retry_at.is_some()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !options.once
                && !options.idle_check.is_zero()
                && last_idle_check.elapsed() >= options.idle_check
            {
                replicator.check_idle_nodes().await;
                last_idle_check = Instant::now();
            }
        }
    }
    if let Some(error) = replicator.stopped_by.take() {
        return Err(error);
    }
    Ok(Report {
        first_seq: resume + 1,
        last_seq: replicator.dir.seq,
        // What the nodes did not hold before (events read to rebuild the replicator's own
        // copy of the balances are not counted).
        events: replicator.dir.seq.saturating_sub(resume),
        elapsed: started.elapsed(),
        nodes: replicator.nodes.len(),
        lag_max: replicator.lag_max.max(replicator.lag()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.source_seq.store(10, Ordering::Relaxed);
        metrics.min_applied_seq.store(4, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("\nwallet_redis_lag_events 6\n"), "{text}");
        assert!(
            text.lines()
                .all(|l| l.starts_with("# TYPE wallet_redis_") || l.starts_with("wallet_redis_")),
            "{text}"
        );
    }

    #[test]
    fn directory_keeps_keys_and_sorted_balances() {
        let mut dir = Directory::default();
        let usd = Currency::new("USD").expect("usd");
        let eur = Currency::new("EUR").expect("eur");
        assert_eq!(dir.open(Some(0), "alice").ok(), Some(0));
        assert!(
            dir.open(Some(5), "bob").is_err(),
            "an index out of order is refused"
        );
        assert!(
            dir.open(None, "alice").is_err(),
            "a name opened twice is refused"
        );
        dir.set(0, usd, 5);
        dir.set(0, eur, 7);
        dir.set(0, usd, 9);
        assert_eq!(dir.key(0), "wallet:balance:alice");
        assert_eq!(dir.name(0), "alice");
        assert_eq!(dir.balances[0], vec![(eur, 7), (usd, 9)]);
        assert_eq!(dir.resolve(&AccountRef::Name("alice".into())).ok(), Some(0));
        assert!(dir.resolve(&AccountRef::Index(1)).is_err());
    }
}
