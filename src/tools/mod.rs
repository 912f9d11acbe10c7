//! Glue for the subcommands: bench, replay, snapshot (and later loadgen).

pub mod bench;
pub mod loadgen;
pub mod replay;
pub mod rng;
