//! A global allocator that asks for transparent huge pages on large allocations.
//!
//! The ledger's tables are hundreds of MiB touched at random; with 4 KiB pages nearly every
//! access also misses the TLB. Where the kernel's THP mode is `madvise` (Debian's default),
//! huge pages are used only for memory that asks for them, so large blocks ask.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct HugePageAlloc;

const HUGE: usize = 2 << 20;
const PAGE: usize = 4096;

fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE {
        return;
    }
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + size) & !(PAGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside the block just allocated for us; madvise only sets a
        // paging hint and never reads or writes the memory. Failure is harmless and ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every method forwards to `System` unchanged; the only addition is a madvise hint on
// memory that `System` just returned to us.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, which the caller guarantees is valid.
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds realloc's rules.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        advise(new, new_size);
        new
    }
}

/// Faults in (allocates and zeroes) the pages of these address ranges without changing what
/// they hold, 2 MiB at a time, in order, so that another thread that fills the memory later
/// finds it present instead of paying for the kernel's zeroing on first touch. Before each
/// step, `before_step` is told how many bytes of the ranges are done; it may wait (to stay not
/// too far ahead of the filling thread), and returning false stops. Only whole pages are
/// populated; a failure (an old kernel without `MADV_POPULATE_WRITE`) stops quietly, and the
/// pages are then faulted on first write as usual.
///
/// # Safety
///
/// Every range must lie inside memory that this process allocated and that stays allocated
/// (not freed, not remapped) until this returns. The memory may be read and written by other
/// threads meanwhile: `MADV_POPULATE_WRITE` only creates the page-table entries (and zeroed
/// pages) for pages not yet present and never reads or writes contents.
pub unsafe fn populate(ranges: &[(usize, usize)], mut before_step: impl FnMut(usize) -> bool) {
    const STEP: usize = 2 << 20;
    let mut base = 0usize;
    for &(start, len) in ranges {
        let first = start.next_multiple_of(PAGE);
        let end = (start + len) & !(PAGE - 1);
        let mut at = first;
        while at < end {
            if !before_step(base + (at - start)) {
                return;
            }
            let n = STEP.min(end - at);
            // SAFETY: [at, at + n) lies inside one of the caller's ranges, which the caller
            // guarantees stay allocated; MADV_POPULATE_WRITE never changes contents (see above).
            let result =
                unsafe { libc::madvise(at as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
            if result != 0 {
                return;
            }
            at += n;
        }
        base += len;
    }
}

/// Spawns, in `scope`, a thread that `populate`s `ranges` while another thread fills them:
/// the first `head` bytes (an index table, touched at random from the start) at once, the rest
/// (storage filled front to back, `item_bytes` per item) at most `ahead_items` items beyond
/// the `filled` count that the filling thread publishes. It stops when `stop` is set (checked
/// between 2 MiB steps and while it waits). `None` if no thread could be started.
///
/// # Safety
///
/// As for `populate`, for as long as the thread runs: the filling thread must set `stop` and
/// join the thread before any of the ranges could be freed or moved (also when it unwinds).
pub unsafe fn spawn_populate_ahead<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    ranges: &'env [(usize, usize)],
    head: usize,
    item_bytes: usize,
    ahead_items: usize,
    filled: &'env std::sync::atomic::AtomicUsize,
    stop: &'env std::sync::atomic::AtomicBool,
) -> Option<std::thread::ScopedJoinHandle<'scope, ()>> {
    use std::sync::atomic::Ordering;
    let may_populate = move |done: usize| loop {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let allowed = filled.load(Ordering::Acquire).saturating_add(ahead_items);
        if done < head.saturating_add(allowed.saturating_mul(item_bytes)) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    std::thread::Builder::new()
        .name("wallet-populate".into())
        // SAFETY: the caller keeps the ranges allocated until this thread is joined.
        .spawn_scoped(scope, move || unsafe { populate(ranges, may_populate) })
        .ok()
}

/// Sets `stop` and waits for a `spawn_populate_ahead` thread, if one is still held, to end.
pub fn stop_populating(
    stop: &std::sync::atomic::AtomicBool,
    helper: &mut Option<std::thread::ScopedJoinHandle<'_, ()>>,
) {
    stop.store(true, std::sync::atomic::Ordering::Release);
    if let Some(handle) = helper.take() {
        let _ = handle.join();
    }
}

/// Sets the flag when dropped, also while unwinding: a thread that fills memory that a
/// `spawn_populate_ahead` thread populates holds one, so that a panic stops the helper, which
/// the scope waits for before it passes the panic on.
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::populate;

    #[test]
    fn populating_reserved_memory_keeps_what_is_there_and_what_is_written_after() {
        let mut values: Vec<u64> = Vec::with_capacity(3 << 20);
        values.extend(0..1000);
        let spare = values.spare_capacity_mut();
        let range = (spare.as_ptr() as usize, std::mem::size_of_val(spare));
        // Also a range that starts inside the filled part: populate must not touch contents.
        let filled = (values.as_ptr() as usize, 8000 + 4096 * 3);
        let mut steps = Vec::new();
        // SAFETY: both ranges lie inside `values`' allocation, alive until after the call.
        unsafe {
            populate(&[filled, range], |done| {
                steps.push(done);
                true
            })
        };
        assert!(values.iter().copied().eq(0..1000));
        values.extend(1000..(3 << 20));
        assert!(values.iter().copied().eq(0..(3 << 20)));
        // Progress only grows, and the caller saw every step.
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert!(steps.len() >= 2);
    }

    #[test]
    fn populating_stops_when_told() {
        let values: Vec<u8> = Vec::with_capacity(16 << 20);
        let range = (values.as_ptr() as usize, values.capacity());
        let mut calls = 0;
        // SAFETY: the range is `values`' allocation, alive until after the call.
        unsafe {
            populate(&[range], |done| {
                calls += 1;
                done < (4 << 20)
            })
        };
        // Steps at 0, 2 and 4 MiB: the third is refused.
        assert_eq!(calls, 3);
    }
}
