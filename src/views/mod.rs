//! Read-only views built from the engine's output (CQRS): account directory, balances, recent
//! history per account, the outcome of every transaction id, and a window of recent records for
//! the event stream.
//!
//! Architecture invariant: views are fed only by durable records, in sequence order, by one
//! writer (the reply stage, or recovery at start-up). Readers never touch the ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::core::{
    CommandRecord, CommandType, Currency, EventKind, Ledger, MinorUnits, RejectCode,
};

/// Entries of history kept in memory per account; older entries are in the journal
/// (`wallet replay --account`).
pub const HISTORY_PER_ACCOUNT: usize = 1000;
/// Records kept in memory for the event stream.
pub const RECENT_RECORDS: usize = 1 << 16;

#[derive(Debug, Clone, Copy)]
pub struct HistoryEntry {
    pub seq: u64,
    pub transaction_id: u128,
    pub kind: EventKind,
    pub currency: Currency,
    pub amount: MinorUnits,
    pub balance_after: MinorUnits,
    pub timestamp_ns: u64,
    /// The other account of a transfer (u32::MAX if none).
    pub counterparty: u32,
}

/// What is known about a transaction id's outcome.
#[derive(Debug, Clone, Copy)]
pub struct OutcomeView {
    pub command_type: CommandType,
    pub rejection: Option<RejectCode>,
    pub seq: u64,
    /// Accounts touched (u32::MAX: none), in event order.
    pub accounts: [u32; 2],
    pub balances_after: [MinorUnits; 2],
    pub amount: MinorUnits,
    pub currency: Currency,
    pub timestamp_ns: u64,
}

impl OutcomeView {
    pub fn from_record(record: &CommandRecord) -> OutcomeView {
        let mut view = OutcomeView {
            command_type: record.command_type,
            rejection: record.rejection,
            seq: record.first_seq,
            accounts: [u32::MAX; 2],
            balances_after: [0; 2],
            amount: 0,
            currency: Currency::NONE,
            timestamp_ns: record.timestamp_ns,
        };
        for (i, event) in record.events().iter().enumerate() {
            match event.kind {
                EventKind::AccountOpened => view.accounts[i] = event.account,
                EventKind::Deposited
                | EventKind::Withdrawn
                | EventKind::Debited
                | EventKind::Credited => {
                    view.accounts[i] = event.account;
                    view.balances_after[i] = event.balance_after;
                    view.amount = event.amount;
                    view.currency = event.currency;
                }
                EventKind::Rejected | EventKind::Checkpoint => {}
            }
        }
        view
    }
}

#[derive(Default)]
pub struct ViewState {
    pub names: Vec<String>,
    pub directory: HashMap<String, u32>,
    pub balances: Vec<Vec<(Currency, MinorUnits)>>,
    pub history: Vec<VecDeque<HistoryEntry>>,
    pub outcomes: HashMap<u128, OutcomeView>,
    pub recent: VecDeque<CommandRecord>,
}

impl ViewState {
    pub fn account(&self, name: &str) -> Option<u32> {
        self.directory.get(name).copied()
    }

    pub fn name(&self, index: u32) -> &str {
        self.names
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    fn apply(&mut self, record: &CommandRecord) {
        for event in record.events() {
            match event.kind {
                EventKind::AccountOpened => {
                    let name = record.opened_account.to_string();
                    self.directory.insert(name.clone(), event.account);
                    self.names.push(name);
                    self.balances.push(Vec::new());
                    self.history.push(VecDeque::new());
                }
                EventKind::Deposited
                | EventKind::Withdrawn
                | EventKind::Debited
                | EventKind::Credited => {
                    let index = event.account as usize;
                    let balances = &mut self.balances[index];
                    match balances.iter_mut().find(|(c, _)| *c == event.currency) {
                        Some((_, b)) => *b = event.balance_after,
                        None => {
                            balances.push((event.currency, event.balance_after));
                            balances.sort_unstable_by_key(|(c, _)| *c);
                        }
                    }
                    let counterparty = match (event.kind, record.event_count) {
                        (EventKind::Debited, 2) => record.events[1].account,
                        (EventKind::Credited, 2) => record.events[0].account,
                        _ => u32::MAX,
                    };
                    let history = &mut self.history[index];
                    if history.len() == HISTORY_PER_ACCOUNT {
                        history.pop_front();
                    }
                    history.push_back(HistoryEntry {
                        seq: event.seq,
                        transaction_id: record.transaction_id.0,
                        kind: event.kind,
                        currency: event.currency,
                        amount: event.amount,
                        balance_after: event.balance_after,
                        timestamp_ns: record.timestamp_ns,
                        counterparty,
                    });
                }
                EventKind::Rejected | EventKind::Checkpoint => {}
            }
        }
        if record.command_type != CommandType::Checkpoint
            && record.rejection != Some(RejectCode::TransactionIdReused)
        {
            self.outcomes
                .insert(record.transaction_id.0, OutcomeView::from_record(record));
        }
        if self.recent.len() == RECENT_RECORDS {
            self.recent.pop_front();
        }
        self.recent.push_back(*record);
    }
}

/// The shared views plus the sequence they reflect and a way to wait for it to advance.
pub struct Views {
    state: RwLock<ViewState>,
    applied_seq: AtomicU64,
    advanced: tokio::sync::Notify,
}

impl Views {
    /// Views that start from a ledger's current balances (after a snapshot) with no history.
    pub fn from_ledger(ledger: &Ledger) -> Arc<Views> {
        let mut state = ViewState::default();
        for index in 0..ledger.account_count() {
            let name = ledger
                .account_name(index)
                .map(|a| a.to_string())
                .unwrap_or_default();
            state.directory.insert(name.clone(), index);
            state.names.push(name);
            state.balances.push(ledger.balances(index));
            state.history.push(VecDeque::new());
        }
        Arc::new(Views {
            state: RwLock::new(state),
            applied_seq: AtomicU64::new(ledger.next_seq() - 1),
            advanced: tokio::sync::Notify::new(),
        })
    }

    /// Applies durable records in sequence order. Called by one writer only.
    pub fn apply_batch(&self, records: &[CommandRecord]) {
        let Some(last) = records.iter().rev().find(|r| !r.replayed) else {
            return;
        };
        let last_seq = last.next_seq() - 1;
        {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            for record in records.iter().filter(|r| !r.replayed) {
                state.apply(record);
            }
        }
        self.applied_seq.store(last_seq, Ordering::Release);
        self.advanced.notify_waiters();
    }

    pub fn applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// Waits until the views reflect `seq`, at most `timeout`. Returns whether they do.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.advanced.notified();
            if self.applied_seq() >= seq {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied_seq() >= seq;
            }
        }
    }

    pub fn read<T>(&self, read: impl FnOnce(&ViewState) -> T) -> T {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        read(&state)
    }
}
