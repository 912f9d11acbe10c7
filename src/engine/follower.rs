//! Stage 5, the snapshot follower: a second copy of the ledger that follows the durable journal
//! on its own thread, verifies every checkpoint record as it applies it, and writes a snapshot
//! every `snapshot_every` events.
//!
//! Why a follower and not the engine thread: encoding a snapshot reads the whole state (1.7 GB
//! for 50 million remembered ids), and the engine thread that did it stopped executing, and so
//! answering, for that long. The follower costs a second copy of the ledger's memory and the
//! CPU of `Ledger::apply` (the replay path, several times cheaper than `execute`), and never
//! blocks the engine: it reads the journal files, not a ring the engine waits on. Falling
//! behind only delays snapshots.
//!
//! A snapshot is the follower's state after a whole record that is durable (the tail yields
//! nothing beyond the durable watermark), so it is never ahead of the journal. The checkpoint
//! check is the one `wallet replay` makes, done continuously: a running engine proves that its
//! journal replays to the state it had, not only when someone audits it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::core::Ledger;
use crate::core::codec::encode_snapshot_into;
use crate::engine::EngineShared;
use crate::engine::recovery::apply_verified;
use crate::journal::snapshot::write_snapshot;
use crate::journal::tail::JournalTail;

/// Events read from the journal per fetch.
const FETCH_EVENTS: usize = 1 << 16;
/// How long an idle follower sleeps before looking at the journal again.
const IDLE: Duration = Duration::from_millis(5);
/// Records ahead of the one being applied whose memory is prefetched.
const PREFETCH_AHEAD: usize = 8;

pub(crate) struct Follower {
    pub ledger: Ledger,
    pub journal_dir: PathBuf,
    pub snapshot_dir: PathBuf,
    pub snapshot_every: u64,
    /// Snapshots kept in `snapshot_dir` after each one written (0: all).
    pub snapshot_keep: usize,
    pub shared: Arc<EngineShared>,
    /// Set by `Engine::shutdown`: finish the records at hand and return.
    pub stop: Arc<AtomicBool>,
}

impl Follower {
    pub(crate) fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("wallet-snapshot".into())
            .spawn(move || {
                let shared = self.shared.clone();
                let run = std::panic::AssertUnwindSafe(|| self.run());
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let reason = super::panic_text(panic.as_ref());
                    fail(&shared, format!("panicked: {reason}"));
                }
            })
            .expect("spawn the snapshot follower thread")
    }

    fn run(mut self) {
        lower_priority();
        let mut tail = JournalTail::new(&self.journal_dir);
        if let Err(e) = tail.start_at(self.ledger.next_seq()) {
            self.fail(format!("{e:#}"));
            return;
        }
        let mut next_snapshot = self.ledger.next_seq().saturating_add(self.snapshot_every);
        let mut records = Vec::new();
        let mut chains = Vec::new();
        // Reused by every snapshot (see `encode_snapshot_into`).
        let mut buffer = Vec::new();
        while !self.stop.load(Ordering::Acquire) && !self.shared.halted.load(Ordering::Relaxed) {
            records.clear();
            chains.clear();
            if let Err(e) = tail.fetch_records_with_chains(FETCH_EVENTS, &mut records, &mut chains)
            {
                self.fail(format!("reading the journal: {e:#}"));
                return;
            }
            if records.is_empty() {
                std::thread::sleep(IDLE);
                continue;
            }
            for (i, record) in records.iter().enumerate() {
                // The tail obeys `journal/durable`; the engine's own watermark is the authority
                // (the file may be missing, e.g. if the writer could not create it): a snapshot
                // must never hold a record that is not durable.
                while record.next_seq() - 1 > self.shared.durable_seq.load(Ordering::Acquire) {
                    // Where it is held (the metric, and tests, see it while it waits).
                    self.shared
                        .follower_seq
                        .store(self.ledger.next_seq() - 1, Ordering::Relaxed);
                    if self.stop.load(Ordering::Acquire)
                        || self.shared.halted.load(Ordering::Relaxed)
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if let Some(ahead) = records.get(i + PREFETCH_AHEAD) {
                    self.ledger.prefetch_record(ahead);
                }
                match apply_verified(&mut self.ledger, record) {
                    Ok(true) => {
                        self.shared
                            .follower_checkpoints
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(reason) => {
                        self.fail(format!(
                            "the journal does not replay at sequence {}: {reason}",
                            record.first_seq
                        ));
                        return;
                    }
                }
                if self.ledger.next_seq() >= next_snapshot {
                    // Asked to stop: no more snapshots (a fetch can hold many that fall due, and
                    // a shutdown must not wait for them; the next start replays from the last).
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    next_snapshot = self.ledger.next_seq().saturating_add(self.snapshot_every);
                    // The record's frame checksum names the journal this state came from.
                    self.snapshot(chains.get(i).copied(), &mut buffer);
                }
            }
            self.shared
                .follower_seq
                .store(self.ledger.next_seq() - 1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self, chain: Option<u32>, bytes: &mut Vec<u8>) {
        let started = std::time::Instant::now();
        encode_snapshot_into(&self.ledger, chain, bytes);
        match write_snapshot(&self.snapshot_dir, bytes) {
            Ok(path) => {
                self.shared
                    .snapshots_written
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    file = %path.display(),
                    bytes = bytes.len(),
                    seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                    "snapshot written"
                );
                if self.snapshot_keep > 0 {
                    let written = self.ledger.next_seq();
                    match crate::journal::snapshot::prune(
                        &self.snapshot_dir,
                        written,
                        self.snapshot_keep,
                    ) {
                        Ok(removed) if !removed.is_empty() => {
                            tracing::info!(
                                removed = removed.len(),
                                keep = self.snapshot_keep,
                                "older snapshots removed"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "removing older snapshots failed"),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "snapshot failed; the journal still has everything")
            }
        }
    }

    /// Stops following for good. The engine goes on (the journal is the record; snapshots only
    /// shorten start-up), but this is loud: a journal that does not replay to the live state is
    /// a bug or corruption that `wallet replay` will also report.
    fn fail(&self, reason: String) {
        fail(&self.shared, reason);
    }
}

fn fail(shared: &EngineShared, reason: String) {
    tracing::error!(%reason, "the snapshot follower stopped: no more snapshots until restart; audit with `wallet replay`");
    if let Ok(mut slot) = shared.follower_failure.lock() {
        slot.get_or_insert(reason);
    }
    shared.follower_failed.store(true, Ordering::SeqCst);
}

/// The follower is background work: on a 2-core machine it must not take CPU or disk time from
/// the engine, the journal's syncs and the request threads. Nice 10 for CPU; for I/O the lowest
/// best-effort level (not the idle class, which a busy journal could starve forever). Both are
/// hints: failing to set them changes nothing else.
pub(crate) fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_BEST_EFFORT_LOWEST: libc::c_long = (2 << 13) | 7;
    // SAFETY: plain syscalls about the calling thread itself (its id from gettid); no memory is
    // passed to the kernel.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            libc::c_long::from(tid),
            IOPRIO_BEST_EFFORT_LOWEST,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AccountId, Command, CommandKind, Currency, LedgerConfig, TransactionId};
    use crate::journal::storage::MmapStorage;
    use crate::journal::{JournalConfig, JournalEnd, JournalWriter, SyncMode, journal_dir};
    use std::path::Path;

    fn command(i: u64) -> Command {
        let account = |n: u64| AccountId::new(&format!("a{n}")).expect("id");
        let usd = Currency::new("USD").expect("usd");
        let kind = match i {
            0 | 1 => CommandKind::OpenAccount {
                account: account(i),
            },
            2 => CommandKind::Deposit {
                account: account(0),
                amount: 1_000_000,
                currency: usd,
            },
            _ => CommandKind::Transfer {
                from: account(i % 2),
                to: account((i + 1) % 2),
                amount: 1 + i % 7,
                currency: usd,
            },
        };
        Command {
            transaction_id: TransactionId(u128::from(i) + 1),
            timestamp_ns: i,
            kind,
        }
    }

    fn open_writer(temp: &Path, sync: SyncMode) -> (PathBuf, JournalWriter) {
        let dir = journal_dir(temp);
        let config = JournalConfig {
            dir: dir.clone(),
            segment_size_bytes: 1 << 20,
            sync,
        };
        let writer = JournalWriter::open(
            Box::new(MmapStorage::default()),
            config,
            &JournalEnd::empty(),
        )
        .expect("writer");
        (dir, writer)
    }

    /// Starts a follower from an empty ledger; returns its thread, its stop flag and its
    /// snapshot directory.
    fn start_follower(
        temp: &Path,
        journal_dir: PathBuf,
        snapshot_every: u64,
        shared: &Arc<EngineShared>,
    ) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>, PathBuf) {
        let stop = Arc::new(AtomicBool::new(false));
        let snapshots = temp.join("snapshots");
        let handle = Follower {
            ledger: Ledger::new(LedgerConfig::default()),
            journal_dir,
            snapshot_dir: snapshots.clone(),
            snapshot_every,
            snapshot_keep: 0,
            shared: shared.clone(),
            stop: stop.clone(),
        }
        .spawn();
        (handle, stop, snapshots)
    }

    /// Waits (up to 10 s) until the follower has applied `last_seq`, then stops it; it must not
    /// have failed.
    /// Waits until the follower has applied up to `seq`; fails after `within`.
    fn wait_for_follower(shared: &EngineShared, seq: u64, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while shared.follower_seq.load(Ordering::SeqCst) < seq {
            assert!(
                std::time::Instant::now() < deadline,
                "the follower did not reach sequence {seq}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish_following(
        shared: &EngineShared,
        last_seq: u64,
        handle: std::thread::JoinHandle<()>,
        stop: &AtomicBool,
    ) {
        wait_for_follower(shared, last_seq, Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        handle.join().expect("no panic");
        assert!(!shared.follower_failed.load(Ordering::SeqCst));
    }

    fn newest_snapshot(snapshots: &Path) -> u64 {
        crate::journal::snapshot::list_snapshots(snapshots)
            .first()
            .map(|(seq, _)| *seq)
            .unwrap_or(0)
    }

    /// A journal whose checkpoint at record 100 carries a wrong state hash (as a diverged engine
    /// or a corrupted-but-rechecksummed record would write): the follower must stop, say where
    /// and why, and write no snapshot past it.
    #[test]
    fn a_checkpoint_that_does_not_replay_stops_the_follower_with_its_sequence() {
        for tamper in [false, true] {
            let temp = tempfile::tempdir().expect("tempdir");
            let (dir, mut writer) = open_writer(temp.path(), SyncMode::Batch);
            let mut ledger = Ledger::new(LedgerConfig::default());
            let mut bad_seq = 0;
            for i in 0..300u64 {
                writer.append(&ledger.execute(&command(i))).expect("append");
                if i % 50 == 49 {
                    let mut record = ledger.checkpoint(i);
                    if tamper && i == 99 {
                        record.events[0].amount ^= 1;
                        bad_seq = record.first_seq;
                    }
                    writer.append(&record).expect("append");
                }
            }
            writer.commit().expect("commit");
            let shared = Arc::new(EngineShared::default());
            // What the engine's journal stage would have published.
            shared
                .durable_seq
                .store(ledger.next_seq() - 1, Ordering::SeqCst);
            let (handle, stop, snapshots) = start_follower(temp.path(), dir, 40, &shared);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while shared.follower_seq.load(Ordering::SeqCst) < ledger.next_seq() - 1
                && !shared.follower_failed.load(Ordering::SeqCst)
            {
                assert!(std::time::Instant::now() < deadline, "the follower hung");
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::SeqCst);
            handle.join().expect("the follower thread does not panic");
            let failure = shared.follower_failure.lock().expect("lock").clone();
            let newest = newest_snapshot(&snapshots);
            if tamper {
                let reason = failure.expect("the follower reports the divergence");
                assert!(
                    reason.contains(&format!("checkpoint at sequence {bad_seq} ")),
                    "{reason}"
                );
                assert!(newest <= bad_seq, "a snapshot after the bad checkpoint");
                assert_eq!(shared.follower_checkpoints.load(Ordering::SeqCst), 1);
            } else {
                assert_eq!(failure, None);
                assert_eq!(shared.follower_checkpoints.load(Ordering::SeqCst), 6);
                assert!(newest > 0, "snapshots were written");
            }
        }
    }

    /// The engine's durable watermark bounds the follower even when the tail would read further
    /// (here: no `journal/durable` limit matters, the watermark is held back by hand).
    #[test]
    fn the_follower_never_applies_or_snapshots_past_the_engines_durable_watermark() {
        let temp = tempfile::tempdir().expect("tempdir");
        let (dir, mut writer) = open_writer(temp.path(), SyncMode::None);
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut held_at = 0;
        for i in 0..300u64 {
            writer.append(&ledger.execute(&command(i))).expect("append");
            if i == 99 {
                held_at = ledger.next_seq() - 1;
            }
        }
        writer.commit().expect("commit");
        let shared = Arc::new(EngineShared::default());
        shared.durable_seq.store(held_at, Ordering::SeqCst);
        let (handle, stop, snapshots) = start_follower(temp.path(), dir, 10, &shared);
        // Once it has reached the watermark, give it time to (wrongly) go past it.
        wait_for_follower(&shared, held_at, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(200));
        let newest = || newest_snapshot(&snapshots);
        assert!(newest() > 0, "snapshots up to the watermark are written");
        assert!(
            newest() <= held_at + 1,
            "a snapshot past the durable watermark"
        );
        assert!(shared.follower_seq.load(Ordering::SeqCst) <= held_at);
        shared
            .durable_seq
            .store(ledger.next_seq() - 1, Ordering::SeqCst);
        finish_following(&shared, ledger.next_seq() - 1, handle, &stop);
    }

    /// A stop asked for while one fetch holds many snapshots that fall due ends the follower
    /// without writing them.
    #[test]
    fn a_stop_is_not_held_up_by_the_snapshots_due_in_a_fetch() {
        let temp = tempfile::tempdir().expect("tempdir");
        let (dir, _, shared) = durable_journal(temp.path(), SyncMode::None, 20_000);
        // 40,000 events in one fetch: 400 snapshots fall due in it.
        let (handle, stop, _snapshots) = start_follower(temp.path(), dir, 100, &shared);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shared.snapshots_written.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no snapshot in 10 s");
            std::thread::sleep(Duration::from_micros(100));
        }
        stop.store(true, Ordering::SeqCst);
        // Once the stop is stored, at most the snapshot in progress then completes.
        let at_stop = shared.snapshots_written.load(Ordering::SeqCst);
        assert!(
            at_stop < 300,
            "{at_stop} of 400 snapshots were written before the stop: the test cannot tell"
        );
        handle.join().expect("no panic");
        let written = shared.snapshots_written.load(Ordering::SeqCst);
        assert!(
            written <= at_stop + 1,
            "{} snapshots written after the stop was asked for",
            written - at_stop
        );
        assert!(!shared.follower_failed.load(Ordering::SeqCst));
    }

    /// `--snapshot-every 18446744073709551615` means "practically never": the interval does not
    /// wrap round to a snapshot after every record (or panic, with overflow checks on).
    #[test]
    fn a_huge_snapshot_interval_writes_no_snapshot() {
        let temp = tempfile::tempdir().expect("tempdir");
        let (dir, last_seq, shared) = durable_journal(temp.path(), SyncMode::Batch, 300);
        let (handle, stop, snapshots) = start_follower(temp.path(), dir, u64::MAX, &shared);
        finish_following(&shared, last_seq, handle, &stop);
        assert_eq!(newest_snapshot(&snapshots), 0, "a snapshot was written");
    }

    /// A journal of `command(0..commands)`, committed, and an engine state whose durable
    /// watermark is its last sequence: the journal's directory, that sequence and the state.
    fn durable_journal(
        temp: &Path,
        sync: SyncMode,
        commands: u64,
    ) -> (PathBuf, u64, Arc<EngineShared>) {
        let (dir, mut writer) = open_writer(temp, sync);
        let mut ledger = Ledger::new(LedgerConfig::default());
        for i in 0..commands {
            writer.append(&ledger.execute(&command(i))).expect("append");
        }
        writer.commit().expect("commit");
        let shared = Arc::new(EngineShared::default());
        let last_seq = ledger.next_seq() - 1;
        shared.durable_seq.store(last_seq, Ordering::SeqCst);
        (dir, last_seq, shared)
    }
}
