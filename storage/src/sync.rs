//! The synchronization primitives of the log, the manual flusher and the in-memory
//! disk: std's, or loom's under `--cfg loom`, so `tests/loom_*.rs` can model-check the
//! code that uses them (the watermark picks its own the same way).

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard, RwLock,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard, RwLock,
};
