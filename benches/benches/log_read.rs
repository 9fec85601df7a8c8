//! Sequential read-back of committed data from the page cache.
//!
//! A 256 MiB log of 64 KiB batches is written and flushed (so it sits in the page
//! cache), with the tail cache disabled so every read goes through the segment files:
//! `pread` in chunks of up to 8 MiB, CRC32C verification of every entry, `Bytes`
//! slices out of each chunk (no per-entry copy).
//!
//! Run: `cargo bench -p keel-benches --bench log_read`

use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use keel_benches::{batch_64k_of_1k_records, entry_for};
use keel_protocol::batch::BatchHeader;
use keel_storage::{Log, LogConfig};

const LOG_BYTES: usize = 256 * 1024 * 1024;
const READ_BYTES_PER_CALL: u64 = 8 * 1024 * 1024;

fn build_log(dir: &std::path::Path) -> (Log, u64, usize) {
    let batch = batch_64k_of_1k_records();
    let records = BatchHeader::parse(&batch).expect("valid batch").record_count;
    // The read path through the page cache is what is measured: keep the synced pages
    // (a broker drops them, serving recent reads from its tail cache).
    let log = Log::open(dir, LogConfig { tail_cache_bytes: 0, drop_synced_pages: false, ..LogConfig::default() }).expect("open log");
    let count = (LOG_BYTES / batch.len()) as u64;
    let mut offset = 0;
    for index in 1..=count {
        log.append([entry_for(&batch, index, offset, records)]).expect("append");
        offset += u64::from(records);
        if index % 256 == 0 {
            log.flush().expect("flush");
        }
    }
    log.flush().expect("flush");
    (log, count, batch.len())
}

fn read_all(log: &Log, count: u64) -> usize {
    let mut next = 1;
    let mut bytes = 0;
    while next <= count {
        let entries = log.read(next..count + 1, READ_BYTES_PER_CALL).expect("read");
        next = entries.last().expect("non-empty").meta.id.index + 1;
        bytes += entries.iter().map(|e| e.payload.len()).sum::<usize>();
    }
    bytes
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let (log, count, batch_len) = build_log(dir.path());
    let total = count as usize * batch_len;
    assert_eq!(read_all(&log, count), total);
    let mut group = c.benchmark_group("sequential_read_page_cache");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    group.bench_function("log_read_256MiB", |b| b.iter(|| read_all(&log, count)));
    group.finish();
    let start = Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        read_all(&log, count);
    }
    let gbps = (total * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
    println!("\nsequential read-back of {} MiB through segment files (CRC-checked): {gbps:.2} GB/s (target >= 1.0)", total >> 20);
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
