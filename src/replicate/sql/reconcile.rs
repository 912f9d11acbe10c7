//! `wallet reconcile sql`: the shards against the engine's state replayed from the journal.
//!
//! Each shard is read in one `REPEATABLE READ` snapshot, and the reads are repeated (a few
//! times) until every shard shows the same watermark: the common watermark. Then, replaying
//! the journal:
//!
//! - the watermark row's record identity (when it has one) is the journal's record ending at
//!   the watermark, as the replicator checks before it continues a shard;
//! - every balance row equals the engine's balance at the watermark (and its `last_seq` the
//!   sequence of the account's last event in that currency), sits on the shard the hash names,
//!   and every balance the engine has on that shard has a row;
//! - per currency, each shard's sum equals the engine's sum over that shard's accounts, and the
//!   sum over all shards equals the engine's total;
//! - every balance event up to the watermark is exactly one entry, on its account's shard, with
//!   the same values; every committed transfer is exactly one transfers row on the shard of
//!   `from_account`; nothing else is there;
//! - every transfer row has exactly one debit entry and one credit entry (across the shards).

use crate::replicate::Differences;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_postgres::IsolationLevel;

use super::coordinator;
use super::schema::{self, Shard};
use crate::core::{AccountId, CommandRecord, CommandType, EventKind, Ledger, TransactionId};
use crate::engine::recovery::apply_verified;
use crate::journal::tail::RecordId;
use crate::journal::{journal_dir, scan};
use crate::replicate::hash::partition_of;
use crate::replicate::zk::{self, Layout};

#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub zk: String,
    pub zk_root: String,
    pub data_dir: PathBuf,
    /// Differences printed in full; the rest are only counted.
    pub max_printed: usize,
    /// `--shard-ca`, loaded.
    pub shard_ca: Option<super::tls::ShardTls>,
}

/// An entry row, compact: its strings interned in the shard's `Names`. A shard's content is
/// held whole while the journal is replayed, so it is kept small, and read row by row: with
/// its strings and the query's whole result, 2.08 M entries and 0.99 M transfers took a peak
/// of 1.83 GB (12 GB for 15 M entries in a probe); 0.73 GB now. Still linear in the history:
/// comparing in sequence order as the journal is replayed would hold none of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    transaction_id: u128,
    account: u32,
    currency: u32,
    kind: u32,
    amount: i128,
    balance_after: u128,
    timestamp_ns: i64,
}

/// An entry as the journal says it should be.
#[derive(Debug)]
struct ExpectedEntry {
    transaction_id: u128,
    account: String,
    currency: String,
    kind: &'static str,
    amount: i128,
    balance_after: u128,
    timestamp_ns: i64,
}

impl ExpectedEntry {
    fn matches(&self, found: &Entry, names: &Names) -> bool {
        found.transaction_id == self.transaction_id
            && names.name(found.account) == self.account
            && names.name(found.currency) == self.currency
            && names.name(found.kind) == self.kind
            && found.amount == self.amount
            && found.balance_after == self.balance_after
            && found.timestamp_ns == self.timestamp_ns
    }
}

/// A transfers row, compact (see `Entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transfer {
    from: u32,
    to: u32,
    amount: u128,
    currency: u32,
    outcome: u32,
    seq: i64,
    timestamp_ns: i64,
}

/// A transfers row as the journal says it should be.
#[derive(Debug)]
struct ExpectedTransfer {
    from: String,
    to: String,
    amount: u128,
    currency: String,
    seq: i64,
    timestamp_ns: i64,
}

impl ExpectedTransfer {
    fn matches(&self, found: &Transfer, names: &Names) -> bool {
        names.name(found.from) == self.from
            && names.name(found.to) == self.to
            && found.amount == self.amount
            && names.name(found.currency) == self.currency
            && names.name(found.outcome) == "committed"
            && found.seq == self.seq
            && found.timestamp_ns == self.timestamp_ns
    }
}

/// The strings of one shard's rows (account ids, currencies, kinds, outcomes), each kept once.
#[derive(Default)]
struct Names {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn intern(&mut self, name: String) -> u32 {
        if let Some(&id) = self.ids.get(&name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }

    fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn show_entry(&self, e: &Entry) -> String {
        format!(
            "{{transaction_id: {}, account: {}, currency: {}, kind: {}, amount: {}, balance_after: {}, timestamp_ns: {}}}",
            TransactionId(e.transaction_id).to_uuid_string(),
            self.name(e.account),
            self.name(e.currency),
            self.name(e.kind),
            e.amount,
            e.balance_after,
            e.timestamp_ns
        )
    }

    fn show_transfer(&self, t: &Transfer) -> String {
        format!(
            "{{from: {}, to: {}, amount: {}, currency: {}, outcome: {}, seq: {}, timestamp_ns: {}}}",
            self.name(t.from),
            self.name(t.to),
            t.amount,
            self.name(t.currency),
            self.name(t.outcome),
            t.seq,
            t.timestamp_ns
        )
    }
}

/// A uuid column's text as the `TransactionId` it is.
fn uuid_of(text: &str) -> anyhow::Result<u128> {
    TransactionId::parse(text)
        .map(|id| id.0)
        .ok_or_else(|| anyhow::anyhow!("transaction id {text:?} is not a UUID"))
}

/// One shard's content in one snapshot.
#[derive(Default)]
struct Content {
    watermark: u64,
    /// The watermark row's identity of the record at `watermark` (`None`: written by an older
    /// replicator, or no row).
    applied_record: Option<String>,
    /// The watermark row's place: shard index, shard count, coordinator id (`None`: no row).
    place: Option<(i32, i32, String)>,
    /// (account, currency) -> (balance, last_seq)
    balances: HashMap<(String, String), (u128, i64)>,
    /// currency -> sum of balances, as SQL computed it.
    sums: HashMap<String, u128>,
    entries: HashMap<i64, Entry>,
    /// Transfers rows by transaction id.
    transfers: HashMap<u128, Transfer>,
    /// The strings of `entries` and `transfers`.
    names: Names,
    prepared: usize,
}

fn number<T: std::str::FromStr>(text: &str, what: &str) -> anyhow::Result<T> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("{what} {text:?} is not a whole number"))
}

async fn read_shard(shard: &Shard, coordinator_id: Option<&str>) -> anyhow::Result<Content> {
    let mut client = shard.connect().await?;
    schema::check_schema(&client, shard).await?;
    let prepared = match coordinator_id {
        Some(id) => coordinator::prepared_gids(&client, id).await?.len(),
        None => 0,
    };
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut content = Content {
        prepared,
        ..Content::default()
    };
    let row = tx
        .query_opt(
            "SELECT applied_seq, applied_record, shard_index, shard_count, coordinator_id FROM watermark",
            &[],
        )
        .await?;
    if let Some(row) = row {
        content.watermark = u64::try_from(row.try_get::<_, i64>(0)?)?;
        content.applied_record = row.try_get(1)?;
        content.place = Some((row.try_get(2)?, row.try_get(3)?, row.try_get(4)?));
    }
    for row in tx
        .query(
            "SELECT account_id, currency, balance::text, last_seq FROM balances",
            &[],
        )
        .await?
    {
        let balance: String = row.try_get(2)?;
        content.balances.insert(
            (row.try_get(0)?, row.try_get(1)?),
            (number(&balance, "balance")?, row.try_get(3)?),
        );
    }
    for row in tx
        .query(
            "SELECT currency, sum(balance)::text FROM balances GROUP BY currency",
            &[],
        )
        .await?
    {
        let sum: String = row.try_get(1)?;
        content.sums.insert(row.try_get(0)?, number(&sum, "sum")?);
    }
    // Streamed, row by row: the whole result at once was as large again as the rows kept.
    use futures_util::TryStreamExt;
    let rows = tx
        .query_raw(
            "SELECT seq, transaction_id::text, account_id, currency, kind, amount::text, balance_after::text, timestamp_ns FROM entries",
            std::iter::empty::<i64>(),
        )
        .await?;
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        let amount: &str = row.try_get(5)?;
        let balance_after: &str = row.try_get(6)?;
        let entry = Entry {
            transaction_id: uuid_of(row.try_get(1)?)?,
            account: content.names.intern(row.try_get(2)?),
            currency: content.names.intern(row.try_get(3)?),
            kind: content.names.intern(row.try_get(4)?),
            amount: number(amount, "amount")?,
            balance_after: number(balance_after, "balance_after")?,
            timestamp_ns: row.try_get(7)?,
        };
        content.entries.insert(row.try_get(0)?, entry);
    }
    let rows = tx
        .query_raw(
            "SELECT transaction_id::text, from_account, to_account, amount::text, currency, outcome, seq, timestamp_ns FROM transfers",
            std::iter::empty::<i64>(),
        )
        .await?;
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        let amount: &str = row.try_get(3)?;
        let transfer = Transfer {
            from: content.names.intern(row.try_get(1)?),
            to: content.names.intern(row.try_get(2)?),
            amount: number(amount, "amount")?,
            currency: content.names.intern(row.try_get(4)?),
            outcome: content.names.intern(row.try_get(5)?),
            seq: row.try_get(6)?,
            timestamp_ns: row.try_get(7)?,
        };
        content
            .transfers
            .insert(uuid_of(row.try_get(0)?)?, transfer);
    }
    tx.commit().await?;
    Ok(content)
}

/// The replay's side: the ledger plus, per (account index, currency), the sequence of the last
/// event that changed the balance.
struct Engine {
    ledger: Ledger,
    last_seq: HashMap<(u32, u16), u64>,
    /// Shard of each account index.
    shards: Vec<usize>,
}

impl Engine {
    fn shard_of(&self, account: u32) -> Option<usize> {
        self.shards.get(account as usize).copied()
    }
}

/// Compares the balances of shard `k` (whose watermark the ledger is at).
fn compare_balances(
    engine: &Engine,
    k: usize,
    shard: &Shard,
    content: &Content,
    shard_count: usize,
    out: &mut Differences,
) -> u64 {
    let ledger = &engine.ledger;
    let mut checked = 0;
    let mut engine_sums: HashMap<String, u128> = HashMap::new();
    for ((account, currency), (balance, last_seq)) in &content.balances {
        checked += 1;
        let right = partition_of(account, shard_count);
        if right != k {
            out.report(format!(
                "balance {account} {currency} is on shard {k} ({}) but the hash names shard {right}",
                shard.label
            ));
            continue;
        }
        let index = AccountId::new(account)
            .ok()
            .and_then(|id| ledger.account_index(&id));
        let found = index.and_then(|i| {
            ledger
                .balances(i)
                .into_iter()
                .find(|(c, _)| c.to_string() == *currency)
                .map(|(c, b)| (i, c, b))
        });
        match found {
            None => out.report(format!(
                "balance {account} {currency} = {balance} on shard {k}; the engine has no such balance"
            )),
            Some((i, c, expected)) => {
                if *balance != u128::from(expected) {
                    out.report(format!(
                        "balance {account} {currency} on shard {k}: sql {balance}, engine {expected}"
                    ));
                }
                let expected_seq = engine.last_seq.get(&(i, c.packed())).copied().unwrap_or(0);
                if u64::try_from(*last_seq).ok() != Some(expected_seq) {
                    out.report(format!(
                        "balance {account} {currency} on shard {k}: last_seq sql {last_seq}, engine {expected_seq}"
                    ));
                }
            }
        }
    }
    for index in 0..ledger.account_count() {
        if engine.shard_of(index) != Some(k) {
            continue;
        }
        let Some(id) = ledger.account_name(index) else {
            continue;
        };
        for (currency, balance) in ledger.balances(index) {
            let code = currency.to_string();
            *engine_sums.entry(code.clone()).or_default() += u128::from(balance);
            if !content
                .balances
                .contains_key(&(id.as_str().to_string(), code.clone()))
            {
                out.report(format!(
                    "balance {} {code} = {balance} in the engine is missing on shard {k} ({})",
                    id.as_str(),
                    shard.label
                ));
            }
        }
    }
    let mut currencies: Vec<&String> = engine_sums.keys().chain(content.sums.keys()).collect();
    currencies.sort();
    currencies.dedup();
    for currency in currencies {
        let sql = content.sums.get(currency).copied().unwrap_or(0);
        let engine = engine_sums.get(currency).copied().unwrap_or(0);
        if sql != engine {
            out.report(format!(
                "shard {k} ({}): sum of {currency} balances is {sql} in SQL, {engine} in the engine",
                shard.label
            ));
        }
    }
    checked
}

/// Checks one record's events and transfer against the shards' entries and transfers, removing
/// what matched (what is left at the end has no event).
fn check_record(
    engine: &Engine,
    record: &CommandRecord,
    contents: &mut [Option<Content>],
    out: &mut Differences,
) {
    let ledger = &engine.ledger;
    // Named only in reports.
    let transaction = || TransactionId(record.transaction_id.0).to_uuid_string();
    let name = |account: u32| {
        ledger
            .account_name(account)
            .map(|id| id.as_str().to_string())
            .unwrap_or_default()
    };
    for event in record.events() {
        let sign: i128 = match event.kind {
            EventKind::Deposited | EventKind::Credited => 1,
            EventKind::Withdrawn | EventKind::Debited => -1,
            _ => continue,
        };
        let Some(k) = engine.shard_of(event.account) else {
            out.report(format!(
                "event {}: unknown account index {}",
                event.seq, event.account
            ));
            continue;
        };
        let Some(content) = contents[k].as_mut() else {
            continue;
        };
        if event.seq > content.watermark {
            continue;
        }
        let expected = ExpectedEntry {
            transaction_id: record.transaction_id.0,
            account: name(event.account),
            currency: event.currency.to_string(),
            kind: event.kind.name(),
            amount: sign * i128::from(event.amount),
            balance_after: u128::from(event.balance_after),
            timestamp_ns: record.timestamp_ns.min(i64::MAX as u64) as i64,
        };
        match content.entries.remove(&(event.seq as i64)) {
            None => out.report(format!(
                "event {} ({} {} {}) is missing from the entries of shard {k}",
                event.seq, expected.kind, expected.account, expected.amount
            )),
            Some(found) if !expected.matches(&found, &content.names) => out.report(format!(
                "entry {} on shard {k}: sql {}, journal {{transaction_id: {}, account: {}, currency: {}, kind: {}, amount: {}, balance_after: {}, timestamp_ns: {}}}",
                event.seq,
                content.names.show_entry(&found),
                transaction(),
                expected.account,
                expected.currency,
                expected.kind,
                expected.amount,
                expected.balance_after,
                expected.timestamp_ns
            )),
            Some(_) => {}
        }
    }
    if record.command_type == CommandType::Transfer
        && record.is_committed()
        && let [debit, credit] = record.events()
    {
        let Some(k) = engine.shard_of(debit.account) else {
            return;
        };
        let Some(content) = contents[k].as_mut() else {
            return;
        };
        if debit.seq > content.watermark {
            return;
        }
        let expected = ExpectedTransfer {
            from: name(debit.account),
            to: name(credit.account),
            amount: u128::from(debit.amount),
            currency: debit.currency.to_string(),
            seq: debit.seq as i64,
            timestamp_ns: record.timestamp_ns.min(i64::MAX as u64) as i64,
        };
        match content.transfers.remove(&record.transaction_id.0) {
            None => out.report(format!(
                "transfer {} (sequence {}) is missing on shard {k}",
                transaction(),
                debit.seq
            )),
            Some(found) if !expected.matches(&found, &content.names) => out.report(format!(
                "transfer {} on shard {k}: sql {}, journal {{from: {}, to: {}, amount: {}, currency: {}, outcome: committed, seq: {}, timestamp_ns: {}}}",
                transaction(),
                content.names.show_transfer(&found),
                expected.from,
                expected.to,
                expected.amount,
                expected.currency,
                expected.seq,
                expected.timestamp_ns
            )),
            Some(_) => {}
        }
    }
}

/// Every transfer row has exactly one debit and one credit entry, across all shards.
fn check_pairs(contents: &[Option<Content>], out: &mut Differences) -> u64 {
    let mut sides: HashMap<u128, (u32, u32)> = HashMap::new();
    for content in contents.iter().flatten() {
        let debited = content.names.id("debited");
        let credited = content.names.id("credited");
        for entry in content.entries.values() {
            if Some(entry.kind) == debited {
                sides.entry(entry.transaction_id).or_default().0 += 1;
            } else if Some(entry.kind) == credited {
                sides.entry(entry.transaction_id).or_default().1 += 1;
            }
        }
    }
    let mut checked = 0;
    for content in contents.iter().flatten() {
        for id in content.transfers.keys() {
            checked += 1;
            match sides.remove(id) {
                Some((1, 1)) => {}
                other => {
                    let (debits, credits) = other.unwrap_or((0, 0));
                    out.report(format!(
                        "transfer {} has {debits} debit and {credits} credit entries (expected 1 and 1)",
                        TransactionId(*id).to_uuid_string()
                    ));
                }
            }
        }
    }
    for (id, (debits, credits)) in sides {
        out.report(format!(
            "transaction {} has {debits} debit and {credits} credit entries but no transfer row",
            TransactionId(id).to_uuid_string()
        ));
    }
    checked
}

/// How long `read_all` waits for the shards to agree on the watermark.
const AGREEMENT_PATIENCE: Duration = Duration::from_secs(5);

/// Reads every shard, and reads them again while they disagree on the watermark, for up to
/// `patience`. Between full reads only the watermark rows are polled, and a shard is read in
/// full again once they agree: a full read of a large shard takes seconds, and a round in
/// doubt (exactly when an operator runs this) made 25 of them, a minute on 600 k entries,
/// where "up to 5 s" was promised.
async fn read_all(
    shards: &[Shard],
    coordinator_id: Option<&str>,
    patience: Duration,
) -> Vec<anyhow::Result<Content>> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        tracing::debug!("reading every shard in full");
        let contents =
            futures_util::future::join_all(shards.iter().map(|s| read_shard(s, coordinator_id)))
                .await;
        let marks: Vec<u64> = contents
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.watermark))
            .collect();
        if marks.windows(2).all(|w| w[0] == w[1]) {
            return contents;
        }
        loop {
            if tokio::time::Instant::now() >= deadline {
                return contents;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let marks = futures_util::future::join_all(shards.iter().map(watermark_of)).await;
            match marks.into_iter().collect::<anyhow::Result<Vec<u64>>>() {
                Ok(marks) if !marks.windows(2).all(|w| w[0] == w[1]) => continue,
                // Agreed, or a shard went away (the full read reports it).
                _ => break,
            }
        }
    }
}

/// A shard's watermark alone (0 without a watermark row, as `read_shard` reads it).
async fn watermark_of(shard: &Shard) -> anyhow::Result<u64> {
    let client = shard.connect().await?;
    let row = client
        .query_opt("SELECT applied_seq FROM watermark", &[])
        .await?;
    match row {
        Some(row) => Ok(u64::try_from(row.try_get::<_, i64>(0)?)?),
        None => Ok(0),
    }
}

/// What the replicator checks of each shard's watermark row before it writes there: the row
/// exists when the shard holds anything (without it, which events the shard applied is
/// unknown), and names this shard's place in this list and this cluster's coordinator. A row
/// without a record identity (an older replicator's) is noted: that check cannot be made.
fn check_places(contents: &[Option<Content>], coordinator_id: Option<&str>, out: &mut Differences) {
    let n = contents.len();
    for (k, content) in contents.iter().enumerate() {
        let Some(c) = content else { continue };
        match &c.place {
            None if !(c.entries.is_empty() && c.balances.is_empty() && c.transfers.is_empty()) => {
                out.report(format!(
                    "shard {k} holds {} entries, {} balances and {} transfers but no watermark row: which events it applied is unknown (the replicator refuses it)",
                    c.entries.len(),
                    c.balances.len(),
                    c.transfers.len()
                ));
            }
            None => {}
            Some((index, count, id)) => {
                if *index as usize != k || *count as usize != n {
                    out.report(format!(
                        "shard {k}'s watermark row says shard {index} of {count}; the shard list has it as shard {k} of {n} (the replicator refuses it)"
                    ));
                }
                if let Some(ours) = coordinator_id
                    && id != ours
                {
                    out.report(format!(
                        "shard {k}'s watermark row names coordinator {id}; this cluster's is {ours} (the replicator refuses it)"
                    ));
                }
                if c.applied_record.is_none() && c.watermark > 0 {
                    println!(
                        "note: shard {k}'s watermark row has no applied_record (written by an older replicator): that it follows this journal cannot be checked until the next round writes one"
                    );
                }
            }
        }
    }
}

/// Runs the comparison and prints the differences, then a summary line. Returns the count.
pub async fn run(options: &ReconcileOptions) -> anyhow::Result<u64> {
    // Before anything else: a mistyped path would reconcile the store against an empty ledger.
    crate::journal::existing_journal_dir(&options.data_dir)
        .map_err(|e| anyhow::anyhow!("--data-dir: {e}"))?;
    let layout = Layout::new(&options.zk_root)?;
    let client = zk::connect(&options.zk).await?;
    let list = zk::get_sql_shards(&client, &layout).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "no SQL shard list at {}: run `wallet cluster set-sql-shards` first",
            layout.sql_shards()
        )
    })?;
    let record = coordinator::read_record(&client, &layout).await?;
    drop(client);
    let coordinator_id = record.as_ref().map(|(r, _)| r.id.clone());
    let shards = schema::parse_shards(&list.shards, options.shard_ca.as_ref())?;
    let n = shards.len();
    let mut out = Differences {
        count: 0,
        max_printed: options.max_printed,
    };
    let mut contents: Vec<Option<Content>> = Vec::with_capacity(n);
    for (shard, content) in shards
        .iter()
        .zip(read_all(&shards, coordinator_id.as_deref(), AGREEMENT_PATIENCE).await)
    {
        match content {
            Ok(c) => {
                if c.prepared > 0 {
                    println!(
                        "note: shard {} ({}) holds {} prepared transaction(s) of this replicator (in flight, or in doubt until `wallet replicate sql` runs again)",
                        shard.index, shard.label, c.prepared
                    );
                }
                contents.push(Some(c));
            }
            Err(e) => {
                out.report(format!(
                    "shard {} ({}) unreadable: {e:#}",
                    shard.index, shard.label
                ));
                contents.push(None);
            }
        }
    }
    check_places(&contents, coordinator_id.as_deref(), &mut out);
    let watermarks: Vec<Option<u64>> = contents
        .iter()
        .map(|c| c.as_ref().map(|c| c.watermark))
        .collect();
    let readable: Vec<u64> = watermarks.iter().flatten().copied().collect();
    let common = readable.iter().copied().min().unwrap_or(0);
    let all_equal = readable.len() == n && readable.windows(2).all(|w| w[0] == w[1]);
    if !all_equal && readable.len() == n {
        out.report(format!(
            "the shards are at different watermarks {readable:?}: a round is in doubt (run `wallet replicate sql` to recover it) or still running"
        ));
    }
    let entry_count: usize = contents.iter().flatten().map(|c| c.entries.len()).sum();
    let transfer_count: usize = contents.iter().flatten().map(|c| c.transfers.len()).sum();
    let pairs_checked = check_pairs(&contents, &mut out);
    let mut targets: Vec<u64> = readable.clone();
    targets.sort_unstable();
    targets.dedup();

    let mut engine = Engine {
        ledger: Ledger::new(crate::engine::ledger_config()),
        last_seq: HashMap::new(),
        shards: Vec::new(),
    };
    let mut next_target = 0;
    let mut balances_checked = 0u64;
    let mut totals_at_common = None;
    // The identity of the journal's record that ends at the ledger's sequence.
    let mut last_record: Option<RecordId> = None;
    let mut compare_at = |engine: &Engine,
                          at: u64,
                          last_record: Option<&RecordId>,
                          contents: &[Option<Content>],
                          out: &mut Differences| {
        for (k, content) in contents.iter().enumerate() {
            if let Some(c) = content
                && c.watermark == at
            {
                balances_checked += compare_balances(engine, k, &shards[k], c, n, out);
                // What the replicator checks before it continues a shard: the watermark row
                // names the journal's record there.
                if let (Some(stored), Some(ours)) = (&c.applied_record, last_record)
                    && RecordId::parse(stored).ok().as_ref() != Some(ours)
                {
                    out.report(format!(
                        "shard {k}: the watermark row records {stored} at sequence {at}, but the journal's record there is {ours}"
                    ));
                }
            }
        }
    };
    let end = scan(&journal_dir(&options.data_dir), 1, |record| {
        let at = engine.ledger.next_seq() - 1;
        while next_target < targets.len() && targets[next_target] == at {
            compare_at(&engine, at, last_record.as_ref(), &contents, &mut out);
            if at == common {
                totals_at_common = Some(engine.ledger.totals());
            }
            next_target += 1;
        }
        while next_target < targets.len() && targets[next_target] < record.next_seq() - 1 {
            out.report(format!(
                "watermark {} falls inside the record at {}",
                targets[next_target], record.first_seq
            ));
            next_target += 1;
        }
        apply_verified(&mut engine.ledger, record)?;
        last_record = Some(RecordId::of(record));
        for event in record.events() {
            match event.kind {
                EventKind::AccountOpened => {
                    let name = record.opened_account.as_str();
                    engine.shards.push(partition_of(name, n));
                }
                EventKind::Deposited
                | EventKind::Withdrawn
                | EventKind::Debited
                | EventKind::Credited => {
                    engine
                        .last_seq
                        .insert((event.account, event.currency.packed()), event.seq);
                }
                _ => {}
            }
        }
        check_record(&engine, record, &mut contents, &mut out);
        Ok(())
    })
    .context("replaying the journal")?;
    let journal_last = end.next_seq - 1;
    for &target in &targets[next_target..] {
        if target == journal_last {
            compare_at(&engine, target, last_record.as_ref(), &contents, &mut out);
            if target == common {
                totals_at_common = Some(engine.ledger.totals());
            }
        } else {
            out.report(format!(
                "shards at watermark {target} are beyond the journal's end at {journal_last}"
            ));
        }
    }
    for (k, content) in contents.iter().enumerate() {
        let Some(c) = content else { continue };
        let mut extra: Vec<&i64> = c.entries.keys().collect();
        extra.sort();
        for seq in extra {
            out.report(format!(
                "entry {seq} on shard {k} matches no event of the journal on that shard up to its watermark {}",
                c.watermark
            ));
        }
        for id in c.transfers.keys() {
            out.report(format!(
                "transfer {} on shard {k} matches no committed transfer of the journal on that shard",
                TransactionId(*id).to_uuid_string()
            ));
        }
    }
    // Per currency, the sum over all shards against the engine's total at the common watermark.
    if all_equal && let Some(totals) = &totals_at_common {
        let mut sql: HashMap<String, u128> = HashMap::new();
        for c in contents.iter().flatten() {
            for (currency, sum) in &c.sums {
                *sql.entry(currency.clone()).or_default() += sum;
            }
        }
        for (currency, total) in totals {
            let code = currency.to_string();
            let in_sql = sql.remove(&code).unwrap_or(0);
            if in_sql != u128::from(total.outstanding) {
                out.report(format!(
                    "{code}: the shards hold {in_sql} in total, the engine {} at sequence {common}",
                    total.outstanding
                ));
            }
        }
        for (code, sum) in sql {
            if sum != 0 {
                out.report(format!(
                    "{code}: the shards hold {sum}, the engine has no such currency"
                ));
            }
        }
    }
    for (k, shard) in shards.iter().enumerate() {
        match &contents[k] {
            Some(c) => println!(
                "shard {k} {}: watermark {} balances {} sums {:?}",
                shard.label,
                c.watermark,
                c.balances.len(),
                {
                    let mut s: Vec<_> = c.sums.iter().collect();
                    s.sort();
                    s
                }
            ),
            None => println!("shard {k} {}: unreadable", shard.label),
        }
    }
    println!(
        "reconcile: {} differences ({n} shards, common watermark {common}{}, {balances_checked} balances, {entry_count} entries, {transfer_count} transfers ({pairs_checked} debit/credit pairs) checked, {} accounts, journal ends at {journal_last})",
        out.count,
        if all_equal { "" } else { " (not all equal)" },
        engine.ledger.account_count(),
    );
    Ok(out.count)
}
