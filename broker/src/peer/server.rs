//! The peer listener: a `keel_net` service that checks the caller's identity (cluster
//! and target node) and serves Raft RPCs for the groups this node hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use keel_net::{Listener, Reply, ServeOptions, Service};
use keel_protocol::{api, ErrorCode};
use openraft::Raft;

use super::limits::{PEER_CONNECTIONS_MAX, PEER_SERVER_CONCURRENCY_MAX, PEER_SERVER_SEND_QUEUE_CAPACITY};
use super::wire::{GroupId, Identify, RaftReply, RaftRequest, RaftRpc};
use crate::replication::{PartitionStateMachine, TypeConfig};

/// A partition (or metadata) Raft group of this node.
pub type GroupRaft = Raft<TypeConfig, PartitionStateMachine>;

/// The Raft groups this node hosts, by group id. Shared with whoever creates groups.
pub type GroupRegistry = Arc<RwLock<HashMap<GroupId, GroupRaft>>>;

/// A running peer listener. Dropping it (or `shutdown`) closes the listener and every
/// connection it accepted.
pub struct PeerServer {
    listener: Listener,
}

struct PeerService {
    node_id: u64,
    cluster: String,
    groups: GroupRegistry,
}

impl Service for PeerService {
    fn call(self: Arc<Self>, api_key: u16, payload: Bytes) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            match api_key {
                api::peer::RAFT => match handle_raft(&self, &payload).await {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                other => Reply::error(ErrorCode::UnsupportedApi, format!("api {other} is not served on the peer listener")),
            }
        })
    }

    fn identify_api(&self) -> Option<u16> {
        Some(api::peer::IDENTIFY)
    }

    fn identify(&self, payload: &Bytes) -> Result<(), Reply> {
        let who: Identify = postcard::from_bytes(payload).map_err(|e| Reply::error(ErrorCode::MalformedFrame, format!("undecodable identify: {e}")))?;
        if who.to != self.node_id || who.cluster != self.cluster {
            let msg = format!("this is node {} of cluster {:?}, not node {} of {:?}", self.node_id, self.cluster, who.to, who.cluster);
            return Err(Reply::error(ErrorCode::InvalidRequest, msg));
        }
        Ok(())
    }
}

impl PeerServer {
    /// Binds `addr` and starts serving node `node_id` of `cluster`.
    pub async fn bind(addr: &str, node_id: u64, cluster: &str, groups: GroupRegistry) -> std::io::Result<PeerServer> {
        let service = Arc::new(PeerService { node_id, cluster: cluster.to_string(), groups });
        let options = ServeOptions {
            concurrency_max: PEER_SERVER_CONCURRENCY_MAX,
            send_queue_capacity: PEER_SERVER_SEND_QUEUE_CAPACITY,
            connections_max: PEER_CONNECTIONS_MAX,
        };
        Ok(PeerServer { listener: keel_net::listen(addr, service, options).await? })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Stops accepting and closes every connection (in tests: the node "dies").
    pub fn shutdown(self) {
        drop(self);
    }
}

async fn handle_raft(service: &PeerService, payload: &[u8]) -> Result<Bytes, String> {
    let request: RaftRequest = postcard::from_bytes(payload).map_err(|e| format!("undecodable Raft request: {e}"))?;
    let raft = service.groups.read().expect("group registry lock poisoned").get(&request.group).cloned();
    let reply = match raft {
        None => RaftReply::UnknownGroup(request.group),
        Some(raft) => match request.rpc {
            RaftRpc::Append(rpc) => raft.append_entries(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Append),
            RaftRpc::Vote(rpc) => raft.vote(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Vote),
            RaftRpc::PreVote(rpc) => raft.pre_vote(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Vote),
            RaftRpc::Snapshot { vote, meta, data } => raft
                .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: data })
                .await
                .map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Snapshot),
        },
    };
    postcard::to_allocvec(&reply).map(Bytes::from).map_err(|e| format!("encoding Raft reply: {e}"))
}
