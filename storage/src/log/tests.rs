//! Unit tests of the log that need crate-internal hooks (fault injection).

use super::*;
use crate::config::LogConfig;
use crate::entry::{Entry, EntryMeta, LogId};

fn entry(index: u64, base_offset: u64, payload: &'static [u8]) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 0, base_offset, record_count: 1, max_timestamp_ms: index as i64 },
        payload: Bytes::from_static(payload),
    }
}

#[test]
fn a_failed_fsync_poisons_the_log_and_is_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append([entry(1, 0, b"a")]).unwrap();
    log.flush().unwrap();
    log.append([entry(2, 1, b"b")]).unwrap();
    log.inject_sync_failure();
    assert!(matches!(log.flush(), Err(StorageError::Io { op: "fdatasync", .. })));
    let fsyncs_after_failure = log.io_stats().fsyncs;
    assert!(matches!(log.flush(), Err(StorageError::Poisoned { .. })), "a second flush must not retry the fsync");
    assert!(matches!(log.append([entry(3, 2, b"c")]), Err(StorageError::Poisoned { .. })));
    assert_eq!(log.io_stats().fsyncs, fsyncs_after_failure, "no fsync is attempted after poisoning");
    assert!(log.durable().is_closed(), "waiters are released with an error");
    assert_eq!(log.durable().get(), 2, "the watermark never covers the entry whose sync failed");
    drop(log);
    // Reopening recovers what reached the file; the failed entry was never reported durable.
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(log.state().last.unwrap().index >= 1);
}

#[test]
fn the_invariant_check_names_a_broken_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append([entry(1, 0, b"a"), entry(2, 1, b"b")]).unwrap();
    log.flush().unwrap();
    assert_eq!(log.lock_state().check_invariants(), Ok(()));
    log.lock_state().last = Some(LogId { term: 1, index: 9 });
    assert!(log.lock_state().check_invariants().unwrap_err().contains("but next index 3"));
    log.lock_state().last = Some(LogId { term: 1, index: 2 });
    log.lock_state().next_index = 7;
    assert!(log.lock_state().check_invariants().unwrap_err().contains("tail cache ends at 3"));
}

fn payload_entry(index: u64, len: usize) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 0, base_offset: index - 1, record_count: 1, max_timestamp_ms: 0 },
        payload: Bytes::from(vec![b'x'; len]),
    }
}

#[test]
fn logs_sharing_a_budget_cache_at_most_their_share_and_an_idle_log_gives_its_share_back() {
    let share = crate::TailCacheShare::new(64 * 1024);
    let config = LogConfig { tail_cache_bytes: 48 * 1024, tail_cache_share: Some(share.clone()), ..LogConfig::default() };
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<Log> = dirs.iter().map(|d| Log::open(d.path(), config.clone()).unwrap()).collect();
    assert_eq!(share.holders(), 0, "empty logs hold nothing");
    for i in 1..=20u64 {
        for log in &logs {
            log.append([payload_entry(i, 4096)]).unwrap();
            log.flush().unwrap();
        }
    }
    assert_eq!(share.holders(), 2);
    for log in &logs {
        let cached = log.tail_cache_bytes();
        // Half of 64 KiB each, give or take the entry that crossed it.
        assert!(cached <= 32 * 1024 + 4096 + 64, "a log caches {cached} bytes, past its half of the budget");
        assert!(cached >= 16 * 1024, "a log caches only {cached} bytes");
    }
    // Alone, a log uses up to its own bound (48 KiB), not the whole budget.
    logs[1].release_tail_cache();
    assert_eq!(logs[1].tail_cache_bytes(), 0);
    assert_eq!(share.holders(), 1, "a released cache no longer counts");
    for i in 21..=40u64 {
        logs[0].append([payload_entry(i, 4096)]).unwrap();
        logs[0].flush().unwrap();
    }
    let cached = logs[0].tail_cache_bytes();
    assert!((40 * 1024..=48 * 1024 + 4096 + 64).contains(&cached), "the busy log caches {cached} bytes");
    // What was released is read back from the file.
    let read = logs[1].read(1..21, u64::MAX).unwrap();
    assert_eq!(read.len(), 20);
    assert!(read.iter().all(|e| e.payload.len() == 4096));
    drop(logs);
    assert_eq!(share.holders(), 0, "a closed log leaves the budget");
}
