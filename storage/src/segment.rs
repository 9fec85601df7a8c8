//! One segment file: its header, its in-memory bookkeeping, and the scan that
//! recovery and index rebuilding share.
//!
//! Segment file: a 32-byte header, then entries back to back (see `entry`).
//! ```text
//! 0  [u8; 8] magic "KEELLOG1"
//! 8  u32     format version (1)
//! 12 u32     crc32c of bytes 0..12 ++ 16..32
//! 16 u64     first_index: the index of the first entry (also the file name)
//! 24 i64     created_ms: wall-clock creation time, for rolling by age
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::{Disk, DiskFile, OpenMode};

use crate::entry::{decode_at, DecodeFailure, EntryMeta, ENTRY_HEADER_LEN};
use crate::error::StorageError;
use crate::index::SparseIndex;
use crate::limits::{ENTRY_PAYLOAD_SIZE_MAX, READ_CHUNK_BYTES_MAX};

pub const SEGMENT_HEADER_LEN: u64 = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"KEELLOG1";
const SEGMENT_VERSION: u32 = 1;

pub(crate) fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.log"))
}

/// A segment's file and bookkeeping. Owned by the log's state; positions are bytes
/// from the start of the file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Index of the first entry; fixed at creation.
    pub first_index: u64,
    pub path: PathBuf,
    pub file: Arc<dyn DiskFile>,
    /// Creation time (ms since the epoch), from the header.
    pub created_ms: i64,
    /// Bytes assigned to entries, written or still pending. Grows on append, shrinks on truncate.
    pub len: u64,
    /// Bytes written to the file; readers may `pread` below this. `written_len <= len`.
    pub written_len: u64,
    /// Bytes known to be on disk (fsynced). `synced_len <= written_len`.
    pub synced_len: u64,
    /// Index of the last entry, `None` while the segment holds no entry.
    pub last_index: Option<u64>,
    /// Message offset after the last entry (the base offset of the first entry if empty).
    pub end_offset: u64,
    pub index: SparseIndex,
    /// No more appends go here. Set when the next segment is created.
    pub sealed: bool,
    /// The index files on disk match this (sealed, durable) segment.
    pub index_persisted: bool,
}

impl Segment {
    /// Creates a new segment file with its header (not yet fsynced: the next flush
    /// syncs the file and the directory).
    pub fn create(disk: &dyn Disk, dir: &Path, first_index: u64, first_offset: u64, created_ms: i64) -> Result<Segment, StorageError> {
        let path = segment_path(dir, first_index);
        let file = disk.open(&path, OpenMode::CreateNew).map_err(|e| StorageError::io("create segment", &path, e))?;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        header[..8].copy_from_slice(SEGMENT_MAGIC);
        header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&first_index.to_le_bytes());
        header[24..32].copy_from_slice(&created_ms.to_le_bytes());
        let crc = header_crc(&header);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(0, &[&header]).map_err(|e| StorageError::io("write segment header", &path, e))?;
        Ok(Segment {
            first_index,
            path,
            file,
            created_ms,
            len: SEGMENT_HEADER_LEN,
            written_len: SEGMENT_HEADER_LEN,
            synced_len: 0,
            last_index: None,
            end_offset: first_offset,
            index: SparseIndex::new(),
            sealed: false,
            index_persisted: false,
        })
    }

    /// Opens an existing segment and checks its header. `Ok(None)`: the file is shorter
    /// than a header (a torn creation), which only the last segment may be.
    pub fn open(disk: &dyn Disk, path: PathBuf, expected_first_index: u64) -> Result<Option<(Segment, u64)>, StorageError> {
        let file = disk.open(&path, OpenMode::ReadWrite).map_err(|e| StorageError::io("open segment", &path, e))?;
        let file_len = file.size().map_err(|e| StorageError::io("stat segment", &path, e))?;
        if file_len < SEGMENT_HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).map_err(|e| StorageError::io("read segment header", &path, e))?;
        let corrupt = |reason: &str| StorageError::Corrupt { path: path.clone(), position: 0, reason: reason.to_string() };
        if &header[..8] != SEGMENT_MAGIC {
            return Err(corrupt("bad segment magic"));
        }
        if u32::from_le_bytes([header[12], header[13], header[14], header[15]]) != header_crc(&header) {
            return Err(corrupt("segment header checksum mismatch"));
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != SEGMENT_VERSION {
            return Err(corrupt(&format!("unknown segment format version {version}")));
        }
        let first_index = u64::from_le_bytes(header[16..24].try_into().expect("8-byte slice"));
        if first_index != expected_first_index {
            return Err(corrupt(&format!("header says first index {first_index}, file name says {expected_first_index}")));
        }
        let created_ms = i64::from_le_bytes(header[24..32].try_into().expect("8-byte slice"));
        let segment = Segment {
            first_index,
            path,
            file,
            created_ms,
            len: file_len,
            written_len: file_len,
            synced_len: file_len,
            last_index: None,
            end_offset: 0,
            index: SparseIndex::new(),
            sealed: false,
            index_persisted: false,
        };
        Ok(Some((segment, file_len)))
    }

    pub fn entry_bytes(&self) -> u64 {
        self.len - SEGMENT_HEADER_LEN
    }
}

fn header_crc(header: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..12]), &header[16..32])
}

/// Where and why a scan stopped before the end of the file.
#[derive(Debug, Clone)]
pub(crate) struct ScanStop {
    pub position: u64,
    pub reason: String,
    /// A later, valid entry records that bytes past `position` had been fsynced before
    /// it was written: the damage is in durable data, not a torn tail.
    pub durable_damage: bool,
}

/// The result of scanning a segment from its first entry.
#[derive(Debug)]
pub(crate) struct Scan {
    pub index: SparseIndex,
    pub last: Option<EntryMeta>,
    pub first_base_offset: Option<u64>,
    /// Position after the last valid entry.
    pub valid_len: u64,
    pub stop: Option<ScanStop>,
}

/// Reads every entry of `file` (length `file_len`), verifying checksums, index
/// contiguity from `first_index`, non-decreasing terms and offset contiguity, and
/// rebuilding the sparse index. Stops at the first entry that fails.
pub(crate) fn scan(file: &dyn DiskFile, path: &Path, file_len: u64, first_index: u64, interval_bytes: u64) -> Result<Scan, StorageError> {
    let mut out = Scan { index: SparseIndex::new(), last: None, first_base_offset: None, valid_len: SEGMENT_HEADER_LEN, stop: None };
    let mut pos = SEGMENT_HEADER_LEN;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = pos;
    while pos < file_len {
        // Keep a window of the file in `buf`; refill when the next entry is not wholly inside.
        let rel = (pos - buf_start) as usize;
        let mut decoded = decode_at(&buf, rel);
        if decoded == Err(DecodeFailure::Incomplete) && buf_start + buf.len() as u64 != file_len {
            let want = (READ_CHUNK_BYTES_MAX.max(ENTRY_PAYLOAD_SIZE_MAX + ENTRY_HEADER_LEN as u64)).min(file_len - pos);
            buf.resize(want as usize, 0);
            file.read_exact_at(&mut buf, pos).map_err(|e| StorageError::io("read segment", path, e))?;
            buf_start = pos;
            decoded = decode_at(&buf, 0);
        }
        let rel = (pos - buf_start) as usize;
        let failure = match decoded {
            Ok(d) => {
                let meta = d.meta;
                let expected = out.last.map_or(first_index, |m| m.id.index + 1);
                let problem = if meta.id.index != expected {
                    Some(format!("entry index {} where {expected} was expected", meta.id.index))
                } else if out.last.is_some_and(|m| meta.id.term < m.id.term) {
                    Some(format!("term goes down to {} at index {}", meta.id.term, meta.id.index))
                } else if out.last.is_some_and(|m| meta.base_offset != m.end_offset()) {
                    Some(format!("base offset {} does not follow the previous entry", meta.base_offset))
                } else {
                    None
                };
                match problem {
                    None => {
                        out.index.note_append(&meta, pos, interval_bytes);
                        out.first_base_offset.get_or_insert(meta.base_offset);
                        out.last = Some(meta);
                        pos += (d.end() - rel) as u64;
                        out.valid_len = pos;
                        continue;
                    }
                    Some(p) => p,
                }
            }
            Err(f) => f.describe().to_string(),
        };
        let durable_damage = later_entry_proves_durable(file, path, file_len, pos, out.last.map_or(first_index, |m| m.id.index))?;
        out.stop = Some(ScanStop { position: pos, reason: failure, durable_damage });
        break;
    }
    if let Some(last) = out.last {
        out.index.set_max_timestamp(last.max_timestamp_ms);
    }
    Ok(out)
}

/// After a scan stopped at `stop`, looks for any later valid entry whose
/// `synced_before` lies beyond `stop`: proof that the damaged bytes had been fsynced,
/// so they are corruption, not a torn write. Checks cheap header fields before the CRC.
fn later_entry_proves_durable(file: &dyn DiskFile, path: &Path, file_len: u64, stop: u64, last_good_index: u64) -> Result<bool, StorageError> {
    let mut buf = vec![0u8; (file_len - stop) as usize];
    file.read_exact_at(&mut buf, stop).map_err(|e| StorageError::io("read segment", path, e))?;
    let word = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    for rel in 1..buf.len().saturating_sub(ENTRY_HEADER_LEN - 1) {
        let h = &buf[rel..rel + ENTRY_HEADER_LEN];
        let position = stop + rel as u64;
        let synced_before = word(h, 48);
        let index = word(h, 16);
        let plausible = synced_before > stop && synced_before <= position && index > last_good_index;
        if plausible && decode_at(&buf, rel).is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}
