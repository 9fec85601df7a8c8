//! The record batch: the unit a producer sends, the broker stores and a consumer reads.
//!
//! A batch is encoded once, by the client ([`BatchBuilder`]). The broker checks it with
//! [`BatchView::parse`] (header, exact length, CRC32C) and stamps the base offset with
//! [`stamp_base_offset`]; it never re-encodes. The base offset and the length sit before
//! the CRC, which covers everything from the attributes on, so stamping needs no new
//! checksum. `FORMAT.md` documents the layout byte by byte.
//!
//! Decoding never allocates per record: [`RecordIter`] yields [`RecordView`]s that borrow
//! the batch's bytes, and every malformed input yields a [`DecodeError`] carrying the
//! offset (from the start of the batch) where decoding failed.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::limits::{BATCH_RECORD_COUNT_MAX, BATCH_SIZE_MAX, MESSAGE_ID_LEN_MAX, PRIORITY_LANES_MAX, RECORD_HEADER_COUNT_MAX};
use crate::varint::{get_varint, put_varint, varint_len};

/// Format version of the batches this build writes and reads.
pub const BATCH_MAGIC: u8 = 1;
/// Size of the fixed batch header; records follow it.
pub const BATCH_HEADER_LEN: usize = 54;

/// Byte positions of the header fields (all integers little-endian).
pub mod field {
    pub const BASE_OFFSET: usize = 0;
    pub const BATCH_LENGTH: usize = 8;
    /// `batch_length` counts the bytes from here to the end of the batch.
    pub const LENGTH_COVERS_FROM: usize = 12;
    pub const MAGIC: usize = 12;
    pub const CRC: usize = 13;
    /// The CRC32C covers the bytes from here to the end of the batch.
    pub const CRC_COVERS_FROM: usize = 17;
    pub const ATTRIBUTES: usize = 17;
    pub const PRIORITY: usize = 19;
    pub const RECORD_COUNT: usize = 20;
    pub const FIRST_TIMESTAMP: usize = 24;
    pub const MAX_TIMESTAMP: usize = 32;
    pub const PRODUCER_ID: usize = 40;
    pub const PRODUCER_EPOCH: usize = 48;
    pub const BASE_SEQUENCE: usize = 50;
}
const _: () = assert!(field::BASE_SEQUENCE + 4 == BATCH_HEADER_LEN);

/// `producer_id` of a batch sent without idempotence.
pub const NO_PRODUCER_ID: i64 = -1;
/// `producer_epoch` of a batch sent without idempotence.
pub const NO_PRODUCER_EPOCH: i16 = -1;
/// `base_sequence` of a batch sent without idempotence.
pub const NO_SEQUENCE: i32 = -1;

/// The record header that carries a record's message id (see `FORMAT.md`, "Message
/// ids"). Reserved: a producer cannot use it as an ordinary header, and it is only
/// allowed in batches whose `MESSAGE_IDS` attribute is set.
pub const MESSAGE_ID_HEADER: &str = "keel-message-id";
/// The reserved record header carrying a scheduled record's not-before time: decimal
/// ASCII milliseconds since the epoch. Allowed only in batches whose `SCHEDULED`
/// attribute is set.
pub const DELIVER_AT_HEADER: &str = "keel-deliver-at";

/// Batch attribute bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attributes(u16);

impl Attributes {
    /// Bits 0–2: compression codec. Only 0 (none) exists today.
    const COMPRESSION_MASK: u16 = 0b0111;
    /// Bit 3: a control batch (written by the broker, not a producer).
    const CONTROL: u16 = 0b1000;
    /// Bit 4: some records carry a message id (the `MESSAGE_ID_HEADER` header), so the
    /// broker must look at the records to deduplicate; without it, it need not.
    const MESSAGE_IDS: u16 = 0b1_0000;
    /// Bit 5: some records carry a not-before time (the `DELIVER_AT_HEADER` header):
    /// queue groups do not deliver them earlier.
    const SCHEDULED: u16 = 0b10_0000;
    /// Bits 6–15 are reserved and must be zero.
    const RESERVED_MASK: u16 = !0b11_1111;

    pub fn control(self) -> bool {
        self.0 & Self::CONTROL != 0
    }
    pub fn message_ids(self) -> bool {
        self.0 & Self::MESSAGE_IDS != 0
    }
    pub fn scheduled(self) -> bool {
        self.0 & Self::SCHEDULED != 0
    }
    pub fn compression(self) -> u16 {
        self.0 & Self::COMPRESSION_MASK
    }
    pub fn bits(self) -> u16 {
        self.0
    }
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_length: u32,
    pub magic: u8,
    pub crc: u32,
    pub attributes: Attributes,
    pub priority: u8,
    pub record_count: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl BatchHeader {
    /// Total size of the batch in bytes, header included.
    pub fn total_len(&self) -> usize {
        field::LENGTH_COVERS_FROM + self.batch_length as usize
    }

    /// Decodes and checks the header fields that need no look at the records: size
    /// bounds, magic, attributes, priority, record count, timestamps.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(DecodeError::Truncated { offset: buf.len(), need: BATCH_HEADER_LEN - buf.len(), have: buf.len() });
        }
        let h = BatchHeader {
            base_offset: le_u64(buf, field::BASE_OFFSET),
            batch_length: le_u32(buf, field::BATCH_LENGTH),
            magic: buf[field::MAGIC],
            crc: le_u32(buf, field::CRC),
            attributes: Attributes(le_u16(buf, field::ATTRIBUTES)),
            priority: buf[field::PRIORITY],
            record_count: le_u32(buf, field::RECORD_COUNT),
            first_timestamp_ms: le_u64(buf, field::FIRST_TIMESTAMP) as i64,
            max_timestamp_ms: le_u64(buf, field::MAX_TIMESTAMP) as i64,
            producer_id: le_u64(buf, field::PRODUCER_ID) as i64,
            producer_epoch: le_u16(buf, field::PRODUCER_EPOCH) as i16,
            base_sequence: le_u32(buf, field::BASE_SEQUENCE) as i32,
        };
        if h.magic != BATCH_MAGIC {
            return Err(DecodeError::Unknown { offset: field::MAGIC, what: "batch magic", value: u64::from(h.magic) });
        }
        let total = h.total_len();
        if total > BATCH_SIZE_MAX {
            return Err(DecodeError::TooLarge { offset: field::BATCH_LENGTH, what: "batch size", size: total as u64, max: BATCH_SIZE_MAX as u64 });
        }
        if total < BATCH_HEADER_LEN {
            return Err(DecodeError::Invalid { offset: field::BATCH_LENGTH, what: "batch length", reason: "shorter than the batch header" });
        }
        if h.attributes.0 & Attributes::RESERVED_MASK != 0 {
            return Err(DecodeError::Invalid { offset: field::ATTRIBUTES, what: "attributes", reason: "reserved bits set" });
        }
        if h.attributes.compression() != 0 {
            return Err(DecodeError::Unknown { offset: field::ATTRIBUTES, what: "compression codec", value: u64::from(h.attributes.compression()) });
        }
        if h.priority >= PRIORITY_LANES_MAX {
            return Err(DecodeError::Invalid { offset: field::PRIORITY, what: "priority", reason: "not below PRIORITY_LANES_MAX" });
        }
        if h.record_count == 0 {
            return Err(DecodeError::Invalid { offset: field::RECORD_COUNT, what: "record count", reason: "a batch holds at least one record" });
        }
        if h.record_count > BATCH_RECORD_COUNT_MAX {
            return Err(DecodeError::TooLarge {
                offset: field::RECORD_COUNT,
                what: "record count",
                size: u64::from(h.record_count),
                max: u64::from(BATCH_RECORD_COUNT_MAX),
            });
        }
        if h.max_timestamp_ms < h.first_timestamp_ms {
            return Err(DecodeError::Invalid { offset: field::MAX_TIMESTAMP, what: "max timestamp", reason: "earlier than the first timestamp" });
        }
        Ok(h)
    }
}

/// The size of the batch starting at `buf[0]`, read from its length field, or `None`
/// if `buf` is too short to tell. For walking batches stored back to back.
pub fn batch_size(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < field::LENGTH_COVERS_FROM {
        return Ok(None);
    }
    let total = field::LENGTH_COVERS_FROM + le_u32(buf, field::BATCH_LENGTH) as usize;
    if total > BATCH_SIZE_MAX {
        return Err(DecodeError::TooLarge { offset: field::BATCH_LENGTH, what: "batch size", size: total as u64, max: BATCH_SIZE_MAX as u64 });
    }
    Ok(Some(total))
}

/// Writes `base_offset` into the batch's base-offset field. The CRC does not cover this
/// field, so the batch stays valid.
pub fn stamp_base_offset(batch: &mut [u8], base_offset: u64) -> Result<(), DecodeError> {
    let Some(slot) = batch.get_mut(field::BASE_OFFSET..field::BASE_OFFSET + 8) else {
        return Err(DecodeError::Truncated { offset: batch.len(), need: 8 - batch.len(), have: batch.len() });
    };
    slot.copy_from_slice(&base_offset.to_le_bytes());
    Ok(())
}

/// A batch whose header, length and CRC have been checked. Cheap to clone (it holds
/// `Bytes`); its records are decoded lazily by [`BatchView::records`].
#[derive(Debug, Clone)]
pub struct BatchView {
    bytes: Bytes,
    header: BatchHeader,
}

impl BatchView {
    /// Checks the header, that `bytes` is exactly one batch long, and the CRC32C.
    /// Does not walk the records; see [`BatchView::validate`].
    pub fn parse(bytes: Bytes) -> Result<BatchView, DecodeError> {
        let header = BatchHeader::parse(&bytes)?;
        let total = header.total_len();
        if bytes.len() < total {
            return Err(DecodeError::Truncated { offset: bytes.len(), need: total - bytes.len(), have: bytes.len() });
        }
        if bytes.len() > total {
            return Err(DecodeError::Invalid { offset: total, what: "batch", reason: "trailing bytes after the declared batch length" });
        }
        let computed = crc32c::crc32c(&bytes[field::CRC_COVERS_FROM..]);
        if computed != header.crc {
            return Err(DecodeError::BadCrc { offset: field::CRC_COVERS_FROM, stored: header.crc, computed });
        }
        Ok(BatchView { bytes, header })
    }

    /// Like [`BatchView::parse`] without the CRC check: for bytes whose integrity is
    /// already established (read back from a log that checksums its entries, after
    /// the batch was checked when it was produced).
    pub fn trusted(bytes: Bytes) -> Result<BatchView, DecodeError> {
        let header = BatchHeader::parse(&bytes)?;
        if bytes.len() != header.total_len() {
            return Err(DecodeError::Invalid {
                offset: header.total_len().min(bytes.len()),
                what: "batch",
                reason: "length does not match the declared batch length",
            });
        }
        Ok(BatchView { bytes, header })
    }

    /// [`BatchView::parse`] plus a walk over every record: structure, offset deltas,
    /// header UTF-8, that the record count matches the header, and the message-id
    /// rules (the reserved header only in a batch with the `MESSAGE_IDS` attribute, at
    /// most once per record, non-null, at most `MESSAGE_ID_LEN_MAX` bytes). A batch
    /// that passes decodes for every consumer.
    pub fn validate(bytes: Bytes) -> Result<BatchView, DecodeError> {
        let view = BatchView::parse(bytes)?;
        for id in view.message_ids() {
            id?;
        }
        Ok(view)
    }

    /// Walks the records and yields `(index, message id)` for each record that carries
    /// one, checking every record on the way (as [`BatchView::validate`] does). In a
    /// batch without the `MESSAGE_IDS` attribute it yields no id but still checks that
    /// no record uses the reserved header.
    pub fn message_ids(&self) -> MessageIdIter<'_> {
        MessageIdIter { records: self.records(), enabled: self.header.attributes.message_ids(), scheduled: self.header.attributes.scheduled() }
    }

    /// A new batch holding this batch's records except those at `skip` (indexes), with
    /// the same producer fields and priority, renumbered from offset delta 0. For a
    /// producer resending a batch without the records the broker already stored.
    pub fn rebuild_without(&self, skip: &[u32]) -> Result<Bytes, BuildError> {
        let h = &self.header;
        let options = BatchOptions {
            producer_id: h.producer_id,
            producer_epoch: h.producer_epoch,
            base_sequence: h.base_sequence,
            priority: h.priority,
            size_max: BATCH_SIZE_MAX,
        };
        let mut builder = BatchBuilder::new(options)?;
        let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
        for record in self.records() {
            let record = record.map_err(|e| BuildError::Undecodable(e.to_string()))?;
            if skip.contains(&record.offset_delta) {
                continue;
            }
            headers.clear();
            let mut message_id = None;
            let mut deliver_at_ms = None;
            for (k, v) in record.headers() {
                if k == MESSAGE_ID_HEADER {
                    message_id = v;
                } else if k == DELIVER_AT_HEADER {
                    deliver_at_ms = v.and_then(parse_deliver_at);
                } else {
                    headers.push((k, v));
                }
            }
            let r = NewRecord { timestamp_ms: record.timestamp_ms, key: record.key, value: record.value, headers: &headers, message_id, deliver_at_ms };
            builder.push(r)?;
        }
        builder.finish()
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch exactly as encoded.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The records, decoded in place. The iterator ends after the first error.
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter { buf: &self.bytes, pos: BATCH_HEADER_LEN, index: 0, header: self.header, failed: false }
    }
}

/// One record, borrowing the batch's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Position in the batch: the record's offset is `base_offset + offset_delta`.
    pub offset_delta: u32,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    header_count: u32,
    headers_raw: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// The record's headers, in the order the producer gave them.
    pub fn headers(&self) -> HeaderIter<'a> {
        HeaderIter { raw: self.headers_raw, pos: 0, left: self.header_count }
    }

    pub fn header_count(&self) -> u32 {
        self.header_count
    }

    /// The record's message id (its `MESSAGE_ID_HEADER` header), if it carries one.
    pub fn message_id(&self) -> Option<&'a [u8]> {
        self.headers().find(|(k, _)| *k == MESSAGE_ID_HEADER).and_then(|(_, v)| v)
    }

    /// The record's not-before time (its `DELIVER_AT_HEADER` header), if it carries one.
    pub fn deliver_at_ms(&self) -> Option<i64> {
        self.headers().find(|(k, _)| *k == DELIVER_AT_HEADER).and_then(|(_, v)| v).and_then(parse_deliver_at)
    }
}

/// Iterator of [`BatchView::message_ids`]: `(index, id)` per record carrying an id.
/// Yields an error at most once (a record that does not decode, or breaks a message-id
/// rule), then ends.
#[derive(Debug, Clone)]
pub struct MessageIdIter<'a> {
    records: RecordIter<'a>,
    enabled: bool,
    /// The batch's `SCHEDULED` attribute: whether the deliver-at header may appear.
    scheduled: bool,
}

/// A `DELIVER_AT_HEADER` value: decimal milliseconds since the epoch.
pub fn parse_deliver_at(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl<'a> Iterator for MessageIdIter<'a> {
    type Item = Result<(u32, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let at = self.records.pos;
            let record = match self.records.next()? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            let mut id = None;
            let mut broken = None;
            let mut deliver_at = false;
            let mut what = "message id";
            for (key, value) in record.headers() {
                if key == DELIVER_AT_HEADER {
                    what = "deliver-at time";
                    broken = if !self.scheduled {
                        Some("the keel-deliver-at header is reserved: set the SCHEDULED batch attribute to schedule records")
                    } else if deliver_at {
                        Some("a record carries at most one deliver-at time")
                    } else if value.and_then(parse_deliver_at).is_none() {
                        Some("a deliver-at time is decimal milliseconds since the epoch")
                    } else {
                        deliver_at = true;
                        None
                    };
                    if broken.is_some() {
                        break;
                    }
                    continue;
                }
                if key != MESSAGE_ID_HEADER {
                    continue;
                }
                broken = if !self.enabled {
                    Some("the keel-message-id header is reserved: set the MESSAGE_IDS batch attribute to send message ids")
                } else if id.is_some() {
                    Some("a record carries at most one message id")
                } else {
                    match value {
                        None => Some("a message id is never null"),
                        Some(v) if v.is_empty() || v.len() > MESSAGE_ID_LEN_MAX => Some("a message id is 1..=MESSAGE_ID_LEN_MAX bytes"),
                        Some(v) => {
                            id = Some(v);
                            None
                        }
                    }
                };
                if broken.is_some() {
                    break;
                }
            }
            if let Some(reason) = broken {
                self.records.failed = true;
                return Some(Err(DecodeError::Invalid { offset: at, what, reason }));
            }
            if let Some(id) = id {
                return Some(Ok((record.offset_delta, id)));
            }
        }
    }
}

/// Iterator over a record's headers as `(key, value)`. The headers were validated when
/// the record was decoded.
#[derive(Debug, Clone)]
pub struct HeaderIter<'a> {
    raw: &'a [u8],
    pos: usize,
    left: u32,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Decoding cannot fail: RecordIter validated these exact bytes. Stop rather
        // than panic if that invariant were ever broken.
        let (key, pos) = decode_header(self.raw, self.pos).ok()?;
        self.pos = pos;
        Some(key)
    }
}

/// Decodes one header at `buf[pos..]`: `(key, value)` and the position after it.
#[allow(clippy::type_complexity)]
fn decode_header(buf: &[u8], pos: usize) -> Result<((&str, Option<&[u8]>), usize), DecodeError> {
    let (key, pos) = length_prefixed(buf, pos, "header key")?;
    let Some(key_bytes) = key else {
        return Err(DecodeError::Invalid { offset: pos, what: "header key", reason: "null header key" });
    };
    let key_str =
        std::str::from_utf8(key_bytes).map_err(|_| DecodeError::Invalid { offset: pos - key_bytes.len(), what: "header key", reason: "not UTF-8" })?;
    let (value, pos) = length_prefixed(buf, pos, "header value")?;
    Ok(((key_str, value), pos))
}

/// Reads a varint length (`-1` = null) and the bytes it covers, within `buf`.
fn length_prefixed<'a>(buf: &'a [u8], pos: usize, what: &'static str) -> Result<(Option<&'a [u8]>, usize), DecodeError> {
    let (len, start) = get_varint(buf, pos)?;
    if len == -1 {
        return Ok((None, start));
    }
    if len < -1 {
        return Err(DecodeError::Invalid { offset: pos, what, reason: "negative length" });
    }
    let have = buf.len() - start;
    if len as u64 > have as u64 {
        return Err(DecodeError::Truncated { offset: start, need: len as usize - have, have });
    }
    let end = start + len as usize;
    Ok((Some(&buf[start..end]), end))
}

/// Iterator over a batch's records. Yields an error at most once, then ends.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    buf: &'a [u8],
    pos: usize,
    index: u32,
    header: BatchHeader,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    fn decode_one(&mut self) -> Result<RecordView<'a>, DecodeError> {
        let (len, body) = get_varint(self.buf, self.pos)?;
        if len < 1 {
            return Err(DecodeError::Invalid { offset: self.pos, what: "record length", reason: "a record is at least one byte" });
        }
        let have = self.buf.len() - body;
        if len as u64 > have as u64 {
            return Err(DecodeError::Truncated { offset: body, need: len as usize - have, have });
        }
        let end = body + len as usize;
        // Everything below reads within the record, so a bad inner length cannot run
        // into the next record.
        let rec = &self.buf[..end];
        if rec[body] != 0 {
            return Err(DecodeError::Invalid { offset: body, what: "record attributes", reason: "reserved bits set" });
        }
        let (ts_delta, pos) = get_varint(rec, body + 1)?;
        let timestamp_ms = self.header.first_timestamp_ms.checked_add(ts_delta).ok_or(DecodeError::Invalid {
            offset: body + 1,
            what: "timestamp delta",
            reason: "overflows i64",
        })?;
        let (offset_delta, pos2) = get_varint(rec, pos)?;
        if offset_delta != i64::from(self.index) {
            return Err(DecodeError::Invalid { offset: pos, what: "offset delta", reason: "records must be numbered 0, 1, 2, … in order" });
        }
        let (key, pos) = length_prefixed(rec, pos2, "record key")?;
        let (value, pos) = length_prefixed(rec, pos, "record value")?;
        let (count, headers_start) = get_varint(rec, pos)?;
        if count < 0 {
            return Err(DecodeError::Invalid { offset: pos, what: "header count", reason: "negative" });
        }
        if count > i64::from(RECORD_HEADER_COUNT_MAX) {
            return Err(DecodeError::TooLarge { offset: pos, what: "header count", size: count as u64, max: u64::from(RECORD_HEADER_COUNT_MAX) });
        }
        let mut p = headers_start;
        for _ in 0..count {
            let (_, next) = decode_header(rec, p)?;
            p = next;
        }
        if p != end {
            return Err(DecodeError::Invalid { offset: p, what: "record", reason: "record length does not match its fields" });
        }
        self.pos = end;
        Ok(RecordView { offset_delta: self.index, timestamp_ms, key, value, header_count: count as u32, headers_raw: &self.buf[headers_start..end] })
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.index == self.header.record_count {
            if self.pos != self.buf.len() {
                self.failed = true;
                return Some(Err(DecodeError::Invalid { offset: self.pos, what: "batch", reason: "bytes after the last declared record" }));
            }
            return None;
        }
        if self.pos == self.buf.len() {
            self.failed = true;
            return Some(Err(DecodeError::CountMismatch { offset: self.pos, declared: self.header.record_count, found: self.index }));
        }
        match self.decode_one() {
            Ok(record) => {
                self.index += 1;
                Some(Ok(record))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Producer identity and routing fields written into a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    /// Priority lane, `0..PRIORITY_LANES_MAX`; higher is served first in queue mode.
    pub priority: u8,
    /// Largest batch the builder may produce; at most `BATCH_SIZE_MAX`.
    pub size_max: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions { producer_id: NO_PRODUCER_ID, producer_epoch: NO_PRODUCER_EPOCH, base_sequence: NO_SEQUENCE, priority: 0, size_max: BATCH_SIZE_MAX }
    }
}

/// A record to append with [`BatchBuilder::push`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NewRecord<'a> {
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    /// The record's message id, for broker-side dedupe within the topic's window
    /// (1..=`MESSAGE_ID_LEN_MAX` bytes). Written as the `MESSAGE_ID_HEADER` header.
    pub message_id: Option<&'a [u8]>,
    /// Not before this time (ms since the epoch) to queue groups. Written as the
    /// `DELIVER_AT_HEADER` header.
    pub deliver_at_ms: Option<i64>,
}

/// Why the builder refused a record or a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("the batch is full ({size} bytes of at most {max}, or {count} records); send it and start a new one")]
    BatchFull { size: usize, max: usize, count: u32 },
    #[error("a single record of {size} bytes exceeds the batch size limit of {max} bytes")]
    RecordTooLarge { size: usize, max: usize },
    #[error("a record has {count} headers, above the limit of {max}")]
    TooManyHeaders { count: usize, max: u32 },
    #[error("priority {priority} is not below the number of lanes ({max})")]
    InvalidPriority { priority: u8, max: u8 },
    #[error("batch size limit {size_max} is outside 1 header ..= BATCH_SIZE_MAX ({max})")]
    InvalidSizeMax { size_max: usize, max: usize },
    #[error("a batch needs at least one record")]
    Empty,
    #[error("record timestamp {timestamp_ms} is too far from the batch's first timestamp {first_timestamp_ms} to encode; send it in its own batch")]
    TimestampOutOfRange { timestamp_ms: i64, first_timestamp_ms: i64 },
    #[error("the batch to rebuild does not decode: {0}")]
    Undecodable(String),
    #[error("the header names {MESSAGE_ID_HEADER:?} and {DELIVER_AT_HEADER:?} are reserved; set the record's message id or deliver-at time instead")]
    ReservedHeader,
    #[error("a message id of {len} bytes is outside 1..={max} bytes")]
    InvalidMessageId { len: usize, max: usize },
}

/// Encodes records into one batch. Used by producers; the broker never re-encodes.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    options: BatchOptions,
    count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    /// Some record carries a message id: the `MESSAGE_IDS` attribute is set.
    message_ids: bool,
    /// Some record carries a deliver-at time: the `SCHEDULED` attribute is set.
    scheduled: bool,
}

impl BatchBuilder {
    pub fn new(options: BatchOptions) -> Result<BatchBuilder, BuildError> {
        if options.priority >= PRIORITY_LANES_MAX {
            return Err(BuildError::InvalidPriority { priority: options.priority, max: PRIORITY_LANES_MAX });
        }
        if options.size_max > BATCH_SIZE_MAX || options.size_max <= BATCH_HEADER_LEN {
            return Err(BuildError::InvalidSizeMax { size_max: options.size_max, max: BATCH_SIZE_MAX });
        }
        let mut buf = BytesMut::with_capacity(options.size_max.min(64 * 1024));
        buf.put_bytes(0, BATCH_HEADER_LEN);
        Ok(BatchBuilder { buf, options, count: 0, first_timestamp_ms: 0, max_timestamp_ms: i64::MIN, message_ids: false, scheduled: false })
    }

    /// Sets the producer fields written by [`BatchBuilder::finish`] (an idempotent
    /// producer numbers a batch when it is sent, after its records were added).
    pub fn set_producer(&mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) {
        self.options.producer_id = producer_id;
        self.options.producer_epoch = producer_epoch;
        self.options.base_sequence = base_sequence;
    }

    /// Bytes the batch would occupy if finished now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a record. On `Err` the builder is unchanged.
    pub fn push(&mut self, record: NewRecord<'_>) -> Result<(), BuildError> {
        let header_count = record.headers.len() + usize::from(record.message_id.is_some()) + usize::from(record.deliver_at_ms.is_some());
        if header_count > RECORD_HEADER_COUNT_MAX as usize {
            return Err(BuildError::TooManyHeaders { count: header_count, max: RECORD_HEADER_COUNT_MAX });
        }
        if record.headers.iter().any(|(k, _)| *k == MESSAGE_ID_HEADER || *k == DELIVER_AT_HEADER) {
            return Err(BuildError::ReservedHeader);
        }
        if let Some(id) = record.message_id {
            if id.is_empty() || id.len() > MESSAGE_ID_LEN_MAX {
                return Err(BuildError::InvalidMessageId { len: id.len(), max: MESSAGE_ID_LEN_MAX });
            }
        }
        let first = if self.count == 0 { record.timestamp_ms } else { self.first_timestamp_ms };
        let ts_delta =
            record.timestamp_ms.checked_sub(first).ok_or(BuildError::TimestampOutOfRange { timestamp_ms: record.timestamp_ms, first_timestamp_ms: first })?;
        let body_len = self.record_body_len(&record, ts_delta);
        let size = varint_len(body_len as i64) + body_len;
        if BATCH_HEADER_LEN + size > self.options.size_max {
            return Err(BuildError::RecordTooLarge { size, max: self.options.size_max - BATCH_HEADER_LEN });
        }
        if self.buf.len() + size > self.options.size_max || self.count == BATCH_RECORD_COUNT_MAX {
            return Err(BuildError::BatchFull { size: self.buf.len(), max: self.options.size_max, count: self.count });
        }
        let deliver_at = record.deliver_at_ms.map(|t| t.to_string());
        let before = self.buf.len();
        put_varint(&mut self.buf, body_len as i64);
        self.buf.put_u8(0);
        put_varint(&mut self.buf, ts_delta);
        put_varint(&mut self.buf, i64::from(self.count));
        put_nullable(&mut self.buf, record.key);
        put_nullable(&mut self.buf, record.value);
        put_varint(&mut self.buf, header_count as i64);
        if let Some(id) = record.message_id {
            put_nullable(&mut self.buf, Some(MESSAGE_ID_HEADER.as_bytes()));
            put_nullable(&mut self.buf, Some(id));
            self.message_ids = true;
        }
        if let Some(t) = &deliver_at {
            put_nullable(&mut self.buf, Some(DELIVER_AT_HEADER.as_bytes()));
            put_nullable(&mut self.buf, Some(t.as_bytes()));
            self.scheduled = true;
        }
        for (key, value) in record.headers {
            put_nullable(&mut self.buf, Some(key.as_bytes()));
            put_nullable(&mut self.buf, *value);
        }
        debug_assert_eq!(self.buf.len() - before, size, "record size precomputation is exact");
        self.first_timestamp_ms = first;
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        self.count += 1;
        Ok(())
    }

    fn record_body_len(&self, record: &NewRecord<'_>, ts_delta: i64) -> usize {
        let nullable_len = |v: Option<&[u8]>| match v {
            None => varint_len(-1),
            Some(b) => varint_len(b.len() as i64) + b.len(),
        };
        let mut len = 1 + varint_len(ts_delta) + varint_len(i64::from(self.count));
        len += nullable_len(record.key) + nullable_len(record.value);
        len += varint_len((record.headers.len() + usize::from(record.message_id.is_some()) + usize::from(record.deliver_at_ms.is_some())) as i64);
        if let Some(id) = record.message_id {
            len += nullable_len(Some(MESSAGE_ID_HEADER.as_bytes())) + nullable_len(Some(id));
        }
        if let Some(t) = record.deliver_at_ms {
            len += nullable_len(Some(DELIVER_AT_HEADER.as_bytes())) + nullable_len(Some(t.to_string().as_bytes()));
        }
        for (key, value) in record.headers {
            len += nullable_len(Some(key.as_bytes())) + nullable_len(*value);
        }
        len
    }

    /// Writes the header and CRC32C and returns the encoded batch (base offset 0).
    pub fn finish(mut self) -> Result<Bytes, BuildError> {
        if self.count == 0 {
            return Err(BuildError::Empty);
        }
        let batch_length = (self.buf.len() - field::LENGTH_COVERS_FROM) as u32;
        let o = self.options;
        let mut header = [0u8; BATCH_HEADER_LEN];
        header[field::BATCH_LENGTH..][..4].copy_from_slice(&batch_length.to_le_bytes());
        header[field::MAGIC] = BATCH_MAGIC;
        let attributes = if self.message_ids { Attributes::MESSAGE_IDS } else { 0 } | if self.scheduled { Attributes::SCHEDULED } else { 0 };
        header[field::ATTRIBUTES..][..2].copy_from_slice(&attributes.to_le_bytes());
        header[field::PRIORITY] = o.priority;
        header[field::RECORD_COUNT..][..4].copy_from_slice(&self.count.to_le_bytes());
        header[field::FIRST_TIMESTAMP..][..8].copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        header[field::MAX_TIMESTAMP..][..8].copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        header[field::PRODUCER_ID..][..8].copy_from_slice(&o.producer_id.to_le_bytes());
        header[field::PRODUCER_EPOCH..][..2].copy_from_slice(&o.producer_epoch.to_le_bytes());
        header[field::BASE_SEQUENCE..][..4].copy_from_slice(&o.base_sequence.to_le_bytes());
        self.buf[..BATCH_HEADER_LEN].copy_from_slice(&header);
        let crc = crc32c::crc32c(&self.buf[field::CRC_COVERS_FROM..]);
        self.buf[field::CRC..][..4].copy_from_slice(&crc.to_le_bytes());
        Ok(self.buf.freeze())
    }
}

/// Rewrites a finished batch's producer fields (id, epoch, base sequence) and its CRC.
/// For an idempotent producer renumbering batches the broker refused, after an epoch
/// bump; the records are untouched.
pub fn restamp_producer(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Result<(), DecodeError> {
    BatchHeader::parse(batch)?;
    batch[field::PRODUCER_ID..][..8].copy_from_slice(&producer_id.to_le_bytes());
    batch[field::PRODUCER_EPOCH..][..2].copy_from_slice(&producer_epoch.to_le_bytes());
    batch[field::BASE_SEQUENCE..][..4].copy_from_slice(&base_sequence.to_le_bytes());
    let crc = crc32c::crc32c(&batch[field::CRC_COVERS_FROM..]);
    batch[field::CRC..][..4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn put_nullable(buf: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => put_varint(buf, -1),
        Some(bytes) => {
            put_varint(buf, bytes.len() as i64);
            buf.put_slice(bytes);
        }
    }
}

fn le_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}
fn le_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}
fn le_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests;
