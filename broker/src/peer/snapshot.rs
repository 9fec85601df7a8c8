//! Snapshot transfer with the log: how a follower behind its leader's retained log
//! (or one whose data directory was wiped) is caught up once the leader's log is
//! purged.
//!
//! A snapshot is the partition fold's state at entry `S`. Alone it would leave the
//! follower without the messages the leader still retains before `S`, so the leader
//! sends its retained entries up to `S` with it, and the follower installs them as its
//! log: the same entries at the same offsets, byte for byte, so the next entry it
//! appends is stamped exactly as the leader stamped it.
//!
//! The transfer, each step one peer RPC (bounded by `SNAPSHOT_STEP_TIMEOUT`):
//! 1. **Offer** (snapshot meta): the follower answers whether its own log already holds
//!    `S` (then nothing is sent), and what its *staged log* — `snapshot.staging/`
//!    in the group's directory, kept across attempts and restarts — holds.
//! 2. **Chunks** of at most `SNAPSHOT_CHUNK_BYTES` of entries, each checksummed
//!    (CRC32C over every field and payload, checked before anything is written; batch
//!    payloads carry their own CRC too). The leader resumes after the staged log's last
//!    entry if its own log holds that same entry (log matching: everything before it
//!    matches too), else starts a new staged log at its own log start. The follower
//!    appends and fsyncs each chunk before answering.
//! 3. **Install** (meta and state): the follower checks that the staged log ends exactly
//!    at `S`, writes the snapshot file into it, and hands both to openraft
//!    (`install_full_snapshot`); the state machine installs the staged log in place of
//!    the group's (`Log::install_staged`: crash-atomic), then the state.
//!
//! A dropped connection, a timeout or a killed follower loses at most the chunk in
//! flight: openraft sends the snapshot again and the offer resumes the staged log.

use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::{Entry, EntryMeta, Log, LogId};
use openraft::error::{NetworkError, RPCError};
use openraft::raft::SnapshotResponse;

use super::limits::{SNAPSHOT_CHUNK_BYTES, SNAPSHOT_STEP_TIMEOUT};
use super::network::{GroupNetwork, RemoteFailure};
use super::server::HostedGroup;
use super::wire::{RaftReply, RaftRpc, SnapshotChunk, SnapshotHave, StagingStart, Vote, WireEntry};
use crate::replication::state_machine::{write_staged_snapshot, PartitionSnapshot, SnapshotMeta};
use crate::replication::TypeConfig;

/// Test fault (set only through `POST /test/faults` in `fault-injection` builds): the
/// sender sleeps this long before each chunk, so a test can interrupt a transfer
/// halfway. 0 in normal operation.
pub static CHUNK_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The staged log's directory inside a group's directory.
pub const STAGING_DIR: &str = "snapshot.staging";

type Snapshot = openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode, PartitionSnapshot>;

fn failure(msg: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&RemoteFailure(msg)))
}

/// CRC32C over entries' fields and payloads, in order.
pub fn chunk_crc(entries: &[WireEntry]) -> u32 {
    let mut crc = 0u32;
    for e in entries {
        let mut fields = [0u8; 45];
        fields[0..8].copy_from_slice(&e.term.to_le_bytes());
        fields[8..16].copy_from_slice(&e.index.to_le_bytes());
        fields[16] = e.kind;
        fields[17..25].copy_from_slice(&e.base_offset.to_le_bytes());
        fields[25..29].copy_from_slice(&e.record_count.to_le_bytes());
        fields[29..37].copy_from_slice(&e.max_timestamp_ms.to_le_bytes());
        fields[37..45].copy_from_slice(&(e.payload.len() as u64).to_le_bytes());
        crc = crc32c::crc32c_append(crc, &fields);
        crc = crc32c::crc32c_append(crc, &e.payload);
    }
    crc
}

fn to_wire(e: Entry) -> WireEntry {
    let m = e.meta;
    WireEntry {
        term: m.id.term,
        index: m.id.index,
        kind: m.kind,
        base_offset: m.base_offset,
        record_count: m.record_count,
        max_timestamp_ms: m.max_timestamp_ms,
        payload: e.payload,
    }
}

fn from_wire(e: WireEntry) -> Entry {
    Entry {
        meta: EntryMeta {
            id: LogId { term: e.term, index: e.index },
            kind: e.kind,
            base_offset: e.base_offset,
            record_count: e.record_count,
            max_timestamp_ms: e.max_timestamp_ms,
        },
        payload: e.payload,
    }
}

/// The id of `log`'s entry at `index`, if it holds one.
fn id_at(log: &Log, index: u64) -> Option<LogId> {
    log.read(index..index + 1, 0).ok()?.first().map(|e| e.meta.id)
}

/// Sends `snapshot` with the leader's retained entries up to it (the sending side of
/// the module docs). `log` is the leader's log of the group.
pub(super) async fn send(net: &GroupNetwork, log: &Arc<Log>, vote: Vote, snapshot: Snapshot) -> Result<SnapshotResponse<TypeConfig>, RPCError<TypeConfig>> {
    let meta = snapshot.meta;
    let last = meta.last_log_id.ok_or_else(|| failure("a snapshot without a last log id cannot be sent".into()))?;
    let last = LogId { term: last.leader_id.term, index: last.index };
    let have = match net.call(RaftRpc::SnapshotOffer { vote, meta: meta.clone() }, SNAPSHOT_STEP_TIMEOUT).await? {
        RaftReply::SnapshotHave(h) => h,
        other => return Err(failure(format!("unexpected answer to a snapshot offer: {other:?}"))),
    };
    let (mut sent_entries, mut sent_bytes) = (0u64, 0u64);
    if !have.holds_last {
        let st = log.state();
        if st.first_index > last.index + 1 || st.last.is_none_or(|l| l.index < last.index) {
            // Retention moved past this snapshot since it was taken (or the log lost it):
            // openraft sends a newer one next time.
            return Err(failure(format!("this node's log ({}..{}) no longer holds the entries up to snapshot {last:?}", st.first_index, st.next_index)));
        }
        let resume = have.staged.and_then(|(_, (term, index))| {
            let staged_last = LogId { term, index };
            let matches = if index + 1 == st.first_index { st.purged == Some(staged_last) } else { id_at(log, index) == Some(staged_last) };
            (index <= last.index && index + 1 >= st.first_index && matches).then_some(index + 1)
        });
        let (mut next, mut start) = match resume {
            Some(next) => (next, None),
            None => {
                let start = match st.purged {
                    None => StagingStart::Fresh,
                    Some(p) => StagingStart::After { term: p.term, index: p.index, start_offset: st.start_offset },
                };
                (st.first_index, Some(start))
            }
        };
        if let Some(n) = resume {
            tracing::info!(group = net.group, target = net.target, resume_at = n, "resuming an interrupted snapshot transfer");
        }
        while next <= last.index || start.is_some() {
            let entries: Vec<WireEntry> = if next <= last.index {
                let log = log.clone();
                tokio::task::spawn_blocking(move || log.read(next..last.index + 1, SNAPSHOT_CHUNK_BYTES))
                    .await
                    .map_err(|e| failure(format!("reading entries for a snapshot: {e}")))?
                    .map_err(|e| failure(format!("reading entries for a snapshot: {e}")))?
                    .into_iter()
                    .map(to_wire)
                    .collect()
            } else {
                Vec::new()
            };
            if next <= last.index && entries.first().is_none_or(|e| e.index != next) {
                return Err(failure(format!("this node's log no longer holds entry {next} (retention ran meanwhile)")));
            }
            let delay = CHUNK_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            let chunk_last = entries.last().map(|e| (e.term, e.index));
            let bytes: u64 = entries.iter().map(|e| e.payload.len() as u64).sum();
            let n = entries.len() as u64;
            let chunk = SnapshotChunk { start: start.take(), crc: chunk_crc(&entries), entries };
            match net.call(RaftRpc::SnapshotChunk { vote, chunk }, SNAPSHOT_STEP_TIMEOUT).await? {
                RaftReply::SnapshotStaged(staged) if chunk_last.is_none() || staged == chunk_last => {}
                other => return Err(failure(format!("unexpected answer to a snapshot chunk: {other:?}"))),
            }
            sent_entries += n;
            sent_bytes += bytes;
            crate::metrics::snapshot_bytes("sent", bytes);
            match chunk_last {
                Some((_, index)) => next = index + 1,
                None => break,
            }
        }
    }
    let state = snapshot.snapshot.state;
    let reply = net.call(RaftRpc::SnapshotInstall { vote, meta, state }, SNAPSHOT_STEP_TIMEOUT).await?;
    match reply {
        RaftReply::Snapshot(r) => {
            tracing::info!(group = net.group, target = net.target, snapshot = ?last, sent_entries, sent_bytes, "sent a snapshot with the log up to it");
            Ok(r)
        }
        other => Err(failure(format!("unexpected answer to a snapshot install: {other:?}"))),
    }
}

fn staging_dir(hosted: &HostedGroup) -> PathBuf {
    hosted.log.dir().join(STAGING_DIR)
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?
}

/// Answers an offer: whether the group's log holds the snapshot's last entry, and what
/// the staged log holds.
pub(super) async fn offer(hosted: &HostedGroup, meta: &SnapshotMeta) -> Result<RaftReply, String> {
    let last = meta.last_log_id.ok_or("a snapshot offer without a last log id")?;
    let holds_last = id_at(&hosted.log, last.index) == Some(LogId { term: last.leader_id.term, index: last.index });
    let mut staging = hosted.staging.lock().await;
    let dir = staging_dir(hosted);
    if staging.is_none() && hosted.log.disk().exists(&dir) {
        let (disk, config, d) = (hosted.log.disk().clone(), hosted.log.config().clone(), dir.clone());
        match blocking(move || Log::open_on(disk, &d, config).map_err(|e| e.to_string())).await {
            Ok(log) => *staging = Some(Arc::new(log)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "discarding an unreadable staged log");
                let (disk, d) = (hosted.log.disk().clone(), dir.clone());
                blocking(move || disk.remove_dir_all(&d).map_err(|e| e.to_string())).await?;
            }
        }
    }
    let staged = staging.as_ref().and_then(|log| {
        let st = log.state();
        match (st.last, st.purged) {
            (Some(l), p) if p != Some(l) => Some((st.first_index, (l.term, l.index))),
            _ => None,
        }
    });
    Ok(RaftReply::SnapshotHave(SnapshotHave { holds_last, staged }))
}

/// Appends a chunk to the staged log (beginning a new one if it says so), durably.
pub(super) async fn chunk(hosted: &HostedGroup, chunk: SnapshotChunk) -> Result<RaftReply, String> {
    if chunk_crc(&chunk.entries) != chunk.crc {
        return Err("a snapshot chunk failed its checksum; nothing of it was written".into());
    }
    let mut staging = hosted.staging.lock().await;
    let dir = staging_dir(hosted);
    if let Some(start) = chunk.start {
        *staging = None;
        let (disk, config, d) = (hosted.log.disk().clone(), hosted.log.config().clone(), dir.clone());
        let log = blocking(move || {
            if disk.exists(&d) {
                disk.remove_dir_all(&d).map_err(|e| format!("removing the old staged log: {e}"))?;
            }
            let log = match start {
                StagingStart::Fresh => Log::open_on(disk, &d, config),
                StagingStart::After { term, index, start_offset } => Log::create_at(disk, &d, config, LogId { term, index }, start_offset),
            };
            log.map_err(|e| format!("creating the staged log: {e}"))
        })
        .await?;
        *staging = Some(Arc::new(log));
    }
    let log = staging.clone().ok_or("no staged log: the transfer must start again")?;
    let bytes: u64 = chunk.entries.iter().map(|e| e.payload.len() as u64).sum();
    let entries: Vec<Entry> = chunk.entries.into_iter().map(from_wire).collect();
    let last = blocking(move || {
        log.append(entries).map_err(|e| format!("staging snapshot entries: {e}"))?;
        log.flush().map_err(|e| format!("syncing staged snapshot entries: {e}"))?;
        Ok(log.state().last)
    })
    .await?;
    crate::metrics::snapshot_bytes("received", bytes);
    Ok(RaftReply::SnapshotStaged(last.map(|l| (l.term, l.index))))
}

/// Completes a transfer: installs the snapshot, with the staged log unless the group's
/// own log holds the snapshot's last entry.
pub(super) async fn install(hosted: &HostedGroup, vote: Vote, meta: SnapshotMeta, state: Vec<u8>) -> Result<RaftReply, String> {
    let last = meta.last_log_id.ok_or("a snapshot without a last log id")?;
    let last_id = LogId { term: last.leader_id.term, index: last.index };
    let mut staging = hosted.staging.lock().await;
    let staged = if id_at(&hosted.log, last.index) == Some(last_id) {
        None
    } else {
        let log = staging.take().ok_or("no staged log to install: the transfer must start again")?;
        let ends_at = log.state().last;
        if ends_at != Some(last_id) {
            *staging = Some(log);
            return Err(format!("the staged log ends at {ends_at:?}, not at the snapshot's last entry {last_id:?}"));
        }
        let dir = staging_dir(hosted);
        let (disk, d, m, s) = (hosted.log.disk().clone(), dir.clone(), meta.clone(), state.clone());
        blocking(move || {
            log.flush().map_err(|e| e.to_string())?;
            drop(log);
            write_staged_snapshot(&*disk, &d, &m, &s).map_err(|e| format!("writing the staged snapshot: {e}"))
        })
        .await?;
        Some(dir)
    };
    let with_log = staged.is_some();
    let snapshot = openraft::Snapshot { meta, snapshot: PartitionSnapshot { state, staged } };
    let reply = hosted.raft.install_full_snapshot(vote, snapshot).await.map_err(|e| e.to_string())?;
    crate::metrics::snapshot_installed(with_log);
    tracing::info!(snapshot = ?last_id, with_log, "installed a snapshot from the leader");
    Ok(RaftReply::Snapshot(reply))
}
