//! `wallet bench`: in-process load through the real pipeline (no HTTP).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::core::ledger::LedgerConfig;
use crate::core::{AccountId, Command, CommandKind, Currency, Ledger, RejectCode, TransactionId};
use crate::engine::{
    Engine, EngineConfig, EngineShared, JournalStage, NO_TOKEN, OutputSlot, ReplySink, WaitMode,
};
use crate::journal::storage::MmapStorage;
use crate::journal::{JournalConfig, JournalWriter, SyncMode, journal_dir, snapshot_dir};
use crate::tools::rng::{SplitMix, Zipf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipf,
}

const DEFAULT_SEGMENT_SIZE: u64 = 256 << 20;
const DEFAULT_RING_SIZE: usize = 1 << 16;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub accounts: u32,
    #[arg(long, default_value_t = 10_000_000)]
    pub transfers: u64,
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of transfers built to be rejected (insufficient funds, unknown account, reused id).
    #[arg(long, default_value_t = 0.01)]
    pub reject_share: f64,
    /// Transaction ids the ledger's id table is sized for before the run (default: every id
    /// the run creates, so that the table never grows while measuring). Smaller: the table
    /// grows during the run, as a server's does, and the latency percentiles show what that
    /// costs.
    #[arg(long)]
    pub id_capacity: Option<usize>,
    /// Journal sync mode: batch (durable), interval=<ms>, none (page cache only: NOT safe
    /// against power loss).
    #[arg(long, default_value = "batch")]
    pub sync: SyncMode,
    /// Run without any journal (the in-memory baseline).
    #[arg(long, conflicts_with_all = ["sync", "data_dir", "segment_size", "journal_readahead"])]
    pub no_journal: bool,
    /// Data directory for the journal (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_SEGMENT_SIZE)]
    pub segment_size: u64,
    /// Kernel readahead on the journal's mapping: on, off or auto (as `serve`).
    #[arg(long, default_value_t)]
    pub journal_readahead: crate::journal::storage::Readahead,
    /// Wait strategy of the ring consumers: spin, yield, park or sleep=<n>us (1 to 10000 us).
    #[arg(long, default_value = "spin")]
    pub wait: WaitMode,
    /// Wait strategy of the journal and reply threads (on 2 cores, spinning them too starves
    /// the engine and the producers).
    #[arg(long, default_value = "yield")]
    pub output_wait: WaitMode,
    #[arg(long, default_value_t = DEFAULT_RING_SIZE)]
    pub ring_size: usize,
    /// Commands per batch publication.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Offered load in transfers per second over all producers (0: as fast as possible). A
    /// steady stream for measuring a replicator's lag behind the journal.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Core to pin the engine thread to; negative: do not pin (as `serve`).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub pin_core: i64,
    /// What to measure: `pipeline` (ring, engine thread, journal, replies) or `execute`
    /// (`Ledger::execute` alone on this thread, no ring, no journal).
    #[arg(long, value_enum, default_value_t = Stage::Pipeline)]
    pub stage: Stage,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Pipeline,
    Execute,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub accounts: u32,
    pub transfers: u64,
    pub seconds: f64,
    /// Every transfer executed, the share built to be rejected (`--reject-share`) included.
    pub transfers_per_sec: f64,
    /// Committed transfers only.
    pub committed_per_sec: f64,
    /// `execute` stage only: transfers per second of the thread's own CPU time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_transfers_per_sec: Option<f64>,
    pub committed: u64,
    pub rejected: u64,
    pub rejected_by_code: Vec<(String, u64)>,
    /// Through the pipeline: each transfer's latency, from its submission (or, with `--rate`,
    /// its due time) to its outcome's delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<LatencyUs>,
    /// `execute` stage only: the execution time of each group of `--batch` commands (there is
    /// no per-transfer latency without the pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_time_us: Option<LatencyUs>,
    pub peak_rss_bytes: u64,
    pub bytes_per_account: f64,
    pub bytes_per_transaction_id: f64,
    pub journal_bytes: u64,
    pub journal_bytes_per_transfer: f64,
    pub sync: String,
    pub distribution: String,
    pub producers: usize,
    /// The offered rate (`--rate`, transfers per second); 0: unpaced, as fast as the pipeline
    /// takes them, so that `latency_us` is the latency at saturation (mostly queueing in the
    /// ring), not at a given load.
    pub rate: u64,
    /// With `--rate`: `transfers_per_sec` as a share of it; below 0.99 the run warns that the
    /// pipeline (or the producers) did not keep up, and its latencies are of a backlog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_achieved_share: Option<f64>,
    /// Commands per batch publication (`--batch`).
    pub batch: usize,
    pub seed: u64,
    pub reject_share: f64,
    /// The ring consumers' wait strategy (`--wait`).
    pub wait: String,
    pub ring_size: usize,
    pub state_hash: String,
}

impl BenchReport {
    /// A warning about a run that is not what was asked for: a paced run below its rate.
    pub fn warning(&self) -> Option<String> {
        let achieved = self.rate_achieved_share?;
        (achieved < 0.99).then(|| {
            format!(
                "WARNING: --rate {} was not reached: {:.0} transfers/s ({:.1}%); the latencies \
                 are of a backlog, not of the pipeline at that rate",
                self.rate,
                self.transfers_per_sec,
                achieved * 100.0
            )
        })
    }
}

struct BenchSink {
    base: Instant,
    histogram: Histogram<u64>,
    measuring: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
    committed: u64,
    rejected: [u64; 16],
    /// Setup commands (accounts, deposits) that were rejected: the run is then meaningless.
    setup_rejected: Arc<AtomicU64>,
    done: std::sync::mpsc::Sender<(Histogram<u64>, u64, [u64; 16])>,
    /// Clock reading for the batch being delivered.
    now: Option<u64>,
}

impl ReplySink for BenchSink {
    fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
        if slot.token == NO_TOKEN {
            return;
        }
        if !durable {
            // The engine halted (`wait_for` reports why); still counted, so nothing waits.
            self.replies.fetch_add(1, Ordering::Release);
            return;
        }
        // A replayed outcome repeats an earlier command (the generator makes none): not part of
        // this run's latency or counts.
        if self.measuring.load(Ordering::Relaxed) == 1 && !slot.record.replayed {
            // One clock read per delivered batch: its outcomes are delivered together.
            let base = self.base;
            let now = *self
                .now
                .get_or_insert_with(|| base.elapsed().as_nanos() as u64);
            let _ = self
                .histogram
                .record((now.saturating_sub(slot.submitted_ns) / 1000).max(1));
            match slot.record.rejection {
                None => self.committed += 1,
                Some(code) => self.rejected[code as usize] += 1,
            }
        } else if slot.record.rejection.is_some() {
            self.setup_rejected.fetch_add(1, Ordering::Relaxed);
        }
        self.replies.fetch_add(1, Ordering::Release);
    }

    fn end_of_batch(&mut self) {
        self.now = None;
    }
}

impl Drop for BenchSink {
    fn drop(&mut self) {
        let _ = self
            .done
            .send((self.histogram.clone(), self.committed, self.rejected));
    }
}

/// The bench's account ids: `acct-` and the index as 8 or more decimal digits. Built without
/// `format!` or a table lookup, as an API handler builds one from request bytes (a table of a
/// million ids would cost the producer two cache misses per transfer).
pub fn account_id(index: u32) -> AccountId {
    let mut bytes = *b"acct-0000000000";
    let mut at = bytes.len();
    let mut rest = index;
    while at > 5 && (rest > 0 || at > bytes.len() - 8) {
        at -= 1;
        bytes[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let digits = bytes.len() - at;
    bytes.copy_within(at.., 5);
    AccountId::from_bytes(&bytes[..5 + digits]).expect("bench account ids are valid")
}

/// Waits until `target` outcomes arrived; an error as soon as the engine halted.
fn wait_for(replies: &AtomicU64, shared: &EngineShared, target: u64) -> anyhow::Result<()> {
    while replies.load(Ordering::Acquire) < target {
        if let Some(reason) = shared.halt_reason() {
            anyhow::bail!("the engine halted: {reason}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // The last outcomes may have arrived undurable, with the halt, inside one sleep.
    if let Some(reason) = shared.halt_reason() {
        anyhow::bail!("the engine halted: {reason}");
    }
    Ok(())
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Publishes `batch`, retrying while the ring is full. Paced (`Some((first_due, per_second))`:
/// when its first command was due, and the producer's rate), each command's latency is measured
/// from its own due time, so that a producer that runs late does not hide its lateness; else
/// from now. Either way the time spent waiting for room in a full ring counts.
fn submit_all(
    submitter: &mut crate::engine::Submitter,
    batch: &[(Command, u64)],
    base: Instant,
    paced: Option<(Instant, f64)>,
) {
    let ns = |at: Instant| at.saturating_duration_since(base).as_nanos() as u64;
    let now = ns(Instant::now());
    loop {
        let submitted = match paced {
            None => submitter.try_submit_batch(batch, now),
            Some((first_due, per_second)) => submitter.try_submit_stamped(batch, |i| {
                ns(first_due + Duration::from_secs_f64(i as f64 / per_second)).min(now)
            }),
        };
        if submitted.is_ok() {
            return;
        }
        std::thread::yield_now();
    }
}

/// Generates the benchmark's transfers, including the share built to be rejected.
pub struct TransferGenerator {
    rng: SplitMix,
    ids: Arc<Vec<AccountId>>,
    ghost: AccountId,
    last_id: TransactionId,
    distribution: Distribution,
    zipf: Zipf,
    reject_share: f64,
    currency: Currency,
}

impl TransferGenerator {
    pub fn new(
        args: &BenchArgs,
        ids: Arc<Vec<AccountId>>,
        stream: u64,
        currency: Currency,
    ) -> TransferGenerator {
        let mut rng = SplitMix::new(xxhash_rust::xxh3::xxh3_64_with_seed(
            &args.seed.to_le_bytes(),
            stream + 1,
        ));
        let last_id = TransactionId(rng.next_u128());
        TransferGenerator {
            rng,
            zipf: Zipf::new(ids.len() as u64),
            ids,
            ghost: AccountId::new("ghost-account").expect("valid"),
            last_id,
            distribution: args.distribution,
            reject_share: args.reject_share,
            currency,
        }
    }

    fn pick(&mut self) -> usize {
        let accounts = self.ids.len() as u64;
        match self.distribution {
            Distribution::Uniform => (self.rng.next_u64() % accounts) as usize,
            Distribution::Zipf => self.zipf.pick(self.rng.next_f64()) as usize,
        }
    }

    pub fn next_command(&mut self) -> Command {
        let from = self.pick();
        let mut to = self.pick();
        if to == from {
            to = (from + 1) % self.ids.len();
        }
        let mut transaction_id = TransactionId(self.rng.next_u128());
        let mut to_account = account_id(to as u32);
        let mut amount = 1 + self.rng.next_u64() % 100;
        if self.reject_share > 0.0 && self.rng.next_f64() < self.reject_share {
            match self.rng.next_u64() % 3 {
                0 => amount = 900_000_000_000_000,
                1 => to_account = self.ghost,
                _ => {
                    transaction_id = self.last_id;
                    amount += 1000;
                }
            }
        }
        self.last_id = transaction_id;
        Command {
            transaction_id,
            timestamp_ns: 0,
            kind: CommandKind::Transfer {
                from: account_id(from as u32),
                to: to_account,
                amount,
                currency: self.currency,
            },
        }
    }
}

/// Opens every account and deposits into it, directly on a ledger.
fn setup_ledger(ledger: &mut Ledger, ids: &[AccountId], currency: Currency, seed: u64) {
    let mut rng = SplitMix::new(xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()));
    for id in ids {
        for kind in [
            CommandKind::OpenAccount { account: *id },
            CommandKind::Deposit {
                account: *id,
                amount: 100_000_000,
                currency,
            },
        ] {
            let record = ledger.execute(&Command {
                transaction_id: TransactionId(rng.next_u128()),
                timestamp_ns: 0,
                kind,
            });
            assert!(
                record.is_committed(),
                "bench setup failed: {:?}",
                record.rejection
            );
        }
    }
}

/// Refuses a run whose ledger would not fit in this machine's memory (it aborted on allocation):
/// at most 64 bytes per account and per remembered id (README, Capacity: 48.8 and 43-63), the
/// ids sized for (`--id-capacity`) or created, whichever is more, and the rings.
fn check_memory(args: &BenchArgs) -> anyhow::Result<()> {
    let Ok(total) = crate::api::mem_total_bytes() else {
        return Ok(());
    };
    // Saturating: near the top of u64 the sum wrapped to a small number, and a run that could
    // never fit started and grew until killed.
    let ids = (id_table_capacity(args) as u64)
        .max(args.transfers.saturating_add(2 * u64::from(args.accounts)));
    let rings = if args.stage == Stage::Pipeline {
        args.ring_size as u64 * 512
    } else {
        0
    };
    let need = (u64::from(args.accounts).saturating_add(ids))
        .saturating_mul(64)
        .saturating_add(rings);
    anyhow::ensure!(
        need <= total,
        "--accounts {} and {ids} transaction ids need about {} MiB, more than this machine's {} \
         MiB: lower --accounts, --transfers or --id-capacity",
        args.accounts,
        need >> 20,
        total >> 20
    );
    Ok(())
}

/// The transaction ids the ledger's id table is sized for: `--id-capacity`, or every id the run
/// creates (a deposit and an opening per account, and the transfers).
fn id_table_capacity(args: &BenchArgs) -> usize {
    args.id_capacity.unwrap_or(
        usize::try_from(args.transfers)
            .unwrap_or(usize::MAX)
            .saturating_add(2 * args.accounts as usize),
    )
}

/// `Ledger::execute` alone: commands are generated up front (outside the timing) in chunks.
fn run_execute(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let usd = Currency::new("USD").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ledger = Ledger::with_capacity(
        LedgerConfig::default(),
        args.accounts as usize,
        id_table_capacity(args),
    );
    let ids: Arc<Vec<AccountId>> = Arc::new((0..args.accounts).map(account_id).collect());
    setup_ledger(&mut ledger, &ids, usd, args.seed);
    // As on the engine thread: id storage blocks come populated from a helper thread.
    ledger.release_spare_id_blocks();
    let id_blocks = crate::engine::prepare_id_blocks();
    let mut tables = crate::engine::TableHelper::start();
    // The stream of the pipeline's first producer: with one producer (and no checkpoint in the
    // run), both stages execute the same commands and reach the same `state_hash`.
    let mut generator = TransferGenerator::new(args, ids, 1, usd);
    // Commands are generated in chunks small enough to stay in cache, like commands a producer
    // just wrote into the ring (a chunk of a million would be read back from DRAM).
    let chunk = 1 << 14;
    let mut commands = Vec::with_capacity(chunk);
    let mut elapsed = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    let mut committed = 0u64;
    let mut rejected_codes = [0u64; 16];
    let mut remaining = args.transfers;
    // Execution time per group of `--batch` commands, in microseconds.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while remaining > 0 {
        let n = remaining.min(chunk as u64) as usize;
        commands.clear();
        commands.extend((0..n).map(|_| generator.next_command()));
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        for group in commands.chunks(args.batch.max(1)) {
            let group_started = Instant::now();
            ledger.execute_batch(group, |_, record| match record.rejection {
                None => committed += 1,
                Some(code) => rejected_codes[code as usize] += 1,
            });
            crate::engine::give_id_block(&mut ledger, id_blocks.as_ref());
            if let Some(tables) = tables.as_mut() {
                tables.tend(&mut ledger);
            }
            // The time each group took: a pause of the ledger (a table growing) shows as max.
            histogram.saturating_record(group_started.elapsed().as_micros() as u64);
        }
        elapsed += started.elapsed();
        cpu += thread_cpu_time().saturating_sub(cpu_started);
        remaining -= n as u64;
    }
    ledger
        .check_invariants()
        .map_err(|e| anyhow::anyhow!("invariant broken after bench: {e}"))?;
    let mut report = report(
        args,
        &ledger,
        elapsed.as_secs_f64(),
        committed,
        rejected_codes,
        &histogram,
        0,
    );
    report.cpu_transfers_per_sec = Some(args.transfers as f64 / cpu.as_secs_f64());
    Ok(report)
}

/// CPU time this thread has run: unlike wall time, it does not count time the thread spent
/// descheduled, so `execute` can be measured on a machine that is busy with other work.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `now`.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if result != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn report(
    args: &BenchArgs,
    ledger: &Ledger,
    seconds: f64,
    committed: u64,
    rejected_codes: [u64; 16],
    histogram: &Histogram<u64>,
    journal_bytes: u64,
) -> BenchReport {
    let memory = ledger.memory_usage();
    let percentiles = LatencyUs {
        p50: histogram.value_at_quantile(0.50),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        p9999: histogram.value_at_quantile(0.9999),
        max: histogram.max(),
    };
    BenchReport {
        accounts: args.accounts,
        transfers: args.transfers,
        seconds,
        transfers_per_sec: args.transfers as f64 / seconds,
        committed_per_sec: committed as f64 / seconds,
        cpu_transfers_per_sec: None,
        committed,
        rejected: rejected_codes.iter().sum(),
        rejected_by_code: RejectCode::ALL
            .iter()
            .filter(|c| rejected_codes[**c as usize] > 0)
            .map(|c| (c.code().to_string(), rejected_codes[*c as usize]))
            .collect(),
        latency_us: (args.stage != Stage::Execute).then_some(percentiles),
        group_time_us: (args.stage == Stage::Execute).then_some(percentiles),
        peak_rss_bytes: peak_rss_bytes(),
        bytes_per_account: memory.account_bytes as f64 / f64::from(ledger.account_count().max(1)),
        bytes_per_transaction_id: memory.transaction_id_bytes as f64
            / f64::from(ledger.transaction_id_count().max(1)),
        journal_bytes,
        journal_bytes_per_transfer: journal_bytes as f64 / args.transfers as f64,
        sync: match (args.stage, args.no_journal) {
            (Stage::Execute, _) => "execute-only".into(),
            (_, true) => "no-journal".into(),
            // Always named: builds before session 9 defaulted to `on`, so a label without it
            // would not tell two binaries' runs apart.
            _ => format!(
                "{:?}, journal readahead {}",
                args.sync, args.journal_readahead
            ),
        },
        distribution: format!("{:?}", args.distribution).to_lowercase(),
        producers: args.producers,
        rate: args.rate,
        // The execute stage runs unpaced whatever --rate says.
        rate_achieved_share: (args.rate > 0 && args.stage == Stage::Pipeline)
            .then(|| args.transfers as f64 / seconds / args.rate as f64),
        batch: args.batch,
        seed: args.seed,
        reject_share: args.reject_share,
        wait: format!("{:?}", args.wait),
        ring_size: args.ring_size,
        state_hash: format!("{:016x}", ledger.state_hash()),
    }
}

/// The most producer threads (`--producers`).
pub const MAX_PRODUCERS: usize = 256;

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!(args.transfers >= 1, "--transfers must be at least 1");
    anyhow::ensure!(
        (1..=MAX_PRODUCERS).contains(&args.producers),
        "--producers must be within 1..={MAX_PRODUCERS}, not {}",
        args.producers
    );
    if let Some(ids) = args.id_capacity {
        anyhow::ensure!(
            ids as u64 <= crate::engine::MAX_TRANSACTION_IDS,
            "--id-capacity must be at most {} (the ledger's id table addresses ids with 32 \
             bits), not {ids}",
            crate::engine::MAX_TRANSACTION_IDS
        );
    }
    if args.stage == Stage::Pipeline {
        crate::engine::check_ring_size(args.ring_size).map_err(anyhow::Error::msg)?;
    }
    check_memory(args)?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.reject_share),
        "--reject-share must be within 0..=1"
    );
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    if args.stage == Stage::Execute {
        // `Ledger::execute` alone, on this thread: no ring, producers, pacing or journal. A
        // flag for those would be ignored while the report named it.
        for (given, flag) in [
            (args.rate != 0, "--rate"),
            (args.producers != 1, "--producers"),
            (args.data_dir.is_some(), "--data-dir"),
            (args.sync != SyncMode::Batch, "--sync"),
            (args.no_journal, "--no-journal"),
            (args.segment_size != DEFAULT_SEGMENT_SIZE, "--segment-size"),
            (
                args.journal_readahead != crate::journal::storage::Readahead::default(),
                "--journal-readahead",
            ),
            (args.wait != WaitMode::BusySpin, "--wait"),
            (args.output_wait != WaitMode::Yield, "--output-wait"),
            (args.ring_size != DEFAULT_RING_SIZE, "--ring-size"),
            (args.pin_core != 1, "--pin-core"),
        ] {
            anyhow::ensure!(
                !given,
                "{flag} has no effect with --stage execute (Ledger::execute alone, on one \
                 thread: no ring, no producers, no pacing, no journal)"
            );
        }
        return run_execute(args);
    }
    // A batch is published whole or not at all: one larger than the ring would never fit.
    anyhow::ensure!(
        args.batch <= args.ring_size,
        "--batch ({}) must not exceed --ring-size ({})",
        args.batch,
        args.ring_size
    );
    if !args.no_journal {
        crate::journal::check_segment_size(args.segment_size).map_err(anyhow::Error::msg)?;
    }
    let usd = Currency::new("USD").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ledger = Ledger::with_capacity(
        LedgerConfig::default(),
        args.accounts as usize,
        id_table_capacity(args),
    );
    // The id table is sized for every id to come unless `--id-capacity` says otherwise, but their
    // storage blocks come as the engine needs them, as in a server taking new transfers: from
    // the engine's helper, which populates them ahead (`prepare_id_blocks`).
    ledger.release_spare_id_blocks();
    let temporary = match (&args.data_dir, args.no_journal) {
        (None, false) => Some(
            tempfile::Builder::new()
                .prefix("wallet-bench-")
                .tempdir_in(".")?,
        ),
        _ => None,
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| temporary.as_ref().map(|t| t.path().to_path_buf()));
    // Held to the end of the run, as `serve` holds it: a bench pointed at a live server's
    // directory (even one that has journaled nothing yet) is refused, not mixed into its journal.
    let _lock = match (&data_dir, args.no_journal) {
        (Some(dir), false) => Some(crate::api::lock_data_dir(dir)?),
        _ => None,
    };
    let journal = match (&data_dir, args.no_journal) {
        (Some(dir), false) => {
            let config = JournalConfig {
                dir: journal_dir(dir),
                segment_size_bytes: args.segment_size,
                sync: args.sync,
            };
            // Start-up's rules first: a directory whose journal lost records its watermark
            // says were synced is refused as `serve` refuses it, not written over.
            let durable = crate::journal::read_durable_watermark(&config.dir)?;
            let end = crate::journal::scan(&config.dir, 1, |_| Ok(()))?;
            crate::engine::recovery::check_durable_watermark(&config.dir, durable, &end)?;
            anyhow::ensure!(
                end.next_seq == 1 && end.torn_at.is_none(),
                "bench needs an empty data directory; {} holds a journal",
                config.dir.display()
            );
            // Snapshots without their journal (a backup restored in part, say): a journal
            // written from sequence 1 beside them would be another history.
            let snapshots = crate::journal::snapshot::list_snapshots(&snapshot_dir(dir));
            anyhow::ensure!(
                snapshots.is_empty(),
                "bench needs an empty data directory; {} holds {} snapshot(s)",
                snapshot_dir(dir).display(),
                snapshots.len()
            );
            let storage = MmapStorage {
                readahead: args.journal_readahead,
            };
            JournalStage::Journal(JournalWriter::open(Box::new(storage), config, &end)?)
        }
        _ => JournalStage::Off,
    };
    let base = Instant::now();
    let measuring = Arc::new(AtomicU64::new(0));
    let replies = Arc::new(AtomicU64::new(0));
    let (done_sender, done) = std::sync::mpsc::channel();
    let setup_rejected = Arc::new(AtomicU64::new(0));
    let sink = BenchSink {
        setup_rejected: setup_rejected.clone(),
        base,
        histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        measuring: measuring.clone(),
        replies: replies.clone(),
        committed: 0,
        rejected: [0; 16],
        done: done_sender,
        now: None,
    };
    let engine_config = EngineConfig {
        input_ring_size: args.ring_size,
        output_ring_size: args.ring_size,
        wait: args.wait,
        output_wait: Some(args.output_wait),
        pin_core: usize::try_from(args.pin_core).ok(),
        ..EngineConfig::default()
    };
    let engine = Engine::start(ledger, engine_config, journal, sink);

    // Setup: open every account and deposit into it (not measured).
    let ids: Arc<Vec<AccountId>> = Arc::new((0..args.accounts).map(account_id).collect());
    let mut submitter = engine.submitter();
    let mut rng = SplitMix::new(xxhash_rust::xxh3::xxh3_64(&args.seed.to_le_bytes()));
    let mut batch = Vec::with_capacity(args.batch);
    let mut setup_count = 0u64;
    for index in 0..args.accounts {
        for kind in [
            CommandKind::OpenAccount {
                account: ids[index as usize],
            },
            CommandKind::Deposit {
                account: ids[index as usize],
                amount: 100_000_000,
                currency: usd,
            },
        ] {
            batch.push((
                Command {
                    transaction_id: TransactionId(rng.next_u128()),
                    timestamp_ns: 0,
                    kind,
                },
                0,
            ));
            if batch.len() == args.batch {
                submit_all(&mut submitter, &batch, base, None);
                setup_count += batch.len() as u64;
                batch.clear();
            }
        }
    }
    submit_all(&mut submitter, &batch, base, None);
    setup_count += batch.len() as u64;
    wait_for(&replies, &engine.shared(), setup_count)?;
    let refused = setup_rejected.load(Ordering::Relaxed);
    anyhow::ensure!(
        refused == 0,
        "bench: {refused} of {setup_count} setup commands (opening accounts, deposits) were rejected"
    );
    let journal_bytes_before = engine.shared().journal_bytes.load(Ordering::Relaxed);

    // Measured phase: transfers from `producers` threads.
    measuring.store(1, Ordering::SeqCst);
    let started = Instant::now();
    let per_producer = args.transfers / args.producers as u64;
    let mut threads = Vec::new();
    for producer in 0..args.producers {
        let mut submitter = engine.submitter();
        let count = if producer == 0 {
            args.transfers - per_producer * (args.producers as u64 - 1)
        } else {
            per_producer
        };
        let mut generator = TransferGenerator::new(args, ids.clone(), producer as u64 + 1, usd);
        let batch_size = args.batch;
        // Each producer offers its share of `--rate`, command by command: what is due is
        // published before the producer sleeps, so a batch is only the backlog of a producer
        // that woke late, never commands held back for later ones (which put a floor of a
        // batch's period under every latency).
        let per_second = args.rate as f64 / args.producers as f64;
        threads.push(std::thread::spawn(move || {
            let mut batch: Vec<(Command, u64)> = Vec::with_capacity(batch_size);
            let paced_from = Instant::now();
            let due_of = |n: u64| paced_from + Duration::from_secs_f64(n as f64 / per_second);
            let paced = |first: u64| (per_second > 0.0).then(|| (due_of(first), per_second));
            let mut first = 0;
            for sent in 0..count {
                if per_second > 0.0 {
                    let due = due_of(sent);
                    let now = Instant::now();
                    if due > now {
                        submit_all(&mut submitter, &batch, base, paced(first));
                        batch.clear();
                        std::thread::sleep(due - now);
                    }
                }
                if batch.is_empty() {
                    first = sent;
                }
                batch.push((generator.next_command(), 0));
                if batch.len() == batch_size {
                    submit_all(&mut submitter, &batch, base, paced(first));
                    batch.clear();
                }
            }
            submit_all(&mut submitter, &batch, base, paced(first));
        }));
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a producer thread panicked"))?;
    }
    wait_for(&replies, &engine.shared(), setup_count + args.transfers)?;
    let seconds = started.elapsed().as_secs_f64();
    let journal_bytes =
        engine.shared().journal_bytes.load(Ordering::Relaxed) - journal_bytes_before;
    drop(submitter);
    let ledger = engine.shutdown()?;
    let (histogram, committed, rejected_codes) = done.recv()?;
    ledger
        .check_invariants()
        .map_err(|e| anyhow::anyhow!("invariant broken after bench: {e}"))?;
    Ok(report(
        args,
        &ledger,
        seconds,
        committed,
        rejected_codes,
        &histogram,
        journal_bytes,
    ))
}

pub fn print_table(r: &BenchReport) {
    println!(
        "wallet bench: {} accounts, {} transfers, {}, {} producer(s), sync {}, wait {}, batch {}, {}",
        r.accounts,
        r.transfers,
        r.distribution,
        r.producers,
        r.sync,
        r.wait,
        r.batch,
        if r.rate == 0 {
            "unpaced".to_string()
        } else {
            format!("rate {}/s", r.rate)
        }
    );
    println!(
        "  throughput        {:>14.0} transfers/s  ({:.3} s)",
        r.transfers_per_sec, r.seconds
    );
    if let Some(cpu) = r.cpu_transfers_per_sec {
        println!("  per CPU second    {cpu:>14.0} transfers/s  (the thread's own CPU time)");
    }
    println!(
        "  committed         {:>14}  ({:.0}/s)",
        r.committed, r.committed_per_sec
    );
    println!(
        "  rejected          {:>14}  {:?}",
        r.rejected, r.rejected_by_code
    );
    let latency_label = if r.rate == 0 {
        "latency us (sat.)"
    } else {
        "latency us       "
    };
    for (label, l) in [
        (latency_label, &r.latency_us),
        ("group time us    ", &r.group_time_us),
    ] {
        if let Some(l) = l {
            println!(
                "  {label} p50 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
                l.p50, l.p99, l.p999, l.p9999, l.max
            );
        }
    }
    println!("  peak RSS          {:>14} bytes", r.peak_rss_bytes);
    println!("  per account       {:>14.1} bytes", r.bytes_per_account);
    println!(
        "  per remembered id {:>14.1} bytes",
        r.bytes_per_transaction_id
    );
    println!(
        "  journal           {:>14} bytes ({:.1} per transfer)",
        r.journal_bytes, r.journal_bytes_per_transfer
    );
    println!("  state hash        {}", r.state_hash);
}
