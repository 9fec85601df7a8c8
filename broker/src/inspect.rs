//! Offline inspection of a stopped node's data directory: the committed records of
//! every partition, as consumers would be served them.
//!
//! The metadata log is folded to learn which group holds which partition; each partition
//! log is then replayed through the partition fold (so batches the fold refused are left
//! out, as fetch leaves them out) up to the committed index the node last saved: from
//! its first entry, or — when retention purged its prefix — from the node's saved
//! snapshot, whose state says which of the entries before it were served. Used by `keel dump` and by the Jepsen harness to compare every node's
//! log at the end of a run.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::BatchView;
use keel_storage::{Log, LogConfig};

use crate::metadata::{MetadataCommand, MetadataState, METADATA_GROUP};
use crate::node::group::group_dir;
use crate::node::limits::METADATA_READ_BYTES;
use crate::partition::{BatchOutcome, ControlEntry, PartitionState};
use crate::replication::log_store::{saved_committed, KIND_BATCH, KIND_CONTROL};
use crate::replication::state_machine::{saved_metadata, saved_state};
use crate::replication::PartitionStateMachine;

/// One committed, served record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedRecord {
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// One partition's committed records on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedPartition {
    pub topic: String,
    pub partition: u32,
    pub records: Vec<InspectedRecord>,
}

/// The committed entries of the log in `dir` (up to the node's saved committed index).
fn committed_entries(dir: &Path) -> Result<Vec<keel_storage::Entry>, String> {
    let log = Arc::new(Log::open(dir, LogConfig::default()).map_err(|e| format!("opening {}: {e}", dir.display()))?);
    let committed = saved_committed(&keel_storage::disk::OsDisk, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let Some(committed) = committed else { return Ok(Vec::new()) };
    let end = committed.saturating_add(1).min(log.state().next_index);
    let mut out = Vec::new();
    let mut next = log.state().first_index;
    while next < end {
        let chunk = log.read(next..end, METADATA_READ_BYTES).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let Some(last) = chunk.last() else { break };
        next = last.meta.id.index + 1;
        out.extend(chunk);
    }
    Ok(out)
}

/// The cluster's metadata as this node's committed metadata log (from its snapshot, if
/// retention purged the log before it) says, in the data directory `data_dir`.
pub fn metadata_state(data_dir: &Path) -> Result<MetadataState, String> {
    let dir = group_dir(data_dir, METADATA_GROUP);
    let saved = saved_metadata(&keel_storage::disk::OsDisk, &dir).map_err(|e| format!("the metadata snapshot: {e}"))?;
    let mut metadata = saved.map(|(_, m)| m).unwrap_or_default();
    for e in committed_entries(&dir)? {
        if e.meta.kind != KIND_BATCH {
            continue;
        }
        let view = BatchView::parse(e.payload).map_err(|err| format!("metadata entry {}: {err}", e.meta.id.index))?;
        for (offset, command) in MetadataCommand::from_batch(&view).map_err(|err| err.to_string())? {
            // Entries the snapshot covers are already in it.
            if offset >= metadata.applied_offset {
                let _ = metadata.apply(offset, &command);
            }
        }
    }
    Ok(metadata)
}

/// Every partition's committed, served records in the data directory `data_dir`.
pub fn committed_records(data_dir: &Path) -> Result<Vec<InspectedPartition>, String> {
    let metadata = metadata_state(data_dir)?;
    let mut out = Vec::new();
    for topic in metadata.topics.values() {
        for p in &topic.partitions {
            let dir = group_dir(data_dir, p.group);
            if !dir.exists() {
                continue;
            }
            let snapshot = saved_state(&keel_storage::disk::OsDisk, &dir).map_err(|e| format!("{}/{}: {e}", topic.name, p.partition))?;
            // Entries up to the snapshot are in its state already; only whether their
            // batches were served is read from it.
            let (covered, mut state) = match snapshot {
                Some((last, state)) => (Some(last), state),
                None => (None, PartitionState::default()),
            };
            let mut records = Vec::new();
            for e in committed_entries(&dir)? {
                let index = e.meta.id.index;
                let in_snapshot = covered.is_some_and(|c| index <= c);
                match e.meta.kind {
                    KIND_CONTROL if in_snapshot => {}
                    KIND_CONTROL => {
                        let entry = ControlEntry::decode(&e.payload).map_err(|err| format!("{}/{} entry {index}: {err}", topic.name, p.partition))?;
                        state.apply_control(&entry);
                    }
                    KIND_BATCH => {
                        if in_snapshot {
                            if !state.is_served(e.meta.base_offset) {
                                continue;
                            }
                        } else {
                            let outcome = PartitionStateMachine::apply_batch(&mut state, index, &e.payload).map_err(|err| err.to_string())?;
                            if !matches!(outcome, BatchOutcome::Stored { .. }) {
                                continue;
                            }
                        }
                        let view = BatchView::parse(e.payload.clone()).map_err(|err| format!("{}/{} entry {index}: {err}", topic.name, p.partition))?;
                        let base = view.header().base_offset;
                        let bytes = view.as_bytes().clone();
                        for r in view.records() {
                            let r = r.map_err(|err| format!("{}/{} offset {base}: {err}", topic.name, p.partition))?;
                            records.push(InspectedRecord {
                                offset: base + u64::from(r.offset_delta),
                                key: r.key.map(|k| bytes.slice_ref(k)),
                                value: r.value.map(|v| bytes.slice_ref(v)),
                            });
                        }
                    }
                    _ => {}
                }
            }
            out.push(InspectedPartition { topic: topic.name.clone(), partition: p.partition, records });
        }
    }
    Ok(out)
}
