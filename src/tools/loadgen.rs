//! `wallet loadgen`: HTTP load with latency measured from each request's intended send time
//! (open loop), so that a stalled server cannot hide its stalls (coordinated omission).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::tools::rng::SplitMix;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Transfers per second to offer (open loop); 0 runs closed loop as fast as answers come.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Transfers per request; above 1 uses the batch endpoint.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 1000)]
    pub accounts: u32,
    /// Open the accounts and deposit into them first.
    #[arg(long)]
    pub setup: bool,
    /// Seed of the transfers' accounts and transaction ids. Default: a fresh random seed, so
    /// that a second run against the same server sends new transfers; the seed is printed in
    /// the report, and passing it again repeats the run's ids exactly (the server then answers
    /// them as idempotent replays, counted apart as `replayed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Send requests to this fixed path instead (to measure a bare server with the same client).
    #[arg(long)]
    pub raw_path: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Mint bearer tokens with this HS256 secret: an admin token for --setup and one per
    /// account (sub = the debit account) for transfers.
    #[arg(long, env = "WALLET_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM CA certificate to trust for https:// URLs.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Write the histogram (.hgrm) and a latency-by-percentile chart (.svg) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The largest share of the offered transfers (requests, with `--raw-path`) that may fail
    /// (errors, answers other than 200, batch items refused, requests left unsent) in a run
    /// that counts: above it the run exits 1 after its report, which is then a measurement of
    /// failures, not of the server's speed. 1 accepts any run in which something succeeded.
    #[arg(long, default_value_t = 0.01, value_parser = parse_share)]
    pub max_failure_share: f64,
}

/// A share from 0 to 1.
fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("{text:?} is not a share from 0 to 1")),
    }
}

/// The achieved share of an open loop's offered rate below which the report warns.
const RATE_ACHIEVED_WARNING: f64 = 0.99;

/// The 99th percentile of an open loop's send lag above which the report warns (tokio's timer
/// alone makes up to a millisecond).
const SEND_LAG_WARNING_US: u64 = 10_000;

impl LoadgenReport {
    /// A run in which nothing succeeded is a failed run (its report is printed first): no
    /// transfer committed or replayed, or with `--raw-path` no 2xx answer. Without `--setup`
    /// against a fresh server, every transfer is a 422 `account_not_found`. So is a run in
    /// which more than `--max-failure-share` of what it offered failed: its throughput and
    /// latencies are of the share that got through, and say little about the server.
    pub fn check_succeeded(&self, args: &LoadgenArgs) -> anyhow::Result<()> {
        let succeeded = if args.raw_path.is_some() {
            self.status_counts
                .iter()
                .filter(|(status, _)| status.starts_with('2'))
                .map(|(_, count)| count)
                .sum::<u64>()
        } else {
            self.transfers + self.replayed
        };
        anyhow::ensure!(
            succeeded > 0,
            "nothing succeeded in this run (answers by status: {:?}, errors: {}){}",
            self.status_counts,
            self.errors,
            // Only where answers say so (a 422 `account_not_found`, or refused items of a
            // batch): after timeouts, 401s or 413s the hint sent the reader the wrong way.
            if args.raw_path.is_none()
                && !args.setup
                && (self.status_counts.contains_key("422") || self.rejected_items > 0)
            {
                "; without --setup the accounts may not exist"
            } else {
                ""
            }
        );
        anyhow::ensure!(
            self.failed_share <= args.max_failure_share,
            "{} of the {} {} this run offered failed ({:.2}%, more than --max-failure-share {}): \
             answers by status {:?}, errors {:?}, batch items refused {}, unsent {}; its rates and \
             latencies are of what got through",
            self.failed,
            self.offered,
            if args.raw_path.is_some() {
                "requests"
            } else {
                "transfers"
            },
            self.failed_share * 100.0,
            args.max_failure_share,
            self.status_counts,
            self.errors_by_kind,
            self.rejected_items,
            self.unsent,
        );
        Ok(())
    }

    /// Warnings about a run that counts but is not what was asked for: an open loop that did
    /// not reach its offered rate, a run in which some requests failed.
    pub fn warnings(&self, args: &LoadgenArgs) -> Vec<String> {
        let mut warnings = Vec::new();
        let lag_p99 = self
            .send_lag_us
            .as_ref()
            .and_then(|l| l.get("p99"))
            .copied()
            .unwrap_or(0);
        if let Some(achieved) = self.rate_achieved_share
            && achieved < RATE_ACHIEVED_WARNING
        {
            warnings.push(format!(
                "WARNING: the run offered {:.0} transfers/s of the {} asked ({:.1}%): it was not \
                 a run at that rate (send lag p99 {lag_p99} us)",
                achieved * self.rate as f64,
                self.rate,
                achieved * 100.0,
            ));
        }
        if lag_p99 > SEND_LAG_WARNING_US {
            warnings.push(format!(
                "WARNING: requests went out late (send lag p99 {lag_p99} us): each connection \
                 waits for its answer before its next request, so a slow server (or too few \
                 --connections, or a busy generator) delays them; the latencies count from the \
                 due times and include that wait"
            ));
        }
        if self.failed > 0 && self.failed_share <= args.max_failure_share {
            warnings.push(format!(
                "WARNING: {} of the {} offered failed ({:.2}%); latency_us is of the successes \
                 only, latency_failed_us of the failures",
                self.failed,
                self.offered,
                self.failed_share * 100.0
            ));
        }
        warnings
    }
}

#[derive(Debug, Serialize)]
pub struct LoadgenReport {
    pub requests: u64,
    /// Transfers committed by this run: answered 200 and not as a replay of an earlier request.
    pub transfers: u64,
    /// Transfers answered as idempotent replays (`Idempotent-Replayed: true`, or `"replayed":
    /// true` in a batch): ids the server had already executed. Not counted in `transfers`.
    pub replayed: u64,
    pub seed: u64,
    pub seconds: f64,
    pub transfers_per_sec: f64,
    pub requests_per_sec: f64,
    pub status_counts: BTreeMap<String, u64>,
    /// Errors: connections that failed, answers that could not be read, and requests without an
    /// answer by the run's deadline (`DRAIN_LIMIT` after its end).
    pub errors: u64,
    /// `errors` by kind: `timeout` (no answer by the deadline), `connect` (a connection could
    /// not be opened), `other` (the connection failed or the answer could not be read).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Requests sent a second time on a fresh connection because the kept-alive one failed
    /// before any byte of an answer (the server closed it while idle, usually); each answer's
    /// latency includes the reconnect. Counted once in `requests`.
    pub resent: u64,
    /// Open loop: requests that were due before the end but still unsent when the drain limit
    /// (`DRAIN_LIMIT` after the end) ran out; a server that stalled at the end shows here.
    pub unsent: u64,
    /// Batch items answered with a status other than 200 inside a 200 batch answer
    /// (rejections, overload, a full ledger): neither committed nor replayed. (A single
    /// request's refusal is in `status_counts`.)
    pub rejected_items: u64,
    /// Latency of the answers that committed transfers (of 2xx answers, with `--raw-path`):
    /// replays, rejections, overload answers and errors are not in it. `null` when there was
    /// no such answer.
    pub latency_us: Option<BTreeMap<String, u64>>,
    /// Latency of every answer and error, whatever it was, and of every `unsent` request,
    /// counted from its due time to the run's deadline (a lower bound: it never got an answer).
    /// `null` when nothing was sent.
    pub latency_all_us: Option<BTreeMap<String, u64>>,
    /// Latency of the requests that failed as a whole (errors, answers other than 200, or
    /// other than 2xx with `--raw-path`) and of the `unsent` ones as in `latency_all_us`: fast
    /// refusals pull `latency_all_us` down, and show here instead. `null` when none failed.
    pub latency_failed_us: Option<BTreeMap<String, u64>>,
    /// What was offered, in transfers (requests, with `--raw-path`): the requests sent and
    /// left unsent, times the batch size.
    pub offered: u64,
    /// Of `offered`, what failed: errored, refused or unsent requests whole, and the refused
    /// items of batches answered 200. Replays are not failures.
    pub failed: u64,
    /// `failed / offered` (0 when nothing was offered).
    pub failed_share: f64,
    /// Open loop: how late each request was sent after its due time, in microseconds (the
    /// generator's own lateness, told apart from the server's). `null` in a closed loop.
    pub send_lag_us: Option<BTreeMap<String, u64>>,
    /// Open loop: the transfers offered per second over the run (until its last request went
    /// out) as a share of `--rate`; below 0.99 the run warns that it did not hold the rate, and
    /// a send lag p99 over 10 ms is warned about too. `null` in a closed loop.
    pub rate_achieved_share: Option<f64>,
    pub rate: u64,
    pub connections: usize,
    pub batch: usize,
}

/// Where to connect: host:port, and a TLS connector for https:// URLs.
#[derive(Clone)]
struct Target {
    host: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    )>,
}

fn target(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Target> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => anyhow::bail!("--url must start with http:// or https://"),
    };
    let (host, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // The routes are fixed (`/v1/wallet/...`, or `--raw-path`): a path here would be dropped
    // without a word, and a prefix a proxy needs would never be sent.
    if !path.is_empty() && path != "/" {
        anyhow::bail!(
            "--url names the server only (http[s]://host:port), not a path: {path:?} would not be sent (the routes are /v1/wallet/...; --raw-path sends one path of your choice)"
        );
    }
    if host.is_empty() {
        anyhow::bail!("--url names no host: {url:?}");
    }
    // `user@host`: loadgen sends no credentials, and the name would be looked up whole.
    anyhow::ensure!(
        !host.contains('@'),
        "--url {url:?}: credentials (user@) are not sent; name the server only (--jwt-secret mints tokens)"
    );
    let host = host.to_string();
    if !tls {
        // Plain HTTP trusts nothing: a --ca given with it was meant for an https:// URL.
        anyhow::ensure!(
            ca.is_none(),
            "--ca is for an https:// --url; {url:?} is plain HTTP"
        );
        return Ok(Target { host, tls: None });
    }
    let ca =
        ca.ok_or_else(|| anyhow::anyhow!("https:// needs --ca with the server's CA certificate"))?;
    let mut roots = rustls::RootCertStore::empty();
    let named = |e: &dyn std::fmt::Display| anyhow::anyhow!("--ca {}: {e}", ca.display());
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| named(&e))? {
        roots
            .add(cert.map_err(|e| named(&e))?)
            .map_err(|e| named(&e))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "--ca {}: no PEM certificate in the file",
        ca.display()
    );
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The name the certificate must carry: the host without its port, an IPv6 address
    // without its brackets.
    let name = match host.strip_prefix('[') {
        Some(inside) => inside.split_once(']').map_or(inside, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h),
    };
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| anyhow::anyhow!("--url {url:?}: {name:?} is no server name: {e}"))?;
    Ok(Target {
        host,
        tls: Some((
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            server_name,
        )),
    })
}

/// A response's status line and headers, as far as loadgen needs them.
struct Head {
    status: u16,
    /// Bytes of the status line and headers.
    length: usize,
    length_of_body: usize,
    close: bool,
    /// `Idempotent-Replayed: true`: the server answered with an earlier request's outcome.
    replayed: bool,
}

/// Parses a response head from the start of `buffer`; `None` while it is incomplete.
fn parse_head(buffer: &[u8]) -> anyhow::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(length) = response.parse(buffer)? else {
        return Ok(None);
    };
    let status = response.code.unwrap_or(0);
    let mut length_of_body = None;
    let mut close = false;
    let mut replayed = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            length_of_body = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!(
                "the server sent a chunked response; loadgen reads Content-Length bodies only"
            );
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = header.value.eq_ignore_ascii_case(b"close");
        } else if header.name.eq_ignore_ascii_case("idempotent-replayed") {
            replayed = header.value.eq_ignore_ascii_case(b"true");
        }
    }
    let length_of_body = length_of_body
        .ok_or_else(|| anyhow::anyhow!("response without Content-Length (status {status})"))?;
    Ok(Some(Head {
        status,
        length,
        length_of_body,
        close,
        replayed,
    }))
}

/// One response: its status, whether it was an idempotent replay, and its body.
struct Answer {
    status: u16,
    replayed: bool,
    body: Bytes,
    /// Sent a second time, on a fresh connection, after the kept-alive one failed before any
    /// byte of a response: the first send may have reached the server and executed.
    resent: bool,
}

/// An error of a known kind, for `errors_by_kind` (any other error is `other`).
#[derive(Debug)]
struct Failure {
    /// `timeout` (no answer by the deadline) or `connect` (no connection).
    kind: &'static str,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

fn failure(kind: &'static str, message: String) -> anyhow::Error {
    anyhow::Error::new(Failure { kind, message })
}

/// The `errors_by_kind` name of an error.
fn error_kind(error: &anyhow::Error) -> &'static str {
    error.downcast_ref::<Failure>().map_or("other", |f| f.kind)
}

/// Sends one request with `client`, giving up at `deadline` (an error: the server did not
/// answer in time). Cancelling is safe: the client drops a connection whose exchange did not
/// finish, and the next request opens a new one.
async fn send_by(
    client: &mut Client,
    deadline: Instant,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<Answer> {
    tokio::time::timeout_at(deadline.into(), client.send_as(method, path, body, token))
        .await
        .map_err(|_| {
            failure(
                "timeout",
                format!("no answer to {method} {path} by the deadline"),
            )
        })?
}

/// Committed and replayed transfers in one answer, and a batch's items answered with another
/// status (rejected, refused for overload or a full ledger) inside its 200. A batch's body
/// holds one result per transfer, `{"index":i,"http_status":s,"replayed":b,"result":{…}}`, in
/// the server's fixed layout. A replay answering a resend is this run's own commit when its
/// first send reached the server and the connection died before the answer: then it counts as
/// committed. It is told apart by its sequence, above `start_seq` (the server's durable
/// sequence when the run started), from an earlier run's commit of the same id (a repeated
/// `--seed`), whose first send here never reached the engine (the server had closed the idle
/// connection): that one stays a replay, as does any when `start_seq` is unknown.
fn tally(answer: &Answer, batch: bool, start_seq: Option<u64>) -> (u64, u64, u64) {
    let (committed, replayed, other) = if !batch {
        match (answer.status, answer.replayed) {
            (200, false) => (1, 0, 0),
            (200, true) => (0, 1, 0),
            _ => (0, 0, 0),
        }
    } else if answer.status != 200 {
        (0, 0, 0)
    } else {
        let count =
            |pattern: &[u8]| memchr::memmem::find_iter(&answer.body, pattern).count() as u64;
        let committed = count(br#""http_status":200,"replayed":false"#);
        let replayed = count(br#""http_status":200,"replayed":true"#);
        let items = count(br#""http_status":"#);
        (
            committed,
            replayed,
            items.saturating_sub(committed + replayed),
        )
    };
    if answer.resent && replayed > 0 {
        let ours = replayed_sequences(answer, batch)
            .into_iter()
            .filter(|&seq| start_seq.is_some_and(|start| seq > start))
            .count() as u64;
        let ours = ours.min(replayed);
        (committed + ours, replayed - ours, other)
    } else {
        (committed, replayed, other)
    }
}

/// The sequences of the transfers a replay answered with: the body's, or each replayed
/// committed item's in a batch.
fn replayed_sequences(answer: &Answer, batch: bool) -> Vec<u64> {
    let body = &answer.body[..];
    let sequence_after = |from: usize| -> Option<u64> {
        let at = memchr::memmem::find(&body[from..], br#""sequence":"#)? + from + 11;
        let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&body[at..at + digits])
            .ok()?
            .parse()
            .ok()
    };
    if !batch {
        return sequence_after(0).into_iter().collect();
    }
    memchr::memmem::find_iter(body, br#""http_status":200,"replayed":true"#)
        .filter_map(sequence_after)
        .collect()
}

/// The server's durable sequence, from `/metrics` (`wallet_durable_sequence`), or None if it
/// cannot be read within 2 s (a server that never answers must not hold the run).
async fn durable_sequence(host: &Target) -> Option<u64> {
    let read = async {
        let mut client = Client::connect(host).await.ok()?;
        client.send_as("GET", "/metrics", None, None).await.ok()
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()??;
    if answer.status != 200 {
        return None;
    }
    std::str::from_utf8(&answer.body)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("wallet_durable_sequence "))?
        .trim()
        .parse()
        .ok()
}

/// The seed of connection `worker`'s generator: the run's seed and the worker mixed by a hash.
/// (`seed * 31 + worker + 1` gave seed s + 1 on connection w the ids of seed s on connection
/// w + 31: two runs with neighbouring seeds resent each other's transfers, answered as
/// replays, and the second looked slower.)
fn worker_seed(seed: u64, worker: usize) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&seed.to_le_bytes(), worker as u64 + 1)
}

/// Open loop: when request `i` is due after the start, `i * batch / rate` seconds, in integer
/// nanoseconds so that the send loop and the report's `due` count agree exactly.
fn due_after(i: u64, batch: usize, rate: u64) -> Duration {
    let ns = u128::from(i) * batch as u128 * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Open loop: how many requests are due before the end (`due_after(i) < duration` exactly when
/// `i * batch < duration * rate`).
fn due_count(duration_secs: u64, rate: u64, batch: usize) -> u64 {
    duration_secs.saturating_mul(rate).div_ceil(batch as u64)
}

/// How long an open-loop run goes on past its end to send requests that were already due.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// At most this many distinct latencies stand for the unsent requests in `latency_all_us`.
const UNSENT_GROUPS: u64 = 4096;

/// Records `unsent` requests, taken to be the last ones due of the `due` (`wait(i)` is how long
/// request `i` waited until the run gave up on it), in at most `UNSENT_GROUPS` groups, each at
/// the wait of its latest-due member, which is the shortest in the group: every recorded
/// latency is a lower bound of a real one.
fn record_unsent(
    histogram: &mut Histogram<u64>,
    unsent: u64,
    due: u64,
    wait: impl Fn(u64) -> Duration,
) -> anyhow::Result<()> {
    let first = due.saturating_sub(unsent);
    let group = unsent.div_ceil(UNSENT_GROUPS).max(1);
    let mut i = first;
    while i < due {
        let count = group.min(due - i);
        let latest = i + count - 1;
        let us = u64::try_from(wait(latest).as_micros()).unwrap_or(u64::MAX);
        histogram.record_n(us.clamp(1, histogram.high()), count)?;
        i += count;
    }
    Ok(())
}

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Any byte stream a client connection runs over (plain TCP or TLS).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Io for T {}

/// A minimal HTTP/1.1 client connection: one request at a time over a keep-alive connection,
/// requests written from one buffer, responses read with `httparse` and `Content-Length`
/// (what `wallet serve` and `serve-fixed` send; anything else is an error, never a guess).
/// hyper's client cost so much per request that the generator, not the server, was the limit:
/// 38k requests/s against a bare hyper server that `wrk` drove to 123k on the same machine.
struct Client {
    stream: Option<Box<dyn Io>>,
    target: Target,
    request: Vec<u8>,
    buffer: bytes::BytesMut,
    /// Whether a byte of the current response has arrived.
    response_started: bool,
}

impl Client {
    async fn connect(target: &Target) -> anyhow::Result<Client> {
        let mut client = Client {
            stream: None,
            target: target.clone(),
            request: Vec::with_capacity(1024),
            buffer: bytes::BytesMut::with_capacity(16 * 1024),
            response_started: false,
        };
        client.stream = Some(client.open().await?);
        Ok(client)
    }

    async fn open(&self) -> anyhow::Result<Box<dyn Io>> {
        // Bounded: a server whose accept queue is full drops the SYN, and the kernel would
        // retry for minutes; a load test must stop by itself.
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.target.host),
        )
        .await
        .map_err(|_| {
            failure(
                "connect",
                format!(
                    "connecting to {} timed out after {CONNECT_TIMEOUT:?}",
                    self.target.host
                ),
            )
        })?
        .map_err(|e| {
            failure(
                "connect",
                format!("connecting to {}: {e}", self.target.host),
            )
        })?;
        stream.set_nodelay(true)?;
        Ok(match &self.target.tls {
            None => Box::new(stream),
            // The handshake is bounded too: a port that accepts and never answers it would
            // hold the run forever.
            Some((connector, name)) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), stream))
                    .await
                    .map_err(|_| {
                        failure(
                            "connect",
                            format!(
                                "the TLS handshake with {} timed out after {CONNECT_TIMEOUT:?}",
                                self.target.host
                            ),
                        )
                    })?
                    .map_err(|e| {
                        failure(
                            "connect",
                            format!("the TLS handshake with {}: {e}", self.target.host),
                        )
                    })?,
            ),
        })
    }

    /// Sends one request and reads its response. After any error the connection is dropped
    /// and the next request opens a new one. A kept-alive connection that the server closed
    /// while it was idle (hyper closes one after its header-read timeout) fails before any byte
    /// of a response arrives: the request is then sent once more on a fresh connection, as
    /// hyper's client did. (Sending a transfer twice is safe: its transaction id makes it
    /// idempotent.)
    async fn send_as(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> anyhow::Result<Answer> {
        self.build_request(method, path, body.as_deref(), token);
        let reused = self.stream.is_some();
        let mut result = self.exchange().await;
        if result.is_err() && reused && !self.response_started {
            self.stream = None;
            result = self.exchange().await;
            if let Ok(answer) = result.as_mut() {
                answer.resent = true;
            }
        }
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn build_request(&mut self, method: &str, path: &str, body: Option<&str>, token: Option<&str>) {
        let request = &mut self.request;
        request.clear();
        request.extend_from_slice(method.as_bytes());
        request.push(b' ');
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(self.target.host.as_bytes());
        if body.is_some() {
            request.extend_from_slice(b"\r\ncontent-type: application/json");
        }
        if let Some(token) = token {
            request.extend_from_slice(b"\r\nauthorization: Bearer ");
            request.extend_from_slice(token.as_bytes());
        }
        let body = body.unwrap_or_default();
        request.extend_from_slice(b"\r\ncontent-length: ");
        request.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(body.as_bytes());
    }

    /// Writes the prepared request and reads one response.
    async fn exchange(&mut self) -> anyhow::Result<Answer> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.response_started = false;
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                self.buffer.clear();
                self.open().await?
            }
        };
        stream.write_all(&self.request).await?;
        // TLS streams may hold the end of the request until flushed.
        stream.flush().await?;
        loop {
            if let Some(head) = parse_head(&self.buffer)? {
                while self.buffer.len() < head.length + head.length_of_body {
                    if stream.read_buf(&mut self.buffer).await? == 0 {
                        anyhow::bail!("the server closed the connection mid-response");
                    }
                }
                let mut message = self
                    .buffer
                    .split_to(head.length + head.length_of_body)
                    .freeze();
                let body = message.split_off(head.length);
                if !head.close {
                    self.stream = Some(stream);
                }
                return Ok(Answer {
                    status: head.status,
                    replayed: head.replayed,
                    body,
                    resent: false,
                });
            }
            if self.buffer.capacity() - self.buffer.len() < 4096 {
                self.buffer.reserve(16 * 1024);
            }
            if stream.read_buf(&mut self.buffer).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
            self.response_started = true;
        }
    }
}

fn account(i: u64) -> String {
    format!("lg-{i:07}")
}

fn uuid(rng: &mut SplitMix) -> String {
    uuid::Builder::from_random_bytes(rng.next_u128().to_le_bytes())
        .into_uuid()
        .hyphenated()
        .to_string()
}

fn transfer_body(rng: &mut SplitMix, accounts: u64) -> String {
    let from = rng.next_u64() % accounts;
    transfer_from(rng, accounts, from)
}

fn transfer_from(rng: &mut SplitMix, accounts: u64, from: u64) -> String {
    let mut to = rng.next_u64() % accounts;
    if to == from {
        to = (to + 1) % accounts;
    }
    format!(
        r#"{{"from_account":"{}","to_account":"{}","amount":"0.01","currency":"USD","transaction_id":"{}"}}"#,
        account(from),
        account(to),
        uuid(rng)
    )
}

/// Seeds the deposits of `--setup` (with the account's number).
const SETUP_SEED: u64 = 0x5E7_5E7_5E7;

/// How long `--setup` waits for the answers about one account (its opening and deposit).
const SETUP_REQUEST_LIMIT: Duration = Duration::from_secs(30);

async fn setup(args: &LoadgenArgs, host: &Target, admin: Option<String>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.connections.clamp(1, 32) {
        let next = next.clone();
        let host = host.clone();
        let accounts = u64::from(args.accounts);
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let token = admin.as_deref();
            let mut client = Client::connect(&host).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let deadline = Instant::now() + SETUP_REQUEST_LIMIT;
                if i >= accounts {
                    return anyhow::Ok(());
                }
                let open = format!(r#"{{"account_id":"{}"}}"#, account(i));
                let status = send_by(&mut client, deadline, "POST", "/v1/wallet/accounts", Some(open), token).await?.status;
                anyhow::ensure!(status == 201 || status == 409, "opening {} answered {status}", account(i));
                // Each account's deposit id is fixed, so running --setup again deposits nothing
                // more (the server replays the first deposit).
                let body = format!(
                    r#"{{"account_id":"{}","amount":"1000000000.00","currency":"USD","transaction_id":"{}"}}"#,
                    account(i),
                    uuid(&mut SplitMix::new(SETUP_SEED ^ i))
                );
                let status = send_by(&mut client, deadline, "POST", "/v1/wallet/deposit", Some(body), token).await?.status;
                anyhow::ensure!(status == 200, "deposit into {} answered {status}", account(i));
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The most accounts a run with `--jwt-secret` mints tokens for.
const MAX_TOKEN_ACCOUNTS: u32 = 1_000_000;

pub async fn run(args: &LoadgenArgs) -> anyhow::Result<LoadgenReport> {
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(args.duration >= 1, "--duration must be at least 1 second");
    // A week: far past any load test, and far from overflowing the run's deadlines.
    anyhow::ensure!(
        args.duration <= 7 * 86_400,
        "--duration must be at most 604800 seconds (a week)"
    );
    if let Some(path) = &args.raw_path {
        anyhow::ensure!(
            path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()),
            "--raw-path must be a path starting with '/', of visible ASCII without spaces, not {path:?}"
        );
        // --setup opens accounts and deposits for transfers, which a raw run does not send.
        anyhow::ensure!(
            !args.setup,
            "--setup prepares accounts for transfers, and --raw-path sends none: use one or the other"
        );
        // A raw request carries no transfers to group: the offered rate, counted in
        // transfers, said 100% of --rate while a tenth of the requests went out.
        anyhow::ensure!(
            args.batch == 1,
            "--batch groups transfers, and --raw-path sends none: use one or the other"
        );
    }
    // Every transfer is between two different accounts.
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    // One descriptor per connection, and a few for the rest: past the limit, connections fail
    // with EMFILE part-way through the run.
    let files = open_files_limit();
    anyhow::ensure!(
        args.connections as u64 + 16 <= files,
        "--connections {} is more than this process may open (its open-files limit is {files}; \
         raise it with `ulimit -n`)",
        args.connections
    );
    anyhow::ensure!(
        (1..=8192).contains(&args.batch),
        "--batch must be within 1..=8192"
    );
    let host = target(&args.url, args.ca.as_deref())?;
    let ttl = Duration::from_secs(args.duration + 3600);
    if let Some(secret) = &args.jwt_secret {
        anyhow::ensure!(
            secret.len() >= crate::api::auth::MIN_SECRET_BYTES,
            "--jwt-secret must be at least {} bytes (serve refuses a shorter one)",
            crate::api::auth::MIN_SECRET_BYTES
        );
    }
    // A token per account is minted before the run (about 200 bytes each, at some tens of
    // thousands a second): a huge --accounts would spend minutes and gigabytes on them.
    anyhow::ensure!(
        args.jwt_secret.is_none() || args.accounts <= MAX_TOKEN_ACCOUNTS,
        "--accounts {} with --jwt-secret: at most {MAX_TOKEN_ACCOUNTS} (a bearer token is minted \
         for each account before the run)",
        args.accounts
    );
    if let Some(dir) = &args.out {
        // Before the run, not after it: an --out that cannot be written would waste the run.
        // After every other check of the arguments: a refused run makes no directory.
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--out {}: {e}", dir.display()))?;
    }
    let tokens: Option<Arc<Vec<String>>> = match &args.jwt_secret {
        Some(secret) => Some(Arc::new(
            (0..u64::from(args.accounts).max(2))
                .map(|i| {
                    crate::api::auth::mint(
                        secret.as_bytes(),
                        &account(i),
                        "wallet:transfer wallet:read",
                        ttl,
                    )
                })
                .collect::<anyhow::Result<_>>()?,
        )),
        None => None,
    };
    if args.setup {
        let admin = match &args.jwt_secret {
            Some(secret) => Some(crate::api::auth::mint(
                secret.as_bytes(),
                "loadgen-admin",
                "wallet:admin",
                ttl,
            )?),
            None => None,
        };
        setup(args, &host, admin).await?;
    }
    let seed = match args.seed {
        Some(seed) => seed,
        // The OS's randomness (what a v4 UUID is made of), cut to 53 bits so that JSON
        // readers that hold numbers as doubles print it back exactly.
        None => uuid::Uuid::new_v4().as_u64_pair().0 & ((1 << 53) - 1),
    };
    let open_loop = args.rate > 0;
    // What the server holds before this run: a replay of a sequence above it, answering a
    // resend, is this run's own commit (`tally`).
    let start_seq = if args.raw_path.is_none() {
        let known = durable_sequence(&host).await;
        if known.is_none() {
            eprintln!(
                "WARNING: cannot read wallet_durable_sequence from {}/metrics: a replay answering a resend counts as a replay, not as this run's commit",
                args.url
            );
        }
        known
    } else {
        None
    };
    // Every connection is open before the clock starts: the requests due first must not wait
    // for the client's own connecting (many connections, or TLS handshakes on few cores), which
    // would be charged to the server.
    let connecting: Vec<_> = (0..args.connections)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { Client::connect(&host).await })
        })
        .collect();
    let mut clients = Vec::with_capacity(args.connections);
    for connect in connecting {
        clients.push(connect.await??);
    }
    let start = Instant::now() + Duration::from_millis(10);
    let end = start + Duration::from_secs(args.duration);
    // Nothing waits past this: a request without an answer by then is an error, so that a
    // server that stops answering cannot hold the run (and the report) forever.
    let deadline = end + DRAIN_LIMIT;
    let next = Arc::new(AtomicU64::new(0));
    // The longest latency this run can measure (a request due at its start, given up at the
    // deadline), with room: no latency is ever left out of the histograms for being too long.
    let highest_us = u64::try_from(
        Duration::from_secs(args.duration)
            .saturating_add(DRAIN_LIMIT + Duration::from_secs(60))
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
    .clamp(600_000_000, u64::MAX / 4);
    let new_histogram = move || Histogram::<u64>::new_with_bounds(1, highest_us, 3);
    let mut tasks = Vec::new();
    for (worker, mut client) in clients.into_iter().enumerate() {
        let next = next.clone();
        let args = args.clone();
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix::new(worker_seed(seed, worker));
            let (mut histogram, mut all) = (new_histogram()?, new_histogram()?);
            let (mut failed_latency, mut send_lag) = (new_histogram()?, new_histogram()?);
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
            let (mut failed, mut sent_requests) = (0u64, 0u64);
            let (mut committed, mut replayed, mut resent, mut rejected_items) =
                (0u64, 0u64, 0u64, 0u64);
            // When this connection's last answer came (an error is not one): the run's
            // throughput is over the time answers came in, so that one request that never gets
            // an answer (waited out until the deadline) does not stretch it.
            let mut last_answer: Option<Instant> = None;
            let mut last_sent: Option<Instant> = None;
            let counts_transfers = args.raw_path.is_none();
            // What one request offers: a batch's transfers, or one request with --raw-path.
            let units = if counts_transfers {
                args.batch as u64
            } else {
                1
            };
            let accounts = u64::from(args.accounts).max(2);
            // Closed loop too starts with the clock: requests sent before it would be counted
            // over a window that leaves out the time they took.
            if !open_loop {
                tokio::time::sleep_until(start.into()).await;
            }
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let mut intended = if open_loop {
                    start + due_after(i, args.batch, args.rate)
                } else {
                    Instant::now().max(start)
                };
                // Closed loop stops at the end. Open loop sends every request due before the end,
                // late ones included (their latency runs from their intended time), for at most
                // `DRAIN_LIMIT` more: dropping them would drop the worst latencies of a stall.
                let now = Instant::now();
                if intended >= end || (!open_loop && now >= end) || now >= end + DRAIN_LIMIT {
                    break;
                }
                // With tokens, a whole request debits one account (owners move only their own
                // money), so a batch is many transfers out of one account.
                let from = rng.next_u64() % accounts;
                let token = tokens.as_ref().map(|t| t[from as usize].as_str());
                let (method, path, body) = match &args.raw_path {
                    Some(p) => ("GET", p.clone(), None),
                    None if args.batch == 1 => (
                        "POST",
                        "/v1/wallet/balance_transfer".to_string(),
                        Some(transfer_from(&mut rng, accounts, from)),
                    ),
                    None => {
                        let items: Vec<String> = (0..args.batch)
                            .map(|_| {
                                if token.is_some() {
                                    transfer_from(&mut rng, accounts, from)
                                } else {
                                    transfer_body(&mut rng, accounts)
                                }
                            })
                            .collect();
                        (
                            "POST",
                            "/v1/wallet/balance_transfers".to_string(),
                            Some(format!(r#"{{"transfers":[{}]}}"#, items.join(","))),
                        )
                    }
                };
                // Closed loop: the request is due once it is built (building a batch of a
                // thousand transfers is the client's time, not the server's).
                if !open_loop {
                    intended = Instant::now();
                }
                // tokio's timer rounds a deadline up to its next 1 ms tick, so sleeping right up
                // to `intended` would add up to a millisecond to every measured latency (and in
                // closed loop, cap each connection near one request per tick). Sleep to within a
                // tick of it instead, and measure from the earlier of the intended and the
                // actual send time: late sends count against the server as coordinated omission
                // demands, early ones never shorten a latency.
                if let Some(ahead) = intended.checked_duration_since(Instant::now())
                    && ahead > TIMER_TICK
                {
                    tokio::time::sleep_until((intended - TIMER_TICK).into()).await;
                }
                let sent = Instant::now();
                last_sent = Some(sent);
                sent_requests += 1;
                if open_loop {
                    let lag = sent.saturating_duration_since(intended);
                    send_lag.saturating_record((lag.as_nanos() / 1000) as u64);
                }
                // Whether the answer committed transfers (is a 2xx, with --raw-path), and
                // whether the request failed as a whole.
                let (counted, failed_whole) =
                    match send_by(&mut client, deadline, method, &path, body, token).await {
                        Ok(answer) => {
                            last_answer = Some(Instant::now());
                            *statuses.entry(answer.status).or_default() += 1;
                            resent += u64::from(answer.resent);
                            if counts_transfers {
                                let (c, r, other) = tally(&answer, args.batch > 1, start_seq);
                                committed += c;
                                replayed += r;
                                rejected_items += other;
                                failed += other;
                                (c > 0, answer.status != 200)
                            } else {
                                let ok = (200..300).contains(&answer.status);
                                (ok, !ok)
                            }
                        }
                        Err(error) => {
                            *errors.entry(error_kind(&error)).or_default() += 1;
                            (false, true)
                        }
                    };
                let latency_us = ((intended.min(sent).elapsed().as_nanos() / 1000) as u64).max(1);
                all.saturating_record(latency_us);
                if counted {
                    histogram.saturating_record(latency_us);
                }
                if failed_whole {
                    failed += units;
                    failed_latency.saturating_record(latency_us);
                }
            }
            anyhow::Ok((
                [histogram, all, failed_latency, send_lag],
                statuses,
                errors,
                (committed, replayed, resent, rejected_items, failed),
                sent_requests,
                (last_answer, last_sent),
            ))
        }));
    }
    let (mut histogram, mut all) = (new_histogram()?, new_histogram()?);
    let (mut failed_latency, mut send_lag) = (new_histogram()?, new_histogram()?);
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors_by_kind: BTreeMap<String, u64> = ["timeout", "connect", "other"]
        .into_iter()
        .map(|kind| (kind.to_string(), 0))
        .collect();
    let (mut committed, mut replayed, mut resent, mut requests) = (0u64, 0u64, 0u64, 0u64);
    let (mut rejected_items, mut failed) = (0u64, 0u64);
    let mut last_answer: Option<Instant> = None;
    let mut last_sent: Option<Instant> = None;
    for task in tasks {
        let ([h, a, f, lag], s, e, (c, r, again, other, lost), sent, (last, sent_last)) =
            task.await??;
        last_sent = last_sent.max(sent_last);
        requests += sent;
        committed += c;
        replayed += r;
        resent += again;
        rejected_items += other;
        failed += lost;
        last_answer = last_answer.max(last);
        histogram.add(&h)?;
        all.add(&a)?;
        failed_latency.add(&f)?;
        send_lag.add(&lag)?;
        for (status, count) in s {
            *statuses.entry(status.to_string()).or_default() += count;
        }
        for (kind, count) in e {
            *errors_by_kind.entry(kind.to_string()).or_default() += count;
        }
    }
    let errors = errors_by_kind.values().sum::<u64>();
    // The rates are over the run's duration, or up to its last answer when that came later (a
    // drain of late requests). Not up to the last request given up on at the deadline: one
    // request that never got an answer made a 10 s closed-loop run a 20 s one, and halved its
    // rates. Not less than the duration either: a server that stops answering part-way is
    // measured over the whole run, not over its good first part. (Open loop: the last request
    // is due an interval before the end, and a run that kept up answers it then; counting to
    // its answer overstated the rate by one interval's worth, 25% for 5 requests due in 5 s.)
    let elapsed = last_answer.map_or_else(
        || start.elapsed(),
        |last| last.saturating_duration_since(start),
    );
    let seconds = elapsed
        .max(Duration::from_secs(args.duration))
        .as_secs_f64()
        .max(1e-9);
    // Requests due before the end (open loop) that the drain limit left unsent.
    let due = if open_loop {
        due_count(args.duration, args.rate, args.batch)
    } else {
        0
    };
    let unsent = due.saturating_sub(requests);
    // An unsent request waited at least from its due time to the deadline; leaving it out of
    // the latencies would hide the worst of a stall (coordinated omission through the drain
    // limit). Each is counted at that lower bound, as if it were one of the latest due
    // (the smallest waits), in at most `UNSENT_GROUPS` groups so that a long run stays cheap.
    for histogram in [&mut all, &mut failed_latency] {
        record_unsent(histogram, unsent, due, |i| {
            deadline.saturating_duration_since(start + due_after(i, args.batch, args.rate))
        })?;
    }
    let units = if args.raw_path.is_some() {
        1
    } else {
        args.batch as u64
    };
    let offered = (requests + unsent) * units;
    let failed = failed + unsent * units;
    // A bare server's fixed answers count as one "transfer" each, for the same throughput field
    // (every 2xx, as `check_succeeded` counts them and the latency histogram records them).
    let ok_transfers = if args.raw_path.is_some() {
        statuses
            .iter()
            .filter(|(status, _)| status.starts_with('2'))
            .map(|(_, count)| count)
            .sum()
    } else {
        committed
    };
    let latency = percentiles(&histogram);
    let report = LoadgenReport {
        requests,
        transfers: ok_transfers,
        replayed,
        seed,
        seconds,
        transfers_per_sec: ok_transfers as f64 / seconds,
        requests_per_sec: requests as f64 / seconds,
        status_counts: statuses,
        errors,
        resent,
        unsent,
        rejected_items,
        latency_us: latency.clone(),
        latency_all_us: percentiles(&all),
        latency_failed_us: percentiles(&failed_latency),
        offered,
        failed,
        failed_share: if offered == 0 {
            0.0
        } else {
            failed as f64 / offered as f64
        },
        send_lag_us: if open_loop {
            percentiles(&send_lag)
        } else {
            None
        },
        // Over the time the requests went out (the duration, or up to the last send when that
        // came later), not up to the last answer: a server slow to answer the last requests
        // did not make the generator offer less.
        rate_achieved_share: open_loop.then(|| {
            let sending = last_sent
                .map_or(Duration::ZERO, |last| last.saturating_duration_since(start))
                .max(Duration::from_secs(args.duration))
                .as_secs_f64();
            (requests * args.batch as u64) as f64 / sending / args.rate as f64
        }),
        errors_by_kind,
        rate: args.rate,
        connections: args.connections,
        batch: args.batch,
    };
    for warning in report.warnings(args) {
        eprintln!("{warning}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "wallet loadgen: {} connections, batch {}, rate {} ({}), {:.1} s",
            args.connections,
            args.batch,
            args.rate,
            if args.rate == 0 {
                "closed loop"
            } else {
                "open loop"
            },
            seconds
        );
        println!(
            "  transfers/s {:.0}   requests/s {:.0}   errors {}   replayed {}   resent {}   seed {}",
            report.transfers_per_sec, report.requests_per_sec, errors, replayed, resent, seed
        );
        println!("  status      {:?}", report.status_counts);
        if errors > 0 {
            println!("  errors      {:?}", report.errors_by_kind);
        }
        println!(
            "  failed      {} of {} offered ({:.2}%)",
            report.failed,
            report.offered,
            report.failed_share * 100.0
        );
        if let Some(share) = report.rate_achieved_share {
            println!(
                "  offered     {:.0}/s of the {} asked ({:.1}%)",
                share * args.rate as f64,
                args.rate,
                share * 100.0
            );
        }
        if unsent > 0 {
            println!(
                "  unsent      {unsent} (due before the end, still unsent {DRAIN_LIMIT:?} after it)"
            );
        }
        if rejected_items > 0 {
            println!("  rejected    {rejected_items} batch items answered other than 200");
        }
        for (label, l) in [
            ("latency us ", &latency),
            ("all, unsent", &report.latency_all_us),
            ("failed     ", &report.latency_failed_us),
            ("send lag us", &report.send_lag_us),
        ] {
            if l.is_none() && label != "latency us " {
                continue;
            }
            match l {
                Some(l) => println!(
                    "  {label} p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
                    l["p50"], l["p90"], l["p99"], l["p999"], l["p9999"], l["max"]
                ),
                None => println!("  {label} none (no answer of this kind)"),
            }
        }
    }
    // After the report, so that a full disk under --out does not cost the run's figures.
    if let Some(dir) = &args.out {
        write_outputs(dir, &histogram)
            .map_err(|e| anyhow::anyhow!("--out {}: {e}", dir.display()))?;
    }
    Ok(report)
}

/// p50 to p99.99 and the maximum, in microseconds; `None` for an empty histogram (zeros would
/// read as a latency measured).
fn percentiles(histogram: &Histogram<u64>) -> Option<BTreeMap<String, u64>> {
    if histogram.is_empty() {
        return None;
    }
    let mut latency = BTreeMap::new();
    for (name, q) in [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p999", 0.999),
        ("p9999", 0.9999),
    ] {
        latency.insert(name.to_string(), histogram.value_at_quantile(q));
    }
    latency.insert("max".to_string(), histogram.max());
    Some(latency)
}

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The soft limit on open files (`RLIMIT_NOFILE`), or `u64::MAX` if it cannot be read.
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        u64::MAX
    }
}

/// Writes `latency.hgrm` (HdrHistogram's percentile-distribution text) and `latency.svg`.
fn write_outputs(dir: &std::path::Path, histogram: &Histogram<u64>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut hgrm = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    let mut points = Vec::new();
    // HdrHistogram's TotalCount column is the running count of values up to the line's.
    let mut total = 0u64;
    for v in histogram.iter_quantiles(1) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        let _ = writeln!(
            hgrm,
            "{:12.3} {:14.12} {:10} {:14.2}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inverse
        );
        if q < 1.0 {
            points.push((
                (1.0 / (1.0 - q)).log10(),
                v.value_iterated_to() as f64 / 1000.0,
            ));
        }
    }
    let _ = writeln!(
        hgrm,
        "#[Mean = {:.3}, StdDeviation = {:.3}]\n#[Max = {:.3}, Total count = {}]",
        histogram.mean() / 1000.0,
        histogram.stdev() / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    std::fs::write(dir.join("latency.hgrm"), hgrm)?;
    let (width, height, margin) = (800.0, 480.0, 60.0);
    let max_x = points.iter().map(|p| p.0).fold(1.0f64, f64::max).max(1.0);
    let max_y = points.iter().map(|p| p.1).fold(0.001f64, f64::max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle">Latency by percentile (ms)</text>
<line x1="{margin}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{}" stroke="black"/>
"#,
        width / 2.0,
        height - margin,
        width - margin,
        height - margin,
        height - margin
    );
    let sx = |x: f64| margin + x / max_x * (width - 2.0 * margin);
    let sy = |y: f64| height - margin - y / max_y * (height - 2.0 * margin);
    for (label, x) in [
        ("0%", 0.0),
        ("90%", 1.0),
        ("99%", 2.0),
        ("99.9%", 3.0),
        ("99.99%", 4.0),
        ("99.999%", 5.0),
    ] {
        if x <= max_x {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                sx(x),
                height - margin + 18.0
            );
        }
    }
    for i in 0..=4 {
        let y = max_y * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.2}</text>"#,
            margin - 6.0,
            sy(y) + 4.0
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#,
        path.join(" ")
    );
    svg.push_str("</svg>\n");
    std::fs::write(dir.join("latency.svg"), svg)?;
    Ok(())
}

/// A bare hyper server answering a fixed JSON body to every request: the HTTP stack's own limit
/// on this machine, measured with the same load generator.
pub async fn serve_fixed(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                let mut response = hyper::Response::new(Full::new(Bytes::from_static(
                    br#"{"transaction_id":"00000000-0000-0000-0000-000000000000","status":"committed","sequence":1}"#,
                )));
                response.headers_mut().insert(
                    "content-type",
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_url_names_the_server_only() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://localhost:1",
        ] {
            let host = url.trim_start_matches("http://").trim_end_matches('/');
            assert_eq!(super::target(url, None).expect(url).host, host);
        }
        for (url, says) in [
            (
                "http://127.0.0.1:8080/prefix",
                "\"/prefix\" would not be sent",
            ),
            ("http://127.0.0.1:8080?x=1", "\"?x=1\" would not be sent"),
            ("http://127.0.0.1:8080/v1/wallet/", "not a path"),
            ("http:///", "names no host"),
            (
                "http://u@127.0.0.1:8080",
                "credentials (user@) are not sent",
            ),
            ("ftp://127.0.0.1", "must start with http:// or https://"),
        ] {
            match super::target(url, None) {
                Ok(_) => panic!("{url} taken"),
                Err(e) => assert!(e.to_string().contains(says), "{url}: {e}"),
            }
        }
    }

    use super::{Answer, Client, due_after, due_count, record_unsent, tally, target, worker_seed};
    use bytes::Bytes;

    /// Every connection of every seed near another draws its own ids: no two (seed, worker)
    /// pairs among seeds 0..64 and 256 connections share a generator seed (`seed * 31 +
    /// worker + 1` gave seed s + 1, connection w the ids of seed s, connection w + 31).
    #[test]
    fn neighbouring_seeds_give_every_connection_its_own_ids() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64u64 {
            for worker in 0..256usize {
                assert!(
                    seen.insert(worker_seed(seed, worker)),
                    "seed {seed}, connection {worker} repeats another's generator"
                );
            }
        }
    }
    use hdrhistogram::Histogram;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// Unsent requests are all in the histogram, each at most its real wait (from its due time
    /// to the deadline) and in groups close to it.
    #[test]
    fn unsent_requests_are_recorded_at_a_lower_bound_of_their_wait() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        record_unsent(&mut histogram, 0, 10_000, |_| Duration::from_secs(1)).unwrap();
        assert_eq!(histogram.len(), 0);
        // 10,000 due, the last 9,000 unsent; request i waited 10,000 - i ms.
        let wait = |i: u64| Duration::from_millis(10_000 - i);
        record_unsent(&mut histogram, 9_000, 10_000, wait).unwrap();
        assert_eq!(histogram.len(), 9_000);
        // The longest real wait is request 1,000's 9 s; its group stands at most 3 requests
        // later (9,000 in 4,096 groups), 3 ms shorter.
        assert!(histogram.max() <= 9_000_000 + 9_000, "{}", histogram.max());
        assert!(histogram.max() >= 8_990_000, "{}", histogram.max());
        assert!(histogram.min() <= 1_000, "{}", histogram.min());
        let median = histogram.value_at_quantile(0.5);
        assert!((4_480_000..=4_510_000).contains(&median), "{median}");
    }

    /// Reads one request (headers and a Content-Length body) from a blocking stream.
    fn read_request(stream: &mut std::net::TcpStream) {
        let mut buffer = Vec::new();
        let mut byte = [0u8; 1];
        while !buffer.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "request cut short");
            buffer.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buffer).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
    }

    /// A transfer's answer naming `sequence`.
    fn respond_with(stream: &mut std::net::TcpStream, replayed: bool, sequence: u64) {
        let header = if replayed {
            "idempotent-replayed: true\r\n"
        } else {
            ""
        };
        let body =
            format!(r#"{{"transaction_id":"x","status":"committed","sequence":{sequence}}}"#);
        let response = format!(
            "HTTP/1.1 200 OK\r\n{header}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    }

    /// A replay answering a resend counts as this run's commit only when its sequence is
    /// above the server's durable sequence at the run's start: an earlier run's commit of the
    /// same id (a repeated `--seed`, the first send lost to an idle close) stays a replay. It
    /// counted every such replay as committed, and a run that committed nothing reported
    /// transfers.
    #[test]
    fn a_replay_answering_a_resend_is_this_runs_commit_only_above_the_start() {
        // The server answers the first request, then each further one on that connection is
        // dropped unanswered and its resend answered on a fresh connection as a replay: of
        // sequence 120 (this run's, above a start at 100), then of sequence 80 (before it).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            read_request(&mut first);
            respond_with(&mut first, false, 101);
            read_request(&mut first);
            drop(first);
            let (mut second, _) = listener.accept().unwrap();
            read_request(&mut second);
            respond_with(&mut second, true, 120);
            read_request(&mut second);
            drop(second);
            let (mut third, _) = listener.accept().unwrap();
            read_request(&mut third);
            respond_with(&mut third, true, 80);
            // A replay that is not a resend stays a replay.
            read_request(&mut third);
            respond_with(&mut third, true, 130);
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answers = runtime.block_on(async {
            let target = target(&format!("http://{address}"), None).unwrap();
            let mut client = Client::connect(&target).await.unwrap();
            let mut answers = Vec::new();
            for _ in 0..4 {
                let answer = client
                    .send_as(
                        "POST",
                        "/v1/wallet/balance_transfer",
                        Some("{}".into()),
                        None,
                    )
                    .await
                    .unwrap();
                answers.push(answer);
            }
            answers
        });
        server.join().unwrap();
        let counts: Vec<_> = answers
            .iter()
            .map(|a| (tally(a, false, Some(100)), a.resent))
            .collect();
        assert_eq!(
            counts,
            vec![
                ((1, 0, 0), false),
                ((1, 0, 0), true),
                ((0, 1, 0), true),
                ((0, 1, 0), false)
            ]
        );
        // Without a known start, a replay is a replay.
        assert_eq!(tally(&answers[1], false, None), (0, 1, 0));
    }

    /// In a batch, each replayed item of a resend is judged by its own sequence.
    #[test]
    fn a_resent_batchs_replayed_items_are_judged_one_by_one() {
        let body = concat!(
            r#"{"results":[{"index":0,"http_status":200,"replayed":true,"result":{"transaction_id":"a","status":"committed","sequence":150}},"#,
            r#"{"index":1,"http_status":200,"replayed":true,"result":{"transaction_id":"b","status":"committed","sequence":90}},"#,
            r#"{"index":2,"http_status":200,"replayed":false,"result":{"transaction_id":"c","status":"committed","sequence":160}},"#,
            r#"{"index":3,"http_status":422,"replayed":false,"result":{"transaction_id":"d","status":"rejected","sequence":161}}]}"#
        );
        let answer = |resent| Answer {
            status: 200,
            replayed: false,
            body: Bytes::from_static(body.as_bytes()),
            resent,
        };
        assert_eq!(tally(&answer(true), true, Some(100)), (2, 1, 1));
        assert_eq!(tally(&answer(false), true, Some(100)), (1, 2, 1));
        assert_eq!(tally(&answer(true), true, None), (1, 2, 1));
    }

    #[test]
    fn the_hgrm_total_count_column_is_a_running_count() {
        let mut histogram =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            histogram.record(v * 100).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        super::write_outputs(dir.path(), &histogram).unwrap();
        let text = std::fs::read_to_string(dir.path().join("latency.hgrm")).unwrap();
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
            .collect();
        assert!(counts.len() > 10, "{text}");
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{text}");
        assert_eq!(counts.last(), Some(&1000), "{text}");
    }

    #[test]
    fn the_due_count_is_the_number_of_requests_due_before_the_end() {
        for (duration, rate, batch) in [
            (5, 3000, 1000),
            (10, 3000, 1000),
            (20, 3000, 1000),
            (10, 22_000, 1),
            (11, 7, 3),
            (2, 200, 1),
            (1, 200, 10),
        ] {
            let end = Duration::from_secs(duration);
            let sent = (0..)
                .take_while(|&i| due_after(i, batch, rate) < end)
                .count() as u64;
            assert_eq!(
                sent,
                due_count(duration, rate, batch),
                "{duration} s at {rate}/s in batches of {batch}"
            );
        }
    }
}
