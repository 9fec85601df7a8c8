//! Reads through segment files: entries larger than a read chunk, byte budgets, and
//! lookups by offset and time across sealed and active segments.

use bytes::Bytes;
use keel_storage::{Entry, EntryMeta, Log, LogConfig, LogId};

fn entry(index: u64, base_offset: u64, size: usize, ts: i64) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 1, base_offset, record_count: 2, max_timestamp_ms: ts },
        payload: Bytes::from((0..size).map(|i| (i as u64 ^ index) as u8).collect::<Vec<u8>>()),
    }
}

#[test]
fn an_entry_larger_than_a_read_chunk_is_read_whole_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { tail_cache_bytes: 0, ..LogConfig::default() };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let entries = vec![entry(1, 0, 100, 1), entry(2, 2, 300 * 1024, 2), entry(3, 4, 100, 3), entry(4, 6, 9 * 1024 * 1024, 4), entry(5, 8, 10, 5)];
    log.append(entries.clone()).unwrap();
    log.flush().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    // A zero budget still returns one entry per call, however large.
    let mut got = Vec::new();
    let mut next = 1;
    while next <= 5 {
        let e = log.read(next..6, 0).unwrap();
        assert_eq!(e.len(), 1, "a zero budget returns exactly one entry");
        next = e[0].meta.id.index + 1;
        got.extend(e);
    }
    assert_eq!(got, entries);
    assert_eq!(log.read(0..6, u64::MAX).unwrap(), entries);
}

#[test]
fn lookups_by_time_find_the_first_entry_at_or_after_the_time_in_sealed_and_active_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, index_interval_bytes: 512, tail_cache_bytes: 0, ..LogConfig::default() };
    let log = Log::open(dir.path(), config).unwrap();
    // Timestamps rise by 10 but dip every seventh entry (producers' clocks disagree).
    let ts = |i: u64| if i.is_multiple_of(7) { 10 * i as i64 - 35 } else { 10 * i as i64 };
    let entries: Vec<Entry> = (1..=60).map(|i| entry(i, 2 * (i - 1), 200, ts(i))).collect();
    for e in &entries {
        log.append([e.clone()]).unwrap();
        log.flush().unwrap();
    }
    for target in (0..=620).step_by(5) {
        let want = entries.iter().find(|e| e.meta.max_timestamp_ms >= target).map(|e| e.meta.id.index);
        assert_eq!(log.index_for_timestamp(target).unwrap(), want, "time {target}");
    }
    for offset in 0..125 {
        let want = entries.iter().find(|e| e.meta.end_offset() > offset).map(|e| e.meta.id.index);
        assert_eq!(log.index_for_offset(offset).unwrap(), want, "offset {offset}");
    }
}

#[test]
fn readers_running_alongside_appends_and_flushes_see_only_whole_correct_entries() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 16 * 1024, index_interval_bytes: 256, tail_cache_bytes: 2048, ..LogConfig::default() };
    let log = Log::open(dir.path(), config).unwrap();
    const ENTRIES: u64 = 1500;
    let expected = |index: u64| entry(index, 2 * (index - 1), 64 + (index as usize * 37) % 900, index as i64);
    std::thread::scope(|s| {
        s.spawn(|| {
            for index in 1..=ENTRIES {
                log.append([expected(index)]).unwrap();
                if index % 10 == 0 {
                    log.flush().unwrap();
                }
            }
            log.flush().unwrap();
        });
        for reader in 0..2u64 {
            let log = &log;
            s.spawn(move || {
                let mut seen = 0u64;
                let mut round = 0u64;
                while seen < ENTRIES {
                    round += 1;
                    let end = log.state().next_index;
                    let start = 1 + (round * 7919 + reader * 104_729) % end.max(1);
                    for e in log.read(start..end, 4096).unwrap() {
                        assert_eq!(e, expected(e.meta.id.index), "reader {reader} got a wrong entry");
                    }
                    seen = end.saturating_sub(1);
                }
            });
        }
    });
    assert_eq!(log.read(1..ENTRIES + 1, u64::MAX).unwrap().len() as u64, ENTRIES);
}
