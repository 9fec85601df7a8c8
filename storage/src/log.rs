//! The partition log: segments, the tail cache, group commit, truncation and purge.
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

impl State {
    pub(crate) fn new(segments: Vec<Segment>, next_index: u64, next_offset: u64, last: Option<LogId>, purged: Option<LogId>, start_offset: u64) -> State {
        State {
            segments,
            cache: VecDeque::new(),
            cache_bytes: 0,
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

    /// The offset the next appended entry must carry as its `base_offset`.
    pub fn next_offset(&self) -> u64 {
        self.lock_state().next_offset
    }

    /// Appends entries. They are readable when this returns and durable after a
    /// `flush` (or a `Flusher` callback). All entries are checked before any is
    /// accepted: on `Err`, nothing was appended.
    ///
    /// Contract: indexes are contiguous from `next_index` (a log holding no entry and
    /// no purge point accepts any first index), terms never go down, and each
    /// `base_offset` equals the previous entry's end offset (`next_offset()`).
    pub fn append(&self, entries: impl IntoIterator<Item = Entry>) -> Result<(), StorageError> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(());
        }
        let over_bound = {
            let mut st = self.lock_state();
            if let Some(cause) = &st.poisoned {
                return Err(self.poisoned_error(cause));
            }
            Self::check_append(&st, &entries)?;
            if st.last.is_none() && st.purged.is_none() {
                // A log with no entry starts wherever its first append says.
                st.next_index = entries[0].meta.id.index;
                st.written_end = st.next_index;
                self.durable.reset(st.next_index);
            }
            for entry in entries {
                self.append_one(&mut st, entry)?;
            }
            st.pending_bytes > PENDING_BYTES_MAX
        };
        if over_bound {
            // Bound memory: write the pending entries out now (no fsync).
            let _io = self.lock_io();
            self.write_pending(false)?;
        }
        Ok(())
    }

    fn check_append(st: &State, entries: &[Entry]) -> Result<(), StorageError> {
        let fresh = st.last.is_none() && st.purged.is_none();
        let first_index = if fresh { entries[0].meta.id.index } else { st.next_index };
        let mut next_offset = st.next_offset;
        let mut last_term = st.last.map_or(0, |l| l.term);
        for (next_index, e) in (first_index..).zip(entries) {
            let m = &e.meta;
            if e.payload.len() as u64 > ENTRY_PAYLOAD_SIZE_MAX {
                return Err(StorageError::EntryTooLarge { size: e.payload.len() as u64, max: ENTRY_PAYLOAD_SIZE_MAX });
            }
            if m.id.index != next_index {
                return Err(StorageError::InvalidAppend { reason: format!("entry index {} where {next_index} was expected", m.id.index) });
            }
            if m.id.term < last_term {
                return Err(StorageError::InvalidAppend { reason: format!("term goes down from {last_term} to {} at index {}", m.id.term, m.id.index) });
            }
            if m.base_offset != next_offset {
                return Err(StorageError::InvalidAppend {
                    reason: format!("base offset {} at index {} where {next_offset} was expected", m.base_offset, m.id.index),
                });
            }
            next_offset = m.end_offset();
            last_term = m.id.term;
        }
        Ok(())
    }

    fn append_one(&self, st: &mut State, entry: Entry) -> Result<(), StorageError> {
        let stored_len = entry.stored_len();
        let now = now_ms();
        let roll = match st.segments.last() {
            None => true,
            Some(active) => {
                active.last_index.is_some()
                    && (active.len + stored_len > self.config.segment_bytes
                        || now.saturating_sub(active.created_ms) >= self.config.segment_age.as_millis() as i64)
            }
        };
        if roll {
            let segment =
                Segment::create(&*self.disk, &self.dir, entry.meta.id.index, entry.meta.base_offset, now).inspect_err(|e| st.poisoned = Some(e.to_string()))?;
            if let Some(prev) = st.segments.last_mut() {
                prev.sealed = true;
            }
            st.segments.push(segment);
            st.dir_dirty = true;
        }
        let active = st.segments.last_mut().expect("a segment exists: created just above if there was none");
        let position = active.len;
        let header = Bytes::copy_from_slice(&encode_header(&entry, active.synced_len));
        active.len += stored_len;
        active.index.note_append(&entry.meta, position, self.config.index_interval_bytes);
        active.last_index = Some(entry.meta.id.index);
        active.end_offset = entry.meta.end_offset();
        let segment_first_index = active.first_index;
        debug_assert!(st.cache.back().is_none_or(|c| c.entry.meta.id.index + 1 == entry.meta.id.index), "tail cache stays contiguous");
        st.next_index = entry.meta.id.index + 1;
        st.next_offset = entry.meta.end_offset();
        st.last = Some(entry.meta.id);
        st.pending_bytes += stored_len;
        st.cache_bytes += stored_len;
        st.cache.push_back(Cached { entry, header, segment_first_index, position });
        Ok(())
    }

    /// Makes every entry appended before this call durable (group commit: concurrent
    /// callers share one write and one fsync). Returns the durable end index.
    pub fn flush(&self) -> Result<u64, StorageError> {
        let target = {
            let st = self.lock_state();
            if let Some(cause) = &st.poisoned {
                return Err(self.poisoned_error(cause));
            }
            st.next_index
        };
        if self.durable.get() >= target {
            return Ok(self.durable.get());
        }
        let _io = self.lock_io();
        if self.durable.get() >= target {
            return Ok(self.durable.get());
        }
        self.write_pending(true)
    }

    /// Under `FsyncPolicy::Interval`, fsyncs written data if the interval has passed.
    /// A no-op under `Always` (every flush already syncs).
    pub fn sync_if_due(&self) -> Result<(), StorageError> {
        let FsyncPolicy::Interval(interval) = self.config.fsync else {
            return Ok(());
        };
        let _io = self.lock_io();
        let files: Vec<(Arc<dyn DiskFile>, PathBuf, u64, u64)> = {
            let st = self.lock_state();
            if !st.unsynced || st.last_sync.elapsed() < interval {
                return Ok(());
            }
            st.segments.iter().filter(|s| s.synced_len < s.written_len).map(|s| (s.file.clone(), s.path.clone(), s.first_index, s.written_len)).collect()
        };
        for (file, path, _, _) in &files {
            self.sync_file(&**file, path)?;
        }
        let mut st = self.lock_state();
        for (_, _, first, len) in files {
            if let Some(s) = st.segments.iter_mut().find(|s| s.first_index == first) {
                s.synced_len = s.synced_len.max(len.min(s.written_len));
            }
        }
        st.unsynced = false;
        st.last_sync = Instant::now();
        Ok(())
    }

    /// Writes every pending entry (one vectored write per segment) and, if `sync` and
    /// the policy asks for it, fsyncs. Caller holds `io`.
    fn write_pending(&self, sync: bool) -> Result<u64, StorageError> {
        struct Group {
            first_index: u64,
            file: Arc<dyn DiskFile>,
            path: PathBuf,
            start: u64,
            end: u64,
            pieces: Vec<Bytes>,
        }
        let (groups, end_index, dir_dirty, sync_due) = {
            let mut st = self.lock_state();
            if let Some(cause) = &st.poisoned {
                return Err(self.poisoned_error(cause));
            }
            let mut groups: Vec<Group> = Vec::new();
            let skip = (st.written_end - st.cache_first()) as usize;
            for c in st.cache.iter().skip(skip) {
                let same = groups.last().is_some_and(|g| g.first_index == c.segment_first_index);
                if !same {
                    let seg = &st.segments[st.segment_for_index(c.entry.meta.id.index).expect("a cached entry belongs to a segment")];
                    debug_assert_eq!(seg.first_index, c.segment_first_index);
                    groups.push(Group {
                        first_index: seg.first_index,
                        file: seg.file.clone(),
                        path: seg.path.clone(),
                        start: c.position,
                        end: c.position,
                        pieces: Vec::new(),
                    });
                }
                let g = groups.last_mut().expect("pushed above");
                debug_assert_eq!(g.end, c.position, "entries of a segment are contiguous");
                g.pieces.push(c.header.clone());
                g.pieces.push(c.entry.payload.clone());
                g.end = c.position + c.entry.stored_len();
            }
            let sync_due = match self.config.fsync {
                FsyncPolicy::Always => sync,
                FsyncPolicy::Interval(d) => sync && st.last_sync.elapsed() >= d,
            };
            (groups, (st.next_index, st.last), std::mem::take(&mut st.dir_dirty), sync_due)
        };
        let (end_index, end_last) = end_index;
        let durable_now = sync_due || matches!(self.config.fsync, FsyncPolicy::Interval(_)) && sync;
        let group_count = groups.len();
        let mut synced = Vec::with_capacity(group_count);
        for (i, g) in groups.iter().enumerate() {
            self.write_vectored_at(&*g.file, &g.path, g.start, &g.pieces)?;
            // A later segment's bytes reach the disk only after the earlier segment is
            // synced, so recovery never finds a torn segment followed by a non-empty one.
            let is_last = i + 1 == group_count;
            let do_sync = sync_due || !is_last;
            if do_sync {
                self.sync_file(&*g.file, &g.path)?;
            }
            synced.push(do_sync);
        }
        if sync_due && dir_dirty {
            atomic_file::sync_dir(&*self.disk, &self.dir).inspect_err(|e| self.poison(e))?;
        }
        let mut to_persist = Vec::new();
        {
            let mut st = self.lock_state();
            if !sync_due && dir_dirty {
                st.dir_dirty = true;
            }
            for (g, did_sync) in groups.iter().zip(&synced) {
                if let Some(seg) = st.segments.iter_mut().find(|s| s.first_index == g.first_index) {
                    seg.written_len = seg.written_len.max(g.end);
                    if *did_sync {
                        seg.synced_len = seg.synced_len.max(g.end);
                    }
                    debug_assert!(seg.synced_len <= seg.written_len, "invariant 2: synced within written");
                    debug_assert!(seg.written_len <= seg.len, "invariant 2: written within assigned");
                }
            }
            st.written_end = end_index;
            st.pending_bytes = 0;
            if durable_now {
                st.durable_last = end_last;
            }
            if sync_due {
                st.last_sync = Instant::now();
                st.unsynced = false;
            } else if !groups.is_empty() {
                st.unsynced = true;
            }
            self.evict_cache(&mut st);
            for seg in st.segments.iter_mut() {
                let Some(last_index) = seg.last_index else { continue };
                if seg.sealed && !seg.index_persisted && seg.synced_len == seg.len {
                    let index = std::mem::replace(&mut seg.index, crate::index::SparseIndex::new());
                    let summary = crate::index::SegmentSummary {
                        covered_len: seg.len,
                        last_index,
                        end_offset: seg.end_offset,
                        max_timestamp_ms: index.max_timestamp_ms(),
                    };
                    to_persist.push((seg.first_index, index, summary));
                }
            }
        }
        // Publish only after the bookkeeping above: a reader that sees the new
        // watermark also sees the entries' new state (see `watermark`).
        if durable_now {
            self.durable.advance(end_index);
        }
        // Sealed, durable segments get their index files. Readers scan from the
        // segment start while the index is out: slower, never wrong.
        for (first_index, mut index, summary) in to_persist {
            let persisted = index.persist(&*self.disk, &self.dir, first_index, &summary);
            if let Err(e) = &persisted {
                tracing::warn!(error = %e, first_index, "could not write segment index files; they will be rebuilt at the next open");
            }
            let mut st = self.lock_state();
            if let Some(seg) = st.segments.iter_mut().find(|s| s.first_index == first_index) {
                seg.index = index;
                seg.index_persisted = persisted.is_ok();
            }
        }
        Ok(self.durable.get())
    }

    fn write_vectored_at(&self, file: &dyn DiskFile, path: &Path, start: u64, pieces: &[Bytes]) -> Result<(), StorageError> {
        let slices: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
        let result = file.write_all_at(start, &slices);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_written.fetch_add(pieces.iter().map(|p| p.len() as u64).sum(), Ordering::Relaxed);
        result.map_err(|e| {
            let err = StorageError::io("write segment", path, e);
            self.poison(&err);
            err
        })
    }

    fn sync_file(&self, file: &dyn DiskFile, path: &Path) -> Result<(), StorageError> {
        #[cfg(any(test, feature = "fault-injection"))]
        if self.fail_next_sync.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let err = StorageError::io("fdatasync", path, std::io::Error::from_raw_os_error(5));
            self.poison(&err);
            return Err(err);
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        #[cfg(any(test, feature = "fault-injection"))]
        crate::observe::injected_fsync_delay();
        let result = file.sync_data();
        crate::observe::fsync_done(started.elapsed());
        result.map_err(|e| {
            let err = StorageError::io("fdatasync", path, e);
            self.poison(&err);
            err
        })
    }

    /// Marks the log failed. Never undone: the pages a failed fsync covered may be
    /// gone from the page cache, so a later successful fsync would prove nothing.
    fn poison(&self, cause: &StorageError) {
        tracing::error!(error = %cause, dir = %self.dir.display(), "log poisoned; refusing further writes");
        let mut st = self.lock_state();
        st.poisoned.get_or_insert_with(|| cause.to_string());
        drop(st);
        self.durable.close();
    }

    /// Test hook: the next fsync fails with EIO.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_sync_failure(&self) {
        self.fail_next_sync.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn evict_cache(&self, st: &mut State) {
        while st.cache_bytes > self.config.tail_cache_bytes {
            let Some(front) = st.cache.front() else { break };
            if front.entry.meta.id.index >= st.written_end {
                break;
            }
            st.cache_bytes -= front.entry.stored_len();
            st.cache.pop_front();
        }
        debug_assert!(st.cache_first() <= st.written_end, "invariant 3: every unwritten entry stays cached");
    }

    /// Removes every entry after `keep` (all entries if `None`). Earlier appends are
    /// made durable first, and the truncation is durable when this returns.
    pub fn truncate_after(&self, keep: Option<u64>) -> Result<(), StorageError> {
        let _io = self.lock_io();
        self.write_pending(true)?;
        let _layout = self.layout.write().expect("layout lock poisoned by an earlier panic");
        let mut st = self.lock_state();
        let Some(last) = st.last else { return Ok(()) };
        if keep.is_some_and(|k| k >= last.index) {
            return Ok(());
        }
        if let (Some(k), Some(p)) = (keep, st.purged) {
            if k < p.index {
                return Err(StorageError::InvalidAppend { reason: format!("cannot truncate after {k}: entries up to {} are purged", p.index) });
            }
        }
        // The kept last entry's metadata, read before anything changes.
        let kept_meta = match keep {
            Some(k) if st.purged.is_none_or(|p| k > p.index) => Some(self.meta_at(&st, k)?),
            _ => None,
        };
        let cut_index = keep.map_or(0, |k| k + 1);
        let mut removed_files = false;
        while let Some(seg) = st.segments.last() {
            if seg.first_index < cut_index {
                break;
            }
            let seg = st.segments.pop().expect("checked non-empty");
            remove_segment_files(&*self.disk, &self.dir, &seg)?;
            removed_files = true;
        }
        if let Some(seg_pos) = st.segments.len().checked_sub(1) {
            let cut_position = self.position_of(&st, seg_pos, cut_index)?;
            let seg = &mut st.segments[seg_pos];
            if let Some(cut) = cut_position {
                seg.file.set_len(cut).map_err(|e| StorageError::io("truncate segment", &seg.path, e))?;
                let path = seg.path.clone();
                let file = seg.file.clone();
                self.sync_file(&*file, &path)?;
                let seg = &mut st.segments[seg_pos];
                seg.len = cut;
                seg.written_len = cut;
                seg.synced_len = cut;
                let max_ts = seg.index.max_timestamp_ms();
                seg.index.truncate_at(cut, max_ts);
            }
            let seg = &mut st.segments[seg_pos];
            if seg.index_persisted || seg.sealed {
                for ext in ["index", "timeindex"] {
                    let _ = self.disk.remove_file(&self.dir.join(format!("{:020}.{ext}", seg.first_index)));
                }
                seg.index_persisted = false;
                seg.sealed = false;
            }
            seg.last_index = keep.filter(|k| *k >= seg.first_index);
            if let Some(m) = kept_meta {
                seg.end_offset = m.end_offset();
            }
        }
        if removed_files {
            atomic_file::sync_dir(&*self.disk, &self.dir).inspect_err(|e| self.poison(e))?;
        }
        while st.cache.back().is_some_and(|c| c.entry.meta.id.index >= cut_index) {
            let c = st.cache.pop_back().expect("checked non-empty");
            st.cache_bytes -= c.entry.stored_len();
        }
        match kept_meta {
            Some(m) => {
                st.next_index = m.id.index + 1;
                st.next_offset = m.end_offset();
                st.last = Some(m.id);
            }
            None => {
                // Everything after the purge point (or everything) is gone.
                st.next_index = st.purged.map_or(0, |p| p.index + 1);
                st.next_offset = st.start_offset;
                st.last = st.purged;
            }
        }
        st.written_end = st.next_index;
        st.durable_last = st.last;
        self.durable.reset(st.next_index);
        Ok(())
    }

    /// Deletes entries up to and including `upto`: the purge point is persisted first,
    /// then whole segments at or below it are deleted. The active segment is kept
    /// (its purged entries are hidden) unless the purge covers the whole log.
    pub fn purge_upto(&self, upto: LogId) -> Result<(), StorageError> {
        let _io = self.lock_io();
        // Nothing purged may still be waiting to be written.
        self.write_pending(true)?;
        let _layout = self.layout.write().expect("layout lock poisoned by an earlier panic");
        let mut st = self.lock_state();
        if st.purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        let whole_log = st.last.is_none_or(|l| upto.index >= l.index);
        let start_offset = if whole_log { st.next_offset } else { self.meta_at(&st, upto.index + 1)?.base_offset };
        let mut meta = Vec::with_capacity(24);
        for w in [upto.term, upto.index, start_offset] {
            meta.extend_from_slice(&w.to_le_bytes());
        }
        atomic_file::write(&*self.disk, &self.dir, PURGE_FILE, &meta)?;
        st.purged = Some(upto);
        st.start_offset = start_offset;
        let mut removed = false;
        while let Some(seg) = st.segments.first() {
            let is_active = st.segments.len() == 1;
            let covered = seg.last_index.is_none_or(|l| l <= upto.index);
            if !covered || (is_active && !whole_log) {
                break;
            }
            let seg = st.segments.remove(0);
            remove_segment_files(&*self.disk, &self.dir, &seg)?;
            removed = true;
        }
        while st.cache.front().is_some_and(|c| c.entry.meta.id.index <= upto.index) {
            let c = st.cache.pop_front().expect("checked non-empty");
            st.cache_bytes -= c.entry.stored_len();
        }
        if whole_log {
            st.next_index = st.next_index.max(upto.index + 1);
            st.last = Some(st.last.filter(|l| l.index > upto.index).unwrap_or(upto));
            st.written_end = st.next_index;
            st.pending_bytes = 0;
            st.durable_last = st.last;
            self.durable.advance(st.next_index);
        }
        if removed {
            atomic_file::sync_dir(&*self.disk, &self.dir)?;
        }
        Ok(())
    }

    /// The retention cut under `config.retention`: the id of the last entry of the
    /// newest sealed segment that retention says may go, or `None`.
    pub fn retention_cut(&self, now_ms: i64) -> Result<Option<LogId>, StorageError> {
        let st = self.lock_state();
        let policy = self.config.retention;
        let total: u64 = st.segments.iter().map(Segment::entry_bytes).sum();
        let mut remaining = total;
        let mut cut = None;
        for seg in st.segments.iter().filter(|s| s.sealed) {
            let Some(last) = seg.last_index else { continue };
            let too_old = policy.max_age.is_some_and(|age| seg.index.max_timestamp_ms() < now_ms.saturating_sub(age.as_millis() as i64));
            let too_big = policy.max_bytes.is_some_and(|max| remaining > max);
            if !(too_old || too_big) {
                break;
            }
            remaining -= seg.entry_bytes();
            cut = Some(last);
        }
        match cut {
            Some(index) if st.purged.is_none_or(|p| p.index < index) => Ok(Some(self.meta_at(&st, index)?.id)),
            _ => Ok(None),
        }
    }

    /// Applies retention: computes the cut and purges up to it.
    pub fn apply_retention(&self, now_ms: i64) -> Result<Option<LogId>, StorageError> {
        let cut = self.retention_cut(now_ms)?;
        if let Some(id) = cut {
            self.purge_upto(id)?;
        }
        Ok(cut)
    }

    /// Metadata of the entry at `index` (from the cache or the file). Caller holds `state`.
    fn meta_at(&self, st: &State, index: u64) -> Result<EntryMeta, StorageError> {
        if index >= st.cache_first() && index < st.next_index {
            return Ok(st.cache[(index - st.cache_first()) as usize].entry.meta);
        }
        let entries = self.read_files(st, index..index + 1, 1)?;
        entries.into_iter().next().map(|e| e.meta).ok_or_else(|| StorageError::Corrupt {
            path: self.dir.clone(),
            position: 0,
            reason: format!("entry {index} is missing from its segment"),
        })
    }

    /// Byte position of entry `index` in segment `seg_pos`, or `None` if the segment
    /// ends before it. Caller holds `state`.
    fn position_of(&self, st: &State, seg_pos: usize, index: u64) -> Result<Option<u64>, StorageError> {
        let seg = &st.segments[seg_pos];
        if seg.last_index.is_none_or(|l| index > l) {
            return Ok(None);
        }
        let (mut at_index, mut pos) = seg.index.floor_by_index(index).unwrap_or((seg.first_index, crate::segment::SEGMENT_HEADER_LEN));
        let mut header = [0u8; ENTRY_HEADER_LEN];
        while at_index < index {
            seg.file.read_exact_at(&mut header, pos).map_err(|e| StorageError::io("read segment", &seg.path, e))?;
            let len = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
            pos += ENTRY_HEADER_LEN as u64 + len;
            at_index += 1;
        }
        Ok(Some(pos))
    }

    /// Entries with indexes in `range` (clipped to what the log holds), in order, up to
    /// about `max_bytes` of payload but always at least one entry if any is in range.
    ///
    /// File reads happen without the state lock: the plan (files, positions) is taken
    /// under it, then the shared `layout` lock alone keeps those bytes in place.
    pub fn read(&self, range: Range<u64>, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let _layout = self.layout.read().expect("layout lock poisoned by an earlier panic");
        let (file_range, plans, cached) = {
            let st = self.lock_state();
            let start = range.start.max(st.first_index());
            let end = range.end.min(st.next_index);
            if start >= end {
                return Ok(Vec::new());
            }
            let cache_first = st.cache_first();
            let file_range = start..end.min(cache_first);
            let plans = plan_segment_reads(&st, file_range.clone());
            // Clone at most a budget's worth (plus one entry) of cached entries.
            let mut cached = Vec::new();
            let mut cached_bytes = 0u64;
            for index in start.max(cache_first)..end {
                if cached_bytes >= max_bytes && !cached.is_empty() {
                    break;
                }
                let c = &st.cache[(index - cache_first) as usize];
                cached_bytes += c.entry.payload.len() as u64;
                cached.push(c.entry.clone());
            }
            (file_range, plans, cached)
        };
        let mut out = read_planned(&plans, file_range.clone(), max_bytes)?;
        let mut bytes: u64 = out.iter().map(|e| e.payload.len() as u64).sum();
        let next = out.last().map_or(file_range.start, |e| e.meta.id.index + 1);
        if next >= file_range.end {
            for entry in cached {
                if bytes >= max_bytes && !out.is_empty() {
                    break;
                }
                debug_assert_eq!(entry.meta.id.index, out.last().map_or(next, |e| e.meta.id.index + 1), "read results are contiguous");
                bytes += entry.payload.len() as u64;
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Reads entries `range` from segment files with the state lock held (for the rare
    /// callers that already hold it: truncate, purge, retention).
    fn read_files(&self, st: &State, range: Range<u64>, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        read_planned(&plan_segment_reads(st, range.clone()), range, max_bytes)
    }

    /// Index of the first entry holding a message at or after `offset` (the entry
    /// containing it, or the next one), or `None` if no entry at or after it exists.
    pub fn index_for_offset(&self, offset: u64) -> Result<Option<u64>, StorageError> {
        self.find_first(|m| m.end_offset() > offset && m.record_count > 0, |seg| seg.end_offset > offset, |seg| seg.index.floor_by_offset(offset))
    }

    /// Index of the first entry whose newest message is at or after `timestamp_ms`.
    pub fn index_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StorageError> {
        self.find_first(
            |m| m.max_timestamp_ms >= timestamp_ms && m.record_count > 0,
            |seg| seg.index.max_timestamp_ms() >= timestamp_ms,
            |seg| seg.index.floor_by_time(timestamp_ms),
        )
    }

    fn find_first(
        &self,
        matches: impl Fn(&EntryMeta) -> bool,
        segment_may_hold: impl Fn(&Segment) -> bool,
        floor: impl Fn(&Segment) -> Option<(u64, u64)>,
    ) -> Result<Option<u64>, StorageError> {
        let _layout = self.layout.read().expect("layout lock poisoned by an earlier panic");
        let (candidates, cached) = {
            let st = self.lock_state();
            let first = st.first_index();
            let cache_first = st.cache_first();
            let mut candidates = Vec::new();
            for seg in st.segments.iter() {
                let Some(last) = seg.last_index else { continue };
                if last < first || seg.first_index >= cache_first || !segment_may_hold(seg) {
                    continue;
                }
                let from = floor(seg).map_or(seg.first_index, |(i, _)| i).max(first);
                let range = from..(last + 1).min(cache_first);
                candidates.push((plan_segment_reads(&st, range.clone()), range));
            }
            let cached: Vec<EntryMeta> = st.cache.iter().map(|c| c.entry.meta).filter(|m| m.id.index >= first).collect();
            (candidates, cached)
        };
        for (plans, range) in candidates {
            let mut next = range.start;
            // The entry sought is normally within one index interval of the floor:
            // read small first, and more only while it is not found.
            let mut chunk = FIND_CHUNK_BYTES_MIN;
            while next < range.end {
                let batch = read_planned(&plans, next..range.end, chunk)?;
                chunk = (chunk * 2).min(READ_CHUNK_BYTES_MAX);
                let Some(tail) = batch.last() else { break };
                next = tail.meta.id.index + 1;
                if let Some(e) = batch.iter().find(|e| matches(&e.meta)) {
                    return Ok(Some(e.meta.id.index));
                }
            }
        }
        Ok(cached.iter().find(|m| matches(m)).map(|m| m.id.index))
    }
}

/// What reading one segment needs, copied out of the state so the read can run
/// without the state lock.
struct SegmentRead {
    file: Arc<dyn DiskFile>,
    path: PathBuf,
    first_index: u64,
    /// Entries and bytes at or after this `(index, position)` may be read.
    floor: (u64, u64),
    /// Bytes below this are written to the file.
    written_len: u64,
    last_index: u64,
}

/// The segments holding `range`, each with the index row to start from.
fn plan_segment_reads(st: &State, range: Range<u64>) -> Vec<SegmentRead> {
    let mut plans = Vec::new();
    if range.start >= range.end {
        return plans;
    }
    let Some(first_pos) = st.segment_for_index(range.start) else { return plans };
    for seg in &st.segments[first_pos..] {
        if seg.first_index >= range.end {
            break;
        }
        let Some(last_index) = seg.last_index else { continue };
        let target = range.start.max(seg.first_index);
        let floor = seg.index.floor_by_index(target).unwrap_or((seg.first_index, crate::segment::SEGMENT_HEADER_LEN));
        plans.push(SegmentRead {
            file: seg.file.clone(),
            path: seg.path.clone(),
            first_index: seg.first_index,
            floor,
            written_len: seg.written_len,
            last_index,
        });
    }
    plans
}

/// Reads entries `range` following `plans`, verifying every checksum and index.
/// The caller holds `layout` so the planned bytes cannot change.
fn read_planned(plans: &[SegmentRead], range: Range<u64>, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
    let mut out: Vec<Entry> = Vec::new();
    let mut bytes = 0u64;
    let mut next = range.start;
    for plan in plans {
        if next >= range.end || (bytes >= max_bytes && !out.is_empty()) {
            break;
        }
        if plan.last_index < next {
            continue;
        }
        let (mut at_index, mut pos) =
            if plan.first_index <= next && plan.floor.0 <= next { plan.floor } else { (plan.first_index, crate::segment::SEGMENT_HEADER_LEN) };
        let seg_end = plan.written_len;
        while next < range.end && next <= plan.last_index && pos < seg_end && (out.is_empty() || bytes < max_bytes) {
            let want = max_bytes.saturating_sub(bytes).saturating_add(ENTRY_HEADER_LEN as u64).clamp(64 * 1024, READ_CHUNK_BYTES_MAX).min(seg_end - pos);
            let chunk = read_entry_chunk(plan, pos, want)?;
            let mut rel = 0usize;
            loop {
                let d = match decode_at(&chunk, rel) {
                    Ok(d) => d,
                    // The chunk ends inside a later entry: continue from it.
                    Err(crate::entry::DecodeFailure::Incomplete) if rel > 0 => break,
                    Err(f) => {
                        return Err(StorageError::Corrupt { path: plan.path.clone(), position: pos + rel as u64, reason: f.describe().to_string() });
                    }
                };
                if d.meta.id.index != at_index {
                    return Err(StorageError::Corrupt {
                        path: plan.path.clone(),
                        position: pos + rel as u64,
                        reason: format!("found entry {} where {at_index} was expected", d.meta.id.index),
                    });
                }
                if at_index >= next {
                    bytes += d.payload.len() as u64;
                    out.push(Entry { meta: d.meta, payload: chunk.slice(d.payload.clone()) });
                    next = at_index + 1;
                }
                at_index += 1;
                rel = d.end();
                if next >= range.end || next > plan.last_index || (bytes >= max_bytes && !out.is_empty()) || rel >= chunk.len() {
                    break;
                }
            }
            pos += rel as u64;
        }
        if next <= plan.last_index {
            // Stopped inside this segment: the range or the byte budget is done.
            break;
        }
    }
    Ok(out)
}

fn read_entry_chunk(seg: &SegmentRead, pos: u64, want: u64) -> Result<Bytes, StorageError> {
    let seg_end = seg.written_len;
    let mut header = [0u8; ENTRY_HEADER_LEN];
    seg.file.read_exact_at(&mut header, pos).map_err(|e| StorageError::io("read segment", &seg.path, e))?;
    let entry_len = ENTRY_HEADER_LEN as u64 + u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
    if entry_len > ENTRY_HEADER_LEN as u64 + ENTRY_PAYLOAD_SIZE_MAX || pos + entry_len > seg_end {
        return Err(StorageError::Corrupt { path: seg.path.clone(), position: pos, reason: "entry length runs past the written data".into() });
    }
    read_chunk(&*seg.file, &seg.path, pos, want.max(entry_len))
}

fn read_chunk(file: &dyn DiskFile, path: &Path, pos: u64, len: u64) -> Result<Bytes, StorageError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, pos).map_err(|e| StorageError::io("read segment", path, e))?;
    Ok(Bytes::from(buf))
}

pub(crate) fn remove_segment_files(disk: &dyn Disk, dir: &Path, seg: &Segment) -> Result<(), StorageError> {
    disk.remove_file(&seg.path).map_err(|e| StorageError::io("delete segment", &seg.path, e))?;
    for ext in ["index", "timeindex"] {
        let p = dir.join(format!("{:020}.{ext}", seg.first_index));
        match disk.remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("delete index", &p, e)),
        }
    }
    debug_assert!(!disk.exists(&segment_path(dir, seg.first_index)));
    Ok(())
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
