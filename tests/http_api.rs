//! Black-box tests of `wallet serve`: every endpoint and error path, the bank test, idempotency
//! under concurrency, and restart.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{
    Client, SERVE_REFUSAL_LIMIT, Server, SmallDisk, balance_cents, deposit, open, transfer_body,
    uuid, wait_with_timeout,
};
use serde_json::json;

/// Opens accounts `a` and `b`, and deposits 100.00 USD into `a`.
fn open_a_and_b(c: &mut Client) {
    open(c, "a");
    open(c, "b");
    deposit(c, "a", "100.00");
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wallet-http-")
        .tempdir()
        .expect("tempdir")
}

#[test]
fn endpoints_and_error_paths() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--max-body-bytes", "2048"]);
    let mut c = server.client();
    open(&mut c, "alice");
    open(&mut c, "bob");
    let dup = c.post("/v1/wallet/accounts", &json!({"account_id": "bob"}));
    assert_eq!(dup.status, 409);
    assert_eq!(dup.json()["error"]["code"], "account_already_exists");
    deposit(&mut c, "alice", "100.00");

    // A committed transfer: 200 with the sequence and both resulting balances.
    let id = uuid();
    let r = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "12.34", &id),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "committed");
    assert_eq!(v["transaction_id"], id.as_str());
    assert!(v["sequence"].as_u64().unwrap() > 0);
    assert_eq!(
        v["balances"][0],
        json!({"account_id": "alice", "currency": "USD", "balance": "87.66"})
    );
    assert_eq!(
        v["balances"][1],
        json!({"account_id": "bob", "currency": "USD", "balance": "12.34"})
    );

    // Retry with the same id and body: the original status and body, marked as replayed.
    let again = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "12.34", &id),
    );
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), v);
    // Same id, other body: 409, nothing moves.
    let conflict = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "1.00", &id),
    );
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.json()["error"]["code"], "transaction_id_reused");
    // Named where every error about one command names it (and at the top level).
    assert_eq!(conflict.json()["error"]["transaction_id"], id.as_str());
    assert_eq!(conflict.json()["transaction_id"], id.as_str());
    assert_eq!(balance_cents(&mut c, "alice"), 8766);

    // Business rejections: 422 with the ledger's code; a rejection is final for its id.
    let cases = [
        (
            transfer_body("alice", "bob", "1000.00", &uuid()),
            "insufficient_funds",
        ),
        (
            transfer_body("alice", "nobody", "1.00", &uuid()),
            "account_not_found",
        ),
        (
            transfer_body("alice", "alice", "1.00", &uuid()),
            "same_account",
        ),
    ];
    for (body, code) in cases {
        let r = c.post("/v1/wallet/balance_transfer", &body);
        assert_eq!(r.status, 422, "{code}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], code);
    }

    // Bad input: 400 naming the field; nothing changes.
    let bad = [
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1.234", "currency": "USD", "transaction_id": uuid()}),
            "amount",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "-1", "currency": "USD", "transaction_id": uuid()}),
            "amount",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1e2", "currency": "USD", "transaction_id": uuid()}),
            "amount",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "0", "currency": "USD", "transaction_id": uuid()}),
            "amount",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": 5, "currency": "USD", "transaction_id": uuid()}),
            "amount",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "XAU", "transaction_id": uuid()}),
            "currency",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "usd", "transaction_id": uuid()}),
            "currency",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": "not-a-uuid"}),
            "transaction_id",
        ),
        // The nil and the max UUID are an unset field's value, not an id.
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": "00000000-0000-0000-0000-000000000000"}),
            "transaction_id",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"}),
            "transaction_id",
        ),
        (
            json!({"from_account": "al ice", "to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": uuid()}),
            "from_account",
        ),
        (
            json!({"from_account": "alice", "to_account": "b".repeat(65), "amount": "1", "currency": "USD", "transaction_id": uuid()}),
            "to_account",
        ),
        (
            json!({"from_account": "alice", "to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": uuid(), "memo": "x"}),
            "memo",
        ),
        (
            json!({"to_account": "bob", "amount": "1", "currency": "USD", "transaction_id": uuid()}),
            "from_account",
        ),
    ];
    for (body, field) in bad {
        let r = c.post("/v1/wallet/balance_transfer", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["field"], field, "{body}: {}", r.body);
        let message = error["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{body}: message {message:?} should name {field}"
        );
    }
    // The other requests that take a new id refuse them too; a lookup only finds nothing.
    let nil = "00000000-0000-0000-0000-000000000000";
    for (path, body, field) in [
        (
            "/v1/wallet/deposit",
            json!({"account_id": "alice", "amount": "1", "currency": "USD", "transaction_id": nil}),
            "transaction_id",
        ),
        (
            "/v1/wallet/withdraw",
            json!({"account_id": "alice", "amount": "1", "currency": "USD", "transaction_id": nil}),
            "transaction_id",
        ),
        (
            "/v1/wallet/accounts",
            json!({"account_id": "carol", "transaction_id": nil}),
            "transaction_id",
        ),
        (
            "/v1/wallet/balance_transfers",
            json!({"transfers": [transfer_body("alice", "bob", "1", &uuid()), transfer_body("alice", "bob", "1", nil)]}),
            "transfers[1].transaction_id",
        ),
    ] {
        let r = c.post(path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
        assert_eq!(r.json()["error"]["field"], field, "{path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_transaction_id");
    }
    assert_eq!(
        c.get(&format!("/v1/wallet/balance_transfer/{nil}")).status,
        404
    );
    assert_eq!(c.get("/v1/wallet/accounts/carol").status, 404);
    assert_eq!(balance_cents(&mut c, "alice"), 8766);
    let r = c.request(
        "POST",
        "/v1/wallet/balance_transfer",
        Some(b"{not json"),
        "application/json",
    );
    assert_eq!(r.status, 400);
    let r = c.request(
        "POST",
        "/v1/wallet/balance_transfer",
        Some(b"{}"),
        "text/plain",
    );
    assert_eq!(r.status, 415);
    // JSON is UTF-8: a charset naming another encoding is refused, not read as UTF-8;
    // `charset=utf-8` (any case, quoted or not) is taken.
    for charset in ["utf-16", "latin1", "\"ebcdic\""] {
        let r = c.request(
            "POST",
            "/v1/wallet/balance_transfer",
            Some(b"{}"),
            &format!("application/json; charset={charset}"),
        );
        assert_eq!(r.status, 415, "{charset}: {}", r.body);
        assert!(r.body.contains("charset"), "{}", r.body);
    }
    for content_type in [
        "application/json; charset=utf8",
        "application/json; charset=UTF-8",
        "application/json;charset=\"utf-8\"",
    ] {
        let r = c.request(
            "POST",
            "/v1/wallet/balance_transfer",
            Some(b"{}"),
            content_type,
        );
        assert_eq!(r.status, 400, "{content_type}: {}", r.body);
    }
    let huge = format!(r#"{{"from_account":"{}"}}"#, "a".repeat(4096));
    let r = c.request(
        "POST",
        "/v1/wallet/balance_transfer",
        Some(huge.as_bytes()),
        "application/json",
    );
    assert_eq!(r.status, 413);
    assert_eq!(c.get("/v1/wallet/nothing").status, 404);
    let r = c.get("/v1/wallet/balance_transfer");
    assert_eq!(r.status, 405);
    assert_eq!(
        r.header("allow"),
        Some("POST"),
        "a 405 names the methods the path takes"
    );
    let r = c.request(
        "DELETE",
        "/v1/wallet/accounts/alice",
        None,
        "application/json",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // HEAD is GET without the body: the head names the body's length, no body follows (the
    // next answer on the connection starts right after the head).
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "HEAD /v1/wallet/accounts/alice HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed after {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-length: "), "{head}");
        assert!(!head.contains("content-length: 0\r\n"), "{head}");
        write!(stream, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let r = common::read_response(&mut stream).unwrap();
        assert_eq!(r.status, 200, "a body followed the HEAD answer: {}", r.body);
    }
    assert_eq!(
        balance_cents(&mut c, "alice"),
        8766,
        "rejected requests changed nothing"
    );
    assert_eq!(balance_cents(&mut c, "bob"), 1234);

    // Deposit and withdraw.
    let w = c.post("/v1/wallet/withdraw", &json!({"account_id": "bob", "amount": "0.34", "currency": "USD", "transaction_id": uuid()}));
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(w.json()["balance"], "12.00");
    let w = c.post(
        "/v1/wallet/withdraw",
        &json!({"account_id": "bob", "amount": "50", "currency": "USD", "transaction_id": uuid()}),
    );
    assert_eq!(w.status, 422);
    let d = c.post(
        "/v1/wallet/deposit",
        &json!({"account_id": "bob", "amount": "5", "currency": "JPY", "transaction_id": uuid()}),
    );
    assert_eq!(d.status, 200);
    assert_eq!(d.json()["balance"], "5");

    // Reads: account, history with running balances, status, events, read-your-writes.
    let account = c.get("/v1/wallet/accounts/bob").json();
    assert_eq!(
        account["balances"],
        json!([{"currency": "JPY", "balance": "5"}, {"currency": "USD", "balance": "12.00"}])
    );
    assert_eq!(c.get("/v1/wallet/accounts/nobody").status, 404);
    // Path segments are percent-decoded before validation: `%62ob` is `bob`, `no%20body` holds
    // a space (refused by the id's alphabet, not by the escape) and `%zz` is no escape at all.
    assert_eq!(c.get("/v1/wallet/accounts/%62ob").json(), account);
    let r = c.get("/v1/wallet/accounts/no%20body");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["code"],
        "invalid_account_id",
        "{}",
        r.body
    );
    let r = c.get("/v1/wallet/accounts/b%zzob");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["field"], "account_id", "{}", r.body);
    // `.` and `..` are not opened: clients remove them from a URL's path, and a read of
    // `./history` reached the account `history`. `...` is an ordinary id.
    for id in [".", ".."] {
        let r = c.post("/v1/wallet/accounts", &json!({"account_id": id}));
        assert_eq!(r.status, 400, "{id}: {}", r.body);
        assert_eq!(
            r.json()["error"]["code"],
            "invalid_account_id",
            "{}",
            r.body
        );
        assert_eq!(r.json()["error"]["field"], "account_id", "{}", r.body);
    }
    assert_eq!(
        c.post("/v1/wallet/accounts", &json!({"account_id": "..."}))
            .status,
        201
    );
    assert_eq!(c.get("/v1/wallet/accounts/...").status, 200);
    // Query parameters: one the route does not take, one given twice, and a signed number are
    // refused naming the parameter (a misspelt `after` would otherwise page from the start).
    for (query, field) in [
        ("after=5", "after"),
        ("limit=5&limit=500", "limit"),
        ("limit=+5", "limit"),
        ("=5", "query"),
    ] {
        let r = c.get(&format!("/v1/wallet/accounts/alice/history?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.json()["error"]["field"], field, "{query}: {}", r.body);
    }
    let r = c.post(
        "/v1/wallet/balance_transfer?dry_run=1",
        &transfer_body("alice", "bob", "1.00", &uuid()),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["field"], "dry_run");
    let history = c.get("/v1/wallet/accounts/alice/history?limit=10").json();
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "deposited");
    assert_eq!(entries[1]["kind"], "debited");
    assert_eq!(entries[1]["balance_after"], "87.66");
    assert_eq!(entries[1]["counterparty"], "bob");
    let after = entries[0]["sequence"].as_u64().unwrap();
    let later = c
        .get(&format!(
            "/v1/wallet/accounts/alice/history?after_seq={after}"
        ))
        .json();
    assert_eq!(later["entries"].as_array().unwrap().len(), 1);
    assert_eq!(
        c.get("/v1/wallet/accounts/alice/history?limit=abc").status,
        400
    );
    let status = c.get(&format!("/v1/wallet/balance_transfer/{id}"));
    assert_eq!(status.status, 200);
    assert_eq!(status.json(), v);
    assert_eq!(
        c.get(&format!("/v1/wallet/balance_transfer/{}", uuid()))
            .status,
        404
    );
    assert_eq!(c.get("/v1/wallet/balance_transfer/xyz").status, 400);
    let seq = v["sequence"].as_u64().unwrap();
    let r = c.get(&format!("/v1/wallet/accounts/alice?min_seq={seq}"));
    assert_eq!(r.status, 200);
    assert!(r.json()["sequence"].as_u64().unwrap() >= seq);
    // A sequence no answer has named (past the durable end) is refused at once, not after the
    // bounded wait for the views.
    let asked = std::time::Instant::now();
    let r = c.get("/v1/wallet/accounts/alice?min_seq=999999999");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["field"], "min_seq");
    assert!(asked.elapsed() < Duration::from_secs(1));

    let events = c.get("/v1/wallet/events?from_seq=1");
    assert_eq!(events.status, 200);
    assert_eq!(events.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = events
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["kind"], "account_opened");
    assert!(
        lines
            .windows(2)
            .all(|w| w[1]["sequence"].as_u64() == Some(w[0]["sequence"].as_u64().unwrap() + 1))
    );
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "debited" && l["transaction_id"] == id.as_str())
    );
    let next = lines.last().unwrap()["sequence"].as_u64().unwrap() + 1;
    let tail = c.get(&format!("/v1/wallet/events?from_seq={next}&wait_ms=100"));
    assert_eq!(tail.status, 200);
    assert!(tail.body.is_empty());
    // Past that, no reader of this history can be: said at once, not with empty pages.
    let ahead = c.get(&format!("/v1/wallet/events?from_seq={}", next + 1));
    assert_eq!(ahead.status, 400, "{}", ahead.body);
    assert_eq!(ahead.json()["error"]["field"], "from_seq", "{}", ahead.body);
    // `limit` counts events, whole records at a time: none at 0, the first record at 1.
    let none = c.get("/v1/wallet/events?from_seq=1&limit=0");
    assert_eq!(none.status, 200);
    assert_eq!(none.body, "", "limit=0 from the in-memory window");
    let one = c.get("/v1/wallet/events?from_seq=1&limit=1");
    assert_eq!(one.body.lines().count(), 1, "{}", one.body);

    // Batch: one outcome per transfer, in order.
    let batch = json!({"transfers": [
        transfer_body("alice", "bob", "1.00", &uuid()),
        transfer_body("alice", "bob", "9999.00", &uuid()),
        transfer_body("alice", "bob", "2.00", &id),
    ]});
    let r = c.post("/v1/wallet/balance_transfers", &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["http_status"], 200);
    assert_eq!(results[1]["http_status"], 422);
    assert_eq!(results[2]["http_status"], 409);
    let r = c.post("/v1/wallet/balance_transfers", &json!({"transfers": []}));
    assert_eq!(r.status, 400);
    // One transaction id twice in a batch: refused whole (the second would be answered as a
    // replay of the first, and a caller counting 200s would count one transfer twice).
    let twice = uuid();
    let before = balance_cents(&mut c, "bob");
    let r = c.post(
        "/v1/wallet/balance_transfers",
        &json!({"transfers": [
            transfer_body("alice", "bob", "1.00", &uuid()),
            transfer_body("alice", "bob", "3.00", &twice),
            transfer_body("alice", "bob", "3.00", &twice),
        ]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["field"], "transfers[2].transaction_id");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("transfers[1]"),
        "{}",
        r.body
    );
    assert_eq!(balance_cents(&mut c, "bob"), before, "nothing moved");
    let r = c.post(
        "/v1/wallet/balance_transfers",
        &json!({"transfers": [transfer_body("alice", "bob", "x", &uuid())]}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["field"]
            .as_str()
            .unwrap()
            .contains("transfers[0].amount")
    );

    // Operations endpoints.
    assert_eq!(c.get("/healthz").status, 200);
    assert_eq!(c.get("/readyz").status, 200);
    let metrics = c.get("/metrics");
    assert_eq!(metrics.status, 200);
    for name in [
        "wallet_http_requests_total{route=\"transfer\",status=\"200\"}",
        "wallet_durable_sequence",
        "wallet_ring_depth",
        "wallet_journal_bytes_total",
        "wallet_http_request_duration_seconds_bucket",
    ] {
        assert!(metrics.body.contains(name), "metrics lack {name}");
    }
    let openapi = c.get("/v1/openapi.json");
    assert_eq!(openapi.status, 200);
    assert_eq!(openapi.json()["openapi"], "3.0.3");
    assert!(server.stop().success());
}

#[test]
fn a_long_poll_longer_than_the_request_timeout_ends_with_200() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--request-timeout-ms", "1000"]);
    let mut c = server.client();
    let started = std::time::Instant::now();
    let r = c.get("/v1/wallet/events?from_seq=1&wait_ms=5000");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(server.stop().success());
}

/// A shutdown ends the long polls in flight at once, each with a 200 and what there is, so
/// SIGTERM is not held up by them (it took until the 10 s drain limit, and a poll longer than
/// that lost its connection instead of getting an answer).
#[test]
fn a_long_poll_ends_with_200_as_soon_as_the_server_stops() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--request-timeout-ms", "30000"]);
    let address = server.address.clone();
    let poll = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let r = Client::connect(&address).get("/v1/wallet/events?from_seq=1&wait_ms=25000");
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let stopping = std::time::Instant::now();
    assert!(server.stop().success());
    let stopped_in = stopping.elapsed();
    let (r, polled_for) = poll.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.is_empty());
    assert!(
        stopped_in < Duration::from_secs(5) && polled_for < Duration::from_secs(6),
        "stopped in {stopped_in:?}, the poll took {polled_for:?}"
    );
}

#[test]
fn a_batch_larger_than_the_ring_is_a_400_and_a_ring_size_that_is_not_a_power_of_two_is_refused() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--ring-size", "64"]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let batch = |n: usize| json!({"transfers": (0..n).map(|_| transfer_body("a", "b", "0.01", &uuid())).collect::<Vec<_>>()});
    let r = c.post("/v1/wallet/balance_transfers", &batch(65));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["field"], "transfers");
    assert!(r.body.contains("1 to 64"), "{}", r.body);
    // Past the decoder's own cap as well: the limit named is this server's, not 8192.
    let r = c.post("/v1/wallet/balance_transfers", &batch(8193));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("must hold 1 to 64 transfers"), "{}", r.body);
    let r = c.post("/v1/wallet/balance_transfers", &batch(64));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(balance_cents(&mut c, "b"), 64);
    assert!(server.stop().success());

    for size in ["1000", "32"] {
        let refused = common::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
                .args(["serve", "--listen", "127.0.0.1:0", "--ring-size", size])
                .env("WALLET_LOG", "warn")
                .arg("--data-dir")
                .arg(dir.path()),
            SERVE_REFUSAL_LIMIT,
        );
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("--ring-size must be a power of two within 64..=")
                && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// `/readyz` once `done` says so of its answer, or after 20 s.
fn readiness_once(server: &Server, done: impl Fn(&common::Response) -> bool) -> common::Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = Client::connect(&server.address).get("/readyz");
        if done(&r) || std::time::Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/readyz` once it says `failed: ` (the read views could not be rebuilt), or after 20 s.
fn readiness_once_failed(server: &Server) -> common::Response {
    readiness_once(server, |r| r.body.starts_with("failed: "))
}

/// A journal in `dir` holding accounts `a` and `b` (`open_a_and_b`), written by a server that
/// stopped.
fn journal_with_a_and_b(dir: &std::path::Path) {
    let server = Server::start(dir, &[]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    assert!(server.stop().success());
}

/// A panic while the read views load the journal's past fails them as an error does (they
/// said "still loading" for good): `/readyz` names the failure, status reads answer 503
/// `views_unavailable`, and writes and balances are still served.
#[test]
fn a_panic_while_the_views_load_their_past_fails_them_by_name() {
    let dir = temp();
    journal_with_a_and_b(dir.path());
    let server = Server::start_listening_with_env(
        dir.path(),
        &[],
        &[("WALLET_FAILPOINT", "views-past-panic")],
    );
    let readiness = readiness_once_failed(&server);
    assert_eq!(readiness.status, 503, "{}", readiness.body);
    assert!(
        readiness.body.starts_with("failed: ") && readiness.body.contains("panicked"),
        "{}",
        readiness.body
    );
    views_unavailable_but_writes_served(server);
}

/// With every connection slot held by event-stream long polls, the operations routes are
/// still answered on a connection over the limit (a liveness probe found the loaded server
/// dead, and metrics went blind); any other request there is refused 503
/// `too_many_connections` as before, and so is a connection that sends nothing.
#[test]
fn over_the_connection_limit_the_operations_routes_are_still_answered() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--max-connections", "2"]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let end = metric(&c.get("/metrics").body, "wallet_durable_sequence").expect("sequence");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let polls: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&server.address).unwrap();
            std::io::Write::write_all(
                &mut s,
                format!(
                    "GET /v1/wallet/events?from_seq={}&wait_ms=8000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                    end + 1
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let get = |path: &str| {
        raw_request(
            &server,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
    };
    let health = get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    // HEAD: the head alone (its Content-Length that of the GET), then the close.
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .unwrap();
    let mut head = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut head);
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head:?}"
    );
    let ready = get("/readyz?probe=1");
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = get("/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(metric(&metrics.body, "wallet_durable_sequence").is_some());
    let account = get("/v1/wallet/accounts/a");
    assert_eq!(account.status, 503, "{}", account.body);
    assert_eq!(account.json()["error"]["code"], "too_many_connections");
    // Addressed to another host with authentication off: refused as on any connection.
    let elsewhere = raw_request(
        &server,
        "GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(elsewhere.status, 403, "{}", elsewhere.body);
    // A connection that sends nothing still gets its 503.
    let mut silent = std::net::TcpStream::connect(&server.address).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let refused = common::read_response(&mut silent).expect("an answer");
    assert_eq!(refused.status, 503);
    drop(polls);
    assert!(server.stop().success());
}

/// The nice value of each of a process's threads whose name starts with `prefix`.
fn thread_nices(pid: u32, prefix: &str) -> Vec<i64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if !comm.starts_with(prefix) {
                return None;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // Fields after the name's closing parenthesis, from the state (field 3): the
            // nice value is field 19.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// The read views' past is built at a low priority but merged in at the normal one: the
/// merge holds the views' write lock, which the replies of every durable batch wait for (at
/// nice 10 on a busy machine it got a tenth of a core meanwhile). A panic in the merge halts
/// the server, as a panic applying a batch to the views does (it left the server running,
/// answering 503 to every write it committed).
#[test]
fn the_views_past_is_merged_at_normal_priority_and_a_panic_there_halts_the_server() {
    let dir = temp();
    journal_with_a_and_b(dir.path());

    let server = Server::start_listening_with_env(
        dir.path(),
        &[],
        &[("WALLET_FAILPOINT", "views-merge-delay:2000")],
    );
    let pid = server.child.id();
    // Thread names are cut to 15 bytes: "wallet-views-pa" is the merging thread.
    let mut samples = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while samples.len() < 20 && std::time::Instant::now() < deadline {
        samples.extend(thread_nices(pid, "wallet-views-pa"));
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        samples.len() >= 20,
        "the merging thread was seen {} times",
        samples.len()
    );
    assert!(
        samples.iter().all(|&nice| nice == 0),
        "the merging thread's nice values: {samples:?}"
    );
    let readiness = readiness_once(&server, |r| r.status == 200);
    assert_eq!(readiness.status, 200, "{}", readiness.body);
    assert!(server.stop().success());

    let mut server = Server::start_listening_with_env(
        dir.path(),
        &[],
        &[("WALLET_FAILPOINT", "views-merge-panic")],
    );
    let status = common::wait_with_timeout(&mut server.child, Duration::from_secs(20));
    assert!(
        !status.success(),
        "a server whose views broke in the merge exited {status}"
    );
}

/// With the read views failed: status reads answer 503 `views_unavailable`, and writes and
/// balances are still served. Stops the server.
fn views_unavailable_but_writes_served(server: Server) {
    let mut c = server.client();
    let status = c.get(&format!("/v1/wallet/balance_transfer/{}", uuid()));
    assert_eq!(status.status, 503, "{}", status.body);
    assert_eq!(status.json()["error"]["code"], "views_unavailable");
    open(&mut c, "after-the-failure");
    deposit(&mut c, "after-the-failure", "1.00");
    assert_eq!(balance_cents(&mut c, "after-the-failure"), 100);
    assert!(server.stop().success());
}

/// Sends `request` on a fresh connection and reads the answer.
fn raw_request(server: &Server, request: &str) -> common::Response {
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    common::read_response(&mut stream).expect("an answer")
}

/// The value of an unlabelled series in a `/metrics` body.
fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Every answer is counted (a 405 under its path's route, a request hyper refused unparsed in
/// its own counter), counters are typed as counters, and the snapshot follower's sequence is
/// shown only when a follower runs (it stood still at the start-up sequence otherwise).
#[test]
fn metrics_count_every_answer_and_type_their_counters() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    let r = c.request("DELETE", "/metrics", None, "application/json");
    assert_eq!(r.status, 405);
    let r = raw_request(&server, "GET /v1/wallet/accounts/a HTTP/9.x\r\n\r\n");
    assert_eq!(r.status, 400);
    // The server may answer and close before all of the head is written: the write's error
    // is not the test's.
    let huge = "a".repeat(70_000);
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = std::io::Write::write_all(
        &mut stream,
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {huge}\r\n\r\n").as_bytes(),
    );
    let r = common::read_response(&mut stream).expect("an answer");
    assert_eq!(r.status, 431);
    // Counted when hyper ends the connection, just after the answer is written.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let body = c.get("/metrics").body;
        let counted = metric(&body, "wallet_http_malformed_requests_total");
        if counted == Some(2) || std::time::Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        body.contains("wallet_http_requests_total{route=\"metrics\",status=\"405\"} 1"),
        "{body}"
    );
    assert!(!body.contains("route=\"unmatched\""), "{body}");
    assert_eq!(
        metric(&body, "wallet_http_malformed_requests_total"),
        Some(2)
    );
    for counter in [
        "wallet_journal_bytes_total",
        "wallet_overloaded_total",
        "wallet_connections_refused_total",
        "wallet_http_malformed_requests_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {counter} counter\n")),
            "{counter}: {body}"
        );
    }
    assert!(body.contains("# TYPE wallet_durable_sequence gauge\n"));
    assert_eq!(metric(&body, "wallet_snapshot_follower_sequence"), None);
    assert!(server.stop().success());

    let server = Server::start(dir.path(), &["--snapshot-every", "100"]);
    let mut c = server.client();
    open(&mut c, "a");
    let body = c.get("/metrics").body;
    let durable = metric(&body, "wallet_durable_sequence").expect("durable sequence");
    let follower = metric(&body, "wallet_snapshot_follower_sequence").expect("follower series");
    assert!(follower <= durable, "{follower} > {durable}");
    assert!(server.stop().success());
}

#[test]
fn without_authentication_only_requests_addressed_to_a_loopback_host_are_served() {
    // A DNS-rebinding page reaches 127.0.0.1 from the user's browser with its own name in Host.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    // A transfer of 1.00 from a to b, to `target` with the header lines `hosts` ("" for none).
    let post = |target: &str, hosts: &str, id: &str| {
        let body = transfer_body("a", "b", "1.00", id).to_string();
        raw_request(
            &server,
            &format!(
                "POST {target} HTTP/1.1\r\n{hosts}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let send = |host: &str, id: &str| {
        post(
            "/v1/wallet/balance_transfer",
            &format!("Host: {host}\r\n"),
            id,
        )
    };
    let refused = uuid();
    let r = send("evil.example:8080", &refused);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "host_not_allowed");
    let r = raw_request(
        &server,
        "GET /v1/wallet/accounts/a HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(r.status, 403, "reads too: {}", r.body);
    assert_eq!(
        c.get(&format!("/v1/wallet/balance_transfer/{refused}"))
            .status,
        404,
        "nothing was submitted"
    );
    assert_eq!(common::balance_cents(&mut c, "a"), 10_000);
    // No Host header at all: nothing to check it against, refused too.
    let r = post("/v1/wallet/balance_transfer", "", &refused);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "host_required");
    assert_eq!(common::balance_cents(&mut c, "a"), 10_000);
    // A second Host header naming another host (the check read the first only), in either
    // order; an absolute-form target naming another host, with a loopback Host.
    for hosts in [
        "Host: localhost\r\nHost: evil.example",
        "Host: evil.example\r\nHost: localhost",
    ] {
        let r = post(
            "/v1/wallet/balance_transfer",
            &format!("{hosts}\r\n"),
            &refused,
        );
        assert!(
            [400, 403].contains(&r.status),
            "{hosts}: {} {}",
            r.status,
            r.body
        );
    }
    let r = post(
        "http://evil.example/v1/wallet/balance_transfer",
        "Host: localhost\r\n",
        &refused,
    );
    assert_eq!(r.status, 403, "absolute form: {}", r.body);
    assert_eq!(common::balance_cents(&mut c, "a"), 10_000);
    for host in ["localhost:8080", "[::1]:8080", "127.0.0.1"] {
        let r = send(host, &uuid());
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    let r = raw_request(
        &server,
        "GET http://localhost/v1/wallet/accounts/a HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.status, 200, "absolute form, loopback: {}", r.body);
    // The operations routes as well: /readyz and /metrics say things a rebinding page must
    // not read.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        let r = raw_request(
            &server,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
        );
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        let r = raw_request(
            &server,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    assert!(server.stop().success());
}

#[test]
fn a_body_that_never_arrives_whole_is_a_408_and_submits_nothing() {
    use std::io::Write;
    let dir = temp();
    let server = Server::start(dir.path(), &["--request-timeout-ms", "2000"]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let id = uuid();
    let body = transfer_body("a", "b", "1.00", &id).to_string();
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/wallet/balance_transfer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len() + 10
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let started = std::time::Instant::now();
    let r = common::read_response(&mut stream).expect("an answer");
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "body_incomplete");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        c.get(&format!("/v1/wallet/balance_transfer/{id}")).status,
        404,
        "nothing was submitted"
    );
    assert!(server.stop().success());
}

#[test]
fn a_client_that_half_closes_after_its_request_is_answered() {
    // `nc -N`, socat and some HTTP/1.0 clients shut down their sending side once the request
    // is out. hyper dropped such a request at the end of input: no answer, though the transfer
    // could already be executed.
    use std::io::Write;
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let single = transfer_body("a", "b", "1.00", &uuid());
    let batch = json!({"transfers": [transfer_body("a", "b", "2.00", &uuid())]});
    for (path, body, version) in [
        ("/v1/wallet/balance_transfer", &single, "HTTP/1.1"),
        ("/v1/wallet/balance_transfers", &batch, "HTTP/1.1"),
        ("/v1/wallet/balance_transfer", &single, "HTTP/1.0"),
    ] {
        let body = body.to_string();
        let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "POST {path} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let r = common::read_response(&mut stream)
            .unwrap_or_else(|e| panic!("{path} {version}: no answer after the half-close: {e}"));
        assert_eq!(r.status, 200, "{path} {version}: {}", r.body);
    }
    // The single transfer's repeat (HTTP/1.0) is a replay: 1.00 + 2.00 moved.
    let balance = |c: &mut common::Client, a: &str| {
        c.get(&format!("/v1/wallet/accounts/{a}")).json()["balances"][0]["balance"].clone()
    };
    assert_eq!(balance(&mut c, "b"), "3.00");
    assert_eq!(balance(&mut c, "a"), "97.00");
    assert!(server.stop().success());
}

#[test]
fn an_early_answer_to_a_request_expecting_100_continue_closes_the_connection() {
    // Answered before its `100 Continue`, a client need not send the body. The server drained
    // the connection for a body anyway, so the client's next request was read as that body and
    // never answered; and the answer did not say the connection was done.
    use std::io::Write;
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let connect = || {
        let stream = std::net::TcpStream::connect(&server.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let body = transfer_body("a", "b", "1.00", &uuid()).to_string();
    let head = |content_type: &str| {
        format!(
            "POST /v1/wallet/balance_transfer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
    };
    // Refused from its head (415): closed, and the next request on it is not taken as a body.
    let mut stream = connect();
    stream.write_all(head("text/plain").as_bytes()).unwrap();
    let r = common::read_response(&mut stream).expect("an answer");
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    let next_id = uuid();
    let next = transfer_body("a", "b", "5.00", &next_id).to_string();
    let started = std::time::Instant::now();
    let _ = write!(
        stream,
        "POST /v1/wallet/balance_transfer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{next}",
        next.len()
    );
    assert!(
        common::read_response(&mut stream).is_err(),
        "the connection is closed, not read on"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not after a drain: {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.get(&format!("/v1/wallet/balance_transfer/{next_id}"))
            .status,
        404
    );
    // A chunked body over the limit, refused part-way (after the `100 Continue`, so the client
    // sends it): the rest is drained as usual and the connection kept, not closed with the
    // client's bytes unread (a reset that can lose the 413).
    let mut stream = connect();
    stream
        .write_all(b"POST /v1/wallet/balance_transfer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let r = common::read_response(&mut stream).expect("100 Continue");
    assert_eq!(r.status, 100);
    let mut sender = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let chunk = format!("{:x}\r\n{}\r\n", 4096, " ".repeat(4096));
        for _ in 0..16 {
            sender.write_all(chunk.as_bytes())?;
        }
        sender.write_all(b"0\r\n\r\n")
    });
    let r = common::read_response(&mut stream).expect("an answer");
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.header("connection"), None, "{:?}", r.headers);
    assert!(
        sending.join().unwrap().is_ok(),
        "the body was read, not cut off"
    );
    // A body sent after the `100 Continue` is read: the answer keeps the connection.
    let mut stream = connect();
    stream
        .write_all(head("application/json").as_bytes())
        .unwrap();
    let r = common::read_response(&mut stream).expect("100 Continue");
    assert_eq!(r.status, 100);
    stream.write_all(body.as_bytes()).unwrap();
    let r = common::read_response(&mut stream).expect("an answer");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("connection"), None, "{:?}", r.headers);
    assert!(server.stop().success());
}

#[test]
fn batches_beyond_the_in_flight_limit_get_a_fast_429_before_their_bodies_are_read() {
    use std::io::Write;
    let dir = temp();
    let server = Server::start(dir.path(), &["--max-batches-in-flight", "2"]);
    let mut c = server.client();
    open_a_and_b(&mut c);
    let batch = || json!({"transfers": [transfer_body("a", "b", "0.01", &uuid())]});
    // Two batches whose bodies are still arriving hold both permits.
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&server.address).unwrap();
            s.write_all(
                b"POST /v1/wallet/balance_transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"transfers\":[",
            )
            .unwrap();
            s
        })
        .collect();
    // Posts batches until one is answered `want` (the other answer allowed meanwhile: `until`).
    let post_until = |c: &mut Client, want: u16, until: u16, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = c.post("/v1/wallet/balance_transfers", &batch());
            if r.status == want {
                return r;
            }
            assert_eq!(r.status, until, "{}", r.body);
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // They must be read before any batch of ours: a batch of ours in flight as they arrive
    // would take this caller's share (max(2 / 4, 1) = 1), and they would be refused instead.
    std::thread::sleep(Duration::from_millis(300));
    // From then on the batches of this caller are refused (a 200 only while they are not
    // read yet).
    let r = post_until(
        &mut c,
        429,
        200,
        "the stalled batches never held both permits",
    );
    assert!(r.header("retry-after").is_some());
    assert!(
        r.body
            .contains("too many batches in flight (the server takes 2 at once)"),
        "the refusal says which limit: {}",
        r.body
    );
    // A third batch is refused on its headers alone: its body never comes, the 429 does.
    let mut third = std::net::TcpStream::connect(&server.address).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    third
        .write_all(
            b"POST /v1/wallet/balance_transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match std::io::Read::read(&mut third, &mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "no answer before the body: {other:?} after {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("\r\nretry-after:"), "{head}");
    assert_eq!(
        c.post(
            "/v1/wallet/balance_transfer",
            &transfer_body("a", "b", "0.01", &uuid())
        )
        .status,
        200,
        "single transfers are not limited by batches"
    );
    drop(stalled);
    drop(third);
    // The permits come back once those connections are gone.
    post_until(
        &mut c,
        200,
        429,
        "the permits of the closed batches never came back",
    );
    assert!(server.stop().success());
}

#[test]
fn openapi_document_lists_exactly_the_server_routes_and_their_query_parameters() {
    let document: serde_json::Value =
        serde_json::from_str(&wallet::api::openapi_json().unwrap()).unwrap();
    // Each route with the query parameters it takes (any other is refused with a 400).
    let mut documented: Vec<(String, String, Vec<String>)> = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let mut query: Vec<String> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            query.sort();
            // Every POST route reads its body through the same limits: a slow body (408), a
            // body too large (413) and one that is not JSON (415) are answers it can give.
            if method == "post" {
                for status in ["408", "413", "415"] {
                    assert!(
                        operation["responses"].get(status).is_some(),
                        "POST {path} does not document {status}"
                    );
                }
            }
            documented.push((method.to_uppercase(), path.clone(), query));
        }
    }
    let mut served: Vec<(String, String, Vec<String>)> = wallet::api::routes::ROUTES
        .iter()
        .map(|r| {
            let mut query: Vec<String> = r.query.iter().map(|q| q.to_string()).collect();
            query.sort();
            (r.method.to_string(), r.path.to_string(), query)
        })
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
}

/// Jepsen-style bank: 64 clients move money among 10 accounts while readers check that every
/// read's total equals what was deposited and that no balance is negative.
#[test]
fn bank_total_is_conserved_under_concurrency() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    let accounts: Vec<String> = (0..10).map(|i| format!("bank-{i}")).collect();
    for a in &accounts {
        open(&mut c, a);
        deposit(&mut c, a, "1000.00");
    }
    let total = 10 * 100_000;
    let address = server.address.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..64u64 {
        let address = address.clone();
        let accounts = accounts.clone();
        writers.push(std::thread::spawn(move || {
            let mut client = Client::connect(&address);
            let mut outcomes = [0u32; 3];
            for i in 0..40u64 {
                let from = &accounts[((w * 7 + i * 3) % 10) as usize];
                let to = &accounts[((w * 3 + i * 7 + 1) % 10) as usize];
                if from == to {
                    continue;
                }
                let amount = format!("{}.{:02}", 1 + (w + i) % 300, i % 100);
                let r = client.post(
                    "/v1/wallet/balance_transfer",
                    &transfer_body(from, to, &amount, &uuid()),
                );
                match r.status {
                    200 => outcomes[0] += 1,
                    422 => outcomes[1] += 1,
                    other => {
                        outcomes[2] += 1;
                        assert!(other == 400, "unexpected status {other}: {}", r.body);
                    }
                }
            }
            outcomes
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let address = address.clone();
        let accounts = accounts.clone();
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            let mut client = Client::connect(&address);
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Per-account reads are never negative.
                for a in &accounts {
                    let b = balance_cents(&mut client, a);
                    assert!(b >= 0, "negative balance {b} on {a}");
                }
                // A whole-bank read at every sequence so far: the event stream's running
                // balances, whose total must equal the deposits after every transfer.
                let events = client.get("/v1/wallet/events?from_seq=1&limit=10000");
                assert_eq!(events.status, 200, "{}", events.body);
                check_bank_stream(&events.body, total);
                reads += 1;
            }
            reads
        }));
    }
    let mut committed = 0;
    for w in writers {
        let o = w.join().expect("writer");
        assert_eq!(o[2], 0, "writers only see 200 or 422");
        committed += o[0];
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    assert!(committed > 100, "most transfers commit ({committed})");
    let sum: i64 = accounts.iter().map(|a| balance_cents(&mut c, a)).sum();
    assert_eq!(sum, total, "the bank's total is conserved");
    let events = c.get("/v1/wallet/events?from_seq=1&limit=10000");
    assert_eq!(check_bank_stream(&events.body, total), committed as usize);
    assert!(server.stop().success());
}

/// Replays the NDJSON stream: no balance below zero, and after each transfer's credit the total
/// over all accounts equals `total`. Returns the number of transfers seen.
fn check_bank_stream(body: &str, total: i64) -> usize {
    let mut balances = std::collections::HashMap::<String, i64>::new();
    let mut transfers = 0;
    let mut deposited = 0;
    for line in body.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(account), Some(after)) =
            (e["account_id"].as_str(), e["balance_after"].as_str())
        {
            let after = common::cents(after);
            assert!(after >= 0, "negative balance at sequence {}", e["sequence"]);
            balances.insert(account.to_string(), after);
            if e["kind"] == "deposited" {
                deposited += 1;
            }
            if e["kind"] == "credited" {
                transfers += 1;
                assert_eq!(deposited, 10, "transfers start after the deposits");
                assert_eq!(
                    balances.values().sum::<i64>(),
                    total,
                    "total at sequence {}",
                    e["sequence"]
                );
            }
        }
    }
    transfers
}

#[test]
fn one_transaction_id_from_16_clients_applies_once() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    open(&mut c, "src");
    open(&mut c, "dst");
    deposit(&mut c, "src", "100.00");
    for round in 0..5 {
        let id = uuid();
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let address = server.address.clone();
                let barrier = barrier.clone();
                let id = id.clone();
                std::thread::spawn(move || {
                    let mut client = Client::connect(&address);
                    client.get("/healthz");
                    barrier.wait();
                    let r = client.post(
                        "/v1/wallet/balance_transfer",
                        &transfer_body("src", "dst", "1.00", &id),
                    );
                    let replayed = r.header("idempotent-replayed").is_some();
                    (r.status, r.json(), replayed)
                })
            })
            .collect();
        let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            answers.iter().all(|a| a.0 == 200 && a.1 == answers[0].1),
            "all 16 get the same answer"
        );
        assert_eq!(
            answers.iter().filter(|a| !a.2).count(),
            1,
            "exactly one execution"
        );
        assert_eq!(balance_cents(&mut c, "dst"), 100 * (round + 1));
    }
    assert!(server.stop().success());
}

/// A journal in `dir` (a server run with `args`, stopped): accounts `a` and `b`, a deposit, then
/// 30,000 transfers in batches (about 60,000 events, 3.4 MB of records).
fn thirty_thousand_transfers(dir: &std::path::Path, args: &[&str]) {
    let server = Server::start(dir, args);
    let mut c = server.client();
    open(&mut c, "a");
    open(&mut c, "b");
    deposit(&mut c, "a", "100000.00");
    for _ in 0..4 {
        let transfers: Vec<_> = (0..7_500)
            .map(|_| transfer_body("a", "b", "0.01", &uuid()))
            .collect();
        let r = c.post(
            "/v1/wallet/balance_transfers",
            &json!({ "transfers": transfers }),
        );
        assert_eq!(r.status, 200);
    }
    assert!(server.stop().success());
}

/// `wallet_events_journal_bytes_total` from `/metrics`.
fn journal_bytes(c: &mut Client) -> u64 {
    let metrics = c.get("/metrics").body;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("wallet_events_journal_bytes_total "))
        .unwrap_or_else(|| panic!("no journal-bytes counter in {metrics}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A consumer catching up from the journal (older than the in-memory window, as everything is
/// after a restart), poll by poll, reads only the new bytes each time: each read resumes where
/// the last one ended. Before, every poll read its segment from the start, so catching up over
/// a segment was quadratic. The events returned are the same contiguous stream either way.
#[test]
fn polling_the_event_stream_from_the_journal_resumes_where_the_last_poll_ended() {
    let dir = temp();
    thirty_thousand_transfers(dir.path(), &[]);
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    // About 2.2 MB into the segment (112-byte records, two events each).
    let first = 40_000u64;
    let mut from = first;
    let mut read = Vec::new();
    for _ in 0..8 {
        let before = journal_bytes(&mut c);
        let r = c.get(&format!("/v1/wallet/events?from_seq={from}&limit=1000"));
        assert_eq!(r.status, 200, "{}", r.body);
        read.push(journal_bytes(&mut c) - before);
        let seqs: Vec<u64> = r
            .body
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["sequence"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs.len(), 1000, "a whole page of events");
        assert_eq!(
            seqs,
            (from..from + 1000).collect::<Vec<_>>(),
            "contiguous from {from}"
        );
        from += 1000;
    }
    // The first poll reads the segment up to its start; each later one about a page of records
    // (1,000 events: 56 KB), not the 2.2 MB before it.
    assert!(read[0] > 2_000_000, "first poll read {} bytes", read[0]);
    for (i, bytes) in read.iter().enumerate().skip(1) {
        assert!(
            *bytes < 512 << 10,
            "poll {i} read {bytes} bytes (all polls: {read:?})"
        );
    }
    assert!(server.stop().success());
}

/// A position cached by an earlier read far back (here in the first segment) is not resumed
/// from when the sequence asked for lies in a later segment: that would read every segment in
/// between in one request. The read starts at the segment holding the sequence instead.
#[test]
fn an_event_read_never_resumes_from_a_segment_before_the_one_it_needs() {
    let dir = temp();
    let one_mib = (1u64 << 20).to_string();
    thirty_thousand_transfers(dir.path(), &["--segment-size", &one_mib]);
    let segments = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".wal")
        })
        .count();
    assert!(segments >= 3, "{segments} segments");

    let server = Server::start(dir.path(), &["--segment-size", &one_mib]);
    let mut c = server.client();
    let r = c.get("/v1/wallet/events?from_seq=3&limit=10");
    assert_eq!(r.status, 200, "{}", r.body);
    let before = journal_bytes(&mut c);
    let r = c.get("/v1/wallet/events?from_seq=55000&limit=10");
    let read = journal_bytes(&mut c) - before;
    assert_eq!(r.status, 200, "{}", r.body);
    let first: serde_json::Value = serde_json::from_str(r.body.lines().next().unwrap()).unwrap();
    assert_eq!(first["sequence"], 55000);
    assert!(
        read < 3 << 19,
        "the read at 55000 read {read} bytes: more than its own 1 MiB segment"
    );
    assert!(server.stop().success());
}

/// SIGTERM ends the server within its 10 s grace period plus a little, even with a request
/// that would run on for much longer (here a body that never finishes arriving, under a 60 s
/// request timeout): it is cut. Before, the engine's shutdown waited for the connection to end
/// by itself (the body deadline, 30 s here).
#[test]
fn shutdown_is_bounded_even_with_a_request_that_never_finishes() {
    use std::io::Write;
    let dir = temp();
    let server = Server::start(dir.path(), &["--request-timeout-ms", "60000"]);
    let mut c = server.client();
    open(&mut c, "a");
    let mut stalled = std::net::TcpStream::connect(&server.address).unwrap();
    stalled
        .write_all(
            b"POST /v1/wallet/deposit HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = server.stop();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    // What was acknowledged is there after the restart.
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    assert_eq!(c.get("/v1/wallet/accounts/a").status, 200);
    assert!(server.stop().success());
    drop(stalled);
}

#[test]
fn restart_keeps_balances_history_and_remembered_ids() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    open(&mut c, "a");
    open(&mut c, "b");
    deposit(&mut c, "a", "50.00");
    let id = uuid();
    let first = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "20.00", &id),
    );
    assert_eq!(first.status, 200);
    let history = c.get("/v1/wallet/accounts/a/history").json();
    let account = c.get("/v1/wallet/accounts/b").json();
    let events: Vec<serde_json::Value> = c
        .get("/v1/wallet/events?from_seq=1")
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["kind"] == "credited"));
    assert!(server.stop().success(), "SIGTERM exits 0");

    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    let journal_reads = |c: &mut Client| -> u64 {
        let metrics = c.get("/metrics").body;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("wallet_events_journal_reads_total "))
            .unwrap_or_else(|| panic!("no journal-read counter in {metrics}"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    // A poll at the end of the stream finds nothing, and reads no journal file for it (the
    // window is empty after a restart; each such poll used to scan the newest segment).
    let last = events.last().unwrap()["sequence"].as_u64().unwrap();
    for _ in 0..3 {
        let r = c.get(&format!("/v1/wallet/events?from_seq={}", last + 1));
        assert_eq!((r.status, r.body.as_str()), (200, ""));
    }
    assert_eq!(journal_reads(&mut c), 0);
    // After a restart the in-memory window is empty and the stream is read from the journal:
    // starting at any event, the second event of a transfer included, gives that event first.
    for (i, event) in events.iter().enumerate() {
        let seq = event["sequence"].as_u64().unwrap();
        let r = c.get(&format!("/v1/wallet/events?from_seq={seq}"));
        assert_eq!(r.status, 200, "{}", r.body);
        let lines: Vec<serde_json::Value> = r
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, events[i..], "events from sequence {seq}");
    }
    let none = c.get("/v1/wallet/events?from_seq=1&limit=0");
    assert_eq!(none.status, 200);
    assert_eq!(none.body, "", "limit=0 from the journal");
    assert_eq!(journal_reads(&mut c), events.len() as u64 + 1);
    assert_eq!(c.get("/v1/wallet/accounts/a/history").json(), history);
    assert_eq!(c.get("/v1/wallet/accounts/b").json(), account);
    let again = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "20.00", &id),
    );
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), first.json());
    assert_eq!(
        c.post(
            "/v1/wallet/balance_transfer",
            &transfer_body("a", "b", "21.00", &id)
        )
        .status,
        409
    );
    assert_eq!(balance_cents(&mut c, "b"), 2000);
    assert!(server.stop().success());
}

/// Every transaction id is remembered forever, in RAM: at `--max-transaction-ids` a request
/// with a new id is refused unexecuted (507 `ledger_full`, nothing journaled or remembered),
/// while retries of remembered ids keep their answers; a restart with a higher limit executes
/// the refused request when it is sent again.
#[test]
fn a_full_ledger_refuses_new_ids_with_507_and_a_higher_limit_executes_them() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--max-transaction-ids", "4"]);
    let mut c = server.client();
    open(&mut c, "a");
    open(&mut c, "b");
    deposit(&mut c, "a", "50.00");
    let first = uuid();
    let ok = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "1.00", &first),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);

    let refused_id = uuid();
    let refused = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "2.00", &refused_id),
    );
    assert_eq!(refused.status, 507, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["error"]["code"], "ledger_full", "{body}");
    assert_eq!(body["transaction_id"], refused_id.as_str());
    assert_eq!(body["error"]["transaction_id"], refused_id.as_str());
    // Not executed, so not known: a lookup of its id finds nothing.
    let lookup = c.get(&format!("/v1/wallet/balance_transfer/{refused_id}"));
    assert_eq!(lookup.status, 404, "{}", lookup.body);
    let r = c.post(
        "/v1/wallet/accounts",
        &serde_json::json!({"account_id": "c"}),
    );
    assert_eq!(r.status, 507, "{}", r.body);
    // Sent without an id: the one the server gave it is in the error, to retry with (it was
    // only at the top level, where the documentation did not say to look).
    let given = r.json()["error"]["transaction_id"]
        .as_str()
        .map(str::to_string);
    assert!(
        given
            .as_deref()
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{}",
        r.body
    );
    // Remembered ids still get their answers: the original, and 409 for another body.
    let again = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "1.00", &first),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), ok.json());
    let reused = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "3.00", &first),
    );
    assert_eq!(reused.status, 409, "{}", reused.body);
    let batch = serde_json::json!({"transfers": [
        transfer_body("a", "b", "1.00", &first),
        transfer_body("a", "b", "4.00", &uuid()),
    ]});
    let r = c.post("/v1/wallet/balance_transfers", &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results[0]["http_status"], 200, "{results:?}");
    assert_eq!(results[1]["http_status"], 507, "{results:?}");
    assert_eq!(results[1]["result"]["error"]["code"], "ledger_full");
    assert_eq!(balance_cents(&mut c, "b"), 100);
    let metrics = c.get("/metrics").body;
    for line in [
        "wallet_transaction_ids 4",
        "wallet_max_transaction_ids 4",
        "wallet_refused_ledger_full_total 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in {metrics}"
        );
    }
    assert!(server.stop().success());

    // Nothing refused was journaled: one more id fits, and it is the refused request's.
    let server = Server::start(dir.path(), &["--max-transaction-ids", "5"]);
    let mut c = server.client();
    let r = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "2.00", &refused_id),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_eq!(balance_cents(&mut c, "b"), 300);
    let r = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "2.00", &uuid()),
    );
    assert_eq!(r.status, 507, "{}", r.body);
    assert!(server.stop().success());
}

/// A full disk under a running server: the journal's reserve takes the next segment, every
/// transfer answered 200 is kept, new ones get 507 `journal_full` (with Retry-After) while
/// the server stays up and serves reads and retries, and writes resume by themselves once
/// space is freed. Nothing acknowledged is lost across a restart.
#[test]
fn a_full_disk_answers_507_until_space_is_freed_and_loses_nothing_acknowledged() {
    let disk = SmallDisk::mount(8 << 20);
    let data = disk.dir.path().join("data");
    // A segment holds more records than the ring (4,160 in flight at most, 176 bytes each).
    let args = ["--segment-size", "1048576", "--ring-size", "4096"];
    let server = Server::start(&data, &args);
    let mut c = server.client();
    open(&mut c, "a");
    open(&mut c, "b");
    deposit(&mut c, "a", "1000000.00");
    let filler = disk.fill("filler");
    // Batches of 500 transfers of 0.01 until one is refused: the first segment (about 9,000
    // transfers) fills, the next one is made in the reserve's space.
    let mut committed = 0i64;
    let mut refused = 0;
    let mut last_committed_id = String::new();
    for _ in 0..60 {
        let ids: Vec<String> = (0..500).map(|_| uuid()).collect();
        let batch = json!({"transfers": ids.iter().map(|id| transfer_body("a", "b", "0.01", id)).collect::<Vec<_>>()});
        let r = c.post("/v1/wallet/balance_transfers", &batch);
        assert_eq!(r.status, 200, "{}", r.body);
        let results = r.json()["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), ids.len());
        // In order, across the chunks the response is rendered in.
        for (index, (result, id)) in results.iter().zip(&ids).enumerate() {
            assert_eq!(result["index"], index, "{result}");
            assert_eq!(result["result"]["transaction_id"], id.as_str(), "{result}");
            match result["http_status"].as_u64() {
                Some(200) => {
                    committed += 1;
                    last_committed_id = id.clone();
                }
                Some(507) => {
                    assert_eq!(
                        result["result"]["error"]["code"], "journal_full",
                        "{result}"
                    );
                    refused += 1;
                }
                other => panic!("status {other:?}: {result}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no refusal after {committed} transfers");
    assert!(committed > 5_000, "refused after {committed} transfers");
    // The server is up: reads, a retry of a committed transfer, and a fast 507 for new work.
    assert_eq!(balance_cents(&mut c, "b"), committed);
    let again = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "0.01", &last_committed_id),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let id = uuid();
    let r = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "0.01", &id),
    );
    assert_eq!(r.status, 507, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "journal_full");
    assert_eq!(r.header("retry-after"), Some("5"));
    let metrics = c.get("/metrics").body;
    assert!(
        metrics.lines().any(|l| l == "wallet_journal_space_short 1"),
        "{metrics}"
    );
    assert_eq!(c.get("/readyz").status, 200);

    // Space is freed: the same request goes through within a few retries.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.post(
            "/v1/wallet/balance_transfer",
            &transfer_body("a", "b", "0.01", &id),
        );
        if r.status == 200 {
            assert_eq!(r.header("idempotent-replayed"), None);
            committed += 1;
            break;
        }
        assert_eq!(r.status, 507, "{}", r.body);
        assert!(
            std::time::Instant::now() < deadline,
            "still 507 10 s after space was freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(balance_cents(&mut c, "b"), committed);
    assert!(server.stop().success(), "SIGTERM exits 0");

    let server = Server::start(&data, &args);
    let mut c = server.client();
    assert_eq!(balance_cents(&mut c, "b"), committed);
    assert_eq!(
        balance_cents(&mut c, "a"),
        100_000_000 - committed,
        "money conserved"
    );
    assert!(server.stop().success());
}

/// The event stream read from the journal files (older than the in-memory window) meets a
/// record damaged on disk while the server runs: a 500 naming the failure, never a short or
/// empty 200 that a consumer would take for "nothing more" and poll forever.
#[test]
fn a_damaged_record_under_the_event_stream_is_an_error_not_an_empty_answer() {
    use std::os::unix::fs::FileExt;
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    for a in ["a", "b", "c"] {
        open(&mut c, a);
    }
    deposit(&mut c, "a", "5.00");
    assert!(server.stop().success());
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    let whole = c.get("/v1/wallet/events?from_seq=1");
    assert_eq!((whole.status, whole.body.lines().count()), (200, 4));
    // Flip a bit inside the second record's frame (the first record is at offset 64).
    let (_, segment) = wallet::journal::list_segments(&dir.path().join("journal"))
        .unwrap()
        .remove(0);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let mut length = [0u8; 4];
    file.read_exact_at(&mut length, 64).unwrap();
    let second = 64 + u64::from(u32::from_le_bytes(length));
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, second + 40).unwrap();
    file.write_all_at(&[byte[0] ^ 0x04], second + 40).unwrap();
    drop(file);
    let r = c.get("/v1/wallet/events?from_seq=1");
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "journal_read_failed");
    server.kill9();
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let output = common::output_within(&mut Server::command(dir.path()), SERVE_REFUSAL_LIMIT);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use"));
    // Refused before it announces an address: a supervisor that waits for "listening on"
    // would take it for started.
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening on"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    // Nor does a bench get to write into a live server's journal, even one with no record yet
    // (its only check used to be that the journal was empty).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["bench", "--accounts", "10", "--transfers", "100"])
        .args(["--wait", "park", "--output-wait", "park", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(
        wallet::journal::list_segments(&dir.path().join("journal"))
            .unwrap()
            .is_empty()
    );
    // Nor a second server once the LOCK file is removed under the first: it locked a new
    // file, recovered, and wrote the same journal.
    std::fs::remove_file(dir.path().join("LOCK")).unwrap();
    let output = common::output_within(&mut Server::command(dir.path()), SERVE_REFUSAL_LIMIT);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(server.stop().success());
}

/// Runs `wallet loadgen --url URL ARGS MORE --json` to the end and returns its JSON report.
fn loadgen(url: &str, args: &[&str], more: &[&str]) -> serde_json::Value {
    loadgen_exiting(url, args, more, true)
}

/// `loadgen`, for a run that must succeed (`succeeded`) or fail: one in which nothing succeeded
/// exits 1, its report printed all the same.
fn loadgen_exiting(url: &str, args: &[&str], more: &[&str], succeeded: bool) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["loadgen", "--url", url, "--json"])
        .args(args)
        .args(more)
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if succeeded {
        assert!(output.status.success(), "loadgen: {stderr}");
    } else {
        assert_eq!(output.status.code(), Some(1), "loadgen: {stderr}");
        assert!(stderr.contains("nothing succeeded"), "loadgen: {stderr}");
    }
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

/// The server closes a keep-alive connection that stays idle past its header-read timeout.
/// `wallet loadgen` must then resend on a fresh connection, not count an error: here every
/// connection idles about 1 s between requests against a 300 ms timeout.
#[test]
fn loadgen_resends_on_a_fresh_connection_after_the_server_closed_an_idle_one() {
    let dir = temp();
    let server = Server::start(dir.path(), &["--header-read-timeout-ms", "300"]);
    let report = loadgen(
        &format!("http://{}", server.address),
        &[
            "--raw-path",
            "/healthz",
            "--rate",
            "4",
            "--connections",
            "4",
        ],
        &["--duration", "3"],
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["status_counts"]["200"].as_u64().unwrap_or(0) >= 10,
        "{report}"
    );
    // 12 requests due over 3 s is 4 per second offered: the rates are over the whole duration,
    // not up to the last answer (an interval short: 4.36/s was reported).
    assert_eq!(report["requests"], 12, "{report}");
    for field in ["requests_per_sec", "transfers_per_sec"] {
        let rate = report[field].as_f64().unwrap_or(f64::MAX);
        assert!(rate <= 4.0 * 1.02, "{field} {rate}: {report}");
    }
}

/// Two load-generator runs against one server must measure two sets of transfers, not the first
/// run's ids answered again as idempotent replays: the seed is random unless given, replays are
/// counted apart from committed transfers (single and batch requests), and `--setup` run twice
/// deposits once.
#[test]
fn loadgen_sends_fresh_ids_per_run_and_counts_replays_apart() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let url = format!("http://{}", server.address);
    let run_exiting = |extra: &[&str], succeeded: bool| {
        loadgen_exiting(
            &url,
            &["--accounts", "20", "--rate", "200", "--connections", "2"],
            &[&["--duration", "1"], extra].concat(),
            succeeded,
        )
    };
    let run = |extra: &[&str]| run_exiting(extra, true);
    let count = |report: &serde_json::Value, field: &str| report[field].as_u64().unwrap_or(0);
    let ok = |report: &serde_json::Value| report["status_counts"]["200"].as_u64().unwrap_or(0);

    // Before --setup no account exists: every answer is a rejection, none is a committed
    // transfer, and only the all-answers latency has samples; the run fails.
    let rejected = run_exiting(&["--seed", "5"], false);
    assert!(
        rejected["status_counts"]["422"].as_u64().unwrap_or(0) >= 100,
        "{rejected}"
    );
    assert_eq!(count(&rejected, "transfers"), 0, "{rejected}");
    // No committed transfer, no latency of one: null, not zeros that read as measured.
    assert!(rejected["latency_us"].is_null(), "{rejected}");
    assert!(rejected["latency_all_us"]["max"].as_u64().unwrap_or(0) > 0);
    // In batches, the rejected items inside each 200 are counted (they were counted nowhere).
    let rejected_batch = run_exiting(&["--seed", "6", "--batch", "10"], false);
    assert!(ok(&rejected_batch) >= 10, "{rejected_batch}");
    assert_eq!(
        count(&rejected_batch, "rejected_items"),
        ok(&rejected_batch) * 10,
        "{rejected_batch}"
    );
    assert_eq!(count(&rejected_batch, "transfers"), 0, "{rejected_batch}");

    let first = run(&["--setup", "--seed", "42"]);
    assert_eq!(first["seed"], 42, "{first}");
    assert!(count(&first, "transfers") >= 100, "{first}");
    assert_eq!(count(&first, "replayed"), 0, "{first}");

    // The same seed again: the same ids, answered as replays and not counted as transfers.
    let again = run(&["--setup", "--seed", "42"]);
    assert!(count(&again, "replayed") >= 50, "{again}");
    assert_eq!(
        count(&again, "transfers") + count(&again, "replayed"),
        ok(&again),
        "{again}"
    );

    // No seed: a fresh one each run, and nothing replayed.
    let fresh = run(&[]);
    let other = run(&[]);
    assert_ne!(fresh["seed"], other["seed"]);
    for report in [&fresh, &other] {
        assert_eq!(count(report, "replayed"), 0, "{report}");
        assert_eq!(count(report, "transfers"), ok(report), "{report}");
    }

    // Batches: replayed items are counted from the per-transfer results.
    let batch = run(&["--seed", "7", "--batch", "10"]);
    assert!(count(&batch, "transfers") >= 50, "{batch}");
    assert_eq!(count(&batch, "replayed"), 0, "{batch}");
    let batch_again = run(&["--seed", "7", "--batch", "10"]);
    assert!(count(&batch_again, "replayed") >= 30, "{batch_again}");
    assert_eq!(
        count(&batch_again, "transfers") + count(&batch_again, "replayed"),
        ok(&batch_again) * 10,
        "{batch_again}"
    );

    // Two setups deposited once: the 20 accounts still hold exactly what one setup put in.
    let mut c = server.client();
    let total: i64 = (0..20)
        .map(|i| balance_cents(&mut c, &format!("lg-{i:07}")))
        .sum();
    assert_eq!(total, 20 * 1_000_000_000 * 100);
}

/// A run in which more than `--max-failure-share` (default 1%) of what it offered failed exits
/// 1 after its report: here half the accounts are missing, so about three transfers in four are
/// refused with 422, and so are batch items. The share of failures is counted (whole requests,
/// and batch items refused inside a 200), and their latencies are apart from the successes'.
/// A run with a few refusals passed as a measurement: 98.9% answered 429, exit 0.
#[test]
fn loadgen_fails_a_run_in_which_more_than_the_allowed_share_failed() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let url = format!("http://{}", server.address);
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["loadgen", "--url", &url, "--json", "--rate", "200"])
            .args(["--connections", "2", "--duration", "1"])
            .args(extra)
            .output()
            .expect("run loadgen");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("JSON report");
        (output.status.code(), report, stderr)
    };
    let count = |report: &serde_json::Value, field: &str| report[field].as_u64().unwrap_or(0);

    // Ten accounts set up, and nothing failed: no failure, no warning.
    let (code, clean, stderr) = run(&["--setup", "--accounts", "10"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(count(&clean, "failed"), 0, "{clean}");
    assert_eq!(
        count(&clean, "offered"),
        count(&clean, "requests"),
        "{clean}"
    );
    assert!(clean["latency_failed_us"].is_null(), "{clean}");
    assert!(!stderr.contains("failed ("), "{stderr}");

    // Twenty accounts named, ten of them open.
    let (code, mixed, stderr) = run(&["--accounts", "20"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("more than --max-failure-share 0.01"),
        "{stderr}"
    );
    let refused = mixed["status_counts"]["422"].as_u64().unwrap_or(0);
    assert!(count(&mixed, "transfers") > 0, "{mixed}");
    assert_eq!(count(&mixed, "failed"), refused, "{mixed}");
    assert_eq!(
        count(&mixed, "offered"),
        count(&mixed, "requests"),
        "{mixed}"
    );
    let share = mixed["failed_share"].as_f64().unwrap_or(0.0);
    assert!((0.5..0.95).contains(&share), "{mixed}");
    assert!(
        mixed["latency_failed_us"]["max"].as_u64().is_some(),
        "{mixed}"
    );

    // Allowed: the run counts, and warns.
    let (code, allowed, stderr) = run(&["--accounts", "20", "--max-failure-share", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(count(&allowed, "failed") > 0, "{allowed}");
    assert!(
        stderr.contains("WARNING") && stderr.contains("failed ("),
        "{stderr}"
    );

    // Batches: the refused items inside each 200 are the failures.
    let (code, batch, stderr) = run(&["--accounts", "20", "--batch", "10"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        count(&batch, "offered"),
        count(&batch, "requests") * 10,
        "{batch}"
    );
    assert_eq!(
        count(&batch, "failed"),
        count(&batch, "rejected_items"),
        "{batch}"
    );
    assert!(count(&batch, "failed") > 0, "{batch}");

    // A share outside 0..=1 is refused by name.
    let (code, _, stderr) = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["loadgen", "--url", &url, "--max-failure-share", "1.5"])
            .output()
            .expect("run loadgen");
        (
            output.status.code(),
            (),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--max-failure-share"), "{stderr}");
}

/// `wallet loadgen` on `/healthz` at 200 requests/s on 4 connections for `seconds`, its JSON
/// report on stdout.
fn spawn_healthz_loadgen(url: &str, seconds: u64) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["loadgen", "--url", url, "--raw-path", "/healthz"])
        .args(["--rate", "200", "--connections", "4", "--json"])
        .args(["--duration", &seconds.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run loadgen")
}

/// Sends `signal` (`-STOP`, `-CONT`) to the server's process.
fn send_signal(server: &Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Open loop: a server that stalls near the end of a run still gets every request that was due
/// before the end, late, with its latency counted from the intended send time; the run does
/// not drop them (and with them the worst latencies).
#[test]
fn loadgen_sends_the_backlog_of_a_stall_at_the_end_of_an_open_loop_run() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let url = format!("http://{}", server.address);
    let loadgen = spawn_healthz_loadgen(&url, 2);
    // Stop the server for the last part of the run and a little after its end.
    std::thread::sleep(Duration::from_millis(1500));
    let stop = |signal: &str| send_signal(&server, signal);
    stop("-STOP");
    std::thread::sleep(Duration::from_millis(1000));
    stop("-CONT");
    let output = loadgen.wait_with_output().expect("loadgen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    // 200/s for 2 s: 400 requests were due, and all were sent and answered.
    assert_eq!(report["requests"], 400, "{report}");
    assert_eq!(report["unsent"], 0, "{report}");
    assert_eq!(report["status_counts"]["200"], 400, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["latency_us"]["max"].as_u64().unwrap_or(0) >= 500_000,
        "the stall is in the latencies: {report}"
    );
    // The requests due during the stall went out late, and the run says so.
    assert!(
        report["send_lag_us"]["p99"].as_u64().unwrap_or(0) >= 100_000,
        "{report}"
    );
    let achieved = report["rate_achieved_share"].as_f64().unwrap_or(9.0);
    assert!(achieved <= 1.01, "{report}");
    assert!(
        stderr.contains("WARNING: requests went out late"),
        "{stderr}"
    );
}

/// Open loop: requests that a stall past the drain limit left unsent are in `latency_all_us`
/// at (at least) their wait until the run gave up, not left out: a run with half its requests
/// unsent does not report the fast half's latencies.
#[test]
fn loadgen_counts_the_requests_a_stall_left_unsent_in_its_latencies() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let url = format!("http://{}", server.address);
    let loadgen = spawn_healthz_loadgen(&url, 1);
    // Stop the server from the run's middle until after its deadline (10 s after its end).
    std::thread::sleep(Duration::from_millis(700));
    let signal = |signal: &str| send_signal(&server, signal);
    signal("-STOP");
    let output = loadgen.wait_with_output();
    signal("-CONT");
    let output = output.expect("loadgen");
    // Over a tenth of the run went unanswered: past --max-failure-share (1%), the run fails,
    // its report printed all the same.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--max-failure-share 0.01"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let count = |field: &str| report[field].as_u64().unwrap_or(0);
    assert_eq!(count("requests") + count("unsent"), 200, "{report}");
    assert_eq!(count("offered"), 200, "{report}");
    let ok = report["status_counts"]["200"].as_u64().unwrap_or(0);
    assert_eq!(count("failed"), 200 - ok, "{report}");
    // The failures' latencies hold the unsent requests' waits.
    assert!(
        report["latency_failed_us"]["p50"].as_u64().unwrap_or(0) >= 9_000_000,
        "{report}"
    );
    let answered = report["status_counts"]["200"].as_u64().unwrap_or(0);
    assert!(
        (40..=170).contains(&answered),
        "the stall came in the run's middle: {report}"
    );
    assert!(count("unsent") >= 20, "{report}");
    // Over 10% of the due requests waited out the deadline: p90 says so.
    assert!(
        report["latency_all_us"]["p90"].as_u64().unwrap_or(0) >= 9_000_000,
        "{report}"
    );
}

/// A server that accepts connections and then never answers: reads every byte it is sent,
/// writes nothing, until the test ends. Returns its address.
fn silent_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(std::io::Read::read(&mut stream, &mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    address
}

/// A server that answers every request at once with an empty 200, except the `hung`-th request
/// it reads (counted over all connections, from 1), which it never answers. Returns its address.
fn server_that_hangs_on_one_request(hung: u64) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == hung {
                            // Never answered: read on until the client goes away.
                            while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buffer) {
                        Ok(n) if n > 0 => pending.extend_from_slice(&buffer[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    address
}

/// One request that never gets an answer does not stretch the run's throughput window: the
/// rates are over the time answers came in. The report used to wait for the hung request's
/// deadline (10 s after the end) and divide by that: a 1 s closed-loop run reported about
/// 11 s and a tenth of its rate.
#[test]
fn loadgen_rates_are_not_diluted_by_a_request_that_never_gets_an_answer() {
    let address = server_that_hangs_on_one_request(5).to_string();
    let url = format!("http://{address}");
    let (status, stdout, stderr) = loadgen_within(
        &[
            "--url",
            &url,
            "--json",
            "--raw-path",
            "/x",
            "--rate",
            "0",
            "--connections",
            "2",
            "--duration",
            "1",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["errors"], 1, "{report}");
    let seconds = report["seconds"].as_f64().unwrap_or(f64::MAX);
    assert!((0.9..3.0).contains(&seconds), "seconds {seconds}: {report}");
    let answered = report["status_counts"]["200"].as_f64().unwrap_or(0.0);
    let per_second = report["transfers_per_sec"].as_f64().unwrap_or(0.0);
    assert!(
        per_second >= answered / 3.0,
        "{per_second}/s for {answered} answers: {report}"
    );
}

/// Runs `wallet loadgen ARGS`, which must exit by itself within `limit`: its exit status,
/// stdout and stderr.
fn loadgen_within(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String, String) {
    let output = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .arg("loadgen")
            .args(args),
        limit,
    );
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A load test stops by itself: against a server that accepts and never answers, a request
/// without an answer by the drain limit (10 s after the run's end) is an error and the run
/// reports; a TLS handshake that never finishes fails the run within the connect timeout.
/// (Only connecting was bounded before: both runs waited forever.)
#[test]
fn loadgen_stops_by_itself_when_the_server_never_answers() {
    let address = silent_server().to_string();
    let url = format!("http://{address}");
    let (status, stdout, stderr) = loadgen_within(
        &["--url", &url, "--json", "--rate", "10", "--duration", "1"],
        Duration::from_secs(60),
    );
    // The report is printed, and a run in which nothing succeeded fails.
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing succeeded"), "{stderr}");
    // Timeouts say nothing of missing accounts: no hint to run --setup.
    assert!(!stderr.contains("without --setup"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    // Ten requests were due (10/s for 1 s), each on its own connection of the default 64,
    // and each hung until the deadline.
    assert_eq!(report["errors"], report["requests"], "{report}");
    assert!(report["errors"].as_u64().unwrap_or(0) >= 1, "{report}");
    // Each one a timeout, counted as one.
    assert_eq!(
        report["errors_by_kind"]["timeout"], report["errors"],
        "{report}"
    );
    assert_eq!(report["transfers"], 0, "{report}");
    assert_eq!(
        report["requests"].as_u64().unwrap_or(0) + report["unsent"].as_u64().unwrap_or(0),
        10,
        "every due request is either sent or counted unsent: {report}"
    );

    let dir = temp();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let port = address.rsplit_once(':').unwrap().1;
    let url = format!("https://localhost:{port}");
    let (status, _, stderr) = loadgen_within(
        &[
            "--url",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--duration",
            "1",
        ],
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert!(stderr.contains("TLS handshake"), "{stderr}");
}

/// A server whose recovery a failpoint holds back for a minute: it listens and answers as it
/// does while recovering.
fn held_in_recovery(dir: &std::path::Path) -> Server {
    Server::start_listening_with_env(dir, &[], &[("WALLET_FAILPOINT", "recovery-delay:60000")])
}

/// SIGTERM while the ledger is being recovered stops the server at once (recovery only reads):
/// a long journal without a snapshot can take minutes to replay, and a service manager's stop
/// timeout would otherwise end in SIGKILL. Recovery is held back by a failpoint here.
#[test]
fn a_shutdown_during_recovery_stops_at_once() {
    let dir = temp();
    let server = held_in_recovery(dir.path());
    let readiness = Client::connect(&server.address).get("/readyz");
    assert_eq!(readiness.status, 503, "{}", readiness.body);
    let stopping = std::time::Instant::now();
    let status = server.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped in {:?}",
        stopping.elapsed()
    );
    // Nothing was written: a start without the failpoint recovers the empty journal.
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.client().get("/readyz").status, 200);
    assert!(server.stop().success());
}

/// While recovering, a request the server would refuse once it runs is refused the same way
/// (404, 405 with `Allow`, 403/400 for a Host that is not loopback with authentication off),
/// not answered 200 or "starting, retry": a retry would never succeed.
#[test]
fn while_recovering_routes_methods_and_hosts_are_checked_as_later() {
    let dir = temp();
    let server = held_in_recovery(dir.path());
    let ask = |request: &str| {
        let r = raw_request(&server, request);
        assert_eq!(r.header("connection"), Some("close"), "{request}");
        r
    };
    let r = ask("POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    let r = ask("GET /v1/wallet/deposit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = ask("GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = ask("GET /v1/wallet/accounts/a HTTP/1.1\r\nHost: evil.example\r\n\r\n");
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "host_not_allowed");
    let r = ask("GET /readyz HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "host_required");

    // What is allowed gets the recovery's answers.
    let r = ask("GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = ask("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.starts_with("recovering: "), "{}", r.body);
    for path in ["/v1/openapi.json", "/metrics", "/v1/wallet/accounts/a"] {
        let r = ask(&format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "starting", "{path}");
        assert_eq!(r.header("retry-after"), Some("1"), "{path}");
    }
    assert!(server.stop().success());
}

/// `serve` binds first and recovers after; in between it must answer, not leave connections in
/// the accept backlog: `/healthz` 200, `/readyz` 503 naming the phase, anything else 503 with
/// `Retry-After` (and nothing changes). Once recovered, the same address serves normally.
#[test]
fn while_recovering_health_is_ok_readiness_is_503_and_writes_are_refused() {
    let dir = temp();
    let data = dir.path().join("data");
    // A journal of 1M transfers, so that recovery takes a while (seconds, on this machine).
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["bench", "--accounts", "10000", "--transfers", "1000000"])
        .args(["--sync", "none", "--wait", "park", "--output-wait", "park"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run wallet bench");
    assert!(status.success());
    // The first requests go out within milliseconds of "listening on"; replaying 1M transfers
    // takes hundreds of milliseconds even on a fast machine, so they meet the ledger phase.
    let server = Server::start_listening(&data, &[]);
    let started = std::time::Instant::now();

    let readiness = Client::connect(&server.address).get("/readyz");
    assert_eq!(readiness.status, 503, "{}", readiness.body);
    assert!(
        readiness.body.starts_with("recovering: "),
        "{}",
        readiness.body
    );
    assert_eq!(readiness.header("connection"), Some("close"));
    let health = Client::connect(&server.address).get("/healthz");
    assert_eq!(health.status, 200);
    let mut client = Client::connect(&server.address);
    let refused = client.post(
        "/v1/wallet/accounts",
        &serde_json::json!({"account_id": "opened-while-recovering"}),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "starting");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the answers while recovering took {:?}",
        started.elapsed()
    );

    // Once the ledger is back, writes are served while the read views load the journal's
    // outcomes and history in the background: status and history reads say so (503).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut saw_views_loading = false;
    loop {
        let r = Client::connect(&server.address).get("/readyz");
        if r.status == 200 {
            assert_eq!(r.body, "ready\n");
            break;
        }
        if r.body.contains("read views") && !saw_views_loading {
            saw_views_loading = true;
            let mut c = Client::connect(&server.address);
            let opened = c.post(
                "/v1/wallet/accounts",
                &serde_json::json!({"account_id": "opened-while-loading"}),
            );
            assert_eq!(opened.status, 201, "{}", opened.body);
            let balance = c.get("/v1/wallet/accounts/opened-while-loading");
            assert_eq!(balance.status, 200, "{}", balance.body);
            let history = c.get("/v1/wallet/accounts/opened-while-loading/history");
            // (Unless the views completed in between.)
            if history.status != 200 {
                assert_eq!(history.status, 503, "{}", history.body);
                assert_eq!(history.json()["error"]["code"], "starting");
                assert_eq!(history.header("retry-after"), Some("1"));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        saw_views_loading,
        "the server never reported the read views loading (a 1M-transfer journal)"
    );
    let opened_while_loading =
        Client::connect(&server.address).get("/v1/wallet/accounts/opened-while-loading/history");
    assert_eq!(opened_while_loading.status, 200);
    let mut client = Client::connect(&server.address);
    let account = client.get("/v1/wallet/accounts/opened-while-recovering");
    assert_eq!(account.status, 404, "{}", account.body);
    let opened = client.post(
        "/v1/wallet/accounts",
        &serde_json::json!({"account_id": "opened-while-recovering"}),
    );
    assert_eq!(opened.status, 201, "{}", opened.body);
    assert!(server.stop().success());
}

/// A gap in the journal below the newest snapshot passes start-up (recovery reads only the
/// journal after the snapshot), but the read views' rebuild reads it all: the gap is reported on
/// `/readyz` and by the reads that need the views' past, within seconds. It used to leave the
/// server "recovering" for good, its reads answering "retry shortly".
#[test]
fn a_gap_below_the_snapshot_is_reported_by_readiness_and_reads_not_left_recovering() {
    let dir = temp();
    let data = dir.path().join("data");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["bench", "--accounts", "100", "--transfers", "3000"])
        .args([
            "--sync",
            "none",
            "--wait",
            "park",
            "--output-wait",
            "park",
            "--segment-size",
            "4096",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run wallet bench");
    assert!(status.success());
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["snapshot", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run wallet snapshot");
    assert!(status.success());
    let segments = wallet::journal::list_segments(&data.join("journal")).unwrap();
    assert!(segments.len() > 10, "{} segments", segments.len());
    let (missing_seq, missing) = segments[segments.len() / 2].clone();
    std::fs::remove_file(&missing).unwrap();

    let server = Server::start_listening(&data, &[]);
    let readiness = readiness_once_failed(&server);
    assert_eq!(readiness.status, 503, "{}", readiness.body);
    assert!(
        readiness.body.starts_with("failed: ") && readiness.body.contains("a gap in the journal"),
        "{}",
        readiness.body
    );
    let next = segments[segments.len() / 2 + 1].0;
    assert!(
        readiness
            .body
            .contains(&format!("ends at sequence {}", missing_seq - 1))
            && readiness.body.contains(&format!("begins at {next}")),
        "{}",
        readiness.body
    );
    views_unavailable_but_writes_served(server);

    // With authentication on, the reason (it names the data directory's files and sequences)
    // is not in the answers: /readyz is public; the log has it.
    let secret = "test-secret-of-at-least-32-bytes-long!";
    let server = Server::start_listening(&data, &["--jwt-secret", secret]);
    let readiness = readiness_once_failed(&server);
    assert_eq!(readiness.status, 503, "{}", readiness.body);
    assert!(
        readiness.body.starts_with("failed: ")
            && readiness.body.contains("the reason is in the server's log")
            && !readiness.body.contains("sequence")
            && !readiness.body.contains("journal/"),
        "{}",
        readiness.body
    );
    let token = wallet::api::auth::mint(
        secret.as_bytes(),
        "after-the-gap",
        "wallet:read",
        Duration::from_secs(600),
    )
    .unwrap();
    let status = raw_request(
        &server,
        &format!(
            "GET /v1/wallet/balance_transfer/{} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\n\r\n",
            uuid(),
            server.address
        ),
    );
    assert_eq!(status.status, 503, "{}", status.body);
    assert_eq!(status.json()["error"]["code"], "views_unavailable");
    assert!(
        !status.body.contains("sequence") && !status.body.contains("journal/"),
        "{}",
        status.body
    );
    assert!(server.stop().success());
}

/// A panic on the engine thread (injected with the `engine-panic` failpoint): the request whose
/// command panicked gets 503 `outcome_unknown`, the server stops by itself with a failure
/// status, and after a restart everything acknowledged is there and the unacknowledged transfer
/// is not (a retry with its id then commits it, once).
#[test]
fn a_panic_on_the_engine_thread_stops_the_server_and_loses_nothing_acknowledged() {
    let dir = temp();
    // Sequences: alice 1, bob 2, the deposit 3, the first transfer 4-5, the second 6-7.
    let mut server =
        Server::start_with_env(dir.path(), &[], &[("WALLET_FAILPOINT", "engine-panic:6")]);
    let mut client = server.client();
    open(&mut client, "alice");
    open(&mut client, "bob");
    deposit(&mut client, "alice", "100.00");
    let (first, second) = (uuid(), uuid());
    let path = "/v1/wallet/balance_transfer";
    let r = client.post(path, &transfer_body("alice", "bob", "10.00", &first));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = client.post(path, &transfer_body("alice", "bob", "20.00", &second));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "outcome_unknown", "{}", r.body);
    let status = wait_with_timeout(&mut server.child, Duration::from_secs(30));
    assert!(!status.success(), "the server exited with {status:?}");
    drop(server);

    let server = Server::start(dir.path(), &[]);
    let mut client = server.client();
    assert_eq!(balance_cents(&mut client, "alice"), 9_000);
    assert_eq!(balance_cents(&mut client, "bob"), 1_000);
    let r = client.get(&format!("{path}/{second}"));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = client.post(path, &transfer_body("alice", "bob", "20.00", &second));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("idempotent-replayed"), None);
    let r = client.post(path, &transfer_body("alice", "bob", "20.00", &second));
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{}", r.body);
    assert_eq!(balance_cents(&mut client, "bob"), 3_000);
    assert!(server.stop().success());
}

/// `wallet serve-fixed` (the bare-hyper baseline the README compares against) answers every
/// request with its fixed JSON body, and `loadgen --raw-path` measures it with the same client:
/// every request offered at a fixed rate is sent and answered 200, none counted as an error.
#[test]
fn serve_fixed_answers_the_baseline_body_and_loadgen_measures_it() {
    /// Killed on drop, a failed assertion included.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["serve-fixed", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn serve-fixed"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("serve-fixed printed {line:?}"))
        .to_string();
    let r = Client::connect(&address).get("/v1/anything");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "committed", "{}", r.body);
    let url = format!("http://{address}");
    let report = loadgen(
        &url,
        &["--raw-path", "/healthz", "--rate", "400", "--duration", "1"],
        &["--connections", "2"],
    );
    assert_eq!(report["requests"], 400, "{report}");
    assert_eq!(report["status_counts"]["200"], 400, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}

/// Command-line mistakes in `serve`, `bench`, `loadgen`, `replay` and `snapshot` are errors
/// naming the flag, at once: not a panic, and not a hang (`bench --batch 0` waited forever, a
/// ring smaller than 64 or a segment under a page panicked, `serve --max-in-flight` of 10^11
/// aborted, limits of 0 served nothing but errors, and `replay` of a directory without a
/// journal said "OK: verified").
#[test]
fn command_line_mistakes_are_errors_naming_the_flag_not_panics_or_hangs() {
    let dir = temp();
    let data = dir.path().to_str().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        // A directory without a journal (a mistyped path): not "OK: verified", no snapshot.
        (&["replay"], "--data-dir"),
        // Sequence 0 holds nothing ("OK up to sequence 0").
        (&["replay", "--to-seq", "0"], "--to-seq"),
        (&["snapshot"], "--data-dir"),
        (&["bench", "--batch", "0"], "--batch"),
        (&["bench", "--stage", "execute", "--batch", "0"], "--batch"),
        (&["bench", "--ring-size", "1000"], "--ring-size"),
        (&["bench", "--ring-size", "16"], "--ring-size"),
        (&["bench", "--batch", "128", "--ring-size", "64"], "--batch"),
        (&["bench", "--segment-size", "100"], "--segment-size"),
        (&["bench", "--accounts", "1"], "--accounts"),
        // Sizes that aborted on allocation, spawned threads without bound, or divided by zero.
        (&["bench", "--ring-size", "4294967296"], "--ring-size"),
        (&["bench", "--id-capacity", "99999999999"], "--id-capacity"),
        (
            &["bench", "--stage", "execute", "--accounts", "4294967295"],
            "--accounts",
        ),
        (&["bench", "--producers", "100000"], "--producers"),
        (&["bench", "--transfers", "0"], "--transfers"),
        (
            &["loadgen", "--url", "http://127.0.0.1:9", "--duration", "0"],
            "--duration",
        ),
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--raw-path",
                "healthz",
            ],
            "--raw-path",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--ring-size",
                "4294967296",
            ],
            "--ring-size",
        ),
        // Too large for the file system: every write was refused as if the disk were full.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--segment-size",
                "99999999999999999",
            ],
            "--segment-size",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-body-bytes",
                "99999999999999",
            ],
            "--max-body-bytes",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-body-bytes",
                "100000",
                "--max-batch-body-bytes",
                "1000",
            ],
            "--max-batch-body-bytes",
        ),
        (
            &["loadgen", "--url", "http://127.0.0.1:9", "--accounts", "1"],
            "--accounts",
        ),
        // A raw path sends no transfers to group (its rate figures contradicted each other).
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--raw-path",
                "/x",
                "--batch",
                "10",
            ],
            "--raw-path",
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--segment-size", "100"],
            "--segment-size",
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--ring-size", "100"],
            "--ring-size",
        ),
        // Limits that would refuse every request.
        (
            &["serve", "--listen", "127.0.0.1:0", "--max-body-bytes", "0"],
            "--max-body-bytes",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-batch-body-bytes",
                "10",
            ],
            "--max-batch-body-bytes",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--request-timeout-ms",
                "0",
            ],
            "--request-timeout-ms",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--header-read-timeout-ms",
                "0",
            ],
            "--header-read-timeout-ms",
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--max-connections", "0"],
            "--max-connections",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-batches-in-flight",
                "0",
            ],
            "--max-batches-in-flight",
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--max-in-flight", "0"],
            "--max-in-flight",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-transaction-ids",
                "0",
            ],
            "--max-transaction-ids",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-transaction-ids",
                "4294967295",
            ],
            "--max-transaction-ids",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-transaction-ids",
                "lots",
            ],
            "--max-transaction-ids",
        ),
        // A ZooKeeper root that is no path: refused at start, not in the replicator's restart
        // loop behind a server that looked healthy.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--replicate-redis",
                "--zk",
                "127.0.0.1:9",
                "--zk-root",
                "wallet",
            ],
            "--zk-root",
        ),
        // The leader node would name 0.0.0.0, which nobody can reach.
        (
            &[
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--zk-leader",
                "--zk",
                "127.0.0.1:9",
            ],
            "--zk-leader",
        ),
        // Above tokio's semaphore cap: this panicked at start.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-connections",
                "18446744073709551615",
            ],
            "--max-connections",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-batches-in-flight",
                "18446744073709551615",
            ],
            "--max-batches-in-flight",
        ),
        // Above one per nanosecond: the limit was silently off.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--velocity-per-account",
                "4000000000",
            ],
            "--velocity-per-account",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--rate-limit-per-caller",
                "4000000000",
            ],
            "--rate-limit-per-caller",
        ),
        // The waiter table is allocated whole: this aborted on allocation.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-in-flight",
                "100000000000",
            ],
            "--max-in-flight",
        ),
        // A data directory that cannot be created: the error names it.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/proc/no-such-dir",
            ],
            "--data-dir: creating /proc/no-such-dir",
        ),
        // A file where the data directory should be ("File exists" named no problem).
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/proc/self/status",
            ],
            "--data-dir /proc/self/status: not a directory",
        ),
        // `Ledger::execute` alone: flags for the pipeline were ignored while the report named
        // them.
        (&["bench", "--stage", "execute", "--rate", "5"], "--rate"),
        (
            &["bench", "--stage", "execute", "--producers", "4"],
            "--producers",
        ),
        (
            &["bench", "--stage", "execute", "--data-dir", "x"],
            "--data-dir",
        ),
        (&["bench", "--stage", "execute", "--sync", "none"], "--sync"),
        (&["bench", "--stage", "execute", "--wait", "park"], "--wait"),
        (
            &["bench", "--stage", "execute", "--ring-size", "1024"],
            "--ring-size",
        ),
        // Header lines in a raw path; a setup for transfers a raw run does not send; a token
        // per account minted up front for 4 billion accounts (it ran out of memory).
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--raw-path",
                "/a b",
            ],
            "--raw-path",
        ),
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--raw-path",
                "/healthz",
                "--setup",
            ],
            "--setup",
        ),
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--accounts",
                "4294967295",
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
            ],
            "--accounts 4294967295 with --jwt-secret",
        ),
        // A ZooKeeper address no server could answer at is named at once (it was retried for
        // seconds, then called unreachable); so is a shard list's mistake, before ZooKeeper.
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--zk-leader",
                "--zk",
                "127.0.0.1:99999",
            ],
            "--zk (or WALLET_ZK) \"127.0.0.1:99999\"",
        ),
        (
            &[
                "cluster",
                "set-sql-shards",
                "--zk",
                "127.0.0.1:9",
                "notaurl",
            ],
            "shard 0",
        ),
        // A CA for plain HTTP, and one that cannot be read, are named.
        (
            &[
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--ca",
                "/no/such/ca.pem",
            ],
            "--ca is for an https:// --url",
        ),
        (
            &[
                "loadgen",
                "--url",
                "https://127.0.0.1:9",
                "--ca",
                "/no/such/ca.pem",
            ],
            "--ca /no/such/ca.pem",
        ),
    ];
    // More connections than the process may open (it inherits this one's limit): refused
    // before the run, which used to hang in connect. An --out that cannot be written: refused
    // before the run, not after it.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let connections = limit.rlim_cur.min(u64::from(u32::MAX)).to_string();
    // Snapshots without a journal: a journal from sequence 1 beside them would be another
    // history (bench wrote one, and replay then failed on the data directory).
    let other = temp();
    let snapshots_only = other.path().join("snapshots-only");
    let snapshots = wallet::journal::snapshot_dir(&snapshots_only);
    std::fs::create_dir_all(&snapshots).unwrap();
    std::fs::write(
        snapshots.join(wallet::journal::snapshot::snapshot_file_name(4000)),
        b"a snapshot",
    )
    .unwrap();
    let snapshots_only = snapshots_only.to_str().unwrap().to_string();
    let dynamic: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["bench", "--data-dir", &snapshots_only],
            "holds 1 snapshot(s)",
        ),
        (
            vec![
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--connections",
                &connections,
            ],
            "--connections",
        ),
        (
            vec![
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--out",
                "/proc/no-such-dir",
            ],
            "--out /proc/no-such-dir",
        ),
    ];
    let cases = cases
        .iter()
        .map(|(args, flag)| (args.to_vec(), *flag))
        .chain(dynamic);
    // A SQL round too big for one COPY message would be retried for ever; a Redis batch of
    // 2^64-1 events panicked reserving its buffer: both refused by clap (usage errors exit 2).
    for (kind, events) in [("sql", "2000000"), ("redis", "18446744073709551615")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["replicate", kind, "--source", ".", "--batch-events", events])
            .args(["--zk", "127.0.0.1:9"])
            .output()
            .expect("run wallet");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{kind}: {stderr}");
        assert!(
            stderr.contains("--batch-events") && !stderr.contains("panicked"),
            "{kind}: {stderr}"
        );
    }
    // Waits beyond a day panicked computing a deadline (`--zk-patience-s 2^64-1`), and a round
    // timeout of 0 was taken as 1 s without a word: refused by clap, naming the flag.
    for (kind, flag, value) in [
        ("sql", "--zk-patience-s", "18446744073709551615"),
        ("sql", "--round-timeout-s", "0"),
        ("sql", "--once-wait-s", "18446744073709551615"),
        ("redis", "--once-wait-s", "18446744073709551615"),
        ("redis", "--idle-check-ms", "18446744073709551615"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["replicate", kind, "--source", ".", flag, value])
            .args(["--zk", "127.0.0.1:9"])
            .output()
            .expect("run wallet");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{kind} {flag}: {stderr}");
        assert!(stderr.contains(flag), "{kind} {flag}: {stderr}");
    }
    // An engine URL that cannot work is refused at once, before ZooKeeper (127.0.0.1:9 here is
    // never asked), naming the problem and not echoing credentials; the scheme is
    // case-insensitive (an upper-case one was taken for a data directory).
    for (kind, source, why) in [
        ("sql", "http://127.0.0.1", "must name a host and a port"),
        ("redis", "http://127.0.0.1:99999", "not a port number"),
        (
            "sql",
            "http://user:s3cret@127.0.0.1:8080",
            "must not carry credentials",
        ),
        ("sql", "HTTP://127.0.0.1", "must name a host and a port"),
    ] {
        let out = common::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
                .args(["replicate", kind, "--once", "--source", source])
                .args(["--zk", "127.0.0.1:9"]),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{source}: {stderr}");
        assert!(
            stderr.contains("--source") && stderr.contains(why) && !stderr.contains("s3cret"),
            "{source}: {stderr}"
        );
    }
    // A load test of more than a week is refused (its deadlines would overflow).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args([
            "loadgen",
            "--url",
            "http://127.0.0.1:9",
            "--duration",
            "18446744073709551615",
        ])
        .output()
        .expect("run wallet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--duration must be at most"), "{stderr}");
    // A sleep between looks at the ring of 2^64-1 us hung the run (and a server's shutdown).
    for flag in ["--wait", "--output-wait"] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"));
        command.args([
            "bench",
            flag,
            "sleep=18446744073709551615us",
            "--data-dir",
            &data,
        ]);
        let out = common::output_within(&mut command, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("between 1 and 10000 us"),
            "{stderr}"
        );
    }
    // A run refused for its arguments makes no --out directory.
    let not_made = other.path().join("not-made");
    let out = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args([
                "loadgen",
                "--url",
                "http://127.0.0.1:9",
                "--batch",
                "0",
                "--out",
            ])
            .arg(&not_made),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--batch"), "{stderr}");
    assert!(!not_made.exists(), "a refused run made its --out directory");
    // A sync interval of 0 is --sync batch by another name (refused by clap's parser).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["bench", "--sync", "interval=0", "--data-dir", &data])
        .output()
        .expect("run wallet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--sync batch"), "{stderr}");
    for (args, flag) in cases {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"));
        command.args(&args);
        if !["loadgen", "cluster"].contains(&args[0])
            && !args.contains(&"--data-dir")
            && !args.contains(&"execute")
        {
            command.args(["--data-dir", &data]);
        }
        let mut child = command
            .env("WALLET_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn wallet");
        let status = wait_with_timeout(&mut child, Duration::from_secs(20));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{args:?} succeeded");
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
        if args[0] == "snapshot" {
            assert!(
                std::fs::read_dir(dir.path()).unwrap().next().is_none(),
                "snapshot wrote into the data directory"
            );
        }
    }
}

/// A journal in `dir` of accounts `a` and `b`, a deposit into `a`, and `batches` batches of
/// `per_batch` transfers from `a` to `b`, written by a server that is stopped again.
fn journal_of_transfers(dir: &std::path::Path, batches: usize, per_batch: usize) {
    let server = Server::start(dir, &[]);
    let mut c = server.client();
    transfers_from_a_to_b(&mut c, batches, per_batch);
    assert!(server.stop().success());
}

/// Opens `a` and `b`, funds `a`, then sends `batches` batches of `per_batch` transfers of 0.01
/// from `a` to `b`.
fn transfers_from_a_to_b(c: &mut Client, batches: usize, per_batch: usize) {
    open(c, "a");
    open(c, "b");
    deposit(c, "a", "100000.00");
    for _ in 0..batches {
        let transfers: Vec<serde_json::Value> = (0..per_batch)
            .map(|_| transfer_body("a", "b", "0.01", &uuid()))
            .collect();
        let r = c.post(
            "/v1/wallet/balance_transfers",
            &json!({ "transfers": transfers }),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// `wallet_events_journal_bytes_total`: bytes the server read from the journal files for
/// event-stream reads.
fn events_journal_bytes(c: &mut Client) -> u64 {
    let metrics = c.get("/metrics").body;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("wallet_events_journal_bytes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no wallet_events_journal_bytes_total in {metrics}"))
}

/// After a restart, an event-stream read from far into a segment resumes at a position the
/// read views' rebuild passed, instead of scanning the segment from its start for every read
/// (270 ms a read 16 M events into a 1 GiB segment; 0.5 ms now). Judged by the bytes the
/// server says it read from the journal.
#[test]
fn a_journal_read_of_the_event_stream_starts_near_where_it_was_asked() {
    let dir = temp();
    journal_of_transfers(dir.path(), 80, 5_000);
    let journal_bytes: u64 = wallet::journal::list_segments(&dir.path().join("journal"))
        .expect("journal")
        .iter()
        .map(|(_, path)| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(
        journal_bytes <= 64 << 20,
        "one segment was meant ({journal_bytes} bytes of segments)"
    );
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    // 400,000 transfers after 3 records: event 700,001 is about 350,000 records (some 39 MB)
    // into the segment, and older than the in-memory window.
    for from_seq in [700_001u64, 700_001, 400_001, 790_001] {
        let before = events_journal_bytes(&mut c);
        let r = c.get(&format!("/v1/wallet/events?from_seq={from_seq}&limit=1"));
        assert_eq!(r.status, 200, "{}", r.body);
        let first: serde_json::Value =
            serde_json::from_str(r.body.lines().next().expect("one event")).expect("NDJSON");
        assert_eq!(first["sequence"], from_seq, "{}", r.body);
        let read = events_journal_bytes(&mut c) - before;
        assert!(
            read > 0 && read < 12 << 20,
            "{read} bytes read from the journal to answer from_seq={from_seq}"
        );
    }
}

/// On a server that never restarted (no rebuild of the read views to index the journal), an
/// event-stream read deep into a segment scans it from its start once, and keeps positions of
/// what it skipped: a later read anywhere before that point resumes near it. Each such read
/// scanned the segment from its start (34 MB a read on average in a probe's 33,000 random
/// reads of a 64 MiB segment).
#[test]
fn a_deep_event_stream_read_indexes_the_journal_it_skips() {
    let dir = temp();
    let server = Server::start(dir.path(), &[]);
    let mut c = server.client();
    transfers_from_a_to_b(&mut c, 40, 5_000);
    // 200,000 transfers after 3 records: event 250,001 is about 125,000 records (some 14 MB)
    // into the segment, older than the in-memory window (the last 65,536 records).
    let mut read = Vec::new();
    for from_seq in [250_001u64, 200_001, 100_001, 240_001] {
        let before = events_journal_bytes(&mut c);
        let r = c.get(&format!("/v1/wallet/events?from_seq={from_seq}&limit=1"));
        assert_eq!(r.status, 200, "{}", r.body);
        let first: serde_json::Value =
            serde_json::from_str(r.body.lines().next().expect("one event")).expect("NDJSON");
        assert_eq!(first["sequence"], from_seq, "{}", r.body);
        read.push(events_journal_bytes(&mut c) - before);
    }
    assert!(
        read[0] > 12 << 20,
        "the first read did not scan from the segment's start: {read:?}"
    );
    assert!(
        read[1..].iter().all(|&bytes| bytes < 3 << 20),
        "bytes read from the journal per read: {read:?}"
    );
    assert!(server.stop().success());
}

/// Event-stream reads from the journal files run on the blocking pool and go on after their
/// caller hangs up: past a few at once they are refused with a 429, not queued without bound.
#[test]
fn journal_reads_of_the_event_stream_are_bounded() {
    let dir = temp();
    journal_of_transfers(dir.path(), 4, 2_500);
    // After a restart the in-memory window is empty: every read below is a journal read.
    let server = Server::start(dir.path(), &[]);
    let address = server.address.clone();
    let mut refused = None;
    for _round in 0..5 {
        let readers = 32;
        let barrier = Arc::new(Barrier::new(readers));
        let answers: Vec<common::Response> = (0..readers)
            .map(|_| {
                let barrier = barrier.clone();
                let address = address.clone();
                std::thread::spawn(move || {
                    let mut c = Client::connect(&address);
                    barrier.wait();
                    c.get("/v1/wallet/events?from_seq=1&limit=10000")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("reader thread"))
            .collect();
        for r in &answers {
            match r.status {
                200 => assert!(r.body.lines().count() >= 10_000, "a short read"),
                429 => {
                    assert_eq!(r.json()["error"]["code"], "too_many_requests");
                    assert_eq!(r.header("retry-after"), Some("1"));
                }
                other => panic!("status {other}: {}", r.body),
            }
        }
        refused = answers.iter().find(|r| r.status == 429).map(|r| r.status);
        if refused.is_some() {
            break;
        }
    }
    assert_eq!(
        refused,
        Some(429),
        "32 concurrent journal reads, five times, and none was refused"
    );
    // The permits come back.
    let r = server
        .client()
        .get("/v1/wallet/events?from_seq=1&limit=10000");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(server.stop().success());
}

/// A request refused before its body is read (413 from `Content-Length`, 415) still lets the
/// client send the whole body and read the answer: the body is drained, not cut off with a
/// reset (which fails the client's send with EPIPE and can discard the answer), and the
/// connection then serves the next request.
#[test]
fn a_refused_large_body_is_drained_and_its_answer_read() {
    use std::io::{Read, Write};
    let dir = temp();
    let server = Server::start(dir.path(), &["--max-body-bytes", "16384"]);
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = vec![b'x'; 8 << 20];
    for (content_type, status) in [("application/json", 413), ("text/plain", 415)] {
        write!(
            stream,
            "POST /v1/wallet/balance_transfer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream
            .write_all(&body)
            .unwrap_or_else(|e| panic!("{status}: the server cut the body off: {e}"));
        let r = common::read_response(&mut stream).unwrap();
        assert_eq!(r.status, status, "{}", r.body);
    }
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let r = common::read_response(&mut stream).unwrap();
    assert_eq!(
        r.status, 200,
        "the connection serves on after a drained body"
    );
    let mut rest = [0u8; 1];
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        stream.read(&mut rest).is_err(),
        "nothing more was expected on the connection"
    );
    assert!(server.stop().success());
}
