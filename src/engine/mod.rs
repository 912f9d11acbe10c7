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
use crate::core::{Command, CommandRecord, Ledger};
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
            _ => text
                .strip_prefix("sleep=")
                .and_then(|v| v.strip_suffix("us"))
                .and_then(|v| v.parse().ok())
                .map(|us| WaitMode::Sleep(Duration::from_micros(us)))
                .ok_or_else(|| {
                    format!("unknown wait strategy {text:?}: use park, spin, yield or sleep=<n>us")
                }),
        }
    }
}

pub const DEFAULT_WAIT: WaitMode = WaitMode::Park;

/// Token of a slot that nobody waits for (checkpoints).
pub const NO_TOKEN: u64 = u64::MAX;

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

impl OutputSlot {
    /// The sequence number that must be durable before this outcome may be announced.
    pub fn durable_needed(&self) -> u64 {
        if self.record.replayed {
            self.record.first_seq
        } else {
            self.record.next_seq() - 1
        }
    }
}

/// Receives outcomes in sequence order on the reply stage's thread.
pub trait ReplySink: Send + 'static {
    /// `durable` is false only after the journal stopped: the outcome is then unknown to the
    /// caller (it may or may not survive a restart) and must not be reported as committed.
    fn deliver(&mut self, slot: &OutputSlot, durable: bool);
    fn end_of_batch(&mut self) {}
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
}

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
}

impl EngineShared {
    fn halt(&self, reason: String) {
        tracing::error!(%reason, "journal failed: the engine stops acknowledging; exit and restart to recover");
        if let Ok(mut slot) = self.halt_reason.lock() {
            slot.get_or_insert(reason);
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
        if commands.is_empty() {
            return Ok(());
        }
        match self.producer.try_batch_publish(commands.len(), |slots| {
            for (slot, (command, token)) in slots.zip(commands) {
                slot.command = *command;
                slot.token = *token;
                slot.submitted_ns = submitted_ns;
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
}

/// Commands executed together (with prefetching across them) at most.
const EXECUTE_GROUP: usize = 64;

impl Drop for EngineState {
    fn drop(&mut self) {
        // Drain and join the journal and reply stages first, so that every outcome has been
        // delivered when `Engine::shutdown` returns. Then hand the in-RAM ledger back (not
        // durable work: the journal already holds everything).
        drop(self.output.take());
        if let Some(ledger) = self.ledger.take() {
            let _ = self.ledger_back.send(ledger);
        }
    }
}

impl EngineState {
    fn publish(&mut self, record: CommandRecord, token: u64, submitted_ns: u64) {
        // The output ring is bounded; when it is full the journal is behind and the engine
        // waits for it (internal back-pressure; callers see the input ring fill up and get 503).
        let Some(output) = self.output.as_mut() else {
            return;
        };
        loop {
            let published = output.try_publish(|slot| {
                slot.record = record;
                slot.token = token;
                slot.submitted_ns = submitted_ns;
            });
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
        self.buffer.push(*slot);
        if !end_of_batch && self.buffer.len() < EXECUTE_GROUP {
            return;
        }
        let Some(mut ledger) = self.ledger.take() else {
            return;
        };
        let buffer = std::mem::take(&mut self.buffer);
        if let Some(output) = self.output.as_mut() {
            // The output ring is bounded; when it is full the journal is behind and the engine
            // waits for it (internal back-pressure; callers see the input ring fill up and get
            // 503). Nothing executes until its part of the group has room, so no outcome is
            // lost; a group larger than the whole output ring goes in parts.
            for part in buffer.chunks(self.output_capacity) {
                loop {
                    let published = output.try_batch_publish(part.len(), |slots| {
                        let mut slots = slots;
                        ledger.execute_batch_of(
                            part,
                            |input| &input.command,
                            |i, record| {
                                if let Some(out) = slots.next() {
                                    out.record = record;
                                    out.token = part[i].token;
                                    out.submitted_ns = part[i].submitted_ns;
                                }
                            },
                        );
                    });
                    if published.is_ok() {
                        ring(self.output_bell);
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        }
        let timestamp_ns = buffer.last().map(|s| s.command.timestamp_ns).unwrap_or(0);
        let submitted_ns = buffer.last().map(|s| s.submitted_ns).unwrap_or(0);
        self.buffer = buffer;
        self.buffer.clear();
        if self.checkpoint_every > 0 && ledger.next_seq() >= self.next_checkpoint {
            let checkpoint = ledger.checkpoint(timestamp_ns);
            self.next_checkpoint = ledger.next_seq() + self.checkpoint_every;
            self.publish(checkpoint, NO_TOKEN, submitted_ns);
        }
        self.shared
            .executed_seq
            .store(ledger.next_seq() - 1, Ordering::Relaxed);
        give_id_block(&mut ledger, self.id_blocks.as_ref());
        if let Some(tables) = self.tables.as_mut() {
            tables.tend(&mut ledger);
        }
        self.ledger = Some(ledger);
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
            journal_stage(
                &mut journal,
                &output_shared,
                slot,
                end_of_batch,
                &mut last_executed,
            );
            staged.push(*slot);
            if end_of_batch {
                // Stage 4: every outcome of the batch, now that the batch is durable.
                let durable_seq = output_shared.durable_seq.load(Ordering::Acquire);
                for slot in &staged {
                    replies.deliver(slot, slot.durable_needed() <= durable_seq);
                }
                // Callers' outcomes only (checkpoints are not submitted), so that
                // `submitted - completed` is the commands still in the pipeline.
                let answered = staged.iter().filter(|s| s.token != NO_TOKEN).count();
                output_shared
                    .completed
                    .fetch_add(answered as u64, Ordering::Relaxed);
                staged.clear();
                replies.end_of_batch();
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
            next_checkpoint: start_seq + checkpoint_every,
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
        };
        let handler = |state: &mut EngineState, slot: &InputSlot, _sequence, end_of_batch| {
            state.on_slot(slot, end_of_batch)
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
    pub fn shutdown(self) -> Ledger {
        let Engine {
            submitter,
            ledger_back,
            follower,
        } = self;
        drop(submitter);
        let ledger = ledger_back
            .recv()
            .expect("the engine thread hands the ledger back");
        if let Some((handle, stop)) = follower {
            stop.store(true, Ordering::Release);
            let _ = handle.join();
        }
        ledger
    }
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
    if !slot.record.replayed {
        // A replayed outcome repeats an older record; it is not journaled again.
        *last_executed = slot.durable_needed();
    }
    match journal {
        JournalStage::Journal(writer) => {
            if !slot.record.replayed
                && let Err(e) = writer.append(&slot.record)
            {
                shared.halt(format!(
                    "journal append failed at sequence {}: {e}",
                    slot.record.first_seq
                ));
                return;
            }
            if end_of_batch {
                match writer.commit() {
                    Ok(durable) => {
                        shared
                            .journal_bytes
                            .store(writer.bytes_written(), Ordering::Relaxed);
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
