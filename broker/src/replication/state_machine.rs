//! The partition state machine. Light by design: payloads stay in the log; this holds
//! the applied position, the membership, and the high watermark (the message offset
//! below which everything is committed and applied) that fetches read up to.
//!
//! State is persisted only in snapshots (an atomic file in the partition directory).
//! After a restart openraft re-applies `(snapshot, committed]` from the log, which
//! rebuilds the high watermark; `applied` is therefore never ahead of the local log.
//!
//! Snapshots carry this state only. Followers are never caught up by snapshot while
//! the log is not purged (`max_in_snapshot_log_to_keep = u64::MAX` and no retention
//! purge yet); streaming segment files in snapshots arrives with the cluster issue.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use keel_storage::atomic_file;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::types::{AppendReply, RaftLogId, TypeConfig};

type StoredMembership = openraft::StoredMembership<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode>;
type SnapshotMeta = openraft::SnapshotMeta<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode>;
type Snapshot = openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode, PartitionSnapshot>;

const SNAPSHOT_FILE: &str = "sm.snapshot";

/// What the state machine knows, and what a snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmState {
    pub applied: Option<RaftLogId>,
    pub membership: StoredMembership,
    /// Offset one past the last applied message: the high watermark.
    pub next_offset: u64,
}

/// Snapshot data: the state machine state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    pub state: SmState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    state: SmState,
}

/// The state machine of one partition.
pub struct PartitionStateMachine {
    dir: PathBuf,
    state: SmState,
    high_watermark: tokio::sync::watch::Sender<u64>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

/// Builds a snapshot from a copy of the state taken when the builder was created.
pub struct PartitionSnapshotBuilder {
    dir: PathBuf,
    state: SmState,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn persist(dir: &Path, snapshot: &StoredSnapshot) -> io::Result<()> {
    let bytes = postcard::to_allocvec(snapshot).map_err(|e| invalid(format!("encoding snapshot: {e}")))?;
    Ok(atomic_file::write(dir, SNAPSHOT_FILE, &bytes)?)
}

impl PartitionStateMachine {
    /// Opens the state machine in `dir`, starting from the last snapshot if any.
    pub fn open(dir: PathBuf) -> io::Result<PartitionStateMachine> {
        let current: Option<StoredSnapshot> = match atomic_file::read(&dir, SNAPSHOT_FILE)? {
            None => None,
            Some(bytes) => Some(postcard::from_bytes(&bytes).map_err(|e| invalid(format!("decoding snapshot: {e}")))?),
        };
        let state = current.as_ref().map(|s| s.state.clone()).unwrap_or_default();
        let (high_watermark, _) = tokio::sync::watch::channel(state.next_offset);
        Ok(PartitionStateMachine { dir, state, high_watermark, current: Arc::new(Mutex::new(current)) })
    }

    /// The high watermark: messages below this offset are committed and may be served.
    /// The receiver also wakes waiters (long-poll fetches, the metadata tailer) when it
    /// moves.
    pub fn high_watermark(&self) -> tokio::sync::watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionSnapshotBuilder {
    type SnapshotData = PartitionSnapshot;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let meta = SnapshotMeta { last_log_id: self.state.applied, last_membership: self.state.membership.clone() };
        let stored = StoredSnapshot { meta: meta.clone(), state: self.state.clone() };
        let dir = self.dir.clone();
        let stored = tokio::task::spawn_blocking(move || persist(&dir, &stored).map(|_| stored)).await.map_err(io::Error::other)??;
        *self.current.lock().expect("snapshot lock poisoned") = Some(stored);
        Ok(Snapshot { meta, snapshot: PartitionSnapshot { state: self.state.clone() } })
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = PartitionSnapshot;
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<RaftLogId>, StoredMembership)> {
        Ok((self.state.applied, self.state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let reply = match &entry.payload {
                EntryPayload::Blank => AppendReply { base_offset: self.state.next_offset, record_count: 0 },
                EntryPayload::Normal(batch) => {
                    // Batches are validated before they are proposed; an unreadable
                    // header here is corruption, and the group must stop.
                    let h = batch.header().ok_or_else(|| invalid(format!("entry {} holds an unparseable batch", entry.log_id.index)))?;
                    debug_assert_eq!(h.base_offset, self.state.next_offset, "offsets are contiguous across applied batches");
                    self.state.next_offset = h.base_offset + u64::from(h.record_count);
                    AppendReply { base_offset: h.base_offset, record_count: h.record_count }
                }
                EntryPayload::Membership(m) => {
                    self.state.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    AppendReply { base_offset: self.state.next_offset, record_count: 0 }
                }
            };
            self.state.applied = Some(entry.log_id);
            self.high_watermark.send_if_modified(|hw| std::mem::replace(hw, self.state.next_offset) != self.state.next_offset);
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        PartitionSnapshotBuilder { dir: self.dir.clone(), state: self.state.clone(), current: self.current.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: PartitionSnapshot) -> io::Result<()> {
        let stored = StoredSnapshot { meta: meta.clone(), state: snapshot.state.clone() };
        let dir = self.dir.clone();
        let stored = tokio::task::spawn_blocking(move || persist(&dir, &stored).map(|_| stored)).await.map_err(io::Error::other)??;
        self.state = snapshot.state;
        self.high_watermark.send_replace(self.state.next_offset);
        *self.current.lock().expect("snapshot lock poisoned") = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let current = self.current.lock().expect("snapshot lock poisoned");
        Ok(current.as_ref().map(|s| Snapshot { meta: s.meta.clone(), snapshot: PartitionSnapshot { state: s.state.clone() } }))
    }
}
