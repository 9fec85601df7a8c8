//! Messages of the peer protocol, postcard-encoded inside frame payloads.

use serde::{Deserialize, Serialize};

use crate::replication::state_machine::PartitionSnapshot;
use crate::replication::TypeConfig;

/// The id of a Raft group (the metadata group or one partition's).
pub type GroupId = u64;

/// Sent first on every peer connection (api `peer::IDENTIFY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identify {
    pub cluster: String,
    pub from: u64,
    pub to: u64,
}

pub type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;
type SnapshotMeta = openraft::SnapshotMeta<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, openraft::impls::BasicNode>;

/// One Raft RPC for one group (api `peer::RAFT`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct RaftRequest {
    pub group: GroupId,
    pub rpc: RaftRpc,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftRpc {
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    Vote(openraft::raft::VoteRequest<TypeConfig>),
    PreVote(openraft::raft::VoteRequest<TypeConfig>),
    /// A whole snapshot in one message (state only; kept for peers of earlier builds).
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: PartitionSnapshot,
    },
    /// A chunked snapshot transfer begins (`peer/snapshot.rs`): what does the receiver
    /// hold already?
    SnapshotOffer {
        vote: Vote,
        meta: SnapshotMeta,
    },
    /// Entries for the receiver's staged log.
    SnapshotChunk {
        vote: Vote,
        chunk: SnapshotChunk,
    },
    /// The transfer is complete: install the snapshot (with the staged log, unless the
    /// receiver's own log holds the snapshot's last entry).
    SnapshotInstall {
        vote: Vote,
        meta: SnapshotMeta,
        state: Vec<u8>,
    },
}

/// A log entry as a snapshot transfer carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub term: u64,
    pub index: u64,
    pub kind: u8,
    pub base_offset: u64,
    pub record_count: u32,
    pub max_timestamp_ms: i64,
    pub payload: bytes::Bytes,
}

/// Where a new staged log begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StagingStart {
    /// At the first entry sent (the sender's log was never purged).
    Fresh,
    /// After entry `(term, index)`, at message offset `start_offset`.
    After { term: u64, index: u64, start_offset: u64 },
}

/// Entries for the staged log, checksummed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// Discard any staged log and begin a new one here.
    pub start: Option<StagingStart>,
    pub entries: Vec<WireEntry>,
    /// CRC32C over every entry's fields and payload, in order.
    pub crc: u32,
}

/// What the receiver of a snapshot offer holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHave {
    /// Its own log holds the snapshot's last entry: no entries need to be sent.
    pub holds_last: bool,
    /// Its staged log from an earlier, interrupted transfer: `(first index, last
    /// (term, index))`, if it holds any entry.
    pub staged: Option<(u64, (u64, u64))>,
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftReply {
    Append(openraft::raft::AppendEntriesResponse<TypeConfig>),
    Vote(openraft::raft::VoteResponse<TypeConfig>),
    Snapshot(openraft::raft::SnapshotResponse<TypeConfig>),
    /// The answer to `SnapshotOffer`.
    SnapshotHave(SnapshotHave),
    /// The answer to `SnapshotChunk`: the staged log's last entry `(term, index)`.
    SnapshotStaged(Option<(u64, u64)>),
    /// The receiver has no such group (not created yet, or deleted).
    UnknownGroup(GroupId),
    /// The receiver's Raft failed the RPC (shutting down, fatal storage error).
    Failed(String),
}

/// Asks what the receiver knows of one group (api `peer::GROUP_PROBE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupProbe {
    pub group: GroupId,
    /// The caller has no state for this group (an empty log and no vote) although the
    /// group may have existed on it before: a leader answering it allows its log to
    /// revert once, so replication restarts from the beginning.
    pub state_lost: bool,
}

/// The answer to a [`GroupProbe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum GroupProbeReply {
    /// The receiver does not host the group (not created there yet, or deleted).
    Unknown,
    State(GroupProbeState),
}

/// One node's view of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct GroupProbeState {
    pub vote: Vote,
    /// Index of the receiver's last log entry.
    pub last_log_index: Option<u64>,
    /// The receiver leads the group (its committed vote is its own).
    pub leader: bool,
    /// Offset one past the last message in the receiver's log.
    pub next_offset: u64,
}
