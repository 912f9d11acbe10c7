//! The snapshot decoder on hostile bytes.
//!
//! Input layout: the first byte picks a mode; the rest is the snapshot. In mode "fix CRC" (odd
//! first byte) the trailing CRC32C is recomputed first, so that mutations reach the structural
//! checks behind the checksum instead of all failing on it. Checks, besides "no panic": a
//! snapshot that decodes gives a ledger whose own snapshot decodes to the same state hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wallet::core::LedgerConfig;
use wallet::core::codec::{decode_snapshot, encode_snapshot, snapshot_next_seq};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    let _ = snapshot_next_seq(&bytes);
    if let Ok(ledger) = decode_snapshot(&bytes, LedgerConfig::default()) {
        assert_eq!(snapshot_next_seq(&bytes), Some(ledger.next_seq()));
        let again = decode_snapshot(&encode_snapshot(&ledger), LedgerConfig::default()).expect("re-encoded snapshot");
        assert_eq!(again.state_hash(), ledger.state_hash());
        assert_eq!(again.next_seq(), ledger.next_seq());
        assert_eq!(again.account_count(), ledger.account_count());
        assert_eq!(again.transaction_id_count(), ledger.transaction_id_count());
    }
});

