//! The flusher thread and the fsync policies.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel_storage::{Entry, EntryMeta, Flusher, FsyncPolicy, Log, LogConfig, LogId};

fn entry(index: u64) -> Entry {
    Entry {
        meta: EntryMeta { id: LogId { term: 1, index }, kind: 0, base_offset: index - 1, record_count: 1, max_timestamp_ms: 0 },
        payload: Bytes::from_static(b"payload"),
    }
}

#[test]
fn flusher_completes_each_logs_callbacks_in_submit_order_and_only_after_durability() {
    for lanes in [1, 2, 3] {
        callbacks_in_order_after_durability(lanes);
    }
}

fn callbacks_in_order_after_durability(lanes: usize) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let logs: Vec<Arc<Log>> = dirs.iter().map(|d| Arc::new(Log::open(d.path(), LogConfig::default()).unwrap())).collect();
    let flusher = Flusher::spawn_lanes("test-flusher", 8, lanes).unwrap();
    // (log, submit position, index that must be durable, durable index at the callback)
    type Completion = (usize, usize, u64, u64);
    let completed: Arc<Mutex<Vec<Completion>>> = Arc::default();
    let mut next = [1u64, 1u64];
    for i in 0..200usize {
        let which = (i * 7 + i / 3) % 2;
        let log = logs[which].clone();
        log.append([entry(next[which])]).unwrap();
        let target = next[which] + 1;
        next[which] += 1;
        let done = completed.clone();
        let durable_log = log.clone();
        flusher
            .submit(
                log,
                Box::new(move |result| {
                    result.unwrap();
                    done.lock().unwrap().push((which, i, target, durable_log.durable().get()));
                }),
            )
            .unwrap();
    }
    drop(flusher); // joins after completing everything queued
    let completed = completed.lock().unwrap();
    assert_eq!(completed.len(), 200);
    for which in 0..2 {
        let mine: Vec<_> = completed.iter().filter(|c| c.0 == which).collect();
        assert!(mine.windows(2).all(|w| w[0].1 < w[1].1), "{lanes} lanes: log {which}'s callbacks run in submit order");
    }
    for (_, i, target, durable) in completed.iter() {
        assert!(durable >= target, "callback {i} ran before its entry was durable ({durable} < {target})");
    }
    let total_fsyncs: u64 = logs.iter().map(|l| l.io_stats().fsyncs).sum();
    assert!(total_fsyncs <= 200, "never more than one fsync per request: {total_fsyncs}");
}

#[test]
fn interval_policy_reports_durable_after_the_write_and_never_syncs_before_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig { fsync: FsyncPolicy::Interval(Duration::from_secs(3600)), ..LogConfig::default() }).unwrap();
    for i in 1..=20 {
        log.append([entry(i)]).unwrap();
        assert_eq!(log.flush().unwrap(), i + 1, "durable is reported after the write");
    }
    log.sync_if_due().unwrap();
    assert_eq!(log.io_stats().fsyncs, 0, "no fsync inside the interval");
    assert_eq!(log.io_stats().writes, 20, "but every flush wrote");
}

#[test]
fn interval_policy_syncs_written_data_once_the_interval_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_millis(50);
    let log = Log::open(dir.path(), LogConfig { fsync: FsyncPolicy::Interval(interval), ..LogConfig::default() }).unwrap();
    log.append([entry(1), entry(2)]).unwrap();
    log.flush().unwrap();
    std::thread::sleep(interval + Duration::from_millis(10));
    log.sync_if_due().unwrap();
    // Either the flush itself was already due or the interval sync ran: exactly one fsync.
    assert_eq!(log.io_stats().fsyncs, 1, "the interval's writes are synced once");
    std::thread::sleep(interval + Duration::from_millis(10));
    log.sync_if_due().unwrap();
    assert_eq!(log.io_stats().fsyncs, 1, "nothing written since, nothing to sync");
}

#[test]
fn a_manual_flusher_completes_only_in_its_rounds_after_durability_in_submit_order() {
    let disk = Arc::new(keel_storage::disk::MemoryDisk::new());
    let log = Arc::new(Log::open_on(disk.clone(), "/manual", LogConfig::default()).unwrap());
    let flusher = Flusher::manual(4, None);
    let completed: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let submit = |index: u64| {
        log.append([entry(index)]).unwrap();
        let (done, durable_log) = (completed.clone(), log.clone());
        flusher
            .submit(
                log.clone(),
                Box::new(move |result| {
                    result.unwrap();
                    done.lock().unwrap().push((index, durable_log.durable().get()));
                }),
            )
            .unwrap();
    };
    for index in 1..=3 {
        submit(index);
    }
    assert!(completed.lock().unwrap().is_empty(), "nothing completes before a round");
    assert_eq!(log.state().durable_end, 1, "nothing is synced before a round");
    // A power cut now loses all three: they were never reported durable.
    assert_eq!(flusher.run_queued(), 3);
    assert_eq!(*completed.lock().unwrap(), vec![(1, 4), (2, 4), (3, 4)], "one round: every callback, in submit order, after the sync");
    for index in 4..=7 {
        submit(index);
    }
    assert_eq!(completed.lock().unwrap().len(), 7, "a submit to a full queue (4) runs a round first");
    submit(8);
    drop(log);
    disk.power_loss();
    let reopened = Log::open_on(disk, "/manual", LogConfig::default()).unwrap();
    assert_eq!(reopened.state().durable_end, 8, "what the rounds reported durable survives a power loss; the unflushed 8th does not");
}
