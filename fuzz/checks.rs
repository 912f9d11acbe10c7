//! The properties the fuzz targets check, one function per target, each taking the raw fuzz
//! input. Shared, through `#[path]`, by the cargo-fuzz targets in `fuzz/fuzz_targets/` and by
//! the proptest in `tests/hostile_input.rs`, so that both check exactly the same things.
//!
//! Every function panics (an assertion) when a property does not hold; a decoder that panics on
//! its own is a finding too.

use wallet::api::json::{
    BatchRequest, MoneyRequest, OpenAccountRequest, TransferRequest, decode, max_amount,
};
use wallet::core::codec::{
    decode_record, decode_snapshot, encode_record, encode_snapshot, payload_len, snapshot_next_seq,
};
use wallet::core::types::{AmountError, DEFAULT_MAX_AMOUNT};
use wallet::core::{
    CommandKind, Currency, LedgerConfig, TransactionId, format_amount, parse_amount,
};
use wallet::journal::format::{FRAME_HEADER_BYTES, MAX_FRAME_BYTES, check_frame, seal_frame};

/// Currencies with 2, 0 and 3 fractional digits.
pub const CURRENCIES: [(&str, u32); 3] = [("USD", 2), ("JPY", 0), ("BHD", 3)];
/// Maxima the amount parser is tried with.
pub const MAXIMA: [u64; 4] = [DEFAULT_MAX_AMOUNT, u64::MAX, 1, 12_345];

// ---------------------------------------------------------------------------------------------
// amount_parser
// ---------------------------------------------------------------------------------------------

/// What `parse_amount` must answer, computed independently: digits, optionally `.` and
/// 1..=exponent digits, the value in saturating `u128`.
pub fn reference_amount(text: &str, exponent: u32, max: u64) -> Result<u64, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return Err(AmountError::Malformed);
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > exponent as usize {
        return Err(AmountError::TooManyFractionDigits);
    }
    let mut value: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        value = value
            .saturating_mul(10)
            .saturating_add(u128::from(b - b'0'));
    }
    for _ in fraction.len()..exponent as usize {
        value = value.saturating_mul(10);
    }
    if value == 0 {
        return Err(AmountError::Zero);
    }
    if value > u128::from(max) {
        return Err(AmountError::AboveMaximum);
    }
    Ok(value as u64)
}

/// `parse_amount(text, currency, max)` for USD, JPY, BHD and several maxima: `Ok(v)` implies
/// `0 < v <= max` and that `format_amount(v)` parses back to `v`; every answer, error kind
/// included, agrees with `reference_amount`.
pub fn amount_text(text: &str) {
    for (code, exponent) in CURRENCIES {
        let currency = Currency::new(code).expect("supported currency");
        assert_eq!(currency.exponent(), exponent, "{code}");
        for max in MAXIMA {
            let parsed = parse_amount(text, currency, max);
            assert_eq!(
                parsed,
                reference_amount(text, exponent, max),
                "parse_amount({text:?}, {code}, {max})"
            );
            if let Ok(v) = parsed {
                assert!(v > 0 && v <= max, "{text:?} {code} max {max} gave {v}");
                let formatted = format_amount(v, currency);
                assert_eq!(
                    parse_amount(&formatted, currency, max),
                    Ok(v),
                    "{text:?} -> {formatted:?} ({code})"
                );
            }
        }
    }
}

/// The `amount_parser` target: arbitrary bytes, only valid UTF-8 is parsed.
pub fn amount_bytes(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        amount_text(text);
    }
}

// ---------------------------------------------------------------------------------------------
// json_request
// ---------------------------------------------------------------------------------------------

/// A decoded transfer survives a serialize/decode round trip, and a command built from it
/// carries exactly the validated fields.
fn check_transfer(request: &TransferRequest) {
    let json = serde_json::to_vec(request).expect("a request serializes");
    let again: TransferRequest = decode(&json).expect("a decoded request re-encodes decodably");
    assert_eq!(format!("{again:?}"), format!("{request:?}"));
    let Ok(command) = request.to_command(7) else {
        return;
    };
    assert_eq!(command.timestamp_ns, 7);
    assert_eq!(
        Some(command.transaction_id),
        TransactionId::parse(&request.transaction_id)
    );
    let CommandKind::Transfer {
        from,
        to,
        amount,
        currency,
    } = command.kind
    else {
        panic!("a transfer request built {command:?}")
    };
    assert_eq!(from.as_str(), request.from_account);
    assert_eq!(to.as_str(), request.to_account);
    assert_eq!(Ok(currency), Currency::new(&request.currency));
    assert_eq!(
        Ok(amount),
        parse_amount(&request.amount, currency, max_amount())
    );
    assert!(amount > 0 && amount <= max_amount());
}

/// The `json_request` target: the body decoded as each request type, and every decoded
/// request turned into a command.
pub fn json_body(data: &[u8]) {
    if let Ok(request) = decode::<TransferRequest>(data) {
        check_transfer(&request);
    }
    if let Ok(batch) = decode::<BatchRequest>(data) {
        for request in &batch.transfers {
            check_transfer(request);
        }
    }
    if let Ok(request) = decode::<MoneyRequest>(data) {
        for deposit in [true, false] {
            if let Ok(command) = request.to_command(7, deposit) {
                let (CommandKind::Deposit { amount, .. } | CommandKind::Withdraw { amount, .. }) =
                    command.kind
                else {
                    panic!("a money request built {command:?}")
                };
                assert!(amount > 0 && amount <= max_amount());
            }
        }
    }
    let _ = decode::<OpenAccountRequest>(data);
}

// ---------------------------------------------------------------------------------------------
// journal_record
// ---------------------------------------------------------------------------------------------

/// Splits a `journal_record` input: the first 8 bytes are the sequence (little-endian), the
/// rest the record payload; shorter inputs are a payload at sequence 1.
pub fn split_journal_input(data: &[u8]) -> (u64, &[u8]) {
    match data.split_first_chunk::<8>() {
        Some((seq, payload)) => (u64::from_le_bytes(*seq), payload),
        None => (1, data),
    }
}

/// The `journal_record` target:
/// - the whole input through `check_frame`, and what it accepts through `decode_record`, as
///   the journal reader does;
/// - `decode_record(seq, payload)` = `Ok(r)` implies that `encode_record(r)` into
///   `payload_len(r)` bytes gives back exactly `payload` (the encoding is canonical) and decodes
///   to `r` again, and `r`'s events and `r.next_seq()` fit in the sequence space;
/// - the payload sealed into a frame (`seal_frame`) passes `check_frame` with that sequence
///   whenever its length is one the writer could produce.
pub fn journal_bytes(data: &[u8]) {
    if let Ok(frame) = check_frame(data) {
        assert!(
            frame.length >= FRAME_HEADER_BYTES && frame.length <= data.len().min(MAX_FRAME_BYTES)
        );
        let _ = decode_record(frame.sequence, &data[FRAME_HEADER_BYTES..frame.length]);
    }

    let (seq, payload) = split_journal_input(data);
    if let Ok(record) = decode_record(seq, payload) {
        assert_eq!(record.first_seq, seq);
        // Every event has a sequence number, and so has the record after it: a payload claiming
        // more events than the sequence space has left is corrupt, not a record.
        assert!(
            seq.checked_add(u64::from(record.event_count)).is_some(),
            "decode_record({seq}, ..) accepted {} events past the end of the sequence space",
            record.event_count
        );
        let len = payload_len(&record);
        let mut buffer = vec![0xA5; len];
        assert_eq!(encode_record(&record, &mut buffer), len);
        assert_eq!(buffer, payload, "re-encoding {record:?}");
        let again = decode_record(seq, &buffer).expect("a re-encoded record decodes");
        assert_eq!(again, record);
    }

    let frame_len = FRAME_HEADER_BYTES + payload.len();
    if frame_len.is_multiple_of(8)
        && (FRAME_HEADER_BYTES + 40..=MAX_FRAME_BYTES).contains(&frame_len)
    {
        let mut frame = vec![0; frame_len];
        frame[FRAME_HEADER_BYTES..].copy_from_slice(payload);
        let prev_crc = seq as u32 ^ 0x5EED;
        let crc = seal_frame(&mut frame, seq, prev_crc);
        let checked = check_frame(&frame).expect("a sealed frame checks");
        assert_eq!(
            (
                checked.length,
                checked.crc,
                checked.sequence,
                checked.prev_crc
            ),
            (frame_len, crc, seq, prev_crc)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// snapshot_decoder
// ---------------------------------------------------------------------------------------------

/// Turns a `snapshot_decoder` input into the snapshot bytes: the first byte picks a mode; when
/// it is odd the trailing CRC32C of the rest is recomputed, so that mutations reach the
/// structural checks behind the checksum instead of all failing on it.
pub fn snapshot_from_input(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    Some(bytes)
}

/// The `snapshot_decoder` target: `decode_snapshot` with the default config never panics, and
/// a snapshot that decodes gives a ledger whose own snapshot decodes to the same state.
pub fn snapshot_bytes(data: &[u8]) {
    let Some(bytes) = snapshot_from_input(data) else {
        return;
    };
    let _ = snapshot_next_seq(&bytes);
    if let Ok(ledger) = decode_snapshot(&bytes, LedgerConfig::default()) {
        assert_eq!(snapshot_next_seq(&bytes), Some(ledger.next_seq()));
        let again = decode_snapshot(&encode_snapshot(&ledger, None), LedgerConfig::default())
            .expect("a re-encoded snapshot decodes");
        assert_eq!(again.state_hash(), ledger.state_hash());
        assert_eq!(again.next_seq(), ledger.next_seq());
        assert_eq!(again.account_count(), ledger.account_count());
        assert_eq!(again.transaction_id_count(), ledger.transaction_id_count());
    }
}
