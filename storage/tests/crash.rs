//! Crash and corruption: torn writes at every byte, bit flips anywhere in the data
//! directory, damage to fsynced data, stale or missing indexes.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use keel_storage::{Entry, EntryMeta, Log, LogConfig, LogId, StorageError, SEGMENT_HEADER_LEN};

fn entry(index: u64, size: usize) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 2, index }, kind: 1, base_offset: (index - 1) * 3, record_count: 3, max_timestamp_ms: 10_000 + index as i64 },
        payload: Bytes::from((0..size).map(|i| (i as u64 * 31 + index) as u8).collect::<Vec<u8>>()),
    }
}

fn small_segments() -> LogConfig {
    LogConfig { segment_bytes: 4096, index_interval_bytes: 128, tail_cache_bytes: 0, ..LogConfig::default() }
}

/// Writes `n` entries, flushing after each one (so each records the previous as synced).
fn write_log(dir: &Path, n: u64, size: usize, config: LogConfig) -> Vec<Entry> {
    let log = Log::open(dir, config).unwrap();
    let entries: Vec<Entry> = (1..=n).map(|i| entry(i, size)).collect();
    for e in &entries {
        log.append([e.clone()]).unwrap();
        log.flush().unwrap();
    }
    entries
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn cutting_the_last_entry_at_every_byte_reopens_to_the_last_whole_entry() {
    let base = tempfile::tempdir().unwrap();
    let entries = write_log(base.path(), 5, 100, LogConfig::default());
    let seg = segment_files(base.path()).pop().unwrap();
    let full = fs::metadata(&seg).unwrap().len();
    let last_len = entries[4].stored_len();
    for cut in (full - last_len)..full {
        let work = tempfile::tempdir().unwrap();
        copy_dir(base.path(), work.path());
        let seg = segment_files(work.path()).pop().unwrap();
        fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(cut).unwrap();
        let log = Log::open(work.path(), LogConfig::default()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(log.state().last, Some(entries[3].meta.id), "cut at {cut}");
        assert_eq!(log.read(0..100, u64::MAX).unwrap(), entries[..4].to_vec(), "cut at {cut}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), full - last_len, "the torn bytes are cut off the file");
        // The log accepts the next entry where the torn one was.
        log.append([entry(5, 7)]).unwrap();
        log.flush().unwrap();
    }
}

#[test]
fn cutting_an_unsynced_multi_entry_tail_anywhere_keeps_every_whole_entry_before_the_cut() {
    let base = tempfile::tempdir().unwrap();
    let log = Log::open(base.path(), LogConfig::default()).unwrap();
    let synced: Vec<Entry> = (1..=2).map(|i| entry(i, 50)).collect();
    log.append(synced.clone()).unwrap();
    log.flush().unwrap();
    let tail: Vec<Entry> = (3..=6).map(|i| entry(i, 50)).collect();
    log.append(tail.clone()).unwrap();
    log.flush().unwrap();
    drop(log);
    let all: Vec<Entry> = synced.iter().chain(&tail).cloned().collect();
    let seg = segment_files(base.path()).pop().unwrap();
    let full = fs::metadata(&seg).unwrap().len();
    let tail_start = SEGMENT_HEADER_LEN + synced.iter().map(Entry::stored_len).sum::<u64>();
    for cut in tail_start..full {
        let work = tempfile::tempdir().unwrap();
        copy_dir(base.path(), work.path());
        let seg = segment_files(work.path()).pop().unwrap();
        fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(cut).unwrap();
        let log = Log::open(work.path(), LogConfig::default()).unwrap();
        let whole = all.iter().scan(SEGMENT_HEADER_LEN, |end, e| {
            *end += e.stored_len();
            Some(*end)
        });
        let expect = whole.filter(|end| *end <= cut).count();
        assert_eq!(log.read(0..100, u64::MAX).unwrap(), all[..expect].to_vec(), "cut at {cut}");
    }
}

/// Flip one bit at every byte of every file in the directory; after each flip the log
/// either refuses to open, or serves only entries identical to what was written
/// (reads of a damaged entry fail). A corrupted entry is never returned.
#[test]
fn a_bit_flip_anywhere_never_yields_a_corrupted_entry() {
    let base = tempfile::tempdir().unwrap();
    let entries = write_log(base.path(), 24, 300, small_segments());
    assert!(segment_files(base.path()).len() >= 2, "the test needs sealed segments too");
    let mut files: Vec<PathBuf> = fs::read_dir(base.path()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut outcomes = [0usize; 3]; // refused, opened with read errors, opened clean
    for file in &files {
        let len = fs::metadata(file).unwrap().len() as usize;
        let name = file.file_name().unwrap().to_owned();
        // Every byte of headers and indexes; every 7th byte of payloads keeps it fast.
        for at in (0..len).filter(|&i| i < 128 || i % 7 == 0 || !name.to_string_lossy().ends_with(".log")) {
            let work = tempfile::tempdir().unwrap();
            copy_dir(base.path(), work.path());
            let target = work.path().join(&name);
            let mut bytes = fs::read(&target).unwrap();
            bytes[at] ^= 1 << (at % 8);
            fs::write(&target, bytes).unwrap();
            let log = match Log::open(work.path(), small_segments()) {
                Err(StorageError::Corrupt { .. }) => {
                    outcomes[0] += 1;
                    continue;
                }
                Err(e) => panic!("flip at {name:?}:{at}: unexpected error {e}"),
                Ok(log) => log,
            };
            let mut clean = true;
            let mut index = 1;
            while index <= 24 {
                match log.read(index..index + 1, u64::MAX) {
                    Ok(got) if got.is_empty() => break,
                    Ok(got) => {
                        assert_eq!(got[0], entries[(index - 1) as usize], "flip at {name:?}:{at} returned a wrong entry");
                    }
                    Err(StorageError::Corrupt { .. }) => clean = false,
                    Err(e) => panic!("flip at {name:?}:{at}: unexpected read error {e}"),
                }
                index += 1;
            }
            outcomes[if clean { 2 } else { 1 }] += 1;
        }
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "both refusal and read-time detection were exercised: {outcomes:?}");
}

#[test]
fn damage_to_an_entry_that_later_entries_prove_durable_is_cut_set_aside_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let entries = write_log(dir.path(), 6, 100, LogConfig::default());
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let third = SEGMENT_HEADER_LEN as usize + 2 * entry(1, 100).stored_len() as usize;
    bytes[third + 70] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let found = log.damage_found_at_open();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].position, third as u64);
    assert!(found[0].reason.contains("durable"), "{}", found[0].reason);
    assert_eq!(log.read(0..100, u64::MAX).unwrap(), entries[..2].to_vec(), "the log is cut at the damage");
    let aside = PathBuf::from(format!("{}.damaged-{third}", seg.display()));
    assert_eq!(fs::read(&aside).unwrap(), bytes[third..].to_vec(), "the cut bytes are kept aside, as they were");
    drop(log);
    let reopened = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(reopened.damage_found_at_open().is_empty(), "the cut is durable: a second open finds nothing");
}

#[test]
fn a_missing_or_stale_index_is_rebuilt_and_lookups_agree() {
    let dir = tempfile::tempdir().unwrap();
    let entries = write_log(dir.path(), 40, 200, small_segments());
    let probe = |log: &Log| {
        let by_offset: Vec<Option<u64>> = (0..130).step_by(7).map(|o| log.index_for_offset(o).unwrap()).collect();
        let by_time: Vec<Option<u64>> = (9_990..10_050).step_by(3).map(|t| log.index_for_timestamp(t).unwrap()).collect();
        (by_offset, by_time, log.read(0..100, u64::MAX).unwrap())
    };
    let before = probe(&Log::open(dir.path(), small_segments()).unwrap());
    assert_eq!(before.2, entries);
    assert_eq!(before.0[0], Some(1));
    assert_eq!(before.1[0], Some(1));
    // Missing: delete one index file. Stale: rewrite another's covered length.
    let idx: Vec<PathBuf> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "index")).collect();
    assert!(idx.len() >= 2);
    fs::remove_file(&idx[0]).unwrap();
    let mut stale = fs::read(&idx[1]).unwrap();
    stale[16] ^= 1;
    fs::write(&idx[1], stale).unwrap();
    let log = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(probe(&log), before);
    assert!(idx[0].exists(), "the missing index was written back");
}

#[test]
fn concurrent_flushes_share_one_write_and_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(Log::open(dir.path(), LogConfig::default()).unwrap());
    log.append([entry(1, 10)]).unwrap();
    log.flush().unwrap();
    let before = log.io_stats();
    // Eight writers append, then all flush at once: the first flush covers everyone.
    let appended = std::sync::Barrier::new(8);
    let next = std::sync::Mutex::new(2u64);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                {
                    let mut n = next.lock().unwrap();
                    log.append([entry(*n, 64)]).unwrap();
                    *n += 1;
                }
                appended.wait();
                assert!(log.flush().unwrap() >= 10);
            });
        }
    });
    let after = log.io_stats();
    assert_eq!(after.fsyncs - before.fsyncs, 1, "eight flushes, one fsync");
    assert_eq!(after.writes - before.writes, 1, "eight flushes, one write");
    assert_eq!(log.durable().get(), 10);
}

#[test]
fn truncating_into_a_sealed_segment_reopens_it_for_appends() {
    let dir = tempfile::tempdir().unwrap();
    let entries = write_log(dir.path(), 30, 300, small_segments());
    let log = Log::open(dir.path(), small_segments()).unwrap();
    log.truncate_after(Some(5)).unwrap();
    assert_eq!(log.state().last, Some(entries[4].meta.id));
    let mut replacement = entry(6, 10);
    replacement.meta.id.term = 3;
    log.append([replacement.clone()]).unwrap();
    log.flush().unwrap();
    drop(log);
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let mut want = entries[..5].to_vec();
    want.push(replacement);
    assert_eq!(log.read(0..100, u64::MAX).unwrap(), want);
}

#[test]
fn retention_by_bytes_purges_whole_sealed_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_segments();
    config.retention.max_bytes = Some(8 * 1024);
    let entries = write_log(dir.path(), 60, 300, config.clone());
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let cut = log.apply_retention(i64::MAX).unwrap().expect("the log is over its byte limit");
    let st = log.state();
    assert_eq!(st.purged, Some(cut));
    assert_eq!(st.first_index, cut.index + 1);
    assert_eq!(st.start_offset, entries[cut.index as usize].meta.base_offset);
    let kept = log.read(0..100, u64::MAX).unwrap();
    assert_eq!(kept, entries[cut.index as usize..].to_vec());
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.read(0..100, u64::MAX).unwrap(), kept);
    assert_eq!(log.state().purged, Some(cut));
}

#[test]
fn retention_by_age_purges_segments_whose_newest_entry_is_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_segments();
    config.retention.max_age = Some(std::time::Duration::from_millis(20));
    write_log(dir.path(), 30, 300, config.clone());
    let log = Log::open(dir.path(), config).unwrap();
    // Entries carry timestamps 10_001..=10_030; "now" 10_035 expires those before 10_015.
    let cut = log.apply_retention(10_035).unwrap().expect("old segments expire");
    assert!(cut.index < 15);
    let first = log.read(0..100, 1).unwrap()[0].meta;
    assert!(first.max_timestamp_ms > 10_015 - 20 - 1);
}
