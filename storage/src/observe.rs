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
