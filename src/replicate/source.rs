//! Where the replicator reads events from: the journal files of a data directory (tailed in
//! place, so the directory may belong to a running `serve`), or a running engine's
//! `GET /v1/wallet/events` NDJSON stream.
//!
//! Both yield the same [`Item`]s in sequence order, one per event, every sequence number once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::core::{Currency, EventKind};
pub use crate::journal::tail::{JournalTail, RecordId};

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

/// An engine URL whose history is no longer the one a replicator has read (see
/// `HttpSource::check_position`): definitive, never retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HistoryChanged(pub String);

/// The engine answered that `from_seq` is past the end of its event stream (a 400 naming
/// `from_seq`): it holds no event there. `HttpSource::lines` reads it as an empty page, which
/// the position checks then judge (a replicator ahead of the engine's history stops, and
/// `--rebuild` can still clear and replay a node).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PastTheEnd(String);

/// An engine URL that did not answer, or answered 5xx (it may be restarting): worth asking
/// again. Every other source error is not (a 4xx, a malformed or skipping stream, a changed
/// history).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// How a replicator retries a source that fails for a while (`Unavailable`: an engine URL
/// that is briefly unreachable, or answers 503 while it restarts and recovers; any other
/// error is returned at once): with a growing pause (200 ms doubling to 5 s), for as long as
/// the failures have lasted less than `give_up_after` (see `source_outage_limit`; it gave up
/// after 50 tries 200 ms apart, about 10 s: less than an engine's recovery of a long history).
pub struct SourceRetry {
    give_up_after: Duration,
    failing_since: Option<std::time::Instant>,
    pause: Duration,
}

/// How long a source may yield nothing more, while a replicator has not yet read as far as its
/// targets have applied, before it counts as a source that ends short of them (another
/// journal, or one that lost its tail). One empty read is not that: a read racing the rewrite
/// of the durable watermark yields nothing for a moment, as does an HTTP read that had to
/// reconnect.
pub const SHORT_SOURCE_PATIENCE: Duration = Duration::from_secs(5);

/// The most event lines asked of an engine in one request (its own cap).
const HTTP_READ_LIMIT: usize = 10_000;

/// How long a replicator keeps retrying an engine URL that fails: 5 minutes (an engine's
/// restart and recovery), but 10 s under `--once` (a catch-up run that reports what it could
/// not reach rather than waiting for it).
pub fn source_outage_limit(once: bool) -> Duration {
    if once {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(300)
    }
}

impl SourceRetry {
    pub fn new(give_up_after: Duration) -> SourceRetry {
        SourceRetry {
            give_up_after,
            failing_since: None,
            pause: Duration::ZERO,
        }
    }

    pub fn succeeded(&mut self) {
        self.failing_since = None;
        self.pause = Duration::ZERO;
    }

    /// After a failure: the pause before the next try, or the error when the failures have
    /// lasted too long.
    pub fn failed(&mut self, error: anyhow::Error) -> anyhow::Result<Duration> {
        if !error.is::<Unavailable>() {
            return Err(error);
        }
        let since = *self
            .failing_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= self.give_up_after {
            return Err(error.context(format!(
                "the source has failed for {:?}; giving up",
                since.elapsed()
            )));
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
        tracing::warn!(error = %format!("{error:#}"), retry_in = ?self.pause, "reading the source failed; retrying");
        Ok(self.pause)
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
        // The scheme is case-insensitive (RFC 3986, 3.1): `HTTP://...` was taken for a path.
        let scheme = |name: &str| {
            spec.get(..name.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(name))
        };
        if scheme("http://") {
            Ok(Source::Http(HttpSource::new(&spec["http://".len()..])?))
        } else if scheme("https://") {
            bail!("https sources are not supported; use http:// or a data directory")
        } else {
            let journal = crate::journal::existing_journal_dir(Path::new(spec))
                .map_err(|e| anyhow::anyhow!("--source: {e}"))?;
            Ok(Source::Journal(JournalTail::new(&journal)))
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
                tail.fetch_with(max_events, |record| items_of_record(record, out))?;
                if out.is_empty() && !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_millis(5))).await;
                }
                Ok(())
            }
            Source::Http(http) => http.fetch(max_events, wait, out).await,
        }
    }

    /// The most items one `fetch(max_events, ..)` yields when the source has more than that:
    /// a fetch that yields fewer reached the source's end. (A journal read stops after the
    /// record that reaches `max_events`; an engine answers at most 10,000 lines a request.)
    pub fn read_limit(&self, max_events: usize) -> usize {
        match self {
            Source::Journal(_) => max_events,
            Source::Http(_) => max_events.clamp(2, HTTP_READ_LIMIT),
        }
    }

    /// The sequence number of the next event this source will yield.
    pub fn next_seq(&self) -> u64 {
        match self {
            Source::Journal(tail) => tail.next_seq(),
            Source::Http(http) => http.next_seq,
        }
    }

    /// Like `fetch`, but whole command records (what the SQL replicator needs). From the HTTP
    /// source they are rebuilt from the event lines, see [`HttpSource::fetch_records`].
    pub async fn fetch_records(
        &mut self,
        max_events: usize,
        wait: Duration,
        out: &mut Vec<crate::core::CommandRecord>,
    ) -> anyhow::Result<()> {
        match self {
            Source::Journal(tail) => {
                let before = out.len();
                tail.fetch_records(max_events, out)?;
                if out.len() == before && !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_millis(5))).await;
                }
                Ok(())
            }
            Source::Http(http) => http.fetch_records(max_events, wait, out).await,
        }
    }

    /// For a data-directory source: the newest valid snapshot of its engine whose state is at
    /// or before `seq` (its next sequence at most `seq + 1`); the tail then starts right after
    /// it, skipping the journal segments before. `None` (the source still starts at 1): an
    /// engine URL, no such snapshot, or `seq` 0.
    pub fn start_from_snapshot(&mut self, seq: u64) -> anyhow::Result<Option<crate::core::Ledger>> {
        let Source::Journal(tail) = self else {
            return Ok(None);
        };
        if seq == 0 {
            return Ok(None);
        }
        let Some(data_dir) = tail.dir().parent() else {
            return Ok(None);
        };
        let snapshots = crate::journal::snapshot_dir(data_dir);
        let Some(loaded) = crate::journal::snapshot::load_newest_snapshot(
            &snapshots,
            crate::engine::ledger_config(),
            Some(seq + 1),
        ) else {
            return Ok(None);
        };
        let ledger = loaded.ledger;
        // A snapshot of another history is refused here as at the engine's start-up: a
        // projection built on it would carry its balances.
        crate::engine::recovery::check_snapshot_chain(
            tail.dir(),
            &loaded.path,
            ledger.next_seq(),
            loaded.chain,
        )?;
        tail.start_at(ledger.next_seq())?;
        Ok(Some(ledger))
    }

    /// Starts an engine-URL source at `seq` (`from_seq`) instead of 1; a data-directory source
    /// at the record that begins there (see [`JournalTail::start_at`]). Only before the first
    /// fetch.
    pub fn start_at(&mut self, seq: u64) -> anyhow::Result<()> {
        match self {
            Source::Journal(tail) => tail.start_at(seq),
            Source::Http(http) => {
                if http.next_seq != 1 {
                    bail!("the event stream was already read");
                }
                http.next_seq = seq.max(1);
                Ok(())
            }
        }
    }

    /// `start_at(seq + 1)` for a replicator that holds the records up to `seq` from elsewhere
    /// (the Redis nodes), the one ending there being `record`: an engine URL confirms that
    /// record before it yields anything, and again on every new connection, as if it had
    /// yielded it. (Nothing was yielded, so nothing was confirmed: an engine replaced by
    /// another history's before the first read went on from `seq` with that history's records.)
    pub fn resume_after(&mut self, seq: u64, record: Option<RecordId>) -> anyhow::Result<()> {
        self.start_at(seq + 1)?;
        if let Source::Http(http) = self {
            http.last_record = record;
            http.check_position = record.is_some();
        }
        Ok(())
    }

    /// The identity of the last record yielded (the one ending at `next_seq() - 1`).
    pub fn last_record(&self) -> Option<RecordId> {
        match self {
            Source::Journal(tail) => tail.last_record().copied(),
            Source::Http(http) => http.last_record,
        }
    }

    /// The identity of the record that holds event `seq`, and whether that record ends there;
    /// read apart from the stream (the source does not move). `Ok(None)`: the source does not
    /// reach `seq`.
    pub async fn record_at(&mut self, seq: u64) -> anyhow::Result<Option<(RecordId, bool)>> {
        match self {
            Source::Journal(tail) => {
                let dir = tail.dir().to_path_buf();
                tokio::task::spawn_blocking(move || journal_record_at(&dir, seq)).await?
            }
            Source::Http(http) => http.record_at(seq).await,
        }
    }
}

/// The identity of the journal record that holds `seq` and whether it ends there (see
/// [`Source::record_at`]).
pub fn journal_record_at(dir: &Path, seq: u64) -> anyhow::Result<Option<(RecordId, bool)>> {
    let mut found = None;
    // `scan` visits records that begin at or after its start: begin where the record that
    // holds `seq` can begin at the earliest.
    let from = seq
        .saturating_sub(crate::core::command::MAX_EVENTS_PER_COMMAND as u64 - 1)
        .max(1);
    let result = crate::journal::scan(dir, from, |record| {
        if record.next_seq() > seq {
            found = Some(*record);
            return Err("found".into());
        }
        Ok(())
    });
    match result {
        Ok(_) | Err(crate::journal::JournalError::Visitor { .. }) => {}
        Err(e) => return Err(anyhow::Error::from(e).context("reading the journal")),
    }
    Ok(found.map(|record| (RecordId::of(&record), record.next_seq() - 1 == seq)))
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

/// Reads `GET /v1/wallet/events` from a running engine, which serves durable events only.
pub struct HttpSource {
    authority: String,
    /// How long a connection attempt may take.
    connect_timeout: Duration,
    /// How long an answer may take beyond the long-poll wait it asked for. Without a bound, an
    /// engine host that vanished (no FIN, no RST) held the replicator in one request forever.
    answer_margin: Duration,
    /// Set when a connection is opened: the engine behind it may have restarted, and one that
    /// lost its tail (`--sync none` and a power loss, a data directory restored from a copy)
    /// would otherwise go on from our position with records of another history. Before more
    /// records are yielded, the record we last yielded is read again and must be the same
    /// (`confirm_position`).
    check_position: bool,
    /// Sent as `Authorization: Bearer <token>` on every request (the event stream needs
    /// `wallet:admin` on an engine that checks tokens): `WALLET_SOURCE_TOKEN`.
    token: Option<String>,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>,
    next_seq: u64,
    last_record: Option<RecordId>,
    /// Account index by id, in opening order (the engine's dense index), for `fetch_records`.
    indexes: HashMap<String, u32>,
}

#[derive(serde::Deserialize)]
struct EventLine {
    sequence: u64,
    kind: String,
    transaction_id: String,
    timestamp_ns: u64,
    account_id: Option<String>,
    currency: Option<String>,
    amount: Option<String>,
    balance_after: Option<String>,
    code: Option<String>,
    state_hash: Option<String>,
}

impl EventLine {
    fn record_id(&self) -> anyhow::Result<RecordId> {
        let transaction_id = uuid::Uuid::try_parse(&self.transaction_id)
            .map_err(|e| {
                anyhow::anyhow!(
                    "event {}: bad transaction_id {:?}: {e}",
                    self.sequence,
                    self.transaction_id
                )
            })?
            .as_u128();
        Ok(RecordId {
            transaction_id,
            timestamp_ns: self.timestamp_ns,
        })
    }
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
            bail!("--source: the engine URL must look like http://host:port");
        }
        // Checked here, not found out by connecting (which was retried for seconds first).
        // A user:password is refused without being echoed: the engine takes a bearer token
        // from WALLET_SOURCE_TOKEN, never credentials in the URL.
        if authority.contains('@') {
            bail!(
                "--source: the engine URL must not carry credentials (user@ or user:password@); \
                 give a bearer token in WALLET_SOURCE_TOKEN"
            );
        }
        let port = match authority.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !host.ends_with(':') => port,
            _ => bail!("--source: the engine URL must name a host and a port, http://host:port"),
        };
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            bail!("--source: the engine URL's port {port:?} is not a port number (1 to 65535)");
        }
        Ok(HttpSource {
            authority: authority.to_string(),
            connect_timeout: Duration::from_secs(5),
            answer_margin: Duration::from_secs(10),
            check_position: false,
            token: std::env::var("WALLET_SOURCE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            sender: None,
            next_seq: 1,
            last_record: None,
            indexes: HashMap::new(),
        })
    }

    /// The event lines from `from_seq` on, at most `limit`, waiting up to `wait` for the first.
    async fn lines(
        &mut self,
        from_seq: u64,
        limit: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<EventLine>> {
        let path = format!(
            "/v1/wallet/events?from_seq={from_seq}&limit={limit}&wait_ms={}",
            wait.as_millis().min(30_000)
        );
        let body = match self.get(&path, wait.min(Duration::from_secs(30))).await {
            Err(e) if e.is::<PastTheEnd>() => return Ok(Vec::new()),
            other => other?,
        };
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                serde_json::from_slice(line)
                    .with_context(|| format!("bad event line {:?}", String::from_utf8_lossy(line)))
            })
            .collect()
    }

    /// The event lines from `next_seq` on for `fetch` and `fetch_records`, read only while the
    /// engine still holds the record last yielded, where it was: after a new connection, that
    /// record is read again first (and the lines read anew if the connection was new for
    /// them). Nothing is yielded from an engine whose history is not the one already yielded.
    async fn stream_lines(
        &mut self,
        limit: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<EventLine>> {
        let started = tokio::time::Instant::now();
        let lines = self.stream_lines_unpaced(limit, wait).await?;
        // The engine holds a read for new events up to `wait` (a long poll), but shortens it
        // to fit its request timeout, down to not at all: an empty answer that came sooner is
        // followed by the rest of the wait here, or an idle replicator polls in a loop.
        if lines.is_empty() {
            tokio::time::sleep_until(started + wait).await;
        }
        Ok(lines)
    }

    async fn stream_lines_unpaced(
        &mut self,
        limit: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<EventLine>> {
        for _ in 0..2 {
            if self.check_position {
                self.confirm_position().await?;
            }
            let lines = self.lines(self.next_seq, limit, wait).await?;
            // Nothing yielded yet: nothing to confirm (a replicator checks where it starts).
            if self.last_record.is_none() {
                self.check_position = false;
            }
            if !self.check_position {
                return Ok(lines);
            }
        }
        // Connected anew for every read: nothing this time (the next read confirms first).
        Ok(Vec::new())
    }

    /// See `check_position`. Clears it once the record last yielded (if any) is confirmed.
    async fn confirm_position(&mut self) -> anyhow::Result<()> {
        let Some(ours) = self.last_record else {
            self.check_position = false;
            return Ok(());
        };
        let seq = self.next_seq - 1;
        // Read on the connection the lines will come from (a failure leaves the flag set).
        let theirs = self.record_at(seq).await?;
        self.check_position = false;
        match theirs {
            Some((theirs, true)) if theirs == ours => Ok(()),
            Some((theirs, _)) => Err(HistoryChanged(format!(
                "the engine's record at sequence {seq} is now {theirs}, but this replicator read {ours} there: the engine lost its tail or is another engine's history"
            ))
            .into()),
            None => Err(HistoryChanged(format!(
                "the engine no longer reaches sequence {seq} (record {ours}), which this replicator has read: it lost its tail or is another engine's history"
            ))
            .into()),
        }
    }

    async fn record_at(&mut self, seq: u64) -> anyhow::Result<Option<(RecordId, bool)>> {
        let lines = self.lines(seq, 2, Duration::ZERO).await?;
        let Some(line) = lines.iter().find(|l| l.sequence == seq) else {
            return Ok(None);
        };
        // A transfer's debit is followed by its credit in the same record.
        Ok(Some((line.record_id()?, line.kind != "debited")))
    }

    /// GETs `path`, whose answer may take `wait` (a long poll) plus `answer_margin`. A failure
    /// to connect or to get an answer, and a 5xx answer, are `Unavailable` (retried); a 4xx
    /// answer is not (asking again gets the same answer).
    ///
    /// A kept-alive connection the engine closed while it was idle (its header read timeout, a
    /// restart) fails the next request before any answer, often as hyper's "operation was
    /// canceled": the request is sent again at once on a new connection (a GET, so asking twice
    /// is harmless). It used to be a source failure, retried after the failure pause of 200 ms
    /// and more, and an SQL or Redis replicator's lag grew by that much at every such close.
    async fn get(&mut self, path: &str, wait: Duration) -> anyhow::Result<bytes::Bytes> {
        let reused = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        let (result, lost_unanswered) = self.get_once(path, wait).await;
        if reused && lost_unanswered {
            if let Err(e) = &result {
                tracing::debug!(error = %format!("{e:#}"), "a kept-alive connection to the engine was closed; asking again on a new one");
            }
            return self.get_once(path, wait).await.0;
        }
        result
    }

    /// One try of `get`; the flag says the connection failed before any answer came (not a
    /// timeout): the request may never have reached the engine.
    async fn get_once(
        &mut self,
        path: &str,
        wait: Duration,
    ) -> (anyhow::Result<bytes::Bytes>, bool) {
        let mut lost_unanswered = false;
        let result = self.try_get(path, wait, &mut lost_unanswered).await;
        if result.is_err() {
            self.sender = None;
        }
        (result, lost_unanswered)
    }

    async fn try_get(
        &mut self,
        path: &str,
        wait: Duration,
        lost_unanswered: &mut bool,
    ) -> anyhow::Result<bytes::Bytes> {
        use http_body_util::BodyExt;
        let unavailable = |what: String| anyhow::Error::new(Unavailable(what));
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let authority = &self.authority;
            let stream = match tokio::time::timeout(
                self.connect_timeout,
                tokio::net::TcpStream::connect(authority),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    return Err(unavailable(format!(
                        "connecting to the engine at {authority}: {e}"
                    )));
                }
                Err(_) => {
                    return Err(unavailable(format!(
                        "connecting to the engine at {authority}: no connection within {:?}",
                        self.connect_timeout
                    )));
                }
            };
            stream.set_nodelay(true).ok();
            self.check_position = true;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| unavailable(format!("connecting to the engine: {e}")))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            bail!("no connection")
        };
        let mut request = hyper::Request::get(path).header(hyper::header::HOST, &self.authority);
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(http_body_util::Empty::new())?;
        let limit = wait + self.answer_margin;
        tokio::time::timeout(limit, async {
            let response = sender.send_request(request).await.map_err(|e| {
                *lost_unanswered = true;
                unavailable(format!("GET {path}: {e}"))
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(format!("GET {path}: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let message = format!(
                    "GET {path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let past_the_end = status == hyper::StatusCode::BAD_REQUEST
                    && serde_json::from_slice::<serde_json::Value>(&body)
                        .is_ok_and(|v| v["error"]["field"] == "from_seq");
                // 429: the engine is busy (its journal reads are bounded): retried like a 5xx.
                return Err(
                    if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
                        unavailable(message)
                    } else if past_the_end {
                        anyhow::Error::new(PastTheEnd(message))
                    } else {
                        anyhow::anyhow!(message)
                    },
                );
            }
            Ok(body)
        })
        .await
        .unwrap_or_else(|_| {
            Err(unavailable(format!(
                "GET {path}: no answer within {limit:?}"
            )))
        })
    }

    /// Rebuilds whole command records from the event lines, with the engine's account indexes
    /// (accounts are numbered in opening order, so this source must be read from sequence 1).
    /// The records hold what the projections use: transaction id, timestamp, command type,
    /// outcome and events. A rejection's line does not say which command was rejected: such a
    /// record has `command_type` `Checkpoint`, its `rejected` event and the rejection code.
    /// The fingerprint is not in the stream (0).
    pub async fn fetch_records(
        &mut self,
        max_events: usize,
        wait: Duration,
        out: &mut Vec<crate::core::CommandRecord>,
    ) -> anyhow::Result<()> {
        use crate::core::{
            AccountId, CommandRecord, CommandType, Event, RejectCode, TransactionId,
        };
        let limit = max_events.clamp(2, HTTP_READ_LIMIT);
        let lines = self.stream_lines(limit, wait).await?;
        let mut expected = self.next_seq;
        let mut i = 0;
        while i < lines.len() {
            let line = &lines[i];
            i += 1;
            if line.sequence < expected {
                continue;
            }
            if line.sequence != expected {
                bail!(
                    "the event stream skipped from {expected} to {}",
                    line.sequence
                );
            }
            let id = line.record_id()?;
            let mut record = CommandRecord::empty();
            record.transaction_id = TransactionId(id.transaction_id);
            record.timestamp_ns = id.timestamp_ns;
            record.first_seq = line.sequence;
            record.event_count = 1;
            let kind = |name: &str| -> anyhow::Result<EventKind> {
                (1..=7)
                    .filter_map(EventKind::from_u8)
                    .find(|k| k.name() == name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("event {}: unknown kind {name:?}", line.sequence)
                    })
            };
            let money = |line: &EventLine| -> anyhow::Result<Event> {
                let code = line.currency.as_deref().unwrap_or_default();
                let currency = Currency::new(code).map_err(|e| {
                    anyhow::anyhow!("event {}: currency {code:?} {e}", line.sequence)
                })?;
                let name = line.account_id.as_deref().unwrap_or_default();
                let account = *self.indexes.get(name).ok_or_else(|| {
                    anyhow::anyhow!("event {}: account {name:?} was never opened", line.sequence)
                })?;
                Ok(Event {
                    seq: line.sequence,
                    kind: kind(&line.kind)?,
                    account,
                    currency,
                    amount: parse_minor_units(line.amount.as_deref().unwrap_or(""), currency)?,
                    balance_after: parse_minor_units(
                        line.balance_after.as_deref().unwrap_or(""),
                        currency,
                    )?,
                })
            };
            match line.kind.as_str() {
                "account_opened" => {
                    let name = line.account_id.as_deref().unwrap_or_default();
                    let account = AccountId::new(name).map_err(|e| {
                        anyhow::anyhow!("event {}: account id {name:?}: {e}", line.sequence)
                    })?;
                    let index = u32::try_from(self.indexes.len())?;
                    if self.indexes.insert(name.to_string(), index).is_some() {
                        bail!("event {}: account {name:?} opened twice", line.sequence);
                    }
                    record.command_type = CommandType::OpenAccount;
                    record.opened_account = account;
                    record.events[0] = Event {
                        seq: line.sequence,
                        kind: EventKind::AccountOpened,
                        account: index,
                        currency: Currency::NONE,
                        amount: 0,
                        balance_after: 0,
                    };
                }
                "deposited" | "withdrawn" => {
                    record.command_type = if line.kind == "deposited" {
                        CommandType::Deposit
                    } else {
                        CommandType::Withdraw
                    };
                    record.events[0] = money(line)?;
                }
                "debited" => {
                    // The credit is the same record: without it in this answer, stop before
                    // the debit and read both next time.
                    let Some(credit) = lines.get(i) else {
                        break;
                    };
                    if credit.kind != "credited"
                        || credit.sequence != line.sequence + 1
                        || credit.transaction_id != line.transaction_id
                    {
                        bail!(
                            "event {}: a debit not followed by its credit",
                            line.sequence
                        );
                    }
                    i += 1;
                    record.command_type = CommandType::Transfer;
                    record.event_count = 2;
                    record.events[0] = money(line)?;
                    record.events[1] = money(credit)?;
                }
                "rejected" => {
                    let code = line.code.as_deref().unwrap_or_default();
                    let rejection = RejectCode::ALL
                        .into_iter()
                        .find(|c| c.code() == code)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "event {}: unknown rejection code {code:?}",
                                line.sequence
                            )
                        })?;
                    record.rejection = Some(rejection);
                    record.events[0] = Event {
                        seq: line.sequence,
                        kind: EventKind::Rejected,
                        account: u32::MAX,
                        currency: Currency::NONE,
                        amount: 0,
                        balance_after: 0,
                    };
                }
                "checkpoint" => {
                    let text = line.state_hash.as_deref().unwrap_or_default();
                    let hash = u64::from_str_radix(text, 16).map_err(|e| {
                        anyhow::anyhow!("event {}: state_hash {text:?}: {e}", line.sequence)
                    })?;
                    record.events[0] = Event {
                        seq: line.sequence,
                        kind: EventKind::Checkpoint,
                        account: u32::MAX,
                        currency: Currency::NONE,
                        amount: hash,
                        balance_after: 0,
                    };
                }
                other => bail!("event {}: a lone {other:?} event", line.sequence),
            }
            expected = record.next_seq();
            self.last_record = Some(id);
            out.push(record);
        }
        self.next_seq = expected;
        Ok(())
    }

    async fn fetch(
        &mut self,
        max_events: usize,
        wait: Duration,
        out: &mut Vec<Item>,
    ) -> anyhow::Result<()> {
        let limit = max_events.clamp(1, HTTP_READ_LIMIT);
        let lines = self.stream_lines(limit, wait).await?;
        let mut items = Vec::new();
        for line in lines {
            let id = line.record_id()?;
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
            items.push((item, line.kind == "debited", id));
        }
        // A transfer's debit and credit are one record: never stop between them, so that every
        // applied sequence is a record boundary (what `reconcile` replays to).
        if items.last().is_some_and(|(_, debit, _)| *debit) {
            items.pop();
        }
        if let Some((_, _, id)) = items.last() {
            self.last_record = Some(*id);
        }
        self.next_seq += items.len() as u64;
        out.extend(items.into_iter().map(|(item, _, _)| item));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AccountId, Command, CommandKind, Ledger, LedgerConfig, TransactionId};
    use crate::journal::journal_dir;
    use crate::journal::storage::MmapStorage;
    use crate::journal::{JournalConfig, JournalEnd, JournalWriter, SyncMode, list_segments};

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

    /// A replicator starting from a snapshot checks its chain value against the journal, as the
    /// engine's start-up does: another history's snapshot is refused, naming it; the journal's
    /// own is used.
    #[test]
    fn starting_from_a_snapshot_of_another_history_is_refused() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(data.path());
        let config = JournalConfig {
            dir: dir.clone(),
            segment_size_bytes: 4096,
            sync: SyncMode::Batch,
        };
        let mut writer = JournalWriter::open(
            Box::new(MmapStorage::default()),
            config,
            &JournalEnd::empty(),
        )
        .expect("writer");
        let mut ledger = Ledger::new(LedgerConfig::default());
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let account = AccountId::new(name).expect("id");
            let record = ledger.execute(&Command {
                transaction_id: TransactionId(i as u128 + 1),
                timestamp_ns: 1,
                kind: CommandKind::OpenAccount { account },
            });
            writer.append(&record).expect("append");
        }
        writer.commit().expect("commit");
        drop(writer);
        let end = crate::journal::scan(&dir, 1, |_| Ok(())).expect("scan");
        let snapshots = crate::journal::snapshot_dir(data.path());
        let foreign = crate::journal::snapshot::write_snapshot(
            &snapshots,
            &crate::core::codec::encode_snapshot(&ledger, Some(end.last_crc ^ 1)),
        )
        .expect("write");
        let mut source = Source::Journal(JournalTail::new(&dir));
        let Err(error) = source.start_from_snapshot(10) else {
            panic!("another history's snapshot was accepted");
        };
        let text = format!("{error:#}");
        assert!(
            text.contains("does not belong to this journal")
                && text.contains(&foreign.display().to_string()),
            "{text}"
        );
        std::fs::remove_file(&foreign).expect("rm");
        crate::journal::snapshot::write_snapshot(
            &snapshots,
            &crate::core::codec::encode_snapshot(&ledger, Some(end.last_crc)),
        )
        .expect("write");
        let mut source = Source::Journal(JournalTail::new(&dir));
        let started = source.start_from_snapshot(10).expect("own snapshot");
        assert_eq!(started.map(|l| l.state_hash()), Some(ledger.state_hash()));
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
        let end = JournalEnd::empty();
        let mut writer =
            JournalWriter::open(Box::new(MmapStorage::default()), config, &end).expect("writer");
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
        tail.fetch_with(100, |r| items_of_record(r, &mut items))
            .expect("empty journal");
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
                tail.fetch_with(25, |r| items_of_record(r, &mut items))
                    .expect("fetch");
            }
        }
        while tail.next_seq() < ledger.next_seq() {
            let before = items.len();
            tail.fetch_with(1000, |r| items_of_record(r, &mut items))
                .expect("fetch");
            assert!(
                items.len() > before,
                "the tail stopped at {}",
                tail.next_seq()
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

    /// The writer publishes its durable watermark in `journal/durable`; the tail yields nothing
    /// beyond it, and everything when the file is missing (older journals).
    #[test]
    fn tail_yields_only_what_the_durable_file_names() {
        use crate::journal::format::{
            DURABLE_FILE_BYTES, DURABLE_FILE_NAME, decode_durable, encode_durable,
        };
        let data = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(data.path());
        let config = JournalConfig {
            dir: dir.clone(),
            segment_size_bytes: 1 << 20,
            sync: SyncMode::Batch,
        };
        let end = JournalEnd::empty();
        let mut writer =
            JournalWriter::open(Box::new(MmapStorage::default()), config, &end).expect("writer");
        let mut ledger = Ledger::new(LedgerConfig::default());
        let usd = Currency::new("USD").expect("usd");
        let mut records = Vec::new();
        for i in 0..20u128 {
            let account = AccountId::new(&format!("a{i}")).expect("id");
            for kind in [
                CommandKind::OpenAccount { account },
                CommandKind::Deposit {
                    account,
                    amount: 100,
                    currency: usd,
                },
            ] {
                let record = ledger.execute(&Command {
                    transaction_id: TransactionId(records.len() as u128 + 1),
                    timestamp_ns: 7,
                    kind,
                });
                writer.append(&record).expect("append");
                records.push(record);
            }
        }
        let durable = writer.commit().expect("commit");
        assert_eq!(durable, 40);
        let path = dir.join(DURABLE_FILE_NAME);
        let bytes = std::fs::read(&path).expect("durable file");
        assert_eq!(bytes.len(), DURABLE_FILE_BYTES);
        let (seq, crc) = decode_durable(&bytes).expect("decodes");
        assert_eq!(seq, 40);
        assert_ne!(crc, 0, "the last record's frame checksum");

        // Pretend only sequence 10 is durable: the records after it are in the file but not
        // yielded, however often the tail looks.
        std::fs::write(&path, encode_durable(10, 0)).expect("write");
        let mut tail = JournalTail::new(&dir);
        let mut out = Vec::new();
        for _ in 0..3 {
            tail.fetch_records(1000, &mut out).expect("fetch");
        }
        assert_eq!(tail.durable_limit(), Some(10));
        assert_eq!(out.len(), 10, "records 1..=10 only");
        assert_eq!(tail.next_seq(), 11);
        assert_eq!(tail.last_record(), Some(&RecordId::of(&records[9])));
        // A damaged file keeps the last good limit (a torn read is retried).
        std::fs::write(&path, [0u8; DURABLE_FILE_BYTES]).expect("write");
        tail.fetch_records(1000, &mut out).expect("fetch");
        assert_eq!(out.len(), 10);
        // The watermark moves: the rest follows.
        std::fs::write(&path, encode_durable(40, crc)).expect("write");
        tail.fetch_records(1000, &mut out).expect("fetch");
        assert_eq!(out.len(), 40);
        // No file at all: everything written is yielded (the fallback).
        std::fs::remove_file(&path).expect("rm");
        let mut tail = JournalTail::new(&dir);
        let mut all = Vec::new();
        tail.fetch_records(1000, &mut all).expect("fetch");
        assert_eq!(tail.durable_limit(), None);
        assert_eq!(all.len(), 40);
        // The record identity of a sequence: at a record end, and inside none (every record
        // here is one event).
        let at = journal_record_at(&dir, 25).expect("scan");
        assert_eq!(at, Some((RecordId::of(&records[24]), true)));
        assert_eq!(journal_record_at(&dir, 41).expect("scan"), None);
        // A transfer is one record of two events: its debit is inside it, its credit ends it.
        let transfer = ledger.execute(&Command {
            transaction_id: TransactionId(99),
            timestamp_ns: 8,
            kind: CommandKind::Transfer {
                from: AccountId::new("a1").expect("id"),
                to: AccountId::new("a2").expect("id"),
                amount: 5,
                currency: usd,
            },
        });
        assert_eq!(transfer.event_count, 2);
        writer.append(&transfer).expect("append");
        writer.commit().expect("commit");
        let id = RecordId::of(&transfer);
        assert_eq!(
            journal_record_at(&dir, 41).expect("scan"),
            Some((id, false))
        );
        assert_eq!(journal_record_at(&dir, 42).expect("scan"), Some((id, true)));
        assert_eq!(
            journal_record_at(&dir, 40).expect("scan"),
            Some((RecordId::of(&records[39]), true))
        );
        let id = RecordId::of(&records[3]);
        assert_eq!(RecordId::parse(&id.to_string()).ok(), Some(id));
        assert!(RecordId::parse("nonsense@1").is_err());
    }

    /// Runs `future` on a fresh single-threaded runtime (with timers and sockets).
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    /// An engine that accepts the connection and never answers (its host vanished without a
    /// FIN or RST): the request fails after its wait and margin, instead of holding the
    /// replicator forever.
    #[test]
    fn a_request_that_is_never_answered_fails_within_its_bound() {
        block_on(async {
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = silent.local_addr().expect("address");
            let held = tokio::spawn(async move {
                let mut streams = Vec::new();
                while let Ok((stream, _)) = silent.accept().await {
                    streams.push(stream);
                }
            });
            let mut source = HttpSource::new(&address.to_string()).expect("source");
            source.answer_margin = Duration::from_millis(300);
            let started = std::time::Instant::now();
            let outcome = tokio::time::timeout(
                Duration::from_secs(20),
                source.lines(1, 10, Duration::from_millis(200)),
            )
            .await
            .expect("the request was still waiting after 20 s");
            let error = outcome.err().expect("no answer is an error");
            assert!(
                format!("{error:#}").contains("no answer within"),
                "{error:#}"
            );
            assert!(error.is::<Unavailable>(), "retried: {error:#}");
            assert!(started.elapsed() < Duration::from_secs(5));
            held.abort();
        });
    }

    /// An engine that closes a kept-alive connection as the next request arrives (its idle
    /// timeout ran out as the replicator asked): the request is asked again at once on a new
    /// connection, not failed. Only once: a new connection that fails the same way is a failure.
    #[test]
    fn a_kept_alive_connection_closed_by_the_engine_is_replaced_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            // Connection 1: one answer, then the next request is read and the connection closed
            // unanswered. Connection 2: one answer. Connection 3: closed unanswered.
            let server = tokio::spawn(async move {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                let mut buffer = [0u8; 4096];
                let (mut first, _) = listener.accept().await.expect("accept");
                let _ = first.read(&mut buffer).await;
                first.write_all(answer).await.expect("write");
                let _ = first.read(&mut buffer).await;
                drop(first);
                let (mut second, _) = listener.accept().await.expect("accept");
                let _ = second.read(&mut buffer).await;
                second.write_all(answer).await.expect("write");
                let _ = second.read(&mut buffer).await;
                drop(second);
                let (mut third, _) = listener.accept().await.expect("accept");
                let _ = third.read(&mut buffer).await;
                drop(third);
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    held.push(stream);
                }
            });
            let mut source = HttpSource::new(&address.to_string()).expect("source");
            source.answer_margin = Duration::from_millis(500);
            let first = source.lines(1, 10, Duration::ZERO).await;
            assert!(first.is_ok_and(|l| l.is_empty()));
            let second = source.lines(1, 10, Duration::ZERO).await;
            assert!(
                second.as_ref().is_ok_and(|l| l.is_empty()),
                "a closed kept-alive connection failed the read: {:#}",
                second.err().map(|e| format!("{e:#}")).unwrap_or_default()
            );
            // The second connection is closed too, and so is the one that replaces it: a failure.
            let third = source.lines(1, 10, Duration::ZERO).await;
            let error = third.err().expect("two closed connections in a row");
            assert!(error.is::<Unavailable>(), "{error:#}");
            server.abort();
        });
    }

    /// A 429 (the engine's journal reads are all taken) is retried like a 5xx; another 4xx
    /// is not.
    #[test]
    fn a_busy_engine_is_retried_and_a_refusal_is_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (status, retried) in [("429 Too Many Requests", true), ("403 Forbidden", false)] {
            block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let address = listener.local_addr().expect("address");
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\n{{}}");
                let server = tokio::spawn(async move {
                    let (mut stream, _) = listener.accept().await.expect("accept");
                    let mut buffer = [0u8; 4096];
                    let _ = stream.read(&mut buffer).await;
                    stream.write_all(answer.as_bytes()).await.expect("write");
                    let _ = stream.read(&mut buffer).await;
                });
                let mut source = HttpSource::new(&address.to_string()).expect("source");
                let error = source
                    .lines(1, 10, Duration::from_millis(0))
                    .await
                    .err()
                    .expect("an error answer");
                assert_eq!(error.is::<Unavailable>(), retried, "{status}: {error:#}");
                server.abort();
            });
        }
    }

    /// Failures are retried with a growing pause for as long as they last less than the
    /// limit; a success starts the count again.
    #[test]
    fn source_failures_are_retried_until_they_have_lasted_too_long() {
        let mut retry = SourceRetry::new(Duration::from_millis(300));
        let failure = || anyhow::Error::new(Unavailable("HTTP 503: starting".into()));
        assert_eq!(
            retry.failed(failure()).ok(),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            retry.failed(failure()).ok(),
            Some(Duration::from_millis(400))
        );
        std::thread::sleep(Duration::from_millis(350));
        let error = retry.failed(failure()).expect_err("failing for 350 ms");
        assert!(format!("{error:#}").contains("giving up"), "{error:#}");
        retry.succeeded();
        assert_eq!(
            retry.failed(failure()).ok(),
            Some(Duration::from_millis(200))
        );
        let mut long = SourceRetry::new(Duration::from_secs(60));
        for _ in 0..10 {
            let _ = long.failed(failure());
        }
        assert_eq!(long.failed(failure()).ok(), Some(Duration::from_secs(5)));
        // What asking again cannot fix is returned at once.
        let refused = anyhow::anyhow!("GET /v1/wallet/events: HTTP 401 Unauthorized");
        assert!(
            SourceRetry::new(Duration::from_secs(60))
                .failed(refused)
                .is_err()
        );
    }

    /// A scripted engine for the HTTP source: answers `GET /v1/wallet/events?from_seq=&limit=`
    /// with the lines of the history it holds now; replacing the history (an engine restarted
    /// with another tail) closes the connections it had.
    struct ScriptedEngine {
        history: std::sync::Arc<std::sync::Mutex<(u64, Vec<String>)>>,
        address: std::net::SocketAddr,
    }

    impl ScriptedEngine {
        async fn start(history: Vec<String>) -> ScriptedEngine {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let history = std::sync::Arc::new(std::sync::Mutex::new((0u64, history)));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            let shared = history.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let generation = shared.lock().expect("lock").0;
                        let mut request = Vec::new();
                        let mut buffer = [0u8; 4096];
                        loop {
                            let Ok(n) = stream.read(&mut buffer).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            request.extend_from_slice(&buffer[..n]);
                            let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n")
                            else {
                                continue;
                            };
                            let head = String::from_utf8_lossy(&request[..end]).to_string();
                            request.drain(..end + 4);
                            let (now, lines) = {
                                let guard = shared.lock().expect("lock");
                                (guard.0, guard.1.clone())
                            };
                            if now != generation {
                                return; // restarted: this connection is gone
                            }
                            let query = |name: &str| -> usize {
                                head.split(['?', '&', ' '])
                                    .find_map(|p| p.strip_prefix(&format!("{name}=")))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0)
                            };
                            let from = query("from_seq").max(1);
                            let limit = query("limit");
                            // As the engine does: past one after its last event is a 400.
                            let answer = if from > lines.len() + 1 {
                                let body = r#"{"error":{"code":"invalid_request","field":"from_seq","message":"is past the end"}}"#;
                                format!(
                                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                            } else {
                                let body: String = lines
                                    .iter()
                                    .skip(from - 1)
                                    .take(limit)
                                    .map(|l| format!("{l}\n"))
                                    .collect();
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                            };
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            ScriptedEngine { history, address }
        }

        /// The engine restarts holding `lines`.
        fn restart_with(&self, lines: Vec<String>) {
            let mut guard = self.history.lock().expect("lock");
            guard.0 += 1;
            guard.1 = lines;
        }
    }

    /// Event lines: account `a` opened at 1, then deposits of 1.00 with transaction ids
    /// `tag`-numbered from sequence 2 to `last`.
    fn deposit_lines(tag: u128, last: u64) -> Vec<String> {
        let mut lines = vec![format!(
            r#"{{"sequence":1,"transaction_id":"{}","kind":"account_opened","timestamp_ns":1,"account_id":"a"}}"#,
            uuid::Uuid::from_u128(1)
        )];
        for seq in 2..=last {
            lines.push(format!(
                r#"{{"sequence":{seq},"transaction_id":"{}","kind":"deposited","timestamp_ns":{seq},"account_id":"a","currency":"USD","amount":"1.00","balance_after":"{}.00"}}"#,
                uuid::Uuid::from_u128(tag << 64 | u128::from(seq)),
                seq - 1
            ));
        }
        lines
    }

    /// A source on `engine` that has read its first 100 records.
    async fn read_from_start(engine: &ScriptedEngine) -> (Source, Vec<Item>) {
        let mut source =
            Source::Http(HttpSource::new(&engine.address.to_string()).expect("source"));
        let mut items = Vec::new();
        source
            .fetch(100, Duration::ZERO, &mut items)
            .await
            .expect("fetch");
        (source, items)
    }

    /// `fetch`, tried again after a failure as the replicators do (the first read after an
    /// engine restart finds its connection closed), except after a `HistoryChanged`.
    async fn fetch_retrying(source: &mut Source, items: &mut Vec<Item>) -> anyhow::Result<()> {
        let mut result = Ok(());
        for _ in 0..3 {
            result = source.fetch(100, Duration::ZERO, items).await;
            match &result {
                Err(e) if !e.is::<HistoryChanged>() => continue,
                _ => return result,
            }
        }
        result
    }

    /// An engine that comes back after a restart with the history the replicator read goes on
    /// from where it was; one that comes back with another tail (it lost the records the
    /// replicator read, then wrote others under their sequence numbers) is refused before any
    /// of its records is yielded, and for good (not retried).
    #[test]
    fn an_engine_that_comes_back_with_another_history_is_refused() {
        block_on(async {
            let engine = ScriptedEngine::start(deposit_lines(7, 10)).await;
            let (mut source, mut items) = read_from_start(&engine).await;
            assert_eq!(items.len(), 10);
            assert_eq!(source.next_seq(), 11);

            // The same history, grown: read on.
            let mut grown = deposit_lines(7, 10);
            grown.extend(deposit_lines(7, 12).into_iter().skip(10));
            engine.restart_with(grown);
            items.clear();
            fetch_retrying(&mut source, &mut items)
                .await
                .expect("fetch after a restart");
            assert_eq!(items.iter().map(Item::seq).collect::<Vec<_>>(), [11, 12]);

            // Another tail from sequence 6 on, longer than what was read.
            let mut other = deposit_lines(7, 5);
            other.extend(deposit_lines(9, 20).into_iter().skip(5));
            engine.restart_with(other);
            items.clear();
            let error = fetch_retrying(&mut source, &mut items)
                .await
                .expect_err("another history");
            assert!(items.is_empty(), "records of another history were yielded");
            assert!(error.is::<HistoryChanged>(), "{error:#}");
            assert!(format!("{error:#}").contains("sequence 12"), "{error:#}");
            let mut retry = SourceRetry::new(Duration::from_secs(60));
            assert!(retry.failed(error).is_err(), "retried");

            // A shorter one: it does not reach what was read.
            let (mut fresh, mut items) = read_from_start(&engine).await;
            engine.restart_with(deposit_lines(9, 8));
            let error = fetch_retrying(&mut fresh, &mut items)
                .await
                .expect_err("a shorter history");
            assert!(
                format!("{error:#}").contains("no longer reaches sequence 20"),
                "{error:#}"
            );
        });
    }

    /// A source resumed after the records a replicator holds from elsewhere (`resume_after`)
    /// confirms the last of them before it yields anything: the same engine is read on from
    /// there, another history's (replaced before the first read, or after it) is refused.
    #[test]
    fn a_source_resumed_after_known_records_confirms_the_last_one() {
        block_on(async {
            let engine = ScriptedEngine::start(deposit_lines(7, 12)).await;
            let (mut reader, _) = read_from_start(&engine).await;
            let known = reader
                .record_at(10)
                .await
                .expect("record_at")
                .expect("reaches 10")
                .0;

            let mut source =
                Source::Http(HttpSource::new(&engine.address.to_string()).expect("source"));
            source.resume_after(10, Some(known)).expect("resume");
            let mut items = Vec::new();
            fetch_retrying(&mut source, &mut items)
                .await
                .expect("the same history");
            assert_eq!(items.iter().map(Item::seq).collect::<Vec<_>>(), [11, 12]);

            // Replaced by another history's engine after the first read.
            engine.restart_with(deposit_lines(9, 20));
            items.clear();
            let error = fetch_retrying(&mut source, &mut items)
                .await
                .expect_err("another history");
            assert!(error.is::<HistoryChanged>(), "{error:#}");
            assert!(items.is_empty(), "records of another history were yielded");

            // Replaced before the first read.
            let mut fresh =
                Source::Http(HttpSource::new(&engine.address.to_string()).expect("source"));
            fresh.resume_after(10, Some(known)).expect("resume");
            let error = fetch_retrying(&mut fresh, &mut items)
                .await
                .expect_err("another history before the first read");
            assert!(error.is::<HistoryChanged>(), "{error:#}");
            assert!(format!("{error:#}").contains("sequence 10"), "{error:#}");
            assert!(items.is_empty(), "records of another history were yielded");
        });
    }

    /// An engine that answers "nothing new" at once instead of holding the read (its request
    /// timeout leaves no room for a long poll) is not polled in a loop: an empty answer that
    /// came sooner is followed by the rest of the read's wait.
    #[test]
    fn an_empty_answer_before_the_wait_is_paced() {
        block_on(async {
            let engine = ScriptedEngine::start(deposit_lines(7, 3)).await;
            let (mut source, mut items) = read_from_start(&engine).await;
            assert_eq!(items.len(), 3);
            items.clear();
            let started = std::time::Instant::now();
            source
                .fetch(100, Duration::from_millis(300), &mut items)
                .await
                .expect("fetch");
            assert!(items.is_empty());
            assert!(
                started.elapsed() >= Duration::from_millis(290),
                "an empty answer came back after {:?}, before the 300 ms wait",
                started.elapsed()
            );
            // Not when something came (the scripted engine answers at once either way).
            let mut fresh =
                Source::Http(HttpSource::new(&engine.address.to_string()).expect("source"));
            let started = std::time::Instant::now();
            fresh
                .fetch(100, Duration::from_millis(300), &mut items)
                .await
                .expect("fetch");
            assert_eq!(items.len(), 3);
            assert!(started.elapsed() < Duration::from_millis(290));
        });
    }

    /// With a token (`WALLET_SOURCE_TOKEN`), every request to the engine carries it.
    #[test]
    fn requests_carry_the_source_token() {
        block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            let head = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buffer).await.expect("read");
                    assert!(n > 0, "closed before the request's head");
                    request.extend_from_slice(&buffer[..n]);
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .expect("write");
                String::from_utf8_lossy(&request).to_lowercase()
            });
            let mut source = HttpSource::new(&address.to_string()).expect("source");
            source.token = Some("the-token".into());
            let lines = source.lines(1, 10, Duration::ZERO).await.expect("lines");
            assert!(lines.is_empty());
            let head = head.await.expect("server");
            assert!(head.contains("authorization: bearer the-token"), "{head}");
        });
    }
}
