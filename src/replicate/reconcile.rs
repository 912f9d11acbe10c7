//! `wallet reconcile redis`: every balance in Redis against the engine's state replayed from the
//! journal at the sequence each node says it applied, plus the placement of every key.

use crate::replicate::Differences;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use super::redis::{BALANCE_PREFIX, connect, probe_record, scan_balance_keys};
use super::zk::{self, Layout, PartitionMap};
use crate::core::{AccountId, Ledger};
use crate::engine::recovery::apply_verified;
use crate::journal::tail::RecordId;
use crate::journal::{journal_dir, scan};

#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub zk: String,
    pub zk_root: String,
    pub data_dir: PathBuf,
    /// Differences printed in full; the rest are only counted.
    pub max_printed: usize,
}

/// A node's content, read while its applied sequence stayed put.
struct NodeContent {
    address: String,
    applied_seq: u64,
    version: Option<String>,
    /// The identity it stores of the record ending at `applied_seq` (`wallet:applied_record`).
    record: Option<String>,
    /// Account id -> field -> value.
    balances: HashMap<String, HashMap<String, String>>,
    /// Balance keys that could not be read as hashes, with the reason (a key of another type).
    unreadable: Vec<(String, String)>,
}

async fn read_node(address: &str) -> anyhow::Result<NodeContent> {
    let mut conn = connect(address).await?;
    for _ in 0..20 {
        let before = probe_record(&mut conn).await?;
        let keys = scan_balance_keys(&mut conn).await?;
        let mut balances = HashMap::with_capacity(keys.len());
        let mut unreadable = Vec::new();
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HGETALL").arg(key);
            }
            let values: Vec<HashMap<String, String>> = match pipe.query_async(&mut conn).await {
                Ok(values) => values,
                // One key of another type fails the whole pipeline: read the chunk's keys one
                // by one, so that the key is named and the others are still checked.
                Err(e) if !e.is_io_error() && !e.is_connection_dropped() => {
                    let mut values = Vec::with_capacity(chunk.len());
                    for key in chunk {
                        match redis::cmd("HGETALL")
                            .arg(key)
                            .query_async::<HashMap<String, String>>(&mut conn)
                            .await
                        {
                            Ok(fields) => values.push(fields),
                            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                                return Err(e.into());
                            }
                            Err(e) => {
                                unreadable.push((key.clone(), e.to_string()));
                                values.push(HashMap::new());
                            }
                        }
                    }
                    values
                }
                Err(e) => return Err(e.into()),
            };
            for (key, fields) in chunk.iter().zip(values) {
                // A key deleted between SCAN and HGETALL reads as empty: only possible while
                // something writes, which the second probe catches.
                if !fields.is_empty() {
                    balances.insert(
                        key.strip_prefix(BALANCE_PREFIX).unwrap_or(key).to_string(),
                        fields,
                    );
                }
            }
        }
        let after = probe_record(&mut conn).await?;
        if before == after {
            return Ok(NodeContent {
                address: address.to_string(),
                applied_seq: before.0,
                version: before.1,
                record: before.2,
                balances,
                unreadable,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(KeptChanging.into())
}

/// A node that changed under every one of its reads (a replicator writing to it): it could not
/// be compared, which is not a difference found.
#[derive(Debug, thiserror::Error)]
#[error("it kept changing while being read (a replicator is writing to it)")]
struct KeptChanging;

/// The run's result from the differences found and the nodes that could not be compared
/// because they kept changing: differences (exit 1) if there are any, otherwise, when a node
/// could not be compared, an error (exit 2, "could not compare"), never "0 differences" or a
/// count of differences that are not there.
fn outcome(differences: u64, changing: &[String]) -> anyhow::Result<u64> {
    if differences == 0 && !changing.is_empty() {
        bail!(
            "could not compare node(s) {}: they kept changing while being read; stop the replicator or the traffic, or let it catch up, and run again",
            changing.join(", ")
        );
    }
    Ok(differences)
}

/// Compares the nodes in `group` (indices into `nodes`, all at the ledger's current sequence,
/// where the journal's last record is `record`).
fn compare(
    ledger: &Ledger,
    record: Option<RecordId>,
    map: &PartitionMap,
    nodes: &[NodeContent],
    group: &[usize],
    out: &mut Differences,
) -> u64 {
    let mut checked = 0;
    for &n in group {
        let node = &nodes[n];
        // The identity the node stores of its last record (a node written by an older
        // replicator stores none): another journal's node can agree on every balance and
        // still be refused by the replicator.
        if let Some(stored) = &node.record
            && RecordId::parse(stored).ok() != record
        {
            out.report(format!(
                "node {} stores {stored:?} as the record at its applied sequence {}, but the journal's record there is {}: the node was fed by another journal (the replicator refuses it; `replicate redis --rebuild` clears it)",
                node.address,
                node.applied_seq,
                record.map_or("none".to_string(), |r| r.to_string())
            ));
        }
        for (key, reason) in &node.unreadable {
            checked += 1;
            out.report(format!(
                "key {key} on {} is not a balance hash: {reason}",
                node.address
            ));
        }
        for (account, fields) in &node.balances {
            checked += 1;
            let (right, right_address) = map.route(account);
            if right != n {
                out.report(format!("key {BALANCE_PREFIX}{account} is on node {} but the formula names node {right} ({right_address})", node.address));
                continue;
            }
            let expected = AccountId::new(account)
                .ok()
                .and_then(|id| ledger.account_index(&id))
                .map(|i| ledger.balances(i))
                .unwrap_or_default();
            if expected.is_empty() {
                out.report(format!("key {BALANCE_PREFIX}{account} on {} holds {fields:?}; the engine has no balance for it", node.address));
                continue;
            }
            let expected: HashMap<String, u64> =
                expected.iter().map(|(c, b)| (c.to_string(), *b)).collect();
            for (currency, balance) in &expected {
                // The replicator writes minor units in their canonical decimal form; anything
                // else ("+5", "05", " 5") is not what it wrote, although it parses.
                let stored = fields.get(currency);
                if stored.map(String::as_str) != Some(balance.to_string().as_str()) {
                    out.report(format!(
                        "{account} {currency} on {}: redis {stored:?}, engine {balance}",
                        node.address
                    ));
                }
            }
            for field in fields.keys().filter(|f| !expected.contains_key(*f)) {
                out.report(format!(
                    "{account} on {}: field {field} that the engine does not have",
                    node.address
                ));
            }
        }
    }
    // Balances the engine has that no node in the group holds.
    for index in 0..ledger.account_count() {
        let Some(id) = ledger.account_name(index) else {
            continue;
        };
        let name = id.as_str();
        let (right, address) = map.route(name);
        if !group.contains(&right) || ledger.balances(index).is_empty() {
            continue;
        }
        if !nodes[right].balances.contains_key(name) {
            out.report(format!(
                "{name}: missing on {address} (engine has {:?})",
                ledger.balances(index)
            ));
        }
    }
    checked
}

/// Runs the comparison and prints the differences, then a summary line. Returns the count.
pub async fn run(options: &ReconcileOptions) -> anyhow::Result<u64> {
    // Before anything else: a mistyped path would reconcile the store against an empty ledger.
    crate::journal::existing_journal_dir(&options.data_dir)
        .map_err(|e| anyhow::anyhow!("--data-dir: {e}"))?;
    let layout = Layout::new(&options.zk_root)?;
    let client = zk::connect(&options.zk).await?;
    let map = zk::get_partition_map(&client, &layout)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no partition map at {}: run `wallet cluster init` first",
                layout.partitions()
            )
        })?;
    drop(client);
    let mut out = Differences {
        count: 0,
        max_printed: options.max_printed,
    };
    let mut nodes = Vec::new();
    // Nodes not compared because they kept changing (see `outcome`).
    let mut changing: Vec<String> = Vec::new();
    let version = map.version.to_string();
    let mut readable = Vec::new();
    for (i, address) in map.nodes.iter().enumerate() {
        match read_node(address).await {
            Ok(content) => {
                if content.version.as_deref() != Some(version.as_str()) {
                    out.report(format!(
                        "node {address} has map version {:?}, the map is at {version}",
                        content.version
                    ));
                }
                readable.push(i);
                nodes.push(content);
            }
            Err(e) => {
                if e.downcast_ref::<KeptChanging>().is_some() {
                    println!("note: node {address} not compared: {e:#}");
                    changing.push(address.clone());
                } else {
                    out.report(format!("node {address} unreadable: {e:#}"));
                }
                nodes.push(NodeContent {
                    address: address.clone(),
                    applied_seq: 0,
                    version: None,
                    record: None,
                    balances: HashMap::new(),
                    unreadable: Vec::new(),
                });
            }
        }
    }
    let mut targets: Vec<u64> = readable.iter().map(|&i| nodes[i].applied_seq).collect();
    targets.sort_unstable();
    targets.dedup();
    let group_at = |seq: u64| -> Vec<usize> {
        readable
            .iter()
            .copied()
            .filter(|&i| nodes[i].applied_seq == seq)
            .collect()
    };

    // Replay the journal, comparing each group of nodes when the ledger reaches its sequence.
    let mut ledger = Ledger::new(crate::engine::ledger_config());
    let mut next_target = 0;
    let mut keys_checked = 0;
    let mut last_record: Option<RecordId> = None;
    let end = scan(&journal_dir(&options.data_dir), 1, |record| {
        let at = ledger.next_seq() - 1;
        while next_target < targets.len() && targets[next_target] == at {
            keys_checked += compare(&ledger, last_record, &map, &nodes, &group_at(at), &mut out);
            next_target += 1;
        }
        while next_target < targets.len() && targets[next_target] < record.next_seq() - 1 {
            out.report(format!(
                "applied_seq {} falls inside the record at {}",
                targets[next_target], record.first_seq
            ));
            next_target += 1;
        }
        apply_verified(&mut ledger, record)?;
        last_record = Some(RecordId::of(record));
        Ok(())
    })?;
    let journal_last = end.next_seq - 1;
    for &target in &targets[next_target..] {
        if target == ledger.next_seq() - 1 {
            keys_checked += compare(
                &ledger,
                last_record,
                &map,
                &nodes,
                &group_at(target),
                &mut out,
            );
        } else {
            out.report(format!(
                "nodes {:?} applied up to {target}, beyond the journal's end at {journal_last}",
                group_at(target)
            ));
        }
    }
    for node in &nodes {
        println!(
            "node {}: applied_seq {} map_version {:?} keys {}",
            node.address,
            node.applied_seq,
            node.version,
            node.balances.len()
        );
    }
    let (low, high) = (
        targets.first().copied().unwrap_or(0),
        targets.last().copied().unwrap_or(0),
    );
    println!(
        "reconcile: {} differences ({} nodes, map version {}, {} keys checked, {} accounts, applied_seq {}..{}, journal ends at {})",
        out.count,
        map.nodes.len(),
        map.version,
        keys_checked,
        ledger.account_count(),
        low,
        high,
        journal_last
    );
    outcome(out.count, &changing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that kept changing under every read was counted as a difference (exit 1, "the
    /// copy differs") when nothing had been compared: under steady traffic every node of a
    /// large map did. It is now "could not compare" (exit 2) unless real differences were found.
    #[test]
    fn nodes_that_kept_changing_are_not_differences() {
        let changing = vec!["127.0.0.1:6379".to_string()];
        let error = outcome(0, &changing).expect_err("nothing compared is not a clean result");
        assert!(error.to_string().contains("127.0.0.1:6379"), "{error}");
        assert_eq!(
            crate::replicate::reconcile_exit_code(outcome(0, &changing)),
            std::process::ExitCode::from(2)
        );
        assert_eq!(outcome(3, &changing).expect("differences found"), 3);
        assert_eq!(outcome(0, &[]).expect("clean"), 0);
        // And the error a read gives up with is recognised as such.
        let kept: anyhow::Error = KeptChanging.into();
        assert!(kept.downcast_ref::<KeptChanging>().is_some());
    }
}
