//! The ack ledger against damage: a log flushed through a flusher with a ledger, then
//! its tail cut or bit-flipped at every position. Reopening must yield a prefix of what
//! was written, and the ledger must say the log lost acknowledged entries exactly when
//! it did. A power cut that only loses unsynced appends must never look like damage.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use keel_storage::disk::MemoryDisk;
use keel_storage::{AckLedger, Acked, Disk, Entry, EntryMeta, Flusher, Log, LogConfig, LogId};

const KEY: u64 = 42;

fn entry(index: u64) -> Entry {
    let payload = Bytes::from(vec![index as u8; 40 + (index as usize * 13) % 90]);
    Entry { meta: EntryMeta { id: LogId { term: 1 + index / 5, index }, kind: 1, base_offset: index - 1, record_count: 1, max_timestamp_ms: 0 }, payload }
}

fn config() -> LogConfig {
    LogConfig { segment_bytes: 4096, index_interval_bytes: 512, ..LogConfig::default() }
}

fn open(disk: &MemoryDisk) -> (Log, AckLedger) {
    let d: Arc<dyn Disk> = Arc::new(disk.clone());
    let log = Log::open_on(d.clone(), "/node/log", config()).unwrap();
    let ledger = AckLedger::open(d, Path::new("/node")).unwrap();
    (log, ledger)
}

/// Writes entries 1..=n, each flush acknowledged through the ledger; returns them.
fn write_acked(disk: &MemoryDisk, n: u64) -> Vec<Entry> {
    disk.create_dir_all(Path::new("/node")).unwrap();
    let (log, ledger) = open(disk);
    let flusher = Flusher::spawn_with_ledger("ledger-test", 16, 2, Some(Arc::new(ledger))).unwrap();
    let log = Arc::new(log);
    let entries: Vec<Entry> = (1..=n).map(entry).collect();
    for chunk in entries.chunks(3) {
        log.append(chunk.to_vec()).unwrap();
        let (tx, rx) = mpsc::channel();
        flusher.submit_acked(log.clone(), KEY, Box::new(move |r| tx.send(r.is_ok()).unwrap())).unwrap();
        assert!(rx.recv().unwrap(), "flush acknowledged");
    }
    entries
}

fn last_segment(disk: &MemoryDisk) -> (PathBuf, u64) {
    disk.files_under(Path::new("/node/log")).into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "log")).max().unwrap()
}

fn check(disk: &MemoryDisk, written: &[Entry], what: &str) -> bool {
    let (log, ledger) = open(disk);
    let got = log.read(0..u64::MAX, u64::MAX).unwrap();
    assert!(got.len() <= written.len() && got[..] == written[..got.len()], "{what}: not a prefix of what was written");
    let Acked::Upto(w) = ledger.acked(KEY) else { panic!("{what}: the ledger lost its record") };
    assert_eq!(w, written.last().unwrap().meta.id, "{what}: the ledger records the last flushed entry");
    let damaged = log.state().last.is_none_or(|l| l < w);
    assert_eq!(damaged, got.len() < written.len(), "{what}: damaged iff an acknowledged entry is missing");
    damaged
}

#[test]
fn every_cut_of_the_last_segment_that_loses_an_entry_is_seen_as_damage() {
    let base = MemoryDisk::new();
    let written = write_acked(&base, 40);
    let (seg, len) = last_segment(&base);
    let original = base.read(&seg).unwrap();
    let mut damaged = 0;
    for cut in 0..=len {
        let disk = base.deep_copy();
        disk.damage(&seg, |b| *b = original[..cut as usize].to_vec()).unwrap();
        if check(&disk, &written, &format!("cut at {cut}")) {
            damaged += 1;
        }
    }
    assert_eq!(damaged, len, "every cut short of the end loses an entry");
}

#[test]
fn a_bit_flip_in_the_last_segment_is_never_served_and_losing_an_entry_is_seen_as_damage() {
    let base = MemoryDisk::new();
    let written = write_acked(&base, 40);
    let (seg, len) = last_segment(&base);
    let mut damaged = 0;
    for at in (0..len).step_by(3) {
        let disk = base.deep_copy();
        disk.damage(&seg, |b| b[at as usize] ^= 1 << (at % 8)).unwrap();
        if check(&disk, &written, &format!("flip at {at}")) {
            damaged += 1;
        }
    }
    assert!(damaged > len / 3 / 2, "most flips land in an entry and cost it: {damaged}");
}

#[test]
fn a_power_cut_that_loses_only_unsynced_appends_is_not_damage() {
    let disk = MemoryDisk::new();
    let written = write_acked(&disk, 20);
    // Bytes written after the last flush and never synced (as a write of the next
    // flush round would be when the power goes): a prefix of them may land.
    let (seg, len) = last_segment(&disk);
    let file = disk.open(&seg, keel_storage::disk::OpenMode::ReadWrite).unwrap();
    file.write_all_at(len, &[&[0x5a; 300][..]]).unwrap();
    for keep in [0u64, 17, 1_000_000] {
        let d = disk.deep_copy();
        d.power_loss_keeping(|_, appended| keep.min(appended));
        let (log, ledger) = open(&d);
        let Acked::Upto(w) = ledger.acked(KEY) else { panic!("record lost") };
        assert_eq!(w, written.last().unwrap().meta.id);
        assert!(log.state().last.is_some_and(|l| l >= w), "torn unsynced bytes ({keep}) never look like damage");
    }
}
