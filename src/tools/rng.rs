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
/// are then spread over the key space (`spread`) so hot accounts are not neighbours in memory.
pub fn zipf_rank(u: f64, n: u64) -> u64 {
    let rank = ((n as f64 + 1.0).powf(u).floor() as u64)
        .saturating_sub(1)
        .min(n - 1);
    spread(rank, n)
}

/// A permutation of `0..n` for every `n` up to 2^32: multiplication modulo `n` by a prime
/// larger than any such `n`, so coprime with it (each rank keeps its own account, and the
/// distribution keeps its shape).
pub fn spread(rank: u64, n: u64) -> u64 {
    const PRIME: u128 = 4_294_967_311; // the smallest prime above 2^32
    ((u128::from(rank) * PRIME) % u128::from(n)) as u64
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_is_a_permutation() {
        for n in [1u64, 2, 10, 1000, 1024, 65_536, 999_983, 1_000_000] {
            let mut seen = vec![false; n as usize];
            for rank in 0..n {
                let to = spread(rank, n) as usize;
                assert!(
                    !seen[to],
                    "n {n}: rank {rank} lands on a taken account {to}"
                );
                seen[to] = true;
            }
        }
    }
}
