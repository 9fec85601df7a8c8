//! The peer listener: a `keel_net` service that checks the caller's identity (cluster
//! and target node) and serves Raft RPCs for the groups this node hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use keel_net::{Listener, Reply, ServeOptions, Service};
use keel_protocol::{api, ErrorCode};
use keel_storage::{Log, LogId};
use openraft::Raft;

use super::limits::{PEER_CONNECTIONS_MAX, PEER_SERVER_CONCURRENCY_MAX, PEER_SERVER_SEND_QUEUE_CAPACITY};
use super::liveness::{Beat, Liveness};
use super::quiescence::{Quiet, Sleep, WakeReason};
use super::wire::{GroupId, GroupProbe, GroupProbeReply, GroupProbeState, Identify, QuiesceRequest, RaftReply, RaftRequest, RaftRpc, WakeRequest};
use crate::replication::{PartitionStateMachine, TypeConfig};

/// A partition (or metadata) Raft group of this node.
pub type GroupRaft = Raft<TypeConfig, PartitionStateMachine>;

/// A group as the peer listener sees it.
#[derive(Clone)]
pub struct HostedGroup {
    pub raft: GroupRaft,
    pub log: Arc<Log>,
    /// Set while this node refills a group whose local state it lost: it grants no
    /// vote (its empty log must not help elect a leader that lacks committed entries,
    /// and it cannot know whom it voted for before). Cleared once its log has caught up.
    pub recovering: Arc<AtomicBool>,
    /// Set while this node's log lacks entries it acknowledged (its ack ledger records
    /// more than the log holds): it votes only for candidates whose log reaches this id,
    /// as if the lost entries were still there. Cleared once peers have refilled it.
    pub vote_floor: Arc<Mutex<Option<LogId>>>,
    /// The staged log of a snapshot transfer in progress (`super::snapshot`).
    pub staging: Arc<tokio::sync::Mutex<Option<Arc<Log>>>>,
    /// Whether the group's Raft ticks here (`super::quiescence`).
    pub sleep: Arc<Sleep>,
}

impl HostedGroup {
    pub fn new(raft: GroupRaft, log: Arc<Log>, sleep: Arc<Sleep>) -> HostedGroup {
        HostedGroup { raft, log, recovering: Arc::default(), vote_floor: Arc::default(), staging: Arc::default(), sleep }
    }

    /// Why this node refuses `request`'s vote, if it does.
    fn refuses_vote(&self, request: &openraft::raft::VoteRequest<TypeConfig>) -> Option<String> {
        if self.recovering.load(Ordering::Acquire) {
            return Some("is refilling the group and grants no vote until it has caught up".into());
        }
        let floor = (*self.vote_floor.lock().expect("vote floor lock poisoned"))?;
        let candidate = request.last_log_id.as_ref().map(|l| LogId { term: l.leader_id.term, index: l.index });
        (candidate < Some(floor)).then(|| {
            format!(
                "lost acknowledged entries up to {}-{} from its log and votes only for a candidate holding them (the candidate's last is {})",
                floor.term,
                floor.index,
                candidate.map_or("none".into(), |c| format!("{}-{}", c.term, c.index))
            )
        })
    }
}

/// The Raft groups this node hosts, by group id. Shared with whoever creates groups.
pub type GroupRegistry = Arc<RwLock<HashMap<GroupId, HostedGroup>>>;

/// A running peer listener. Dropping it (or `shutdown`) closes the listener and every
/// connection it accepted.
pub struct PeerServer {
    listener: Listener,
}

struct PeerService {
    node_id: u64,
    cluster: String,
    groups: GroupRegistry,
    /// Pipelined append streams from leaders (`super::pipeline`).
    streams: super::pipeline::AppendStreams,
    /// Peers heard from (`super::liveness`).
    liveness: Arc<Liveness>,
    /// Whether this node has a directory for a group it has not opened (yet).
    on_disk: GroupOnDisk,
}

/// Whether a node holds a directory for a group (given by the node, which owns the
/// layout); used to answer probes for groups not opened yet.
pub type GroupOnDisk = Arc<dyn Fn(GroupId) -> bool + Send + Sync>;

impl Service for PeerService {
    fn call(self: Arc<Self>, caller: Option<u64>, _version: u16, api_key: u16, payload: Bytes) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            match api_key {
                api::peer::RAFT => match handle_raft(&self, &payload).await {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                api::peer::APPEND => match handle_append(&self, caller, &payload).await {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                api::peer::GROUP_PROBE => match handle_probe(&self, caller, &payload).await {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                api::peer::LIVENESS => match handle_beat(&self, caller, &payload) {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                api::peer::QUIESCE => match handle_quiesce(&self, caller, &payload) {
                    Ok(bytes) => Reply::ok(bytes),
                    Err(msg) => Reply::error(ErrorCode::MalformedFrame, msg),
                },
                api::peer::WAKE => match handle_wake(&self, &payload) {
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

    fn identify(&self, payload: &Bytes) -> Result<u64, Reply> {
        let who: Identify = postcard::from_bytes(payload).map_err(|e| Reply::error(ErrorCode::MalformedFrame, format!("undecodable identify: {e}")))?;
        if who.to != self.node_id || who.cluster != self.cluster {
            let msg = format!("this is node {} of cluster {:?}, not node {} of {:?}", self.node_id, self.cluster, who.to, who.cluster);
            return Err(Reply::error(ErrorCode::InvalidRequest, msg));
        }
        Ok(who.from)
    }
}

impl PeerServer {
    /// Binds `addr` and starts serving node `node_id` of `cluster`.
    pub async fn bind(addr: &str, node_id: u64, cluster: &str, groups: GroupRegistry, liveness: Arc<Liveness>) -> std::io::Result<PeerServer> {
        PeerServer::bind_with_disk(addr, node_id, cluster, groups, liveness, Arc::new(|_| false)).await
    }

    /// Like [`PeerServer::bind`], answering probes for groups not opened yet by
    /// `on_disk` (a node restarting holds groups it has not reopened yet).
    pub async fn bind_with_disk(
        addr: &str,
        node_id: u64,
        cluster: &str,
        groups: GroupRegistry,
        liveness: Arc<Liveness>,
        on_disk: GroupOnDisk,
    ) -> std::io::Result<PeerServer> {
        let service = Arc::new(PeerService { node_id, cluster: cluster.to_string(), groups, streams: Default::default(), liveness, on_disk });
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

/// A pipelined AppendEntries request (`super::pipeline`), its entries sliced from `payload`.
async fn handle_append(service: &PeerService, caller: Option<u64>, payload: &Bytes) -> Result<Bytes, String> {
    let (head, rpc) = super::wire::decode_append(payload)?;
    let hosted = service.groups.read().expect("group registry lock poisoned").get(&head.group).cloned();
    let reply = match (hosted, caller) {
        (None, _) => RaftReply::UnknownGroup(head.group),
        (Some(_), None) => RaftReply::Failed("a pipelined append needs an identified caller".into()),
        (Some(hosted), Some(from)) => {
            let still_hosted = |g| service.groups.read().expect("group registry lock poisoned").contains_key(&g);
            let wakes = append_wakes(&hosted, &rpc);
            let answer = service.streams.append(&hosted.raft, (head.group, from), (head.stream, head.seq), rpc, still_hosted).await;
            // Heard from the leader of its term (entries accepted, or a log to repair).
            let heard = matches!(answer, Ok(Ok(_) | Err(openraft::raft::StreamAppendError::Conflict(_))));
            if heard {
                hosted.sleep.contact();
            }
            if wakes && heard {
                hosted.sleep.wake_by_entries();
            } else if wakes && answer.is_ok() {
                hosted.sleep.wake(&hosted.raft, WakeReason::Entries);
            }
            RaftReply::AppendPipelined(answer)
        }
    };
    postcard::to_allocvec(&reply).map(Bytes::from).map_err(|e| format!("encoding Raft reply: {e}"))
}

async fn handle_raft(service: &PeerService, payload: &[u8]) -> Result<Bytes, String> {
    let request: RaftRequest = postcard::from_bytes(payload).map_err(|e| format!("undecodable Raft request: {e}"))?;
    let hosted = service.groups.read().expect("group registry lock poisoned").get(&request.group).cloned();
    let refusal = |hosted: &HostedGroup| match &request.rpc {
        RaftRpc::Vote(v) => hosted.refuses_vote(v),
        RaftRpc::PreVote(v) => hosted.refuses_vote(v).or_else(|| vetoes_pre_vote(service, hosted, v)),
        _ => None,
    };
    let reply = match hosted {
        None => RaftReply::UnknownGroup(request.group),
        Some(hosted) => match refusal(&hosted) {
            Some(why) => RaftReply::Failed(format!("node {} {why} (group {})", service.node_id, request.group)),
            None => match request.rpc {
                RaftRpc::SnapshotOffer { meta, .. } => super::snapshot::offer(&hosted, &meta).await.unwrap_or_else(RaftReply::Failed),
                RaftRpc::SnapshotChunk { chunk, .. } => super::snapshot::chunk(&hosted, chunk).await.unwrap_or_else(RaftReply::Failed),
                RaftRpc::SnapshotInstall { vote, meta, state } => super::snapshot::install(&hosted, vote, meta, state).await.unwrap_or_else(RaftReply::Failed),
                RaftRpc::Append(rpc) => {
                    let wakes = append_wakes(&hosted, &rpc);
                    let reply = serve_raft(hosted.raft.clone(), RaftRpc::Append(rpc)).await;
                    // Heard from the leader of its term (not a stale leader's request).
                    let heard = matches!(&reply, RaftReply::Append(r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_)));
                    if heard {
                        hosted.sleep.contact();
                    }
                    if wakes && heard {
                        hosted.sleep.wake_by_entries();
                    } else if wakes && matches!(reply, RaftReply::Append(_)) {
                        hosted.sleep.wake(&hosted.raft, WakeReason::Entries);
                    }
                    reply
                }
                RaftRpc::Vote(rpc) => {
                    // An election is on: this replica takes part with its timers running.
                    hosted.sleep.wake(&hosted.raft, WakeReason::Vote);
                    serve_raft(hosted.raft, RaftRpc::Vote(rpc)).await
                }
                RaftRpc::TransferLeader(rpc) => {
                    hosted.sleep.wake(&hosted.raft, WakeReason::Transfer);
                    serve_raft(hosted.raft, RaftRpc::TransferLeader(rpc)).await
                }
                rpc => serve_raft(hosted.raft, rpc).await,
            },
        },
    };
    postcard::to_allocvec(&reply).map(Bytes::from).map_err(|e| format!("encoding Raft reply: {e}"))
}

async fn serve_raft(raft: GroupRaft, rpc: RaftRpc) -> RaftReply {
    match rpc {
        RaftRpc::Append(rpc) => raft.append_entries(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Append),
        RaftRpc::Vote(rpc) => raft.vote(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Vote),
        RaftRpc::PreVote(rpc) => raft.pre_vote(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Vote),
        RaftRpc::TransferLeader(rpc) => raft.handle_transfer_leader(rpc).await.map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::TransferLeader),
        RaftRpc::Snapshot { vote, meta, data } => raft
            .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: data })
            .await
            .map_or_else(|e| RaftReply::Failed(e.to_string()), RaftReply::Snapshot),
        RaftRpc::SnapshotOffer { .. } | RaftRpc::SnapshotChunk { .. } | RaftRpc::SnapshotInstall { .. } => {
            RaftReply::Failed("snapshot transfer steps are served with the group's log".into())
        }
    }
}

async fn handle_probe(service: &PeerService, caller: Option<u64>, payload: &[u8]) -> Result<Bytes, String> {
    use openraft::async_runtime::watch::WatchReceiver;
    let probe: GroupProbe = postcard::from_bytes(payload).map_err(|e| format!("undecodable group probe: {e}"))?;
    let hosted = service.groups.read().expect("group registry lock poisoned").get(&probe.group).cloned();
    let reply = match hosted {
        None if (service.on_disk)(probe.group) => GroupProbeReply::NotOpenYet,
        None => GroupProbeReply::Unknown,
        Some(HostedGroup { raft, log, .. }) => {
            let m = raft.metrics().borrow_watched().clone();
            let leader = m.state == openraft::ServerState::Leader && m.vote.is_committed();
            if leader && probe.state_lost {
                if let Some(from) = caller {
                    // One reversion of `from`'s log is expected now: without this the
                    // leader keeps its old match index for it and never resends.
                    match raft.trigger().allow_next_revert(&from, true).await {
                        Ok(Ok(())) => {
                            tracing::info!(group = probe.group, node = from, "a replica lost its state; replication to it restarts from the beginning")
                        }
                        Ok(Err(e)) => tracing::warn!(group = probe.group, node = from, error = %e, "could not allow the log reversion of a replica"),
                        Err(e) => return Err(format!("group {} stopped: {e}", probe.group)),
                    }
                }
            }
            GroupProbeReply::State(GroupProbeState { vote: m.vote, last_log_index: m.last_log_index, leader, next_offset: log.next_offset() })
        }
    };
    postcard::to_allocvec(&reply).map(Bytes::from).map_err(|e| format!("encoding the probe reply: {e}"))
}

/// Whether an AppendEntries wakes a quiesced replica: it carries entries (the leader
/// writes again), or comes from another term than the one the group quiesced in.
fn append_wakes(hosted: &HostedGroup, rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>) -> bool {
    hosted.sleep.quiet().is_some_and(|q| !rpc.entries.is_empty() || rpc.vote.leader_id.term != q.term)
}

/// Why this node turns down a pre-vote for a quiesced group, if it does: it leads the
/// group (it wakes, so the candidate hears from it), or it follows a leader whose node
/// it still hears from and the candidate is not that leader (a node that missed the
/// leader, a restarted one or one cut off from it, must not depose a working leader;
/// the leader's own node campaigning is its group restarting). A pre-vote changes no
/// state, so refusing one never loses anything.
fn vetoes_pre_vote(service: &PeerService, hosted: &HostedGroup, request: &openraft::raft::VoteRequest<TypeConfig>) -> Option<String> {
    let q: Quiet = hosted.sleep.quiet()?;
    let candidate = request.vote.leader_id.voted_for;
    if q.leader == service.node_id {
        hosted.sleep.wake(&hosted.raft, WakeReason::PreVote);
        crate::metrics::pre_vote_vetoed();
        return Some(format!("leads the group in term {} (it was quiesced and now heartbeats again)", q.term));
    }
    if candidate != q.leader && service.liveness.alive(q.leader) {
        crate::metrics::pre_vote_vetoed();
        return Some(format!("follows leader {} of term {}, whose node it still hears from", q.leader, q.term));
    }
    None
}

fn handle_beat(service: &PeerService, caller: Option<u64>, payload: &[u8]) -> Result<Bytes, String> {
    let beat: Beat = postcard::from_bytes(payload).map_err(|e| format!("undecodable liveness beat: {e}"))?;
    let from = caller.ok_or("a liveness beat needs an identified caller")?;
    service.liveness.heard(from, beat.epoch);
    postcard::to_allocvec(&Beat { epoch: service.liveness.epoch() }).map(Bytes::from).map_err(|e| format!("encoding a beat: {e}"))
}

/// A leader asks this node to quiesce groups: each one parks if the caller leads it
/// here in the asked term and this replica's log ends, committed, where the leader's
/// does.
fn handle_quiesce(service: &PeerService, caller: Option<u64>, payload: &[u8]) -> Result<Bytes, String> {
    use openraft::async_runtime::watch::WatchReceiver;
    let request: QuiesceRequest = postcard::from_bytes(payload).map_err(|e| format!("undecodable quiesce request: {e}"))?;
    let from = caller.ok_or("a quiesce request needs an identified caller")?;
    let answers: Vec<bool> = request
        .asks
        .iter()
        .map(|ask| {
            let Some(hosted) = service.groups.read().expect("group registry lock poisoned").get(&ask.group).cloned() else { return false };
            if hosted.recovering.load(Ordering::Acquire) || hosted.vote_floor.lock().expect("vote floor lock poisoned").is_some() {
                return false;
            }
            let agrees = {
                let m = hosted.raft.metrics();
                let m = m.borrow_watched();
                let pair = |l: &crate::replication::types::RaftLogId| (l.leader_id.term, l.index);
                m.running_state.is_ok()
                    && m.state == openraft::ServerState::Follower
                    && m.current_leader == Some(from)
                    && m.current_term == ask.term
                    && m.vote.is_committed()
                    && m.local_committed.as_ref().map(pair) == ask.last
                    && m.last_log_index == ask.last.map(|(_, i)| i)
            };
            if agrees {
                hosted.sleep.park_follower(&hosted.raft, Quiet { term: ask.term, leader: from, last: ask.last });
                // Every replica holds the group's entries and nothing is being written:
                // reads can come from the files, and the memory goes to busy groups.
                hosted.log.release_tail_cache();
            }
            agrees
        })
        .collect();
    postcard::to_allocvec(&answers).map(Bytes::from).map_err(|e| format!("encoding quiesce answers: {e}"))
}

fn handle_wake(service: &PeerService, payload: &[u8]) -> Result<Bytes, String> {
    let request: WakeRequest = postcard::from_bytes(payload).map_err(|e| format!("undecodable wake request: {e}"))?;
    for group in request.groups {
        if let Some(hosted) = service.groups.read().expect("group registry lock poisoned").get(&group).cloned() {
            hosted.sleep.wake(&hosted.raft, WakeReason::Asked);
        }
    }
    postcard::to_allocvec(&()).map(Bytes::from).map_err(|e| format!("encoding a wake answer: {e}"))
}
