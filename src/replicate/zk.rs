//! The cluster layout in ZooKeeper (see `docs/zookeeper-layout.md`).
//!
//! Under a root (default `/wallet`, `--zk-root`):
//!
//! | path | kind | data |
//! |---|---|---|
//! | `{root}/redis/partitions` | persistent | `{"version": n, "nodes": ["host:port", ...]}` |
//! | `{root}/redis/retiring` | persistent | `{"nodes": ["host:port", ...]}`: removed from the map, not yet emptied |
//! | `{root}/sql/shards` | persistent | `{"version": n, "shards": ["postgres://...", ...]}` |
//! | `{root}/engine/leader` | ephemeral | the serving engine's address |
//! | `{root}/api/{address}` | ephemeral | one per running `serve` front end |
//!
//! Every change of a map bumps its `version` by one, written with ZooKeeper's conditional
//! `set_data` so two concurrent editors cannot both win.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zookeeper_client as zk;

pub const DEFAULT_ROOT: &str = "/wallet";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How long a leader's writes go on after its node was last confirmed as its session's: half
/// the session timeout. The server expires a session `SESSION_TIMEOUT` after it last heard from
/// the client, and another engine may then claim the node; the client learns of it only later
/// (it gives up on the session after 7/5 of the timeout), and a paused process learns nothing
/// until it runs. Writes are refused once the lease runs out, so an engine cut off from
/// ZooKeeper, or paused, stops taking writes before anyone else can lead. A server that
/// negotiates a shorter session timeout (its `maxSessionTimeout`) shortens the lease to half of
/// that (`lease_for`).
pub const LEADER_LEASE: Duration = Duration::from_secs(3);

/// How often a leader confirms its node (and so renews its lease), at most: a quarter of a
/// shorter lease.
const LEASE_RENEW_EVERY: Duration = Duration::from_millis(500);

/// The lease for a session whose timeout the server negotiated as `session_timeout`: half of
/// it, and no more than `LEADER_LEASE`.
pub fn lease_for(session_timeout: Duration) -> Duration {
    LEADER_LEASE.min(session_timeout / 2)
}

/// A leader's lease on its writes (`lease_for` the session): the time its node was last
/// confirmed as its session's, measured from when that confirmation was asked for (the server
/// heard from the session no earlier, so the session cannot expire before that plus its
/// timeout).
#[derive(Debug)]
pub struct Lease {
    base: std::time::Instant,
    /// Milliseconds after `base`, plus one, of the last confirmation; 0: never confirmed.
    confirmed: std::sync::atomic::AtomicU64,
    /// The lease's length in milliseconds (`lease_for` the current session).
    length_ms: std::sync::atomic::AtomicU64,
    /// A lapse was logged and its end not yet (kept across renewers, so a new session's does
    /// not log it again).
    lapse_logged: std::sync::atomic::AtomicBool,
}

impl Default for Lease {
    fn default() -> Lease {
        Lease {
            base: std::time::Instant::now(),
            confirmed: std::sync::atomic::AtomicU64::new(0),
            length_ms: std::sync::atomic::AtomicU64::new(LEADER_LEASE.as_millis() as u64),
            lapse_logged: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Lease {
    fn millis(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX - 1)
            + 1
    }

    /// Fits the lease to a session whose negotiated timeout is `session_timeout` (before any
    /// confirmation over that session renews it); returns the lease's length.
    pub fn fit_to_session(&self, session_timeout: Duration) -> Duration {
        let length = lease_for(session_timeout);
        self.length_ms.store(
            u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
        length
    }

    /// The node was confirmed by an answer to a request sent at `asked`.
    pub fn renew_from(&self, asked: std::time::Instant) {
        self.confirmed
            .fetch_max(self.millis(asked), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether writes may be taken now: the last confirmation is younger than the lease.
    pub fn holds(&self) -> bool {
        let confirmed = self.confirmed.load(std::sync::atomic::Ordering::SeqCst);
        confirmed != 0
            && self
                .millis(std::time::Instant::now())
                .saturating_sub(confirmed)
                < self.length_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The Redis partition map: the partition count is `nodes.len()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    pub version: u64,
    pub nodes: Vec<String>,
}

impl PartitionMap {
    /// The node index and address that `account_id` maps to.
    pub fn route(&self, account_id: &str) -> (usize, &str) {
        let partition = super::hash::partition_of(account_id, self.nodes.len());
        (partition, &self.nodes[partition])
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.nodes.is_empty() {
            bail!("a partition map needs at least one node");
        }
        if self.nodes.len() > u16::MAX as usize {
            bail!("at most {} nodes", u16::MAX);
        }
        let mut sorted = self.nodes.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.nodes.len() {
            bail!("a node address appears twice in {:?}", self.nodes);
        }
        for node in &self.nodes {
            check_host_port(node)?;
        }
        Ok(())
    }
}

/// Checks a node list as a map of it would be checked when written (addresses, repeats), so
/// that a bad list is refused, naming what is wrong, before any node is contacted.
pub fn check_node_list(nodes: &[String]) -> anyhow::Result<()> {
    PartitionMap {
        version: 0,
        nodes: nodes.to_vec(),
    }
    .check()
}

/// A Redis node address must be `host:port` (`[v6]:port` for an IPv6 literal) with a port
/// from 1 to 65535: a map naming anything else would only fail later, in the replicator (which
/// builds `redis://{node}/` from it, so no character may change that URL's meaning).
fn check_host_port(node: &str) -> anyhow::Result<()> {
    let bad = |why: &str| anyhow::anyhow!("bad node address {node:?}: {why} (expected host:port)");
    let (host, port) = node.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) || host == "[]" {
        return Err(bad("no host"));
    }
    if let Some(c) = host
        .chars()
        .find(|c| matches!(c, '/' | '@' | '?' | '#' | '\\' | '%'))
    {
        return Err(bad(&format!("{c:?} is not allowed in a host")));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(bad("an IPv6 address must be in brackets, as [::1]:6379"));
    }
    if !bracketed && (host.contains('[') || host.contains(']')) {
        return Err(bad("brackets go around a whole IPv6 address"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("the port must be a number from 1 to 65535")),
        Ok(_) => Ok(()),
    }
}

/// The SQL shard list, for the SQL replicator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlShards {
    pub version: u64,
    pub shards: Vec<String>,
}

/// Paths of the layout under one root.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: String,
}

impl Layout {
    pub fn new(given: &str) -> anyhow::Result<Layout> {
        let root = given.trim_end_matches('/');
        if !root.starts_with('/') || root.len() < 2 {
            bail!("--zk-root must be an absolute path below / such as /wallet, not {given:?}");
        }
        // Refused here, before anything starts (the server refused them only when it first
        // wrote there, with its data directory locked and its port bound).
        if root
            .split('/')
            .skip(1)
            .any(|part| matches!(part, "" | "." | ".."))
        {
            bail!("--zk-root {given:?}: a ZooKeeper path has no empty, `.` or `..` parts");
        }
        if root == "/zookeeper" || root.starts_with("/zookeeper/") {
            bail!("--zk-root {given:?}: /zookeeper is ZooKeeper's own (quotas, configuration)");
        }
        Ok(Layout {
            root: root.to_string(),
        })
    }
    pub fn partitions(&self) -> String {
        format!("{}/redis/partitions", self.root)
    }
    /// Nodes removed from the partition map whose keys the replicator has not deleted yet.
    pub fn redis_retiring(&self) -> String {
        format!("{}/redis/retiring", self.root)
    }
    pub fn sql_shards(&self) -> String {
        format!("{}/sql/shards", self.root)
    }
    pub fn engine_leader(&self) -> String {
        format!("{}/engine/leader", self.root)
    }
    pub fn api_dir(&self) -> String {
        format!("{}/api", self.root)
    }
}

/// Refuses a ZooKeeper address that no server could ever answer at, read as the client reads
/// it (`[tcp://|tcp+tls://]host[:port],...[/chroot]`, the chroot after the last server, an
/// IPv6 host in brackets, no port meaning 2181), so that it is named at once instead of being
/// retried as "unreachable".
pub fn check_address(address: &str) -> anyhow::Result<()> {
    let bad = |why: String| anyhow::anyhow!("--zk (or WALLET_ZK) {address:?}: {why}");
    let rest = address
        .strip_prefix("tcp://")
        .or_else(|| address.strip_prefix("tcp+tls://"))
        .unwrap_or(address);
    let servers = rest.split_once('/').map_or(rest, |(servers, chroot)| {
        // A chroot in the middle of the list (`h1/x,h2`): the client would look up "h1/x".
        if chroot.contains(',') { "/" } else { servers }
    });
    if servers == "/" {
        return Err(bad(
            "a chroot goes after the last server (host:port,host:port/chroot)".into(),
        ));
    }
    if servers.is_empty() {
        return Err(bad("names no server (host:port)".into()));
    }
    for (place, server) in servers.split(',').enumerate() {
        let (host, port) = if let Some(inside) = server.strip_prefix('[') {
            let Some((ip, after)) = inside.split_once(']') else {
                return Err(bad(format!("server {place} ({server:?}): an unclosed [")));
            };
            match after.strip_prefix(':') {
                Some(port) => (ip, port),
                None if after.is_empty() => (ip, ""),
                None => {
                    return Err(bad(format!(
                        "server {place} ({server:?}): a port goes after ]:"
                    )));
                }
            }
        } else {
            match server.split_once(':') {
                Some((_, port)) if port.contains(':') => {
                    return Err(bad(format!(
                        "server {place} ({server:?}): an IPv6 address must be in brackets, as [::1]:2181"
                    )));
                }
                Some((host, port)) => (host, port),
                None => (server, ""),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad(format!("server {place} ({server:?}) names no host")));
        }
        if !port.is_empty() && !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(bad(format!(
                "server {place} ({server:?}): {port:?} is not a port number (1-65535)"
            )));
        }
    }
    Ok(())
}

/// Connects to ZooKeeper at `address` (`host:port[,host:port...]`), failing after a few seconds
/// instead of waiting forever when no server answers.
pub async fn connect(address: &str) -> anyhow::Result<zk::Client> {
    check_address(address)?;
    let connecting = zk::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .with_fail_eagerly()
        .connect(address);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "ZooKeeper at {address} is unreachable: {e} (start it with tools/services start)"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "ZooKeeper at {address} did not answer within {CONNECT_TIMEOUT:?} (start it with tools/services start)"
        )),
    }
}

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

/// Creates `path` and its parents if missing.
async fn ensure_dir(client: &zk::Client, path: &str) -> anyhow::Result<()> {
    client
        .mkdir(path, &persistent())
        .await
        .with_context(|| format!("creating {path}"))
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    client: &zk::Client,
    path: &str,
) -> anyhow::Result<Option<(T, i32)>> {
    match client.get_data(path).await {
        Ok((data, stat)) => Ok(Some((parse_json(path, &data)?, stat.version))),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {path}: {e}")),
    }
}

/// A node's JSON, or an error naming the node and where its JSON went wrong, without the
/// node's strings: serde quotes a value of the wrong type whole, and the SQL shard list's
/// values are URLs with passwords (`"shards": "postgres://u:secret@..."` printed the secret).
fn parse_json<T: serde::de::DeserializeOwned>(path: &str, data: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(data).map_err(|e| {
        let message = e.to_string();
        let shown = match (message.find('"'), message.rfind('"')) {
            (Some(first), Some(last)) if first < last => {
                format!("{}\"...\"{}", &message[..first], &message[last + 1..])
            }
            _ => message,
        };
        anyhow::anyhow!("{path} does not hold the expected JSON: {shown}")
    })
}

/// Writes `value` to `path`: creates it when `expected` is `None`, else replaces the version
/// `expected` of the node (failing if someone changed it in between).
async fn write_json<T: Serialize>(
    client: &zk::Client,
    path: &str,
    value: &T,
    expected: Option<i32>,
) -> anyhow::Result<()> {
    let data = serde_json::to_vec(value)?;
    match expected {
        None => {
            ensure_dir(client, parent(path)).await?;
            client
                .create(path, &data, &persistent())
                .await
                .with_context(|| format!("creating {path}"))?;
        }
        Some(version) => {
            client
                .set_data(path, &data, Some(version))
                .await
                .map_err(|e| match e {
                    zk::Error::BadVersion => anyhow::anyhow!("{path} changed concurrently; retry"),
                    e => anyhow::anyhow!("writing {path}: {e}"),
                })?;
        }
    }
    Ok(())
}

/// The current partition map, or `None` when the cluster was never initialised.
pub async fn get_partition_map(
    client: &zk::Client,
    layout: &Layout,
) -> anyhow::Result<Option<PartitionMap>> {
    let map: Option<(PartitionMap, i32)> = read_json(client, &layout.partitions()).await?;
    match map {
        Some((map, _)) => {
            map.check()
                .with_context(|| format!("{} is invalid", layout.partitions()))?;
            Ok(Some(map))
        }
        None => Ok(None),
    }
}

/// The nodes still to be emptied after leaving the partition map (`{root}/redis/retiring`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retiring {
    pub nodes: Vec<String>,
}

/// The addresses removed from the partition map whose keys are not known to be deleted yet.
pub async fn get_retiring(client: &zk::Client, layout: &Layout) -> anyhow::Result<Vec<String>> {
    let current: Option<(Retiring, i32)> = read_json(client, &layout.redis_retiring()).await?;
    Ok(current.map(|(r, _)| r.nodes).unwrap_or_default())
}

/// Adds `add` to the retiring list and takes `remove` off it (conditional writes, retried when
/// another writer changed the list in between).
pub async fn update_retiring(
    client: &zk::Client,
    layout: &Layout,
    add: &[String],
    remove: &[String],
) -> anyhow::Result<()> {
    let path = layout.redis_retiring();
    let mut attempts = 0;
    loop {
        let current: Option<(Retiring, i32)> = read_json(client, &path).await?;
        let mut nodes = current
            .as_ref()
            .map(|(r, _)| r.nodes.clone())
            .unwrap_or_default();
        for address in add {
            if !nodes.contains(address) {
                nodes.push(address.clone());
            }
        }
        nodes.retain(|a| !remove.contains(a));
        if current.as_ref().is_some_and(|(r, _)| r.nodes == nodes)
            || (current.is_none() && nodes.is_empty())
        {
            return Ok(());
        }
        let value = Retiring { nodes };
        match write_json(client, &path, &value, current.map(|(_, v)| v)).await {
            Ok(()) => return Ok(()),
            Err(e) if attempts < 5 => {
                attempts += 1;
                tracing::debug!(error = %format!("{e:#}"), "retrying the update of {path}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// The version after `current` (1 for a znode not written yet).
fn next_version(path: &str, current: Option<u64>) -> anyhow::Result<u64> {
    match current {
        Some(v) => v
            .checked_add(1)
            .ok_or_else(|| anyhow::anyhow!("{path}: version {v} cannot grow any more")),
        None => Ok(1),
    }
}

/// Waits `backoff`, then doubles it up to 5 s (retries against ZooKeeper).
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Replaces the Redis node list, bumping the map version. Creates the map (version 1) if absent.
/// Nodes of the old map that are not in the new one are first added to the retiring list
/// (`update_retiring`), so that a replicator that restarts before emptying them still does.
///
/// The new version is at least `at_least`: one more than any version the nodes show
/// (`redis::next_map_version`).
pub async fn set_redis_nodes(
    client: &zk::Client,
    layout: &Layout,
    nodes: &[String],
    at_least: u64,
) -> anyhow::Result<PartitionMap> {
    let path = layout.partitions();
    let current: Option<(PartitionMap, i32)> = read_json(client, &path).await?;
    let version = next_version(&path, current.as_ref().map(|(m, _)| m.version))?;
    // Versions never go back, even when the map was deleted and created again: nodes still
    // showing a version from before would otherwise be taken as current by readers.
    let map = PartitionMap {
        version: version.max(at_least),
        nodes: nodes.to_vec(),
    };
    map.check()?;
    let removed: Vec<String> = current
        .as_ref()
        .map(|(m, _)| {
            m.nodes
                .iter()
                .filter(|a| !nodes.contains(a))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    // Removed nodes go on the list before the map drops them; nodes the map takes back come off
    // it only once the new map is written (a failed write leaves the old map, under which they
    // may still be out, and still to be emptied).
    update_retiring(client, layout, &removed, &[]).await?;
    write_json(client, &path, &map, current.map(|(_, v)| v)).await?;
    update_retiring(client, layout, &[], nodes).await?;
    Ok(map)
}

/// The SQL shard list, or `None` when never set.
pub async fn get_sql_shards(
    client: &zk::Client,
    layout: &Layout,
) -> anyhow::Result<Option<SqlShards>> {
    Ok(read_json::<SqlShards>(client, &layout.sql_shards())
        .await?
        .map(|(s, _)| s))
}

/// `url` with its password, if it names one, shown as `***` (a URL `scheme://user:pw@host/...`
/// or a key-value string `... password=pw ...`): for printing a shard list. Where the driver
/// reads a password that this text would still show (a `/` in the userinfo, a percent-encoded
/// key, spaces around `=`, a quoted value), only what the driver reads is shown, without it.
pub fn redact_password(url: &str) -> String {
    let shown = redact_text(url);
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return shown;
    };
    match config.get_password() {
        Some(password) if !password.is_empty() && still_shows(&shown, password) => format!(
            "postgres://{}:***@{}/{} (other parameters not shown)",
            config.get_user().unwrap_or(""),
            crate::replicate::sql::schema::server_label(&config),
            config.get_dbname().unwrap_or("")
        ),
        _ => shown,
    }
}

/// Whether `shown` still holds `password`, as it is or percent-encoded.
fn still_shows(shown: &str, password: &[u8]) -> bool {
    let raw = String::from_utf8_lossy(password);
    let encoded: String = password
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    shown.contains(raw.as_ref())
        || shown
            .to_ascii_uppercase()
            .contains(&encoded.to_ascii_uppercase())
        // A value with spaces (quoted, or escaped with `\`) was masked up to its first space
        // only: `password='hunter2 TOPSECRET'` showed as `password=*** TOPSECRET'`.
        || raw.split_whitespace().any(|word| shown.contains(word))
}

/// `redact_password`'s textual part: the common spellings.
fn redact_text(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            return redact_query(&format!("{scheme}://{}:***{}", &rest[..colon], &rest[at..]));
        }
        return redact_query(url);
    }
    url.split(' ')
        .map(|word| match word.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a SQL shard list before it is stored: at least one URL, each one a PostgreSQL URL
/// naming a host and a database (as `replicate sql` needs), none twice. The errors never echo
/// a URL: it may hold a password.
pub fn check_sql_shards(shards: &[String]) -> anyhow::Result<()> {
    if shards.is_empty() {
        bail!("the shard list needs at least one URL");
    }
    if let Some(i) = shards.iter().position(|s| s.trim().is_empty()) {
        bail!(
            "shard {i} of the list is empty (two commas in a row, or one at either end?): a shard list names each shard's URL, separated by single commas"
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        crate::replicate::sql::schema::check_url(i, shard)?;
        if let Some(j) = shards[..i].iter().position(|other| other == shard) {
            bail!("shards {j} and {i} are the same URL: a shard list names each database once");
        }
    }
    Ok(())
}

/// The shard list `shards` with the passwords its URLs hold shown as `***`: for printing.
pub fn redacted(shards: &SqlShards) -> SqlShards {
    SqlShards {
        version: shards.version,
        shards: shards.shards.iter().map(|u| redact_password(u)).collect(),
    }
}

/// A URL's query with the value of any `password` parameter shown as `***`
/// (`postgres://u@h/db?password=pw`, which libpq and the driver both accept).
fn redact_query(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}?{}", query.join("&"))
}

/// Replaces the SQL shard list, bumping its version. Creates it (version 1) if absent.
pub async fn set_sql_shards(
    client: &zk::Client,
    layout: &Layout,
    shards: &[String],
) -> anyhow::Result<SqlShards> {
    check_sql_shards(shards)?;
    let path = layout.sql_shards();
    let current: Option<(SqlShards, i32)> = read_json(client, &path).await?;
    let value = SqlShards {
        version: next_version(&path, current.as_ref().map(|(s, _)| s.version))?,
        shards: shards.to_vec(),
    };
    write_json(client, &path, &value, current.map(|(_, v)| v)).await?;
    Ok(value)
}

/// Creates the layout's directories (idempotent).
pub async fn init_layout(client: &zk::Client, layout: &Layout) -> anyhow::Result<()> {
    for dir in [
        format!("{}/redis", layout.root),
        format!("{}/sql", layout.root),
        format!("{}/engine", layout.root),
        layout.api_dir(),
    ] {
        ensure_dir(client, &dir).await?;
    }
    Ok(())
}

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

/// Who holds `{root}/engine/leader`.
#[derive(Debug, PartialEq, Eq)]
pub enum Leader {
    /// This client's session (the node was created by it, maybe by a retried request).
    Us,
    /// Another session: the address it wrote there.
    Other(String),
}

/// Claims `{root}/engine/leader` with `address` as data. The node is ephemeral: it lives as
/// long as `client`'s session.
pub async fn claim_engine_leader(
    client: &zk::Client,
    layout: &Layout,
    address: &str,
) -> anyhow::Result<Leader> {
    ensure_dir(client, &format!("{}/engine", layout.root)).await?;
    let path = layout.engine_leader();
    for _ in 0..5 {
        match client.create(&path, address.as_bytes(), &ephemeral()).await {
            Ok(_) => return Ok(Leader::Us),
            Err(zk::Error::NodeExists) => match client.get_data(&path).await {
                Ok((data, stat)) if stat.ephemeral_owner == client.session_id().0 => {
                    // Ours, but rewritten by hand: put the address back.
                    if data != address.as_bytes() {
                        client
                            .set_data(&path, address.as_bytes(), Some(stat.version))
                            .await
                            .map_err(|e| anyhow::anyhow!("restoring {path}: {e}"))?;
                    }
                    return Ok(Leader::Us);
                }
                Ok((data, _)) => {
                    return Ok(Leader::Other(String::from_utf8_lossy(&data).into_owned()));
                }
                // Released meanwhile: claim it again.
                Err(zk::Error::NoNode) => continue,
                Err(e) => bail!("reading {path}: {e}"),
            },
            Err(e) => bail!("claiming {path}: {e}"),
        }
    }
    bail!("{path} keeps appearing and disappearing; another engine is starting and stopping")
}

/// Holds the engine leadership that `client` claimed for `address` (and its front-end
/// registration): when the session ends (expired after an outage, closed), or the leader node
/// is deleted or rewritten by hand, claims it again over a new session. Returns only when
/// another engine holds it: the caller must stop serving. A renewer (`renew_lease`) confirms
/// the node every `LEASE_RENEW_EVERY` without waiting for the previous answer, and each answer
/// showing it as this session's renews `lease`: writes are refused once it runs out
/// (ZooKeeper unreachable or slow, the process paused), before the server could expire the
/// session. When the node changes or the session ends, the node may be another engine's:
/// `fenced` is set, and writes are refused, until the node is claimed again (or read as this
/// session's, naming this engine). A node that
/// names this engine's own address but another session is this engine's previous session's
/// (no other process can listen on the address): it is waited out, not taken for another
/// engine's.
pub async fn keep_engine_leadership(
    zk_address: String,
    layout: Layout,
    address: String,
    mut client: zk::Client,
    fenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lease: std::sync::Arc<Lease>,
) -> String {
    use std::sync::atomic::Ordering;
    let path = layout.engine_leader();
    let mut backoff = Duration::from_millis(100);
    let mut length = lease.fit_to_session(client.session_timeout());
    // Renews the lease while this session lives (replaced with the session).
    let renewer = |client: &zk::Client, length: Duration| {
        AbortOnDrop(tokio::spawn(renew_lease(
            client.clone(),
            path.clone(),
            lease.clone(),
            length,
        )))
    };
    let mut _renewing = renewer(&client, length);
    loop {
        // Confirm the node and watch it, then wait until the node or the session changes.
        let mut session = client.state_watcher();
        let asked = std::time::Instant::now();
        // A `sync` first: in an ensemble, the server this session talks to may be behind the
        // leader, and its copy of the node may be older than the session's expiry. Both are
        // sent at once (this client orders requests when they are made, and the server
        // answers a session's requests in order): one round trip.
        let sync = client.sync(&path);
        let get = client.get_and_watch_data(&path);
        let read = tokio::time::timeout(length, async {
            sync.await?;
            get.await
        })
        .await;
        match read {
            Ok(Ok((data, stat, node)))
                if stat.ephemeral_owner == client.session_id().0 && data == address.as_bytes() =>
            {
                lease.renew_from(asked);
                // Also after a claim that failed although the node became this session's (its
                // answer lost, say): the node is ours and names this engine, so writes are
                // served, and the front end is registered (as after a claim).
                if fenced.swap(false, Ordering::SeqCst) {
                    tracing::info!(node = %path, "the engine leader node is this session's: writes are served");
                    if let Err(e) = register_api(&client, &layout, &address).await {
                        tracing::warn!(error = %format!("{e:#}"), "registering the front end again failed");
                    }
                }
                backoff = Duration::from_millis(100);
                tokio::select! {
                    _ = node.changed() => {}
                    _ = async {
                        while !session.changed().await.is_terminated() {}
                    } => {}
                }
            }
            Ok(Ok(_)) | Ok(Err(zk::Error::NoNode)) => {}
            // Asked again while the session lives; once it has ended (every request fails at
            // once then), on to a new session below.
            Ok(Err(e)) if !client.state().is_terminated() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "watching the engine leader node failed");
                back_off(&mut backoff).await;
                continue;
            }
            Ok(Err(_)) => {}
            // No answer: the lease runs out by itself unless the renewer's answers come
            // (writes are refused from then on), and the session may live on; ask again.
            Err(_) if !client.state().is_terminated() => continue,
            Err(_) => {}
        }
        // The node changed (deleted, rewritten, another session's) or the session ended: it
        // may be another engine's by now. Writes stop here, not when the claim below is
        // answered (a round trip later, in which they were still acknowledged).
        if !fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(node = %path, state = ?client.state(), "the engine leader node changed or the ZooKeeper session ended: writes are refused (503 not_leader) until this engine claims the node again");
        }
        if client.state().is_terminated() {
            tracing::warn!(state = ?client.state(), "ZooKeeper session ended; claiming the engine leader node again");
            match connect(&zk_address).await {
                Ok(c) => {
                    client = c;
                    length = lease.fit_to_session(client.session_timeout());
                    _renewing = renewer(&client, length);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "ZooKeeper unreachable; reads are served, writes are not");
                    back_off(&mut backoff).await;
                    continue;
                }
            }
        }
        // Tests: `leader-claim-delay:<ms>` holds the claim that long (the writes refused
        // meanwhile are the point).
        if let Some(ms) = crate::replicate::failpoint_value("leader-claim-delay") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        match claim_engine_leader(&client, &layout, &address).await {
            Ok(Leader::Us) => {
                if fenced.swap(false, Ordering::SeqCst) {
                    tracing::info!(node = %path, "the engine leadership is claimed again: writes are served");
                }
                if let Err(e) = register_api(&client, &layout, &address).await {
                    tracing::warn!(error = %format!("{e:#}"), "registering the front end again failed");
                }
            }
            Ok(Leader::Other(holder)) if holder == address => {
                tracing::warn!(node = %path, retry_in = ?backoff, "the leader node is still this engine's previous session's; waiting for it to expire");
                back_off(&mut backoff).await;
            }
            Ok(Leader::Other(holder)) => {
                return format!("another engine ({holder}) holds {path}");
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "claiming the engine leader node again failed");
                back_off(&mut backoff).await;
            }
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The most confirmations a renewer keeps unanswered at once.
const RENEWALS_IN_FLIGHT: usize = 8;

/// Confirms the leader node every `LEASE_RENEW_EVERY` (a quarter of a shorter lease) with a
/// `sync` and a read sent together, without waiting for earlier answers: each answer showing
/// the node as this session's renews the lease from when it was asked, so a ZooKeeper that
/// answers within the lease (less the interval) keeps the engine writing. Waiting for each
/// answer before asking again let every second of delay past about 0.65 s refuse writes.
/// Logs when the lease lapses and when it holds again.
async fn renew_lease(
    client: zk::Client,
    path: String,
    lease: std::sync::Arc<Lease>,
    length: Duration,
) {
    let session = client.session_id().0;
    let mut asks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(LEASE_RENEW_EVERY.min(length / 4));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while asks.try_join_next().is_some() {}
        if asks.len() < RENEWALS_IN_FLIGHT {
            let client = client.clone();
            let path = path.clone();
            let lease = lease.clone();
            asks.spawn(async move {
                let asked = std::time::Instant::now();
                let sync = client.sync(&path);
                let stat = client.check_stat(&path);
                if sync.await.is_ok()
                    && let Ok(Some(stat)) = stat.await
                    && stat.ephemeral_owner == session
                {
                    lease.renew_from(asked);
                }
            });
        }
        let holds = lease.holds();
        let logged = lease
            .lapse_logged
            .swap(!holds, std::sync::atomic::Ordering::SeqCst);
        if !holds && !logged {
            tracing::error!(node = %path, lease = ?length, "ZooKeeper has not confirmed the engine leadership within its lease: writes are refused (503 not_leader) until it answers (the session may end meanwhile, and another engine lead)");
        } else if holds && logged {
            tracing::info!(node = %path, "ZooKeeper answers again and the node is still this session's: writes are served");
        }
    }
}

/// Registers a running `serve` front end as `{root}/api/{address}` for the session's life.
pub async fn register_api(
    client: &zk::Client,
    layout: &Layout,
    address: &str,
) -> anyhow::Result<()> {
    ensure_dir(client, &layout.api_dir()).await?;
    let path = format!("{}/{}", layout.api_dir(), address.replace('/', "_"));
    for _ in 0..5 {
        match client.create(&path, address.as_bytes(), &ephemeral()).await {
            Ok(_) => return Ok(()),
            Err(zk::Error::NodeExists) => {}
            Err(e) => bail!("registering {path}: {e}"),
        }
        let stat = match client.check_stat(&path).await {
            Ok(Some(stat)) => stat,
            // Gone meanwhile: create it again.
            Ok(None) => continue,
            Err(e) => bail!("reading {path}: {e}"),
        };
        if stat.ephemeral_owner == client.session_id().0 {
            return Ok(());
        }
        // Another session's: a front end that had this address before (crashed, its session
        // not expired yet). This process holds the address now, so it is stale: replace it
        // in one step, or it would vanish with that session and leave this one unregistered.
        let mut replace = client.new_multi_writer();
        replace
            .add_delete(&path, Some(stat.version))
            .and_then(|()| replace.add_create(&path, address.as_bytes(), &ephemeral()))
            .map_err(|e| anyhow::anyhow!("registering {path}: {e}"))?;
        match replace.commit().await {
            Ok(_) => return Ok(()),
            // Changed meanwhile: look again.
            Err(e) => tracing::debug!(error = %e, "replacing {path} failed; retrying"),
        }
    }
    bail!("registering {path}: it keeps changing")
}

/// The engine leader's address, if any, and the registered front ends.
pub async fn get_registrations(
    client: &zk::Client,
    layout: &Layout,
) -> anyhow::Result<(Option<String>, Vec<String>)> {
    let leader = match client.get_data(&layout.engine_leader()).await {
        Ok((data, _)) => Some(String::from_utf8_lossy(&data).into_owned()),
        Err(zk::Error::NoNode) => None,
        Err(e) => bail!("reading the engine leader: {e}"),
    };
    let api = match client.list_children(&layout.api_dir()).await {
        Ok(mut children) => {
            children.sort();
            children
        }
        Err(zk::Error::NoNode) => Vec::new(),
        Err(e) => bail!("listing {}: {e}", layout.api_dir()),
    };
    Ok((leader, api))
}

/// Keeps `sender` holding the newest partition map: a ZooKeeper data watch for prompt changes,
/// plus a periodic re-read. While ZooKeeper is unreachable the last map stays in place and the
/// connection is retried with backoff. Runs until every receiver is dropped.
pub async fn watch_partition_map(
    address: String,
    layout: Layout,
    sender: watch::Sender<PartitionMap>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut client: Option<zk::Client> = None;
    while !sender.is_closed() {
        let connected = match client.take() {
            Some(c) => Ok(c),
            None => connect(&address).await,
        };
        let c = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "ZooKeeper down; keeping the last partition map");
                back_off(&mut backoff).await;
                continue;
            }
        };
        match c.get_and_watch_data(&layout.partitions()).await {
            Ok((data, _, watcher)) => {
                backoff = Duration::from_millis(100);
                match serde_json::from_slice::<PartitionMap>(&data)
                    .map_err(anyhow::Error::from)
                    .and_then(|m| m.check().map(|_| m))
                {
                    Ok(map) => {
                        sender.send_if_modified(|current| {
                            // Maps only move forward: an older version is a read from a
                            // ZooKeeper server that lags (a new session), not a change. The
                            // same version with other nodes is never a change either (readers
                            // holding the old list would trust nodes stamped with it).
                            if map.version < current.version {
                                tracing::warn!(seen = map.version, current = current.version, "ignoring an older partition map (a lagging ZooKeeper server; if it stays, the map was reset: versions must only grow, see `wallet cluster set-redis-nodes`)");
                                false
                            } else if map.version == current.version && *current != map {
                                tracing::error!(version = map.version, nodes = ?map.nodes, current = ?current.nodes, "refusing a partition map that names other nodes under the current version; keeping the current map");
                                false
                            } else if *current != map {
                                tracing::info!(version = map.version, nodes = ?map.nodes, "partition map changed");
                                *current = map;
                                true
                            } else {
                                false
                            }
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "ignoring an invalid partition map"),
                }
                // Wake on the watch, or re-read anyway now and then (a lost watch costs at most
                // this long).
                tokio::select! {
                    _ = watcher.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = sender.closed() => return,
                }
                if c.state().is_terminated() {
                    continue;
                }
                client = Some(c);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "reading the partition map failed; keeping the last one");
                back_off(&mut backoff).await;
                if !c.state().is_terminated() {
                    client = Some(c);
                }
            }
        }
    }
}

/// Connects to ZooKeeper, retrying with backoff for up to `patience`.
pub async fn connect_patiently(
    address: &str,
    patience: std::time::Duration,
) -> anyhow::Result<zookeeper_client::Client> {
    check_address(address)?;
    let deadline = std::time::Instant::now() + patience;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match connect(address).await {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() + backoff < deadline => {
                tracing::warn!(error = %e, "waiting for ZooKeeper");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_node_is_named_without_its_strings() {
        let path = "/wallet/sql/shards";
        let hand_edited = br#"{"version":1,"shards":"postgres://u:s3cret@db/x"}"#;
        let error = parse_json::<SqlShards>(path, hand_edited)
            .expect_err("a string where a list belongs")
            .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(
            error.starts_with(
                "/wallet/sql/shards does not hold the expected JSON: invalid type: string"
            ) && error.contains("expected a sequence at line 1 column"),
            "{error}"
        );
        // Messages without a value keep their detail.
        let error = parse_json::<SqlShards>(path, br#"{"version":1}"#)
            .expect_err("no shards")
            .to_string();
        assert!(error.contains("missing field `shards`"), "{error}");
        let good = br#"{"version":2,"shards":["postgres://a/b"]}"#;
        assert_eq!(
            parse_json::<SqlShards>(path, good).expect("well formed"),
            SqlShards {
                version: 2,
                shards: vec!["postgres://a/b".into()]
            }
        );
    }

    #[test]
    fn a_zookeeper_address_no_server_could_answer_at_is_named() {
        for good in [
            "127.0.0.1:2181",
            "127.0.0.1:2181,127.0.0.2:2181/wallet",
            "zk",
            "zk:",
            "[::1]:2181",
            "[::1]",
            "tcp://zk:2181",
            "tcp+tls://zk:2281/chroot",
        ] {
            check_address(good).expect(good);
        }
        for (bad, why) in [
            ("", "names no server"),
            ("/chroot", "names no server"),
            ("a,,b", "server 1 (\"\") names no host"),
            (":2181", "names no host"),
            ("127.0.0.1:99999", "\"99999\" is not a port number"),
            ("127.0.0.1:0", "\"0\" is not a port number"),
            ("127.0.0.1:x", "\"x\" is not a port number"),
            ("::1", "must be in brackets"),
            ("fe80::1:2181", "must be in brackets"),
            ("[::1", "an unclosed ["),
            ("h1/x,h2", "a chroot goes after the last server"),
        ] {
            let e = check_address(bad).expect_err(bad).to_string();
            assert!(e.contains("--zk") && e.contains(why), "{bad:?}: {e}");
        }
    }

    /// A bad `--zk-root` is refused up front, named as it was given.
    #[test]
    fn a_bad_zk_root_is_named_as_given() {
        for (given, shown) in [
            ("/", r#""/""#),
            ("//", r#""//""#),
            ("wallet", r#""wallet""#),
            ("", r#""""#),
        ] {
            let error = Layout::new(given)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(&format!("not {shown}")),
                "{given:?}: {error}"
            );
        }
        for (given, why) in [
            ("//x", "empty"),
            ("/a//b", "empty"),
            ("/a/./b", "`.`"),
            ("/a/..", "`..`"),
            ("/zookeeper", "ZooKeeper's own"),
            ("/zookeeper/wallet", "ZooKeeper's own"),
        ] {
            let error = Layout::new(given)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(why), "{given:?}: {error}");
        }
        assert!(Layout::new("/zookeepers").is_ok());
        assert_eq!(
            Layout::new("/wallet/").map(|l| l.root).ok().as_deref(),
            Some("/wallet")
        );
    }

    /// No spelling of a password the driver reads is printed: the common ones are masked in
    /// place, and the others (a `/` in the userinfo, a percent-encoded key, spaces around `=`,
    /// a quoted value with a space) give a summary without it.
    #[test]
    fn a_shard_url_is_never_shown_with_its_password() {
        for (url, shown) in [
            ("postgres://u:s3cret@a/x", "postgres://u:***@a/x"),
            (
                "host=b dbname=y password=s3cret",
                "host=b dbname=y password=***",
            ),
            (
                "postgres://u@c/z?sslmode=disable&password=s3cret",
                "postgres://u@c/z?sslmode=disable&password=***",
            ),
            ("postgres://u@c/z", "postgres://u@c/z"),
        ] {
            assert_eq!(redact_password(url), shown, "{url}");
        }
        for url in [
            "postgres://u:s3/cret@h:5433/db",
            "postgres://u@h/db?pass%77ord=s3cret",
            "host=h dbname=db password = s3cret",
            "host=h dbname=db password='s3 cret'",
            "postgres://u:s3%2Fcret@h/db?x=/",
        ] {
            let shown = redact_password(url);
            assert!(
                !shown.contains("s3") && shown.contains("***"),
                "{url}: {shown}"
            );
        }
        // A value with a space, quoted or escaped: no word of it is shown.
        for url in [
            "host=h dbname=db user=u password='hunter2 TOPSECRET'",
            r"host=h dbname=db user=u password=hunter\ TOPSECRET",
            "host=h dbname=db user=u password='a b TOPSECRET c'",
        ] {
            let shown = redact_password(url);
            assert!(
                !shown.contains("TOPSECRET") && !shown.contains("hunter2") && shown.contains("***"),
                "{url}: {shown}"
            );
        }
    }

    /// An empty element is named by its place; the message said the list had no URL at all.
    #[test]
    fn an_empty_shard_in_the_list_is_named() {
        let url = "postgres://u@h/db".to_string();
        let other = "postgres://u@h/db2".to_string();
        for (list, place) in [
            (vec![url.clone(), String::new(), other.clone()], "shard 1 "),
            (vec![url.clone(), " ".to_string()], "shard 1 "),
            (vec![String::new(), url.clone()], "shard 0 "),
        ] {
            let error = check_sql_shards(&list)
                .expect_err("an empty element")
                .to_string();
            assert!(
                error.contains(place) && error.contains("is empty"),
                "{error}"
            );
        }
        let error = check_sql_shards(&[]).expect_err("no URL").to_string();
        assert!(error.contains("at least one URL"), "{error}");
        assert!(check_sql_shards(&[url, other]).is_ok());
    }

    #[test]
    fn node_addresses_are_host_and_port_and_nothing_that_changes_the_url() {
        for good in [
            "127.0.0.1:6379",
            "localhost:1",
            "[::1]:6379",
            "redis-3.local:65535",
        ] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("127.0.0.1", "no port"),
            (":6379", "no host"),
            ("h:0", "from 1 to 65535"),
            ("h:65536", "from 1 to 65535"),
            ("::1:6379", "brackets"),
            ("a/b:6379", "'/'"),
            ("user:pw@h:6379", "'@'"),
            ("h?x=1:6379", "'?'"),
            ("h#f:6379", "'#'"),
            ("[::1:6379", "brackets"),
            ("h]:6379", "brackets"),
        ] {
            let e = check_host_port(bad).expect_err(bad).to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
