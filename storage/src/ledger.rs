//! The ack ledger: per log, the highest log id this node has reported durable, kept in
//! a file of its own so damage to a log's segments cannot take the record with it.
//!
//! A node reports an entry durable (to Raft: "I have it") only after its segment is
//! synced *and* the ledger records it (the flusher: sync segments, record, one ledger
//! sync, then callbacks). At start, a log whose recovered last id is below its record
//! has lost entries it acknowledged — a truncated or bit-flipped tail, not a crash: a
//! crash only loses what was never reported. The caller (the broker) then keeps that
//! replica out of elections until its peers have refilled it (storage/DESIGN.md,
//! "Ack ledger").
//!
//! # File (`ack.ledger`, fixed-size 4 KiB pages)
//! ```text
//! page 0:            magic "KEELACK1" | version:u32 | capacity:u32 (slots) | crc32c(0..16):u32
//! pages 1 + 2b, 2 + 2b (b = 0, 1, ...): copy A and copy B of slots 64b .. 64b+63,
//!                    64 bytes per slot at (slot % 64) * 64
//! slot copy:         crc32c(8..64):u32 | magic "KAL1":u32 | key:u64 | seq:u64 |
//!                    term:u64 | index:u64 | live:u8 | zeros
//! ```
//! A slot's two copies sit in different pages. A write goes to the copy with the lower
//! sequence number, so a torn write leaves the other copy — the previous value, which
//! covers everything acknowledged, since the torn write's sync never returned. An
//! all-zero copy is unused. A copy that is neither valid nor zero is damage: if both
//! copies of a slot are, the ledger cannot say what that slot held, and every log
//! without a valid record is [`Acked::Unknown`] (fail closed). A file whose size or
//! header does not match its capacity is damage of the same kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::{Disk, DiskFile, OpenMode};
use crate::entry::LogId;
use crate::error::StorageError;

/// Name of the ledger file in a node's data directory.
pub const LEDGER_FILE: &str = "ack.ledger";

const PAGE: u64 = 4096;
const SLOT_LEN: u64 = 64;
const SLOTS_PER_PAGE: u64 = PAGE / SLOT_LEN;
const FILE_MAGIC: &[u8; 8] = b"KEELACK1";
const FILE_VERSION: u32 = 1;
const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"KAL1");
/// Slots the ledger is created with; it grows by `SLOTS_PER_PAGE` at a time.
const INITIAL_CAPACITY: u32 = SLOTS_PER_PAGE as u32;
/// Most logs one ledger records (one per Raft group a node hosts): 2 MiB of pages per
/// 16,384 logs. Registering one more fails with `InvalidAppend`.
pub const LEDGER_SLOTS_MAX: u32 = 1 << 20;

/// What the ledger knows of one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Nothing recorded: this node never reported an entry of this log durable.
    Never,
    /// Entries up to and including this id were reported durable.
    Upto(LogId),
    /// The ledger is damaged and may have held a record for this log.
    Unknown,
}

/// Why the ledger, or part of it, could not be read (what [`Acked::Unknown`] stems from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerDamage {
    pub reason: String,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    slot: u32,
    /// Which copy (0 = A, 1 = B) holds the newest record.
    copy: u8,
    value: Option<LogId>,
}

#[derive(Debug)]
struct State {
    capacity: u32,
    by_key: BTreeMap<u64, SlotState>,
    /// Slots holding no live record, lowest first, with the copy to write next (the one
    /// not holding the slot's newest sequence number).
    free: Vec<(u32, u8)>,
    /// Sequence number of the next copy written: above every one in the file, so the
    /// copy written last is always the one a reader picks.
    next_seq: u64,
    /// Every copy written with a sequence number below this is synced (group commit:
    /// a lane whose records an fdatasync that began after them covered skips its own).
    synced_seq: u64,
    damage: Option<LedgerDamage>,
    /// Set by a failed write or sync: the ledger can no longer vouch for anything.
    poisoned: Option<String>,
}

/// A node's ack ledger (see the module docs). Shared by the flusher's lanes.
#[derive(Debug)]
pub struct AckLedger {
    disk: Arc<dyn Disk>,
    path: PathBuf,
    file: Arc<dyn DiskFile>,
    state: Mutex<State>,
    /// Held while an fdatasync runs, so concurrent `sync` calls share one.
    syncing: Mutex<()>,
}

fn crc_of(copy: &[u8]) -> u32 {
    crc32c::crc32c(&copy[8..SLOT_LEN as usize])
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn slot_position(slot: u32, copy: u8) -> u64 {
    let block = u64::from(slot) / SLOTS_PER_PAGE;
    PAGE * (1 + 2 * block + u64::from(copy)) + (u64::from(slot) % SLOTS_PER_PAGE) * SLOT_LEN
}

fn file_len(capacity: u32) -> u64 {
    PAGE * (1 + 2 * u64::from(capacity).div_ceil(SLOTS_PER_PAGE))
}

fn header(capacity: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&FILE_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&capacity.to_le_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One decoded slot copy: `Ok(None)` unused, `Err` damaged.
type Copy = Result<Option<(u64, u64, bool, LogId)>, ()>;

fn decode_copy(b: &[u8]) -> Copy {
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let stored = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let magic = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if magic != SLOT_MAGIC || stored != crc_of(b) {
        return Err(());
    }
    let (key, seq) = (word(b, 8), word(b, 16));
    let id = LogId { term: word(b, 24), index: word(b, 32) };
    Ok(Some((key, seq, b[40] == 1, id)))
}

fn encode_copy(key: u64, seq: u64, value: Option<LogId>) -> [u8; SLOT_LEN as usize] {
    let mut b = [0u8; SLOT_LEN as usize];
    b[4..8].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&key.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let id = value.unwrap_or_default();
    b[24..32].copy_from_slice(&id.term.to_le_bytes());
    b[32..40].copy_from_slice(&id.index.to_le_bytes());
    b[40] = u8::from(value.is_some());
    let crc = crc_of(&b);
    b[0..4].copy_from_slice(&crc.to_le_bytes());
    b
}

impl AckLedger {
    /// Opens the ledger in `dir`, creating an empty one if there is none (a node's
    /// first start, or its first start on a version that keeps a ledger).
    pub fn open(disk: Arc<dyn Disk>, dir: &Path) -> Result<AckLedger, StorageError> {
        let path = dir.join(LEDGER_FILE);
        if !disk.exists(&path) {
            let tmp = dir.join(format!("{LEDGER_FILE}.tmp"));
            let file = disk.open(&tmp, OpenMode::CreateTruncate).map_err(|e| StorageError::io("create ack ledger", &tmp, e))?;
            file.set_len(file_len(INITIAL_CAPACITY)).map_err(|e| StorageError::io("size ack ledger", &tmp, e))?;
            file.write_all_at(0, &[&header(INITIAL_CAPACITY)]).map_err(|e| StorageError::io("write ack ledger", &tmp, e))?;
            file.sync_data().map_err(|e| StorageError::io("fsync ack ledger", &tmp, e))?;
            disk.rename(&tmp, &path).map_err(|e| StorageError::io("rename ack ledger", &path, e))?;
            disk.sync_dir(dir).map_err(|e| StorageError::io("fsync directory", dir, e))?;
        }
        let file = disk.open(&path, OpenMode::ReadWrite).map_err(|e| StorageError::io("open ack ledger", &path, e))?;
        let bytes = disk.read(&path).map_err(|e| StorageError::io("read ack ledger", &path, e))?;
        let state = Self::load(&bytes);
        if let Some(d) = &state.damage {
            tracing::error!(path = %path.display(), reason = %d.reason, "the ack ledger is damaged; logs without a valid record will not vote until refilled");
        }
        Ok(AckLedger { disk, path, file, state: Mutex::new(state), syncing: Mutex::new(()) })
    }

    fn load(bytes: &[u8]) -> State {
        let mut st = State { capacity: 0, by_key: BTreeMap::new(), free: Vec::new(), next_seq: 1, synced_seq: 0, damage: None, poisoned: None };
        let damaged = |st: &mut State, reason: String| {
            st.damage.get_or_insert(LedgerDamage { reason });
        };
        if bytes.len() < 20 || &bytes[..8] != FILE_MAGIC || u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) != crc32c::crc32c(&bytes[..16]) {
            damaged(&mut st, "the ledger header is damaged".into());
            return st;
        }
        let capacity = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        // A larger file is a growth cut short (pages added, header not yet rewritten).
        if capacity > LEDGER_SLOTS_MAX || (bytes.len() as u64) < file_len(capacity) {
            damaged(&mut st, format!("the ledger is {} bytes, shorter than its {capacity} slots need", bytes.len()));
            return st;
        }
        st.capacity = capacity;
        for slot in 0..capacity {
            let read = |copy: u8| {
                let at = slot_position(slot, copy) as usize;
                decode_copy(&bytes[at..at + SLOT_LEN as usize])
            };
            let (a, b) = (read(0), read(1));
            for seq in [&a, &b].into_iter().filter_map(|c| c.as_ref().ok().copied().flatten()).map(|c| c.1) {
                st.next_seq = st.next_seq.max(seq + 1);
            }
            let newest = match (a, b) {
                (Err(()), Err(())) => {
                    damaged(&mut st, format!("both copies of slot {slot} are damaged"));
                    continue;
                }
                (Ok(x), Ok(y)) => match (x, y) {
                    (Some(x), Some(y)) if y.1 > x.1 => Some((y, 1)),
                    (Some(x), _) => Some((x, 0)),
                    (None, Some(y)) => Some((y, 1)),
                    (None, None) => None,
                },
                (Ok(x), Err(())) => x.map(|x| (x, 0)),
                (Err(()), Ok(y)) => y.map(|y| (y, 1)),
            };
            match newest {
                Some(((key, _, true, id), copy)) if !st.by_key.contains_key(&key) => {
                    st.by_key.insert(key, SlotState { slot, copy, value: Some(id) });
                }
                Some(((key, _, true, _), _)) => damaged(&mut st, format!("log {key} has two slots")),
                Some((_, newest)) => st.free.push((slot, 1 - newest)),
                None => st.free.push((slot, 0)),
            }
        }
        st
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the ledger holds for log `key`.
    pub fn acked(&self, key: u64) -> Acked {
        let st = self.lock();
        match st.by_key.get(&key).and_then(|s| s.value) {
            Some(id) => Acked::Upto(id),
            None if st.damage.is_some() => Acked::Unknown,
            None => Acked::Never,
        }
    }

    /// Why the ledger could not be fully read, if it could not.
    pub fn damage(&self) -> Option<LedgerDamage> {
        self.lock().damage.clone()
    }

    /// Raises log `key`'s record to `id` (never lowers it): written, not yet synced.
    /// Returns whether anything was written.
    pub fn record(&self, key: u64, id: LogId) -> Result<bool, StorageError> {
        let mut st = self.lock();
        if let Some(cause) = &st.poisoned {
            return Err(StorageError::Poisoned { path: self.path.clone(), cause: cause.clone() });
        }
        let current = st.by_key.get(&key).copied();
        if current.and_then(|s| s.value).is_some_and(|v| v >= id) {
            return Ok(false);
        }
        let (slot, copy) = match current {
            Some(s) => (s.slot, 1 - s.copy),
            None => self.allocate(&mut st)?,
        };
        let seq = st.next_seq;
        st.next_seq += 1;
        self.write_copy(&mut st, key, slot, seq, copy, Some(id))?;
        st.by_key.insert(key, SlotState { slot, copy, value: Some(id) });
        Ok(true)
    }

    /// Makes every record written before this call durable. Concurrent callers (the
    /// flusher's lanes) share syncs: one that finds its records covered by an
    /// fdatasync that began after they were written returns without another.
    pub fn sync(&self) -> Result<(), StorageError> {
        let poisoned = |cause: &String| StorageError::Poisoned { path: self.path.clone(), cause: cause.clone() };
        let target = {
            let st = self.lock();
            if let Some(cause) = &st.poisoned {
                return Err(poisoned(cause));
            }
            st.next_seq
        };
        let _syncing = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let covers = {
            let st = self.lock();
            if let Some(cause) = &st.poisoned {
                return Err(poisoned(cause));
            }
            if st.synced_seq >= target {
                return Ok(());
            }
            // Every copy below this was written (writes hold the state lock).
            st.next_seq
        };
        let started = std::time::Instant::now();
        let result = self.file.sync_data();
        crate::observe::ledger_sync_done(started.elapsed());
        match result {
            Ok(()) => {
                let mut st = self.lock();
                st.synced_seq = st.synced_seq.max(covers);
                Ok(())
            }
            Err(e) => {
                let err = StorageError::io("fdatasync", &self.path, e);
                self.lock().poisoned.get_or_insert_with(|| err.to_string());
                Err(err)
            }
        }
    }

    /// Drops log `key`'s record (the log was deleted), durably.
    pub fn forget(&self, key: u64) -> Result<(), StorageError> {
        let mut st = self.lock();
        let Some(s) = st.by_key.remove(&key) else { return Ok(()) };
        // Both copies, so neither can resurface as the newer one.
        let seq = st.next_seq;
        st.next_seq += 2;
        self.write_copy(&mut st, key, s.slot, seq, 1 - s.copy, None)?;
        self.write_copy(&mut st, key, s.slot, seq + 1, s.copy, None)?;
        st.free.push((s.slot, 1 - s.copy));
        st.free.sort_unstable();
        drop(st);
        self.sync()
    }

    fn write_copy(&self, st: &mut State, key: u64, slot: u32, seq: u64, copy: u8, value: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode_copy(key, seq, value);
        self.file.write_all_at(slot_position(slot, copy), &[&bytes]).map_err(|e| {
            let err = StorageError::io("write ack ledger", &self.path, e);
            st.poisoned.get_or_insert_with(|| err.to_string());
            err
        })
    }

    /// A free slot and the copy to write, growing the file if there is none.
    fn allocate(&self, st: &mut State) -> Result<(u32, u8), StorageError> {
        if st.damage.is_some() && st.capacity == 0 {
            return Err(StorageError::Corrupt {
                path: self.path.clone(),
                position: 0,
                reason: "the ack ledger's header is damaged; restore this node from its peers".into(),
            });
        }
        if !st.free.is_empty() {
            return Ok(st.free.remove(0));
        }
        let old = st.capacity;
        let capacity = old + SLOTS_PER_PAGE as u32;
        if capacity > LEDGER_SLOTS_MAX {
            return Err(StorageError::InvalidAppend { reason: format!("the ack ledger holds at most {LEDGER_SLOTS_MAX} logs") });
        }
        // Zeroed pages first, durable; then the header that counts them.
        let grow = || -> std::io::Result<()> {
            self.file.set_len(file_len(capacity))?;
            self.file.sync_data()?;
            self.file.write_all_at(0, &[&header(capacity)])?;
            self.file.sync_data()
        };
        grow().map_err(|e| {
            let err = StorageError::io("grow ack ledger", &self.path, e);
            st.poisoned.get_or_insert_with(|| err.to_string());
            err
        })?;
        st.capacity = capacity;
        st.free.extend((old + 1..capacity).map(|slot| (slot, 0)));
        Ok((old, 0))
    }

    /// The disk the ledger is on.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemoryDisk;

    fn open(disk: &MemoryDisk) -> AckLedger {
        disk.create_dir_all(Path::new("/n")).unwrap();
        AckLedger::open(Arc::new(disk.clone()), Path::new("/n")).unwrap()
    }

    fn id(term: u64, index: u64) -> LogId {
        LogId { term, index }
    }

    #[test]
    fn records_survive_a_power_loss_once_synced_and_never_go_down() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(7), Acked::Never);
        assert!(ledger.record(7, id(1, 10)).unwrap());
        assert!(!ledger.record(7, id(1, 9)).unwrap(), "a lower id is not written");
        ledger.sync().unwrap();
        ledger.record(7, id(2, 3)).unwrap();
        disk.power_loss();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(7), Acked::Upto(id(1, 10)), "the unsynced record is gone, the synced one stays");
    }

    #[test]
    fn a_sync_that_an_earlier_one_already_covered_does_no_fdatasync_and_a_new_record_does() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        ledger.record(3, id(1, 1)).unwrap();
        ledger.sync().unwrap();
        // Nothing written since: the next sync is covered and must not touch the disk,
        // so the failure armed here is still pending for the sync after a new record.
        disk.fail_next(crate::disk::IoKind::Sync, 1);
        ledger.sync().expect("covered: no fdatasync, so the armed failure does not fire");
        ledger.record(3, id(1, 2)).unwrap();
        assert!(ledger.sync().is_err(), "a new record needs an fdatasync (the armed failure fires)");
        assert!(ledger.sync().is_err(), "a failed sync poisons the ledger");
    }

    #[test]
    fn concurrent_syncs_share_fdatasyncs_and_every_record_survives_a_power_loss() {
        let disk = MemoryDisk::new();
        let ledger = Arc::new(open(&disk));
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    for i in 1..=50 {
                        ledger.record(k, id(1, i)).unwrap();
                        ledger.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        disk.power_loss();
        let ledger = open(&disk);
        for k in 0..4 {
            assert_eq!(ledger.acked(k), Acked::Upto(id(1, 50)), "log {k}: every synced record survives");
        }
    }

    #[test]
    fn a_damaged_copy_falls_back_to_the_other_and_both_damaged_means_unknown() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        ledger.record(1, id(1, 5)).unwrap();
        ledger.record(1, id(1, 6)).unwrap();
        ledger.record(2, id(3, 1)).unwrap();
        ledger.sync().unwrap();
        // Slot 0 (log 1): copy B holds index 6; flip a bit in it.
        let b = slot_position(0, 1) as usize;
        disk.damage(Path::new("/n/ack.ledger"), |bytes| bytes[b + 30] ^= 4).unwrap();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(1), Acked::Upto(id(1, 5)), "the older copy survives");
        assert_eq!(ledger.acked(3), Acked::Never);
        let a = slot_position(0, 0) as usize;
        disk.damage(Path::new("/n/ack.ledger"), |bytes| bytes[a + 30] ^= 4).unwrap();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(2), Acked::Upto(id(3, 1)), "other slots still read");
        assert_eq!(ledger.acked(1), Acked::Unknown);
        assert_eq!(ledger.acked(3), Acked::Unknown, "any log without a record might have been the lost one");
    }

    #[test]
    fn a_truncated_ledger_is_unknown_for_every_log() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        ledger.record(1, id(1, 5)).unwrap();
        ledger.sync().unwrap();
        disk.damage(Path::new("/n/ack.ledger"), |bytes| bytes.truncate(5000)).unwrap();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(1), Acked::Unknown);
        assert!(ledger.damage().is_some());
    }

    #[test]
    fn it_grows_past_its_first_page_and_forgotten_slots_are_reused() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        for key in 0..200 {
            ledger.record(key, id(1, key)).unwrap();
        }
        ledger.sync().unwrap();
        ledger.forget(5).unwrap();
        ledger.record(1000, id(9, 9)).unwrap();
        ledger.sync().unwrap();
        disk.power_loss();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(5), Acked::Never);
        assert_eq!(ledger.acked(199), Acked::Upto(id(1, 199)));
        assert_eq!(ledger.acked(1000), Acked::Upto(id(9, 9)));
        assert_eq!(ledger.lock().capacity, 256);
    }

    #[test]
    fn a_torn_record_write_leaves_the_previous_value() {
        let disk = MemoryDisk::new();
        let ledger = open(&disk);
        ledger.record(4, id(1, 1)).unwrap();
        ledger.sync().unwrap();
        ledger.record(4, id(1, 2)).unwrap();
        ledger.sync().unwrap();
        // The next write goes to copy A; tear it (half the record lands).
        ledger.record(4, id(1, 3)).unwrap();
        let a = slot_position(0, 0) as usize;
        disk.damage(Path::new("/n/ack.ledger"), |bytes| bytes[a + 20..a + 64].fill(0)).unwrap();
        let ledger = open(&disk);
        assert_eq!(ledger.acked(4), Acked::Upto(id(1, 2)));
    }
}
