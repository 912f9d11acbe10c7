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

pub struct IndexTable {
    buckets: Vec<u64>,
    mask: usize,
    /// Entries in the table, including those still only in `old`.
    len: usize,
    /// The buckets before the last growth, while their entries are copied into `buckets` a few
    /// at a time (`MIGRATE_STEP` per insertion). Growing used to copy all of them at once: at
    /// tens of millions of remembered ids that stopped the engine thread for seconds.
    old: Option<OldBuckets>,
    /// The bucket array for the next growth, if the owner prepared one (`give_spare`).
    spare: Option<Vec<u64>>,
    /// An owner that prepares arrays also takes the old ones back when a growth is done
    /// (`take_retired`), to free them off its thread; other owners' are freed at once.
    retired: Option<Vec<u64>>,
    hands_back: bool,
}

impl Clone for IndexTable {
    fn clone(&self) -> IndexTable {
        IndexTable {
            buckets: self.buckets.clone(),
            mask: self.mask,
            len: self.len,
            old: self.old.clone(),
            // A prepared array is memory for this table's next growth, not state.
            spare: None,
            retired: None,
            hands_back: false,
        }
    }
}

/// A zeroed bucket array made ahead of a growth, typically on another thread that also has
/// its pages populated, so that the growth does not make the owner's thread wait for the
/// kernel to zero hundreds of MiB on first touch. See `IndexTable::spare_wanted`.
pub struct SpareBuckets(Vec<u64>);

/// A used bucket array that a growth left behind, only to be freed (see
/// `IndexTable::take_retired`).
pub struct RetiredBuckets(Vec<u64>);

impl RetiredBuckets {
    pub fn buckets(&self) -> usize {
        self.0.len()
    }
}

impl SpareBuckets {
    pub fn new(buckets: usize) -> SpareBuckets {
        SpareBuckets(vec![EMPTY; buckets])
    }

    pub fn buckets(&self) -> usize {
        self.0.len()
    }

    /// Address and length in bytes.
    pub fn memory(&self) -> (usize, usize) {
        (self.0.as_ptr() as usize, size_of_val(self.0.as_slice()))
    }
}

#[derive(Clone)]
struct OldBuckets {
    buckets: Vec<u64>,
    mask: usize,
    /// Buckets before this one have been copied.
    copied: usize,
}

/// Old buckets copied per insertion while a growth is in progress. The growth starts when the
/// table is 7/8 full and doubles it, so the next one is at least 7/8 of the old size further
/// away in insertions: copying 8 per insertion finishes long before.
const MIGRATE_STEP: usize = 8;

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

/// The key `hash_id` uses where no other is given (tests, tools). A server draws its own at
/// random (`engine::random_hash_key`).
pub const DEFAULT_ID_HASH_KEY: u64 = 0x243F_6A88_85A3_08D3;

/// The hash of a transaction id for an `IndexTable`, under `key`. Ids are caller-chosen, so
/// they are mixed rather than trusting their bits to be random: the splitmix64 finalizer (a
/// bijection on 64 bits) over each half, a few cycles instead of a general-purpose hash call
/// on the engine thread. Distinct halves never cancel trivially: the high half goes through
/// its own bijection before it meets the low half.
///
/// The key is what keeps callers from choosing where their ids land. Under a known key anyone
/// can compute, for every high half, the low half that cancels it (`lo = mix64(hi ^ key)`
/// hashes to `mix64(0)`): 2^64 ids, all with one hash, all in one probe run, every insertion
/// and lookup among them a scan of the whole run. Under a key the caller does not know, the
/// high half's mix is unknown, and an id's place is as good as random. The key changes where
/// an id is stored, never an outcome or the state hash.
#[inline]
pub fn hash_id(id: u128, key: u64) -> u64 {
    mix64((id as u64) ^ mix64((id >> 64) as u64 ^ key))
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
            old: None,
            spare: None,
            retired: None,
            hands_back: false,
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
        (self.buckets.capacity()
            + self.old.as_ref().map_or(0, |old| old.buckets.capacity())
            + self.spare.as_ref().map_or(0, Vec::capacity)
            + self.retired.as_ref().map_or(0, Vec::capacity))
            * size_of::<u64>()
    }

    /// The size (in buckets) of the next growth's array, once the table is 3/4 full and no
    /// array is prepared or being copied into: the owner may then prepare one
    /// (`SpareBuckets::new`, populated on another thread) and hand it in with `give_spare`.
    pub fn spare_wanted(&self) -> Option<usize> {
        (self.spare.is_none() && self.old.is_none() && self.len * 4 >= self.buckets.len() * 3)
            .then_some(self.buckets.len() * 2)
    }

    /// Keeps `spare` for the next growth; an array of another size is handed back.
    pub fn give_spare(&mut self, spare: SpareBuckets) -> Result<(), SpareBuckets> {
        if self.spare.is_some() || spare.buckets() != self.buckets.len() * 2 {
            return Err(spare);
        }
        self.spare = Some(spare.0);
        self.hands_back = true;
        Ok(())
    }

    /// The old bucket array of a finished growth, once the owner has given a spare: for the
    /// owner to free on another thread (freeing hundreds of MiB takes the kernel a while).
    /// Its own type, not a `SpareBuckets`: it still holds entries, and `give_spare` must
    /// only ever get zeroed arrays.
    pub fn take_retired(&mut self) -> Option<RetiredBuckets> {
        self.retired.take().map(RetiredBuckets)
    }

    /// Whether a growth is still copying old buckets (for tests).
    pub fn growing(&self) -> bool {
        self.old.is_some()
    }

    /// Buckets in use in the current array (for tests: once no growth is copying, exactly
    /// `len`, or an entry is stored twice or lost).
    pub fn occupied(&self) -> usize {
        self.buckets.iter().filter(|&&b| b != EMPTY).count()
    }

    #[inline]
    fn start(&self, tag: u32) -> usize {
        start(tag, self.mask)
    }

    /// Hints the CPU to load the bucket where a lookup of `hash` starts. No effect on results.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        let tag = tag_of(hash);
        prefetch(&self.buckets[self.start(tag)]);
        if let Some(old) = &self.old {
            prefetch(&old.buckets[start(tag, old.mask)]);
        }
    }

    /// Finds the index whose key `is_key` accepts, among entries with this hash.
    #[inline]
    pub fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let tag = tag_of(hash);
        if let Ok(found) = probe(&self.buckets, self.mask, tag, &mut is_key) {
            return Some(found);
        }
        // During a growth an entry not copied yet is only in the old buckets.
        let old = self.old.as_ref()?;
        probe(&old.buckets, old.mask, tag, &mut is_key).ok()
    }

    /// Inserts `index` under `hash` unless `is_key` accepts an entry already there, in which
    /// case that entry's index is returned and nothing changes. One probe sequence does both.
    pub fn insert_unique(
        &mut self,
        hash: u64,
        index: u32,
        mut is_key: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        check_index(index);
        self.before_insert();
        let tag = tag_of(hash);
        let at = match probe(&self.buckets, self.mask, tag, &mut is_key) {
            Ok(found) => return Some(found),
            Err(empty) => empty,
        };
        if let Some(old) = &self.old
            && let Ok(found) = probe(&old.buckets, old.mask, tag, &mut is_key)
        {
            return Some(found);
        }
        // `at` is still the first empty bucket of the probe: nothing was placed since.
        self.buckets[at] = !((u64::from(tag) << 32) | u64::from(index));
        self.len += 1;
        None
    }

    /// Inserts `index` under `hash`. The caller guarantees the key is not present.
    pub fn insert(&mut self, hash: u64, index: u32) {
        check_index(index);
        self.before_insert();
        let tag = tag_of(hash);
        self.place((u64::from(tag) << 32) | u64::from(index));
        self.len += 1;
    }

    /// Copies a few old buckets if a growth is in progress, and starts a growth if one more
    /// entry would not fit.
    #[inline]
    fn before_insert(&mut self) {
        if self.old.is_some() {
            self.migrate(MIGRATE_STEP);
        }
        if (self.len + 1) * MAX_LOAD_DENOMINATOR > self.buckets.len() * MAX_LOAD_NUMERATOR {
            self.grow();
        }
    }

    /// Copies up to `count` old buckets' entries; drops the old buckets when all are copied.
    fn migrate(&mut self, count: usize) {
        let Some(mut old) = self.old.take() else {
            return;
        };
        // Saturating: `reserve` and `grow` pass `usize::MAX` for "all the rest". A wrapping
        // sum once made that copy nothing (in release builds) and `grow` then dropped the old
        // buckets with entries still in them: the views lost outcomes after a restart.
        let end = old.copied.saturating_add(count).min(old.buckets.len());
        for i in old.copied..end {
            let stored = old.buckets[i];
            if stored != EMPTY {
                self.place(!stored);
            }
        }
        old.copied = end;
        if end < old.buckets.len() {
            self.old = Some(old);
        } else if self.hands_back {
            self.retired = Some(old.buckets);
        }
    }

    fn place(&mut self, entry: u64) {
        let mut at = self.start((entry >> 32) as u32);
        while self.buckets[at] != EMPTY {
            at = (at + 1) & self.mask;
        }
        self.buckets[at] = !entry;
    }

    /// Grows now, if needed, so that `additional` more entries fit without growing later
    /// (every entry copied before this returns).
    pub fn reserve(&mut self, additional: usize) {
        self.migrate(usize::MAX);
        while (self.len + additional) * MAX_LOAD_DENOMINATOR
            > self.buckets.len() * MAX_LOAD_NUMERATOR
        {
            self.grow();
            self.migrate(usize::MAX);
        }
    }

    /// Doubles the buckets; the old ones are copied over by later insertions (`migrate`).
    fn grow(&mut self) {
        // A growth still in progress finishes first (with `MIGRATE_STEP` copies per insertion
        // none is by the time the table is full again; this keeps it so whatever the step).
        self.migrate(usize::MAX);
        let size = self.buckets.len() * 2;
        let doubled = match self.spare.take() {
            // Zeroed by construction (`SpareBuckets::new`) and never written since.
            Some(spare) if spare.len() == size => spare,
            _ => vec![EMPTY; size],
        };
        let buckets = std::mem::replace(&mut self.buckets, doubled);
        let mask = std::mem::replace(&mut self.mask, self.buckets.len() - 1);
        self.old = Some(OldBuckets {
            buckets,
            mask,
            copied: 0,
        });
    }
}

#[inline]
fn start(tag: u32, mask: usize) -> usize {
    // Spread the tag over the buckets with a multiplicative mix; the top bits of the product
    // are the well-mixed ones.
    (u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize & mask
}

/// Entries are stored inverted, so that a zeroed array is empty; index `u32::MAX` (with tag
/// `u32::MAX`) would then read as an empty bucket. The owners' indexes are counts of what they
/// store, so this stops at 2^32 - 1 entries, loudly rather than by losing one.
#[inline]
fn check_index(index: u32) {
    assert!(
        index < u32::MAX,
        "an index table holds at most 2^32 - 1 entries"
    );
}

/// Linear probing for `tag` from its start: the index `is_key` accepts, or else the first
/// empty bucket (where the key would go).
#[inline]
fn probe(
    buckets: &[u64],
    mask: usize,
    tag: u32,
    is_key: &mut impl FnMut(u32) -> bool,
) -> Result<u32, usize> {
    let mut at = start(tag, mask);
    loop {
        let stored = buckets[at];
        if stored == EMPTY {
            return Err(at);
        }
        let entry = !stored;
        if (entry >> 32) as u32 == tag && is_key(entry as u32) {
            return Ok(entry as u32);
        }
        at = (at + 1) & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::{IndexTable, MIGRATE_STEP, SpareBuckets};

    /// Well-mixed hashes of the keys 0..n.
    fn hashes(n: u64) -> Vec<u64> {
        (0..n)
            .map(|k| xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes()))
            .collect()
    }

    /// Ids made to collide under a known key (`lo = mix64(hi ^ key)`: every one hashes to
    /// `mix64(0)`), inserted into a table keyed with `key`: how many full comparisons the
    /// insertions make (`is_key` runs only where the stored tag equals the probed one).
    fn comparisons_for_crafted_ids(key: u64) -> u64 {
        let crafted_for = super::DEFAULT_ID_HASH_KEY;
        let mut table = IndexTable::with_capacity(2_000);
        let mut ids = Vec::new();
        let mut comparisons = 0u64;
        for hi in 1..=2_000u64 {
            let id = (u128::from(hi) << 64) | u128::from(super::mix64(hi ^ crafted_for));
            let index = ids.len() as u32;
            let existing = table.insert_unique(super::hash_id(id, key), index, |i| {
                comparisons += 1;
                ids[i as usize] == id
            });
            assert_eq!(existing, None);
            ids.push(id);
        }
        comparisons
    }

    #[test]
    fn ids_crafted_against_one_key_do_not_collide_under_another() {
        // Under the key they were made for, the 2,000 ids share one hash: every insertion
        // compares against every id before it.
        assert_eq!(
            comparisons_for_crafted_ids(super::DEFAULT_ID_HASH_KEY),
            2_000 * 1_999 / 2
        );
        // Under another key (a server draws its own at random), they spread like any ids.
        assert!(comparisons_for_crafted_ids(0x0123_4567_89AB_CDEF) < 20);
        let (a, b) = (
            crate::engine::ledger_config(),
            crate::engine::ledger_config(),
        );
        assert_ne!(
            a.id_hash_key, b.id_hash_key,
            "each server draws its own key"
        );
        assert_ne!(a.id_hash_key, super::DEFAULT_ID_HASH_KEY);
    }

    #[test]
    fn finds_what_was_inserted_across_growth_and_collisions() {
        let mut table = IndexTable::with_capacity(1);
        let keys = hashes(10_000);
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

    #[test]
    fn a_growth_copies_a_few_buckets_per_insertion_and_every_entry_stays_found() {
        let mut table = IndexTable::with_capacity(1000);
        let first_buckets = table.bucket_count();
        let keys = hashes(40_000);
        let mut growing_for = 0;
        let mut growths = 0;
        for (i, hash) in keys.iter().enumerate() {
            let buckets = table.bucket_count();
            assert_eq!(
                table.insert_unique(*hash, i as u32, |j| j as usize == i),
                None
            );
            if table.bucket_count() != buckets {
                growths += 1;
                // The old buckets are not all copied at once.
                assert!(
                    table.growing(),
                    "growth {growths} copied everything at once"
                );
                growing_for = 0;
            }
            if table.growing() {
                growing_for += 1;
                // While growing, every earlier entry is found, wherever it is, and a repeat of
                // one is refused with the original's index.
                for k in (0..=i).step_by(97) {
                    assert_eq!(table.find(keys[k], |j| j as usize == k), Some(k as u32));
                    assert_eq!(
                        table.insert_unique(keys[k], 99_999, |j| j as usize == k),
                        Some(k as u32)
                    );
                }
                // A growth ends within old buckets / MIGRATE_STEP insertions (the refused
                // repeats above copy buckets too).
                assert!(growing_for <= table.bucket_count() / 2 / MIGRATE_STEP + 1);
            }
            assert_eq!(table.len(), i + 1);
        }
        assert!(
            growths >= 4,
            "{growths} growths from {first_buckets} buckets"
        );
        for (i, hash) in keys.iter().enumerate() {
            assert_eq!(table.find(*hash, |j| j as usize == i), Some(i as u32));
        }
        // `reserve` completes any growth at once.
        table.reserve(100_000);
        assert!(!table.growing());
        assert!(table.fits(140_000));
        for (i, hash) in keys.iter().enumerate() {
            assert_eq!(table.find(*hash, |j| j as usize == i), Some(i as u32));
        }
    }

    /// `reserve` in the middle of a growth (some old buckets copied, not all) finishes it and
    /// loses nothing, whether or not it grows again. (Its "copy all the rest" once wrapped
    /// around in release builds, and the next growth dropped the uncopied entries.)
    #[test]
    fn reserve_during_a_growth_keeps_every_entry_once() {
        for additional in [1, 10_000] {
            let mut table = IndexTable::with_capacity(1000);
            let keys = hashes(20_000);
            let mut i = 0;
            // Into a growth, and a few insertions on, so that some old buckets are copied.
            while !table.growing() {
                table.insert(keys[i], i as u32);
                i += 1;
            }
            for _ in 0..3 {
                table.insert(keys[i], i as u32);
                i += 1;
            }
            let copied = table.old.as_ref().map(|old| old.copied);
            assert!(copied.is_some_and(|c| c > 0 && c < table.bucket_count() / 2));
            let before = table.bucket_count();
            table.reserve(additional);
            assert!(!table.growing(), "reserve finishes the growth");
            assert_eq!(table.bucket_count() > before, additional > 1);
            assert_eq!(table.len(), i);
            let occupied = table.buckets.iter().filter(|&&b| b != super::EMPTY).count();
            assert_eq!(occupied, i, "each entry is in the buckets exactly once");
            for (k, hash) in keys[..i].iter().enumerate() {
                assert_eq!(table.find(*hash, |j| j as usize == k), Some(k as u32));
            }
        }
    }

    #[test]
    fn a_growth_uses_the_array_handed_in_ahead() {
        let mut table = IndexTable::with_capacity(100);
        let buckets = table.bucket_count();
        let keys = hashes(10_000);
        let mut i = 0;
        while table.spare_wanted().is_none() {
            table.insert(keys[i], i as u32);
            i += 1;
        }
        // Wanted from 3/4 full on, at twice the size.
        assert!(i * 4 >= buckets * 3 && (i - 1) * 4 < buckets * 3);
        assert_eq!(table.spare_wanted(), Some(buckets * 2));
        let wrong = table.give_spare(SpareBuckets::new(buckets * 4));
        assert_eq!(wrong.map_err(|s| s.buckets()), Err(buckets * 4));
        let spare = SpareBuckets::new(buckets * 2);
        let address = spare.memory().0;
        assert!(table.give_spare(spare).is_ok());
        assert_eq!(table.spare_wanted(), None, "one is enough");
        assert_eq!(
            table.clone().spare_wanted(),
            Some(buckets * 2),
            "a clone has none"
        );
        while table.bucket_count() == buckets {
            table.insert(keys[i], i as u32);
            i += 1;
        }
        assert_eq!(
            table.bucket_memory().0,
            address,
            "the growth took the given array"
        );
        // When the growth is done, the old array is handed back rather than freed here.
        assert!(table.take_retired().is_none());
        while table.growing() {
            table.insert(keys[i], i as u32);
            i += 1;
        }
        let retired = table.take_retired().expect("the old array");
        assert_eq!(retired.buckets(), buckets);
        assert!(table.take_retired().is_none());
        for (k, hash) in keys[..i].iter().enumerate() {
            assert_eq!(table.find(*hash, |j| j as usize == k), Some(k as u32));
        }
    }
}
