//! Loom model checks (run with
//! `RUSTFLAGS="--cfg loom" cargo test -p keel-storage --test loom_flusher --release`)
//! of the hand-written concurrency around durability, on the in-memory disk (whose
//! lock, like the log's and the manual flusher's, is loom's under `--cfg loom`):
//! - the flusher completes a log's callbacks in submit order, each only once its entry
//!   is durable, and what it reported durable survives a power cut;
//! - on the in-memory disk, a reader racing a writer sees only a prefix of what was
//!   written, and a power cut racing both keeps at least what a successful sync covered.
#![cfg(loom)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_storage::disk::{Disk, MemoryDisk, OpenMode};
use keel_storage::{Entry, EntryMeta, Flusher, Log, LogConfig, LogId};
use loom::sync::Mutex;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

fn entry(index: u64) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 0, base_offset: index - 1, record_count: 1, max_timestamp_ms: 0 },
        payload: Bytes::from_static(b"p"),
    }
}

#[test]
fn flusher_callbacks_run_in_submit_order_after_durability_and_what_they_report_survives_a_power_cut() {
    model(|| {
        let disk = Arc::new(MemoryDisk::new());
        let log = Arc::new(Log::open_on(disk.clone(), "/log", LogConfig::default()).unwrap());
        let flusher = Arc::new(Flusher::manual(8, None));
        let completed: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
        let submitter = {
            let (log, flusher, completed) = (log.clone(), flusher.clone(), completed.clone());
            thread::spawn(move || {
                for index in 1..=2 {
                    log.append([entry(index)]).unwrap();
                    let (completed, seen) = (completed.clone(), log.clone());
                    flusher
                        .submit(
                            log.clone(),
                            Box::new(move |result| {
                                result.unwrap();
                                completed.lock().unwrap().push((index, seen.durable().get()));
                            }),
                        )
                        .unwrap();
                }
            })
        };
        let rounds = {
            let flusher = flusher.clone();
            thread::spawn(move || {
                flusher.run_queued();
            })
        };
        submitter.join().unwrap();
        rounds.join().unwrap();
        flusher.run_queued();
        let completed = completed.lock().unwrap().clone();
        assert_eq!(completed.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2], "every callback ran, in submit order");
        for (index, durable) in &completed {
            assert!(*durable > *index, "the callback of entry {index} ran before it was durable (durable end {durable})");
        }
        drop(log);
        disk.power_loss();
        let reopened = Log::open_on(disk, "/log", LogConfig::default()).unwrap();
        assert_eq!(reopened.state().durable_end, 3, "both entries reported durable survive the power cut");
    });
}

#[test]
fn memory_disk_readers_see_prefixes_and_a_power_cut_keeps_what_a_sync_covered() {
    const ALL: &[u8] = b"abcdefgh";
    model(|| {
        let disk = Arc::new(MemoryDisk::new());
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("f");
        let file = disk.open(&path, OpenMode::CreateNew).unwrap();
        disk.sync_dir(dir).unwrap();
        let writer = {
            let file = file.clone();
            thread::spawn(move || {
                if file.write_all_at(0, &[&ALL[..4]]).is_err() {
                    return false;
                }
                let synced = file.sync_data().is_ok();
                let _ = file.write_all_at(4, &[&ALL[4..]]);
                synced
            })
        };
        let reader = {
            let file = file.clone();
            thread::spawn(move || {
                let Ok(size) = file.size() else { return };
                let mut buf = vec![0u8; size as usize];
                if file.read_exact_at(&mut buf, 0).is_ok() {
                    assert!(size == 0 || size == 4 || size == 8, "a write is seen whole or not at all (size {size})");
                    assert_eq!(&buf[..], &ALL[..size as usize], "a reader sees a prefix of what was written");
                }
            })
        };
        let cut = {
            let disk = disk.clone();
            thread::spawn(move || disk.power_loss_keeping(|_, appended| appended / 2))
        };
        let synced = writer.join().unwrap();
        reader.join().unwrap();
        cut.join().unwrap();
        let after = disk.read(&path).unwrap();
        assert_eq!(&after[..], &ALL[..after.len()], "after the cut the file is a prefix of what was written");
        if synced {
            assert!(after.len() >= 4, "a sync that returned Ok before the cut covers the first write ({} bytes left)", after.len());
        }
    });
}
