//! Appends and flushes N one-batch entries through `Log` (for instruction counts under
//! callgrind: the storage path's user-space cost per durable append).
use keel_benches::{batch_64k_of_1k_records, entry_for};
use keel_storage::{Log, LogConfig};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let batch = batch_64k_of_1k_records();
    let records = keel_protocol::batch::BatchHeader::parse(&batch).expect("valid batch").record_count;
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let log = Log::open(dir.path().join("log"), LogConfig::default()).expect("open log");
    let mut offset = 0;
    for index in 1..=n {
        log.append([entry_for(&batch, index, offset, records)]).expect("append");
        log.flush().expect("flush");
        offset += u64::from(records);
    }
    println!("{n} durable appends");
}
