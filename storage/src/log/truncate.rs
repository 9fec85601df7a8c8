//! Truncation (a conflicting suffix replaced) and purge (a prefix dropped: Raft's
//! purge, and retention by age or bytes), durable when they return.

use super::*;

impl Log {
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
        self.account_cache(&mut st);
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
        self.debug_check(&st, "a truncation");
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
        self.account_cache(&mut st);
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
        self.debug_check(&st, "a purge");
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
