//! Appending and group commit: entries into the tail cache, then one vectored write
//! and one `fdatasync` per segment for everything pending (see the module docs).

use super::*;

/// The page size assumed when rounding a synced range down to whole pages before
/// advising the OS to drop it (`LogConfig::drop_synced_pages`). Where pages are larger,
/// the OS rounds the range inwards itself, so the page an append extends is never
/// dropped.
const SYNCED_PAGE_BYTES: u64 = 4096;

impl Log {
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

    pub(super) fn check_append(st: &State, entries: &[Entry]) -> Result<(), StorageError> {
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

    pub(super) fn append_one(&self, st: &mut State, entry: Entry) -> Result<(), StorageError> {
        let stored_len = entry.stored_len();
        let now = now_ms();
        let roll = match st.segments.last() {
            None => true,
            Some(active) => {
                active.last_index.is_some()
                    && (active.len + stored_len > self.segment_bytes() || now.saturating_sub(active.created_ms) >= self.segment_age_ms())
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
        self.account_cache(st);
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
        let mut synced = Vec::with_capacity(files.len());
        for (file, _, first, len) in files {
            if let Some(s) = st.segments.iter_mut().find(|s| s.first_index == first) {
                let before = s.synced_len;
                s.synced_len = s.synced_len.max(len.min(s.written_len));
                if self.config.drop_synced_pages {
                    synced.push((file, before, s.synced_len));
                }
            }
        }
        st.unsynced = false;
        st.last_sync = Instant::now();
        drop(st);
        self.drop_synced_pages(&synced);
        Ok(())
    }

    /// Advises the OS to drop the page-cache pages of bytes that just became synced
    /// (`(file, synced before, synced now)` per segment; collected only when the config
    /// asks for it). The
    /// page holding a segment's synced end is kept when the end is not on a page
    /// boundary: the next append extends it, and a dropped partial page would have to be
    /// read back from the disk first.
    fn drop_synced_pages(&self, synced: &[(Arc<dyn DiskFile>, u64, u64)]) {
        for (file, before, now) in synced {
            let from = before - before % SYNCED_PAGE_BYTES;
            // Rounded down here: Linux drops a partial page at the end of the file too.
            let to = now - now % SYNCED_PAGE_BYTES;
            if to <= from {
                continue;
            }
            if let Err(e) = file.drop_cached(from, to) {
                tracing::debug!(error = %e, dir = %self.dir.display(), "page-cache advice refused; the pages stay cached");
            }
        }
    }

    /// Writes every pending entry (one vectored write per segment) and, if `sync` and
    /// the policy asks for it, fsyncs. Caller holds `io`.
    pub(super) fn write_pending(&self, sync: bool) -> Result<u64, StorageError> {
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
        let mut newly_synced = Vec::new();
        {
            let mut st = self.lock_state();
            if !sync_due && dir_dirty {
                st.dir_dirty = true;
            }
            for (g, did_sync) in groups.iter().zip(&synced) {
                if let Some(seg) = st.segments.iter_mut().find(|s| s.first_index == g.first_index) {
                    seg.written_len = seg.written_len.max(g.end);
                    if *did_sync {
                        let before = seg.synced_len;
                        seg.synced_len = seg.synced_len.max(g.end);
                        if self.config.drop_synced_pages {
                            newly_synced.push((g.file.clone(), before, seg.synced_len));
                        }
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
        self.drop_synced_pages(&newly_synced);
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

    pub(super) fn write_vectored_at(&self, file: &dyn DiskFile, path: &Path, start: u64, pieces: &[Bytes]) -> Result<(), StorageError> {
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

    pub(super) fn sync_file(&self, file: &dyn DiskFile, path: &Path) -> Result<(), StorageError> {
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
    pub(super) fn poison(&self, cause: &StorageError) {
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

    /// Drops the oldest written entries from the tail cache while it holds more than
    /// this log may cache now (its own bound, or its share of the node's budget).
    pub(super) fn evict_cache(&self, st: &mut State) {
        let limit = self.cache_limit();
        self.evict_cache_to(st, limit);
    }

    fn evict_cache_to(&self, st: &mut State, limit: u64) {
        while st.cache_bytes > limit {
            let Some(front) = st.cache.front() else { break };
            if front.entry.meta.id.index >= st.written_end {
                break;
            }
            st.cache_bytes -= front.entry.stored_len();
            st.cache.pop_front();
        }
        debug_assert!(st.cache_first() <= st.written_end, "invariant 3: every unwritten entry stays cached");
        self.account_cache(st);
    }

    /// The most this log may cache now.
    pub(super) fn cache_limit(&self) -> u64 {
        match &self.config.tail_cache_share {
            Some(share) => share.limit(self.config.tail_cache_bytes),
            None => self.config.tail_cache_bytes,
        }
    }

    /// Keeps the shared budget's count of holders true after the cache changed.
    pub(super) fn account_cache(&self, st: &mut State) {
        let holds = !st.cache.is_empty();
        if holds != st.cache_held {
            st.cache_held = holds;
            if let Some(share) = &self.config.tail_cache_share {
                share.holding(holds);
            }
        }
    }

    /// Drops every written entry from the tail cache: nothing is expected to read them
    /// soon (the partition went idle, every replica holds them). Later reads come from
    /// the files; the log's share of the node's budget goes to the others.
    pub fn release_tail_cache(&self) {
        let mut st = self.lock_state();
        self.evict_cache_to(&mut st, 0);
    }

    /// Bytes in the tail cache now.
    pub fn tail_cache_bytes(&self) -> u64 {
        self.lock_state().cache_bytes
    }
}
