//! `parse_amount` on arbitrary UTF-8, for currencies with 2 (USD), 0 (JPY) and 3 (BHD)
//! fractional digits and several maxima. Checks, besides "no panic":
//! - `Ok(v)` implies `0 < v <= max`;
//! - `format_amount(v)` parses back to `v`;
//! - the result agrees with a simple reference grammar: digits, optionally `.` and
//!   1..=exponent digits, value computed without overflow in `u128`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wallet::core::types::{AmountError, DEFAULT_MAX_AMOUNT};
use wallet::core::{Currency, format_amount, parse_amount};

/// What `parse_amount` must answer, computed independently (saturating `u128`).
fn reference(text: &str, exponent: u32, max: u64) -> Result<u64, AmountError> {
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
        value = value.saturating_mul(10).saturating_add(u128::from(b - b'0'));
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for (code, exponent) in [("USD", 2), ("JPY", 0), ("BHD", 3)] {
        let currency = Currency::new(code).expect("supported currency");
        assert_eq!(currency.exponent(), exponent, "{code}");
        for max in [DEFAULT_MAX_AMOUNT, u64::MAX, 1, 12_345] {
            let parsed = parse_amount(text, currency, max);
            assert_eq!(parsed, reference(text, exponent, max), "{text:?} {code} max {max}");
            if let Ok(v) = parsed {
                assert!(v > 0 && v <= max, "{text:?} {code} max {max} gave {v}");
                let formatted = format_amount(v, currency);
                assert_eq!(parse_amount(&formatted, currency, max), Ok(v), "{text:?} -> {formatted:?} ({code})");
            }
        }
    }
});
