//! Keyed rate limits: the per-caller request limit and the per-account velocity limit.
//!
//! Each key keeps one number, its theoretical arrival time (GCRA): `rate` units per second,
//! a burst of up to `rate` at once. Unlike a limiter checked key by key, a charge over several
//! keys (a batch debiting several accounts) is taken all or nothing, and a charge for work that
//! was then not done (the engine was overloaded) is given back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct KeyedLimiter {
    /// Nanoseconds one unit takes to replenish.
    interval_ns: u64,
    /// How far ahead of now a key's arrival time may run: `rate` units.
    burst_ns: u64,
    /// Key -> theoretical arrival time, in nanoseconds since `epoch`. One lock, so that a
    /// charge over several keys is atomic.
    arrivals: Mutex<HashMap<Box<str>, u64>>,
    epoch: Instant,
}

impl KeyedLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn per_second(per_second: u32) -> Option<KeyedLimiter> {
        if per_second == 0 {
            return None;
        }
        let interval_ns = 1_000_000_000 / u64::from(per_second);
        Some(KeyedLimiter {
            interval_ns,
            burst_ns: interval_ns * u64::from(per_second),
            arrivals: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Takes `n` units from `key`, or nothing and how long until they would be there.
    pub fn check(&self, key: &str, n: u32) -> Result<(), Duration> {
        self.check_all(&[(key, n)]).map_err(|(_, wait)| wait)
    }

    /// Takes every charge, or none: on refusal, the index of the first charge that did not fit
    /// and how long until it would. A key may appear more than once.
    pub fn check_all(&self, charges: &[(&str, u32)]) -> Result<(), (usize, Duration)> {
        self.check_all_at(self.now_ns(), charges)
    }

    fn check_all_at(&self, now: u64, charges: &[(&str, u32)]) -> Result<(), (usize, Duration)> {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        // The arrival times before this call, to put back if a later charge is refused.
        let mut before: Vec<(&str, Option<u64>)> = Vec::with_capacity(charges.len());
        for (index, &(key, n)) in charges.iter().enumerate() {
            let previous = arrivals.get(key).copied();
            let start = previous.unwrap_or(0).max(now);
            let next = start.saturating_add(u64::from(n).saturating_mul(self.interval_ns));
            if next - now > self.burst_ns {
                for (key, previous) in before.into_iter().rev() {
                    match previous {
                        Some(at) => {
                            arrivals.insert(key.into(), at);
                        }
                        None => {
                            arrivals.remove(key);
                        }
                    }
                }
                return Err((index, Duration::from_nanos(next - now - self.burst_ns)));
            }
            before.push((key, previous));
            arrivals.insert(key.into(), next);
        }
        Ok(())
    }

    /// Gives back charges taken by `check_all` for work that was then not done.
    pub fn refund(&self, charges: &[(&str, u32)]) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        for &(key, n) in charges {
            if let Some(at) = arrivals.get_mut(key) {
                *at = at.saturating_sub(u64::from(n).saturating_mul(self.interval_ns));
            }
        }
    }

    /// Forgets keys whose allowance is whole again (a key unused for a second), so that the map
    /// holds only the keys active in the last second.
    pub fn retain_recent(&self) {
        let now = self.now_ns();
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        arrivals.retain(|_, at| *at > now);
    }

    pub fn keys(&self) -> usize {
        self.arrivals.lock().map(|a| a.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_of_rate_then_one_per_interval() {
        let limiter = KeyedLimiter::per_second(4).expect("a limit");
        let t = 10 * SECOND;
        for _ in 0..4 {
            assert_eq!(limiter.check_all_at(t, &[("a", 1)]), Ok(()));
        }
        // The fifth in the same instant waits one interval (250 ms).
        assert_eq!(
            limiter.check_all_at(t, &[("a", 1)]),
            Err((0, Duration::from_millis(250)))
        );
        // Other keys are not affected.
        assert_eq!(limiter.check_all_at(t, &[("b", 4)]), Ok(()));
        assert_eq!(limiter.check_all_at(t + SECOND / 4, &[("a", 1)]), Ok(()));
        assert!(limiter.check_all_at(t + SECOND / 4, &[("a", 1)]).is_err());
        assert!(KeyedLimiter::per_second(0).is_none());
    }

    #[test]
    fn a_refused_charge_over_several_keys_takes_nothing() {
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        let t = 5 * SECOND;
        assert_eq!(limiter.check_all_at(t, &[("b", 2)]), Ok(()));
        // `a` fits, `b` does not: the whole charge is refused and `a` keeps its allowance.
        assert_eq!(
            limiter.check_all_at(t, &[("a", 1), ("b", 1)]),
            Err((1, Duration::from_millis(500)))
        );
        assert_eq!(limiter.check_all_at(t, &[("a", 2)]), Ok(()));
        // A key named twice is charged twice.
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        assert!(limiter.check_all_at(t, &[("c", 2), ("c", 1)]).is_err());
        assert_eq!(
            limiter.keys(),
            0,
            "a refused charge leaves no new key behind"
        );
        assert_eq!(limiter.check_all_at(t, &[("c", 1), ("c", 1)]), Ok(()));
    }

    #[test]
    fn a_refund_gives_the_allowance_back() {
        let limiter = KeyedLimiter::per_second(3).expect("a limit");
        let t = 7 * SECOND;
        assert_eq!(limiter.check_all_at(t, &[("a", 3)]), Ok(()));
        assert!(limiter.check_all_at(t, &[("a", 1)]).is_err());
        limiter.refund(&[("a", 2)]);
        assert_eq!(limiter.check_all_at(t, &[("a", 2)]), Ok(()));
        assert!(limiter.check_all_at(t, &[("a", 1)]).is_err());
        // Refunding a key never charged does nothing.
        limiter.refund(&[("z", 5)]);
        assert_eq!(limiter.keys(), 1);
    }
}
