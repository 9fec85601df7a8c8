//! The partition log: segments, the tail cache, group commit, truncation and purge.
//!
//! This file holds the log's state and its accessors; by concern: [`append`] (appends
//! and group commit), [`read`] (reads and lookups), [`truncate`] (truncation, purge,
//! retention), [`install`] (a staged log replacing this one's entries).
//!
//! # Concurrency
//! Three locks, always taken in this order: `io` → `layout` → `state`.
//! - `state` (mutex): all bookkeeping. Held briefly; never across file I/O except the
//!   small header write when a segment is created.
//! - `io` (mutex): whoever writes or syncs files holds it — a flush, a truncation, a
//!   purge. Appenders never take it, so appends proceed while a flush syncs.
//! - `layout` (rwlock): readers hold it shared while they `pread`; a truncation holds it
//!   exclusively while it shortens or deletes files, so a reader never sees a file
//!   change under it.
//!
//! # Group commit
//! `append` assigns each entry its segment and position, puts it in the tail cache and
//! returns: the entry is readable at once. `flush` takes `io`, and if the durable
//! watermark does not yet cover what the caller appended, writes *every* pending entry
//! with one vectored write per segment and one `fdatasync` per segment, then publishes
//! the watermark. Callers that queued on `io` meanwhile find their entries covered and
//! return without I/O: one write + one fsync serves them all.

use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering, RwLock};
use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::atomic_file;
use crate::config::{FsyncPolicy, LogConfig};
use crate::disk::{Disk, DiskFile};
use crate::entry::{decode_at, encode_header, Entry, EntryMeta, LogId, ENTRY_HEADER_LEN};
use crate::error::StorageError;
use crate::limits::{ENTRY_PAYLOAD_SIZE_MAX, FIND_CHUNK_BYTES_MIN, PENDING_BYTES_MAX, READ_CHUNK_BYTES_MAX};
use crate::segment::{segment_path, Segment};
use crate::watermark::Watermark;

/// Name of the file holding the purge point.
pub(crate) const PURGE_FILE: &str = "purged.meta";

/// An entry in the tail cache, with where it goes in its segment.
#[derive(Debug)]
struct Cached {
    entry: Entry,
    header: Bytes,
    segment_first_index: u64,
    position: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    /// Ordered by `first_index`; the last one is active. May be empty.
    pub segments: Vec<Segment>,
    /// Contiguous entries ending at the last entry. Holds every entry at or above
    /// `written_end`, plus recently written ones within the byte budget.
    cache: VecDeque<Cached>,
    cache_bytes: u64,
    /// Whether this log counts as a holder of the shared tail-cache budget (its cache
    /// was not empty when last accounted: `Log::account_cache`).
    cache_held: bool,
    /// Index the next append must carry.
    pub next_index: u64,
    /// Offset the next append must carry.
    pub next_offset: u64,
    /// Last entry present, if any entry is present.
    pub last: Option<LogId>,
    /// Last entry (or purge point) known durable: what the watermark's end points at.
    durable_last: Option<LogId>,
    /// Entries below this index are written to their files.
    written_end: u64,
    /// Bytes of entries appended but not yet written.
    pending_bytes: u64,
    /// Everything up to and including this id is gone.
    pub purged: Option<LogId>,
    /// Offset of the first message after the purge point.
    pub start_offset: u64,
    /// Set by a failed write or sync; every later write or flush fails with it.
    poisoned: Option<String>,
    /// A segment was created or deleted since the directory was last fsynced.
    dir_dirty: bool,
    /// Written bytes not yet fsynced (only under `FsyncPolicy::Interval`).
    unsynced: bool,
    last_sync: Instant,
}

/// A summary of the log's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogState {
    /// Last entry present (`None` if the log holds no entry).
    pub last: Option<LogId>,
    /// Purge point: entries up to here are gone.
    pub purged: Option<LogId>,
    /// Index of the first entry still readable.
    pub first_index: u64,
    /// Index the next append must carry.
    pub next_index: u64,
    /// Offset of the first message still readable.
    pub start_offset: u64,
    /// Offset the next append must carry.
    pub next_offset: u64,
    /// Entries below this index are durable.
    pub durable_end: u64,
}

/// One segment's extent (see [`Log::segment_extents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentExtent {
    pub first_index: u64,
    /// Last entry it holds (`None` while empty).
    pub last_index: Option<u64>,
    /// Offset one past its last message.
    pub end_offset: u64,
    /// File length, header included.
    pub bytes: u64,
    /// No longer appended to (a later segment exists).
    pub sealed: bool,
}

/// Counts of the I/O a log has done since it was opened (for metrics and tests).
#[derive(Debug, Default)]
struct IoCounters {
    writes: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
}

/// A snapshot of [`IoCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoStats {
    /// Vectored writes issued (one per segment per flush).
    pub writes: u64,
    /// `fdatasync` calls on segment files.
    pub fsyncs: u64,
    pub bytes_written: u64,
}

/// A segmented, checksummed, group-committed append-only log in one directory.
#[derive(Debug)]
pub struct Log {
    pub(crate) disk: Arc<dyn Disk>,
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) state: Mutex<State>,
    io: Mutex<()>,
    layout: RwLock<()>,
    /// Exclusive end index of durable entries.
    durable: Watermark,
    stats: IoCounters,
    /// Segment size in force, if set after opening (`set_segment_bytes`); 0: the config's.
    segment_bytes: AtomicU64,
    /// Segment age (ms) in force, if set after opening (`set_segment_age`); 0: the config's.
    segment_age_ms: AtomicU64,
    /// Distinct per `Log` opened in this process, in opening order (spreads logs over
    /// a `Flusher`'s lanes).
    instance: u64,
    /// Damage to durable data that opening the log cut off.
    pub(crate) damage_found: Vec<crate::open::DamageFound>,
    #[cfg(any(test, feature = "fault-injection"))]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A log's cache no longer counts against the shared budget once the log is gone.
impl Drop for Log {
    fn drop(&mut self) {
        if let Some(share) = &self.config.tail_cache_share {
            if self.lock_state().cache_held {
                share.holding(false);
            }
        }
    }
}

impl State {
    pub(crate) fn new(segments: Vec<Segment>, next_index: u64, next_offset: u64, last: Option<LogId>, purged: Option<LogId>, start_offset: u64) -> State {
        State {
            segments,
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_held: false,
            next_index,
            next_offset,
            last,
            durable_last: last,
            written_end: next_index,
            pending_bytes: 0,
            purged,
            start_offset,
            poisoned: None,
            dir_dirty: false,
            unsynced: false,
            last_sync: Instant::now(),
        }
    }

    fn first_index(&self) -> u64 {
        match self.purged {
            Some(p) => p.index + 1,
            None => self.segments.first().map_or(self.next_index, |s| s.first_index),
        }
    }

    fn cache_first(&self) -> u64 {
        self.cache.front().map_or(self.next_index, |c| c.entry.meta.id.index)
    }

    /// Checks the bookkeeping invariants of `storage/DESIGN.md` that the log relies on
    /// (1: segments chain by index; 2: `synced_len <= written_len <= len`; 3: the tail
    /// cache is contiguous and ends at the last entry; the purge point lies before every
    /// readable entry). `Err` names the first one broken. Run by debug builds after every
    /// change of the log's shape (open, truncate, purge, install).
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        for pair in self.segments.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if !a.sealed {
                return Err(format!("segment {} is followed by {} but not sealed", a.first_index, b.first_index));
            }
            if let Some(last) = a.last_index {
                if b.first_index != last + 1 {
                    return Err(format!("segment {} ends at {last} but the next starts at {}", a.first_index, b.first_index));
                }
            }
        }
        for seg in &self.segments {
            if !(seg.synced_len <= seg.written_len && seg.written_len <= seg.len) {
                return Err(format!("segment {}: synced {} / written {} / len {} out of order", seg.first_index, seg.synced_len, seg.written_len, seg.len));
            }
        }
        let mut expected = self.cache.front().map(|c| c.entry.meta.id.index);
        for c in &self.cache {
            if Some(c.entry.meta.id.index) != expected {
                return Err(format!("tail cache holds {} where {expected:?} was expected", c.entry.meta.id.index));
            }
            expected = Some(c.entry.meta.id.index + 1);
        }
        if let Some(end) = expected {
            if end != self.next_index {
                return Err(format!("tail cache ends at {end}, the log at {}", self.next_index));
            }
        }
        if self.cache_held == self.cache.is_empty() {
            return Err(format!("the tail cache holds {} entries but counts as held: {}", self.cache.len(), self.cache_held));
        }
        if let (Some(p), Some(first)) = (self.purged, self.segments.first().and_then(|s| s.last_index.map(|_| s.first_index))) {
            if first > p.index + 1 {
                return Err(format!("a hole: purged up to {} but the first segment starts at {first}", p.index));
            }
        }
        if self.last.is_some_and(|l| l.index + 1 != self.next_index) {
            return Err(format!("last entry {:?} but next index {}", self.last, self.next_index));
        }
        Ok(())
    }

    fn segment_for_index(&self, index: u64) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.first_index <= index);
        i.checked_sub(1)
    }
}

impl Log {
    pub(crate) fn from_parts(disk: Arc<dyn Disk>, dir: PathBuf, config: LogConfig, state: State) -> Log {
        let durable = Watermark::new(state.next_index);
        Log {
            disk,
            dir,
            config,
            state: Mutex::new(state),
            io: Mutex::new(()),
            layout: RwLock::new(()),
            durable,
            stats: IoCounters::default(),
            segment_bytes: AtomicU64::new(0),
            segment_age_ms: AtomicU64::new(0),
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            damage_found: Vec::new(),
            #[cfg(any(test, feature = "fault-injection"))]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A number distinct for every `Log` opened in this process, in opening order.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Damage to durable data found and cut off when this log was opened (empty after a
    /// clean start or a mere crash). Whether it cost anything acknowledged is for the
    /// ack ledger to say.
    pub fn damage_found_at_open(&self) -> &[crate::open::DamageFound] {
        &self.damage_found
    }

    /// The disk this log lives on (metadata files next to it belong on the same one).
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// In debug builds, panics if the log's bookkeeping breaks an invariant it relies on
    /// (`State::check_invariants`): a bug, caught where it happens.
    pub(crate) fn debug_check(&self, st: &State, after: &str) {
        if cfg!(debug_assertions) {
            if let Err(broken) = st.check_invariants() {
                panic!("{}: log invariant broken after {after}: {broken}", self.dir.display());
            }
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the state lock is a bug that has already crashed a
        // thread; continuing with possibly half-updated bookkeeping would be worse.
        self.state.lock().expect("log state lock poisoned by an earlier panic")
    }

    fn lock_io(&self) -> MutexGuard<'_, ()> {
        self.io.lock().expect("log io lock poisoned by an earlier panic")
    }

    fn poisoned_error(&self, cause: &str) -> StorageError {
        StorageError::Poisoned { path: self.dir.clone(), cause: cause.to_string() }
    }

    /// The durable watermark: entries with index below `durable().get()` are on disk.
    pub fn durable(&self) -> &Watermark {
        &self.durable
    }

    /// I/O done since open.
    pub fn io_stats(&self) -> IoStats {
        IoStats {
            writes: self.stats.writes.load(Ordering::Relaxed),
            fsyncs: self.stats.fsyncs.load(Ordering::Relaxed),
            bytes_written: self.stats.bytes_written.load(Ordering::Relaxed),
        }
    }

    pub fn state(&self) -> LogState {
        let st = self.lock_state();
        LogState {
            last: st.last,
            purged: st.purged,
            first_index: st.first_index(),
            next_index: st.next_index,
            start_offset: st.start_offset,
            next_offset: st.next_offset,
            durable_end: self.durable.get(),
        }
    }

    /// The id of the last durable entry (or the purge point, if nothing after it is
    /// durable yet): what an ack ledger records after a flush.
    pub fn durable_last(&self) -> Option<LogId> {
        self.lock_state().durable_last
    }

    /// Sets the size at which the active segment rolls (clamped to the storage bounds);
    /// takes effect at the next append.
    pub fn set_segment_bytes(&self, bytes: u64) {
        let bytes = bytes.clamp(crate::limits::SEGMENT_BYTES_MIN, crate::limits::SEGMENT_BYTES_MAX);
        self.segment_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The size at which the active segment rolls.
    pub fn segment_bytes(&self) -> u64 {
        match self.segment_bytes.load(Ordering::Relaxed) {
            0 => self.config.segment_bytes,
            b => b,
        }
    }

    /// Bytes of all segment files (what the log holds on disk, indexes aside).
    pub fn segment_bytes_total(&self) -> u64 {
        self.lock_state().segments.iter().map(|s| s.len).sum()
    }

    /// Sets the age at which the active segment rolls at its next append (at most the
    /// config's; at least one second).
    pub fn set_segment_age(&self, age: std::time::Duration) {
        let ms = (age.as_millis().min(u128::from(u64::MAX)) as u64).clamp(1_000, self.config.segment_age.as_millis() as u64);
        self.segment_age_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn segment_age_ms(&self) -> i64 {
        match self.segment_age_ms.load(Ordering::Relaxed) {
            0 => self.config.segment_age.as_millis() as i64,
            ms => ms as i64,
        }
    }

    /// Every segment's extent, oldest first (for retention decisions and disk reports).
    pub fn segment_extents(&self) -> Vec<SegmentExtent> {
        let st = self.lock_state();
        st.segments
            .iter()
            .map(|s| SegmentExtent { first_index: s.first_index, last_index: s.last_index, end_offset: s.end_offset, bytes: s.len, sealed: s.sealed })
            .collect()
    }

    /// The offset the next appended entry must carry as its `base_offset`.
    pub fn next_offset(&self) -> u64 {
        self.lock_state().next_offset
    }
}

mod append;
mod install;
mod read;
mod truncate;

pub(crate) use install::finish_install;
pub(crate) use truncate::remove_segment_files;

#[cfg(test)]
mod tests;
