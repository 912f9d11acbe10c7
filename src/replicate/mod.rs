//! Replicators: keep external stores equal to the engine's state, fed by the event stream, each
//! from its own saved position (CQRS read side), and the ZooKeeper layout they share.
//!
//! - [`zk`]: the layout in ZooKeeper (partition map, SQL shard list, engine leader, front ends).
//! - [`hash`]: the routing formula, `xxh3_64(account id) % partitions`.
//! - [`source`]: events from journal files (tailed in place) or a running engine's HTTP stream.
//! - [`redis`]: `wallet replicate redis`, exactly-once per node, with live map changes.
//! - [`reconcile`]: `wallet reconcile redis`, Redis against a replay of the journal.
//! - [`cli`]: the `cluster`, `replicate` and `reconcile` subcommands.
//!
//! Architecture invariant: replicators only read the journal (or the HTTP stream) and never
//! touch the engine's state; every external write carries the sequence it reflects, in the same
//! atomic step as the data.

pub mod cli;
pub mod hash;
pub mod reconcile;
pub mod redis;
pub mod source;
pub mod sql;
pub mod zk;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Exit status of a process stopped by a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 3;

/// Crash-test hook: with `WALLET_FAILPOINT=<name>` (or `<name>:<n>`, the n-th time, default 1),
/// the process exits with status 3 the moment it reaches the failpoint `name`, as abruptly as a
/// kill: no destructor or flush runs. Without the variable this is one relaxed load.
///
/// One failpoint is not an exit: `engine-panic:<sequence>` makes `serve`'s engine thread panic
/// as it executes the command holding that sequence (`EngineConfig::panic_at_seq`), to test
/// that a panic halts the engine (see `src/engine/mod.rs`). `views-past-delay:<ms>` holds
/// `serve`'s read views back that long before they load the journal's past, and
/// `views-past-panic` panics in the thread that loads it.
///
/// Failpoints of the Redis replicator: `redis-after-node-1` (one node applied the batch, the
/// others not yet; while armed, nodes are written one after the other), `redis-after-batch`, `redis-write-chunk` (inside a node rebuild or a key
/// move), `redis-migrate-after-copy`, `redis-migrate-after-switch-1`.
pub fn failpoint(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if let Some((point, nth)) = failpoint_spec()
        && point == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 >= *nth
    {
        eprintln!("failpoint {name} reached: exiting with status {FAILPOINT_EXIT_CODE}");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}

/// `failpoint`, stopping the process (SIGSTOP) instead of exiting: a replicator frozen half-way
/// (a paused VM, a debugger), which its successor must not wait on for ever.
pub fn failpoint_stop(name: &str) {
    if let Some((point, _)) = failpoint_spec()
        && point == name
    {
        eprintln!("failpoint {name} reached: stopping");
        // SAFETY: raise takes a signal number and touches no memory of ours.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}

/// `failpoint`, panicking instead of exiting, and only the n-th time (a caller that recovers
/// from the panic goes on). `redis-panic` is in the Redis replicator's loop: `serve
/// --replicate-redis` must restart a replicator that panicked.
pub fn failpoint_panic(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if let Some((point, nth)) = failpoint_spec()
        && point == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth
    {
        panic!("failpoint {name} reached");
    }
}

fn failpoint_spec() -> &'static Option<(String, u64)> {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = std::env::var("WALLET_FAILPOINT").ok()?;
        let (point, nth) = match text.split_once(':') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (text, 1),
        };
        Some((point, nth))
    })
}

/// The number given with `name` in `WALLET_FAILPOINT` (`<name>:<n>`, 1 without one), if it
/// names `name`: for failpoints that take an argument, such as `engine-panic:<sequence>`.
pub fn failpoint_value(name: &str) -> Option<u64> {
    failpoint_spec()
        .as_ref()
        .filter(|(point, _)| point == name)
        .map(|(_, n)| *n)
}

/// Whether `WALLET_FAILPOINT` names `name` (code paths may then make the crash deterministic).
pub fn failpoint_armed(name: &str) -> bool {
    failpoint_spec()
        .as_ref()
        .is_some_and(|(point, _)| point == name)
}

/// Counts the differences a reconciliation finds and prints the first `max_printed`.
pub(crate) struct Differences {
    pub(crate) count: u64,
    pub(crate) max_printed: usize,
}

impl Differences {
    pub(crate) fn report(&mut self, text: String) {
        self.count += 1;
        if self.count as usize <= self.max_printed {
            println!("difference: {text}");
        } else if self.count as usize == self.max_printed + 1 {
            println!("difference: ... (further differences are counted, not printed)");
        }
    }
}

/// `wallet reconcile`'s exit code: 0 when the store matches the journal, 1 when it differs
/// (the differences are printed), 2 when the comparison could not be made (the error is
/// printed): a monitor must tell "the copy is wrong" from "the check did not run".
pub fn reconcile_exit_code(differences: anyhow::Result<u64>) -> std::process::ExitCode {
    match differences {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
