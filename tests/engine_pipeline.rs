//! The whole pipeline: input ring, engine thread, journal stage and reply stage. Outcomes,
//! durability against recovery, concurrent retries of one transaction id, and back-pressure.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use wallet::core::{
    AccountId, Command, CommandKind, CommandRecord, Currency, Ledger, LedgerConfig, MinorUnits,
    RejectCode, TransactionId,
};
use wallet::engine::recovery::recover;
use wallet::engine::{
    Engine, EngineConfig, JournalStage, NO_TOKEN, OutputSlot, ReplySink, Submitter, WaitMode,
};
use wallet::journal::storage::MmapStorage;
use wallet::journal::{JournalConfig, JournalEnd, JournalWriter, SyncMode, journal_dir};

const WAIT: Duration = Duration::from_secs(10);

type Delivery = (u64, CommandRecord, bool);

/// Sends every delivered outcome (token, record, durable) to the test thread.
struct ChannelSink(mpsc::Sender<Delivery>);

impl ReplySink for ChannelSink {
    fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
        let _ = self.0.send((slot.token, slot.record, durable));
    }
}

/// The disruptor's multi-producer input ring needs at least 64 slots.
fn config(input_ring_size: usize, output_ring_size: usize, checkpoint_every: u64) -> EngineConfig {
    EngineConfig {
        input_ring_size,
        output_ring_size,
        wait: WaitMode::Sleep(Duration::from_micros(50)),
        pin_core: None,
        checkpoint_every,
        snapshot_every: 0,
        snapshot_dir: None,
        // Anything added later keeps its default (waits default to `wait`).
        ..EngineConfig::default()
    }
}

fn usd() -> Currency {
    Currency::new("USD").unwrap()
}

fn account(name: &str) -> AccountId {
    AccountId::new(name).unwrap()
}

fn command(id: u128, kind: CommandKind) -> Command {
    Command {
        transaction_id: TransactionId(id),
        timestamp_ns: 1_700_000_000_000_000_000 + id as u64,
        kind,
    }
}

/// Submits, retrying while the input ring is full; fails the test after `WAIT`.
fn submit(submitter: &mut Submitter, command: Command, token: u64) {
    let deadline = Instant::now() + WAIT;
    while submitter.try_submit(command, token, 0).is_err() {
        assert!(
            Instant::now() < deadline,
            "the input ring stayed full for {WAIT:?}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The receiving end of a `ChannelSink`.
struct Replies {
    receiver: mpsc::Receiver<Delivery>,
    /// Checkpoint outcomes seen (they carry no token).
    checkpoints: u64,
}

impl Replies {
    fn new(receiver: mpsc::Receiver<Delivery>) -> Replies {
        Replies {
            receiver,
            checkpoints: 0,
        }
    }

    /// The next delivery for a caller; checkpoints are counted and skipped.
    fn next(&mut self) -> Delivery {
        loop {
            let delivery = self
                .receiver
                .recv_timeout(WAIT)
                .expect("an outcome within the timeout");
            if delivery.0 != NO_TOKEN {
                return delivery;
            }
            assert!(delivery.2, "a checkpoint was not durable");
            self.checkpoints += 1;
        }
    }

    /// After shutdown: counts the remaining checkpoints; fails on any other outcome.
    fn drain(&mut self) {
        for delivery in self.receiver.try_iter() {
            assert_eq!(delivery.0, NO_TOKEN, "an unexpected outcome");
            self.checkpoints += 1;
        }
    }
}

fn journal_writer(data: &Path) -> JournalWriter {
    let end = JournalEnd::empty();
    let config = JournalConfig {
        dir: journal_dir(data),
        segment_size_bytes: 1 << 20,
        sync: SyncMode::Batch,
    };
    JournalWriter::open(Box::new(MmapStorage::default()), config, &end).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Committed,
    Rejected(RejectCode),
    /// An idempotent repeat of the command with this id.
    Replayed(u128),
}

fn scenario() -> Vec<(Command, Expect)> {
    let (alice, bob, carol) = (account("alice"), account("bob"), account("carol"));
    let transfer = CommandKind::Transfer {
        from: alice,
        to: bob,
        amount: 300,
        currency: usd(),
    };
    vec![
        (
            command(1, CommandKind::OpenAccount { account: alice }),
            Expect::Committed,
        ),
        (
            command(2, CommandKind::OpenAccount { account: bob }),
            Expect::Committed,
        ),
        (
            command(3, CommandKind::OpenAccount { account: carol }),
            Expect::Committed,
        ),
        (
            command(
                4,
                CommandKind::Deposit {
                    account: alice,
                    amount: 1_000,
                    currency: usd(),
                },
            ),
            Expect::Committed,
        ),
        (command(5, transfer), Expect::Committed),
        (
            command(
                6,
                CommandKind::Withdraw {
                    account: bob,
                    amount: 100,
                    currency: usd(),
                },
            ),
            Expect::Committed,
        ),
        (
            command(
                7,
                CommandKind::Transfer {
                    from: bob,
                    to: carol,
                    amount: 500,
                    currency: usd(),
                },
            ),
            Expect::Rejected(RejectCode::InsufficientFunds),
        ),
        (
            command(
                8,
                CommandKind::Deposit {
                    account: account("ghost"),
                    amount: 1,
                    currency: usd(),
                },
            ),
            Expect::Rejected(RejectCode::AccountNotFound),
        ),
        (
            command(9, CommandKind::OpenAccount { account: bob }),
            Expect::Rejected(RejectCode::AccountAlreadyExists),
        ),
        (command(5, transfer), Expect::Replayed(5)),
        (
            command(
                5,
                CommandKind::Transfer {
                    from: alice,
                    to: bob,
                    amount: 301,
                    currency: usd(),
                },
            ),
            Expect::Rejected(RejectCode::TransactionIdReused),
        ),
        (
            command(
                10,
                CommandKind::Transfer {
                    from: bob,
                    to: carol,
                    amount: 200,
                    currency: usd(),
                },
            ),
            Expect::Committed,
        ),
    ]
}

/// Runs the scenario through an engine and checks every outcome; returns the final ledger.
fn run_scenario(stage: JournalStage, checkpoint_every: u64) -> Ledger {
    let (sender, receiver) = mpsc::channel();
    let engine = Engine::start(
        Ledger::new(LedgerConfig::default()),
        config(64, 64, checkpoint_every),
        stage,
        ChannelSink(sender),
    );
    let mut replies = Replies::new(receiver);
    let mut submitter = engine.submitter();
    let steps = scenario();
    let mut first_seq_of: BTreeMap<u128, u64> = BTreeMap::new();
    let mut expected_seq = 1;
    for (token, (command, expect)) in steps.iter().enumerate() {
        // One at a time, so that the expected sequence numbers are known.
        submit(&mut submitter, *command, token as u64);
        let (got_token, record, durable) = replies.next();
        assert_eq!(got_token, token as u64);
        assert!(durable, "step {token}: outcome not durable");
        assert_eq!(record.transaction_id, command.transaction_id);
        match expect {
            Expect::Committed | Expect::Rejected(_) => {
                let want = match expect {
                    Expect::Rejected(code) => Some(*code),
                    _ => None,
                };
                assert_eq!(
                    (record.replayed, record.rejection),
                    (false, want),
                    "step {token}"
                );
                // Checkpoints between commands take sequence numbers too.
                assert!(record.first_seq >= expected_seq, "step {token}");
                expected_seq = record.next_seq();
                first_seq_of
                    .entry(command.transaction_id.0)
                    .or_insert(record.first_seq);
            }
            Expect::Replayed(id) => {
                assert!(record.replayed, "step {token}");
                assert_eq!(record.first_seq, first_seq_of[id]);
                assert_eq!(record.rejection, None);
            }
        }
    }
    let shared = engine.shared();
    drop(submitter);
    let ledger = engine.shutdown().expect("the engine did not fail");
    assert!(!shared.halted.load(Ordering::SeqCst));
    assert_eq!(
        shared.durable_seq.load(Ordering::SeqCst),
        ledger.next_seq() - 1
    );
    // Every caller's outcome was handed to the sink (`completed` counts those, not the
    // checkpoints, so that `submitted - completed` is the ring depth /metrics shows).
    replies.drain();
    assert_eq!(
        shared.completed.load(Ordering::SeqCst),
        shared.submitted.load(Ordering::SeqCst)
    );
    // The scenario is a few dozen events: any interval up to that writes some checkpoints,
    // 0 writes none, and a huge one (u64::MAX: "practically never") none either, rather than
    // wrapping round to a checkpoint after every group.
    assert_eq!(
        replies.checkpoints > 0,
        checkpoint_every > 0 && checkpoint_every <= 8,
        "{} checkpoints at checkpoint_every {checkpoint_every}",
        replies.checkpoints
    );

    let balance = |name: &str| {
        ledger
            .account_index(&account(name))
            .and_then(|i| ledger.balance(i, usd()))
    };
    assert_eq!(
        (balance("alice"), balance("bob"), balance("carol")),
        (Some(700), Some(0), Some(200))
    );
    assert_eq!(balance("ghost"), None);
    ledger.check_invariants().unwrap();
    ledger
}

#[test]
fn outcomes_without_a_journal() {
    let ledger = run_scenario(JournalStage::Off, 0);
    assert_eq!(ledger.transaction_id_count(), 10);
    let ledger = run_scenario(JournalStage::Off, u64::MAX);
    assert_eq!(ledger.transaction_id_count(), 10);
}

#[test]
fn outcomes_with_a_journal_match_recovery() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let ledger = run_scenario(JournalStage::Journal(journal_writer(data)), 4);
    let recovered = recover(data, LedgerConfig::default(), false, |_, _| {}).unwrap();
    assert_eq!(recovered.ledger.state_hash(), ledger.state_hash());
    assert_eq!(recovered.ledger.next_seq(), ledger.next_seq());
    assert!(recovered.checkpoints_verified > 0);
}

#[test]
fn one_transaction_id_from_eight_threads_executes_once() {
    const THREADS: u64 = 8;
    const IDS: u128 = 50;
    let (alice, bob) = (account("alice"), account("bob"));
    let mut ledger = Ledger::new(LedgerConfig::default());
    for (id, kind) in [
        (1, CommandKind::OpenAccount { account: alice }),
        (2, CommandKind::OpenAccount { account: bob }),
        (
            3,
            CommandKind::Deposit {
                account: alice,
                amount: 10_000,
                currency: usd(),
            },
        ),
    ] {
        assert!(ledger.execute(&command(id, kind)).is_committed());
    }
    let (sender, receiver) = mpsc::channel();
    let engine = Engine::start(
        ledger,
        config(64, 16, 0),
        JournalStage::Off,
        ChannelSink(sender),
    );
    let mut replies = Replies::new(receiver);
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let mut submitter = engine.submitter();
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                for id in 0..IDS {
                    // The same body from every thread (the timestamp is not part of it).
                    let kind = CommandKind::Transfer {
                        from: alice,
                        to: bob,
                        amount: 1 + id as MinorUnits,
                        currency: usd(),
                    };
                    let retry = Command {
                        transaction_id: TransactionId(1_000 + id),
                        timestamp_ns: thread,
                        kind,
                    };
                    submit(&mut submitter, retry, thread * 1_000 + id as u64);
                }
            });
        }
    });
    let mut by_id: BTreeMap<u128, Vec<CommandRecord>> = BTreeMap::new();
    for _ in 0..THREADS * IDS as u64 {
        let (token, record, durable) = replies.next();
        assert!(durable);
        assert_eq!(
            u128::from(token % 1_000) + 1_000,
            record.transaction_id.0,
            "the token matches its command"
        );
        by_id
            .entry(record.transaction_id.0)
            .or_default()
            .push(record);
    }
    let ledger = engine.shutdown().expect("the engine did not fail");
    replies.drain();
    assert_eq!(replies.checkpoints, 0, "no extra outcomes");
    assert_eq!(by_id.len(), IDS as usize);
    for (id, records) in &by_id {
        assert_eq!(records.len(), THREADS as usize);
        let executed: Vec<&CommandRecord> = records.iter().filter(|r| !r.replayed).collect();
        assert_eq!(
            executed.len(),
            1,
            "id {id} executed {} times",
            executed.len()
        );
        assert!(executed[0].is_committed());
        assert!(
            records
                .iter()
                .all(|r| r.first_seq == executed[0].first_seq && r.rejection.is_none()),
            "id {id}"
        );
    }
    let moved: MinorUnits = (0..IDS as u64).map(|id| 1 + id).sum();
    let balance = |a: &AccountId| ledger.balance(ledger.account_index(a).unwrap(), usd());
    assert_eq!(balance(&bob), Some(moved));
    assert_eq!(balance(&alice), Some(10_000 - moved));
    assert_eq!(ledger.transaction_id_count(), 3 + IDS as u32);
}

/// Holds the first delivery until the test opens the gate, so that the rings fill up.
struct GatedSink {
    gate: Option<mpsc::Receiver<()>>,
    out: mpsc::Sender<Delivery>,
}

impl ReplySink for GatedSink {
    fn deliver(&mut self, slot: &OutputSlot, durable: bool) {
        if let Some(gate) = self.gate.take() {
            // Bounded: a broken test cannot hang the reply thread for ever.
            let _ = gate.recv_timeout(Duration::from_secs(20));
        }
        let _ = self.out.send((slot.token, slot.record, durable));
    }
}

#[test]
fn a_full_input_ring_is_reported_as_overloaded_and_nothing_accepted_is_lost() {
    let (open_gate, gate) = mpsc::channel();
    let (sender, receiver) = mpsc::channel();
    let mut ledger = Ledger::new(LedgerConfig::default());
    assert!(
        ledger
            .execute(&command(
                1,
                CommandKind::OpenAccount {
                    account: account("alice")
                }
            ))
            .is_committed()
    );
    let engine = Engine::start(
        ledger,
        config(64, 4, 0),
        JournalStage::Off,
        GatedSink {
            gate: Some(gate),
            out: sender,
        },
    );
    let mut replies = Replies::new(receiver);
    let mut submitter = engine.submitter();
    let deposit = |i: u64| {
        command(
            100 + u128::from(i),
            CommandKind::Deposit {
                account: account("alice"),
                amount: 1 + i,
                currency: usd(),
            },
        )
    };

    // The reply stage is stuck on the first outcome, so after the output ring (4) and the input
    // ring (64) have filled, the input ring must refuse.
    let mut accepted = 0u64;
    let deadline = Instant::now() + WAIT;
    while submitter.try_submit(deposit(accepted), accepted, 0).is_ok() {
        accepted += 1;
        assert!(
            accepted <= 64 + 4 + 8,
            "accepted {accepted} commands with a stuck sink"
        );
        assert!(
            Instant::now() < deadline,
            "no back-pressure within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(
        accepted >= 64,
        "only {accepted} accepted before the ring was full"
    );
    // Still full while the sink is stuck: the engine cannot drain.
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        submitter
            .try_submit(deposit(accepted), accepted, 0)
            .is_err()
    );
    assert!(engine.shared().overloaded.load(Ordering::SeqCst) >= 2);

    open_gate.send(()).unwrap();
    for token in 0..accepted {
        let (got, record, durable) = replies.next();
        assert_eq!(got, token, "outcomes come in submission order");
        assert!(
            durable && record.is_committed() && !record.replayed,
            "token {token}"
        );
    }
    // Accepting again once drained.
    submit(&mut submitter, deposit(accepted), accepted);
    assert_eq!(replies.next().0, accepted);
    drop(submitter);
    let ledger = engine.shutdown().expect("the engine did not fail");
    let alice = ledger.account_index(&account("alice")).unwrap();
    assert_eq!(
        ledger.balance(alice, usd()),
        Some((0..=accepted).map(|i| 1 + i).sum())
    );
}

/// Runs `wallet ARGS --json` to the end (a failure fails the test) and returns its report.
fn wallet_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(args)
        .arg("--json")
        .env("WALLET_LOG", "warn")
        .output()
        .expect("run wallet");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// `wallet bench`'s report adds up, and its journal replays to the state it reports: every
/// measured transfer is counted once (committed or rejected, each code of the rejected share
/// present), the events and remembered ids the journal holds are exactly what those counts
/// imply, and `wallet replay` reaches the bench's `state_hash`; so does `--stage execute`
/// (`Ledger::execute` alone, no ring) on the same seed.
#[test]
fn bench_report_adds_up_and_its_journal_replays_to_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_dir = data.to_str().unwrap();
    let wallet = |args: &[&str]| wallet_json(&[args, &["--data-dir", data_dir]].concat());
    let (accounts, transfers) = (1_000u64, 20_000u64);
    let bench = wallet(&[
        "bench",
        "--accounts",
        &accounts.to_string(),
        "--transfers",
        &transfers.to_string(),
        "--sync",
        "none",
        "--wait",
        "park",
        "--output-wait",
        "park",
        "--pin-core=-1",
    ]);
    let count = |v: &serde_json::Value| v.as_u64().expect("a count");
    let (committed, rejected) = (count(&bench["committed"]), count(&bench["rejected"]));
    assert_eq!(committed + rejected, transfers, "{bench}");
    let codes: BTreeMap<String, u64> = bench["rejected_by_code"]
        .as_array()
        .expect("rejected_by_code")
        .iter()
        .map(|pair| (pair[0].as_str().unwrap().to_string(), count(&pair[1])))
        .collect();
    for code in [
        "account_not_found",
        "insufficient_funds",
        "transaction_id_reused",
    ] {
        assert!(codes.get(code).is_some_and(|&n| n > 0), "{code}: {bench}");
    }
    assert_eq!(codes.values().sum::<u64>(), rejected, "{bench}");
    let per_transfer = bench["journal_bytes_per_transfer"].as_f64().unwrap();
    assert!((64.0..=128.0).contains(&per_transfer), "{bench}");

    let replay = wallet(&["replay"]);
    assert_eq!(replay["ok"], true, "{replay}");
    assert_eq!(replay["state_hash"], bench["state_hash"], "{replay}");
    // (40,000 events: no checkpoint record, which only the pipeline writes, shifts sequences.)
    // No data directory: `--stage execute` writes no journal, and refuses one.
    let execute = wallet_json(&[
        "bench",
        "--accounts",
        &accounts.to_string(),
        "--transfers",
        &transfers.to_string(),
        "--stage",
        "execute",
    ]);
    assert_eq!(execute["state_hash"], bench["state_hash"], "{execute}");
    // Its percentiles are of groups' execution times, and named so.
    assert!(execute.get("latency_us").is_none(), "{execute}");
    assert!(
        execute["group_time_us"]["max"].as_u64().is_some(),
        "{execute}"
    );
    assert!(bench.get("group_time_us").is_none(), "{bench}");
    assert_eq!(execute["committed"], bench["committed"], "{execute}");
    // Setup: an opening and a deposit per account, one event each. A committed transfer is two
    // events, a rejection one; a reused id is rejected but remembers nothing new.
    assert_eq!(count(&replay["accounts"]), accounts);
    assert_eq!(
        count(&replay["events"]),
        2 * accounts + 2 * committed + rejected,
        "{replay}"
    );
    assert_eq!(
        count(&replay["transaction_ids"]),
        2 * accounts + transfers - codes["transaction_id_reused"],
        "{replay}"
    );

    // A bench refuses a directory with a journal, and one whose journal lost the records its
    // durable watermark says were synced (here: every segment removed), as `serve` would: it
    // must not write over what may be acknowledged history.
    let bench_again = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args([
                "bench",
                "--accounts",
                "10",
                "--transfers",
                "10",
                "--sync",
                "none",
            ])
            .args(["--wait", "park", "--output-wait", "park", "--pin-core=-1"])
            .arg("--data-dir")
            .arg(&data)
            .env("WALLET_LOG", "warn")
            .output()
            .expect("run wallet")
    };
    let out = bench_again();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs an empty data directory"), "{stderr}");
    for (_, segment) in wallet::journal::list_segments(&data.join("journal")).unwrap() {
        std::fs::remove_file(segment).unwrap();
    }
    let out = bench_again();
    assert!(!out.status.success(), "bench wrote over a lost journal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("durable watermark"), "{stderr}");
}

/// A bench whose ids cannot fit in memory is refused at once, up to the top of u64: past
/// u64::MAX - 2 * accounts the size check wrapped to a small number, and the run started and
/// grew (760 MB in 8 s) until killed.
#[test]
fn a_bench_too_large_for_memory_is_refused_up_to_the_top_of_u64() {
    for transfers in [
        "18446744073709551596",
        "18446744073709551615",
        "4000000000000",
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["bench", "--accounts", "10", "--transfers", transfers])
            .args(["--no-journal", "--wait", "park", "--output-wait", "park"])
            .arg("--pin-core=-1")
            .env("WALLET_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run wallet");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("--transfers {transfers}: still running after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert!(!status.success(), "--transfers {transfers}: {stderr}");
        assert!(
            stderr.contains("more than this machine's"),
            "--transfers {transfers}: {stderr}"
        );
    }
}

/// `wallet bench --rate`: commands are published as they fall due, each stamped with its own
/// due time, so the latencies are the pipeline's. The producer held each batch of 64 until its
/// last command was due and stamped all with the first's due time: at 1,000/s every latency
/// had a floor of about 63 ms of the tool's own waiting.
#[test]
fn a_paced_bench_measures_the_pipeline_not_its_own_batching() {
    let report = wallet_json(&[
        "bench",
        "--accounts",
        "1000",
        "--transfers",
        "2000",
        "--rate",
        "1000",
        "--no-journal",
        "--wait",
        "park",
        "--output-wait",
        "park",
        "--pin-core=-1",
    ]);
    let p50 = report["latency_us"]["p50"].as_u64().expect("p50");
    // A parked pipeline answers in well under a millisecond; the bound is loose for a noisy
    // machine, and far below the old floor.
    assert!(p50 < 20_000, "p50 {p50} us: {report}");
    // Paced, not faster: 2,000 transfers at 1,000/s take about 2 s.
    assert!(report["seconds"].as_f64().unwrap() >= 1.9, "{report}");
    // The report says it was paced, and at what rate.
    assert_eq!(report["rate"], 1000, "{report}");
    let achieved = report["rate_achieved_share"]
        .as_f64()
        .expect("achieved share");
    assert!((0.8..=1.01).contains(&achieved), "{report}");
}

/// A paced bench that cannot reach its rate says so: its report carries the rate and the share
/// reached, and a warning names it. (The report had no rate at all: a run at 10 M/s that
/// reached 1.4 M/s read as a paced run, its latencies those of a backlog.)
#[test]
fn a_paced_bench_below_its_rate_warns() {
    let bench = |transfers: &str, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["bench", "--accounts", "1000", "--transfers", transfers])
            .args(["--no-journal", "--json"])
            .args(["--wait", "park", "--output-wait", "park", "--pin-core=-1"])
            .args(extra)
            .env("WALLET_LOG", "warn")
            .output()
            .expect("run wallet");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        (report, stderr)
    };
    let (report, stderr) = bench("20000", &["--rate", "1000000000"]);
    assert_eq!(report["rate"], 1_000_000_000u64, "{report}");
    let achieved = report["rate_achieved_share"]
        .as_f64()
        .expect("achieved share");
    assert!(achieved < 0.5, "{report}");
    assert!(
        stderr.contains("WARNING: --rate 1000000000 was not reached"),
        "{stderr}"
    );
    // Unpaced: rate 0, no share, no warning.
    let (report, stderr) = bench("2000", &[]);
    assert_eq!(report["rate"], 0, "{report}");
    assert!(report.get("rate_achieved_share").is_none(), "{report}");
    assert!(!stderr.contains("WARNING"), "{stderr}");
}
