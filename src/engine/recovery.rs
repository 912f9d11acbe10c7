//! Start-up: load the newest valid snapshot, then replay the journal after it, verifying every
//! frame, the chain and every checkpoint hash.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::core::ledger::REMEMBERED_ID_BYTES;
use crate::core::{CommandRecord, EventKind, Ledger, LedgerConfig};
use crate::journal::reader::ChainAt;
use crate::journal::{
    JournalEnd, JournalError, estimate_records, journal_dir, scan_pipelined_batches, snapshot,
    snapshot_dir,
};

pub struct Recovered {
    pub ledger: Ledger,
    pub end: JournalEnd,
    /// Sequence the snapshot (if one was used) was taken at.
    pub snapshot_next_seq: Option<u64>,
    pub records_replayed: u64,
    pub checkpoints_verified: u64,
}

/// Applies one record to `ledger`, first checking that it fits (and, for a checkpoint, that the
/// hash matches). Used by start-up, `wallet replay` and every journal tailer.
pub fn apply_verified(ledger: &mut Ledger, record: &CommandRecord) -> Result<bool, String> {
    ledger.verify_record(record)?;
    let mut checkpoint = false;
    if let Some(event) = record.events().first()
        && event.kind == EventKind::Checkpoint
    {
        let hash = ledger.state_hash();
        if hash != event.amount {
            return Err(format!(
                "checkpoint at sequence {} says state hash {:#018x}, replay computed {hash:#018x}",
                record.first_seq, event.amount
            ));
        }
        checkpoint = true;
    }
    ledger.apply(record);
    Ok(checkpoint)
}

/// How many records ahead of the one being applied `replay_journal` prefetches.
const PREFETCH_AHEAD: usize = 8;

/// How far (in remembered ids) `replay_journal`'s helper populates id blocks ahead of the ids
/// remembered so far: two blocks' worth, so that it is never the one the replay waits for and
/// never holds much memory that an over-estimated reservation will not use.
const POPULATE_AHEAD_IDS: usize = 1 << 17;

/// Replays the journal in `journal` into `ledger`, from the ledger's next sequence on: each
/// record that `admit` accepts is applied with `apply_verified` (in order, prefetched
/// `PREFETCH_AHEAD` records ahead), then shown to `observe` with whether it was a verified
/// checkpoint. A record `admit` refuses is skipped (`wallet replay --to-seq` refuses
/// everything after its point). The first record that does not verify stops the replay, named
/// by its sequence; records before a corruption are still applied (the reader hands them over
/// before it reports).
///
/// Meanwhile a helper thread has the kernel populate the memory the ledger reserved for the
/// ids it will remember: its id table, then its id blocks, staying at most
/// `POPULATE_AHEAD_IDS` ids ahead of the ids remembered so far. On this VM the first touch of
/// fresh memory (the kernel zeroing it) was about a tenth of a replay's time on the replaying
/// thread; the helper takes it to the other core.
pub fn replay_journal(
    ledger: &mut Ledger,
    journal: &Path,
    mut admit: impl FnMut(&CommandRecord) -> bool,
    mut observe: impl FnMut(&Ledger, &CommandRecord, bool),
) -> Result<JournalEnd, JournalError> {
    let table = ledger.id_table_memory();
    let mut ranges = vec![table];
    ranges.extend(ledger.reserved_id_memory());
    let ids_at_start = ledger.transaction_id_count();
    let remembered = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let from_seq = ledger.next_seq();
    std::thread::scope(|scope| {
        // Declared before the helper is spawned, so dropped (on any exit, a panic included)
        // before the scope joins it.
        let _stop_on_exit = crate::alloc::SetOnDrop(&stop);
        // SAFETY: the ranges are the ledger's id table and the spare capacity of its id
        // blocks, and the ledger outlives this scope. Only `apply_verified` below mutates the
        // ledger while the helper runs (`admit` and `observe` get no `&mut Ledger`), and it
        // remembers at most one id per record, pushing it into spare block capacity (blocks
        // with spare capacity never reallocate: only a full cloned block does, and full blocks
        // are not in `reserved_id_memory`) or into a new block beside the others. The table
        // moves only when it grows: before each batch this thread checks that one id per
        // record of the batch fits without growing (`ids_fit`), and otherwise stops and joins
        // the helper first; a panic stops it through `_stop_on_exit`.
        let mut helper = unsafe {
            crate::alloc::spawn_populate_ahead(
                scope,
                &ranges,
                table.1,
                REMEMBERED_ID_BYTES,
                POPULATE_AHEAD_IDS,
                &remembered,
                &stop,
            )
        };
        let scanned = scan_pipelined_batches(journal, from_seq, |batch| {
            if helper.is_some() && !ledger.ids_fit(batch.len()) {
                crate::alloc::stop_populating(&stop, &mut helper);
            }
            for record in batch.iter().take(PREFETCH_AHEAD) {
                ledger.prefetch_record(record);
            }
            for (i, record) in batch.iter().enumerate() {
                if let Some(ahead) = batch.get(i + PREFETCH_AHEAD) {
                    ledger.prefetch_record(ahead);
                }
                if !admit(record) {
                    continue;
                }
                let checkpoint =
                    apply_verified(ledger, record).map_err(|reason| (record.first_seq, reason))?;
                observe(ledger, record, checkpoint);
            }
            // Checked once a batch, release builds too: the SAFETY argument above rests on it.
            assert!(
                helper.is_none() || ledger.id_table_memory() == table,
                "the id table moved while its memory was being populated"
            );
            let ids = (ledger.transaction_id_count() - ids_at_start) as usize;
            remembered.store(ids, Ordering::Release);
            Ok(())
        });
        crate::alloc::stop_populating(&stop, &mut helper);
        scanned
    })
}

/// Refuses a journal that ends before its durable watermark (`durable`, read before the scan:
/// a writer still running can only move it forward): the records after the journal's end were
/// synced before the watermark file named them, so they may have been acknowledged, and a
/// damaged last record that reads as a torn tail is then corruption, not a crash's torn write.
/// Also refuses a watermark whose record is not this journal's: the file names the frame crc
/// of the record ending at its sequence, which must be the journal's record there (a
/// watermark file from another history would otherwise pass, and its sequence decide what is
/// cut as a torn tail).
pub fn check_durable_watermark(
    journal: &Path,
    durable: Option<(u64, u32)>,
    end: &JournalEnd,
) -> Result<(), JournalError> {
    let Some((durable, durable_crc)) = durable else {
        return Ok(());
    };
    if end.next_seq > durable {
        if durable == 0 {
            return Ok(());
        }
        let found = match crate::journal::reader::chain_at(journal, durable + 1)? {
            crate::journal::reader::ChainAt::Boundary(crc) if crc == durable_crc => return Ok(()),
            crate::journal::reader::ChainAt::Boundary(crc) => {
                format!("the journal's record there has crc {crc:#010x}")
            }
            _ => "no record of the journal ends there".to_string(),
        };
        let watermark = journal.join(crate::journal::format::DURABLE_FILE_NAME);
        return Err(JournalError::Corrupt {
            file: watermark.clone(),
            offset: 0,
            seq: durable,
            reason: format!(
                "the durable watermark names the record ending at sequence {durable} with frame \
                 crc {durable_crc:#010x}, but {found}: the file (or the journal) comes from \
                 another history. Restore the journal and its watermark together; if the \
                 journal is the right one, remove {}",
                watermark.display()
            ),
        });
    }
    let watermark = journal.join(crate::journal::format::DURABLE_FILE_NAME);
    let (file, offset) = match &end.segment {
        Some((path, valid_end)) => (path.clone(), end.torn_at.unwrap_or(*valid_end)),
        None => (journal.to_path_buf(), 0),
    };
    Err(JournalError::Corrupt {
        file,
        offset,
        seq: end.next_seq,
        reason: format!(
            "the journal ends at sequence {} but its durable watermark says {durable} was synced \
             (and may have been acknowledged): records {}..={durable} are missing or damaged. \
             Restore the journal from a copy. If it was written with --sync none and the \
             machine lost power, this loss is what that mode allows: remove {} (and move out \
             any snapshot after the journal's end) to start from the journal as it is",
            end.next_seq - 1,
            end.next_seq,
            watermark.display()
        ),
    })
}

/// Rebuilds the ledger from `data_dir`. With `use_snapshot`, starts from the newest valid
/// snapshot that the journal covers.
pub fn recover(
    data_dir: &Path,
    config: LedgerConfig,
    use_snapshot: bool,
    observe: impl FnMut(&Ledger, &CommandRecord),
) -> Result<Recovered, JournalError> {
    recover_with(data_dir, config, use_snapshot, |_| {}, observe)
}

/// Like `recover`, and calls `on_start` with the starting state (the snapshot, or an empty
/// ledger) before the first record is replayed, so that views can be built alongside.
pub fn recover_with(
    data_dir: &Path,
    config: LedgerConfig,
    use_snapshot: bool,
    mut on_start: impl FnMut(&Ledger),
    mut observe: impl FnMut(&Ledger, &CommandRecord),
) -> Result<Recovered, JournalError> {
    let journal = journal_dir(data_dir);
    let loaded = if use_snapshot {
        snapshot::load_newest_snapshot(&snapshot_dir(data_dir), config, None)
    } else {
        None
    };
    let (start, snapshot_chain) = match loaded {
        Some(l) => (Some(l.ledger), Some((l.chain, l.path))),
        None => (None, None),
    };
    let snapshot_next_seq = start.as_ref().map(|l| l.next_seq());
    // The segments the replay does not open (those before the snapshot's) are checked by
    // their headers: the history starts at sequence 1 and every file named like a segment is
    // one. A gap between them is found by the read views' rebuild, which reads them all.
    crate::journal::reader::check_segment_headers(&journal, snapshot_next_seq.unwrap_or(1))?;
    // A snapshot names the journal's chain value at its sequence: checked before any record is
    // applied to it, so that a snapshot of another history is refused as such (applying this
    // journal's records to it would fail, or worse pass, and blame the journal).
    // One from an older build names no chain value: it is still refused when it falls inside
    // one of this journal's records, as its own error rather than the replay's.
    if let (Some((chain, path)), Some(seq)) = (&snapshot_chain, snapshot_next_seq) {
        check_snapshot_chain(&journal, path, seq, *chain)?;
    }
    let mut ledger =
        start.unwrap_or_else(|| Ledger::with_capacity(config, 0, estimate_records(&journal, 1)));
    on_start(&ledger);
    let mut records_replayed = 0;
    let mut checkpoints_verified = 0;
    let durable = crate::journal::read_durable_watermark(&journal)?;
    let end = replay_journal(
        &mut ledger,
        &journal,
        |_| true,
        |ledger, record, checkpoint| {
            checkpoints_verified += u64::from(checkpoint);
            records_replayed += 1;
            observe(ledger, record);
        },
    )?;
    check_durable_watermark(&journal, durable, &end)?;
    check_snapshots_covered(data_dir, &end)?;
    if ledger.next_seq() != end.next_seq {
        // Only a snapshot that names no chain value (from an older build) and is not at one of
        // this journal's record boundaries gets here: writing on would break the sequence.
        let (file, offset) = end.segment.clone().unwrap_or_else(|| (journal.clone(), 0));
        return Err(JournalError::Corrupt {
            file,
            offset,
            seq: end.next_seq,
            reason: format!(
                "the journal continues at sequence {} but the snapshot's state ends before \
                 sequence {}: the snapshot was not taken at a record boundary of this journal \
                 (another history's?). Move it out of the snapshot directory",
                end.next_seq,
                ledger.next_seq()
            ),
        });
    }
    Ok(Recovered {
        ledger,
        end,
        snapshot_next_seq,
        records_replayed,
        checkpoints_verified,
    })
}

/// Refuses a snapshot whose chain value is not the journal's at its sequence, or that falls
/// inside one of the journal's records. A journal that ends before it is left to the
/// snapshot-ahead check, which says more.
pub fn check_snapshot_chain(
    journal: &Path,
    snapshot: &Path,
    seq: u64,
    chain: Option<u32>,
) -> Result<(), JournalError> {
    let refuse = |found: String| JournalError::Corrupt {
        file: snapshot.to_path_buf(),
        offset: 0,
        seq,
        reason: format!(
            "the snapshot does not belong to this journal: it follows {}, and in the journal \
             {found}. Move it out of the snapshot directory to start from an older snapshot or \
             the journal alone",
            match chain {
                Some(chain) => format!("a record with checksum {chain:#010x}"),
                None => "a record boundary (it names no checksum: an older build's)".to_string(),
            }
        ),
    };
    match crate::journal::reader::chain_at(journal, seq)? {
        ChainAt::Boundary(found) if chain.is_some_and(|chain| found != chain) => Err(refuse(
            format!("the record before sequence {seq} has checksum {found:#010x}"),
        )),
        ChainAt::InsideRecord => Err(refuse(format!("sequence {seq} falls inside a record"))),
        _ => Ok(()),
    }
}

/// Refuses a journal that ends before the newest snapshot file's sequence, by the file's name:
/// the one start-up loads, and also one it skipped as damaged or unreadable (or did not load,
/// with snapshots off). A snapshot file is published only once the records it covers were
/// durable, so its name alone says they may have been acknowledged; a damaged newest snapshot
/// used to turn this refusal off, and a journal restored from an older copy then started,
/// short of acknowledged records, with a warning only.
pub fn check_snapshots_covered(data_dir: &Path, end: &JournalEnd) -> Result<(), JournalError> {
    match snapshot::list_snapshots(&snapshot_dir(data_dir)).first() {
        Some(&(seq, _)) if end.next_seq < seq => Err(snapshot_ahead(data_dir, seq, end)),
        _ => Ok(()),
    }
}

/// The refusal of a snapshot ahead of the journal's end. The follower snapshots only durable
/// records and `wallet snapshot` syncs the journal first, so the records the snapshot covers
/// past the journal's end were durable, and may have been acknowledged: a damaged or missing
/// journal (an unmounted volume, a restore from an older copy, damage cut as a torn tail
/// behind a stale watermark file), never a state to start from silently. The one loss that is
/// not damage is a power loss under `--sync none`, which the operator can accept by moving the
/// snapshot aside.
pub(crate) fn snapshot_ahead(data_dir: &Path, snapshot_seq: u64, end: &JournalEnd) -> JournalError {
    let journal = journal_dir(data_dir);
    let (file, offset) = match &end.segment {
        Some((path, valid_end)) => (path.clone(), end.torn_at.unwrap_or(*valid_end)),
        None => (journal, 0),
    };
    let snapshot = snapshot_dir(data_dir).join(snapshot::snapshot_file_name(snapshot_seq));
    JournalError::Corrupt {
        file,
        offset,
        seq: end.next_seq,
        reason: format!(
            "the journal ends at sequence {} but snapshot {} covers records up to {}, which \
             were durable when it was written (and may have been acknowledged): records \
             {}..={} are missing or damaged. Restore the journal from a copy. If it was written \
             with --sync none and the machine lost power, this loss is what that mode allows: \
             move every snapshot after sequence {} out of {} to start from the journal as it is",
            end.next_seq - 1,
            snapshot.display(),
            snapshot_seq - 1,
            end.next_seq,
            snapshot_seq - 1,
            end.next_seq,
            snapshot_dir(data_dir).display(),
        ),
    }
}
