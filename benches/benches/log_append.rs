//! Log append with fsync `always` against the raw baseline, in one run.
//!
//! - `log`: `Log::append` of one 64 KiB batch (1 KiB records) + `Log::flush`, i.e. one
//!   vectored write and one `fdatasync` per batch, plus the entry header and CRC32C.
//! - `raw`: the same bytes with `File::write_all` + `sync_data` per batch, to a plain
//!   file in the same directory.
//!
//! After criterion's reports, the two are measured again *interleaved* (alternating
//! rounds, median of each) and the ratio log/raw is printed: interleaving exposes both
//! to the same background noise, which matters on shared machines.
//!
//! Run: `cargo bench -p keel-benches --bench log_append`

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use keel_benches::{batch_64k_of_1k_records, entry_for};
use keel_protocol::batch::BatchHeader;
use keel_storage::{Log, LogConfig};

struct LogAppender {
    log: Log,
    next_index: u64,
    next_offset: u64,
}

impl LogAppender {
    fn new(dir: &Path) -> LogAppender {
        let log = Log::open(dir.join("log"), LogConfig::default()).expect("open log");
        LogAppender { log, next_index: 1, next_offset: 0 }
    }

    fn append_durable(&mut self, batch: &bytes::Bytes, records: u32) {
        self.log.append([entry_for(batch, self.next_index, self.next_offset, records)]).expect("append");
        self.log.flush().expect("flush");
        self.next_index += 1;
        self.next_offset += u64::from(records);
    }
}

fn raw_file(dir: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(dir.join("raw.data")).expect("open raw file")
}

fn raw_append_durable(file: &mut File, batch: &[u8]) {
    file.write_all(batch).expect("write");
    file.sync_data().expect("fsync");
}

fn bench(c: &mut Criterion) {
    let batch = batch_64k_of_1k_records();
    let records = BatchHeader::parse(&batch).expect("valid batch").record_count;
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let mut group = c.benchmark_group("append_64KiB_batch_fsync_always");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.sample_size(30).measurement_time(Duration::from_secs(6));
    let mut appender = LogAppender::new(dir.path());
    group.bench_function("log", |b| b.iter(|| appender.append_durable(&batch, records)));
    let mut raw = raw_file(dir.path());
    group.bench_function("raw_write_fsync", |b| b.iter(|| raw_append_durable(&mut raw, &batch)));
    group.finish();
}

/// Alternating rounds of `BATCHES_PER_ROUND` batches each; prints medians and the ratio.
fn interleaved_ratio() {
    const ROUNDS: usize = 15;
    const BATCHES_PER_ROUND: usize = 100;
    let batch = batch_64k_of_1k_records();
    let records = BatchHeader::parse(&batch).expect("valid batch").record_count;
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let mut appender = LogAppender::new(dir.path());
    let mut raw = raw_file(dir.path());
    let (mut log_rates, mut raw_rates) = (Vec::new(), Vec::new());
    let mb = (batch.len() * BATCHES_PER_ROUND) as f64 / 1e6;
    for round in 0..ROUNDS {
        // Alternate which goes first so neither always follows the other's writeback.
        let order: [bool; 2] = if round % 2 == 0 { [true, false] } else { [false, true] };
        for is_log in order {
            let start = Instant::now();
            for _ in 0..BATCHES_PER_ROUND {
                if is_log {
                    appender.append_durable(&batch, records);
                } else {
                    raw_append_durable(&mut raw, &batch);
                }
            }
            let rate = mb / start.elapsed().as_secs_f64();
            if is_log {
                log_rates.push(rate)
            } else {
                raw_rates.push(rate)
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (log_mb, raw_mb) = (median(&mut log_rates), median(&mut raw_rates));
    let ratio = log_mb / raw_mb;
    println!();
    println!("interleaved, {ROUNDS} rounds x {BATCHES_PER_ROUND} batches of {} bytes ({records} records of 1 KiB), fsync always:", batch.len());
    println!("  log append+flush : {log_mb:8.1} MB/s ({:.0} batches/s)", log_mb * 1e6 / batch.len() as f64);
    println!("  raw write+fsync  : {raw_mb:8.1} MB/s ({:.0} batches/s)", raw_mb * 1e6 / batch.len() as f64);
    println!("  ratio log/raw    : {ratio:.3}  (target >= 0.90)");
    println!("  log I/O          : {:?}", appender.log.io_stats());
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    interleaved_ratio();
}
