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
    /// The leader hands leadership to `to_node_id` (broadcast to every replica: the
    /// target campaigns at once, the others stop honouring the old leader's lease).
    TransferLeader(openraft::raft::TransferLeaderRequest<TypeConfig>),
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
    /// The answer to `AppendPipelined`: Raft's answer, or why the stream could not
    /// take the request.
    AppendPipelined(Result<openraft::raft::StreamAppendResult<TypeConfig>, String>),
    /// The answer to `TransferLeader`.
    TransferLeader(openraft::raft::TransferLeaderResponse<TypeConfig>),
}

type LogId = crate::replication::types::RaftLogId;
type AppendRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;

/// The header of a pipelined AppendEntries request (api `peer::APPEND`): request `seq`
/// (from 0) of append stream `stream` (`super::pipeline`). On the wire: `u32` LE header
/// length, the postcard header, then every batch and control entry's bytes in entry
/// order, each sent from the leader's buffer and taken as a slice of the received
/// frame by the follower: no copy of entry bytes on either side.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppendHead {
    pub group: GroupId,
    pub stream: u64,
    pub seq: u64,
    pub vote: Vote,
    pub prev_log_id: Option<LogId>,
    pub leader_commit: Option<LogId>,
    pub entries: Vec<EntryHead>,
}

/// One entry of an [`AppendHead`]: its id and what it holds (bytes: their length).
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryHead {
    pub log_id: LogId,
    pub kind: EntryKind,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum EntryKind {
    Blank,
    Membership(openraft::Membership<u64, openraft::impls::BasicNode>),
    Batch(u32),
    Control(u32),
}

/// The header and the entries' bytes of request `seq` of stream `stream` for `group`.
pub fn encode_append(group: GroupId, stream: u64, seq: u64, rpc: AppendRequest) -> Result<(bytes::Bytes, Vec<bytes::Bytes>), String> {
    use crate::replication::types::{EntryData, RecordBatch};
    use openraft::EntryPayload;
    let mut tail = Vec::with_capacity(rpc.entries.len());
    let mut entries = Vec::with_capacity(rpc.entries.len());
    for e in rpc.entries {
        let len = |b: &bytes::Bytes| u32::try_from(b.len()).map_err(|_| format!("entry {} is {} bytes, above 4 GiB", e.log_id.index, b.len()));
        let kind = match e.payload {
            EntryPayload::Blank => EntryKind::Blank,
            EntryPayload::Membership(m) => EntryKind::Membership(m),
            EntryPayload::Normal(EntryData::Batch(RecordBatch(b))) => {
                let kind = EntryKind::Batch(len(&b)?);
                tail.push(b);
                kind
            }
            EntryPayload::Normal(EntryData::Control(b)) => {
                let kind = EntryKind::Control(len(&b)?);
                tail.push(b);
                kind
            }
        };
        entries.push(EntryHead { log_id: e.log_id, kind });
    }
    let head = AppendHead { group, stream, seq, vote: rpc.vote, prev_log_id: rpc.prev_log_id, leader_commit: rpc.leader_commit, entries };
    let mut buf = vec![0u8; 4];
    let mut buf = postcard::to_extend(&head, std::mem::take(&mut buf)).map_err(|e| format!("encoding an append header: {e}"))?;
    let head_len = u32::try_from(buf.len() - 4).map_err(|_| "append header above 4 GiB".to_string())?;
    buf[..4].copy_from_slice(&head_len.to_le_bytes());
    Ok((bytes::Bytes::from(buf), tail))
}

/// Decodes a pipelined append from its frame payload; entry bytes are slices of it.
pub fn decode_append(payload: &bytes::Bytes) -> Result<(AppendHead, AppendRequest), String> {
    use crate::replication::types::{EntryData, RecordBatch};
    use openraft::EntryPayload;
    let head_len = payload.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or("append request shorter than its header length")?;
    let body = payload.get(4..4 + head_len).ok_or_else(|| format!("append header of {head_len} bytes is longer than the request ({})", payload.len()))?;
    let mut head: AppendHead = postcard::from_bytes(body).map_err(|e| format!("undecodable append header: {e}"))?;
    let mut at = 4 + head_len;
    let mut take = |len: u32| -> Result<bytes::Bytes, String> {
        let end = at
            .checked_add(len as usize)
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| format!("append entries end past the request ({} bytes)", payload.len()))?;
        let b = payload.slice(at..end);
        at = end;
        Ok(b)
    };
    let mut entries = Vec::with_capacity(head.entries.len());
    for e in std::mem::take(&mut head.entries) {
        let payload = match e.kind {
            EntryKind::Blank => EntryPayload::Blank,
            EntryKind::Membership(m) => EntryPayload::Membership(m),
            EntryKind::Batch(len) => EntryPayload::Normal(EntryData::Batch(RecordBatch(take(len)?))),
            EntryKind::Control(len) => EntryPayload::Normal(EntryData::Control(take(len)?)),
        };
        entries.push(openraft::Entry { log_id: e.log_id, payload });
    }
    if at != payload.len() {
        return Err(format!("append request has {} bytes after its last entry", payload.len() - at));
    }
    let rpc = AppendRequest { vote: head.vote, prev_log_id: head.prev_log_id, leader_commit: head.leader_commit, entries };
    Ok((head, rpc))
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
    /// The receiver holds the group's directory but has not opened it yet (it is
    /// starting): its state is not known, so nothing may be concluded from its answer.
    NotOpenYet,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::types::{EntryData, RecordBatch};
    use bytes::Bytes;
    use openraft::EntryPayload;

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId { leader_id: openraft::vote::leader_id_std::CommittedLeaderId::new(term), index }
    }

    fn request() -> AppendRequest {
        let membership = openraft::Membership::new_with_defaults(vec![std::collections::BTreeSet::from([1u64, 2, 3])], []);
        let entries = vec![
            openraft::Entry { log_id: log_id(2, 5), payload: EntryPayload::Blank },
            openraft::Entry { log_id: log_id(2, 6), payload: EntryPayload::Normal(EntryData::Batch(RecordBatch(Bytes::from(vec![7u8; 3000])))) },
            openraft::Entry { log_id: log_id(2, 7), payload: EntryPayload::Membership(membership) },
            openraft::Entry { log_id: log_id(2, 8), payload: EntryPayload::Normal(EntryData::Control(Bytes::from_static(b"ctl"))) },
            openraft::Entry { log_id: log_id(2, 9), payload: EntryPayload::Normal(EntryData::Batch(RecordBatch(Bytes::new()))) },
        ];
        AppendRequest { vote: Vote::new_committed(2, 1), prev_log_id: Some(log_id(1, 4)), leader_commit: Some(log_id(1, 3)), entries }
    }

    fn joined(head: &Bytes, tail: &[Bytes]) -> Bytes {
        Bytes::from(std::iter::once(head).chain(tail).flat_map(|b| b.iter().copied()).collect::<Vec<u8>>())
    }

    #[test]
    fn a_pipelined_append_decodes_to_the_request_it_encodes_with_entry_bytes_sliced_from_the_frame() {
        let original = request();
        let expected = format!("{original:?}");
        let (head, tail) = encode_append(9, 77, 3, original).unwrap();
        assert_eq!(tail.len(), 3, "batch and control bytes travel after the header, not in it");
        let frame = joined(&head, &tail);
        let (h, rpc) = decode_append(&frame).unwrap();
        assert_eq!((h.group, h.stream, h.seq), (9, 77, 3));
        assert_eq!(format!("{rpc:?}"), expected);
        let EntryPayload::Normal(EntryData::Batch(RecordBatch(b))) = &rpc.entries[1].payload else { panic!("entry 6 is a batch") };
        let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        assert!(range.contains(&(b.as_ptr() as usize)), "the batch is a slice of the received frame, not a copy");
    }

    #[test]
    fn a_truncated_or_padded_pipelined_append_is_an_error_not_a_panic() {
        let (head, tail) = encode_append(1, 1, 0, request()).unwrap();
        let frame = joined(&head, &tail);
        for cut in [0, 3, 4, head.len() - 1, head.len(), frame.len() - 1] {
            assert!(decode_append(&frame.slice(..cut)).is_err(), "cut at {cut} of {}", frame.len());
        }
        let mut padded = frame.to_vec();
        padded.push(0);
        assert!(decode_append(&Bytes::from(padded)).unwrap_err().contains("after its last entry"));
        let mut huge = frame.to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_append(&Bytes::from(huge)).is_err());
    }
}

/// One group a leader asks a follower to quiesce (api `peer::QUIESCE`): the follower
/// agrees only if the caller is its leader in `term` and its log ends, committed, at
/// `last` `(term, index)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceAsk {
    pub group: GroupId,
    pub term: u64,
    pub last: Option<(u64, u64)>,
}

/// A quiesce request; answered with one `bool` per ask, in order: parked or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceRequest {
    pub asks: Vec<QuiesceAsk>,
}

/// Wake these groups (api `peer::WAKE`); answered with `()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeRequest {
    pub groups: Vec<GroupId>,
}
