//! Record batches from arbitrary bytes: never a panic, error offsets stay within the
//! input, and a batch that validates re-encodes (through the builder) to a batch with
//! the same records.
//!
//! The first input byte picks a mode: odd = the rest is used as is; even = the rest
//! gets its length field and CRC32C repaired first, so mutations reach the record
//! decoder instead of dying at the checksum.
#![no_main]

use bytes::Bytes;
use keel_protocol::batch::{field, BatchBuilder, BatchOptions, BatchView, NewRecord, BATCH_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let Some((&mode, rest)) = raw.split_first() else { return };
    let mut owned = rest.to_vec();
    if mode % 2 == 0 && owned.len() >= BATCH_HEADER_LEN {
        let len = (owned.len() - field::LENGTH_COVERS_FROM) as u32;
        owned[field::BATCH_LENGTH..field::BATCH_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&owned[field::CRC_COVERS_FROM..]);
        owned[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let data = &owned[..];
    let input = Bytes::copy_from_slice(data);
    let view = match BatchView::validate(input) {
        Ok(v) => v,
        Err(e) => {
            assert!(e.offset() <= data.len(), "error offset {} beyond input of {}", e.offset(), data.len());
            return;
        }
    };
    let h = *view.header();
    let records: Vec<_> = view.records().map(|r| r.expect("a validated batch iterates cleanly")).collect();
    assert_eq!(records.len() as u32, h.record_count);
    let options = BatchOptions {
        producer_id: h.producer_id,
        producer_epoch: h.producer_epoch,
        base_sequence: h.base_sequence,
        priority: h.priority,
        ..BatchOptions::default()
    };
    let mut builder = BatchBuilder::new(options).expect("header fields of a valid batch are valid options");
    for r in &records {
        let headers: Vec<(&str, Option<&[u8]>)> = r.headers().collect();
        match builder.push(NewRecord { timestamp_ms: r.timestamp_ms, key: r.key, value: r.value, headers: &headers, message_id: None, deliver_at_ms: None }) {
            Ok(()) => {}
            // The input's deltas are relative to its header's first timestamp; the
            // builder's are relative to the first record, and may not fit i64.
            Err(keel_protocol::BuildError::TimestampOutOfRange { .. }) => return,
            Err(e) => panic!("re-encoding a valid batch failed: {e}"),
        }
    }
    let again = BatchView::validate(builder.finish().expect("non-empty")).expect("re-encoded batch validates");
    let again_records: Vec<_> = again.records().map(|r| r.expect("valid")).collect();
    assert_eq!(again_records.len(), records.len());
    for (a, b) in again_records.iter().zip(&records) {
        assert_eq!((a.timestamp_ms, a.key, a.value), (b.timestamp_ms, b.key, b.value));
        assert!(a.headers().eq(b.headers()));
    }
});
