//! Read-only views built from the engine's output (CQRS): account directory, balances, the
//! history of every account, the outcome of every transaction id, and a window of recent records
//! for the event stream.
//!
//! Memory: every outcome is stored once (72 bytes plus its index bucket); an account's history
//! is a list of 4-byte positions of the outcomes that touched it, and each entry (sequence,
//! kind, amount, balance after, counterparty, time) is derived from that outcome when read.
//! Storing history entries by value (64 bytes each, two per transfer, in growing deques) cost
//! about 2.5 times the memory, and zeroing that memory was most of the start-up rebuild.
//!
//! Architecture invariant: views are fed only by durable records, in sequence order, by one
//! writer (the reply stage); after a restart `merge_past` adds, once, the outcomes and history
//! of the records before the views' start, built apart. Readers never touch the ledger.

use std::collections::VecDeque;

use xxhash_rust::xxh3::xxh3_64;

use crate::core::table::{IndexTable, hash_id, prefetch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::core::{
    AccountId, CommandRecord, CommandType, Currency, EventKind, Ledger, MinorUnits, RejectCode,
};

/// Records kept in memory for the event stream.
pub const RECENT_RECORDS: usize = 1 << 16;

/// One entry of an account's history, as read (derived from the outcome that made it).
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
                // A rejection names its command's own account (or none): its owner may see it.
                EventKind::AccountOpened | EventKind::Rejected => view.accounts[i] = event.account,
                EventKind::Deposited
                | EventKind::Withdrawn
                | EventKind::Debited
                | EventKind::Credited => {
                    view.accounts[i] = event.account;
                    view.balances_after[i] = event.balance_after;
                    view.amount = event.amount;
                    view.currency = event.currency;
                }
                EventKind::Checkpoint => {}
            }
        }
        view
    }
}

#[derive(Default)]
pub struct ViewState {
    pub names: Vec<String>,
    /// Account name -> index, keyed by the name's xxh3 (the names live once, in `names`).
    directory: IndexTable,
    pub balances: Vec<Vec<(Currency, MinorUnits)>>,
    /// Per account, the positions in `outcomes` of the outcomes that changed its balances, in
    /// sequence order.
    history: Vec<Vec<u32>>,
    pub outcomes: OutcomeMap,
    pub recent: VecDeque<CommandRecord>,
}

impl ViewState {
    pub fn account(&self, name: &str) -> Option<u32> {
        let names = &self.names;
        self.directory
            .find(xxh3_64(name.as_bytes()), |i| names[i as usize] == name)
    }

    fn add_account(&mut self, name: String, index: u32) {
        self.directory.insert(xxh3_64(name.as_bytes()), index);
        self.names.push(name);
    }

    pub fn name(&self, index: u32) -> &str {
        self.names
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The account's history entries with `seq > after_seq`, oldest first.
    pub fn history_after(
        &self,
        account: u32,
        after_seq: u64,
    ) -> impl Iterator<Item = HistoryEntry> + '_ {
        let positions = self
            .history
            .get(account as usize)
            .map(Vec::as_slice)
            .unwrap_or_default();
        // Entries are in sequence order: skip the older ones by binary search.
        let start = positions.partition_point(|&p| self.history_entry(account, p).seq <= after_seq);
        positions[start..]
            .iter()
            .map(move |&p| self.history_entry(account, p))
    }

    /// The sequence of the account's oldest history entry.
    pub fn oldest_history_seq(&self, account: u32) -> Option<u64> {
        let first = *self.history.get(account as usize)?.first()?;
        Some(self.history_entry(account, first).seq)
    }

    /// The entry for `account` of the outcome at `position`.
    fn history_entry(&self, account: u32, position: u32) -> HistoryEntry {
        let (id, outcome) = self.outcomes.at(position);
        // A transfer's accounts differ (`same_account` is rejected), so the slot is unambiguous.
        let i = usize::from(outcome.accounts[0] != account);
        let kind = match (outcome.command_type, i) {
            (CommandType::Transfer, 0) => EventKind::Debited,
            (CommandType::Transfer, _) => EventKind::Credited,
            (CommandType::Deposit, _) => EventKind::Deposited,
            _ => EventKind::Withdrawn,
        };
        HistoryEntry {
            seq: outcome.seq + i as u64,
            transaction_id: id,
            kind,
            currency: outcome.currency,
            amount: outcome.amount,
            balance_after: outcome.balances_after[i],
            timestamp_ns: outcome.timestamp_ns,
            counterparty: if outcome.command_type == CommandType::Transfer {
                outcome.accounts[1 - i]
            } else {
                u32::MAX
            },
        }
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
            if let Some(last) = self.history.get(index).and_then(|h| h.last()) {
                prefetch(last);
            }
        }
    }

    fn apply(&mut self, record: &CommandRecord) {
        let position = record_outcome(&mut self.outcomes, record);
        for event in record.events() {
            match event.kind {
                EventKind::AccountOpened => {
                    self.add_account(record.opened_account.to_string(), event.account);
                    self.balances.push(Vec::new());
                    self.history.push(Vec::new());
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
                    if let Some(position) = position {
                        self.history[index].push(position);
                    }
                }
                EventKind::Rejected | EventKind::Checkpoint => {}
            }
        }
        if self.recent.len() == RECENT_RECORDS {
            self.recent.pop_front();
        }
        self.recent.push_back(*record);
    }
}

/// Stores a record's outcome (not for checkpoints, nor for a `transaction_id_reused` refusal,
/// which must not replace the original); returns its position.
fn record_outcome(outcomes: &mut OutcomeMap, record: &CommandRecord) -> Option<u32> {
    (record.command_type != CommandType::Checkpoint
        && record.rejection != Some(RejectCode::TransactionIdReused))
    .then(|| outcomes.insert(record.transaction_id.0, OutcomeView::from_record(record)))
}

/// The views' past, built apart while the server already runs: the outcomes and history of the
/// records that were in the journal at start-up (balances and the directory come from the
/// recovered ledger at once). `Views::merge_past` puts it in front of what was applied live.
#[derive(Default)]
pub struct Past {
    outcomes: OutcomeMap,
    history: Vec<Vec<u32>>,
}

/// Bytes of outcome storage each outcome fills (see `OutcomeMap::reserved_memory`).
pub const OUTCOME_BYTES: usize = size_of::<([u64; 2], OutcomeView)>();

impl Past {
    /// A past with room for `records` outcomes.
    pub fn with_capacity(records: usize) -> Past {
        Past {
            outcomes: OutcomeMap::with_capacity(records),
            history: Vec::new(),
        }
    }

    /// The outcome map's memory, for a thread that populates it ahead (see
    /// `OutcomeMap::reserved_memory`).
    pub fn reserved_memory(&self) -> Vec<(usize, usize)> {
        self.outcomes.reserved_memory()
    }

    /// Whether `more` further outcomes fit without moving the outcome index.
    pub fn fits(&self, more: usize) -> bool {
        self.outcomes.fits(more)
    }

    /// Outcomes held so far.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// Adds one record's outcome and history entries (records in sequence order).
    pub fn apply(&mut self, record: &CommandRecord) {
        let Some(position) = record_outcome(&mut self.outcomes, record) else {
            return;
        };
        for event in record.events() {
            let index = event.account as usize;
            match event.kind {
                EventKind::Deposited
                | EventKind::Withdrawn
                | EventKind::Debited
                | EventKind::Credited => {
                    if self.history.len() <= index {
                        self.history.resize_with(index + 1, Vec::new);
                    }
                    self.history[index].push(position);
                }
                _ => {}
            }
        }
    }

    /// Prefetches the buckets and history tails a record will touch.
    pub fn prefetch(&self, record: &CommandRecord) {
        self.outcomes.prefetch(record.transaction_id.0);
        for event in record.events() {
            if let Some(last) = self
                .history
                .get(event.account as usize)
                .and_then(|h| h.last())
            {
                prefetch(last);
            }
        }
    }
}

/// Every transaction's outcome by id. An index table of 8-byte buckets over chunked storage:
/// growing moves only the buckets (a `HashMap<u128, OutcomeView>` rehashed 80-byte entries,
/// 16% of the batch endpoint's CPU time under load) and never copies an outcome.
pub struct OutcomeMap {
    index: IndexTable,
    /// `hash_id`'s key, drawn at random for each map (see `table::hash_id`: callers choose
    /// transaction ids, and must not be able to choose where they land).
    key: u64,
    /// `(id low, id high, outcome)`: two `u64`s rather than a `u128`, whose 16-byte alignment
    /// would pad every slot from 72 to 80 bytes.
    chunks: Vec<Vec<([u64; 2], OutcomeView)>>,
    len: usize,
}
const _: () = assert!(size_of::<([u64; 2], OutcomeView)>() == 72);

const OUTCOME_CHUNK: usize = 1 << 14;

fn split_id(id: u128) -> [u64; 2] {
    [id as u64, (id >> 64) as u64]
}

fn join_id(halves: [u64; 2]) -> u128 {
    u128::from(halves[0]) | (u128::from(halves[1]) << 64)
}

impl Default for OutcomeMap {
    fn default() -> OutcomeMap {
        OutcomeMap::with_capacity(0)
    }
}

impl OutcomeMap {
    fn slot(&self, i: u32) -> &([u64; 2], OutcomeView) {
        &self.chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK]
    }

    pub fn get(&self, id: &u128) -> Option<&OutcomeView> {
        let halves = split_id(*id);
        self.index
            .find(hash_id(*id, self.key), |i| self.slot(i).0 == halves)
            .map(|i| &self.slot(i).1)
    }

    /// The id and outcome stored at `position` (as returned by `insert`).
    pub fn at(&self, position: u32) -> (u128, &OutcomeView) {
        let (id, outcome) = self.slot(position);
        (join_id(*id), outcome)
    }

    /// Inserts, or replaces the outcome already stored under `id`; returns its position.
    pub fn insert(&mut self, id: u128, outcome: OutcomeView) -> u32 {
        // The index table stops one short of `u32::MAX` itself.
        let index = u32::try_from(self.len).expect("more than 2^32 outcomes in the views");
        let halves = split_id(id);
        let chunks = &self.chunks;
        let existing = self.index.insert_unique(hash_id(id, self.key), index, |i| {
            chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK].0 == halves
        });
        if let Some(i) = existing {
            self.chunks[i as usize / OUTCOME_CHUNK][i as usize % OUTCOME_CHUNK].1 = outcome;
            return i;
        }
        let chunk = self.len / OUTCOME_CHUNK;
        if chunk == self.chunks.len() {
            self.chunks.push(Vec::with_capacity(OUTCOME_CHUNK));
        }
        self.chunks[chunk].push((halves, outcome));
        self.len += 1;
        index
    }

    /// An empty map with its index and storage allocated for `outcomes` outcomes (storage
    /// blocks allocated but not touched: see `reserved_memory`).
    pub fn with_capacity(outcomes: usize) -> OutcomeMap {
        OutcomeMap {
            index: IndexTable::with_capacity(outcomes),
            key: crate::engine::random_hash_key(),
            chunks: crate::core::table::reserve_blocks(outcomes, OUTCOME_CHUNK),
            len: 0,
        }
    }

    /// The address and length of the index's buckets, then of each storage block's unfilled
    /// part in the order they will be filled (for a thread that populates them ahead).
    /// Storage blocks never move (each is allocated whole, once); the index moves when it
    /// grows, which `fits` predicts.
    pub fn reserved_memory(&self) -> Vec<(usize, usize)> {
        let mut ranges = vec![self.index.bucket_memory()];
        ranges.extend(crate::core::table::spare_ranges(&self.chunks));
        ranges
    }

    /// Whether `more` further outcomes fit without the index growing (and so moving).
    pub fn fits(&self, more: usize) -> bool {
        self.index.fits(self.len + more)
    }

    /// Makes room for `additional` more outcomes (index and storage) now.
    pub fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
        let chunks_needed = (self.len + additional).div_ceil(OUTCOME_CHUNK);
        self.chunks
            .reserve(chunks_needed.saturating_sub(self.chunks.len()));
    }

    /// Hints the CPU to load the bucket where `id` is or will be.
    fn prefetch(&self, id: u128) {
        self.index.prefetch(hash_id(id, self.key));
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
    /// False while the outcomes and history of the records before the views' start are still
    /// being built (see `Past`); balances and the directory are complete from the start.
    past_complete: std::sync::atomic::AtomicBool,
    /// Why the past could not be built, if it could not (it then never completes).
    past_failed: std::sync::OnceLock<String>,
    /// Set when the server stops (shutdown or a halt): waits end at once.
    closing: std::sync::atomic::AtomicBool,
}

impl Views {
    /// Views that start from a ledger's current balances and accounts, with no outcomes or
    /// history before it: complete when the ledger is new, otherwise until `merge_past`.
    ///
    /// Built in two halves on two threads, the names and their directory beside the balances
    /// and (empty) histories: at a million accounts this is about 150 MB of fresh memory, and
    /// on this project's VM the kernel zeroing it on first touch was most of the one-thread
    /// build's second.
    pub fn from_ledger(ledger: &Ledger) -> Arc<Views> {
        let count = ledger.account_count();
        let accounts = count as usize;
        let build_directory = || {
            let mut names = Vec::with_capacity(accounts);
            let mut directory = IndexTable::with_capacity(accounts);
            for index in 0..count {
                let name = ledger.account_name(index).unwrap_or(AccountId::EMPTY);
                // An `AccountId` carries the xxh3 of its bytes, the directory's key.
                directory.insert(name.hash64(), index);
                names.push(name.to_string());
            }
            (names, directory)
        };
        let ((names, directory), balances, history) = std::thread::scope(|scope| {
            let other_half = std::thread::Builder::new()
                .name("views-directory".into())
                .spawn_scoped(scope, build_directory);
            let balances: Vec<_> = (0..count).map(|index| ledger.balances(index)).collect();
            let history: Vec<Vec<u32>> = (0..accounts).map(|_| Vec::new()).collect();
            let names_and_directory = match other_half {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread to spare: build it here.
                Err(_) => build_directory(),
            };
            (names_and_directory, balances, history)
        });
        let state = ViewState {
            names,
            directory,
            balances,
            history,
            ..ViewState::default()
        };
        Arc::new(Views {
            state: RwLock::new(state),
            applied_seq: AtomicU64::new(ledger.next_seq() - 1),
            advanced: tokio::sync::Notify::new(),
            past_complete: std::sync::atomic::AtomicBool::new(ledger.next_seq() == 1),
            past_failed: std::sync::OnceLock::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether outcomes and history before the views' start are in (see `Past`).
    pub fn past_complete(&self) -> bool {
        self.past_complete.load(Ordering::Acquire)
    }

    /// Records that the past cannot be built (a journal whose records do not reach the views'
    /// start): it stays incomplete, and readers are told why instead of "still loading".
    pub fn fail_past(&self, reason: String) {
        let _ = self.past_failed.set(reason);
    }

    /// Why the past could not be built, once that is known.
    pub fn past_failure(&self) -> Option<&str> {
        self.past_failed.get().map(String::as_str)
    }

    /// Puts the past (built from the journal up to the views' start) in front of what was
    /// applied live since: live outcomes move into the past's map (they are few: what arrived
    /// while the past was built), and each account's live history goes after its past history.
    /// Holds the write lock for the live part only: the past's tables are grown before it is
    /// taken (for twice the live part, plus a margin for what arrives in between), so no
    /// rehash of the whole past happens under the lock, which the reply stage waits for.
    pub fn merge_past(&self, mut past: Past) {
        let live_now = (self.state.read().unwrap_or_else(|e| e.into_inner()))
            .outcomes
            .len();
        past.outcomes.reserve(live_now * 2 + (1 << 16));
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let live = std::mem::take(&mut state.outcomes);
        let moved: Vec<u32> = (0..live.len() as u32)
            .map(|position| {
                let (id, outcome) = live.at(position);
                past.outcomes.insert(id, *outcome)
            })
            .collect();
        let live_history = std::mem::take(&mut state.history);
        if past.history.len() < live_history.len() {
            past.history.resize_with(live_history.len(), Vec::new);
        }
        for (account, positions) in live_history.into_iter().enumerate() {
            past.history[account].extend(positions.into_iter().map(|p| moved[p as usize]));
        }
        state.outcomes = past.outcomes;
        state.history = past.history;
        drop(state);
        self.past_complete.store(true, Ordering::Release);
    }

    /// Applies durable records in sequence order, and wakes the waits (`wait_for`) they
    /// satisfy. Called by one writer only.
    pub fn apply_batch(&self, records: &[CommandRecord]) {
        if self.apply_batch_quietly(records) {
            self.announce();
        }
    }

    /// `apply_batch` without waking the waits: whether it applied anything, and so whether
    /// `announce` is due. The reply stage answers the batch's callers in between: waking
    /// every long poll of the event stream first put a payer's answer behind all of them
    /// (about 20 us per idle poll in the queue of the runtime's threads).
    pub fn apply_batch_quietly(&self, records: &[CommandRecord]) -> bool {
        let Some(last) = records.iter().rev().find(|r| !r.replayed) else {
            return false;
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
            // Stored under the write lock: a reader holding the read lock sees the sequence
            // that matches the state it reads.
            self.applied_seq.store(last_seq, Ordering::Release);
        }
        true
    }

    /// Wakes the waits (`wait_for`) for what was applied.
    pub fn announce(&self) {
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
            if self.closing.load(Ordering::Acquire) {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied_seq() >= seq;
            }
        }
    }

    /// Ends every wait (`wait_for`) now and later: the server is stopping (a shutdown or a
    /// halt), and long polls answer with what they have instead of holding the shutdown up
    /// until their timeout, or waiting for records a halted engine will never make.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.advanced.notify_waiters();
    }

    /// Reads the views, unless a panic stopped them part-way through applying a batch (the
    /// lock is poisoned): they may then hold part of a record, a debit without its credit, and
    /// are never read again (the server is halting; a restart rebuilds them from the journal).
    pub fn read<T>(&self, read: impl FnOnce(&ViewState) -> T) -> Result<T, ViewsBroken> {
        let state = self.state.read().map_err(|_| ViewsBroken)?;
        Ok(read(&state))
    }

    /// Whether a panic stopped the views part-way through a batch (see `read`).
    pub fn broken(&self) -> bool {
        self.state.is_poisoned()
    }
}

/// The views stopped part-way through applying a batch; see `Views::read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewsBroken;

impl std::fmt::Display for ViewsBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the read views stopped part-way through applying a batch (an internal error; the \
             server is halting) and may hold part of a transaction; a restart rebuilds them \
             from the journal",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{OUTCOME_BYTES, OUTCOME_CHUNK, OutcomeMap, OutcomeView, Views};
    use crate::core::{
        AccountId, Command, CommandKind, CommandRecord, Currency, EventKind, Ledger, LedgerConfig,
        TransactionId,
    };

    /// A panic part-way through a batch (here a record naming an account the views do not
    /// have, as only a bug elsewhere would make) leaves the views with part of it: they are
    /// never read again, rather than show a debit without its credit.
    #[test]
    fn views_stopped_part_way_through_a_batch_are_never_read() {
        let usd = Currency::new("USD").expect("usd");
        let name = |i: u64| AccountId::new(&format!("acct-{i}")).expect("id");
        let mut ledger = Ledger::new(LedgerConfig::default());
        let views = Views::from_ledger(&ledger);
        let run = |ledger: &mut Ledger, id: u128, kind: CommandKind| {
            ledger.execute(&Command {
                transaction_id: TransactionId(id),
                timestamp_ns: 1,
                kind,
            })
        };
        let setup = [
            run(
                &mut ledger,
                1,
                CommandKind::OpenAccount { account: name(0) },
            ),
            run(
                &mut ledger,
                2,
                CommandKind::OpenAccount { account: name(1) },
            ),
            run(
                &mut ledger,
                3,
                CommandKind::Deposit {
                    account: name(0),
                    amount: 100,
                    currency: usd,
                },
            ),
        ];
        views.apply_batch(&setup);
        let transfer = |ledger: &mut Ledger, id| {
            run(
                ledger,
                id,
                CommandKind::Transfer {
                    from: name(0),
                    to: name(1),
                    amount: 10,
                    currency: usd,
                },
            )
        };
        let good = transfer(&mut ledger, 4);
        let mut bad = transfer(&mut ledger, 5);
        assert_eq!(bad.events[1].kind, EventKind::Credited);
        bad.events[1].account = 1000;
        let balance = |views: &Views| {
            views.read(|state| {
                state.balances[0]
                    .iter()
                    .map(|(_, balance)| *balance)
                    .sum::<u64>()
            })
        };
        assert_eq!(balance(&views), Ok(100));
        assert!(!views.broken());
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            views.apply_batch(&[good, bad]);
        }));
        assert!(applied.is_err(), "the bad record applied");
        assert!(views.broken());
        assert_eq!(balance(&views), Err(super::ViewsBroken));
        assert_eq!(
            views.applied_seq(),
            3,
            "the broken batch's sequence is not published"
        );
    }

    /// History entries are derived from outcomes on read; they must be exactly the events each
    /// record made for that account, in order, and `after_seq` must cut where it says.
    #[test]
    fn history_read_back_is_every_balance_event_of_the_account_in_order() {
        let usd = Currency::new("USD").expect("usd");
        let eur = Currency::new("EUR").expect("eur");
        let name = |i: u64| AccountId::new(&format!("acct-{i}")).expect("id");
        let mut ledger = Ledger::new(LedgerConfig::default());
        let views = Views::from_ledger(&ledger);
        let mut records = Vec::new();
        let mut id = 0u128;
        let mut run = |ledger: &mut Ledger, kind: CommandKind| {
            id += 1;
            let record = ledger.execute(&Command {
                transaction_id: TransactionId(id << 64 | id),
                timestamp_ns: 1000 + id as u64,
                kind,
            });
            records.push(record);
        };
        for i in 0..3 {
            run(&mut ledger, CommandKind::OpenAccount { account: name(i) });
        }
        run(
            &mut ledger,
            CommandKind::Deposit {
                account: name(0),
                amount: 500,
                currency: usd,
            },
        );
        run(
            &mut ledger,
            CommandKind::Deposit {
                account: name(1),
                amount: 70,
                currency: eur,
            },
        );
        for n in 0..40u64 {
            let (from, to) = (n % 3, (n + 1 + n / 3 % 2) % 3);
            let currency = if n % 4 == 0 { eur } else { usd };
            run(
                &mut ledger,
                CommandKind::Transfer {
                    from: name(from),
                    to: name(to),
                    amount: 1 + n % 9,
                    currency,
                },
            );
            if n % 7 == 0 {
                run(
                    &mut ledger,
                    CommandKind::Withdraw {
                        account: name(to),
                        amount: 2,
                        currency,
                    },
                );
            }
        }
        views.apply_batch(&records);

        for account in 0..3u32 {
            // The reference: every balance event of this account, straight from the records.
            let mut want = Vec::new();
            for record in &records {
                for event in record.events() {
                    if event.account == account && event.kind.changes_balance() {
                        let counterparty = match (event.kind, record.event_count) {
                            (EventKind::Debited, 2) => record.events[1].account,
                            (EventKind::Credited, 2) => record.events[0].account,
                            _ => u32::MAX,
                        };
                        want.push((
                            event.seq,
                            record.transaction_id.0,
                            event.kind,
                            event.currency,
                            event.amount,
                            event.balance_after,
                            record.timestamp_ns,
                            counterparty,
                        ));
                    }
                }
            }
            assert!(want.len() > 10, "account {account}: {} events", want.len());
            let read = |after: u64| -> Vec<_> {
                views
                    .read(|state| {
                        state
                            .history_after(account, after)
                            .map(|e| {
                                (
                                    e.seq,
                                    e.transaction_id,
                                    e.kind,
                                    e.currency,
                                    e.amount,
                                    e.balance_after,
                                    e.timestamp_ns,
                                    e.counterparty,
                                )
                            })
                            .collect()
                    })
                    .expect("views")
            };
            assert_eq!(read(0), want, "account {account}");
            let middle = want[want.len() / 2].0;
            let later: Vec<_> = want.iter().copied().filter(|e| e.0 > middle).collect();
            assert_eq!(read(middle), later, "account {account} after {middle}");
            assert_eq!(read(u64::MAX), Vec::new());
            assert_eq!(
                views
                    .read(|state| state.oldest_history_seq(account))
                    .expect("views"),
                Some(want[0].0)
            );
        }
    }

    fn outcome(seq: u64) -> OutcomeView {
        let mut view = OutcomeView::from_record(&CommandRecord::empty());
        view.seq = seq;
        view
    }

    /// Views started from a ledger mid-history, fed the rest live, then merged with the past
    /// built from the first part, must equal views fed everything from the start.
    #[test]
    fn views_merged_with_their_past_equal_views_fed_from_the_start() {
        let usd = Currency::new("USD").expect("usd");
        let name = |i: u64| AccountId::new(&format!("m-{i}")).expect("id");
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut records = Vec::new();
        let mut split_ledger = None;
        for n in 0..3000u64 {
            let kind = match n {
                0..=9 => CommandKind::OpenAccount { account: name(n) },
                10..=19 => CommandKind::Deposit {
                    account: name(n - 10),
                    amount: 10_000,
                    currency: usd,
                },
                // Accounts opened after the split have no past.
                2000..=2004 => CommandKind::OpenAccount {
                    account: name(n - 1990),
                },
                _ => CommandKind::Transfer {
                    from: name(n % 7),
                    to: name(n * 7 % (if n > 2004 { 15 } else { 10 })),
                    amount: 1 + n % 13,
                    currency: usd,
                },
            };
            if n == 1200 {
                split_ledger = Some(ledger.clone());
            }
            records.push(ledger.execute(&Command {
                transaction_id: TransactionId(u128::from(n) * 0x1_0000_0001 + 7),
                timestamp_ns: n,
                kind,
            }));
        }
        let split = split_ledger.expect("split");
        let k = records
            .iter()
            .position(|r| r.first_seq == split.next_seq())
            .expect("k");

        let full = Views::from_ledger(&Ledger::new(LedgerConfig::default()));
        assert!(full.past_complete());
        full.apply_batch(&records);

        let merged = Views::from_ledger(&split);
        assert!(!merged.past_complete());
        merged.apply_batch(&records[k..]);
        // Room for half the past: pre-allocated storage, then growth.
        let mut past = super::Past::with_capacity(k / 2);
        for record in &records[..k] {
            past.apply(record);
        }
        merged.merge_past(past);
        assert!(merged.past_complete());

        let history = |views: &Views, account: u32| -> Vec<(u64, u128, u64, u32)> {
            views
                .read(|s| {
                    s.history_after(account, 0)
                        .map(|e| (e.seq, e.transaction_id, e.balance_after, e.counterparty))
                        .collect()
                })
                .expect("views")
        };
        for account in 0..15u32 {
            let want = history(&full, account);
            assert!(!want.is_empty(), "account {account} has history");
            assert_eq!(history(&merged, account), want, "account {account}");
        }
        for record in &records {
            let id = record.transaction_id.0;
            let seq = |views: &Views| {
                views
                    .read(|s| s.outcomes.get(&id).map(|o| (o.seq, o.rejection)))
                    .expect("views")
            };
            assert!(seq(&full).is_some());
            assert_eq!(seq(&merged), seq(&full), "outcome of {id:#x}");
        }
        let balances = |views: &Views| views.read(|s| s.balances.clone()).expect("views");
        assert_eq!(balances(&merged), balances(&full));
    }

    #[test]
    fn outcome_map_finds_every_id_across_growth_and_replaces_in_place() {
        // Sequential ids (the hash must spread them) and ids that differ only in the high half.
        let ids: Vec<u128> = (0..100_000u128)
            .map(|i| if i % 2 == 0 { i } else { i << 64 })
            .collect();
        for reserved in [0, 1_000, ids.len()] {
            let mut map = OutcomeMap::with_capacity(reserved);
            let storage = map.reserved_memory()[1..].to_vec();
            assert_eq!(
                storage.iter().map(|r| r.1).sum::<usize>(),
                reserved.div_ceil(OUTCOME_CHUNK) * OUTCOME_CHUNK * OUTCOME_BYTES
            );
            assert!(map.fits(reserved));
            for (n, id) in ids.iter().enumerate() {
                assert!(map.get(id).is_none());
                map.insert(*id, outcome(n as u64));
            }
            assert_eq!(map.len(), ids.len());
            for (n, id) in ids.iter().enumerate() {
                assert_eq!(map.get(id).map(|o| o.seq), Some(n as u64), "id {id:#x}");
                // Reserved storage is filled front to back, in place (a populating thread
                // relies on it never moving).
                if let Some(range) = storage.get(n / OUTCOME_CHUNK) {
                    let slot = range.0 + (n % OUTCOME_CHUNK) * OUTCOME_BYTES;
                    let stored = map.slot(n as u32) as *const ([u64; 2], OutcomeView);
                    assert_eq!(stored as usize, slot, "slot {n}");
                }
            }
            map.insert(ids[7], outcome(999_999));
            assert_eq!(map.len(), ids.len());
            assert_eq!(map.get(&ids[7]).map(|o| o.seq), Some(999_999));
            assert!(map.get(&u128::MAX).is_none());
            // Only the last block's tail is left unfilled.
            assert!(
                map.reserved_memory()[1..]
                    .iter()
                    .map(|r| r.1)
                    .sum::<usize>()
                    < OUTCOME_CHUNK * OUTCOME_BYTES
            );
        }
    }
}
