//! Wiring: the input ring, the pinned engine thread that owns the ledger, the journal stage and
//! the reply stage, in one place (`Engine::start`).
//!
//! Architecture invariants:
//! - One thread (the engine thread) owns the `Ledger`; nothing else reads or writes it, so it
//!   needs no lock.
//! - A ring slot is written by exactly one party: the producer writes an input slot, the engine
//!   thread writes an output slot. Later stages only read.
//! - The reply stage sees a record only after the journal stage synced the batch holding it
//!   (both run on the output ring's one consumer thread: records are staged, and delivered after
//!   the end-of-batch sync), and it still checks the durable watermark before answering
//!   "committed".
//! - A panic on the engine thread or the output thread halts the engine like a failed sync: it
//!   is caught at the stage's edge, the ledger it was changing is dropped (never used again),
//!   every later command is answered "outcome unknown" without being executed, and `shutdown`
//!   returns the reason. The threads keep draining their rings, so no caller waits forever and
//!   shutdown does not hang.

pub mod doorbell;
pub(crate) mod follower;
pub mod recovery;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use crossbeam_utils::CachePadded;
use std::time::Duration;

use disruptor::wait_strategies::WaitStrategy;
use disruptor::{
    MultiProducer, ProcessorSettings, Producer, SingleConsumerBarrier, build_multi_producer,
    build_single_producer,
};

use crate::core::ledger::IdBlock;
use crate::core::table::{RetiredBuckets, SpareBuckets};
use crate::core::{Command, CommandRecord, Ledger, LedgerConfig, Refusal};
use crate::journal::JournalWriter;
use doorbell::Doorbell;

/// How a waiting consumer thread waits for the next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin without pause: lowest latency, burns a whole core. Benchmarks only.
    BusySpin,
    /// Give the core away on every empty poll.
    Yield,
    /// Sleep this long on every empty poll.
    Sleep(Duration),
    /// Spin briefly, then park until a producer rings (`doorbell`). The default: an idle
    /// engine costs nothing, a busy one makes no syscalls, and nothing polls on a timer.
    Park,
}

/// A `WaitMode` made concrete for one ring: `Park` carries the ring's doorbell.
#[derive(Clone, Copy)]
enum Strategy {
    Spin,
    Yield,
    Sleep(Duration),
    Park(&'static Doorbell),
}

impl Strategy {
    fn new(mode: WaitMode) -> Strategy {
        match mode {
            WaitMode::BusySpin => Strategy::Spin,
            WaitMode::Yield => Strategy::Yield,
            WaitMode::Sleep(d) => Strategy::Sleep(d),
            WaitMode::Park => Strategy::Park(Doorbell::leaked()),
        }
    }

    /// The doorbell producers must ring after publishing, if this strategy parks.
    fn bell(&self) -> Option<&'static Doorbell> {
        match self {
            Strategy::Park(bell) => Some(bell),
            _ => None,
        }
    }
}

impl WaitStrategy for Strategy {
    #[inline]
    fn wait_for(&self, sequence: i64) {
        match self {
            Strategy::Spin => std::hint::spin_loop(),
            Strategy::Yield => std::thread::yield_now(),
            Strategy::Sleep(d) => std::thread::sleep(*d),
            Strategy::Park(bell) => bell.wait_for(sequence),
        }
    }
}

impl std::str::FromStr for WaitMode {
    type Err = String;
    fn from_str(text: &str) -> Result<WaitMode, String> {
        match text {
            "spin" | "busy-spin" => Ok(WaitMode::BusySpin),
            "yield" => Ok(WaitMode::Yield),
            "park" => Ok(WaitMode::Park),
            _ => {
                let us: u64 = text
                    .strip_prefix("sleep=")
                    .and_then(|v| v.strip_suffix("us"))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        format!(
                            "unknown wait strategy {text:?}: use park, spin, yield or sleep=<n>us"
                        )
                    })?;
                // Each idle consumer sleeps this long between looks at its ring: a long sleep
                // delays every answer by as much (and a shutdown waits for it).
                if us == 0 || us > MAX_SLEEP_US {
                    return Err(format!(
                        "{text:?}: the sleep must be between 1 and {MAX_SLEEP_US} us (each answer may wait that long)"
                    ));
                }
                Ok(WaitMode::Sleep(Duration::from_micros(us)))
            }
        }
    }
}

pub const DEFAULT_WAIT: WaitMode = WaitMode::Park;

/// The longest `sleep=<n>us` wait strategy: 10 ms.
pub const MAX_SLEEP_US: u64 = 10_000;

/// Token of a slot that nobody waits for (checkpoints).
pub const NO_TOKEN: u64 = u64::MAX;

/// The largest ring (`--ring-size`): both rings are allocated whole (a few hundred bytes a
/// slot), and one this size already holds seconds of commands at full speed.
pub const MAX_RING_SIZE: usize = 1 << 22;

/// Refuses a ring size that is not a power of two within `64..=MAX_RING_SIZE`, naming
/// `--ring-size` (a huge one aborted on allocation).
pub fn check_ring_size(size: usize) -> Result<(), String> {
    if size.is_power_of_two() && (64..=MAX_RING_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "--ring-size must be a power of two within 64..={MAX_RING_SIZE} (64 is the ring \
             library's minimum), not {size}"
        ))
    }
}

/// A command on its way in.
#[derive(Clone, Copy)]
pub struct InputSlot {
    pub command: Command,
    /// Identifies the waiting caller to the reply sink.
    pub token: u64,
    /// Monotonic nanoseconds at submission, for latency measurement; never seen by the ledger.
    pub submitted_ns: u64,
}

/// A command's outcome on its way out.
#[derive(Clone, Copy)]
pub struct OutputSlot {
    pub record: CommandRecord,
    pub token: u64,
    pub submitted_ns: u64,
}

// Slots are copied through the output ring by value: `CommandRecord::refused` sits in the
// record's padding.
const _: () = assert!(size_of::<OutputSlot>() == 208);

impl OutputSlot {
    /// The slot of a command the engine did not execute because it had halted (sequence numbers
    /// start at 1, so a record at sequence 0 is never a real one). Its caller is told the outcome
    /// is unknown.
    pub fn not_executed(token: u64, submitted_ns: u64) -> OutputSlot {
        OutputSlot {
            record: CommandRecord::empty(),
            token,
            submitted_ns,
        }
    }

    /// The slot of a command the engine refused without executing it (`CommandRecord::refused`
    /// says why). Nothing is journaled or remembered; the same request may be sent again
    /// later. Its record is empty but for the transaction id and time.
    pub fn refused(input: &InputSlot, why: Refusal) -> OutputSlot {
        let mut record = CommandRecord::empty();
        record.transaction_id = input.command.transaction_id;
        record.timestamp_ns = input.command.timestamp_ns;
        record.refused = Some(why);
        OutputSlot {
            record,
            token: input.token,
            submitted_ns: input.submitted_ns,
        }
    }

    /// False for a `not_executed` slot.
    pub fn executed(&self) -> bool {
        self.record.first_seq != 0
    }

    /// The sequence number that must be durable before this outcome may be announced (never,
    /// for a command that was not executed).
    pub fn durable_needed(&self) -> u64 {
        if !self.executed() {
            u64::MAX
        } else if self.record.replayed {
            self.record.first_seq
        } else {
            self.record.next_seq() - 1
        }
    }
}

/// Receives outcomes in sequence order on the reply stage's thread.
pub trait ReplySink: Send + 'static {
    /// `durable` is false only after the engine halted (a failed sync or a panic): the outcome
    /// is then unknown to the caller (it may or may not survive a restart) and must not be
    /// reported as committed. A slot that is not `executed()` is always delivered not durable.
    fn deliver(&mut self, slot: &OutputSlot, durable: bool);
    fn end_of_batch(&mut self) {}
    /// Called once, after `deliver` or `end_of_batch` (or the journal) panicked: the sink drops
    /// whatever it was in the middle of applying, and hands over the outcomes it still holds
    /// (they were delivered with the durability they have). Everything after comes with
    /// `durable` false.
    fn after_panic(&mut self) {}
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub input_ring_size: usize,
    pub output_ring_size: usize,
    /// How the engine thread waits for commands.
    pub wait: WaitMode,
    /// How the journal and reply threads wait for records (`None`: as `wait`).
    pub output_wait: Option<WaitMode>,
    /// Core to pin the engine thread to; `None`: do not pin.
    pub pin_core: Option<usize>,
    /// Emit a checkpoint record with the state hash every this many events (0: never).
    pub checkpoint_every: u64,
    /// Write a snapshot every this many events (0: never), into this directory.
    pub snapshot_every: u64,
    pub snapshot_dir: Option<PathBuf>,
    /// Snapshots kept in `snapshot_dir` after each one the follower writes (0: all).
    pub snapshot_keep: usize,
    /// Crash-test hook: the engine thread panics as it executes the command whose record holds
    /// this sequence number. `serve` sets it from `WALLET_FAILPOINT=engine-panic:<sequence>`;
    /// `None` (the default) costs one comparison per command.
    pub panic_at_seq: Option<u64>,
    /// Transaction ids the ledger may remember (at most `MAX_TRANSACTION_IDS`). At the limit a
    /// command with a new id is refused (`Refusal::LedgerFull`) instead of growing the ledger's
    /// memory without bound: every id is remembered forever, in RAM.
    pub max_transaction_ids: u64,
}

/// The most transaction ids a ledger can remember: its id table addresses them with `u32`
/// indices and stops one short of `u32::MAX` (as the read views' outcome table does).
pub const MAX_TRANSACTION_IDS: u64 = u32::MAX as u64 - 1;

/// A 64-bit key drawn at random for this process's hash tables (std's `RandomState`, seeded
/// from the operating system's random source), so that callers cannot choose keys that collide:
/// `core::table::hash_id`.
pub fn random_hash_key() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64)
}

/// The ledger configuration `serve`, recovery, replay and the replicators run with: the
/// default rules, and a transaction-id hash key drawn at random (`LedgerConfig::id_hash_key`).
pub fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        id_hash_key: random_hash_key(),
        ..LedgerConfig::default()
    }
}

/// Snapshots a server keeps by default: the newest, and two older ones in case it is damaged
/// (and for replicas catching up from a snapshot at or before their position).
pub const DEFAULT_SNAPSHOT_KEEP: usize = 3;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            input_ring_size: 1 << 16,
            output_ring_size: 1 << 16,
            wait: DEFAULT_WAIT,
            output_wait: None,
            pin_core: Some(1),
            checkpoint_every: 1 << 20,
            snapshot_every: 0,
            snapshot_dir: None,
            snapshot_keep: DEFAULT_SNAPSHOT_KEEP,
            panic_at_seq: None,
            max_transaction_ids: MAX_TRANSACTION_IDS,
        }
    }
}

/// Counters and the durable watermark, shared with the outside (metrics, shutdown).
///
/// The four words written on every batch by different threads (the journal thread, the engine
/// thread, the producers, the journal thread again) each have their own cache line: in one line
/// every write by one thread invalidated it for the others.
#[derive(Default)]
pub struct EngineShared {
    pub durable_seq: CachePadded<AtomicU64>,
    pub executed_seq: CachePadded<AtomicU64>,
    pub halted: AtomicBool,
    pub halt_reason: Mutex<Option<String>>,
    pub journal_bytes: AtomicU64,
    pub submitted: CachePadded<AtomicU64>,
    pub completed: CachePadded<AtomicU64>,
    pub overloaded: AtomicU64,
    /// The snapshot follower (stage 5): the last sequence it applied, the checkpoint records it
    /// verified, the snapshots it wrote, and why it stopped if it did.
    pub follower_seq: AtomicU64,
    pub follower_checkpoints: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub follower_failed: AtomicBool,
    pub follower_failure: Mutex<Option<String>>,
    /// Transaction ids the ledger remembers, as of the engine's last group.
    pub transaction_ids: AtomicU64,
    /// Commands refused because the ledger was full (`Refusal::LedgerFull`).
    pub refused_full: AtomicU64,
    /// The journal holds no reserve of disk space (`JournalWriter::space_short`): the engine
    /// executes nothing new. Set by the journal thread after each commit.
    pub journal_space_short: AtomicBool,
    /// Commands refused because the journal's disk was full (`Refusal::JournalFull`).
    pub refused_journal_full: AtomicU64,
}

impl EngineShared {
    /// Stops acknowledging for good. The first reason is kept (and logged); later ones are not.
    /// Also used by `serve` when its read views break outside the reply stage.
    pub fn halt(&self, reason: String) {
        let first = match self.halt_reason.lock() {
            Ok(mut slot) if slot.is_none() => {
                *slot = Some(reason.clone());
                true
            }
            Ok(_) => false,
            Err(_) => true,
        };
        if first {
            tracing::error!(%reason, "the engine halted: it stops acknowledging; exit and restart to recover");
        }
        self.halted.store(true, Ordering::SeqCst);
    }

    pub fn halt_reason(&self) -> Option<String> {
        self.halt_reason.lock().ok().and_then(|r| r.clone())
    }
}

/// The input ring was full: the engine cannot keep up. Callers answer 503, never spin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the engine's input ring is full")]
pub struct Overloaded;

/// The engine lost its ledger (a panic on the engine thread); the reason is the halt reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the engine failed: {0}")]
pub struct EngineFailed(pub String);

type InputProducer = MultiProducer<InputSlot, SingleConsumerBarrier>;

/// A handle for one producing thread. Clone one per thread.
#[derive(Clone)]
pub struct Submitter {
    producer: InputProducer,
    shared: Arc<EngineShared>,
    /// The engine thread's doorbell, when it parks.
    bell: Option<&'static Doorbell>,
}

impl Submitter {
    pub fn try_submit(
        &mut self,
        command: Command,
        token: u64,
        submitted_ns: u64,
    ) -> Result<(), Overloaded> {
        match self.producer.try_publish(|slot| {
            slot.command = command;
            slot.token = token;
            slot.submitted_ns = submitted_ns;
        }) {
            Ok(_) => {
                self.published(1);
                Ok(())
            }
            Err(_) => {
                self.shared.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(Overloaded)
            }
        }
    }

    /// Publishes all of `commands` or none of them.
    pub fn try_submit_batch(
        &mut self,
        commands: &[(Command, u64)],
        submitted_ns: u64,
    ) -> Result<(), Overloaded> {
        self.try_submit_stamped(commands, |_| submitted_ns)
    }

    /// Publishes all of `commands` or none of them, the `i`th stamped `submitted_ns(i)`.
    pub fn try_submit_stamped(
        &mut self,
        commands: &[(Command, u64)],
        submitted_ns: impl Fn(usize) -> u64,
    ) -> Result<(), Overloaded> {
        if commands.is_empty() {
            return Ok(());
        }
        match self.producer.try_batch_publish(commands.len(), |slots| {
            for (i, (slot, (command, token))) in slots.zip(commands).enumerate() {
                slot.command = *command;
                slot.token = *token;
                slot.submitted_ns = submitted_ns(i);
            }
        }) {
            Ok(_) => {
                self.published(commands.len() as u64);
                Ok(())
            }
            Err(_) => {
                self.shared.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(Overloaded)
            }
        }
    }

    /// Counts a publication and wakes the engine thread if it parked.
    fn published(&self, commands: u64) {
        self.shared.submitted.fetch_add(commands, Ordering::Relaxed);
        ring(self.bell);
    }

    pub fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }
}

/// The running pipeline. Dropping every `Submitter` and calling `shutdown` drains the rings,
/// joins the threads and hands back the ledger.
pub struct Engine {
    submitter: Submitter,
    ledger_back: mpsc::Receiver<Ledger>,
    /// Stage 5 and its stop flag.
    follower: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
}

/// Owned by the engine thread.
struct EngineState {
    ledger: Option<Ledger>,
    output: Option<disruptor::SingleProducer<OutputSlot, SingleConsumerBarrier>>,
    /// The output thread's doorbell, when it parks.
    output_bell: Option<&'static Doorbell>,
    next_checkpoint: u64,
    checkpoint_every: u64,
    ledger_back: mpsc::Sender<Ledger>,
    shared: Arc<EngineShared>,
    buffer: Vec<InputSlot>,
    output_capacity: usize,
    /// Id blocks with their pages populated by a helper thread (`prepare_id_blocks`).
    id_blocks: Option<mpsc::Receiver<IdBlock>>,
    /// Bucket arrays for the id table's growths, prepared by a helper thread.
    tables: Option<TableHelper>,
    /// Set when a panic interrupted the ledger: nothing executes any more.
    failed: bool,
    /// Commands of the group being run that have been answered (their output slots
    /// published): after a panic, the rest are answered "not executed".
    answered: usize,
    /// `EngineConfig::panic_at_seq` (`u64::MAX`: never).
    panic_at_seq: u64,
    /// `EngineConfig::max_transaction_ids`, capped at `MAX_TRANSACTION_IDS`.
    max_transaction_ids: u64,
    /// Whether the 90% warning and the first refusal were logged.
    warned_near_the_limit: bool,
    refusing: bool,
}

/// Commands executed together (with prefetching across them) at most.
const EXECUTE_GROUP: usize = 64;

impl Drop for EngineState {
    fn drop(&mut self) {
        // Drain and join the journal and reply stages first, so that every outcome has been
        // delivered when `Engine::shutdown` returns. Then hand the in-RAM ledger back (not
        // durable work: the journal already holds everything).
        drop(self.output.take());
        // After a halt the ledger may be ahead of the journal (a failed sync of the last batch,
        // with no group after it to see the halt): not handed back as the engine's state. The
        // output thread is joined above, so its halt is visible here.
        if self.shared.halted.load(Ordering::SeqCst) {
            self.ledger = None;
        }
        if let Some(ledger) = self.ledger.take() {
            let _ = self.ledger_back.send(ledger);
        }
    }
}

impl EngineState {
    fn publish(&mut self, out: OutputSlot) {
        // The output ring is bounded; when it is full the journal is behind and the engine
        // waits for it (internal back-pressure; callers see the input ring fill up and get 503).
        // The output thread never dies (its panics are caught), so this wait ends.
        let Some(output) = self.output.as_mut() else {
            return;
        };
        loop {
            let published = output.try_publish(|slot| *slot = out);
            if published.is_ok() {
                ring(self.output_bell);
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Collects commands and executes them in groups, so that `execute_batch` can prefetch
    /// ahead. A group ends at the ring's end of batch, so nothing waits for more input. Each
    /// record is built straight into its output ring slot (one batch publication per group).
    fn on_slot(&mut self, slot: &InputSlot, end_of_batch: bool) {
        if self.failed {
            self.publish(OutputSlot::not_executed(slot.token, slot.submitted_ns));
            return;
        }
        self.buffer.push(*slot);
        if !end_of_batch && self.buffer.len() < EXECUTE_GROUP {
            return;
        }
        let buffer = std::mem::take(&mut self.buffer);
        self.answered = 0;
        // A panic outside the execution itself (a lookup while admitting or after a halt, a
        // checkpoint, the helpers' hand-overs) halts the engine too. The group's commands not
        // answered yet are answered "not executed" here: their callers must not wait for a
        // timeout, and their waiter slots are freed only by an answer.
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_group(&buffer)));
        if let Err(payload) = run {
            self.fail(format!(
                "the engine thread panicked: {}",
                panic_text(payload.as_ref())
            ));
            for input in buffer.get(self.answered..).unwrap_or_default() {
                self.publish(OutputSlot::not_executed(input.token, input.submitted_ns));
            }
        }
        self.buffer = buffer;
        self.buffer.clear();
    }

    /// Publishes the answer to one of the group's commands.
    fn answer(&mut self, out: OutputSlot) {
        self.publish(out);
        self.answered += 1;
    }

    /// Runs one group: every command in `buffer` is answered (`answered` counts them) unless a
    /// panic escapes, which `on_slot` handles.
    fn run_group(&mut self, buffer: &[InputSlot]) {
        if self.shared.halted.load(Ordering::Relaxed) {
            // The output thread halted (a failed sync or append, a panic): nothing more is
            // journaled, so nothing more is executed. Checked once per group; a group that
            // raced the halt is answered "not durable" by the output thread. A retry of a
            // remembered command still gets its original outcome, which the output thread
            // announces only if that record was durable before the failure; the ledger (ahead
            // of the journal by what the failed sync held) is never handed back (`Drop`).
            for input in buffer {
                let replay = self
                    .ledger
                    .as_ref()
                    .and_then(|ledger| ledger.replay_of(&input.command));
                self.answer(match replay {
                    Some(record) => OutputSlot {
                        record,
                        token: input.token,
                        submitted_ns: input.submitted_ns,
                    },
                    None => OutputSlot::not_executed(input.token, input.submitted_ns),
                });
            }
            return;
        }
        let Some(mut ledger) = self.ledger.take() else {
            // Only `fail` takes the ledger for good, and `on_slot` checks for that first.
            for input in buffer {
                self.answer(OutputSlot::not_executed(input.token, input.submitted_ns));
            }
            return;
        };
        let ids = u64::from(ledger.transaction_id_count());
        // Each command remembers at most one new id: a group that cannot reach the limit
        // runs whole; one that might, or any while the journal is short of disk space, is
        // admitted command by command.
        let space_short = self.shared.journal_space_short.load(Ordering::Relaxed);
        let panicked = if ids + buffer.len() as u64 <= self.max_transaction_ids && !space_short {
            self.execute_group(&mut ledger, buffer)
        } else {
            self.execute_admitting(&mut ledger, buffer, space_short)
        };
        if let Some(reason) = panicked {
            // The ledger may be half-way through a change: it is dropped, never used again.
            self.fail(reason);
            return;
        }
        let timestamp_ns = buffer.last().map(|s| s.command.timestamp_ns).unwrap_or(0);
        let submitted_ns = buffer.last().map(|s| s.submitted_ns).unwrap_or(0);
        if self.checkpoint_every > 0 && ledger.next_seq() >= self.next_checkpoint {
            let checkpoint = ledger.checkpoint(timestamp_ns);
            self.next_checkpoint = ledger.next_seq().saturating_add(self.checkpoint_every);
            self.publish(OutputSlot {
                record: checkpoint,
                token: NO_TOKEN,
                submitted_ns,
            });
        }
        self.shared
            .executed_seq
            .store(ledger.next_seq() - 1, Ordering::Relaxed);
        let ids = u64::from(ledger.transaction_id_count());
        self.shared.transaction_ids.store(ids, Ordering::Relaxed);
        if !self.warned_near_the_limit && ids * 10 >= self.max_transaction_ids * 9 {
            self.warned_near_the_limit = true;
            tracing::warn!(
                transaction_ids = ids,
                max_transaction_ids = self.max_transaction_ids,
                "the ledger holds 90% of the transaction ids it may hold; at the limit, commands \
                 with new ids are refused (ledger_full): raise --max-transaction-ids (memory \
                 permitting) and restart"
            );
        }
        give_id_block(&mut ledger, self.id_blocks.as_ref());
        if let Some(tables) = self.tables.as_mut() {
            tables.tend(&mut ledger);
        }
        self.ledger = Some(ledger);
    }

    /// Executes `group` in parts of at most the output ring's size, each record built straight
    /// into its output slot. Returns the panic's description if the ledger panicked: the rest
    /// of the group is then answered "not executed".
    fn execute_group(&mut self, ledger: &mut Ledger, group: &[InputSlot]) -> Option<String> {
        // A panic while executing: which transaction, and the message.
        let mut panicked: Option<String> = None;
        let shared = &self.shared;
        let panic_at_seq = self.panic_at_seq;
        if let Some(output) = self.output.as_mut() {
            // The output ring is bounded; when it is full the journal is behind and the engine
            // waits for it (internal back-pressure; callers see the input ring fill up and get
            // 503). Nothing executes until its part of the group has room, so no outcome is
            // lost; a group larger than the whole output ring goes in parts.
            for part in group.chunks(self.output_capacity) {
                loop {
                    let published = output.try_batch_publish(part.len(), |slots| {
                        let mut slots = slots;
                        // Slots filled with a record, in `part`'s order.
                        let mut filled = 0;
                        // The panic is caught here, inside the publication, so that every slot
                        // claimed is still filled: the rest of the group is answered "not
                        // executed" instead of leaving its callers to time out.
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            if panicked.is_some() {
                                return;
                            }
                            ledger.execute_batch_of(
                                part,
                                |input| &input.command,
                                |i, record| {
                                    if !record.replayed
                                        && (record.first_seq..record.next_seq())
                                            .contains(&panic_at_seq)
                                    {
                                        panic!("failpoint engine-panic at sequence {panic_at_seq}");
                                    }
                                    if let Some(out) = slots.next() {
                                        out.record = record;
                                        out.token = part[i].token;
                                        out.submitted_ns = part[i].submitted_ns;
                                        filled += 1;
                                    }
                                },
                            );
                        }));
                        if let Err(payload) = run {
                            let transaction = part.get(filled).map_or_else(
                                || "?".to_string(),
                                |input| input.command.transaction_id.to_uuid_string(),
                            );
                            let reason = format!(
                                "the engine thread panicked executing transaction \
                                 {transaction}: {}",
                                panic_text(payload.as_ref())
                            );
                            // Halted before the group is published: the output thread then
                            // neither journals nor acknowledges any of it (the records executed
                            // before the panic included), whatever the threads' timing.
                            shared.halt(reason.clone());
                            panicked = Some(reason);
                        }
                        for (out, input) in slots.zip(&part[filled..]) {
                            *out = OutputSlot::not_executed(input.token, input.submitted_ns);
                        }
                    });
                    if published.is_ok() {
                        self.answered += part.len();
                        ring(self.output_bell);
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        }
        panicked
    }

    /// A group that may fill the ledger, or any group while the journal is short of disk space
    /// (`space_short`): each command is admitted after the one before it executed.
    ///
    /// - Short of space, only a repeat of a remembered command (answered from memory, nothing
    ///   journaled) is admitted; everything else is refused (`Refusal::JournalFull`), the
    ///   rejection of a reused id included, since it would be journaled.
    /// - Once the ledger holds `max_transaction_ids` ids, a command whose id is new is refused
    ///   (`Refusal::LedgerFull`); a repeat of a remembered id, or its reuse with another body,
    ///   still gets its answer (neither remembers a new id).
    fn execute_admitting(
        &mut self,
        ledger: &mut Ledger,
        group: &[InputSlot],
        space_short: bool,
    ) -> Option<String> {
        for (i, input) in group.iter().enumerate() {
            if ledger.next_seq() == self.panic_at_seq {
                // The failpoint, here for the lookups below (outside `execute_group`'s catch).
                panic!(
                    "failpoint engine-panic at sequence {} while admitting",
                    self.panic_at_seq
                );
            }
            let refusal = if space_short {
                ledger
                    .replay_of(&input.command)
                    .is_none()
                    .then_some(Refusal::JournalFull)
            } else {
                let full = u64::from(ledger.transaction_id_count()) >= self.max_transaction_ids;
                (full && ledger.outcome_of(input.command.transaction_id).is_none())
                    .then_some(Refusal::LedgerFull)
            };
            match refusal {
                Some(Refusal::LedgerFull) => {
                    if !self.refusing {
                        self.refusing = true;
                        tracing::error!(
                            max_transaction_ids = self.max_transaction_ids,
                            "the ledger is full: commands with new transaction ids are refused \
                             (ledger_full) until the server restarts with a higher \
                             --max-transaction-ids"
                        );
                    }
                    self.shared.refused_full.fetch_add(1, Ordering::Relaxed);
                }
                Some(Refusal::JournalFull) => {
                    self.shared
                        .refused_journal_full
                        .fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            if let Some(why) = refusal {
                self.answer(OutputSlot::refused(input, why));
                continue;
            }
            if let Some(reason) = self.execute_group(ledger, std::slice::from_ref(input)) {
                for rest in &group[i + 1..] {
                    self.answer(OutputSlot::not_executed(rest.token, rest.submitted_ns));
                }
                return Some(reason);
            }
        }
        None
    }

    /// Stops executing for good: the engine halts with `reason`, the ledger is dropped, and every
    /// later command is answered "not executed".
    fn fail(&mut self, reason: String) {
        self.failed = true;
        self.ledger = None;
        self.buffer.clear();
        self.shared.halt(reason);
    }
}

/// The message a panic was raised with.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Gives the ledger a prepared id block if it wants one and one is ready.
#[inline]
pub fn give_id_block(ledger: &mut Ledger, blocks: Option<&mpsc::Receiver<IdBlock>>) {
    if ledger.wants_id_block()
        && let Some(blocks) = blocks
        && let Ok(block) = blocks.try_recv()
    {
        ledger.add_id_block(block);
    }
}

/// A helper thread that makes the id table's next bucket array ahead of its growth: zeroed
/// and populated (the kernel zeroing a new array of hundreds of MiB on first touch was most of
/// a growth's pause on the engine thread), and that frees arrays the ledger could not use.
pub struct TableHelper {
    requests: mpsc::Sender<TableRequest>,
    prepared: mpsc::Receiver<SpareBuckets>,
    /// The size asked for and not yet received.
    asked: Option<usize>,
}

enum TableRequest {
    Prepare(usize),
    Free(SpareBuckets),
    FreeRetired(RetiredBuckets),
}

impl TableHelper {
    /// Starts the helper thread (None if no thread could be started: growths then allocate
    /// their arrays themselves, as before). It ends when the `TableHelper` is dropped.
    pub fn start() -> Option<TableHelper> {
        let (requests, inbox) = mpsc::channel::<TableRequest>();
        let (outbox, prepared) = mpsc::channel::<SpareBuckets>();
        std::thread::Builder::new()
            .name("wallet-tables".into())
            .spawn(move || {
                while let Ok(request) = inbox.recv() {
                    match request {
                        TableRequest::Prepare(buckets) => {
                            let spare = SpareBuckets::new(buckets);
                            // SAFETY: the array is owned by this thread and stays allocated
                            // (unmoved, unread) until the call returns; populating never
                            // changes what memory holds.
                            unsafe { crate::alloc::populate(&[spare.memory()], |_| true) };
                            if outbox.send(spare).is_err() {
                                return;
                            }
                        }
                        TableRequest::Free(spare) => drop(spare),
                        TableRequest::FreeRetired(retired) => drop(retired),
                    }
                }
            })
            .ok()?;
        Some(TableHelper {
            requests,
            prepared,
            asked: None,
        })
    }

    /// Asks for the array the ledger's id table wants, hands it in when it is ready, and has
    /// the array a finished growth left behind freed on the helper thread.
    pub fn tend(&mut self, ledger: &mut Ledger) {
        if let Some(retired) = ledger.take_retired_id_table() {
            let _ = self.requests.send(TableRequest::FreeRetired(retired));
        }
        if let Some(asked) = self.asked {
            let Ok(spare) = self.prepared.try_recv() else {
                return;
            };
            self.asked = None;
            let unused = if ledger.id_table_spare_wanted() == Some(asked) {
                ledger.give_id_table_spare(spare).err()
            } else {
                // The table grew without it (the helper was late): free it off this thread.
                Some(spare)
            };
            if let Some(spare) = unused {
                let _ = self.requests.send(TableRequest::Free(spare));
            }
        } else if let Some(buckets) = ledger.id_table_spare_wanted()
            && self.requests.send(TableRequest::Prepare(buckets)).is_ok()
        {
            self.asked = Some(buckets);
        }
    }
}

/// Starts a helper thread that keeps one `IdBlock` ready with its pages populated.
///
/// The ledger stores remembered transaction ids in 2 MiB blocks; the first id in a new block
/// used to fault its pages in on the engine thread, and the kernel zeroing fresh memory was 9%
/// of the engine thread's time in the pipeline bench (a new 2 MiB block every 65,536 ids).
/// The helper owns each block while it populates it and then sends it over: no memory is
/// shared. If a block is not ready in time, the ledger allocates one itself, as before. The
/// helper ends when the engine drops the receiving end (its next send fails).
pub fn prepare_id_blocks() -> Option<mpsc::Receiver<IdBlock>> {
    let (sender, receiver) = mpsc::sync_channel::<IdBlock>(1);
    let spawned = std::thread::Builder::new()
        .name("wallet-idblocks".into())
        .spawn(move || {
            loop {
                let block = IdBlock::new();
                let memory = block.memory();
                // SAFETY: the block is owned by this thread and stays allocated (unmoved, unread)
                // until the call returns; populating never changes what memory holds.
                unsafe { crate::alloc::populate(&[memory], |_| true) };
                if sender.send(block).is_err() {
                    return;
                }
            }
        });
    // Without the helper (no thread could be started), the ledger allocates its own blocks.
    spawned.ok().map(|_| receiver)
}

/// Wakes a ring's parked consumer after a publication (no-op unless it parks).
#[inline]
fn ring(bell: Option<&'static Doorbell>) {
    if let Some(bell) = bell {
        bell.ring();
    }
}

/// Where the engine's records go to become durable.
// One per engine, moved once into the output thread: the size of `Off` does not matter.
#[allow(clippy::large_enum_variant)]
pub enum JournalStage {
    /// A real journal.
    Journal(JournalWriter),
    /// No journal at all (benchmark baseline and pure in-memory tests): records count as durable
    /// at the end of each batch. Nothing survives a restart.
    Off,
}

fn usable_core(core: usize) -> bool {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    cores.len() >= 2 && cores.iter().any(|c| c.id == core)
}

impl Engine {
    /// Starts the pipeline over `ledger`. Stages:
    ///
    /// 1. Input ring (multi-producer disruptor): API handlers and the bench publish commands.
    /// 2. Engine thread (pinned when the machine has the cores): `Ledger::execute`, then
    ///    publishes the record to the output ring. Every `checkpoint_every` events it appends a
    ///    checkpoint record.
    /// 3. Journal stage (the output ring's consumer thread): appends records, and at the end of
    ///    each batch syncs once (group commit) and publishes the durable watermark.
    /// 4. Reply stage (same thread, after stage 3 synced the batch): hands each outcome of the
    ///    batch to the sink, which updates read views and completes the waiting callers.
    /// 5. Snapshot follower (plain thread, with a journal and `snapshot_every` > 0): its own
    ///    copy of the ledger follows the durable journal, verifies every checkpoint, and writes
    ///    a snapshot every `snapshot_every` events, so the engine thread never stops to encode
    ///    one (see `follower.rs`).
    pub fn start(
        ledger: Ledger,
        config: EngineConfig,
        mut journal: JournalStage,
        mut replies: impl ReplySink,
    ) -> Engine {
        assert!(
            config.input_ring_size.is_power_of_two(),
            "input ring size must be a power of 2"
        );
        assert!(
            config.output_ring_size.is_power_of_two(),
            "output ring size must be a power of 2"
        );
        let shared = Arc::new(EngineShared::default());
        let start_seq = ledger.next_seq();
        shared
            .transaction_ids
            .store(u64::from(ledger.transaction_id_count()), Ordering::Relaxed);
        if let JournalStage::Journal(writer) = &journal {
            shared
                .journal_space_short
                .store(writer.space_short(), Ordering::Relaxed);
        }
        shared.durable_seq.store(start_seq - 1, Ordering::SeqCst);
        shared.executed_seq.store(start_seq - 1, Ordering::SeqCst);

        // Stage 5: the snapshot follower, from a copy of the starting state.
        shared.follower_seq.store(start_seq - 1, Ordering::Relaxed);
        let follower = match (&config.snapshot_dir, &journal) {
            (Some(dir), JournalStage::Journal(writer)) if config.snapshot_every > 0 => {
                let stop = Arc::new(AtomicBool::new(false));
                let handle = follower::Follower {
                    ledger: ledger.clone(),
                    journal_dir: writer.dir().to_path_buf(),
                    snapshot_dir: dir.clone(),
                    snapshot_every: config.snapshot_every,
                    snapshot_keep: config.snapshot_keep,
                    shared: shared.clone(),
                    stop: stop.clone(),
                }
                .spawn();
                Some((handle, stop))
            }
            _ => {
                if config.snapshot_every > 0 {
                    tracing::warn!(
                        "snapshots need a journal and a snapshot directory: none will be written"
                    );
                }
                None
            }
        };

        // Stages 3 and 4: the output ring's one consumer thread runs the journal stage on each
        // record and, once the batch is synced, the reply stage on the same records. (A separate
        // reply thread would be a fourth busy thread on a 2-core machine; measured, it cost
        // more in context switches than it gained in overlap.)
        let output_shared = shared.clone();
        let mut staged: Vec<OutputSlot> = Vec::with_capacity(config.output_ring_size.min(4096));
        let mut last_executed = start_seq - 1;
        let mut failed = false;
        let output_strategy = Strategy::new(config.output_wait.unwrap_or(config.wait));
        let output_bell = output_strategy.bell();
        let output = build_single_producer(
            config.output_ring_size,
            || OutputSlot {
                record: CommandRecord::empty(),
                token: NO_TOKEN,
                submitted_ns: 0,
            },
            output_strategy,
        )
        .thread_name("wallet-journal")
        .handle_events_with(move |slot: &OutputSlot, _sequence, end_of_batch| {
            staged.push(*slot);
            if failed {
                if end_of_batch {
                    count_completed(&output_shared, &staged);
                    deliver_unknown(&mut replies, &staged);
                    staged.clear();
                }
                return;
            }
            // How many of the staged outcomes were handed to the sink (or tried), and whether
            // the batch was counted as completed.
            let mut attempted = 0;
            let mut counted = false;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                journal_stage(
                    &mut journal,
                    &output_shared,
                    slot,
                    end_of_batch,
                    &mut last_executed,
                );
                if end_of_batch {
                    // Stage 4: every outcome of the batch, now that the batch is durable.
                    let durable_seq = output_shared.durable_seq.load(Ordering::Acquire);
                    count_completed(&output_shared, &staged);
                    counted = true;
                    for slot in &staged {
                        attempted += 1;
                        replies.deliver(slot, slot.durable_needed() <= durable_seq);
                    }
                    staged.clear();
                    replies.end_of_batch();
                    // After the answers: the records are durable, and the watermark file's
                    // periodic sync is housekeeping.
                    if let JournalStage::Journal(writer) = &mut journal
                        && let Err(e) = writer.sync_watermark_if_due()
                    {
                        output_shared.halt(format!("journal watermark sync failed: {e}"));
                    }
                }
            }));
            if let Err(payload) = run {
                // The journal or the sink panicked: halt like a failed sync. The outcomes not yet
                // handed over are answered "unknown" (the one being handed over when it
                // panicked may or may not have reached its caller), and so is everything after.
                output_shared.halt(format!(
                    "the journal and reply thread panicked: {}",
                    panic_text(payload.as_ref())
                ));
                failed = true;
                if !counted {
                    count_completed(&output_shared, &staged);
                }
                // What the sink was holding is handed over first (or dropped, if unsafe).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    replies.after_panic()
                }));
                deliver_unknown(&mut replies, staged.get(attempted..).unwrap_or_default());
                staged.clear();
            }
        })
        .build();

        // Stages 1 and 2: the input ring and the engine thread. The ring is built before anything
        // else is pinned (pin_at_core checks the building thread's own affinity mask).
        let (ledger_sender, ledger_back) = mpsc::channel();
        let state_shared = shared.clone();
        let checkpoint_every = config.checkpoint_every;
        let output_capacity = config.output_ring_size;
        let input_strategy = Strategy::new(config.wait);
        let bell = input_strategy.bell();
        // Started here, not in `init`: a thread started by the pinned engine thread would
        // inherit its pinning and compete with it for its core.
        let id_blocks = prepare_id_blocks();
        let tables = TableHelper::start();
        let init = move || EngineState {
            next_checkpoint: start_seq.saturating_add(checkpoint_every),
            ledger: Some(ledger),
            output: Some(output),
            output_bell,
            checkpoint_every,
            ledger_back: ledger_sender,
            shared: state_shared,
            buffer: Vec::with_capacity(EXECUTE_GROUP),
            output_capacity,
            id_blocks,
            tables,
            failed: false,
            answered: 0,
            panic_at_seq: config.panic_at_seq.unwrap_or(u64::MAX),
            max_transaction_ids: config.max_transaction_ids.min(MAX_TRANSACTION_IDS),
            warned_near_the_limit: false,
            refusing: false,
        };
        let handler = |state: &mut EngineState, slot: &InputSlot, _sequence, end_of_batch| {
            // A panic outside a group's run (which `on_slot` catches itself) halts the engine
            // too; the thread lives on to drain the ring.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                state.on_slot(slot, end_of_batch)
            }));
            if let Err(payload) = run {
                state.fail(format!(
                    "the engine thread panicked: {}",
                    panic_text(payload.as_ref())
                ));
            }
        };
        let builder = build_multi_producer(
            config.input_ring_size,
            || InputSlot {
                command: Command {
                    transaction_id: crate::core::TransactionId(0),
                    timestamp_ns: 0,
                    kind: crate::core::CommandKind::OpenAccount {
                        account: crate::core::AccountId::EMPTY,
                    },
                },
                token: NO_TOKEN,
                submitted_ns: 0,
            },
            input_strategy,
        )
        .thread_name("wallet-engine");
        let producer = match config.pin_core {
            Some(core) if usable_core(core) => {
                tracing::info!(core, "engine thread pinned");
                builder
                    .pin_at_core(core)
                    .handle_events_and_state_with(handler, init)
                    .build()
            }
            Some(core) => {
                tracing::warn!(
                    core,
                    "too few cores to pin the engine thread; running it unpinned"
                );
                builder.handle_events_and_state_with(handler, init).build()
            }
            None => builder.handle_events_and_state_with(handler, init).build(),
        };
        Engine {
            submitter: Submitter {
                producer,
                shared,
                bell,
            },
            ledger_back,
            follower,
        }
    }

    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    pub fn shared(&self) -> Arc<EngineShared> {
        self.submitter.shared.clone()
    }

    /// Drains everything already submitted, stops the threads and returns the ledger.
    /// Every other `Submitter` clone must have been dropped first, or this waits for them.
    /// After a halt (a journal failure or a panic on either thread) the ledger is not returned
    /// (it may hold records the journal does not), and the error carries the reason.
    pub fn shutdown(self) -> Result<Ledger, EngineFailed> {
        let Engine {
            submitter,
            ledger_back,
            follower,
        } = self;
        let shared = submitter.shared.clone();
        drop(submitter);
        let ledger = ledger_back.recv();
        if let Some((handle, stop)) = follower {
            stop.store(true, Ordering::Release);
            let _ = handle.join();
        }
        ledger.map_err(|_| {
            EngineFailed(shared.halt_reason().unwrap_or_else(|| {
                "the engine thread ended without handing the ledger back".to_string()
            }))
        })
    }
}

/// After the output thread failed: every outcome is handed over as unknown (a panic in the sink
/// is swallowed: the thread must keep draining the ring).
fn deliver_unknown(replies: &mut impl ReplySink, slots: &[OutputSlot]) {
    for slot in slots {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            replies.deliver(slot, false)
        }));
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| replies.end_of_batch()));
}

/// Counts callers' outcomes only (checkpoints are not submitted), so that
/// `submitted - completed` is the commands still in the pipeline.
fn count_completed(shared: &EngineShared, slots: &[OutputSlot]) {
    let answered = slots.iter().filter(|s| s.token != NO_TOKEN).count();
    shared
        .completed
        .fetch_add(answered as u64, Ordering::Relaxed);
}

/// Stage 3 for one record: append it; at the end of the batch, sync once (group commit) and
/// publish the durable watermark.
fn journal_stage(
    journal: &mut JournalStage,
    shared: &EngineShared,
    slot: &OutputSlot,
    end_of_batch: bool,
    last_executed: &mut u64,
) {
    if shared.halted.load(Ordering::Relaxed) {
        return;
    }
    // A replayed outcome repeats an older record; it is not journaled again. A command that
    // was not executed (after a halt, or refused: `Refusal`) is never journaled either.
    let new_record = !slot.record.replayed && slot.executed();
    if new_record {
        *last_executed = slot.durable_needed();
    }
    match journal {
        JournalStage::Journal(writer) => {
            if new_record && let Err(e) = writer.append(&slot.record) {
                shared.halt(format!(
                    "journal append failed at sequence {}: {e}",
                    slot.record.first_seq
                ));
                return;
            }
            // A roll-over that used the reserve: the engine stops taking new work now, not
            // after this batch's sync, so that less is in flight towards the new segment.
            if writer.space_short() && !shared.journal_space_short.load(Ordering::Relaxed) {
                shared.journal_space_short.store(true, Ordering::Relaxed);
            }
            if end_of_batch {
                match writer.commit_deferring_watermark() {
                    Ok(durable) => {
                        shared
                            .journal_bytes
                            .store(writer.bytes_written(), Ordering::Relaxed);
                        // Written only when it changes: the engine thread reads it every group.
                        let short = writer.space_short();
                        if shared.journal_space_short.load(Ordering::Relaxed) != short {
                            shared.journal_space_short.store(short, Ordering::Relaxed);
                        }
                        shared.durable_seq.store(durable, Ordering::Release);
                    }
                    Err(e) => shared.halt(format!("journal sync failed: {e}")),
                }
            }
        }
        JournalStage::Off => {
            if end_of_batch {
                shared.durable_seq.store(*last_executed, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AccountId, CommandKind, Currency, LedgerConfig, RejectCode, TransactionId};
    use std::time::Instant;

    /// (token, executed, durable) for every caller's outcome, held until the end of the batch
    /// as the server's sink holds them. Panics when it is handed the outcome of `panic_on`, or
    /// at the end of a batch holding the outcome of `panic_on_flush`.
    struct Collect {
        sender: mpsc::Sender<(u64, bool, bool)>,
        panic_on: Option<u64>,
        panic_on_flush: Option<u64>,
        held: Vec<(u64, bool, bool)>,
    }

    impl ReplySink for Collect {
        fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
            if slot.token == NO_TOKEN {
                return;
            }
            if self.panic_on == Some(slot.token) {
                panic!("the test asked the reply sink to panic");
            }
            self.held.push((slot.token, slot.executed(), durable));
        }

        fn end_of_batch(&mut self) {
            if self
                .held
                .iter()
                .any(|&(token, _, _)| Some(token) == self.panic_on_flush)
            {
                panic!("the test asked the reply sink to panic at the end of a batch");
            }
            self.after_panic();
        }

        fn after_panic(&mut self) {
            for outcome in self.held.drain(..) {
                let _ = self.sender.send(outcome);
            }
        }
    }

    fn command(id: u128, kind: CommandKind) -> Command {
        Command {
            transaction_id: TransactionId(id),
            timestamp_ns: 1_700_000_000_000_000_000 + id as u64,
            kind,
        }
    }

    /// Opens two accounts and deposits into the first: tokens 0..3.
    fn setup() -> Vec<Command> {
        let a = AccountId::new("a").unwrap();
        let b = AccountId::new("b").unwrap();
        let usd = Currency::new("USD").unwrap();
        vec![
            command(1, CommandKind::OpenAccount { account: a }),
            command(2, CommandKind::OpenAccount { account: b }),
            command(
                3,
                CommandKind::Deposit {
                    account: a,
                    amount: 1_000_000,
                    currency: usd,
                },
            ),
        ]
    }

    fn transfer(id: u128) -> Command {
        command(
            id,
            CommandKind::Transfer {
                from: AccountId::new("a").unwrap(),
                to: AccountId::new("b").unwrap(),
                amount: 1,
                currency: Currency::new("USD").unwrap(),
            },
        )
    }

    /// Small rings, a sleeping wait (tests must not spin), unpinned, no checkpoints.
    fn test_config() -> EngineConfig {
        EngineConfig {
            input_ring_size: 1024,
            output_ring_size: 1024,
            wait: WaitMode::Sleep(Duration::from_micros(50)),
            pin_core: None,
            checkpoint_every: 0,
            ..EngineConfig::default()
        }
    }

    /// An engine whose thread panics at `panic_at_seq` (nothing in the ledger panics on any
    /// input we know of, so the tests have to ask for one), and whose sink panics as `Collect`
    /// says.
    fn start(
        panic_at_seq: Option<u64>,
        panic_on: Option<u64>,
        panic_on_flush: Option<u64>,
    ) -> (Engine, mpsc::Receiver<(u64, bool, bool)>) {
        let config = EngineConfig {
            panic_at_seq,
            ..test_config()
        };
        start_configured(config, panic_on, panic_on_flush)
    }

    /// `start` with a whole configuration.
    fn start_configured(
        config: EngineConfig,
        panic_on: Option<u64>,
        panic_on_flush: Option<u64>,
    ) -> (Engine, mpsc::Receiver<(u64, bool, bool)>) {
        let (sender, receiver) = mpsc::channel();
        let engine = Engine::start(
            Ledger::new(LedgerConfig::default()),
            config,
            JournalStage::Off,
            Collect {
                sender,
                panic_on,
                panic_on_flush,
                held: Vec::new(),
            },
        );
        (engine, receiver)
    }

    fn submit_batch(submitter: &mut Submitter, commands: &[Command], first_token: u64) {
        let batch: Vec<(Command, u64)> = commands
            .iter()
            .zip(first_token..)
            .map(|(c, t)| (*c, t))
            .collect();
        submitter
            .try_submit_batch(&batch, 0)
            .expect("room in the ring");
    }

    /// Receives `count` outcomes within 10 s, by token.
    fn receive(
        receiver: &mpsc::Receiver<(u64, bool, bool)>,
        count: usize,
    ) -> BTreeMap<u64, (bool, bool)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = BTreeMap::new();
        while got.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let (token, executed, durable) = receiver
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("only {} of {count} outcomes in 10 s", got.len()));
            assert!(
                got.insert(token, (executed, durable)).is_none(),
                "token {token} answered twice"
            );
        }
        got
    }

    use std::collections::BTreeMap;

    /// Shuts down on another thread so that a hang fails the test instead of stalling it.
    /// Shuts down (within 10 s) a halted engine: it must fail with the halt's `reason`, never
    /// hand back its ledger (`why`: what that ledger would be).
    fn shutdown_refuses(engine: Engine, reason: &str, why: &str) {
        match shutdown_within_10s(engine) {
            Ok(ledger) => panic!(
                "shutdown handed back a ledger at sequence {} ({why})",
                ledger.next_seq()
            ),
            Err(failed) => assert_eq!(failed.0, reason),
        }
    }

    fn shutdown_within_10s(engine: Engine) -> Result<Ledger, EngineFailed> {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(engine.shutdown());
        });
        result
            .recv_timeout(Duration::from_secs(10))
            .expect("shutdown finished within 10 s")
    }

    #[test]
    fn a_panic_on_the_engine_thread_halts_and_answers_every_caller() {
        // Setup holds sequences 1..=3, each transfer two: 12 is the one at 8.
        let (engine, receiver) = start(Some(8), None, None);
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        let before = receive(&receiver, 3);
        assert!(
            before
                .values()
                .all(|&(executed, durable)| executed && durable)
        );

        // One group: two transfers, the one that panics, two more. Then more commands later.
        let group = [
            transfer(10),
            transfer(11),
            transfer(12),
            transfer(13),
            transfer(14),
        ];
        submit_batch(&mut submitter, &group, 10);
        let during = receive(&receiver, 5);
        // The two executed before the panic are not durable (the halt came before their batch's
        // end), and nothing from the panicking one on was executed.
        assert_eq!(during[&10], (true, false));
        assert_eq!(during[&11], (true, false));
        for token in 12..15 {
            assert_eq!(during[&token], (false, false), "token {token}");
        }
        assert!(shared.halted.load(Ordering::SeqCst));
        let reason = shared.halt_reason().expect("a halt reason");
        assert!(
            reason.contains("panicked")
                && reason.contains("failpoint engine-panic at sequence 8")
                && reason.contains("00000000-0000-0000-0000-00000000000c"),
            "{reason}"
        );

        // Later commands are drained, not executed, and answered at once.
        submit_batch(&mut submitter, &[transfer(20), transfer(21)], 20);
        let after = receive(&receiver, 2);
        assert!(after.values().all(|&v| v == (false, false)), "{after:?}");
        assert_eq!(shared.durable_seq.load(Ordering::SeqCst), 3);

        drop(submitter);
        shutdown_refuses(engine, &reason, "a panic interrupted");
        assert_eq!(receiver.try_iter().count(), 0, "outcomes answered twice");
    }

    #[test]
    fn wait_strategies_parse_and_a_sleep_is_bounded() {
        assert_eq!("park".parse::<WaitMode>(), Ok(WaitMode::Park));
        assert_eq!(
            "sleep=50us".parse::<WaitMode>(),
            Ok(WaitMode::Sleep(Duration::from_micros(50)))
        );
        assert_eq!(
            "sleep=10000us".parse::<WaitMode>(),
            Ok(WaitMode::Sleep(Duration::from_millis(10)))
        );
        for bad in ["sleep=0us", "sleep=10001us", "sleep=18446744073709551615us"] {
            let e = bad.parse::<WaitMode>().expect_err(bad);
            assert!(e.contains("between 1 and 10000 us"), "{bad}: {e}");
        }
        for bad in [
            "sleep=abc",
            "sleep=5",
            "nap",
            "sleep=99999999999999999999us",
        ] {
            let e = bad.parse::<WaitMode>().expect_err(bad);
            assert!(e.contains("unknown wait strategy"), "{bad}: {e}");
        }
    }

    /// A halt of the journal stage (here as a failed sync leaves it: halted, the watermark short
    /// of what the engine executed) keeps the ledger on the engine thread: a retry gets its
    /// original outcome, announced as committed only if that record was durable before the halt.
    #[test]
    fn after_a_journal_halt_a_retry_is_announced_only_if_its_original_was_durable() {
        let (sender, receiver) = mpsc::channel();
        let engine = Engine::start(
            Ledger::new(LedgerConfig::default()),
            test_config(),
            JournalStage::Off,
            Records(sender),
        );
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        submit_batch(&mut submitter, &[transfer(10)], 10);
        let first: BTreeMap<u64, (CommandRecord, bool)> = receiver
            .iter()
            .take(4)
            .map(|(token, record, durable)| (token, (record, durable)))
            .collect();
        assert!(
            first
                .values()
                .all(|(record, durable)| *durable && record.is_committed())
        );
        let transfer_seq = first[&10].0.first_seq;
        assert_eq!(transfer_seq, 4);

        // The sync that held transfer 10 failed: the watermark stayed at the setup's end.
        shared.halt("journal sync failed: (test)".to_string());
        shared.durable_seq.store(3, Ordering::SeqCst);

        // The deposit (sequence 3, durable), transfer 10 (sequence 4, not durable) and a new id.
        submit_batch(
            &mut submitter,
            &[setup()[2], transfer(10), transfer(30)],
            20,
        );
        let retried: BTreeMap<u64, (CommandRecord, bool)> = (0..3)
            .map(|_| {
                let (token, record, durable) = receiver
                    .recv_timeout(Duration::from_secs(10))
                    .expect("every retry answered within 10 s");
                (token, (record, durable))
            })
            .collect();
        let (deposit, durable) = retried[&20];
        assert!(
            durable && deposit.replayed && deposit.is_committed() && deposit.first_seq == 3,
            "the durable deposit's retry is its committed original: {deposit:?} {durable}"
        );
        let (again, durable) = retried[&21];
        assert!(
            !durable && again.replayed && again.first_seq == transfer_seq,
            "transfer 10 was not durable: its retry must not be announced: {again:?} {durable}"
        );
        let (new, durable) = retried[&22];
        assert!(
            !durable && new.first_seq == 0,
            "nothing new executes after a halt: {new:?} {durable}"
        );
        assert_eq!(shared.executed_seq.load(Ordering::SeqCst), 5);
        drop(submitter);
        assert!(shutdown_within_10s(engine).is_err());
    }

    /// A panic outside `execute_group`'s own catch (here in the admission lookups, which run
    /// near the id limit or short of disk space) still answers the group's unanswered rest.
    #[test]
    fn a_panic_while_admitting_answers_the_rest_of_the_group() {
        let config = EngineConfig {
            panic_at_seq: Some(8),
            // Setup remembers 3 ids; a group of 5 more might pass 6: admitted one by one.
            max_transaction_ids: 6,
            ..test_config()
        };
        let (engine, receiver) = start_configured(config, None, None);
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        receive(&receiver, 3);
        let group = [
            transfer(10),
            transfer(11),
            transfer(12),
            transfer(13),
            transfer(14),
        ];
        submit_batch(&mut submitter, &group, 10);
        let during = receive(&receiver, 5);
        // 10 and 11 (sequences 4..8) executed one by one before the panic; the rest not.
        assert!(during[&10].0 && during[&11].0, "{during:?}");
        for token in 12..15 {
            assert_eq!(during[&token], (false, false), "token {token}");
        }
        let reason = shared.halt_reason().expect("a halt reason");
        assert!(
            reason.contains("panicked") && reason.contains("while admitting"),
            "{reason}"
        );
        submit_batch(&mut submitter, &[transfer(20)], 20);
        assert_eq!(receive(&receiver, 1)[&20], (false, false));
        drop(submitter);
        shutdown_refuses(engine, &reason, "a panic interrupted");
        assert_eq!(receiver.try_iter().count(), 0, "outcomes answered twice");
    }

    #[test]
    fn a_panic_in_the_reply_stage_halts_and_the_rest_is_answered_unknown() {
        // Token 11 is the second of its group: 10 reached its caller, 11 is lost, 12 and 13 are
        // answered "unknown".
        let (engine, receiver) = start(None, Some(11), None);
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        receive(&receiver, 3);
        submit_batch(
            &mut submitter,
            &[transfer(10), transfer(11), transfer(12), transfer(13)],
            10,
        );
        let during = receive(&receiver, 3);
        assert_eq!(during[&10], (true, true));
        assert_eq!(during[&12], (true, false));
        assert_eq!(during[&13], (true, false));
        assert!(shared.halted.load(Ordering::SeqCst));
        let reason = shared.halt_reason().expect("a halt reason");
        assert!(reason.contains("asked the reply sink to panic"), "{reason}");

        // Later commands are answered at once and not executed: nothing more is journaled, so
        // the ledger would only run ahead of the journal.
        submit_batch(&mut submitter, &[transfer(20), transfer(21)], 20);
        let after = receive(&receiver, 2);
        assert!(after.values().all(|&v| v == (false, false)), "{after:?}");
        assert_eq!(shared.executed_seq.load(Ordering::SeqCst), 3 + 4 * 2);
        drop(submitter);
        // The ledger, ahead of the journal, is not handed back as the engine's state.
        shutdown_refuses(engine, &reason, "the journal does not hold");
        assert_eq!(receiver.try_iter().count(), 0, "outcomes answered twice");
    }

    #[test]
    fn a_halt_on_the_last_batch_keeps_the_ledger_from_being_handed_back() {
        // The output thread halts at the end of the last batch and nothing comes after it: no
        // group on the engine thread sees the halt, and shutdown must still not return the
        // ledger (it holds records the journal stage never finished).
        let (engine, receiver) = start(None, None, Some(11));
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        receive(&receiver, 3);
        submit_batch(&mut submitter, &[transfer(10), transfer(11)], 10);
        receive(&receiver, 2);
        let reason = shared.halt_reason().expect("a halt reason");
        drop(submitter);
        shutdown_refuses(engine, &reason, "after a halt");
    }

    #[test]
    fn a_panic_at_the_end_of_a_batch_hands_over_what_the_sink_held() {
        // The sink panics at the end of the batch holding 11: the whole batch was synced and
        // handed to the sink, so its outcomes reach the callers as they were (durable).
        let (engine, receiver) = start(None, None, Some(11));
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        submit_batch(&mut submitter, &setup(), 0);
        receive(&receiver, 3);
        submit_batch(
            &mut submitter,
            &[transfer(10), transfer(11), transfer(12)],
            10,
        );
        let during = receive(&receiver, 3);
        assert!(during.values().all(|&v| v == (true, true)), "{during:?}");
        let reason = shared.halt_reason().expect("a halt reason");
        assert!(reason.contains("at the end of a batch"), "{reason}");
        submit_batch(&mut submitter, &[transfer(20)], 20);
        assert_eq!(receive(&receiver, 1)[&20], (false, false));
        drop(submitter);
        assert!(shutdown_within_10s(engine).is_err());
        assert_eq!(receiver.try_iter().count(), 0, "outcomes answered twice");
    }

    /// Every caller's record with its durability, as delivered.
    struct Records(mpsc::Sender<(u64, CommandRecord, bool)>);

    impl ReplySink for Records {
        fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
            if slot.token != NO_TOKEN {
                let _ = self.0.send((slot.token, slot.record, durable));
            }
        }
    }

    #[test]
    fn a_full_ledger_refuses_new_ids_unexecuted_and_still_answers_remembered_ones() {
        let (sender, receiver) = mpsc::channel();
        let config = EngineConfig {
            max_transaction_ids: 5,
            ..test_config()
        };
        let engine = Engine::start(
            Ledger::new(LedgerConfig::default()),
            config,
            JournalStage::Off,
            Records(sender),
        );
        let shared = engine.shared();
        let mut submitter = engine.submitter();
        // Setup remembers three ids (sequences 1..=3); the limit lets two more in.
        submit_batch(&mut submitter, &setup(), 0);
        let mut reused = transfer(11);
        if let CommandKind::Transfer { amount, .. } = &mut reused.kind {
            *amount = 2;
        }
        let group = [
            transfer(10),
            transfer(11),
            transfer(10), // a repeat: answered from the original
            transfer(12), // new, with the ledger full
            reused,       // 11's id with another body: its own answer, no new id
            transfer(13), // new
        ];
        submit_batch(&mut submitter, &group, 10);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = BTreeMap::new();
        while got.len() < 9 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (token, record, durable) = receiver
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("only {} of 9 outcomes in 10 s", got.len()));
            assert!(got.insert(token, (record, durable)).is_none());
        }
        for token in [0, 1, 2, 10, 11] {
            let (record, durable) = &got[&token];
            assert!(
                *durable && record.is_committed() && record.refused.is_none() && !record.replayed,
                "token {token}: {record:?}"
            );
        }
        assert_eq!((got[&10].0.first_seq, got[&11].0.first_seq), (4, 6));
        let (repeat, durable) = &got[&12];
        assert!(*durable && repeat.replayed && repeat.refused.is_none() && repeat.first_seq == 4);
        let (reused, durable) = &got[&14];
        assert!(*durable && reused.refused.is_none());
        assert_eq!(reused.rejection, Some(RejectCode::TransactionIdReused));
        for (token, id) in [(13, 12), (15, 13)] {
            let (refused, durable) = &got[&token];
            assert!(
                refused.refused == Some(Refusal::LedgerFull) && refused.first_seq == 0 && !*durable,
                "token {token}: {refused:?}"
            );
            assert_eq!(refused.transaction_id, TransactionId(id));
        }
        assert_eq!(shared.refused_full.load(Ordering::Relaxed), 2);
        assert_eq!(shared.transaction_ids.load(Ordering::Relaxed), 5);

        drop(submitter);
        let ledger = shutdown_within_10s(engine).expect("a clean shutdown");
        // Nothing of the refused commands is in the ledger: two transfers of 1 and the reused
        // id's rejection (one event) after the setup.
        assert_eq!(ledger.transaction_id_count(), 5);
        assert_eq!(ledger.next_seq(), 9);
        assert_eq!(ledger.outcome_of(TransactionId(12)), None);
        assert_eq!(ledger.outcome_of(TransactionId(13)), None);
        let b = ledger.account_index(&AccountId::new("b").unwrap()).unwrap();
        assert_eq!(ledger.balance(b, Currency::new("USD").unwrap()), Some(2));
    }
}
