//! The flusher: callers submit "tell me when this log is durable" requests; it makes
//! the log durable and runs the callback.
//!
//! A flusher has a fixed set of *lanes*, each one thread with its own bounded queue.
//! A log always goes to the same lane (chosen by [`Log::instance`], so logs opened one
//! after another land on different lanes); a lane drains every queued request, flushes
//! each distinct log once (group commit across callers), and completes the callbacks in
//! submission order. So callbacks of one log run in submission order (what openraft
//! needs per group), and logs on different lanes are flushed in parallel: one
//! partition's fsync does not wait behind another's. No thread is created per flush.
//!
//! With an [`AckLedger`], a round ends by recording, for every flushed log submitted
//! with a ledger key, its last durable id, and syncing the ledger once, before any
//! callback runs: nothing is reported durable that the ledger does not vouch for
//! (`ledger`). Only logs under `FsyncPolicy::Always` are recorded: under `Interval`,
//! "durable" does not mean on disk, and recording it would claim damage after a crash.
//!
//! Queues are bounded (`FLUSH_QUEUE_CAPACITY_DEFAULT` per lane); when full, `submit`
//! blocks the submitter — backpressure, never a dropped request. Under
//! `FsyncPolicy::Interval` a lane also wakes once per interval to sync its logs with
//! unsynced writes.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::StorageError;
use crate::ledger::AckLedger;
use crate::log::Log;

/// Called once with the outcome of the flush that covered the request.
pub type FlushCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

struct Request {
    log: Arc<Log>,
    /// The log's key in the ack ledger, if its durability is recorded there.
    ack_key: Option<u64>,
    done: FlushCallback,
}

/// Handle to a flusher's lanes. Dropping it stops them after they have completed every
/// request already queued.
pub struct Flusher {
    lanes: Vec<SyncSender<Request>>,
    threads: Vec<JoinHandle<()>>,
    /// Set for a manual flusher ([`Flusher::manual`]): no lanes, rounds run when asked.
    manual: Option<crate::sync::Mutex<ManualLane>>,
}

/// The state of a manual flusher's one lane.
struct ManualLane {
    capacity: usize,
    ledger: Option<Arc<AckLedger>>,
    queued: Vec<Request>,
    /// Sabotage only: logs acknowledged but not flushed yet.
    sabotaged: Vec<Arc<Log>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").field("lanes", &self.lanes.len()).finish_non_exhaustive()
    }
}

/// How often a lane checks interval-policy logs for a due sync.
const INTERVAL_TICK: Duration = Duration::from_millis(50);

impl Flusher {
    /// Starts a flusher with `FLUSH_LANES_DEFAULT` lanes named `name-<lane>`, each with a
    /// queue of `capacity` requests.
    pub fn spawn(name: &str, capacity: usize) -> std::io::Result<Flusher> {
        Flusher::spawn_lanes(name, capacity, crate::limits::FLUSH_LANES_DEFAULT)
    }

    /// Starts a flusher with `lanes` lanes (threads) of `capacity` queued requests each.
    pub fn spawn_lanes(name: &str, capacity: usize, lanes: usize) -> std::io::Result<Flusher> {
        Flusher::spawn_with_ledger(name, capacity, lanes, None)
    }

    /// Starts a flusher whose rounds record durability in `ledger` (see the module docs).
    pub fn spawn_with_ledger(name: &str, capacity: usize, lanes: usize, ledger: Option<Arc<AckLedger>>) -> std::io::Result<Flusher> {
        assert!(capacity > 0, "a flusher queue needs room for at least one request");
        assert!(lanes > 0, "a flusher needs at least one lane");
        let mut flusher = Flusher { lanes: Vec::with_capacity(lanes), threads: Vec::with_capacity(lanes), manual: None };
        for lane in 0..lanes {
            let (tx, rx) = sync_channel(capacity);
            let ledger = ledger.clone();
            let thread = std::thread::Builder::new().name(format!("{name}-{lane}")).spawn(move || run(rx, capacity, ledger))?;
            flusher.lanes.push(tx);
            flusher.threads.push(thread);
        }
        Ok(flusher)
    }

    /// A flusher without threads: `submit` only queues (up to `capacity` requests; a
    /// submit to a full queue runs a round first), and [`Flusher::run_queued`] runs a
    /// round — flush every queued log once, record the ledger, complete the callbacks in
    /// submit order — on the caller's thread. For a deterministic simulation, which
    /// decides when rounds happen, so a crash can fall between an append and its fsync.
    /// With the `ack-before-fsync` sabotage a submit is acknowledged at once and its log
    /// flushed only at the next round.
    pub fn manual(capacity: usize, ledger: Option<Arc<AckLedger>>) -> Flusher {
        assert!(capacity > 0, "a flusher queue needs room for at least one request");
        let lane = ManualLane { capacity, ledger, queued: Vec::new(), sabotaged: Vec::new() };
        Flusher { lanes: Vec::new(), threads: Vec::new(), manual: Some(crate::sync::Mutex::new(lane)) }
    }

    /// Runs one round of a manual flusher over everything queued; returns how many
    /// requests it completed (zero for a flusher with lanes, which runs its own rounds).
    pub fn run_queued(&self) -> usize {
        let Some(lane) = &self.manual else { return 0 };
        let (batch, ledger) = {
            let mut lane = lane.lock().unwrap_or_else(|p| p.into_inner());
            for log in lane.sabotaged.drain(..) {
                let _ = log.flush();
            }
            (std::mem::take(&mut lane.queued), lane.ledger.clone())
        };
        let n = batch.len();
        if n > 0 {
            let mut interval_logs = Vec::new();
            // Callbacks run outside the lock: they may submit again.
            flush_round(batch, ledger.as_deref(), &mut interval_logs);
        }
        n
    }

    /// Asks for everything appended to `log` so far to be made durable; `done` runs on
    /// the log's lane thread once it is (or with the error if it cannot be).
    pub fn submit(&self, log: Arc<Log>, done: FlushCallback) -> Result<(), StorageError> {
        self.send(Request { log, ack_key: None, done })
    }

    /// As [`Flusher::submit`], and before `done` runs, the ack ledger records the log's
    /// last durable id under `ack_key` (if this flusher has a ledger).
    pub fn submit_acked(&self, log: Arc<Log>, ack_key: u64, done: FlushCallback) -> Result<(), StorageError> {
        self.send(Request { log, ack_key: Some(ack_key), done })
    }

    fn send(&self, request: Request) -> Result<(), StorageError> {
        if let Some(lane) = &self.manual {
            let full = {
                let mut lane = lane.lock().unwrap_or_else(|p| p.into_inner());
                if crate::observe::ack_before_fsync() {
                    if !lane.sabotaged.iter().any(|l| Arc::ptr_eq(l, &request.log)) {
                        lane.sabotaged.push(request.log.clone());
                    }
                    drop(lane);
                    (request.done)(Ok(()));
                    return Ok(());
                }
                lane.queued.push(request);
                lane.queued.len() >= lane.capacity
            };
            if full {
                self.run_queued();
            }
            return Ok(());
        }
        let lane = &self.lanes[(request.log.instance() % self.lanes.len() as u64) as usize];
        lane.send(request).map_err(|failed| {
            (failed.0.done)(Err(StorageError::FlusherStopped));
            StorageError::FlusherStopped
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.lanes.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(rx: Receiver<Request>, capacity: usize, ledger: Option<Arc<AckLedger>>) {
    let mut interval_logs: Vec<Weak<Log>> = Vec::new();
    // Sabotage only: logs acknowledged but not yet flushed, and when they were first.
    let mut sabotaged: Vec<Arc<Log>> = Vec::new();
    let mut sabotaged_since = std::time::Instant::now();
    loop {
        if !sabotaged.is_empty() && sabotaged_since.elapsed() >= crate::observe::SABOTAGE_FLUSH_DELAY {
            for log in sabotaged.drain(..) {
                let _ = log.flush();
            }
        }
        let first = match rx.recv_timeout(INTERVAL_TICK) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                sync_interval_logs(&mut interval_logs);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if crate::observe::ack_before_fsync() {
            // Sabotage: report durable now, write and sync later.
            if sabotaged.is_empty() {
                sabotaged_since = std::time::Instant::now();
            }
            if !sabotaged.iter().any(|l| Arc::ptr_eq(l, &first.log)) {
                sabotaged.push(first.log.clone());
            }
            (first.done)(Ok(()));
            continue;
        }
        let mut batch = vec![first];
        while batch.len() < capacity {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        flush_round(batch, ledger.as_deref(), &mut interval_logs);
        sync_interval_logs(&mut interval_logs);
    }
}

/// One round: flushes each distinct log of `batch` once, records the round in the
/// ledger, then completes the callbacks in submission order.
fn flush_round(batch: Vec<Request>, ledger: Option<&AckLedger>, interval_logs: &mut Vec<Weak<Log>>) {
    let mut results: Vec<(*const Log, Result<(), String>)> = Vec::new();
    for req in &batch {
        let ptr = Arc::as_ptr(&req.log);
        if results.iter().any(|(p, _)| *p == ptr) {
            continue;
        }
        if matches!(req.log.config().fsync, crate::config::FsyncPolicy::Interval(_)) && !interval_logs.iter().any(|w| w.as_ptr() == ptr) {
            interval_logs.push(Arc::downgrade(&req.log));
        }
        results.push((ptr, req.log.flush().map(|_| ()).map_err(|e| e.to_string())));
    }
    if let Some(ledger) = ledger {
        record_round(ledger, &batch, &mut results);
    }
    for req in batch {
        let ptr = Arc::as_ptr(&req.log);
        let outcome = results.iter().find(|(p, _)| *p == ptr).map(|(_, r)| r.clone()).expect("every log in the batch was flushed above");
        (req.done)(outcome.map_err(|cause| StorageError::Poisoned { path: req.log.dir().to_path_buf(), cause }));
    }
}

/// Records the round's flushed logs in the ledger and syncs it once; if that fails,
/// every recorded log's flush fails with it (its durability is not vouched for).
fn record_round(ledger: &AckLedger, batch: &[Request], results: &mut [(*const Log, Result<(), String>)]) {
    let mut recorded: Vec<*const Log> = Vec::new();
    let mut failure: Option<String> = None;
    let mut written = false;
    for req in batch {
        let Some(key) = req.ack_key else { continue };
        let ptr = Arc::as_ptr(&req.log);
        let flushed = results.iter().any(|(p, r)| *p == ptr && r.is_ok());
        if !flushed || recorded.contains(&ptr) || !matches!(req.log.config().fsync, crate::config::FsyncPolicy::Always) {
            continue;
        }
        recorded.push(ptr);
        if let Some(id) = req.log.durable_last() {
            match ledger.record(key, id) {
                Ok(changed) => written |= changed,
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
    }
    if recorded.is_empty() {
        return;
    }
    // Nothing new to record (a flush that found everything already durable): the
    // ledger already vouches for it, no sync needed.
    if failure.is_none() && written {
        if let Err(e) = ledger.sync() {
            failure = Some(e.to_string());
        }
    }
    if let Some(cause) = failure {
        tracing::error!(error = %cause, "the ack ledger could not record a flush; those appends are not reported durable");
        for (p, r) in results.iter_mut() {
            if recorded.contains(p) {
                *r = Err(format!("recording durability in the ack ledger: {cause}"));
            }
        }
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
