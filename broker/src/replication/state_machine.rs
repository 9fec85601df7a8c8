//! The partition state machine: the openraft adapter that feeds committed entries, in
//! log order, to the partition fold (`crate::partition::PartitionState`). Payloads stay
//! in the log; applying reads a batch's header (and, when its records carry message
//! ids, walks them) but copies nothing.
//!
//! It publishes what readers wait on — the high watermark (messages below it are
//! committed and applied) and the last applied log id (a new leader serves writes only
//! once it has applied an entry of its own term) — and shares the fold's state with the
//! partition leader (`node/partition.rs`), which decides before proposing.
//!
//! State is persisted only in snapshots (`partition.snapshot`, an atomic file: magic,
//! format version, CRC32C, then the body). After a restart openraft re-applies
//! `(snapshot, committed]` from the log, so `applied` is never ahead of the local log.
//! A snapshot carries the fold's state. A follower behind its leader's retained log is
//! sent the snapshot together with the leader's retained entries up to it
//! (`peer/snapshot.rs`): they arrive as a *staged* log beside the group's own, with the
//! snapshot file in it, and installing the snapshot installs that log in place of the
//! follower's (`Log::install_staged`, crash-atomic), so the follower holds the same
//! entries at the same offsets as the leader and appends on from there.
//!
//! Retention: the fold's `Retained` cut is published as the *purge floor*: the log
//! store deletes entries only below it, whatever openraft asks (after installing a
//! snapshot openraft purges up to the snapshot, and the retained entries before it
//! must stay).
//!
//! The metadata group's state machine (`open_metadata`) also folds its committed
//! commands into the cluster's `MetadataState` and publishes each new state (before it
//! answers the writes that changed it); its snapshots carry that state too, so its log
//! can be cut and purged like a partition's, and a node far behind or wiped is sent the
//! metadata state with the retained log.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use keel_protocol::BatchView;
use keel_storage::{atomic_file, Disk, Log};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{ApplyReply, EntryData, RaftLogId, TypeConfig};
use crate::metadata::{MetadataCommand, MetadataState};
use crate::partition::message_ids::{digest, IdDigest};
use crate::partition::producers::ProducerStamp;
use crate::partition::{BatchInfo, BatchOutcome, ControlEntry, PartitionState};

type StoredMembership = openraft::StoredMembership<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode>;
type Snapshot = openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode, PartitionSnapshot>;

const SNAPSHOT_FILE: &str = "partition.snapshot";
/// The snapshot file of earlier builds (postcard `LegacySnapshot`), read if present.
const LEGACY_SNAPSHOT_FILE: &str = "sm.snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"KSNP";
const SNAPSHOT_FORMAT: u16 = 1;

/// A snapshot's data: the fold's state, encoded (`PartitionState::encode_snapshot`),
/// and on a follower receiving it, the staged log that comes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    pub state: Vec<u8>,
    /// A directory inside the group's directory holding the leader's retained entries up
    /// to the snapshot (and the snapshot file): installed in place of the local log.
    #[serde(default)]
    pub staged: Option<PathBuf>,
}

/// The body of a snapshot file, format 1.
#[derive(Serialize, Deserialize)]
struct SnapshotFileV1 {
    meta: SnapshotMeta,
    state: Vec<u8>,
}

/// What earlier builds stored in `sm.snapshot`: the applied position, membership and
/// high watermark (there was no other state).
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta,
    state: LegacySmState,
}

#[derive(Deserialize)]
struct LegacySmState {
    #[allow(dead_code)]
    applied: Option<RaftLogId>,
    #[allow(dead_code)]
    membership: StoredMembership,
    next_offset: u64,
}

#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    state: Vec<u8>,
}

/// The first two bytes of a metadata group's snapshot state (a partition snapshot
/// starts with its format version, a small number), then [`METADATA_STATE_FORMAT`].
const METADATA_STATE_TAG: &[u8; 2] = b"MD";
const METADATA_STATE_FORMAT: u16 = 1;

/// A metadata group's snapshot state, format 1: the partition fold's encoded state (the
/// log's offsets and retention cut) and the cluster's metadata.
#[derive(Deserialize)]
struct MetadataGroupStateV1 {
    partition: Vec<u8>,
    metadata: MetadataState,
}

/// What [`MetadataGroupStateV1`] decodes (postcard writes a reference as its value).
#[derive(Serialize)]
struct MetadataGroupStateV1Ref<'a> {
    partition: Vec<u8>,
    metadata: &'a MetadataState,
}

/// Encodes a snapshot's state: the partition fold's alone, or for the metadata group
/// both folds.
fn encode_group_state(partition: &PartitionState, metadata: Option<&MetadataState>) -> Vec<u8> {
    let Some(metadata) = metadata else { return partition.encode_snapshot() };
    let mut out = METADATA_STATE_TAG.to_vec();
    out.extend_from_slice(&METADATA_STATE_FORMAT.to_le_bytes());
    let body = MetadataGroupStateV1Ref { partition: partition.encode_snapshot(), metadata };
    postcard::to_io(&body, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Decodes what [`encode_group_state`] wrote: the metadata state is `None` in a
/// partition's snapshot (and in a metadata group's written by builds that folded
/// metadata outside the state machine).
fn decode_group_state(bytes: &[u8]) -> io::Result<(PartitionState, Option<MetadataState>)> {
    let Some(body) = bytes.strip_prefix(METADATA_STATE_TAG) else {
        return Ok((PartitionState::decode_snapshot(bytes).map_err(|e| invalid(e.to_string()))?, None));
    };
    let Some((format, body)) = body.split_first_chunk::<2>() else { return Err(invalid("a truncated metadata snapshot".into())) };
    let format = u16::from_le_bytes(*format);
    if format != METADATA_STATE_FORMAT {
        return Err(invalid(format!("the metadata snapshot has format {format}, newer than this build reads ({METADATA_STATE_FORMAT}); upgrade the broker")));
    }
    let v1: MetadataGroupStateV1 = postcard::from_bytes(body).map_err(|e| invalid(format!("decoding the metadata snapshot: {e}")))?;
    let partition = PartitionState::decode_snapshot(&v1.partition).map_err(|e| invalid(e.to_string()))?;
    Ok((partition, Some(v1.metadata)))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn encode_file(s: &StoredSnapshot) -> io::Result<Vec<u8>> {
    let body =
        postcard::to_allocvec(&SnapshotFileV1 { meta: s.meta.clone(), state: s.state.clone() }).map_err(|e| invalid(format!("encoding snapshot: {e}")))?;
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_file(bytes: &[u8]) -> io::Result<StoredSnapshot> {
    if bytes.len() < 10 || &bytes[..4] != SNAPSHOT_MAGIC {
        return Err(invalid("partition.snapshot is not a snapshot file (bad magic)".into()));
    }
    let format = u16::from_le_bytes([bytes[4], bytes[5]]);
    if format != SNAPSHOT_FORMAT {
        return Err(invalid(format!("partition.snapshot has format {format}, newer than this build reads ({SNAPSHOT_FORMAT}); upgrade the broker")));
    }
    let crc = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    let body = &bytes[10..];
    if crc32c::crc32c(body) != crc {
        return Err(invalid("partition.snapshot fails its checksum".into()));
    }
    let f: SnapshotFileV1 = postcard::from_bytes(body).map_err(|e| invalid(format!("decoding partition.snapshot: {e}")))?;
    Ok(StoredSnapshot { meta: f.meta, state: f.state })
}

fn persist(disk: &dyn Disk, dir: &Path, snapshot: &StoredSnapshot) -> io::Result<()> {
    Ok(atomic_file::write(disk, dir, SNAPSHOT_FILE, &encode_file(snapshot)?)?)
}

/// Writes a received snapshot's file into a staged log's directory `dir`, so that
/// installing the staged log installs the snapshot with it.
pub fn write_staged_snapshot(disk: &dyn Disk, dir: &Path, meta: &SnapshotMeta, state: &[u8]) -> io::Result<()> {
    persist(disk, dir, &StoredSnapshot { meta: meta.clone(), state: state.to_vec() })
}

/// The last log id covered by the snapshot saved in `dir`, if there is one.
pub fn saved_snapshot_last(disk: &dyn Disk, dir: &Path) -> io::Result<Option<RaftLogId>> {
    if let Some(bytes) = atomic_file::read(disk, dir, SNAPSHOT_FILE)? {
        return Ok(decode_file(&bytes)?.meta.last_log_id);
    }
    match atomic_file::read(disk, dir, LEGACY_SNAPSHOT_FILE)? {
        None => Ok(None),
        Some(bytes) => {
            let legacy: LegacySnapshot = postcard::from_bytes(&bytes).map_err(|e| invalid(format!("decoding {LEGACY_SNAPSHOT_FILE}: {e}")))?;
            Ok(legacy.meta.last_log_id)
        }
    }
}

/// The snapshot saved in `dir`: the last log index it covers and the fold's state
/// there (for offline inspection of a log whose prefix retention purged).
pub fn saved_state(disk: &dyn Disk, dir: &Path) -> io::Result<Option<(u64, PartitionState)>> {
    let Some(bytes) = atomic_file::read(disk, dir, SNAPSHOT_FILE)? else { return Ok(None) };
    let stored = decode_file(&bytes)?;
    let Some(last) = stored.meta.last_log_id else { return Ok(None) };
    let state = PartitionState::decode_snapshot(&stored.state).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    Ok(Some((last.index, state)))
}

/// The metadata group's snapshot saved in `dir`: the last log index it covers and the
/// cluster's metadata there (for offline inspection of a purged metadata log).
pub fn saved_metadata(disk: &dyn Disk, dir: &Path) -> io::Result<Option<(u64, MetadataState)>> {
    let Some(bytes) = atomic_file::read(disk, dir, SNAPSHOT_FILE)? else { return Ok(None) };
    let stored = decode_file(&bytes)?;
    let Some(last) = stored.meta.last_log_id else { return Ok(None) };
    let (_, metadata) = decode_group_state(&stored.state).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    Ok(metadata.map(|m| (last.index, m)))
}

/// Deletes the snapshot saved in `dir`, durably, so the state machine is rebuilt from
/// the log. For a replica whose log lost entries its snapshot covers: openraft would
/// otherwise purge the log up to the snapshot, and the offsets of the entries it lost
/// could not be recomputed.
pub fn discard_saved_snapshot(disk: &dyn Disk, dir: &Path) -> io::Result<()> {
    for name in [SNAPSHOT_FILE, LEGACY_SNAPSHOT_FILE] {
        match disk.remove_file(&dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    disk.sync_dir(dir)
}

/// What the state machine shares with the partition's leader and readers.
pub struct PartitionShared {
    state: Mutex<PartitionState>,
    /// Log entries below this index may be deleted (the fold's retention cut + 1; 0:
    /// none). Read by the log store's purge.
    purge_floor: Arc<AtomicU64>,
    high_watermark: watch::Sender<u64>,
    applied: watch::Sender<Option<RaftLogId>>,
    /// The metadata group's: the cluster's metadata as of the last applied entry.
    metadata: Option<watch::Receiver<Arc<MetadataState>>>,
}

impl PartitionShared {
    /// The cluster's metadata as the metadata group's fold last published it (`None` for
    /// a partition).
    pub fn metadata(&self) -> Option<watch::Receiver<Arc<MetadataState>>> {
        self.metadata.clone()
    }

    /// The fold's state. Held briefly: applying waits for it.
    pub fn state(&self) -> MutexGuard<'_, PartitionState> {
        self.state.lock().expect("partition state lock poisoned")
    }

    /// The high watermark: messages below this offset are committed and may be served.
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    /// The log id of the last applied entry.
    pub fn applied(&self) -> watch::Receiver<Option<RaftLogId>> {
        self.applied.subscribe()
    }

    /// The purge floor, shared with the log store (`PartitionLogStore::with_purge_floor`).
    pub fn purge_floor(&self) -> Arc<AtomicU64> {
        self.purge_floor.clone()
    }

    fn publish_floor(&self, state: &PartitionState) {
        if state.retained.upto_index > 0 {
            self.purge_floor.fetch_max(state.retained.upto_index + 1, Ordering::AcqRel);
        }
    }
}

/// The state machine of one partition (or of the metadata log, whose batches carry no
/// producer fields or message ids, so the fold only counts offsets).
pub struct PartitionStateMachine {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    shared: Arc<PartitionShared>,
    applied: Option<RaftLogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// The group's log, for installing a staged log with a snapshot.
    log: Option<Arc<Log>>,
    /// The metadata group's second fold.
    metadata: Option<MetadataFold>,
}

/// The metadata group's fold of its commands into the cluster's metadata.
struct MetadataFold {
    state: MetadataState,
    publish: watch::Sender<Arc<MetadataState>>,
    /// Whether `state` changed since it was last published.
    changed: bool,
}

impl MetadataFold {
    /// Folds the commands of the batch stored at log `index`.
    fn apply(&mut self, index: u64, bytes: &bytes::Bytes) -> io::Result<()> {
        let view = BatchView::trusted(bytes.clone()).map_err(|e| invalid(format!("metadata entry {index} holds an unparseable batch: {e}")))?;
        // Committed bytes that do not decode mean a bug or corruption; folding past them
        // would diverge from other nodes, so the group stops.
        let commands = MetadataCommand::from_batch(&view).map_err(|e| invalid(format!("metadata entry {index}: {e}")))?;
        for (offset, command) in commands {
            if offset < self.state.applied_offset {
                continue;
            }
            if let Err(rejected) = self.state.apply(offset, &command) {
                tracing::info!(offset, %rejected, "metadata command rejected by the fold");
            }
            self.changed = true;
        }
        Ok(())
    }

    fn publish(&mut self) {
        if std::mem::take(&mut self.changed) {
            self.publish.send_replace(Arc::new(self.state.clone()));
        }
    }
}

/// Builds a snapshot from the state encoded when the builder was created.
pub struct PartitionSnapshotBuilder {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    snapshot: StoredSnapshot,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl PartitionStateMachine {
    /// Opens a partition's state machine in `dir` on `disk`, starting from the last
    /// snapshot if any.
    pub fn open(disk: Arc<dyn Disk>, dir: PathBuf) -> io::Result<PartitionStateMachine> {
        Self::open_kind(disk, dir, false)
    }

    /// Opens the metadata group's state machine over its `log` (see the module docs).
    /// A snapshot without the metadata state (written by builds that folded metadata
    /// elsewhere, which never purged the metadata log) is discarded: the state is
    /// rebuilt from the whole log.
    pub fn open_metadata(disk: Arc<dyn Disk>, dir: PathBuf, log: Arc<Log>) -> io::Result<PartitionStateMachine> {
        if let Some(bytes) = atomic_file::read(&*disk, &dir, SNAPSHOT_FILE)? {
            let (_, metadata) = decode_group_state(&decode_file(&bytes)?.state).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
            if metadata.is_none() {
                if log.state().first_index > 0 {
                    return Err(invalid(format!(
                        "{}: the metadata snapshot holds no metadata state and the log before it was purged; restore the data directory from a replica",
                        dir.display()
                    )));
                }
                tracing::info!(dir = %dir.display(), "the metadata snapshot predates the metadata fold; rebuilding it from the log");
                discard_saved_snapshot(&*disk, &dir)?;
            }
        }
        Ok(Self::open_kind(disk, dir, true)?.with_log(log))
    }

    fn open_kind(disk: Arc<dyn Disk>, dir: PathBuf, metadata: bool) -> io::Result<PartitionStateMachine> {
        let current = match atomic_file::read(&*disk, &dir, SNAPSHOT_FILE)? {
            Some(bytes) => Some(decode_file(&bytes)?),
            None => match atomic_file::read(&*disk, &dir, LEGACY_SNAPSHOT_FILE)? {
                None => None,
                Some(bytes) => {
                    let legacy: LegacySnapshot = postcard::from_bytes(&bytes).map_err(|e| invalid(format!("decoding {LEGACY_SNAPSHOT_FILE}: {e}")))?;
                    let state = PartitionState { next_offset: legacy.state.next_offset, ..PartitionState::default() };
                    Some(StoredSnapshot { meta: legacy.meta, state: state.encode_snapshot() })
                }
            },
        };
        let (state, metadata_state, applied, membership) = match &current {
            Some(s) => {
                let (state, m) = decode_group_state(&s.state).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
                (state, m, s.meta.last_log_id, s.meta.last_membership.clone())
            }
            None => (PartitionState::default(), None, None, StoredMembership::default()),
        };
        let fold = metadata.then(|| {
            let state = metadata_state.unwrap_or_default();
            MetadataFold { publish: watch::channel(Arc::new(state.clone())).0, state, changed: false }
        });
        let shared = Arc::new(PartitionShared {
            high_watermark: watch::channel(state.next_offset).0,
            applied: watch::channel(applied).0,
            purge_floor: Arc::new(AtomicU64::new(0)),
            metadata: fold.as_ref().map(|f| f.publish.subscribe()),
            state: Mutex::new(state),
        });
        shared.publish_floor(&shared.state());
        Ok(PartitionStateMachine { disk, dir, shared, applied, membership, current: Arc::new(Mutex::new(current)), log: None, metadata: fold })
    }

    /// Installs received snapshots' staged logs into `log` (the group's).
    pub fn with_log(mut self, log: Arc<Log>) -> PartitionStateMachine {
        self.log = Some(log);
        self
    }

    pub fn shared(&self) -> Arc<PartitionShared> {
        self.shared.clone()
    }

    /// The high watermark (see [`PartitionShared::high_watermark`]).
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.shared.high_watermark()
    }

    /// Applies the batch stored at log `index` to `state` (what applying does; public
    /// for offline replays of a stopped node's log).
    pub fn apply_batch(state: &mut PartitionState, index: u64, bytes: &bytes::Bytes) -> io::Result<BatchOutcome> {
        // Batches are validated before they are proposed, and the log checksums its
        // entries: a header that does not parse here is corruption; the group stops.
        let view = BatchView::trusted(bytes.clone()).map_err(|e| invalid(format!("entry {index} holds an unparseable batch: {e}")))?;
        let h = *view.header();
        let skip_dedupe = crate::sabotage::active(crate::sabotage::Sabotage::SkipDedupe);
        let producer =
            (h.producer_id >= 0 && !skip_dedupe).then_some(ProducerStamp { producer_id: h.producer_id, epoch: h.producer_epoch, sequence: h.base_sequence });
        let mut ids: Vec<(u32, IdDigest)> = Vec::new();
        if h.attributes.message_ids() {
            let key = state.config.id_key;
            for id in view.message_ids() {
                match id {
                    Ok((i, id)) => ids.push((i, digest(&key, id))),
                    // Only batches stored before records were validated can fail here;
                    // every replica sees the same bytes and stops at the same record.
                    Err(_) => break,
                }
            }
        }
        Ok(state.apply_batch(&BatchInfo { base_offset: h.base_offset, record_count: h.record_count, producer, message_ids: &ids, lane: h.priority }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionSnapshotBuilder {
    type SnapshotData = PartitionSnapshot;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let (disk, dir, stored) = (self.disk.clone(), self.dir.clone(), self.snapshot.clone());
        let stored = super::storage_io(&*disk.clone(), move || persist(&*disk, &dir, &stored).map(|_| stored)).await?;
        let snapshot = Snapshot { meta: stored.meta.clone(), snapshot: PartitionSnapshot { state: stored.state.clone(), staged: None } };
        *self.current.lock().expect("snapshot lock poisoned") = Some(stored);
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = PartitionSnapshot;
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<RaftLogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // The metadata group answers once the metadata state it publishes includes the
        // entries answered (a proposer then reads its change in the published state).
        let mut deferred = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let index = entry.log_id.index;
            let (reply, next_offset) = {
                let mut state = self.shared.state();
                let reply = match &entry.payload {
                    EntryPayload::Blank => ApplyReply::Empty { next_offset: state.next_offset },
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        ApplyReply::Empty { next_offset: state.next_offset }
                    }
                    EntryPayload::Normal(EntryData::Batch(batch)) => {
                        let outcome = Self::apply_batch(&mut state, index, &batch.0)?;
                        if let (Some(fold), BatchOutcome::Stored { .. }) = (&mut self.metadata, &outcome) {
                            fold.apply(index, &batch.0)?;
                        }
                        ApplyReply::Batch(outcome)
                    }
                    EntryPayload::Normal(EntryData::Control(bytes)) => {
                        let control = ControlEntry::decode(bytes).map_err(|e| invalid(format!("entry {index} holds an undecodable control entry: {e}")))?;
                        let outcome = state.apply_control(&control);
                        self.shared.publish_floor(&state);
                        ApplyReply::Control(outcome)
                    }
                };
                (reply, state.next_offset)
            };
            self.applied = Some(entry.log_id);
            self.shared.high_watermark.send_if_modified(|hw| std::mem::replace(hw, next_offset) != next_offset);
            self.shared.applied.send_replace(self.applied);
            match responder {
                Some(responder) if self.metadata.is_some() => deferred.push((responder, reply)),
                Some(responder) => responder.send(reply),
                None => {}
            }
        }
        if let Some(fold) = &mut self.metadata {
            fold.publish();
        }
        for (responder, reply) in deferred {
            responder.send(reply);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone() };
        let state = encode_group_state(&self.shared.state(), self.metadata.as_ref().map(|f| &f.state));
        PartitionSnapshotBuilder { disk: self.disk.clone(), dir: self.dir.clone(), snapshot: StoredSnapshot { meta, state }, current: self.current.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: PartitionSnapshot) -> io::Result<()> {
        let (state, metadata) = decode_group_state(&snapshot.state).map_err(|e| invalid(format!("installing a snapshot: {e}")))?;
        if self.metadata.is_some() && metadata.is_none() {
            return Err(invalid("installing a snapshot: the metadata group's snapshot holds no metadata state".into()));
        }
        let stored = StoredSnapshot { meta: meta.clone(), state: snapshot.state };
        let (disk, dir) = (self.disk.clone(), self.dir.clone());
        let stored = match (snapshot.staged, &self.log) {
            // The staged directory holds the snapshot file too: both go in at once.
            (Some(staged), Some(log)) => {
                let log = log.clone();
                let last = meta.last_log_id.map(|l| l.index);
                super::storage_io(&*disk.clone(), move || {
                    log.install_staged(&staged)?;
                    let st = log.state();
                    if st.last.map(|l| l.index) != last {
                        return Err(invalid(format!("the installed log ends at {:?}, the snapshot at {last:?}", st.last)));
                    }
                    Ok(stored)
                })
                .await?
            }
            (Some(staged), None) => return Err(invalid(format!("a staged log ({}) came with a snapshot for a group without a log", staged.display()))),
            (None, _) => super::storage_io(&*disk.clone(), move || persist(&*disk, &dir, &stored).map(|_| stored)).await?,
        };
        let next_offset = state.next_offset;
        self.shared.publish_floor(&state);
        *self.shared.state() = state;
        if let (Some(fold), Some(metadata)) = (&mut self.metadata, metadata) {
            fold.state = metadata;
            fold.changed = true;
            fold.publish();
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.high_watermark.send_replace(next_offset);
        self.shared.applied.send_replace(self.applied);
        *self.current.lock().expect("snapshot lock poisoned") = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let current = self.current.lock().expect("snapshot lock poisoned");
        Ok(current.as_ref().map(|s| Snapshot { meta: s.meta.clone(), snapshot: PartitionSnapshot { state: s.state.clone(), staged: None } }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sm.snapshot` as builds before the partition fold wrote it: meta, then the
    /// applied id, membership and high watermark.
    #[derive(Serialize)]
    struct OldSnapshot {
        meta: SnapshotMeta,
        state: OldState,
    }

    #[derive(Serialize)]
    struct OldState {
        applied: Option<RaftLogId>,
        membership: StoredMembership,
        next_offset: u64,
    }

    #[test]
    fn a_snapshot_written_by_an_earlier_build_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let applied = Some(RaftLogId::new_term_index(3, 40));
        let meta = SnapshotMeta { last_log_id: applied, last_membership: StoredMembership::default() };
        let old = OldSnapshot { meta, state: OldState { applied, membership: StoredMembership::default(), next_offset: 1234 } };
        atomic_file::write(&keel_storage::disk::OsDisk, dir.path(), LEGACY_SNAPSHOT_FILE, &postcard::to_allocvec(&old).unwrap()).unwrap();
        let sm = PartitionStateMachine::open(keel_storage::disk::os(), dir.path().to_path_buf()).unwrap();
        assert_eq!(*sm.high_watermark().borrow(), 1234);
        assert_eq!(sm.applied, applied);
    }

    #[test]
    fn a_snapshot_file_round_trips_and_a_flipped_bit_is_refused() {
        let state = PartitionState { next_offset: 42, clock_ms: 7, ..PartitionState::default() };
        let stored = StoredSnapshot { meta: SnapshotMeta::default(), state: state.encode_snapshot() };
        let mut bytes = encode_file(&stored).unwrap();
        let back = decode_file(&bytes).unwrap();
        assert_eq!(PartitionState::decode_snapshot(&back.state).unwrap(), state);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(decode_file(&bytes).unwrap_err().to_string().contains("checksum"));
    }

    #[test]
    fn a_metadata_groups_snapshot_state_carries_both_folds_and_a_partitions_only_its_own() {
        let partition = PartitionState { next_offset: 17, clock_ms: 9, ..PartitionState::default() };
        let mut metadata = MetadataState::default();
        metadata.apply(0, &MetadataCommand::AllocateProducerIds { node: 2, count: 10 }).unwrap();
        let (p, m) = decode_group_state(&encode_group_state(&partition, Some(&metadata))).unwrap();
        assert_eq!((p, m), (partition.clone(), Some(metadata)));
        let (p, m) = decode_group_state(&encode_group_state(&partition, None)).unwrap();
        assert_eq!((p, m), (partition, None));
        let mut newer = METADATA_STATE_TAG.to_vec();
        newer.extend_from_slice(&9u16.to_le_bytes());
        assert!(decode_group_state(&newer).unwrap_err().to_string().contains("format 9"));
    }

    #[test]
    fn a_metadata_snapshot_of_an_earlier_build_is_discarded_so_the_whole_log_rebuilds_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let disk = keel_storage::disk::os();
        let log = Arc::new(Log::open(dir.path(), keel_storage::LogConfig::default()).unwrap());
        // What builds that folded metadata outside the state machine saved: partition state only.
        let meta = SnapshotMeta { last_log_id: Some(RaftLogId::new_term_index(1, 5)), last_membership: StoredMembership::default() };
        persist(&*disk, dir.path(), &StoredSnapshot { meta, state: PartitionState { next_offset: 6, ..PartitionState::default() }.encode_snapshot() }).unwrap();
        let sm = PartitionStateMachine::open_metadata(disk.clone(), dir.path().to_path_buf(), log).unwrap();
        assert_eq!(sm.applied, None, "the state is rebuilt from the log");
        assert!(saved_snapshot_last(&*disk, dir.path()).unwrap().is_none(), "the old snapshot is gone");
        assert_eq!(**sm.shared().metadata().unwrap().borrow(), MetadataState::default());
    }
}
