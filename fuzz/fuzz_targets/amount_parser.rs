//! cargo-fuzz target `amount_parser`: see `checks::amount_bytes` for what it checks.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the shared checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::amount_bytes(data));
