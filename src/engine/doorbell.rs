//! A doorbell for a ring's one consumer: it spins briefly, then parks on a futex until a
//! producer rings, so that an idle engine costs no CPU and a busy one no syscalls.
//!
//! The sleeping wait strategies wake up tens of thousands of times a second whether or not
//! anything arrived; on a 2-core machine those context switches were 13% of the server's CPU
//! time under HTTP load (perf, `finish_task_switch` under `clock_nanosleep`). A parked consumer
//! is woken once, by the producer that published the event it waits for.
//!
//! Protocol (an eventcount; no lost wake-up): the consumer reads `epoch`, then announces
//! `sleeping`, lets the disruptor check its cursor once more, and only then sleeps on `epoch`
//! with the value it read before announcing. A producer publishes its slot, fences, and if it
//! sees `sleeping` clears it, bumps `epoch` and wakes. Either the consumer's re-check sees the
//! slot, or the producer's fence comes after the announcement and the producer sees
//! `sleeping` (or a later producer cleared it, and that producer's bump comes after the
//! consumer read `epoch`): then `epoch` changes before the futex compares it, or the wake finds
//! the consumer asleep. Reading `epoch` after the announcement instead lost wake-ups: with
//! several producers publishing out of order, a producer of a later slot could clear the
//! announcement and bump `epoch` before the read, and the consumer then slept on the bumped
//! value with nobody left to wake it for the slot it waited for.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering, fence};
use std::time::Duration;

/// Empty polls spent spinning (a few microseconds) before yielding.
const SPINS: u32 = 64;
/// Empty polls spent yielding before parking.
const YIELDS: u32 = 8;
/// First park timeout; it doubles while the ring stays idle, up to `MAX_PARK`. The timeout
/// is only a backstop (the disruptor's shutdown flag is not a publication, so nobody rings for
/// it): it bounds how long a shutdown waits for a parked consumer.
const MIN_PARK: Duration = Duration::from_millis(1);
const MAX_PARK: Duration = Duration::from_millis(50);

#[derive(Debug)]
#[repr(align(128))]
pub struct Doorbell {
    /// Bumped by a producer that saw `sleeping`; the futex word.
    epoch: AtomicU32,
    sleeping: AtomicBool,
    // Consumer-only state (one consumer per doorbell), atomics only so that `&self` suffices.
    last_wanted: AtomicI64,
    polls: AtomicU32,
    announced: AtomicBool,
    seen_epoch: AtomicU32,
    park_ms: AtomicU32,
    /// Backstop timeouts in milliseconds (first, largest).
    min_park_ms: u32,
    max_park_ms: u32,
    /// Times the consumer actually slept (for tests and metrics).
    parks: AtomicU32,
}

impl Doorbell {
    /// A doorbell that lives as long as the process. A ring's consumer thread keeps a copy of
    /// its wait strategy (the disruptor requires `Copy`), so the doorbell is leaked: one small
    /// allocation per engine start.
    pub fn leaked() -> &'static Doorbell {
        Doorbell::with_backstop(MIN_PARK, MAX_PARK)
    }

    fn with_backstop(min: Duration, max: Duration) -> &'static Doorbell {
        Box::leak(Box::new(Doorbell {
            epoch: AtomicU32::new(0),
            sleeping: AtomicBool::new(false),
            last_wanted: AtomicI64::new(i64::MIN),
            polls: AtomicU32::new(0),
            announced: AtomicBool::new(false),
            seen_epoch: AtomicU32::new(0),
            park_ms: AtomicU32::new(0),
            min_park_ms: min.as_millis() as u32,
            max_park_ms: max.as_millis() as u32,
            parks: AtomicU32::new(0),
        }))
    }

    /// Producer side: call after publishing. Costs a fence and a load when nobody sleeps.
    #[inline]
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        // Only the first producer to see a sleeper wakes it; the others see the flag cleared.
        // (The consumer announces again, with its own fence, before it sleeps again, so a
        // producer that sees it cleared is covered by that announcement's re-check.)
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            futex_wake(&self.epoch);
        }
    }

    /// How many times the consumer parked.
    pub fn parks(&self) -> u32 {
        self.parks.load(Ordering::Relaxed)
    }

    /// Consumer side: called by the disruptor after each empty poll for `wanted`.
    pub fn wait_for(&self, wanted: i64) {
        if self.last_wanted.load(Ordering::Relaxed) != wanted {
            // Progress since the last empty poll: start over with spinning.
            self.last_wanted.store(wanted, Ordering::Relaxed);
            self.polls.store(0, Ordering::Relaxed);
            self.park_ms.store(0, Ordering::Relaxed);
            if self.announced.load(Ordering::Relaxed) {
                // The check after announcing found work: withdraw the announcement, or every
                // publication would pay a futex wake while this consumer is busy.
                self.sleeping.store(false, Ordering::Relaxed);
                self.announced.store(false, Ordering::Relaxed);
            }
        }
        let polls = self.polls.load(Ordering::Relaxed) + 1;
        self.polls.store(polls, Ordering::Relaxed);
        if polls <= SPINS {
            std::hint::spin_loop();
            return;
        }
        if polls <= SPINS + YIELDS {
            std::thread::yield_now();
            return;
        }
        if !self.announced.load(Ordering::Relaxed) {
            // The epoch first: any producer that clears the announcement below bumps it later.
            self.seen_epoch
                .store(self.epoch.load(Ordering::SeqCst), Ordering::Relaxed);
            self.sleeping.store(true, Ordering::SeqCst);
            // Orders the announcement before the disruptor's next (acquire) check of the cursor:
            // the other half of the producer's fence.
            fence(Ordering::SeqCst);
            #[cfg(test)]
            tests::after_announcing(self);
            self.announced.store(true, Ordering::Relaxed);
            // Back to the disruptor for one more check of the cursor before sleeping.
            return;
        }
        let park_ms = match self.park_ms.load(Ordering::Relaxed) {
            0 => self.min_park_ms,
            ms => ms.min(self.max_park_ms),
        };
        self.park_ms
            .store(park_ms.saturating_mul(2), Ordering::Relaxed);
        let park = Duration::from_millis(u64::from(park_ms));
        self.parks.fetch_add(1, Ordering::Relaxed);
        futex_wait(&self.epoch, self.seen_epoch.load(Ordering::Relaxed), park);
        self.sleeping.store(false, Ordering::Relaxed);
        self.announced.store(false, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32 for the whole call; FUTEX_WAIT only reads it and
    // returns at once if it differs from `expected`. The timespec outlives the call. Errors
    // (EAGAIN, EINTR, ETIMEDOUT) all mean "go back and poll", which the caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &timeout as *const libc::timespec,
        );
    }
}

#[cfg(target_os = "linux")]
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn futex_wait(_word: &AtomicU32, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_micros(50)));
}

#[cfg(not(target_os = "linux"))]
fn futex_wake(_word: &AtomicU32) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::atomic::AtomicU64;

    thread_local! {
        /// Run by the consumer right after it announces (its fence done): lets a test put a
        /// producer's ring exactly there.
        static AFTER_ANNOUNCING: Cell<Option<fn(&Doorbell)>> = const { Cell::new(None) };
    }

    pub(super) fn after_announcing(bell: &Doorbell) {
        if let Some(hook) = AFTER_ANNOUNCING.with(Cell::take) {
            hook(bell);
        }
    }

    #[test]
    fn a_later_slot_rung_as_the_consumer_announces_does_not_swallow_the_wake_up_it_waits_for() {
        // Two producers of a multi-producer ring: P1 publishes slot 2 and rings while the
        // consumer, waiting for slot 1, is announcing that it will sleep; P0 publishes slot 1
        // later. P1's ring clears the announcement, so P0's ring sees nobody sleeping: the
        // consumer must not sleep on an epoch that P1 has already bumped.
        let bell = Doorbell::with_backstop(Duration::from_secs(10), Duration::from_secs(10));
        let published: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let consumer = std::thread::spawn(move || {
            AFTER_ANNOUNCING.with(|hook| hook.set(Some(|bell: &Doorbell| bell.ring())));
            // Slot 1 is the one waited for; slot 2 (published by P1 in the hook) does not end
            // the wait, as in the disruptor, which waits for the lowest unpublished slot.
            while published.load(Ordering::Acquire) < 1 {
                bell.wait_for(1);
            }
        });
        // Let the consumer announce (P1 rings inside that) and go to sleep.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while bell.parks() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer never parked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let rung_at = std::time::Instant::now();
        published.store(1, Ordering::Release);
        bell.ring();
        consumer.join().expect("consumer thread");
        assert!(
            rung_at.elapsed() < Duration::from_secs(2),
            "the consumer slept through slot 1's ring until the {:?} backstop",
            rung_at.elapsed()
        );
    }

    /// A one-slot "ring": the consumer waits for `published` to reach `wanted` exactly as the
    /// disruptor's consumer loop does (check, then wait_for, then check again).
    fn consume(bell: &Doorbell, published: &AtomicU64, until: u64, polls: &AtomicU64) {
        let mut wanted = 1u64;
        while wanted <= until {
            while published.load(Ordering::Acquire) < wanted {
                polls.fetch_add(1, Ordering::Relaxed);
                bell.wait_for(wanted as i64);
            }
            wanted = published.load(Ordering::Acquire) + 1;
        }
    }

    #[test]
    fn every_publication_reaches_a_parking_consumer() {
        // A backstop far longer than the test's bound: a lost wake-up fails the test instead of
        // being papered over by the timeout.
        let bell = Doorbell::with_backstop(Duration::from_secs(10), Duration::from_secs(10));
        let published: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let polls: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        const N: u64 = 2_000;
        let consumer = std::thread::spawn(move || consume(bell, published, N, polls));
        for i in 1..=N {
            // Irregular gaps: some publications find the consumer spinning, some parked.
            if i % 97 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
            published.store(i, Ordering::Release);
            bell.ring();
        }
        // With 20 gaps of 3 ms the run takes ~60 ms; one lost wake-up takes 10 s.
        let started = std::time::Instant::now();
        consumer.join().expect("consumer thread");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            bell.parks() > 0,
            "the consumer never parked during 3 ms gaps"
        );
    }

    #[test]
    fn an_announcement_is_withdrawn_when_work_turns_up() {
        let bell = Doorbell::with_backstop(Duration::from_secs(10), Duration::from_secs(10));
        // Empty polls for sequence 5 until the consumer announces that it will sleep (the call
        // that announces returns at once, for one more check of the cursor).
        for _ in 0..=SPINS + YIELDS {
            bell.wait_for(5);
        }
        assert!(bell.sleeping.load(Ordering::Relaxed));
        assert_eq!(bell.parks(), 0);
        // That check found sequence 5: the next wait is for something later. Producers must no
        // longer see a sleeper (each would pay a futex wake for nothing).
        bell.wait_for(9);
        assert!(!bell.sleeping.load(Ordering::Relaxed));
        assert_eq!(bell.parks(), 0);
    }

    #[test]
    fn an_idle_consumer_sleeps_instead_of_polling() {
        let bell = Doorbell::with_backstop(Duration::from_secs(10), Duration::from_secs(10));
        let published: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let polls: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let consumer = std::thread::spawn(move || consume(bell, published, 1, polls));
        std::thread::sleep(Duration::from_millis(300));
        let idle_polls = polls.load(Ordering::Relaxed);
        let woken_at = std::time::Instant::now();
        published.store(1, Ordering::Release);
        bell.ring();
        consumer.join().expect("consumer thread");
        // Spinning or sleeping 20 us would poll tens of thousands of times in 300 ms; a parked
        // consumer polls SPINS + YIELDS + 2 times.
        assert!(
            idle_polls < 1_000,
            "{idle_polls} polls in 300 ms of idleness"
        );
        // The ring woke it, not the 10 s backstop.
        assert!(woken_at.elapsed() < Duration::from_secs(2));
    }
}
