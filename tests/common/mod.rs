//! Shared helpers for black-box tests: start `wallet serve` as a child process on 127.0.0.1
//! port 0, and a tiny blocking HTTP/1.1 client with keep-alive.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub address: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts `wallet serve` and returns once it serves requests (it printed `ready`, after
    /// recovering its state).
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::spawn(data_dir, extra, &[], "ready")
    }

    /// `start` with extra environment variables (failpoints, say).
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(data_dir, extra, env, "ready")
    }

    /// Returns as soon as the listener is bound (`listening on ...`), while the server may still
    /// be recovering.
    pub fn start_listening(data_dir: &Path, extra: &[&str]) -> Server {
        Server::spawn(data_dir, extra, &[], "listening on ")
    }

    /// `start_listening` with extra environment variables.
    pub fn start_listening_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Server::spawn(data_dir, extra, env, "listening on ")
    }

    /// `start` listening on `listen`.
    pub fn start_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Server::spawn_at(data_dir, listen, extra, &[], "ready")
    }

    /// `wallet serve` on a free loopback port, unpinned, over `data_dir`, not started.
    pub fn command(data_dir: &Path) -> Command {
        Server::command_at(data_dir, "127.0.0.1:0")
    }

    /// `command` on `listen`.
    pub fn command_at(data_dir: &Path, listen: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wallet"));
        command
            .args([
                "serve",
                "--listen",
                listen,
                "--pin-core",
                "-1",
                // The wait strategy is left at its default (`park`), as a user runs the server,
                // so that every HTTP test also runs the doorbell end to end.
            ])
            .arg("--data-dir")
            .arg(data_dir);
        command
    }

    fn spawn(data_dir: &Path, extra: &[&str], env: &[(&str, &str)], until: &str) -> Server {
        Server::spawn_at(data_dir, "127.0.0.1:0", extra, env, until)
    }

    fn spawn_at(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        until: &str,
    ) -> Server {
        let mut command = Server::command_at(data_dir, listen);
        command
            .args(extra)
            .env("WALLET_LOG", "warn")
            .env_remove("WALLET_FAILPOINT")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Server::run_until(command, data_dir, until)
    }

    /// `start` with the server's open-file limit (soft and hard) set to `limit`.
    pub fn start_with_fd_limit(data_dir: &Path, extra: &[&str], limit: u64) -> Server {
        use std::os::unix::process::CommandExt;
        let mut command = Server::command_at(data_dir, "127.0.0.1:0");
        command
            .args(extra)
            .env("WALLET_LOG", "warn")
            .env_remove("WALLET_FAILPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the child between fork and exec, and only calls
        // setrlimit (async-signal-safe) on a local.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Server::run_until(command, data_dir, "ready")
    }

    /// Spawns `command` (a `serve` with piped stdout) and waits for a stdout line starting
    /// with `until`.
    fn run_until(mut command: Command, data_dir: &Path, until: &str) -> Server {
        let child = command.spawn().expect("spawn wallet serve");
        // Owned by a `Server` at once, so that every path below (panics included) kills and
        // waits for the child in `Drop`.
        let mut server = Server {
            child,
            address: String::new(),
            data_dir: data_dir.to_path_buf(),
        };
        let stdout = server.child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read serve stdout");
            assert!(n > 0, "wallet serve exited before printing {until:?}");
            if let Some(address) = line.trim().strip_prefix("listening on ") {
                server.address = address.to_string();
            }
            if line.starts_with(until) {
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in reader.lines() {});
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "wallet serve did not print {until:?} within 60 s"
            );
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.address)
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child's pid; kill takes no pointers.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        wait_with_timeout(&mut self.child, Duration::from_secs(30))
    }

    /// SIGKILL, as a crash would; fails the test if the server had already exited by itself
    /// (a crash of its own, which a kill would otherwise hide) or did not die of the signal.
    pub fn kill9(mut self) {
        use std::os::unix::process::ExitStatusExt;
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the server exited by itself before it was killed: {status}");
        }
        self.child.kill().expect("send SIGKILL");
        let status = self.child.wait().expect("wait for the killed server");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the server ended otherwise than by the kill: {status}"
        );
    }
}

/// How long a `serve` that must refuse to start may run: one that started instead fails the
/// test within this (a plain `output()` would wait for it for ever).
pub const SERVE_REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// Runs `command` with its output captured; it must exit by itself within `limit` (killed and
/// the test failed past that, with its stderr). The output is read while it runs, so that a
/// child that writes much cannot stall on a full pipe.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{command:?} was still running after {limit:?}: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Client {
    address: String,
    stream: Option<TcpStream>,
    /// Sent as `Authorization: Bearer ...` when set.
    pub token: Option<String>,
}

impl Client {
    pub fn connect(address: &str) -> Client {
        Client {
            address: address.to_string(),
            stream: None,
            token: None,
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, None, "application/json")
    }

    pub fn post(&mut self, path: &str, body: &serde_json::Value) -> Response {
        self.request(
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            "application/json",
        )
    }

    /// One attempt, no retry, no panic: for tests that kill the server under the client.
    pub fn try_post(&mut self, path: &str, body: &serde_json::Value) -> std::io::Result<Response> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.address)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let result = self.try_request(
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            "application/json",
        );
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
    ) -> Response {
        // A kept-alive connection may have been closed by the server while idle: a request on it
        // is sent once more on a fresh connection. A request that failed on a fresh connection
        // is not resent: it may have reached the server, and a resent POST would then be judged
        // as a second request (a flake seen once: an account "opened twice" answered 409).
        loop {
            let fresh = self.stream.is_none();
            if fresh {
                let stream = TcpStream::connect(&self.address).expect("connect");
                stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
                stream.set_nodelay(true).ok();
                self.stream = Some(stream);
            }
            match self.try_request(method, path, body, content_type) {
                Ok(r) => return r,
                Err(e) => {
                    self.stream = None;
                    assert!(!fresh, "{method} {path} failed on a fresh connection: {e}");
                }
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
    ) -> std::io::Result<Response> {
        let stream = self.stream.as_mut().expect("connected");
        let body = body.unwrap_or_default();
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        read_response(stream)
    }
}

pub fn read_response(stream: &mut TcpStream) -> std::io::Result<Response> {
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        buffer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buffer).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).to_string();
    check_error_codes(&body);
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The error codes `docs/openapi.yaml` lists (`components/schemas/ErrorCode`).
fn documented_error_codes() -> &'static std::collections::HashSet<String> {
    static CODES: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    CODES.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
        let document: serde_json::Value =
            serde_norway::from_str(&text).expect("docs/openapi.yaml is YAML");
        document["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("docs/openapi.yaml lists components/schemas/ErrorCode")
            .iter()
            .map(|code| code.as_str().expect("a code").to_string())
            .collect()
    })
}

/// Fails the test when a JSON answer carries an `error.code` (anywhere in it: a batch item's
/// result too) that `docs/openapi.yaml` does not list: every answer a test reads through this
/// client is checked against the document.
pub fn check_error_codes(body: &str) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return;
    };
    let mut stack = vec![&value];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(code) = map
                    .get("error")
                    .and_then(|e| e.get("code"))
                    .and_then(|c| c.as_str())
                {
                    assert!(
                        documented_error_codes().contains(code),
                        "error code {code:?} is not listed in docs/openapi.yaml (components/schemas/ErrorCode): {body}"
                    );
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
}

pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn open(client: &mut Client, account: &str) {
    let r = client.post(
        "/v1/wallet/accounts",
        &serde_json::json!({"account_id": account}),
    );
    assert_eq!(r.status, 201, "open {account}: {}", r.body);
}

pub fn deposit(client: &mut Client, account: &str, amount: &str) {
    let r = client.post(
        "/v1/wallet/deposit",
        &serde_json::json!({"account_id": account, "amount": amount, "currency": "USD", "transaction_id": uuid()}),
    );
    assert_eq!(r.status, 200, "deposit {account}: {}", r.body);
}

pub fn transfer_body(from: &str, to: &str, amount: &str, id: &str) -> serde_json::Value {
    serde_json::json!({"from_account": from, "to_account": to, "amount": amount, "currency": "USD", "transaction_id": id})
}

/// Balance of `account` in USD in minor units, via the API.
pub fn balance_cents(client: &mut Client, account: &str) -> i64 {
    let r = client.get(&format!("/v1/wallet/accounts/{account}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    v["balances"]
        .as_array()
        .and_then(|b| b.iter().find(|x| x["currency"] == "USD"))
        .map(|b| cents(b["balance"].as_str().unwrap_or("0")))
        .unwrap_or(0)
}

/// A two-decimal amount string in cents, its sign kept (checks for negative balances rely on it).
pub fn cents(text: &str) -> i64 {
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "00"));
    assert!(
        fraction.len() == 2 && !whole.starts_with(['-', '+']),
        "not an amount with two decimals: {text:?}"
    );
    sign * (whole.parse::<i64>().expect("whole") * 100 + fraction.parse::<i64>().expect("fraction"))
}

/// A tmpfs of `bytes`, mounted on a fresh directory for as long as it lives: a small disk that
/// a test can fill.
pub struct SmallDisk {
    pub dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(bytes: u64) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("wallet-disk-")
            .tempdir()
            .expect("tempdir");
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test mounts a small tmpfs to fill (it needs root, as tools/test runs it): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallDisk { dir }
    }

    /// Writes a file of zeros until the disk is full.
    pub fn fill(&self, name: &str) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join(name);
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
