//! cargo-fuzz target `journal_record`: see `checks::journal_bytes` for what it checks.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the shared checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::journal_bytes(data));
