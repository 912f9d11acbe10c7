use std::process::ExitCode;

use clap::{Parser, Subcommand};

use wallet::tools::{bench, replay};

#[global_allocator]
static ALLOCATOR: wallet::alloc::HugePageAlloc = wallet::alloc::HugePageAlloc;

/// A digital-wallet engine: a deterministic ledger on a ring buffer, a durable journal, and an
/// HTTP API.
#[derive(Parser)]
#[command(name = "wallet", version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// In-process load through the real pipeline (no HTTP), with HDR latency percentiles.
    Bench(bench::BenchArgs),
    /// Rebuild state from the journal and audit it (frames, chain, checkpoints, invariants).
    Replay(replay::ReplayArgs),
    /// Write a snapshot of the state at the end of the journal. First, as a starting server
    /// does, the journal is made durable up to that end: a torn tail is cut (its bytes kept in a
    /// `.cut-at-N` file beside the segment) and the newest segment synced.
    Snapshot(replay::SnapshotArgs),
    /// Serve the HTTP API (recovers the journal in --data-dir first).
    Serve(Box<ServeArgs>),
    /// HTTP load generator with HDR latency (open-loop at --rate, or closed-loop with --rate 0).
    Loadgen(wallet::tools::loadgen::LoadgenArgs),
    /// Mint an HS256 bearer token (development and load tests).
    Token(TokenArgs),
    /// A bare hyper server answering a fixed JSON body (the HTTP stack's baseline for loadgen).
    ServeFixed {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
    },
    /// The cluster layout in ZooKeeper: Redis partition map, SQL shards, routing.
    Cluster(wallet::replicate::cli::ClusterArgs),
    /// Replicate the event stream into external stores (Redis partitions, PostgreSQL shards).
    Replicate(wallet::replicate::cli::ReplicateArgs),
    /// Compare an external store with the state replayed from the journal.
    Reconcile(wallet::replicate::cli::ReconcileArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    #[arg(long, env = "WALLET_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The account the token speaks for.
    #[arg(long)]
    sub: String,
    /// Space-separated scopes: wallet:transfer, wallet:read, wallet:admin.
    #[arg(long, default_value = "wallet:transfer wallet:read")]
    scope: String,
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// The `aud` claim (for a server run with --jwt-audience).
    #[arg(long)]
    audience: Option<String>,
    /// The `iss` claim (for a server run with --jwt-issuer).
    #[arg(long)]
    issuer: Option<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, default_value = "./data")]
    data_dir: std::path::PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// batch: group commit, a reply only after its msync (durable against power loss);
    /// interval=<ms>: at most one msync per interval (at most 1000), replies still wait for it;
    /// none: page cache only - survives a process crash, NOT a power loss or kernel crash.
    #[arg(long, default_value = "batch")]
    sync: wallet::journal::SyncMode,
    #[arg(long, default_value_t = 64 << 20)]
    segment_size: u64,
    /// Kernel readahead on the journal's mapping: auto (off while syncs are small, on when they
    /// grow), on (large page-cache folios: each small sync rewrites a whole large folio on the
    /// disk), off (4 KiB folios: fewest bytes written, slower large syncs). See README,
    /// Durability.
    #[arg(long, default_value_t)]
    journal_readahead: wallet::journal::storage::Readahead,
    #[arg(long, default_value_t = 16 << 10)]
    max_body_bytes: usize,
    #[arg(long, default_value_t = 4 << 20)]
    max_batch_body_bytes: usize,
    #[arg(long, default_value_t = 5000)]
    header_read_timeout_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Client connections at once; more are answered 503 too_many_connections. Capped (with a
    /// warning) to what fits under the open-file limit with 256 descriptors kept back
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    #[arg(long, default_value_t = 16384)]
    max_in_flight: usize,
    /// Batch requests admitted at once; more get a fast 429 before their bodies are read. A
    /// caller other than an admin holds at most a quarter of them.
    #[arg(long, default_value_t = 64)]
    max_batches_in_flight: usize,
    #[arg(long, default_value_t = 1 << 16)]
    ring_size: usize,
    /// Wait strategy of the engine's threads: park (sleeps until work arrives), spin (burns a core), yield, sleep=<n>us (1 to 10000 us).
    #[arg(long, default_value = "park")]
    wait: wallet::engine::WaitMode,
    /// Core to pin the engine thread to; negative: do not pin.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pin_core: i64,
    /// A checkpoint record (the ledger's state hash, which replay and the snapshot follower
    /// verify) every this many events (0: none).
    #[arg(long, default_value_t = 1 << 20)]
    checkpoint_every: u64,
    /// Write a snapshot every this many events (0: never).
    #[arg(long, default_value_t = 0)]
    snapshot_every: u64,
    /// Snapshots kept after each one written: older ones (and the temporary files of
    /// interrupted ones) are removed (0: keep all, and let the disk fill).
    #[arg(long, default_value_t = wallet::engine::DEFAULT_SNAPSHOT_KEEP)]
    snapshot_keep: usize,
    /// Transaction ids the ledger may remember (every id is kept forever, in RAM): a number, or
    /// auto (those that fill three quarters of the machine's RAM, at 256 bytes each, 320 with
    /// --snapshot-every). At the limit, requests with new ids get 507 ledger_full, unexecuted.
    #[arg(long, default_value = "auto")]
    max_transaction_ids: String,
    /// `jwt` (needs --jwt-secret or --jwt-public-key), `none` (loopback only), or `auto`: jwt
    /// when a key is given, otherwise none on loopback and a refusal elsewhere.
    #[arg(long, default_value = "auto")]
    auth: String,
    /// HS256 secret for bearer tokens.
    #[arg(long, env = "WALLET_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// RS256 or EdDSA public key (PEM) for bearer tokens.
    #[arg(long)]
    jwt_public_key: Option<std::path::PathBuf>,
    /// Tokens must carry this `aud` (audience) claim: a key shared with other services then
    /// cannot be used to call this one with their tokens.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// Tokens must carry this `iss` (issuer) claim.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Requests per second per caller, a batch counting one per transfer (0: no limit); over
    /// it: 429 with Retry-After. A batch of more transfers than this is a 400.
    #[arg(long, default_value_t = 0)]
    rate_limit_per_caller: u32,
    /// Transfers out of one account per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    velocity_per_account: u32,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Also run the Redis replicator in this process (partition map from ZooKeeper --zk).
    #[arg(long, requires = "zk")]
    replicate_redis: bool,
    /// Claim the engine leadership in ZooKeeper (--zk, under --zk-root) and register this
    /// front end's address: refuse to start while another engine holds it, stop if another
    /// engine takes it.
    #[arg(long, requires = "zk")]
    zk_leader: bool,
    /// ZooKeeper address, for --replicate-redis and --zk-leader.
    #[arg(long, env = "WALLET_ZK")]
    zk: Option<String>,
    /// Root of the wallet's nodes in ZooKeeper, for --replicate-redis and --zk-leader.
    #[arg(long, env = "WALLET_ZK_ROOT", default_value = wallet::replicate::zk::DEFAULT_ROOT)]
    zk_root: String,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<wallet::api::ServeConfig> {
        use wallet::api::auth::Auth;
        let ms = std::time::Duration::from_millis;
        let expect = wallet::api::auth::Expect {
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        };
        for (flag, value) in [
            ("--jwt-audience", &expect.audience),
            ("--jwt-issuer", &expect.issuer),
        ] {
            // Blank as `wallet token` judges it: no token could be minted for it.
            anyhow::ensure!(
                value.as_ref().is_none_or(|v| !v.trim().is_empty()),
                "{flag}: must not be empty"
            );
        }
        let has_expect = expect != wallet::api::auth::Expect::default();
        let auth = match (self.auth.as_str(), &self.jwt_secret, &self.jwt_public_key) {
            ("none" | "auto", None, None) if has_expect => {
                anyhow::bail!("--jwt-audience/--jwt-issuer need --jwt-secret or --jwt-public-key")
            }
            ("none", None, None) => Auth::None,
            ("none", _, _) => {
                anyhow::bail!("--auth none contradicts --jwt-secret/--jwt-public-key")
            }
            (_, Some(_), Some(_)) => {
                anyhow::bail!(
                    "give either --jwt-secret (or WALLET_JWT_SECRET) or --jwt-public-key, not both"
                )
            }
            ("jwt" | "auto", Some(secret), None) => {
                anyhow::ensure!(
                    secret.len() >= wallet::api::auth::MIN_SECRET_BYTES,
                    "--jwt-secret (or WALLET_JWT_SECRET) must be at least {} bytes",
                    wallet::api::auth::MIN_SECRET_BYTES
                );
                Auth::hs256(secret.as_bytes(), &expect)
            }
            ("jwt" | "auto", None, Some(path)) => Auth::public_key(path, &expect)?,
            ("jwt", None, None) => {
                anyhow::bail!("--auth jwt needs --jwt-secret or --jwt-public-key")
            }
            ("auto", None, None) => Auth::None,
            (other, _, _) => anyhow::bail!("unknown --auth {other:?}: use auto, jwt or none"),
        };
        Ok(wallet::api::ServeConfig {
            auth: std::sync::Arc::new(auth),
            rate_limit_per_caller: self.rate_limit_per_caller,
            velocity_per_account: self.velocity_per_account,
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            zk_leader: match (self.zk_leader, &self.zk) {
                (true, Some(zk)) => {
                    wallet::replicate::zk::Layout::new(&self.zk_root)?;
                    Some((zk.clone(), self.zk_root.clone()))
                }
                _ => None,
            },
            replicate_redis: match (self.replicate_redis, &self.zk) {
                (true, Some(zk)) => {
                    // Refused here, not in the replicator's restart loop.
                    wallet::replicate::zk::Layout::new(&self.zk_root)?;
                    Some((zk.clone(), self.zk_root.clone()))
                }
                _ => None,
            },
            data_dir: self.data_dir.clone(),
            sync: self.sync,
            segment_size_bytes: self.segment_size,
            journal_readahead: self.journal_readahead,
            max_body_bytes: self.max_body_bytes,
            max_batch_body_bytes: self.max_batch_body_bytes,
            header_read_timeout: ms(self.header_read_timeout_ms),
            request_timeout: ms(self.request_timeout_ms),
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            max_batches_in_flight: self.max_batches_in_flight,
            ring_size: self.ring_size,
            wait: self.wait,
            pin_core: usize::try_from(self.pin_core).ok(),
            checkpoint_every: self.checkpoint_every,
            snapshot_every: self.snapshot_every,
            snapshot_keep: self.snapshot_keep,
            max_transaction_ids: match self.max_transaction_ids.as_str() {
                "auto" => wallet::api::auto_max_transaction_ids(
                    wallet::api::mem_total_bytes()?,
                    self.snapshot_every > 0,
                ),
                number => number.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--max-transaction-ids must be auto or a whole number, not {number:?}"
                    )
                })?,
            },
            ..wallet::api::ServeConfig::default()
        })
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// For the tools that only print (`wallet replay | head`): a reader that goes away ends the
/// process quietly, as it ends other Unix tools, instead of `println!` panicking on the broken
/// pipe (Rust ignores SIGPIPE). Never for commands that use sockets, which a peer's close
/// would then kill.
fn end_quietly_on_a_closed_stdout() {
    // SAFETY: restores the default disposition of SIGPIPE (no handler code runs), before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    // The ZooKeeper client logs every session it opens at info level: noise on every
    // `wallet cluster` command. Colours only on a terminal, not in a log file.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALLET_LOG")
                .unwrap_or_else(|_| "info,zookeeper_client=warn".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Commands::Bench(_) | Commands::Replay(_) | Commands::Snapshot(_) | Commands::Token(_)
    ) {
        end_quietly_on_a_closed_stdout();
    }
    let result = match cli.command {
        Commands::Bench(args) => bench::run(&args).map(|report| {
            if let Some(warning) = report.warning() {
                eprintln!("{warning}");
            }
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                bench::print_table(&report);
            }
            ExitCode::SUCCESS
        }),
        Commands::Replay(args) => match replay::run(&args) {
            Ok(report) => {
                if args.json {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                } else {
                    replay::print(&report);
                }
                // The verdict on stderr too, as every other failure is: a script that keeps
                // stdout (the report) apart still sees why the audit failed.
                if let Some(error) = report.error.as_deref().filter(|_| !report.ok) {
                    eprintln!("error: the audit failed: {error}");
                }
                Ok(if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            // A script reading --json gets an answer to parse whatever failed (a damaged
            // watermark file, an unreadable directory), not an empty stdout.
            Err(e) if args.json => {
                let error = format!("{e:#}");
                println!("{}", serde_json::json!({ "ok": false, "error": error }));
                eprintln!("error: {error}");
                Ok(ExitCode::FAILURE)
            }
            Err(e) => Err(e),
        },
        Commands::Serve(args) => args
            .config()
            .and_then(|config| {
                runtime().and_then(|rt| {
                    let served = rt.block_on(wallet::api::run(config, args.listen));
                    // Not waiting for blocking tasks: a recovery that a shutdown cut short
                    // still runs on one (it only reads), and the process is exiting.
                    rt.shutdown_background();
                    served
                })
            })
            .map(|_| ExitCode::SUCCESS),
        Commands::Token(args) => token_ttl(&args)
            .and_then(|ttl| {
                let names = wallet::api::auth::Expect {
                    audience: args.audience.clone(),
                    issuer: args.issuer.clone(),
                };
                wallet::api::auth::mint_for(
                    args.jwt_secret.as_bytes(),
                    &args.sub,
                    &args.scope,
                    ttl,
                    &names,
                )
            })
            .map(|token| {
                println!("{token}");
                ExitCode::SUCCESS
            }),
        Commands::Loadgen(args) => runtime()
            .and_then(|rt| rt.block_on(wallet::tools::loadgen::run(&args)))
            .and_then(|report| report.check_succeeded(&args))
            .map(|_| ExitCode::SUCCESS),
        Commands::ServeFixed { listen } => runtime()
            .and_then(|rt| rt.block_on(wallet::tools::loadgen::serve_fixed(listen)))
            .map(|_| ExitCode::SUCCESS),
        Commands::Cluster(args) => wallet::replicate::cli::run_cluster(args),
        Commands::Replicate(args) => wallet::replicate::cli::run_replicate(args),
        Commands::Reconcile(args) => wallet::replicate::cli::run_reconcile(args),
        Commands::Snapshot(args) => replay::snapshot(&args).map(|path| {
            println!("snapshot written: {}", path.display());
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks `wallet token`'s arguments as `serve` would judge the token (so that a typo is an
/// error here, not a 401 or 403 later) and returns its lifetime.
fn token_ttl(args: &TokenArgs) -> anyhow::Result<std::time::Duration> {
    use wallet::api::auth::{MIN_SECRET_BYTES, SCOPE_ADMIN, SCOPE_READ, SCOPE_TRANSFER};
    anyhow::ensure!(
        args.jwt_secret.len() >= MIN_SECRET_BYTES,
        "--jwt-secret must be at least {MIN_SECRET_BYTES} bytes (serve refuses a shorter one)"
    );
    // `serve` takes `sub` as the caller's account: one that is not an account id is a 401.
    // As an account to open: `.` and `..` cannot be opened over HTTP, so no token for them.
    wallet::api::json::new_account("--sub", &args.sub).map_err(|e| anyhow::anyhow!(e.message))?;
    // Split as `serve` splits it: on single spaces only (a tab or a no-break space is part of a
    // scope, then unknown).
    for scope in args.scope.split(' ').filter(|s| !s.is_empty()) {
        anyhow::ensure!(
            [SCOPE_TRANSFER, SCOPE_READ, SCOPE_ADMIN].contains(&scope),
            "--scope: unknown scope {scope:?}; use {SCOPE_TRANSFER}, {SCOPE_READ} or {SCOPE_ADMIN}"
        );
    }
    anyhow::ensure!(
        !args.scope.trim().is_empty(),
        "--scope: give at least one of {SCOPE_TRANSFER}, {SCOPE_READ}, {SCOPE_ADMIN} (a token \
         without a scope is refused every request)"
    );
    for (flag, value) in [("--audience", &args.audience), ("--issuer", &args.issuer)] {
        anyhow::ensure!(
            value.as_deref().is_none_or(|v| !v.trim().is_empty()),
            "{flag}: must not be empty"
        );
    }
    let ttl = humantime::parse_duration(&args.ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    // A token's expiry is in whole seconds: a shorter life minted one already expired.
    anyhow::ensure!(
        ttl >= std::time::Duration::from_secs(1),
        "--ttl: at least 1s (a token's expiry is counted in whole seconds), not {}",
        args.ttl
    );
    // A bearer token cannot be revoked before it expires.
    const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
    anyhow::ensure!(
        ttl <= MAX_TTL,
        "--ttl: at most 366 days (a token cannot be revoked before it expires), not {}",
        args.ttl
    );
    Ok(ttl)
}
