//! The durable watermark: how a flush tells everyone else what is on disk.
//!
//! The flusher writes and syncs entries, *then* publishes the new watermark with
//! `Release`; a reader that loads it with `Acquire` and sees `w` is guaranteed to see
//! every effect the flusher made before publishing (the entries' bookkeeping), so it
//! may treat everything below `w` as durable. Waiters block on a condition variable
//! until the watermark reaches their target or the watermark is closed (the log was
//! poisoned or dropped). Under `--cfg loom` the primitives are loom's, and
//! `tests/loom_watermark.rs` model-checks the publication.

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Condvar, Mutex,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Condvar, Mutex,
};

/// A value that moves forward as data becomes durable, with blocking waiters.
///
/// The value is an exclusive end (one past the last durable index), so an empty log
/// needs no sentinel. It may move backward only through [`Watermark::reset`], which
/// log truncation uses after the truncated entries are gone.
#[derive(Debug)]
pub struct Watermark {
    value: AtomicU64,
    closed: AtomicBool,
    /// Guards nothing but the sleep/wake handshake of waiters.
    lock: Mutex<()>,
    changed: Condvar,
}

/// Why `wait_for` returned without reaching its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkClosed;

impl Watermark {
    pub fn new(initial: u64) -> Watermark {
        Watermark { value: AtomicU64::new(initial), closed: AtomicBool::new(false), lock: Mutex::new(()), changed: Condvar::new() }
    }

    /// The current watermark. Everything the publisher did before publishing this value
    /// is visible to the caller.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// Moves the watermark forward to `end` (never backward) and wakes waiters.
    pub fn advance(&self, end: u64) {
        self.value.fetch_max(end, Ordering::AcqRel);
        self.wake();
    }

    /// Sets the watermark to `end`, possibly backward (after a truncation).
    pub fn reset(&self, end: u64) {
        self.value.store(end, Ordering::Release);
        self.wake();
    }

    /// Marks the watermark dead (poisoned or dropped log) and wakes every waiter.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Blocks until the watermark is at least `target`. Returns the watermark seen.
    pub fn wait_for(&self, target: u64) -> Result<u64, WatermarkClosed> {
        let mut guard = self.lock.lock().expect("watermark lock is never held across a panic");
        loop {
            let now = self.get();
            if now >= target {
                return Ok(now);
            }
            if self.is_closed() {
                return Err(WatermarkClosed);
            }
            guard = self.changed.wait(guard).expect("watermark lock is never held across a panic");
        }
    }

    fn wake(&self) {
        // Taking the lock orders this wake-up after any waiter's check-then-sleep, so a
        // waiter cannot miss the change between its check and its wait.
        drop(self.lock.lock().expect("watermark lock is never held across a panic"));
        self.changed.notify_all();
    }
}
