//! Sparse per-segment indexes: by Raft index / message offset, and by time.
//!
//! Both are arrays of 24-byte rows `[key_a: u64, key_b: u64, position: u64]`:
//! - offset index: `[index, base_offset, position]`, one row per `index_interval_bytes`
//!   of entries (and always one for the first entry);
//! - time index: `[running_max_timestamp_ms, index, position]`, a row when the running
//!   maximum timestamp grows, no denser than the same interval.
//!
//! A lookup finds the last row at or before the target and the caller scans forward,
//! so a missing row only costs scanning, never a wrong answer. The active segment's
//! rows live in memory; when a segment is sealed and durable its rows are written to
//! `<first>.index` / `<first>.timeindex` and later opened with `memmap2`.
//!
//! Index file (64-byte header, then rows):
//! `magic:[u8;8] | row_count:u64 | covered_len:u64 | last_index:u64 | end_offset:u64 |
//! max_timestamp_ms:i64 | crc32c(header bytes 0..48 ++ rows):u32 | reserved:u32 | pad:u64`.
//! `covered_len` is the segment file length the rows describe; the other fields summarise
//! the sealed segment so opening a log needs no scan of it. A file whose header, checksum
//! or `covered_len` does not match is stale and rebuilt by scanning the segment.

use std::path::Path;

use crate::disk::{Disk, FileMap, OpenMode};
use crate::entry::EntryMeta;
use crate::error::StorageError;

const ROW_LEN: usize = 24;
const FILE_HEADER_LEN: usize = 64;
const CRC_AT: usize = 48;
const OFFSET_MAGIC: &[u8; 8] = b"KEELIDX1";
const TIME_MAGIC: &[u8; 8] = b"KEELTIX1";

pub(crate) type Row = [u64; 3];

/// Rows in memory (active segment) or mapped from a file (sealed segment).
#[derive(Debug)]
enum Rows {
    Memory(Vec<Row>),
    Mapped(FileMap),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Rows::Memory(v) => v.len(),
            Rows::Mapped(m) => (m.len() - FILE_HEADER_LEN) / ROW_LEN,
        }
    }

    fn get(&self, i: usize) -> Row {
        match self {
            Rows::Memory(v) => v[i],
            Rows::Mapped(m) => {
                let at = FILE_HEADER_LEN + i * ROW_LEN;
                let word = |k: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&m[at + 8 * k..at + 8 * k + 8]);
                    u64::from_le_bytes(a)
                };
                [word(0), word(1), word(2)]
            }
        }
    }

    fn to_vec(&self) -> Vec<Row> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    fn memory(&mut self) -> &mut Vec<Row> {
        if let Rows::Mapped(_) = self {
            *self = Rows::Memory(self.to_vec());
        }
        match self {
            Rows::Memory(v) => v,
            Rows::Mapped(_) => unreachable!("converted to memory just above"),
        }
    }

    /// The last row whose column `col` is `<= key` (rows are sorted on every column).
    fn floor(&self, col: usize, key: u64) -> Option<Row> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.get(mid)[col] <= key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1).map(|i| self.get(i))
    }

    /// The last row whose column `col` is `< key`.
    fn strictly_before(&self, col: usize, key: u64) -> Option<Row> {
        key.checked_sub(1).and_then(|k| self.floor(col, k))
    }
}

/// The two sparse indexes of one segment.
#[derive(Debug)]
pub(crate) struct SparseIndex {
    offsets: Rows,
    times: Rows,
    running_max_ts: i64,
}

/// Time rows store `timestamp - i64::MIN` so unsigned order equals signed order.
fn ts_key(ts: i64) -> u64 {
    (ts as u64) ^ (1 << 63)
}

impl SparseIndex {
    pub fn new() -> SparseIndex {
        SparseIndex { offsets: Rows::Memory(Vec::new()), times: Rows::Memory(Vec::new()), running_max_ts: i64::MIN }
    }

    /// Records an entry appended at `position`; adds rows where the spacing calls for one.
    pub fn note_append(&mut self, meta: &EntryMeta, position: u64, interval_bytes: u64) {
        let due = |rows: &Rows| rows.len() == 0 || position >= rows.get(rows.len() - 1)[2] + interval_bytes;
        if due(&self.offsets) {
            self.offsets.memory().push([meta.id.index, meta.base_offset, position]);
        }
        if meta.max_timestamp_ms > self.running_max_ts {
            self.running_max_ts = meta.max_timestamp_ms;
            if due(&self.times) {
                self.times.memory().push([ts_key(meta.max_timestamp_ms), meta.id.index, position]);
            }
        }
    }

    /// Largest timestamp seen in this segment (`i64::MIN` if none).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.running_max_ts
    }

    /// Where to start scanning for Raft index `index`: `(index, position)` of the last row at or before it.
    pub fn floor_by_index(&self, index: u64) -> Option<(u64, u64)> {
        self.offsets.floor(0, index).map(|r| (r[0], r[2]))
    }

    /// Where to start scanning for message offset `offset`.
    pub fn floor_by_offset(&self, offset: u64) -> Option<(u64, u64)> {
        self.offsets.floor(1, offset).map(|r| (r[0], r[2]))
    }

    /// Where to start scanning for the first entry whose timestamp is `>= ts`: every
    /// entry before the returned row's entry is older than `ts`.
    pub fn floor_by_time(&self, ts: i64) -> Option<(u64, u64)> {
        self.times.strictly_before(0, ts_key(ts)).map(|r| (r[1], r[2]))
    }

    /// Drops every row at or after `position` (the segment was truncated there).
    pub fn truncate_at(&mut self, position: u64, running_max_ts: i64) {
        self.offsets.memory().retain(|r| r[2] < position);
        self.times.memory().retain(|r| r[2] < position);
        self.running_max_ts = running_max_ts;
    }

    /// Writes both index files for a sealed segment, then maps them.
    pub fn persist(&mut self, disk: &dyn Disk, dir: &Path, first_index: u64, summary: &SegmentSummary) -> Result<(), StorageError> {
        for (rows, magic, ext) in [(&mut self.offsets, OFFSET_MAGIC, "index"), (&mut self.times, TIME_MAGIC, "timeindex")] {
            let path = dir.join(format!("{first_index:020}.{ext}"));
            let tmp = dir.join(format!("{first_index:020}.{ext}.tmp"));
            let mut buf = Vec::with_capacity(FILE_HEADER_LEN + rows.len() * ROW_LEN);
            buf.extend_from_slice(magic);
            for w in [rows.len() as u64, summary.covered_len, summary.last_index, summary.end_offset, summary.max_timestamp_ms as u64] {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            buf.extend_from_slice(&[0u8; FILE_HEADER_LEN - CRC_AT]);
            for i in 0..rows.len() {
                for w in rows.get(i) {
                    buf.extend_from_slice(&w.to_le_bytes());
                }
            }
            let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..CRC_AT]), &buf[FILE_HEADER_LEN..]);
            buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            let f = disk.open(&tmp, OpenMode::CreateTruncate).map_err(|e| StorageError::io("create index", &tmp, e))?;
            f.write_all_at(0, &[&buf]).map_err(|e| StorageError::io("write index", &tmp, e))?;
            f.sync_data().map_err(|e| StorageError::io("fsync index", &tmp, e))?;
            disk.rename(&tmp, &path).map_err(|e| StorageError::io("rename index", &path, e))?;
            if let Some((map, _)) = map_file(disk, &path, magic, summary.covered_len)? {
                *rows = Rows::Mapped(map);
            }
        }
        Ok(())
    }

    /// Loads a sealed segment's index files if both exist and describe exactly
    /// `covered_len` bytes; `None` means missing or stale (rebuild by scanning).
    pub fn load(disk: &dyn Disk, dir: &Path, first_index: u64, covered_len: u64) -> Result<Option<(SparseIndex, SegmentSummary)>, StorageError> {
        let offsets = map_file(disk, &dir.join(format!("{first_index:020}.index")), OFFSET_MAGIC, covered_len)?;
        let times = map_file(disk, &dir.join(format!("{first_index:020}.timeindex")), TIME_MAGIC, covered_len)?;
        let (Some((offsets, summary)), Some((times, summary2))) = (offsets, times) else {
            return Ok(None);
        };
        if summary != summary2 {
            return Ok(None);
        }
        let index = SparseIndex { offsets: Rows::Mapped(offsets), times: Rows::Mapped(times), running_max_ts: summary.max_timestamp_ms };
        Ok(Some((index, summary)))
    }

    /// Sets the running maximum timestamp (used after a scan that found a larger one
    /// than the time rows record because of row spacing).
    pub fn set_max_timestamp(&mut self, ts: i64) {
        self.running_max_ts = self.running_max_ts.max(ts);
    }
}

/// What a sealed segment's index file records about the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub covered_len: u64,
    pub last_index: u64,
    pub end_offset: u64,
    pub max_timestamp_ms: i64,
}

/// Maps an index file if its header and checksum are valid for `covered_len`.
fn map_file(disk: &dyn Disk, path: &Path, magic: &[u8; 8], covered_len: u64) -> Result<Option<(FileMap, SegmentSummary)>, StorageError> {
    let file = match disk.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open index", path, e)),
    };
    let len = file.size().map_err(|e| StorageError::io("stat index", path, e))? as usize;
    if len < FILE_HEADER_LEN || !(len - FILE_HEADER_LEN).is_multiple_of(ROW_LEN) {
        return Ok(None);
    }
    // Index files are written once to a temp name and renamed into place, and never
    // modified after: what `map` requires.
    let map = file.map().map_err(|e| StorageError::io("mmap index", path, e))?;
    let word = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&map[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let rows = word(8) as usize;
    let stored_crc = u32::from_le_bytes([map[CRC_AT], map[CRC_AT + 1], map[CRC_AT + 2], map[CRC_AT + 3]]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&map[..CRC_AT]), &map[FILE_HEADER_LEN..]);
    let valid = &map[..8] == magic
        && word(16) == covered_len
        && rows.checked_mul(ROW_LEN).and_then(|n| n.checked_add(FILE_HEADER_LEN)) == Some(len)
        && crc == stored_crc;
    if !valid {
        return Ok(None);
    }
    let summary = SegmentSummary { covered_len, last_index: word(24), end_offset: word(32), max_timestamp_ms: word(40) as i64 };
    Ok(Some((map, summary)))
}
