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
    arrivals: Mutex<Arrivals>,
    epoch: Instant,
}

/// The keys' arrival times in two generations, so that idle keys are forgotten without a walk
/// over the map under the lock: `rotate` makes `current` the `previous` generation in O(1) and
/// hands the older one back to be dropped outside the lock (its memory returned). A key used
/// again moves back to `current`. A key left in `previous` through a whole rotation was last
/// charged before the rotation before it, at least `burst_ns` ago, so its arrival time (at most
/// `burst_ns` past its last charge) has passed: forgetting it changes no answer.
#[derive(Default)]
struct Arrivals {
    current: HashMap<Box<str>, u64>,
    previous: HashMap<Box<str>, u64>,
    /// When `previous` was made (nanoseconds since the epoch).
    rotated_at: u64,
}

impl Arrivals {
    /// The key's arrival time, moved into `current` if it was in `previous`.
    fn take(&mut self, key: &str) -> Option<u64> {
        if let Some(&at) = self.current.get(key) {
            return Some(at);
        }
        let (key, at) = self.previous.remove_entry(key)?;
        self.current.insert(key, at);
        Some(at)
    }
}

/// An older generation of a limiter's keys, forgotten: drop it where a long free does not hold
/// up requests (its keys are all idle; the limiter's lock is not held).
pub struct Forgotten(#[allow(dead_code)] HashMap<Box<str>, u64>);

impl Forgotten {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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
            arrivals: Mutex::new(Arrivals::default()),
            epoch: Instant::now(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
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
            let previous = arrivals.take(key);
            let start = previous.unwrap_or(0).max(now);
            let next = start.saturating_add(u64::from(n).saturating_mul(self.interval_ns));
            if next - now > self.burst_ns {
                for (key, previous) in before.into_iter().rev() {
                    match previous {
                        Some(at) => {
                            arrivals.current.insert(key.into(), at);
                        }
                        None => {
                            arrivals.current.remove(key);
                        }
                    }
                }
                return Err((index, Duration::from_nanos(next - now - self.burst_ns)));
            }
            before.push((key, previous));
            arrivals.current.insert(key.into(), next);
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
            if let Some(at) = arrivals.current.get_mut(key) {
                *at = at.saturating_sub(give);
            } else if let Some(at) = arrivals.previous.get_mut(key) {
                *at = at.saturating_sub(give);
            }
        }
    }

    /// Forgets the keys unused since the rotation before the last one, if that was a burst (one
    /// second) or more ago: the limiter then holds only keys used in the last two seconds or so
    /// when this is called every second. Under the lock it only swaps two maps; the forgotten
    /// generation is handed back to be dropped elsewhere (`None` when it is too early).
    /// Before, one `retain` walked every key under the lock every 10 s, holding up every
    /// request's check for as long as millions of keys took, and kept the map's peak capacity.
    pub fn rotate(&self) -> Option<Forgotten> {
        self.rotate_at(self.now_ns())
    }

    fn rotate_at(&self, now: u64) -> Option<Forgotten> {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        // Not before a burst has passed since the last rotation: a key charged just after it
        // may still be outstanding.
        if now.saturating_sub(arrivals.rotated_at) < self.burst_ns {
            return None;
        }
        // Sized for as many keys as the last second's: the keys in use move back one by one,
        // and a map grown from empty would rehash them all again each second under the lock.
        let capacity = arrivals.current.len();
        let current = std::mem::replace(&mut arrivals.current, HashMap::with_capacity(capacity));
        let older = std::mem::replace(&mut arrivals.previous, current);
        arrivals.rotated_at = now;
        Some(Forgotten(older))
    }

    /// Keys held, idle ones not forgotten yet included.
    pub fn keys(&self) -> usize {
        self.arrivals
            .lock()
            .map(|a| a.current.len() + a.previous.len())
            .unwrap_or(0)
    }

    /// Slots allocated for keys (the memory the limiter holds).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.arrivals
            .lock()
            .map(|a| a.current.capacity() + a.previous.capacity())
            .unwrap_or(0)
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

    /// Idle keys are forgotten within two rotations, and their memory with them; a key still
    /// outstanding never is, however often `rotate` is called.
    #[test]
    fn idle_keys_are_forgotten_and_outstanding_ones_kept() {
        let limiter = KeyedLimiter::per_second(10).expect("a limit");
        let t = 10 * SECOND;
        let names: Vec<String> = (0..100_000).map(|i| format!("acct-{i}")).collect();
        for name in &names {
            assert!(limiter.check_all_at(t, &[(name, 1)]).is_ok());
        }
        assert_eq!(limiter.keys(), 100_000);
        let first = limiter.rotate_at(t + SECOND).expect("a second on: rotates");
        assert!(first.is_empty(), "nothing older yet");
        let forgotten = limiter
            .rotate_at(t + 2 * SECOND)
            .expect("another second on: rotates");
        assert_eq!(forgotten.len(), 100_000, "every idle key forgotten");
        drop(forgotten);
        assert_eq!(limiter.keys(), 0);
        // The generation after the busy one was sized for its keys; once that one goes too,
        // nothing is held.
        assert!(limiter.rotate_at(t + 3 * SECOND).is_some());
        assert_eq!(limiter.capacity(), 0, "the idle keys' memory is returned");

        // `a` takes its whole burst just after a rotation: rotations sooner than a second
        // after that one do nothing, so `a` stays charged until its arrival time.
        let limiter = KeyedLimiter::per_second(4).expect("a limit");
        assert!(limiter.rotate_at(t).is_some());
        let at = t + SECOND / 10;
        assert!(limiter.check_all_at(at, &[("a", 4)]).is_ok());
        for step in 2..10 {
            assert!(
                limiter.rotate_at(t + step * SECOND / 10).is_none(),
                "rotated {step}00 ms after the last rotation"
            );
        }
        assert!(
            limiter.check_all_at(t + SECOND / 2, &[("a", 3)]).is_err(),
            "a's spent allowance was forgotten"
        );
        // Used again after one rotation, a key moves back to the current generation and
        // survives the next one.
        assert!(limiter.rotate_at(t + SECOND).is_some());
        assert!(limiter.check_all_at(t + SECOND, &[("a", 1)]).is_ok());
        let forgotten = limiter.rotate_at(t + 2 * SECOND).expect("rotates");
        assert!(forgotten.is_empty(), "a was in use");
        assert_eq!(limiter.keys(), 1, "a is kept");
        // A refund reaches a key in the older generation.
        let limiter = KeyedLimiter::per_second(2).expect("a limit");
        let charged = limiter.check_all_at(t, &[("b", 2)]).expect("fits");
        assert!(limiter.rotate_at(t + SECOND / 2).is_some());
        limiter.refund_at(t + SECOND / 2, &[("b", 1, charged.until(0))]);
        assert!(limiter.check_all_at(t + SECOND / 2, &[("b", 2)]).is_ok());
    }
}
