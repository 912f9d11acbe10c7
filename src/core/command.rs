//! Commands (what the outside world asks for), events (what happened) and rejection codes.

use crate::core::types::{AccountId, Currency, MinorUnits, TransactionId};

/// Why a command was refused. One closed enum; `code()` is the stable snake_case name that the
/// HTTP API returns verbatim and the journal stores as the number in `repr(u8)`. Never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RejectCode {
    AccountNotFound = 1,
    AccountAlreadyExists = 2,
    SameAccount = 3,
    InsufficientFunds = 4,
    InvalidAmount = 5,
    UnsupportedCurrency = 6,
    AmountOverflow = 7,
    TransactionIdReused = 8,
    InvalidAccountId = 9,
    TooManyAccounts = 10,
}

impl RejectCode {
    pub const ALL: [RejectCode; 10] = [
        RejectCode::AccountNotFound,
        RejectCode::AccountAlreadyExists,
        RejectCode::SameAccount,
        RejectCode::InsufficientFunds,
        RejectCode::InvalidAmount,
        RejectCode::UnsupportedCurrency,
        RejectCode::AmountOverflow,
        RejectCode::TransactionIdReused,
        RejectCode::InvalidAccountId,
        RejectCode::TooManyAccounts,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectCode::AccountNotFound => "account_not_found",
            RejectCode::AccountAlreadyExists => "account_already_exists",
            RejectCode::SameAccount => "same_account",
            RejectCode::InsufficientFunds => "insufficient_funds",
            RejectCode::InvalidAmount => "invalid_amount",
            RejectCode::UnsupportedCurrency => "unsupported_currency",
            RejectCode::AmountOverflow => "amount_overflow",
            RejectCode::TransactionIdReused => "transaction_id_reused",
            RejectCode::InvalidAccountId => "invalid_account_id",
            RejectCode::TooManyAccounts => "too_many_accounts",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            RejectCode::AccountNotFound => "the account does not exist",
            RejectCode::AccountAlreadyExists => "an account with this id already exists",
            RejectCode::SameAccount => "from_account and to_account must be different",
            RejectCode::InsufficientFunds => {
                "the debit account has insufficient funds in this currency"
            }
            RejectCode::InvalidAmount => {
                "the amount must be positive and at most the maximum amount"
            }
            RejectCode::UnsupportedCurrency => "the currency is not a supported ISO 4217 code",
            RejectCode::AmountOverflow => "the resulting balance or total would overflow",
            RejectCode::TransactionIdReused => {
                "this transaction_id was already used for a different request"
            }
            RejectCode::InvalidAccountId => "the account id is malformed",
            RejectCode::TooManyAccounts => "the ledger cannot hold more accounts",
        }
    }

    pub fn from_u8(value: u8) -> Option<RejectCode> {
        RejectCode::ALL.into_iter().find(|c| *c as u8 == value)
    }
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    OpenAccount {
        account: AccountId,
    },
    Deposit {
        account: AccountId,
        amount: MinorUnits,
        currency: Currency,
    },
    Withdraw {
        account: AccountId,
        amount: MinorUnits,
        currency: Currency,
    },
    Transfer {
        from: AccountId,
        to: AccountId,
        amount: MinorUnits,
        currency: Currency,
    },
}

/// A command with the id and time stamped on it before the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub transaction_id: TransactionId,
    /// Wall-clock nanoseconds since the Unix epoch, stamped by the caller (the API or the bench).
    pub timestamp_ns: u64,
    pub kind: CommandKind,
}

/// The fingerprint of a body from its parts (`docs/journal-format.md`, Fingerprint): the
/// command type's tag, the packed currency (0 for an opening), the accounts' `xxh3_64`s and
/// the amount.
fn body_fingerprint(tag: u8, currency: u16, first: u64, second: u64, amount: u64) -> u64 {
    let mut buffer = [0u8; 32];
    buffer[0] = tag;
    buffer[2..4].copy_from_slice(&currency.to_le_bytes());
    buffer[8..16].copy_from_slice(&first.to_le_bytes());
    buffer[16..24].copy_from_slice(&second.to_le_bytes());
    buffer[24..32].copy_from_slice(&amount.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&buffer)
}

impl CommandRecord {
    /// The fingerprint of the body a committed record executed, rebuilt from its events, its
    /// opened id and `account_hash` (an open account's `AccountId::hash64`, by index); `None`
    /// for a rejection (whose body the record does not hold), a checkpoint, or an account
    /// `account_hash` does not know. Equal to the command's `fingerprint()` for every record
    /// `execute` produces.
    pub fn body_fingerprint(&self, account_hash: impl Fn(u32) -> Option<u64>) -> Option<u64> {
        if self.rejection.is_some() {
            return None;
        }
        let [first, second] = self.events;
        let none = AccountId::EMPTY.hash64();
        let (tag, a, b) = match self.command_type {
            CommandType::Checkpoint => return None,
            CommandType::OpenAccount => {
                return Some(body_fingerprint(
                    1,
                    0,
                    self.opened_account.hash64(),
                    none,
                    0,
                ));
            }
            CommandType::Deposit => (2, account_hash(first.account)?, none),
            CommandType::Withdraw => (3, account_hash(first.account)?, none),
            CommandType::Transfer => (
                4,
                account_hash(first.account)?,
                account_hash(second.account)?,
            ),
        };
        Some(body_fingerprint(
            tag,
            first.currency.packed(),
            a,
            b,
            first.amount,
        ))
    }
}

impl Command {
    /// A 64-bit fingerprint of the command's body (everything but the id and the timestamp),
    /// used to tell an honest retry from a reused transaction id: xxh3-64 over a 32-byte
    /// buffer of the command type, the accounts' xxh3-64 hashes (cached in `AccountId`), the
    /// amount and the currency. Bodies that differ get equal fingerprints with probability
    /// about 2^-64.
    pub fn fingerprint(&self) -> u64 {
        let (tag, first, second, amount, currency) = match self.kind {
            CommandKind::OpenAccount { account } => (1u8, account, AccountId::EMPTY, 0, 0),
            CommandKind::Deposit {
                account,
                amount,
                currency,
            } => (2, account, AccountId::EMPTY, amount, currency.packed()),
            CommandKind::Withdraw {
                account,
                amount,
                currency,
            } => (3, account, AccountId::EMPTY, amount, currency.packed()),
            CommandKind::Transfer {
                from,
                to,
                amount,
                currency,
            } => (4, from, to, amount, currency.packed()),
        };
        body_fingerprint(tag, currency, first.hash64(), second.hash64(), amount)
    }

    pub fn command_type(&self) -> CommandType {
        match self.kind {
            CommandKind::OpenAccount { .. } => CommandType::OpenAccount,
            CommandKind::Deposit { .. } => CommandType::Deposit,
            CommandKind::Withdraw { .. } => CommandType::Withdraw,
            CommandKind::Transfer { .. } => CommandType::Transfer,
        }
    }
}

/// The type of a command record, as stored in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommandType {
    OpenAccount = 1,
    Deposit = 2,
    Withdraw = 3,
    Transfer = 4,
    /// Not a client command: the engine's periodic proof of its state hash.
    Checkpoint = 5,
}

impl CommandType {
    pub fn from_u8(value: u8) -> Option<CommandType> {
        Some(match value {
            1 => CommandType::OpenAccount,
            2 => CommandType::Deposit,
            3 => CommandType::Withdraw,
            4 => CommandType::Transfer,
            5 => CommandType::Checkpoint,
            _ => return None,
        })
    }
}

/// One change to one account's balance, or an account opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Event {
    /// Global sequence number of this event.
    pub seq: u64,
    pub kind: EventKind,
    /// Dense internal index of the account (assigned when it was opened).
    pub account: u32,
    pub currency: Currency,
    pub amount: MinorUnits,
    /// The account's balance in `currency` after this event.
    pub balance_after: MinorUnits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum EventKind {
    #[default]
    AccountOpened = 1,
    Deposited = 2,
    Withdrawn = 3,
    Debited = 4,
    Credited = 5,
    /// The command was refused; `amount` is 0 and the code is in the record's status.
    Rejected = 6,
    /// `amount` holds the ledger's `state_hash()` after every earlier event.
    Checkpoint = 7,
}

impl EventKind {
    pub fn from_u8(value: u8) -> Option<EventKind> {
        Some(match value {
            1 => EventKind::AccountOpened,
            2 => EventKind::Deposited,
            3 => EventKind::Withdrawn,
            4 => EventKind::Debited,
            5 => EventKind::Credited,
            6 => EventKind::Rejected,
            7 => EventKind::Checkpoint,
            _ => return None,
        })
    }

    /// Whether the event changes a balance (and so is an entry of its account's history).
    pub fn changes_balance(self) -> bool {
        matches!(
            self,
            EventKind::Deposited | EventKind::Withdrawn | EventKind::Debited | EventKind::Credited
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::AccountOpened => "account_opened",
            EventKind::Deposited => "deposited",
            EventKind::Withdrawn => "withdrawn",
            EventKind::Debited => "debited",
            EventKind::Credited => "credited",
            EventKind::Rejected => "rejected",
            EventKind::Checkpoint => "checkpoint",
        }
    }
}

/// Most events one command emits (a transfer: one debit, one credit).
pub const MAX_EVENTS_PER_COMMAND: usize = 2;

/// The outcome of one command: everything the journal stores about it and everything a caller
/// needs to answer. Fixed size, no heap, so it travels through rings by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandRecord {
    pub transaction_id: TransactionId,
    pub timestamp_ns: u64,
    pub fingerprint: u64,
    pub command_type: CommandType,
    /// `None` when committed.
    pub rejection: Option<RejectCode>,
    /// True when this is an idempotent repeat: nothing was executed, nothing is journaled, and
    /// `first_seq` / `rejection` are those of the original execution.
    pub replayed: bool,
    /// The sequence number of the first event (the record's sequence in the journal).
    pub first_seq: u64,
    pub event_count: u8,
    pub events: [Event; MAX_EVENTS_PER_COMMAND],
    /// For `OpenAccount` only: the id that was interned (events refer to its index).
    pub opened_account: AccountId,
    /// Set by the engine, never by the ledger: the command was refused without being executed
    /// (`first_seq` is then 0; nothing is journaled or remembered). In the record's padding:
    /// no bytes added.
    pub refused: Option<Refusal>,
}

/// Why the engine refused a command without executing it. Not a ledger outcome: never
/// journaled, and the same request may be sent again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ledger remembers as many transaction ids as the server allows
    /// (`--max-transaction-ids`) and this one is new.
    LedgerFull,
    /// The disk holding the journal is full: the journal's reserve made room for the records
    /// already executed, and no new work is taken until the reserve can be allocated again.
    JournalFull,
}

impl CommandRecord {
    pub fn events(&self) -> &[Event] {
        &self.events[..self.event_count as usize]
    }

    pub fn is_committed(&self) -> bool {
        self.rejection.is_none()
    }

    /// The sequence number after the last event of this record.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + u64::from(self.event_count)
    }

    pub fn empty() -> CommandRecord {
        CommandRecord {
            transaction_id: TransactionId(0),
            timestamp_ns: 0,
            fingerprint: 0,
            command_type: CommandType::Checkpoint,
            rejection: None,
            replayed: false,
            first_seq: 0,
            event_count: 0,
            events: [Event::default(); MAX_EVENTS_PER_COMMAND],
            opened_account: AccountId::EMPTY,
            refused: None,
        }
    }
}
