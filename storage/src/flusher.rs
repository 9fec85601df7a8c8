//! A flusher thread: callers submit "tell me when this log is durable" requests; the
//! thread drains every queued request, flushes each distinct log once (group commit
//! across callers and across logs on one disk), and completes the callbacks in
//! submission order.
//!
//! The queue is bounded (`FLUSH_QUEUE_CAPACITY_DEFAULT`); when full, `submit` blocks the
//! submitter — backpressure, never a dropped request. Under `FsyncPolicy::Interval` the
//! thread also wakes once per interval to sync logs with unsynced writes.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::StorageError;
use crate::log::Log;

/// Called once with the outcome of the flush that covered the request.
pub type FlushCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

struct Request {
    log: Arc<Log>,
    done: FlushCallback,
}

/// Handle to a flusher thread. Dropping it stops the thread after it has completed
/// every request already queued.
pub struct Flusher {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

/// How often the thread checks interval-policy logs for a due sync.
const INTERVAL_TICK: Duration = Duration::from_millis(50);

impl Flusher {
    /// Starts a flusher thread named `name` with a queue of `capacity` requests.
    pub fn spawn(name: &str, capacity: usize) -> std::io::Result<Flusher> {
        assert!(capacity > 0, "a flusher queue needs room for at least one request");
        let (tx, rx) = sync_channel(capacity);
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || run(rx, capacity))?;
        Ok(Flusher { tx: Some(tx), thread: Some(thread) })
    }

    /// Asks for everything appended to `log` so far to be made durable; `done` runs on
    /// the flusher thread once it is (or with the error if it cannot be).
    pub fn submit(&self, log: Arc<Log>, done: FlushCallback) -> Result<(), StorageError> {
        let tx = self.tx.as_ref().ok_or(StorageError::FlusherStopped)?;
        tx.send(Request { log, done }).map_err(|failed| {
            (failed.0.done)(Err(StorageError::FlusherStopped));
            StorageError::FlusherStopped
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: Receiver<Request>, capacity: usize) {
    let mut interval_logs: Vec<Weak<Log>> = Vec::new();
    loop {
        let first = match rx.recv_timeout(INTERVAL_TICK) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                sync_interval_logs(&mut interval_logs);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < capacity {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // One flush per distinct log; distinct logs (separate files) are flushed in
        // parallel so one partition's fsync does not wait behind another's.
        let mut distinct: Vec<&Arc<Log>> = Vec::new();
        for req in &batch {
            let ptr = Arc::as_ptr(&req.log);
            if distinct.iter().any(|l| Arc::as_ptr(l) == ptr) {
                continue;
            }
            if matches!(req.log.config().fsync, crate::config::FsyncPolicy::Interval(_)) && !interval_logs.iter().any(|w| w.as_ptr() == ptr) {
                interval_logs.push(Arc::downgrade(&req.log));
            }
            distinct.push(&req.log);
        }
        let results: Vec<(*const Log, Result<(), String>)> = if distinct.len() == 1 {
            vec![(Arc::as_ptr(distinct[0]), distinct[0].flush().map(|_| ()).map_err(|e| e.to_string()))]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> =
                    distinct.iter().map(|log| (Arc::as_ptr(log), scope.spawn(|| log.flush().map(|_| ()).map_err(|e| e.to_string())))).collect();
                handles.into_iter().map(|(ptr, h)| (ptr, h.join().unwrap_or_else(|_| Err("flush thread panicked".to_string())))).collect()
            })
        };
        for req in batch {
            let ptr = Arc::as_ptr(&req.log);
            let outcome = results.iter().find(|(p, _)| *p == ptr).map(|(_, r)| r.clone()).expect("every log in the batch was flushed above");
            (req.done)(outcome.map_err(|cause| StorageError::Poisoned { path: req.log.dir().to_path_buf(), cause }));
        }
        sync_interval_logs(&mut interval_logs);
    }
}

fn sync_interval_logs(logs: &mut Vec<Weak<Log>>) {
    logs.retain(|w| match w.upgrade() {
        Some(log) => {
            if let Err(e) = log.sync_if_due() {
                tracing::error!(error = %e, "interval fsync failed");
            }
            true
        }
        None => false,
    });
}
