//! `wallet replicate sql`: the journal projected into sharded PostgreSQL, one two-phase commit
//! round per batch of many events.
//!
//! A round, for a batch of whole records ending at sequence `B`:
//!
//! 1. On every shard's own connection: `BEGIN`, `COPY` the entries and transfers, upsert the
//!    balances, move the watermark row from its current value to `B` (checked), then
//!    `PREPARE TRANSACTION 'wallet_{id}_{epoch}_{B}_{shard}'`.
//! 2. Record the decision (`decided_batch = B` and the round's gids) in ZooKeeper: durable
//!    before anything commits.
//! 3. `COMMIT PREPARED` on every shard's own connection.
//!
//! Any error drops every connection; each shard is then reconnected with backoff, and every
//! new connection first runs the in-doubt recovery (commit what was decided, roll back the
//! rest) and re-reads its watermark. The batch is kept and retried from there, skipping on each
//! shard what its watermark says it already has: an event is applied exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::SinkExt;
use futures_util::future::{join_all, try_join_all};
use tokio_postgres::Client;

use super::coordinator::{self, Coordinator, gid_statement};
use super::schema::{self, Shard};
use super::{Fatal, fatal_unless_connection, is_transient};
use crate::core::{CommandRecord, CommandType, Currency, EventKind};
use crate::replicate::hash::partition_of;
use crate::replicate::source::{RecordId, Source};
use crate::replicate::zk::{self, Layout};
use crate::replicate::{failpoint, failpoint_armed};

#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    pub zk: String,
    pub zk_root: String,
    /// The engine's data directory (its journal is tailed in place), or an engine URL
    /// `http://host:port` (its `/v1/wallet/events` stream).
    pub source: String,
    /// Apply the missing migrations on every shard at start.
    pub migrate: bool,
    /// Most events per two-phase-commit round (whole records: a transfer is never split).
    pub batch_events: usize,
    /// Stop once every shard has caught up with the end of the journal.
    pub once: bool,
    /// A round that takes longer than this is abandoned (and its shards recovered).
    pub round_timeout: Duration,
    /// How long to wait for ZooKeeper and for the lock held by a crashed replicator.
    pub zk_patience: Duration,
    /// `--shard-ca`, loaded.
    pub shard_ca: Option<super::tls::ShardTls>,
    /// With `once`: how long the shards may fail (a shard down, rounds failing) without a
    /// round getting through before the run gives up with the last error.
    pub once_wait: Duration,
}

/// Under `--once`, the first failure of the shards since the last round that got through: a
/// run that cannot finish gives up after `once_wait` instead of waiting for good (a catch-up
/// run from cron would hang, and the next one fail on the lock).
fn give_up_under_once(
    options: &ReplicateOptions,
    failing_since: &mut Option<Instant>,
    error: anyhow::Error,
) -> anyhow::Result<anyhow::Error> {
    if !options.once {
        return Ok(error);
    }
    let since = *failing_since.get_or_insert_with(Instant::now);
    if since.elapsed() >= options.once_wait {
        return Err(error.context(format!(
            "the shards have failed for {:.1} s without a round getting through; giving up (--once, --once-wait-s {})",
            since.elapsed().as_secs_f64(),
            options.once_wait.as_secs()
        )));
    }
    Ok(error)
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// The common watermark at start, and at the end.
    pub start_seq: u64,
    pub end_seq: u64,
    /// Events and committed transfers of the journal between `start_seq` and `end_seq`: what
    /// this run brought the shards up to, by its own rounds or by recovering one of them that
    /// a failure left in doubt. (Counted from the rounds alone, a recovered round's events were
    /// left out, and a transfer counted only where its debit's shard was behind.)
    pub events: u64,
    pub transfers: u64,
    /// Rounds this run committed itself (not those recovered after a failure).
    pub rounds: u64,
    pub shards: usize,
    /// From the first round to the last.
    pub elapsed: Duration,
}

impl Report {
    pub fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Account names and shards by the engine's dense account index.
#[derive(Default)]
struct Directory {
    names: Vec<Box<str>>,
    shards: Vec<u32>,
}

impl Directory {
    fn learn(&mut self, records: &[CommandRecord], shard_count: usize) -> anyhow::Result<()> {
        for record in records {
            for event in record.events() {
                if event.kind == EventKind::AccountOpened {
                    if event.account as usize != self.names.len() {
                        bail!(
                            "journal sequence {}: account index {} opened, expected {}",
                            event.seq,
                            event.account,
                            self.names.len()
                        );
                    }
                    let name = record.opened_account.as_str();
                    self.names.push(name.into());
                    self.shards.push(partition_of(name, shard_count) as u32);
                }
            }
        }
        Ok(())
    }

    /// The accounts of `ledger` (a snapshot of the engine), by index.
    fn from_ledger(ledger: &crate::core::Ledger, shard_count: usize) -> anyhow::Result<Directory> {
        let mut directory = Directory::default();
        for index in 0..ledger.account_count() {
            let name = ledger
                .account_name(index)
                .ok_or_else(|| anyhow::anyhow!("snapshot: account index {index} has no id"))?;
            directory.names.push(name.as_str().into());
            directory
                .shards
                .push(partition_of(name.as_str(), shard_count) as u32);
        }
        Ok(directory)
    }

    fn get(&self, account: u32, seq: u64) -> anyhow::Result<(&str, usize)> {
        match (
            self.names.get(account as usize),
            self.shards.get(account as usize),
        ) {
            (Some(name), Some(shard)) => Ok((name, *shard as usize)),
            _ => bail!("journal sequence {seq}: account index {account} was never opened"),
        }
    }
}

/// One shard's part of a round.
#[derive(Default)]
struct ShardRows {
    /// `COPY entries ... FROM STDIN` text.
    entries: Vec<u8>,
    entry_count: usize,
    transfers: Vec<u8>,
    transfer_count: usize,
    /// (account, currency) -> (balance after, sequence), the newest in the batch.
    balances: HashMap<(u32, Currency), (u64, u64)>,
}

const ENTRY_COLUMNS: &str = "COPY entries (seq, transaction_id, account_id, currency, kind, amount, balance_after, timestamp_ns) FROM STDIN";
const TRANSFER_COLUMNS: &str = "COPY transfers (transaction_id, from_account, to_account, amount, currency, outcome, seq, timestamp_ns) FROM STDIN";
const UPSERT_BALANCES: &str = "INSERT INTO balances (account_id, currency, balance, last_seq) \
     SELECT a, c, b::numeric, s FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS t(a, c, b, s) \
     ON CONFLICT (account_id, currency) DO UPDATE SET balance = EXCLUDED.balance, last_seq = EXCLUDED.last_seq \
     WHERE balances.last_seq < EXCLUDED.last_seq";

/// Splits `records` into each shard's rows, leaving out on each shard what its watermark says
/// it already holds. The rows follow from the records alone, so an error (a record of an
/// unexpected shape, an account the directory never saw opened) would only come again: it is
/// `Fatal`, not a round to retry forever.
fn build_rows(
    records: &[CommandRecord],
    directory: &Directory,
    watermarks: &[u64],
) -> anyhow::Result<(Vec<ShardRows>, u64)> {
    split_rows(records, directory, watermarks).map_err(|e| Fatal(format!("{e:#}")).into())
}

fn split_rows(
    records: &[CommandRecord],
    directory: &Directory,
    watermarks: &[u64],
) -> anyhow::Result<(Vec<ShardRows>, u64)> {
    use std::io::Write;
    let mut rows: Vec<ShardRows> = watermarks.iter().map(|_| ShardRows::default()).collect();
    let mut transfers = 0u64;
    for record in records {
        let transaction = uuid::Uuid::from_u128(record.transaction_id.0);
        for event in record.events() {
            let sign = match event.kind {
                EventKind::Deposited | EventKind::Credited => "",
                EventKind::Withdrawn | EventKind::Debited => "-",
                EventKind::AccountOpened | EventKind::Rejected | EventKind::Checkpoint => continue,
            };
            let (name, shard) = directory.get(event.account, event.seq)?;
            if event.seq <= watermarks[shard] {
                continue;
            }
            let out = &mut rows[shard];
            writeln!(
                out.entries,
                "{}\t{}\t{}\t{}\t{}\t{}{}\t{}\t{}",
                event.seq,
                transaction.hyphenated(),
                name,
                event.currency,
                event.kind.name(),
                sign,
                event.amount,
                event.balance_after,
                record.timestamp_ns.min(i64::MAX as u64),
            )?;
            out.entry_count += 1;
            out.balances.insert(
                (event.account, event.currency),
                (event.balance_after, event.seq),
            );
        }
        if record.command_type == CommandType::Transfer && record.is_committed() {
            let [debit, credit] = match record.events() {
                [d, c] if d.kind == EventKind::Debited && c.kind == EventKind::Credited => [d, c],
                other => bail!(
                    "journal sequence {}: a committed transfer with events {:?}",
                    record.first_seq,
                    other.iter().map(|e| e.kind).collect::<Vec<_>>()
                ),
            };
            let (from, shard) = directory.get(debit.account, debit.seq)?;
            let (to, _) = directory.get(credit.account, credit.seq)?;
            if debit.seq > watermarks[shard] {
                let out = &mut rows[shard];
                writeln!(
                    out.transfers,
                    "{}\t{from}\t{to}\t{}\t{}\tcommitted\t{}\t{}",
                    transaction.hyphenated(),
                    debit.amount,
                    debit.currency,
                    debit.seq,
                    record.timestamp_ns.min(i64::MAX as u64),
                )?;
                out.transfer_count += 1;
                transfers += 1;
            }
        }
    }
    Ok((rows, transfers))
}

async fn copy_in(client: &Client, statement: &str, data: Vec<u8>) -> anyhow::Result<()> {
    let sink = client.copy_in::<_, Bytes>(statement).await?;
    // Tests: frozen with the server reading COPY data (the entries' rows already inserted).
    if statement == TRANSFER_COLUMNS {
        crate::replicate::failpoint_stop("sql-stop-in-copy");
    }
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(data)).await?;
    sink.finish().await?;
    Ok(())
}

/// A round session's `application_name` is this and the coordinator's epoch (with a 32-digit
/// id, 50 of the 63 bytes the server keeps).
fn session_prefix(coordinator_id: &str) -> String {
    format!("wallet-sql-round {coordinator_id} ")
}

/// Phase one on one shard: everything up to `PREPARE TRANSACTION`.
async fn prepare_shard(
    client: &Client,
    directory: &Directory,
    rows: ShardRows,
    from: u64,
    to: u64,
    record: &str,
    gid: &str,
) -> anyhow::Result<()> {
    let prepare = gid_statement("PREPARE TRANSACTION", gid)?;
    client.batch_execute("BEGIN").await?;
    if rows.entry_count > 0 {
        copy_in(client, ENTRY_COLUMNS, rows.entries).await?;
    }
    if rows.transfer_count > 0 {
        copy_in(client, TRANSFER_COLUMNS, rows.transfers).await?;
    }
    if !rows.balances.is_empty() {
        let mut accounts = Vec::with_capacity(rows.balances.len());
        let mut currencies = Vec::with_capacity(rows.balances.len());
        let mut balances = Vec::with_capacity(rows.balances.len());
        let mut seqs = Vec::with_capacity(rows.balances.len());
        for ((account, currency), (balance, seq)) in &rows.balances {
            accounts.push(directory.get(*account, *seq)?.0);
            currencies.push(currency.to_string());
            balances.push(balance.to_string());
            seqs.push(i64::try_from(*seq)?);
        }
        client
            .execute(UPSERT_BALANCES, &[&accounts, &currencies, &balances, &seqs])
            .await?;
    }
    let moved = client
        .execute(
            "UPDATE watermark SET applied_seq = $1, updated_at = now(), \
             applied_record = CASE WHEN $1 = $2 THEN applied_record ELSE $3 END \
             WHERE applied_seq = $2",
            &[&i64::try_from(to)?, &i64::try_from(from)?, &record],
        )
        .await?;
    if moved != 1 {
        return Err(Fatal(format!(
            "the watermark of {gid}'s shard is no longer {from}: another writer is at work"
        ))
        .into());
    }
    crate::replicate::failpoint_stop("sql-stop-before-prepare");
    client.batch_execute(&prepare).await?;
    Ok(())
}

/// Rolls back the round's prepared transactions on `shards`, which are never to be committed.
/// A failure is only logged: the next recovery rolls back what is left.
async fn roll_back(clients: &[&Client], gids: &[String], shards: impl IntoIterator<Item = usize>) {
    for i in shards {
        if let Err(e) =
            coordinator::finish_prepared(clients[i], "ROLLBACK PREPARED", &gids[i]).await
        {
            tracing::warn!(gid = %gids[i], error = %format!("{e:#}"), "rolling back a prepared transaction of a round that stops the replicator failed; the next recovery rolls it back");
        }
    }
}

struct State {
    shards: Vec<Shard>,
    per_server: HashMap<String, usize>,
    connections: Vec<Option<Client>>,
    watermarks: Vec<u64>,
    /// Each shard's watermark as first seen, before its first recovery (None until read): the
    /// report counts from there, so that a round this run's recovery committed is counted.
    before_recovery: Vec<Option<u64>>,
    migrated: Vec<bool>,
    migrate: bool,
}

impl State {
    fn drop_connections(&mut self) {
        for c in &mut self.connections {
            *c = None;
        }
    }

    /// Refuses to continue a shard whose watermark row names another record at its
    /// `applied_seq` than the source has there (it was fed by another journal, or by a tail
    /// this journal lost).
    async fn check_identities(&self, source: &mut Source) -> anyhow::Result<()> {
        for (i, client) in self.connections.iter().enumerate() {
            let seq = self.watermarks[i];
            let Some(client) = client else { continue };
            if seq == 0 {
                continue;
            }
            let label = &self.shards[i].label;
            let stored: Option<String> = client
                .query_one("SELECT applied_record FROM watermark", &[])
                .await?
                .try_get(0)?;
            let theirs = stored
                .map(|stored| {
                    RecordId::parse(&stored).map_err(|e| {
                        Fatal(format!("shard {label}: watermark.applied_record: {e:#}"))
                    })
                })
                .transpose()?;
            // An engine URL may be briefly away (`Unavailable`: retried for as long as the
            // source's outage limit allows); a refusal, a bad answer or a journal that cannot
            // be read is not going to get better. Read without a stored identity as well: a
            // source that does not even reach the watermark is refused here, not left to
            // wait, silently, for records that never come.
            let ours = source.record_at(seq).await.map_err(|e| {
                let e = e.context(format!("reading the source's record at sequence {seq}"));
                if e.is::<crate::replicate::source::Unavailable>() {
                    e
                } else {
                    Fatal(format!("{e:#}")).into()
                }
            })?;
            let Some(theirs) = theirs else {
                if ours.is_none() {
                    return Err(Fatal(format!(
                        "SQL shard {i} ({label}) has applied up to sequence {seq}, but the source does not reach it: \
                         wrong source, or a journal that lost its tail"
                    ))
                    .into());
                }
                tracing::warn!(shard = %label, seq, "the watermark row has no applied_record (written by an older replicator): its journal identity cannot be checked; it is written with the next round");
                continue;
            };
            match ours {
                Some((ours, true)) if ours == theirs => {}
                Some((ours, _)) => return Err(Fatal(format!(
                    "SQL shard {i} ({label}) has applied up to sequence {seq}, recorded as {theirs}, but the source's record there is {ours}: \
                     the shard holds data from another journal, or from a tail this journal lost; rebuild it into a new database"
                ))
                .into()),
                None => return Err(Fatal(format!(
                    "SQL shard {i} ({label}) has applied up to sequence {seq} (record {theirs}), but the source does not reach it: \
                     wrong source, or a journal that lost its tail"
                ))
                .into()),
            }
        }
        Ok(())
    }

    /// Connects shard `i`: checks the server and the schema, makes sure the watermark row is
    /// ours, recovers in-doubt transactions, reads the watermark.
    async fn connect_shard(
        &mut self,
        i: usize,
        coordinator: &mut Coordinator,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let shard = self.shards[i].clone();
        let mut client = shard.connect().await?;
        // A transaction this session leaves open (the replicator frozen or cut off between
        // `BEGIN` and `PREPARE`) holds the watermark row's lock and its rows' keys, which a
        // successor's round waits for: the server ends it once it has been idle for two round
        // timeouts (a round never is, while it runs). And a statement that waits half a round
        // timeout for a lock gives up (its round fails and is retried) instead of waiting
        // server-side after its client went away; at half, its error (SQLSTATE 55P03, "lock
        // timeout", with the shard it was preparing on) comes back before the round's own
        // timeout, which says only that the round took too long. At the full round timeout
        // it never did: an operator's open transaction on one shard's rows showed as rounds
        // that "took longer than 60 s", retried for good, naming neither the shard nor a lock.
        let idle_ms = timeout.as_millis().saturating_mul(2).min(i32::MAX as u128);
        let lock_ms = (timeout.as_millis() / 2).clamp(1, i32::MAX as u128);
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {idle_ms}; SET lock_timeout = {lock_ms}"
            ))
            .await?;
        // The idle timeout cannot end a session whose server is in the middle of reading COPY
        // data from a replicator frozen there (it is not idle, and it reads nothing more):
        // its transaction's row locks would hold every successor's round for good. Each
        // session is named with the coordinator's id and epoch, and a replicator that holds
        // the lock ends the sessions of its own coordinator's epochs up to its own in this
        // database (never anybody else's: `reconcile sql` and other clients use other names),
        // except the one connecting. Their transactions were never prepared (a prepared one
        // outlives its session and is recovered below); an older epoch can decide nothing any
        // more, and a session of our own epoch here is one this replicator dropped (it holds
        // one per database): a link cut without the server noticing left it in a statement,
        // holding its rows until the server's TCP keepalive (2 h by default) ended it.
        let prefix = session_prefix(&coordinator.record.id);
        let epoch = coordinator.record.epoch.to_string();
        client
            .query_one(
                "SELECT set_config('application_name', $1 || $2, false)",
                &[&prefix, &epoch],
            )
            .await?;
        let ended = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND starts_with(application_name, $1) \
                 AND substr(application_name, length($1) + 1) ~ '^[0-9]{1,19}$' \
                 AND substr(application_name, length($1) + 1)::numeric <= $2::text::numeric",
                &[&prefix, &epoch],
            )
            .await?;
        if !ended.is_empty() {
            tracing::warn!(shard = %shard.label, sessions = ended.len(), "ended earlier round sessions of this coordinator (of a replicator that lost its lock, or this one's own, dropped; frozen or cut off)");
        }
        let needed = self.per_server.get(&shard.server).copied().unwrap_or(1);
        let row = client
            .query_one("SHOW max_prepared_transactions", &[])
            .await?;
        schema::check_max_prepared(&shard, &row.try_get::<_, String>(0)?, needed)
            .map_err(|e| Fatal(format!("{e:#}")))?;
        // In-doubt transactions first, before any migration: a prepared one holds the
        // watermark row's lock, which anything but a plain read waits for (a migration's
        // ALTER TABLE would wait for ever, holding the migration lock). Only gids with our
        // coordinator id are touched, and each must name this shard.
        let id = coordinator.record.id.clone();
        if self.before_recovery[i].is_none() {
            // A plain read (a prepared transaction's row lock does not hold it); no row, or
            // no table yet (before `--migrate`), is a shard that holds nothing.
            self.before_recovery[i] = match client
                .query_opt("SELECT applied_seq FROM watermark", &[])
                .await
            {
                Ok(Some(row)) => row
                    .try_get::<_, i64>(0)
                    .ok()
                    .and_then(|v| u64::try_from(v).ok()),
                Ok(None) => Some(0),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    Some(0)
                }
                Err(_) => None,
            };
        }
        coordinator.current_decision().await?;
        let done = coordinator::recover_shard(&client, &coordinator.record, i).await?;
        if done != coordinator::Recovered::default() {
            tracing::warn!(shard = %shard.label, committed = done.committed, rolled_back = done.rolled_back, "recovered in-doubt transactions");
        }
        if self.migrate && !self.migrated[i] {
            schema::migrate(&mut client, &shard)
                .await
                .map_err(fatal_unless_connection)?;
            self.migrated[i] = true;
        } else {
            schema::check_schema(&client, &shard)
                .await
                .map_err(fatal_unless_connection)?;
        }
        let count = i32::try_from(self.shards.len())?;
        let identity = "SELECT shard_index, shard_count, coordinator_id FROM watermark";
        let row = match client.query_opt(identity, &[]).await? {
            Some(row) => row,
            None => {
                // No watermark row: a fresh shard, unless it holds rows (a restore that left the
                // watermark table out, a `TRUNCATE watermark`). A row at 0 would then claim
                // that none of them was applied: the next round failed on a duplicate key, and
                // `reconcile` advised running the replicator again.
                let holds: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM entries) OR EXISTS (SELECT 1 FROM balances) \
                         OR EXISTS (SELECT 1 FROM transfers)",
                        &[],
                    )
                    .await?
                    .try_get(0)?;
                if holds {
                    return Err(Fatal(format!(
                        "shard {i} ({}) holds entries, balances or transfers but no watermark row: which events it applied is unknown \
                         (a restore without the watermark table?); restore the row, or rebuild the shard into an empty database",
                        shard.label
                    ))
                    .into());
                }
                client
                    .execute(
                        "INSERT INTO watermark (applied_seq, shard_index, shard_count, coordinator_id) VALUES (0, $1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&i32::try_from(i)?, &count, &id],
                    )
                    .await?;
                client.query_one(identity, &[]).await?
            }
        };
        let (index, stored_count, stored_id): (i32, i32, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if index as usize != i || stored_count != count || stored_id != id {
            return Err(Fatal(format!(
                "shard {i} ({}) belongs elsewhere: its watermark row says shard {index} of {stored_count}, coordinator {stored_id}; \
                 this cluster has {count} shards and coordinator {id} (changing the shard list needs a rebuild into new databases)",
                shard.label
            ))
            .into());
        }
        let applied: i64 = client
            .query_one("SELECT applied_seq FROM watermark", &[])
            .await?
            .try_get(0)?;
        let applied = u64::try_from(applied)?;
        // A watermark lower than the last one this process saw committed there means the shard
        // lost commits (restored from a backup, failed over to a standby that was behind).
        // Going on would skip the events in between for good: the records after the old
        // watermark are all this process still holds. A restart reads the source again from
        // the lowest watermark.
        if applied < self.watermarks[i] {
            return Err(Fatal(format!(
                "shard {i} ({})'s watermark went back from {} to {applied} (restored from a backup, or failed over to a standby that lost commits): \
                 stopping so that events {}..={} are not skipped; restart the replicator to replay them from the source",
                shard.label,
                self.watermarks[i],
                applied + 1,
                self.watermarks[i]
            ))
            .into());
        }
        self.watermarks[i] = applied;
        self.connections[i] = Some(client);
        tracing::info!(shard = %shard.label, applied_seq = applied, "shard connected");
        Ok(())
    }

    /// Connects every missing shard. Returns the first fatal error, else the first one (after
    /// trying all of them, so a shard that is up gets its in-doubt transactions finished even
    /// while another is down, or has a fault that stops the replicator: stopping at that one
    /// left the later shards' decided transactions prepared, holding their locks, on every
    /// restart until it was fixed).
    async fn connect_all(
        &mut self,
        coordinator: &mut Coordinator,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let (mut first_error, mut fatal) = (None, None);
        for i in 0..self.shards.len() {
            if self.connections[i].as_ref().is_some_and(|c| !c.is_closed()) {
                continue;
            }
            self.connections[i] = None;
            let connected =
                tokio::time::timeout(timeout, self.connect_shard(i, coordinator, timeout))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "connecting and recovering shard {} took longer than {timeout:?}",
                            self.shards[i].label
                        ))
                    });
            if let Err(e) = connected {
                if is_transient(&e) {
                    first_error.get_or_insert(e);
                } else {
                    fatal.get_or_insert(e);
                }
            }
        }
        match fatal.or(first_error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One two-phase-commit round over every shard. Returns the committed transfer count.
    async fn round(
        &mut self,
        coordinator: &mut Coordinator,
        directory: &Directory,
        records: &[CommandRecord],
        batch_end: u64,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let (rows, transfers) = build_rows(records, directory, &self.watermarks)?;
        // The identity of the record at `batch_end` (see `RecordId`).
        let record = records
            .last()
            .map(|r| RecordId::of(r).to_string())
            .unwrap_or_default();
        let record = record.as_str();
        let built = Instant::now();
        let (id, epoch) = (coordinator.record.id.clone(), coordinator.record.epoch);
        let gids: Vec<String> = (0..self.shards.len())
            .map(|i| coordinator::gid(&id, epoch, batch_end, i))
            .collect::<anyhow::Result<_>>()?;
        let mut clients = Vec::with_capacity(self.shards.len());
        for (i, c) in self.connections.iter().enumerate() {
            match c {
                Some(c) => clients.push(c),
                None => bail!("shard {} is not connected", self.shards[i].label),
            }
        }
        let targets: Vec<u64> = self
            .watermarks
            .iter()
            .map(|w| (*w).max(batch_end))
            .collect();

        // Phase one. Crash tests prepare one shard after the other, so that the failpoint
        // leaves exactly one shard prepared. Every shard's prepare runs to its end (none is
        // dropped half-way), so that which ones prepared is known.
        let shards = &self.shards;
        let watermarks = &self.watermarks;
        let prepare = |i: usize, rows: ShardRows| {
            let (client, gid, target) = (clients[i], &gids[i], targets[i]);
            async move {
                prepare_shard(client, directory, rows, watermarks[i], target, record, gid)
                    .await
                    .with_context(|| format!("preparing on shard {}", shards[i].label))
            }
        };
        let results = if failpoint_armed("sql-after-prepare-one") {
            let mut results = Vec::new();
            for (i, rows) in rows.into_iter().enumerate() {
                let result = prepare(i, rows).await;
                let failed = result.is_err();
                results.push(result);
                if failed {
                    break;
                }
                if i == 0 {
                    failpoint("sql-after-prepare-one");
                }
            }
            results
        } else {
            join_all(
                rows.into_iter()
                    .enumerate()
                    .map(|(i, rows)| prepare(i, rows)),
            )
            .await
        };
        let mut failure = None;
        let mut prepared = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => prepared.push(i),
                // A failure that stops the replicator decides the round's outcome over one that
                // would only be retried.
                Err(e) => {
                    if failure
                        .as_ref()
                        .is_none_or(|f| is_transient(f) && !is_transient(&e))
                    {
                        failure = Some(e);
                    }
                }
            }
        }
        if let Some(error) = failure {
            // Undecided, so never to be committed: an error that stops the replicator rolls
            // back what this round prepared rather than leave it holding its shards' rows
            // locked, and a prepared-transaction slot, until a restart's recovery. (After a
            // transient error the retry's recovery rolls them back.)
            if !is_transient(&error) {
                roll_back(&clients, &gids, prepared).await;
            }
            return Err(error);
        }
        failpoint("sql-after-prepare-all");
        let prepared = Instant::now();

        // The decision, durable before the first COMMIT PREPARED.
        if failpoint_armed("sql-lose-lock-before-decision") {
            coordinator.rewrite_record_for_test().await?;
        }
        if let Err(error) = coordinator.decide(batch_end, &gids).await {
            // Refused for good (another replicator changed the record: ours was not written),
            // so never to be committed: rolled back now rather than left holding their rows'
            // locks until the successor's round times out on them. A write whose outcome is
            // unknown (ZooKeeper away) leaves them to recovery, which reads the decision.
            if !is_transient(&error) {
                roll_back(&clients, &gids, 0..gids.len()).await;
            }
            return Err(error);
        }
        failpoint("sql-after-decision");
        let decided = Instant::now();

        // Phase two, each on the shard's own connection.
        let commits: Vec<String> = gids
            .iter()
            .map(|g| gid_statement("COMMIT PREPARED", g))
            .collect::<anyhow::Result<_>>()?;
        if failpoint_armed("sql-after-first-commit") {
            for (i, commit) in commits.iter().enumerate() {
                clients[i].batch_execute(commit).await?;
                if i == 0 {
                    failpoint("sql-after-first-commit");
                }
            }
        } else {
            let shards = &self.shards;
            try_join_all(commits.iter().enumerate().map(|(i, commit)| {
                let client = clients[i];
                async move {
                    client
                        .batch_execute(commit)
                        .await
                        .with_context(|| format!("committing on shard {}", shards[i].label))
                }
            }))
            .await?;
        }
        tracing::debug!(
            batch_end,
            build_ms = (built - started).as_secs_f64() * 1e3,
            prepare_ms = (prepared - built).as_secs_f64() * 1e3,
            decide_ms = (decided - prepared).as_secs_f64() * 1e3,
            commit_ms = decided.elapsed().as_secs_f64() * 1e3,
            "round"
        );
        self.watermarks = targets;
        Ok(transfers)
    }
}

/// Runs the replicator until the process stops (or, with `once`, until caught up).
/// The run was stopped by a signal (not a failure of the replication).
#[derive(Debug)]
pub struct StoppedBySignal(pub &'static str);

impl std::fmt::Display for StoppedBySignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by {}", self.0)
    }
}

impl std::error::Error for StoppedBySignal {}

pub async fn run(options: &ReplicateOptions) -> anyhow::Result<Report> {
    let layout = Layout::new(&options.zk_root)?;
    // Before the lock: a source that cannot be read is an error at once.
    let source = Source::open(&options.source)?;
    let mut coordinator = Coordinator::start(&options.zk, &layout, options.zk_patience).await?;
    // SIGTERM or SIGINT (a supervisor stopping the service, ^C) stops the run where it is, as
    // a crash would: a round in flight is left prepared, for the next replicator's recovery.
    // Unlike a crash, the lock is then released, so the next one need not wait out the
    // session's expiry.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let result = tokio::select! {
        result = replicate(options, &layout, &mut coordinator, source) => result,
        _ = terminate.recv() => Err(StoppedBySignal("SIGTERM").into()),
        _ = interrupt.recv() => Err(StoppedBySignal("SIGINT").into()),
    };
    if let Err(e) = &result {
        tracing::info!(reason = %format!("{e:#}"), "SQL replicator stopping; releasing the lock");
    }
    // Bounded: with ZooKeeper away, a stop (a signal's included) must not hang on the release;
    // the lock then goes with the session.
    if tokio::time::timeout(Duration::from_secs(5), coordinator.release())
        .await
        .is_err()
    {
        tracing::warn!(
            "releasing the lock took over 5 s (ZooKeeper away?); it goes with the session"
        );
    }
    result
}

async fn replicate(
    options: &ReplicateOptions,
    layout: &Layout,
    coordinator: &mut Coordinator,
    mut source: Source,
) -> anyhow::Result<Report> {
    let list = zk::get_sql_shards(coordinator.client(), layout)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no SQL shard list at {}: run `wallet cluster set-sql-shards URL,URL,...` first",
                layout.sql_shards()
            )
        })?;
    let shards = schema::parse_shards(&list.shards, options.shard_ca.as_ref())?;
    let count = shards.len();
    let mut state = State {
        per_server: schema::shards_per_server(&shards),
        shards,
        connections: (0..count).map(|_| None).collect(),
        watermarks: vec![0; count],
        before_recovery: vec![None; count],
        migrated: vec![false; count],
        migrate: options.migrate,
    };
    let batch_events = options.batch_events.max(2);
    let mut source_retry = crate::replicate::source::SourceRetry::new(
        crate::replicate::source::source_outage_limit(options.once),
    );
    let mut directory = Directory::default();
    let mut pending: Vec<CommandRecord> = Vec::with_capacity(batch_events + 2);
    // Under `--once`, where the source had nothing more while short of the shards' watermark,
    // and since when: one empty read is not the end of the source (a read racing the rewrite
    // of the durable watermark, or an HTTP read that had to reconnect, yields nothing).
    let mut short_since: Option<(u64, Instant)> = None;
    // Test hook: the first read yields nothing.
    let mut empty_first_read = failpoint_armed("sql-empty-first-read");
    let mut backoff = Duration::from_millis(50);
    let mut last_warning: Option<Instant> = None;
    let mut report = Report {
        start_seq: 0,
        end_seq: 0,
        events: 0,
        transfers: 0,
        rounds: 0,
        shards: count,
        elapsed: Duration::ZERO,
    };
    let mut started: Option<Instant> = None;
    let mut shards_failing_since: Option<Instant> = None;
    let mut first_connect = true;
    let mut last_status = Instant::now();
    let mut status_events = 0u64;
    let mut list_checked = Instant::now();
    loop {
        // The shard list is read once: a new one (`cluster set-sql-shards`) takes a restart,
        // so a replicator that would go on feeding the old databases stops instead. (Read
        // again about once a second; ZooKeeper briefly away is left to the rounds.)
        if list_checked.elapsed() >= Duration::from_secs(1) {
            list_checked = Instant::now();
            if let Ok(now) = zk::get_sql_shards(coordinator.client(), layout).await
                && now.as_ref().map(|l| &l.shards) != Some(&list.shards)
            {
                return Err(Fatal(format!(
                    "the SQL shard list at {} changed (version {} to {}) while this replicator ran: restart it to replicate into the new list; \
                     a transaction left prepared in a database no longer listed must be rolled back there by hand",
                    layout.sql_shards(),
                    list.version,
                    now.map_or_else(|| "removed".to_string(), |l| l.version.to_string()),
                ))
                .into());
            }
        }
        // Every shard connected (and recovered) before any round.
        if state
            .connections
            .iter()
            .any(|c| c.as_ref().is_none_or(|c| c.is_closed()))
        {
            coordinator.ensure_session(options.zk_patience).await?;
            if let Err(e) = state.connect_all(coordinator, options.round_timeout).await {
                if !is_transient(&e) {
                    return Err(e);
                }
                let e = give_up_under_once(options, &mut shards_failing_since, e)?;
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "a shard is unavailable; waiting");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            if first_connect {
                report.start_seq = state
                    .watermarks
                    .iter()
                    .zip(&state.before_recovery)
                    .map(|(now, before)| before.unwrap_or(*now).min(*now))
                    .min()
                    .unwrap_or(0);
                if let Err(e) = state.check_identities(&mut source).await {
                    // A shard briefly away: wait as for a connection. An engine URL briefly
                    // away: wait as for any read of it, within the source's outage limit.
                    if !is_transient(&e) {
                        return Err(e);
                    }
                    let pause = if e.is::<crate::replicate::source::Unavailable>() {
                        source_retry
                            .failed(e)
                            .map_err(|e| e.context("reading the source"))?
                    } else {
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "checking the shards' record identities failed; retrying");
                        let pause = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        pause
                    };
                    state.drop_connections();
                    tokio::time::sleep(pause).await;
                    continue;
                }
                source_retry.succeeded();
                first_connect = false;
                // Account names up to the lowest watermark from the engine's newest snapshot
                // at or before it, if there is one: the journal before it is not read.
                if let Some(ledger) = source.start_from_snapshot(report.start_seq)? {
                    directory = Directory::from_ledger(&ledger, count)?;
                    tracing::info!(
                        snapshot_seq = ledger.next_seq() - 1,
                        accounts = directory.names.len(),
                        "starting from the engine's snapshot; the journal before it is not read"
                    );
                }
                tracing::info!(shards = count, watermarks = ?state.watermarks, source = %options.source, "SQL replicator starting");
            } else {
                tracing::info!(watermarks = ?state.watermarks, "every shard is back");
            }
            backoff = Duration::from_millis(50);
            last_warning = None;
        }
        let low = state.watermarks.iter().copied().min().unwrap_or(0);
        // Records every shard now holds (a failed round that recovery committed): applied.
        report.transfers += committed_transfers(pending.iter().filter(|r| r.next_seq() - 1 <= low));
        pending.retain(|r| r.next_seq() - 1 > low);
        if pending.is_empty() {
            // Read until the batch is full or the journal has nothing more; records the shards
            // already hold only teach the directory their account names.
            let mut events = 0usize;
            let mut fresh = Vec::new();
            // A failed read says nothing about the source's end: `--once` must not take it
            // for "caught up" (nor for "the source ends before the shards").
            let mut fetch_failed = false;
            while events < batch_events {
                fresh.clear();
                // Long-poll an engine URL only when there is nothing to send yet.
                let wait = if events == 0 && !options.once {
                    Duration::from_millis(200)
                } else {
                    Duration::ZERO
                };
                let fetched = if std::mem::take(&mut empty_first_read) {
                    Ok(())
                } else {
                    source
                        .fetch_records(batch_events - events, wait, &mut fresh)
                        .await
                };
                match fetched {
                    Ok(()) => source_retry.succeeded(),
                    // An engine URL may be briefly unreachable (or restarting); a journal error
                    // is for good.
                    Err(e) if matches!(source, Source::Http(_)) => {
                        let pause = source_retry
                            .failed(e)
                            .map_err(|e| e.context("reading the source"))?;
                        tokio::time::sleep(pause).await;
                        fetch_failed = true;
                        break;
                    }
                    Err(e) => return Err(e.context("reading the source")),
                }
                if fresh.is_empty() {
                    break;
                }
                directory.learn(&fresh, count)?;
                for record in &fresh {
                    if record.next_seq() - 1 > low {
                        events += record.event_count as usize;
                        pending.push(*record);
                    } else if record.next_seq() - 1 > report.start_seq {
                        // Applied by this run's recovery at its start (a round in doubt
                        // that was decided): brought up to by this run.
                        report.transfers += committed_transfers(std::iter::once(record));
                    }
                }
            }
            if pending.is_empty() {
                if fetch_failed {
                    // The patience for reads that stay short starts again after an outage.
                    short_since = None;
                    continue;
                }
                let read_to = source.next_seq() - 1;
                if read_to < low {
                    // The shards are ahead of the journal read so far, and it has no more.
                    let since = match short_since {
                        Some((at, since)) if at == read_to => since,
                        _ => short_since.insert((read_to, Instant::now())).1,
                    };
                    if options.once
                        && since.elapsed() >= crate::replicate::source::SHORT_SOURCE_PATIENCE
                    {
                        bail!(
                            "the source {} ends at sequence {} but the shards hold up to {low}: wrong source, or a journal that lost its tail",
                            options.source,
                            source.next_seq() - 1
                        );
                    }
                } else if options.once {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let Some(batch_end) = pending.last().map(|r| r.next_seq() - 1) else {
            continue;
        };
        let round_started = Instant::now();
        started.get_or_insert(round_started);
        let result = tokio::time::timeout(
            options.round_timeout,
            state.round(coordinator, &directory, &pending, batch_end),
        )
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "a round took longer than {:?}",
                options.round_timeout
            ))
        });
        match result {
            Ok(_) => {
                shards_failing_since = None;
                let events = batch_end - pending.first().map_or(batch_end, |r| r.first_seq - 1);
                report.transfers += committed_transfers(pending.iter());
                report.rounds += 1;
                report.end_seq = batch_end;
                report.elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
                status_events += events;
                pending.clear();
                if last_status.elapsed() > Duration::from_secs(5) {
                    tracing::info!(
                        applied_seq = batch_end,
                        source_seq = source.next_seq() - 1,
                        events_per_second =
                            status_events as f64 / last_status.elapsed().as_secs_f64(),
                        "replicating"
                    );
                    last_status = Instant::now();
                    status_events = 0;
                }
            }
            Err(e) if !is_transient(&e) => return Err(e),
            Err(e) => {
                let e = match give_up_under_once(options, &mut shards_failing_since, e) {
                    Ok(e) => e,
                    Err(give_up) => {
                        // No retry follows to recover the shards: the failed round's prepared
                        // transactions (on the shards that did prepare, or all of them after a
                        // timeout) would hold their rows' locks and a prepared-transaction slot
                        // until the next run. Recovered now on every shard that answers.
                        state.drop_connections();
                        if let Err(e) = state.connect_all(coordinator, options.round_timeout).await
                        {
                            tracing::warn!(error = %format!("{e:#}"), "recovering the shards before giving up failed; the next run's recovery finishes what is left");
                        }
                        return Err(give_up);
                    }
                };
                tracing::warn!(error = %format!("{e:#}"), batch_end, "round failed; reconnecting and recovering the shards");
                state.drop_connections();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    report.end_seq = state.watermarks.iter().copied().min().unwrap_or(0);
    report.events = report.end_seq.saturating_sub(report.start_seq);
    Ok(report)
}

/// How many of `records` are committed transfers.
fn committed_transfers<'a>(records: impl Iterator<Item = &'a CommandRecord>) -> u64 {
    records
        .filter(|r| r.command_type == CommandType::Transfer && r.is_committed())
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AccountId, Event, TransactionId};

    fn record(first_seq: u64, events: &[Event], kind: CommandType) -> CommandRecord {
        let mut r = CommandRecord::empty();
        r.first_seq = first_seq;
        r.command_type = kind;
        r.transaction_id = TransactionId(first_seq as u128);
        r.timestamp_ns = 1_700_000_000_000_000_000;
        r.event_count = events.len() as u8;
        r.events[..events.len()].copy_from_slice(events);
        r
    }

    #[test]
    fn rows_go_to_the_shard_of_their_account_and_skip_what_a_shard_has() {
        let usd = Currency::new("USD").expect("usd");
        let ev = |seq, kind, account, amount, balance_after| Event {
            seq,
            kind,
            account,
            currency: usd,
            amount,
            balance_after,
        };
        let mut open_a = record(
            1,
            &[ev(1, EventKind::AccountOpened, 0, 0, 0)],
            CommandType::OpenAccount,
        );
        open_a.opened_account = AccountId::new("alice").expect("id");
        let mut open_b = record(
            2,
            &[ev(2, EventKind::AccountOpened, 1, 0, 0)],
            CommandType::OpenAccount,
        );
        open_b.opened_account = AccountId::new("bob").expect("id");
        let deposit = record(
            3,
            &[ev(3, EventKind::Deposited, 0, 500, 500)],
            CommandType::Deposit,
        );
        let transfer = record(
            4,
            &[
                ev(4, EventKind::Debited, 0, 200, 300),
                ev(5, EventKind::Credited, 1, 200, 200),
            ],
            CommandType::Transfer,
        );
        let records = [open_a, open_b, deposit, transfer];
        let mut directory = Directory::default();
        directory.learn(&records, 4).expect("learn");
        let (a, b) = (partition_of("alice", 4), partition_of("bob", 4));
        assert_ne!(
            a, b,
            "the pinned hash puts alice and bob on different shards of 4"
        );

        let (rows, transfers) = build_rows(&records, &directory, &[0; 4]).expect("rows");
        assert_eq!(transfers, 1);
        assert_eq!(rows[a].entry_count, 2);
        assert_eq!(rows[b].entry_count, 1);
        assert_eq!(rows[a].transfer_count, 1);
        let text = String::from_utf8(rows[a].entries.clone()).expect("utf8");
        assert!(
            text.contains("\talice\tUSD\tdebited\t-200\t300\t"),
            "{text}"
        );
        assert_eq!(rows[a].balances[&(0, usd)], (300, 4));

        // A record of a shape no round can write (a transfer with one event, an account never
        // opened) is an error that would only come again: not transient, so the replicator
        // stops instead of reconnecting and retrying it forever.
        let mut broken = transfer;
        broken.event_count = 1;
        let Err(error) = build_rows(&[broken], &directory, &[0; 4]) else {
            panic!("a one-event transfer was accepted");
        };
        assert!(!crate::replicate::sql::is_transient(&error), "{error:#}");
        let stranger = record(
            6,
            &[ev(6, EventKind::Deposited, 7, 5, 5)],
            CommandType::Deposit,
        );
        let Err(error) = build_rows(&[stranger], &directory, &[0; 4]) else {
            panic!("an unknown account was accepted");
        };
        assert!(!crate::replicate::sql::is_transient(&error), "{error:#}");

        // Alice's shard already has everything up to 4: only bob's credit remains.
        let mut watermarks = [0; 4];
        watermarks[a] = 4;
        let (rows, transfers) = build_rows(&records, &directory, &watermarks).expect("rows");
        assert_eq!(
            (rows[a].entry_count, rows[a].transfer_count, transfers),
            (0, 0, 0)
        );
        assert_eq!(rows[b].entry_count, 1);
    }
}
