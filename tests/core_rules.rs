//! The ledger's rules, case by case: amount parsing, currencies, account ids, every rejection
//! code `Ledger::execute` can produce, idempotent retries and the shape of a transfer.

use std::collections::HashSet;

use wallet::core::codec::{SNAPSHOT_HEADER_BYTES, decode_snapshot, encode_snapshot};
use wallet::core::types::{AccountIdError, AmountError, CurrencyError, DEFAULT_MAX_AMOUNT};
use wallet::core::{
    AccountId, Command, CommandKind, CommandRecord, Currency, EventKind, Ledger, LedgerConfig,
    MinorUnits, RejectCode, TransactionId, parse_amount,
};

fn usd() -> Currency {
    Currency::new("USD").unwrap()
}

fn account(name: &str) -> AccountId {
    AccountId::new(name).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Amounts
// ---------------------------------------------------------------------------------------------

#[test]
fn amount_parsing_table() {
    use AmountError::*;
    let forty_digits = "1234567890123456789012345678901234567890";
    let cases: &[(&str, &str, MinorUnits, Result<MinorUnits, AmountError>)] = &[
        ("12.34", "USD", DEFAULT_MAX_AMOUNT, Ok(1234)),
        ("1", "USD", DEFAULT_MAX_AMOUNT, Ok(100)),
        ("0.01", "USD", DEFAULT_MAX_AMOUNT, Ok(1)),
        ("0.1", "USD", DEFAULT_MAX_AMOUNT, Ok(10)),
        ("0", "USD", DEFAULT_MAX_AMOUNT, Err(Zero)),
        ("0.00", "USD", DEFAULT_MAX_AMOUNT, Err(Zero)),
        ("", "USD", DEFAULT_MAX_AMOUNT, Err(Empty)),
        ("-1", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("+1", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        (" 1", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1 ", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1e3", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1.", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        (".5", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        (".", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1.2.3", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        (
            "1.234",
            "USD",
            DEFAULT_MAX_AMOUNT,
            Err(TooManyFractionDigits),
        ),
        ("1.5", "JPY", DEFAULT_MAX_AMOUNT, Err(TooManyFractionDigits)),
        ("12", "JPY", DEFAULT_MAX_AMOUNT, Ok(12)),
        ("1.234", "BHD", DEFAULT_MAX_AMOUNT, Ok(1234)),
        ("1.2", "BHD", DEFAULT_MAX_AMOUNT, Ok(1200)),
        // The maximum itself is allowed, one minor unit more is not.
        (
            "10000000000000",
            "USD",
            DEFAULT_MAX_AMOUNT,
            Ok(DEFAULT_MAX_AMOUNT),
        ),
        (
            "10000000000000.01",
            "USD",
            DEFAULT_MAX_AMOUNT,
            Err(AboveMaximum),
        ),
        ("5.01", "USD", 500, Err(AboveMaximum)),
        ("5", "USD", 500, Ok(500)),
        (forty_digits, "USD", DEFAULT_MAX_AMOUNT, Err(AboveMaximum)),
        (forty_digits, "JPY", u64::MAX, Err(AboveMaximum)),
        // u64::MAX minor units fits in the digits but not once scaled by 10^2.
        ("18446744073709551615", "USD", u64::MAX, Err(AboveMaximum)),
        ("18446744073709551615", "JPY", u64::MAX, Ok(u64::MAX)),
        ("18446744073709551616", "JPY", u64::MAX, Err(AboveMaximum)),
        ("１", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("٣", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("0x10", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1,5", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("1_000", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("NaN", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
        ("inf", "USD", DEFAULT_MAX_AMOUNT, Err(Malformed)),
    ];
    let mut failures = Vec::new();
    for (text, code, max, expected) in cases {
        let currency = Currency::new(code).unwrap();
        let got = parse_amount(text, currency, *max);
        if got != *expected {
            failures.push(format!(
                "parse_amount({text:?}, {code}, {max}) = {got:?}, expected {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Currencies and account ids
// ---------------------------------------------------------------------------------------------

#[test]
fn currency_table() {
    let cases: &[(&str, Result<u32, CurrencyError>)] = &[
        ("USD", Ok(2)),
        ("EUR", Ok(2)),
        ("JPY", Ok(0)),
        ("BHD", Ok(3)),
        ("usd", Err(CurrencyError::NotUpperCase)),
        ("Usd", Err(CurrencyError::NotUpperCase)),
        ("zzz", Err(CurrencyError::NotIso4217)),
        ("XAU", Err(CurrencyError::NoMinorUnits)),
        ("ZZZ", Err(CurrencyError::NotIso4217)),
        ("US", Err(CurrencyError::NotIso4217)),
        ("USDD", Err(CurrencyError::NotIso4217)),
        ("", Err(CurrencyError::NotIso4217)),
    ];
    let mut failures = Vec::new();
    for (code, expected) in cases {
        let got = Currency::new(code);
        let got_exponent = got.map(|c| c.exponent());
        if got_exponent != *expected {
            failures.push(format!(
                "Currency::new({code:?}) exponent = {got_exponent:?}, expected {expected:?}"
            ));
        }
        if let Ok(currency) = got {
            // The packed form round-trips and names the same code.
            if Currency::from_packed(currency.packed()) != Some(currency)
                || currency.to_string() != *code
            {
                failures.push(format!("{code}: packed form does not round-trip"));
            }
        }
    }
    assert!(Currency::from_packed(Currency::NONE.packed()).is_none());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The currencies accepted, and their exponents, are exactly `tests/data/currencies.txt`:
/// journals and snapshots store only a currency's code, so a change to the table (an update
/// of the ISO 4217 crate dropping a code, or changing an exponent) would make old journals
/// unreadable or rescale their balances. Every three-letter code is tried, both ways.
#[test]
fn the_currency_table_is_frozen() {
    let frozen: std::collections::HashMap<&str, u32> = include_str!("data/currencies.txt")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (code, exponent) = l.split_once(' ').expect("code exponent");
            (code, exponent.parse().expect("exponent"))
        })
        .collect();
    assert!(frozen.len() > 150, "{} currencies", frozen.len());
    let mut failures = Vec::new();
    for a in b'A'..=b'Z' {
        for b in b'A'..=b'Z' {
            for c in b'A'..=b'Z' {
                let code = String::from_utf8(vec![a, b, c]).expect("ascii");
                let got = Currency::new(&code).ok().map(|c| c.exponent());
                let expected = frozen.get(code.as_str()).copied();
                if got != expected {
                    failures.push(format!("{code}: exponent {got:?}, frozen as {expected:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the currency table changed (journals store only codes: review before accepting, and keep every code old journals may hold):\n{}",
        failures.join("\n")
    );
}

#[test]
fn account_id_table() {
    let sixty_four = "a".repeat(64);
    let sixty_five = "a".repeat(65);
    let cases: &[(&str, Result<(), AccountIdError>)] = &[
        ("alice", Ok(())),
        ("A-Za-z0-9._:-", Ok(())),
        ("user:42.savings_eur-1", Ok(())),
        ("x", Ok(())),
        (&sixty_four, Ok(())),
        ("", Err(AccountIdError::Empty)),
        (&sixty_five, Err(AccountIdError::TooLong)),
        ("al ice", Err(AccountIdError::BadCharacter)),
        (" alice", Err(AccountIdError::BadCharacter)),
        ("a/b", Err(AccountIdError::BadCharacter)),
        ("a\\b", Err(AccountIdError::BadCharacter)),
        ("alicé", Err(AccountIdError::BadCharacter)),
        ("ａ", Err(AccountIdError::BadCharacter)),
        ("a\0", Err(AccountIdError::BadCharacter)),
        ("a\n", Err(AccountIdError::BadCharacter)),
    ];
    let mut failures = Vec::new();
    for (text, expected) in cases {
        let got = AccountId::new(text);
        match (&got, expected) {
            (Ok(id), Ok(())) if id.as_str() == *text && id.as_bytes() == text.as_bytes() => {}
            (Err(e), Err(want)) if e == want => {}
            _ => failures.push(format!(
                "AccountId::new({text:?}) = {got:?}, expected {expected:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Rejections
// ---------------------------------------------------------------------------------------------

struct Harness {
    ledger: Ledger,
    next_id: u128,
}

impl Harness {
    fn new(config: LedgerConfig) -> Harness {
        Harness {
            ledger: Ledger::new(config),
            next_id: 1,
        }
    }

    fn run(&mut self, kind: CommandKind) -> CommandRecord {
        let id = TransactionId(self.next_id);
        self.next_id += 1;
        self.ledger.execute(&Command {
            transaction_id: id,
            timestamp_ns: 1_000 + self.next_id as u64,
            kind,
        })
    }

    fn ok(&mut self, kind: CommandKind) -> CommandRecord {
        let record = self.run(kind);
        assert!(
            record.is_committed(),
            "setup command {kind:?} was rejected: {:?}",
            record.rejection
        );
        record
    }

    fn open(&mut self, name: &str) {
        self.ok(CommandKind::OpenAccount {
            account: account(name),
        });
    }

    fn deposit(&mut self, name: &str, amount: MinorUnits) {
        self.ok(CommandKind::Deposit {
            account: account(name),
            amount,
            currency: usd(),
        });
    }
}

/// Executes `command` and checks that it is rejected with `code`: one `Rejected` event at the
/// next sequence, and the only state change is the sequence and the remembered id (checked on the
/// snapshot encoding: the accounts and totals sections are byte-identical).
fn assert_rejected(ledger: &mut Ledger, command: Command, code: RejectCode, remembers_id: bool) {
    let seq = ledger.next_seq();
    let hash = ledger.state_hash();
    let before = encode_snapshot(ledger, None);
    let ids_before = ledger.transaction_id_count();
    let outcome_before = ledger.outcome_of(command.transaction_id);

    // The account the rejection names: the command's own (the debit account of a transfer, the
    // account of a deposit or withdrawal) when it is open, none for an opening or a reused id.
    let party = match command.kind {
        _ if !remembers_id => None,
        CommandKind::Transfer { from, .. } => ledger.account_index(&from),
        CommandKind::Deposit { account, .. } | CommandKind::Withdraw { account, .. } => {
            ledger.account_index(&account)
        }
        CommandKind::OpenAccount { .. } => None,
    };
    let before_ledger = ledger.clone();

    let record = ledger.execute(&command);

    assert_eq!(record.rejection, Some(code), "{command:?}");
    assert_eq!(
        record.events()[0].account,
        party.unwrap_or(u32::MAX),
        "{command:?}"
    );
    // Replay accepts it, and refuses a rejection that names an account that does not exist.
    before_ledger.verify_record(&record).unwrap();
    let mut forged = record;
    forged.events[0].account = before_ledger.account_count() + 7;
    assert!(before_ledger.verify_record(&forged).is_err());
    assert!(!record.replayed);
    assert_eq!(record.first_seq, seq);
    assert_eq!(record.event_count, 1);
    let event = record.events()[0];
    assert_eq!(event.kind, EventKind::Rejected);
    assert_eq!(event.seq, seq);
    assert_eq!((event.amount, event.balance_after), (0, 0));
    assert_eq!(record.transaction_id, command.transaction_id);
    assert_eq!(record.fingerprint, command.fingerprint());
    assert_eq!(ledger.next_seq(), seq + 1);
    assert_ne!(
        ledger.state_hash(),
        hash,
        "the sequence moved, so the hash must too"
    );
    ledger.check_invariants().unwrap();

    let after = encode_snapshot(ledger, None);
    // Header: next_seq at 16, account_count at 40, remembered_count at 48, totals_count at 56.
    let header_u64 =
        |bytes: &[u8], at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!(header_u64(&after, 16), seq + 1);
    assert_eq!(
        header_u64(&after, 40),
        header_u64(&before, 40),
        "account count changed"
    );
    assert_eq!(
        header_u64(&after, 56),
        header_u64(&before, 56),
        "currency count changed"
    );
    let body_before = &before[SNAPSHOT_HEADER_BYTES..before.len() - 4];
    let body_after = &after[SNAPSHOT_HEADER_BYTES..after.len() - 4];
    if remembers_id {
        assert_eq!(ledger.transaction_id_count(), ids_before + 1);
        assert_eq!(
            ledger.outcome_of(command.transaction_id),
            Some((seq, Some(code)))
        );
        let mut expected = body_before.to_vec();
        expected.extend_from_slice(&command.transaction_id.0.to_le_bytes());
        expected.extend_from_slice(&command.fingerprint().to_le_bytes());
        expected.extend_from_slice(&((seq << 8) | code as u64).to_le_bytes());
        assert_eq!(
            body_after,
            &expected[..],
            "balances, totals or older ids changed"
        );
    } else {
        // A reused id keeps its original outcome; nothing new is remembered.
        assert_eq!(ledger.transaction_id_count(), ids_before);
        assert_eq!(ledger.outcome_of(command.transaction_id), outcome_before);
        assert_eq!(body_after, body_before, "balances, totals or ids changed");
    }
}

fn command(id: u128, kind: CommandKind) -> Command {
    Command {
        transaction_id: TransactionId(id),
        timestamp_ns: 77,
        kind,
    }
}

fn setup_alice_bob(config: LedgerConfig) -> Harness {
    let mut h = Harness::new(config);
    h.open("alice");
    h.open("bob");
    h.deposit("alice", 1_000);
    h
}

#[test]
fn rejects_account_not_found() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let (alice, ghost) = (account("alice"), account("ghost"));
    let cases = [
        CommandKind::Deposit {
            account: ghost,
            amount: 5,
            currency: usd(),
        },
        CommandKind::Withdraw {
            account: ghost,
            amount: 5,
            currency: usd(),
        },
        CommandKind::Transfer {
            from: ghost,
            to: alice,
            amount: 5,
            currency: usd(),
        },
        CommandKind::Transfer {
            from: alice,
            to: ghost,
            amount: 5,
            currency: usd(),
        },
    ];
    for (i, kind) in cases.into_iter().enumerate() {
        assert_rejected(
            &mut h.ledger,
            command(900 + i as u128, kind),
            RejectCode::AccountNotFound,
            true,
        );
    }
}

#[test]
fn rejects_account_already_exists() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let kind = CommandKind::OpenAccount {
        account: account("alice"),
    };
    assert_rejected(
        &mut h.ledger,
        command(900, kind),
        RejectCode::AccountAlreadyExists,
        true,
    );
}

#[test]
fn rejects_same_account() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let alice = account("alice");
    let kind = CommandKind::Transfer {
        from: alice,
        to: alice,
        amount: 5,
        currency: usd(),
    };
    assert_rejected(
        &mut h.ledger,
        command(900, kind),
        RejectCode::SameAccount,
        true,
    );
}

#[test]
fn rejects_insufficient_funds() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let (alice, bob) = (account("alice"), account("bob"));
    let eur = Currency::new("EUR").unwrap();
    let cases = [
        CommandKind::Withdraw {
            account: alice,
            amount: 1_001,
            currency: usd(),
        },
        CommandKind::Transfer {
            from: alice,
            to: bob,
            amount: 1_001,
            currency: usd(),
        },
        // Bob has no balance at all, alice none in EUR.
        CommandKind::Withdraw {
            account: bob,
            amount: 1,
            currency: usd(),
        },
        CommandKind::Transfer {
            from: alice,
            to: bob,
            amount: 1,
            currency: eur,
        },
    ];
    for (i, kind) in cases.into_iter().enumerate() {
        assert_rejected(
            &mut h.ledger,
            command(900 + i as u128, kind),
            RejectCode::InsufficientFunds,
            true,
        );
    }
    // The exact balance can be withdrawn.
    h.ok(CommandKind::Withdraw {
        account: alice,
        amount: 1_000,
        currency: usd(),
    });
}

#[test]
fn rejects_invalid_amount() {
    let config = LedgerConfig {
        max_amount: 10_000,
        ..LedgerConfig::default()
    };
    let mut h = setup_alice_bob(config);
    let (alice, bob) = (account("alice"), account("bob"));
    let mut id = 900;
    for amount in [0, 10_001, u64::MAX] {
        for kind in [
            CommandKind::Deposit {
                account: alice,
                amount,
                currency: usd(),
            },
            CommandKind::Withdraw {
                account: alice,
                amount,
                currency: usd(),
            },
            CommandKind::Transfer {
                from: alice,
                to: bob,
                amount,
                currency: usd(),
            },
            // The amount is checked before the account.
            CommandKind::Deposit {
                account: account("ghost"),
                amount,
                currency: usd(),
            },
        ] {
            assert_rejected(
                &mut h.ledger,
                command(id, kind),
                RejectCode::InvalidAmount,
                true,
            );
            id += 1;
        }
    }
    h.deposit("alice", 10_000);
}

#[test]
fn rejects_unsupported_currency() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let (alice, bob) = (account("alice"), account("bob"));
    let cases = [
        CommandKind::Deposit {
            account: alice,
            amount: 5,
            currency: Currency::NONE,
        },
        CommandKind::Withdraw {
            account: alice,
            amount: 5,
            currency: Currency::NONE,
        },
        CommandKind::Transfer {
            from: alice,
            to: bob,
            amount: 5,
            currency: Currency::NONE,
        },
    ];
    // NONE is the only non-ISO `Currency` a command can carry: the default is NONE, and codes
    // that are not ISO 4217 with minor units cannot be built.
    assert_eq!(Currency::default(), Currency::NONE);
    for code in ["AAA", "XAU", "usd", "US"] {
        assert!(Currency::new(code).is_err(), "{code}");
    }
    for (i, kind) in cases.into_iter().enumerate() {
        assert_rejected(
            &mut h.ledger,
            command(900 + i as u128, kind),
            RejectCode::UnsupportedCurrency,
            true,
        );
    }
}

#[test]
fn rejects_invalid_account_id() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let kind = CommandKind::OpenAccount {
        account: AccountId::EMPTY,
    };
    assert_rejected(
        &mut h.ledger,
        command(900, kind),
        RejectCode::InvalidAccountId,
        true,
    );
}

#[test]
fn rejects_amount_overflow() {
    let config = LedgerConfig {
        max_amount: u64::MAX,
        ..LedgerConfig::default()
    };
    let mut h = Harness::new(config);
    h.open("alice");
    h.open("bob");
    h.deposit("alice", u64::MAX - 10);
    h.deposit("bob", 10);
    let cases = [
        // The currency total would pass u64::MAX, on another account...
        CommandKind::Deposit {
            account: account("bob"),
            amount: 1,
            currency: usd(),
        },
        // ... and on the same one.
        CommandKind::Deposit {
            account: account("alice"),
            amount: u64::MAX,
            currency: usd(),
        },
    ];
    for (i, kind) in cases.into_iter().enumerate() {
        assert_rejected(
            &mut h.ledger,
            command(900 + i as u128, kind),
            RejectCode::AmountOverflow,
            true,
        );
    }
    // Moving the whole lot around is fine: the total does not change.
    h.ok(CommandKind::Transfer {
        from: account("alice"),
        to: account("bob"),
        amount: u64::MAX - 10,
        currency: usd(),
    });
    let bob = h.ledger.account_index(&account("bob")).unwrap();
    assert_eq!(h.ledger.balance(bob, usd()), Some(u64::MAX));
    // Another currency has its own total.
    h.ok(CommandKind::Deposit {
        account: account("bob"),
        amount: u64::MAX,
        currency: Currency::new("EUR").unwrap(),
    });
    h.ledger.check_invariants().unwrap();
}

#[test]
fn rejects_transaction_id_reused() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let alice = account("alice");
    // Id 3 was the deposit of 1000 to alice; the same id with any other body is a reuse.
    let original = h.ledger.outcome_of(TransactionId(3)).unwrap();
    let cases = [
        CommandKind::Deposit {
            account: alice,
            amount: 1_001,
            currency: usd(),
        },
        CommandKind::Withdraw {
            account: alice,
            amount: 1_000,
            currency: usd(),
        },
        CommandKind::OpenAccount {
            account: account("carol"),
        },
    ];
    for kind in cases {
        assert_rejected(
            &mut h.ledger,
            command(3, kind),
            RejectCode::TransactionIdReused,
            false,
        );
    }
    assert_eq!(h.ledger.outcome_of(TransactionId(3)), Some(original));
    // A rejected command's id is remembered too: reusing it is also refused.
    assert_rejected(
        &mut h.ledger,
        command(
            500,
            CommandKind::Withdraw {
                account: alice,
                amount: 5_000,
                currency: usd(),
            },
        ),
        RejectCode::InsufficientFunds,
        true,
    );
    assert_rejected(
        &mut h.ledger,
        command(
            500,
            CommandKind::Withdraw {
                account: alice,
                amount: 5,
                currency: usd(),
            },
        ),
        RejectCode::TransactionIdReused,
        false,
    );
}

#[test]
fn rejects_too_many_accounts() {
    let config = LedgerConfig {
        max_accounts: 1,
        ..LedgerConfig::default()
    };
    let mut h = Harness::new(config);
    h.open("alice");
    let kind = CommandKind::OpenAccount {
        account: account("bob"),
    };
    assert_rejected(
        &mut h.ledger,
        command(900, kind),
        RejectCode::TooManyAccounts,
        true,
    );
    assert_eq!(h.ledger.account_count(), 1);
}

#[test]
fn every_rejection_code_is_covered_above() {
    // Guards the list of tests above: a new code does not compile here until it is named, and
    // the test named for it must exist and assert that code.
    let source = include_str!("core_rules.rs");
    for code in RejectCode::ALL {
        let (test, variant) = match code {
            RejectCode::AccountNotFound => ("rejects_account_not_found", "AccountNotFound"),
            RejectCode::AccountAlreadyExists => {
                ("rejects_account_already_exists", "AccountAlreadyExists")
            }
            RejectCode::SameAccount => ("rejects_same_account", "SameAccount"),
            RejectCode::InsufficientFunds => ("rejects_insufficient_funds", "InsufficientFunds"),
            RejectCode::InvalidAmount => ("rejects_invalid_amount", "InvalidAmount"),
            RejectCode::UnsupportedCurrency => {
                ("rejects_unsupported_currency", "UnsupportedCurrency")
            }
            RejectCode::AmountOverflow => ("rejects_amount_overflow", "AmountOverflow"),
            RejectCode::TransactionIdReused => {
                ("rejects_transaction_id_reused", "TransactionIdReused")
            }
            RejectCode::InvalidAccountId => ("rejects_invalid_account_id", "InvalidAccountId"),
            RejectCode::TooManyAccounts => ("rejects_too_many_accounts", "TooManyAccounts"),
        };
        let start = source
            .find(&format!("#[test]\nfn {test}() {{"))
            .unwrap_or_else(|| panic!("no test {test} for {code:?}"));
        let body = &source[start..];
        let body = &body[..body[1..].find("#[test]").map_or(body.len(), |end| end + 1)];
        assert!(
            body.contains(&format!("RejectCode::{variant}")),
            "{test} never checks RejectCode::{variant}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Retries and event shapes
// ---------------------------------------------------------------------------------------------

/// Every part of a body is in its fingerprint: the same transaction id with any one part of a
/// transfer changed (the kind, either account, the accounts swapped, the amount, the
/// currency) is refused as `transaction_id_reused`, not answered as a replay of the original;
/// only the timestamp may differ.
#[test]
fn a_transfer_id_reused_with_any_one_part_changed_is_refused() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    h.open("carol");
    let eur = Currency::new("EUR").unwrap();
    h.ok(CommandKind::Deposit {
        account: account("alice"),
        amount: 1_000,
        currency: eur,
    });
    h.ok(CommandKind::Deposit {
        account: account("bob"),
        amount: 1_000,
        currency: usd(),
    });
    let (alice, bob, carol) = (account("alice"), account("bob"), account("carol"));
    let transfer = |from, to, amount, currency| CommandKind::Transfer {
        from,
        to,
        amount,
        currency,
    };
    let original = h
        .ledger
        .execute(&command(900, transfer(alice, bob, 100, usd())));
    assert!(original.is_committed() && !original.replayed);
    let changed = [
        transfer(carol, bob, 100, usd()),
        transfer(alice, carol, 100, usd()),
        transfer(bob, alice, 100, usd()),
        transfer(alice, bob, 101, usd()),
        transfer(alice, bob, 100, eur),
        CommandKind::Deposit {
            account: alice,
            amount: 100,
            currency: usd(),
        },
        CommandKind::Withdraw {
            account: alice,
            amount: 100,
            currency: usd(),
        },
    ];
    for kind in changed {
        assert_rejected(
            &mut h.ledger,
            command(900, kind),
            RejectCode::TransactionIdReused,
            false,
        );
    }
    let retry = Command {
        timestamp_ns: 12_345,
        ..command(900, transfer(alice, bob, 100, usd()))
    };
    let again = h.ledger.execute(&retry);
    assert!(again.replayed && again.first_seq == original.first_seq);
}

/// `state_hash` covers every part of the state: a snapshot whose body is changed and
/// checksummed again, its claimed hash kept, is refused by the hash when two accounts'
/// balances are swapped (the totals still agree), an account is renamed, or a remembered id's
/// fingerprint changes. (The tests compared hashes computed by the same code: dropping a part
/// from the hash went unnoticed.)
#[test]
fn the_state_hash_covers_balances_names_and_remembered_ids() {
    let mut h = Harness::new(LedgerConfig::default());
    h.open("alice");
    h.open("bob");
    h.deposit("alice", 600);
    h.deposit("bob", 400);
    let config = h.ledger.config();
    let bytes = encode_snapshot(&h.ledger, None);
    assert!(decode_snapshot(&bytes, config).is_ok());
    let at = |needle: &[u8]| {
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("in the snapshot")
    };
    // An account: name length, name, balance count, then (currency, balance) entries.
    let alice_balance = at(b"\x05alice") + 1 + 5 + 1 + 2;
    let bob_balance = at(b"\x03bob") + 1 + 3 + 1 + 2;
    let refusal = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut changed = bytes.clone();
        change(&mut changed);
        let body = changed.len() - 4;
        let crc = crc32c::crc32c(&changed[..body]);
        changed[body..].copy_from_slice(&crc.to_le_bytes());
        match decode_snapshot(&changed, config) {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string(),
        }
    };
    let swapped = refusal(&|b| {
        b[alice_balance..alice_balance + 8].copy_from_slice(&400u64.to_le_bytes());
        b[bob_balance..bob_balance + 8].copy_from_slice(&600u64.to_le_bytes());
    });
    assert!(
        swapped.contains("state hash"),
        "balances swapped: {swapped}"
    );
    let renamed = refusal(&|b| b[at(b"\x05alice") + 5] = b'f');
    assert!(
        renamed.contains("state hash"),
        "an account renamed: {renamed}"
    );
    // The last remembered id's fingerprint: 8 bytes after its 16-byte id, before the CRC.
    let fingerprint = bytes.len() - 4 - 32 + 16;
    let forged = refusal(&|b| b[fingerprint] ^= 1);
    assert!(
        forged.contains("state hash"),
        "a fingerprint changed: {forged}"
    );
}

#[test]
fn retry_with_same_id_and_body_is_replayed_and_changes_nothing() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let (alice, bob) = (account("alice"), account("bob"));
    let cases = [
        CommandKind::Transfer {
            from: alice,
            to: bob,
            amount: 300,
            currency: usd(),
        },
        CommandKind::Withdraw {
            account: alice,
            amount: 1_000_000,
            currency: usd(),
        },
        CommandKind::OpenAccount {
            account: account("carol"),
        },
        CommandKind::OpenAccount { account: alice },
    ];
    for (i, kind) in cases.into_iter().enumerate() {
        let original = h.ledger.execute(&command(700 + i as u128, kind));
        assert!(!original.replayed);
        let hash = h.ledger.state_hash();
        let seq = h.ledger.next_seq();
        for attempt in 0..3u64 {
            // A retry may carry a different timestamp: it is not part of the body.
            let retry = Command {
                transaction_id: TransactionId(700 + i as u128),
                timestamp_ns: 5_000 + attempt,
                kind,
            };
            let again = h.ledger.execute(&retry);
            assert!(again.replayed, "{kind:?}");
            assert_eq!(again.first_seq, original.first_seq);
            assert_eq!(again.rejection, original.rejection);
            assert_eq!(again.event_count, 0, "a replayed outcome carries no events");
            assert_eq!(h.ledger.state_hash(), hash);
            assert_eq!(h.ledger.next_seq(), seq);
        }
    }
    let bob_index = h.ledger.account_index(&bob).unwrap();
    assert_eq!(
        h.ledger.balance(bob_index, usd()),
        Some(300),
        "the transfer ran once"
    );
}

#[test]
fn transfer_emits_debit_then_credit() {
    let mut h = setup_alice_bob(LedgerConfig::default());
    let (alice, bob) = (account("alice"), account("bob"));
    let (ai, bi) = (
        h.ledger.account_index(&alice).unwrap(),
        h.ledger.account_index(&bob).unwrap(),
    );
    let mut expected_alice = 1_000;
    let mut expected_bob = 0;
    for amount in [1, 250, 749] {
        let seq = h.ledger.next_seq();
        let record = h.ok(CommandKind::Transfer {
            from: alice,
            to: bob,
            amount,
            currency: usd(),
        });
        expected_alice -= amount;
        expected_bob += amount;
        assert_eq!(record.first_seq, seq);
        assert_eq!(record.event_count, 2);
        let [debit, credit] = [record.events()[0], record.events()[1]];
        assert_eq!(
            (
                debit.kind,
                debit.seq,
                debit.account,
                debit.amount,
                debit.balance_after,
                debit.currency
            ),
            (EventKind::Debited, seq, ai, amount, expected_alice, usd())
        );
        assert_eq!(
            (
                credit.kind,
                credit.seq,
                credit.account,
                credit.amount,
                credit.balance_after,
                credit.currency
            ),
            (
                EventKind::Credited,
                seq + 1,
                bi,
                amount,
                expected_bob,
                usd()
            )
        );
        assert_eq!(h.ledger.next_seq(), seq + 2);
        assert_eq!(record.next_seq(), seq + 2);
    }
    assert_eq!(h.ledger.balance(ai, usd()), Some(0));
    assert_eq!(h.ledger.balance(bi, usd()), Some(1_000));
    let totals = h.ledger.totals();
    assert_eq!(totals.len(), 1);
    assert_eq!(
        (
            totals[0].1.deposited,
            totals[0].1.withdrawn,
            totals[0].1.outstanding
        ),
        (1_000, 0, 1_000)
    );
}

#[test]
fn reject_codes_are_unique_snake_case_and_round_trip() {
    let mut seen = HashSet::new();
    for code in RejectCode::ALL {
        let name = code.code();
        assert!(
            !name.is_empty()
                && !name.starts_with('_')
                && !name.ends_with('_')
                && !name.contains("__"),
            "{name}"
        );
        assert!(
            name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{name} is not snake_case"
        );
        assert!(seen.insert(name), "duplicate code {name}");
        assert!(!code.message().is_empty());
        assert_eq!(RejectCode::from_u8(code as u8), Some(code));
    }
    assert_eq!(
        RejectCode::from_u8(0),
        None,
        "0 means committed in the journal"
    );
    assert_eq!(RejectCode::from_u8(RejectCode::ALL.len() as u8 + 1), None);
}
