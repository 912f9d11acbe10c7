//! The binary codec of command records (the journal's payload) and of ledger snapshots.
//!
//! Pure functions over byte slices; the journal owns files and framing. Every layout here is
//! described byte by byte in `docs/journal-format.md`. All integers are little-endian; no
//! `usize` is ever written. Decoders take hostile bytes: they return errors, never panic.

use crate::core::command::{
    CommandRecord, CommandType, Event, EventKind, MAX_EVENTS_PER_COMMAND, RejectCode,
};
use crate::core::ledger::{CurrencyTotals, Ledger, LedgerConfig, id_entry_digest};
use crate::core::types::{AccountId, Currency, TransactionId};

/// Size of the per-command header at the start of a record payload.
pub const COMMAND_HEADER_BYTES: usize = 40;
/// Size of one encoded event.
pub const EVENT_BYTES: usize = 24;

/// Decoded-layout mirrors, used only for their compile-time size checks: they pin the sizes that
/// the documentation promises.
#[repr(C)]
struct CommandHeaderLayout {
    transaction_id: [u8; 16],
    timestamp_ns: u64,
    fingerprint: u64,
    command_type: u8,
    rejection_code: u8,
    event_count: u8,
    opened_name_len: u8,
    reserved: [u8; 4],
}
const _: () = assert!(size_of::<CommandHeaderLayout>() == COMMAND_HEADER_BYTES);

#[repr(C)]
struct EventLayout {
    account: u32,
    currency: u16,
    kind: u8,
    reserved: u8,
    amount: u64,
    balance_after: u64,
}
const _: () = assert!(size_of::<EventLayout>() == EVENT_BYTES);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload too short: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown command type {0}")]
    CommandType(u8),
    #[error("unknown rejection code {0}")]
    RejectionCode(u8),
    #[error("event count {0} is out of range")]
    EventCount(u8),
    #[error("unknown event kind {0}")]
    EventKind(u8),
    #[error("bad currency {0:#06x}")]
    Currency(u16),
    #[error("bad account id in record")]
    AccountId,
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("sequence {0} is out of range")]
    Sequence(u64),
    #[error("snapshot: {0}")]
    Snapshot(&'static str),
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Bytes the payload of `record` takes (a multiple of 8).
pub fn payload_len(record: &CommandRecord) -> usize {
    COMMAND_HEADER_BYTES
        + EVENT_BYTES * record.event_count as usize
        + padded(record.opened_account.as_bytes().len())
}

/// Writes the payload of `record` into the front of `out` and returns its length.
/// `out` must hold at least `payload_len(record)` bytes.
pub fn encode_record(record: &CommandRecord, out: &mut [u8]) -> usize {
    let len = payload_len(record);
    let out = &mut out[..len];
    out.fill(0);
    out[0..16].copy_from_slice(&record.transaction_id.0.to_le_bytes());
    out[16..24].copy_from_slice(&record.timestamp_ns.to_le_bytes());
    out[24..32].copy_from_slice(&record.fingerprint.to_le_bytes());
    out[32] = record.command_type as u8;
    out[33] = record.rejection.map(|c| c as u8).unwrap_or(0);
    out[34] = record.event_count;
    let name = record.opened_account.as_bytes();
    out[35] = name.len() as u8;
    let mut at = COMMAND_HEADER_BYTES;
    for event in record.events() {
        let e = &mut out[at..at + EVENT_BYTES];
        e[0..4].copy_from_slice(&event.account.to_le_bytes());
        e[4..6].copy_from_slice(&event.currency.packed().to_le_bytes());
        e[6] = event.kind as u8;
        e[8..16].copy_from_slice(&event.amount.to_le_bytes());
        e[16..24].copy_from_slice(&event.balance_after.to_le_bytes());
        at += EVENT_BYTES;
    }
    out[at..at + name.len()].copy_from_slice(name);
    len
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a payload written by `encode_record`; `first_seq` comes from the frame.
pub fn decode_record(first_seq: u64, payload: &[u8]) -> Result<CommandRecord, DecodeError> {
    if payload.len() < COMMAND_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            need: COMMAND_HEADER_BYTES,
            have: payload.len(),
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&payload[0..16]);
    let command_type =
        CommandType::from_u8(payload[32]).ok_or(DecodeError::CommandType(payload[32]))?;
    let rejection = match payload[33] {
        0 => None,
        c => Some(RejectCode::from_u8(c).ok_or(DecodeError::RejectionCode(c))?),
    };
    let event_count = payload[34];
    if event_count == 0 || event_count as usize > MAX_EVENTS_PER_COMMAND {
        return Err(DecodeError::EventCount(event_count));
    }
    // Sequence numbers of every event, and the one after the record, must exist.
    if first_seq == 0 || first_seq.checked_add(u64::from(event_count)).is_none() {
        return Err(DecodeError::Sequence(first_seq));
    }
    if payload[36..40] != [0; 4] {
        return Err(DecodeError::Reserved);
    }
    let name_len = payload[35] as usize;
    let need = COMMAND_HEADER_BYTES + EVENT_BYTES * event_count as usize + padded(name_len);
    if payload.len() != need {
        return Err(DecodeError::Truncated {
            need,
            have: payload.len(),
        });
    }
    let mut record = CommandRecord::empty();
    record.transaction_id = TransactionId(u128::from_le_bytes(id));
    record.timestamp_ns = u64_at(payload, 16);
    record.fingerprint = u64_at(payload, 24);
    record.command_type = command_type;
    record.rejection = rejection;
    record.first_seq = first_seq;
    record.event_count = event_count;
    let mut at = COMMAND_HEADER_BYTES;
    for i in 0..event_count as usize {
        let e = &payload[at..at + EVENT_BYTES];
        let kind = EventKind::from_u8(e[6]).ok_or(DecodeError::EventKind(e[6]))?;
        if e[7] != 0 {
            return Err(DecodeError::Reserved);
        }
        let packed = u16::from_le_bytes([e[4], e[5]]);
        let currency = if packed == Currency::NONE.packed() {
            Currency::NONE
        } else {
            Currency::from_packed(packed).ok_or(DecodeError::Currency(packed))?
        };
        record.events[i] = Event {
            seq: first_seq + i as u64,
            kind,
            account: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            currency,
            amount: u64_at(e, 8),
            balance_after: u64_at(e, 16),
        };
        at += EVENT_BYTES;
    }
    if name_len > 0 {
        record.opened_account = AccountId::from_bytes(&payload[at..at + name_len])
            .map_err(|_| DecodeError::AccountId)?;
        if payload[at + name_len..].iter().any(|b| *b != 0) {
            return Err(DecodeError::Reserved);
        }
    }
    Ok(record)
}

/// Snapshot magic, first 8 bytes of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"WALSNAP1";
pub const SNAPSHOT_HEADER_BYTES: usize = 64;
/// Version 2: fingerprints from cached account-id hashes and the digest-based state hash.
pub const SNAPSHOT_VERSION: u16 = 2;

/// Header flag: `chain` holds the journal's chain value at the snapshot's sequence.
const SNAPSHOT_FLAG_CHAINED: u16 = 1;

#[repr(C)]
struct SnapshotHeaderLayout {
    magic: [u8; 8],
    version: u16,
    /// The frame checksum of the journal record that ends right before `next_seq` (what the
    /// record at `next_seq` chains to; 0 at sequence 1), valid with `SNAPSHOT_FLAG_CHAINED`.
    /// Little-endian u32 (bytes, so that the layout has no padding before it).
    chain: [u8; 4],
    /// Little-endian u16.
    flags: [u8; 2],
    next_seq: u64,
    state_hash: u64,
    max_amount: u64,
    account_count: u64,
    remembered_count: u64,
    totals_count: u64,
}
const _: () = assert!(size_of::<SnapshotHeaderLayout>() == SNAPSHOT_HEADER_BYTES);

/// Serializes the whole ledger. The last 4 bytes are the CRC32C of everything before them.
/// `chain` is the journal's chain value at the ledger's next sequence (the frame checksum of
/// the record before it), which ties the snapshot to the journal it was taken from; `None`
/// when it is not known (start-up cannot then tell a snapshot of another history).
pub fn encode_snapshot(ledger: &Ledger, chain: Option<u32>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_snapshot_into(ledger, chain, &mut out);
    out
}

/// The journal chain value a snapshot was written at (see `encode_snapshot`), if it names one.
/// Reads only the header: verify the snapshot before trusting it.
pub fn snapshot_chain(bytes: &[u8]) -> Option<u32> {
    let header = bytes.get(..SNAPSHOT_HEADER_BYTES)?;
    let flags = u16::from_le_bytes([header[14], header[15]]);
    (flags & SNAPSHOT_FLAG_CHAINED != 0)
        .then(|| u32::from_le_bytes([header[10], header[11], header[12], header[13]]))
}

/// `encode_snapshot` into a buffer the caller keeps (cleared first): a periodic snapshot of
/// hundreds of megabytes then reuses memory that is already mapped instead of faulting in (and
/// zeroing) a new buffer each time.
pub fn encode_snapshot_into(ledger: &Ledger, chain: Option<u32>, out: &mut Vec<u8>) {
    let totals = ledger.totals();
    out.clear();
    out.reserve(
        SNAPSHOT_HEADER_BYTES
            + ledger.account_count() as usize * 32
            + ledger.transaction_id_count() as usize * 32,
    );
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&chain.unwrap_or(0).to_le_bytes());
    let flags = if chain.is_some() {
        SNAPSHOT_FLAG_CHAINED
    } else {
        0
    };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&ledger.next_seq().to_le_bytes());
    out.extend_from_slice(&ledger.state_hash().to_le_bytes());
    out.extend_from_slice(&ledger.config().max_amount.to_le_bytes());
    out.extend_from_slice(&u64::from(ledger.account_count()).to_le_bytes());
    out.extend_from_slice(&u64::from(ledger.transaction_id_count()).to_le_bytes());
    out.extend_from_slice(&(totals.len() as u64).to_le_bytes());
    for index in 0..ledger.account_count() {
        let account = ledger.account_name(index).unwrap_or(AccountId::EMPTY);
        let name = account.as_bytes();
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        let balances = ledger.balances(index);
        out.push(balances.len() as u8);
        for (currency, balance) in balances {
            // `SnapshotBalanceEntryLayout`.
            let mut entry = [0u8; SNAPSHOT_BALANCE_ENTRY];
            entry[0..2].copy_from_slice(&currency.packed().to_le_bytes());
            entry[2..10].copy_from_slice(&balance.to_le_bytes());
            out.extend_from_slice(&entry);
        }
    }
    for (currency, t) in totals {
        out.extend_from_slice(&currency.packed().to_le_bytes());
        out.extend_from_slice(&t.deposited.to_le_bytes());
        out.extend_from_slice(&t.withdrawn.to_le_bytes());
        out.extend_from_slice(&t.outstanding.to_le_bytes());
    }
    ledger.for_each_remembered(|id, fingerprint, seq_and_code| {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&seq_and_code.to_le_bytes());
    });
    let crc = crc32c::crc32c(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                need: self.at.saturating_add(n),
                have: self.bytes.len(),
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }
}

/// Rebuilds a ledger from a snapshot, verifying the checksum, the structure and, last, that the
/// rebuilt state has the state hash the snapshot claims. Callers with a second core run the
/// ids' digest beside `DecodedSnapshot::decode` instead.
pub fn decode_snapshot(bytes: &[u8], config: LedgerConfig) -> Result<Ledger, DecodeError> {
    let (mut decoded, checksummed) = prepare_snapshot(bytes, config)?;
    let checks = checksummed.digest_ids()?;
    decoded.decode(bytes)?;
    decoded.finish(checks)
}

/// What `check_snapshot` proves about a snapshot's bytes, for `DecodedSnapshot::finish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotChecks {
    /// The running digest of the remembered ids (the ledger's `Digests::ids`), chained over the
    /// entries in the order they were written.
    ids_digest: u64,
}

/// A ledger decoded from a snapshot's structure, not yet trusted: its checksum and its state
/// hash are checked by `finish`.
pub struct DecodedSnapshot {
    ledger: Ledger,
    claimed_state_hash: u64,
}

impl DecodedSnapshot {
    /// Completes the ledger with the digest `check_snapshot` computed and returns it only if
    /// its state hash is the one the snapshot claims and the money invariants hold.
    pub fn finish(mut self, checks: SnapshotChecks) -> Result<Ledger, DecodeError> {
        self.ledger.restore_ids_digest(checks.ids_digest);
        if self.ledger.state_hash() != self.claimed_state_hash {
            return Err(DecodeError::Snapshot(
                "state hash of the rebuilt ledger differs",
            ));
        }
        self.ledger
            .check_conservation()
            .map_err(|_| DecodeError::Snapshot("invariants do not hold"))?;
        Ok(self.ledger)
    }
}

const SNAPSHOT_ID_ENTRY: usize = 32;
/// One per-currency totals entry of a snapshot body (all little-endian, no padding).
const SNAPSHOT_TOTALS_ENTRY: usize = 42;

/// A remembered id in a snapshot body (`SNAPSHOT_ID_ENTRY` bytes; docs/journal-format.md).
#[repr(C)]
struct SnapshotIdEntryLayout {
    id: [u8; 16],
    fingerprint: [u8; 8],
    seq_and_code: [u8; 8],
}
const _: () = assert!(size_of::<SnapshotIdEntryLayout>() == SNAPSHOT_ID_ENTRY);

/// A currency's totals in a snapshot body (`SNAPSHOT_TOTALS_ENTRY` bytes).
#[repr(C)]
struct SnapshotTotalsEntryLayout {
    currency: [u8; 2],
    deposited: [u8; 16],
    withdrawn: [u8; 16],
    outstanding: [u8; 8],
}
const _: () = assert!(size_of::<SnapshotTotalsEntryLayout>() == SNAPSHOT_TOTALS_ENTRY);

/// One balance of an account in a snapshot body (`SNAPSHOT_BALANCE_ENTRY` bytes, after the
/// account's name and its balance count).
#[repr(C)]
struct SnapshotBalanceEntryLayout {
    currency: [u8; 2],
    balance: [u8; 8],
}
/// One balance entry of a snapshot body (all little-endian, no padding).
const SNAPSHOT_BALANCE_ENTRY: usize = 10;
const _: () = assert!(size_of::<SnapshotBalanceEntryLayout>() == SNAPSHOT_BALANCE_ENTRY);

/// The checksum of a snapshot and the digest of its remembered ids: the two passes over the
/// whole file that do not need the decoded ledger. Fails on a checksum mismatch.
pub fn check_snapshot(bytes: &[u8]) -> Result<SnapshotChecks, DecodeError> {
    verify_snapshot_checksum(bytes)?.digest_ids()
}

/// A snapshot whose checksum holds (the only way to get one is `verify_snapshot_checksum`).
#[derive(Clone, Copy)]
pub struct ChecksummedSnapshot<'a> {
    body: &'a [u8],
}

/// Verifies a snapshot's CRC32C; the first half of `check_snapshot`.
pub fn verify_snapshot_checksum(bytes: &[u8]) -> Result<ChecksummedSnapshot<'_>, DecodeError> {
    let body = snapshot_body(bytes)?;
    if crc32c::crc32c(body).to_le_bytes() != bytes[body.len()..] {
        return Err(DecodeError::Snapshot("checksum mismatch"));
    }
    Ok(ChecksummedSnapshot { body })
}

impl ChecksummedSnapshot<'_> {
    /// The remembered ids' digest; the second half of `check_snapshot`.
    pub fn digest_ids(self) -> Result<SnapshotChecks, DecodeError> {
        let body = self.body;
        // The entries are the body's last `remembered_count * 32` bytes; the structure decoder
        // checks that they are exactly where the rest of the body ends.
        let count = u64_at(body, 48);
        let entries_len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(SNAPSHOT_ID_ENTRY))
            .filter(|len| *len <= body.len() - SNAPSHOT_HEADER_BYTES)
            .ok_or(DecodeError::Snapshot("counts out of range"))?;
        let entries = &body[body.len() - entries_len..];
        let ids_digest = entries
            .chunks_exact(SNAPSHOT_ID_ENTRY)
            .fold(0, |digest, entry| {
                id_entry_digest(
                    digest,
                    [
                        u64_at(entry, 0),
                        u64_at(entry, 8),
                        u64_at(entry, 16),
                        u64_at(entry, 24),
                    ],
                )
            });
        Ok(SnapshotChecks { ids_digest })
    }
}

struct SnapshotHeader {
    next_seq: u64,
    state_hash: u64,
    account_count: u64,
    remembered_count: u64,
    totals_count: u64,
}

/// Reads and range-checks the header; `r` is left after it.
fn read_snapshot_header(r: &mut Reader<'_>) -> Result<SnapshotHeader, DecodeError> {
    if r.take(8)? != SNAPSHOT_MAGIC {
        return Err(DecodeError::Snapshot("bad magic"));
    }
    if r.u16()? != SNAPSHOT_VERSION {
        return Err(DecodeError::Snapshot("unsupported version"));
    }
    r.take(6)?;
    let next_seq = r.u64()?;
    let state_hash = r.u64()?;
    let _max_amount = r.u64()?;
    let header = SnapshotHeader {
        next_seq,
        state_hash,
        account_count: r.u64()?,
        remembered_count: r.u64()?,
        totals_count: r.u64()?,
    };
    if header.next_seq == 0 || header.next_seq > u64::MAX >> 8 {
        return Err(DecodeError::Snapshot("next sequence out of range"));
    }
    if header.account_count > u64::from(u32::MAX)
        || header.remembered_count > u64::from(u32::MAX)
        || header.totals_count > 4096
    {
        return Err(DecodeError::Snapshot("counts out of range"));
    }
    Ok(header)
}

fn snapshot_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES + 4 {
        return Err(DecodeError::Snapshot("shorter than its header"));
    }
    Ok(&bytes[..bytes.len() - 4])
}

/// An empty ledger sized for the snapshot in `bytes` (from its header, bounded by what the
/// bytes could hold), to be filled by `DecodedSnapshot::decode`, and the snapshot with its
/// checksum verified, for `ChecksummedSnapshot::digest_ids`. In between, a caller can hand
/// `ledger().reserved_id_memory()` to a thread that populates it.
///
/// The checksum is verified first: the header's counts size the ledger's tables, and a corrupt
/// count that still fit the file reserved (and, as real accounts were inserted at random
/// places, touched) many times the memory the snapshot needed, or failed the allocation and
/// aborted the process instead of falling back to an older snapshot or the journal.
pub fn prepare_snapshot(
    bytes: &[u8],
    config: LedgerConfig,
) -> Result<(DecodedSnapshot, ChecksummedSnapshot<'_>), DecodeError> {
    let checksummed = verify_snapshot_checksum(bytes)?;
    let body = checksummed.body;
    let header = read_snapshot_header(&mut Reader { bytes: body, at: 0 })?;
    // A checksum proves the bytes are what was written, not that the writer was sane: the sizes
    // claimed must fit the bytes. Every account takes at least 3 bytes (name length, one name
    // byte, balance count), every total 42, every remembered id 32. A snapshot that claims
    // more is refused before anything is reserved for it.
    let needed = (SNAPSHOT_HEADER_BYTES as u128)
        + u128::from(header.account_count) * 3
        + u128::from(header.totals_count) * SNAPSHOT_TOTALS_ENTRY as u128
        + u128::from(header.remembered_count) * SNAPSHOT_ID_ENTRY as u128;
    if needed > body.len() as u128 {
        return Err(DecodeError::Snapshot("counts larger than the file"));
    }
    let accounts_hint = header.account_count as usize;
    let ids_hint = header.remembered_count as usize;
    Ok((
        DecodedSnapshot {
            ledger: Ledger::with_capacity(config, accounts_hint, ids_hint),
            claimed_state_hash: header.state_hash,
        },
        checksummed,
    ))
}

impl DecodedSnapshot {
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Decodes the snapshot's accounts, totals and remembered ids into the prepared ledger.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let body = snapshot_body(bytes)?;
        let mut r = Reader { bytes: body, at: 0 };
        let SnapshotHeader {
            next_seq,
            state_hash,
            account_count,
            remembered_count,
            totals_count,
        } = read_snapshot_header(&mut r)?;
        if self.ledger.account_count() != 0 || self.ledger.transaction_id_count() != 0 {
            return Err(DecodeError::Snapshot("decoded twice"));
        }
        self.claimed_state_hash = state_hash;
        decode_snapshot_sections(
            &mut r,
            &mut self.ledger,
            next_seq,
            account_count,
            remembered_count,
            totals_count,
        )?;
        self.ledger.restore_next_seq(next_seq);
        Ok(())
    }
}

fn decode_snapshot_sections(
    r: &mut Reader<'_>,
    ledger: &mut Ledger,
    next_seq: u64,
    account_count: u64,
    remembered_count: u64,
    totals_count: u64,
) -> Result<(), DecodeError> {
    let body_len = r.bytes.len();
    let mut balances = Vec::new();
    for _ in 0..account_count {
        let len = r.u8()? as usize;
        let account = AccountId::from_bytes(r.take(len)?).map_err(|_| DecodeError::AccountId)?;
        if ledger.account_index(&account).is_some() {
            return Err(DecodeError::Snapshot("duplicate account"));
        }
        balances.clear();
        for _ in 0..r.u8()? {
            let packed = r.u16()?;
            let currency = Currency::from_packed(packed).ok_or(DecodeError::Currency(packed))?;
            // Restoring a currency twice would add the balances up (and could overflow).
            if balances.iter().any(|(c, _)| *c == currency) {
                return Err(DecodeError::Snapshot("duplicate currency in an account"));
            }
            balances.push((currency, r.u64()?));
        }
        ledger.restore_account(account, &balances);
    }
    let mut totals_seen = Vec::new();
    for _ in 0..totals_count {
        let packed = r.u16()?;
        let currency = Currency::from_packed(packed).ok_or(DecodeError::Currency(packed))?;
        // Restoring a currency's totals twice would keep only the second.
        if totals_seen.contains(&packed) {
            return Err(DecodeError::Snapshot("duplicate currency in the totals"));
        }
        totals_seen.push(packed);
        let deposited = r.u128()?;
        let withdrawn = r.u128()?;
        let outstanding = r.u64()?;
        // At most one deposit (or withdrawal) per record, each a u64: totals past that bound
        // cannot come from this history, and adding to them could overflow.
        let bound = u128::from(next_seq) * u128::from(u64::MAX);
        if deposited > bound || withdrawn > bound {
            return Err(DecodeError::Snapshot("totals out of range"));
        }
        ledger.restore_totals(
            currency,
            CurrencyTotals {
                deposited,
                withdrawn,
                outstanding,
            },
        );
    }
    // Remembered ids: fixed 32-byte entries. Restoring one costs a random access into the id
    // table, so the table bucket of the entry `AHEAD` places on is prefetched (a 50-million-id
    // snapshot otherwise spends most of its load time waiting on those misses one by one).
    const AHEAD: usize = 16;
    let entries_len = (remembered_count as usize)
        .checked_mul(SNAPSHOT_ID_ENTRY)
        .ok_or(DecodeError::Snapshot("counts out of range"))?;
    let entries = r.take(entries_len)?;
    if r.at != body_len {
        return Err(DecodeError::Snapshot("trailing bytes"));
    }
    let id_at = |i: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&entries[i * SNAPSHOT_ID_ENTRY..i * SNAPSHOT_ID_ENTRY + 16]);
        u128::from_le_bytes(a)
    };
    let count = remembered_count as usize;
    // Hashes of the entries between the one being restored and the one being prefetched.
    let mut hashes = [0u64; AHEAD];
    for (i, hash) in hashes.iter_mut().enumerate().take(count) {
        *hash = ledger.hash_id(id_at(i));
        ledger.prefetch_id_hash(*hash);
    }
    for i in 0..count {
        let hash = hashes[i % AHEAD];
        if i + AHEAD < count {
            let ahead = ledger.hash_id(id_at(i + AHEAD));
            ledger.prefetch_id_hash(ahead);
            hashes[i % AHEAD] = ahead;
        }
        let fingerprint = u64_at(entries, i * SNAPSHOT_ID_ENTRY + 16);
        let seq_and_code = u64_at(entries, i * SNAPSHOT_ID_ENTRY + 24);
        // What `execute` remembers: a sequence already taken, and committed (0) or a rejection
        // other than `transaction_id_reused` (which never replaces the id's first outcome). An
        // unknown code would otherwise read as "committed".
        let (seq, code) = (seq_and_code >> 8, (seq_and_code & 0xFF) as u8);
        let outcome_ok = code == 0
            || RejectCode::from_u8(code).is_some_and(|c| c != RejectCode::TransactionIdReused);
        if seq == 0 || seq >= next_seq || !outcome_ok {
            return Err(DecodeError::Snapshot(
                "a remembered id with an impossible sequence or outcome",
            ));
        }
        if !ledger.restore_remembered(id_at(i), hash, fingerprint, seq_and_code) {
            return Err(DecodeError::Snapshot("duplicate transaction id"));
        }
    }
    Ok(())
}

/// The sequence a snapshot was taken at (its `next_seq`), without decoding the rest.
pub fn snapshot_next_seq(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES || bytes[0..8] != SNAPSHOT_MAGIC {
        return None;
    }
    Some(u64_at(bytes, 16))
}
