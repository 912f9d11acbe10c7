//! Domain types: account ids, currencies, amounts and transaction ids.
//!
//! Everything here is plain data with validating constructors. Nothing reads a clock,
//! a file or a random source.

use std::fmt;

use crate::core::RejectCode;

/// Largest account id, in bytes.
pub const ACCOUNT_ID_MAX_BYTES: usize = 64;

/// An account id as the outside world spells it: 1 to 64 bytes from `[A-Za-z0-9._:-]`.
///
/// Stored inline (no heap) so that a command fits in a ring slot without allocation, with its
/// xxh3-64 hash computed once by the constructor: the producer thread (an API handler) pays for
/// hashing, not the engine thread, which looks the id up by that hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountId {
    hash: u64,
    len: u8,
    bytes: [u8; ACCOUNT_ID_MAX_BYTES],
}

/// Why an account id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountIdError {
    Empty,
    TooLong,
    BadCharacter,
}

impl fmt::Display for AccountIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccountIdError::Empty => "must not be empty",
            AccountIdError::TooLong => "must be at most 64 bytes",
            AccountIdError::BadCharacter => "may only contain A-Z a-z 0-9 . _ : -",
        })
    }
}

/// `xxh3_64(b"")`, checked by a test (a `const fn` cannot call the hasher).
const EMPTY_ID_HASH: u64 = 0x2D06_8005_38D3_94C2;

impl AccountId {
    pub const EMPTY: AccountId = AccountId {
        hash: EMPTY_ID_HASH,
        len: 0,
        bytes: [0; ACCOUNT_ID_MAX_BYTES],
    };

    pub fn new(text: &str) -> Result<AccountId, AccountIdError> {
        Self::from_bytes(text.as_bytes())
    }

    pub fn from_bytes(raw: &[u8]) -> Result<AccountId, AccountIdError> {
        if raw.is_empty() {
            return Err(AccountIdError::Empty);
        }
        if raw.len() > ACCOUNT_ID_MAX_BYTES {
            return Err(AccountIdError::TooLong);
        }
        if !raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(AccountIdError::BadCharacter);
        }
        let mut bytes = [0u8; ACCOUNT_ID_MAX_BYTES];
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(AccountId {
            hash: xxhash_rust::xxh3::xxh3_64(raw),
            len: raw.len() as u8,
            bytes,
        })
    }

    /// `xxh3_64` of the id's bytes: the ledger's lookup hash and the partition hash that
    /// `replicate` documents.
    #[inline]
    pub fn hash64(&self) -> u64 {
        self.hash
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The first `N` bytes, zero-padded (ids are stored zero-padded).
    #[inline]
    pub fn head<const N: usize>(&self) -> [u8; N] {
        let mut head = [0u8; N];
        head.copy_from_slice(&self.bytes[..N]);
        head
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever admitted by the constructor.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.as_str())
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An ISO 4217 alphabetic currency code with defined minor units.
///
/// Encoded as three 5-bit letters in a `u16` (`(a << 10) | (b << 5) | c`, with `A` = 0), so the
/// encoding is unambiguous, stable and needs no table. The minor-unit exponent comes from the
/// `iso_currency` crate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency(u16);

/// Why a currency was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurrencyError {
    NotIso4217,
    NoMinorUnits,
    /// A valid code in the wrong case ("usd").
    NotUpperCase,
}

impl fmt::Display for CurrencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CurrencyError::NotIso4217 => "is not an ISO 4217 alphabetic code",
            CurrencyError::NotUpperCase => {
                "must be an upper-case ISO 4217 alphabetic code (USD, not usd)"
            }
            CurrencyError::NoMinorUnits => {
                "has no defined minor units (e.g. XAU) and is not supported"
            }
        })
    }
}

impl Default for Currency {
    /// `NONE`: never valid in a command, so a default can not pass for a real currency.
    fn default() -> Currency {
        Currency::NONE
    }
}

impl Currency {
    /// The "no currency" value; never valid in a command.
    pub const NONE: Currency = Currency(0xFFFF);

    pub fn new(code: &str) -> Result<Currency, CurrencyError> {
        let b = code.as_bytes();
        if b.len() != 3 || !b.iter().all(|c| c.is_ascii_uppercase()) {
            if b.len() == 3
                && b.iter().all(|c| c.is_ascii_alphabetic())
                && Currency::new(&code.to_ascii_uppercase()).is_ok()
            {
                return Err(CurrencyError::NotUpperCase);
            }
            return Err(CurrencyError::NotIso4217);
        }
        let packed =
            (u16::from(b[0] - b'A') << 10) | (u16::from(b[1] - b'A') << 5) | u16::from(b[2] - b'A');
        match exponents()[packed as usize] {
            NOT_ISO => Err(CurrencyError::NotIso4217),
            NO_MINOR_UNITS => Err(CurrencyError::NoMinorUnits),
            _ => Ok(Currency(packed)),
        }
    }

    /// Decodes the packed form, as read from a journal; `None` if it is not a supported code.
    pub fn from_packed(packed: u16) -> Option<Currency> {
        match exponents().get(packed as usize) {
            Some(&e) if e != NOT_ISO && e != NO_MINOR_UNITS => Some(Currency(packed)),
            _ => None,
        }
    }

    fn letters_of(packed: u16) -> Option<[u8; 3]> {
        let parts = [(packed >> 10) & 31, (packed >> 5) & 31, packed & 31];
        if packed >> 15 != 0 || parts.iter().any(|p| *p >= 26) {
            return None;
        }
        Some(parts.map(|p| b'A' + p as u8))
    }

    pub fn packed(self) -> u16 {
        self.0
    }

    pub fn code(self) -> [u8; 3] {
        Self::letters_of(self.0).unwrap_or(*b"???")
    }

    /// Number of digits after the decimal point (2 for USD, 0 for JPY, 3 for BHD).
    pub fn exponent(self) -> u32 {
        match exponents().get(self.0 as usize) {
            Some(&e) if e != NOT_ISO && e != NO_MINOR_UNITS => u32::from(e),
            _ => 0,
        }
    }
}

const NOT_ISO: u8 = u8::MAX;
const NO_MINOR_UNITS: u8 = u8::MAX - 1;

/// Minor-unit exponent of every packed code (`NOT_ISO`, `NO_MINOR_UNITS` otherwise), built once
/// from the `iso_currency` crate: a lookup by code there is a long string match, too slow for
/// every journal event and every request.
fn exponents() -> &'static [u8; 1 << 15] {
    static TABLE: std::sync::OnceLock<Box<[u8; 1 << 15]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([NOT_ISO; 1 << 15]);
        for packed in 0..(1u16 << 15) {
            let Some(letters) = Currency::letters_of(packed) else {
                continue;
            };
            let Some(iso) = std::str::from_utf8(&letters)
                .ok()
                .and_then(iso_currency::Currency::from_code)
            else {
                continue;
            };
            table[packed as usize] = match iso.exponent() {
                Some(e) if e < NO_MINOR_UNITS as u16 => e as u8,
                _ => NO_MINOR_UNITS,
            };
        }
        table
    })
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.code();
        f.write_str(std::str::from_utf8(&code).unwrap_or("???"))
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({self})")
    }
}

/// An amount in integer minor units of its currency (cents for USD). Never zero in a command.
pub type MinorUnits = u64;

/// The default largest amount a single command may move, in minor units (10^15, e.g. ten
/// trillion dollars). Configurable per ledger.
pub const DEFAULT_MAX_AMOUNT: MinorUnits = 1_000_000_000_000_000;

/// Why a decimal amount string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountError {
    Empty,
    Malformed,
    Zero,
    TooManyFractionDigits,
    AboveMaximum,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::Empty => "must not be empty",
            AmountError::Malformed => {
                "must be a plain positive decimal such as \"12.34\" (no sign, spaces or exponent)"
            }
            AmountError::Zero => "must be greater than zero",
            AmountError::TooManyFractionDigits => {
                "has more fractional digits than the currency allows"
            }
            AmountError::AboveMaximum => "is above the maximum amount",
        })
    }
}

impl From<AmountError> for RejectCode {
    fn from(_: AmountError) -> RejectCode {
        RejectCode::InvalidAmount
    }
}

/// Parses a decimal string such as `"12.34"` into minor units of `currency`.
///
/// Accepted: digits, optionally followed by `.` and 1..=exponent digits. Rejected: empty,
/// zero, any sign, whitespace, exponent notation, a bare `.`, too many fractional digits, and
/// anything above `max_amount`. Arithmetic is checked; nothing wraps.
pub fn parse_amount(
    text: &str,
    currency: Currency,
    max_amount: MinorUnits,
) -> Result<MinorUnits, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    let exponent = currency.exponent();
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::Malformed);
    }
    let fraction = fraction.unwrap_or("");
    if text.contains('.') && fraction.is_empty() {
        return Err(AmountError::Malformed);
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::Malformed);
    }
    if fraction.len() > exponent as usize {
        return Err(AmountError::TooManyFractionDigits);
    }
    let mut value: u64 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or(AmountError::AboveMaximum)?;
    }
    for _ in fraction.len()..exponent as usize {
        value = value.checked_mul(10).ok_or(AmountError::AboveMaximum)?;
    }
    if value == 0 {
        return Err(AmountError::Zero);
    }
    if value > max_amount {
        return Err(AmountError::AboveMaximum);
    }
    Ok(value)
}

/// Formats minor units as a decimal string with exactly the currency's fractional digits.
pub fn format_amount(value: MinorUnits, currency: Currency) -> String {
    let exponent = currency.exponent();
    if exponent == 0 {
        return value.to_string();
    }
    let scale = 10u64.pow(exponent);
    format!(
        "{}.{:0width$}",
        value / scale,
        value % scale,
        width = exponent as usize
    )
}

/// Appends minor units as `format_amount` writes them, without allocating a `String` (response
/// bodies write thousands of amounts per request).
pub fn write_amount(out: &mut Vec<u8>, value: MinorUnits, currency: Currency) {
    let exponent = currency.exponent() as usize;
    // u64::MAX has 20 digits; with the exponent's zero padding and the point, 32 is enough.
    let mut digits = [b'0'; 32];
    let mut at = digits.len();
    let mut rest = value;
    while rest > 0 {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    // At least one digit before the point.
    let start = at.min(digits.len() - exponent - 1);
    let (whole, fraction) = digits[start..].split_at(digits.len() - start - exponent);
    out.extend_from_slice(whole);
    if exponent > 0 {
        out.push(b'.');
        out.extend_from_slice(fraction);
    }
}

/// A caller-chosen UUID that makes a command idempotent. Stored as its 128-bit value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TransactionId(pub u128);

impl TransactionId {
    pub fn parse(text: &str) -> Option<TransactionId> {
        uuid::Uuid::try_parse(text)
            .ok()
            .map(|u| TransactionId(u.as_u128()))
    }

    pub fn to_uuid_string(self) -> String {
        uuid::Uuid::from_u128(self.0).hyphenated().to_string()
    }

    /// Appends the hyphenated lowercase form (as `to_uuid_string`) without allocating.
    pub fn write_uuid(self, out: &mut Vec<u8>) {
        let mut buffer = uuid::Uuid::encode_buffer();
        out.extend_from_slice(
            uuid::Uuid::from_u128(self.0)
                .hyphenated()
                .encode_lower(&mut buffer)
                .as_bytes(),
        );
    }
}

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransactionId({})", self.to_uuid_string())
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uuid_string())
    }
}

#[cfg(test)]
mod tests {
    use super::{AccountId, Currency, TransactionId, format_amount, write_amount};

    #[test]
    fn write_amount_and_write_uuid_match_their_string_forms() {
        // Exponents 0 (JPY), 2 (USD), 3 (BHD) and 4 (CLF).
        let currencies = ["JPY", "USD", "BHD", "CLF"].map(|c| Currency::new(c).expect("ISO code"));
        let mut values = vec![
            0,
            1,
            9,
            10,
            99,
            100,
            101,
            12_345,
            1_000_000,
            u64::MAX,
            u64::MAX - 1,
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        for currency in currencies {
            for &value in &values {
                let mut out = b"prefix:".to_vec();
                write_amount(&mut out, value, currency);
                assert_eq!(
                    std::str::from_utf8(&out[7..]).expect("ascii"),
                    format_amount(value, currency),
                    "{value} {currency}"
                );
            }
        }
        for id in [
            0u128,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let mut out = Vec::new();
            TransactionId(id).write_uuid(&mut out);
            assert_eq!(out, TransactionId(id).to_uuid_string().into_bytes());
        }
    }

    #[test]
    fn account_id_hash_is_xxh3_of_its_bytes() {
        assert_eq!(AccountId::EMPTY.hash64(), xxhash_rust::xxh3::xxh3_64(b""));
        for text in [
            "a",
            "alice",
            "a-much-longer-account-id:with.all_kinds-of-chars",
        ] {
            let id = AccountId::new(text).expect("valid id");
            assert_eq!(id.hash64(), xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
        }
    }
}
