//! Read-only views built from the engine's output (CQRS): account directory, balances, recent
//! history per account, the outcome of every transaction id, and a window of recent records for
//! the event stream.
//!
//! Architecture invariant: views are fed only by durable records, in sequence order, by one
//! writer (the reply stage, or recovery at start-up). Readers never touch the ledger.

use std::collections::{HashMap, VecDeque};

use crate::core::table::{IndexTable, hash_id, prefetch};
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
    pub outcomes: OutcomeMap,
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

    /// Prefetch stage 1 for a record applied soon: the per-account headers and the outcome
    /// bucket it will touch.
    fn prefetch_headers(&self, record: &CommandRecord) {
        for event in record.events() {
            let index = event.account as usize;
            if let (Some(balances), Some(history)) =
                (self.balances.get(index), self.history.get(index))
            {
                prefetch(balances);
                prefetch(history);
            }
        }
        self.outcomes.prefetch(record.transaction_id.0);
    }

    /// Prefetch stage 2 (after stage 1 landed): the heap buffers behind those headers.
    fn prefetch_buffers(&self, record: &CommandRecord) {
        for event in record.events() {
            let index = event.account as usize;
            if let Some(first) = self.balances.get(index).and_then(|b| b.first()) {
                prefetch(first);
            }
            if let Some(last) = self.history.get(index).and_then(|h| h.back()) {
                prefetch(last);
            }
        }
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

/// Every transaction's outcome by id. An index table of 8-byte buckets over chunked storage:
/// growing moves only the buckets (a `HashMap<u128, OutcomeView>` rehashed 80-byte entries,
/// 16% of the batch endpoint's CPU time under load) and never copies an outcome.
#[derive(Default)]
pub struct OutcomeMap {
    index: IndexTable,
    chunks: Vec<Vec<(u128, OutcomeView)>>,
    len: usize,
}

const OUTCOME_CHUNK: usize = 1 << 14;

impl OutcomeMap {
    fn slot(&self, i: u32) -> &(u128, OutcomeView) {
        &self.chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK]
    }

    pub fn get(&self, id: &u128) -> Option<&OutcomeView> {
        self.index
            .find(hash_id(*id), |i| self.slot(i).0 == *id)
            .map(|i| &self.slot(i).1)
    }

    /// Inserts, or replaces the outcome already stored under `id`.
    pub fn insert(&mut self, id: u128, outcome: OutcomeView) {
        let index = self.len as u32;
        let chunks = &self.chunks;
        let existing = self.index.insert_unique(hash_id(id), index, |i| {
            chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK].0 == id
        });
        if let Some(i) = existing {
            self.chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK].1 = outcome;
            return;
        }
        if self.len.is_multiple_of(OUTCOME_CHUNK) {
            self.chunks.push(Vec::with_capacity(OUTCOME_CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push((id, outcome));
        }
        self.len += 1;
    }

    /// Hints the CPU to load the bucket where `id` is or will be.
    fn prefetch(&self, id: u128) {
        self.index.prefetch(hash_id(id));
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
            // Each record touches a few random accounts' balances and history; prefetching
            // ahead in two stages (headers, then the buffers they point to) overlaps those
            // misses instead of taking them one at a time. Distances as in the ledger.
            const HEADERS_AHEAD: usize = 8;
            const BUFFERS_AHEAD: usize = 4;
            for record in records.iter().take(HEADERS_AHEAD) {
                state.prefetch_headers(record);
            }
            for (i, record) in records.iter().enumerate() {
                if let Some(ahead) = records.get(i + HEADERS_AHEAD) {
                    state.prefetch_headers(ahead);
                }
                if let Some(ahead) = records.get(i + BUFFERS_AHEAD) {
                    state.prefetch_buffers(ahead);
                }
                if !record.replayed {
                    state.apply(record);
                }
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

#[cfg(test)]
mod tests {
    use super::{OutcomeMap, OutcomeView};
    use crate::core::CommandRecord;

    fn outcome(seq: u64) -> OutcomeView {
        let mut view = OutcomeView::from_record(&CommandRecord::empty());
        view.seq = seq;
        view
    }

    #[test]
    fn outcome_map_finds_every_id_across_growth_and_replaces_in_place() {
        let mut map = OutcomeMap::default();
        // Sequential ids (the hash must spread them) and ids that differ only in the high half.
        let ids: Vec<u128> = (0..100_000u128)
            .map(|i| if i % 2 == 0 { i } else { i << 64 })
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert!(map.get(id).is_none());
            map.insert(*id, outcome(n as u64));
        }
        assert_eq!(map.len(), ids.len());
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(map.get(id).map(|o| o.seq), Some(n as u64), "id {id:#x}");
        }
        map.insert(ids[7], outcome(999_999));
        assert_eq!(map.len(), ids.len());
        assert_eq!(map.get(&ids[7]).map(|o| o.seq), Some(999_999));
        assert!(map.get(&u128::MAX).is_none());
    }
}
