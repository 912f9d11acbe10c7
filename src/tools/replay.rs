//! `wallet replay` and `wallet snapshot`: rebuild state from the journal, audit it.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::core::CommandType;
use crate::core::codec::encode_snapshot;
use crate::core::{AccountId, Ledger, format_amount};
use crate::engine::recovery::{check_durable_watermark, recover, replay_journal};
use crate::journal::reader::check_segment_headers;
use crate::journal::storage::MmapStorage;
use crate::journal::{
    DEFAULT_SEGMENT_SIZE_BYTES, JournalConfig, JournalWriter, MAX_SEGMENT_SIZE_BYTES,
    MIN_SEGMENT_SIZE_BYTES, SyncMode, estimate_records, journal_dir, snapshot, snapshot_dir,
};

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Start from the newest valid snapshot instead of the beginning of the journal.
    #[arg(long)]
    pub from_snapshot: bool,
    /// Stop after the record holding this sequence number (from 1: sequence 0 holds nothing).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Stop before the first record stamped after this time (RFC 3339: `Z` or an offset such
    /// as `+01:00`).
    #[arg(long)]
    pub to_time: Option<String>,
    /// Print this account's balances and its entries with running balances.
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub transaction_id: String,
    pub kind: &'static str,
    pub currency: String,
    pub amount: String,
    pub balance_after: String,
    pub timestamp_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub ok: bool,
    pub error: Option<String>,
    pub records: u64,
    pub events: u64,
    pub checkpoints_verified: u64,
    pub last_seq: u64,
    /// Stopped by `--to-seq` or `--to-time`: the records after `last_seq` were checked for
    /// their frames and chain only (not replayed: their checkpoints, invariants and the
    /// snapshot state past the stop are not audited; a replay without the stop does it all).
    pub stopped_early: bool,
    /// With `--from-snapshot`: the last sequence in the snapshot the replay started from (none:
    /// no valid snapshot, so the replay started from the beginning of the journal).
    pub snapshot_seq: Option<u64>,
    /// Without `--from-snapshot`: the last sequence in the snapshot `serve` would start from
    /// (the newest valid one), when the replay audited it and it passed: its chain value
    /// against the journal, a journal that reaches it, and its state against the replayed state
    /// at its sequence (a record boundary). `None` when it failed (see `error`) or was not
    /// reached.
    pub snapshot_audited: Option<u64>,
    /// Snapshot files newer than the one used (or audited) that were skipped as invalid or
    /// unreadable, with the reason: start-up skips them too, so they cost nothing but time,
    /// but they are damage an audit reports.
    pub snapshots_skipped: Vec<String>,
    /// The last sequence the journal's durable-watermark file says was synced (and so may have
    /// been acknowledged). A journal that ends before it has lost acknowledged records.
    pub durable_seq: Option<u64>,
    /// Where a torn tail starts (newest segment and byte offset), when the journal has one:
    /// bytes after the last valid record that are neither a record nor preallocated zeros.
    pub torn_tail: Option<String>,
    pub accounts: u32,
    pub transaction_ids: u32,
    pub totals: Vec<(String, String)>,
    pub state_hash: String,
    pub events_per_sec: f64,
    pub account: Option<AccountReport>,
}

#[derive(Debug, Serialize)]
pub struct AccountReport {
    pub account_id: String,
    /// Whether the account was open at the end of the replay: a mistyped id is told apart from
    /// an account without activity.
    pub opened: bool,
    pub balances: Vec<(String, String)>,
    pub entries: Vec<Entry>,
}

pub fn run(args: &ReplayArgs) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(
        args.to_seq != Some(0),
        "--to-seq must be at least 1: sequence 0 holds nothing"
    );
    existing_journal(&args.data_dir)?;
    // A snapshot holds no time: the newest one may be past --to-time, and its state would be
    // reported as the state at that time.
    anyhow::ensure!(
        !(args.from_snapshot && args.to_time.is_some()),
        "--to-time cannot be combined with --from-snapshot: snapshots record no time, so the state at a time is replayed from the start of the journal (use --to-seq with --from-snapshot)"
    );
    let to_time_ns = match &args.to_time {
        Some(t) => Some(parse_rfc3339_ns(t).map_err(|e| anyhow::anyhow!("--to-time {t:?}: {e}"))?),
        None => None,
    };
    let account = match &args.account {
        Some(a) => Some(AccountId::new(a).map_err(|e| anyhow::anyhow!("--account: {e}"))?),
        None => None,
    };
    let config = crate::engine::ledger_config();
    let journal = journal_dir(&args.data_dir);
    let started = Instant::now();
    let durable = crate::journal::read_durable_watermark(&journal)?;
    let durable_seq = durable.map(|(seq, _)| seq);
    let mut snapshot_seq = None;
    let mut snapshot_chain = None;
    let mut snapshots_skipped = Vec::new();
    let mut ledger = if args.from_snapshot {
        match snapshot::load_newest_snapshot_noting(
            &snapshot_dir(&args.data_dir),
            config,
            args.to_seq.map(|s| s.saturating_add(1)),
            &mut snapshots_skipped,
        ) {
            Some(loaded) => {
                snapshot_seq = Some(loaded.ledger.next_seq() - 1);
                snapshot_chain = Some((loaded.chain, loaded.path));
                loaded.ledger
            }
            None => Ledger::new(config),
        }
    } else if to_time_ns.is_some() {
        // How much of the journal a time covers is unknown: no reservation.
        Ledger::new(config)
    } else {
        // No more ids than records up to --to-seq.
        let records = estimate_records(&journal, 1).min(
            args.to_seq
                .map_or(usize::MAX, |s| usize::try_from(s).unwrap_or(usize::MAX)),
        );
        Ledger::with_capacity(config, 0, records)
    };
    let mut records = 0u64;
    let mut events = 0u64;
    let mut checkpoints = 0u64;
    let mut stopped = false;
    // Without --from-snapshot, the snapshot start-up would use is audited against the journal
    // (a replay that passed a data directory `serve` refuses would be no audit). Loaded, hashed
    // and dropped before the replay: one ledger in memory at a time.
    let audited = if args.from_snapshot {
        None
    } else {
        snapshot::load_newest_snapshot_noting(
            &snapshot_dir(&args.data_dir),
            config,
            None,
            &mut snapshots_skipped,
        )
        .map(|l| (l.ledger.next_seq(), l.ledger.state_hash(), l.chain, l.path))
    };
    // The replayed state's hash where the audited snapshot's ends (at a record boundary); a
    // snapshot of an empty ledger ends where the replay starts.
    let mut hash_at_snapshot: Option<u64> = audited
        .as_ref()
        .filter(|(next_seq, ..)| *next_seq == ledger.next_seq())
        .map(|_| ledger.state_hash());
    let mut account_index: Option<u32> = account.as_ref().and_then(|a| ledger.account_index(a));
    let mut entries = Vec::new();
    let progress = if !args.json && console_is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message("replaying");
        Some(bar)
    } else {
        None
    };
    let admit = |record: &crate::core::CommandRecord| {
        stopped = stopped
            || args.to_seq.is_some_and(|s| record.first_seq > s)
            || to_time_ns.is_some_and(|t| {
                record.timestamp_ns > t && record.command_type != CommandType::Checkpoint
            });
        !stopped
    };
    // The first committed record whose stored fingerprint is not its own body's. The accounts'
    // id hashes come from their slots, which applying the record has just brought into cache.
    let mut wrong_fingerprint: Option<(u64, String)> = None;
    let observe = |ledger: &Ledger, record: &crate::core::CommandRecord, checkpoint: bool| {
        if wrong_fingerprint.is_none()
            && let Some(fingerprint) = record.body_fingerprint(|i| ledger.account_hash(i))
            && fingerprint != record.fingerprint
        {
            wrong_fingerprint = Some((
                record.first_seq,
                format!(
                    "its transaction {} stores fingerprint {:016x}, but its body's is {fingerprint:016x}: a retry of its body would be refused as transaction_id_reused, and one of another body answered as a replay",
                    record.transaction_id.to_uuid_string(),
                    record.fingerprint
                ),
            ));
        }
        if let Some((next_seq, ..)) = &audited
            && ledger.next_seq() == *next_seq
        {
            hash_at_snapshot = Some(ledger.state_hash());
        }
        checkpoints += u64::from(checkpoint);
        records += 1;
        events += u64::from(record.event_count);
        if let Some(id) = &account {
            if account_index.is_none() {
                account_index = ledger.account_index(id);
            }
            if let Some(index) = account_index {
                for event in record.events() {
                    if event.account == index && event.kind.changes_balance() {
                        entries.push(Entry {
                            seq: event.seq,
                            transaction_id: record.transaction_id.to_uuid_string(),
                            kind: event.kind.name(),
                            currency: event.currency.to_string(),
                            amount: format_amount(event.amount, event.currency),
                            balance_after: format_amount(event.balance_after, event.currency),
                            timestamp_ns: record.timestamp_ns,
                        });
                    }
                }
            }
        }
        if let Some(bar) = &progress
            && records.is_multiple_of(65536)
        {
            bar.set_message(format!("replaying: sequence {}", record.first_seq));
            bar.tick();
        }
    };
    // A snapshot of another history is reported as such, before what applying this journal's
    // records to it would say.
    let chain_error = match (&snapshot_chain, snapshot_seq) {
        (Some((chain, path)), Some(seq)) => {
            crate::engine::recovery::check_snapshot_chain(&journal, path, seq + 1, *chain)
                .err()
                .map(|e| e.to_string())
        }
        _ => match &audited {
            Some((next_seq, _, Some(chain), path)) => {
                crate::engine::recovery::check_snapshot_chain(
                    &journal,
                    path,
                    *next_seq,
                    Some(*chain),
                )
                .err()
                .map(|e| e.to_string())
            }
            _ => None,
        },
    };
    // What start-up checks of the segments the replay does not open (those before the
    // snapshot's): the history starts at sequence 1 and every file named like a segment is one.
    // A replay that passed a journal `serve` refuses would be no audit.
    let headers_error = check_segment_headers(&journal, snapshot_seq.map_or(1, |s| s + 1))
        .err()
        .map(|e| e.to_string());
    let scanned = replay_journal(&mut ledger, &journal, admit, observe);
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let (mut error, torn_tail) = match scanned {
        Err(e) => (Some(e.to_string()), None),
        Ok(end) => {
            let torn_tail = end.torn_at.map(|offset| match &end.segment {
                Some((path, _)) => format!("{} at byte {offset}", path.display()),
                None => format!("byte {offset}"),
            });
            // The checks of where the journal ends (its durable watermark, a snapshot ahead of
            // it) hold for a replay stopped by --to-seq or --to-time too: the scan reads the
            // rest of the journal, and a journal that lost synced records fails its audit
            // whatever state was asked for. (A limited replay skipped them, and passed a journal
            // the full one, and start-up, refuse.) Only the state's end against the journal's
            // is the full replay's.
            let to_end = !stopped;
            let journal_last = end.next_seq - 1;
            let missing = match snapshot_seq {
                Some(snap) if journal_last < snap => Some(format!(
                    "the snapshot holds sequence {snap} but the journal ends at {journal_last}: \
                     journal records the snapshot covers are missing"
                )),
                // The rules start-up applies, in its order, with its messages (file, offset,
                // sequence): the durable watermark, then the snapshot it would use.
                _ => check_durable_watermark(&journal, durable, &end)
                    .err()
                    .or_else(|| {
                        crate::engine::recovery::check_snapshots_covered(&args.data_dir, &end).err()
                    })
                    .map(|e| e.to_string()),
            };
            // Start-up's last check: the journal continues where the state ends (a snapshot
            // from an older build, naming no chain value, could end inside a record).
            let missing = missing.or_else(|| {
                (to_end && ledger.next_seq() != end.next_seq).then(|| {
                    format!(
                        "the journal continues at sequence {} but the replayed state ends before \
                         sequence {}: the snapshot was not taken at a record boundary of this \
                         journal",
                        end.next_seq,
                        ledger.next_seq()
                    )
                })
            });
            // A state asked for at a sequence the journal does not reach is not the end's.
            let missing = missing.or_else(|| {
                args.to_seq
                    .filter(|&s| to_end && s > journal_last)
                    .map(|s| {
                        format!(
                            "--to-seq {s} is past the end of the journal (its last sequence is \
                         {journal_last}): there is no state at {s} yet"
                        )
                    })
            });
            (missing, torn_tail)
        }
    };
    // The audited snapshot's state against the journal's at its sequence.
    let mut snapshot_matched = false;
    if let Some((next_seq, hash, _, path)) = &audited {
        match hash_at_snapshot {
            Some(replayed) if replayed == *hash => snapshot_matched = chain_error.is_none(),
            Some(replayed) => {
                error = error.or(Some(format!(
                    "snapshot {} holds a state (hash {hash:016x}) other than the journal's at \
                     sequence {} (hash {replayed:016x}): one of them is wrong; `serve` would \
                     start from the snapshot",
                    path.display(),
                    next_seq - 1
                )));
            }
            // Replayed past it without meeting its sequence at a record's end: a snapshot from
            // an older build (no chain value) of another history, which start-up refuses.
            None if ledger.next_seq() > *next_seq => {
                error = error.or(Some(format!(
                    "snapshot {} ends at sequence {}, inside a record of this journal: it was \
                     not taken at a record boundary of this journal (another history's?); \
                     `serve` refuses to start with it",
                    path.display(),
                    next_seq - 1
                )));
            }
            None => {}
        }
    }
    if chain_error.is_some() {
        error = chain_error;
    }
    if headers_error.is_some() {
        error = headers_error;
    }
    if error.is_none() {
        // Named like any other record that does not replay: its file and byte offset (found
        // again now: the replay's reader does not keep positions).
        error = wrong_fingerprint.map(|(seq, reason)| {
            crate::journal::JournalError::Visitor {
                seq,
                reason,
                at: crate::journal::reader::record_position(&journal, seq),
            }
            .to_string()
        });
    }
    if error.is_none()
        && let Err(e) = ledger.check_invariants()
    {
        error = Some(format!("invariant violated: {e}"));
    }
    let seconds = started.elapsed().as_secs_f64();
    let account_report = account.map(|id| AccountReport {
        account_id: id.to_string(),
        opened: account_index.is_some(),
        balances: account_index
            .map(|i| ledger.balances(i))
            .unwrap_or_default()
            .into_iter()
            .map(|(c, b)| (c.to_string(), format_amount(b, c)))
            .collect(),
        entries,
    });
    Ok(ReplayReport {
        ok: error.is_none(),
        error,
        records,
        events,
        checkpoints_verified: checkpoints,
        last_seq: ledger.next_seq() - 1,
        stopped_early: stopped,
        snapshot_seq,
        snapshot_audited: audited
            .as_ref()
            .filter(|_| snapshot_matched)
            .map(|(next_seq, ..)| next_seq - 1),
        snapshots_skipped,
        durable_seq,
        torn_tail,
        accounts: ledger.account_count(),
        transaction_ids: ledger.transaction_id_count(),
        totals: ledger
            .totals()
            .into_iter()
            .map(|(c, t)| (c.to_string(), format_amount(t.outstanding, c)))
            .collect(),
        state_hash: format!("{:016x}", ledger.state_hash()),
        events_per_sec: events as f64 / seconds.max(1e-9),
        account: account_report,
    })
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

pub fn print(report: &ReplayReport) {
    if let Some(account) = &report.account {
        if account.opened {
            println!("account {}", account.account_id);
        } else {
            println!(
                "account {}: never opened (up to sequence {})",
                account.account_id, report.last_seq
            );
        }
        for (currency, balance) in &account.balances {
            println!("  balance {currency} {balance}");
        }
        for e in &account.entries {
            println!(
                "  seq {:>12}  {:<9} {} {:>16}  balance {:>16}  {}",
                e.seq, e.kind, e.currency, e.amount, e.balance_after, e.transaction_id
            );
        }
    }
    println!(
        "replayed {} records ({} events) to sequence {}; {} checkpoints verified; {} accounts, {} transaction ids",
        report.records,
        report.events,
        report.last_seq,
        report.checkpoints_verified,
        report.accounts,
        report.transaction_ids
    );
    for (currency, total) in &report.totals {
        println!("  total {currency} {total}");
    }
    if let Some(seq) = report.snapshot_seq {
        println!("started from the snapshot at sequence {seq}");
    }
    if let Some(seq) = report.snapshot_audited {
        println!("the snapshot at sequence {seq} matches the replayed state there");
    }
    for skipped in &report.snapshots_skipped {
        println!("skipped snapshot {skipped}");
    }
    if let Some(torn) = &report.torn_tail {
        println!("torn tail (bytes after the last valid record): {torn}");
    }
    println!(
        "state hash {}  ({:.0} events/s)",
        report.state_hash, report.events_per_sec
    );
    match &report.error {
        None if report.stopped_early => println!(
            "OK up to sequence {}: frames and chain verified to the journal's end, checkpoints and invariants up to the stop (replay without --to-seq/--to-time for the full audit)",
            report.last_seq
        ),
        None => println!("OK: frames, chain, checkpoints and invariants verified"),
        Some(e) => println!("FAILED: {e}"),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
}

/// Writes a snapshot of the state at the end of the journal, once the journal is durable up to
/// it (the engine must not be running on this data directory: both take its lock).
/// Refuses a data directory without a journal: an audit or a snapshot of a mistyped path
/// would otherwise report an empty ledger as verified.
fn existing_journal(data_dir: &std::path::Path) -> anyhow::Result<()> {
    crate::journal::existing_journal_dir(data_dir)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("--data-dir: {e}"))
}

pub fn snapshot(args: &SnapshotArgs) -> anyhow::Result<PathBuf> {
    existing_journal(&args.data_dir)?;
    // A running server would keep writing behind the state read here.
    let _lock = crate::api::lock_data_dir(&args.data_dir)?;
    let recovered = recover(
        &args.data_dir,
        crate::engine::ledger_config(),
        true,
        |_, _| {},
    )?;
    // What recovery read may be only in the page cache (a server that crashed before its
    // sync): a snapshot of it must not reach the disk before the records do. Opening a writer
    // on the recovered end does what a starting server does: cuts a torn tail, syncs the newest
    // segment (its pages dirtied first) and publishes the durable watermark.
    // The newest segment's own size: nothing is appended here, and a writer configured larger
    // grows a newest segment that holds no record to its size (256 MiB by default), which
    // failed the snapshot on a nearly full disk for space it never uses.
    let segment_size_bytes = recovered
        .end
        .segment
        .as_ref()
        .and_then(|(path, _)| std::fs::metadata(path).ok())
        .map_or(DEFAULT_SEGMENT_SIZE_BYTES, |meta| {
            meta.len()
                .clamp(MIN_SEGMENT_SIZE_BYTES, MAX_SEGMENT_SIZE_BYTES)
        });
    let writer = JournalWriter::open(
        Box::new(MmapStorage::default()),
        JournalConfig {
            dir: journal_dir(&args.data_dir),
            segment_size_bytes,
            sync: SyncMode::Batch,
        },
        &recovered.end,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "making the journal in {} durable before the snapshot: {e}",
            journal_dir(&args.data_dir).display()
        )
    })?;
    drop(writer);
    let bytes = encode_snapshot(&recovered.ledger, Some(recovered.end.last_crc));
    let dir = snapshot_dir(&args.data_dir);
    snapshot::write_snapshot(&dir, &bytes).map_err(|e| {
        anyhow::anyhow!(
            "writing a snapshot of {} bytes (sequences up to {}) into {}: {e}",
            bytes.len(),
            recovered.end.next_seq - 1,
            dir.display()
        )
    })
}

/// An RFC 3339 time as nanoseconds since the Unix epoch: `humantime` for the part before the
/// offset, which it accepts only as `Z`; a numeric offset (`+01:00`, `-05:30`) is applied here.
fn parse_rfc3339_ns(text: &str) -> anyhow::Result<u64> {
    // A date alone was read as a time with the offset "-MM-DD".
    anyhow::ensure!(
        text.contains(['T', 't', ' ']),
        "not an RFC 3339 time: it needs a date and a time, as 2026-12-03T10:00:00Z"
    );
    let split = text
        .len()
        .checked_sub(6)
        .filter(|&i| text.is_char_boundary(i))
        .map(|i| text.split_at(i));
    let (utc, offset_secs) = match split {
        Some((time, offset)) if offset.starts_with(['+', '-']) && !time.is_empty() => {
            let b = offset.as_bytes();
            let digits = |i: usize| -> anyhow::Result<i64> {
                match (b[i], b[i + 1]) {
                    (h @ b'0'..=b'9', l @ b'0'..=b'9') => {
                        Ok(i64::from(h - b'0') * 10 + i64::from(l - b'0'))
                    }
                    _ => anyhow::bail!("the offset {offset:?} is not [+-]HH:MM"),
                }
            };
            anyhow::ensure!(b[3] == b':', "the offset {offset:?} is not [+-]HH:MM");
            let (hours, minutes) = (digits(1)?, digits(4)?);
            anyhow::ensure!(
                hours < 24 && minutes < 60,
                "the offset {offset:?} is out of range"
            );
            let secs = hours * 3600 + minutes * 60;
            (format!("{time}Z"), if b[0] == b'+' { secs } else { -secs })
        }
        _ => (text.to_string(), 0),
    };
    let since_epoch = humantime::parse_rfc3339(&utc)?
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow::anyhow!("before 1970"))?;
    // Local time minus its offset is UTC.
    let ns = i128::try_from(since_epoch.as_nanos())? - i128::from(offset_secs) * 1_000_000_000;
    u64::try_from(ns).map_err(|_| anyhow::anyhow!("before 1970 or too far ahead"))
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339_ns;

    #[test]
    fn times_with_offsets_are_the_same_instant_in_utc() {
        let utc = parse_rfc3339_ns("2026-12-03T10:00:00Z").unwrap();
        assert_eq!(parse_rfc3339_ns("2026-12-03T11:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_rfc3339_ns("2026-12-03T04:30:00-05:30").unwrap(), utc);
        assert_eq!(parse_rfc3339_ns("2026-12-03T10:00:00+00:00").unwrap(), utc);
        assert_eq!(
            parse_rfc3339_ns("2026-12-03T11:00:00.5+01:00").unwrap(),
            utc + 500_000_000
        );
        for bad in [
            "2026-12-03T10:00:00+1:00",
            "2026-12-03T10:00:00+24:00",
            "2026-12-03T10:00:00+01:60",
            "2026-12-03T10:00:00+0a:00",
            "2026-12-03T10:00:00",
            "+01:00",
            "yesterday",
            "2026-12-06",
            "2026-12-03T10:00€a€",
            "€a€",
        ] {
            assert!(parse_rfc3339_ns(bad).is_err(), "{bad} was accepted");
        }
        // A date alone is named as such (it was refused as an offset "-12-06").
        let error = parse_rfc3339_ns("2026-12-06").unwrap_err().to_string();
        assert!(error.contains("a date and a time"), "{error}");
    }
}
