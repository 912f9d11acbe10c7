//! The pure, deterministic heart: domain types, commands, events, the ledger and its codec.
//!
//! Architecture invariant: nothing in this module touches files, sockets, clocks, threads,
//! tokio or JSON. Time and ids arrive inside commands.

pub mod codec;
pub mod command;
pub mod ledger;
pub mod table;
pub mod types;

pub use command::{
    Command, CommandKind, CommandRecord, CommandType, Event, EventKind, Refusal, RejectCode,
};
pub use ledger::{Ledger, LedgerConfig};
pub use types::{AccountId, Currency, MinorUnits, TransactionId, format_amount, parse_amount};
