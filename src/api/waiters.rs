//! Bounded table of callers waiting for their outcome. Its capacity is the in-flight limit.
//!
//! A slot is taken by a request handler before it submits and freed only by the reply stage
//! after delivery (or by the handler if submission failed), so a slot is never reused while
//! the engine may still answer to it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use tokio::sync::oneshot;

use crate::core::CommandRecord;

/// What a waiting caller receives.
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub record: CommandRecord,
    /// False when the engine halted (journal failure or panic): the outcome is unknown. Also
    /// false for a command the engine refused unexecuted (`CommandRecord::refused`).
    pub durable: bool,
}

pub struct BatchCollector {
    results: Mutex<Vec<Option<Delivered>>>,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<Vec<Option<Delivered>>>>>,
}

enum Waiter {
    Free,
    Single(oneshot::Sender<Delivered>),
    Batch(std::sync::Arc<BatchCollector>),
}

pub struct Waiters {
    slots: Vec<Mutex<Waiter>>,
    free: ArrayQueue<u32>,
}

/// Token layout: low 32 bits the slot, high 32 bits the item index inside a batch.
pub fn token(slot: u32, item: u32) -> u64 {
    u64::from(slot) | (u64::from(item) << 32)
}

impl Waiters {
    pub fn new(capacity: usize) -> Waiters {
        let capacity = capacity.max(1);
        let free = ArrayQueue::new(capacity);
        for i in 0..capacity as u32 {
            let _ = free.push(i);
        }
        Waiters {
            slots: (0..capacity).map(|_| Mutex::new(Waiter::Free)).collect(),
            free,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes a slot for one command; `None` when the in-flight limit is reached.
    pub fn wait_single(&self) -> Option<(u32, oneshot::Receiver<Delivered>)> {
        let slot = self.free.pop()?;
        let (sender, receiver) = oneshot::channel();
        *self.lock(slot) = Waiter::Single(sender);
        Some((slot, receiver))
    }

    /// Takes a slot for a batch of `count` commands.
    pub fn wait_batch(
        &self,
        count: usize,
    ) -> Option<(u32, oneshot::Receiver<Vec<Option<Delivered>>>)> {
        let slot = self.free.pop()?;
        let (sender, receiver) = oneshot::channel();
        let collector = BatchCollector {
            results: Mutex::new(vec![None; count]),
            remaining: AtomicUsize::new(count),
            done: Mutex::new(Some(sender)),
        };
        *self.lock(slot) = Waiter::Batch(std::sync::Arc::new(collector));
        Some((slot, receiver))
    }

    fn lock(&self, slot: u32) -> std::sync::MutexGuard<'_, Waiter> {
        self.slots[slot as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Frees a slot whose command was never submitted.
    pub fn cancel(&self, slot: u32) {
        *self.lock(slot) = Waiter::Free;
        let _ = self.free.push(slot);
    }

    /// Delivers an outcome (reply stage only).
    pub fn deliver(&self, token: u64, delivered: Delivered) {
        let slot = (token & 0xFFFF_FFFF) as u32;
        let item = (token >> 32) as usize;
        if slot as usize >= self.slots.len() {
            return;
        }
        let mut waiter = self.lock(slot);
        // The slot is returned to the free list before the caller is woken: a caller that
        // answers and sends its next request at once must find its slot free again (with
        // `--max-in-flight 1`, the other order gave a spurious 429).
        match std::mem::replace(&mut *waiter, Waiter::Free) {
            Waiter::Single(sender) => {
                drop(waiter);
                let _ = self.free.push(slot);
                // The caller may have timed out and gone; that is fine.
                let _ = sender.send(delivered);
            }
            Waiter::Batch(collector) => {
                if let Some(result) = collector
                    .results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(item)
                {
                    *result = Some(delivered);
                }
                if collector.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
                    *waiter = Waiter::Batch(collector);
                    return;
                }
                drop(waiter);
                let _ = self.free.push(slot);
                let results = std::mem::take(
                    &mut *collector.results.lock().unwrap_or_else(|e| e.into_inner()),
                );
                if let Some(sender) = collector
                    .done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    let _ = sender.send(results);
                }
            }
            Waiter::Free => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Wake, Waker};

    use super::*;
    use crate::core::CommandRecord;

    /// A waker that records whether the waiter's slot was already free when the caller was woken.
    struct CheckFree {
        waiters: Arc<Waiters>,
        woken: AtomicBool,
        free_when_woken: AtomicBool,
    }

    impl Wake for CheckFree {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.free_when_woken
                .store(self.waiters.in_flight() == 0, Ordering::SeqCst);
            self.woken.store(true, Ordering::SeqCst);
        }
    }

    fn check(waiters: Arc<Waiters>, receive: impl Future) {
        let check = Arc::new(CheckFree {
            waiters,
            woken: AtomicBool::new(false),
            free_when_woken: AtomicBool::new(false),
        });
        let waker = Waker::from(check.clone());
        let mut receive = pin!(receive);
        assert!(
            receive
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        deliver_all(&check.waiters);
        assert!(check.woken.load(Ordering::SeqCst), "the caller was woken");
        assert!(
            check.free_when_woken.load(Ordering::SeqCst),
            "a caller woken by its reply finds its slot free (else its next request gets 429)"
        );
    }

    fn deliver_all(waiters: &Waiters) {
        for item in 0..2 {
            waiters.deliver(
                token(0, item),
                Delivered {
                    record: CommandRecord::empty(),
                    durable: true,
                },
            );
        }
    }

    #[test]
    fn the_slot_is_free_before_a_single_caller_is_woken() {
        let waiters = Arc::new(Waiters::new(1));
        let (slot, receiver) = waiters.wait_single().expect("a free slot");
        assert_eq!(slot, 0);
        assert!(waiters.wait_single().is_none(), "capacity 1 is full");
        check(waiters, receiver);
    }

    #[test]
    fn the_slot_is_free_before_a_batch_caller_is_woken() {
        let waiters = Arc::new(Waiters::new(1));
        let (slot, receiver) = waiters.wait_batch(2).expect("a free slot");
        assert_eq!(slot, 0);
        check(waiters, receiver);
    }

    /// A caller that timed out drops its receiver, but its command is still in the engine: its
    /// slot must stay taken until the reply stage delivers that command's outcome, or a new
    /// caller given the slot would be handed the old command's outcome as its own.
    #[test]
    fn a_slot_whose_caller_gave_up_is_not_reused_before_its_outcome_arrives() {
        let waiters = Waiters::new(1);
        let (slot, receiver) = waiters.wait_single().expect("a free slot");
        drop(receiver);
        assert!(
            waiters.wait_single().is_none(),
            "the slot was handed out again"
        );
        assert!(
            waiters.wait_batch(2).is_none(),
            "the slot was handed out again"
        );
        let late = Delivered {
            record: CommandRecord::empty(),
            durable: true,
        };
        waiters.deliver(token(slot, 0), late);
        let (again, _receiver) = waiters.wait_batch(2).expect("free after delivery");
        assert_eq!(again, slot);

        // A batch whose caller gave up keeps its slot until its last item is delivered.
        drop(_receiver);
        waiters.deliver(token(slot, 0), late);
        assert!(
            waiters.wait_single().is_none(),
            "freed with an item pending"
        );
        waiters.deliver(token(slot, 1), late);
        assert!(waiters.wait_single().is_some(), "free after the last item");
    }
}
