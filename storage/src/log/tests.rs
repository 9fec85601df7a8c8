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

/// Which of a file's pages are in the page cache (`mincore` over a mapping of it).
fn resident_pages(path: &std::path::Path) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file nothing else writes during the call;
    // only its residency is queried, its bytes are never read.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    assert_ne!(map, libc::MAP_FAILED, "mmap the segment");
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` holds one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    // SAFETY: unmapping exactly what was mapped above.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().map(|b| b & 1 == 1).collect()
}

/// A directory on a file system with a page cache (tmpfs keeps file pages whatever
/// the advice, so the test cannot run there).
fn page_cached_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let c = std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `statfs` fills the zeroed struct; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut fs) }, 0);
    if fs.f_type == libc::TMPFS_MAGIC {
        return tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    }
    tmp
}

#[test]
fn synced_whole_pages_leave_the_page_cache_and_the_page_the_next_append_extends_stays() {
    for drop_synced_pages in [true, false] {
        let dir = page_cached_dir();
        let log = Log::open(dir.path(), LogConfig { drop_synced_pages, ..LogConfig::default() }).unwrap();
        for i in 1..=20 {
            log.append([payload_entry(i, 10_000)]).unwrap();
            log.flush().unwrap();
        }
        let path = crate::segment::segment_path(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_ne!(len % 4096, 0, "the segment ends inside a page");
        let resident = resident_pages(&path);
        let (last, whole) = resident.split_last().unwrap();
        let cached_whole = whole.iter().filter(|r| **r).count();
        if drop_synced_pages {
            assert_eq!(cached_whole, 0, "{cached_whole} of {} synced whole pages still cached", whole.len());
            assert!(*last, "the partial last page, which the next append extends, stays cached");
        } else {
            assert_eq!(cached_whole, whole.len(), "without the advice every written page stays cached");
        }
        // Appending after the advice extends the file correctly and reads back.
        log.append([payload_entry(21, 5_000)]).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(log.state().last.unwrap().index, 21);
        let read = log.read(1..22, u64::MAX).unwrap();
        assert_eq!(read.len(), 21, "every entry reads back from the file");
        assert!(read.iter().all(|e| e.payload.iter().all(|b| *b == b'x')));
    }
}
