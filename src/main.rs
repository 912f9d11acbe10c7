use std::process::ExitCode;

use clap::{Parser, Subcommand};

use wallet::tools::{bench, replay};

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
    /// Write a snapshot of the state at the end of the journal.
    Snapshot(replay::SnapshotArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALLET_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Bench(args) => bench::run(&args).map(|report| {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                bench::print_table(&report);
            }
            ExitCode::SUCCESS
        }),
        Commands::Replay(args) => replay::run(&args).map(|report| {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                replay::print(&report);
            }
            if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }),
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
