//! The partition formula shared by every service that routes accounts to Redis nodes.
//!
//! `partition = xxh3_64(account_id as UTF-8 bytes, seed 0) % partitions`, and the node is
//! `nodes[partition]` of the partition map in ZooKeeper. Any language with an XXH3 64-bit
//! implementation computes the same routing; the test below pins known values so that the
//! formula can never drift silently.

use xxhash_rust::xxh3::xxh3_64;

/// The 64-bit routing hash of an account id.
pub fn account_hash(account_id: &str) -> u64 {
    xxh3_64(account_id.as_bytes())
}

/// The partition (index into the map's node list) of `account_id` among `partitions`.
///
/// Panics if `partitions` is zero: a map always holds at least one node (checked when it is
/// parsed), so a zero here is a bug.
pub fn partition_of(account_id: &str, partitions: usize) -> usize {
    assert!(partitions > 0, "a partition map has at least one node");
    (account_hash(account_id) % partitions as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_are_pinned() {
        // (account, xxh3_64, partition of 3, partition of 4), computed with the reference C
        // library (libxxhash 0.8.1, XXH3_64bits). Other services test against these.
        let cases: &[(&str, u64, usize, usize)] = &[
            ("alice", 0x4da1_0dd6_1a01_16b0, 0, 0),
            ("bob", 0x1403_c0c4_0f49_b8e5, 0, 1),
            ("acct-00042", 0x29f5_5985_e7da_fad9, 2, 1),
            ("acct-0", 0x9a5e_d88a_e910_fa64, 1, 0),
        ];
        for (account, hash, of3, of4) in cases {
            assert_eq!(
                account_hash(account),
                *hash,
                "hash of {account}: {:#018x}",
                account_hash(account)
            );
            assert_eq!(partition_of(account, 3), *of3, "{account} of 3");
            assert_eq!(partition_of(account, 4), *of4, "{account} of 4");
        }
    }

    #[test]
    fn empty_input_matches_the_xxh3_reference() {
        // XXH3_64bits("", 0) from the reference implementation.
        assert_eq!(account_hash(""), 0x2d06_8005_38d3_94c2);
    }
}
