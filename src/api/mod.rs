//! The HTTP front end: `hyper` 1.x on tokio, HTTP/1.1 keep-alive.
//!
//! Architecture invariants:
//! - Handlers never touch the ledger: writes go through the engine's input ring, reads come
//!   from the views.
//! - A request is answered "committed" only from a durable outcome.
//! - Everything is bounded: connections, in-flight requests (the waiter table), body sizes,
//!   header read time, request time. Overload answers 429/503 at once.
//! - Bad input is a 4xx naming the field; nothing is submitted for it.

pub mod auth;
pub mod json;
pub mod limit;
pub mod linger;
pub mod metrics;
pub mod routes;
pub mod waiters;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;

use limit::KeyedLimiter;
use tokio::net::TcpListener;

use crate::core::CommandRecord;
use crate::engine::recovery::recover;
use crate::engine::{
    Engine, EngineConfig, EngineShared, JournalStage, NO_TOKEN, OutputSlot, ReplySink, Submitter,
    WaitMode,
};
use crate::journal::storage::MmapStorage;
use crate::journal::{JournalConfig, JournalWriter, SyncMode, journal_dir, snapshot_dir};
use crate::views::Views;
use metrics::Metrics;
use waiters::{Delivered, Waiters};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub segment_size_bytes: u64,
    pub journal_readahead: crate::journal::storage::Readahead,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// How long a read with `min_seq` waits for the view to catch up.
    pub read_wait: Duration,
    pub max_connections: usize,
    pub max_in_flight: usize,
    /// Batch requests admitted at once (their bodies are read, decoded and waited on); more
    /// get a fast 429 before their bodies are read, so memory stays bounded by this times
    /// `max_batch_body_bytes` and the decoded items.
    pub max_batches_in_flight: usize,
    pub ring_size: usize,
    pub wait: WaitMode,
    pub pin_core: Option<usize>,
    pub checkpoint_every: u64,
    pub snapshot_every: u64,
    /// Snapshots kept after each one written (0: all).
    pub snapshot_keep: usize,
    /// Transaction ids the ledger may remember (`--max-transaction-ids`); at the limit a
    /// request with a new id is answered 507 `ledger_full`, unexecuted.
    pub max_transaction_ids: u64,
    pub auth: Arc<auth::Auth>,
    /// Requests per second per caller (0: no limit).
    pub rate_limit_per_caller: u32,
    /// Transfers out of one account per second (0: no limit).
    pub velocity_per_account: u32,
    /// PEM certificate chain and private key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Run the Redis replicator inside this process: ZooKeeper address and root.
    pub replicate_redis: Option<(String, String)>,
    /// Claim the engine leadership (`{root}/engine/leader`) and register the front end in
    /// ZooKeeper: its address and root. `run` refuses to start while another engine holds it,
    /// and stops serving if another engine takes it.
    pub zk_leader: Option<(String, String)>,
    /// Set while a `--zk-leader` engine has lost its ZooKeeper session, and with it the
    /// leadership: writes are refused (503 `not_leader`) until it claims the node again, so
    /// that two engines never both take writes once this one knows another may lead.
    pub writes_fenced: Arc<std::sync::atomic::AtomicBool>,
    /// A `--zk-leader` engine's lease (`zk::lease_for` its session): writes are refused (503
    /// `not_leader`) while its node has not been confirmed for that long (ZooKeeper cut off,
    /// or this process paused), before the session could have expired and another engine
    /// claimed the node.
    pub leader_lease: Arc<crate::replicate::zk::Lease>,
}

impl ServeConfig {
    /// Whether writes are refused because this engine may not be the leader (`--zk-leader`).
    pub fn writes_refused(&self) -> bool {
        self.zk_leader.is_some()
            && (self.writes_fenced.load(std::sync::atomic::Ordering::SeqCst)
                || !self.leader_lease.holds())
    }
}

/// The most requests `serve` waits on at once (`--max-in-flight`): each takes a waiter slot
/// (tokens address slots with 32 bits; the table is allocated whole at start).
pub const MAX_IN_FLIGHT_LIMIT: usize = 1 << 20;
/// The most connections (`--max-connections`) or batches in flight (`--max-batches-in-flight`).
pub const MAX_PERMITS_LIMIT: usize = 1 << 24;
/// The highest per-second limit (`--rate-limit-per-caller`, `--velocity-per-account`).
pub const MAX_PER_SECOND_LIMIT: u32 = 1_000_000_000;
/// The smallest body limit: a transfer's JSON fits in it with room to spare.
pub const MIN_BODY_BYTES: usize = 512;
/// The largest `--max-body-bytes` and `--max-batch-body-bytes`: a body is held whole in memory
/// while it is decoded.
pub const MAX_BODY_BYTES_LIMIT: usize = 1 << 30;
pub use crate::engine::MAX_TRANSACTION_IDS;

/// Memory a served ledger costs per remembered transaction id, at its peak: the read views'
/// outcome (72 bytes, its index bucket and its history positions) and the ledger's id (a 32-byte
/// record and its bucket, with the next growth's bucket array prepared), rounded up. Measured
/// in README, Capacity.
pub const SERVED_BYTES_PER_ID: u64 = 256;
/// What the snapshot follower's copy of the ledger adds per id (`--snapshot-every`).
pub const FOLLOWER_BYTES_PER_ID: u64 = 64;

/// `--max-transaction-ids auto`: the ids whose memory fills three quarters of `mem_total_bytes`
/// (the machine's RAM), at most `MAX_TRANSACTION_IDS`. Every id is remembered forever, in RAM:
/// without a limit, the process would grow until the kernel killed it.
pub fn auto_max_transaction_ids(mem_total_bytes: u64, snapshots: bool) -> u64 {
    let per_id = SERVED_BYTES_PER_ID + if snapshots { FOLLOWER_BYTES_PER_ID } else { 0 };
    (mem_total_bytes / 4 * 3 / per_id).clamp(1, MAX_TRANSACTION_IDS)
}

/// The memory this process may use: the machine's RAM from `/proc/meminfo` (`MemTotal`), or
/// its control group's limit if that is lower (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`; in a container `MemTotal` is the host's).
pub fn mem_total_bytes() -> anyhow::Result<u64> {
    use anyhow::Context;
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .context("/proc/meminfo has no MemTotal line in kB")?;
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    })
    .min()
    .unwrap_or(u64::MAX);
    Ok(kib.saturating_mul(1024).min(limit))
}

impl ServeConfig {
    /// Refuses, naming the flag, a configuration that could not serve: a limit of zero would
    /// answer every request 413, 429 or 503, which is a mistake to report at start, not to serve.
    pub fn check(&self) -> anyhow::Result<()> {
        crate::engine::check_ring_size(self.ring_size).map_err(anyhow::Error::msg)?;
        crate::journal::check_segment_size(self.segment_size_bytes).map_err(anyhow::Error::msg)?;
        for (flag, bytes) in [
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-batch-body-bytes", self.max_batch_body_bytes),
        ] {
            anyhow::ensure!(
                (MIN_BODY_BYTES..=MAX_BODY_BYTES_LIMIT).contains(&bytes),
                "{flag} must be within {MIN_BODY_BYTES}..={MAX_BODY_BYTES_LIMIT}, not {bytes}"
            );
        }
        anyhow::ensure!(
            self.max_batch_body_bytes >= self.max_body_bytes,
            "--max-batch-body-bytes ({}) must not be below --max-body-bytes ({}): a batch would \
             then be refused a body one transfer may send",
            self.max_batch_body_bytes,
            self.max_body_bytes
        );
        for (flag, timeout) in [
            ("--header-read-timeout-ms", self.header_read_timeout),
            ("--request-timeout-ms", self.request_timeout),
        ] {
            anyhow::ensure!(!timeout.is_zero(), "{flag} must be at least 1");
        }
        for (flag, count) in [
            ("--max-connections", self.max_connections),
            ("--max-batches-in-flight", self.max_batches_in_flight),
        ] {
            // Each is a semaphore's permits: tokio panics above `usize::MAX >> 3`, and far
            // fewer already exhaust the process's file descriptors or memory.
            anyhow::ensure!(
                (1..=MAX_PERMITS_LIMIT).contains(&count),
                "{flag} must be within 1..={MAX_PERMITS_LIMIT}, not {count}"
            );
        }
        for (flag, per_second) in [
            ("--rate-limit-per-caller", self.rate_limit_per_caller),
            ("--velocity-per-account", self.velocity_per_account),
        ] {
            // Limits count time in whole nanoseconds per unit: above this a unit would take no
            // time, and the limit would quietly be off.
            anyhow::ensure!(
                per_second <= MAX_PER_SECOND_LIMIT,
                "{flag} must be at most {MAX_PER_SECOND_LIMIT} (0: no limit), not {per_second}"
            );
        }
        anyhow::ensure!(
            (1..=MAX_TRANSACTION_IDS).contains(&self.max_transaction_ids),
            "--max-transaction-ids must be within 1..={MAX_TRANSACTION_IDS} (the ledger's id \
             table addresses ids with 32 bits), not {}",
            self.max_transaction_ids
        );
        anyhow::ensure!(
            (1..=MAX_IN_FLIGHT_LIMIT).contains(&self.max_in_flight),
            "--max-in-flight must be within 1..={MAX_IN_FLIGHT_LIMIT}, not {}",
            self.max_in_flight
        );
        Ok(())
    }
}

impl std::fmt::Debug for auth::Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_none() {
            "Auth::None"
        } else {
            "Auth::Jwt"
        })
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("./data"),
            sync: SyncMode::Batch,
            segment_size_bytes: 64 << 20,
            journal_readahead: crate::journal::storage::Readahead::default(),
            max_body_bytes: 16 << 10,
            max_batch_body_bytes: 4 << 20,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            read_wait: Duration::from_secs(2),
            max_connections: 1024,
            max_in_flight: 16384,
            max_batches_in_flight: 64,
            ring_size: 1 << 16,
            wait: crate::engine::DEFAULT_WAIT,
            pin_core: Some(1),
            checkpoint_every: 1 << 20,
            snapshot_every: 0,
            snapshot_keep: crate::engine::DEFAULT_SNAPSHOT_KEEP,
            max_transaction_ids: crate::engine::MAX_TRANSACTION_IDS,
            auth: Arc::new(auth::Auth::None),
            rate_limit_per_caller: 0,
            velocity_per_account: 0,
            tls: None,
            replicate_redis: None,
            zk_leader: None,
            writes_fenced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            leader_lease: Arc::new(crate::replicate::zk::Lease::default()),
        }
    }
}

/// Event-stream reads from the journal files at once (each up to 10,000 events, a few
/// milliseconds of one core).
pub const JOURNAL_READS: usize = 4;

/// State shared by every connection.
pub struct App {
    pub config: ServeConfig,
    pub views: Arc<Views>,
    pub waiters: Arc<Waiters>,
    pub metrics: Metrics,
    pub shared: Arc<EngineShared>,
    pub openapi_json: String,
    pub caller_limiter: Option<KeyedLimiter>,
    pub velocity_limiter: Option<KeyedLimiter>,
    /// Permits for batch requests (`ServeConfig::max_batches_in_flight`).
    pub batch_permits: tokio::sync::Semaphore,
    /// Permits for event-stream reads from the journal files (`JOURNAL_READS`). Each runs on
    /// the blocking pool and goes on after its caller hangs up, so they are refused past this
    /// many rather than queued.
    pub journal_reads: Arc<tokio::sync::Semaphore>,
    /// Batch permits held per caller (admins excepted): at most a quarter of them each, so that
    /// one caller's slow batches cannot shut every other caller out of the batch endpoint.
    pub batch_callers: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Progress of the in-process Redis replicator, if it runs.
    pub redis_replicator: Option<Arc<crate::replicate::redis::Metrics>>,
    /// Where the event stream's journal reads ended, to resume the next one there, and the
    /// positions the read views' rebuild passed (an index of the journal before the start).
    pub events_positions: Arc<metrics::TailPositions>,
    /// The connection permits (`--max-connections`), for the open-connection gauge.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Connections refused over `--max-connections` (answered 503, or closed unanswered).
    pub connections_refused: std::sync::atomic::AtomicU64,
    /// Requests the HTTP layer refused before any route saw them (400 or 431 without a body, or
    /// an HTTP/2 preface closed unanswered).
    pub http_malformed: std::sync::atomic::AtomicU64,
    submitter: Submitter,
}

impl App {
    pub fn render_metrics(&self) -> String {
        let s = &self.shared;
        let durable = s.durable_seq.load(Ordering::Relaxed);
        let executed = s.executed_seq.load(Ordering::Relaxed);
        let submitted = s.submitted.load(Ordering::Relaxed);
        let completed = s.completed.load(Ordering::Relaxed);
        let replicator = self
            .redis_replicator
            .as_ref()
            .map(|m| m.render())
            .unwrap_or_default();
        let series = [
            (
                "wallet_ring_depth",
                "Commands submitted and not yet answered.",
                submitted.saturating_sub(completed),
            ),
            (
                "wallet_durable_sequence",
                "Highest durable sequence number.",
                durable,
            ),
            (
                "wallet_durable_lag_events",
                "Events executed but not yet durable.",
                executed.saturating_sub(durable),
            ),
            (
                "wallet_transaction_ids",
                "Transaction ids the ledger remembers (each forever, in RAM).",
                s.transaction_ids.load(Ordering::Relaxed),
            ),
            (
                "wallet_max_transaction_ids",
                "Transaction ids the ledger may remember (--max-transaction-ids); then 507 ledger_full.",
                self.config.max_transaction_ids,
            ),
            (
                "wallet_refused_ledger_full_total",
                "Commands refused unexecuted by this process because the ledger was full (a batch counts each item).",
                s.refused_full.load(Ordering::Relaxed),
            ),
            (
                "wallet_journal_space_short",
                "1 while the journal holds no reserve of disk space (the disk is full): new work gets 507 journal_full.",
                u64::from(s.journal_space_short.load(Ordering::Relaxed)),
            ),
            (
                "wallet_refused_journal_full_total",
                "Commands refused unexecuted by this process because the journal's disk was full (a batch counts each item).",
                s.refused_journal_full.load(Ordering::Relaxed),
            ),
            (
                "wallet_journal_bytes_total",
                "Bytes appended to the journal by this process.",
                s.journal_bytes.load(Ordering::Relaxed),
            ),
            (
                "wallet_view_sequence",
                "Sequence the read views reflect.",
                self.views.applied_seq(),
            ),
            (
                "wallet_in_flight_requests",
                "Requests waiting for their outcome.",
                self.waiters.in_flight() as u64,
            ),
            (
                "wallet_overloaded_total",
                "Submissions refused because the ring was full.",
                s.overloaded.load(Ordering::Relaxed),
            ),
            (
                "wallet_events_journal_reads_total",
                "Event-stream requests answered from the journal files (older than the in-memory window).",
                self.metrics.events_journal_reads.load(Ordering::Relaxed),
            ),
            (
                "wallet_events_journal_bytes_total",
                "Bytes those requests read from the journal files.",
                self.metrics.events_journal_bytes.load(Ordering::Relaxed),
            ),
            (
                "wallet_halted",
                "1 if the engine halted (a journal failure or a panic) and stopped acknowledging.",
                u64::from(s.halted.load(Ordering::Relaxed)),
            ),
            (
                "wallet_snapshot_follower_sequence",
                "Last sequence the snapshot follower applied (only with --snapshot-every: without it no follower runs and the series is absent).",
                s.follower_seq.load(Ordering::Relaxed),
            ),
            (
                "wallet_checkpoints_verified_live_total",
                "Checkpoint records the snapshot follower replayed and found equal to the live state hash.",
                s.follower_checkpoints.load(Ordering::Relaxed),
            ),
            (
                "wallet_snapshots_written_total",
                "Snapshots written by this process.",
                s.snapshots_written.load(Ordering::Relaxed),
            ),
            (
                "wallet_snapshot_follower_failed",
                "1 if the snapshot follower stopped (its reason is in the log).",
                u64::from(s.follower_failed.load(Ordering::Relaxed)),
            ),
            (
                "wallet_writes_refused_not_leader",
                "1 while writes are refused with 503 not_leader (--zk-leader: the lease lapsed, or the leader node is not this engine's).",
                u64::from(self.config.writes_refused()),
            ),
            (
                "wallet_connections_open",
                "Connections being served (at most --max-connections).",
                self.config
                    .max_connections
                    .saturating_sub(self.connections.available_permits()) as u64,
            ),
            (
                "wallet_connections_refused_total",
                "Connections over --max-connections (answered 503 too_many_connections, closed unanswered, or, asking for /healthz, /readyz or /metrics, answered; not in wallet_http_requests_total).",
                self.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "wallet_http_malformed_requests_total",
                "Requests the HTTP layer refused before routing (unparsable, or a head over 64 KiB or 100 header fields), answered 400 or 431 without a body, or closed unanswered (an HTTP/2 preface); not in wallet_http_requests_total.",
                self.http_malformed.load(Ordering::Relaxed),
            ),
        ];
        // Without --snapshot-every no follower runs: its sequence would stay where start-up
        // left it.
        let follower = self.config.snapshot_every > 0;
        let series: Vec<_> = series
            .into_iter()
            .filter(|(name, _, _)| follower || *name != "wallet_snapshot_follower_sequence")
            .collect();
        let mut text = self.metrics.render(&series);
        text.push_str(&replicator);
        text
    }
}

/// The reply stage's sink: update the views, then complete the waiting callers.
struct ApiSink {
    views: Arc<Views>,
    waiters: Arc<Waiters>,
    batch: Vec<CommandRecord>,
    pending: Vec<(u64, Delivered)>,
}

impl ReplySink for ApiSink {
    fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
        if durable {
            self.batch.push(slot.record);
        }
        if slot.token != NO_TOKEN {
            self.pending.push((
                slot.token,
                Delivered {
                    record: slot.record,
                    durable,
                },
            ));
        }
        if self.batch.len() >= 4096 {
            self.flush();
        }
    }

    fn end_of_batch(&mut self) {
        self.flush();
    }

    fn after_panic(&mut self) {
        // The views may hold part of the batch: not applied again (the server is halting).
        // The callers are answered with what they were delivered.
        self.batch.clear();
        for (token, delivered) in self.pending.drain(..) {
            self.waiters.deliver(token, delivered);
        }
    }
}

impl ApiSink {
    fn flush(&mut self) {
        // Views first, so that a caller who reads right after its reply sees its own write;
        // the callers before the waits on the views (long polls of the event stream, reads
        // with `min_seq`), however many those are.
        let applied = self.views.apply_batch_quietly(&self.batch);
        self.batch.clear();
        for (token, delivered) in self.pending.drain(..) {
            self.waiters.deliver(token, delivered);
        }
        if applied {
            self.views.announce();
        }
    }
}

pub const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

pub fn openapi_json() -> anyhow::Result<String> {
    let value: serde_json::Value = serde_norway::from_str(OPENAPI_YAML)?;
    Ok(serde_json::to_string(&value)?)
}

/// Holds an exclusive lock on the data directory for as long as it lives: a `flock` on the
/// directory itself and one on its `LOCK` file (which is what older builds lock, so that the
/// two refuse each other). The `LOCK` file alone could be removed under a running server, and
/// a second one then locked a new file and wrote the same journal (an acknowledged write of the
/// first was lost); the directory cannot be removed while it holds the journal.
pub struct DataDirLock {
    _directory: std::fs::File,
    _file: std::fs::File,
}

/// An exclusive, non-blocking `flock` on `file` (`what` names it in errors).
fn flock_exclusive(
    file: &std::fs::File,
    dir: &std::path::Path,
    what: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid descriptor owned by `file`; flock takes no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        anyhow::ensure!(
            error.kind() != std::io::ErrorKind::WouldBlock,
            "data directory {} is in use by another wallet process",
            dir.display()
        );
        return Err(
            anyhow::Error::new(error).context(format!("--data-dir: locking {}", what.display()))
        );
    }
    Ok(())
}

pub fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<DataDirLock> {
    use anyhow::Context;
    // A file (or a link to one) where the directory should be: "File exists" named no problem.
    if let Ok(meta) = std::fs::metadata(dir) {
        anyhow::ensure!(
            meta.is_dir(),
            "--data-dir {}: not a directory",
            dir.display()
        );
    }
    crate::journal::storage::create_dir_all_durable(dir)
        .with_context(|| format!("--data-dir: creating {}", dir.display()))?;
    let directory = std::fs::File::open(dir)
        .with_context(|| format!("--data-dir: opening {}", dir.display()))?;
    if let Err(e) = flock_exclusive(&directory, dir, dir) {
        // A file system that cannot lock a directory (NFS emulates flock with byte-range
        // locks, which want a file open for writing): the LOCK file's lock alone, as before.
        let unsupported = e.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.raw_os_error(),
                Some(libc::EBADF | libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL)
            )
        });
        if !unsupported {
            return Err(e);
        }
        tracing::warn!(dir = %dir.display(), error = %format!("{e:#}"), "the data directory cannot be locked itself: only its LOCK file is (removing that file under a running server would let a second one in)");
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .with_context(|| format!("--data-dir: opening {}", dir.join("LOCK").display()))?;
    flock_exclusive(&file, dir, &dir.join("LOCK"))?;
    Ok(DataDirLock {
        _directory: directory,
        _file: file,
    })
}

/// Recovers the state in `config.data_dir`, starts the engine, and serves on `listener` until
/// `shutdown` resolves (or the journal fails). Then stops accepting, finishes in-flight
/// requests, drains the engine and returns.
pub async fn serve(
    config: ServeConfig,
    lock: DataDirLock,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let _lock = lock;
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let ledger_config = crate::engine::ledger_config();
    let data_dir = config.data_dir.clone();
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(PHASE_LEDGER));
    let recovery = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let started = std::time::Instant::now();
        // Tests: `recovery-delay:<ms>` makes recovery take that much longer.
        if let Some(ms) = crate::replicate::failpoint_value("recovery-delay") {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let recovered = recover(&data_dir, ledger_config, true, |_, _| {})?;
        tracing::info!(
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            snapshot = ?recovered.snapshot_next_seq,
            records = recovered.records_replayed,
            "ledger recovered"
        );
        // Balances and the directory come from the recovered ledger at once; the outcomes and
        // history of the journal's records are built in the background once the engine runs
        // (see `spawn_views_past`).
        let views_started = std::time::Instant::now();
        let views = Views::from_ledger(&recovered.ledger);
        tracing::info!(
            seconds = format!("{:.2}", views_started.elapsed().as_secs_f64()),
            accounts = recovered.ledger.account_count(),
            "balance views built"
        );
        Ok((recovered, views))
    });
    tokio::pin!(shutdown);
    // While recovering, the listener answers (health checks see "alive, not ready") instead of
    // leaving connections in the accept backlog.
    let starting_connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let (recovered, views) = {
        tokio::pin!(recovery);
        loop {
            tokio::select! {
                done = &mut recovery => break done??,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over the connection limit the connection is dropped at once.
                        if let Ok(permit) = starting_connections.clone().try_acquire_owned() {
                            serve_starting(stream, peer, tls.clone(), phase.clone(), &config, permit);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                _ = &mut shutdown => {
                    // Recovery only reads (the journal writer, which may cut a torn tail, opens
                    // after it): nothing is lost by not waiting for it, which can take minutes
                    // on a long journal without a snapshot. Its thread is left to the process's
                    // exit (`main` does not wait for blocking tasks).
                    phase.store(PHASE_STOPPING, Ordering::Relaxed);
                    tracing::info!("shutdown requested during recovery: stopped before serving");
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(
        next_seq = recovered.ledger.next_seq(),
        records = recovered.records_replayed,
        snapshot = ?recovered.snapshot_next_seq,
        "recovered"
    );
    let remembered = u64::from(recovered.ledger.transaction_id_count());
    if remembered >= config.max_transaction_ids {
        tracing::error!(
            remembered,
            max_transaction_ids = config.max_transaction_ids,
            "the ledger already remembers --max-transaction-ids ids: every request with a new \
             transaction id will be refused (507 ledger_full)"
        );
    } else {
        tracing::info!(
            remembered,
            max_transaction_ids = config.max_transaction_ids,
            "transaction ids"
        );
    }
    let journal_config = JournalConfig {
        dir: journal_dir(&config.data_dir),
        segment_size_bytes: config.segment_size_bytes,
        sync: config.sync,
    };
    let storage = MmapStorage {
        readahead: config.journal_readahead,
    };
    let mut writer = JournalWriter::open(Box::new(storage), journal_config, &recovered.end)?;
    writer.keep_reserve();
    // What the engine may have executed when a roll-over uses the reserve: the output ring and
    // a group, at the largest frame each. More than a segment, and a full disk halts instead.
    let in_flight_bytes =
        (config.ring_size as u64 + 64) * crate::journal::format::MAX_FRAME_BYTES as u64;
    if in_flight_bytes + crate::journal::format::SEGMENT_HEADER_BYTES as u64
        > config.segment_size_bytes
    {
        tracing::warn!(
            segment_size = config.segment_size_bytes,
            ring_size = config.ring_size,
            "a segment holds fewer records than the ring: when the disk fills, the records in \
             flight may not fit in the segment the journal's reserve becomes, and the engine \
             would halt instead of refusing new work (507 journal_full); use a larger \
             --segment-size or a smaller --ring-size"
        );
    }
    let recovered_end = recovered.end.next_seq;
    let waiters = Arc::new(Waiters::new(config.max_in_flight));
    let sink = ApiSink {
        views: views.clone(),
        waiters: waiters.clone(),
        batch: Vec::new(),
        pending: Vec::new(),
    };
    let engine_config = EngineConfig {
        input_ring_size: config.ring_size,
        output_ring_size: config.ring_size,
        wait: config.wait,
        output_wait: None,
        pin_core: config.pin_core,
        checkpoint_every: config.checkpoint_every,
        snapshot_every: config.snapshot_every,
        snapshot_dir: Some(snapshot_dir(&config.data_dir)),
        snapshot_keep: config.snapshot_keep,
        panic_at_seq: crate::replicate::failpoint_value("engine-panic"),
        max_transaction_ids: config.max_transaction_ids,
    };
    let engine = Engine::start(
        recovered.ledger,
        engine_config,
        JournalStage::Journal(writer),
        sink,
    );
    let shared = engine.shared();
    let app = Arc::new(App {
        config: config.clone(),
        views,
        waiters,
        metrics: Metrics::default(),
        events_positions: Default::default(),
        shared: shared.clone(),
        openapi_json: openapi_json()?,
        redis_replicator: config.replicate_redis.as_ref().map(|(zk, zk_root)| {
            // Tails this data directory's journal; see docs/zookeeper-layout.md.
            let (metrics, _thread) =
                crate::replicate::redis::spawn(crate::replicate::redis::ReplicateOptions {
                    zk: zk.clone(),
                    zk_root: zk_root.clone(),
                    source: config.data_dir.display().to_string(),
                    batch_events: 65_536,
                    once: false,
                    metrics: None,
                    // A node from another journal stops the replicator (logged, retried), it
                    // is never cleared without an operator's `replicate redis --rebuild`.
                    rebuild: false,
                    once_wait: Duration::ZERO,
                    idle_check: crate::replicate::redis::DEFAULT_IDLE_CHECK,
                });
            metrics
        }),
        caller_limiter: KeyedLimiter::per_second(config.rate_limit_per_caller),
        velocity_limiter: KeyedLimiter::per_second(config.velocity_per_account),
        batch_permits: tokio::sync::Semaphore::new(config.max_batches_in_flight),
        journal_reads: Arc::new(tokio::sync::Semaphore::new(JOURNAL_READS)),
        batch_callers: std::sync::Mutex::new(std::collections::HashMap::new()),
        connections: starting_connections.clone(),
        connections_refused: std::sync::atomic::AtomicU64::new(0),
        http_malformed: std::sync::atomic::AtomicU64::new(0),
        submitter: engine.submitter(),
    });
    // Keyed limiters keep a cell per key; every second each forgets the keys idle since its
    // rotation before last (so it holds about two seconds of keys), and the forgotten ones are
    // freed on a blocking thread: millions of keys take a while to free.
    let pruning = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for limiter in [&app.caller_limiter, &app.velocity_limiter]
                    .into_iter()
                    .flatten()
                {
                    if let Some(forgotten) = limiter.rotate()
                        && !forgotten.is_empty()
                    {
                        tokio::task::spawn_blocking(move || drop(forgotten));
                    }
                }
            }
        })
    };

    // Tests and scripts wait for "ready" (after "listening on"): every route is served then.
    if app.views.past_complete() {
        println!("ready");
    } else {
        spawn_views_past(
            app.views.clone(),
            app.events_positions.clone(),
            journal_dir(&config.data_dir),
            recovered_end,
            shared.clone(),
        );
    }
    // The same permits as during recovery: a connection taken then holds its permit until it
    // ends (up to the header timeout), and a fresh set would let the server hold twice
    // `--max-connections` for that long.
    let connections = starting_connections;
    // Connections over the limit being answered 503 at once: a bounded number (past it they
    // are closed unanswered), because over TLS the answer needs a handshake first.
    let refusals = Arc::new(tokio::sync::Semaphore::new(OVER_LIMIT_ANSWERS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let halted = {
        let shared = shared.clone();
        async move {
            while !shared.halted.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::pin!(halted);
    // The connection tasks, so that shutdown can cut those still running after its grace
    // period: each holds the application and its own submitter, and the engine does not stop
    // while one is alive. Finished ones are reaped as connections come in.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            _ = &mut halted => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            app.connections_refused.fetch_add(1, Ordering::Relaxed);
            // Over the connection limit: answer at once and close, never queue. Over TLS the
            // answer goes inside TLS (a plaintext 503 on a TLS port reads to the client as a
            // broken handshake, never as a 503 to retry after), after a handshake bounded like
            // any other.
            let Ok(refusal) = refusals.clone().try_acquire_owned() else {
                continue;
            };
            let acceptor = tls.clone();
            // Shorter than a served connection's: a client that stalls its handshake holds
            // one of the few refusal slots.
            let handshake_timeout = config.header_read_timeout.min(Duration::from_secs(1));
            let app = app.clone();
            let peer: Arc<str> = peer.ip().to_string().into();
            tokio::spawn(async move {
                match acceptor {
                    None => answer_over_limit(stream, app, peer).await,
                    Some(acceptor) => {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            answer_over_limit(stream, app, peer).await;
                        }
                    }
                }
                drop(refusal);
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteStallLimit::new(stream, config.request_timeout);
        let app = app.clone();
        let counting = app.clone();
        let submitter = Arc::new(std::sync::Mutex::new(app.submitter.clone()));
        let peer: Arc<str> = peer.ip().to_string().into();
        let service = service_fn(move |request| {
            let app = app.clone();
            let submitter = submitter.clone();
            let peer = peer.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    routes::handle(app, submitter, peer, request.map(linger::Body::new)).await,
                )
            }
        });
        let mut builder = http1::Builder::new();
        // A client may shut down its sending side once its request is sent (`nc -N`, some
        // HTTP/1.0 clients): the request is still answered (without this, hyper dropped it at
        // the end of input, and a transfer could be executed unanswered).
        builder
            .keep_alive(true)
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES);
        match &tls {
            None => {
                let watched =
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tasks.spawn(async move {
                    count_malformed(&counting, watched.await);
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = config.header_read_timeout;
                let watcher = graceful.watcher();
                tasks.spawn(async move {
                    // The handshake is bounded like a request's headers (slow clients are cut).
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                    {
                        let served = watcher
                            .watch(builder.serve_connection(TokioIo::new(stream), service))
                            .await;
                        count_malformed(&counting, served);
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    pruning.abort();
    // Long polls and read-your-writes waits answer now, with what there is.
    app.views.close();
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        // A request still running (a body trickling in, an outcome awaited) is cut: its
        // caller gets no answer, which it must treat as "unknown" and retry with the same
        // transaction id, as after any lost connection. Without this the engine's shutdown
        // waited for it, up to the request timeout.
        tracing::warn!(
            connections = tasks.len(),
            "some connections did not finish within 10 s; closing them"
        );
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
    drop(app);
    let ledger = tokio::task::spawn_blocking(move || engine.shutdown()).await??;
    tracing::info!(
        next_seq = ledger.next_seq(),
        state_hash = format!("{:016x}", ledger.state_hash()),
        "stopped"
    );
    if let Some(reason) = shared.halt_reason() {
        anyhow::bail!("the engine halted: {reason}");
    }
    Ok(())
}

/// Closes a connection whose writes make no progress for `limit` (the request timeout): a
/// client that sends requests and never reads the answers would otherwise hold its
/// connection slot for good (hyper's header timer does not run while it writes), and enough
/// of them would shut every other client out.
struct WriteStallLimit<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write or flush first returns `Pending`; cleared by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStallLimit<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteStallLimit {
            inner,
            limit,
            stalled: None,
        }
    }

    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        result: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for the request timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStallLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStallLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, result)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, result)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, result)
    }
}

const PHASE_LEDGER: u8 = 0;
const PHASE_STOPPING: u8 = 1;

/// Builds the read views' past (outcomes and history of every record before `end`, the
/// sequence where the engine started) on a background thread at low priority, while the server
/// already executes; then merges it and prints `ready`. Until then status and history reads
/// answer 503 and `/readyz` says so. The journal is read with `JournalTail`, which is made for
/// a journal that is being appended to.
fn spawn_views_past(
    views: Arc<Views>,
    positions: Arc<metrics::TailPositions>,
    dir: PathBuf,
    end: u64,
    shared: Arc<crate::engine::EngineShared>,
) {
    let failing = views.clone();
    // Two threads: the build, long, at a low priority (`lower_priority`) so that it yields to
    // the engine and the requests; and this one, which merges the past in at the normal
    // priority, because the merge holds the views' write lock, which the reply stage takes for
    // every durable batch: at nice 10 on a busy machine the merge got about a tenth of a core
    // while every acknowledgement waited for it.
    let spawned = std::thread::Builder::new()
        .name("wallet-views-past".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let build = std::thread::Builder::new()
                .name("wallet-views-build".into())
                .spawn(move || {
                    crate::engine::follower::lower_priority();
                    // Tests: `views-past-delay:<ms>` holds the views' past back that long (the
                    // window after a restart in which they do not know the journal's outcomes
                    // yet).
                    if let Some(ms) = crate::replicate::failpoint_value("views-past-delay") {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    crate::replicate::failpoint_panic("views-past-panic");
                    build_views_past(&dir, end)
                });
            // A panic in the build would leave the views "still loading" for good: it fails
            // them as an error does, and readers are told so.
            let built = match build {
                Ok(handle) => handle.join().unwrap_or_else(|payload| {
                    Err(anyhow::anyhow!(
                        "the read views' builder panicked: {}",
                        crate::engine::panic_text(payload.as_ref())
                    ))
                }),
                Err(e) => Err(anyhow::anyhow!(
                    "could not start the read views' builder: {e}"
                )),
            };
            match built {
                Ok((past, passed)) => {
                    // Tests: `views-merge-delay:<ms>` holds this thread that long before the
                    // merge (its priority can be read meanwhile).
                    if let Some(ms) = crate::replicate::failpoint_value("views-merge-delay") {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    // A panic in the merge leaves the views poisoned part-way: every answer
                    // would be 503 while writes still commit. It halts the engine, as a panic
                    // applying a batch to the views does.
                    let merged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        positions.index(&passed);
                        crate::replicate::failpoint_panic("views-merge-panic");
                        views.merge_past(past);
                    }));
                    if let Err(payload) = merged {
                        shared.halt(format!(
                            "merging the read views' past panicked: {}",
                            crate::engine::panic_text(payload.as_ref())
                        ));
                        return;
                    }
                    tracing::info!(
                        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                        "read views complete (outcomes and history of the whole journal)"
                    );
                    println!("ready");
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    tracing::error!(
                        error = reason,
                        "building the read views from the journal failed: status and history reads stay unavailable"
                    );
                    views.fail_past(reason);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the read views' builder");
        failing.fail_past(format!("could not start the read views' builder: {e}"));
    }
}

/// The views' past, and the journal positions the build passed (one per fetch of up to 65,536
/// events): an event-stream read from before the start resumes at the nearest one instead of
/// scanning its segment from the start (tens of milliseconds into a 64 MiB segment, hundreds
/// into a 1 GiB one, for every such read).
fn build_views_past(
    dir: &std::path::Path,
    end: u64,
) -> anyhow::Result<(crate::views::Past, Vec<crate::journal::tail::TailPosition>)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    const AHEAD: usize = 8;
    /// How far (in outcomes) the helper populates outcome storage ahead of the builder.
    const POPULATE_AHEAD: usize = 1 << 17;
    // About one outcome per record; no more records than events before `end`.
    let expected = crate::journal::estimate_records(dir, 1)
        .min(usize::try_from(end.saturating_sub(1)).unwrap_or(usize::MAX));
    let mut past = crate::views::Past::with_capacity(expected);
    // The outcome index, then its storage: on the VM this was measured on, the kernel zeroing
    // fresh pages as outcomes were stored was a third of the build's time; a helper thread
    // (at this thread's low priority, which it inherits) populates them ahead instead.
    let ranges = past.reserved_memory();
    let head = ranges.first().map_or(0, |r| r.1);
    let filled = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut passed = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Dropped on any exit from this closure (an error or a panic included), before the
        // scope joins the helper.
        let _stop_on_exit = crate::alloc::SetOnDrop(&stop);
        // SAFETY: the ranges are `past`'s outcome index and the unfilled part of its storage
        // blocks, and `past` outlives this scope. Storage blocks are allocated whole and never
        // move; the index moves only when it grows: before each batch this thread checks that
        // one outcome per record fits without growing (`Past::fits`), and otherwise stops and
        // joins the helper first.
        let mut helper = unsafe {
            crate::alloc::spawn_populate_ahead(
                scope,
                &ranges,
                head,
                crate::views::OUTCOME_BYTES,
                POPULATE_AHEAD,
                &filled,
                &stop,
            )
        };
        let mut tail = crate::journal::tail::JournalTail::new(dir);
        let mut records = Vec::new();
        // Everything before `end` was durable when the engine started, so an empty read or an
        // error is transient (a read racing the writer's rewrite of `journal/durable`, say)
        // unless it lasts: retried for this long without progress, then reported.
        const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
        let mut progressed = std::time::Instant::now();
        while tail.next_seq() < end {
            records.clear();
            let fetched = tail.fetch_records(1 << 16, &mut records);
            if let Err(e) = &fetched
                && (e.is::<crate::journal::tail::JournalGap>()
                    || e.is::<crate::journal::tail::JournalDamage>())
            {
                return fetched;
            }
            if records.is_empty() {
                if progressed.elapsed() > PATIENCE {
                    fetched?;
                    anyhow::bail!(
                        "the journal yields nothing after sequence {} (the engine started at {end})",
                        tail.next_seq()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            progressed = std::time::Instant::now();
            passed.extend(tail.position());
            let before_end = records.partition_point(|r| r.first_seq < end);
            let records = &records[..before_end];
            if helper.is_some() && !past.fits(records.len()) {
                crate::alloc::stop_populating(&stop, &mut helper);
            }
            for (i, record) in records.iter().enumerate() {
                if let Some(ahead) = records.get(i + AHEAD) {
                    past.prefetch(ahead);
                }
                past.apply(record);
            }
            filled.store(past.len(), Ordering::Release);
        }
        crate::alloc::stop_populating(&stop, &mut helper);
        Ok(())
    })?;
    Ok((past, passed))
}

/// Counts a connection that ended on a request hyper refused before routing it (a request line
/// or header it cannot parse, a head too large): answered 400 or 431 by hyper itself, so not in
/// `wallet_http_requests_total`.
fn count_malformed(app: &App, served: Result<(), hyper::Error>) {
    if served.is_err_and(|e| e.is_parse()) {
        app.http_malformed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves one connection accepted during recovery with `routes::starting_response`.
fn serve_starting(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    phase: Arc<std::sync::atomic::AtomicU8>,
    config: &ServeConfig,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let header_read_timeout = config.header_read_timeout;
    let loopback_only = config.auth.is_none();
    let peer = peer.ip().to_string();
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let phase = match phase.load(Ordering::Relaxed) {
            PHASE_LEDGER => "replaying the journal",
            _ => "stopping",
        };
        let response = routes::starting_response(&request, loopback_only, &peer, phase);
        // Unread: drained after the answer rather than cut off (`linger`).
        let body = linger::Body::new(request.into_body());
        async move {
            drop(body);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES);
    tokio::spawn(async move {
        let _permit = permit;
        match tls {
            None => {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
            Some(acceptor) => {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await
                {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        }
    });
}

/// Connections over `--max-connections` answered 503 at the same time, at most.
const OVER_LIMIT_ANSWERS: usize = 64;

/// How long a connection over the connection limit has to send its request head, to be served
/// if it asks for an operations route; then it is answered 503 anyway.
const OVER_LIMIT_HEAD_WAIT: Duration = Duration::from_millis(100);

/// The answer to a connection over the connection limit: an operations route (`/healthz`,
/// `/readyz`, `/metrics`: `routes::operations_over_limit`) asked for within
/// `OVER_LIMIT_HEAD_WAIT` is answered, anything else 503 with `Retry-After`, then close. The
/// request is read (for up to 250 ms) after the answer is written and the write side shut, so
/// that closing with it unread does not reset the connection before the client has read the
/// answer.
async fn answer_over_limit<S>(mut stream: S, app: Arc<App>, peer: Arc<str>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + OVER_LIMIT_HEAD_WAIT;
    let mut operations = None;
    while head.len() < 8192 {
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut head)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                operations = routes::operations_over_limit(&app, &peer, &request);
                break;
            }
            Err(_) => break,
        }
    }
    // The error shape of every other answer, so that a client reads its code.
    const BODY: &str = r#"{"error":{"code":"too_many_connections","message":"the server holds as many connections as --max-connections allows; retry after Retry-After"}}"#;
    let answer = operations.unwrap_or_else(|| {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_bytes()
    });
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        if stream.write_all(&answer).await.is_ok() && stream.shutdown().await.is_ok() {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    // An empty or garbage file yields no certificate (rustls then said "peer sent no
    // certificates", naming neither the flag nor the file).
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-cert {}: no PEM certificate in the file",
        cert.display()
    );
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert {} with --tls-key {}: {e} (is the key the certificate's?)",
                cert.display(),
                key_path.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds, prints the address (tests read it), serves until SIGTERM or Ctrl-C.
pub async fn run(mut config: ServeConfig, listen: SocketAddr) -> anyhow::Result<()> {
    // Signal handlers go in before the address is announced, so that a SIGTERM right after
    // start-up is a graceful shutdown too, not the default kill.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    config.check()?;
    config.max_connections = fit_connections_to_fd_limit(config.max_connections);
    if config.auth.is_none() {
        anyhow::ensure!(
            listen.ip().is_loopback(),
            "refusing to serve on {listen} without authentication: configure --jwt-secret or --jwt-public-key (--auth none is for loopback only)"
        );
        tracing::warn!(
            "authentication is OFF (--auth none, loopback only): every local caller may move any money"
        );
    }
    // The data directory first: a second server on it is refused before it announces an
    // address (a supervisor waiting for "listening on" would take it for started).
    let lock = lock_data_dir(&config.data_dir)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    let address = listener.local_addr()?;
    // The leadership first: an engine that is not the leader never recovers or serves.
    let (leadership, zk_session) = match &config.zk_leader {
        Some((zk, root)) => {
            anyhow::ensure!(
                !address.ip().is_unspecified(),
                "--zk-leader registers the --listen address for others to reach: {address} is not one (listen on a specific address)"
            );
            let registered = address.to_string();
            let claim = claim_leadership(
                zk,
                root,
                &registered,
                config.writes_fenced.clone(),
                config.leader_lease.clone(),
            );
            // A stop asked for while ZooKeeper is awaited (a previous run's session, an
            // unreachable server) is a stop now, not after the wait (which could even end
            // with this engine taking the leadership on its way out).
            let (task, session) = tokio::select! {
                claimed = claim => claimed?,
                _ = terminate.recv() => {
                    tracing::info!("stopped (SIGTERM) while claiming the engine leadership");
                    return Ok(());
                }
                _ = interrupt.recv() => {
                    tracing::info!("stopped (SIGINT) while claiming the engine leadership");
                    return Ok(());
                }
            };
            (Some(task), Some(session))
        }
        None => (None, None),
    };
    let leadership_abort = leadership.as_ref().map(|t| t.abort_handle());
    println!("listening on {address}");
    tracing::info!(%address, data_dir = %config.data_dir.display(), sync = ?config.sync, "wallet serve");
    let lost = Arc::new(std::sync::Mutex::new(None));
    let shutdown = {
        let lost = lost.clone();
        async move {
            let leadership_lost = async {
                match leadership {
                    Some(task) => task
                        .await
                        .unwrap_or_else(|e| format!("the leadership task failed: {e}")),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
                reason = leadership_lost => {
                    tracing::error!(%reason, "lost the engine leadership: stopping");
                    if let Ok(mut lost) = lost.lock() {
                        *lost = Some(reason);
                    }
                }
            }
        }
    };
    let served = serve(config, lock, listener, shutdown).await;
    // Close the ZooKeeper session now, so that the leader node goes at once (not after the
    // session timeout, which would keep a successor out for that long).
    if let Some(abort) = leadership_abort {
        abort.abort();
    }
    if let Some(session) = zk_session {
        let mut state = session.state_watcher();
        drop(session);
        let closed = async { while !state.changed().await.is_terminated() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
    }
    served?;
    match lost.lock().ok().and_then(|mut l| l.take()) {
        Some(reason) => anyhow::bail!("stopped serving: lost the engine leadership: {reason}"),
        None => Ok(()),
    }
}

/// The largest request head (request line and headers) read: a larger one is answered 431
/// once that much is in. (Without it, hyper buffered up to its read buffer's limit, about
/// 400 KB, and unauthenticated connections that never finished their heads held that much
/// each: 1,000 of them held 400 MB.)
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// File descriptors kept back from client connections: the journal's segments (a roll-over
/// opens the next one, and a failure there halts the engine), the event stream's journal
/// reads, the snapshot follower, ZooKeeper and replicator connections, the over-limit answers
/// (`OVER_LIMIT_ANSWERS`) and the runtime's own.
const FDS_KEPT_BACK: u64 = 256;

/// The most connections `serve` takes (`--max-connections`, `requested`) that fit under the
/// process's open-file limit with `FDS_KEPT_BACK` to spare, after raising the soft limit to the
/// hard one. Connections past the limit were accepted until `accept` failed, and the next
/// segment of the journal could then not be opened: a flood of connections halted the engine.
fn fit_connections_to_fd_limit(requested: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "reading the open-file limit failed; --max-connections is taken as given");
        return requested;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let fits = usize::try_from(limit.rlim_cur.saturating_sub(FDS_KEPT_BACK)).unwrap_or(usize::MAX);
    if requested <= fits {
        return requested;
    }
    let fits = fits.max(1);
    tracing::warn!(
        max_connections = requested,
        open_file_limit = limit.rlim_cur,
        hard_limit = limit.rlim_max,
        taken = fits,
        "--max-connections does not fit under the open-file limit with {FDS_KEPT_BACK} descriptors kept for the journal and the server: {fits} connections at most are taken, and more are answered 503 too_many_connections (raise the limit: ulimit -n, LimitNOFILE= under systemd)"
    );
    fits
}

/// How long `serve --zk-leader` waits at start for a leader node naming its own address (a
/// crashed previous run's) to go, at least: beyond the session timeout and the server's expiry
/// tick. Twice the session timeout the server negotiated when that is longer (a previous run
/// under the same server settings had the same).
const PREVIOUS_RUN_PATIENCE: Duration = Duration::from_secs(20);

/// Claims the engine leadership in ZooKeeper for `address` and registers the front end; the
/// returned task keeps both and ends (with the reason) only if another engine takes over.
async fn claim_leadership(
    zk: &str,
    root: &str,
    address: &str,
    fenced: Arc<std::sync::atomic::AtomicBool>,
    lease: Arc<crate::replicate::zk::Lease>,
) -> anyhow::Result<(tokio::task::JoinHandle<String>, zookeeper_client::Client)> {
    use crate::replicate::zk::{self, Layout, Leader};
    let layout = Layout::new(root)?;
    let client = zk::connect_patiently(zk, Duration::from_secs(10)).await?;
    let length = lease.fit_to_session(client.session_timeout());
    if length < zk::LEADER_LEASE {
        tracing::warn!(session_timeout = ?client.session_timeout(), lease = ?length, "ZooKeeper negotiated a session timeout below 6 s: the engine's write lease is shortened to half of it");
    }
    // A node naming this address is this engine's previous run's (nothing else can listen
    // here): a crash leaves it until its session expires (about 6 s), and a restart by a
    // supervisor waits it out instead of failing.
    let waiting_since = std::time::Instant::now();
    let patience = PREVIOUS_RUN_PATIENCE.max(client.session_timeout() * 2);
    let mut told = false;
    loop {
        let asked = std::time::Instant::now();
        match zk::claim_engine_leader(&client, &layout, address).await? {
            Leader::Us => {
                lease.renew_from(asked);
                break;
            }
            Leader::Other(holder) if holder == address && waiting_since.elapsed() < patience => {
                if !std::mem::replace(&mut told, true) {
                    tracing::warn!(node = %layout.engine_leader(), session_timeout = ?client.session_timeout(), waiting_at_most = ?patience, "the leader node names this address: a previous run's session, not expired yet; waiting for it");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Leader::Other(holder) if holder == address => anyhow::bail!(
                "the leader node {} names this address ({holder}) but another session, still {patience:?} after start (the session timeout is {:?}): another process on this host claimed this address for the same --zk-root?",
                layout.engine_leader(),
                client.session_timeout()
            ),
            Leader::Other(holder) => anyhow::bail!(
                "another engine ({holder}) is the leader at {}: stop it first, or use another --zk-root (if it crashed, its node goes when its session expires, about {:?} after it died)",
                layout.engine_leader(),
                client.session_timeout()
            ),
        }
    }
    zk::register_api(&client, &layout, address).await?;
    tracing::info!(%address, node = %layout.engine_leader(), "engine leader");
    let session = client.clone();
    let task = tokio::spawn(zk::keep_engine_leadership(
        zk.to_string(),
        layout,
        address.to_string(),
        client,
        fenced,
        lease,
    ));
    Ok((task, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply stage wakes a batch's callers before the waits on the views: with a thousand
    /// long polls of the event stream parked, a payer's answer waited behind all of them
    /// (30-37 ms against 1-2 ms with none).
    #[test]
    fn a_batchs_callers_are_woken_before_the_waits_on_the_views() {
        use crate::core::{AccountId, Command, CommandKind, Ledger, LedgerConfig, TransactionId};
        use std::task::{Context, Wake, Waker};
        struct Woken(&'static str, Arc<std::sync::Mutex<Vec<&'static str>>>);
        impl Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.1.lock().expect("order").push(self.0);
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let mut ledger = Ledger::new(LedgerConfig::default());
        let views = Views::from_ledger(&ledger);
        let waiters = Arc::new(Waiters::new(4));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waker = |name| Waker::from(Arc::new(Woken(name, order.clone())));

        let mut poll = Box::pin(views.wait_for(1, Duration::from_secs(60)));
        let poll_waker = waker("long poll");
        assert!(
            poll.as_mut()
                .poll(&mut Context::from_waker(&poll_waker))
                .is_pending()
        );
        let (slot, mut receiver) = waiters.wait_single().expect("a slot");
        let caller_waker = waker("caller");
        assert!(
            std::pin::Pin::new(&mut receiver)
                .poll(&mut Context::from_waker(&caller_waker))
                .is_pending()
        );

        let record = ledger.execute(&Command {
            transaction_id: TransactionId(7),
            timestamp_ns: 1,
            kind: CommandKind::OpenAccount {
                account: AccountId::new("a").expect("id"),
            },
        });
        let mut sink = ApiSink {
            views: views.clone(),
            waiters: waiters.clone(),
            batch: vec![record],
            pending: vec![(
                crate::api::waiters::token(slot, 0),
                Delivered {
                    record,
                    durable: true,
                },
            )],
        };
        sink.flush();
        assert_eq!(*order.lock().expect("order"), ["caller", "long poll"]);
        assert_eq!(views.applied_seq(), 1);
    }

    #[test]
    fn the_automatic_id_limit_fills_three_quarters_of_ram_within_the_tables_reach() {
        let gib = 1u64 << 30;
        // This machine class: 24 GiB at 256 bytes per id, 320 with the snapshot follower.
        assert_eq!(auto_max_transaction_ids(24 * gib, false), 75_497_472);
        assert_eq!(auto_max_transaction_ids(24 * gib, true), 60_397_977);
        // The 32-bit indices bound it on a large machine, and a tiny one still serves.
        assert_eq!(
            auto_max_transaction_ids(4096 * gib, false),
            MAX_TRANSACTION_IDS
        );
        assert_eq!(auto_max_transaction_ids(100, false), 1);
        let total = mem_total_bytes().expect("MemTotal from /proc/meminfo");
        assert!(total >= 64 << 20, "{total} bytes of RAM");
    }
}
