//! An open-addressing index table: each bucket is one `u64` holding a 32-bit hash tag and a
//! 32-bit index into the owner's dense storage. Lookups compare tags first and touch the owner's
//! storage only on a tag match, so a miss costs one cache line, and growing needs no rehashing
//! (the bucket is derived from the stored tag).

/// An empty bucket. Entries are stored inverted (`!entry`), so that an empty bucket is 0: a new
/// table is then zeroed memory straight from the allocator (fresh pages, faulted in as they
/// are used or populated ahead by another thread) instead of a memset on the caller's thread.
/// The entry `u64::MAX` (tag and index all ones) is never stored: index `u32::MAX` is out of
/// every owner's range.
const EMPTY: u64 = 0;
/// Grow when more than 7/8 of the buckets are used (linear probing with a 32-bit tag filter
/// stays short at that load because probes compare tags, not keys).
const MAX_LOAD_NUMERATOR: usize = 7;
const MAX_LOAD_DENOMINATOR: usize = 8;

#[derive(Clone)]
pub struct IndexTable {
    buckets: Vec<u64>,
    mask: usize,
    len: usize,
}

/// Asks the CPU to bring the cache line holding `value` closer. A hint only: it never faults
/// and never changes a result.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: prefetch is a hint that never faults; the pointer comes from a reference.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// `count` items' worth of storage blocks of `block` items each, allocated whole and not
/// touched: an owner that fills them in order never moves an item (a full block is followed
/// by the next, not grown).
pub fn reserve_blocks<T>(count: usize, block: usize) -> Vec<Vec<T>> {
    (0..count.div_ceil(block))
        .map(|_| Vec::with_capacity(block))
        .collect()
}

/// The address and length of each block's unfilled part, in the order the blocks fill (for a
/// thread that populates them ahead of the owner).
pub fn spare_ranges<T>(blocks: &[Vec<T>]) -> impl Iterator<Item = (usize, usize)> + '_ {
    blocks
        .iter()
        .filter(|block| block.len() < block.capacity())
        .map(|block| {
            let start = block.as_ptr() as usize + block.len() * size_of::<T>();
            (start, (block.capacity() - block.len()) * size_of::<T>())
        })
}

/// The hash of a transaction id for an `IndexTable`. Ids are caller-chosen, so they are mixed
/// rather than trusting their bits to be random: the splitmix64 finalizer (a bijection on 64
/// bits) over each half, a few cycles instead of a general-purpose hash call on the engine
/// thread. Distinct halves never cancel trivially: the high half goes through its own
/// bijection before it meets the low half.
#[inline]
pub fn hash_id(id: u128) -> u64 {
    mix64((id as u64) ^ mix64((id >> 64) as u64 ^ 0x243F_6A88_85A3_08D3))
}

/// splitmix64's finalizer: a bijection on 64 bits with good avalanche.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[inline]
fn tag_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

impl Default for IndexTable {
    fn default() -> IndexTable {
        IndexTable::with_capacity(0)
    }
}

impl IndexTable {
    pub fn with_capacity(entries: usize) -> IndexTable {
        let wanted = (entries * MAX_LOAD_DENOMINATOR)
            .div_ceil(MAX_LOAD_NUMERATOR)
            .max(16);
        let buckets = wanted.next_power_of_two();
        IndexTable {
            buckets: vec![EMPTY; buckets],
            mask: buckets - 1,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the table holds `entries` entries without growing.
    pub fn fits(&self, entries: usize) -> bool {
        entries * MAX_LOAD_DENOMINATOR <= self.buckets.len() * MAX_LOAD_NUMERATOR
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// The address and length of the bucket array (for a caller that populates its pages
    /// ahead of use; see `Ledger::id_table_memory`).
    pub fn bucket_memory(&self) -> (usize, usize) {
        (
            self.buckets.as_ptr() as usize,
            std::mem::size_of_val(self.buckets.as_slice()),
        )
    }

    pub fn allocated_bytes(&self) -> usize {
        self.buckets.capacity() * size_of::<u64>()
    }

    #[inline]
    fn start(&self, tag: u32) -> usize {
        // Spread the tag over the buckets with a multiplicative mix; the top bits of the product
        // are the well-mixed ones.
        (u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize & self.mask
    }

    /// Hints the CPU to load the bucket where a lookup of `hash` starts. No effect on results.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        prefetch(&self.buckets[self.start(tag_of(hash))]);
    }

    /// Finds the index whose key `is_key` accepts, among entries with this hash.
    #[inline]
    pub fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let tag = tag_of(hash);
        let mut at = self.start(tag);
        loop {
            let stored = self.buckets[at];
            if stored == EMPTY {
                return None;
            }
            let entry = !stored;
            if (entry >> 32) as u32 == tag && is_key(entry as u32) {
                return Some(entry as u32);
            }
            at = (at + 1) & self.mask;
        }
    }

    /// Inserts `index` under `hash` unless `is_key` accepts an entry already there, in which
    /// case that entry's index is returned and nothing changes. One probe sequence does both.
    pub fn insert_unique(
        &mut self,
        hash: u64,
        index: u32,
        mut is_key: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        if (self.len + 1) * MAX_LOAD_DENOMINATOR > self.buckets.len() * MAX_LOAD_NUMERATOR {
            self.grow();
        }
        let tag = tag_of(hash);
        let mut at = self.start(tag);
        loop {
            let stored = self.buckets[at];
            if stored == EMPTY {
                self.buckets[at] = !((u64::from(tag) << 32) | u64::from(index));
                self.len += 1;
                return None;
            }
            let entry = !stored;
            if (entry >> 32) as u32 == tag && is_key(entry as u32) {
                return Some(entry as u32);
            }
            at = (at + 1) & self.mask;
        }
    }

    /// Inserts `index` under `hash`. The caller guarantees the key is not present.
    pub fn insert(&mut self, hash: u64, index: u32) {
        if (self.len + 1) * MAX_LOAD_DENOMINATOR > self.buckets.len() * MAX_LOAD_NUMERATOR {
            self.grow();
        }
        let tag = tag_of(hash);
        self.place((u64::from(tag) << 32) | u64::from(index));
        self.len += 1;
    }

    fn place(&mut self, entry: u64) {
        let mut at = self.start((entry >> 32) as u32);
        while self.buckets[at] != EMPTY {
            at = (at + 1) & self.mask;
        }
        self.buckets[at] = !entry;
    }

    /// Grows now, if needed, so that `additional` more entries fit without growing later.
    pub fn reserve(&mut self, additional: usize) {
        while (self.len + additional) * MAX_LOAD_DENOMINATOR
            > self.buckets.len() * MAX_LOAD_NUMERATOR
        {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let doubled = vec![EMPTY; self.buckets.len() * 2];
        let old = std::mem::replace(&mut self.buckets, doubled);
        self.mask = self.buckets.len() - 1;
        for stored in old.into_iter().filter(|e| *e != EMPTY) {
            self.place(!stored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IndexTable;

    #[test]
    fn finds_what_was_inserted_across_growth_and_collisions() {
        let mut table = IndexTable::with_capacity(1);
        let keys: Vec<u64> = (0..10_000u64)
            .map(|k| xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes()))
            .collect();
        for (i, hash) in keys.iter().enumerate() {
            assert_eq!(table.find(*hash, |j| j as usize == i), None);
            table.insert(*hash, i as u32);
        }
        // Same tag, different keys: the key check decides.
        table.insert(keys[0], 20_000);
        for (i, hash) in keys.iter().enumerate() {
            assert_eq!(table.find(*hash, |j| j as usize == i), Some(i as u32));
        }
        assert_eq!(table.find(keys[0], |j| j == 20_000), Some(20_000));
        assert_eq!(table.len(), 10_001);
        // insert_unique: finds an existing key instead of inserting it twice, inserts a new one.
        assert_eq!(table.insert_unique(keys[5], 30_000, |j| j == 5), Some(5));
        assert_eq!(table.len(), 10_001);
        assert_eq!(table.insert_unique(keys[5], 30_000, |j| j == 30_000), None);
        assert_eq!(table.find(keys[5], |j| j == 30_000), Some(30_000));
        assert_eq!(table.len(), 10_002);
        assert!(table.bucket_count() * 7 >= table.len() * 8);
    }
}
