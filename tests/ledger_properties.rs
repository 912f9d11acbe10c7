//! Property tests: the ledger against a simple reference model built on `BTreeMap`, replay and
//! codec round trips, and decoders fed hostile bytes.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use wallet::core::codec::{
    DecodeError, SNAPSHOT_HEADER_BYTES, check_snapshot, decode_record, decode_snapshot,
    encode_record, encode_snapshot, payload_len, prepare_snapshot,
};
use wallet::core::{
    AccountId, Command, CommandKind, CommandRecord, Currency, EventKind, Ledger, LedgerConfig,
    MinorUnits, RejectCode, TransactionId,
};

/// Three of them longer than the 13 bytes a slot holds inline, of one length and one head.
const NAMES: [&str; 6] = [
    "alice",
    "customer:0000000001",
    "customer:0000000002",
    "dave",
    "erin",
    "customer:0000000003",
];

/// Small limits, so that `invalid_amount` and `too_many_accounts` happen in random runs.
const CONFIG: LedgerConfig = LedgerConfig {
    max_amount: 500,
    max_accounts: 5,
    id_hash_key: wallet::core::table::DEFAULT_ID_HASH_KEY,
};

/// The same rules under another transaction-id hash key (a server draws its key at random):
/// the key decides where ids are stored, never an outcome or the state hash.
const OTHER_KEY: LedgerConfig = LedgerConfig {
    id_hash_key: 0x0123_4567_89AB_CDEF,
    ..CONFIG
};

fn currencies() -> [Currency; 3] {
    [
        Currency::new("USD").unwrap(),
        Currency::new("EUR").unwrap(),
        Currency::NONE,
    ]
}

// ---------------------------------------------------------------------------------------------
// Generated commands
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open(usize),
    Deposit(usize, MinorUnits, usize),
    Withdraw(usize, MinorUnits, usize),
    Transfer(usize, usize, MinorUnits, usize),
    /// Resubmits an earlier command: same id and body, a new timestamp.
    Retry(Index),
}

#[derive(Debug, Clone)]
struct Step {
    id: u128,
    timestamp_ns: u64,
    op: Op,
}

fn amount() -> impl Strategy<Value = MinorUnits> {
    prop_oneof![1 => Just(0), 12 => 1..=150u64, 2 => 490..=510u64]
}

fn currency_index() -> impl Strategy<Value = usize> {
    prop_oneof![10 => Just(0usize), 10 => Just(1usize), 1 => Just(2usize)]
}

/// Most traffic goes to three accounts, so that balances build up and transfers go through.
fn who() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![3 => 0..3usize, 1 => 3..NAMES.len()]
}

fn op() -> impl Strategy<Value = Op> {
    let who = who();
    prop_oneof![
        4 => who.clone().prop_map(Op::Open),
        6 => (who.clone(), amount(), currency_index()).prop_map(|(a, m, c)| Op::Deposit(a, m, c)),
        3 => (who.clone(), amount(), currency_index()).prop_map(|(a, m, c)| Op::Withdraw(a, m, c)),
        5 => (who.clone(), who, amount(), currency_index()).prop_map(|(f, t, m, c)| Op::Transfer(f, t, m, c)),
        2 => any::<Index>().prop_map(Op::Retry),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    // Mostly fresh ids, some from a small hot pool (reused with other bodies), now and then a
    // big one.
    let id = prop_oneof![2 => 0..6u128, 8 => 6..100_000u128, 1 => any::<u128>()];
    (id, any::<u64>(), op()).prop_map(|(id, timestamp_ns, op)| Step {
        id,
        timestamp_ns,
        op,
    })
}

/// Turns generated steps into commands (resolving retries against the commands before them).
fn commands(steps: &[Step]) -> Vec<Command> {
    let [usd, eur, none] = currencies();
    let cur = |i: usize| [usd, eur, none][i];
    let acc = |i: usize| AccountId::new(NAMES[i]).unwrap();
    let mut out: Vec<Command> = Vec::with_capacity(steps.len());
    for step in steps {
        let kind = match &step.op {
            Op::Open(a) => CommandKind::OpenAccount { account: acc(*a) },
            Op::Deposit(a, m, c) => CommandKind::Deposit {
                account: acc(*a),
                amount: *m,
                currency: cur(*c),
            },
            Op::Withdraw(a, m, c) => CommandKind::Withdraw {
                account: acc(*a),
                amount: *m,
                currency: cur(*c),
            },
            Op::Transfer(f, t, m, c) => CommandKind::Transfer {
                from: acc(*f),
                to: acc(*t),
                amount: *m,
                currency: cur(*c),
            },
            Op::Retry(index) if !out.is_empty() => {
                let earlier = out[index.index(out.len())];
                out.push(Command {
                    timestamp_ns: step.timestamp_ns,
                    ..earlier
                });
                continue;
            }
            Op::Retry(_) => CommandKind::OpenAccount { account: acc(0) },
        };
        out.push(Command {
            transaction_id: TransactionId(step.id),
            timestamp_ns: step.timestamp_ns,
            kind,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed {
        first_seq: u64,
        events: u8,
    },
    Rejected {
        first_seq: u64,
        code: RejectCode,
    },
    Replayed {
        first_seq: u64,
        rejection: Option<RejectCode>,
    },
}

fn outcome_of(record: &CommandRecord) -> Outcome {
    if record.replayed {
        Outcome::Replayed {
            first_seq: record.first_seq,
            rejection: record.rejection,
        }
    } else if let Some(code) = record.rejection {
        Outcome::Rejected {
            first_seq: record.first_seq,
            code,
        }
    } else {
        Outcome::Committed {
            first_seq: record.first_seq,
            events: record.event_count,
        }
    }
}

#[derive(Default)]
struct Model {
    /// Account name -> index, in opening order.
    index: BTreeMap<String, u32>,
    /// Per account index: currency -> balance (a currency appears on its first credit).
    balances: BTreeMap<u32, BTreeMap<Currency, MinorUnits>>,
    deposited: BTreeMap<Currency, u128>,
    withdrawn: BTreeMap<Currency, u128>,
    /// Transaction id -> (body, first_seq, rejection).
    ids: BTreeMap<u128, (CommandKind, u64, Option<RejectCode>)>,
    next_seq: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            next_seq: 1,
            ..Model::default()
        }
    }

    fn balance(&self, account: u32, currency: Currency) -> MinorUnits {
        self.balances
            .get(&account)
            .and_then(|b| b.get(&currency))
            .copied()
            .unwrap_or(0)
    }

    fn outstanding(&self, currency: Currency) -> u128 {
        self.deposited.get(&currency).copied().unwrap_or(0)
            - self.withdrawn.get(&currency).copied().unwrap_or(0)
    }

    fn find(&self, account: &AccountId) -> Result<u32, RejectCode> {
        self.index
            .get(account.as_str())
            .copied()
            .ok_or(RejectCode::AccountNotFound)
    }

    fn check_amount(amount: MinorUnits, currency: Currency) -> Result<(), RejectCode> {
        if currency == Currency::NONE {
            return Err(RejectCode::UnsupportedCurrency);
        }
        if amount == 0 || amount > CONFIG.max_amount {
            return Err(RejectCode::InvalidAmount);
        }
        Ok(())
    }

    fn credit(&mut self, account: u32, currency: Currency, amount: MinorUnits) {
        *self
            .balances
            .entry(account)
            .or_default()
            .entry(currency)
            .or_insert(0) += amount;
    }

    fn debit(&mut self, account: u32, currency: Currency, amount: MinorUnits) {
        *self
            .balances
            .get_mut(&account)
            .unwrap()
            .get_mut(&currency)
            .unwrap() -= amount;
    }

    /// Checks and applies `kind`; returns the number of events or the rejection.
    fn run(&mut self, kind: CommandKind) -> Result<u8, RejectCode> {
        match kind {
            CommandKind::OpenAccount { account } => {
                if self.index.contains_key(account.as_str()) {
                    return Err(RejectCode::AccountAlreadyExists);
                }
                if self.index.len() as u32 >= CONFIG.max_accounts {
                    return Err(RejectCode::TooManyAccounts);
                }
                let next = self.index.len() as u32;
                self.index.insert(account.as_str().to_string(), next);
                Ok(1)
            }
            CommandKind::Deposit {
                account,
                amount,
                currency,
            } => {
                Self::check_amount(amount, currency)?;
                let a = self.find(&account)?;
                if self.outstanding(currency) + u128::from(amount) > u128::from(u64::MAX) {
                    return Err(RejectCode::AmountOverflow);
                }
                self.credit(a, currency, amount);
                *self.deposited.entry(currency).or_default() += u128::from(amount);
                Ok(1)
            }
            CommandKind::Withdraw {
                account,
                amount,
                currency,
            } => {
                Self::check_amount(amount, currency)?;
                let a = self.find(&account)?;
                if self.balance(a, currency) < amount {
                    return Err(RejectCode::InsufficientFunds);
                }
                self.debit(a, currency, amount);
                *self.withdrawn.entry(currency).or_default() += u128::from(amount);
                Ok(1)
            }
            CommandKind::Transfer {
                from,
                to,
                amount,
                currency,
            } => {
                Self::check_amount(amount, currency)?;
                let f = self.find(&from)?;
                let t = self.find(&to)?;
                if f == t {
                    return Err(RejectCode::SameAccount);
                }
                if self.balance(f, currency) < amount {
                    return Err(RejectCode::InsufficientFunds);
                }
                self.debit(f, currency, amount);
                self.credit(t, currency, amount);
                Ok(2)
            }
        }
    }

    fn execute(&mut self, command: &Command) -> Outcome {
        let first_seq = self.next_seq;
        if let Some((body, seq, rejection)) = self.ids.get(&command.transaction_id.0) {
            if *body == command.kind {
                return Outcome::Replayed {
                    first_seq: *seq,
                    rejection: *rejection,
                };
            }
            self.next_seq += 1;
            return Outcome::Rejected {
                first_seq,
                code: RejectCode::TransactionIdReused,
            };
        }
        let (outcome, rejection) = match self.run(command.kind) {
            Ok(events) => {
                self.next_seq += u64::from(events);
                (Outcome::Committed { first_seq, events }, None)
            }
            Err(code) => {
                self.next_seq += 1;
                (Outcome::Rejected { first_seq, code }, Some(code))
            }
        };
        self.ids.insert(
            command.transaction_id.0,
            (command.kind, first_seq, rejection),
        );
        outcome
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn run_ledger(ledger: &mut Ledger, commands: &[Command]) -> Vec<CommandRecord> {
    commands.iter().map(|c| ledger.execute(c)).collect()
}

/// Everything observable about the ledger agrees with the model.
fn check_against_model(ledger: &Ledger, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(ledger.next_seq(), model.next_seq);
    prop_assert_eq!(ledger.account_count() as usize, model.index.len());
    prop_assert_eq!(ledger.transaction_id_count() as usize, model.ids.len());
    for name in NAMES {
        let id = AccountId::new(name).unwrap();
        prop_assert_eq!(
            ledger.account_index(&id),
            model.index.get(name).copied(),
            "index of {}",
            name
        );
    }
    let mut sums: BTreeMap<Currency, u128> = BTreeMap::new();
    for index in 0..ledger.account_count() {
        let got = ledger.balances(index);
        let want: Vec<(Currency, MinorUnits)> = model
            .balances
            .get(&index)
            .map(|b| b.iter().map(|(c, v)| (*c, *v)).collect())
            .unwrap_or_default();
        prop_assert_eq!(&got, &want, "balances of account {}", index);
        for (currency, balance) in got {
            *sums.entry(currency).or_default() += u128::from(balance);
        }
    }
    let totals = ledger.totals();
    let currencies_seen: Vec<Currency> = model.deposited.keys().copied().collect();
    prop_assert_eq!(
        totals.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        currencies_seen
    );
    for (currency, t) in totals {
        let deposited = model.deposited[&currency];
        let withdrawn = model.withdrawn.get(&currency).copied().unwrap_or(0);
        prop_assert_eq!(
            (t.deposited, t.withdrawn),
            (deposited, withdrawn),
            "totals of {}",
            currency
        );
        let sum = sums.get(&currency).copied().unwrap_or(0);
        prop_assert_eq!(sum, deposited - withdrawn, "conservation in {}", currency);
        prop_assert_eq!(u128::from(t.outstanding), sum);
    }
    if let Err(e) = ledger.check_invariants() {
        return Err(TestCaseError::fail(e));
    }
    Ok(())
}

fn round_trip_record(record: &CommandRecord) -> Result<(), TestCaseError> {
    let len = payload_len(record);
    prop_assert_eq!(len % 8, 0);
    let mut buffer = vec![0xAAu8; len + 16];
    prop_assert_eq!(encode_record(record, &mut buffer), len);
    prop_assert!(
        buffer[len..].iter().all(|b| *b == 0xAA),
        "encode wrote past its length"
    );
    let decoded = decode_record(record.first_seq, &buffer[..len])
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&decoded, record);
    Ok(())
}

fn check_run(steps: &[Step], split: Index) -> Result<(), TestCaseError> {
    let commands = commands(steps);
    let mut ledger = Ledger::new(CONFIG);
    let mut model = Model::new();
    let mut records = Vec::with_capacity(commands.len());
    let split = split.index(commands.len() + 1);
    let mut snapshot = None;
    for (i, command) in commands.iter().enumerate() {
        if i == split {
            snapshot = Some(encode_snapshot(&ledger, None));
        }
        let record = ledger.execute(command);
        let want = model.execute(command);
        prop_assert_eq!(outcome_of(&record), want, "command {} {:?}", i, command);
        prop_assert_eq!(record.transaction_id, command.transaction_id);
        if !record.replayed {
            prop_assert_eq!(record.timestamp_ns, command.timestamp_ns);
            for (k, event) in record.events().iter().enumerate() {
                prop_assert_eq!(event.seq, record.first_seq + k as u64);
                if matches!(
                    event.kind,
                    EventKind::Deposited
                        | EventKind::Credited
                        | EventKind::Withdrawn
                        | EventKind::Debited
                ) {
                    // Right after the command, balance_after is the account's balance, per the model too.
                    prop_assert_eq!(
                        Some(event.balance_after),
                        ledger.balance(event.account, event.currency)
                    );
                    prop_assert_eq!(
                        event.balance_after,
                        model.balance(event.account, event.currency)
                    );
                }
            }
        }
        records.push(record);
    }
    check_against_model(&ledger, &model)?;
    let hash = ledger.state_hash();

    // The journal view: only non-replayed records, applied to a fresh ledger.
    let mut replica = Ledger::new(OTHER_KEY);
    for record in records.iter().filter(|r| !r.replayed) {
        if let Err(e) = replica.verify_record(record) {
            return Err(TestCaseError::fail(format!(
                "verify_record({record:?}): {e}"
            )));
        }
        replica.apply(record);
        round_trip_record(record)?;
        // What `wallet replay` checks: a committed record's fingerprint is its body's.
        let rebuilt = record.body_fingerprint(|i| replica.account_hash(i));
        prop_assert_eq!(
            rebuilt,
            (record.is_committed() && record.command_type != wallet::core::CommandType::Checkpoint)
                .then_some(record.fingerprint),
            "fingerprint rebuilt from {:?}",
            record
        );
    }
    prop_assert_eq!(replica.state_hash(), hash, "replay gives a different state");

    // Determinism: a second run gives the same records and the same hash; so does a run through
    // `execute_batch` in groups (as the engine thread does it).
    let mut again = Ledger::new(OTHER_KEY);
    prop_assert_eq!(&run_ledger(&mut again, &commands), &records);
    prop_assert_eq!(again.state_hash(), hash);
    let mut batched = Ledger::new(CONFIG);
    let mut batched_records = Vec::with_capacity(commands.len());
    for group in commands.chunks(1 + split % 13) {
        let base = batched_records.len();
        batched.execute_batch(group, |i, record| {
            assert_eq!(base + i, batched_records.len(), "emitted in order");
            batched_records.push(record);
        });
    }
    prop_assert_eq!(&batched_records, &records);
    prop_assert_eq!(batched.state_hash(), hash);

    // Snapshots: the final state round-trips; a mid-run snapshot continues to the same end.
    let restored = decode_snapshot(&encode_snapshot(&ledger, None), CONFIG)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(restored.state_hash(), hash);
    check_against_model(&restored, &model)?;
    let bytes = snapshot.unwrap_or_else(|| encode_snapshot(&ledger, None));
    let mut resumed =
        decode_snapshot(&bytes, OTHER_KEY).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let tail = run_ledger(&mut resumed, &commands[split.min(commands.len())..]);
    prop_assert_eq!(&tail[..], &records[split.min(commands.len())..]);
    prop_assert_eq!(resumed.state_hash(), hash);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_agrees_with_the_model(
        open_first in any::<bool>(),
        steps in prop::collection::vec(step(), 1..100),
        split in any::<Index>(),
    ) {
        // Half the runs start with three open, funded accounts, so that transfers go through.
        let prelude = [Op::Open(0), Op::Open(1), Op::Open(2), Op::Deposit(0, 400, 0), Op::Deposit(1, 400, 1)];
        let mut all: Vec<Step> = Vec::new();
        if open_first {
            let fresh = (1u128 << 100..).zip(prelude);
            all.extend(fresh.map(|(id, op)| Step { id, timestamp_ns: 1, op }));
        }
        all.extend(steps);
        check_run(&all, split)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile bytes
// ---------------------------------------------------------------------------------------------

fn sample_ledger() -> Ledger {
    let [usd, eur, _] = currencies();
    let mut ledger = Ledger::new(CONFIG);
    let acc = |i: usize| AccountId::new(NAMES[i]).unwrap();
    let kinds = [
        CommandKind::OpenAccount { account: acc(0) },
        CommandKind::OpenAccount { account: acc(1) },
        CommandKind::Deposit {
            account: acc(0),
            amount: 400,
            currency: usd,
        },
        CommandKind::Deposit {
            account: acc(1),
            amount: 300,
            currency: eur,
        },
        CommandKind::Transfer {
            from: acc(0),
            to: acc(1),
            amount: 150,
            currency: usd,
        },
        CommandKind::Withdraw {
            account: acc(1),
            amount: 900,
            currency: eur,
        },
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        ledger.execute(&Command {
            transaction_id: TransactionId(i as u128 + 1),
            timestamp_ns: 9,
            kind,
        });
    }
    ledger
}

fn sample_payloads() -> Vec<(u64, Vec<u8>)> {
    let mut ledger = Ledger::new(CONFIG);
    let [usd, _, _] = currencies();
    let acc = |i: usize| AccountId::new(NAMES[i]).unwrap();
    let kinds = [
        CommandKind::OpenAccount { account: acc(2) },
        CommandKind::OpenAccount { account: acc(3) },
        CommandKind::Deposit {
            account: acc(0),
            amount: 4,
            currency: usd,
        },
        CommandKind::Deposit {
            account: acc(2),
            amount: 400,
            currency: usd,
        },
        CommandKind::Transfer {
            from: acc(2),
            to: acc(3),
            amount: 150,
            currency: usd,
        },
    ];
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let record = ledger.execute(&Command {
            transaction_id: TransactionId(i as u128),
            timestamp_ns: 9,
            kind,
        });
        let mut payload = vec![0; payload_len(&record)];
        encode_record(&record, &mut payload);
        out.push((record.first_seq, payload));
    }
    out
}

/// Replaces the trailing CRC so that the decoder gets past the checksum to the structure.
fn with_valid_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn decode_record_never_panics_on_random_bytes(seq in any::<u64>(), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_record(seq, &bytes);
    }

    #[test]
    fn decode_record_never_panics_on_mutated_payloads(
        which in any::<Index>(),
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        cut in any::<Index>(),
    ) {
        let payloads = sample_payloads();
        let (seq, mut payload) = payloads[which.index(payloads.len())].clone();
        for (at, value) in edits {
            let i = at.index(payload.len());
            payload[i] = value;
        }
        let keep = if cut.index(4) == 0 { cut.index(payload.len() + 1) } else { payload.len() };
        if let Ok(record) = decode_record(seq, &payload[..keep]) {
            // Whatever decodes re-encodes to the same bytes: no information is dropped.
            let mut again = vec![0; payload_len(&record)];
            encode_record(&record, &mut again);
            prop_assert_eq!(&again[..], &payload[..keep]);
        }
    }

    #[test]
    fn decode_snapshot_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400), fix_crc in any::<bool>()) {
        let bytes = if fix_crc { with_valid_crc(bytes) } else { bytes };
        let _ = decode_snapshot(&bytes, CONFIG);
    }

    #[test]
    fn decode_snapshot_never_panics_on_mutated_snapshots(
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        cut in any::<Index>(),
        fix_crc in any::<bool>(),
    ) {
        let ledger = sample_ledger();
        let mut bytes = encode_snapshot(&ledger, None);
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if cut.index(4) == 0 {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let bytes = if fix_crc { with_valid_crc(bytes) } else { bytes };
        if let Ok(decoded) = decode_snapshot(&bytes, CONFIG) {
            prop_assert!(decoded.check_invariants().is_ok());
        }
    }
}

/// The header of a hand-built snapshot at next sequence 3 holding one account, no remembered
/// id and one currency's totals; its state hash is zero (not reached if the decoder refuses).
fn one_account_snapshot_header() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"WALSNAP1");
    out.extend_from_slice(&wallet::core::codec::SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&3u64.to_le_bytes()); // next_seq
    out.extend_from_slice(&0u64.to_le_bytes()); // state hash: not reached if the decoder refuses
    out.extend_from_slice(&CONFIG.max_amount.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes()); // accounts
    out.extend_from_slice(&0u64.to_le_bytes()); // remembered ids
    out.extend_from_slice(&1u64.to_le_bytes()); // totals
    assert_eq!(out.len(), SNAPSHOT_HEADER_BYTES);
    out
}

/// Builds a snapshot by hand (with a correct checksum and state hash) holding one account whose
/// two balance entries name the same currency.
fn snapshot_with_duplicate_currency(balance: MinorUnits) -> Vec<u8> {
    let [usd, _, _] = currencies();
    let mut out = one_account_snapshot_header();
    out.push(5);
    out.extend_from_slice(b"alice");
    out.push(2);
    for _ in 0..2 {
        out.extend_from_slice(&usd.packed().to_le_bytes());
        out.extend_from_slice(&balance.to_le_bytes());
    }
    out.extend_from_slice(&usd.packed().to_le_bytes());
    out.extend_from_slice(&(2 * u128::from(balance)).to_le_bytes());
    out.extend_from_slice(&0u128.to_le_bytes());
    out.extend_from_slice(&balance.wrapping_mul(2).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    with_valid_crc(out)
}

/// A snapshot (checksum correct) of one account holding `balance` USD with the given totals.
fn snapshot_with_totals(balance: MinorUnits, deposited: u128, withdrawn: u128) -> Vec<u8> {
    let [usd, _, _] = currencies();
    let mut out = one_account_snapshot_header();
    out.push(5);
    out.extend_from_slice(b"alice");
    out.push(1);
    out.extend_from_slice(&usd.packed().to_le_bytes());
    out.extend_from_slice(&balance.to_le_bytes());
    out.extend_from_slice(&usd.packed().to_le_bytes());
    out.extend_from_slice(&deposited.to_le_bytes());
    out.extend_from_slice(&withdrawn.to_le_bytes());
    out.extend_from_slice(&balance.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    with_valid_crc(out)
}

/// Totals that two records of u64 amounts could not have reached are refused before anything
/// is added to them (a deposit would overflow them); totals within that bound are decoded.
#[test]
fn a_snapshot_whose_totals_its_history_could_not_reach_is_refused() {
    let huge = u128::MAX - 5;
    match decode_snapshot(&snapshot_with_totals(7, huge, huge - 7), CONFIG) {
        Err(DecodeError::Snapshot("totals out of range")) => {}
        other => panic!("{:?}", other.map(|l| l.state_hash())),
    }
    // At the bound (3 * u64::MAX), decoding goes on to the state hash (zero here, so wrong).
    let bound = 3 * u128::from(u64::MAX);
    match decode_snapshot(&snapshot_with_totals(7, bound, bound - 7), CONFIG) {
        Err(DecodeError::Snapshot("state hash of the rebuilt ledger differs")) => {}
        other => panic!(
            "totals within the bound refused, or a wrong state hash accepted: {:?}",
            other.map(|l| l.state_hash())
        ),
    }
}

#[test]
fn a_snapshot_decoded_in_parts_equals_the_whole_and_fills_its_reserved_memory() {
    let ledger = sample_ledger();
    let ids = ledger.transaction_id_count() as usize;
    assert!(ids > 0);
    let bytes = encode_snapshot(&ledger, None);
    let (mut decoded, checksummed) = prepare_snapshot(&bytes, CONFIG).unwrap();
    let reserved = decoded.ledger().reserved_id_memory();
    assert_eq!(reserved.len(), 1, "one block for a few ids: {reserved:?}");
    assert!(reserved[0].1 >= ids * 32);
    let checks = checksummed.digest_ids().unwrap();
    assert_eq!(checks, check_snapshot(&bytes).unwrap());
    decoded.decode(&bytes).unwrap();
    // The ids went into the reserved block, front first; the rest of it is still reserved.
    assert_eq!(
        decoded.ledger().reserved_id_memory(),
        vec![(reserved[0].0 + ids * 32, reserved[0].1 - ids * 32)]
    );
    assert!(decoded.decode(&bytes).is_err(), "decoding twice is refused");
    let restored = decoded.finish(checks).unwrap();
    assert_eq!(restored.state_hash(), ledger.state_hash());
    assert_eq!(
        restored.state_hash(),
        decode_snapshot(&bytes, CONFIG).unwrap().state_hash()
    );

    // The ids' digest is part of what `finish` verifies: one from another snapshot is refused.
    let mut longer = sample_ledger();
    longer.execute(&Command {
        transaction_id: TransactionId(99),
        timestamp_ns: 9,
        kind: CommandKind::OpenAccount {
            account: AccountId::new("zed").unwrap(),
        },
    });
    let other_checks = check_snapshot(&encode_snapshot(&longer, None)).unwrap();
    let (mut decoded, _) = prepare_snapshot(&bytes, CONFIG).unwrap();
    decoded.decode(&bytes).unwrap();
    assert!(matches!(
        decoded.finish(other_checks),
        Err(DecodeError::Snapshot(reason)) if reason.contains("state hash")
    ));
    // Counts that the file cannot hold are refused before anything is reserved for them, even
    // under a checksum that holds.
    for (offset, claim) in [(40, 1u64 << 31), (48, 1 << 31), (48, ids as u64 + 1000)] {
        let mut lying = bytes.clone();
        lying[offset..offset + 8].copy_from_slice(&claim.to_le_bytes());
        assert!(matches!(
            prepare_snapshot(&with_valid_crc(lying), CONFIG),
            Err(DecodeError::Snapshot("counts larger than the file"))
        ));
    }
    // A header whose checksum fails sizes nothing, even with counts the file could hold: the
    // account count raised within what 3 bytes per account allows would have reserved (and
    // filled at random) a name table many times the snapshot's size.
    let mut lying = bytes.clone();
    let accounts = u64::from_le_bytes(lying[40..48].try_into().unwrap());
    let slack = (bytes.len() - SNAPSHOT_HEADER_BYTES - 4 - ids * 32) as u64;
    lying[40..48].copy_from_slice(&(accounts + slack / 4).to_le_bytes());
    assert!(slack / 4 > 0);
    assert!(matches!(
        prepare_snapshot(&lying, CONFIG),
        Err(DecodeError::Snapshot("checksum mismatch"))
    ));
    // And a flipped bit among the ids fails the checksum.
    let mut flipped = bytes.clone();
    let at = flipped.len() - 4 - 7;
    flipped[at] ^= 1;
    assert!(matches!(
        check_snapshot(&flipped),
        Err(DecodeError::Snapshot("checksum mismatch"))
    ));
}

#[test]
fn verify_record_refuses_a_transaction_id_executed_twice() {
    let [usd, _, _] = currencies();
    let mut live = Ledger::new(CONFIG);
    let mut records = Vec::new();
    let mut run = |id: u128, kind: CommandKind| {
        records.push(live.execute(&Command {
            transaction_id: TransactionId(id),
            timestamp_ns: 1,
            kind,
        }))
    };
    let alice = AccountId::new(NAMES[0]).unwrap();
    run(1, CommandKind::OpenAccount { account: alice });
    run(
        2,
        CommandKind::Deposit {
            account: alice,
            amount: 100,
            currency: usd,
        },
    );
    // The same id with another body: journaled as a transaction_id_reused rejection.
    run(
        2,
        CommandKind::Deposit {
            account: alice,
            amount: 7,
            currency: usd,
        },
    );
    assert_eq!(records[2].rejection, Some(RejectCode::TransactionIdReused));
    let mut replica = Ledger::new(CONFIG);
    for record in &records {
        replica.verify_record(record).unwrap();
        replica.apply(record);
    }

    // A forged record that executes id 2 a second time, consistent in every other way.
    let mut again = records[1];
    again.first_seq = replica.next_seq();
    again.events[0].seq = again.first_seq;
    again.events[0].balance_after = 200;
    let error = replica.verify_record(&again).unwrap_err();
    assert!(error.contains("already executed"), "{error}");
    // With a fresh id the same record is fine: the id was the only thing wrong.
    again.transaction_id = TransactionId(3);
    replica.verify_record(&again).unwrap();

    // A reuse rejection for an id never executed, and one for the very same body.
    let mut reuse = records[2];
    reuse.first_seq = replica.next_seq();
    reuse.events[0].seq = reuse.first_seq;
    reuse.transaction_id = TransactionId(99);
    let error = replica.verify_record(&reuse).unwrap_err();
    assert!(error.contains("never executed"), "{error}");
    reuse.transaction_id = TransactionId(2);
    replica.verify_record(&reuse).unwrap();
    reuse.fingerprint = records[1].fingerprint;
    let error = replica.verify_record(&reuse).unwrap_err();
    assert!(error.contains("same body"), "{error}");
}

/// Records `execute` can never produce, each consistent in its balances, sequence and id, are
/// refused by `verify_record` (and so by recovery and `wallet replay`) instead of being applied:
/// money in no currency total, or a state that panics later.
#[test]
fn verify_record_refuses_records_of_a_shape_execute_never_produces() {
    use wallet::core::{CommandType, Event};
    let [usd, _, _] = currencies();
    let mut live = Ledger::new(CONFIG);
    let alice = AccountId::new(NAMES[0]).unwrap();
    let bob = AccountId::new(NAMES[1]).unwrap();
    for (id, kind) in [
        (1, CommandKind::OpenAccount { account: alice }),
        (2, CommandKind::OpenAccount { account: bob }),
        (
            3,
            CommandKind::Deposit {
                account: alice,
                amount: 100,
                currency: usd,
            },
        ),
    ] {
        live.execute(&Command {
            transaction_id: TransactionId(id),
            timestamp_ns: 1,
            kind,
        });
    }
    let seq = live.next_seq();
    let event = |i: u64, kind, account, currency, amount, balance_after| Event {
        seq: seq + i,
        kind,
        account,
        currency,
        amount,
        balance_after,
    };
    let record = |command_type, rejection, events: &[Event]| {
        let mut r = CommandRecord::empty();
        r.transaction_id = TransactionId(77);
        r.timestamp_ns = 2;
        r.command_type = command_type;
        r.rejection = rejection;
        r.first_seq = seq;
        r.event_count = events.len() as u8;
        r.events[..events.len()].copy_from_slice(events);
        r
    };
    // A legitimate deposit of the same kind passes: the cases below differ only in shape.
    let fine = record(
        CommandType::Deposit,
        None,
        &[event(0, EventKind::Deposited, 1, usd, 5, 5)],
    );
    live.verify_record(&fine).unwrap();
    let mut empty_name = record(
        CommandType::OpenAccount,
        None,
        &[event(0, EventKind::AccountOpened, 2, Currency::NONE, 0, 0)],
    );
    empty_name.opened_account = AccountId::EMPTY;
    let mut named_deposit = record(
        CommandType::Deposit,
        None,
        &[event(0, EventKind::Deposited, 1, usd, 5, 5)],
    );
    named_deposit.opened_account = AccountId::new("mallory").unwrap();
    let mut named_rejection = record(
        CommandType::OpenAccount,
        Some(RejectCode::AccountAlreadyExists),
        &[event(0, EventKind::Rejected, 0, Currency::NONE, 0, 0)],
    );
    named_rejection.opened_account = AccountId::new("mallory").unwrap();
    let forged = [
        ("a deposit that names an account", named_deposit),
        ("a rejected opening that names an account", named_rejection),
        (
            "a deposit that debits alice and credits bob a million",
            record(
                CommandType::Deposit,
                None,
                &[
                    event(0, EventKind::Debited, 0, usd, 1, 99),
                    event(1, EventKind::Credited, 1, usd, 1_000_000, 1_000_000),
                ],
            ),
        ),
        (
            "a rejection that credits",
            record(
                CommandType::Transfer,
                Some(RejectCode::InsufficientFunds),
                &[event(0, EventKind::Credited, 1, usd, 50, 50)],
            ),
        ),
        (
            "a checkpoint with a credit after it",
            record(
                CommandType::Checkpoint,
                None,
                &[
                    event(0, EventKind::Checkpoint, u32::MAX, Currency::NONE, 0, 0),
                    event(1, EventKind::Credited, 1, usd, 50, 50),
                ],
            ),
        ),
        (
            "a deposit in no currency",
            record(
                CommandType::Deposit,
                None,
                &[event(0, EventKind::Deposited, 1, Currency::NONE, 5, 5)],
            ),
        ),
        (
            "a deposit above the maximum amount",
            record(
                CommandType::Deposit,
                None,
                &[event(0, EventKind::Deposited, 1, usd, 501, 501)],
            ),
        ),
        (
            "two deposits in one record",
            record(
                CommandType::Deposit,
                None,
                &[
                    event(0, EventKind::Deposited, 1, usd, 5, 5),
                    event(1, EventKind::Deposited, 1, usd, 5, 10),
                ],
            ),
        ),
        (
            "two openings in one record",
            record(
                CommandType::OpenAccount,
                None,
                &[
                    event(0, EventKind::AccountOpened, 2, Currency::NONE, 0, 0),
                    event(1, EventKind::AccountOpened, 2, Currency::NONE, 0, 0),
                ],
            ),
        ),
        ("an opening with an empty account id", empty_name),
        (
            "events numbered out of sequence",
            record(
                CommandType::Deposit,
                None,
                &[event(1, EventKind::Deposited, 1, usd, 5, 5)],
            ),
        ),
    ];
    for (what, forged) in forged {
        let verdict = std::panic::catch_unwind(|| live.verify_record(&forged));
        assert!(
            matches!(verdict, Ok(Err(_))),
            "{what}: verify_record gave {verdict:?}"
        );
    }
}

#[test]
fn decode_snapshot_refuses_duplicate_currencies_without_panicking() {
    for balance in [7, u64::MAX] {
        let bytes = snapshot_with_duplicate_currency(balance);
        let result =
            std::panic::catch_unwind(|| decode_snapshot(&bytes, CONFIG).map(|l| l.state_hash()));
        match result {
            Ok(Err(DecodeError::Snapshot("duplicate currency in an account"))) => {}
            Ok(other) => {
                panic!("balance {balance}: expected the duplicate-currency error, got {other:?}")
            }
            Err(_) => panic!(
                "balance {balance}: decode_snapshot panicked on a checksummed hostile snapshot"
            ),
        }
    }
}

/// A snapshot whose id table names one transaction id twice is refused, even with a valid
/// checksum (restoring it would remember one id with two outcomes).
#[test]
fn a_snapshot_with_a_duplicated_transaction_id_is_refused() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    let usd = Currency::new("USD").unwrap();
    let account = AccountId::new("alice").unwrap();
    let mut commands = vec![Command {
        transaction_id: TransactionId(1),
        timestamp_ns: 1,
        kind: CommandKind::OpenAccount { account },
    }];
    for i in 2..40u128 {
        commands.push(Command {
            transaction_id: TransactionId(i << 70 | i),
            timestamp_ns: i as u64,
            kind: CommandKind::Deposit {
                account,
                amount: 5,
                currency: usd,
            },
        });
    }
    for command in &commands {
        ledger.execute(command);
    }
    let bytes = encode_snapshot(&ledger, None);
    assert!(decode_snapshot(&bytes, LedgerConfig::default()).is_ok());
    // The id table is the last 32 bytes per id before the 4-byte checksum; copy the 16-byte id
    // of entry 3 over entry 17 and re-seal the checksum.
    let ids = ledger.transaction_id_count() as usize;
    assert_eq!(ids, 39);
    let table = bytes.len() - 4 - ids * 32;
    let mut forged = bytes[..bytes.len() - 4].to_vec();
    let copied: Vec<u8> = forged[table + 3 * 32..table + 3 * 32 + 16].to_vec();
    forged[table + 17 * 32..table + 17 * 32 + 16].copy_from_slice(&copied);
    let crc = crc32c::crc32c(&forged);
    forged.extend_from_slice(&crc.to_le_bytes());
    match decode_snapshot(&forged, LedgerConfig::default()) {
        Err(DecodeError::Snapshot(reason)) => assert_eq!(reason, "duplicate transaction id"),
        Err(other) => panic!("a duplicated id was refused for another reason: {other}"),
        Ok(_) => panic!("a snapshot with a duplicated transaction id was accepted"),
    }

    // Re-sealed forgeries of what `execute` never remembers or writes: an unknown outcome code
    // (it would read as "committed"), `transaction_id_reused` (never stored: the first outcome
    // stays), a sequence not yet taken or 0 (these four also change the ids' digest, so the
    // state hash refuses them unless it is forged too; the decoder now names what is wrong),
    // and one currency's totals listed twice (which the state hash does not see: the second
    // copy replaced the first).
    let seal = |mut body: Vec<u8>| {
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    };
    let body = bytes[..bytes.len() - 4].to_vec();
    let seq_and_code = |entry: usize| table + entry * 32 + 24;
    let mut unknown_code = body.clone();
    unknown_code[seq_and_code(17)] = 0xC8;
    let mut reused_code = body.clone();
    reused_code[seq_and_code(17)] = RejectCode::TransactionIdReused as u8;
    let mut future_seq = body.clone();
    future_seq[seq_and_code(17)..seq_and_code(17) + 8]
        .copy_from_slice(&(ledger.next_seq() << 8).to_le_bytes());
    let mut zero_seq = body.clone();
    zero_seq[seq_and_code(17)..seq_and_code(17) + 8].copy_from_slice(&0u64.to_le_bytes());
    // Totals: one 42-byte entry (currency, deposited, withdrawn, outstanding) before the id
    // table; the header's `totals_count` is at byte 56.
    let mut twice_totals = body[..table].to_vec();
    twice_totals.extend_from_slice(&body[table - 42..]);
    twice_totals[56..64].copy_from_slice(&2u64.to_le_bytes());
    let impossible = "a remembered id with an impossible sequence or outcome";
    for (what, forged, reason) in [
        ("an unknown outcome code", unknown_code, impossible),
        (
            "a remembered transaction_id_reused",
            reused_code,
            impossible,
        ),
        ("a sequence not yet taken", future_seq, impossible),
        ("sequence 0", zero_seq, impossible),
        (
            "one currency's totals twice",
            twice_totals,
            "duplicate currency in the totals",
        ),
    ] {
        match decode_snapshot(&seal(forged), LedgerConfig::default()) {
            Err(DecodeError::Snapshot(got)) => assert_eq!(got, reason, "{what}"),
            Err(other) => panic!("{what}: refused for another reason: {other}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
}

/// The engine hands the ledger id blocks populated by a helper thread (`add_id_block`), and the
/// bench frees the blocks `with_capacity` reserved (`release_spare_id_blocks`): where ids are
/// stored must change no outcome, no state hash and no duplicate detection, also for a cloned
/// ledger (whose last block is only as large as its ids).
#[test]
fn id_blocks_given_released_or_cloned_change_no_outcome() {
    use wallet::core::ledger::IdBlock;
    use wallet::core::table::SpareBuckets;
    let usd = Currency::new("USD").unwrap();
    let accounts: Vec<AccountId> = (0..50)
        .map(|i| AccountId::new(&format!("acct-{i}")).unwrap())
        .collect();
    let mut commands = Vec::new();
    for (i, account) in accounts.iter().enumerate() {
        commands.push(CommandKind::OpenAccount { account: *account });
        commands.push(CommandKind::Deposit {
            account: *account,
            amount: 1_000_000 + i as MinorUnits,
            currency: usd,
        });
    }
    // Over three blocks of 65,536 ids, and every 1,000th id a repeat of one from long before
    // (in an earlier block).
    let total = 200_000u128;
    let commands: Vec<Command> = (0..total)
        .map(|i| {
            let kind = commands
                .get(i as usize)
                .copied()
                .unwrap_or(CommandKind::Transfer {
                    from: accounts[(i * 7 % 50) as usize],
                    to: accounts[(i * 13 % 50 + 1) as usize % 50],
                    amount: (i % 90 + 1) as MinorUnits,
                    currency: usd,
                });
            let id = if i > 70_000 && i % 1000 == 0 {
                i - 70_000
            } else {
                i + 1
            };
            Command {
                transaction_id: TransactionId(id),
                timestamp_ns: i as u64,
                kind,
            }
        })
        .collect();
    let config = LedgerConfig::default();
    let mut spares_given = 0;
    let mut run = |ledger: &mut Ledger, commands: &[Command], give_blocks: bool| {
        let mut outcomes = Vec::new();
        for group in commands.chunks(64) {
            ledger.execute_batch(group, |_, record| {
                outcomes.push((record.rejection, record.replayed, record.first_seq))
            });
            if give_blocks && ledger.wants_id_block() {
                ledger.add_id_block(IdBlock::new());
            }
            // And arrays for the id table's growths, as the engine's helper makes them.
            if give_blocks && let Some(buckets) = ledger.id_table_spare_wanted() {
                assert!(
                    ledger
                        .give_id_table_spare(SpareBuckets::new(buckets))
                        .is_ok()
                );
                spares_given += 1;
            }
        }
        outcomes
    };
    let mut reference = Ledger::new(config);
    let expected = run(&mut reference, &commands, false);
    let duplicates = expected
        .iter()
        .filter(|(r, replayed, _)| *replayed || *r == Some(RejectCode::TransactionIdReused))
        .count();
    assert!(
        duplicates >= 120,
        "{duplicates} repeats detected as duplicates"
    );

    let mut given = Ledger::new(config);
    assert!(
        given.wants_id_block(),
        "an empty ledger wants its first block"
    );
    assert_eq!(run(&mut given, &commands, true), expected);
    assert_eq!(given.state_hash(), reference.state_hash());
    assert!(
        !given.wants_id_block(),
        "a block was given whenever one was wanted"
    );

    let mut released = Ledger::with_capacity(config, 50, total as usize);
    released.release_spare_id_blocks();
    assert!(released.wants_id_block());
    let (first, rest) = commands.split_at(100_000);
    let mut outcomes = run(&mut released, first, true);
    // A clone midway through a block, then more blocks given to the clone.
    let mut cloned = released.clone();
    outcomes.extend(run(&mut cloned, rest, true));
    assert_eq!(outcomes, expected);
    assert_eq!(cloned.state_hash(), reference.state_hash());
    assert_eq!(
        cloned.transaction_id_count(),
        reference.transaction_id_count()
    );
    for ledger in [&given, &cloned] {
        ledger.check_invariants().unwrap();
    }
    assert!(spares_given >= 4, "{spares_given} id-table arrays given");
}

/// `outstanding` (a currency's money in the system) is not part of the state hash: a snapshot
/// whose `outstanding` is off by one, with a valid checksum, must be refused by the invariants
/// check that ends loading (the sum of balances), not loaded.
#[test]
fn a_snapshot_whose_outstanding_is_off_by_one_is_refused() {
    let ledger = sample_ledger();
    let bytes = encode_snapshot(&ledger, None);
    assert!(decode_snapshot(&bytes, CONFIG).is_ok());
    let count = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let (ids, totals) = (count(48), count(56));
    assert!(totals >= 1);
    // Totals are 42 bytes each (currency 2, deposited 16, withdrawn 16, outstanding 8), right
    // before the ids (32 bytes each) and the 4-byte checksum.
    let first_total = bytes.len() - 4 - 32 * ids - 42 * totals;
    for delta in [1i64, -1] {
        let mut forged = bytes.clone();
        let at = first_total + 34;
        let outstanding = u64::from_le_bytes(forged[at..at + 8].try_into().unwrap());
        let changed = outstanding.wrapping_add_signed(delta);
        forged[at..at + 8].copy_from_slice(&changed.to_le_bytes());
        let forged = with_valid_crc(forged);
        assert!(
            matches!(
                decode_snapshot(&forged, CONFIG),
                Err(DecodeError::Snapshot("invariants do not hold"))
            ),
            "outstanding {outstanding} changed by {delta}"
        );
    }
}
