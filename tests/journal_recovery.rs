//! The journal under damage: torn tails (zeroed or cut short), flipped bits, failing and tearing
//! storage, snapshots and checkpoints. Recovery must give back exactly the records before the
//! damage, or refuse with the file and offset; never silently fewer records.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use wallet::core::codec::encode_snapshot;
use wallet::core::{
    AccountId, Command, CommandKind, CommandRecord, Currency, Ledger, LedgerConfig, Refusal,
    TransactionId,
};
use wallet::engine::recovery::{Recovered, recover, replay_journal};
use wallet::engine::{Engine, EngineConfig, JournalStage, OutputSlot, ReplySink, WaitMode};
use wallet::journal::format::{SEGMENT_HEADER_BYTES, check_frame};
use wallet::journal::storage::{Faults, FaultyStorage, MmapStorage, Storage};
use wallet::journal::{
    JournalConfig, JournalEnd, JournalError, JournalWriter, SyncMode, journal_dir, list_segments,
    snapshot, snapshot_dir,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const ACCOUNTS: u64 = 8;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn account(i: u64) -> AccountId {
    AccountId::new(&format!("acct-{i}")).unwrap()
}

/// Command number `i` of a deterministic stream: the first `ACCOUNTS` open accounts, then a mix
/// of deposits, withdrawals and transfers (some rejected). Ids are unique per `i`.
fn command(i: u64) -> Command {
    let usd = Currency::new("USD").unwrap();
    let r = splitmix(i);
    let a = account((r >> 8) % ACCOUNTS);
    let b = account((r >> 16) % ACCOUNTS);
    let amount = 1 + (r >> 24) % 500;
    let kind = if i < ACCOUNTS {
        CommandKind::OpenAccount {
            account: account(i),
        }
    } else {
        match r % 8 {
            0..=2 => CommandKind::Deposit {
                account: a,
                amount,
                currency: usd,
            },
            3 => CommandKind::Withdraw {
                account: a,
                amount,
                currency: usd,
            },
            _ => CommandKind::Transfer {
                from: a,
                to: b,
                amount,
                currency: usd,
            },
        }
    };
    Command {
        transaction_id: TransactionId(0x00C0_FFEE_0000 + u128::from(i)),
        timestamp_ns: 1_000_000 + i,
        kind,
    }
}

/// The state after every prefix of the journal: `hashes[n]` and `last_seq[n]` after `n` records.
struct History {
    hashes: Vec<u64>,
    last_seq: Vec<u64>,
}

impl History {
    fn new(ledger: &Ledger) -> History {
        History {
            hashes: vec![ledger.state_hash()],
            last_seq: vec![ledger.next_seq() - 1],
        }
    }

    fn records(&self) -> usize {
        self.hashes.len() - 1
    }

    fn push(&mut self, ledger: &Ledger) {
        self.hashes.push(ledger.state_hash());
        self.last_seq.push(ledger.next_seq() - 1);
    }
}

fn open_writer(
    data: &Path,
    storage: Box<dyn Storage>,
    segment_size_bytes: u64,
    sync: SyncMode,
    end: &JournalEnd,
) -> JournalWriter {
    let config = JournalConfig {
        dir: journal_dir(data),
        segment_size_bytes,
        sync,
    };
    JournalWriter::open(storage, config, end).expect("open the journal writer")
}

/// Executes commands `range` on `ledger` and journals them, committing every `commit_every`.
fn write_commands(
    writer: &mut JournalWriter,
    ledger: &mut Ledger,
    history: &mut History,
    range: std::ops::Range<u64>,
    commit_every: u64,
) {
    for i in range {
        let record = ledger.execute(&command(i));
        assert!(!record.replayed);
        writer.append(&record).unwrap();
        history.push(ledger);
        if i % commit_every == commit_every - 1 {
            writer.commit().unwrap();
        }
    }
    writer.commit().unwrap();
}

fn recover_plain(data: &Path) -> Result<Recovered, JournalError> {
    recover(data, LedgerConfig::default(), false, |_, _| {})
}

fn recovered(data: &Path) -> Recovered {
    match recover_plain(data) {
        Ok(r) => r,
        Err(e) => panic!("recovery failed: {e}"),
    }
}

/// Where each record's frame lies, read straight from the segment files.
#[derive(Debug, Clone)]
struct FramePosition {
    file: PathBuf,
    offset: usize,
    len: usize,
    seq: u64,
}

impl FramePosition {
    fn end(&self) -> usize {
        self.offset + self.len
    }
}

fn frame_positions(data: &Path) -> Vec<FramePosition> {
    let mut out = Vec::new();
    for (_, file) in list_segments(&journal_dir(data)).unwrap() {
        let bytes = fs::read(&file).unwrap();
        let mut offset = SEGMENT_HEADER_BYTES;
        while offset < bytes.len()
            && let Ok(frame) = check_frame(&bytes[offset..])
        {
            out.push(FramePosition {
                file: file.clone(),
                offset,
                len: frame.length,
                seq: frame.sequence,
            });
            offset += frame.length;
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A writer on an empty journal in `data`, with an empty ledger and its history.
fn fresh_writer(
    data: &Path,
    segment_size: u64,
    sync: SyncMode,
) -> (JournalWriter, Ledger, History) {
    let ledger = Ledger::new(LedgerConfig::default());
    let history = History::new(&ledger);
    let writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        segment_size,
        sync,
        &JournalEnd::empty(),
    );
    (writer, ledger, history)
}

/// A fresh journal in `data` holding commands `range`, in segments of `segment_size` bytes,
/// committed every `commit_every`.
fn fresh_journal(
    data: &Path,
    segment_size: u64,
    range: std::ops::Range<u64>,
    commit_every: u64,
) -> (Ledger, History) {
    let (mut writer, mut ledger, mut history) = fresh_writer(data, segment_size, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, range, commit_every);
    (ledger, history)
}

/// A journal of about 300 records: two small (4 KiB) segments, then a 64 KiB newest segment that
/// holds the last 220 records.
fn build_journal(data: &Path) -> (Ledger, History) {
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut history = History::new(&ledger);
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        4096,
        SyncMode::None,
        &JournalEnd::empty(),
    );
    write_commands(&mut writer, &mut ledger, &mut history, 0..70, 7);
    drop(writer);
    // Start the next segment afresh with a bigger size (as after a restart with a new setting).
    let end = recovered(data).end;
    let fresh = JournalEnd {
        segment: None,
        ..end
    };
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        64 << 10,
        SyncMode::None,
        &fresh,
    );
    write_commands(&mut writer, &mut ledger, &mut history, 70..290, 5);
    (ledger, history)
}

// ---------------------------------------------------------------------------------------------
// Torn tails
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The bytes from the cut on are zero (a torn write into preallocated space).
    Zeroed,
    /// The file ends at the cut (a short file).
    Truncated,
}

/// Checks recovery after a cut at `cut` in the newest segment (whose bytes were `original`)
/// against the history.
fn check_cut(
    data: &Path,
    frames: &[FramePosition],
    original: &[u8],
    history: &History,
    cut: usize,
    how: Cut,
) -> Result<(), String> {
    let newest = frames.last().unwrap().file.file_name().unwrap();
    // A frame survives if the cut left all its bytes as they were: it ends before the cut, or
    // (zeroing) everything from the cut to its end was zero anyway, such as the high bytes of a
    // small balance. Everything after the first damaged frame is lost.
    let intact = |f: &FramePosition| {
        f.file.file_name().unwrap() != newest
            || f.end() <= cut
            || (how == Cut::Zeroed && original[cut.max(f.offset)..f.end()].iter().all(|b| *b == 0))
    };
    let whole = frames.iter().take_while(|f| intact(f)).count();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| recover_plain(data)))
        .map_err(|_| format!("{how:?} at {cut}: recovery panicked"))?;
    let r = result.map_err(|e| format!("{how:?} at {cut}: recovery failed: {e}"))?;
    let got = (
        r.ledger.next_seq() - 1,
        r.ledger.state_hash(),
        r.records_replayed as usize,
    );
    let want = (history.last_seq[whole], history.hashes[whole], whole);
    if got != want {
        return Err(format!(
            "{how:?} at {cut}: recovered (last seq, hash, records) {got:?}, expected {want:?}"
        ));
    }
    let resume_at = if whole == 0 {
        SEGMENT_HEADER_BYTES
    } else {
        frames[whole - 1].end()
    };
    let resumes = r
        .end
        .segment
        .as_ref()
        .map(|(file, at)| (file.file_name().unwrap(), *at as usize));
    if resumes != Some((newest, resume_at)) {
        return Err(format!(
            "{how:?} at {cut}: writer would resume at {:?}, expected {resume_at}",
            r.end.segment
        ));
    }
    // Zeroing leaves no stray bytes when everything from the resume point on is zero now.
    let on_boundary = match how {
        Cut::Zeroed => original[resume_at..cut.max(resume_at)]
            .iter()
            .all(|b| *b == 0),
        Cut::Truncated => cut == resume_at,
    };
    // A cut exactly between frames leaves nothing torn; a zeroed cut mid-frame leaves some bytes.
    let torn_ok = match (how, on_boundary) {
        (Cut::Zeroed, true) => r.end.torn_at.is_none(),
        (_, false) => r.end.torn_at == Some(resume_at as u64),
        (Cut::Truncated, true) => {
            r.end.torn_at.is_none() || r.end.torn_at == Some(resume_at as u64)
        }
    };
    if !torn_ok {
        return Err(format!(
            "{how:?} at {cut}: torn_at {:?} (resume at {resume_at})",
            r.end.torn_at
        ));
    }
    Ok(())
}

/// Writes the journal's durable-watermark file naming `seq`, as the writer publishes it: with
/// the frame crc of the journal's record that ends there (0 past the journal's end).
fn set_durable_watermark(data: &Path, seq: u64) {
    let crc = match wallet::journal::reader::chain_at(&journal_dir(data), seq + 1) {
        Ok(wallet::journal::reader::ChainAt::Boundary(crc)) => crc,
        _ => 0,
    };
    fs::write(
        journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME),
        wallet::journal::format::encode_durable(seq, crc),
    )
    .expect("write the durable-watermark file");
}

/// Removes the journal's durable-watermark file, as if the writer had not yet published its
/// last syncs: the records past it are then ones a crash may tear.
fn forget_durable_watermark(data: &Path) {
    fs::remove_file(journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME))
        .expect("the writer left a durable-watermark file");
}

fn apply_cut(file: &File, original: &[u8], cut: usize, how: Cut) {
    match how {
        Cut::Zeroed => file
            .write_all_at(&vec![0; original.len() - cut], cut as u64)
            .unwrap(),
        Cut::Truncated => file.set_len(cut as u64).unwrap(),
    }
}

fn undo_cut(file: &File, original: &[u8], cut: usize) {
    file.set_len(original.len() as u64).unwrap();
    file.write_all_at(&original[cut..], cut as u64).unwrap();
}

#[test]
fn every_cut_in_the_last_200_records_recovers_the_whole_records_before_it() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (live, history) = build_journal(data);
    assert_eq!(recovered(data).ledger.state_hash(), live.state_hash());
    // A torn write can only hit records the watermark does not name yet: without the file
    // the cuts model exactly that (with it, recovery refuses a cut as lost acknowledged
    // records: `recovery_and_replay_refuse_a_journal_that_ends_before_its_durable_watermark`).
    forget_durable_watermark(data);
    let frames = frame_positions(data);
    assert_eq!(frames.len(), history.records());
    let segments = list_segments(&journal_dir(data)).unwrap();
    assert!(
        segments.len() >= 3,
        "the journal should span several segments"
    );
    let newest = frames.last().unwrap().file.clone();
    let in_newest: Vec<&FramePosition> = frames.iter().filter(|f| f.file == newest).collect();
    assert!(in_newest.len() >= 200);
    let first_cut = in_newest[in_newest.len() - 200].offset;
    let last_cut = in_newest.last().unwrap().end();

    let original = fs::read(&newest).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&newest)
        .unwrap();
    let mut failures = Vec::new();
    for how in [Cut::Zeroed, Cut::Truncated] {
        for cut in first_cut..=last_cut {
            apply_cut(&file, &original, cut, how);
            if let Err(e) = check_cut(data, &frames, &original, &history, cut, how) {
                failures.push(e);
            }
            undo_cut(&file, &original, cut);
        }
    }
    assert_eq!(fs::read(&newest).unwrap(), original);
    let shown: Vec<&String> = failures.iter().take(10).collect();
    assert!(
        failures.is_empty(),
        "{} of the cuts failed, first ones:\n{shown:#?}",
        failures.len()
    );
}

#[test]
fn after_a_cut_the_writer_continues_and_recovery_sees_everything() {
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("source");
    let (_, history) = build_journal(&source);
    forget_durable_watermark(&source);
    let frames = frame_positions(&source);
    let newest = frames.last().unwrap().file.clone();
    let in_newest: Vec<&FramePosition> = frames.iter().filter(|f| f.file == newest).collect();
    let first_cut = in_newest[in_newest.len() - 200].offset;
    let last_cut = in_newest.last().unwrap().end();
    let original = fs::read(&newest).unwrap();

    // A sample of cuts: frame boundaries, one byte either side, and a stride through the rest.
    let mut cuts: Vec<usize> = vec![first_cut, last_cut, last_cut - 1];
    for f in in_newest.iter().rev().take(3) {
        cuts.extend([
            f.offset,
            f.offset + 1,
            f.offset + 4,
            f.offset + 23,
            f.offset + 24,
            f.end() - 1,
        ]);
    }
    cuts.extend((first_cut..last_cut).step_by(997));
    for (case, cut) in cuts.into_iter().enumerate() {
        for how in [Cut::Zeroed, Cut::Truncated] {
            let data = temp.path().join(format!("case-{case}-{how:?}"));
            copy_dir(&source, &data);
            let copy = journal_dir(&data).join(newest.file_name().unwrap());
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&copy)
                .unwrap();
            apply_cut(&file, &original, cut, how);
            drop(file);
            check_cut(&data, &frames, &original, &history, cut, how).unwrap();

            let Recovered {
                mut ledger,
                end,
                records_replayed,
                ..
            } = recovered(&data);
            let mut writer = open_writer(
                &data,
                Box::new(MmapStorage::default()),
                64 << 10,
                SyncMode::Batch,
                &end,
            );
            let mut more = History::new(&ledger);
            write_commands(&mut writer, &mut ledger, &mut more, 10_000..10_040, 4);
            drop(writer);
            let again = recover_plain(&data)
                .unwrap_or_else(|e| panic!("{how:?} at {cut}: second recovery: {e}"));
            assert_eq!(
                again.ledger.state_hash(),
                ledger.state_hash(),
                "{how:?} at {cut}"
            );
            assert_eq!(
                again.records_replayed,
                records_replayed + 40,
                "{how:?} at {cut}"
            );
            assert_eq!(
                again.ledger.next_seq(),
                ledger.next_seq(),
                "{how:?} at {cut}"
            );
            assert_eq!(
                again.end.torn_at, None,
                "{how:?} at {cut}: the torn tail was cut when the writer opened"
            );
            fs::remove_dir_all(&data).unwrap();
        }
    }
}

/// A segment filled up to its last few bytes (too few for another frame header) is a normal,
/// complete segment, not corruption.
#[test]
fn segments_filled_to_the_last_bytes_recover() {
    // Deposits frame to 88 bytes: 24 header + 40 command + 24 event.
    const FRAME: u64 = 88;
    for spare in [0u64, 8, 16, 24, 32, 80] {
        let temp = tempfile::tempdir().unwrap();
        let data = temp.path();
        let segment_size = SEGMENT_HEADER_BYTES as u64 + 46 * FRAME + spare;
        let usd = Currency::new("USD").unwrap();
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut writer = open_writer(
            data,
            Box::new(MmapStorage::default()),
            segment_size,
            SyncMode::None,
            &JournalEnd::empty(),
        );
        let mut history = History::new(&ledger);
        let open = Command {
            transaction_id: TransactionId(1),
            timestamp_ns: 1,
            kind: CommandKind::OpenAccount {
                account: AccountId::new("abcdefgh").unwrap(),
            },
        };
        let record = ledger.execute(&open);
        writer.append(&record).unwrap();
        history.push(&ledger);
        for i in 0..150u64 {
            let kind = CommandKind::Deposit {
                account: AccountId::new("abcdefgh").unwrap(),
                amount: 1 + i,
                currency: usd,
            };
            let record = ledger.execute(&Command {
                transaction_id: TransactionId(100 + u128::from(i)),
                timestamp_ns: 2,
                kind,
            });
            writer.append(&record).unwrap();
            history.push(&ledger);
        }
        writer.commit().unwrap();
        drop(writer);
        assert!(list_segments(&journal_dir(data)).unwrap().len() >= 3);
        match recover_plain(data) {
            Ok(r) => assert_eq!(r.ledger.state_hash(), ledger.state_hash(), "spare {spare}"),
            Err(e) => panic!("segments with {spare} spare bytes at the end: recovery failed: {e}"),
        }
    }
}

/// Restarting with a bigger segment size than the newest segment was created with must not make
/// the writer write past that segment's end.
#[test]
fn reopening_with_a_bigger_segment_size_rolls_at_the_real_end() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut history = History::new(&ledger);
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        4096,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    write_commands(&mut writer, &mut ledger, &mut history, 0..20, 5);
    drop(writer);
    let end = recovered(data).end;
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        64 << 10,
        SyncMode::Batch,
        &end,
    );
    for i in 20..200 {
        let record = ledger.execute(&command(i));
        writer
            .append(&record)
            .unwrap_or_else(|e| panic!("append of command {i} failed: {e}"));
        writer
            .commit()
            .unwrap_or_else(|e| panic!("commit of command {i} failed: {e}"));
    }
    drop(writer);
    assert_eq!(recovered(data).ledger.state_hash(), ledger.state_hash());
}

// ---------------------------------------------------------------------------------------------
// Flipped bits
// ---------------------------------------------------------------------------------------------

fn replay_args(data: &Path) -> wallet::tools::replay::ReplayArgs {
    wallet::tools::replay::ReplayArgs {
        data_dir: data.to_path_buf(),
        from_snapshot: false,
        to_seq: None,
        to_time: None,
        account: None,
        json: true,
    }
}

#[test]
fn replay_to_a_sequence_prints_an_accounts_entries_with_running_balances() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 256 << 10, 0..3_000, 100);
    let mut records = Vec::new();
    wallet::journal::scan(&journal_dir(data), 1, |record| {
        records.push(*record);
        Ok(())
    })
    .unwrap();
    let name = account(3);
    let index = records
        .iter()
        .find(|r| r.opened_account == name)
        .map(|r| r.events[0].account)
        .unwrap();
    let to_seq = records[records.len() / 2].first_seq;
    // The reference, straight from the records: the account's balance events up to `to_seq`.
    let want: Vec<(u64, &str, u64, u64)> = records
        .iter()
        .filter(|r| r.first_seq <= to_seq)
        .flat_map(|r| r.events())
        .filter(|e| e.account == index && e.kind.changes_balance())
        .map(|e| (e.seq, e.kind.name(), e.amount, e.balance_after))
        .collect();
    assert!(
        want.len() > 20,
        "too few entries to mean anything: {}",
        want.len()
    );

    let usd = Currency::new("USD").unwrap();
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(to_seq),
        account: Some(name.to_string()),
        ..replay_args(data)
    })
    .unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert!(report.last_seq <= to_seq + 1 && report.last_seq >= to_seq);
    let account = report.account.unwrap();
    let got: Vec<(u64, &str, String, String)> = account
        .entries
        .iter()
        .map(|e| (e.seq, e.kind, e.amount.clone(), e.balance_after.clone()))
        .collect();
    let want: Vec<(u64, &str, String, String)> = want
        .into_iter()
        .map(|(seq, kind, amount, after)| {
            (
                seq,
                kind,
                wallet::core::format_amount(amount, usd),
                wallet::core::format_amount(after, usd),
            )
        })
        .collect();
    assert_eq!(got, want);
    let last = &want.last().unwrap().3;
    assert_eq!(account.balances, vec![("USD".to_string(), last.clone())]);
    assert!(account.opened);
    // An id that was never opened is reported so, not as an account without activity.
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(to_seq),
        account: Some("never-opened".to_string()),
        ..replay_args(data)
    })
    .unwrap();
    let account = report.account.unwrap();
    assert!(!account.opened && account.entries.is_empty() && account.balances.is_empty());

    // To a time: from the start of the journal, up to the last record stamped at or before it.
    // With a snapshot of the end in place, `--from-snapshot` would report the end's state as
    // the state at that time (a snapshot records no time): refused.
    let middle = &records[records.len() / 2];
    let at = humantime::format_rfc3339_nanos(
        std::time::UNIX_EPOCH + Duration::from_nanos(middle.timestamp_ns),
    )
    .to_string();
    let mut ledger = Ledger::new(LedgerConfig::default());
    for record in records
        .iter()
        .take_while(|r| r.timestamp_ns <= middle.timestamp_ns)
    {
        ledger.verify_record(record).unwrap();
        ledger.apply(record);
    }
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_time: Some(at.clone()),
        ..replay_args(data)
    })
    .unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.last_seq, ledger.next_seq() - 1);
    assert!(report.last_seq < records.last().unwrap().next_seq() - 1);
    assert_eq!(report.state_hash, format!("{:016x}", ledger.state_hash()));
    let end = recovered(data).ledger;
    snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&end, None)).unwrap();
    let refused = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_time: Some(at),
        from_snapshot: true,
        ..replay_args(data)
    });
    let error = refused.expect_err("--to-time with --from-snapshot is refused");
    assert!(error.to_string().contains("--to-time"), "{error}");
}

/// `--to-time` stops before the first record stamped after the time, whatever its transaction
/// id: the nil UUID is a valid id, not a checkpoint (replay used to take every record with id 0
/// for one and applied it past the time). `--to-seq` past the journal's end is an error, not
/// the end's state reported as the state at that sequence, and `u64::MAX` with
/// `--from-snapshot` still starts from the snapshot.
#[test]
fn replay_to_a_time_or_sequence_stops_where_asked_or_says_it_cannot() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 1 << 20, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, 0..100, 10);
    let before = ledger.state_hash();
    let last_before = ledger.next_seq() - 1;
    let nil = Command {
        transaction_id: TransactionId(0),
        timestamp_ns: 9_000_000,
        kind: CommandKind::Deposit {
            account: account(0),
            amount: 7,
            currency: Currency::new("USD").unwrap(),
        },
    };
    let record = ledger.execute(&nil);
    assert!(record.rejection.is_none(), "{:?}", record.rejection);
    writer.append(&record).unwrap();
    writer.commit().unwrap();
    drop(writer);
    let end = ledger.next_seq() - 1;

    let at = humantime::format_rfc3339_nanos(
        std::time::UNIX_EPOCH + Duration::from_nanos(1_000_000 + 99),
    )
    .to_string();
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_time: Some(at),
        ..replay_args(data)
    })
    .unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.last_seq, last_before);
    assert_eq!(report.state_hash, format!("{before:016x}"));

    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(end),
        ..replay_args(data)
    })
    .unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.last_seq, end);
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(end + 100),
        ..replay_args(data)
    })
    .unwrap();
    assert!(!report.ok);
    let error = report.error.unwrap();
    assert!(
        error.contains(&format!(
            "--to-seq {} is past the end of the journal (its last sequence is {end})",
            end + 100
        )),
        "{error}"
    );

    snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(u64::MAX),
        from_snapshot: true,
        ..replay_args(data)
    })
    .unwrap();
    assert_eq!(report.snapshot_seq, Some(end));
    assert!(
        report
            .error
            .unwrap()
            .contains("past the end of the journal")
    );
}

/// `wallet replay` checks each committed record's stored fingerprint against its body: a record
/// journaled with another body's fingerprint (a bug or a forgery; the frame checksums hold)
/// would answer a retry of that other body as a replay of a transfer that never happened.
#[test]
fn replay_refuses_a_record_whose_fingerprint_is_not_its_bodys() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 1 << 20, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, 0..200, 10);
    let clean = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(clean.ok, "{:?}", clean.error);
    // The state before the bad record, as a snapshot: the audit must know the accounts it
    // holds (their id hashes) to check a transfer between them.
    snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    // The first of the next commands that is a transfer and commits (a rejected one before it
    // is journaled as it is).
    let mut record = (200..)
        .map(command)
        .filter(|c| matches!(c.kind, CommandKind::Transfer { .. }))
        .map(|c| ledger.execute(&c))
        .find(|r| {
            if !r.is_committed() {
                writer.append(r).unwrap();
            }
            r.is_committed()
        })
        .unwrap();
    record.fingerprint ^= 1;
    writer.append(&record).unwrap();
    writer.commit().unwrap();
    drop(writer);
    for from_snapshot in [false, true] {
        let args = wallet::tools::replay::ReplayArgs {
            from_snapshot,
            ..replay_args(data)
        };
        let report = wallet::tools::replay::run(&args).unwrap();
        assert!(!report.ok, "from_snapshot {from_snapshot}");
        let error = report.error.unwrap_or_default();
        // Named like any record that does not replay: its segment file and byte offset.
        assert!(
            error.contains(&format!(
                "{}.wal at byte offset ",
                journal_dir(data).join(format!("{:020}", 1)).display()
            )) && error.contains(&format!(
                "sequence {} does not replay: its transaction",
                record.first_seq
            )) && error.contains("fingerprint"),
            "from_snapshot {from_snapshot}: {error}"
        );
    }
    // The audit runs ahead of the replay (on the reading thread); a replay that stops before
    // the bad record has nothing to report.
    let before = wallet::tools::replay::ReplayArgs {
        to_seq: Some(record.first_seq - 1),
        ..replay_args(data)
    };
    let report = wallet::tools::replay::run(&before).unwrap();
    assert!(report.ok, "{:?}", report.error);
}

/// `wallet replay --to-seq` and `--to-time` audit the journal's end as a full replay does: a
/// journal that lost synced records (its newest segment gone, or cut short) is refused whatever
/// state was asked for, and so is a snapshot past its end. (A limited replay skipped those
/// checks and answered OK for a journal that start-up and the full replay refuse.)
#[test]
fn a_replay_limited_to_a_sequence_or_a_time_still_audits_the_journals_end() {
    let temp = tempfile::tempdir().unwrap();
    let limited = |data: &Path| {
        [
            replay_args(data),
            wallet::tools::replay::ReplayArgs {
                to_seq: Some(10),
                ..replay_args(data)
            },
            wallet::tools::replay::ReplayArgs {
                to_time: Some("1970-01-01T00:00:00.000000001Z".into()),
                ..replay_args(data)
            },
        ]
    };
    let refused = |data: &Path, expected: &str| {
        for args in limited(data) {
            let report = wallet::tools::replay::run(&args).unwrap();
            let error = report.error.unwrap_or_default();
            assert!(
                !report.ok && error.contains(expected),
                "to_seq {:?}, to_time {:?}: {error}",
                args.to_seq,
                args.to_time
            );
        }
        // The command's verdict reaches stderr too, not only the report on stdout.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["replay", "--data-dir"])
            .arg(data)
            .env("WALLET_LOG", "error")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("error: the audit failed") && stderr.contains(expected),
            "{stderr}"
        );
    };
    let fresh = |name: &str| {
        let data = temp.path().join(name);
        fresh_journal(&data, 4096, 0..200, 10);
        for args in limited(&data) {
            let report = wallet::tools::replay::run(&args).unwrap();
            assert!(report.ok, "{:?}", report.error);
            // The report says what a stopped replay left unaudited (its OK line did not).
            let limited = args.to_seq.is_some() || args.to_time.is_some();
            assert_eq!(report.stopped_early, limited, "{args:?}");
        }
        let segments = list_segments(&journal_dir(&data)).unwrap();
        (data, segments.last().unwrap().1.clone())
    };

    let (data, newest) = fresh("deleted");
    fs::remove_file(&newest).unwrap();
    refused(&data, "durable watermark says");

    let (data, newest) = fresh("cut");
    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    file.set_len(SEGMENT_HEADER_BYTES as u64 + 64).unwrap();
    drop(file);
    refused(&data, "durable watermark says");

    // A snapshot named past the journal's end (the journal restored from an older copy).
    let (data, _) = fresh("snapshot-ahead");
    let (ledger, _) = fresh_journal(&temp.path().join("longer"), 1 << 20, 0..400, 10);
    snapshot::write_snapshot(&snapshot_dir(&data), &encode_snapshot(&ledger, None)).unwrap();
    forget_durable_watermark(&data);
    refused(&data, "snapshot");
}

/// `wallet replay` whose reader goes away (`wallet replay | head -1`) ends quietly, as Unix
/// tools do: it panicked on the broken pipe ("failed printing to stdout", exit 101).
#[test]
fn replay_into_a_closed_pipe_ends_quietly() {
    let temp = tempfile::tempdir().unwrap();
    fresh_journal(temp.path(), 1 << 20, 0..50, 10);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["replay", "--data-dir"])
        .arg(temp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && out.status.code() != Some(101),
        "{:?}: {stderr}",
        out.status
    );
}

/// A damaged durable-watermark file is an error for recovery and replay, not a check skipped:
/// with it skipped, acknowledged records cut off by damage would be cut as a torn tail. An
/// empty file (a writer that crashed before its first write) is read as no file.
#[test]
fn a_damaged_durable_watermark_refuses_recovery_and_replay() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 64 << 10, 0..300, 10);
    let last_seq = ledger.next_seq() - 1;
    let watermark = journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME);
    let intact = fs::read(&watermark).unwrap();
    for (name, bytes) in [
        ("one byte flipped", {
            let mut b = intact.clone();
            b[9] ^= 1;
            b
        }),
        ("cut short", intact[..12].to_vec()),
        ("not a watermark", vec![b'x'; 24]),
    ] {
        fs::write(&watermark, &bytes).unwrap();
        match recover(data, LedgerConfig::default(), false, |_, _| {}) {
            Err(JournalError::Corrupt { file, reason, .. }) => {
                assert_eq!(file, watermark, "{name}");
                assert!(
                    reason.contains("durable-watermark file is damaged"),
                    "{name}: {reason}"
                );
            }
            Err(e) => panic!("{name}: wrong error: {e}"),
            Ok(r) => panic!("{name}: recovered to {} unchecked", r.end.next_seq),
        }
        let error = match wallet::tools::replay::run(&replay_args(data)) {
            Ok(report) => report
                .error
                .unwrap_or_else(|| panic!("{name}: replay passed")),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            error.contains("durable-watermark file is damaged"),
            "{name}: {error}"
        );
        // `wallet replay --json` says so on stdout, as JSON (it printed nothing there).
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["replay", "--json", "--data-dir"])
            .arg(data)
            .env("WALLET_LOG", "error")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: no JSON on stdout ({e}): {out:?}"));
        assert_eq!(report["ok"], false, "{name}: {report}");
        assert!(
            report["error"]
                .as_str()
                .is_some_and(|e| e.contains("durable-watermark file is damaged")),
            "{name}: {report}"
        );
    }
    fs::write(&watermark, b"").unwrap();
    let recovered = recover(data, LedgerConfig::default(), false, |_, _| {}).unwrap();
    assert_eq!(recovered.end.next_seq, last_seq + 1);
    fs::write(&watermark, &intact).unwrap();
    let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.durable_seq, Some(last_seq));
}

/// A last record damaged after it was synced reads as a torn tail, but the durable watermark
/// says it may have been acknowledged: recovery refuses to start (naming the file, offset and
/// sequence) and `wallet replay` fails; a snapshot ahead of the journal fails `--from-snapshot`
/// the same way. Without the watermark file and the snapshot, the same journal recovers and
/// replays as a torn tail (what a crash leaves).
#[test]
fn recovery_and_replay_refuse_a_journal_that_ends_before_its_durable_watermark() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 64 << 10, 0..500, 10);
    let last_seq = ledger.next_seq() - 1;
    snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    let whole = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(whole.ok, "{:?}", whole.error);
    assert_eq!(
        (whole.last_seq, whole.durable_seq),
        (last_seq, Some(last_seq))
    );
    assert_eq!(whole.torn_tail, None);

    // Damage the last record's final bytes, as a bad sector after the sync would.
    let end = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
    let (segment, offset) = end.segment.clone().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0u8; 8], offset - 8).unwrap();
    drop(file);

    match recover(data, LedgerConfig::default(), false, |_, _| {}) {
        Err(JournalError::Corrupt {
            file,
            offset: at,
            seq,
            reason,
        }) => {
            // The first sequence of the damaged record, the first one missing.
            let after = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
            assert_eq!((file, seq), (segment.clone(), after.next_seq));
            assert!(seq <= last_seq);
            assert!(at < offset, "offset {at}");
            assert!(reason.contains("durable watermark"), "{reason}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(r) => panic!("recovered to {} past lost records", r.end.next_seq),
    }
    let damaged = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(!damaged.ok);
    assert!(damaged.last_seq < last_seq);
    assert!(damaged.torn_tail.is_some());
    let error = damaged.error.unwrap();
    assert!(
        error.contains("durable watermark") && error.contains(&last_seq.to_string()),
        "{error}"
    );
    let from_snapshot = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        from_snapshot: true,
        ..replay_args(data)
    })
    .unwrap();
    assert_eq!(from_snapshot.snapshot_seq, Some(last_seq));
    let error = from_snapshot.error.unwrap();
    assert!(error.contains("snapshot holds sequence"), "{error}");

    // A replay that stops before the damage audits the journal's end all the same (it passed
    // a journal that start-up and the full replay refuse).
    let early = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        to_seq: Some(last_seq / 2),
        ..replay_args(data)
    })
    .unwrap();
    assert!(!early.ok);
    let error = early.error.unwrap_or_default();
    assert!(error.contains("durable watermark"), "{error}");

    fs::remove_file(journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME)).unwrap();
    fs::remove_dir_all(snapshot_dir(data)).unwrap();
    let crashed = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(crashed.ok, "{:?}", crashed.error);
    let recovered = recover(data, LedgerConfig::default(), false, |_, _| {}).unwrap();
    assert_eq!(recovered.end.next_seq, damaged.last_seq + 1);
    assert!(recovered.end.torn_at.is_some());
    assert_eq!(crashed.last_seq, damaged.last_seq);
    assert_eq!(crashed.durable_seq, None);
    assert!(crashed.torn_tail.is_some());
}

fn recover_in_thread(data: &Path) -> Result<Recovered, JournalError> {
    let (done, recovered) = mpsc::channel();
    let dir = data.to_path_buf();
    std::thread::spawn(move || {
        let _ = done.send(recover(&dir, LedgerConfig::default(), true, |_, _| {}));
    });
    recovered
        .recv_timeout(Duration::from_secs(60))
        .expect("recovery did not finish")
}

fn refusal(result: Result<Recovered, JournalError>) -> String {
    match result {
        Ok(r) => panic!(
            "recovery started at sequence {} instead of refusing",
            r.end.next_seq
        ),
        Err(e) => e.to_string(),
    }
}

/// A snapshot covers only records that were durable when it was written, so a journal that ends
/// before it lost records that may have been acknowledged: damage cut as a torn tail behind a
/// missing watermark file, a journal restored from an older copy. Recovery refuses, naming the
/// snapshot and the missing records (it used to set the snapshot aside and start from the
/// shorter journal). The one loss that is not damage, a power loss under `--sync none`, the
/// operator accepts by moving the snapshot away; recovery then starts from the journal as it
/// is. A snapshot whose name disagrees with its header is skipped (it made recovery retry
/// forever).
#[test]
fn a_snapshot_ahead_of_the_journal_refuses_start_up_until_it_is_moved_away() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 1 << 20, 0..300, 10);
    let snapshots = snapshot_dir(data);
    let written = snapshot::write_snapshot(&snapshots, &encode_snapshot(&ledger, None)).unwrap();
    fs::copy(&written, snapshots.join(snapshot::snapshot_file_name(5))).unwrap();
    // Lose the last 20 records, and the watermark file that would have said they were synced.
    let frames = frame_positions(data);
    let cut = &frames[frames.len() - 20];
    let file = OpenOptions::new().write(true).open(&cut.file).unwrap();
    let len = fs::metadata(&cut.file).unwrap().len() as usize;
    file.write_all_at(&vec![0u8; len - cut.offset], cut.offset as u64)
        .unwrap();
    drop(file);
    forget_durable_watermark(data);

    let error = refusal(recover_in_thread(data));
    let snapshot_seq = ledger.next_seq();
    for part in [
        format!("ends at sequence {}", cut.seq - 1),
        written.display().to_string(),
        format!("records {}..={} are missing", cut.seq, snapshot_seq - 1),
        "--sync none".to_string(),
    ] {
        assert!(error.contains(&part), "{part:?} not in: {error}");
    }
    // Nothing was written or renamed by the refusal.
    assert!(written.exists());
    assert_eq!(frame_positions(data).len(), frames.len() - 20);

    // The operator accepts the loss: the snapshot moves out of the directory.
    let moved = data.join("ahead.bin");
    fs::rename(&written, &moved).unwrap();
    let r = recover_in_thread(data).expect("recovery failed");
    assert_eq!(r.snapshot_next_seq, None);
    assert_eq!(r.end.next_seq, cut.seq);
    // The misnamed copy stays where it is (it is not ahead by its name), skipped.
    let listed: Vec<u64> = snapshot::list_snapshots(&snapshots)
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(listed, vec![5]);
    assert!(snapshot::load_newest(&snapshots, LedgerConfig::default(), None).is_none());
}

/// Damage inside a sealed segment (one with a newer segment after it) is named where it is. A
/// zeroed frame with records after it in the same segment is reported at its own offset in
/// that segment, and a sealed segment cut short is named, with where its records end, in the
/// next segment's gap message. Both were reported only as "segment does not continue the
/// previous one" at offset 0 of the next segment: the intact one, which the README's advice
/// for that message then had the operator move away.
#[test]
fn damage_inside_a_sealed_segment_is_named_where_it_is() {
    let temp = tempfile::tempdir().unwrap();
    let (zeroed, cut) = (temp.path().join("zeroed"), temp.path().join("cut"));
    for data in [&zeroed, &cut] {
        fresh_journal(data, 16 << 10, 0..600, 10);
    }
    let segments = list_segments(&journal_dir(&zeroed)).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let sealed = &segments[0].1;
    let frames = frame_positions(&zeroed);
    let in_sealed: Vec<&FramePosition> = frames.iter().filter(|f| &f.file == sealed).collect();
    let victim = in_sealed[in_sealed.len() / 2];

    let file = OpenOptions::new().write(true).open(sealed).unwrap();
    file.write_all_at(&vec![0u8; victim.len], victim.offset as u64)
        .unwrap();
    drop(file);
    let error = refusal(recover_in_thread(&zeroed));
    let place = format!("{} at byte offset {}", sealed.display(), victim.offset);
    assert!(
        error.contains(&place) && error.contains("zeroed frame inside the committed log"),
        "{place:?} not in: {error}"
    );

    let segments = list_segments(&journal_dir(&cut)).unwrap();
    let (sealed, next) = (&segments[0].1, &segments[1].1);
    let frames = frame_positions(&cut);
    let in_sealed: Vec<&FramePosition> = frames.iter().filter(|f| &f.file == sealed).collect();
    let victim = in_sealed[in_sealed.len() / 2];
    let file = OpenOptions::new().write(true).open(sealed).unwrap();
    file.set_len(victim.offset as u64).unwrap();
    drop(file);
    let error = refusal(recover_in_thread(&cut));
    for part in [
        format!("{} at byte offset 0", next.display()),
        format!(
            "the previous segment {} ends at sequence {} (its records end at byte offset {})",
            sealed.display(),
            victim.seq - 1,
            victim.offset
        ),
    ] {
        assert!(error.contains(&part), "{part:?} not in: {error}");
    }
}

/// `wallet snapshot` that cannot write its file (a full disk) says what it was writing and
/// where, not only the system's "No space left on device", and leaves no snapshot behind.
#[test]
fn a_snapshot_that_cannot_be_written_says_what_and_where() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 64 << 10, 0..50, 10);
    let snapshots = snapshot_dir(data);
    fs::create_dir_all(&snapshots).unwrap();
    let name = snapshot::snapshot_file_name(ledger.next_seq());
    // Every write to /dev/full fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", snapshots.join(format!(".{name}.tmp"))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["snapshot", "--data-dir"])
        .arg(data)
        .env("WALLET_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for part in [
        "writing a snapshot of ".to_string(),
        format!("sequences up to {}", ledger.next_seq() - 1),
        snapshots.display().to_string(),
        "No space left on device".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in: {stderr}");
    }
    assert!(snapshot::list_snapshots(&snapshots).is_empty());
}

/// A journal of commands 0..199 and a last deposit of `amount` cents: two of these with
/// different amounts are two histories with the same sequence numbers.
fn history_ending_with_a_deposit_of(data: &Path, amount: u64) -> Ledger {
    history_with_a_deposit_of(data, amount, 0..0)
}

/// `history_ending_with_a_deposit_of`, then commands `after`.
fn history_with_a_deposit_of(data: &Path, amount: u64, after: std::ops::Range<u64>) -> Ledger {
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 1 << 20, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, 0..199, 10);
    let last = Command {
        transaction_id: TransactionId(0xD1FF),
        timestamp_ns: 5_000_000,
        kind: CommandKind::Deposit {
            account: account(0),
            amount,
            currency: Currency::new("USD").unwrap(),
        },
    };
    let record = ledger.execute(&last);
    writer.append(&record).unwrap();
    writer.commit().unwrap();
    write_commands(&mut writer, &mut ledger, &mut history, after, 10);
    ledger
}

/// A snapshot names the journal's chain value at its sequence (the checksum of the record
/// before it), so a snapshot of another history (another data directory's, or this one's before
/// its journal was replaced) is refused, by start-up and by `wallet replay --from-snapshot`,
/// naming the snapshot. Before, it was loaded: here it carried the other history's balance (one
/// cent more) on this journal, with nothing to tell. A snapshot with the right chain value
/// loads; one written without a chain value (older builds) loads as before.
#[test]
fn a_snapshot_of_another_history_is_refused_by_its_chain_value() {
    let temp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (temp.path().join("ours"), temp.path().join("theirs"));
    let ledger = history_ending_with_a_deposit_of(&ours, 700);
    let other = history_ending_with_a_deposit_of(&theirs, 701);
    assert_eq!(ledger.next_seq(), other.next_seq());
    assert_ne!(ledger.state_hash(), other.state_hash());
    let their_chain = recovered(&theirs).end.last_crc;
    let our_chain = recovered(&ours).end.last_crc;
    assert_ne!(their_chain, our_chain);

    // Their state, under their chain value, in `data`'s snapshot directory: refused by
    // start-up and by `wallet replay --from-snapshot`, naming it. Returns the snapshot's path.
    let refused_beside = |data: &Path| -> PathBuf {
        let written = snapshot::write_snapshot(
            &snapshot_dir(data),
            &encode_snapshot(&other, Some(their_chain)),
        )
        .unwrap();
        let error = refusal(recover_in_thread(data));
        assert!(
            error.contains("does not belong to this journal")
                && error.contains(&written.display().to_string()),
            "{error}"
        );
        let mut args = replay_args(data);
        args.from_snapshot = true;
        let report = wallet::tools::replay::run(&args).unwrap();
        assert!(!report.ok);
        assert!(
            report
                .error
                .as_deref()
                .is_some_and(|e| e.contains("does not belong to this journal")),
            "{:?}",
            report.error
        );
        written
    };
    let written = refused_beside(&ours);
    // The same snapshot beside a journal that goes on after it: refused as another history's
    // before any record is applied to it (that used to fail on the first record, blaming the
    // journal: "stopped by the visitor at sequence ...").
    let longer = temp.path().join("longer");
    history_with_a_deposit_of(&longer, 700, 199..260);
    refused_beside(&longer);

    // Our own state with our chain value loads.
    fs::remove_file(&written).unwrap();
    snapshot::write_snapshot(
        &snapshot_dir(&ours),
        &encode_snapshot(&ledger, Some(our_chain)),
    )
    .unwrap();
    let r = recover_in_thread(&ours).expect("recovery failed");
    assert_eq!(r.snapshot_next_seq, Some(ledger.next_seq()));
    assert_eq!(r.ledger.state_hash(), ledger.state_hash());
    // `wallet snapshot` writes the chain value of the journal it read.
    let path = wallet::tools::replay::snapshot(&wallet::tools::replay::SnapshotArgs {
        data_dir: theirs.clone(),
    })
    .unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        wallet::core::codec::snapshot_chain(&bytes),
        Some(their_chain)
    );
}

/// A tail whose journal directory is replaced under it (a restore, a move: the same path,
/// other files) follows the new files when they hold the same history and go on from where it
/// is (also when the copy has rolled on to later segments meanwhile), and stops when they hold
/// another history, end before it (with or without a durable watermark), or are gone. (It
/// read the old, deleted file forever: a replicator reported itself caught up while its stores
/// went stale.)
#[test]
fn a_tail_whose_journal_directory_is_replaced_follows_the_same_history_only() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let fetch = |tail: &mut wallet::journal::tail::JournalTail| {
        let mut records = Vec::new();
        tail.fetch_records(1 << 16, &mut records).map(|()| records)
    };
    // Put `with`'s journal in place of `data`'s, as `mv` does.
    let replace = |with: &Path| {
        let old = temp
            .path()
            .join(format!("old-{}", uuid::Uuid::new_v4().simple()));
        fs::rename(&data, &old).unwrap();
        fs::rename(with, &data).unwrap();
    };
    let journal = |name: &str, segment_size: u64, range: std::ops::Range<u64>| {
        let path = temp.path().join(name);
        fresh_journal(&path, segment_size, range, 10);
        path
    };
    // A tail that has read `data`, a fresh journal of 50 records in `segment_size` segments.
    let tail_on_fresh_data = |segment_size: u64| {
        if data.exists() {
            fs::rename(
                &data,
                temp.path()
                    .join(format!("away-{}", uuid::Uuid::new_v4().simple())),
            )
            .unwrap();
        }
        fresh_journal(&data, segment_size, 0..50, 10);
        let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(&data));
        let first = fetch(&mut tail).unwrap();
        assert_eq!(first.len(), 50);
        (tail, first.last().unwrap().next_seq())
    };
    let refused = |tail: &mut wallet::journal::tail::JournalTail, naming: &str| {
        let error = format!("{:#}", fetch(tail).unwrap_err());
        assert!(error.contains(naming), "{error}");
    };

    // The same history, grown in the segment being read.
    let (mut tail, next) = tail_on_fresh_data(1 << 20);
    replace(&journal("grown", 1 << 20, 0..80));
    let more = fetch(&mut tail).unwrap();
    assert_eq!(more.len(), 30, "the records after the replacement");
    assert_eq!(more[0].first_seq, next);
    // Then another history.
    replace(&journal("other", 1 << 20, 1000..1080));
    refused(&mut tail, "another history");

    // The same history, rolled on to later segments meanwhile (small segments).
    let (mut tail, next) = tail_on_fresh_data(4096);
    replace(&journal("rolled", 4096, 0..300));
    let mut more = Vec::new();
    for _ in 0..20 {
        more.extend(fetch(&mut tail).unwrap());
    }
    assert_eq!(more.len(), 250, "the records after the replacement");
    assert_eq!(more[0].first_seq, next);

    // An older copy: ends before what was read, with its durable watermark and without.
    let (mut tail, _) = tail_on_fresh_data(1 << 20);
    replace(&journal("older", 1 << 20, 0..20));
    refused(&mut tail, "durable watermark is");
    let (mut tail, _) = tail_on_fresh_data(1 << 20);
    let older = journal("older-unwatermarked", 1 << 20, 0..20);
    forget_durable_watermark(&older);
    replace(&older);
    refused(&mut tail, "does not hold the record ending at sequence");

    // Gone.
    let (mut tail, _) = tail_on_fresh_data(1 << 20);
    fs::remove_dir_all(&data).unwrap();
    refused(&mut tail, "is gone");
}

/// `wallet snapshot` appends nothing, so it leaves the newest segment at its size: it opened
/// its writer with the default segment size (256 MiB), and a newest segment that holds no
/// record (recovery cut its only records) was grown to that, failing on a nearly full disk.
#[test]
fn a_snapshot_does_not_grow_the_newest_segment() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 4096, 0..200, 10);
    let segments = list_segments(&journal_dir(data)).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let (first, newest) = segments.last().cloned().unwrap();
    // The newest segment's records torn away (zeroed, past the durable watermark): recovery
    // cuts them, and the segment holds no record.
    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    file.write_all_at(
        &vec![0u8; 4096 - SEGMENT_HEADER_BYTES],
        SEGMENT_HEADER_BYTES as u64,
    )
    .unwrap();
    drop(file);
    set_durable_watermark(data, first - 1);
    let written = wallet::tools::replay::snapshot(&wallet::tools::replay::SnapshotArgs {
        data_dir: data.to_path_buf(),
    })
    .expect("snapshot");
    assert!(written.exists());
    assert_eq!(
        fs::metadata(&newest).unwrap().len(),
        4096,
        "{}",
        newest.display()
    );
}

/// A tail walking a journal of many segments finds each next one by its name: it listed (and
/// sorted) the whole directory at each segment it moved to, so the read views' rebuild over
/// 17,380 segments of 4 KiB took 133 s (0.33 s now), quadratic in the segments.
#[test]
fn a_tail_walks_from_segment_to_segment_without_listing_the_directory() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 4096, 0..2_000, 10);
    let segments = list_segments(&journal_dir(data)).unwrap().len();
    assert!(segments >= 40, "only {segments} segments");
    let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(data));
    let mut records = Vec::new();
    loop {
        let before = records.len();
        tail.fetch_records(100, &mut records).expect("fetch");
        if records.len() == before {
            break;
        }
    }
    assert_eq!(records.len(), 2_000);
    // Once to start, and at the end (each empty fetch there looks for a next segment).
    assert!(
        tail.directory_listings() <= 3,
        "{} listings of the directory for {segments} segments",
        tail.directory_listings()
    );
}

/// A tail (the read views' rebuild, the follower, the replicators) that reaches the end of a
/// segment's records while a later segment exists tells a gap between segments from damage
/// inside one: a missing segment is a `JournalGap` naming both ends, zeroed records followed by
/// others are damage at their offset (it called that "segments are missing" too).
#[test]
fn a_tail_tells_a_missing_segment_from_damage_inside_one() {
    let fetch_all = |data: &Path| -> anyhow::Result<usize> {
        let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(data));
        let mut records = Vec::new();
        loop {
            let before = records.len();
            tail.fetch_records(1 << 16, &mut records)?;
            if records.len() == before {
                return Ok(records.len());
            }
        }
    };
    // `fetch_all` on a thread: the `JournalDamage` it stops on within 20 s (its message), or
    // the test fails (the damage read as the end of the journal, or still being read).
    let damage_within_20_s = |data: PathBuf, what: &str| -> String {
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(fetch_all(&data).map_err(|e| {
                let damage = e.is::<wallet::journal::tail::JournalDamage>();
                (format!("{e:#}"), damage)
            }));
        });
        match receiver.recv_timeout(Duration::from_secs(20)) {
            Ok(Err((message, damage))) => {
                assert!(damage, "{what}: {message}");
                message
            }
            Ok(Ok(records)) => panic!("{what} read as the end of the journal ({records} records)"),
            Err(_) => panic!("the tail still reads {what} after 20 s"),
        }
    };
    let temp = tempfile::tempdir().unwrap();
    let (gap, damaged) = (temp.path().join("gap"), temp.path().join("damaged"));
    fresh_journal(&gap, 4096, 0..200, 10);
    fresh_journal(&damaged, 4096, 0..200, 10);
    assert_eq!(fetch_all(&gap).unwrap(), 200);
    let segments = list_segments(&journal_dir(&gap)).unwrap();
    assert!(segments.len() >= 4);
    fs::remove_file(&segments[2].1).unwrap();
    let error = fetch_all(&gap).unwrap_err();
    assert!(error.is::<wallet::journal::tail::JournalGap>(), "{error:#}");
    assert!(
        format!("{error:#}").contains(&format!("begins at {}", segments[3].0)),
        "{error:#}"
    );
    // A segment under another segment's name, where a tail starts: refused as recovery does
    // (it was read as the records its header named).
    let renamed = temp.path().join("renamed");
    fresh_journal(&renamed, 4096, 0..200, 10);
    let segments = list_segments(&journal_dir(&renamed)).unwrap();
    fs::write(&segments[2].1, fs::read(&segments[1].1).unwrap()).unwrap();
    let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(&renamed));
    tail.start_at(segments[2].0).unwrap();
    let error = tail.fetch_records(1 << 16, &mut Vec::new()).unwrap_err();
    assert!(
        format!("{error:#}").contains("disagrees with its file name"),
        "{error:#}"
    );

    // Zero the first frame of the second segment: the records after it are still there.
    let (_, second) = list_segments(&journal_dir(&damaged)).unwrap().remove(1);
    let file = OpenOptions::new().write(true).open(&second).unwrap();
    file.write_all_at(&[0u8; 8], SEGMENT_HEADER_BYTES as u64)
        .unwrap();
    drop(file);
    let error = fetch_all(&damaged).unwrap_err();
    assert!(
        !error.is::<wallet::journal::tail::JournalGap>(),
        "{error:#}"
    );
    // Definitive too: the read views' rebuild stops on it at once instead of retrying for 30 s.
    assert!(
        error.is::<wallet::journal::tail::JournalDamage>(),
        "{error:#}"
    );
    assert!(
        format!("{error:#}").contains("damage inside the segment")
            && format!("{error:#}").contains(&format!("offset {SEGMENT_HEADER_BYTES}")),
        "{error:#}"
    );

    // Bytes that are not a frame in the spare space after a finished segment's last record,
    // where the next segment begins at the following sequence: damage, not a reason to read
    // the same bytes again forever (the tail spun on them, and the read views' rebuild with it).
    let spare = temp.path().join("spare");
    fresh_journal(&spare, 4096, 0..200, 10);
    let (_, first) = list_segments(&journal_dir(&spare)).unwrap().remove(0);
    let bytes = fs::read(&first).unwrap();
    let mut end = SEGMENT_HEADER_BYTES;
    while end + 4 <= bytes.len() && bytes[end..end + 4] != [0u8; 4] {
        end += u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
    }
    assert!(
        end + 4 <= bytes.len(),
        "no spare space after the last record"
    );
    let file = OpenOptions::new().write(true).open(&first).unwrap();
    file.write_all_at(&[0xFF; 4], end as u64).unwrap();
    drop(file);
    let message = damage_within_20_s(spare, "the damaged spare space");
    assert!(message.contains(&format!("offset {end}")), "{message}");

    // A finished segment whose last frame runs past the end of its file (here: the file cut in
    // the middle of it; a damaged length does the same): damage, not "the frame continues in
    // the next read" (the tail returned nothing, forever, and its readers stalled silently).
    let cut = temp.path().join("cut");
    fresh_journal(&cut, 4096, 0..200, 10);
    let first = list_segments(&journal_dir(&cut)).unwrap().remove(0).1;
    let last = frame_positions(&cut)
        .into_iter()
        .rfind(|f| f.file == first)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len((last.offset + last.len / 2) as u64)
        .unwrap();
    let message = damage_within_20_s(cut, "the cut frame");
    assert!(
        message.contains(&format!("offset {}", last.offset)),
        "{message}"
    );

    // A finished segment with every record lost (zeros after its header), a later one after
    // it: the records up to the later segment are missing (the tail returned nothing, forever).
    let emptied = temp.path().join("emptied");
    fresh_journal(&emptied, 4096, 0..200, 10);
    let segments = list_segments(&journal_dir(&emptied)).unwrap();
    let length = fs::metadata(&segments[1].1).unwrap().len() as usize;
    let file = OpenOptions::new().write(true).open(&segments[1].1).unwrap();
    file.write_all_at(
        &vec![0u8; length - SEGMENT_HEADER_BYTES],
        SEGMENT_HEADER_BYTES as u64,
    )
    .unwrap();
    drop(file);
    let error = fetch_all(&emptied).unwrap_err();
    assert!(error.is::<wallet::journal::tail::JournalGap>(), "{error:#}");
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!("begins at {}", segments[2].0))
            && message.contains("no readable record")
            && message.contains(&segments[1].1.display().to_string()),
        "{message}"
    );
}

/// A data directory whose journal is empty or gone (a volume that did not mount, a journal not
/// restored) beside a snapshot is refused: it used to start an empty ledger, set the snapshot
/// aside and begin a second history at sequence 1.
#[test]
fn a_missing_journal_beside_a_snapshot_is_refused_not_started_empty() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 1 << 20, 0..50, 10);
    let written =
        snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    let journal = journal_dir(data);
    for (_, path) in list_segments(&journal).unwrap() {
        fs::remove_file(path).unwrap();
    }
    // The watermark file says what was synced.
    let error = refusal(recover_in_thread(data));
    assert!(error.contains("the journal ends at sequence 0"), "{error}");
    assert!(error.contains("durable watermark says"), "{error}");
    // Without it, the snapshot says so.
    forget_durable_watermark(data);
    let error = refusal(recover_in_thread(data));
    assert!(error.contains("the journal ends at sequence 0"), "{error}");
    assert!(error.contains(&written.display().to_string()), "{error}");
    fs::remove_dir_all(&journal).unwrap();
    let error = refusal(recover_in_thread(data));
    assert!(error.contains("the journal ends at sequence 0"), "{error}");
    assert!(written.exists());
}

/// Recovery from a snapshot does not read the segments before the snapshot's, but it checks
/// their headers: a journal whose first segments are missing, or a file named like a segment
/// that is not one, is refused naming the file (the history must be whole from sequence 1).
#[test]
fn segments_before_the_snapshot_are_checked_by_their_headers() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 4096, 0..200, 10);
    snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    let journal = journal_dir(data);
    let segments = list_segments(&journal).unwrap();
    assert!(segments.len() >= 4, "{} segments", segments.len());
    assert!(recover_in_thread(data).is_ok());

    // Garbage under a segment's name, before the snapshot's segment.
    let (second_seq, second) = segments[1].clone();
    let original = fs::read(&second).unwrap();
    fs::write(&second, vec![7u8; 4096]).unwrap();
    let error = refusal(recover_in_thread(data));
    assert!(error.contains(&second.display().to_string()), "{error}");
    assert!(error.contains(&format!("sequence {second_seq}")), "{error}");
    assert_eq!(replay_from_snapshot_refusal(data), error);
    // A real segment header under another segment's name.
    fs::write(&second, fs::read(&segments[2].1).unwrap()).unwrap();
    let error = refusal(recover_in_thread(data));
    assert!(error.contains("disagrees with its file name"), "{error}");
    assert_eq!(replay_from_snapshot_refusal(data), error);
    fs::write(&second, original).unwrap();
    assert!(recover_in_thread(data).is_ok());
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        from_snapshot: true,
        ..replay_args(data)
    })
    .unwrap();
    assert!(report.ok, "{:?}", report.error);

    // The oldest segment moved away.
    let (_, first) = segments[0].clone();
    fs::rename(&first, data.join("first.wal")).unwrap();
    let error = refusal(recover_in_thread(data));
    assert!(
        error.contains("not 1: the segments before it are missing"),
        "{error}"
    );
    assert!(
        error.contains(&segments[1].1.display().to_string()),
        "{error}"
    );
    assert_eq!(replay_from_snapshot_refusal(data), error);
    // Without the snapshot, replay from the journal alone is refused the same way (it began at
    // the oldest segment left and reported a whole history).
    let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert_eq!(report.error.as_deref(), Some(error.as_str()));
}

/// What `wallet replay --from-snapshot` says of `data`: it must refuse it.
fn replay_from_snapshot_refusal(data: &Path) -> String {
    let report = wallet::tools::replay::run(&wallet::tools::replay::ReplayArgs {
        from_snapshot: true,
        ..replay_args(data)
    })
    .unwrap();
    assert!(!report.ok, "replay passed what start-up refuses");
    report.error.unwrap()
}

/// The other side of the watermark rule: bytes written after the last sync (a crash in the middle
/// of writing a batch, before its msync) are past the watermark, so they are cut as a torn tail
/// and recovery starts, with the watermark file in place.
#[test]
fn a_torn_write_past_the_durable_watermark_is_cut_and_recovery_starts() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 64 << 10, 0..300, 10);
    let durable = ledger.next_seq() - 1;
    assert_eq!(
        wallet::journal::durable_watermark(&journal_dir(data)).unwrap(),
        Some(durable)
    );
    // Half of a record's worth of bytes after the last synced one.
    let end = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
    let (segment, offset) = end.segment.clone().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0xAB; 56], offset).unwrap();
    drop(file);

    let r = recovered(data);
    assert_eq!(r.end.torn_at, Some(offset));
    assert_eq!(r.end.next_seq, durable + 1);
    assert_eq!(r.ledger.state_hash(), ledger.state_hash());
    let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.durable_seq, Some(durable));
    assert!(report.torn_tail.is_some());
}

#[test]
fn a_hole_past_the_durable_watermark_with_valid_frames_after_it_is_cut_not_refused() {
    // A crash during a sync can leave a later page of the unsynced records on the disk without
    // an earlier one: a hole followed by valid frames. Past the watermark none of them was
    // acknowledged, so recovery cuts from the hole; at or before it, it is corruption.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 1 << 20, 0..300, 10);
    let jdir = journal_dir(data);
    let newest = list_segments(&jdir).unwrap().last().unwrap().1.clone();
    let frames: Vec<FramePosition> = frame_positions(data)
        .into_iter()
        .filter(|f| f.file == newest)
        .collect();
    assert!(frames.len() > 20);
    let hole = &frames[frames.len() - 8];
    let synced = &frames[frames.len() - 10];
    let original = fs::read(&newest).unwrap();
    let write_watermark = |seq: u64| set_durable_watermark(data, seq);
    let restore = || fs::write(&newest, &original).unwrap();
    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    for (name, bytes) in [("zeroed", vec![0u8; hole.len]), ("garbled", vec![0xAB; 40])] {
        file.write_all_at(&bytes, hole.offset as u64).unwrap();
        // The watermark ends two records before the hole: cut there.
        write_watermark(hole.seq - 1 - (hole.seq - synced.seq) / 2);
        let r = recovered(data);
        assert_eq!(r.end.torn_at, Some(hole.offset as u64), "{name}");
        assert_eq!(r.end.next_seq, hole.seq, "{name}");
        assert_ne!(r.ledger.state_hash(), ledger.state_hash());
        // The same hole (recovery has cut the tail: put it back) under a watermark that covers
        // it: refused.
        restore();
        file.write_all_at(&bytes, hole.offset as u64).unwrap();
        write_watermark(hole.seq);
        match recover_plain(data) {
            Err(JournalError::Corrupt { offset, seq, .. }) => {
                assert_eq!((offset, seq), (hole.offset as u64, hole.seq), "{name}")
            }
            Err(e) => panic!("{name}: unexpected error {e}"),
            Ok(_) => panic!("{name}: a hole at or before the durable watermark was accepted"),
        }
        restore();
    }
}

#[test]
fn a_tail_keeps_its_last_durable_limit_when_the_watermark_file_disappears() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 1 << 20, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, 0..50, 10);
    let limit = ledger.next_seq() - 1;
    let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(data));
    let mut records = Vec::new();
    tail.fetch_records(usize::MAX, &mut records).unwrap();
    assert_eq!(tail.durable_limit(), Some(limit));
    assert_eq!(records.last().map(|r| r.next_seq()), Some(limit + 1));
    // The file is removed by hand; the running writer goes on writing into its open descriptor,
    // so nothing on disk names a later watermark. The records after the last limit are not known
    // to be durable and stay unread.
    forget_durable_watermark(data);
    write_commands(&mut writer, &mut ledger, &mut history, 50..80, 10);
    records.clear();
    tail.fetch_records(usize::MAX, &mut records).unwrap();
    assert_eq!(tail.durable_limit(), Some(limit));
    assert!(
        records.is_empty(),
        "{} records past the last durable limit",
        records.len()
    );
}

/// A tail stuck at a record the durable watermark covers reports damage (within a few
/// seconds) rather than waiting for good: that record was synced whole, so it is no write in
/// progress, although nothing valid follows it (which alone reads as a torn tail).
#[test]
fn a_tail_stuck_at_a_damaged_durable_record_reports_it() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, _) = fresh_journal(data, 1 << 20, 0..50, 10);
    let end = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
    assert_eq!(end.next_seq, ledger.next_seq());
    // Damage the last record's final bytes, as a bad sector after the sync would.
    let (segment, offset) = end.segment.clone().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0u8; 8], offset - 8).unwrap();
    drop(file);
    let mut tail = wallet::journal::tail::JournalTail::new(&journal_dir(data));
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        match tail.fetch_records(usize::MAX, &mut records) {
            Err(e) => break format!("{e:#}"),
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "the tail waited 10 s at a damaged durable record"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(error.contains("journal damaged"), "{error}");
    assert!(
        records
            .last()
            .is_some_and(|r| r.next_seq() < ledger.next_seq()),
        "the damaged record was yielded"
    );
}

#[test]
fn reopening_a_segment_that_has_holes_allocates_them() {
    // A segment restored with a sparse-aware copy has holes; writing into a hole through the
    // mapping on a full disk is a SIGBUS, so the writer allocates them when it opens the segment.
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 1 << 20, 0..20, 10);
    let newest = list_segments(&journal_dir(data))
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone();
    let size = fs::metadata(&newest).unwrap().len();
    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    let hole_from = (size / 2) as libc::off_t;
    // SAFETY: a valid descriptor; fallocate takes no memory arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            hole_from,
            size as libc::off_t - hole_from,
        )
    };
    assert_eq!(
        rc,
        0,
        "punching a hole: {}",
        std::io::Error::last_os_error()
    );
    drop(file);
    let allocated = |path: &Path| fs::metadata(path).unwrap().blocks() * 512;
    assert!(allocated(&newest) < size, "the hole was not punched");
    let end = recovered(data).end;
    let _writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        1 << 20,
        SyncMode::Batch,
        &end,
    );
    assert!(
        allocated(&newest) >= size,
        "{} of {size} bytes allocated",
        allocated(&newest)
    );
}

/// Bytes this thread has dirtied in the page cache (`write_bytes` of its `/proc` io file).
fn thread_write_bytes() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let io = fs::read_to_string(format!("/proc/self/task/{tid}/io")).expect("per-thread io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes")
}

#[test]
fn opening_the_writer_rewrites_the_newest_segment_whatever_the_page_cache_says() {
    // After a failed msync the kernel may keep pages that never reached the disk, marked clean;
    // the next process would read them, msync nothing and publish them as durable. So opening
    // dirties every page up to the end of the records before its sync. Here the pages are clean
    // (written and synced): opening must still send them to the disk again.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 4 << 20, 0..3000, 100);
    let end = recovered(data).end;
    let (_, write_offset) = end.segment.clone().unwrap();
    assert!(write_offset > 200_000, "{write_offset}");
    let before = thread_write_bytes();
    let _writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        4 << 20,
        SyncMode::Batch,
        &end,
    );
    let dirtied = thread_write_bytes() - before;
    assert!(
        dirtied >= write_offset - 4096,
        "opening dirtied {dirtied} bytes of {write_offset}"
    );
}

/// A torn tail of several MiB (stray bytes near the end of a large segment) is kept and
/// zeroed a piece at a time (4 MiB), not read into memory whole: every byte of it is in the kept
/// copy, in order, and the segment is zero after it.
#[test]
fn a_torn_tail_of_many_mib_is_kept_and_cut_whole() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let segment_size = 16 << 20;
    let (ledger, _) = fresh_journal(data, segment_size, 0..100, 10);
    let end = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
    let (segment, offset) = end.segment.clone().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    let stray_end = offset + (9 << 20) + 12_345;
    for (i, at) in (offset..stray_end).step_by(1 << 20).enumerate() {
        file.write_all_at(&[i as u8 + 1; 3], at).unwrap();
    }
    file.write_all_at(&[0xEE], stray_end - 1).unwrap();
    drop(file);
    let torn: Vec<u8> = fs::read(&segment).unwrap()[offset as usize..stray_end as usize].to_vec();
    let r = recovered(data);
    assert_eq!(r.end.torn_at, Some(offset));
    assert_eq!(r.end.torn_end, stray_end);
    drop(open_writer(
        data,
        Box::new(MmapStorage::default()),
        segment_size,
        SyncMode::Batch,
        &r.end,
    ));
    let kept = fs::read(format!("{}.cut-at-{offset}", segment.display())).expect("the cut bytes");
    assert_eq!(kept.len(), torn.len());
    assert!(kept == torn, "the kept bytes differ from the torn tail");
    assert!(
        fs::read(&segment).unwrap()[offset as usize..]
            .iter()
            .all(|b| *b == 0),
        "the tail is zeroed"
    );
    let again = recovered(data);
    assert_eq!(again.end.torn_at, None);
    assert_eq!(again.ledger.state_hash(), ledger.state_hash());
}

#[test]
fn cutting_a_torn_tail_keeps_the_cut_bytes_and_rewrites_only_up_to_them() {
    // The durable watermark file is written without an fsync, so after a power loss it may be
    // stale and a "torn tail" past it may hold acknowledged records behind damage: the cut
    // bytes are kept beside the segment. And only the non-zero part is rewritten, not the rest
    // of a (here 16 MiB) segment.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let segment_size = 16 << 20;
    let (ledger, _) = fresh_journal(data, segment_size, 0..300, 10);
    let end = wallet::journal::scan(&journal_dir(data), 1, |_| Ok(())).unwrap();
    let (segment, offset) = end.segment.clone().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0xAB; 56], offset).unwrap();
    file.write_all_at(&[0xCD], offset + 4000).unwrap();
    drop(file);
    let torn: Vec<u8> =
        fs::read(&segment).unwrap()[offset as usize..offset as usize + 4001].to_vec();

    let r = recovered(data);
    assert_eq!(r.end.torn_at, Some(offset));
    assert_eq!(r.end.torn_end, offset + 4001);
    assert_eq!(r.ledger.state_hash(), ledger.state_hash());
    let before = thread_write_bytes();
    let writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        segment_size,
        SyncMode::Batch,
        &r.end,
    );
    let wrote = thread_write_bytes() - before;
    drop(writer);
    let kept = fs::read(format!("{}.cut-at-{offset}", segment.display())).expect("the cut bytes");
    assert_eq!(kept, torn);
    assert!(
        fs::read(&segment).unwrap()[offset as usize..]
            .iter()
            .all(|b| *b == 0),
        "the tail is zeroed"
    );
    // The records' pages again (the writer's open rewrites them), the cut and its copy: far
    // less than the 16 MiB the segment has.
    assert!(
        wrote < offset + 64 * 1024,
        "opening wrote {wrote} bytes for a {offset}-byte journal and a 4001-byte cut"
    );
    // Recovery and replay are clean afterwards; the kept file is not taken for a segment.
    let again = recovered(data);
    assert_eq!(again.end.torn_at, None);
    assert_eq!(again.ledger.state_hash(), ledger.state_hash());
    let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(report.ok, "{:?}", report.error);
}

#[test]
fn opening_the_writer_syncs_older_segments_a_sync_none_writer_left_unsynced() {
    // A writer under `--sync none` rolls to a new segment without syncing the old one. A
    // writer opened later with a real sync mode publishes a durable watermark that covers every
    // older segment, so it must make them durable first, not only the newest.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let journal = journal_dir(data);
    let unsynced = journal.join(wallet::journal::format::UNSYNCED_FILE_NAME);
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 8 << 10, SyncMode::None);
    write_commands(&mut writer, &mut ledger, &mut history, 0..400, 10);
    drop(writer);
    let segments: Vec<PathBuf> = list_segments(&journal)
        .unwrap()
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    assert!(segments.len() >= 3, "{} segments", segments.len());
    let older = &segments[..segments.len() - 1];
    // The `--sync none` writer marked, before writing, the segments it may leave unsynced:
    // all of them, from the first.
    let mark = fs::read(&unsynced).expect("a --sync none writer leaves the unsynced mark");
    assert_eq!(wallet::journal::format::decode_unsynced(&mark), Ok(1));

    // A sync of an older segment fails (a writeback of it failed in the background): the open
    // fails, and the mark stays. The kernel has reported the error now, and may have marked the
    // lost pages clean, so a plain fsync on the next open would "succeed" without them.
    let r = recovered(data);
    let (storage, _) = faulty(1);
    let config = JournalConfig {
        dir: journal.clone(),
        segment_size_bytes: 8 << 10,
        sync: SyncMode::Batch,
    };
    assert!(JournalWriter::open(Box::new(storage), config, &r.end).is_err());
    assert!(
        unsynced.exists(),
        "the mark stays until the segments are synced"
    );

    // The next open dirties those segments again in full and syncs them, then removes the mark.
    let (storage, faults) = faulty(u64::MAX);
    let _writer = open_writer(data, Box::new(storage), 8 << 10, SyncMode::Batch, &r.end);
    assert_eq!(*faults.redirtied_files.lock().unwrap(), older);
    // The directory: a process killed between a new segment's rename and the directory's
    // fsync leaves a name that a power loss can take away, with every record acknowledged in
    // that segment since. Opening makes the names durable before it publishes a watermark
    // (and again once the mark is removed). Then the first watermark it publishes is made
    // durable, file and name: a power loss must not leave the records without it.
    let durable = journal.join(wallet::journal::format::DURABLE_FILE_NAME);
    assert_eq!(
        *faults.synced_files.lock().unwrap(),
        [
            journal.clone(),
            journal.clone(),
            durable.clone(),
            journal.clone()
        ]
    );
    assert!(!unsynced.exists());
    drop(_writer);

    // Without the mark, older segments were synced at their roll-over: an fsync each (of a
    // clean file: it writes nothing), no rewrite.
    let (storage, faults) = faulty(u64::MAX);
    let r = recovered(data);
    let _writer = open_writer(data, Box::new(storage), 8 << 10, SyncMode::Batch, &r.end);
    assert!(faults.redirtied_files.lock().unwrap().is_empty());
    let mut expected = older.to_vec();
    expected.extend([journal.clone(), durable.clone(), journal.clone()]);
    assert_eq!(*faults.synced_files.lock().unwrap(), expected);
    drop(_writer);

    // Under `--sync none` nothing is promised and no segment is synced; the mark now names the
    // newest segment, the first this writer may leave unsynced.
    let (storage, faults) = faulty(u64::MAX);
    let r = recovered(data);
    let _none = open_writer(data, Box::new(storage), 8 << 10, SyncMode::None, &r.end);
    assert_eq!(
        *faults.synced_files.lock().unwrap(),
        [journal.clone(), durable, journal.clone()]
    );
    let newest_first = list_segments(&journal).unwrap().last().unwrap().0;
    assert_eq!(
        wallet::journal::format::decode_unsynced(&fs::read(&unsynced).unwrap()),
        Ok(newest_first)
    );
}

#[test]
fn wallet_snapshot_makes_the_journal_durable_up_to_the_snapshot_before_writing_it() {
    // A server that crashed before its sync leaves records that recovery reads (from the page
    // cache) past the durable watermark. `wallet snapshot` must sync them before it writes a
    // snapshot that includes them, or a power loss would leave the snapshot ahead of the journal.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, history) = fresh_journal(data, 4 << 20, 0..3000, 100);
    let end = ledger.next_seq() - 1;
    let behind = history.last_seq[1000];
    set_durable_watermark(data, behind);
    assert_eq!(
        wallet::journal::durable_watermark(&journal_dir(data)).unwrap(),
        Some(behind)
    );
    let (_, write_offset) = recovered(data).end.segment.unwrap();
    let before = thread_write_bytes();
    let written = wallet::tools::replay::snapshot(&wallet::tools::replay::SnapshotArgs {
        data_dir: data.to_path_buf(),
    })
    .expect("wallet snapshot");
    let wrote = thread_write_bytes() - before;
    assert_eq!(
        wallet::journal::durable_watermark(&journal_dir(data)).unwrap(),
        Some(end),
        "the watermark covers the snapshot"
    );
    assert!(
        wrote >= write_offset - 4096 + fs::metadata(&written).unwrap().len(),
        "wrote {wrote} bytes: the segment's {write_offset} and the snapshot"
    );
    let loaded = snapshot::load_newest(&snapshot_dir(data), LedgerConfig::default(), None)
        .expect("the snapshot loads");
    assert_eq!(loaded.state_hash(), ledger.state_hash());
}

#[test]
fn every_flipped_bit_in_a_committed_record_is_reported_as_corruption() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    build_journal(data);
    let frames = frame_positions(data);
    let segments = list_segments(&journal_dir(data)).unwrap();
    let oldest = &segments[0].1;
    let newest = &segments.last().unwrap().1;
    let middle_of = |file: &PathBuf| {
        let inside: Vec<&FramePosition> = frames.iter().filter(|f| &f.file == file).collect();
        inside[inside.len() / 2].clone()
    };
    let mut failures = Vec::new();
    for target in [middle_of(oldest), middle_of(newest)] {
        let original = fs::read(&target.file).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target.file)
            .unwrap();
        for bit in 0..target.len * 8 {
            let at = target.offset + bit / 8;
            file.write_all_at(&[original[at] ^ (1 << (bit % 8))], at as u64)
                .unwrap();
            match recover_plain(data) {
                Err(JournalError::Corrupt {
                    file: named,
                    offset,
                    seq,
                    reason,
                }) => {
                    if named != target.file || offset > target.offset as u64 || seq > target.seq {
                        failures.push(format!(
                            "bit {bit} of seq {}: reported {} offset {offset} seq {seq} ({reason}), expected {} offset <= {}",
                            target.seq,
                            named.display(),
                            target.file.display(),
                            target.offset
                        ));
                    }
                }
                Err(other) => failures.push(format!(
                    "bit {bit} of seq {}: unexpected error {other}",
                    target.seq
                )),
                Ok(r) => failures.push(format!(
                    "bit {bit} of seq {}: recovery succeeded with {} records",
                    target.seq, r.records_replayed
                )),
            }
            // The offline audit says the same, naming the file (one bit per byte keeps this quick).
            if bit % 8 == 3 {
                let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
                let name = target.file.file_name().unwrap().to_str().unwrap();
                let error = report.error.clone().unwrap_or_default();
                if report.ok || !error.contains(name) {
                    failures.push(format!(
                        "bit {bit} of seq {}: replay report ok={} error={error:?}",
                        target.seq, report.ok
                    ));
                }
            }
            file.write_all_at(&[original[at]], at as u64).unwrap();
        }
        assert_eq!(fs::read(&target.file).unwrap(), original);
    }
    let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
    assert!(
        report.ok,
        "the restored journal replays cleanly: {:?}",
        report.error
    );
    let shown: Vec<&String> = failures.iter().take(10).collect();
    assert!(
        failures.is_empty(),
        "{} flips misreported, first ones:\n{shown:#?}",
        failures.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Failing storage
// ---------------------------------------------------------------------------------------------

fn faulty(syncs_before_failure: u64) -> (FaultyStorage, Arc<Faults>) {
    let faults = Faults::new();
    faults
        .syncs_before_failure
        .store(syncs_before_failure, Ordering::SeqCst);
    (
        FaultyStorage {
            faults: faults.clone(),
        },
        faults,
    )
}

#[test]
fn a_failed_sync_poisons_the_writer_for_good() {
    // The first sync is the new segment's header (on the first append); then one per commit.
    for allowed in 0..6u64 {
        let temp = tempfile::tempdir().unwrap();
        let data = temp.path();
        let (storage, faults) = faulty(allowed);
        let mut writer = open_writer(
            data,
            Box::new(storage),
            64 << 10,
            SyncMode::Batch,
            &JournalEnd::empty(),
        );
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut failed_at = None;
        for i in 0..8u64 {
            let record = ledger.execute(&command(i));
            let appended = writer.append(&record);
            let committed = appended.is_ok().then(|| writer.commit());
            match (failed_at, &appended, &committed) {
                (None, Ok(()), Some(Ok(durable))) => assert_eq!(*durable, record.next_seq() - 1),
                (None, _, _) => failed_at = Some(i),
                (Some(_), Err(_), None) => {}
                (Some(_), _, _) => {
                    panic!("allowed {allowed}: command {i} went through after a failure")
                }
            }
        }
        let expected_failure = if allowed == 0 { 0 } else { allowed - 1 };
        assert_eq!(failed_at, Some(expected_failure), "allowed {allowed}");
        assert_eq!(
            writer.durable_seq(),
            expected_failure,
            "allowed {allowed}: durable watermark"
        );
        // Never retried: no sync after the failed one.
        assert_eq!(
            faults.syncs_done.load(Ordering::SeqCst),
            allowed + 1,
            "allowed {allowed}"
        );
        assert!(writer.commit().is_err());
    }
}

/// Collects (token, durable) of every delivered outcome.
struct Collect(mpsc::Sender<(u64, CommandRecord, bool)>);

impl ReplySink for Collect {
    fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
        let _ = self.0.send((slot.token, slot.record, durable));
    }
}

/// An engine over an empty ledger journaling to `writer`, and the receiver of its outcomes.
fn start_journaled(writer: JournalWriter) -> (Engine, mpsc::Receiver<(u64, CommandRecord, bool)>) {
    let (sender, receiver) = mpsc::channel();
    let engine = Engine::start(
        Ledger::new(LedgerConfig::default()),
        engine_config(),
        JournalStage::Journal(writer),
        Collect(sender),
    );
    (engine, receiver)
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        input_ring_size: 64,
        output_ring_size: 64,
        wait: WaitMode::Sleep(Duration::from_micros(50)),
        pin_core: None,
        checkpoint_every: 0,
        snapshot_every: 0,
        snapshot_dir: None,
        // Anything added later keeps its default (waits default to `wait`).
        ..EngineConfig::default()
    }
}

#[test]
fn engine_never_reports_durable_after_the_journal_failed() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let allowed = 4;
    let (storage, _faults) = faulty(allowed);
    let writer = open_writer(
        data,
        Box::new(storage),
        64 << 10,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    let (engine, receiver) = start_journaled(writer);
    let mut submitter = engine.submitter();
    let mut delivered = Vec::new();
    let mut executed = Vec::new();
    // One command at a time, so that every batch (and so every sync) holds one record.
    for i in 0..12u64 {
        submitter.try_submit(command(i), i, 0).unwrap();
        let (token, record, durable) = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("an outcome within 10 s");
        assert_eq!(token, i);
        assert!(!record.replayed);
        delivered.push(durable);
        executed.push(record.first_seq != 0);
    }
    // A retry of a command that was durable before the failure still gets its original
    // outcome; a retry of the one whose sync failed does not (it is not durable).
    for (i, durable) in [(0u64, true), (allowed - 1, false)] {
        submitter.try_submit(command(i), 100 + i, 0).unwrap();
        let (token, record, answered_durable) = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("an outcome within 10 s");
        assert_eq!(token, 100 + i);
        assert!(record.replayed, "command {i} was not answered as a replay");
        assert_eq!(answered_durable, durable, "command {i}");
    }
    let shared = engine.shared();
    drop(submitter);
    // The ledger ran ahead of the journal by the record whose sync failed: it is not handed
    // back as the engine's state.
    let Err(failed) = engine.shutdown() else {
        panic!("shutdown handed back a ledger ahead of the journal");
    };
    // Header sync + (allowed - 1) commits succeed; everything from the next record on is unknown.
    let durable_count = (allowed - 1) as usize;
    let want: Vec<bool> = (0..12).map(|i| i < durable_count).collect();
    assert_eq!(delivered, want);
    // The record whose sync failed was executed; nothing after the halt was.
    let want: Vec<bool> = (0..12).map(|i| i <= durable_count).collect();
    assert_eq!(executed, want, "commands executed after the journal failed");
    assert!(shared.halted.load(Ordering::SeqCst));
    let reason = shared.halt_reason().expect("a halt reason");
    assert!(reason.contains("sync"), "{reason}");
    assert_eq!(failed.0, reason);
    assert_eq!(
        shared.durable_seq.load(Ordering::SeqCst),
        durable_count as u64
    );
    let mut reference = Ledger::new(LedgerConfig::default());
    for i in 0..=durable_count as u64 {
        reference.execute(&command(i));
    }
    assert_eq!(
        shared.executed_seq.load(Ordering::SeqCst),
        reference.next_seq() - 1
    );

    // What was acknowledged survives a restart with healthy storage.
    let r = recovered(data);
    assert!(r.ledger.next_seq() > durable_count as u64);
}

/// A full disk at a segment's roll-over: the journal's reserve (one segment of allocated
/// space) makes room for the new segment, so the records the engine already executed are
/// journaled and acknowledged; new work is then refused unexecuted (`journal_full`) instead of
/// halting the engine, retries of durable commands keep their answers, and once space returns
/// the reserve is allocated again and the refused commands execute when sent again.
#[test]
fn a_full_disk_refuses_new_work_instead_of_halting_and_work_resumes_when_space_returns() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (storage, faults) = faulty(u64::MAX);
    // Room for the reserve and the first segment, nothing more.
    faults.free_segments.store(2, Ordering::SeqCst);
    let mut writer = open_writer(
        data,
        Box::new(storage),
        4096,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    writer.keep_reserve();
    let reserve = journal_dir(data).join("reserve");
    assert_eq!(fs::metadata(&reserve).unwrap().len(), 4096);
    let (engine, receiver) = start_journaled(writer);
    let shared = engine.shared();
    let mut submitter = engine.submitter();
    let mut token = 0;
    let mut send = |i: u64| {
        token += 1;
        submitter.try_submit(command(i), token, 0).unwrap();
        let (got, record, durable) = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("an outcome within 10 s");
        assert_eq!(got, token);
        (record, durable)
    };
    // One command at a time until the first refusal: everything before it is durable.
    let mut first_refused = None;
    for i in 0..200u64 {
        let (record, durable) = send(i);
        if record.refused.is_some() {
            assert_eq!(record.refused, Some(Refusal::JournalFull), "command {i}");
            assert!(!durable && record.first_seq == 0, "command {i}: {record:?}");
            first_refused = Some(i);
            break;
        }
        assert!(durable && record.first_seq != 0, "command {i}: {record:?}");
    }
    let first_refused = first_refused.expect("a refusal once the first segment filled");
    assert!(first_refused > 20, "refused after {first_refused} commands");
    assert!(
        !reserve.exists(),
        "the reserve was used for the second segment"
    );
    assert!(!shared.halted.load(Ordering::SeqCst), "the engine halted");
    // Still short of space: new commands are refused (over several reserve retries), a retry
    // of a durable command gets its original answer.
    let deadline = Instant::now() + 2 * wallet::journal::RESERVE_RETRY;
    while Instant::now() < deadline {
        let (record, _) = send(first_refused + 1);
        assert_eq!(record.refused, Some(Refusal::JournalFull));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (retry, durable) = send(0);
    assert!(
        retry.replayed && durable && retry.refused.is_none(),
        "{retry:?}"
    );
    assert!(shared.refused_journal_full.load(Ordering::SeqCst) >= 2);
    assert!(shared.journal_space_short.load(Ordering::SeqCst));

    // Space returns (the reserve and one more segment): the next commit past the retry
    // interval allocates the reserve, and the refused command executes when sent again.
    faults.free_segments.store(2, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let executed = loop {
        let (record, durable) = send(first_refused);
        if record.refused.is_none() {
            break (record, durable);
        }
        assert!(
            Instant::now() < deadline,
            "still refused 10 s after space returned"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(executed.1 && !executed.0.replayed, "{executed:?}");
    assert!(reserve.exists(), "the reserve was allocated again");
    assert!(!shared.journal_space_short.load(Ordering::SeqCst));
    for i in first_refused + 1..first_refused + 10 {
        let (record, durable) = send(i);
        assert!(
            durable && record.refused.is_none(),
            "command {i}: {record:?}"
        );
    }
    drop(submitter);
    let ledger = engine.shutdown().expect("a clean shutdown");
    // The journal holds exactly what was acknowledged, and none of the refusals.
    let r = recovered(data);
    assert_eq!(r.ledger.state_hash(), ledger.state_hash());
    let mut reference = Ledger::new(LedgerConfig::default());
    for i in 0..first_refused + 10 {
        reference.execute(&command(i));
    }
    assert_eq!(r.ledger.state_hash(), reference.state_hash());
}

/// The reserve outlives the writer: a restart keeps a whole one without needing space, cuts a
/// larger one to its segment size, and starts short of space (not failing, and leaving no
/// partly allocated reserve) when the disk cannot hold a larger one.
#[test]
fn a_writer_keeps_one_reserve_of_its_segment_size_across_restarts() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let reserve = journal_dir(data).join("reserve");
    let (storage, faults) = faulty(u64::MAX);
    let open = |segment_size: u64| {
        let mut writer = open_writer(
            data,
            Box::new(storage.clone()),
            segment_size,
            SyncMode::Batch,
            &recover_plain(data).expect("recover").end,
        );
        writer.keep_reserve();
        writer
    };
    faults.free_segments.store(1, Ordering::SeqCst);
    let writer = open(8192);
    assert!(!writer.space_short());
    assert_eq!(fs::metadata(&reserve).unwrap().len(), 8192);
    drop(writer);
    // The disk is full, but the reserve is whole.
    assert_eq!(faults.free_segments.load(Ordering::SeqCst), 0);
    let writer = open(8192);
    assert!(!writer.space_short());
    drop(writer);
    // A smaller segment size: the reserve is cut to it.
    let writer = open(4096);
    assert!(!writer.space_short());
    assert_eq!(fs::metadata(&reserve).unwrap().len(), 4096);
    drop(writer);
    // A larger one needs more space than the disk has.
    let writer = open(8192);
    assert!(writer.space_short());
    assert!(!reserve.exists(), "a partly allocated reserve was left");
    drop(writer);
    faults.free_segments.store(1, Ordering::SeqCst);
    let writer = open(8192);
    assert!(!writer.space_short());
    assert_eq!(fs::metadata(&reserve).unwrap().len(), 8192);
    // Nothing else in the journal directory took it for a segment.
    assert!(list_segments(&journal_dir(data)).unwrap().is_empty());
}

/// Appends commands 30 to 32 with the write tearing after its first 50 bytes: the sync after
/// it fails, and those bytes are a torn tail for the next start.
fn tear_three_records(writer: &mut JournalWriter, faults: &Faults, ledger: &mut Ledger) {
    faults.tear_bytes.store(50, Ordering::SeqCst);
    faults.tear_next_write.store(true, Ordering::SeqCst);
    for i in 30..33 {
        writer.append(&ledger.execute(&command(i))).unwrap();
    }
    assert!(
        writer.commit().is_err(),
        "the sync after a torn write fails"
    );
}

#[test]
fn a_torn_write_is_cut_as_a_torn_tail_on_restart() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (storage, faults) = faulty(u64::MAX);
    let mut writer = open_writer(
        data,
        Box::new(storage),
        64 << 10,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut history = History::new(&ledger);
    write_commands(&mut writer, &mut ledger, &mut history, 0..30, 3);
    let durable = writer.durable_seq();
    assert_eq!(durable, *history.last_seq.last().unwrap());

    tear_three_records(&mut writer, &faults, &mut ledger);
    assert!(
        writer.append(&ledger.execute(&command(33))).is_err(),
        "poisoned"
    );
    assert!(writer.commit().is_err(), "poisoned");
    assert_eq!(writer.durable_seq(), durable);
    drop(writer);

    let r = recovered(data);
    assert_eq!(r.ledger.next_seq() - 1, durable);
    assert_eq!(r.ledger.state_hash(), history.hashes[30]);
    let resume = r.end.segment.clone().unwrap().1;
    assert_eq!(
        r.end.torn_at,
        Some(resume),
        "the 50 torn bytes are a torn tail"
    );

    // The writer cuts the tail; the journal then continues from the last durable record.
    let Recovered {
        mut ledger, end, ..
    } = r;
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        64 << 10,
        SyncMode::Batch,
        &end,
    );
    let mut more = History::new(&ledger);
    write_commands(&mut writer, &mut ledger, &mut more, 100..120, 4);
    drop(writer);
    let again = recovered(data);
    assert_eq!(again.end.torn_at, None);
    assert_eq!(again.ledger.state_hash(), ledger.state_hash());
}

/// A journal in `data` on a small disk (64 KiB segments, a reserve kept if `reserve`): 30
/// commands, then 3 torn by a crash; the disk then filled. Returns the disk, the history of
/// the 30 and the filler file.
fn torn_tail_on_a_full_disk(reserve: bool) -> (common::SmallDisk, History, PathBuf) {
    let disk = common::SmallDisk::mount(2 << 20);
    let data = disk.dir.path().join("data");
    let (storage, faults) = faulty(u64::MAX);
    let mut writer = open_writer(
        &data,
        Box::new(storage),
        64 << 10,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    if reserve {
        writer.keep_reserve();
        assert!(journal_dir(&data).join("reserve").exists());
    }
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut history = History::new(&ledger);
    write_commands(&mut writer, &mut ledger, &mut history, 0..30, 3);
    tear_three_records(&mut writer, &faults, &mut ledger);
    drop(writer);
    let filler = disk.fill("filler");
    (disk, history, filler)
}

/// Opens the writer of `torn_tail_on_a_full_disk`'s journal after recovery found `end`: it
/// must open, the disk still full.
fn open_on_the_full_disk(data: &Path, end: &JournalEnd) -> JournalWriter {
    let config = JournalConfig {
        dir: journal_dir(data),
        segment_size_bytes: 64 << 10,
        sync: SyncMode::Batch,
    };
    match JournalWriter::open(Box::new(MmapStorage::default()), config, end) {
        Ok(writer) => writer,
        Err(e) => panic!("a torn tail on a full disk kept the journal from opening: {e}"),
    }
}

/// Writes 10 more commands after the cut, then checks that recovery finds no torn tail and the
/// same state.
fn goes_on_and_recovers(mut writer: JournalWriter, mut ledger: Ledger, data: &Path) {
    let mut more = History::new(&ledger);
    write_commands(&mut writer, &mut ledger, &mut more, 100..110, 2);
    drop(writer);
    let again = recovered(data);
    assert_eq!(again.end.torn_at, None);
    assert_eq!(again.ledger.state_hash(), ledger.state_hash());
}

/// A crash on a full disk leaves a torn tail: its bytes are kept (beside the segment) in the
/// space of the journal's reserve, and the writer starts short of space, refusing new work as
/// on any full disk, instead of failing to open on every start until someone frees space.
#[test]
fn a_torn_tail_on_a_full_disk_is_kept_in_the_reserves_space_and_the_writer_starts() {
    let (disk, history, _filler) = torn_tail_on_a_full_disk(true);
    let data = disk.dir.path().join("data");

    let Recovered { ledger, end, .. } = recovered(&data);
    assert_eq!(ledger.state_hash(), history.hashes[30]);
    let (segment, torn_at) = (end.segment.clone().unwrap().0, end.torn_at.unwrap());
    let mut writer = open_on_the_full_disk(&data, &end);
    let mut cut = segment.into_os_string();
    cut.push(format!(".cut-at-{torn_at}"));
    assert_eq!(
        fs::metadata(&cut).unwrap().len(),
        50,
        "the torn bytes are kept"
    );
    writer.keep_reserve();
    assert!(writer.space_short(), "the disk is still full");
    // The segment's own space is allocated: the journal goes on, and the cut is final.
    goes_on_and_recovers(writer, ledger, &data);
}

/// A crash on a full disk whose reserve was already used (a roll-over on the full disk took it)
/// leaves a torn tail with no space to keep its bytes: the writer opens with the tail uncut,
/// short of space and writing nothing, and keeps and cuts it once space returns. It refused to
/// open, on every start, until someone freed space.
#[test]
fn a_torn_tail_on_a_full_disk_without_a_reserve_waits_uncut_until_space_returns() {
    let (disk, history, filler) = torn_tail_on_a_full_disk(false);
    let data = disk.dir.path().join("data");
    assert!(!journal_dir(&data).join("reserve").exists());

    let Recovered { ledger, end, .. } = recovered(&data);
    assert_eq!(ledger.state_hash(), history.hashes[30]);
    let (segment, torn_at) = (end.segment.clone().unwrap().0, end.torn_at.unwrap());
    let torn = |segment: &Path| {
        let mut bytes = [0u8; 50];
        File::open(segment)
            .unwrap()
            .read_exact_at(&mut bytes, torn_at)
            .unwrap();
        bytes.iter().any(|&b| b != 0)
    };
    assert!(torn(&segment));
    let mut writer = open_on_the_full_disk(&data, &end);
    writer.keep_reserve();
    assert!(writer.space_short(), "the disk is still full");
    let mut cut = segment.clone().into_os_string();
    cut.push(format!(".cut-at-{torn_at}"));
    assert!(!Path::new(&cut).exists());
    assert!(torn(&segment), "not cut before its bytes are kept");
    // Nothing is written over the uncut tail (the engine sends nothing meanwhile).
    let mut probe = recovered(&data).ledger;
    assert!(writer.append(&probe.execute(&command(100))).is_err());
    std::thread::sleep(wallet::journal::RESERVE_RETRY + Duration::from_millis(50));
    writer.commit().unwrap();
    assert!(writer.space_short(), "still full");
    assert!(torn(&segment));

    fs::remove_file(&filler).unwrap();
    std::thread::sleep(wallet::journal::RESERVE_RETRY + Duration::from_millis(50));
    writer.commit().unwrap();
    assert!(!writer.space_short(), "space returned");
    assert_eq!(
        fs::metadata(&cut).unwrap().len(),
        50,
        "the torn bytes are kept"
    );
    assert!(!torn(&segment), "and cut");
    assert!(journal_dir(&data).join("reserve").exists());
    goes_on_and_recovers(writer, ledger, &data);
}

// ---------------------------------------------------------------------------------------------
// Snapshots and checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_plus_tail_equals_the_full_replay_and_a_bad_snapshot_is_skipped() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 64 << 10, SyncMode::None);
    write_commands(&mut writer, &mut ledger, &mut history, 0..1000, 16);
    let snapshot_path =
        snapshot::write_snapshot(&snapshot_dir(data), &encode_snapshot(&ledger, None)).unwrap();
    let snapshot_seq = ledger.next_seq();
    write_commands(&mut writer, &mut ledger, &mut history, 1000..2000, 16);
    drop(writer);
    assert!(list_segments(&journal_dir(data)).unwrap().len() >= 3);

    let full = recover(data, LedgerConfig::default(), false, |_, _| {}).unwrap();
    let fast = recover(data, LedgerConfig::default(), true, |_, _| {}).unwrap();
    assert_eq!(full.ledger.state_hash(), ledger.state_hash());
    assert_eq!(fast.ledger.state_hash(), ledger.state_hash());
    assert_eq!(full.records_replayed, 2000);
    assert_eq!(fast.records_replayed, 1000);
    assert_eq!(fast.snapshot_next_seq, Some(snapshot_seq));
    // The same end; the chain value each scan saw at its start differs by design.
    assert_eq!(
        JournalEnd {
            chain_at_from: None,
            ..fast.end.clone()
        },
        JournalEnd {
            chain_at_from: None,
            ..full.end.clone()
        }
    );
    assert_eq!(full.end.chain_at_from, Some(0));

    let mut bytes = fs::read(&snapshot_path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs::write(&snapshot_path, &bytes).unwrap();
    let skipped = recover(data, LedgerConfig::default(), true, |_, _| {}).unwrap();
    assert_eq!(
        skipped.snapshot_next_seq, None,
        "the corrupt snapshot is not used"
    );
    assert_eq!(skipped.records_replayed, 2000);
    assert_eq!(skipped.ledger.state_hash(), ledger.state_hash());
}

#[test]
fn checkpoints_are_verified_and_a_wrong_one_stops_recovery() {
    for tamper in [false, true] {
        let temp = tempfile::tempdir().unwrap();
        let data = temp.path();
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut writer = open_writer(
            data,
            Box::new(MmapStorage::default()),
            16 << 10,
            SyncMode::None,
            &JournalEnd::empty(),
        );
        let mut checkpoints = 0;
        let mut bad_seq = None;
        for i in 0..600u64 {
            writer.append(&ledger.execute(&command(i))).unwrap();
            if i % 50 == 49 {
                let mut record = ledger.checkpoint(7);
                if tamper && i == 349 {
                    record.events[0].amount ^= 1;
                    bad_seq = Some(record.first_seq);
                }
                writer.append(&record).unwrap();
                checkpoints += 1;
            }
        }
        writer.commit().unwrap();
        drop(writer);
        let result = recover_plain(data);
        match (tamper, result) {
            (false, Ok(r)) => {
                assert_eq!(r.checkpoints_verified, checkpoints);
                assert_eq!(r.ledger.state_hash(), ledger.state_hash());
            }
            (true, Err(JournalError::Visitor { seq, reason, at })) => {
                // The error names the bad record, and so does its reason, and where it is.
                let bad_seq = bad_seq.unwrap();
                assert_eq!(seq, bad_seq, "stopped elsewhere than at the bad checkpoint");
                let named = format!("checkpoint at sequence {bad_seq} ");
                assert!(reason.contains(&named), "{reason}");
                let frame = frame_positions(data)
                    .into_iter()
                    .find(|f| f.seq == bad_seq)
                    .expect("the bad checkpoint's frame");
                assert_eq!(at, Some((frame.file, frame.offset as u64)));
            }
            (_, Err(e)) => panic!("tamper {tamper}: unexpected error {e}"),
            (_, Ok(_)) => panic!("a checkpoint with a wrong hash was accepted"),
        }
        if tamper {
            let report = wallet::tools::replay::run(&replay_args(data)).unwrap();
            assert!(!report.ok);
            assert!(report.error.unwrap_or_default().contains("checkpoint"));
        }
    }
}

#[test]
fn pipelined_scan_visits_what_scan_visits_and_stops_where_scan_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // More records than one hand-over batch (4096), over several segments.
    fresh_journal(data, 256 << 10, 0..10_000, 500);
    let journal = journal_dir(data);
    assert!(list_segments(&journal).unwrap().len() > 1);

    let mut plain = Vec::new();
    let plain_end = wallet::journal::scan(&journal, 1, |r| {
        plain.push((r.first_seq, r.transaction_id));
        Ok(())
    })
    .unwrap();
    let mut pipelined = Vec::new();
    let pipelined_end = wallet::journal::scan_pipelined(&journal, 1, |r| {
        pipelined.push((r.first_seq, r.transaction_id));
        Ok(())
    })
    .unwrap();
    assert_eq!(plain.len(), 10_000);
    assert_eq!(plain, pipelined);
    assert_eq!(plain_end, pipelined_end);

    // A visitor error in the third batch stops the scan there and names that record.
    let stop_at = plain[9_000].0;
    let mut seen = 0;
    let error = wallet::journal::scan_pipelined(&journal, 1, |r| {
        seen += 1;
        if r.first_seq == stop_at {
            Err("stop here".into())
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert_eq!(seen, 9_001);
    let frame = frame_positions(data)
        .into_iter()
        .find(|f| f.seq == stop_at)
        .expect("the record's frame");
    let place = format!("{} at byte offset {}", frame.file.display(), frame.offset);
    assert!(
        error.to_string().contains(&place),
        "{place:?} not in: {error}"
    );
    match error {
        JournalError::Visitor { seq, reason, at } => {
            assert_eq!(seq, stop_at);
            assert_eq!(reason, "stop here");
            assert_eq!(at, Some((frame.file, frame.offset as u64)));
        }
        other => panic!("expected a visitor error, got {other}"),
    }
}

#[test]
fn replaying_with_id_memory_populated_ahead_equals_the_written_ledger_whatever_was_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // Five hand-over batches (4096 records) over many segments.
    let (written, _) = fresh_journal(data, 256 << 10, 0..20_000, 500);
    let journal = journal_dir(data);
    let mut sequences = Vec::new();
    let scanned_end = wallet::journal::scan(&journal, 1, |record| {
        sequences.push(record.first_seq);
        Ok(())
    })
    .unwrap();
    let records = sequences.len();

    // The size hint is in the right range: segment bytes at 112 bytes a record, bounded by
    // the durable watermark's event count.
    let estimate = wallet::journal::estimate_records(&journal, 1);
    assert!(
        (records / 2..=records * 2).contains(&estimate),
        "estimated {estimate} records for {records}"
    );
    let last_segment = list_segments(&journal).unwrap().last().unwrap().0;
    assert!(wallet::journal::estimate_records(&journal, last_segment) < records / 4);
    assert_eq!(
        wallet::journal::estimate_records(&journal, scanned_end.next_seq),
        0,
        "nothing durable after the end"
    );

    // No reservation (the table grows at once), one that fits the first batch only (the
    // populating helper is stopped before the table grows), the estimate, and a generous one.
    for reserved in [0, 6_000, estimate, 4 * records] {
        let mut ledger = Ledger::with_capacity(LedgerConfig::default(), 0, reserved);
        let mut applied = 0;
        let end = replay_journal(&mut ledger, &journal, |_| true, |_, _, _| applied += 1).unwrap();
        assert_eq!(applied, records, "reserved {reserved}");
        assert_eq!(end, scanned_end, "reserved {reserved}");
        assert_eq!(
            ledger.state_hash(),
            written.state_hash(),
            "reserved {reserved}"
        );
        ledger.check_invariants().unwrap();
    }

    // Records `admit` refuses are skipped: the ledger stops where it says.
    let stop_at = 5_000u64;
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut observed = Vec::new();
    let end = replay_journal(
        &mut ledger,
        &journal,
        |record| record.first_seq < stop_at,
        |_, record, _| observed.push(record.first_seq),
    )
    .unwrap();
    assert_eq!(end, scanned_end, "the scan still reads to the end");
    let before: Vec<u64> = sequences.iter().copied().filter(|s| *s < stop_at).collect();
    assert_eq!(observed, before);
    let first_skipped = sequences.iter().copied().find(|s| *s >= stop_at).unwrap();
    assert_eq!(ledger.next_seq(), first_skipped);

    // A panic in the observer reaches the caller (the populating helper is stopped, so the
    // replay's scope can end) instead of hanging.
    let (done, finished) = mpsc::channel();
    let journal_for_thread = journal.clone();
    std::thread::spawn(move || {
        let mut ledger = Ledger::with_capacity(LedgerConfig::default(), 0, 1 << 20);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            replay_journal(
                &mut ledger,
                &journal_for_thread,
                |_| true,
                |_, record, _| {
                    assert!(record.first_seq < 100, "observer gives up");
                },
            )
        }));
        let _ = done.send(outcome.is_err());
    });
    let panicked = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("a replay whose observer panicked did not return within 60 s");
    assert!(panicked, "the observer's panic was swallowed");
}

#[test]
fn a_segment_creation_cut_short_by_a_crash_does_not_stop_recovery_or_the_next_roll() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (ledger, mut history) = fresh_journal(data, 64 << 10, 0..1_000, 50);
    let journal = journal_dir(data);
    let segments = list_segments(&journal).unwrap();
    assert!(segments.len() > 1);
    // What a kill between creating the next segment and naming it leaves behind: a preallocated
    // file of zeros under the temporary name of the segment the writer would roll to.
    let next_seq = ledger.next_seq();
    let leftover = wallet::journal::storage::temporary_segment_path(
        &journal.join(wallet::journal::format::segment_file_name(next_seq)),
    );
    File::create(&leftover).unwrap().set_len(64 << 10).unwrap();

    let first = recovered(data);
    assert_eq!(first.ledger.state_hash(), ledger.state_hash());
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        64 << 10,
        SyncMode::Batch,
        &first.end,
    );
    assert!(
        !leftover.exists(),
        "the writer removes the unfinished segment"
    );
    let mut ledger = first.ledger;
    // Enough records to roll past the point where the leftover was.
    write_commands(&mut writer, &mut ledger, &mut history, 1_000..2_000, 50);
    drop(writer);
    assert!(list_segments(&journal).unwrap().len() > segments.len());
    assert_eq!(recovered(data).ledger.state_hash(), ledger.state_hash());
}

/// Runs 6,000 commands through an engine with a journal in `data` (64 KiB segments), a
/// checkpoint every 300 events and a snapshot every 1,000, keeping `snapshot_keep`; returns the
/// final ledger and the engine's shared state once the follower has caught up.
fn run_with_snapshot_follower(
    data: &Path,
    snapshot_keep: usize,
) -> (Ledger, Arc<wallet::engine::EngineShared>) {
    // Small segments, so that the follower crosses segment rolls.
    let writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        64 << 10,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    let (sender, receiver) = mpsc::channel();
    let engine = Engine::start(
        Ledger::new(LedgerConfig::default()),
        EngineConfig {
            checkpoint_every: 300,
            snapshot_every: 1000,
            snapshot_dir: Some(snapshot_dir(data)),
            snapshot_keep,
            ..engine_config()
        },
        JournalStage::Journal(writer),
        Collect(sender),
    );
    let shared = engine.shared();
    let mut submitter = engine.submitter();
    let total = 6000u64;
    for chunk in (0..total).collect::<Vec<_>>().chunks(32) {
        for &i in chunk {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while submitter.try_submit(command(i), i, 0).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the engine took no command for 10 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for _ in chunk {
            let (_, _, durable) = receiver
                .recv_timeout(Duration::from_secs(10))
                .expect("an outcome within 10 s");
            assert!(durable);
        }
    }
    // The follower reads the journal files behind the engine: give it (bounded) time to catch up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while shared.follower_seq.load(Ordering::SeqCst) < shared.durable_seq.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower did not catch up within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(submitter);
    let ledger = engine.shutdown().expect("the engine did not fail");
    (ledger, shared)
}

/// Snapshots come from the engine's follower (stage 5), not the engine thread: each one must be
/// exactly the journal's state at its sequence, and the follower must have verified every
/// checkpoint record on the way (the live form of `wallet replay`'s check).
#[test]
fn the_snapshot_follower_writes_snapshots_equal_to_the_replayed_journal_and_verifies_checkpoints() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let (ledger, shared) = run_with_snapshot_follower(data, 0);
    assert!(
        !shared.follower_failed.load(Ordering::SeqCst),
        "{:?}",
        shared.follower_failure.lock().unwrap()
    );

    // The state after every record of the journal, by the sequence that follows it.
    let mut replayed = Ledger::new(LedgerConfig::default());
    let mut hash_at = std::collections::HashMap::new();
    let mut checkpoints = 0u64;
    wallet::journal::scan(&journal_dir(data), 1, |record| {
        if record.events()[0].kind == wallet::core::EventKind::Checkpoint {
            checkpoints += 1;
        }
        replayed.apply(record);
        hash_at.insert(replayed.next_seq(), replayed.state_hash());
        Ok(())
    })
    .unwrap();
    assert_eq!(replayed.state_hash(), ledger.state_hash());
    assert!(checkpoints >= 10, "{checkpoints} checkpoints");
    assert_eq!(
        shared.follower_checkpoints.load(Ordering::SeqCst),
        checkpoints,
        "every checkpoint was verified by the follower"
    );

    let snapshots = snapshot::list_snapshots(&snapshot_dir(data));
    let last_seq = ledger.next_seq() - 1;
    assert!(
        snapshots.len() as u64 >= last_seq / 1000 - 1,
        "{} snapshots for {last_seq} events",
        snapshots.len()
    );
    assert_eq!(
        shared.snapshots_written.load(Ordering::SeqCst),
        snapshots.len() as u64
    );
    for (next_seq, path) in &snapshots {
        let bytes = fs::read(path).unwrap();
        let restored =
            wallet::core::codec::decode_snapshot(&bytes, LedgerConfig::default()).unwrap();
        assert_eq!(restored.next_seq(), *next_seq);
        assert_eq!(
            Some(&restored.state_hash()),
            hash_at.get(next_seq),
            "snapshot {} is the journal's state at its sequence",
            path.display()
        );
        // And it names the journal's chain value there.
        let end = wallet::journal::scan(&journal_dir(data), *next_seq, |_| Ok(())).unwrap();
        assert!(end.chain_at_from.is_some());
        assert_eq!(
            wallet::core::codec::snapshot_chain(&bytes),
            end.chain_at_from,
            "snapshot {}",
            path.display()
        );
    }
}

/// A server with `--snapshot-every` keeps only the newest `--snapshot-keep` snapshots (each is
/// as large as the state; keeping them all filled the disk), and removes the temporary files of
/// snapshots whose writing a crash interrupted. Other files are left alone.
#[test]
fn the_snapshot_follower_keeps_only_the_newest_snapshots() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let snapshots = snapshot_dir(data);
    fs::create_dir_all(&snapshots).unwrap();
    let interrupted = snapshots.join(".snapshot-00000000000000000005.bin.tmp");
    fs::write(&interrupted, b"half a snapshot").unwrap();
    let other = snapshots.join("notes.txt");
    fs::write(&other, b"an operator's file").unwrap();
    // A damaged snapshot named above everything the run will write: start-up would skip it, so
    // it must not count among the kept ones (it pushed the good ones out), nor be removed.
    let damaged = snapshots.join(snapshot::snapshot_file_name(1 << 40));
    fs::write(&damaged, b"not a snapshot").unwrap();
    let (ledger, shared) = run_with_snapshot_follower(data, 2);
    let written = shared.snapshots_written.load(Ordering::SeqCst);
    assert!(written >= 4, "{written} snapshots written");
    assert!(damaged.exists());
    fs::remove_file(&damaged).unwrap();
    let kept = snapshot::list_snapshots(&snapshots);
    assert_eq!(kept.len(), 2, "{kept:?}");
    // The newest two: the last one written is at most one interval behind the end.
    assert!(kept[0].0 + 1000 + 64 >= ledger.next_seq(), "{kept:?}");
    assert!(kept[1].0 < kept[0].0);
    assert!(!interrupted.exists());
    assert!(other.exists());
    // And they load.
    let r = recover_in_thread(data).expect("recovery failed");
    assert_eq!(r.snapshot_next_seq, Some(kept[0].0));
    assert_eq!(r.ledger.state_hash(), ledger.state_hash());
}

/// Whether this process has `path` mapped now.
fn is_mapped(path: &Path) -> bool {
    let path = fs::canonicalize(path).unwrap();
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .any(|line| line.ends_with(path.to_str().unwrap()))
}

#[test]
fn the_newest_segment_is_read_not_mapped_and_reads_the_same_across_read_windows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // Two segments of 2 MiB: the newest holds more than one 1 MiB read window of records.
    let (ledger, _) = fresh_journal(data, 2 << 20, 0..40_000, 1_000);
    let journal = journal_dir(data);
    let segments = list_segments(&journal).unwrap();
    assert_eq!(segments.len(), 2, "{segments:?}");
    let (newest_first, newest) = segments[1].clone();
    let sealed = segments[0].1.clone();
    let positions = frame_positions(data);
    let newest_frames: Vec<&FramePosition> =
        positions.iter().filter(|p| p.file == newest).collect();
    assert!(newest_frames.last().unwrap().end() > 1 << 20);

    // A writer may be storing into the newest segment while a scan reads it (a tail's stuck
    // check, a replicator's record lookup): it must never be mapped. The sealed one may be.
    let (mut visited, mut sealed_mapped, mut newest_mapped) = (0, 0, 0);
    let end = wallet::journal::scan(&journal, 1, |record| {
        visited += 1;
        if record.first_seq >= newest_first {
            newest_mapped += usize::from(is_mapped(&newest));
        } else if visited % 1_000 == 1 {
            sealed_mapped += usize::from(is_mapped(&sealed));
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(visited, 40_000);
    assert!(sealed_mapped > 0, "the check sees no mapping at all");
    assert_eq!(
        newest_mapped, 0,
        "the newest segment was mapped while scanned"
    );
    assert_eq!(end.next_seq, ledger.next_seq());
    assert_eq!(
        end.segment,
        Some((newest.clone(), newest_frames.last().unwrap().end() as u64))
    );
    assert_eq!(end.torn_at, None);

    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    // Garbage in the last window, far behind the records: a torn tail up to its last byte.
    let garbage_at = (2 << 20) - 100;
    file.write_all_at(&[0xAB; 10], garbage_at as u64).unwrap();
    let end = wallet::journal::scan(&journal, 1, |_| Ok(())).unwrap();
    let records_end = newest_frames.last().unwrap().end() as u64;
    assert_eq!(end.torn_at, Some(records_end));
    assert_eq!(end.torn_end, garbage_at as u64 + 10);
    file.write_all_at(&[0; 10], garbage_at as u64).unwrap();

    // A zeroed frame in the first window with valid frames after it: damage inside the
    // committed log (the watermark covers it), not a torn tail.
    let hole = newest_frames[10];
    file.write_all_at(&vec![0; hole.len], hole.offset as u64)
        .unwrap();
    match wallet::journal::scan(&journal, 1, |_| Ok(())) {
        Err(JournalError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, hole.offset as u64);
            assert!(reason.contains("zeroed frame"), "{reason}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_durable_watermark_that_cannot_be_written_stops_the_writer() {
    // Recovery tells a torn tail from damage by the durable-watermark file: a writer that went
    // on acknowledging while the file stayed behind would let a later start cut acknowledged
    // records as a torn tail. A failed write of it stops the writer like a failed sync.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 64 << 10, 0..50, 10);
    let durable = journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME);
    let r = recovered(data);
    fs::remove_file(&durable).unwrap();
    // Every write to /dev/full fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", &durable).unwrap();
    let config = JournalConfig {
        dir: journal_dir(data),
        segment_size_bytes: 64 << 10,
        sync: SyncMode::Batch,
    };
    let error = match JournalWriter::open(Box::new(MmapStorage::default()), config, &r.end) {
        Ok(_) => panic!("a writer that cannot publish its watermark opened"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("durable-watermark file"), "{error}");
    assert!(error.contains(durable.to_str().unwrap()), "{error}");
}

/// The durable watermark names the record that ends at its sequence by its frame crc: a
/// watermark file of another history is refused, by start-up and by replay, and so is one
/// that cannot be read (only a missing file means "no watermark": a disk or permission
/// error must not turn the checks it feeds off).
#[test]
fn a_durable_watermark_of_another_history_or_unreadable_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let ours = temp.path().join("ours");
    let theirs = temp.path().join("theirs");
    // Two histories: the same accounts, then other commands (theirs shorter).
    let (ledger, _) = fresh_journal(&ours, 64 << 10, 0..300, 10);
    let (mut writer, mut other, mut history) = fresh_writer(&theirs, 64 << 10, SyncMode::Batch);
    write_commands(&mut writer, &mut other, &mut history, 0..ACCOUNTS, 10);
    write_commands(&mut writer, &mut other, &mut history, 5_000..5_100, 10);
    drop(writer);
    let last_seq = ledger.next_seq() - 1;
    let their_seq = other.next_seq() - 1;
    assert!(their_seq < last_seq);
    let watermark =
        |data: &Path| journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME);
    assert!(recover(&ours, LedgerConfig::default(), false, |_, _| {}).is_ok());
    let report = wallet::tools::replay::run(&replay_args(&ours)).unwrap();
    assert!(report.ok, "{:?}", report.error);
    let (seq, _) = wallet::journal::read_durable_watermark(&journal_dir(&ours))
        .unwrap()
        .expect("a watermark");
    assert_eq!(seq, last_seq);

    // Their watermark next to our journal: a sequence our journal holds, another record.
    fs::copy(watermark(&theirs), watermark(&ours)).unwrap();
    match recover(&ours, LedgerConfig::default(), false, |_, _| {}) {
        Err(JournalError::Corrupt {
            file, seq, reason, ..
        }) => {
            assert_eq!((file, seq), (watermark(&ours), their_seq));
            assert!(reason.contains("another history"), "{reason}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("recovered under another history's watermark"),
    }
    let report = wallet::tools::replay::run(&replay_args(&ours)).unwrap();
    assert!(!report.ok);
    let error = report.error.unwrap();
    assert!(error.contains("another history"), "{error}");

    // Our last sequence (a record boundary of ours) with another record's crc.
    let (_, crc) = wallet::journal::read_durable_watermark(&journal_dir(&theirs))
        .unwrap()
        .expect("their watermark");
    fs::write(
        watermark(&ours),
        wallet::journal::format::encode_durable(last_seq, crc),
    )
    .unwrap();
    match recover(&ours, LedgerConfig::default(), false, |_, _| {}) {
        Err(JournalError::Corrupt { seq, reason, .. }) => {
            assert_eq!(seq, last_seq);
            assert!(
                reason.contains("the journal's record there has crc"),
                "{reason}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("recovered under a watermark naming another record"),
    }

    // A watermark that cannot be read (here: a directory in its place) is an error, not
    // "no watermark".
    fs::remove_file(watermark(&ours)).unwrap();
    assert!(recover(&ours, LedgerConfig::default(), false, |_, _| {}).is_ok());
    fs::create_dir(watermark(&ours)).unwrap();
    match recover(&ours, LedgerConfig::default(), false, |_, _| {}) {
        Err(e @ JournalError::Io { .. }) => {
            let JournalError::Io { file, .. } = &e else {
                unreachable!()
            };
            assert_eq!(*file, watermark(&ours));
            // Printed with its causes (as `serve` and `replay` print errors), the OS error
            // appears once: it was shown twice.
            let shown = format!("{:#}", anyhow::Error::from(e));
            assert_eq!(shown.matches("os error").count(), 1, "{shown}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("recovered without reading the watermark"),
    }
    let replayed = wallet::tools::replay::run(&replay_args(&ours));
    assert!(
        replayed.as_ref().is_err() || replayed.as_ref().is_ok_and(|r| !r.ok),
        "replay passed without reading the watermark"
    );
}

/// `wallet replay` without `--from-snapshot` audits the snapshot start-up would use: a journal
/// that does not reach it, a snapshot of another history, and a snapshot whose state is not
/// the journal's at its sequence are all reported (each passed before, although `serve`
/// refuses the first two and starts from the wrong state on the third).
#[test]
fn replay_from_the_start_audits_the_snapshot_start_up_would_use() {
    let temp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (temp.path().join("ours"), temp.path().join("theirs"));
    let ledger = history_ending_with_a_deposit_of(&ours, 700);
    let other = history_ending_with_a_deposit_of(&theirs, 701);
    assert_eq!(ledger.next_seq(), other.next_seq());
    let our_chain = recovered(&ours).end.last_crc;
    let their_chain = recovered(&theirs).end.last_crc;
    let last_seq = ledger.next_seq() - 1;
    let plain = |data: &Path| wallet::tools::replay::run(&replay_args(data)).unwrap();

    // Our own snapshot: audited and passed.
    let ours_snapshot = snapshot::write_snapshot(
        &snapshot_dir(&ours),
        &encode_snapshot(&ledger, Some(our_chain)),
    )
    .unwrap();
    let report = plain(&ours);
    assert!(report.ok, "{:?}", report.error);
    assert_eq!(report.snapshot_audited, Some(last_seq));

    // A newer snapshot that is damaged is skipped as a start, by start-up and by the audit,
    // which says so; named past the journal's end, it still says that the records before it
    // were durable, so both refuse the journal as short of them (they used to pass it).
    let damaged = snapshot_dir(&ours).join(snapshot::snapshot_file_name(last_seq + 5));
    fs::write(&damaged, b"not a snapshot").unwrap();
    let report = plain(&ours);
    assert!(!report.ok);
    let error = report.error.clone().unwrap();
    assert!(
        error.contains(&format!("covers records up to {}", last_seq + 4))
            && error.contains(&damaged.display().to_string()),
        "{error}"
    );
    let error = refusal(recover_in_thread(&ours));
    assert!(error.contains(&damaged.display().to_string()), "{error}");
    assert_eq!(
        report.snapshots_skipped.len(),
        1,
        "{:?}",
        report.snapshots_skipped
    );
    assert!(
        report.snapshots_skipped[0].contains(&damaged.display().to_string()),
        "{:?}",
        report.snapshots_skipped
    );
    fs::remove_file(&damaged).unwrap();

    // Their state under our chain value: the chain passes, the state does not.
    fs::remove_file(&ours_snapshot).unwrap();
    snapshot::write_snapshot(
        &snapshot_dir(&ours),
        &encode_snapshot(&other, Some(our_chain)),
    )
    .unwrap();
    let report = plain(&ours);
    assert!(!report.ok);
    assert_eq!(
        report.snapshot_audited, None,
        "a failed audit reported as passed"
    );
    let error = report.error.unwrap();
    assert!(
        error.contains("other than the journal's at sequence"),
        "{error}"
    );

    // Their state under their chain value: another history's snapshot.
    fs::remove_file(&ours_snapshot).unwrap();
    snapshot::write_snapshot(
        &snapshot_dir(&ours),
        &encode_snapshot(&other, Some(their_chain)),
    )
    .unwrap();
    let report = plain(&ours);
    assert!(!report.ok);
    assert_eq!(report.snapshot_audited, None);
    let error = report.error.unwrap();
    assert!(error.contains("does not belong to this journal"), "{error}");

    // A journal replaced by an older copy (its own watermark with it): the snapshot holds
    // records the journal no longer has.
    fs::remove_file(&ours_snapshot).unwrap();
    snapshot::write_snapshot(
        &snapshot_dir(&ours),
        &encode_snapshot(&ledger, Some(our_chain)),
    )
    .unwrap();
    let older = temp.path().join("older");
    let (mut writer, mut short, mut history) = fresh_writer(&older, 1 << 20, SyncMode::Batch);
    write_commands(&mut writer, &mut short, &mut history, 0..150, 10);
    drop(writer);
    fs::remove_dir_all(journal_dir(&ours)).unwrap();
    fs::rename(journal_dir(&older), journal_dir(&ours)).unwrap();
    assert!(refusal(recover_in_thread(&ours)).contains("missing or damaged"));
    let report = plain(&ours);
    assert!(!report.ok);
    let error = report.error.unwrap();
    assert!(
        error.contains("covers records up to")
            && error.contains(&ours_snapshot.display().to_string()),
        "{error}"
    );

    // The same snapshot damaged: skipped as a start, but its name still says which records
    // were durable, so both still refuse (a damaged newest snapshot used to turn the refusal
    // off: start-up served the older journal's balances, and the audit said OK).
    let mut bytes = fs::read(&ours_snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    fs::write(&ours_snapshot, &bytes).unwrap();
    assert!(snapshot::load_newest(&snapshot_dir(&ours), LedgerConfig::default(), None).is_none());
    let error = refusal(recover_in_thread(&ours));
    assert!(
        error.contains("missing or damaged")
            && error.contains(&ours_snapshot.display().to_string()),
        "{error}"
    );
    let report = plain(&ours);
    assert!(!report.ok);
    assert_eq!(
        report.snapshots_skipped.len(),
        1,
        "{:?}",
        report.snapshots_skipped
    );
    let error = report.error.unwrap();
    assert!(
        error.contains("covers records up to")
            && error.contains(&ours_snapshot.display().to_string()),
        "{error}"
    );
}

/// A snapshot without a chain value (older builds) whose sequence falls inside one of this
/// journal's records (another history's: one event where this journal has a transfer's two) is
/// refused by start-up and reported by `wallet replay`, which passed it before (it compared
/// states only at record boundaries, and never met this one). The journal goes on past that
/// record: start-up names the snapshot, not "the journal does not replay" at the record after
/// it (the snapshot's own message came only when the journal ended right there).
#[test]
fn a_snapshot_that_ends_inside_a_record_is_refused_by_start_up_and_replay() {
    let temp = tempfile::tempdir().unwrap();
    let ours = temp.path().join("ours");
    let (mut writer, mut ledger, _) = fresh_writer(&ours, 1 << 20, SyncMode::Batch);
    let usd = Currency::new("USD").unwrap();
    let command = |id: u128, kind: CommandKind| Command {
        transaction_id: TransactionId(id),
        timestamp_ns: id as u64,
        kind,
    };
    let deposit = |id: u128, amount: u64| {
        command(
            id,
            CommandKind::Deposit {
                account: account(0),
                amount,
                currency: usd,
            },
        )
    };
    let mut theirs = Ledger::new(LedgerConfig::default());
    for c in [
        command(
            1,
            CommandKind::OpenAccount {
                account: account(0),
            },
        ),
        command(
            2,
            CommandKind::OpenAccount {
                account: account(1),
            },
        ),
        deposit(3, 500),
    ] {
        writer.append(&ledger.execute(&c)).unwrap();
        theirs.execute(&c);
    }
    let transfer = ledger.execute(&command(
        4,
        CommandKind::Transfer {
            from: account(0),
            to: account(1),
            amount: 100,
            currency: usd,
        },
    ));
    assert_eq!(transfer.event_count, 2);
    writer.append(&transfer).unwrap();
    writer.append(&ledger.execute(&deposit(6, 7))).unwrap();
    writer.commit().unwrap();
    drop(writer);
    theirs.execute(&deposit(5, 1));
    assert_eq!(theirs.next_seq(), transfer.first_seq + 1);
    snapshot::write_snapshot(&snapshot_dir(&ours), &encode_snapshot(&theirs, None)).unwrap();

    let refused = refusal(recover_in_thread(&ours));
    assert!(
        refused.contains("the snapshot does not belong to this journal")
            && refused.contains("names no checksum")
            && refused.contains(&format!(
                "sequence {} falls inside a record",
                theirs.next_seq()
            )),
        "{refused}"
    );
    let report = wallet::tools::replay::run(&replay_args(&ours)).unwrap();
    assert!(!report.ok, "replay passed a snapshot start-up refuses");
    assert_eq!(report.snapshot_audited, None);
    let error = report.error.unwrap();
    assert!(error.contains("inside a record of this journal"), "{error}");
}

/// `--sync interval=<ms>`: a batch that wrote nothing (replays only) has nothing to sync and
/// does not wait out the interval (it slept a whole interval before), while a batch that wrote
/// something is made durable; intervals past the limit are refused by name.
#[test]
fn an_interval_sync_waits_only_when_there_is_something_to_sync() {
    let temp = tempfile::tempdir().unwrap();
    let interval = Duration::from_secs(2);
    let (mut writer, mut ledger, mut history) =
        fresh_writer(temp.path(), 1 << 20, SyncMode::Interval(interval));
    // One commit of ten records: it waits out the interval since the writer opened.
    write_commands(&mut writer, &mut ledger, &mut history, 0..10, 10);
    assert_eq!(writer.durable_seq(), ledger.next_seq() - 1);
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(writer.commit().unwrap(), ledger.next_seq() - 1);
        assert!(
            started.elapsed() < interval / 2,
            "an empty commit waited {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        "interval=1000".parse::<SyncMode>(),
        Ok(SyncMode::Interval(Duration::from_secs(1)))
    );
    let refused = "interval=1001".parse::<SyncMode>().unwrap_err();
    assert!(refused.contains("longer than 1000 ms"), "{refused}");
}

/// A page cache in memory in front of the segment files: a write reaches a file only through a
/// sync that covers it (`sync_range` for its range, `sync_file` for a whole segment), so the
/// files hold exactly what was made durable, and dropping the cache is a power loss. (A
/// `kill -9` keeps the real page cache, so the crash tests cannot see a sync that misses
/// bytes.) Headers of new segments are durable at creation, as `create_segment` promises.
#[derive(Clone, Default)]
struct PowerLossStorage {
    cache: Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Vec<u8>>>>,
}

struct CachedSegment {
    path: PathBuf,
    file: File,
    size: u64,
    cache: Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Vec<u8>>>>,
}

impl wallet::journal::storage::SegmentFile for CachedSegment {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let mut cache = self.cache.lock().unwrap();
        let page = cache.get_mut(&self.path).expect("cached");
        page[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn sync_range(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let cache = self.cache.lock().unwrap();
        let page = &cache[&self.path];
        self.file
            .write_all_at(&page[offset as usize..(offset + len) as usize], offset)
    }

    fn redirty(&mut self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

impl Storage for PowerLossStorage {
    fn create_segment(
        &mut self,
        path: &Path,
        size: u64,
        header: &[u8],
    ) -> std::io::Result<Box<dyn wallet::journal::storage::SegmentFile>> {
        let unfinished = path.with_extension("tmp");
        let file = File::create(&unfinished)?;
        file.set_len(size)?;
        file.write_all_at(header, 0)?;
        fs::rename(&unfinished, path)?;
        let mut page = vec![0u8; size as usize];
        page[..header.len()].copy_from_slice(header);
        self.cache.lock().unwrap().insert(path.to_path_buf(), page);
        self.open_segment(path)
    }

    fn open_segment(
        &mut self,
        path: &Path,
    ) -> std::io::Result<Box<dyn wallet::journal::storage::SegmentFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let mut cache = self.cache.lock().unwrap();
        if !cache.contains_key(path) {
            cache.insert(path.to_path_buf(), fs::read(path)?);
        }
        Ok(Box::new(CachedSegment {
            path: path.to_path_buf(),
            file,
            size,
            cache: self.cache.clone(),
        }))
    }

    fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
        if let Some(page) = self.cache.lock().unwrap().get(path) {
            OpenOptions::new()
                .write(true)
                .open(path)?
                .write_all_at(page, 0)?;
        }
        Ok(())
    }
}

impl PowerLossStorage {
    /// Everything written and not synced is gone.
    fn lose_power(&self) {
        self.cache.lock().unwrap().clear();
    }
}

/// After a power loss, every record a commit reported durable is recovered, and what is
/// recovered is a prefix of the history: across segment rolls (segments of 8 KiB, a roll every
/// few dozen records), batches that span several segments, a batch larger than the 1 MiB the
/// writer buffers (written part-way through the batch), and a writer reopened after each
/// recovery. A sync that missed a byte of a committed record fails this: recovery stops short
/// of the durable watermark, or replays a different state.
#[test]
fn after_a_power_loss_every_record_reported_durable_is_recovered() {
    let temp = tempfile::tempdir().unwrap();
    for (case, segment_size, commit_every) in [
        (0, 8u64 << 10, &[1u64, 3, 40, 7, 150][..]),
        (1, 4 << 20, &[20_000, 5, 11_000][..]),
    ] {
        let data = temp.path().join(format!("case-{case}"));
        let storage = PowerLossStorage::default();
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut history = History::new(&ledger);
        let mut end = JournalEnd::empty();
        let mut next = 0u64;
        for round in 0..3 {
            let mut writer = open_writer(
                &data,
                Box::new(storage.clone()),
                segment_size,
                SyncMode::Batch,
                &end,
            );
            let mut durable = ledger.next_seq() - 1;
            for &batch in commit_every {
                for _ in 0..batch {
                    let record = ledger.execute(&command(next));
                    next += 1;
                    writer.append(&record).unwrap();
                    history.push(&ledger);
                }
                durable = writer.commit().unwrap();
                assert_eq!(durable, ledger.next_seq() - 1);
            }
            // Appended and never committed: may or may not survive.
            for _ in 0..25 {
                let record = ledger.execute(&command(next));
                next += 1;
                writer.append(&record).unwrap();
                history.push(&ledger);
            }
            drop(writer);
            storage.lose_power();

            let recovered = recover_plain(&data)
                .unwrap_or_else(|e| panic!("case {case} round {round}: recovery failed: {e}"));
            let seq = recovered.ledger.next_seq() - 1;
            assert!(
                seq >= durable,
                "case {case} round {round}: recovered up to {seq}, but {durable} was reported durable"
            );
            let n = history
                .last_seq
                .iter()
                .position(|&s| s == seq)
                .unwrap_or_else(|| panic!("case {case} round {round}: {seq} ends no record"));
            assert_eq!(
                recovered.ledger.state_hash(),
                history.hashes[n],
                "case {case} round {round}: the state at {seq}"
            );
            // Go on from what survived, as a restarted server does.
            history.hashes.truncate(n + 1);
            history.last_seq.truncate(n + 1);
            ledger = recovered.ledger;
            end = recovered.end;
        }
    }
}

#[test]
fn the_durable_watermark_file_is_made_durable_every_second_while_records_come() {
    // Recovery cuts damage past `journal/durable`'s value as a torn tail. Rewritten without a
    // sync, the file on disk lagged the acknowledgements by the kernel's writeback delay (30 s
    // by default), and damage among records acknowledged in those seconds was cut after a
    // power loss instead of refused. The writer now syncs it at most every
    // `WATERMARK_SYNC_EVERY` at a commit; under `--sync none` never after its open (the records
    // it names may not be on the disk).
    for sync in [SyncMode::Batch, SyncMode::None] {
        let temp = tempfile::tempdir().unwrap();
        let data = temp.path();
        let durable = journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME);
        let (storage, faults) = faulty(u64::MAX);
        let mut writer = open_writer(data, Box::new(storage), 1 << 20, sync, &JournalEnd::empty());
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut history = History::new(&ledger);
        let synced = || {
            faults
                .synced_files
                .lock()
                .unwrap()
                .iter()
                .filter(|p| **p == durable)
                .count()
        };
        assert_eq!(synced(), 1, "{sync:?}: opening syncs it once");
        // Six commits, well within the second (on a machine that stalls past it, one more).
        write_commands(&mut writer, &mut ledger, &mut history, 0..50, 10);
        let before = synced();
        assert!(before <= 2, "{sync:?}: not at every commit ({before})");
        std::thread::sleep(wallet::journal::WATERMARK_SYNC_EVERY + Duration::from_millis(50));
        write_commands(&mut writer, &mut ledger, &mut history, 50..60, 10);
        let expected = if sync == SyncMode::None {
            1
        } else {
            before + 1
        };
        assert_eq!(synced(), expected, "{sync:?}: the first commit a second on");
        // What was synced is what the file holds: the last durable record.
        let bytes = fs::read(&durable).unwrap();
        assert_eq!(
            wallet::journal::format::decode_durable(&bytes).map(|(seq, _)| seq),
            Ok(writer.durable_seq()),
            "{sync:?}"
        );
    }
    // Through the engine, which syncs it after a batch's answers are out.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let durable = journal_dir(data).join(wallet::journal::format::DURABLE_FILE_NAME);
    let (storage, faults) = faulty(u64::MAX);
    let writer = open_writer(
        data,
        Box::new(storage),
        1 << 20,
        SyncMode::Batch,
        &JournalEnd::empty(),
    );
    let (engine, receiver) = start_journaled(writer);
    let mut submitter = engine.submitter();
    for i in 0..2u64 {
        if i == 1 {
            std::thread::sleep(wallet::journal::WATERMARK_SYNC_EVERY + Duration::from_millis(50));
        }
        submitter.try_submit(command(i), i, 0).unwrap();
        let (_, _, was_durable) = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("an outcome within 10 s");
        assert!(was_durable);
    }
    drop(submitter);
    engine.shutdown().expect("a clean stop");
    let synced = faults
        .synced_files
        .lock()
        .unwrap()
        .iter()
        .filter(|p| **p == durable)
        .count();
    assert!(
        synced >= 2,
        "at open, then after an answer a second on: {synced}"
    );
}

#[test]
fn a_newest_segment_cut_short_before_its_first_record_is_written_on_after_a_restart() {
    // A newest segment whose only records were cut (a copy or restore that stopped short, or a
    // truncation by hand) holds its header and less than one frame. The writer judged it full
    // by its size and rolled over to a new segment of the same name, which is never created
    // over an existing one: the engine halted at its first write, at every start.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let journal = journal_dir(data);
    let (mut writer, mut ledger, mut history) = fresh_writer(data, 4096, SyncMode::Batch);
    write_commands(&mut writer, &mut ledger, &mut history, 0..200, 10);
    drop(writer);
    let segments = list_segments(&journal).unwrap();
    assert!(segments.len() >= 3, "{} segments", segments.len());
    let (newest_first, newest) = segments.last().unwrap().clone();
    assert!(newest_first > 1);
    OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(SEGMENT_HEADER_BYTES as u64 + 36)
        .unwrap();
    // The records cut were synced: the watermark names the last one left, as after a restore
    // of a copy that holds them.
    set_durable_watermark(data, newest_first - 1);
    let r = recovered(data);
    assert_eq!(r.end.next_seq, newest_first);
    let mut ledger = r.ledger;
    let mut history = History::new(&ledger);
    let mut writer = open_writer(
        data,
        Box::new(MmapStorage::default()),
        4096,
        SyncMode::Batch,
        &r.end,
    );
    // Commands from 1000 on: ids the cut records did not use.
    write_commands(&mut writer, &mut ledger, &mut history, 1000..1100, 10);
    assert!(writer.durable_seq() > newest_first);
    drop(writer);
    assert_eq!(
        fs::metadata(&newest).unwrap().len(),
        4096,
        "allocated in full"
    );
    let again = recovered(data);
    assert_eq!(again.end.torn_at, None);
    assert_eq!(again.ledger.state_hash(), ledger.state_hash());
}

#[test]
fn a_file_named_like_a_segment_but_not_one_is_refused() {
    // A segment renamed (`1.wal`, an upper-case suffix) was passed over in silence: a journal
    // of only such a file replayed as an empty, "verified" one.
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 4096, 0..50, 10);
    for name in ["1.wal", "00000000000000000001.WAL"] {
        let odd = journal_dir(data).join(name);
        fs::write(&odd, b"").unwrap();
        let error = recover_plain(data)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("named like a segment"), "{name}: {error}");
        let replayed = match wallet::tools::replay::run(&replay_args(data)) {
            Ok(report) => report.error.unwrap_or_default(),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            replayed.contains("named like a segment"),
            "{name}: {replayed}"
        );
        fs::remove_file(&odd).unwrap();
    }
    assert!(recover_plain(data).is_ok());
}

/// A tail skipping to its start keeps (`note_passed_every(E)`) the first record boundary at or
/// after each multiple of E: the same positions whatever it started or resumed from, so the
/// event stream's index of them holds one per multiple. Measured from where each read began,
/// every read resumed off that grid added a position of its own to an index never pruned.
#[test]
fn a_tail_keeps_the_positions_it_skips_on_a_fixed_grid() {
    use wallet::journal::tail::{JournalTail, TailPosition};
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    fresh_journal(data, 64 << 20, 0..6_000, 10);
    let journal = journal_dir(data);
    // Skips to `start` (from the segment's start, or resumed at `from`) and reads one record:
    // the positions kept, and where the tail stands after the record.
    let skip_to = |start: u64, from: Option<TailPosition>| {
        let mut tail = JournalTail::new(&journal);
        tail.note_passed_every(500);
        match from {
            Some(position) => tail.resume_at(position, start),
            None => tail.start_at(start),
        }
        .expect("start");
        let mut records = Vec::new();
        tail.fetch_records(1, &mut records).expect("fetch");
        let record = records.first().expect("a record");
        assert!((start..start + 2).contains(&record.first_seq), "{record:?}");
        (tail.take_passed(), tail.position().expect("a position"))
    };
    let (grid, _) = skip_to(4_001, None);
    let multiples: Vec<u64> = grid.iter().map(|p| p.next_seq / 500).collect();
    assert_eq!(multiples, (1..=8).collect::<Vec<u64>>(), "{grid:?}");
    // Off the grid: where a read of sequence 1,234 ended.
    let (_, off_grid) = skip_to(1_234, None);
    assert!(off_grid.next_seq % 500 != 0);
    for start in [4_001, 3_001, 4_002] {
        let (kept, _) = skip_to(start, Some(off_grid));
        assert!(!kept.is_empty());
        assert!(
            kept.iter().all(|p| grid.contains(p)),
            "resumed at {} to {start}: {kept:?} is off the grid {grid:?}",
            off_grid.next_seq
        );
    }
}
