//! `core::table::IndexTable` against a `HashMap` model, over random sequences of insertions,
//! repeats, lookups, `reserve`, clones and arrays handed in for growths. The table grows
//! incrementally (old buckets copied a few per insertion, both arrays searched meanwhile), so
//! every operation can land in the middle of a growth; a `reserve` there once dropped entries.

use std::collections::HashMap;

use proptest::prelude::*;
use wallet::core::table::{IndexTable, SpareBuckets};

#[derive(Debug, Clone)]
enum Op {
    /// Insert key `k` (a repeat must return the first index and change nothing).
    Insert(u16),
    Find(u16),
    Reserve(u16),
    Clone,
    /// Hand in the array the table asks for, if it asks.
    GiveSpare,
    TakeRetired,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => any::<u16>().prop_map(|k| Op::Insert(k % 4096)),
        4 => any::<u16>().prop_map(|k| Op::Find(k % 4096)),
        1 => any::<u16>().prop_map(|n| Op::Reserve(n % 3000)),
        1 => Just(Op::Clone),
        1 => Just(Op::GiveSpare),
        1 => Just(Op::TakeRetired),
    ]
}

/// Keys' hashes: most are well mixed, but every 8th key shares its hash with key 0 (so tags
/// collide and the key check decides) and keys 16 apart share the low half.
fn hash_of(k: u16) -> u64 {
    if k.is_multiple_of(8) {
        return 0x1234_5678_9abc_def0;
    }
    let mixed = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
    (mixed & 0xffff_ffff_0000_0000) | u64::from(k / 16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_table_agrees_with_a_hash_map(
        capacity in 0usize..64,
        ops in prop::collection::vec(op(), 1..3000),
    ) {
        let mut table = IndexTable::with_capacity(capacity);
        // Index -> key, as an owner's dense storage; and the model key -> index.
        let mut keys: Vec<u16> = Vec::new();
        let mut model: HashMap<u16, u32> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k) => {
                    let index = keys.len() as u32;
                    let existing = {
                        let keys = &keys;
                        table.insert_unique(hash_of(k), index, |j| keys[j as usize] == k)
                    };
                    match model.get(&k) {
                        Some(&first) => prop_assert_eq!(existing, Some(first)),
                        None => {
                            prop_assert_eq!(existing, None);
                            keys.push(k);
                            model.insert(k, index);
                        }
                    }
                }
                Op::Find(k) => {
                    let found = table.find(hash_of(k), |j| keys[j as usize] == k);
                    prop_assert_eq!(found, model.get(&k).copied());
                }
                Op::Reserve(n) => {
                    table.reserve(usize::from(n));
                    prop_assert!(table.fits(model.len() + usize::from(n)));
                }
                Op::Clone => table = table.clone(),
                Op::GiveSpare => {
                    if let Some(buckets) = table.spare_wanted() {
                        prop_assert!(table.give_spare(SpareBuckets::new(buckets)).is_ok());
                    }
                }
                Op::TakeRetired => drop(table.take_retired()),
            }
            prop_assert_eq!(table.len(), model.len());
        }
        for (&k, &index) in &model {
            prop_assert_eq!(table.find(hash_of(k), |j| keys[j as usize] == k), Some(index));
        }
        // Finishing any growth loses nothing either, and stores no entry twice (lookups
        // would still succeed with a copy left behind).
        table.reserve(0);
        prop_assert!(!table.growing());
        for (&k, &index) in &model {
            prop_assert_eq!(table.find(hash_of(k), |j| keys[j as usize] == k), Some(index));
        }
        prop_assert_eq!(table.occupied(), model.len());
    }
}
