//! Batch format tests: property round-trips, and one test per malformed-input class
//! asserting the typed error and the offset where decoding failed.

use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct OwnedRecord {
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

fn owned_record() -> impl Strategy<Value = OwnedRecord> {
    (
        -1_000_000i64..4_000_000_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        proptest::collection::vec(("[a-z-]{0,12}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20))), 0..4),
    )
        .prop_map(|(timestamp_ms, key, value, headers)| OwnedRecord { timestamp_ms, key, value, headers })
}

fn build(records: &[OwnedRecord], options: BatchOptions) -> Bytes {
    let mut builder = BatchBuilder::new(options).unwrap();
    for r in records {
        let headers: Vec<(&str, Option<&[u8]>)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        builder
            .push(NewRecord {
                timestamp_ms: r.timestamp_ms,
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                headers: &headers,
                message_id: None,
                deliver_at_ms: None,
            })
            .unwrap();
    }
    builder.finish().unwrap()
}

fn sample_batch() -> Bytes {
    let records = vec![
        OwnedRecord { timestamp_ms: 1_000, key: Some(b"k1".to_vec()), value: Some(b"hello".to_vec()), headers: vec![("trace".into(), Some(b"abc".to_vec()))] },
        OwnedRecord { timestamp_ms: 1_005, key: None, value: Some(b"world".to_vec()), headers: vec![] },
    ];
    build(&records, BatchOptions::default())
}

/// Recomputes the CRC after a test edits a batch, so the edit reaches the record decoder.
fn reseal(buf: &mut [u8]) {
    let crc = crc32c::crc32c(&buf[field::CRC_COVERS_FROM..]);
    buf[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

proptest! {
    #[test]
    fn any_records_round_trip_through_builder_and_validated_view(
        records in proptest::collection::vec(owned_record(), 1..40),
        producer_id in any::<i64>(), epoch in any::<i16>(), seq in any::<i32>(), priority in 0u8..PRIORITY_LANES_MAX,
    ) {
        let options = BatchOptions { producer_id, producer_epoch: epoch, base_sequence: seq, priority, ..BatchOptions::default() };
        let bytes = build(&records, options);
        let view = BatchView::validate(bytes).unwrap();
        let h = *view.header();
        prop_assert_eq!(h.record_count as usize, records.len());
        prop_assert_eq!((h.producer_id, h.producer_epoch, h.base_sequence, h.priority), (producer_id, epoch, seq, priority));
        prop_assert_eq!(h.first_timestamp_ms, records[0].timestamp_ms);
        prop_assert_eq!(h.max_timestamp_ms, records.iter().map(|r| r.timestamp_ms).max().unwrap());
        let decoded: Vec<RecordView<'_>> = view.records().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(decoded.len(), records.len());
        for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
            prop_assert_eq!(got.offset_delta as usize, i);
            prop_assert_eq!(got.timestamp_ms, want.timestamp_ms);
            prop_assert_eq!(got.key, want.key.as_deref());
            prop_assert_eq!(got.value, want.value.as_deref());
            let headers: Vec<(&str, Option<&[u8]>)> = got.headers().collect();
            let want_headers: Vec<(&str, Option<&[u8]>)> = want.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            prop_assert_eq!(headers, want_headers);
        }
    }

    #[test]
    fn every_truncation_of_a_batch_is_rejected_without_panic(cut in 0usize..200) {
        let bytes = sample_batch();
        let cut = cut.min(bytes.len() - 1);
        prop_assert!(BatchView::validate(bytes.slice(..cut)).is_err());
    }

    #[test]
    fn flipping_any_bit_outside_the_base_offset_is_detected(byte in 8usize..120, bit in 0u8..8) {
        let bytes = sample_batch();
        let byte = byte % bytes.len();
        prop_assume!(byte >= 8);
        let mut corrupt = bytes.to_vec();
        corrupt[byte] ^= 1 << bit;
        prop_assert!(BatchView::validate(Bytes::from(corrupt)).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(view) = BatchView::validate(Bytes::from(raw.clone())) {
            prop_assert_eq!(view.as_bytes().len(), raw.len());
        }
    }

    #[test]
    fn arbitrary_resealed_record_bytes_never_panic_and_errors_stay_in_bounds(tail in proptest::collection::vec(any::<u8>(), 1..256), count in 1u32..5) {
        let mut buf = sample_batch()[..BATCH_HEADER_LEN].to_vec();
        buf.extend_from_slice(&tail);
        let len = (buf.len() - field::LENGTH_COVERS_FROM) as u32;
        buf[field::BATCH_LENGTH..][..4].copy_from_slice(&len.to_le_bytes());
        buf[field::RECORD_COUNT..][..4].copy_from_slice(&count.to_le_bytes());
        reseal(&mut buf);
        let total = buf.len();
        if let Err(e) = BatchView::validate(Bytes::from(buf)) {
            prop_assert!(e.offset() <= total, "offset {} beyond input of {}", e.offset(), total);
        }
    }
}

#[test]
fn stamping_the_base_offset_keeps_the_batch_valid() {
    let mut buf = sample_batch().to_vec();
    stamp_base_offset(&mut buf, 123_456).unwrap();
    let view = BatchView::validate(Bytes::from(buf)).unwrap();
    assert_eq!(view.header().base_offset, 123_456);
}

#[test]
fn a_bad_crc_is_reported_with_stored_and_computed_values() {
    let mut buf = sample_batch().to_vec();
    let last = buf.len() - 1;
    buf[last] ^= 0xff;
    match BatchView::parse(Bytes::from(buf)) {
        Err(DecodeError::BadCrc { offset, stored, computed }) => {
            assert_eq!(offset, field::CRC_COVERS_FROM);
            assert_ne!(stored, computed);
        }
        other => panic!("expected BadCrc, got {other:?}"),
    }
}

#[test]
fn an_unknown_magic_is_rejected_at_the_magic_byte() {
    let mut buf = sample_batch().to_vec();
    buf[field::MAGIC] = 9;
    assert_eq!(BatchView::parse(Bytes::from(buf)).unwrap_err(), DecodeError::Unknown { offset: field::MAGIC, what: "batch magic", value: 9 });
}

#[test]
fn an_oversize_length_is_rejected_before_anything_is_read() {
    let mut buf = sample_batch().to_vec();
    buf[field::BATCH_LENGTH..][..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(BatchView::parse(Bytes::from(buf.clone())), Err(DecodeError::TooLarge { offset: field::BATCH_LENGTH, .. })));
    assert!(matches!(batch_size(&buf), Err(DecodeError::TooLarge { .. })));
}

#[test]
fn a_record_count_above_the_records_present_is_a_count_mismatch() {
    let mut buf = sample_batch().to_vec();
    buf[field::RECORD_COUNT..][..4].copy_from_slice(&3u32.to_le_bytes());
    reseal(&mut buf);
    let end = buf.len();
    assert_eq!(BatchView::validate(Bytes::from(buf)).unwrap_err(), DecodeError::CountMismatch { offset: end, declared: 3, found: 2 });
}

#[test]
fn a_record_count_below_the_records_present_leaves_trailing_bytes() {
    let mut buf = sample_batch().to_vec();
    buf[field::RECORD_COUNT..][..4].copy_from_slice(&1u32.to_le_bytes());
    reseal(&mut buf);
    assert!(matches!(BatchView::validate(Bytes::from(buf)), Err(DecodeError::Invalid { what: "batch", .. })));
}

#[test]
fn a_bad_varint_inside_a_record_is_reported_at_its_offset() {
    let mut buf = sample_batch().to_vec();
    // The first record's length varint sits right after the header.
    for b in &mut buf[BATCH_HEADER_LEN..BATCH_HEADER_LEN + 10] {
        *b = 0xff;
    }
    reseal(&mut buf);
    assert_eq!(BatchView::validate(Bytes::from(buf)).unwrap_err(), DecodeError::BadVarint { offset: BATCH_HEADER_LEN });
}

#[test]
fn a_zero_record_batch_is_invalid() {
    let mut buf = sample_batch().to_vec();
    buf[field::RECORD_COUNT..][..4].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut buf);
    assert!(matches!(BatchView::parse(Bytes::from(buf)), Err(DecodeError::Invalid { offset: field::RECORD_COUNT, .. })));
}

#[test]
fn a_priority_outside_the_lanes_is_invalid() {
    let mut buf = sample_batch().to_vec();
    buf[field::PRIORITY] = PRIORITY_LANES_MAX;
    reseal(&mut buf);
    assert!(matches!(BatchView::parse(Bytes::from(buf)), Err(DecodeError::Invalid { offset: field::PRIORITY, .. })));
}

#[test]
fn builder_refuses_a_record_larger_than_the_batch_limit_and_stays_usable() {
    let mut builder = BatchBuilder::new(BatchOptions { size_max: 200, ..BatchOptions::default() }).unwrap();
    let big = vec![7u8; 300];
    let err = builder.push(NewRecord { value: Some(&big), ..NewRecord::default() }).unwrap_err();
    assert!(matches!(err, BuildError::RecordTooLarge { .. }), "{err:?}");
    assert!(builder.is_empty());
    let small = vec![7u8; 100];
    builder.push(NewRecord { value: Some(&small), ..NewRecord::default() }).unwrap();
    let err = builder.push(NewRecord { value: Some(&small), ..NewRecord::default() }).unwrap_err();
    assert!(matches!(err, BuildError::BatchFull { count: 1, .. }), "{err:?}");
    let batch = builder.finish().unwrap();
    assert!(batch.len() <= 200);
    assert_eq!(BatchView::validate(batch).unwrap().header().record_count, 1);
}

#[test]
fn builder_refuses_an_empty_batch() {
    assert_eq!(BatchBuilder::new(BatchOptions::default()).unwrap().finish().unwrap_err(), BuildError::Empty);
}

#[test]
fn builder_refuses_a_timestamp_whose_delta_would_overflow() {
    let mut builder = BatchBuilder::new(BatchOptions::default()).unwrap();
    builder.push(NewRecord { timestamp_ms: i64::MIN + 1, value: Some(b"a"), ..NewRecord::default() }).unwrap();
    let err = builder.push(NewRecord { timestamp_ms: i64::MAX, value: Some(b"b"), ..NewRecord::default() }).unwrap_err();
    assert!(matches!(err, BuildError::TimestampOutOfRange { .. }), "{err:?}");
    assert_eq!(BatchView::validate(builder.finish().unwrap()).unwrap().header().record_count, 1);
}

fn batch_with_ids(ids: &[Option<&[u8]>]) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let value = format!("v{i}");
        b.push(NewRecord { timestamp_ms: 1, value: Some(value.as_bytes()), message_id: *id, headers: &[("h", Some(b"x"))], ..NewRecord::default() }).unwrap();
    }
    b.finish().unwrap()
}

#[test]
fn message_ids_travel_as_the_reserved_header_and_set_the_attribute() {
    let bytes = batch_with_ids(&[Some(b"a"), None, Some(b"c")]);
    let view = BatchView::validate(bytes).unwrap();
    assert!(view.header().attributes.message_ids());
    let ids: Vec<(u32, &[u8])> = view.message_ids().collect::<Result<_, _>>().unwrap();
    assert_eq!(ids, vec![(0, &b"a"[..]), (2, &b"c"[..])]);
    let first = view.records().next().unwrap().unwrap();
    assert_eq!(first.message_id(), Some(&b"a"[..]));
    assert_eq!(first.headers().map(|(k, _)| k).collect::<Vec<_>>(), vec![MESSAGE_ID_HEADER, "h"], "a consumer sees the id as a header");
    let plain = BatchView::validate(batch_with_ids(&[None, None])).unwrap();
    assert!(!plain.header().attributes.message_ids(), "no id, no attribute");
}

#[test]
fn the_builder_refuses_the_reserved_header_and_bad_ids() {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    let reserved = [(MESSAGE_ID_HEADER, Some(&b"x"[..]))];
    assert_eq!(b.push(NewRecord { headers: &reserved, ..NewRecord::default() }), Err(BuildError::ReservedHeader));
    assert!(matches!(b.push(NewRecord { message_id: Some(b""), ..NewRecord::default() }), Err(BuildError::InvalidMessageId { len: 0, .. })));
    let long = vec![b'x'; MESSAGE_ID_LEN_MAX + 1];
    assert!(matches!(b.push(NewRecord { message_id: Some(&long), ..NewRecord::default() }), Err(BuildError::InvalidMessageId { .. })));
    assert!(b.is_empty(), "refused records leave the builder unchanged");
}

#[test]
fn a_reserved_header_without_the_attribute_is_an_invalid_batch_naming_its_record() {
    let mut buf = batch_with_ids(&[None, Some(b"id")]).to_vec();
    let attrs = u16::from_le_bytes([buf[field::ATTRIBUTES], buf[field::ATTRIBUTES + 1]]) & !0b1_0000;
    buf[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
    reseal(&mut buf);
    let err = BatchView::validate(Bytes::from(buf)).unwrap_err();
    assert!(matches!(err, DecodeError::Invalid { what: "message id", offset, .. } if offset > BATCH_HEADER_LEN), "{err:?}");
}

#[test]
fn restamping_producer_fields_keeps_the_batch_valid() {
    let mut buf = sample_batch().to_vec();
    restamp_producer(&mut buf, 42, 3, 17).unwrap();
    let view = BatchView::validate(Bytes::from(buf)).unwrap();
    assert_eq!((view.header().producer_id, view.header().producer_epoch, view.header().base_sequence), (42, 3, 17));
}

#[test]
fn rebuilding_without_some_records_keeps_the_others_and_their_ids() {
    let opts = BatchOptions { producer_id: 9, producer_epoch: 1, base_sequence: 4, priority: 2, ..BatchOptions::default() };
    let mut b = BatchBuilder::new(opts).unwrap();
    for (i, id) in [b"a", b"b", b"c"].iter().enumerate() {
        let value = format!("v{i}");
        b.push(NewRecord { timestamp_ms: 10 + i as i64, value: Some(value.as_bytes()), message_id: Some(&id[..]), ..NewRecord::default() }).unwrap();
    }
    let view = BatchView::validate(b.finish().unwrap()).unwrap();
    let rebuilt = BatchView::validate(view.rebuild_without(&[1]).unwrap()).unwrap();
    let h = rebuilt.header();
    assert_eq!((h.producer_id, h.producer_epoch, h.base_sequence, h.priority, h.record_count), (9, 1, 4, 2, 2));
    type Kept<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, i64);
    let kept: Vec<Kept> = rebuilt.records().map(|r| r.unwrap()).map(|r| (r.value, r.message_id(), r.timestamp_ms)).collect();
    assert_eq!(kept, vec![(Some(&b"v0"[..]), Some(&b"a"[..]), 10), (Some(&b"v2"[..]), Some(&b"c"[..]), 12)]);
}

#[test]
fn a_scheduled_record_carries_its_time_and_the_attribute_and_survives_a_rebuild() {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(b"now"), ..NewRecord::default() }).unwrap();
    b.push(NewRecord { timestamp_ms: 2, value: Some(b"later"), deliver_at_ms: Some(1_796_000_000_000), ..NewRecord::default() }).unwrap();
    let view = BatchView::validate(b.finish().unwrap()).unwrap();
    assert!(view.header().attributes.scheduled());
    let times: Vec<Option<i64>> = view.records().map(|r| r.unwrap().deliver_at_ms()).collect();
    assert_eq!(times, vec![None, Some(1_796_000_000_000)]);
    let rebuilt = BatchView::validate(view.rebuild_without(&[0]).unwrap()).unwrap();
    assert_eq!(rebuilt.records().next().unwrap().unwrap().deliver_at_ms(), Some(1_796_000_000_000));
    assert!(rebuilt.header().attributes.scheduled());
    let plain = BatchView::validate(sample_batch()).unwrap();
    assert!(!plain.header().attributes.scheduled(), "no schedule, no attribute");
}

#[test]
fn the_deliver_at_header_is_reserved_and_checked() {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    let reserved = [(DELIVER_AT_HEADER, Some(&b"5"[..]))];
    assert_eq!(b.push(NewRecord { headers: &reserved, ..NewRecord::default() }), Err(BuildError::ReservedHeader));
    // Hand-made: the header in a batch without the attribute, and a time that is not
    // a number, are both invalid batches.
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(b"x"), deliver_at_ms: Some(5), ..NewRecord::default() }).unwrap();
    let mut buf = b.finish().unwrap().to_vec();
    let attrs = u16::from_le_bytes([buf[field::ATTRIBUTES], buf[field::ATTRIBUTES + 1]]) & !0b10_0000;
    buf[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
    reseal(&mut buf);
    let err = BatchView::validate(Bytes::from(buf.clone())).unwrap_err();
    assert!(matches!(err, DecodeError::Invalid { what: "deliver-at time", .. }), "{err:?}");
    let at = buf.windows(1).rposition(|w| w == b"5").unwrap();
    buf[at] = b'x';
    let attrs = attrs | 0b10_0000;
    buf[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
    reseal(&mut buf);
    let err = BatchView::validate(Bytes::from(buf)).unwrap_err();
    assert!(matches!(err, DecodeError::Invalid { what: "deliver-at time", reason, .. } if reason.contains("decimal")), "{err:?}");
}
