//! Reads: from the tail cache or the segment files, planned under the state lock and
//! done without it; lookups by offset and by timestamp.

use super::*;

impl Log {
    /// Metadata of the entry at `index` (from the cache or the file). Caller holds `state`.
    pub(super) fn meta_at(&self, st: &State, index: u64) -> Result<EntryMeta, StorageError> {
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
    pub(super) fn position_of(&self, st: &State, seg_pos: usize, index: u64) -> Result<Option<u64>, StorageError> {
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
    pub(super) fn read_files(&self, st: &State, range: Range<u64>, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
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

    pub(super) fn find_first(
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
pub(super) struct SegmentRead {
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
pub(super) fn plan_segment_reads(st: &State, range: Range<u64>) -> Vec<SegmentRead> {
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
pub(super) fn read_planned(plans: &[SegmentRead], range: Range<u64>, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
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

pub(super) fn read_entry_chunk(seg: &SegmentRead, pos: u64, want: u64) -> Result<Bytes, StorageError> {
    let seg_end = seg.written_len;
    let mut header = [0u8; ENTRY_HEADER_LEN];
    seg.file.read_exact_at(&mut header, pos).map_err(|e| StorageError::io("read segment", &seg.path, e))?;
    let entry_len = ENTRY_HEADER_LEN as u64 + u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
    if entry_len > ENTRY_HEADER_LEN as u64 + ENTRY_PAYLOAD_SIZE_MAX || pos + entry_len > seg_end {
        return Err(StorageError::Corrupt { path: seg.path.clone(), position: pos, reason: "entry length runs past the written data".into() });
    }
    read_chunk(&*seg.file, &seg.path, pos, want.max(entry_len))
}

pub(super) fn read_chunk(file: &dyn DiskFile, path: &Path, pos: u64, len: u64) -> Result<Bytes, StorageError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, pos).map_err(|e| StorageError::io("read segment", path, e))?;
    Ok(Bytes::from(buf))
}
