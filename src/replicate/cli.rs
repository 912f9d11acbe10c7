//! The `cluster`, `replicate` and `reconcile` subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::zk::{self, Layout};

#[derive(Args, Debug, Clone)]
pub struct ZkArgs {
    /// ZooKeeper connect string (host:port[,host:port...]).
    #[arg(long, env = "WALLET_ZK")]
    pub zk: String,
    /// Root of the wallet's nodes in ZooKeeper (tests use one root each).
    #[arg(long, env = "WALLET_ZK_ROOT", default_value = zk::DEFAULT_ROOT)]
    pub zk_root: String,
}

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create the layout and the first partition map (version 1, or above any version its
    /// Redis nodes already show, so that a version is never reused).
    Init {
        #[command(flatten)]
        zk: ZkArgs,
        /// Redis nodes, host:port, comma-separated; their order is the partition order.
        #[arg(
            long,
            env = "WALLET_REDIS_NODES",
            value_delimiter = ',',
            required = true
        )]
        redis_nodes: Vec<String>,
        /// PostgreSQL shard URLs, comma-separated (optional).
        #[arg(long, value_delimiter = ',')]
        sql_shards: Vec<String>,
        /// Number the map even if some nodes do not answer (their map version is not read, so
        /// a version they were stamped with may be reused; see docs/zookeeper-layout.md).
        #[arg(long)]
        allow_unreachable: bool,
    },
    /// Print the partition map, the SQL shards, the engine leader and the registered front ends.
    Show {
        #[command(flatten)]
        zk: ZkArgs,
    },
    /// Replace the Redis node list (a new map version; a running replicator moves the keys).
    /// The root must hold a map already (`init` creates it).
    SetRedisNodes {
        #[command(flatten)]
        zk: ZkArgs,
        /// host:port,host:port,...
        #[arg(value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Number the map even if some nodes do not answer (their map version is not read, so
        /// a version they were stamped with may be reused; see docs/zookeeper-layout.md).
        #[arg(long)]
        allow_unreachable: bool,
    },
    /// Replace the SQL shard list.
    SetSqlShards {
        #[command(flatten)]
        zk: ZkArgs,
        /// URL,URL,...
        #[arg(value_delimiter = ',', required = true)]
        shards: Vec<String>,
    },
    /// Print the partition and node an account maps to.
    Route {
        #[command(flatten)]
        zk: ZkArgs,
        /// An account id; one starting with `-` is taken as the id, not as a flag.
        #[arg(allow_hyphen_values = true)]
        account: String,
    },
}

#[derive(Args)]
pub struct ReplicateArgs {
    #[command(subcommand)]
    pub command: ReplicateCommand,
}

#[derive(Subcommand)]
pub enum ReplicateCommand {
    /// Keep the Redis partitions equal to the engine's balances, exactly once per node.
    Redis(RedisReplicateArgs),
    /// Project the journal into sharded PostgreSQL with two-phase commit (see docs/sql-replication.md).
    Sql(super::sql::SqlReplicateArgs),
}

#[derive(Args)]
pub struct RedisReplicateArgs {
    #[command(flatten)]
    pub zk: ZkArgs,
    /// A data directory (its journal is tailed, even while `serve` runs) or an engine URL
    /// http://host:port (its /v1/wallet/events stream, durable events only).
    #[arg(long)]
    pub source: String,
    /// Most events per batch (one script per node per batch), 2 to 16777216.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(2..=1 << 24))]
    pub batch_events: u64,
    /// Stop when every node has caught up with the end of the source, and print events/s.
    #[arg(long)]
    pub once: bool,
    /// With --once: how long to wait for a node that is down or behind once the source is read
    /// to its end, before giving up with an error naming it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=super::sql::MAX_WAIT_S))]
    pub once_wait_s: u64,
    /// While the source is idle, how often nodes are asked whether they still hold what was
    /// written there (a node emptied, rewound or restarted behind the replicator's back is
    /// connected again and rebuilt); 0: never.
    #[arg(long, env = "WALLET_REDIS_IDLE_CHECK_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=super::sql::MAX_WAIT_S * 1000))]
    pub idle_check_ms: u64,
    /// Rebuild (clear and replay from sequence 1) a node whose `wallet:applied_record` differs
    /// from the source's record at its `wallet:applied_seq`, instead of exiting with an error.
    #[arg(long)]
    pub rebuild: bool,
}

#[derive(Args)]
pub struct ReconcileArgs {
    #[command(subcommand)]
    pub command: ReconcileCommand,
}

#[derive(Subcommand)]
pub enum ReconcileCommand {
    /// Compare every balance in Redis with the journal's state at the nodes' applied sequence.
    Redis(RedisReconcileArgs),
    /// Compare the SQL shards with the journal's state at their common watermark.
    Sql(super::sql::SqlReconcileArgs),
}

#[derive(Args)]
pub struct RedisReconcileArgs {
    #[command(flatten)]
    pub zk: ZkArgs,
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Differences printed in full (all are counted).
    #[arg(long, default_value_t = 100)]
    pub max_printed: usize,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Prints `value` on stdout. A reader that stopped reading (`cluster show | head`) ends the
/// output quietly: `println!` panicked on the broken pipe.
fn print_json(value: &serde_json::Value) {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub fn run_cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match args.command {
            ClusterCommand::Init { zk: z, redis_nodes, sql_shards, allow_unreachable } => {
                let layout = Layout::new(&z.zk_root)?;
                // Both lists are checked before anything is written: a bad shard URL left the
                // partition map written and the shard list not.
                zk::check_node_list(&redis_nodes)?;
                if !sql_shards.is_empty() {
                    zk::check_sql_shards(&sql_shards)?;
                }
                let client = zk::connect(&z.zk).await?;
                zk::init_layout(&client, &layout).await?;
                match zk::get_partition_map(&client, &layout).await? {
                    Some(map) if map.nodes == redis_nodes => println!("already initialised: {}", serde_json::to_string(&map)?),
                    Some(map) => anyhow::bail!(
                        "{} already holds {}; use `wallet cluster set-redis-nodes` to change it",
                        layout.partitions(),
                        serde_json::to_string(&map)?
                    ),
                    None => {
                        zk::check_node_list(&redis_nodes)?;
                        crate::replicate::redis::check_distinct_servers(&redis_nodes).await?;
                        let at_least = crate::replicate::redis::next_map_version(&redis_nodes, allow_unreachable).await?;
                        let map = zk::set_redis_nodes(&client, &layout, &redis_nodes, at_least).await?;
                        println!("{}: {}", layout.partitions(), serde_json::to_string(&map)?);
                    }
                }
                // As with the map: init never replaces an existing list (a reordered or resized
                // one sends rows to other shards); `set-sql-shards` does, on purpose.
                if !sql_shards.is_empty() {
                    match zk::get_sql_shards(&client, &layout).await? {
                        Some(current) if current.shards == sql_shards => {
                            println!("already initialised: {} (version {})", layout.sql_shards(), current.version);
                        }
                        Some(current) => anyhow::bail!(
                            "{} already holds another list of {} shards (version {}); use `wallet cluster set-sql-shards` to change it",
                            layout.sql_shards(),
                            current.shards.len(),
                            current.version
                        ),
                        None => {
                            let shards = zk::set_sql_shards(&client, &layout, &sql_shards).await?;
                            println!("{}: {}", layout.sql_shards(), serde_json::to_string(&zk::redacted(&shards))?);
                        }
                    }
                }
            }
            ClusterCommand::Show { zk: z } => {
                let layout = Layout::new(&z.zk_root)?;
                let client = zk::connect(&z.zk).await?;
                let map = zk::get_partition_map(&client, &layout).await?;
                // Shown without the passwords the URLs may hold (the terminal, a log, a ticket).
                let shards = zk::get_sql_shards(&client, &layout).await?.map(|s| zk::redacted(&s));
                let (leader, api) = zk::get_registrations(&client, &layout).await?;
                let retiring = zk::get_retiring(&client, &layout).await?;
                print_json(&serde_json::json!({
                    "root": layout.root,
                    "redis_partitions": map,
                    "redis_retiring": retiring,
                    "sql_shards": shards,
                    "engine_leader": leader,
                    "api": api,
                }));
            }
            ClusterCommand::SetRedisNodes { zk: z, nodes, allow_unreachable } => {
                let layout = Layout::new(&z.zk_root)?;
                zk::check_node_list(&nodes)?;
                let client = zk::connect(&z.zk).await?;
                // It replaces a map: on a root without one (a mistyped --zk-root) it would
                // create a new cluster root and report success, the real one unchanged.
                if zk::get_partition_map(&client, &layout).await?.is_none() {
                    anyhow::bail!(
                        "no partition map at {}: nothing to replace (check --zk-root; `wallet cluster init --redis-nodes ...` creates one)",
                        layout.partitions()
                    );
                }
                zk::init_layout(&client, &layout).await?;
                crate::replicate::redis::check_distinct_servers(&nodes).await?;
                let at_least = crate::replicate::redis::next_map_version(&nodes, allow_unreachable).await?;
                let map = zk::set_redis_nodes(&client, &layout, &nodes, at_least).await?;
                println!("{}: {}", layout.partitions(), serde_json::to_string(&map)?);
            }
            ClusterCommand::SetSqlShards { zk: z, shards } => {
                let layout = Layout::new(&z.zk_root)?;
                // Before ZooKeeper is asked (a typo was reported as ZooKeeper unreachable).
                zk::check_sql_shards(&shards)?;
                let client = zk::connect(&z.zk).await?;
                zk::init_layout(&client, &layout).await?;
                let shards = zk::set_sql_shards(&client, &layout, &shards).await?;
                // Printed without the passwords the URLs may hold.
                println!("{}: {}", layout.sql_shards(), serde_json::to_string(&zk::redacted(&shards))?);
            }
            ClusterCommand::Route { zk: z, account } => {
                // Only an account id can be an account's key: anything else is a typo.
                crate::core::AccountId::new(&account).map_err(|e| anyhow::anyhow!("account {account:?}: {e}"))?;
                let layout = Layout::new(&z.zk_root)?;
                let client = zk::connect(&z.zk).await?;
                let map = zk::get_partition_map(&client, &layout)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no partition map at {}: run `wallet cluster init`", layout.partitions()))?;
                let (partition, node) = map.route(&account);
                println!(
                    "account {account}: xxh3_64 {:#018x}, partition {partition} of {}, node {node}, map version {}",
                    super::hash::account_hash(&account),
                    map.nodes.len(),
                    map.version
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_replicate(args: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let args = match args.command {
        ReplicateCommand::Redis(args) => args,
        ReplicateCommand::Sql(args) => return super::sql::run_replicate(args),
    };
    let options = super::redis::ReplicateOptions {
        zk: args.zk.zk,
        zk_root: args.zk.zk_root,
        source: args.source,
        batch_events: args.batch_events as usize,
        once: args.once,
        metrics: None,
        rebuild: args.rebuild,
        once_wait: std::time::Duration::from_secs(args.once_wait_s),
        idle_check: std::time::Duration::from_millis(args.idle_check_ms),
    };
    let report = runtime()?.block_on(super::redis::run(&options))?;
    if report.events == 0 {
        println!(
            "replicated 0 events: the {} Redis nodes were at sequence {} already",
            report.nodes, report.last_seq
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "replicated {} events (sequences {}..{}) into {} Redis nodes in {:.3} s: {:.0} events/s, lag at most {} ms",
        report.events,
        report.first_seq,
        report.last_seq,
        report.nodes,
        report.elapsed.as_secs_f64(),
        report.events_per_second(),
        report.lag_max.as_millis()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_reconcile(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let args = match args.command {
        ReconcileCommand::Redis(args) => args,
        ReconcileCommand::Sql(args) => return super::sql::run_reconcile(args),
    };
    let options = super::reconcile::ReconcileOptions {
        zk: args.zk.zk,
        zk_root: args.zk.zk_root,
        data_dir: args.data_dir,
        max_printed: args.max_printed,
    };
    Ok(super::reconcile_exit_code(runtime().and_then(|rt| {
        rt.block_on(super::reconcile::run(&options))
    })))
}
