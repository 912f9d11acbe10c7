//! Authentication, authorization (no BOLA), abuse limits, hostile clients and TLS.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, SERVE_REFUSAL_LIMIT, Server, transfer_body, uuid};
use serde_json::json;

const SECRET: &str = "test-secret-of-at-least-32-bytes-long!";

fn token(sub: &str, scope: &str) -> String {
    wallet::api::auth::mint(SECRET.as_bytes(), sub, scope, Duration::from_secs(600)).unwrap()
}

fn as_caller(server: &Server, token: Option<String>) -> Client {
    let mut c = server.client();
    c.token = token;
    c
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            let _ = out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

fn balance(server: &Server, account: &str) -> i64 {
    let mut admin = as_caller(server, Some(token("ops", "wallet:admin")));
    common::balance_cents(&mut admin, account)
}

#[test]
fn owners_move_and_read_only_their_own_money() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    for a in ["alice", "bob", "carol"] {
        common::open(&mut admin, a);
    }
    common::deposit(&mut admin, "alice", "100.00");
    common::deposit(&mut admin, "bob", "100.00");

    // BOLA: alice's token, bob's money: 403 and nothing moves.
    let mut alice = as_caller(&server, Some(token("alice", "wallet:transfer")));
    let r = alice.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("bob", "alice", "50.00", &uuid()),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer error="insufficient_scope", scope="wallet:admin""#),
        "a 403 names the scope that would grant it (RFC 6750, 3.1)"
    );
    assert_eq!(balance(&server, "bob"), 10_000);
    let r = alice.post(
        "/v1/wallet/balance_transfers",
        &json!({"transfers": [
            transfer_body("alice", "carol", "1.00", &uuid()),
            transfer_body("bob", "carol", "1.00", &uuid()),
        ]}),
    );
    assert_eq!(
        r.status, 403,
        "a batch with one foreign debit is refused whole"
    );
    assert_eq!(
        r.json()["error"]["field"],
        "transfers[1].from_account",
        "the refusal names the item: {}",
        r.body
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer error="insufficient_scope", scope="wallet:admin""#)
    );
    assert_eq!(balance(&server, "carol"), 0);

    // Her own money: fine.
    let id = uuid();
    let r = alice.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "10.00", &id),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Its answer shows her own balance after it, not bob's.
    let shown = |body: &serde_json::Value| -> Vec<(String, String)> {
        body["balances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["account_id"].as_str().unwrap().to_string(),
                    b["balance"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        shown(&r.json()),
        [("alice".to_string(), "90.00".to_string())]
    );
    let r = alice.post(
        "/v1/wallet/balance_transfers",
        &json!({"transfers": [transfer_body("alice", "bob", "0.00", &uuid()), transfer_body("alice", "bob", "1.00", &id)]}),
    );
    assert_eq!(r.status, 400, "a zero amount refuses the batch");
    let r = alice.post(
        "/v1/wallet/balance_transfers",
        &json!({"transfers": [transfer_body("alice", "bob", "10.00", &id)]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let item = &r.json()["results"][0];
    assert_eq!(item["replayed"], true);
    assert_eq!(
        shown(&item["result"]),
        [("alice".to_string(), "90.00".to_string())]
    );
    let all = admin
        .get(&format!("/v1/wallet/balance_transfer/{id}"))
        .json();
    assert_eq!(
        shown(&all),
        [
            ("alice".to_string(), "90.00".to_string()),
            ("bob".to_string(), "110.00".to_string())
        ]
    );

    // Reads: own account yes; another's no (403 whether or not it exists).
    assert_eq!(alice.get("/v1/wallet/accounts/alice").status, 200);
    assert_eq!(alice.get("/v1/wallet/accounts/bob").status, 403);
    assert_eq!(alice.get("/v1/wallet/accounts/nobody").status, 403);
    assert_eq!(alice.get("/v1/wallet/accounts/bob/history").status, 403);
    // A transfer's status is visible to its two parties only; to others it does not exist.
    let mut bob = as_caller(&server, Some(token("bob", "wallet:read")));
    let r = bob.get(&format!("/v1/wallet/balance_transfer/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        shown(&r.json()),
        [("bob".to_string(), "110.00".to_string())]
    );
    let mut carol = as_caller(&server, Some(token("carol", "wallet:read")));
    assert_eq!(
        carol
            .get(&format!("/v1/wallet/balance_transfer/{id}"))
            .status,
        404
    );
    // A rejected transfer's status is visible to the account that sent it, and to nobody else.
    let refused = uuid();
    let r = alice.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "1000.00", &refused),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    let r = alice.get(&format!("/v1/wallet/balance_transfer/{refused}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "rejected");
    assert_eq!(r.json()["error"]["code"], "insufficient_funds");
    assert_eq!(
        carol
            .get(&format!("/v1/wallet/balance_transfer/{refused}"))
            .status,
        404
    );
    // The event stream names the account a rejection belongs to.
    let stream = admin.get("/v1/wallet/events?from_seq=1&limit=10000");
    let line: serde_json::Value = stream
        .body
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["transaction_id"] == refused.as_str())
        .expect("the rejection is in the stream");
    assert_eq!(line["kind"], "rejected");
    assert_eq!(line["account_id"], "alice");
    // A caller that may not transfer is refused a batch before its body is read: it cannot
    // hold one of the batch permits every caller shares while it sends a body slowly.
    let mut raw = std::net::TcpStream::connect(&server.address).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(
        &mut raw,
        format!(
            "POST /v1/wallet/balance_transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\n\r\n{{",
            token("bob", "wallet:read")
        )
        .as_bytes(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let r = common::read_response(&mut raw).expect("an answer");
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered before any body timeout"
    );
    // Read scope cannot transfer; transfer scope cannot deposit; only admin reads the stream.
    let r = bob.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("bob", "alice", "1.00", &uuid()),
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer error="insufficient_scope", scope="wallet:transfer""#)
    );
    let r = alice.post(
        "/v1/wallet/deposit",
        &json!({"account_id": "alice", "amount": "5", "currency": "USD", "transaction_id": uuid()}),
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        alice
            .post("/v1/wallet/accounts", &json!({"account_id": "mallory"}))
            .status,
        403
    );
    assert_eq!(alice.get("/v1/wallet/events?from_seq=1").status, 403);
    // A token without a read scope is refused before any wait for the views (it used to wait,
    // or get a 400 that named the durable sequence).
    let mut nobody = as_caller(&server, Some(token("alice", "")));
    for min_seq in ["1", "999999999"] {
        let r = nobody.get(&format!(
            "/v1/wallet/balance_transfer/{}?min_seq={min_seq}",
            uuid()
        ));
        assert_eq!(r.status, 403, "min_seq={min_seq}: {}", r.body);
    }
    // Its own account too, and the refusal names the scope it lacks, not the account.
    for path in [
        "/v1/wallet/accounts/alice",
        "/v1/wallet/accounts/alice/history",
    ] {
        let r = nobody.get(path);
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.contains("wallet:read"), "{path}: {message}");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer error="insufficient_scope", scope="wallet:read""#),
            "{path}"
        );
    }
    assert_eq!(balance(&server, "alice"), 9_000);
    assert!(server.stop().success());
}

#[test]
fn one_caller_holds_at_most_a_quarter_of_the_batch_permits() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--max-batches-in-flight", "8"]);
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    for a in ["alice", "bob"] {
        common::open(&mut admin, a);
        common::deposit(&mut admin, a, "10.00");
    }
    let alice_token = token("alice", "wallet:transfer");
    // Two of alice's batches whose bodies are still arriving: her share of 8 permits.
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&server.address).unwrap();
            s.write_all(
                format!(
                    "POST /v1/wallet/balance_transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {alice_token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"transfers\":["
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let batch =
        |from: &str, to: &str| json!({"transfers": [transfer_body(from, to, "0.01", &uuid())]});
    let mut alice = as_caller(&server, Some(alice_token.clone()));
    let started = Instant::now();
    let r = alice.post("/v1/wallet/balance_transfers", &batch("alice", "bob"));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("this caller"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(1));
    // Other callers still get batches through.
    let mut bob = as_caller(&server, Some(token("bob", "wallet:transfer")));
    let r = bob.post("/v1/wallet/balance_transfers", &batch("bob", "alice"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results"][0]["http_status"], 200);
    // Her share comes back when her batches end.
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    let r = alice.post("/v1/wallet/balance_transfers", &batch("alice", "bob"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(server.stop().success());
}

#[test]
fn bad_tokens_are_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let now = now_secs();
    let forged = wallet::api::auth::mint(
        b"another-secret-another-secret-xx",
        "alice",
        "wallet:admin",
        Duration::from_secs(600),
    )
    .unwrap();
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64(format!(
        r#"{{"sub":"alice","scope":"wallet:admin","exp":{}}}"#,
        now + 600
    )
    .as_bytes());
    let alg_none = format!("{header}.{claims}.");
    let expired = {
        let claims = wallet::api::auth::Claims {
            sub: "alice".into(),
            scope: "wallet:admin".into(),
            exp: now - 3600,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let hs512 = {
        let claims = wallet::api::auth::Claims {
            sub: "alice".into(),
            scope: "wallet:admin".into(),
            exp: now + 600,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let not_yet_valid = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "scope": "wallet:admin", "exp": now + 7200, "nbf": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    // An audience in a shape the library does not read as one (a number): still an audience,
    // and this server names none.
    let odd_audience = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "scope": "wallet:admin", "exp": now + 600, "aud": 5}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for (name, t) in [
        ("an audience that is a number", odd_audience),
        ("not yet valid (nbf)", not_yet_valid),
        ("forged", forged),
        ("alg none", alg_none),
        ("expired", expired),
        ("other algorithm", hs512),
        ("garbage", "abc.def".into()),
    ] {
        let mut c = as_caller(&server, Some(t));
        let r = c.get("/v1/wallet/accounts/alice");
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#),
            "{name}"
        );
    }
    // The scheme name is case-insensitive; a token needs its scheme and one space. (No account
    // is open here: a caller let in is told 404.)
    let valid = token("alice", "wallet:admin");
    for (authorization, status) in [
        (format!("Bearer {valid}"), 404),
        (format!("BEARER {valid}"), 404),
        (format!("bEaReR {valid}"), 404),
        (format!("Bearer  {valid}"), 401),
        (format!("Basic {valid}"), 401),
        (valid.clone(), 401),
    ] {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        write!(
            stream,
            "GET /v1/wallet/accounts/alice HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n\r\n"
        )
        .unwrap();
        let r = common::read_response(&mut stream).unwrap();
        assert_eq!(r.status, status, "{authorization:.12}: {}", r.body);
    }
    // No token: a challenge without an error code (RFC 6750, 3.1).
    let mut none = as_caller(&server, None);
    let r = none.get("/v1/wallet/accounts/alice");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = none.request("GET", "/healthz", None, "application/json");
    assert_eq!(r.status, 200, "operations endpoints stay public");
    assert!(server.stop().success());
}

/// Seconds since 1970, as a token's dates count them.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with the server's secret, with this header and these claims, as given.
fn signed(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    signed_text(&header.to_string(), &claims.to_string())
}

/// `signed`, with the header and claims as JSON text (a claim written twice, say).
fn signed_text(header: &str, claims: &str) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

/// Correctly signed tokens are judged claim by claim, each refusal naming its claim and reason
/// (not "not a well-formed JWT" nor the library's `ImmatureSignature`); a NumericDate may have
/// a fraction (RFC 7519, 2); scopes are separated by single spaces only (RFC 6749, 3.3), so a
/// no-break space or a tab makes one unknown scope, not admin; a header marking parameters
/// critical is refused (RFC 7515, 4.1.11); and a second Authorization header is refused
/// rather than ignored.
#[test]
fn token_claims_are_judged_by_name_and_scopes_split_on_single_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let now = now_secs();
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let admin = |claims: serde_json::Value| signed(&hs256, &claims);
    let open = |token: String, account: &str| {
        as_caller(&server, Some(token))
            .post("/v1/wallet/accounts", &json!({ "account_id": account }))
    };
    // A fractional exp is a NumericDate: taken.
    let r = open(
        admin(json!({"sub": "ops", "scope": "wallet:admin", "exp": now as f64 + 600.5})),
        "frac",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for (name, claims, reason) in [
        (
            "no exp",
            json!({"sub": "ops", "scope": "wallet:admin"}),
            "missing claim exp",
        ),
        (
            "exp a string",
            json!({"sub": "ops", "scope": "wallet:admin", "exp": "soon"}),
            "claim exp is not a number",
        ),
        (
            "expired, fractional",
            json!({"sub": "ops", "scope": "wallet:admin", "exp": now as f64 - 60.5}),
            "expired",
        ),
        (
            "nbf ahead",
            json!({"sub": "ops", "scope": "wallet:admin", "exp": now + 7200, "nbf": now + 3600}),
            "not yet valid",
        ),
        (
            "nbf a string",
            json!({"sub": "ops", "scope": "wallet:admin", "exp": now + 600, "nbf": "x"}),
            "claim nbf is not a number",
        ),
        (
            "no sub",
            json!({"scope": "wallet:admin", "exp": now + 600}),
            "missing claim sub",
        ),
        (
            "sub a number",
            json!({"sub": 7, "scope": "wallet:admin", "exp": now + 600}),
            "claim sub is not a string",
        ),
        (
            "scope a list",
            json!({"sub": "ops", "scope": ["wallet:admin"], "exp": now + 600}),
            "claim scope is not a string",
        ),
    ] {
        let r = open(admin(claims), "never");
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert!(r.body.contains(reason), "{name}: {}", r.body);
    }
    // Scopes split on single spaces only: these are one unknown scope each, so no admin.
    for separator in ["\u{a0}", "\t", "\u{3000}", "\n"] {
        let scope = format!("wallet:read{separator}wallet:admin");
        let r = open(
            admin(json!({"sub": "ops", "scope": scope, "exp": now + 600})),
            "never",
        );
        assert_eq!(r.status, 403, "{separator:?}: {}", r.body);
    }
    let r = open(
        admin(json!({"sub": "ops", "scope": "wallet:read wallet:admin", "exp": now + 600})),
        "spaced",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // A claim written twice is refused, whichever copy would have passed.
    for claims in [
        format!(
            r#"{{"sub":"ops","scope":"wallet:admin","exp":{},"exp":{}}}"#,
            now - 3600,
            now + 600
        ),
        format!(
            r#"{{"sub":"ops","scope":"wallet:read","scope":"wallet:admin","exp":{}}}"#,
            now + 600
        ),
        format!(
            r#"{{"sub":"ops","scope":"wallet:admin","exp":null,"exp":{}}}"#,
            now + 600
        ),
    ] {
        let r = open(
            signed_text(r#"{"alg":"HS256","typ":"JWT"}"#, &claims),
            "never",
        );
        assert_eq!(r.status, 401, "{claims}: {}", r.body);
        assert!(r.body.contains("duplicate field"), "{claims}: {}", r.body);
    }
    // Claims that are not a JSON object (RFC 7519, 7.2), signed: refused. An array was read
    // by position as [sub, scope, exp, nbf, aud] and taken; the others named the library's
    // own struct.
    for claims in [
        json!(["ops", "wallet:admin", now + 600, null, null]),
        json!(["ops", "wallet:admin", now + 600]),
        json!("ops"),
        json!(7),
    ] {
        let r = open(admin(claims.clone()), "never");
        assert_eq!(r.status, 401, "{claims}: {}", r.body);
        assert!(
            r.body.contains("the claims as a JSON object") && !r.body.contains("ClaimsFor"),
            "{claims}: {}",
            r.body
        );
    }
    // A critical header parameter this server cannot implement: refused, though signed.
    let critical = signed(
        &json!({"alg": "HS256", "crit": ["x-unknown"], "x-unknown": 1}),
        &json!({"sub": "ops", "scope": "wallet:admin", "exp": now + 600}),
    );
    let r = open(critical, "never");
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("crit"), "{}", r.body);
    // Two Authorization headers, the first valid: refused, whichever comes first.
    let valid = token("ops", "wallet:admin");
    for (first, second) in [(valid.as_str(), "garbage"), ("garbage", valid.as_str())] {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        write!(
            stream,
            "GET /v1/wallet/accounts/frac HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n\r\n"
        )
        .unwrap();
        let r = common::read_response(&mut stream).unwrap();
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            r.body.contains("more than one Authorization header"),
            "{}",
            r.body
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer error="invalid_request""#)
        );
    }
    // `wallet token` splits --scope as the server does.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args([
            "token",
            "--sub",
            "ops",
            "--scope",
            "wallet:read\u{a0}wallet:admin",
        ])
        .env("WALLET_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown scope"),
        "{out:?}"
    );
    // Nothing was opened by a refused token.
    let mut c = as_caller(&server, Some(token("ops", "wallet:admin")));
    assert_eq!(c.get("/v1/wallet/accounts/never").status, 404);
    assert!(server.stop().success());
}

#[test]
fn rate_and_velocity_limits_answer_429_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        // `--sync none`: the velocity checks need three transfers within the 500 ms one
        // allowance takes to come back; an msync per transfer on a busy disk could outlast it.
        // 6 requests a second: alice's first second takes 3 transfers, a retry and a batch of
        // two retries (a batch counts one per transfer).
        &[
            "--rate-limit-per-caller",
            "6",
            "--velocity-per-account",
            "2",
            "--sync",
            "none",
        ],
    );
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    common::open(&mut admin, "alice");
    common::open(&mut admin, "bob");
    std::thread::sleep(Duration::from_millis(1100));
    common::deposit(&mut admin, "alice", "100.00");

    let mut alice = as_caller(&server, Some(token("alice", "wallet:transfer wallet:read")));
    let ids: Vec<String> = (0..3).map(|_| uuid()).collect();
    let statuses: Vec<u16> = ids
        .iter()
        .map(|id| {
            alice
                .post(
                    "/v1/wallet/balance_transfer",
                    &transfer_body("alice", "bob", "1.00", id),
                )
                .status
        })
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 429],
        "velocity: 2 transfers out per second"
    );
    // A retry of a transfer that was decided moves no money: it gets its original outcome
    // (the allowance is spent, but a retry is not a transfer), alone or in a batch.
    let retry = alice.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("alice", "bob", "1.00", &ids[0]),
    );
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let retries = alice.post(
        "/v1/wallet/balance_transfers",
        &json!({ "transfers": [
            transfer_body("alice", "bob", "1.00", &ids[0]),
            transfer_body("alice", "bob", "1.00", &ids[1]),
        ]}),
    );
    assert_eq!(retries.status, 200, "{}", retries.body);
    assert_eq!(common::balance_cents(&mut admin, "alice"), 9_800);
    std::thread::sleep(Duration::from_millis(1100));
    let mut limited = None;
    for i in 0..10 {
        let r = alice.get("/v1/wallet/accounts/alice");
        if r.status == 429 {
            limited = Some((
                i,
                r.header("retry-after").map(str::to_string),
                r.json()["error"]["code"].clone(),
            ));
            break;
        }
    }
    let (i, retry_after, code) = limited.expect("the per-caller limit answers 429");
    assert!(i >= 4, "the first requests pass ({i})");
    assert!(retry_after.is_some(), "429 carries Retry-After");
    assert_eq!(code, "rate_limited");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        alice.get("/v1/wallet/accounts/alice").status,
        200,
        "recovers"
    );
    // A batch spends velocity allowance only when it is submitted whole: one that can never
    // pass (more transfers out of an account than its limit) is a 400 naming `transfers`, one
    // with an invalid item is a 400, and neither spends any.
    std::thread::sleep(Duration::from_millis(1100));
    let batch = |items: Vec<serde_json::Value>| json!({ "transfers": items });
    let one = || transfer_body("alice", "bob", "1.00", &uuid());
    let too_many = alice.post(
        "/v1/wallet/balance_transfers",
        &batch(vec![one(), one(), one()]),
    );
    assert_eq!(too_many.status, 400, "{}", too_many.body);
    assert_eq!(too_many.json()["error"]["field"], "transfers");
    let single = alice.post("/v1/wallet/balance_transfer", &one()).status;
    let invalid = alice
        .post(
            "/v1/wallet/balance_transfers",
            &batch(vec![one(), transfer_body("alice", "bob", "1.001", &uuid())]),
        )
        .status;
    let second = alice.post("/v1/wallet/balance_transfer", &one()).status;
    let third = alice.post("/v1/wallet/balance_transfer", &one()).status;
    assert_eq!([single, invalid, second, third], [200, 400, 200, 429]);

    // A batch debiting two accounts is charged all or nothing: carol's allowance is spent, so
    // a batch [dave->bob, carol->bob] is refused (429 naming carol) and dave keeps his whole
    // allowance (a limiter charged account by account would have taken one from dave).
    common::open(&mut admin, "carol");
    common::open(&mut admin, "dave");
    common::deposit(&mut admin, "carol", "100.00");
    common::deposit(&mut admin, "dave", "100.00");
    std::thread::sleep(Duration::from_millis(1100));
    let from = |account: &str| transfer_body(account, "bob", "1.00", &uuid());
    for _ in 0..2 {
        let r = admin.post("/v1/wallet/balance_transfer", &from("carol"));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = admin.post(
        "/v1/wallet/balance_transfers",
        &batch(vec![from("dave"), from("carol")]),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "velocity_limit");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("carol"),
        "{}",
        r.body
    );
    let r = admin.post(
        "/v1/wallet/balance_transfers",
        &batch(vec![from("dave"), from("dave")]),
    );
    assert_eq!(r.status, 200, "dave's allowance is whole: {}", r.body);
    assert_eq!(balance(&server, "dave"), 9_800);
    assert!(server.stop().success());
}

/// The per-caller rate limit counts a batch one per transfer (a batch of 8,192 transfers was
/// one request: a caller limited to 10 requests a second executed, and had the server
/// remember, 80,000 ids a second), and a request refused for want of room on the server
/// (`too_many_requests`, `overloaded`) gives its charge back, as the velocity limit does.
#[test]
fn the_callers_rate_limit_counts_a_batchs_transfers_and_not_refusals_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[
            "--rate-limit-per-caller",
            "10",
            "--max-batches-in-flight",
            "1",
            "--sync",
            "none",
        ],
    );
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    common::open(&mut admin, "alice");
    common::open(&mut admin, "bob");
    common::deposit(&mut admin, "alice", "100.00");
    let mut alice = as_caller(&server, Some(token("alice", "wallet:transfer wallet:read")));
    let batch = |n: usize| {
        let items: Vec<serde_json::Value> = (0..n)
            .map(|_| transfer_body("alice", "bob", "0.01", &uuid()))
            .collect();
        json!({ "transfers": items })
    };
    let over = alice.post("/v1/wallet/balance_transfers", &batch(11));
    assert_eq!(over.status, 400, "{}", over.body);
    assert_eq!(over.json()["error"]["field"], "transfers", "{}", over.body);
    std::thread::sleep(Duration::from_millis(1100));
    let eight = alice.post("/v1/wallet/balance_transfers", &batch(8));
    assert_eq!(eight.status, 200, "{}", eight.body);
    // 8 spent: a batch of 10 does not fit (for 800 ms), and executes nothing.
    let ten = alice.post("/v1/wallet/balance_transfers", &batch(10));
    assert_eq!(ten.status, 429, "{}", ten.body);
    assert_eq!(ten.json()["error"]["code"], "rate_limited");
    assert!(ten.header("retry-after").is_some());
    assert_eq!(balance(&server, "alice"), 10_000 - 8);

    // The server's one batch permit held by an admin's batch whose body is still arriving:
    // alice's batches are refused for want of room, many times, and spend nothing.
    std::thread::sleep(Duration::from_millis(1100));
    let admin_token = token("ops", "wallet:admin");
    let mut stalled = TcpStream::connect(&server.address).unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1/wallet/balance_transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {admin_token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"transfers\":["
            )
            .as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..15 {
        let r = alice.post("/v1/wallet/balance_transfers", &batch(1));
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "too_many_requests", "{}", r.body);
    }
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    let after = alice.post("/v1/wallet/balance_transfers", &batch(9));
    assert_eq!(
        after.status, 200,
        "the refusals for room spent alice's allowance: {}",
        after.body
    );
    assert_eq!(balance(&server, "alice"), 10_000 - 8 - 9);
    assert!(server.stop().success());
}

/// Calls `get` every 100 ms until it answers 200 or `limit` has passed: its last status and
/// how long that took.
fn until_200(limit: Duration, mut get: impl FnMut() -> u16) -> (u16, Duration) {
    let started = Instant::now();
    loop {
        let status = get();
        if status == 200 || started.elapsed() >= limit {
            return (status, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A further connection is answered at once with 503 `too_many_connections` (every slot is
/// held), or the test fails with `why`.
fn assert_one_more_connection_is_refused(server: &Server, why: &str) {
    let mut extra = TcpStream::connect(&server.address).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let response = common::read_response(&mut extra)
        .unwrap_or_else(|e| panic!("{why}: no answer to a connection over the limit: {e}"));
    assert_eq!(
        (response.status, response.json()["error"]["code"].clone()),
        (503, json!("too_many_connections")),
        "{why}: {}",
        response.body
    );
}

#[test]
fn a_client_that_never_reads_its_answers_loses_its_connection_slot() {
    // Two connections (the limit) send thousands of pipelined requests and read nothing: the
    // server's writes stall once the socket buffers are full. Each is closed after the request
    // timeout without progress, and the slots serve other clients again.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--max-connections", "2", "--request-timeout-ms", "1000"],
    );
    let request = b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(4000);
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let mut hog = TcpStream::connect(&server.address).unwrap();
            hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            let request = request.clone();
            std::thread::spawn(move || {
                // The server may stop reading before it has taken every request: that is fine.
                let _ = hog.write_all(&request);
                hog
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_one_more_connection_is_refused(&server, "the hogs did not hold the connection slots");
    let mut probe = server.client();
    let (status, took) = until_200(Duration::from_secs(15), || probe.get("/healthz").status);
    assert_eq!(
        status, 200,
        "connections that never read kept every slot for {took:?}"
    );
    // Within a few request timeouts (1 s each), not by some slower way.
    assert!(
        took < Duration::from_secs(8),
        "the slots came back only after {took:?}"
    );
    // The refusals are counted, and the connections served are shown.
    let metrics = probe.get("/metrics").body;
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(
        value("wallet_connections_refused_total").is_some_and(|n| n >= 1),
        "{metrics}"
    );
    assert!(
        value("wallet_connections_open").is_some_and(|n| (1..=2).contains(&n)),
        "{metrics}"
    );
    for hog in hogs {
        drop(hog.join().expect("hog thread"));
    }
}

/// A request head over 64 KiB is refused (431) once that much is read, instead of being
/// buffered up to hyper's default of about 400 KB per connection (1,000 connections that never
/// finished their heads held 400 MB); a head of 32 KiB is served.
#[test]
fn a_request_head_over_64_kib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let head = |padding: usize| {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {}\r\n\r\n",
            "a".repeat(padding)
        );
        // The server may answer and close before taking the whole head.
        let _ = stream.write_all(request.as_bytes());
        common::read_response(&mut stream).map(|r| r.status)
    };
    assert_eq!(head(32 * 1024).ok(), Some(200));
    assert_eq!(head(100 * 1024).ok(), Some(431));
}

/// Client connections are capped below the process's open-file limit, with descriptors kept
/// back for the journal: a flood of connections gets fast 503s, and the engine goes on
/// rolling its journal over to new segments. (With `--max-connections` above what the limit
/// allowed, connections took every descriptor, the next segment could not be opened, and the
/// engine halted; connections past that got no answer at all.)
#[test]
fn connections_are_capped_below_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 400 descriptors, 256 kept back: 144 connections at most, against the default 1024.
    let server = Server::start_with_fd_limit(dir.path(), &["--segment-size", "65536"], 400);
    let mut client = server.client();
    common::open(&mut client, "flooded");
    let idle: Vec<TcpStream> = (0..140)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    // The refusals of the flood (which sends nothing: each waits 100 ms for a request head in
    // case it asks for an operations route, then is answered and lingers up to 250 ms) are
    // over by then.
    std::thread::sleep(Duration::from_millis(800));
    assert_one_more_connection_is_refused(&server, "a flood past the open-file limit");
    // Deposits through many segment roll-overs (about 580 records a segment).
    for i in 0..2000 {
        let r = client.post(
            "/v1/wallet/deposit",
            &json!({"account_id": "flooded", "amount": "1.00", "currency": "USD", "transaction_id": common::uuid()}),
        );
        assert_eq!(r.status, 200, "deposit {i}: {}", r.body);
    }
    assert_eq!(common::balance_cents(&mut client, "flooded"), 200_000);
    drop((idle, flood));
    assert!(server.stop().success());
}

/// Connections taken while the server recovers count against `--max-connections` after it
/// too (they live up to the header timeout): the serving phase had a fresh set of permits, so
/// the server held twice the limit for that long.
#[test]
fn connections_taken_during_recovery_count_against_the_limit_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_listening_with_env(
        dir.path(),
        &["--max-connections", "2", "--header-read-timeout-ms", "8000"],
        &[("WALLET_FAILPOINT", "recovery-delay:1000")],
    );
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    // Recovered (ready answers 200 once the two connections end), both still open.
    std::thread::sleep(Duration::from_millis(2500));
    assert_one_more_connection_is_refused(
        &server,
        "a third connection was served beside two held since recovery",
    );
    drop(held);
    let (status, _) = until_200(Duration::from_secs(10), || {
        server.client().get("/readyz").status
    });
    assert_eq!(status, 200, "ready once the held connections ended");
    assert!(server.stop().success());
}

#[test]
fn slowloris_and_connection_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--header-read-timeout-ms", "500", "--max-connections", "3"],
    );
    // A client that sends its headers one byte at a time is cut off.
    let mut slow = TcpStream::connect(&server.address).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        .iter()
        .cycle()
        .take(200)
    {
        if slow.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    if !closed {
        let mut buffer = [0u8; 512];
        closed = match slow.read(&mut buffer) {
            Ok(0) => true,
            Ok(_) => String::from_utf8_lossy(&buffer).contains("408"),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
    }
    assert!(closed, "a slowloris connection is closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(slow);
    std::thread::sleep(Duration::from_millis(200));

    // Over the connection limit: an immediate 503, not a queue.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(&server.address).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let response = common::read_response(&mut extra).expect("an answer");
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());
    // In the error shape of every other answer.
    assert_eq!(
        response.json()["error"]["code"],
        "too_many_connections",
        "{}",
        response.body
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.client().get("/healthz").status,
        200,
        "serves again below the limit"
    );
    assert!(server.stop().success());
}

#[test]
fn non_loopback_without_auth_is_refused() {
    let output = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args([
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--pin-core",
                "-1",
                "--data-dir",
            ])
            .arg(tempfile::tempdir().unwrap().path()),
        SERVE_REFUSAL_LIMIT,
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("without authentication"));
    let output = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args([
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--auth",
                "none",
                "--data-dir",
            ])
            .arg(tempfile::tempdir().unwrap().path()),
        SERVE_REFUSAL_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "--auth none is loopback only: {stderr}"
    );
    assert!(
        stderr.contains("--auth none is for loopback only"),
        "{stderr}"
    );
}

/// A self-signed certificate for `localhost` in `dir`: its PEM paths and its DER bytes.
fn self_signed_localhost(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().to_vec())
}

/// Over `--max-connections`, a TLS client gets its 503 with `Retry-After` inside TLS, as a
/// plain client does (it was written in plaintext into the handshake: the client saw a broken
/// handshake, not an answer to retry after).
#[test]
fn over_the_connection_limit_a_tls_client_gets_a_503_it_can_read() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, der) = self_signed_localhost(dir.path());
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--max-connections",
            "1",
        ],
    );
    // Holds the one connection slot (its handshake never starts; the header read timeout,
    // 5 s by default, bounds it).
    let _hold = TcpStream::connect(&server.address).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let socket = TcpStream::connect(&server.address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(connection, socket);
    let mut answer = Vec::new();
    // Not an operations route: those are still answered over the limit.
    let written = tls.write_all(b"GET /v1/wallet/accounts/a HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(written.is_ok(), "the TLS handshake failed: {written:?}");
    let mut buffer = [0u8; 1024];
    while let Ok(n) = tls.read(&mut buffer) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(
        answer.starts_with("http/1.1 503") && answer.contains("retry-after: 1"),
        "{answer:?}"
    );
    assert!(server.stop().success());
}

/// Key and certificate files that cannot serve are named with their flag and path: an empty
/// or garbage certificate file said "peer sent no certificates", a key of another
/// certificate "keys may not be consistent", a missing public key "No such file or directory".
#[test]
fn unusable_tls_and_jwt_key_files_are_named_with_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed_localhost(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_key, _) = self_signed_localhost(&other);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, b"not a certificate").unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--tls-cert".into(),
                path(&garbage),
                "--tls-key".into(),
                path(&key),
            ],
            format!("--tls-cert {}: no PEM certificate", path(&garbage)),
        ),
        (
            vec![
                "--tls-cert".into(),
                path(&cert),
                "--tls-key".into(),
                path(&other_key),
            ],
            format!(
                "--tls-cert {} with --tls-key {}",
                path(&cert),
                path(&other_key)
            ),
        ),
        (
            vec!["--jwt-public-key".into(), path(&missing)],
            format!("--jwt-public-key {}", path(&missing)),
        ),
    ];
    for (args, says) in cases {
        let out = common::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(&args),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&says), "{args:?}: {stderr}");
    }
}

#[test]
fn https_with_rustls_and_loadgen_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, _) = self_signed_localhost(dir.path());
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let port = server.address.rsplit(':').next().unwrap().to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args([
            "loadgen",
            "--url",
            &format!("https://localhost:{port}"),
            "--ca",
        ])
        .arg(&cert_path)
        .args([
            "--setup",
            "--accounts",
            "10",
            "--connections",
            "2",
            "--duration",
            "1",
            "--rate",
            "200",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        report["status_counts"]["200"].as_u64().unwrap_or(0) > 50,
        "{report}"
    );
    // Plain HTTP to a TLS port gets no HTTP answer: at most a TLS alert, then the end.
    let mut plain = std::net::TcpStream::connect(&server.address).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    std::io::Write::write_all(
        &mut plain,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .expect("send");
    let mut answer = Vec::new();
    let read = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        read.is_ok() || answer.len() < 64,
        "the server neither closed the connection nor stopped sending: {read:?}"
    );
    assert!(server.stop().success());
}

/// POSTs `body` up to five times, 1.2 s apart, until it is answered `status`.
fn retry_until(
    c: &mut Client,
    path: &str,
    body: &serde_json::Value,
    status: u16,
) -> Option<common::Response> {
    for _ in 0..5 {
        let r = c.post(path, body);
        if r.status == status {
            return Some(r);
        }
        std::thread::sleep(Duration::from_millis(1200));
    }
    None
}

#[test]
fn in_flight_and_request_time_limits() {
    // Every reply waits for an msync that happens at most every 400 ms, so requests linger.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--sync", "interval=400", "--max-in-flight", "1"],
    );
    let mut c = server.client();
    common::open(&mut c, "a");
    common::open(&mut c, "b");
    common::deposit(&mut c, "a", "10.00");
    let address = server.address.clone();
    let first = std::thread::spawn(move || {
        let mut c = Client::connect(&address);
        c.post(
            "/v1/wallet/balance_transfer",
            &transfer_body("a", "b", "1.00", &uuid()),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(100));
    let second = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "1.00", &uuid()),
    );
    assert_eq!(
        second.status, 429,
        "over the in-flight limit: {}",
        second.body
    );
    assert!(second.header("retry-after").is_some());
    assert_eq!(first.join().unwrap(), 200);
    assert!(server.stop().success());

    // A request that outlives --request-timeout-ms gets 503 "outcome unknown"; a retry with the
    // same id later gets the real, original outcome.
    let server = Server::start(
        dir.path(),
        &["--sync", "interval=1000", "--request-timeout-ms", "100"],
    );
    let mut c = server.client();
    let id = uuid();
    let r = c.post(
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "1.00", &id),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "timeout");
    std::thread::sleep(Duration::from_millis(1500));
    let retried = retry_until(
        &mut c,
        "/v1/wallet/balance_transfer",
        &transfer_body("a", "b", "1.00", &id),
        200,
    )
    .expect("the retry gets the committed outcome");
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));

    // An account opened without a transaction_id: the id the server gave it comes with the
    // timeout, so the caller can learn the outcome (its retry without one would be 409, as if
    // someone else had opened the account).
    let r = c.post("/v1/wallet/accounts", &json!({"account_id": "opened-late"}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "timeout");
    let id = r.json()["error"]["transaction_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no transaction_id in the timeout: {}", r.body))
        .to_string();
    assert!(r.json()["error"]["message"].as_str().unwrap().contains(&id));
    std::thread::sleep(Duration::from_millis(1500));
    let body = json!({"account_id": "opened-late", "transaction_id": id});
    let retried = retry_until(&mut c, "/v1/wallet/accounts", &body, 201)
        .expect("the retry with the given id gets the original 201");
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));
    assert!(server.stop().success());
}

/// `wallet token` mints a token `serve` accepts with its scopes, and refuses, naming the
/// argument, what `serve` would reject later: a short secret, an unknown scope, a zero TTL.
#[test]
fn wallet_token_mints_what_serve_accepts_and_refuses_what_it_would_not() {
    let mint = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .arg("token")
            .args(args)
            .env_remove("WALLET_JWT_SECRET")
            .output()
            .expect("run wallet token")
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let out = mint(&[
        "--jwt-secret",
        SECRET,
        "--sub",
        "ops",
        "--scope",
        "wallet:admin",
        "--ttl",
        "5m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin_token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut admin = as_caller(&server, Some(admin_token));
    common::open(&mut admin, "alice");
    // The default scopes (transfer and read) for alice: she reads her own account, and may
    // not open one (admin only).
    let out = mint(&["--jwt-secret", SECRET, "--sub", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut alice = as_caller(
        &server,
        Some(String::from_utf8(out.stdout).unwrap().trim().to_string()),
    );
    assert_eq!(alice.get("/v1/wallet/accounts/alice").status, 200);
    let r = alice.post("/v1/wallet/accounts", &json!({"account_id": "mallory"}));
    assert_eq!(r.status, 403, "{}", r.body);
    // A token for some audience, to a server that names none: refused (as README says).
    let out = mint(&["--jwt-secret", SECRET, "--sub", "alice", "--audience", "x"]);
    assert!(out.status.success(), "{out:?}");
    let mut elsewhere = as_caller(
        &server,
        Some(String::from_utf8(out.stdout).unwrap().trim().to_string()),
    );
    assert_eq!(elsewhere.get("/v1/wallet/accounts/alice").status, 401);

    for (args, field) in [
        (
            &["--jwt-secret", "too-short", "--sub", "ops"][..],
            "--jwt-secret",
        ),
        (
            &[
                "--jwt-secret",
                SECRET,
                "--sub",
                "ops",
                "--scope",
                "wallet:amdin",
            ][..],
            "--scope",
        ),
        (
            &["--jwt-secret", SECRET, "--sub", "alice smith"][..],
            "--sub",
        ),
        (
            &["--jwt-secret", SECRET, "--sub", "ops", "--ttl", "0s"][..],
            "--ttl",
        ),
        (
            &["--jwt-secret", SECRET, "--sub", "ops", "--ttl", "500ms"][..],
            "--ttl: at least 1s",
        ),
        (&["--jwt-secret", SECRET, "--sub", ""][..], "--sub"),
        // Accounts HTTP cannot open (clients drop `.` and `..` from URL paths).
        (&["--jwt-secret", SECRET, "--sub", "."][..], "--sub"),
        (&["--jwt-secret", SECRET, "--sub", ".."][..], "--sub"),
        // A token without a scope is refused every request; an empty audience names nobody;
        // a token cannot be revoked, so its life is bounded.
        (
            &["--jwt-secret", SECRET, "--sub", "ops", "--scope", " "][..],
            "--scope",
        ),
        (
            &["--jwt-secret", SECRET, "--sub", "ops", "--audience", ""][..],
            "--audience",
        ),
        (
            &["--jwt-secret", SECRET, "--sub", "ops", "--ttl", "400days"][..],
            "--ttl",
        ),
    ] {
        let out = mint(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} minted a token");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed a token");
    }
    // loadgen mints its tokens the same way: a short secret is refused before any request.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["loadgen", "--url", &format!("http://{}", server.address)])
        .args([
            "--jwt-secret",
            "too-short",
            "--duration",
            "1",
            "--rate",
            "10",
        ])
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--jwt-secret"),
        "{stderr}"
    );
    assert!(server.stop().success(), "the server did not stop cleanly");
}

#[test]
fn with_an_audience_and_issuer_configured_only_tokens_naming_both_are_taken() {
    // A signing key shared with other services: their tokens (another audience, or none) must
    // not call this one.
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[
            "--jwt-audience",
            "wallet-api",
            "--jwt-issuer",
            "idp.example",
        ],
    );
    let mint = |audience: Option<&str>, issuer: Option<&str>| {
        wallet::api::auth::mint_for(
            SECRET.as_bytes(),
            "ops",
            "wallet:admin",
            Duration::from_secs(600),
            &wallet::api::auth::Expect {
                audience: audience.map(str::to_string),
                issuer: issuer.map(str::to_string),
            },
        )
        .unwrap()
    };
    let cases = [
        (None, None, 401),
        (Some("billing-api"), Some("idp.example"), 401),
        (Some("wallet-api"), None, 401),
        (Some("wallet-api"), Some("other-idp"), 401),
        (None, Some("idp.example"), 401),
        (Some("wallet-api"), Some("idp.example"), 201),
    ];
    for (i, (audience, issuer, status)) in cases.into_iter().enumerate() {
        let mut c = as_caller(&server, Some(mint(audience, issuer)));
        let r = c.post(
            "/v1/wallet/accounts",
            &json!({ "account_id": format!("acct{i}") }),
        );
        assert_eq!(
            r.status, status,
            "aud {audience:?}, iss {issuer:?}: {}",
            r.body
        );
    }
    // One issuer, a string: a list naming ours among others is refused; an audience must be a
    // string or a list of strings (a number was reported as "missing claim aud").
    let now = now_secs();
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    for (aud, iss, status, reason) in [
        (
            json!("wallet-api"),
            json!(["https://evil", "idp.example"]),
            401,
            "claim iss is not a string",
        ),
        (
            json!(5),
            json!("idp.example"),
            401,
            "claim aud is neither a string nor a list",
        ),
        (
            json!(["billing", "wallet-api"]),
            json!("idp.example"),
            201,
            "",
        ),
    ] {
        let token = signed(
            &hs256,
            &json!({"sub": "ops", "scope": "wallet:admin", "exp": now + 600, "aud": aud, "iss": iss}),
        );
        let mut c = as_caller(&server, Some(token));
        let r = c.post(
            "/v1/wallet/accounts",
            &json!({ "account_id": format!("shaped{status}") }),
        );
        assert_eq!(r.status, status, "aud {aud}, iss {iss}: {}", r.body);
        assert!(r.body.contains(reason), "{}", r.body);
    }
    // The CLI mints what the server expects, and refuses the flags without a key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["token", "--sub", "ops", "--scope", "wallet:admin"])
        .args(["--audience", "wallet-api", "--issuer", "idp.example"])
        .env("WALLET_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut c = as_caller(&server, Some(token));
    let r = c.post("/v1/wallet/accounts", &json!({ "account_id": "minted" }));
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(server.stop().success());
    // An audience without a key to check it by; a blank one, which `wallet token` refuses to
    // mint for (no caller could ever pass).
    for (args, says) in [
        (&["--jwt-audience", "x"][..], "--jwt-audience"),
        (
            &["--jwt-secret", SECRET, "--jwt-audience", " "][..],
            "--jwt-audience: must not be empty",
        ),
    ] {
        let out = common::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(args)
                .arg("--data-dir")
                .arg(dir.path()),
            SERVE_REFUSAL_LIMIT,
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
}

/// A retry of a decided transfer moves no money. After a restart, while the read views load
/// and do not know the original yet, such a retry is charged on arrival; it is given back once
/// the engine answers it as a replay, so retries cannot use up the account's allowance.
#[test]
fn retries_after_a_restart_do_not_use_up_the_velocity_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--jwt-secret",
        SECRET,
        "--velocity-per-account",
        "1",
        "--sync",
        "none",
    ];
    let server = Server::start(dir.path(), &args);
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    common::open(&mut admin, "alice");
    common::open(&mut admin, "bob");
    common::deposit(&mut admin, "alice", "100.00");
    let post_until_allowed = |c: &mut Client, body: &serde_json::Value| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = c.post("/v1/wallet/balance_transfer", body);
            if r.status != 429 || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let t1 = transfer_body("alice", "bob", "1.00", &uuid());
    let t2 = transfer_body("alice", "bob", "2.00", &uuid());
    for t in [&t1, &t2] {
        let r = post_until_allowed(&mut admin, t);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(server.stop().success());

    let server = Server::start_listening_with_env(
        dir.path(),
        &args,
        &[("WALLET_FAILPOINT", "views-past-delay:5000")],
    );
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = admin.get("/readyz");
        assert_eq!(r.status, 503, "ready too soon: {}", r.body);
        if r.body.contains("rebuilding the read views") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.body);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Writes are served; the views do not know the journal's outcomes yet. A batch of two
    // retries looks like two new transfers out of alice, more than her limit lets through at
    // once; whether it is cannot be known before the views are loaded: 503, to be retried, not
    // a 400 that tells the client its batch is malformed for good.
    let r = admin.post(
        "/v1/wallet/balance_transfers",
        &json!({ "transfers": [t1, t2] }),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "starting", "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{}", r.body);
    // A retry in a batch, then a single one: the allowance (one transfer) must be back after
    // each.
    let r = admin.post(
        "/v1/wallet/balance_transfers",
        &json!({ "transfers": [t1] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let item = &r.json()["results"][0];
    assert_eq!(item["http_status"], 503, "{item}");
    assert_eq!(item["result"]["error"]["code"], "starting", "{item}");
    let r = admin.post("/v1/wallet/balance_transfer", &t2);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "starting", "{}", r.body);
    // Neither retry spent the allowance: a new transfer is let through at once.
    let t3 = transfer_body("alice", "bob", "3.00", &uuid());
    let r = admin.post("/v1/wallet/balance_transfer", &t3);
    assert_eq!(r.status, 200, "{}", r.body);
    // And the allowance is charged: the next new transfer at once is refused (this also shows
    // the requests above came within the second the allowance takes to come back).
    let t4 = transfer_body("alice", "bob", "4.00", &uuid());
    let r = admin.post("/v1/wallet/balance_transfer", &t4);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        admin.get("/readyz").status,
        503,
        "the views loaded before the checks above; they proved nothing"
    );
    assert!(server.stop().success());
    let server = Server::start(dir.path(), &args);
    // Once the views know them, the two retries in one batch move nothing and spend nothing.
    let mut admin = as_caller(&server, Some(token("ops", "wallet:admin")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.get("/readyz").status != 200 {
        assert!(Instant::now() < deadline, "the read views never loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = admin.post(
        "/v1/wallet/balance_transfers",
        &json!({ "transfers": [t1, t2] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for item in r.json()["results"].as_array().expect("results") {
        assert_eq!(item["http_status"], 200, "{item}");
    }
    assert_eq!(
        balance(&server, "alice"),
        9_400,
        "each transfer moved money once"
    );
    assert!(server.stop().success());
}
