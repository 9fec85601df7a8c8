//! `RaftLogStorage` over `keel_storage::Log`: the partition log is the Raft log.
//!
//! Entry mapping (storage `kind` byte → openraft payload):
//! - `KIND_BLANK` (0): `Blank`, empty payload, 0 records;
//! - `KIND_BATCH` (1): `Normal(EntryData::Batch)`, the batch bytes, the batch's record count;
//! - `KIND_MEMBERSHIP` (2): `Membership`, postcard-encoded, 0 records;
//! - `KIND_CONTROL` (3): `Normal(EntryData::Control)`, a postcard `ControlEntry`, 0
//!   records, the leader's time as the entry's timestamp. Never served to consumers.
//!
//! A batch's base offset is the log's `next_offset()` when it is appended; it is
//! stamped into the batch header in place (the batch CRC does not cover it). Log
//! matching gives every replica the same offsets.
//!
//! Blocking file work (flush, truncate, purge, vote) runs on tokio's blocking pool;
//! `append` only touches memory (and, at a segment roll, creates a file) and hands
//! durability to the `Flusher`, which calls openraft back in submit order (per log).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keel_storage::{atomic_file, slot_file, Disk, Entry as StoredEntry, EntryMeta, Flusher, Log, LogId as StoredLogId};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, RaftLogReader};

use super::storage_io;
use super::types::{EntryData, RaftEntry, RaftLogId, RecordBatch, TypeConfig};
use crate::partition::ControlEntry;

pub const KIND_BLANK: u8 = 0;
pub const KIND_BATCH: u8 = 1;
pub const KIND_MEMBERSHIP: u8 = 2;
pub const KIND_CONTROL: u8 = 3;

/// Largest payload total `limited_get_log_entries` returns (at least one entry):
/// openraft's `max_payload_entries` counts entries, and ours are whole batches.
pub const REPLICATION_READ_BYTES_MAX: u64 = 1024 * 1024;

/// How often, at most, the committed index is written to disk. Losing the last
/// interval only means re-applying a few committed entries after a restart.
pub const COMMITTED_WRITE_INTERVAL: Duration = Duration::from_millis(200);

/// The group's small records, each a slot file (`keel_storage::slot_file`: rewritten in
/// place, no new inode per write) that replaced an atomically renamed file of the name
/// in `legacy`, still read until the record is first written again.
struct Record {
    name: &'static str,
    legacy: &'static str,
}

/// The vote: term and candidate, always written durably.
const VOTE: Record = Record { name: "raft.vote.slots", legacy: "raft.vote" };
/// That the vote in `VOTE` was committed (its leader was granted by a quorum), written
/// without fsync: see [`read_saved_vote`].
const VOTE_COMMITTED: Record = Record { name: "raft.vote.committed.slots", legacy: "raft.vote.committed" };
/// The committed-index hint, written without fsync (durably at a clean stop).
const COMMITTED: Record = Record { name: "raft.committed.slots", legacy: "raft.committed" };

impl Record {
    /// The record's bytes: the slot file's, or the legacy file's if there is no slot
    /// file yet. Damage is an error (`StorageError::Corrupt`).
    fn read(&self, disk: &dyn Disk, dir: &std::path::Path) -> Result<Option<Vec<u8>>, keel_storage::StorageError> {
        match slot_file::read(disk, dir, self.name)? {
            Some(bytes) => Ok(Some(bytes)),
            None => atomic_file::read(disk, dir, self.legacy),
        }
    }

    /// A hint's bytes: as `read`, but damage — a hint written without fsync, cut by a
    /// crash — reads as no hint.
    fn read_hint(&self, disk: &dyn Disk, dir: &std::path::Path, what: &str) -> io::Result<Option<Vec<u8>>> {
        match self.read(disk, dir) {
            Ok(bytes) => Ok(bytes),
            Err(keel_storage::StorageError::Corrupt { reason, .. }) => {
                tracing::warn!(dir = %dir.display(), reason, "{what} did not survive a crash; ignoring it");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write(&self, disk: &dyn Disk, dir: &std::path::Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        Ok(slot_file::write(disk, dir, self.name, bytes, durable)?)
    }

    fn exists(&self, disk: &dyn Disk, dir: &std::path::Path) -> bool {
        slot_file::exists(disk, dir, self.name) || disk.exists(&dir.join(self.legacy))
    }
}

type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;

/// The Raft log storage of one partition.
pub struct PartitionLogStore {
    log: Arc<Log>,
    flusher: Arc<Flusher>,
    /// The log's key in the node's ack ledger (its group id), if durability is recorded.
    ack_key: Option<u64>,
    dir: PathBuf,
    committed: Arc<Mutex<CommittedState>>,
    /// The committed-index hint's file, held open once it exists (a write is then one
    /// positioned write); locked for the length of each write, so writes never overlap.
    committed_file: Arc<Mutex<Option<slot_file::SlotWriter>>>,
    /// Entries below this index may be deleted when openraft purges (the partition's
    /// retention cut + 1, `PartitionShared::purge_floor`); `u64::MAX` for a store without
    /// retention, which deletes whatever openraft purges.
    purge_floor: Arc<AtomicU64>,
    /// The vote last written durably to `VOTE` (`None` until first needed).
    durable_vote: Arc<Mutex<Option<Option<Vote>>>>,
}

#[derive(Debug, Default)]
struct CommittedState {
    /// The latest committed id openraft saved since the store opened (`None` if it
    /// saved none: the hint on disk is then still the one to keep).
    value: Option<RaftLogId>,
    written_at: Option<tokio::time::Instant>,
    written_value: Option<RaftLogId>,
    /// A background write is in flight.
    writing: bool,
}

/// A reader sharing the store's log; sees every entry appended, flushed or not.
#[derive(Clone)]
pub struct PartitionLogReader {
    log: Arc<Log>,
    dir: PathBuf,
}

fn to_raft_id(id: StoredLogId) -> RaftLogId {
    RaftLogId::new_term_index(id.term, id.index)
}

fn to_stored_id(id: &RaftLogId) -> StoredLogId {
    StoredLogId { term: id.leader_id.term, index: id.index }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Converts an openraft entry to a storage entry at message offset `base_offset`.
fn to_stored(entry: RaftEntry, base_offset: u64) -> io::Result<StoredEntry> {
    let id = to_stored_id(&entry.log_id);
    let (kind, payload, record_count, max_timestamp_ms) = match entry.payload {
        EntryPayload::Blank => (KIND_BLANK, Bytes::new(), 0, i64::MIN),
        EntryPayload::Normal(EntryData::Batch(batch)) => {
            let header = batch.header().ok_or_else(|| invalid(format!("entry {} holds an unparseable record batch", id.index)))?;
            (KIND_BATCH, stamp(batch.0, header.base_offset, base_offset)?, header.record_count, header.max_timestamp_ms)
        }
        EntryPayload::Normal(EntryData::Control(bytes)) => {
            let entry = ControlEntry::decode(&bytes).map_err(|e| invalid(format!("entry {} holds an undecodable control entry: {e}", id.index)))?;
            (KIND_CONTROL, bytes, 0, entry.leader_time_ms)
        }
        EntryPayload::Membership(m) => {
            let bytes = postcard::to_allocvec(&m).map_err(|e| invalid(format!("encoding membership: {e}")))?;
            (KIND_MEMBERSHIP, Bytes::from(bytes), 0, i64::MIN)
        }
    };
    Ok(StoredEntry { meta: EntryMeta { id, kind, base_offset, record_count, max_timestamp_ms }, payload })
}

/// Writes the base offset into the batch: not at all when it holds that offset already
/// (a follower's entries, stamped by the leader, sliced from the received frame), in
/// place when this is the only reference to the bytes, otherwise on a copy (counted in
/// `keel_offset_stamps_total{how}`).
/// `held` is the base offset the batch holds now (from its parsed header).
fn stamp(batch: Bytes, held: u64, base_offset: u64) -> io::Result<Bytes> {
    if held == base_offset {
        crate::metrics::offset_stamp("already");
        return Ok(batch);
    }
    let (mut bytes, how) = match batch.try_into_mut() {
        Ok(unique) => (unique, "in_place"),
        Err(shared) => (BytesMut::from(&shared[..]), "copied"),
    };
    crate::metrics::offset_stamp(how);
    keel_protocol::batch::stamp_base_offset(&mut bytes, base_offset).map_err(|e| invalid(format!("stamping base offset: {e}")))?;
    Ok(bytes.freeze())
}

fn to_raft(entry: StoredEntry) -> io::Result<RaftEntry> {
    let log_id = to_raft_id(entry.meta.id);
    let payload = match entry.meta.kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_BATCH => EntryPayload::Normal(EntryData::Batch(RecordBatch(entry.payload))),
        KIND_CONTROL => EntryPayload::Normal(EntryData::Control(entry.payload)),
        KIND_MEMBERSHIP => {
            EntryPayload::Membership(postcard::from_bytes(&entry.payload).map_err(|e| invalid(format!("decoding membership at {}: {e}", log_id.index)))?)
        }
        other => return Err(invalid(format!("unknown entry kind {other} at index {}", log_id.index))),
    };
    Ok(RaftEntry { log_id, payload })
}

fn range_to(range: &impl RangeBounds<u64>) -> std::ops::Range<u64> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    start..end
}

/// Writes `vote` durably as the saved vote of the store in `dir`. Only for a store that
/// is not open (before Raft starts on a group that adopts a leader's vote).
pub fn persist_vote(disk: &dyn Disk, dir: &std::path::Path, vote: &Vote) -> io::Result<()> {
    let bytes = postcard::to_allocvec(vote).map_err(|e| invalid(format!("encoding the vote: {e}")))?;
    VOTE.write(disk, dir, &bytes, true)
}

/// The committed log index last saved in `dir` (a hint: it may lag the real commit
/// index by up to `COMMITTED_WRITE_INTERVAL`, and may exceed what the log durably holds).
pub fn saved_committed(disk: &dyn Disk, dir: &std::path::Path) -> io::Result<Option<u64>> {
    Ok(committed_hint(disk, dir)?.map(|l| l.index))
}

/// Reads the committed-index hint. It is written without fsync, so after a power cut
/// the file may be empty or torn: that is the hint being lost (a restart re-applies a
/// few more entries), not damage, and reads as no hint. Only an I/O error fails.
fn committed_hint(disk: &dyn Disk, dir: &std::path::Path) -> io::Result<Option<RaftLogId>> {
    let Some(bytes) = COMMITTED.read_hint(disk, dir, "the committed-index hint")? else { return Ok(None) };
    match postcard::from_bytes(&bytes) {
        Ok(id) => Ok(id),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the committed-index hint does not decode; ignoring it");
            Ok(None)
        }
    }
}

/// The vote in `VOTE`, as written durably.
fn read_durable_vote(disk: &dyn Disk, dir: &std::path::Path) -> io::Result<Option<Vote>> {
    match VOTE.read(disk, dir)? {
        None => Ok(None),
        Some(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(|e| invalid(format!("decoding the saved vote: {e}"))),
    }
}

/// The saved vote. A vote's term and the candidate it names are written durably
/// (`VOTE`, fsynced) whenever they change: a node must never vote twice in a term,
/// nor forget a term it saw. That a vote became *committed* (its leader won a quorum)
/// changes neither, and is written without fsync (`VOTE_COMMITTED`): it counts only
/// if it names the durable vote's leader exactly. Lost or torn by a crash, the vote
/// reads back uncommitted, which openraft treats as a vote granted to a candidate of
/// that term — its leader, if alive, commits it again with its next AppendEntries, and
/// if not, an election follows as it would anyway. (A committed flag read back from an
/// older term cannot apply: it names another leader id.) Halves the fsyncs of every
/// election (candidate and voters each write their vote twice).
fn read_saved_vote(disk: &dyn Disk, dir: &std::path::Path) -> io::Result<Option<Vote>> {
    let Some(vote) = read_durable_vote(disk, dir)? else { return Ok(None) };
    if vote.committed {
        return Ok(Some(vote));
    }
    let hint = VOTE_COMMITTED.read_hint(disk, dir, "the vote's committed flag (the vote reads as uncommitted)")?;
    let committed = hint.and_then(|bytes| postcard::from_bytes::<Vote>(&bytes).ok()).filter(|h| h.committed && h.leader_id == vote.leader_id);
    Ok(Some(committed.unwrap_or(vote)))
}

/// Whether the store in `dir` has ever saved a vote.
pub fn has_vote(disk: &dyn Disk, dir: &std::path::Path) -> bool {
    VOTE.exists(disk, dir)
}

impl PartitionLogStore {
    /// A store over `log`, durable through `flusher`; the vote and committed index live
    /// in the log's directory.
    pub fn new(log: Arc<Log>, flusher: Arc<Flusher>) -> PartitionLogStore {
        let dir = log.dir().to_path_buf();
        PartitionLogStore {
            log,
            flusher,
            ack_key: None,
            dir,
            committed: Arc::new(Mutex::new(CommittedState::default())),
            committed_file: Arc::new(Mutex::new(None)),
            purge_floor: Arc::new(AtomicU64::new(u64::MAX)),
            durable_vote: Arc::new(Mutex::new(None)),
        }
    }

    /// Deletes purged entries only below `floor` (see the field). Openraft purges up to
    /// a snapshot it installed; the entries between the retention cut and the snapshot
    /// are the partition's data and stay.
    pub fn with_purge_floor(mut self, floor: Arc<AtomicU64>) -> PartitionLogStore {
        self.purge_floor = floor;
        self
    }

    /// Reports durability only once the flusher's ack ledger records it under `key`.
    pub fn with_ack_key(mut self, key: u64) -> PartitionLogStore {
        self.ack_key = Some(key);
        self
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    fn reader(&self) -> PartitionLogReader {
        PartitionLogReader { log: self.log.clone(), dir: self.dir.clone() }
    }

    /// The id of the entry at `index`, if present.
    fn id_at(log: &Log, index: u64) -> io::Result<Option<StoredLogId>> {
        Ok(log.read(index..index + 1, 0)?.first().map(|e| e.meta.id))
    }
}

impl Drop for PartitionLogStore {
    fn drop(&mut self) {
        // A clean stop persists the latest committed index durably (one fsync per group,
        // only here): the running writes are unsynced hints a power cut may lose, and
        // `keel dump` of a stopped node reads its committed records up to this index.
        // An error only costs re-applying entries. A group whose commit did not move
        // since it opened (idle, quiesced) has nothing newer to record: writing its
        // empty value would erase the hint on disk (found by `keel-jepsen`: a restarted
        // node's metadata hint erased at the clean stop, so `keel dump` saw no topics).
        let st = self.committed.lock().expect("committed lock poisoned");
        if st.value.is_none() {
            return;
        }
        if let Ok(bytes) = postcard::to_allocvec(&st.value) {
            let mut file = self.committed_file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = write_committed(&mut file, &**self.log.disk(), &self.dir, &bytes, true);
        }
    }
}

/// Writes the committed-index hint through the held file, opening it after the write
/// that creates it; a failed write drops the handle (the next write opens it anew).
fn write_committed(file: &mut Option<slot_file::SlotWriter>, disk: &dyn Disk, dir: &std::path::Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let written = match file.as_mut() {
        Some(f) => f.write(bytes, durable).map_err(io::Error::from),
        None => COMMITTED.write(disk, dir, bytes, durable).and_then(|()| {
            *file = slot_file::SlotWriter::open(disk, dir, COMMITTED.name)?;
            Ok(())
        }),
    };
    if written.is_err() {
        *file = None;
    }
    written
}

impl RaftLogReader<TypeConfig> for PartitionLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> io::Result<Vec<RaftEntry>> {
        let range = range_to(&range);
        let mut out = Vec::new();
        let mut next = range.start;
        while next < range.end {
            let batch = self.log.read(next..range.end, u64::MAX)?;
            let Some(last) = batch.last() else { break };
            next = last.meta.id.index + 1;
            for e in batch {
                out.push(to_raft(e)?);
            }
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        let (disk, dir) = (self.log.disk().clone(), self.dir.clone());
        storage_io(&*self.log.disk().clone(), move || read_saved_vote(&*disk, &dir)).await
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<RaftEntry>> {
        self.log.read(start..end, REPLICATION_READ_BYTES_MAX)?.into_iter().map(to_raft).collect()
    }
}

impl RaftLogReader<TypeConfig> for PartitionLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> io::Result<Vec<RaftEntry>> {
        self.reader().try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.reader().read_vote().await
    }
}

impl RaftLogStorage<TypeConfig> for PartitionLogStore {
    type LogReader = PartitionLogReader;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let st = self.log.state();
        Ok(LogState { last_purged_log_id: st.purged.map(to_raft_id), last_log_id: st.last.map(to_raft_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let bytes = postcard::to_allocvec(vote).map_err(|e| invalid(format!("encoding the vote: {e}")))?;
        let (log, dir, durable, vote) = (self.log.clone(), self.dir.clone(), self.durable_vote.clone(), *vote);
        // Queued appends reach the disk before the vote does (openraft io ordering).
        storage_io(&**self.log.disk(), move || {
            log.flush()?;
            let mut durable = durable.lock().expect("durable vote lock poisoned");
            if durable.is_none() {
                *durable = Some(read_durable_vote(&**log.disk(), &dir)?);
            }
            if vote.committed && durable.as_ref().and_then(|d| d.as_ref()).is_some_and(|d| d.leader_id == vote.leader_id) {
                // Only the committed flag changes: what a vote must keep across a crash —
                // the term and the candidate granted — is durable already (see
                // `read_saved_vote`).
                VOTE_COMMITTED.write(&**log.disk(), &dir, &bytes, false)?;
            } else {
                VOTE.write(&**log.disk(), &dir, &bytes, true)?;
                *durable = Some(Some(vote));
            }
            Ok(())
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<RaftLogId>) -> io::Result<()> {
        // The committed index is a hint (`read_committed` clips it to the durable log),
        // so it is written without fsync, off the Raft core, at most every
        // COMMITTED_WRITE_INTERVAL and never two writes at once.
        let write = {
            let mut st = self.committed.lock().expect("committed lock poisoned");
            st.value = committed;
            let due = !st.writing && st.written_at.is_none_or(|t| t.elapsed() >= COMMITTED_WRITE_INTERVAL);
            if due {
                st.written_at = Some(tokio::time::Instant::now());
                st.written_value = committed;
                st.writing = true;
            }
            due
        };
        if write {
            let bytes = postcard::to_allocvec(&committed).map_err(|e| invalid(format!("encoding committed: {e}")))?;
            let (disk, dir, state, file) = (self.log.disk().clone(), self.dir.clone(), self.committed.clone(), self.committed_file.clone());
            let inline = disk.runs_inline();
            let work = move || {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = write_committed(&mut file, &*disk, &dir, &bytes, false) {
                    tracing::warn!(error = %e, "could not record the committed index; a restart re-applies a few more entries");
                }
                drop(file);
                state.lock().expect("committed lock poisoned").writing = false;
            };
            if inline {
                work();
            } else {
                tokio::task::spawn_blocking(work);
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<RaftLogId>> {
        let (disk, dir) = (self.log.disk().clone(), self.dir.clone());
        let saved = storage_io(&**self.log.disk(), move || committed_hint(&*disk, &dir)).await?;
        let Some(saved) = saved else { return Ok(None) };
        // Never claim more than this node has durably: committed may run ahead of the
        // local flush, and openraft re-applies (applied, committed] from this log.
        let st = self.log.state();
        if saved.index < st.durable_end {
            return Ok(Some(saved));
        }
        let Some(last_durable) = st.durable_end.checked_sub(1) else { return Ok(None) };
        if st.purged.is_some_and(|p| p.index >= last_durable) {
            return Ok(st.purged.map(to_raft_id));
        }
        Ok(Self::id_at(&self.log, last_durable)?.map(to_raft_id))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = RaftEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut next_offset = self.log.next_offset();
        let mut stored = Vec::new();
        for entry in entries {
            let e = to_stored(entry, next_offset)?;
            next_offset = e.meta.end_offset();
            stored.push(e);
        }
        self.log.append(stored)?;
        let done: keel_storage::flusher::FlushCallback = Box::new(move |result| callback.io_completed(result.map_err(io::Error::from)));
        match self.ack_key {
            Some(key) => self.flusher.submit_acked(self.log.clone(), key, done)?,
            None => self.flusher.submit(self.log.clone(), done)?,
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<RaftLogId>) -> io::Result<()> {
        let log = self.log.clone();
        storage_io(&**self.log.disk(), move || Ok(log.truncate_after(last_log_id.map(|l| l.index))?)).await
    }

    async fn purge(&mut self, log_id: RaftLogId) -> io::Result<()> {
        // Entries openraft no longer needs but retention keeps stay on disk: openraft
        // never reads at or below a purge it asked for, and after a restart the log
        // reports its real start (inside the snapshot, which openraft allows).
        let floor = self.purge_floor.load(AtomicOrdering::Acquire);
        if log_id.index >= floor {
            let Some(upto) = floor.checked_sub(1) else { return Ok(()) };
            let st = self.log.state();
            if st.purged.is_some_and(|p| p.index >= upto) || st.first_index > upto {
                return Ok(());
            }
            let log = self.log.clone();
            return storage_io(&**self.log.disk(), move || {
                let Some(id) = PartitionLogStore::id_at(&log, upto)? else { return Ok(()) };
                Ok(log.purge_upto(id)?)
            })
            .await;
        }
        let log = self.log.clone();
        storage_io(&**self.log.disk(), move || Ok(log.purge_upto(to_stored_id(&log_id))?)).await
    }
}

#[cfg(test)]
mod stamp_tests {
    use super::*;
    use keel_protocol::batch::{BatchBuilder, BatchHeader, BatchOptions, NewRecord};

    fn stamp(batch: Bytes, base_offset: u64) -> io::Result<Bytes> {
        let held = BatchHeader::parse(&batch).unwrap().base_offset;
        super::stamp(batch, held, base_offset)
    }

    fn batch() -> Bytes {
        let mut b = BatchBuilder::new(BatchOptions::default()).expect("default batch options are valid");
        b.push(NewRecord { timestamp_ms: 1, key: None, value: Some(b"v"), headers: &[], message_id: None, deliver_at_ms: None }).unwrap();
        b.finish().unwrap()
    }

    #[test]
    fn a_batch_holding_its_offset_already_is_stored_as_it_is_without_a_copy() {
        let stamped = stamp(batch(), 0).unwrap();
        let frame = Bytes::from([b"head".as_slice(), &stamp(stamped, 42).unwrap()[..]].concat());
        let slice = frame.slice(4..);
        let kept = stamp(slice.clone(), 42).unwrap();
        assert_eq!(kept.as_ptr(), slice.as_ptr(), "a follower's batch, sliced from the frame, is not copied");
    }

    #[test]
    fn a_shared_batch_is_stamped_on_a_copy_and_a_sole_one_in_place() {
        let frame = Bytes::from([b"head".as_slice(), &batch()[..]].concat());
        let slice = frame.slice(4..);
        let stamped = stamp(slice.clone(), 7).unwrap();
        assert_eq!(BatchHeader::parse(&stamped).unwrap().base_offset, 7);
        assert_eq!(BatchHeader::parse(&slice).unwrap().base_offset, 0, "the shared frame is left as it was");
        let sole = batch();
        let at = sole.as_ptr();
        let stamped = stamp(sole, 9).unwrap();
        assert_eq!((stamped.as_ptr(), BatchHeader::parse(&stamped).unwrap().base_offset), (at, 9), "stamped in place");
    }
}
