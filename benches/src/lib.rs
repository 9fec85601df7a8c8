//! Shared fixtures for Keel's benchmarks (the criterion benches in `benches/` and, with
//! the cluster issue, the `keel-bench` load generator).

use bytes::Bytes;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_storage::{Entry, EntryMeta, LogId};

/// Size of each record value in the append benchmarks.
pub const RECORD_BYTES: usize = 1024;
/// Target size of each batch in the append benchmarks.
pub const BATCH_BYTES: usize = 64 * 1024;

/// A real protocol batch of `RECORD_BYTES` records filling about `BATCH_BYTES`, as a
/// producer would encode it.
pub fn batch_64k_of_1k_records() -> Bytes {
    let value = vec![b'x'; RECORD_BYTES];
    let mut builder = BatchBuilder::new(BatchOptions { size_max: BATCH_BYTES, ..BatchOptions::default() }).expect("valid options");
    let mut i = 0i64;
    while builder
        .push(NewRecord { timestamp_ms: 1_700_000_000_000 + i, key: None, value: Some(&value), headers: &[], message_id: None, deliver_at_ms: None })
        .is_ok()
    {
        i += 1;
    }
    builder.finish().expect("at least one record fits")
}

/// The log entry for `batch` at `index`, following `prev_end_offset`.
pub fn entry_for(batch: &Bytes, index: u64, base_offset: u64, record_count: u32) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 1, base_offset, record_count, max_timestamp_ms: 1_700_000_000_000 + index as i64 },
        payload: batch.clone(),
    }
}
