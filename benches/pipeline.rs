//! The pipeline: input ring, engine thread, output ring (no journal), reply stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wallet::core::{
    AccountId, Command, CommandKind, Currency, Ledger, LedgerConfig, TransactionId,
};
use wallet::engine::{Engine, EngineConfig, JournalStage, OutputSlot, ReplySink, WaitMode};
use wallet::tools::rng::SplitMix;

#[global_allocator]
static ALLOCATOR: wallet::alloc::HugePageAlloc = wallet::alloc::HugePageAlloc;

const ACCOUNTS: u32 = 100_000;

struct Count(Arc<AtomicU64>);

impl ReplySink for Count {
    fn deliver(&mut self, _slot: &OutputSlot, _durable: bool) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

fn bench(c: &mut Criterion) {
    let usd = Currency::new("USD").unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let config = EngineConfig {
        wait: WaitMode::Yield,
        pin_core: None,
        checkpoint_every: 0,
        ..EngineConfig::default()
    };
    let engine = Engine::start(
        Ledger::with_capacity(LedgerConfig::default(), ACCOUNTS as usize, 30_000_000),
        config,
        JournalStage::Off,
        Count(done.clone()),
    );
    let mut submitter = engine.submitter();
    let ids: Vec<AccountId> = (0..ACCOUNTS)
        .map(wallet::tools::bench::account_id)
        .collect();
    let mut rng = SplitMix::new(9);
    let mut submitted = 0u64;
    let mut publish = |commands: &[(Command, u64)], submitted: &mut u64| {
        while submitter.try_submit_batch(commands, 0).is_err() {
            std::thread::yield_now();
        }
        *submitted += commands.len() as u64;
    };
    for chunk in ids.chunks(32) {
        let commands: Vec<(Command, u64)> = chunk
            .iter()
            .flat_map(|a| {
                [
                    CommandKind::OpenAccount { account: *a },
                    CommandKind::Deposit {
                        account: *a,
                        amount: 100_000_000,
                        currency: usd,
                    },
                ]
            })
            .map(|kind| {
                (
                    Command {
                        transaction_id: TransactionId(rng.next_u128()),
                        timestamp_ns: 0,
                        kind,
                    },
                    0,
                )
            })
            .collect();
        publish(&commands, &mut submitted);
    }
    let mut group = c.benchmark_group("pipeline_100k_accounts");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("transfer_through_rings", |b| {
        b.iter_custom(|iters| {
            let commands: Vec<(Command, u64)> = (0..iters)
                .map(|_| {
                    let from = (rng.next_u64() % u64::from(ACCOUNTS)) as usize;
                    let to = (from + 1) % ACCOUNTS as usize;
                    let kind = CommandKind::Transfer {
                        from: ids[from],
                        to: ids[to],
                        amount: 1,
                        currency: usd,
                    };
                    (
                        Command {
                            transaction_id: TransactionId(rng.next_u128()),
                            timestamp_ns: 0,
                            kind,
                        },
                        0,
                    )
                })
                .collect();
            let started = Instant::now();
            for chunk in commands.chunks(64) {
                publish(chunk, &mut submitted);
            }
            while done.load(Ordering::Acquire) < submitted {
                std::thread::yield_now();
            }
            started.elapsed()
        })
    });
    group.finish();
    drop(submitter);
    drop(engine.shutdown().expect("the engine did not fail"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
