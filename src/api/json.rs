//! JSON request bodies, their validation into `Command`s, and response bodies.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::core::types::{AmountError, DEFAULT_MAX_AMOUNT};
use crate::core::{AccountId, Command, CommandKind, Currency, TransactionId, parse_amount};

/// A 400: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(code: &'static str, field: &str, reason: impl std::fmt::Display) -> FieldError {
        FieldError {
            code,
            field: field.to_string(),
            message: format!("{field}: {reason}"),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "field": self.field, "message": self.message}})
    }
}

/// Decodes a JSON body strictly: unknown fields and wrong types are errors naming the field.
/// The common case decodes without path tracking; only a body that fails is decoded again with
/// `serde_path_to_error` to name the field (same verdict, a third less work on success).
pub fn decode<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, FieldError> {
    // Every request body is an object; serde would also take a struct from an array of its
    // fields' values in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // JSON text has no byte order mark (RFC 8259, 8.1); said by name, as it is invisible.
        let reason = if body.starts_with(b"\xEF\xBB\xBF") {
            "must be a JSON object, without a byte order mark (EF BB BF) before it"
        } else {
            "must be a JSON object"
        };
        return Err(FieldError::new("invalid_request", "body", reason));
    }
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { None } else { Some(path) };
        let inner = e.inner().to_string();
        // A number beyond a float's range (`1e400`) is valid JSON that serde_json reports as
        // a syntax error, at the field it was given for (every field this API takes is a
        // string or an object; the items of its one list, `transfers`, are objects).
        if inner.starts_with("number out of range")
            && let Some(field) = path.as_ref().filter(|p| !p.contains('?'))
        {
            return FieldError::new(
                "invalid_request",
                field,
                if field.ends_with(']') {
                    "expected an object, found a number (and one out of a float's range)"
                } else if field == "transfers" {
                    "expected a list, found a number (and one out of a float's range)"
                } else {
                    "expected a string, found a number (and one out of a float's range)"
                },
            );
        }
        // Not JSON at all (a syntax error, or a body cut short): the body is what is wrong,
        // not the field the parser was in (its path would end in `?`).
        if matches!(
            e.inner().classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        ) {
            return FieldError {
                code: "invalid_request",
                field: "body".into(),
                message: format!("body: is not JSON: {inner}"),
            };
        }
        // A missing or repeated field is reported by serde at the object that lacks or repeats
        // it: name the field itself.
        let named = [
            ("missing field `", "is required"),
            ("duplicate field `", "appears more than once"),
            ("unknown field `", "is not a field of this request"),
        ]
        .into_iter()
        .find_map(|(prefix, reason)| {
            let name = inner.strip_prefix(prefix)?.split('`').next()?;
            Some((name.to_string(), reason, prefix.starts_with("unknown")))
        });
        match named {
            Some((name, reason, unknown)) => {
                // serde_path_to_error's path already ends at an unknown key (the client's, which
                // may hold a backtick: serde's message does not escape it, so the name cut out
                // of the message can be short); a missing or repeated one ends at its object
                // (and its name is one of ours).
                let field = match path {
                    Some(p) if unknown || p == name || p.ends_with(&format!(".{name}")) => p,
                    Some(p) => format!("{p}.{name}"),
                    None => name,
                };
                FieldError::new("invalid_request", &field, reason)
            }
            None => {
                let field = path.unwrap_or_else(|| "body".to_string());
                FieldError {
                    code: "invalid_request",
                    message: format!("{field}: {inner}"),
                    field,
                }
            }
        }
    })?;
    deserializer.end().map_err(|e| FieldError {
        code: "invalid_request",
        field: "body".into(),
        message: format!("body: {e}"),
    })?;
    Ok(value)
}

/// Fields borrow from the request body when they hold no escapes (the usual case), so a batch
/// of thousands of transfers is parsed without five allocations per transfer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest<'a> {
    #[serde(borrow)]
    pub from_account: Cow<'a, str>,
    #[serde(borrow)]
    pub to_account: Cow<'a, str>,
    #[serde(borrow)]
    pub amount: Cow<'a, str>,
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    #[serde(borrow)]
    pub transaction_id: Cow<'a, str>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    #[serde(borrow, deserialize_with = "batch_objects")]
    pub transfers: Vec<TransferRequest<'a>>,
}

/// The most transfers one batch request holds.
pub const MAX_BATCH: usize = 8192;
/// The decoder's refusal of a list longer than `MAX_BATCH` (the batch route names its own
/// limit instead, which the ring size can make smaller).
pub const BATCH_CAPPED: &str = "must hold 1 to 8192 transfers";
const _: () = assert!(MAX_BATCH == 8192, "BATCH_CAPPED names MAX_BATCH");

/// A list of at most `MAX_BATCH` JSON objects. A derived struct also takes an array of its
/// fields' values in declaration order (`["alice","bob","1.00",...]`): an order no document
/// gives, so a client that wrote one would move money by guesswork. `decode` refuses it for a
/// whole body; this refuses it for each item of a list. A longer list is refused as soon as
/// its item past the limit is read: decoding all of a body of tiny items first held about
/// three times the body in memory for a request then refused.
fn batch_objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Capped<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Capped<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_BATCH} transfers")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH));
            while let Some(Object(item)) = seq.next_element::<Object<T>>()? {
                if items.len() == MAX_BATCH {
                    return Err(serde::de::Error::custom(BATCH_CAPPED));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(Capped(std::marker::PhantomData))
}

/// `T`, taken only from a JSON object.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Only(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    pub account_id: String,
    /// Optional, but when it is there it is a string: `null` is not taken for "none given",
    /// which would open the account under a fresh id and turn the caller's retry into a 409.
    #[serde(default, deserialize_with = "some_string")]
    pub transaction_id: Option<String>,
}

fn some_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoneyRequest {
    pub account_id: String,
    pub amount: String,
    pub currency: String,
    pub transaction_id: String,
}

pub fn account(field: &str, text: &str) -> Result<AccountId, FieldError> {
    AccountId::new(text).map_err(|e| FieldError::new("invalid_account_id", field, e))
}

/// An account id to open. `.` and `..` are refused: HTTP clients remove them from a URL's
/// path (RFC 3986, 5.2.4), so the account's routes would be out of their reach (a read of
/// `./history` reached the account `history`). Accounts opened before this check stay
/// readable as `%2E` and `%2E%2E`.
pub fn new_account(field: &str, text: &str) -> Result<AccountId, FieldError> {
    if text == "." || text == ".." {
        return Err(FieldError::new(
            "invalid_account_id",
            field,
            "must not be `.` or `..`: HTTP clients remove those from URL paths, so the account could not be read",
        ));
    }
    account(field, text)
}

pub fn transaction_id(field: &str, text: &str) -> Result<TransactionId, FieldError> {
    TransactionId::parse(text)
        .ok_or_else(|| FieldError::new("invalid_transaction_id", field, "must be a UUID"))
}

/// A transaction id for a new request. The nil and the max UUID are what an unset or defaulted
/// field holds: every request of a client with that bug would share one id, and its second
/// request (same body) would be answered as a replay of the first, moving no money. Lookups
/// (`transaction_id`) still accept them, for journals written before this check.
pub fn new_transaction_id(field: &str, text: &str) -> Result<TransactionId, FieldError> {
    let id = transaction_id(field, text)?;
    if id.0 == 0 || id.0 == u128::MAX {
        return Err(FieldError::new(
            "invalid_transaction_id",
            field,
            "must not be the nil or the max UUID (the value of an unset field): send a fresh UUID per request",
        ));
    }
    Ok(id)
}

pub fn currency(field: &str, text: &str) -> Result<Currency, FieldError> {
    Currency::new(text).map_err(|e| FieldError::new("unsupported_currency", field, e))
}

pub fn amount(field: &str, text: &str, currency: Currency, max: u64) -> Result<u64, FieldError> {
    parse_amount(text, currency, max)
        .map_err(|e: AmountError| FieldError::new("invalid_amount", field, e))
}

pub fn max_amount() -> u64 {
    DEFAULT_MAX_AMOUNT
}

impl FieldError {
    /// The same error for a field inside an array element: `transfers[3].amount`.
    pub fn within(mut self, prefix: &str) -> FieldError {
        self.field = format!("{prefix}.{}", self.field);
        self.message = format!("{prefix}.{}", self.message);
        self
    }
}

impl TransferRequest<'_> {
    /// Validates the fields into a command. Field names in errors are the bare names; a batch
    /// prefixes them with `FieldError::within` (only on error: nothing is formatted on success).
    pub fn to_command(&self, timestamp_ns: u64) -> Result<Command, FieldError> {
        let transaction_id = new_transaction_id("transaction_id", &self.transaction_id)?;
        let from = account("from_account", &self.from_account)?;
        let to = account("to_account", &self.to_account)?;
        let currency = currency("currency", &self.currency)?;
        let amount = amount("amount", &self.amount, currency, max_amount())?;
        Ok(Command {
            transaction_id,
            timestamp_ns,
            kind: CommandKind::Transfer {
                from,
                to,
                amount,
                currency,
            },
        })
    }
}

impl MoneyRequest {
    pub fn to_command(&self, timestamp_ns: u64, deposit: bool) -> Result<Command, FieldError> {
        let transaction_id = new_transaction_id("transaction_id", &self.transaction_id)?;
        let account = account("account_id", &self.account_id)?;
        let currency = currency("currency", &self.currency)?;
        let amount = amount("amount", &self.amount, currency, max_amount())?;
        let kind = if deposit {
            CommandKind::Deposit {
                account,
                amount,
                currency,
            }
        } else {
            CommandKind::Withdraw {
                account,
                amount,
                currency,
            }
        };
        Ok(Command {
            transaction_id,
            timestamp_ns,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{BatchRequest, MAX_BATCH, TransferRequest, decode};

    /// A batch longer than `MAX_BATCH` is refused while it is decoded, naming `transfers`.
    #[test]
    fn a_batch_over_the_limit_is_refused_while_decoding() {
        let item = |i: usize| {
            format!(
                r#"{{"from_account":"a","to_account":"b","amount":"1.00","currency":"USD","transaction_id":"{}"}}"#,
                uuid::Uuid::from_u128(i as u128 + 1)
            )
        };
        let body = |n: usize| {
            let items: Vec<String> = (0..n).map(item).collect();
            format!(r#"{{"transfers":[{}]}}"#, items.join(","))
        };
        let full = body(MAX_BATCH);
        let decoded: BatchRequest = decode(full.as_bytes()).expect("a full batch");
        assert_eq!(decoded.transfers.len(), MAX_BATCH);
        let over = body(MAX_BATCH + 1);
        let error = decode::<BatchRequest>(over.as_bytes()).expect_err("one over the limit");
        assert_eq!(error.field, "transfers", "{error:?}");
        assert!(error.message.contains("1 to 8192 transfers"), "{error:?}");
        // Items given as arrays of values are still refused.
        let error = decode::<BatchRequest>(br#"{"transfers":[["a","b","1.00","USD","x"]]}"#)
            .expect_err("an item that is not an object");
        assert!(error.message.contains("JSON object"), "{error:?}");
    }

    #[test]
    fn decoding_errors_name_the_field_itself() {
        let ok = r#""from_account":"a","to_account":"b","amount":"1.00","currency":"USD","transaction_id":"5f0c6a57-3c5d-4f0e-9a8e-2b1f4a6d7c88""#;
        let cases = [
            // (body, field, words in the message)
            (
                r#"{"from_account":"a","to_account":"b","currency":"USD","transaction_id":"x"}"#
                    .to_string(),
                "amount",
                "is required",
            ),
            (
                format!(r#"{{{ok},"amount":"2.00"}}"#),
                "amount",
                "more than once",
            ),
            (format!(r#"{{{ok},"memo":"hi"}}"#), "memo", "not a field"),
            // Not JSON: the body is named, never a `?` path.
            ("{bad json".to_string(), "body", "is not JSON"),
            (format!(r#"{{{ok},"#), "body", "is not JSON"),
            (format!(r#"{{{ok},}}"#), "body", "is not JSON"),
            (r#"{"from_account":"a","#.to_string(), "body", "is not JSON"),
            // A client's key is named whole, backticks and all.
            (format!(r#"{{{ok},"a`b":1}}"#), "a`b", "not a field"),
            (format!(r#"{{{ok},"`":1}}"#), "`", "not a field"),
            (
                format!(r#"{{{}}}"#, ok.replace(r#""1.00""#, "1")),
                "amount",
                "expected a string",
            ),
            // A number too large for a float is still JSON: the field it was given for is named.
            (
                format!(r#"{{{}}}"#, ok.replace(r#""1.00""#, "1e400")),
                "amount",
                "expected a string",
            ),
            (
                format!(r#"{{{}}}"#, ok.replace(r#""USD""#, "-1e309")),
                "currency",
                "expected a string",
            ),
            ("[1]".to_string(), "body", "must be a JSON object"),
            (
                r#"["a","b","1.00","USD","5f0c6a57-3c5d-4f0e-9a8e-2b1f4a6d7c88"]"#.to_string(),
                "body",
                "must be a JSON object",
            ),
            ("".to_string(), "body", "must be a JSON object"),
            (
                format!("\u{feff}{{{ok}}}"),
                "body",
                "without a byte order mark",
            ),
        ];
        for (body, field, words) in cases {
            let e = decode::<TransferRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e:?}");
            assert!(e.message.starts_with(&format!("{field}: ")), "{e:?}");
            assert!(e.message.contains(words), "{body}: {e:?}");
        }
        let batch = format!(
            r#"{{"transfers":[{{{ok}}},{{{}}}]}}"#,
            ok.replace(r#","currency":"USD""#, "")
        );
        let e = decode::<BatchRequest>(batch.as_bytes()).unwrap_err();
        assert_eq!(e.field, "transfers[1].currency", "{e:?}");
        let e = decode::<BatchRequest>(format!(r#"{{"transfers":[[{}]]}}"#, "\"a\"").as_bytes())
            .unwrap_err();
        assert_eq!(e.field, "transfers[0]", "{e:?}");
        // A whole transfer written as an array of its values, in the struct's field order.
        let positional =
            r#"{"transfers":[{OK},["a","b","1.00","USD","5f0c6a57-3c5d-4f0e-9a8e-2b1f4a6d7c89"]]}"#
                .replace("{OK}", &format!("{{{ok}}}"));
        let e = decode::<BatchRequest>(positional.as_bytes()).unwrap_err();
        assert_eq!(e.field, "transfers[1]", "{e:?}");
        assert!(e.message.contains("expected a JSON object"), "{e:?}");
        // An item that is a number too large for a float: an object was expected, not a string.
        let e = decode::<BatchRequest>(br#"{"transfers":[1e400]}"#).unwrap_err();
        assert_eq!(e.field, "transfers[0]", "{e:?}");
        assert!(e.message.contains("expected an object"), "{e:?}");
        // The list itself given as such a number: a list was expected.
        let e = decode::<BatchRequest>(br#"{"transfers":1e400}"#).unwrap_err();
        assert_eq!(e.field, "transfers", "{e:?}");
        assert!(e.message.contains("expected a list"), "{e:?}");
        // An open-account id is a string when it is there; left out, it is none.
        let e = decode::<super::OpenAccountRequest>(br#"{"account_id":"c","transaction_id":null}"#)
            .unwrap_err();
        assert_eq!(e.field, "transaction_id", "{e:?}");
        assert!(e.message.contains("expected a string"), "{e:?}");
        let open = decode::<super::OpenAccountRequest>(br#"{"account_id":"c"}"#).unwrap();
        assert_eq!(open.transaction_id, None);
        assert!(
            decode::<BatchRequest>(format!(r#"{{"transfers":[{{{ok}}}]}}"#).as_bytes()).is_ok()
        );
    }
}
