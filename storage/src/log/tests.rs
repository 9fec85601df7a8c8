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
