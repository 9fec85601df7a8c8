//! The peer listener: accepts connections from other brokers, checks the handshake and
//! the caller's identity, and serves Raft RPCs for the groups this node hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use keel_protocol::api;
use keel_protocol::codec::FrameCodec;
use keel_protocol::frame::negotiate_version;
use keel_protocol::{ErrorCode, Frame};
use openraft::Raft;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::limits::{PEER_SERVER_CONCURRENCY_MAX, PEER_SERVER_SEND_QUEUE_CAPACITY};
use super::wire::{GroupId, Identify, RaftReply, RaftRequest, RaftRpc};
use crate::replication::{PartitionStateMachine, TypeConfig};

/// A partition (or metadata) Raft group of this node.
pub type GroupRaft = Raft<TypeConfig, PartitionStateMachine>;

/// The Raft groups this node hosts, by group id. Shared with whoever creates groups.
pub type GroupRegistry = Arc<RwLock<HashMap<GroupId, GroupRaft>>>;

/// A running peer listener. Dropping it (or `shutdown`) closes the listener and every
/// connection it accepted.
pub struct PeerServer {
    local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

struct Ctx {
    node_id: u64,
    cluster: String,
    groups: GroupRegistry,
}

impl PeerServer {
    /// Binds `addr` and starts serving node `node_id` of `cluster`.
    pub async fn bind(addr: &str, node_id: u64, cluster: &str, groups: GroupRegistry) -> std::io::Result<PeerServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let ctx = Arc::new(Ctx { node_id, cluster: cluster.to_string(), groups });
        let accept_task = tokio::spawn(async move {
            // Dropping this set (when the accept task is aborted) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            let ctx = ctx.clone();
                            connections.spawn(async move {
                                if let Err(reason) = serve(stream, ctx).await {
                                    tracing::debug!(%peer, %reason, "peer connection ended");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "peer accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(PeerServer { local_addr, accept_task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every connection (in tests: the node "dies").
    pub fn shutdown(self) {
        drop(self);
    }
}

fn refuse(correlation_id: u64, error: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::Response { correlation_id, error, message: message.into(), payload: Bytes::new() }
}

async fn serve(stream: TcpStream, ctx: Arc<Ctx>) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec);
    let mut writer = FramedWrite::new(w, FrameCodec);

    // Handshake: version, then identity.
    match reader.next().await {
        Some(Ok(Frame::Hello { min_version, max_version })) => match negotiate_version(min_version, max_version) {
            Ok(version) => writer.send(Frame::HelloAck { version }).await.map_err(|e| e.to_string())?,
            Err(code) => {
                let _ = writer
                    .send(refuse(
                        0,
                        code,
                        format!(
                            "this node speaks protocol versions {}..={}",
                            keel_protocol::limits::PROTOCOL_VERSION_MIN,
                            keel_protocol::limits::PROTOCOL_VERSION_MAX
                        ),
                    ))
                    .await;
                return Err("no common protocol version".into());
            }
        },
        other => {
            let _ = writer.send(refuse(0, ErrorCode::MalformedFrame, "the first frame must be Hello")).await;
            return Err(format!("bad first frame: {other:?}"));
        }
    }
    match reader.next().await {
        Some(Ok(Frame::Request { correlation_id, api_key: api::peer::IDENTIFY, payload })) => {
            let who: Identify = postcard::from_bytes(&payload).map_err(|e| e.to_string())?;
            if who.to != ctx.node_id || who.cluster != ctx.cluster {
                let msg = format!("this is node {} of cluster {:?}, not node {} of {:?}", ctx.node_id, ctx.cluster, who.to, who.cluster);
                let _ = writer.send(refuse(correlation_id, ErrorCode::InvalidRequest, msg.clone())).await;
                return Err(msg);
            }
            writer.send(refuse(correlation_id, ErrorCode::None, "")).await.map_err(|e| e.to_string())?;
        }
        other => {
            let _ = writer.send(refuse(0, ErrorCode::InvalidRequest, "a peer must identify itself first")).await;
            return Err(format!("no identify: {other:?}"));
        }
    }

    // Requests: each handled in its own task (bounded), answers through one writer.
    let (tx, mut rx) = mpsc::channel::<Frame>(PEER_SERVER_SEND_QUEUE_CAPACITY);
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            writer.feed(frame).await?;
            while let Ok(frame) = rx.try_recv() {
                writer.feed(frame).await?;
            }
            writer.flush().await?;
        }
        Ok::<(), keel_protocol::codec::CodecError>(())
    });
    let limit = Arc::new(Semaphore::new(PEER_SERVER_CONCURRENCY_MAX));
    let mut handlers = JoinSet::new();
    let result = loop {
        let frame = match reader.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let _ = tx.send(refuse(0, ErrorCode::MalformedFrame, e.to_string())).await;
                break Err(e.to_string());
            }
            None => break Ok(()),
        };
        let Frame::Request { correlation_id, api_key, payload } = frame else {
            break Err("peers send only requests after the handshake".into());
        };
        let permit = limit.clone().acquire_owned().await.expect("the limit semaphore is never closed");
        let (ctx, tx) = (ctx.clone(), tx.clone());
        handlers.spawn(async move {
            let answer = match api_key {
                api::peer::RAFT => match handle_raft(&ctx, &payload).await {
                    Ok(bytes) => Frame::Response { correlation_id, error: ErrorCode::None, message: String::new(), payload: bytes },
                    Err(msg) => refuse(correlation_id, ErrorCode::MalformedFrame, msg),
                },
                other => refuse(correlation_id, ErrorCode::UnsupportedApi, format!("api {other} is not served on the peer listener")),
            };
            let _ = tx.send(answer).await;
            drop(permit);
        });
        // Reap finished handlers so the set does not grow.
        while handlers.try_join_next().is_some() {}
    };
    drop(tx);
    handlers.shutdown().await;
    let _ = writer_task.await;
    result
}

async fn handle_raft(ctx: &Ctx, payload: &[u8]) -> Result<Bytes, String> {
    let request: RaftRequest = postcard::from_bytes(payload).map_err(|e| format!("undecodable Raft request: {e}"))?;
    let raft = ctx.groups.read().expect("group registry lock poisoned").get(&request.group).cloned();
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
