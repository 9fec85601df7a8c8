//! Opening a log: recovery.
//!
//! 1. Read the purge point; finish an interrupted purge (delete segments wholly below it).
//! 2. Drop trailing segments that hold no valid entry (a crash right after a roll),
//!    so the previous segment is judged as the tail it really is.
//! 3. Sealed segments: load their index files, or — if missing or stale — scan them,
//!    verifying every checksum, and rewrite the index. Any damage here is corruption.
//! 4. The last segment: scan it. A failing entry is a torn tail (cut it off). If a later
//!    valid entry proves the failing bytes had been fsynced (`synced_before`), or the
//!    segment's header is damaged, it is damage to durable data: the bytes from the
//!    damage on are copied aside (`<segment>.damaged-<position>`), the log is cut
//!    there, and [`Log::damage_found_at_open`] reports it. Whether that lost anything
//!    this node acknowledged is for its ack ledger to say (`ledger`).
//! 5. Check that segments chain: each starts at the index and offset where the previous ended.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::atomic_file;
use crate::config::LogConfig;
use crate::disk::Disk;
use crate::entry::LogId;
use crate::error::StorageError;
use crate::index::{SegmentSummary, SparseIndex};
use crate::log::{Log, State, PURGE_FILE};
use crate::segment::{scan, Segment, SEGMENT_HEADER_LEN};

impl Log {
    /// Opens (creating if needed) the log in `dir` on the OS file system, recovering
    /// from any crash.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, StorageError> {
        Log::open_on(crate::disk::os(), dir, config)
    }

    /// Opens (creating if needed) the log in `dir` on `disk`, recovering from any crash.
    pub fn open_on(disk: Arc<dyn Disk>, dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, StorageError> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let d: &dyn Disk = &*disk;
        d.create_dir_all(&dir).map_err(|e| StorageError::io("create log directory", &dir, e))?;
        // 0. Finish an install of a staged log that a crash interrupted.
        crate::log::finish_install(d, &dir, None)?;
        let (purged, purge_start_offset) = read_purge_point(d, &dir)?;
        let mut names = list_segments(d, &dir)?;

        // 1. Finish an interrupted purge: a segment is wholly purged if the next one
        // starts at or below the purge point + 1.
        if let Some(p) = purged {
            while names.len() >= 2 && names[1].0 <= p.index + 1 {
                let (first, path) = names.remove(0);
                tracing::info!(first, "removing segment left behind by an interrupted purge");
                remove_with_indexes(d, &dir, first, &path)?;
            }
        }

        // 2 + 4. Find the real tail and scan it.
        let mut tail: Option<(Segment, crate::segment::Scan)> = None;
        let mut damage_found: Vec<DamageFound> = Vec::new();
        while let Some((first, path)) = names.pop() {
            let opened = match Segment::open(d, path.clone(), first) {
                Err(StorageError::Corrupt { position, reason, .. }) => {
                    tracing::error!(path = %path.display(), %reason, "the last segment's header is damaged; setting the whole segment aside");
                    set_aside(d, &dir, &path, position)?;
                    damage_found.push(DamageFound { path: path.clone(), position, reason });
                    remove_with_indexes(d, &dir, first, &path)?;
                    continue;
                }
                other => other?,
            };
            let Some((mut seg, file_len)) = opened else {
                if names.is_empty() {
                    // The log's only segment was torn at creation: nothing was in it.
                    remove_with_indexes(d, &dir, first, &path)?;
                    break;
                }
                tracing::warn!(path = %path.display(), "removing a segment torn at creation");
                remove_with_indexes(d, &dir, first, &path)?;
                continue;
            };
            let result = scan(&*seg.file, &seg.path, file_len, first, config.index_interval_bytes)?;
            if let Some(stop) = result.stop.as_ref().filter(|s| s.durable_damage) {
                let reason = format!("{}; later entries prove these bytes had been made durable", stop.reason);
                tracing::error!(path = %seg.path.display(), position = stop.position, %reason, "damage in durable data; cutting the log there and setting the rest aside");
                set_aside(d, &dir, &seg.path, stop.position)?;
                damage_found.push(DamageFound { path: seg.path.clone(), position: stop.position, reason });
            }
            if result.last.is_none() && !names.is_empty() {
                tracing::warn!(path = %path.display(), "removing an empty trailing segment");
                remove_with_indexes(d, &dir, first, &path)?;
                continue;
            }
            if let Some(stop) = &result.stop {
                tracing::warn!(path = %seg.path.display(), position = stop.position, reason = %stop.reason, "truncating a torn tail");
                seg.file.set_len(result.valid_len).map_err(|e| StorageError::io("truncate torn tail", &seg.path, e))?;
                seg.file.sync_all().map_err(|e| StorageError::io("fsync", &seg.path, e))?;
            }
            for ext in ["index", "timeindex"] {
                let _ = d.remove_file(&dir.join(format!("{first:020}.{ext}")));
            }
            // What recovery found is what the log now claims durable, so make it so:
            // after a process crash those bytes may still be only in the page cache.
            seg.file.sync_data().map_err(|e| StorageError::io("fdatasync", &seg.path, e))?;
            seg.len = result.valid_len;
            seg.written_len = result.valid_len;
            seg.synced_len = result.valid_len;
            tail = Some((seg, result));
            break;
        }

        // 3. Sealed segments, oldest first.
        let mut segments: Vec<Segment> = Vec::new();
        for (first, path) in names {
            let Some((mut seg, file_len)) = Segment::open(d, path.clone(), first)? else {
                return Err(StorageError::Corrupt { path, position: 0, reason: "sealed segment shorter than its header".into() });
            };
            let summary = match SparseIndex::load(d, &dir, first, file_len)? {
                Some((index, summary)) => {
                    seg.index = index;
                    seg.index_persisted = true;
                    summary
                }
                None => {
                    tracing::info!(path = %seg.path.display(), "rebuilding a missing or stale segment index");
                    let result = scan(&*seg.file, &seg.path, file_len, first, config.index_interval_bytes)?;
                    if let Some(stop) = result.stop {
                        return Err(StorageError::Corrupt {
                            path: seg.path.clone(),
                            position: stop.position,
                            reason: format!("{} in a sealed segment", stop.reason),
                        });
                    }
                    let Some(last) = result.last else {
                        return Err(StorageError::Corrupt {
                            path: seg.path.clone(),
                            position: SEGMENT_HEADER_LEN,
                            reason: "sealed segment holds no entry".into(),
                        });
                    };
                    seg.index = result.index;
                    let summary = SegmentSummary {
                        covered_len: file_len,
                        last_index: last.id.index,
                        end_offset: last.end_offset(),
                        max_timestamp_ms: seg.index.max_timestamp_ms(),
                    };
                    seg.index.persist(d, &dir, first, &summary)?;
                    seg.index_persisted = true;
                    summary
                }
            };
            seg.last_index = Some(summary.last_index);
            seg.end_offset = summary.end_offset;
            seg.sealed = true;
            segments.push(seg);
        }

        let mut last: Option<LogId> = None;
        if let Some((mut seg, result)) = tail {
            if let Some(m) = result.last {
                seg.last_index = Some(m.id.index);
                seg.end_offset = m.end_offset();
                last = Some(m.id);
            }
            seg.index = result.index;
            if result.first_base_offset.is_none() {
                // An empty tail continues where the log left off.
                seg.end_offset = segments.last().map_or(purge_start_offset, |p| p.end_offset);
            }
            if let Some(first_base) = result.first_base_offset {
                check_chain(&segments, &seg, first_base)?;
            }
            if last.is_none() {
                if let Some(p) = segments.last() {
                    last = p.last_index.map(|i| LogId { term: 0, index: i });
                }
            }
            segments.push(seg);
        }
        // 5. Chain of sealed segments.
        for pair in segments.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if let (Some(a_last), true) = (a.last_index, b.last_index.is_some()) {
                if b.first_index != a_last + 1 {
                    return Err(StorageError::Corrupt {
                        path: b.path.clone(),
                        position: 0,
                        reason: format!("segment starts at index {} but the previous one ends at {a_last}", b.first_index),
                    });
                }
            }
        }
        // A log whose entries all lie at or below the purge point holds nothing readable.
        if let (Some(p), Some(l)) = (purged, last) {
            if l.index <= p.index {
                for seg in segments.drain(..) {
                    crate::log::remove_segment_files(d, &dir, &seg)?;
                }
                atomic_file::sync_dir(d, &dir)?;
                last = None;
            }
        }
        let last = match last {
            Some(l) if l.term == 0 && l.index > 0 => Some(read_last_id(&segments, l.index)?),
            other => other,
        };
        let start_offset = match purged {
            Some(_) => purge_start_offset,
            None => segments.first().map_or(0, |s| first_base_offset(s).unwrap_or(s.end_offset)),
        };
        let next_index = last.map(|l| l.index + 1).or(purged.map(|p| p.index + 1)).unwrap_or(0);
        let next_offset = segments.last().map_or(start_offset, |s| s.end_offset);
        let last = last.or(purged);
        let state = State::new(segments, next_index, next_offset, last, purged, start_offset);
        atomic_file::sync_dir(d, &dir)?;
        let mut log = Log::from_parts(disk, dir, config, state);
        log.damage_found = damage_found;
        log.debug_check(&log.state.lock().expect("a fresh log's state lock is not poisoned"), "opening");
        Ok(log)
    }
}

/// Damage to durable data that recovery cut off when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamageFound {
    /// The segment file it was in.
    pub path: PathBuf,
    /// Where the cut was made (bytes from the start of the file).
    pub position: u64,
    pub reason: String,
}

/// Copies `path`'s bytes from `position` on to `<path>.damaged-<position>`, durably,
/// before the caller cuts them off: evidence for an operator, never read again.
fn set_aside(disk: &dyn Disk, dir: &Path, path: &Path, position: u64) -> Result<(), StorageError> {
    let bytes = disk.read(path).map_err(|e| StorageError::io("read damaged segment", path, e))?;
    let aside = PathBuf::from(format!("{}.damaged-{position}", path.display()));
    let tail = bytes.get(position as usize..).unwrap_or_default();
    let file = disk.open(&aside, crate::disk::OpenMode::CreateTruncate).map_err(|e| StorageError::io("create", &aside, e))?;
    file.write_all_at(0, &[tail]).map_err(|e| StorageError::io("write", &aside, e))?;
    file.sync_data().map_err(|e| StorageError::io("fsync", &aside, e))?;
    atomic_file::sync_dir(disk, dir)
}

fn check_chain(sealed: &[Segment], tail: &Segment, tail_first_base: u64) -> Result<(), StorageError> {
    let Some(prev) = sealed.last() else { return Ok(()) };
    let prev_last = prev.last_index.unwrap_or(0);
    if tail.first_index != prev_last + 1 || tail_first_base != prev.end_offset {
        return Err(StorageError::Corrupt {
            path: tail.path.clone(),
            position: SEGMENT_HEADER_LEN,
            reason: format!(
                "segment starts at index {} offset {tail_first_base}, previous ends at index {prev_last} offset {}",
                tail.first_index, prev.end_offset
            ),
        });
    }
    Ok(())
}

/// The first entry's base offset of a sealed segment (one header read).
fn first_base_offset(seg: &Segment) -> Option<u64> {
    let mut h = [0u8; crate::entry::ENTRY_HEADER_LEN];
    seg.file.read_exact_at(&mut h, SEGMENT_HEADER_LEN).ok()?;
    Some(u64::from_le_bytes(h[24..32].try_into().ok()?))
}

/// The id (with its term) of the last entry, when only its index is known (the tail
/// segment was empty and the last entry sits in a sealed segment).
fn read_last_id(segments: &[Segment], index: u64) -> Result<LogId, StorageError> {
    let seg = segments.iter().rev().find(|s| s.first_index <= index).ok_or_else(|| StorageError::Corrupt {
        path: PathBuf::new(),
        position: 0,
        reason: format!("no segment holds the last entry {index}"),
    })?;
    let (mut at, mut pos) = seg.index.floor_by_index(index).unwrap_or((seg.first_index, SEGMENT_HEADER_LEN));
    let mut h = [0u8; crate::entry::ENTRY_HEADER_LEN];
    loop {
        seg.file.read_exact_at(&mut h, pos).map_err(|e| StorageError::io("read segment", &seg.path, e))?;
        if at == index {
            return Ok(LogId { term: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")), index });
        }
        pos += crate::entry::ENTRY_HEADER_LEN as u64 + u64::from(u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")));
        at += 1;
    }
}

fn read_purge_point(disk: &dyn Disk, dir: &Path) -> Result<(Option<LogId>, u64), StorageError> {
    let Some(bytes) = atomic_file::read(disk, dir, PURGE_FILE)? else {
        return Ok((None, 0));
    };
    if bytes.len() != 24 {
        return Err(StorageError::Corrupt { path: dir.join(PURGE_FILE), position: 0, reason: "purge point is not 24 bytes".into() });
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok((Some(LogId { term: word(0), index: word(1) }), word(2)))
}

/// Segment files in `dir`, sorted by first index. Leftover temp files are removed.
fn list_segments(disk: &dyn Disk, dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for name in disk.read_dir(dir).map_err(|e| StorageError::io("list log directory", dir, e))? {
        let path = dir.join(&name);
        if name.ends_with(".tmp") {
            let _ = disk.remove_file(&path);
            continue;
        }
        if let Some(stem) = name.strip_suffix(".log") {
            if stem.len() == 20 {
                if let Ok(first) = stem.parse::<u64>() {
                    out.push((first, path));
                }
            }
        }
    }
    out.sort_by_key(|(first, _)| *first);
    Ok(out)
}

fn remove_with_indexes(disk: &dyn Disk, dir: &Path, first: u64, path: &Path) -> Result<(), StorageError> {
    disk.remove_file(path).map_err(|e| StorageError::io("delete segment", path, e))?;
    for ext in ["index", "timeindex"] {
        let _ = disk.remove_file(&dir.join(format!("{first:020}.{ext}")));
    }
    Ok(())
}
