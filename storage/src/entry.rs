//! A log entry and its on-disk encoding.
//!
//! ```text
//! 0  u32 payload_len
//! 4  u32 crc32c of bytes 8..56 followed by the payload
//! 8  u64 term            } the entry's log id; storage treats term and index as
//! 16 u64 index           } opaque numbers with index contiguous and term non-decreasing
//! 24 u64 base_offset     first message offset in this entry
//! 32 u32 record_count    messages in this entry (0 for entries that hold none)
//! 36 u8  kind            opaque to storage: the caller's entry type
//! 37 u8  reserved (0)
//! 38 u16 reserved (0)
//! 40 i64 max_timestamp_ms
//! 48 u64 synced_before   the segment byte position known durable when this entry was
//!                        appended: everything before it had been fsynced
//! 56 payload
//! ```
//!
//! `synced_before` lets recovery tell a torn tail (unsynced writes lost in a crash: cut
//! them) from corruption of data that had been made durable (refuse to open).

use std::ops::Range;

use bytes::Bytes;

use crate::limits::ENTRY_PAYLOAD_SIZE_MAX;

pub const ENTRY_HEADER_LEN: usize = 56;

/// A Raft-style log position. Storage only requires index contiguity and terms that
/// never go down along the log. Ordered as Raft orders log ids: by term, then index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogId {
    pub term: u64,
    pub index: u64,
}

/// Everything about an entry except its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub id: LogId,
    /// The caller's entry type, stored and returned unchanged.
    pub kind: u8,
    /// Offset of the first message; must equal the log's `next_offset()` at append.
    pub base_offset: u64,
    /// Messages in the entry; the next entry's base offset is `base_offset + record_count`.
    pub record_count: u32,
    /// Newest message timestamp in the entry, for the time index.
    pub max_timestamp_ms: i64,
}

impl EntryMeta {
    /// Offset one past this entry's last message.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// An entry: metadata plus the payload bytes, stored exactly as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub meta: EntryMeta,
    pub payload: Bytes,
}

impl Entry {
    /// Bytes the entry occupies in a segment file.
    pub fn stored_len(&self) -> u64 {
        (ENTRY_HEADER_LEN + self.payload.len()) as u64
    }
}

/// Encodes the header for `entry`, including the CRC over header and payload.
pub(crate) fn encode_header(entry: &Entry, synced_before: u64) -> [u8; ENTRY_HEADER_LEN] {
    let m = &entry.meta;
    let mut h = [0u8; ENTRY_HEADER_LEN];
    h[0..4].copy_from_slice(&(entry.payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&m.id.term.to_le_bytes());
    h[16..24].copy_from_slice(&m.id.index.to_le_bytes());
    h[24..32].copy_from_slice(&m.base_offset.to_le_bytes());
    h[32..36].copy_from_slice(&m.record_count.to_le_bytes());
    h[36] = m.kind;
    h[40..48].copy_from_slice(&m.max_timestamp_ms.to_le_bytes());
    h[48..56].copy_from_slice(&synced_before.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), &entry.payload);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One entry decoded in place from a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub meta: EntryMeta,
    /// Where the payload sits in the buffer given to `decode_at`.
    pub payload: Range<usize>,
    pub synced_before: u64,
}

impl Decoded {
    /// Position just after this entry in the buffer.
    pub fn end(&self) -> usize {
        self.payload.end
    }
}

/// Why bytes at a position are not a whole, valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeFailure {
    /// The buffer ends before the entry does (a torn tail, or a short read).
    Incomplete,
    /// The declared payload length is above the limit.
    TooLarge,
    /// The CRC does not match, or reserved bytes are set.
    Damaged,
}

impl DecodeFailure {
    pub fn describe(self) -> &'static str {
        match self {
            DecodeFailure::Incomplete => "entry cut short",
            DecodeFailure::TooLarge => "declared entry length above ENTRY_PAYLOAD_SIZE_MAX",
            DecodeFailure::Damaged => "entry checksum mismatch",
        }
    }
}

fn word32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn word64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and verifies the entry starting at `buf[pos]`.
pub(crate) fn decode_at(buf: &[u8], pos: usize) -> Result<Decoded, DecodeFailure> {
    let Some(h) = buf.get(pos..pos + ENTRY_HEADER_LEN) else {
        return Err(DecodeFailure::Incomplete);
    };
    let payload_len = u64::from(word32(h, 0));
    if payload_len > ENTRY_PAYLOAD_SIZE_MAX {
        return Err(DecodeFailure::TooLarge);
    }
    let start = pos + ENTRY_HEADER_LEN;
    let end = start + payload_len as usize;
    let Some(payload) = buf.get(start..end) else {
        return Err(DecodeFailure::Incomplete);
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), payload);
    if crc != word32(h, 4) || h[37] != 0 || h[38] != 0 || h[39] != 0 {
        return Err(DecodeFailure::Damaged);
    }
    let meta = EntryMeta {
        id: LogId { term: word64(h, 8), index: word64(h, 16) },
        base_offset: word64(h, 24),
        record_count: word32(h, 32),
        kind: h[36],
        max_timestamp_ms: word64(h, 40) as i64,
    };
    Ok(Decoded { meta, payload: start..end, synced_before: word64(h, 48) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            meta: EntryMeta { id: LogId { term: 3, index: 9 }, kind: 1, base_offset: 100, record_count: 4, max_timestamp_ms: 77 },
            payload: Bytes::from_static(b"some payload"),
        }
    }

    #[test]
    fn an_encoded_entry_decodes_to_the_same_meta_and_payload() {
        let e = sample();
        let mut buf = encode_header(&e, 42).to_vec();
        buf.extend_from_slice(&e.payload);
        let d = decode_at(&buf, 0).unwrap();
        assert_eq!(d.meta, e.meta);
        assert_eq!(&buf[d.payload.clone()], &e.payload[..]);
        assert_eq!(d.synced_before, 42);
        assert_eq!(d.end(), buf.len());
    }

    #[test]
    fn every_single_bit_flip_in_an_entry_is_detected() {
        let e = sample();
        let mut buf = encode_header(&e, 0).to_vec();
        buf.extend_from_slice(&e.payload);
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut c = buf.clone();
                c[byte] ^= 1 << bit;
                assert!(decode_at(&c, 0).is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn every_truncation_of_an_entry_is_incomplete() {
        let e = sample();
        let mut buf = encode_header(&e, 0).to_vec();
        buf.extend_from_slice(&e.payload);
        for cut in 0..buf.len() {
            assert_eq!(decode_at(&buf[..cut], 0), Err(DecodeFailure::Incomplete), "cut at {cut}");
        }
    }
}
