//! Start-up: load the newest valid snapshot, then replay the journal after it, verifying every
//! frame, the chain and every checkpoint hash.

use std::path::Path;

use crate::core::{CommandRecord, EventKind, Ledger, LedgerConfig};
use crate::journal::{
    JournalEnd, JournalError, journal_dir, scan_pipelined, snapshot, snapshot_dir,
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

/// Applies records a few behind the reader, prefetching the memory each will touch, so that
/// replay's random accesses overlap. Results are exactly those of applying in order.
pub struct Lookahead {
    pending: std::collections::VecDeque<CommandRecord>,
    /// The sequence of the record whose processing failed (errors surface a few records late).
    pub failed_seq: Option<u64>,
}

const LOOKAHEAD: usize = 8;

impl Default for Lookahead {
    fn default() -> Self {
        Lookahead {
            pending: std::collections::VecDeque::with_capacity(LOOKAHEAD + 1),
            failed_seq: None,
        }
    }
}

impl Lookahead {
    /// Queues `record`; processes the oldest queued one once enough are queued.
    pub fn push(
        &mut self,
        ledger: &mut Ledger,
        record: &CommandRecord,
        mut process: impl FnMut(&mut Ledger, &CommandRecord) -> Result<(), String>,
    ) -> Result<(), String> {
        ledger.prefetch_record(record);
        self.pending.push_back(*record);
        if self.pending.len() > LOOKAHEAD
            && let Some(oldest) = self.pending.pop_front()
        {
            process(ledger, &oldest).inspect_err(|_| self.failed_seq = Some(oldest.first_seq))?;
        }
        Ok(())
    }

    /// Processes everything still queued.
    pub fn finish(
        &mut self,
        ledger: &mut Ledger,
        mut process: impl FnMut(&mut Ledger, &CommandRecord) -> Result<(), String>,
    ) -> Result<(), String> {
        while let Some(record) = self.pending.pop_front() {
            process(ledger, &record).inspect_err(|_| self.failed_seq = Some(record.first_seq))?;
        }
        Ok(())
    }
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
    let mut at_most = None;
    loop {
        let start = if use_snapshot {
            snapshot::load_newest(&snapshot_dir(data_dir), config, at_most)
        } else {
            None
        };
        let snapshot_next_seq = start.as_ref().map(|l| l.next_seq());
        let mut ledger = start.unwrap_or_else(|| Ledger::new(config));
        on_start(&ledger);
        let mut records_replayed = 0;
        let mut checkpoints_verified = 0;
        let mut lookahead = Lookahead::default();
        let mut process = |ledger: &mut Ledger, record: &CommandRecord| {
            if apply_verified(ledger, record)? {
                checkpoints_verified += 1;
            }
            records_replayed += 1;
            observe(ledger, record);
            Ok(())
        };
        let scanned = scan_pipelined(&journal, ledger.next_seq(), |record| {
            lookahead.push(&mut ledger, record, &mut process)
        });
        // Records read before a failure are still applied: they are valid and durable.
        let finished = lookahead.finish(&mut ledger, &mut process);
        let end = scanned?;
        finished.map_err(|reason| JournalError::Visitor {
            seq: ledger.next_seq(),
            reason,
        })?;
        if let Some(seq) = snapshot_next_seq
            && end.next_seq < seq
        {
            // The snapshot is ahead of the journal (it should never be written so): distrust it.
            tracing::warn!(
                snapshot_seq = seq,
                journal_next_seq = end.next_seq,
                "snapshot ahead of the journal; ignoring it"
            );
            at_most = Some(seq - 1);
            continue;
        }
        return Ok(Recovered {
            ledger,
            end,
            snapshot_next_seq,
            records_replayed,
            checkpoints_verified,
        });
    }
}
