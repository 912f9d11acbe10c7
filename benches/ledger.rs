//! `Ledger::execute` alone (and `execute_batch` with prefetching), 1,000,000 accounts, uniform.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wallet::core::{
    AccountId, Command, CommandKind, Currency, Ledger, LedgerConfig, TransactionId,
};
use wallet::tools::rng::SplitMix;

#[global_allocator]
static ALLOCATOR: wallet::alloc::HugePageAlloc = wallet::alloc::HugePageAlloc;

const ACCOUNTS: u32 = 1_000_000;

fn setup() -> (Ledger, Vec<AccountId>, Currency) {
    let usd = Currency::new("USD").unwrap();
    let mut ledger = Ledger::with_capacity(LedgerConfig::default(), ACCOUNTS as usize, 40_000_000);
    let ids: Vec<AccountId> = (0..ACCOUNTS)
        .map(wallet::tools::bench::account_id)
        .collect();
    let mut id = 1u128 << 100;
    for account in &ids {
        for kind in [
            CommandKind::OpenAccount { account: *account },
            CommandKind::Deposit {
                account: *account,
                amount: 100_000_000,
                currency: usd,
            },
        ] {
            id += 1;
            ledger.execute(&Command {
                transaction_id: TransactionId(id),
                timestamp_ns: 0,
                kind,
            });
        }
    }
    (ledger, ids, usd)
}

fn transfers(ids: &[AccountId], usd: Currency, n: usize, seed: u64) -> Vec<Command> {
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            let from = (rng.next_u64() % u64::from(ACCOUNTS)) as usize;
            let to = (from + 1 + (rng.next_u64() % u64::from(ACCOUNTS - 1)) as usize)
                % ACCOUNTS as usize;
            Command {
                transaction_id: TransactionId(rng.next_u128()),
                timestamp_ns: 0,
                kind: CommandKind::Transfer {
                    from: ids[from],
                    to: ids[to],
                    amount: 1 + rng.next_u64() % 100,
                    currency: usd,
                },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    // Each function gets a ledger of its own, set up the same way: sharing one, the second
    // measured a ledger holding the first's tens of millions of ids (past the table's sizing,
    // so grown), and the two were not comparable.
    let (mut ledger, ids, usd) = setup();
    let mut group = c.benchmark_group("ledger_1m_accounts_uniform");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    let mut seed = 1;
    // Fresh transaction ids every iteration batch: a remembered id would be a cheap replay.
    group.bench_function("execute", |b| {
        b.iter_custom(|iters| {
            seed += 1;
            let commands = transfers(&ids, usd, iters as usize, seed);
            let started = Instant::now();
            for command in &commands {
                black_box(ledger.execute(command));
            }
            started.elapsed()
        })
    });
    drop(ledger);
    let (mut ledger, _, _) = setup();
    group.bench_function("execute_batch_64", |b| {
        b.iter_custom(|iters| {
            seed += 1;
            let commands = transfers(&ids, usd, iters as usize, seed);
            let started = Instant::now();
            for chunk in commands.chunks(64) {
                ledger.execute_batch(chunk, |_, record| {
                    black_box(record);
                });
            }
            started.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
