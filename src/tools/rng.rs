//! Small deterministic generators for load tools (never used by the ledger).

pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A Zipf-like (exponent 1) rank in `0..n` from a uniform `u` in [0, 1): the continuous
/// inverse of the harmonic distribution, `floor((n + 1)^u) - 1`. Rank 0 is the hottest. Ranks
/// are then spread over the key space by a fixed odd multiplier so hot accounts are not
/// neighbours in memory.
pub fn zipf_rank(u: f64, n: u64) -> u64 {
    let rank = ((n as f64 + 1.0).powf(u).floor() as u64)
        .saturating_sub(1)
        .min(n - 1);
    rank.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) % n
}
