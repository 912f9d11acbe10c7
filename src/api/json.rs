//! JSON request bodies, their validation into `Command`s, and response bodies.

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
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FieldError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        FieldError {
            code: "invalid_request",
            message: format!("{field}: {}", e.inner()),
            field,
        }
    })?;
    deserializer.end().map_err(|e| FieldError {
        code: "invalid_request",
        field: "body".into(),
        message: format!("body: {e}"),
    })?;
    Ok(value)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from_account: String,
    pub to_account: String,
    pub amount: String,
    pub currency: String,
    pub transaction_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub transfers: Vec<TransferRequest>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    pub account_id: String,
    pub transaction_id: Option<String>,
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

pub fn transaction_id(field: &str, text: &str) -> Result<TransactionId, FieldError> {
    TransactionId::parse(text)
        .ok_or_else(|| FieldError::new("invalid_transaction_id", field, "must be a UUID"))
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

impl TransferRequest {
    pub fn to_command(&self, timestamp_ns: u64, prefix: &str) -> Result<Command, FieldError> {
        let f = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        let transaction_id = transaction_id(&f("transaction_id"), &self.transaction_id)?;
        let from = account(&f("from_account"), &self.from_account)?;
        let to = account(&f("to_account"), &self.to_account)?;
        let currency = currency(&f("currency"), &self.currency)?;
        let amount = amount(&f("amount"), &self.amount, currency, max_amount())?;
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
        let transaction_id = transaction_id("transaction_id", &self.transaction_id)?;
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
