//! The client listener's service: produce, fetch, metadata, topic admin, offsets.
//!
//! Every error answer carries a wire code and a message saying what failed and what to
//! do; `NotLeader` also carries the leader's client address when it is known.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use keel_net::{Reply, Service};
use keel_protocol::api::client as api;
use keel_protocol::message::{self, *};
use keel_protocol::{BatchView, ErrorCode};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::watch;

use super::group::GroupHandle;
use super::limits::{FETCH_BYTES_MAX, FETCH_WAIT_MAX, METADATA_APPLY_TIMEOUT, PRODUCE_TIMEOUT_MAX, TOPIC_PARTITIONS_MAX};
use super::reconcile::{HostedPartition, HostedPartitions};
use crate::config::ClusterConfig;
use crate::metadata::placement::place;
use crate::metadata::state::valid_topic_name;
use crate::metadata::{MetadataCommand, MetadataState};
use crate::replication::log_store::KIND_BATCH;
use crate::replication::RecordBatch;

pub struct ClientService {
    pub node_id: u64,
    pub cluster: ClusterConfig,
    pub metadata_group: GroupHandle,
    pub metadata: watch::Receiver<Arc<MetadataState>>,
    pub hosted: HostedPartitions,
}

type Outcome = Result<Bytes, Reply>;

fn bad_request(e: impl std::fmt::Display) -> Reply {
    Reply::error(ErrorCode::InvalidRequest, format!("the request body does not decode: {e}"))
}

impl Service for ClientService {
    fn call(self: Arc<Self>, _caller: Option<u64>, api_key: u16, payload: Bytes) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            let outcome = match api_key {
                api::PRODUCE => self.produce(payload).await,
                api::FETCH => self.fetch(payload).await,
                api::METADATA => self.metadata(&payload),
                api::CREATE_TOPIC => self.create_topic(&payload).await,
                api::DELETE_TOPIC => self.delete_topic(&payload).await,
                api::LIST_OFFSETS => self.list_offsets(&payload).await,
                api::CLUSTER_STATUS => Ok(self.cluster_status()),
                other => Err(Reply::error(ErrorCode::UnsupportedApi, format!("api {other} is not served on the client listener; upgrade the broker"))),
            };
            match outcome {
                Ok(body) => Reply::ok(body),
                Err(reply) => reply,
            }
        })
    }
}

impl ClientService {
    fn client_addr(&self, node: u64) -> Option<String> {
        self.cluster.members.iter().find(|m| m.id == node).map(|m| m.client_addr.clone())
    }

    fn not_leader(&self, leader: Option<u64>, what: &str) -> Reply {
        let leader_addr = leader.and_then(|l| self.client_addr(l));
        let message = match &leader_addr {
            Some(addr) => format!("this node does not lead {what}; node {} at {addr} does, send it there", leader.unwrap_or_default()),
            None => format!("this node does not lead {what} and no leader is known yet; retry shortly"),
        };
        let code = if leader.is_some() { ErrorCode::NotLeader } else { ErrorCode::LeaderNotAvailable };
        Reply::error_with(code, message, message::encode(&NotLeader { leader_id: leader, leader_addr }))
    }

    /// The hosted partition and its topic's batch size limit, or the right error: unknown
    /// topic or partition, or `NotLeader` pointing at the preferred leader when this node
    /// holds no replica.
    fn partition(&self, topic: &str, partition: u32) -> Result<(HostedPartition, u32), Reply> {
        let state = self.metadata.borrow().clone();
        let Some(t) = state.topics.get(topic) else {
            return Err(Reply::error(ErrorCode::UnknownTopic, format!("topic {topic:?} does not exist; create it with `keel topic create {topic}`")));
        };
        let Some(p) = t.partitions.get(partition as usize) else {
            return Err(Reply::error(ErrorCode::UnknownPartition, format!("topic {topic:?} has partitions 0..{}, not {partition}", t.partitions.len())));
        };
        let hosted = self.hosted.read().expect("hosted lock poisoned").get(&p.group).cloned();
        hosted.map(|h| (h, t.max_message_bytes)).ok_or_else(|| self.not_leader(p.replicas.first().copied(), &format!("{topic}/{partition}")))
    }

    async fn produce(&self, payload: Bytes) -> Outcome {
        let (req, batch): (ProduceRequest, Bytes) = message::split_with_batches(&payload).map_err(bad_request)?;
        let (part, max) = self.partition(&req.topic, req.partition)?;
        if batch.len() > max as usize {
            return Err(Reply::error(
                ErrorCode::MessageTooLarge,
                format!("batch of {} bytes exceeds topic {:?}'s limit of {max}; send smaller batches", batch.len(), req.topic),
            ));
        }
        let view = BatchView::parse(batch).map_err(|e| {
            let code = if matches!(e, keel_protocol::DecodeError::BadCrc { .. }) { ErrorCode::CorruptBatch } else { ErrorCode::InvalidBatch };
            Reply::error(code, format!("the record batch was refused: {e}"))
        })?;
        let record_count = view.header().record_count;
        let timeout = Duration::from_millis(u64::from(req.timeout_ms)).min(PRODUCE_TIMEOUT_MAX);
        let what = format!("{}/{}", req.topic, req.partition);
        match tokio::time::timeout(timeout, part.group.raft.client_write(RecordBatch(view.into_bytes()))).await {
            Ok(Ok(resp)) => Ok(message::encode(&ProduceResponse { base_offset: resp.data.base_offset, record_count })),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(self.not_leader(f.leader_id, &what)),
            Ok(Err(e)) => Err(Reply::error(ErrorCode::StorageFailed, format!("the write to {what} failed: {e}; check this node's log"))),
            Err(_) => Err(Reply::error(ErrorCode::RequestTimedOut, format!("{what} did not commit within {timeout:?}; the outcome is unknown, retry"))),
        }
    }

    async fn fetch(&self, payload: Bytes) -> Outcome {
        let req: FetchRequest = message::decode(&payload).map_err(bad_request)?;
        let (part, _) = self.partition(&req.topic, req.partition)?;
        let what = format!("{}/{}", req.topic, req.partition);
        if part.group.leader() != Some(self.node_id) {
            return Err(self.not_leader(part.group.leader(), &what));
        }
        // A leader cut off from its quorum keeps calling itself leader until it hears
        // of a newer term, and would serve a stale end of the log: serve only while a
        // quorum has acknowledged this leadership within the lease.
        if part.group.working_leader() != Some(self.node_id) {
            let message = format!("this node's leadership of {what} is not confirmed by a quorum (it may have been replaced); retry shortly");
            return Err(Reply::error_with(ErrorCode::LeaderNotAvailable, message, message::encode(&NotLeader { leader_id: None, leader_addr: None })));
        }
        let mut hw = part.group.high_watermark.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(req.max_wait_ms)).min(FETCH_WAIT_MAX);
        let committed = loop {
            let committed = *hw.borrow_and_update();
            if req.offset < committed {
                break committed;
            }
            if req.offset > committed {
                return Err(Reply::error(
                    ErrorCode::OffsetOutOfRange,
                    format!("offset {} is past the end of {what} ({committed}); seek to the latest offset", req.offset),
                ));
            }
            tokio::select! {
                changed = hw.changed() => if changed.is_err() { return Err(self.not_leader(None, &what)) },
                _ = tokio::time::sleep_until(deadline) => break committed,
            }
        };
        let start = part.group.log.state().start_offset;
        if req.offset < start {
            return Err(Reply::error(
                ErrorCode::OffsetOutOfRange,
                format!("offset {} of {what} was deleted by retention; the earliest is {start}", req.offset),
            ));
        }
        let log = part.group.log.clone();
        let (offset, max_bytes) = (req.offset, u64::from(req.max_bytes.min(FETCH_BYTES_MAX)));
        let batches = tokio::task::spawn_blocking(move || -> Result<Vec<Bytes>, keel_storage::StorageError> {
            let Some(index) = log.index_for_offset(offset)? else { return Ok(Vec::new()) };
            let entries = log.read(index..u64::MAX, max_bytes)?;
            Ok(entries.into_iter().filter(|e| e.meta.kind == KIND_BATCH && e.meta.end_offset() <= committed).map(|e| e.payload).collect())
        })
        .await
        .map_err(|e| Reply::error(ErrorCode::Unknown, format!("fetch task failed: {e}")))?
        .map_err(|e| Reply::error(ErrorCode::StorageFailed, format!("reading {what} failed: {e}")))?;
        Ok(message::encode_with_batches(&FetchResponse { high_watermark: committed, log_start_offset: start }, &batches))
    }

    fn metadata(&self, payload: &[u8]) -> Outcome {
        let req: MetadataRequest = message::decode(payload).map_err(bad_request)?;
        let state = self.metadata.borrow().clone();
        let hosted = self.hosted.read().expect("hosted lock poisoned").clone();
        let topics = state
            .topics
            .values()
            .filter(|t| req.topics.as_ref().is_none_or(|names| names.contains(&t.name)))
            .map(|t| TopicInfo {
                name: t.name.clone(),
                partitions: t
                    .partitions
                    .iter()
                    .map(|p| PartitionInfo {
                        partition: p.partition,
                        replicas: p.replicas.clone(),
                        leader: hosted.get(&p.group).and_then(|h| h.group.leader()),
                    })
                    .collect(),
                retention_ms: (t.retention_ms > 0).then_some(t.retention_ms),
                max_message_bytes: t.max_message_bytes,
            })
            .collect();
        let brokers = self.cluster.members.iter().map(|m| BrokerInfo { id: m.id, addr: m.client_addr.clone() }).collect();
        Ok(message::encode(&MetadataResponse { brokers, topics }))
    }

    /// Proposes a metadata command on the metadata leader and waits until this node's
    /// fold has applied it; returns the command's offset.
    async fn propose(&self, command: MetadataCommand) -> Result<u64, Reply> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let offset = match self.metadata_group.raft.client_write(RecordBatch(command.to_batch(now))).await {
            Ok(resp) => resp.data.base_offset,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => return Err(self.not_leader(f.leader_id, "the cluster metadata")),
            Err(e) => return Err(Reply::error(ErrorCode::StorageFailed, format!("the metadata write failed: {e}"))),
        };
        let mut view = self.metadata.clone();
        let applied = tokio::time::timeout(METADATA_APPLY_TIMEOUT, view.wait_for(|s| s.applied_offset > offset)).await;
        match applied {
            Ok(Ok(_)) => Ok(offset),
            _ => Err(Reply::error(
                ErrorCode::RequestTimedOut,
                format!("the metadata change committed but was not applied here within {METADATA_APPLY_TIMEOUT:?}; check `keel topic list`"),
            )),
        }
    }

    async fn create_topic(&self, payload: &[u8]) -> Outcome {
        let req: CreateTopicRequest = message::decode(payload).map_err(bad_request)?;
        if !valid_topic_name(&req.name) {
            return Err(Reply::error(ErrorCode::InvalidRequest, format!("topic name {:?} must be 1..=249 characters of [A-Za-z0-9._-]", req.name)));
        }
        if req.partitions == 0 || req.partitions > TOPIC_PARTITIONS_MAX {
            return Err(Reply::error(ErrorCode::InvalidRequest, format!("partitions must be in 1..={TOPIC_PARTITIONS_MAX}, not {}", req.partitions)));
        }
        let members: Vec<u64> = self.cluster.members.iter().map(|m| m.id).collect();
        if req.replicas == 0 || usize::from(req.replicas) > members.len() {
            return Err(Reply::error(ErrorCode::InvalidRequest, format!("replicas must be in 1..={} (the cluster size), not {}", members.len(), req.replicas)));
        }
        let max_message_bytes = req.max_message_bytes.unwrap_or(self.cluster.topic_defaults.max_message_bytes);
        if max_message_bytes == 0 || max_message_bytes as usize > keel_protocol::limits::BATCH_SIZE_MAX {
            return Err(Reply::error(ErrorCode::InvalidRequest, format!("max message bytes must be in 1..={}", keel_protocol::limits::BATCH_SIZE_MAX)));
        }
        let existing = {
            let state = self.metadata.borrow();
            if state.topics.contains_key(&req.name) {
                return Err(Reply::error(ErrorCode::TopicAlreadyExists, format!("topic {:?} already exists", req.name)));
            }
            state.partitions_created
        };
        let replicas = place(&members, req.partitions, req.replicas, existing);
        let command = MetadataCommand::CreateTopic {
            name: req.name.clone(),
            replicas,
            max_message_bytes,
            retention_ms: req.retention_ms.unwrap_or(self.cluster.topic_defaults.retention_ms),
        };
        let offset = self.propose(command).await?;
        match self.metadata.borrow().topics.get(&req.name) {
            Some(t) if t.created_at_offset == offset => Ok(Bytes::new()),
            _ => Err(Reply::error(ErrorCode::TopicAlreadyExists, format!("topic {:?} was created concurrently by another request", req.name))),
        }
    }

    async fn delete_topic(&self, payload: &[u8]) -> Outcome {
        let req: DeleteTopicRequest = message::decode(payload).map_err(bad_request)?;
        if !self.metadata.borrow().topics.contains_key(&req.name) {
            return Err(Reply::error(ErrorCode::UnknownTopic, format!("topic {:?} does not exist", req.name)));
        }
        self.propose(MetadataCommand::DeleteTopic { name: req.name.clone() }).await?;
        Ok(Bytes::new())
    }

    fn cluster_status(&self) -> Bytes {
        let hosted = self.hosted.read().expect("hosted lock poisoned").clone();
        let mut groups = vec![group_status(&self.metadata_group, None, None)];
        let mut partitions: Vec<_> = hosted.values().collect();
        partitions.sort_by_key(|p| (p.topic.clone(), p.partition));
        groups.extend(partitions.into_iter().map(|p| group_status(&p.group, Some(p.topic.clone()), Some(p.partition))));
        message::encode(&ClusterStatusResponse { node: self.node_id, groups })
    }

    async fn list_offsets(&self, payload: &[u8]) -> Outcome {
        let req: ListOffsetsRequest = message::decode(payload).map_err(bad_request)?;
        let (part, _) = self.partition(&req.topic, req.partition)?;
        let committed = *part.group.high_watermark.borrow();
        let log = part.group.log.clone();
        let ts = req.timestamp_ms;
        let found = tokio::task::spawn_blocking(move || -> Result<Option<u64>, keel_storage::StorageError> {
            let Some(index) = log.index_for_timestamp(ts)? else { return Ok(None) };
            Ok(log.read(index..index + 1, 0)?.first().map(|e| e.meta.base_offset))
        })
        .await
        .map_err(|e| Reply::error(ErrorCode::Unknown, format!("offset lookup failed: {e}")))?
        .map_err(|e| Reply::error(ErrorCode::StorageFailed, format!("offset lookup failed: {e}")))?;
        let offset = found.filter(|o| *o < committed).unwrap_or(committed);
        Ok(message::encode(&ListOffsetsResponse { offset }))
    }
}

fn group_status(g: &GroupHandle, topic: Option<String>, partition: Option<u32>) -> GroupStatus {
    use openraft::async_runtime::watch::WatchReceiver;
    let m = g.raft.metrics().borrow_watched().clone();
    let role = match m.state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    };
    let matched = m.replication.as_ref().map(|r| r.iter().map(|(id, log)| (*id, log.map(|l| l.index))).collect()).unwrap_or_default();
    GroupStatus {
        group: g.id,
        topic,
        partition,
        role: role.to_string(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        committed_index: m.local_committed.map(|l| l.index),
        applied_index: m.last_applied.map(|l| l.index),
        high_watermark: *g.high_watermark.borrow(),
        matched,
        replicas: m.membership_config.membership().voter_ids().collect(),
    }
}
