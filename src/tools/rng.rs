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

/// Zipf-like (exponent 1) picks in `0..n`: the rank is the continuous inverse of the harmonic
/// distribution, `floor((n + 1)^u) - 1` for a uniform `u` in [0, 1) (rank 0 the hottest), and
/// ranks are spread over the key space by a permutation so that hot accounts are not
/// neighbours in memory.
#[derive(Debug, Clone, Copy)]
pub struct Zipf {
    n: u64,
    /// Coprime with `n` and near `0.618 n`: consecutive ranks land far apart, and each rank
    /// keeps its own key (multiplication modulo `n` by it is a permutation).
    multiplier: u64,
}

impl Zipf {
    pub fn new(n: u64) -> Zipf {
        let n = n.max(1);
        let mut multiplier = ((n as f64 * 0.618_033_988_75) as u64).max(1);
        while gcd(multiplier, n) != 1 {
            multiplier += 1;
        }
        Zipf { n, multiplier }
    }

    pub fn pick(&self, u: f64) -> u64 {
        let rank = ((self.n as f64 + 1.0).powf(u).floor() as u64)
            .saturating_sub(1)
            .min(self.n - 1);
        self.spread(rank)
    }

    fn spread(&self, rank: u64) -> u64 {
        ((u128::from(rank) * u128::from(self.multiplier)) % u128::from(self.n)) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::Zipf;

    #[test]
    fn spreading_is_a_permutation_that_keeps_neighbouring_ranks_apart() {
        for n in [1u64, 2, 10, 1000, 1024, 65_536, 999_983, 1_000_000] {
            let zipf = Zipf::new(n);
            let mut seen = vec![false; n as usize];
            for rank in 0..n {
                let to = zipf.spread(rank) as usize;
                assert!(!seen[to], "n {n}: rank {rank} lands on a taken key {to}");
                seen[to] = true;
            }
            if n >= 1000 {
                let gap = zipf.spread(1).abs_diff(zipf.spread(0));
                assert!(gap > n / 4, "n {n}: the two hottest keys are {gap} apart");
            }
        }
    }
}
