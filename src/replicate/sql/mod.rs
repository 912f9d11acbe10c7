//! PostgreSQL shards written with two-phase commit (see `docs/sql-replication.md`).
//!
//! - [`schema`]: shard connections, the migrations of `migrations/`, the server checks.
//! - [`coordinator`]: gids, the decision record in ZooKeeper, in-doubt recovery.
//! - [`replicator`]: `wallet replicate sql`, one 2PC round per batch over every shard.
//! - [`reconcile`]: `wallet reconcile sql`, the shards against a replay of the journal.
//!
//! Architecture invariant: a shard's rows and its watermark change only inside a prepared
//! transaction whose commit was decided in ZooKeeper first; nothing here writes the journal.

pub mod coordinator;
pub mod reconcile;
pub mod replicator;
pub mod schema;
pub mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::cli::ZkArgs;

/// The most events `--batch-events` takes (about 200 MB of COPY rows on one shard at most).
pub const MAX_BATCH_EVENTS: u64 = 1 << 20;

/// An error that retrying cannot fix (a misconfiguration, another writer, a broken invariant):
/// the replicator stops instead of waiting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Whether `error` may go away by itself (a shard or ZooKeeper down, a connection cut, a
/// timeout), so that waiting and retrying is the right answer.
pub fn is_transient(error: &anyhow::Error) -> bool {
    for cause in error.chain() {
        if cause.downcast_ref::<Fatal>().is_some() {
            return false;
        }
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            let Some(db) = pg.as_db_error() else {
                return driver_error_is_transient(pg);
            };
            return sqlstate_is_transient(db.code().code());
        }
    }
    true
}

/// Connection exceptions, insufficient resources, operator intervention (a shutdown, a
/// terminated backend, a database that refuses connections), serialization and deadlock
/// failures, system errors, a lock not granted in time, and a session the server ended for
/// idling in a transaction (25P03: the replicator was frozen mid-round for longer than two
/// round timeouts; its session is gone, and a new one recovers). Anything else (a constraint
/// violation, bad data, missing objects) would only fail again.
fn sqlstate_is_transient(code: &str) -> bool {
    code == "25P03"
        || ["08", "53", "57", "40", "58", "55"]
            .iter()
            .any(|class| code.starts_with(class))
}

/// A driver error without a server's code is transient when the connection broke (it closed,
/// an I/O error underneath, connecting or a read timed out, a garbled message); the driver's
/// own refusals (TLS that the URL requires and the server does not offer, a password the server
/// asks for and the URL lacks, an authentication method it cannot do, a configuration it
/// rejects, a result of the wrong shape) would only fail again.
fn driver_error_is_transient(pg: &tokio_postgres::Error) -> bool {
    if pg.is_closed() {
        return true;
    }
    // A certificate that does not verify, a handshake rustls rejects (an I/O error that is
    // not one of the link's).
    if tls::is_tls_refusal(pg) {
        return false;
    }
    let text = pg.to_string();
    // An authentication failure may carry an I/O error of the driver's own making (a SCRAM
    // exchange that does not verify): it is a refusal all the same.
    if text.starts_with("authentication error") {
        return false;
    }
    let mut source = std::error::Error::source(pg);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    // tokio-postgres's kinds are private; these two have no cause to recognise them by.
    [
        "timeout waiting for server",
        "unexpected message from server",
    ]
    .iter()
    .any(|kind| text.starts_with(kind))
}

/// For the checks made when a shard is connected: the check failing is fatal, the connection
/// failing while it runs is not.
pub fn fatal_unless_connection(error: anyhow::Error) -> anyhow::Error {
    let from_postgres = error
        .chain()
        .any(|c| c.downcast_ref::<tokio_postgres::Error>().is_some());
    if from_postgres && is_transient(&error) {
        error
    } else {
        Fatal(format!("{error:#}")).into()
    }
}

#[derive(Args)]
pub struct SqlReplicateArgs {
    #[command(flatten)]
    pub zk: ZkArgs,
    /// The engine's data directory (its journal is tailed in place, even while `serve` runs,
    /// durable records only), or an engine URL http://host:port (its /v1/wallet/events stream).
    #[arg(long)]
    pub source: String,
    /// Apply the missing schema migrations (migrations/*.sql) on every shard first.
    #[arg(long)]
    pub migrate: bool,
    /// Most events per two-phase-commit round (whole records, so a transfer is never split),
    /// 2 to 1048576: a shard's rows go out as one COPY message, which PostgreSQL caps at 1 GB,
    /// and a round that can never fit would be retried for ever.
    #[arg(long, default_value_t = 131_072, value_parser = clap::value_parser!(u64).range(2..=MAX_BATCH_EVENTS))]
    pub batch_events: u64,
    /// Stop once every shard has caught up with the end of the journal, and print events/s.
    #[arg(long)]
    pub once: bool,
    /// With --once: how long the shards may fail (one down, rounds failing) without a round
    /// getting through before the run gives up with an error naming the last failure.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_S))]
    pub once_wait_s: u64,
    /// Abandon (and recover) a round that takes longer than this many seconds (1 to 86400).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=MAX_WAIT_S))]
    pub round_timeout_s: u64,
    /// Seconds to wait for ZooKeeper, and for the lock of a replicator that crashed (1 to
    /// 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_WAIT_S))]
    pub zk_patience_s: u64,
    /// CA certificates (PEM) that the shard servers' TLS certificates are checked against:
    /// with it, shards reached over TCP are reached over verified TLS only, unless their URL
    /// says `sslmode=disable` (`sslmode=require` needs it). Without it, no TLS (see
    /// docs/sql-replication.md).
    #[arg(long, env = "WALLET_SHARD_CA")]
    pub shard_ca: Option<PathBuf>,
}

/// The longest wait a replicator's flags may ask for, in seconds (a day): beyond it a deadline
/// computed from the start panicked on overflow (`--zk-patience-s 18446744073709551615`).
pub const MAX_WAIT_S: u64 = 86_400;

#[derive(Args)]
pub struct SqlReconcileArgs {
    #[command(flatten)]
    pub zk: ZkArgs,
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Differences printed in full (all are counted).
    #[arg(long, default_value_t = 100)]
    pub max_printed: usize,
    /// CA certificates (PEM) that the shard servers' TLS certificates are checked against:
    /// with it, shards reached over TCP are reached over verified TLS only, unless their URL
    /// says `sslmode=disable` (`sslmode=require` needs it). Without it, no TLS (see
    /// docs/sql-replication.md).
    #[arg(long, env = "WALLET_SHARD_CA")]
    pub shard_ca: Option<PathBuf>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `wallet replicate sql`.
pub fn run_replicate(args: SqlReplicateArgs) -> anyhow::Result<ExitCode> {
    let options = replicator::ReplicateOptions {
        zk: args.zk.zk,
        zk_root: args.zk.zk_root,
        source: args.source,
        migrate: args.migrate,
        batch_events: args.batch_events as usize,
        once: args.once,
        round_timeout: Duration::from_secs(args.round_timeout_s),
        zk_patience: Duration::from_secs(args.zk_patience_s),
        shard_ca: args.shard_ca.as_deref().map(tls::load_ca).transpose()?,
        once_wait: Duration::from_secs(args.once_wait_s),
    };
    let report = match runtime()?.block_on(replicator::run(&options)) {
        // Following: a stop by SIGTERM (a supervisor) or ^C is the way it ends, not a failure.
        // Under --once, the run did not reach its end: an error.
        Err(e) if !options.once && e.is::<replicator::StoppedBySignal>() => {
            eprintln!("{e}; the lock is released");
            return Ok(ExitCode::SUCCESS);
        }
        result => result?,
    };
    println!(
        "replicated {} events ({} transfers, sequences {}..{}) into {} SQL shards in {} rounds in {:.3} s: {:.0} events/s, {:.0} transfers/s (batch {} events)",
        report.events,
        report.transfers,
        report.start_seq + 1,
        report.end_seq,
        report.shards,
        report.rounds,
        report.elapsed.as_secs_f64(),
        report.per_second(report.events),
        report.per_second(report.transfers),
        options.batch_events,
    );
    Ok(ExitCode::SUCCESS)
}

/// `wallet reconcile sql`: exit status 1 on any difference.
pub fn run_reconcile(args: SqlReconcileArgs) -> anyhow::Result<ExitCode> {
    Ok(crate::replicate::reconcile_exit_code(reconcile_shards(
        args,
    )))
}

/// `wallet reconcile sql`'s comparison: the count of differences.
fn reconcile_shards(args: SqlReconcileArgs) -> anyhow::Result<u64> {
    let options = reconcile::ReconcileOptions {
        zk: args.zk.zk,
        zk_root: args.zk.zk_root,
        data_dir: args.data_dir,
        max_printed: args.max_printed,
        shard_ca: args.shard_ca.as_deref().map(tls::load_ca).transpose()?,
    };
    runtime()?.block_on(reconcile::run(&options))
}

#[cfg(test)]
mod tests {
    use super::sqlstate_is_transient;

    /// Retried: what waiting or a new session can fix. Not retried: what would only fail
    /// again. 25P03 (a session ended for idling in a transaction) is retried; the other codes
    /// of its class (an invalid transaction state of the replicator's own making) are not.
    #[test]
    fn server_errors_are_retried_only_when_waiting_can_fix_them() {
        for code in [
            "08006", "53300", "57P01", "40001", "40P01", "58030", "55P03", "25P03",
        ] {
            assert!(sqlstate_is_transient(code), "{code} must be retried");
        }
        for code in [
            "23505", "22P02", "42P01", "42704", "25001", "25P02", "XX000",
        ] {
            assert!(
                !sqlstate_is_transient(code),
                "{code} must stop the replicator"
            );
        }
    }
}
