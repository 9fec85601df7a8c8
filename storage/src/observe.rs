//! What the process running the storage wants to know of its I/O, without storage
//! knowing about metrics: one observer of fsync durations, set once per process (the
//! broker records them in its metrics). And, for tests only, an injected fsync delay
//! that slows the disk down.

use std::sync::OnceLock;
use std::time::Duration;

static FSYNC_OBSERVER: OnceLock<fn(Duration)> = OnceLock::new();

/// Sets the function told how long each segment `fdatasync` took. Only the first call
/// in a process takes effect.
pub fn set_fsync_observer(observer: fn(Duration)) {
    let _ = FSYNC_OBSERVER.set(observer);
}

pub(crate) fn fsync_done(took: Duration) {
    if let Some(observe) = FSYNC_OBSERVER.get() {
        observe(took);
    }
}

static LEDGER_SYNC_OBSERVER: OnceLock<fn(Duration)> = OnceLock::new();

/// Sets the function told how long each ack ledger `fdatasync` took. Only the first
/// call in a process takes effect.
pub fn set_ledger_sync_observer(observer: fn(Duration)) {
    let _ = LEDGER_SYNC_OBSERVER.set(observer);
}

pub(crate) fn ledger_sync_done(took: Duration) {
    if let Some(observe) = LEDGER_SYNC_OBSERVER.get() {
        observe(took);
    }
}

#[cfg(any(test, feature = "fault-injection"))]
static FSYNC_DELAY_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Test hook: every segment `fdatasync` in this process first sleeps this long (zero
/// turns it off), as a saturated or slow disk would.
#[cfg(any(test, feature = "fault-injection"))]
pub fn inject_fsync_delay(delay: Duration) {
    FSYNC_DELAY_MICROS.store(delay.as_micros().min(u128::from(u64::MAX)) as u64, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(any(test, feature = "fault-injection"))]
pub(crate) fn injected_fsync_delay() {
    let micros = FSYNC_DELAY_MICROS.load(std::sync::atomic::Ordering::Relaxed);
    if micros > 0 {
        std::thread::sleep(Duration::from_micros(micros));
    }
}

#[cfg(feature = "sabotage")]
static ACK_BEFORE_FSYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sabotage (the Jepsen harness proves its checker with it): flushers acknowledge every
/// append at once and write and sync logs only every `SABOTAGE_FLUSH_DELAY`, so a crash
/// loses appends that were reported durable. Never on unless a test turns it on.
#[cfg(feature = "sabotage")]
pub fn set_ack_before_fsync(on: bool) {
    ACK_BEFORE_FSYNC.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// How long a sabotaged flusher holds writes it already acknowledged.
pub const SABOTAGE_FLUSH_DELAY: Duration = Duration::from_millis(500);

pub(crate) fn ack_before_fsync() -> bool {
    #[cfg(feature = "sabotage")]
    {
        ACK_BEFORE_FSYNC.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "sabotage"))]
    {
        false
    }
}
