//! The Raft type configuration and the application data carried by log entries.

use std::fmt;

use bytes::Bytes;
use keel_protocol::batch::BatchHeader;
use serde::{Deserialize, Serialize};

use crate::partition::{BatchOutcome, ControlEntry, ControlOutcome};

openraft::declare_raft_types!(
    /// Keel's Raft types: terms and node ids are `u64`; a committed leader id is the
    /// term alone (`leader_id_std`), which is what the storage entry header records.
    pub TypeConfig:
        D = EntryData,
        R = ApplyReply,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
        AsyncRuntime = crate::replication::runtime::KeelRuntime,
);

/// A Raft log id of this configuration.
pub type RaftLogId = openraft::LogId<openraft::vote::leader_id_std::CommittedLeaderId<u64>>;
/// A Raft entry of this configuration.
pub type RaftEntry = openraft::Entry<openraft::vote::leader_id_std::CommittedLeaderId<u64>, openraft::EntryPayload<EntryData, u64, openraft::impls::BasicNode>>;

/// The application data of a Raft entry: a record batch, or a control entry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryData {
    /// Records, served to consumers (storage kind `KIND_BATCH`).
    Batch(RecordBatch),
    /// A postcard [`ControlEntry`] proposed by the partition leader: never served to
    /// consumers (storage kind `KIND_CONTROL`).
    Control(Bytes),
}

impl EntryData {
    pub fn batch(bytes: Bytes) -> EntryData {
        EntryData::Batch(RecordBatch(bytes))
    }

    pub fn control(entry: &ControlEntry) -> EntryData {
        EntryData::Control(Bytes::from(entry.encode()))
    }
}

impl fmt::Debug for EntryData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for EntryData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryData::Batch(b) => fmt::Display::fmt(b, f),
            EntryData::Control(c) => match ControlEntry::decode(c) {
                Ok(e) => write!(f, "control({:?} at {})", e.command, e.leader_time_ms),
                Err(_) => write!(f, "control(undecodable, bytes={})", c.len()),
            },
        }
    }
}

/// An encoded record batch (`keel_protocol::batch`), exactly as the producer built it
/// and with the base offset stamped once its log position is known. The same bytes are
/// the Raft entry, the segment bytes and the bytes served to consumers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBatch(pub Bytes);

impl RecordBatch {
    /// The batch header, if the bytes hold one. Batches are validated before they are
    /// proposed, so `None` here means a bug or corruption.
    pub fn header(&self) -> Option<BatchHeader> {
        BatchHeader::parse(&self.0).ok()
    }
}

impl fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for RecordBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.header() {
            Some(h) => write!(f, "batch(offset={}, records={}, bytes={})", h.base_offset, h.record_count, self.0.len()),
            None => write!(f, "batch(unparseable, bytes={})", self.0.len()),
        }
    }
}

/// What applying an entry answers to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyReply {
    /// A record batch: stored where, or why not.
    Batch(BatchOutcome),
    Control(ControlOutcome),
    /// A blank or membership entry; `next_offset` is the high watermark after it.
    Empty {
        next_offset: u64,
    },
}

impl ApplyReply {
    /// Where a batch's records were stored, if it was stored (for proposers that only
    /// append plain batches, such as the metadata log).
    pub fn stored_at(&self) -> Option<u64> {
        match self {
            ApplyReply::Batch(BatchOutcome::Stored { base_offset, .. }) => Some(*base_offset),
            _ => None,
        }
    }
}
