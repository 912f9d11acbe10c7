//! Keyed rate limits: the per-caller request limit and the per-account velocity limit.
//!
//! Each key keeps one number, its theoretical arrival time (GCRA): `rate` units per second,
//! a burst of up to `rate` at once. Unlike a limiter checked key by key, a charge over several
//! keys (a batch debiting several accounts) is taken all or nothing, and a charge for work that
//! was then not done (the engine was overloaded) is given back, as far as it is still
//! outstanding.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What `check_all` took: for each charge, in order, its key's arrival time right after it
/// (nanoseconds since the limiter's epoch). A refund names it, so that it gives back only what
/// of the charge is still outstanding.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Charged(Vec<u64>);

impl Charged {
    /// The arrival time right after charge `index`.
    pub fn until(&self, index: usize) -> u64 {
        self.0.get(index).copied().unwrap_or(0)
    }
}

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
        self.check_all(&[(key, n)])
            .map(|_| ())
            .map_err(|(_, wait)| wait)
    }

    /// Takes every charge, or none: on refusal, the index of the first charge that did not fit
    /// and how long until it would. A key may appear more than once.
    pub fn check_all(&self, charges: &[(&str, u32)]) -> Result<Charged, (usize, Duration)> {
        self.check_all_at(self.now_ns(), charges)
    }

    fn check_all_at(
        &self,
        now: u64,
        charges: &[(&str, u32)],
    ) -> Result<Charged, (usize, Duration)> {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let mut charged = Vec::with_capacity(charges.len());
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
            charged.push(next);
        }
        Ok(Charged(charged))
    }

    /// Gives back charges taken by `check_all` for work that was then not done: each
    /// `(key, n, until)` is `n` units of one charge whose arrival time after it was `until`
    /// (`Charged::until`), each charge refunded at most once. Only what of it is still
    /// outstanding comes back (`until - now`, at most `n` units): units that came back by
    /// themselves before the refund were spent again since, on work that was done, and taking
    /// them off again let a caller past the limit (a retry answered late as a replay).
    pub fn refund(&self, refunds: &[(&str, u32, u64)]) {
        self.refund_at(self.now_ns(), refunds);
    }

    fn refund_at(&self, now: u64, refunds: &[(&str, u32, u64)]) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        for &(key, n, until) in refunds {
            let give = u64::from(n)
                .saturating_mul(self.interval_ns)
                .min(until.saturating_sub(now));
            if let Some(at) = arrivals.get_mut(key) {
                *at = at.saturating_sub(give);
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
            assert!(limiter.check_all_at(t, &[("a", 1)]).is_ok());
        }
        // The fifth in the same instant waits one interval (250 ms).
        assert_eq!(
            limiter.check_all_at(t, &[("a", 1)]),
            Err((0, Duration::from_millis(250)))
        );
        // Other keys are not affected.
        assert!(limiter.check_all_at(t, &[("b", 4)]).is_ok());
        assert!(limiter.check_all_at(t + SECOND / 4, &[("a", 1)]).is_ok());
        assert!(limiter.check_all_at(t + SECOND / 4, &[("a", 1)]).is_err());
        assert!(KeyedLimiter::per_second(0).is_none());
    }

    #[test]
    fn a_refused_charge_over_several_keys_takes_nothing() {
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        let t = 5 * SECOND;
        assert!(limiter.check_all_at(t, &[("b", 2)]).is_ok());
        // `a` fits, `b` does not: the whole charge is refused and `a` keeps its allowance.
        assert_eq!(
            limiter.check_all_at(t, &[("a", 1), ("b", 1)]),
            Err((1, Duration::from_millis(500)))
        );
        assert!(limiter.check_all_at(t, &[("a", 2)]).is_ok());
        // A key named twice is charged twice.
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        assert!(limiter.check_all_at(t, &[("c", 2), ("c", 1)]).is_err());
        assert_eq!(
            limiter.keys(),
            0,
            "a refused charge leaves no new key behind"
        );
        assert!(limiter.check_all_at(t, &[("c", 1), ("c", 1)]).is_ok());
    }

    #[test]
    fn a_refund_gives_the_allowance_back() {
        let limiter = KeyedLimiter::per_second(3).expect("a limit");
        let t = 7 * SECOND;
        let charged = limiter.check_all_at(t, &[("a", 3)]).expect("fits");
        assert!(limiter.check_all_at(t, &[("a", 1)]).is_err());
        limiter.refund_at(t, &[("a", 2, charged.until(0))]);
        assert!(limiter.check_all_at(t, &[("a", 2)]).is_ok());
        assert!(limiter.check_all_at(t, &[("a", 1)]).is_err());
        // Refunding a key never charged does nothing.
        limiter.refund_at(t, &[("z", 5, t + SECOND)]);
        assert_eq!(limiter.keys(), 1);
    }

    /// A charge refunded after its units came back by themselves gives nothing back: the
    /// allowance spent since went to work that was done (a duplicate of an in-flight transfer
    /// is charged, and refunded only when the engine answers it as a replay, after the sync).
    #[test]
    fn a_refund_gives_back_only_what_of_the_charge_is_still_outstanding() {
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        let t = 10 * SECOND;
        let late = limiter.check_all_at(t, &[("a", 1)]).expect("fits");
        // Two seconds on, its unit has long come back; two new transfers take the whole burst.
        assert!(limiter.check_all_at(t + 2 * SECOND, &[("a", 2)]).is_ok());
        limiter.refund_at(t + 2 * SECOND, &[("a", 1, late.until(0))]);
        assert!(
            limiter.check_all_at(t + 2 * SECOND, &[("a", 1)]).is_err(),
            "a late refund let a third transfer through"
        );
        // Refunded while half of it is outstanding: half of it comes back.
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        let half = limiter.check_all_at(t, &[("b", 2)]).expect("fits");
        let at = t + SECOND / 2;
        limiter.refund_at(at, &[("b", 2, half.until(0))]);
        // 500 ms after a charge of the whole burst: one unit back by itself, one refunded.
        assert!(limiter.check_all_at(at, &[("b", 2)]).is_ok());
        assert!(limiter.check_all_at(at, &[("b", 1)]).is_err());
    }
}
