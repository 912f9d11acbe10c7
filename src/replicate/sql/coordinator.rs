//! The two-phase-commit coordinator's durable state in ZooKeeper, the transaction ids (gids) it
//! prepares, and the in-doubt recovery of one shard.
//!
//! Under the layout's root:
//!
//! | path | kind | data |
//! |---|---|---|
//! | `{root}/sql/coordinator` | persistent | `{"id": "<32 hex>", "epoch": n, "decided_batch": seq, "decided_gids": [...]}` |
//! | `{root}/sql/replicator-lock` | ephemeral | the holder's host and pid |
//!
//! The decision rule is presumed abort: a prepared transaction of ours commits only if the
//! coordinator record's decision names its gid; every other one is rolled back, except one of
//! a newer epoch than the recovering replicator's, which it never touches (it lost the lock). The record is
//! written (a ZooKeeper write is durable on a quorum before it returns) after every shard has
//! prepared and before the first `COMMIT PREPARED`. At most one batch is ever in doubt, because
//! a round needs every shard connected and every connection first runs [`recover_shard`].

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use zookeeper_client as zk;

use super::Fatal;
use crate::replicate::zk::{self as layout_zk, Layout};

/// PostgreSQL's limit on a gid (GIDSIZE), in bytes, terminator excluded.
const MAX_GID_BYTES: usize = 199;

/// The coordinator's record, the decision included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// Names this deployment's gids (`wallet_{id}_...`): gids are unique cluster-wide, and
    /// several deployments may share a PostgreSQL server.
    pub id: String,
    /// Bumped by each replicator that takes over: a write by an older holder then fails.
    pub epoch: u64,
    /// The last batch (its last sequence number) decided to commit.
    pub decided_batch: u64,
    /// That batch's gids: recovery commits exactly these (a record written before they were
    /// listed has none, and recovery then goes by `decided_batch`).
    #[serde(default)]
    pub decided_gids: Vec<String>,
}

/// The gid prefix of a deployment.
pub fn gid_prefix(coordinator_id: &str) -> String {
    format!("wallet_{coordinator_id}_")
}

/// `PREPARE TRANSACTION` and `COMMIT PREPARED` take no bind parameters, so a gid is formatted
/// into the SQL text: it must be a short run of `[a-z0-9_]` and nothing else.
pub fn validate_gid(gid: &str) -> anyhow::Result<()> {
    if gid.is_empty()
        || gid.len() > MAX_GID_BYTES
        || !gid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("invalid gid {gid:?}: expected 1 to {MAX_GID_BYTES} characters of [a-z0-9_]");
    }
    Ok(())
}

/// The gid of `batch` (its last sequence number) on shard `shard`, prepared by the replicator
/// of `epoch`: `wallet_{id}_{epoch}_{batch}_{shard}`. The epoch keeps a replicator that lost
/// the lock (a long pause) from finishing or colliding with its successor's transactions, and
/// a batch prepared again after a shard was rebuilt from a new gid.
pub fn gid(coordinator_id: &str, epoch: u64, batch: u64, shard: usize) -> anyhow::Result<String> {
    let gid = format!("{}{epoch}_{batch}_{shard}", gid_prefix(coordinator_id));
    validate_gid(&gid)?;
    Ok(gid)
}

/// What a gid of this deployment names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidParts {
    /// 0 for a gid from a build before epochs were part of gids (`wallet_{id}_{batch}_{shard}`).
    pub epoch: u64,
    pub batch: u64,
    pub shard: usize,
}

/// The epoch, batch and shard a gid of this deployment names, or `None` for anybody else's gid.
pub fn parse_gid(coordinator_id: &str, gid: &str) -> Option<GidParts> {
    let rest = gid.strip_prefix(&gid_prefix(coordinator_id))?;
    let parts: Vec<&str> = rest.split('_').collect();
    let (epoch, batch, shard) = match parts[..] {
        [epoch, batch, shard] => (epoch.parse().ok()?, batch, shard),
        [batch, shard] => (0, batch, shard),
        _ => return None,
    };
    Some(GidParts {
        epoch,
        batch: batch.parse().ok()?,
        shard: shard.parse().ok()?,
    })
}

/// `sql` with a validated gid: `PREPARE TRANSACTION 'gid'` and the like.
pub fn gid_statement(verb: &str, gid: &str) -> anyhow::Result<String> {
    validate_gid(gid)?;
    Ok(format!("{verb} '{gid}'"))
}

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

/// Paths of the SQL coordinator under a layout's root.
pub fn record_path(layout: &Layout) -> String {
    format!("{}/sql/coordinator", layout.root)
}

pub fn lock_path(layout: &Layout) -> String {
    format!("{}/sql/replicator-lock", layout.root)
}

/// Reads the coordinator record, if any (reconcile uses it to count leftover gids).
pub async fn read_record(
    client: &zk::Client,
    layout: &Layout,
) -> anyhow::Result<Option<(CoordinatorRecord, i32)>> {
    let path = record_path(layout);
    match client.get_data(&path).await {
        Ok((data, stat)) => {
            let record: CoordinatorRecord = serde_json::from_slice(&data)
                .with_context(|| format!("{path} does not hold a coordinator record"))?;
            validate_gid(&gid_prefix(&record.id))
                .with_context(|| format!("{path}: bad coordinator id"))?;
            Ok(Some((record, stat.version)))
        }
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => bail!("reading {path}: {e}"),
    }
}

/// The running replicator's hold on ZooKeeper: the lock, and the record it alone writes.
pub struct Coordinator {
    address: String,
    layout: Layout,
    client: zk::Client,
    pub record: CoordinatorRecord,
    version: i32,
}

impl Coordinator {
    /// Connects, takes the replicator lock (waiting up to `patience` for a crashed holder's
    /// session to expire), creates the record on first use, and bumps its epoch.
    pub async fn start(address: &str, layout: &Layout, patience: Duration) -> anyhow::Result<Self> {
        let client = layout_zk::connect_patiently(address, patience).await?;
        let (record, version) = take_over(&client, layout, patience).await?;
        Ok(Coordinator {
            address: address.to_string(),
            layout: layout.clone(),
            client,
            record,
            version,
        })
    }

    pub fn client(&self) -> &zk::Client {
        &self.client
    }

    /// After a ZooKeeper session ended (expiry), the lock is gone: reconnect and take over
    /// again. A no-op while the session lives.
    pub async fn ensure_session(&mut self, patience: Duration) -> anyhow::Result<()> {
        if !self.client.state().is_terminated() {
            return Ok(());
        }
        tracing::warn!("the ZooKeeper session ended; reconnecting and taking the lock again");
        let client = layout_zk::connect_patiently(&self.address, patience).await?;
        let (record, version) = take_over(&client, &self.layout, patience).await?;
        if record.id != self.record.id {
            return Err(Fatal(format!(
                "{} changed its coordinator id from {} to {} while we were away",
                record_path(&self.layout),
                self.record.id,
                record.id
            ))
            .into());
        }
        self.client = client;
        self.record = record;
        self.version = version;
        Ok(())
    }

    /// Test hook (failpoint `sql-lose-lock-before-decision`): rewrites the coordinator record
    /// unchanged, as a successor taking over would change it, so that our next conditional
    /// write is refused.
    pub async fn rewrite_record_for_test(&mut self) -> anyhow::Result<()> {
        let data = serde_json::to_vec(&self.record)?;
        let path = record_path(&self.layout);
        self.client
            .set_data(&path, &data, None)
            .await
            .map_err(|e| anyhow::anyhow!("rewriting {path}: {e}"))?;
        Ok(())
    }

    /// Records durably that `batch` commits. Conditional on our last write, so a replicator
    /// that lost the lock to another cannot decide anything.
    pub async fn decide(&mut self, batch: u64, gids: &[String]) -> anyhow::Result<()> {
        let mut record = self.record.clone();
        record.decided_batch = batch;
        record.decided_gids = gids.to_vec();
        let data = serde_json::to_vec(&record)?;
        let path = record_path(&self.layout);
        match self.client.set_data(&path, &data, Some(self.version)).await {
            Ok(stat) => {
                self.version = stat.version;
                self.record = record;
                Ok(())
            }
            Err(zk::Error::BadVersion) => Err(Fatal(format!(
                "{path} was changed by someone else: another replicator took over"
            ))
            .into()),
            Err(e) => bail!("writing the decision for batch {batch} to {path}: {e}"),
        }
    }

    /// The decided batch as ZooKeeper has it now: after a failed or ambiguous `decide`, only
    /// ZooKeeper knows whether the write took effect.
    pub async fn current_decision(&mut self) -> anyhow::Result<u64> {
        // A session that reconnected may be on a server that has not seen our last `decide`
        // yet (its outcome was unclear): catch that server up before reading, or recovery could
        // roll back a batch that was decided.
        self.client
            .sync(&record_path(&self.layout))
            .await
            .context("syncing the coordinator record")?;
        let Some((record, version)) = read_record(&self.client, &self.layout).await? else {
            return Err(Fatal(format!("{} disappeared", record_path(&self.layout))).into());
        };
        if record.id != self.record.id || record.epoch != self.record.epoch {
            return Err(Fatal(format!(
                "{} now belongs to epoch {} (ours is {}): another replicator took over",
                record_path(&self.layout),
                record.epoch,
                self.record.epoch
            ))
            .into());
        }
        self.record = record;
        self.version = version;
        Ok(self.record.decided_batch)
    }

    /// Gives the lock back at a clean exit (a crash leaves it to the session timeout). Only a
    /// lock node of this session is deleted, at the version read: one that another replicator
    /// created after ours went away (our session expired, or the node was deleted by hand) is
    /// theirs, and deleting it would let a third replicator run beside them.
    pub async fn release(self) {
        let path = lock_path(&self.layout);
        let stat = match self.client.check_stat(&path).await {
            Ok(Some(stat)) => stat,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "releasing {path}");
                return;
            }
        };
        if stat.ephemeral_owner != self.client.session_id().0 {
            tracing::warn!("{path} is held by another session now; leaving it to its holder");
            return;
        }
        if let Err(e) = self.client.delete(&path, Some(stat.version)).await {
            tracing::debug!(error = %e, "releasing {path}");
        }
    }
}

async fn take_over(
    client: &zk::Client,
    layout: &Layout,
    patience: Duration,
) -> anyhow::Result<(CoordinatorRecord, i32)> {
    client
        .mkdir(&format!("{}/sql", layout.root), &persistent())
        .await
        .with_context(|| format!("creating {}/sql", layout.root))?;
    let lock = lock_path(layout);
    let holder = format!(
        "{} pid {}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
        std::process::id()
    );
    let deadline = Instant::now() + patience;
    let mut announced = false;
    loop {
        match client.create(&lock, holder.as_bytes(), &ephemeral()).await {
            Ok(_) => break,
            Err(zk::Error::NodeExists) => {
                let other = client
                    .get_data(&lock)
                    .await
                    .map(|(d, _)| String::from_utf8_lossy(&d).into_owned())
                    .unwrap_or_default();
                if Instant::now() > deadline {
                    return Err(Fatal(format!(
                        "another `wallet replicate sql` ({other}) holds {lock}; only one may run per cluster"
                    ))
                    .into());
                }
                if !announced {
                    tracing::info!(holder = %other, "waiting for {lock} (a crashed replicator's session expires after a few seconds)");
                    announced = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!("creating {lock}: {e}"),
        }
    }
    let path = record_path(layout);
    let (mut record, version) = match read_record(client, layout).await? {
        Some(found) => found,
        None => {
            let record = CoordinatorRecord {
                id: uuid::Uuid::new_v4().simple().to_string(),
                epoch: 0,
                decided_batch: 0,
                decided_gids: Vec::new(),
            };
            match client
                .create(&path, &serde_json::to_vec(&record)?, &persistent())
                .await
            {
                Ok((stat, _)) => (record, stat.version),
                Err(zk::Error::NodeExists) => read_record(client, layout)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{path} vanished"))?,
                Err(e) => bail!("creating {path}: {e}"),
            }
        }
    };
    record.epoch = record
        .epoch
        .checked_add(1)
        .ok_or_else(|| anyhow::anyhow!("{path}: epoch {} cannot grow any more", record.epoch))?;
    let stat = client
        .set_data(&path, &serde_json::to_vec(&record)?, Some(version))
        .await
        .map_err(|e| anyhow::anyhow!("fencing {path}: {e}"))?;
    tracing::info!(coordinator = %record.id, epoch = record.epoch, decided_batch = record.decided_batch, "took the SQL replicator lock");
    Ok((record, stat.version))
}

/// What recovery did on one shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
}

/// Lists this deployment's prepared transactions in the connected database.
pub async fn prepared_gids(client: &Client, coordinator_id: &str) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1) ORDER BY gid",
            &[&gid_prefix(coordinator_id)],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map_err(Into::into))
        .collect()
}

/// Runs `COMMIT PREPARED` or `ROLLBACK PREPARED` on `gid`; `false` if the transaction no
/// longer exists. That happens when a round that timed out had already sent the same statement
/// on a connection it then dropped: the server finishes it anyway, between our listing and
/// our statement (SQLSTATE 42704, undefined object). Which way it went is the same decision,
/// since rounds only ever commit decided batches.
pub async fn finish_prepared(client: &Client, statement: &str, gid: &str) -> anyhow::Result<bool> {
    match client.batch_execute(&gid_statement(statement, gid)?).await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
            tracing::info!(%gid, "recovery: the prepared transaction was already finished");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the decision in `record` commits the prepared transaction `gid`: it names the gid
/// (a record from a build that did not list them names only its batch, and such a build's
/// gids carry no epoch: a gid with an epoch was prepared by a later build, after that
/// decision, and is undecided until a record names it).
fn decided(record: &CoordinatorRecord, gid: &str, parts: GidParts) -> bool {
    if record.decided_gids.is_empty() {
        parts.epoch == 0 && parts.batch == record.decided_batch && record.decided_batch != 0
    } else {
        record.decided_gids.iter().any(|g| g == gid)
    }
}

/// Finishes this deployment's prepared transactions in one shard's database: `COMMIT PREPARED`
/// for those the decision in `record` names, `ROLLBACK PREPARED` for any other (presumed
/// abort), except that one prepared by a newer epoch than `record`'s is never touched: another
/// replicator took over, and its transactions are its own to finish (this one then stops).
/// `record` must be the coordinator record as just read (`Coordinator::current_decision`).
/// Must run on a connection to that database (`COMMIT PREPARED` only works there). Afterwards
/// none is left.
pub async fn recover_shard(
    client: &Client,
    record: &CoordinatorRecord,
    shard: usize,
) -> anyhow::Result<Recovered> {
    let coordinator_id = record.id.as_str();
    let mut done = Recovered::default();
    for gid in prepared_gids(client, coordinator_id).await? {
        // Not transient: waiting would not change it, and retrying for ever would hide it
        // while the transaction holds its locks.
        let Some(parts) = parse_gid(coordinator_id, &gid) else {
            return Err(Fatal(format!(
                "prepared transaction {gid:?} carries our prefix but is not one of our gids (made by hand, or by another build): finish it by hand (COMMIT PREPARED or ROLLBACK PREPARED in that database) and start again"
            ))
            .into());
        };
        if parts.shard != shard {
            return Err(Fatal(format!(
                "prepared transaction {gid} names shard {} but sits in shard {shard}'s database: the shard list was reordered",
                parts.shard
            ))
            .into());
        }
        if parts.epoch > record.epoch {
            return Err(Fatal(format!(
                "prepared transaction {gid} belongs to epoch {}, newer than ours ({}): another replicator took over",
                parts.epoch, record.epoch
            ))
            .into());
        }
        if decided(record, &gid, parts) {
            if finish_prepared(client, "COMMIT PREPARED", &gid).await? {
                tracing::info!(%gid, "recovery: committed a prepared transaction (decided)");
                done.committed += 1;
            }
        } else if finish_prepared(client, "ROLLBACK PREPARED", &gid).await? {
            tracing::info!(%gid, decided_batch = record.decided_batch, "recovery: rolled back a prepared transaction (not decided)");
            done.rolled_back += 1;
        }
    }
    let left = prepared_gids(client, coordinator_id).await?;
    if !left.is_empty() {
        bail!("prepared transactions {left:?} are still there after recovery");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_name_epoch_batch_and_shard_and_only_safe_characters_pass() {
        let id = "0123456789abcdef0123456789abcdef";
        let g = gid(id, 3, 123_456, 7).expect("gid");
        assert_eq!(g, format!("wallet_{id}_3_123456_7"));
        let parts = |epoch, batch, shard| {
            Some(GidParts {
                epoch,
                batch,
                shard,
            })
        };
        assert_eq!(parse_gid(id, &g), parts(3, 123_456, 7));
        assert_eq!(parse_gid("ffff", &g), None);
        // A gid from before epochs were in gids is epoch 0, older than any replicator's.
        assert_eq!(
            parse_gid(id, &format!("wallet_{id}_123456_7")),
            parts(0, 123_456, 7)
        );
        for bad in ["1_2_3_4", "1", "x_1_2", "1__2"] {
            assert_eq!(parse_gid(id, &format!("wallet_{id}_{bad}")), None, "{bad}");
        }
        assert_eq!(
            gid_statement("COMMIT PREPARED", &g).expect("ok"),
            format!("COMMIT PREPARED '{g}'")
        );
        let max = gid(id, u64::MAX, u64::MAX, u16::MAX as usize).expect("long gid");
        assert!(max.len() <= MAX_GID_BYTES);
        for bad in [
            "",
            "x'; DROP TABLE balances; --",
            "Wallet_1",
            "wallet 1",
            "wallet-1",
            &"a".repeat(200),
        ] {
            assert!(validate_gid(bad).is_err(), "{bad:?} must be refused");
            assert!(gid_statement("PREPARE TRANSACTION", bad).is_err());
        }
        assert!(gid("bad'id", 1, 1, 0).is_err());
    }

    #[test]
    fn the_decision_commits_the_gids_it_names_and_no_other_round_of_the_same_batch() {
        let id = "0123456789abcdef0123456789abcdef";
        let record = |decided_batch, decided_gids: Vec<String>| CoordinatorRecord {
            id: id.to_string(),
            epoch: 5,
            decided_batch,
            decided_gids,
        };
        let check = |record: &CoordinatorRecord, g: &str| {
            decided(record, g, parse_gid(id, g).expect("ours"))
        };
        let ours = gid(id, 5, 100, 0).unwrap();
        let decided_record = record(100, vec![ours.clone(), gid(id, 5, 100, 1).unwrap()]);
        assert!(check(&decided_record, &ours));
        // The same batch prepared by an earlier epoch, never decided: rolled back.
        assert!(!check(&decided_record, &gid(id, 4, 100, 0).unwrap()));
        assert!(!check(&decided_record, &gid(id, 5, 101, 0).unwrap()));
        // A record written before the decision listed its gids goes by the batch.
        let old = format!("wallet_{id}_100_0");
        assert!(check(&record(100, Vec::new()), &old));
        assert!(!check(&record(99, Vec::new()), &old));
        assert!(!check(&record(0, Vec::new()), &format!("wallet_{id}_0_0")));
        // Such a record meets a gid of a later build, prepared for the same batch and crashed
        // before its decision was written: undecided (it was committed on one shard while
        // the others rolled theirs back).
        assert!(!check(&record(100, Vec::new()), &ours));
    }
}
