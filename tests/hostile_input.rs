//! Hostile input for the four functions the cargo-fuzz targets in `fuzz/` cover: the amount
//! parser, JSON request decoding, the journal record decoder (and frame checker) and the
//! snapshot decoder. The properties are the fuzz targets' own (`fuzz/checks.rs`), run here on
//! random and mutated inputs so that `cargo test` covers them wherever cargo-fuzz cannot run.
//!
//! The fuzz seed corpus (`fuzz/corpus/*/seed-*`) is generated from here as well:
//! `WALLET_WRITE_FUZZ_SEEDS=1 cargo test --release --test hostile_input fuzz_seed_corpus`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use wallet::core::codec::{
    decode_record, decode_snapshot, encode_record, encode_snapshot, payload_len,
};
use wallet::core::{
    AccountId, Command, CommandKind, Currency, Ledger, LedgerConfig, TransactionId,
};

const CASES: u32 = 2_000;

/// A fuzz target's checks (one of `checks::*`): panics when a property does not hold.
type Check = fn(&[u8]);

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        max_shrink_time: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds: valid inputs, for the fuzz corpus and as starting points for mutation here
// ---------------------------------------------------------------------------------------------

fn currency(code: &str) -> Currency {
    Currency::new(code).unwrap()
}

fn account(name: &str) -> AccountId {
    AccountId::new(name).unwrap()
}

/// Runs commands that open accounts with short, long (beyond the inline slot) and maximal
/// names, deposit in currencies with 0, 2 and 3 fractional digits, transfer, and get rejected
/// (so that rejection codes are remembered), then a checkpoint. Returns every record.
fn busy_ledger(ledger: &mut Ledger) -> Vec<wallet::core::CommandRecord> {
    let (usd, jpy, bhd) = (currency("USD"), currency("JPY"), currency("BHD"));
    let long = "account.with-a_long:name-0123456789";
    let longest = "x".repeat(64);
    let kinds = [
        CommandKind::OpenAccount {
            account: account("alice"),
        },
        CommandKind::OpenAccount {
            account: account("bob"),
        },
        CommandKind::OpenAccount {
            account: account(long),
        },
        CommandKind::OpenAccount {
            account: account(&longest),
        },
        CommandKind::Deposit {
            account: account("alice"),
            amount: 10_000,
            currency: usd,
        },
        CommandKind::Deposit {
            account: account("alice"),
            amount: 700,
            currency: jpy,
        },
        CommandKind::Deposit {
            account: account(long),
            amount: 123_456,
            currency: bhd,
        },
        CommandKind::Transfer {
            from: account("alice"),
            to: account("bob"),
            amount: 2_500,
            currency: usd,
        },
        CommandKind::Transfer {
            from: account(long),
            to: account(&longest),
            amount: 6,
            currency: bhd,
        },
        CommandKind::Withdraw {
            account: account("bob"),
            amount: 1_000,
            currency: usd,
        },
        // Rejected: insufficient funds, unknown account, duplicate account.
        CommandKind::Withdraw {
            account: account("bob"),
            amount: 1_000_000,
            currency: usd,
        },
        CommandKind::Deposit {
            account: account("nobody"),
            amount: 5,
            currency: jpy,
        },
        CommandKind::OpenAccount {
            account: account("alice"),
        },
    ];
    let mut records = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let command = Command {
            transaction_id: TransactionId(0x5EED_0000 + i as u128),
            timestamp_ns: 1_700_000_000_000_000_000 + i as u64,
            kind,
        };
        records.push(ledger.execute(&command));
    }
    records.push(ledger.checkpoint(1_800_000_000_000_000_000));
    records
}

/// Valid snapshots: empty, after one command, and after a busy run.
fn seed_snapshots() -> Vec<Vec<u8>> {
    let mut out = vec![encode_snapshot(&Ledger::new(LedgerConfig::default()), None)];
    let mut one = Ledger::new(LedgerConfig::default());
    one.execute(&Command {
        transaction_id: TransactionId(1),
        timestamp_ns: 1,
        kind: CommandKind::OpenAccount {
            account: account("alice"),
        },
    });
    out.push(encode_snapshot(&one, None));
    let mut busy = Ledger::new(LedgerConfig::default());
    busy_ledger(&mut busy);
    out.push(encode_snapshot(&busy, None));
    out
}

/// Valid record payloads of every command type, committed and rejected, each behind its
/// sequence number (the `journal_record` input layout).
fn seed_records() -> Vec<Vec<u8>> {
    let mut ledger = Ledger::new(LedgerConfig::default());
    busy_ledger(&mut ledger)
        .iter()
        .filter(|record| !record.replayed)
        .map(|record| {
            let mut out = record.first_seq.to_le_bytes().to_vec();
            let mut payload = vec![0; payload_len(record)];
            encode_record(record, &mut payload);
            out.extend_from_slice(&payload);
            out
        })
        .collect()
}

fn seed_amounts() -> Vec<Vec<u8>> {
    [
        "12.34",
        "0.001",
        "1",
        "18446744073709551.615",
        "1e5",
        "-1",
        " 1",
        "1.",
        ".5",
        "00.10",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn transfer_json(from: &str, to: &str, amount: &str, currency: &str, id: &str) -> String {
    serde_json::json!({
        "from_account": from, "to_account": to, "amount": amount, "currency": currency, "transaction_id": id,
    })
    .to_string()
}

const UUID: &str = "6f1c2a9e-3b1d-4f7a-9c2e-5d8b7a6f4e3c";

fn seed_json() -> Vec<Vec<u8>> {
    let transfer = transfer_json("alice", "bob", "12.34", "USD", UUID);
    let batch = format!(
        r#"{{"transfers":[{transfer},{}]}}"#,
        transfer_json("bob", "carol", "5", "JPY", UUID)
    );
    let money = format!(
        r#"{{"account_id":"alice","amount":"1.500","currency":"BHD","transaction_id":"{UUID}"}}"#
    );
    let open = format!(r#"{{"account_id":"alice","transaction_id":"{UUID}"}}"#);
    [transfer, batch, money, open]
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed seeds of the fuzz corpus are valid inputs (so that a change of format that
/// leaves them stale is noticed) and pass their target's checks; with
/// `WALLET_WRITE_FUZZ_SEEDS=1` they are (re)written first.
#[test]
fn fuzz_seed_corpus() {
    let seeds: [(&str, Vec<Vec<u8>>, Check); 4] = [
        ("amount_parser", seed_amounts(), checks::amount_bytes),
        ("json_request", seed_json(), checks::json_body),
        ("journal_record", seed_records(), checks::journal_bytes),
        // Mode byte 0: the snapshot as it is, CRC included.
        (
            "snapshot_decoder",
            seed_snapshots()
                .into_iter()
                .map(|s| [&[0u8][..], &s].concat())
                .collect(),
            checks::snapshot_bytes,
        ),
    ];
    for (target, inputs, check) in seeds {
        let dir = corpus_dir(target);
        if std::env::var_os("WALLET_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, input) in inputs.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), input).unwrap();
            }
        }
        let mut found = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                continue;
            }
            found += 1;
            let bytes = std::fs::read(&path).unwrap();
            check(&bytes);
            let stale = || {
                format!(
                    "{} is stale: regenerate with WALLET_WRITE_FUZZ_SEEDS=1",
                    path.display()
                )
            };
            // The seeds are made deterministically: each must be byte for byte what its
            // maker makes now.
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let index: usize = name["seed-".len()..]
                .parse()
                .unwrap_or_else(|_| panic!("{}: not seed-NN", path.display()));
            assert!(
                inputs.get(index).is_some_and(|input| *input == bytes),
                "{}",
                stale()
            );
            match target {
                "journal_record" => {
                    let (seq, payload) = checks::split_journal_input(&bytes);
                    decode_record(seq, payload).unwrap_or_else(|e| panic!("{}: {e}", stale()));
                }
                "snapshot_decoder" => {
                    decode_snapshot(&bytes[1..], LedgerConfig::default())
                        .unwrap_or_else(|e| panic!("{}: {e}", stale()));
                }
                _ => {}
            }
        }
        assert!(
            found >= inputs.len(),
            "{}: {found} seeds, expected {}",
            dir.display(),
            inputs.len()
        );
    }
}

/// Inputs that once broke a target (`fuzz/regressions/<target>/`, e.g. crashes the fuzzer found)
/// pass its checks now.
#[test]
fn fuzz_regressions() {
    let targets: [(&str, Check); 4] = [
        ("amount_parser", checks::amount_bytes),
        ("json_request", checks::json_body),
        ("journal_record", checks::journal_bytes),
        ("snapshot_decoder", checks::snapshot_bytes),
    ];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (target, check) in targets {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(target);
        // Targets without a regression yet have no directory.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            checked += 1;
            if let Err(panic) = std::panic::catch_unwind(|| check(&bytes)) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The committed regressions (fuzz/regressions/journal_record/*) were found and run: a moved
    // directory must not turn this into a test of nothing.
    assert!(checked >= 2, "only {checked} regression inputs found");
}

// ---------------------------------------------------------------------------------------------
// Mutation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Edit {
    /// XOR a byte.
    Flip(prop::sample::Index, u8),
    /// Overwrite 8 bytes with a little-endian value (counts, lengths, sequences).
    Word(prop::sample::Index, u64),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let index = any::<prop::sample::Index>;
    let word = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        0..300u64,
        any::<u64>(),
        (0..64u32).prop_map(|b| 1u64 << b),
    ];
    prop_oneof![
        4 => (index(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
        2 => (index(), word).prop_map(|(i, w)| Edit::Word(i, w)),
        1 => index().prop_map(Edit::Truncate),
        1 => (index(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (index(), index()).prop_map(|(a, b)| Edit::Remove(a, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        match edit {
            Edit::Flip(i, x) if len > 0 => bytes[i.index(len)] ^= x,
            Edit::Word(i, w) if len >= 8 => {
                let at = i.index(len - 7);
                bytes[at..at + 8].copy_from_slice(&w.to_le_bytes());
            }
            Edit::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Edit::Insert(i, v) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Edit::Remove(a, b) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                bytes.drain(a.min(b)..=a.max(b));
            }
            _ => {}
        }
    }
    bytes
}

/// A seed picked by `pick`, mutated by `edits`.
fn mutated(seeds: &[Vec<u8>], pick: prop::sample::Index, edits: &[Edit]) -> Vec<u8> {
    mutate(pick.get(seeds).clone(), edits)
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..4)
}

// ---------------------------------------------------------------------------------------------
// Strategies for the text-shaped inputs
// ---------------------------------------------------------------------------------------------

/// Strings near the amount grammar: digits, dots and a few troublemakers, plus valid amounts
/// at the edges of `u64` and of the maxima.
fn amount_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[0-9.]{0,25}",
        2 => "[0-9]{0,20}(\\.[0-9]{0,4})?",
        2 => "[0-9.eE+\\- _,٣０]{0,12}",
        1 => any::<String>(),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => (any::<u64>(), 0..4usize).prop_map(|(v, e)| {
            let s = format!("{v:0>5}");
            let (w, f) = s.split_at(s.len() - e);
            if e == 0 { w.to_string() } else { format!("{w}.{f}") }
        }),
    ]
}

/// Field values for JSON requests: valid ones and near misses.
fn json_field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("alice".to_string()),
        Just("bob".to_string()),
        Just(UUID.to_string()),
        Just("USD".to_string()),
        Just("JPY".to_string()),
        Just("XAU".to_string()),
        amount_text(),
        "[a-zA-Z0-9._:\\-]{0,70}",
        any::<String>(),
    ]
}

/// JSON bodies of the right shape with random field values, wrong shapes and extra fields.
fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let transfer = (
        json_field(),
        json_field(),
        json_field(),
        json_field(),
        json_field(),
    )
        .prop_map(|(a, b, c, d, e)| transfer_json(&a, &b, &c, &d, &e));
    let valid_transfer = (
        "[a-z]{1,8}",
        "[a-z]{1,8}",
        amount_text(),
        prop::sample::select(vec!["USD", "JPY", "BHD"]),
    )
        .prop_map(|(a, b, c, d)| transfer_json(&a, &b, &c, d, UUID));
    let any_transfer = prop_oneof![transfer, valid_transfer];
    prop_oneof![
        3 => any_transfer.clone().prop_map(String::into_bytes),
        2 => prop::collection::vec(any_transfer, 0..5)
            .prop_map(|ts| format!(r#"{{"transfers":[{}]}}"#, ts.join(",")).into_bytes()),
        1 => (json_field(), json_field(), json_field()).prop_map(|(account, amount, currency)| {
            serde_json::json!({
                "account_id": account, "amount": amount, "currency": currency, "transaction_id": UUID,
            })
            .to_string()
            .into_bytes()
        }),
        2 => (any::<prop::sample::Index>(), edits()).prop_map(|(pick, edits)| mutated(&seed_json(), pick, &edits)),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ]
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn amount_parser(text in amount_text()) {
        checks::amount_text(&text);
    }

    #[test]
    fn amount_parser_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        checks::amount_bytes(&bytes);
    }

    #[test]
    fn json_request(body in json_body()) {
        checks::json_body(&body);
    }

    #[test]
    fn journal_record(
        data in prop_oneof![
            // Random bytes, of the lengths the decoder accepts and around them.
            prop::collection::vec(any::<u8>(), 0..200),
            (any::<u64>(), prop::sample::select(vec![40usize, 64, 88, 112, 136, 144, 152, 200]))
                .prop_flat_map(|(seq, len)| prop::collection::vec(any::<u8>(), len)
                    .prop_map(move |p| [&seq.to_le_bytes()[..], &p].concat())),
            // Valid records, mutated.
            (any::<prop::sample::Index>(), edits()).prop_map(|(pick, edits)| mutated(&seed_records(), pick, &edits)),
            // Valid records at the end of the sequence space.
            (any::<prop::sample::Index>(), 0..4u64).prop_map(|(pick, back)| {
                let mut bytes = pick.get(&seed_records()).clone();
                bytes[..8].copy_from_slice(&(u64::MAX - back).to_le_bytes());
                bytes
            }),
        ]
    ) {
        checks::journal_bytes(&data);
    }

    #[test]
    fn snapshot_decoder(
        data in prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..300),
            // Valid snapshots, mutated, with the CRC fixed up (mode byte 1) or not (0).
            4 => (any::<prop::sample::Index>(), edits(), 0..2u8).prop_map(|(pick, edits, mode)| {
                [&[mode][..], &mutated(&seed_snapshots(), pick, &edits)].concat()
            }),
        ]
    ) {
        checks::snapshot_bytes(&data);
    }
}
