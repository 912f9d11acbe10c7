//! The deterministic state machine: balances, interned accounts and remembered transaction ids.
//!
//! `execute` validates a command against the current state and produces a `CommandRecord` (its
//! events, or a rejection), then applies that record with the very same code path that replay
//! uses (`apply`). So "execute" and "apply the journal" cannot drift apart: there is only one
//! function that mutates state.

use xxhash_rust::xxh3::xxh3_64;

use crate::core::table::IndexTable;

use crate::core::command::{
    Command, CommandKind, CommandRecord, CommandType, Event, EventKind, MAX_EVENTS_PER_COMMAND,
    RejectCode,
};
use crate::core::types::{AccountId, Currency, DEFAULT_MAX_AMOUNT, MinorUnits, TransactionId};

/// Limits that are part of the ledger's rules (and so of its determinism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    pub max_amount: MinorUnits,
    pub max_accounts: u32,
    /// The key of the transaction-id table's hash (`table::hash_id`). Not a rule: it decides
    /// where an id is stored, never an outcome or the state hash. A server draws it at random
    /// (`engine::ledger_config`) so that callers cannot choose ids that all land in one probe
    /// run; the default is a fixed key, for tests and tools.
    pub id_hash_key: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            max_amount: DEFAULT_MAX_AMOUNT,
            max_accounts: u32::MAX - 1,
            id_hash_key: DEFAULT_ID_HASH_KEY,
        }
    }
}

/// Bytes of an account id stored inline in its slot; the rest (ids longer than this) goes to a
/// side arena. Most ids fit, so a lookup touches one slot, not an arena too.
const INLINE_NAME: usize = 13;

/// One account: its first balance inline (further currencies hang off `next_extra`) and its id.
/// 32 bytes, two to a cache line.
#[derive(Debug, Clone, Copy)]
struct AccountSlot {
    balance: MinorUnits,
    next_extra: u32,
    /// Offset in `long_names` of the id's bytes beyond `INLINE_NAME`.
    name_tail: u32,
    currency: Currency,
    name_len: u8,
    name_head: [u8; INLINE_NAME],
}
const _: () = assert!(size_of::<AccountSlot>() == 32);

impl AccountSlot {
    #[inline]
    fn has_name(&self, account: &AccountId, long_names: &[u8]) -> bool {
        let name = account.as_bytes();
        let len = self.name_len as usize;
        // Both heads are zero-padded, so comparing the fixed-size arrays compares the names'
        // first bytes without a memcmp call.
        if len != name.len() || self.name_head != account.head::<INLINE_NAME>() {
            return false;
        }
        len <= INLINE_NAME || {
            let tail = self.name_tail as usize;
            long_names[tail..tail + len - INLINE_NAME] == name[INLINE_NAME..]
        }
    }

    fn name_bytes(
        &self,
        long_names: &[u8],
    ) -> ([u8; crate::core::types::ACCOUNT_ID_MAX_BYTES], usize) {
        let len = self.name_len as usize;
        let mut bytes = [0u8; crate::core::types::ACCOUNT_ID_MAX_BYTES];
        let head = len.min(INLINE_NAME);
        bytes[..head].copy_from_slice(&self.name_head[..head]);
        if len > INLINE_NAME {
            let tail = self.name_tail as usize;
            bytes[INLINE_NAME..len].copy_from_slice(&long_names[tail..tail + len - INLINE_NAME]);
        }
        (bytes, len)
    }

    fn name(&self, long_names: &[u8]) -> AccountId {
        let (bytes, len) = self.name_bytes(long_names);
        AccountId::from_bytes(&bytes[..len]).expect("stored account ids are valid")
    }

    /// `AccountId::hash64` of the stored id, without validating it again.
    fn name_hash(&self, long_names: &[u8]) -> u64 {
        let (bytes, len) = self.name_bytes(long_names);
        xxh3_64(&bytes[..len])
    }
}

const NO_EXTRA: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct ExtraBalance {
    balance: MinorUnits,
    currency: Currency,
    next_extra: u32,
}

/// What the ledger remembers of each transaction id, forever: 32 bytes plus 9 to 18 bytes of
/// index-table bucket (8 bytes at a load between 7/16 and 7/8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RememberedId {
    id_low: u64,
    id_high: u64,
    fingerprint: u64,
    /// `first_seq << 8 | rejection code` (0 = committed).
    seq_and_code: u64,
}
const _: () = assert!(size_of::<RememberedId>() == 32);

/// Bytes of reserved id memory (`reserved_id_memory`) that each remembered id fills.
pub const REMEMBERED_ID_BYTES: usize = size_of::<RememberedId>();

impl RememberedId {
    fn id(&self) -> u128 {
        (u128::from(self.id_high) << 64) | u128::from(self.id_low)
    }
}

/// Remembered ids are stored in fixed-size chunks: growing never copies old entries (no latency
/// spike) and never over-allocates by more than one chunk.
const ID_CHUNK: usize = 1 << 16;

/// Storage for `ID_CHUNK` remembered transaction ids, allocated and empty: a block that another
/// thread can prepare (have its pages populated) before the ledger needs it, so that the first
/// touch of fresh memory (the kernel zeroing 2 MiB) does not happen on the engine thread. See
/// `Ledger::wants_id_block`.
pub struct IdBlock(Vec<RememberedId>);

impl IdBlock {
    #[allow(clippy::new_without_default)]
    pub fn new() -> IdBlock {
        IdBlock(Vec::with_capacity(ID_CHUNK))
    }

    /// The block's memory: address and length in bytes.
    pub fn memory(&self) -> (usize, usize) {
        (
            self.0.as_ptr() as usize,
            self.0.capacity() * size_of::<RememberedId>(),
        )
    }
}

/// Per-currency totals, for the conservation invariant: sum of balances = deposited - withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CurrencyTotals {
    pub deposited: u128,
    pub withdrawn: u128,
    /// Money currently in the system: deposited - withdrawn, kept in `u64` so that every balance
    /// (which is at most this) fits too. A deposit that would overflow it is `amount_overflow`.
    pub outstanding: MinorUnits,
}

/// Memory the ledger's tables hold, by owner.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryUsage {
    pub account_bytes: u64,
    pub transaction_id_bytes: u64,
}

/// `Clone` copies the whole state (the engine's snapshot follower starts from a copy).
#[derive(Clone)]
pub struct Ledger {
    config: LedgerConfig,
    /// Sequence number the next event gets. Starts at 1.
    next_seq: u64,
    /// Bytes of account ids beyond `INLINE_NAME`.
    long_names: Vec<u8>,
    name_index: IndexTable,
    accounts: Vec<AccountSlot>,
    extras: Vec<ExtraBalance>,
    totals: Vec<(Currency, CurrencyTotals)>,
    id_index: IndexTable,
    id_chunks: Vec<Vec<RememberedId>>,
    id_count: u32,
    digests: Digests,
}

/// Running digests of the state, kept up to date by the only mutators (`intern`,
/// `adjust_balance`, `remember`), so that `state_hash` costs a few nanoseconds instead of a
/// pass over every account and every remembered id (which checkpoints used to pay every
/// million events). `check_invariants` recomputes them from scratch and compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Digests {
    /// Chained over account ids in index order.
    names: u64,
    /// Wrapping sum of `balance_term` over every balance entry (a multiset hash: balances
    /// change in place, so their digest must not depend on the order of changes).
    balances: u64,
    /// Chained over remembered ids in the order they were first seen.
    ids: u64,
}

#[inline]
fn chain(digest: u64, word: u64) -> u64 {
    mix64(digest ^ word)
}

#[inline]
fn balance_term(account: u32, currency: Currency, balance: MinorUnits) -> u64 {
    let key = (u64::from(account) << 16) | u64::from(currency.packed());
    mix64(balance ^ mix64(key ^ 0x4528_21E6_38D0_1377))
}

fn name_digest(digest: u64, account: &AccountId) -> u64 {
    chain(
        chain(digest, account.as_bytes().len() as u64),
        account.hash64(),
    )
}

fn id_digest(digest: u64, r: &RememberedId) -> u64 {
    id_entry_digest(digest, [r.id_low, r.id_high, r.fingerprint, r.seq_and_code])
}

/// The remembered-id digest step over one entry's words (`id_low`, `id_high`, `fingerprint`,
/// `seq_and_code`): also computed by snapshot checks straight from a snapshot's bytes.
pub(crate) fn id_entry_digest(digest: u64, words: [u64; 4]) -> u64 {
    words.into_iter().fold(digest, chain)
}

use crate::core::table::{DEFAULT_ID_HASH_KEY, hash_id, mix64};

impl Ledger {
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger::with_capacity(config, 0, 0)
    }

    /// Reserves room up front so that the hot path does not pause to grow tables.
    pub fn with_capacity(config: LedgerConfig, accounts: usize, transaction_ids: usize) -> Ledger {
        Ledger {
            config,
            next_seq: 1,
            long_names: Vec::new(),
            name_index: IndexTable::with_capacity(accounts),
            accounts: Vec::with_capacity(accounts),
            extras: Vec::new(),
            totals: Vec::new(),
            id_index: IndexTable::with_capacity(transaction_ids),
            // Allocated, not touched: the pages are faulted in as ids arrive (or ahead of
            // them, by a caller that populates `reserved_id_memory`).
            id_chunks: crate::core::table::reserve_blocks(transaction_ids, ID_CHUNK),
            id_count: 0,
            digests: Digests::default(),
        }
    }

    pub fn config(&self) -> LedgerConfig {
        self.config
    }

    /// The sequence number the next event will get; every event below it has been applied.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn account_count(&self) -> u32 {
        self.accounts.len() as u32
    }

    pub fn transaction_id_count(&self) -> u32 {
        self.id_count
    }

    pub fn account_name(&self, index: u32) -> Option<AccountId> {
        self.accounts
            .get(index as usize)
            .map(|slot| slot.name(&self.long_names))
    }

    /// The `AccountId::hash64` of an open account's id (for `CommandRecord::body_fingerprint`).
    pub fn account_hash(&self, index: u32) -> Option<u64> {
        self.accounts
            .get(index as usize)
            .map(|slot| slot.name_hash(&self.long_names))
    }

    pub fn account_index(&self, account: &AccountId) -> Option<u32> {
        let (accounts, long_names) = (&self.accounts, &self.long_names);
        self.name_index.find(account.hash64(), |i| {
            accounts[i as usize].has_name(account, long_names)
        })
    }

    /// The balance of an account in a currency, or `None` if it never received that currency.
    pub fn balance(&self, account: u32, currency: Currency) -> Option<MinorUnits> {
        let slot = self.accounts.get(account as usize)?;
        if slot.currency == currency {
            return Some(slot.balance);
        }
        let mut next = slot.next_extra;
        while next != NO_EXTRA {
            let extra = &self.extras[next as usize];
            if extra.currency == currency {
                return Some(extra.balance);
            }
            next = extra.next_extra;
        }
        None
    }

    /// All balances of an account, sorted by currency.
    pub fn balances(&self, account: u32) -> Vec<(Currency, MinorUnits)> {
        let mut out = Vec::new();
        let Some(slot) = self.accounts.get(account as usize) else {
            return out;
        };
        if slot.currency != Currency::NONE {
            out.push((slot.currency, slot.balance));
        }
        let mut next = slot.next_extra;
        while next != NO_EXTRA {
            let extra = &self.extras[next as usize];
            out.push((extra.currency, extra.balance));
            next = extra.next_extra;
        }
        out.sort_unstable_by_key(|(c, _)| *c);
        out
    }

    pub fn totals(&self) -> Vec<(Currency, CurrencyTotals)> {
        let mut out = self.totals.clone();
        out.sort_unstable_by_key(|(c, _)| *c);
        out
    }

    fn totals_of(&self, currency: Currency) -> CurrencyTotals {
        self.totals
            .iter()
            .find(|(c, _)| *c == currency)
            .map(|(_, t)| *t)
            .unwrap_or_default()
    }

    fn remembered(&self, id: TransactionId) -> Option<&RememberedId> {
        let chunks = &self.id_chunks;
        self.id_index
            .find(self.hash_id(id.0), |i| {
                chunks[i as usize / ID_CHUNK][i as usize % ID_CHUNK].id() == id.0
            })
            .map(|i| &chunks[i as usize / ID_CHUNK][i as usize % ID_CHUNK])
    }

    /// What the ledger remembers of a transaction id: the sequence of its first event and its
    /// rejection, if any.
    pub fn outcome_of(&self, id: TransactionId) -> Option<(u64, Option<RejectCode>)> {
        self.remembered(id).map(|r| {
            (
                r.seq_and_code >> 8,
                RejectCode::from_u8((r.seq_and_code & 0xFF) as u8),
            )
        })
    }

    /// Where the id table looks for `id`: `table::hash_id` under this ledger's key.
    #[inline]
    pub fn hash_id(&self, id: u128) -> u64 {
        hash_id(id, self.config.id_hash_key)
    }

    /// Hints the CPU to load the id-table bucket where the id with this `hash_id` is (or would
    /// be) remembered.
    #[inline]
    pub fn prefetch_id_hash(&self, hash: u64) {
        self.id_index.prefetch(hash);
    }

    /// Prefetch stage 1 for a command that will execute soon: the index-table buckets of its
    /// accounts and its transaction id.
    #[inline]
    pub fn prefetch_buckets(&self, command: &Command) {
        self.id_index
            .prefetch(self.hash_id(command.transaction_id.0));
        match &command.kind {
            CommandKind::Transfer { from, to, .. } => {
                self.name_index.prefetch(from.hash64());
                self.name_index.prefetch(to.hash64());
            }
            CommandKind::Deposit { account, .. } | CommandKind::Withdraw { account, .. } => {
                self.name_index.prefetch(account.hash64());
            }
            CommandKind::OpenAccount { .. } => {}
        }
    }

    /// Prefetch stage 2 (after stage 1 had time to land): the account slots the command touches.
    #[inline]
    pub fn prefetch_accounts(&self, command: &Command) {
        let slot = |account: &AccountId| {
            // Probing only the tag avoids touching slots here; a tag hit is what we prefetch.
            if let Some(i) = self.name_index.find(account.hash64(), |_| true) {
                crate::core::table::prefetch(&self.accounts[i as usize]);
            }
        };
        match &command.kind {
            CommandKind::Transfer { from, to, .. } => {
                slot(from);
                slot(to);
            }
            CommandKind::Deposit { account, .. } | CommandKind::Withdraw { account, .. } => {
                slot(account)
            }
            CommandKind::OpenAccount { .. } => {}
        }
    }

    /// Prefetch for replay: the account slots a journal record touches and the bucket its
    /// transaction id will be remembered in.
    #[inline]
    pub fn prefetch_record(&self, record: &CommandRecord) {
        self.id_index
            .prefetch(self.hash_id(record.transaction_id.0));
        for event in record.events() {
            if let Some(slot) = self.accounts.get(event.account as usize) {
                crate::core::table::prefetch(slot);
            }
        }
    }

    /// Executes `commands` in order, exactly as calling `execute` on each would, but with
    /// software prefetching a few commands ahead so that the random memory accesses of
    /// consecutive commands overlap instead of queueing behind each other.
    pub fn execute_batch(&mut self, commands: &[Command], emit: impl FnMut(usize, CommandRecord)) {
        self.execute_batch_of(commands, |c| c, emit);
    }

    /// `execute_batch` over any slice that holds commands (ring slots, say), without copying
    /// them out first.
    pub fn execute_batch_of<T>(
        &mut self,
        items: &[T],
        command_of: impl Fn(&T) -> &Command,
        mut emit: impl FnMut(usize, CommandRecord),
    ) {
        // Measured on the 2-core EPYC VM with 1,000,000 accounts: 8/4 beat 6/3, 12/6, 16/8 and
        // 24/12 (longer distances evict what was prefetched before it is used).
        const BUCKETS_AHEAD: usize = 8;
        const ACCOUNTS_AHEAD: usize = 4;
        for item in items.iter().take(BUCKETS_AHEAD) {
            self.prefetch_buckets(command_of(item));
        }
        for item in items.iter().take(ACCOUNTS_AHEAD) {
            self.prefetch_accounts(command_of(item));
        }
        for (i, item) in items.iter().enumerate() {
            if let Some(ahead) = items.get(i + BUCKETS_AHEAD) {
                self.prefetch_buckets(command_of(ahead));
            }
            if let Some(ahead) = items.get(i + ACCOUNTS_AHEAD) {
                self.prefetch_accounts(command_of(ahead));
            }
            emit(i, self.execute(command_of(item)));
        }
    }

    /// Validates `command` against the current state, applies its events and returns the record.
    /// Deterministic: the outcome depends only on the state and the command.
    pub fn execute(&mut self, command: &Command) -> CommandRecord {
        let fingerprint = command.fingerprint();
        let mut record = CommandRecord {
            transaction_id: command.transaction_id,
            timestamp_ns: command.timestamp_ns,
            fingerprint,
            command_type: command.command_type(),
            rejection: None,
            replayed: false,
            first_seq: self.next_seq,
            event_count: 0,
            events: [Event::default(); MAX_EVENTS_PER_COMMAND],
            opened_account: crate::core::types::AccountId::EMPTY,
            refused: None,
        };

        if let Some(previous) = self.remembered(command.transaction_id) {
            if previous.fingerprint == fingerprint {
                record.replayed = true;
                record.first_seq = previous.seq_and_code >> 8;
                record.rejection = RejectCode::from_u8((previous.seq_and_code & 0xFF) as u8);
                return record;
            }
            self.reject(&mut record, RejectCode::TransactionIdReused, u32::MAX);
            return record;
        }

        if let Err(code) = self.validate(command, &mut record) {
            self.reject(&mut record, code, self.party(command));
            return record;
        }
        self.apply(&record);
        record
    }

    /// What `execute` would answer for a repeat of a remembered command (the same id and body),
    /// without executing anything: the original outcome, marked as replayed. `None` for any
    /// other command. An engine that stopped executing still answers retries with this.
    pub fn replay_of(&self, command: &Command) -> Option<CommandRecord> {
        let previous = self.remembered(command.transaction_id)?;
        let fingerprint = command.fingerprint();
        if previous.fingerprint != fingerprint {
            return None;
        }
        Some(CommandRecord {
            transaction_id: command.transaction_id,
            timestamp_ns: command.timestamp_ns,
            fingerprint,
            command_type: command.command_type(),
            rejection: RejectCode::from_u8((previous.seq_and_code & 0xFF) as u8),
            replayed: true,
            first_seq: previous.seq_and_code >> 8,
            event_count: 0,
            events: [Event::default(); MAX_EVENTS_PER_COMMAND],
            opened_account: crate::core::types::AccountId::EMPTY,
            refused: None,
        })
    }

    /// The account a rejected command names as its own, if it is open: the debit account of a
    /// transfer, the account of a deposit or withdrawal (none for an opening). Its rejection
    /// event carries it, so that the account's owner can look the outcome up.
    fn party(&self, command: &Command) -> u32 {
        let account = match command.kind {
            CommandKind::Transfer { from, .. } => from,
            CommandKind::Deposit { account, .. } | CommandKind::Withdraw { account, .. } => account,
            CommandKind::OpenAccount { .. } => return u32::MAX,
        };
        self.account_index(&account).unwrap_or(u32::MAX)
    }

    fn reject(&mut self, record: &mut CommandRecord, code: RejectCode, party: u32) {
        record.rejection = Some(code);
        record.event_count = 1;
        record.events[0] = Event {
            seq: record.first_seq,
            kind: EventKind::Rejected,
            account: party,
            currency: Currency::NONE,
            amount: 0,
            balance_after: 0,
        };
        self.apply(record);
    }

    fn check_amount(&self, amount: MinorUnits, currency: Currency) -> Result<(), RejectCode> {
        // A `Currency` other than NONE can only be built by validating constructors.
        if currency == Currency::NONE {
            return Err(RejectCode::UnsupportedCurrency);
        }
        if amount == 0 || amount > self.config.max_amount {
            return Err(RejectCode::InvalidAmount);
        }
        Ok(())
    }

    fn validate(&self, command: &Command, record: &mut CommandRecord) -> Result<(), RejectCode> {
        let seq = record.first_seq;
        let event = |kind, account, currency, amount, balance_after| Event {
            seq,
            kind,
            account,
            currency,
            amount,
            balance_after,
        };
        match command.kind {
            CommandKind::OpenAccount { account } => {
                if account.is_empty() || AccountId::from_bytes(account.as_bytes()).is_err() {
                    return Err(RejectCode::InvalidAccountId);
                }
                if self.account_index(&account).is_some() {
                    return Err(RejectCode::AccountAlreadyExists);
                }
                if self.accounts.len() as u64 >= u64::from(self.config.max_accounts) {
                    return Err(RejectCode::TooManyAccounts);
                }
                // Ids longer than the inline part continue in an arena addressed with `u32`.
                if account.as_bytes().len() > INLINE_NAME
                    && self.long_names.len() > u32::MAX as usize
                {
                    return Err(RejectCode::TooManyAccounts);
                }
                record.opened_account = account;
                record.event_count = 1;
                record.events[0] = event(
                    EventKind::AccountOpened,
                    self.accounts.len() as u32,
                    Currency::NONE,
                    0,
                    0,
                );
            }
            CommandKind::Deposit {
                account,
                amount,
                currency,
            } => {
                self.check_amount(amount, currency)?;
                let index = self
                    .account_index(&account)
                    .ok_or(RejectCode::AccountNotFound)?;
                self.totals_of(currency)
                    .outstanding
                    .checked_add(amount)
                    .ok_or(RejectCode::AmountOverflow)?;
                let after = self
                    .balance(index, currency)
                    .unwrap_or(0)
                    .checked_add(amount)
                    .ok_or(RejectCode::AmountOverflow)?;
                record.event_count = 1;
                record.events[0] = event(EventKind::Deposited, index, currency, amount, after);
            }
            CommandKind::Withdraw {
                account,
                amount,
                currency,
            } => {
                self.check_amount(amount, currency)?;
                let index = self
                    .account_index(&account)
                    .ok_or(RejectCode::AccountNotFound)?;
                let before = self.balance(index, currency).unwrap_or(0);
                let after = before
                    .checked_sub(amount)
                    .ok_or(RejectCode::InsufficientFunds)?;
                record.event_count = 1;
                record.events[0] = event(EventKind::Withdrawn, index, currency, amount, after);
            }
            CommandKind::Transfer {
                from,
                to,
                amount,
                currency,
            } => {
                self.check_amount(amount, currency)?;
                let from_index = self
                    .account_index(&from)
                    .ok_or(RejectCode::AccountNotFound)?;
                let to_index = self.account_index(&to).ok_or(RejectCode::AccountNotFound)?;
                if from_index == to_index {
                    return Err(RejectCode::SameAccount);
                }
                let from_after = self
                    .balance(from_index, currency)
                    .unwrap_or(0)
                    .checked_sub(amount)
                    .ok_or(RejectCode::InsufficientFunds)?;
                // Cannot overflow while outstanding fits in u64, but the check is cheap and total.
                let to_after = self
                    .balance(to_index, currency)
                    .unwrap_or(0)
                    .checked_add(amount)
                    .ok_or(RejectCode::AmountOverflow)?;
                record.event_count = 2;
                record.events[0] =
                    event(EventKind::Debited, from_index, currency, amount, from_after);
                record.events[1] = Event {
                    seq: seq + 1,
                    ..event(EventKind::Credited, to_index, currency, amount, to_after)
                };
            }
        }
        Ok(())
    }

    /// Emits and applies a checkpoint: one event whose `amount` is the state hash before it.
    /// Replay recomputes the hash at the same point and compares.
    pub fn checkpoint(&mut self, timestamp_ns: u64) -> CommandRecord {
        let mut record = CommandRecord::empty();
        record.timestamp_ns = timestamp_ns;
        record.first_seq = self.next_seq;
        record.event_count = 1;
        record.events[0] = Event {
            seq: self.next_seq,
            kind: EventKind::Checkpoint,
            account: u32::MAX,
            currency: Currency::NONE,
            amount: self.state_hash(),
            balance_after: 0,
        };
        self.apply(&record);
        record
    }

    /// Checks, without changing anything, that `record` can be applied to this state: the right
    /// sequence, known accounts, and every `balance_after` what applying it would give.
    pub fn verify_record(&self, record: &CommandRecord) -> Result<(), String> {
        if record.replayed {
            return Err("a replayed outcome is not a journal record".into());
        }
        if record.refused.is_some() {
            return Err("a refused command is not a journal record".into());
        }
        if record.first_seq != self.next_seq {
            return Err(format!(
                "record at sequence {} but the ledger is at {}",
                record.first_seq, self.next_seq
            ));
        }
        if record.event_count == 0 || record.event_count as usize > MAX_EVENTS_PER_COMMAND {
            return Err("bad event count".into());
        }
        self.verify_shape(record)?;
        // Exactly once: a journal executes each transaction id at most once. The only record
        // that may carry an id already remembered is its `transaction_id_reused` rejection
        // (another body under the same id); a same-body repeat is a replay, never journaled.
        if record.command_type != CommandType::Checkpoint {
            let reused = record.rejection == Some(RejectCode::TransactionIdReused);
            match (self.remembered(record.transaction_id), reused) {
                (Some(previous), false) => {
                    return Err(format!(
                        "transaction id {} at sequence {} was already executed at sequence {}",
                        record.transaction_id.to_uuid_string(),
                        record.first_seq,
                        previous.seq_and_code >> 8
                    ));
                }
                (Some(previous), true) if previous.fingerprint == record.fingerprint => {
                    return Err(format!(
                        "record at sequence {} rejects a repeat of the same body as \
                         transaction_id_reused",
                        record.first_seq
                    ));
                }
                (None, true) => {
                    return Err(format!(
                        "record at sequence {} is transaction_id_reused for an id never executed",
                        record.first_seq
                    ));
                }
                _ => {}
            }
        }
        let mut pending: [(u32, Currency, MinorUnits); MAX_EVENTS_PER_COMMAND] =
            [(u32::MAX, Currency::NONE, 0); 2];
        for (i, event) in record.events().iter().enumerate() {
            let known = (event.account as usize) < self.accounts.len();
            let current = |account: u32, currency: Currency| {
                pending[..i]
                    .iter()
                    .rev()
                    .find(|(a, c, _)| *a == account && *c == currency)
                    .map(|(_, _, b)| *b)
                    .or_else(|| self.balance(account, currency))
                    .unwrap_or(0)
            };
            let after = match event.kind {
                EventKind::AccountOpened => {
                    if event.account as usize != self.accounts.len()
                        || self.account_index(&record.opened_account).is_some()
                    {
                        return Err(format!(
                            "account opening at sequence {} does not fit",
                            event.seq
                        ));
                    }
                    continue;
                }
                EventKind::Deposited | EventKind::Credited if known => {
                    current(event.account, event.currency).checked_add(event.amount)
                }
                EventKind::Withdrawn | EventKind::Debited if known => {
                    current(event.account, event.currency).checked_sub(event.amount)
                }
                // A rejection names its command's own account, if that is open, or none.
                EventKind::Rejected if known || event.account == u32::MAX => continue,
                EventKind::Checkpoint => continue,
                _ => {
                    return Err(format!(
                        "event at sequence {} names unknown account {}",
                        event.seq, event.account
                    ));
                }
            };
            if after != Some(event.balance_after) {
                return Err(format!(
                    "event at sequence {} says balance {} but applying it gives {:?}",
                    event.seq, event.balance_after, after
                ));
            }
            if event.kind == EventKind::Deposited
                && self
                    .totals_of(event.currency)
                    .outstanding
                    .checked_add(event.amount)
                    .is_none()
            {
                return Err(format!(
                    "deposit at sequence {} overflows the currency total",
                    event.seq
                ));
            }
            pending[i] = (event.account, event.currency, event.balance_after);
        }
        if record.command_type == CommandType::Transfer && record.is_committed() {
            let [debit, credit] = record.events;
            if record.event_count != 2
                || debit.kind != EventKind::Debited
                || credit.kind != EventKind::Credited
                || debit.amount != credit.amount
                || debit.currency != credit.currency
                || debit.account == credit.account
            {
                return Err(format!(
                    "transfer at sequence {} is not one debit and one credit of the same amount",
                    record.first_seq
                ));
            }
        }
        Ok(())
    }

    /// Checks that `record` has a shape `execute` (or `checkpoint`) can produce: the events its
    /// command type and outcome call for and no others, in sequence, with real currencies and
    /// amounts within the limits. Without it a corrupt or forged record could carry, say, a
    /// deposit's type with a debit and a large credit (money in no currency total), or two
    /// openings, and `apply` would accept or panic on it.
    fn verify_shape(&self, record: &CommandRecord) -> Result<(), String> {
        let events = record.events();
        let at = record.first_seq;
        let bad = |what: &str| Err(format!("record at sequence {at}: {what}"));
        for (i, event) in events.iter().enumerate() {
            if event.seq != at + i as u64 {
                return bad("its events are not numbered from its sequence");
            }
        }
        let mut kind_array = [EventKind::Rejected; MAX_EVENTS_PER_COMMAND];
        for (kind, event) in kind_array.iter_mut().zip(events) {
            *kind = event.kind;
        }
        let kinds = &kind_array[..events.len()];
        // Only a committed opening names an account (the format's `opened_name_len` is 0 in
        // every other record).
        let opening = record.command_type == CommandType::OpenAccount && record.rejection.is_none();
        if !opening && !record.opened_account.is_empty() {
            return bad("only a committed opening names an account");
        }
        let money = |event: &Event| {
            event.currency != Currency::NONE
                && event.amount >= 1
                && event.amount <= self.config.max_amount
        };
        let empty = |event: &Event| {
            event.currency == Currency::NONE && event.amount == 0 && event.balance_after == 0
        };
        match (record.command_type, record.rejection) {
            (CommandType::Checkpoint, None) => {
                if kinds != [EventKind::Checkpoint] {
                    return bad("a checkpoint is one checkpoint event");
                }
            }
            (CommandType::Checkpoint, Some(_)) => return bad("a checkpoint is never rejected"),
            (_, Some(_)) => {
                if kinds != [EventKind::Rejected] || !empty(&events[0]) {
                    return bad("a rejection is one empty rejected event");
                }
            }
            (CommandType::OpenAccount, None) => {
                let name = record.opened_account;
                if kinds != [EventKind::AccountOpened]
                    || !empty(&events[0])
                    || name.is_empty()
                    || AccountId::from_bytes(name.as_bytes()).is_err()
                {
                    return bad("an opening is one account-opened event with a valid account id");
                }
                if name.as_bytes().len() > INLINE_NAME && self.long_names.len() > u32::MAX as usize
                {
                    return bad("the account name arena is full");
                }
            }
            (CommandType::Deposit, None) => {
                if kinds != [EventKind::Deposited] || !money(&events[0]) {
                    return bad("a deposit is one deposited event of a valid amount");
                }
            }
            (CommandType::Withdraw, None) => {
                if kinds != [EventKind::Withdrawn] || !money(&events[0]) {
                    return bad("a withdrawal is one withdrawn event of a valid amount");
                }
            }
            (CommandType::Transfer, None) => {
                if kinds != [EventKind::Debited, EventKind::Credited] || !money(&events[0]) {
                    return bad("a transfer is one debit and one credit of a valid amount");
                }
            }
        }
        Ok(())
    }

    /// Applies a record's events, as produced by `execute` or read back from the journal.
    ///
    /// Panics if the record does not fit the state (a wrong sequence, an unknown account, a
    /// balance that disagrees with `balance_after`): replaying a journal that does not describe
    /// this ledger is a bug or corruption, and limping on would invent or lose money.
    pub fn apply(&mut self, record: &CommandRecord) {
        assert!(!record.replayed, "a replayed outcome is not applied");
        assert_eq!(record.first_seq, self.next_seq, "record out of sequence");
        for (i, event) in record.events().iter().enumerate() {
            assert_eq!(
                event.seq,
                record.first_seq + i as u64,
                "event sequence inside record"
            );
            match event.kind {
                EventKind::AccountOpened => {
                    assert_eq!(
                        event.account as usize,
                        self.accounts.len(),
                        "account index is dense"
                    );
                    self.intern(record.opened_account);
                }
                EventKind::Deposited | EventKind::Credited => {
                    let after =
                        self.adjust_balance(event.account, event.currency, event.amount, true);
                    assert_eq!(after, event.balance_after, "credit balance_after");
                    if event.kind == EventKind::Deposited {
                        let totals = self.totals_entry(event.currency);
                        totals.deposited = totals
                            .deposited
                            .checked_add(u128::from(event.amount))
                            .expect("deposited overflow");
                        totals.outstanding = totals
                            .outstanding
                            .checked_add(event.amount)
                            .expect("outstanding overflow");
                    }
                }
                EventKind::Withdrawn | EventKind::Debited => {
                    let after =
                        self.adjust_balance(event.account, event.currency, event.amount, false);
                    assert_eq!(after, event.balance_after, "debit balance_after");
                    if event.kind == EventKind::Withdrawn {
                        let totals = self.totals_entry(event.currency);
                        totals.withdrawn = totals
                            .withdrawn
                            .checked_add(u128::from(event.amount))
                            .expect("withdrawn overflow");
                        totals.outstanding = totals
                            .outstanding
                            .checked_sub(event.amount)
                            .expect("outstanding underflow");
                    }
                }
                EventKind::Rejected | EventKind::Checkpoint => {}
            }
        }
        self.next_seq = record.next_seq();
        if record.command_type != CommandType::Checkpoint {
            let code = record.rejection.map(|c| c as u8).unwrap_or(0);
            self.remember(
                record.transaction_id,
                record.fingerprint,
                record.first_seq,
                code,
            );
        }
    }

    fn intern(&mut self, account: AccountId) {
        let name = account.as_bytes();
        let index = self.accounts.len() as u32;
        let mut slot = AccountSlot {
            balance: 0,
            next_extra: NO_EXTRA,
            name_tail: 0,
            currency: Currency::NONE,
            name_len: name.len() as u8,
            name_head: [0; INLINE_NAME],
        };
        let head = name.len().min(INLINE_NAME);
        slot.name_head[..head].copy_from_slice(&name[..head]);
        if name.len() > INLINE_NAME {
            slot.name_tail =
                u32::try_from(self.long_names.len()).expect("account name arena over 4 GiB");
            self.long_names.extend_from_slice(&name[INLINE_NAME..]);
        }
        self.accounts.push(slot);
        self.name_index.insert(account.hash64(), index);
        self.digests.names = name_digest(self.digests.names, &account);
    }

    fn totals_entry(&mut self, currency: Currency) -> &mut CurrencyTotals {
        let position = match self.totals.iter().position(|(c, _)| *c == currency) {
            Some(p) => p,
            None => {
                self.totals.push((currency, CurrencyTotals::default()));
                self.totals.len() - 1
            }
        };
        &mut self.totals[position].1
    }

    /// Adds or subtracts; a balance appears (at zero) on its first use. Returns the new balance.
    fn adjust_balance(
        &mut self,
        account: u32,
        currency: Currency,
        amount: MinorUnits,
        credit: bool,
    ) -> MinorUnits {
        let (created, balance) = self.balance_entry(account, currency);
        let before = *balance;
        let after = if credit {
            before
                .checked_add(amount)
                .expect("balance overflow passed validation")
        } else {
            before
                .checked_sub(amount)
                .expect("negative balance passed validation")
        };
        *balance = after;
        let digest = &mut self.digests.balances;
        if !created {
            *digest = digest.wrapping_sub(balance_term(account, currency, before));
        }
        *digest = digest.wrapping_add(balance_term(account, currency, after));
        after
    }

    /// The balance entry of `account` in `currency`, created at zero if missing (and then
    /// `true`).
    fn balance_entry(&mut self, account: u32, currency: Currency) -> (bool, &mut MinorUnits) {
        let (first, mut link) = {
            let slot = &self.accounts[account as usize];
            (slot.currency, slot.next_extra)
        };
        if first == currency || first == Currency::NONE {
            let slot = &mut self.accounts[account as usize];
            slot.currency = currency;
            return (first == Currency::NONE, &mut slot.balance);
        }
        let mut last: Option<u32> = None;
        while link != NO_EXTRA {
            if self.extras[link as usize].currency == currency {
                return (false, &mut self.extras[link as usize].balance);
            }
            last = Some(link);
            link = self.extras[link as usize].next_extra;
        }
        // `NO_EXTRA` (u32::MAX) ends the lists: an entry there would be unreachable. (Each
        // extra balance takes a new transaction id, and the id limit stays below that.)
        let new = u32::try_from(self.extras.len())
            .ok()
            .filter(|n| *n != NO_EXTRA)
            .expect("too many extra balances");
        self.extras.push(ExtraBalance {
            balance: 0,
            currency,
            next_extra: NO_EXTRA,
        });
        match last {
            Some(l) => self.extras[l as usize].next_extra = new,
            None => self.accounts[account as usize].next_extra = new,
        }
        (true, &mut self.extras[new as usize].balance)
    }

    fn remember(&mut self, id: TransactionId, fingerprint: u64, first_seq: u64, code: u8) {
        // Already remembered: only `transaction_id_reused` rejections reach here, and the
        // original stays remembered.
        self.remember_entry::<true>(
            id.0,
            self.hash_id(id.0),
            fingerprint,
            (first_seq << 8) | u64::from(code),
        );
    }

    /// `remember_entry` without the running digest, for a snapshot whose ids' digest is
    /// computed separately (`codec::check_snapshot`) and set with `restore_ids_digest`. Snapshot
    /// loading passes the `hash_id` it computed for its prefetch.
    pub(crate) fn restore_remembered(
        &mut self,
        id: u128,
        hash: u64,
        fingerprint: u64,
        seq_and_code: u64,
    ) -> bool {
        self.remember_entry::<false>(id, hash, fingerprint, seq_and_code)
    }

    /// Sets the remembered ids' running digest after `restore_remembered`.
    pub(crate) fn restore_ids_digest(&mut self, digest: u64) {
        self.digests.ids = digest;
    }

    /// Remembers `id` unless it already is (then false, and nothing changes), with one probe of
    /// the id table. The only writer of remembered ids, live (`remember`) and from snapshots
    /// (`restore_remembered`).
    #[inline]
    fn remember_entry<const DIGEST: bool>(
        &mut self,
        id: u128,
        hash: u64,
        fingerprint: u64,
        seq_and_code: u64,
    ) -> bool {
        // At most 2^32 - 1 ids: the id table stops at its last index (`table::check_index`).
        let index = self.id_count;
        let chunks = &self.id_chunks;
        let existing = self.id_index.insert_unique(hash, index, |i| {
            chunks[i as usize / ID_CHUNK][i as usize % ID_CHUNK].id() == id
        });
        if existing.is_some() {
            return false;
        }
        let chunk = index as usize / ID_CHUNK;
        if chunk == self.id_chunks.len() {
            self.id_chunks.push(Vec::with_capacity(ID_CHUNK));
        }
        let remembered = RememberedId {
            id_low: id as u64,
            id_high: (id >> 64) as u64,
            fingerprint,
            seq_and_code,
        };
        let block = &mut self.id_chunks[chunk];
        if block.len() == block.capacity() {
            // A cloned ledger's blocks have capacity == length: grow to a whole block once
            // rather than by doubling.
            block.reserve_exact(ID_CHUNK - block.len());
        }
        block.push(remembered);
        if DIGEST {
            self.digests.ids = id_digest(self.digests.ids, &remembered);
        }
        self.id_count += 1;
        true
    }

    /// A hash of the whole state: sequence, account ids in index order, every balance entry
    /// (account, currency, balance), totals sorted by currency, remembered ids in the order they
    /// were first seen. Independent of hash-table layout and iteration order. O(currencies):
    /// the per-entry parts are the running `Digests`.
    pub fn state_hash(&self) -> u64 {
        let mut bytes = Vec::with_capacity(96 + 34 * self.totals.len());
        bytes.extend_from_slice(b"wallet-state-v2");
        for word in [
            self.next_seq,
            self.accounts.len() as u64,
            self.digests.names,
            self.digests.balances,
            u64::from(self.id_count),
            self.digests.ids,
        ] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        for (currency, totals) in self.totals() {
            bytes.extend_from_slice(&currency.packed().to_le_bytes());
            bytes.extend_from_slice(&totals.deposited.to_le_bytes());
            bytes.extend_from_slice(&totals.withdrawn.to_le_bytes());
        }
        xxh3_64(&bytes)
    }

    /// The digests recomputed from the tables, for `check_invariants`.
    fn recompute_digests(&self) -> Digests {
        let mut digests = Digests::default();
        for (index, slot) in self.accounts.iter().enumerate() {
            digests.names = name_digest(digests.names, &slot.name(&self.long_names));
            for (currency, balance) in self.balances(index as u32) {
                digests.balances =
                    digests
                        .balances
                        .wrapping_add(balance_term(index as u32, currency, balance));
            }
        }
        for chunk in &self.id_chunks {
            for r in chunk {
                digests.ids = id_digest(digests.ids, r);
            }
        }
        digests
    }

    /// Whether an `IdBlock` given now would be used soon: the ids remembered so far are within
    /// half a block of filling every block the ledger has.
    pub fn wants_id_block(&self) -> bool {
        self.id_chunks.len() * ID_CHUNK < self.id_count as usize + ID_CHUNK / 2
    }

    /// The size of the id table's next growth, once a prepared array would help: see
    /// `IndexTable::spare_wanted`.
    pub fn id_table_spare_wanted(&self) -> Option<usize> {
        self.id_index.spare_wanted()
    }

    /// Hands in a prepared array for the id table's next growth (one of another size comes
    /// back).
    pub fn give_id_table_spare(
        &mut self,
        spare: crate::core::table::SpareBuckets,
    ) -> Result<(), crate::core::table::SpareBuckets> {
        self.id_index.give_spare(spare)
    }

    /// The id table's old array after a growth that used a given spare, to be freed elsewhere.
    pub fn take_retired_id_table(&mut self) -> Option<crate::core::table::RetiredBuckets> {
        self.id_index.take_retired()
    }

    /// Frees the empty id blocks reserved by `with_capacity` (untouched memory), so that later
    /// blocks come as they are needed, from `add_id_block` or allocated by the ledger: as in a
    /// server whose ledger was sized for its history and then takes new transfers.
    pub fn release_spare_id_blocks(&mut self) {
        while self.id_chunks.last().is_some_and(|block| block.is_empty()) {
            self.id_chunks.pop();
        }
    }

    /// Adds an empty block after the last one; ids fill it when the blocks before it are full.
    pub fn add_id_block(&mut self, block: IdBlock) {
        // (A cloned ledger's last block may hold fewer than `ID_CHUNK` ids with no room for
        // more: `remember_entry` gives it its whole block when it fills, before this one.)
        assert!(block.0.is_empty() && block.0.capacity() >= ID_CHUNK);
        self.id_chunks.push(block.0);
    }

    /// The address and length of each block reserved for remembered ids and not yet filled,
    /// in the order they will be filled. A caller that restores many ids (a snapshot load) can
    /// have another thread populate these pages while this one fills them: the first touch of
    /// fresh memory (the kernel zeroing it) is most of a large restore's cost.
    pub fn reserved_id_memory(&self) -> Vec<(usize, usize)> {
        crate::core::table::spare_ranges(&self.id_chunks).collect()
    }

    /// The address and length of the remembered ids' index table. Like `reserved_id_memory`,
    /// for a restore that has its pages populated by another thread: a new table is zeroed
    /// memory that the kernel provides on first touch, and a restore touches all of it.
    pub fn id_table_memory(&self) -> (usize, usize) {
        self.id_index.bucket_memory()
    }

    /// Whether `more` further transaction ids can be remembered without moving the id table
    /// (which grows by reallocating). A caller that has another thread populate
    /// `id_table_memory` stops that thread before this turns false.
    pub fn ids_fit(&self, more: usize) -> bool {
        self.id_index.fits(self.id_count as usize + more)
    }

    /// Bytes held by the ledger's tables (capacity, not just length), split by owner.
    pub fn memory_usage(&self) -> MemoryUsage {
        let account_bytes = self.long_names.capacity() as u64
            + self.name_index.allocated_bytes() as u64
            + (self.accounts.capacity() * size_of::<AccountSlot>()) as u64
            + (self.extras.capacity() * size_of::<ExtraBalance>()) as u64;
        let transaction_id_bytes = self.id_index.allocated_bytes() as u64
            + self
                .id_chunks
                .iter()
                .map(|c| (c.capacity() * size_of::<RememberedId>()) as u64)
                .sum::<u64>()
            + (self.id_chunks.capacity() * size_of::<Vec<RememberedId>>()) as u64;
        MemoryUsage {
            account_bytes,
            transaction_id_bytes,
        }
    }

    /// Checks the ledger's invariants over the whole state: the running digests equal digests
    /// recomputed from the tables, and per currency, the sum of balances equals deposits minus
    /// withdrawals. (Balances are unsigned, so none is negative.)
    pub fn check_invariants(&self) -> Result<(), String> {
        let recomputed = self.recompute_digests();
        if recomputed != self.digests {
            return Err(format!(
                "running state digests {:?} disagree with the tables {recomputed:?}",
                self.digests
            ));
        }
        self.check_conservation()
    }

    /// The money invariants alone: per currency, the sum of balances equals deposited minus
    /// withdrawn and equals `outstanding`, and no currency has balances without deposits.
    /// (Snapshot loading checks these but not the digests: it has just built the running
    /// digests from the same entries, through the same mutators, and compares the resulting
    /// state hash with the one the snapshot claims.)
    pub fn check_conservation(&self) -> Result<(), String> {
        let mut sums: Vec<(Currency, u128)> = Vec::new();
        for index in 0..self.accounts.len() as u32 {
            for (currency, balance) in self.balances(index) {
                match sums.iter_mut().find(|(c, _)| *c == currency) {
                    Some((_, s)) => *s += u128::from(balance),
                    None => sums.push((currency, u128::from(balance))),
                }
            }
        }
        for (currency, totals) in self.totals() {
            let sum = sums
                .iter()
                .find(|(c, _)| *c == currency)
                .map(|(_, s)| *s)
                .unwrap_or(0);
            if totals.deposited < totals.withdrawn || sum != totals.deposited - totals.withdrawn {
                return Err(format!(
                    "{currency}: sum of balances {sum} != deposited {} - withdrawn {}",
                    totals.deposited, totals.withdrawn
                ));
            }
            if u128::from(totals.outstanding) != sum {
                return Err(format!(
                    "{currency}: outstanding {} != sum of balances {sum}",
                    totals.outstanding
                ));
            }
        }
        for (currency, sum) in &sums {
            if *sum != 0 && !self.totals.iter().any(|(c, _)| c == currency) {
                return Err(format!("{currency}: balances without deposits"));
            }
        }
        Ok(())
    }

    /// Visits every remembered id in first-seen order (for snapshots).
    pub(crate) fn for_each_remembered(&self, mut visit: impl FnMut(u128, u64, u64)) {
        for chunk in &self.id_chunks {
            for r in chunk {
                visit(r.id(), r.fingerprint, r.seq_and_code);
            }
        }
    }

    pub(crate) fn restore_account(
        &mut self,
        account: AccountId,
        balances: &[(Currency, MinorUnits)],
    ) {
        let index = self.accounts.len() as u32;
        self.intern(account);
        for (currency, balance) in balances {
            if *balance > 0 {
                self.adjust_balance(index, *currency, *balance, true);
            } else {
                // A balance that exists at zero must exist after restore too (the hash sees it).
                self.adjust_balance(index, *currency, 0, true);
            }
        }
    }

    pub(crate) fn restore_totals(&mut self, currency: Currency, totals: CurrencyTotals) {
        *self.totals_entry(currency) = totals;
    }

    pub(crate) fn restore_next_seq(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Command, CommandKind, TransactionId};

    /// Two ids of one length that share their inline head differ only in the side arena: the
    /// name check must compare the tails (lookups reach it only when two ids' 32-bit hash tags
    /// collide, which no random test makes happen).
    #[test]
    fn a_long_name_is_told_apart_by_its_tail() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let names = [
            "customer:0000000001",
            "customer:0000000002",
            "customer:00000000010",
        ];
        for (i, name) in names.iter().enumerate() {
            let record = ledger.execute(&Command {
                transaction_id: TransactionId(i as u128 + 1),
                timestamp_ns: 1,
                kind: CommandKind::OpenAccount {
                    account: AccountId::new(name).unwrap(),
                },
            });
            assert!(record.rejection.is_none(), "{name}");
        }
        for (i, slot) in ledger.accounts.iter().enumerate() {
            for (j, name) in names.iter().enumerate() {
                let id = AccountId::new(name).unwrap();
                assert_eq!(slot.has_name(&id, &ledger.long_names), i == j, "{i} {name}");
            }
            assert_eq!(slot.name(&ledger.long_names).as_str(), names[i]);
        }
        let short = AccountId::new("customer:000").unwrap();
        assert!(!ledger.accounts[0].has_name(&short, &ledger.long_names));
    }
}
