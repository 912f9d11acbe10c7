//! Where the replicator reads events from: the journal files of a data directory (tailed in
//! place, so the directory may belong to a running `serve`), or a running engine's
//! `GET /v1/wallet/events` NDJSON stream.
//!
//! Both yield the same [`Item`]s in sequence order, one per event, every sequence number once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::core::codec::decode_record;
use crate::core::{Currency, EventKind};
use crate::journal::format::{
    FRAME_HEADER_BYTES, MAX_FRAME_BYTES, SEGMENT_HEADER_BYTES, check_frame, decode_segment_header,
    read_u32,
};
use crate::journal::{journal_dir, list_segments};

/// How an event names its account: the journal uses the dense index, the HTTP stream the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRef {
    Index(u32),
    Name(String),
}

/// One event, reduced to what the Redis projection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An account was opened; `index` is the engine's index when the source knows it.
    Opened {
        seq: u64,
        index: Option<u32>,
        name: String,
    },
    /// A balance changed; `balance` is the balance after the event, in minor units.
    Balance {
        seq: u64,
        account: AccountRef,
        currency: Currency,
        balance: u64,
    },
    /// An event with no effect on balances (a rejection, a checkpoint).
    Other { seq: u64 },
}

impl Item {
    pub fn seq(&self) -> u64 {
        match self {
            Item::Opened { seq, .. } | Item::Balance { seq, .. } | Item::Other { seq } => *seq,
        }
    }
}

/// The replicator's input.
pub enum Source {
    Journal(JournalTail),
    Http(HttpSource),
}

impl Source {
    /// `spec` is a data directory or an `http://host:port` engine URL.
    pub fn open(spec: &str) -> anyhow::Result<Source> {
        if let Some(rest) = spec.strip_prefix("http://") {
            Ok(Source::Http(HttpSource::new(rest)?))
        } else if spec.starts_with("https://") {
            bail!("https sources are not supported; use http:// or a data directory")
        } else {
            Ok(Source::Journal(JournalTail::new(&journal_dir(Path::new(
                spec,
            )))))
        }
    }

    /// Appends up to about `max_events` items with sequence numbers from `next_seq()` on.
    /// Returns without items when the source has nothing new (after waiting up to `wait`).
    pub async fn fetch(
        &mut self,
        max_events: usize,
        wait: Duration,
        out: &mut Vec<Item>,
    ) -> anyhow::Result<()> {
        match self {
            Source::Journal(tail) => {
                tail.fetch(max_events, out)?;
                if out.is_empty() && !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_millis(5))).await;
                }
                Ok(())
            }
            Source::Http(http) => http.fetch(max_events, wait, out).await,
        }
    }

    /// The sequence number of the next event this source will yield.
    pub fn next_seq(&self) -> u64 {
        match self {
            Source::Journal(tail) => tail.next_seq,
            Source::Http(http) => http.next_seq,
        }
    }
}

fn items_of_record(record: &crate::core::CommandRecord, out: &mut Vec<Item>) {
    for event in record.events() {
        let item = match event.kind {
            EventKind::AccountOpened => Item::Opened {
                seq: event.seq,
                index: Some(event.account),
                name: record.opened_account.as_str().to_string(),
            },
            EventKind::Deposited
            | EventKind::Withdrawn
            | EventKind::Debited
            | EventKind::Credited => Item::Balance {
                seq: event.seq,
                account: AccountRef::Index(event.account),
                currency: event.currency,
                balance: event.balance_after,
            },
            EventKind::Rejected | EventKind::Checkpoint => Item::Other { seq: event.seq },
        };
        out.push(item);
    }
}

struct OpenSegment {
    path: PathBuf,
    file: File,
    size: u64,
    /// Byte offset of the next frame.
    offset: u64,
}

/// Follows the journal files of one directory from sequence 1 on, verifying every frame and the
/// checksum chain like `journal::scan`, but reading only the new bytes on each call (positioned
/// reads, no re-scan of the segment).
///
/// Records are read as soon as they are complete in the page cache, which with `--sync batch`
/// can be a moment before the engine's msync returns. A crash of the engine process loses
/// nothing written there; a power loss can, and then the projection may be ahead of the
/// recovered journal (reconcile reports it). Use the HTTP source to replicate durable records
/// only.
pub struct JournalTail {
    dir: PathBuf,
    segment: Option<OpenSegment>,
    next_seq: u64,
    last_crc: u32,
    buffer: Vec<u8>,
    read_size: usize,
    /// When the bytes at the current offset first failed to parse (a write in progress, or
    /// corruption: told apart after a while by `journal::scan`).
    stuck_since: Option<Instant>,
    /// When a new segment's header was first found unwritten.
    header_stuck_since: Option<Instant>,
    /// Records of the last `fetch`, kept to reuse the allocation.
    scratch: Vec<crate::core::CommandRecord>,
}

const MIN_READ_BYTES: usize = 64 << 10;
const MAX_READ_BYTES: usize = 8 << 20;

impl JournalTail {
    pub fn new(dir: &Path) -> JournalTail {
        JournalTail {
            dir: dir.to_path_buf(),
            segment: None,
            next_seq: 1,
            last_crc: 0,
            buffer: Vec::new(),
            read_size: MIN_READ_BYTES,
            stuck_since: None,
            header_stuck_since: None,
            scratch: Vec::new(),
        }
    }

    /// Opens the segment at `path` as the current one. Returns `false` while its header is not
    /// written yet (the writer creates the file, then writes the header): try again later.
    fn open_segment(&mut self, path: &Path, first: bool) -> anyhow::Result<bool> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        if size < SEGMENT_HEADER_BYTES as u64 {
            return self.header_not_ready(path, "shorter than its header");
        }
        file.read_exact_at(&mut header, 0)
            .with_context(|| format!("reading the header of {}", path.display()))?;
        let header = match decode_segment_header(&header) {
            Ok(h) => h,
            Err(e) => return self.header_not_ready(path, e),
        };
        self.header_stuck_since = None;
        if first {
            if header.first_seq != 1 {
                bail!(
                    "{}: the journal starts at sequence {}, not 1",
                    path.display(),
                    header.first_seq
                );
            }
            self.last_crc = header.prev_crc;
        } else if header.first_seq != self.next_seq || header.prev_crc != self.last_crc {
            bail!(
                "{}: segment does not continue the previous one (gap or broken chain)",
                path.display()
            );
        }
        self.segment = Some(OpenSegment {
            path: path.to_path_buf(),
            file,
            size,
            offset: SEGMENT_HEADER_BYTES as u64,
        });
        Ok(true)
    }

    /// A new segment's header is written right after the file is created; one that stays bad
    /// for seconds is corruption.
    fn header_not_ready(&mut self, path: &Path, reason: &str) -> anyhow::Result<bool> {
        let since = *self.header_stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(5) {
            bail!("{}: {reason}", path.display());
        }
        Ok(false)
    }

    /// The sequence number of the next event this tail will yield.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads what was appended since the last call, up to about `max_events` events, as the
    /// balance changes they make.
    pub fn fetch(&mut self, max_events: usize, out: &mut Vec<Item>) -> anyhow::Result<()> {
        let mut records = std::mem::take(&mut self.scratch);
        records.clear();
        let result = self.fetch_records(max_events, &mut records);
        for record in &records {
            items_of_record(record, out);
        }
        self.scratch = records;
        result
    }

    /// Appends the whole records written since the last call, until at least `max_events`
    /// events were added or the end of what is written was reached.
    pub fn fetch_records(
        &mut self,
        max_events: usize,
        out: &mut Vec<crate::core::CommandRecord>,
    ) -> anyhow::Result<()> {
        if self.segment.is_none() {
            let segments = list_segments(&self.dir)?;
            let Some((_, path)) = segments.first() else {
                return Ok(());
            };
            let path = path.clone();
            if !self.open_segment(&path, true)? {
                return Ok(());
            }
        }
        let mut events = 0usize;
        while events < max_events {
            let (progressed, added) = self.read_chunk(max_events - events, out)?;
            events += added;
            if !progressed && !self.advance_segment()? {
                break;
            }
        }
        Ok(())
    }

    /// Parses frames from one positioned read. Returns whether any record was read, and how many
    /// events were added.
    fn read_chunk(
        &mut self,
        max_events: usize,
        out: &mut Vec<crate::core::CommandRecord>,
    ) -> anyhow::Result<(bool, usize)> {
        let Some(segment) = self.segment.as_mut() else {
            return Ok((false, 0));
        };
        if segment.size.saturating_sub(segment.offset) < self.read_size as u64 {
            // Segments are preallocated, but a file that grows as it is written works too.
            segment.size = segment.file.metadata()?.len();
        }
        let remaining = segment.size.saturating_sub(segment.offset) as usize;
        let want = self.read_size.min(remaining);
        if want < FRAME_HEADER_BYTES {
            return Ok((false, 0));
        }
        self.buffer.resize(want, 0);
        segment
            .file
            .read_exact_at(&mut self.buffer, segment.offset)
            .with_context(|| format!("reading {} at {}", segment.path.display(), segment.offset))?;
        let mut at = 0usize;
        let mut events = 0usize;
        let mut stuck = false;
        while at + FRAME_HEADER_BYTES <= self.buffer.len() && events < max_events {
            let length = read_u32(&self.buffer, at) as usize;
            if length == 0 {
                break; // unwritten space: the end for now
            }
            if length <= MAX_FRAME_BYTES && at + length > self.buffer.len() {
                break; // the frame continues past this read
            }
            match check_frame(&self.buffer[at..]) {
                Ok(frame) => {
                    if frame.sequence != self.next_seq || frame.prev_crc != self.last_crc {
                        bail!(
                            "journal {} at offset {}: sequence {} / chain break (expected sequence {})",
                            segment.path.display(),
                            segment.offset + at as u64,
                            frame.sequence,
                            self.next_seq
                        );
                    }
                    let payload = &self.buffer[at + FRAME_HEADER_BYTES..at + frame.length];
                    let record = decode_record(frame.sequence, payload).map_err(|e| {
                        anyhow::anyhow!(
                            "journal {}: undecodable record {}: {e}",
                            segment.path.display(),
                            frame.sequence
                        )
                    })?;
                    events += record.event_count as usize;
                    self.next_seq = record.next_seq();
                    self.last_crc = frame.crc;
                    out.push(record);
                    at += frame.length;
                }
                Err(_) => {
                    stuck = true;
                    break;
                }
            }
        }
        segment.offset += at as u64;
        // Read more next time when this read was filled, less when the tail was reached.
        self.read_size = if at * 2 >= self.buffer.len() {
            (self.read_size * 2).min(MAX_READ_BYTES)
        } else {
            MIN_READ_BYTES.max(at * 2)
        };
        if stuck && at == 0 {
            self.check_stuck()?;
        } else {
            self.stuck_since = None;
        }
        Ok((at > 0, events))
    }

    /// A frame that does not verify at the tail is usually a write in progress. If it stays bad,
    /// let the journal's own scan decide between a torn tail (keep waiting: the engine cuts it
    /// on its next start) and corruption (stop with its error).
    fn check_stuck(&mut self) -> anyhow::Result<()> {
        let since = *self.stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            self.stuck_since = Some(Instant::now());
            let next = self.next_seq;
            let result = crate::journal::scan(&self.dir, next, |_| Err("stop".into()));
            match result {
                Ok(_) | Err(crate::journal::JournalError::Visitor { .. }) => {
                    tracing::warn!(
                        seq = next,
                        "the journal tail does not verify yet (a write in progress or a torn tail)"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// At the end of the current segment: moves to the next one if the writer created it.
    fn advance_segment(&mut self) -> anyhow::Result<bool> {
        let segments = list_segments(&self.dir)?;
        let Some((_, path)) = segments.iter().find(|(first, _)| *first == self.next_seq) else {
            return Ok(false);
        };
        let Some(segment) = self.segment.as_ref() else {
            return Ok(false);
        };
        if segment.path == *path {
            return Ok(false);
        }
        // The writer finishes a segment before creating the next, but our last read may predate
        // that: look once more before leaving.
        let mut probe = [0u8; 4];
        if segment.offset + 4 <= segment.size {
            segment.file.read_exact_at(&mut probe, segment.offset)?;
            if u32::from_le_bytes(probe) != 0 {
                return Ok(true); // more frames appeared: read them first
            }
        }
        let path = path.clone();
        self.open_segment(&path, false)
    }
}

/// Reads `GET /v1/wallet/events` from a running engine, which serves durable events only.
pub struct HttpSource {
    authority: String,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>,
    next_seq: u64,
}

#[derive(serde::Deserialize)]
struct EventLine {
    sequence: u64,
    kind: String,
    account_id: Option<String>,
    currency: Option<String>,
    balance_after: Option<String>,
}

/// Parses a decimal amount such as `"12.30"` (zero allowed) into minor units of `currency`.
pub fn parse_minor_units(text: &str, currency: Currency) -> anyhow::Result<u64> {
    let exponent = currency.exponent() as usize;
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let ok = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
        && fraction.len() <= exponent;
    if !ok {
        bail!("bad amount {text:?} for {currency}");
    }
    let mut value: u64 = 0;
    for digit in whole
        .bytes()
        .chain(fraction.bytes())
        .chain(std::iter::repeat_n(b'0', exponent - fraction.len()))
    {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or_else(|| anyhow::anyhow!("amount {text:?} overflows"))?;
    }
    Ok(value)
}

impl HttpSource {
    fn new(rest: &str) -> anyhow::Result<HttpSource> {
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("the engine URL must look like http://host:port");
        }
        Ok(HttpSource {
            authority: authority.to_string(),
            sender: None,
            next_seq: 1,
        })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<bytes::Bytes> {
        use http_body_util::BodyExt;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to the engine at {}", self.authority))?;
            stream.set_nodelay(true).ok();
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            bail!("no connection")
        };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.authority)
            .body(http_body_util::Empty::new())?;
        let result = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                bail!(
                    "GET {path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(body)
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn fetch(
        &mut self,
        max_events: usize,
        wait: Duration,
        out: &mut Vec<Item>,
    ) -> anyhow::Result<()> {
        let limit = max_events.clamp(1, 10_000);
        let path = format!(
            "/v1/wallet/events?from_seq={}&limit={limit}&wait_ms={}",
            self.next_seq,
            wait.as_millis().min(30_000)
        );
        let body = self.get(&path).await?;
        let mut items = Vec::new();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line: EventLine = serde_json::from_slice(line)
                .with_context(|| format!("bad event line {:?}", String::from_utf8_lossy(line)))?;
            let expected = self.next_seq + items.len() as u64;
            if line.sequence < expected {
                continue;
            }
            if line.sequence != expected {
                bail!(
                    "the event stream skipped from {expected} to {}",
                    line.sequence
                );
            }
            let item = match line.kind.as_str() {
                "account_opened" => Item::Opened {
                    seq: line.sequence,
                    index: None,
                    name: line.account_id.unwrap_or_default(),
                },
                "deposited" | "withdrawn" | "debited" | "credited" => {
                    let code = line.currency.unwrap_or_default();
                    let currency = Currency::new(&code).map_err(|e| {
                        anyhow::anyhow!("event {}: currency {code:?} {e}", line.sequence)
                    })?;
                    let balance =
                        parse_minor_units(line.balance_after.as_deref().unwrap_or(""), currency)?;
                    let name = line.account_id.unwrap_or_default();
                    Item::Balance {
                        seq: line.sequence,
                        account: AccountRef::Name(name),
                        currency,
                        balance,
                    }
                }
                _ => Item::Other { seq: line.sequence },
            };
            items.push((item, line.kind == "debited"));
        }
        // A transfer's debit and credit are one record: never stop between them, so that every
        // applied sequence is a record boundary (what `reconcile` replays to).
        if items.last().is_some_and(|(_, debit)| *debit) {
            items.pop();
        }
        self.next_seq += items.len() as u64;
        out.extend(items.into_iter().map(|(item, _)| item));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AccountId, Command, CommandKind, Ledger, LedgerConfig, TransactionId};
    use crate::journal::storage::MmapStorage;
    use crate::journal::{JournalConfig, JournalEnd, JournalWriter, SyncMode};

    #[test]
    fn amounts_parse_to_minor_units_including_zero() {
        let usd = Currency::new("USD").expect("usd");
        let jpy = Currency::new("JPY").expect("jpy");
        assert_eq!(parse_minor_units("0.00", usd).ok(), Some(0));
        assert_eq!(parse_minor_units("12.3", usd).ok(), Some(1230));
        assert_eq!(parse_minor_units("12", usd).ok(), Some(1200));
        assert_eq!(parse_minor_units("7", jpy).ok(), Some(7));
        for bad in ["", "1.234", "-1", "1e3", "1.x", ".5"] {
            assert!(
                parse_minor_units(bad, usd).is_err(),
                "{bad:?} must be refused"
            );
        }
        assert!(parse_minor_units("99999999999999999999", usd).is_err());
    }

    /// The tail reads each record exactly once while the writer appends and rolls segments.
    #[test]
    fn tail_follows_appends_across_segment_rolls() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(data.path());
        let config = JournalConfig {
            dir: dir.clone(),
            segment_size_bytes: 4096,
            sync: SyncMode::None,
        };
        let end = JournalEnd {
            segment: None,
            next_seq: 1,
            last_crc: 0,
            torn_at: None,
        };
        let mut writer = JournalWriter::open(Box::new(MmapStorage), config, &end).expect("writer");
        let mut ledger = Ledger::new(LedgerConfig::default());
        let usd = Currency::new("USD").expect("usd");
        let mut id = 0u128;
        let mut run = |ledger: &mut Ledger, kind: CommandKind| {
            id += 1;
            ledger.execute(&Command {
                transaction_id: TransactionId(id),
                timestamp_ns: 1,
                kind,
            })
        };
        let names = ["a", "b", "c"];
        let mut tail = JournalTail::new(&dir);
        let mut items = Vec::new();
        tail.fetch(100, &mut items).expect("empty journal");
        assert!(items.is_empty());
        for name in names {
            let account = AccountId::new(name).expect("id");
            writer
                .append(&run(&mut ledger, CommandKind::OpenAccount { account }))
                .expect("append");
            let record = run(
                &mut ledger,
                CommandKind::Deposit {
                    account,
                    amount: 1_000_000,
                    currency: usd,
                },
            );
            writer.append(&record).expect("append");
        }
        writer.commit().expect("commit");
        for round in 0..200u64 {
            let from = AccountId::new(names[(round % 3) as usize]).expect("id");
            let to = AccountId::new(names[((round + 1) % 3) as usize]).expect("id");
            let record = run(
                &mut ledger,
                CommandKind::Transfer {
                    from,
                    to,
                    amount: 1 + round,
                    currency: usd,
                },
            );
            writer.append(&record).expect("append");
            writer.commit().expect("commit");
            if round % 7 == 0 {
                tail.fetch(25, &mut items).expect("fetch");
            }
        }
        while tail.next_seq < ledger.next_seq() {
            let before = items.len();
            tail.fetch(1000, &mut items).expect("fetch");
            assert!(
                items.len() > before,
                "the tail stopped at {}",
                tail.next_seq
            );
        }
        assert!(
            list_segments(&dir).expect("segments").len() > 3,
            "the test must roll segments"
        );
        let seqs: Vec<u64> = items.iter().map(Item::seq).collect();
        assert_eq!(seqs, (1..ledger.next_seq()).collect::<Vec<_>>());
        // The last balance of each account is the ledger's.
        for (index, name) in names.iter().enumerate() {
            let last = items.iter().rev().find_map(|item| match item {
                Item::Balance {
                    account: AccountRef::Index(i),
                    balance,
                    ..
                } if *i as usize == index => Some(*balance),
                _ => None,
            });
            assert_eq!(last, ledger.balance(index as u32, usd), "{name}");
        }
    }
}
