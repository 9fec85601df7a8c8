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
    Snapshot { vote: Vote, meta: SnapshotMeta, data: PartitionSnapshot },
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftReply {
    Append(openraft::raft::AppendEntriesResponse<TypeConfig>),
    Vote(openraft::raft::VoteResponse<TypeConfig>),
    Snapshot(openraft::raft::SnapshotResponse<TypeConfig>),
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
