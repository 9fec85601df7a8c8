//! The client API: one file per API, behind one dispatch table.
//!
//! Every handler takes the service and the request (its payload and the connection's
//! negotiated protocol version) and returns the answer's body or an [`ApiError`], which
//! is converted to a wire code once, in [`error`].
//!
//! - [`produce`]: validate a batch and append it through the partition leader.
//! - [`fetch`]: committed batches from an offset, with long-poll.
//! - [`list_offsets`]: the first offset at or after a time.
//! - [`metadata`]: brokers, topics (with their configs), partitions and leaders.
//! - [`create_topic`], [`alter_topic`], [`delete_topic`]: topics, through the metadata log.
//! - [`init_producer`]: producer ids and epochs for idempotent producers.
//! - [`cluster_status`]: this node's view of every Raft group it hosts.
//! - [`consumer_groups`]: stream groups' offsets, queue groups' leased fetches and settles.
//! - [`jobs`]: replay and redrive jobs (create, list, pause/resume/cancel).

pub mod alter_topic;
pub mod cluster_status;
pub mod consumer_groups;
pub mod create_topic;
pub mod delete_topic;
pub mod error;
pub mod fetch;
pub mod init_producer;
pub mod jobs;
pub mod list_offsets;
pub mod metadata;
pub mod produce;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use keel_net::{Reply, Service};
use keel_protocol::api::client as api;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::watch;

pub use error::ApiError;

use super::faults::NodeFaults;
use super::group::GroupHandle;
use super::limits::METADATA_APPLY_TIMEOUT;
use super::partition::Partition;
use super::reconcile::HostedPartitions;
use crate::config::ClusterConfig;
use crate::metadata::{MetadataCommand, MetadataState};
use crate::replication::EntryData;

/// What every handler can reach.
pub struct ClientService {
    pub node_id: u64,
    pub cluster: ClusterConfig,
    pub metadata_group: GroupHandle,
    pub metadata: watch::Receiver<Arc<MetadataState>>,
    pub hosted: HostedPartitions,
    /// Producer ids this node hands to anonymous producers: `[next, end)` of its
    /// current block from the metadata log.
    pub producer_ids: tokio::sync::Mutex<(i64, i64)>,
    pub faults: Arc<NodeFaults>,
    /// Stream-group membership (served while this node leads the metadata group).
    pub coordinator: Arc<super::coordinator::Coordinator>,
}

/// A request as a handler sees it.
pub struct Request {
    /// The protocol version the connection negotiated.
    pub version: u16,
    pub payload: Bytes,
}

/// A handler's answer: a body, or a header with record batches after it (written from
/// the log's buffers as the frame's tail, not copied into one body).
pub enum Answer {
    Body(Bytes),
    WithBatches { head: Bytes, batches: Vec<Bytes> },
}

impl From<Bytes> for Answer {
    fn from(body: Bytes) -> Answer {
        Answer::Body(body)
    }
}

type Outcome = Result<Answer, ApiError>;
type Handler = fn(Arc<ClientService>, Request) -> BoxFuture<'static, Outcome>;

/// A handler answering with one body.
macro_rules! body {
    ($handler:path) => {
        |s, r| Box::pin(async move { $handler(s, r).await.map(Answer::from) })
    };
}

/// Every client API: key, name, handler.
const HANDLERS: &[(u16, &str, Handler)] = &[
    (api::PRODUCE, "produce", body!(produce::handle)),
    (api::FETCH, "fetch", |s, r| Box::pin(fetch::handle(s, r))),
    (api::METADATA, "metadata", body!(metadata::handle)),
    (api::CREATE_TOPIC, "create topic", body!(create_topic::handle)),
    (api::DELETE_TOPIC, "delete topic", body!(delete_topic::handle)),
    (api::CLUSTER_STATUS, "cluster status", body!(cluster_status::handle)),
    (api::LIST_OFFSETS, "list offsets", body!(list_offsets::handle)),
    (api::INIT_PRODUCER, "init producer", body!(init_producer::handle)),
    (api::ALTER_TOPIC, "alter topic", body!(alter_topic::handle)),
    (api::COMMIT_OFFSET, "commit offset", body!(consumer_groups::commit_offset)),
    (api::FETCH_OFFSET, "fetch offset", body!(consumer_groups::fetch_offset)),
    (api::QUEUE_FETCH, "queue fetch", |s, r| Box::pin(consumer_groups::queue_fetch(s, r))),
    (api::QUEUE_SETTLE, "queue settle", body!(consumer_groups::queue_settle)),
    (api::CONFIGURE_GROUP, "configure group", body!(consumer_groups::configure_group)),
    (api::GROUP_STATE, "group state", body!(consumer_groups::group_state)),
    (api::JOIN_GROUP, "join group", body!(consumer_groups::join_group)),
    (api::HEARTBEAT, "heartbeat", body!(consumer_groups::heartbeat)),
    (api::LEAVE_GROUP, "leave group", body!(consumer_groups::leave_group)),
    (api::DESCRIBE_MEMBERS, "describe members", body!(consumer_groups::describe_members)),
    (api::CREATE_JOB, "create job", body!(jobs::create_job)),
    (api::LIST_JOBS, "list jobs", body!(jobs::list_jobs)),
    (api::CONTROL_JOB, "control job", body!(jobs::control_job)),
];

impl Service for ClientService {
    fn call(self: Arc<Self>, _caller: Option<u64>, version: u16, api_key: u16, payload: Bytes) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            let Some((_, _, handler)) = HANDLERS.iter().find(|(key, _, _)| *key == api_key) else {
                return ApiError::UnsupportedApi(api_key).into_reply(&self.cluster);
            };
            let since = api::since_version(api_key);
            let outcome = if version < since {
                Err(ApiError::UnsupportedVersion { api: api_key, since, version })
            } else {
                handler(self.clone(), Request { version, payload }).await
            };
            match outcome {
                Ok(Answer::Body(body)) => Reply::ok(body),
                Ok(Answer::WithBatches { head, batches }) => Reply::ok_with_tail(head, batches),
                Err(ApiError::DropAnswer) => Reply::close_connection(),
                Err(e) => e.into_reply(&self.cluster),
            }
        })
    }
}

impl ClientService {
    /// The hosted partition `topic`/`partition`, or why not: unknown topic or partition,
    /// or `NotLeader` pointing at the preferred leader when this node holds no replica.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, ApiError> {
        let state = self.metadata.borrow().clone();
        let t = state.topics.get(topic).ok_or_else(|| ApiError::UnknownTopic(topic.to_string()))?;
        let p = t.partitions.get(partition as usize).ok_or_else(|| ApiError::UnknownPartition {
            topic: topic.to_string(),
            partition,
            count: t.partitions.len(),
        })?;
        let hosted = self.hosted.read().expect("hosted lock poisoned").get(&p.group).cloned();
        hosted.ok_or_else(|| ApiError::NotHosted { what: format!("{topic}/{partition}"), preferred: p.replicas.first().copied() })
    }

    /// Proposes a metadata command on the metadata leader and waits until this node's
    /// fold has applied it; returns the command's offset and the state after it.
    pub async fn propose(&self, command: MetadataCommand) -> Result<(u64, Arc<MetadataState>), ApiError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let offset = match self.metadata_group.raft.client_write(EntryData::batch(command.to_batch(now))).await {
            Ok(resp) => resp.data.stored_at().ok_or_else(|| ApiError::Storage(format!("the metadata command was not stored: {:?}", resp.data)))?,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => return Err(ApiError::MetadataNotLeader { leader: f.leader_id }),
            Err(e) => return Err(ApiError::Storage(format!("the metadata write failed: {e}; check this node's log"))),
        };
        let mut view = self.metadata.clone();
        let applied = tokio::time::timeout(METADATA_APPLY_TIMEOUT, async { view.wait_for(|s| s.applied_offset > offset).await.map(|s| s.clone()) }).await;
        match applied {
            Ok(Ok(state)) => Ok((offset, state)),
            _ => Err(ApiError::Timeout(format!(
                "the metadata change committed but was not applied here within {METADATA_APPLY_TIMEOUT:?}; check `keel topic list`"
            ))),
        }
    }
}

/// How long a request may wait, given what the client asked and this node's ceiling.
pub fn bounded(requested_ms: u32, max: Duration) -> Duration {
    Duration::from_millis(u64::from(requested_ms)).min(max)
}
