//! openraft's network traits over the peer transport: one factory per group, all
//! groups of a node sharing one `PeerPool` (one connection per peer).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use keel_protocol::api;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest, VoteResponse};
use openraft::BasicNode;

use keel_net::{CallError, Caller};

use super::pool::PeerPool;
use super::wire::{GroupId, RaftReply, RaftRequest, RaftRpc};
use crate::replication::state_machine::PartitionSnapshot;
use crate::replication::TypeConfig;
use keel_storage::Log;

type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;
type Snapshot = openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, BasicNode, PartitionSnapshot>;

/// Creates the network clients of one Raft group.
#[derive(Clone)]
pub struct GroupNetworkFactory {
    group: GroupId,
    pool: Arc<PeerPool>,
    /// The group's log: snapshots are sent with its retained entries.
    log: Arc<Log>,
}

impl GroupNetworkFactory {
    pub fn new(group: GroupId, pool: Arc<PeerPool>, log: Arc<Log>) -> GroupNetworkFactory {
        GroupNetworkFactory { group, pool, log }
    }
}

/// The network client of one group to one target node.
#[derive(Clone)]
pub struct GroupNetwork {
    pub(super) group: GroupId,
    pub(super) target: u64,
    caller: Arc<Caller>,
    faults: Arc<super::faults::PeerFaults>,
    log: Arc<Log>,
    /// Replication streams pipeline their requests (`super::pipeline`); heartbeats,
    /// single requests, do not.
    pipelined: bool,
}

impl GroupNetworkFactory {
    fn client(&self, target: u64, node: &BasicNode, pipelined: bool) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            target,
            caller: self.pool.caller(target, &node.addr),
            faults: self.pool.faults.clone(),
            log: self.log.clone(),
            pipelined,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupNetwork {
        self.client(target, node, true)
    }

    async fn new_heartbeat_client(&mut self, target: u64, node: &BasicNode) -> GroupNetwork {
        self.client(target, node, false)
    }
}

/// A failure the remote Raft reported (unknown group, shutting down, fatal error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct RemoteFailure(pub(super) String);

fn to_rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        // Not connected: openraft backs off before retrying.
        CallError::Unreachable { .. } | CallError::Disconnected { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        // Connected but slow or refusing: retry without extra backoff.
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl GroupNetwork {
    /// A copy of this client for one pipelined stream's requests.
    pub(super) fn clone_for_stream(&self) -> GroupNetwork {
        self.clone()
    }

    pub(super) async fn call(&self, rpc: RaftRpc, timeout: Duration) -> Result<RaftReply, RPCError<TypeConfig>> {
        let request = RaftRequest { group: self.group, rpc };
        let payload = postcard::to_allocvec(&request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send(api::peer::RAFT, Bytes::from(payload), Vec::new(), timeout).await
    }

    /// Request `seq` of the pipelined append stream `stream` (`super::pipeline`): the
    /// entries' bytes go from the log's buffers to the socket without a copy.
    pub(super) async fn call_append(
        &self,
        stream: u64,
        seq: u64,
        rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<RaftReply, RPCError<TypeConfig>> {
        let (head, tail) = super::wire::encode_append(self.group, stream, seq, rpc).map_err(|e| RPCError::Network(NetworkError::new(&RemoteFailure(e))))?;
        self.send(api::peer::APPEND, head, tail, timeout).await
    }

    async fn send(&self, api_key: u16, head: Bytes, tail: Vec<Bytes>, timeout: Duration) -> Result<RaftReply, RPCError<TypeConfig>> {
        if self.faults.is_blocked(self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(&RemoteFailure(format!("node {} is partitioned away (fault injection)", self.target)))));
        }
        let answer = self.caller.call_with_tail(api_key, head, tail, timeout).await.map_err(to_rpc_error)?;
        let reply: RaftReply = postcard::from_bytes(&answer).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match reply {
            RaftReply::UnknownGroup(g) => Err(RPCError::Network(NetworkError::new(&RemoteFailure(format!("node has no group {g}"))))),
            RaftReply::Failed(msg) => Err(RPCError::Network(NetworkError::new(&RemoteFailure(msg)))),
            ok => Ok(ok),
        }
    }
}

fn unexpected(reply: RaftReply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&RemoteFailure(format!("unexpected reply kind: {reply:?}"))))
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = PartitionSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await? {
            RaftReply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if self.pipelined {
            super::pipeline::send(self, input)
        } else {
            stream_append_sequential(self, input, option)
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::PreVote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(req), option.hard_ttl()).await? {
            RaftReply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Each step of the transfer has its own timeout (`SNAPSHOT_STEP_TIMEOUT`);
        // openraft's cancel ends it at any point (the staged entries are kept).
        let _ = option;
        let log = self.log.clone();
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = super::snapshot::send(self, &log, vote, snapshot) => reply,
        };
        match reply {
            Ok(r) => Ok(r),
            Err(RPCError::Unreachable(u)) => Err(StreamingError::Unreachable(u)),
            Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}
