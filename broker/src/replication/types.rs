//! The Raft type configuration and the application data carried by log entries.

use std::fmt;

use bytes::Bytes;
use keel_protocol::batch::BatchHeader;
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Keel's Raft types: terms and node ids are `u64`; a committed leader id is the
    /// term alone (`leader_id_std`), which is what the storage entry header records.
    pub TypeConfig:
        D = RecordBatch,
        R = AppendReply,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// A Raft log id of this configuration.
pub type RaftLogId = openraft::LogId<openraft::vote::leader_id_std::CommittedLeaderId<u64>>;
/// A Raft entry of this configuration.
pub type RaftEntry =
    openraft::Entry<openraft::vote::leader_id_std::CommittedLeaderId<u64>, openraft::EntryPayload<RecordBatch, u64, openraft::impls::BasicNode>>;

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

/// What applying an entry answers to the proposer: where its messages landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendReply {
    pub base_offset: u64,
    pub record_count: u32,
}
