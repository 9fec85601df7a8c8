//! The consumer-group APIs served by a partition's leader (protocol version 3):
//! `CommitOffset` and `FetchOffset` for stream groups, `QueueFetch` and `QueueSettle`
//! for queue groups. Names are checked here; the partition (`node/partition/
//! consumers.rs`) does the rest.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::limits::{GROUP_NAME_LEN_MAX, MEMBER_NAME_LEN_MAX, QUEUE_FETCH_MESSAGES_MAX, SETTLE_ITEMS_MAX};
use keel_protocol::message::{
    self, CommitOffsetRequest, CommitOffsetResponse, ConfigureGroupRequest, ConfigureGroupResponse, DescribeMembersRequest, DescribeMembersResponse,
    FetchOffsetRequest, FetchOffsetResponse, GroupStateRequest, GroupStateResponse, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, QueueFetchRequest, QueueFetchResponse, QueueSettleRequest, QueueSettleResponse,
};
use keel_protocol::{GroupConfig, TopicConfig};

use super::{bounded, Answer, ApiError, ClientService, Request};
use crate::metadata::MetadataCommand;
use crate::node::limits::{CONSUMER_REQUEST_TIMEOUT_MAX, FETCH_BYTES_MAX, FETCH_WAIT_MAX};
use crate::node::partition::consumers::QueueFetch;

/// A group or member name: 1..=max bytes of `[A-Za-z0-9._-]`.
fn check_name(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let ok = !name.is_empty() && name.len() <= max && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!("{what} {name:?} must be 1..={max} characters of [A-Za-z0-9._-]")))
    }
}

impl ClientService {
    /// Group `group`'s settings (its own, or the defaults) and `topic`'s max deliveries.
    fn queue_settings(&self, group: &str, topic: &str) -> Result<(GroupConfig, TopicConfig), ApiError> {
        let state = self.metadata.borrow();
        let topic_config = state.topics.get(topic).ok_or_else(|| ApiError::UnknownTopic(topic.to_string()))?.config.clone();
        Ok((state.group_config(group), topic_config))
    }
}

pub async fn commit_offset(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: CommitOffsetRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    let partition = service.partition(&req.topic, req.partition)?;
    let what = format!("{}/{} (group {})", req.topic, req.partition, req.group);
    partition.commit_offset(&req.group, req.generation, req.offset, CONSUMER_REQUEST_TIMEOUT_MAX).await.map_err(|error| ApiError::Partition { what, error })?;
    Ok(message::encode(&CommitOffsetResponse { offset: req.offset }))
}

pub async fn fetch_offset(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: FetchOffsetRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    let partition = service.partition(&req.topic, req.partition)?;
    let what = format!("{}/{}", req.topic, req.partition);
    let (committed, high_watermark, log_start_offset) =
        partition.committed_offset(&req.group, CONSUMER_REQUEST_TIMEOUT_MAX).await.map_err(|error| ApiError::Partition { what, error })?;
    Ok(message::encode(&FetchOffsetResponse { committed, high_watermark, log_start_offset }))
}

pub async fn queue_fetch(service: Arc<ClientService>, req: Request) -> Result<Answer, ApiError> {
    let req: QueueFetchRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    check_name("member", &req.member, MEMBER_NAME_LEN_MAX)?;
    if req.max_messages == 0 {
        return Err(ApiError::InvalidArgument("max_messages must be at least 1 (the member's credit)".into()));
    }
    let partition = service.partition(&req.topic, req.partition)?;
    let (config, topic_config) = service.queue_settings(&req.group, &req.topic)?;
    let max_deliveries = topic_config.max_deliveries;
    let fetch = QueueFetch {
        lane_weights: std::array::from_fn(|l| topic_config.lane_weight(l as u8)),
        group: req.group.clone(),
        member: req.member,
        max_messages: req.max_messages.min(QUEUE_FETCH_MESSAGES_MAX),
        max_bytes: u64::from(req.max_bytes.min(FETCH_BYTES_MAX)),
        max_wait: bounded(req.max_wait_ms, FETCH_WAIT_MAX),
        start: req.start,
    };
    let what = format!("{}/{} (group {})", req.topic, req.partition, req.group);
    let leased = partition.queue_fetch(&fetch, &config, max_deliveries).await.map_err(|error| ApiError::Partition { what, error })?;
    let head =
        QueueFetchResponse { leases: leased.leases, lease_deadline_ms: leased.lease_deadline_ms, high_watermark: leased.high_watermark, stall: leased.stall };
    Ok(Answer::WithBatches { head: message::encode_batches_head(&head), batches: leased.batches })
}

pub async fn queue_settle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: QueueSettleRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    check_name("member", &req.member, MEMBER_NAME_LEN_MAX)?;
    if req.items.len() > SETTLE_ITEMS_MAX {
        return Err(ApiError::InvalidArgument(format!("{} settle items in one request; at most {SETTLE_ITEMS_MAX}", req.items.len())));
    }
    if req.items.is_empty() {
        return Ok(message::encode(&QueueSettleResponse { outcomes: Vec::new() }));
    }
    let partition = service.partition(&req.topic, req.partition)?;
    let (config, topic_config) = service.queue_settings(&req.group, &req.topic)?;
    let max_deliveries = topic_config.max_deliveries;
    let what = format!("{}/{} (group {})", req.topic, req.partition, req.group);
    let outcomes = partition
        .queue_settle(&req.group, &req.member, &req.items, &config, max_deliveries, CONSUMER_REQUEST_TIMEOUT_MAX)
        .await
        .map_err(|error| ApiError::Partition { what, error })?;
    Ok(message::encode(&QueueSettleResponse { outcomes }))
}

/// `ConfigureGroup`: through the metadata log; an empty patch reads the settings.
pub async fn configure_group(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: ConfigureGroupRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    let current = service.metadata.borrow().group_config(&req.group);
    if req.patch.is_empty() {
        return Ok(message::encode(&ConfigureGroupResponse { config: current }));
    }
    current.patched(&req.patch).validate().map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let (offset, state) = service.propose(MetadataCommand::ConfigureGroup { group: req.group.clone(), patch: req.patch }).await?;
    if let Some(rejection) = state.rejection_at(offset) {
        return Err(ApiError::InvalidArgument(format!("the change was refused ({rejection}); read the settings and retry")));
    }
    Ok(message::encode(&ConfigureGroupResponse { config: state.group_config(&req.group) }))
}

/// `GroupState`: the groups this partition's leader knows, or one of them.
pub async fn group_state(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: GroupStateRequest = message::decode(&req.payload)?;
    if let Some(g) = &req.group {
        check_name("group", g, GROUP_NAME_LEN_MAX)?;
    }
    let partition = service.partition(&req.topic, req.partition)?;
    let what = format!("{}/{}", req.topic, req.partition);
    let state = partition.group_state(req.group.as_deref(), CONSUMER_REQUEST_TIMEOUT_MAX).await.map_err(|error| ApiError::Partition { what, error })?;
    Ok(message::encode::<GroupStateResponse>(&state))
}

impl ClientService {
    /// The metadata term, if this node is the working metadata leader (and so the
    /// stream-group coordinator); otherwise `NotLeader` pointing at the leader.
    fn coordinator_term(&self) -> Result<u64, ApiError> {
        use openraft::async_runtime::watch::WatchReceiver;
        let leader = self.metadata_group.working_leader();
        if leader != Some(self.node_id) {
            return Err(ApiError::MetadataNotLeader { leader: self.metadata_group.leader().filter(|l| *l != self.node_id) });
        }
        Ok(self.metadata_group.raft.metrics().borrow_watched().current_term)
    }

    /// A topic's partition count (0 if it does not exist), from this node's metadata.
    fn partition_count(&self, topic: &str) -> u32 {
        self.metadata.borrow().topics.get(topic).map_or(0, |t| t.partitions.len() as u32)
    }
}

/// `JoinGroup`, on the coordinator.
pub async fn join_group(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: JoinGroupRequest = message::decode(&req.payload)?;
    check_name("group", &req.group, GROUP_NAME_LEN_MAX)?;
    if let Some(m) = &req.member {
        check_name("member", m, MEMBER_NAME_LEN_MAX)?;
    }
    let term = service.coordinator_term()?;
    let session = std::time::Duration::from_millis(u64::from(req.session_timeout_ms));
    let partitions_of = |t: &str| service.partition_count(t);
    let joined = service.coordinator.join(std::time::Instant::now(), term, &req.group, req.member.as_deref(), &req.topics, session, &partitions_of)?;
    tracing::info!(group = %req.group, member = %joined.member, generation = joined.generation, members = joined.members, "stream group member joined");
    Ok(message::encode(&JoinGroupResponse {
        member: joined.member,
        generation: joined.generation,
        assignment: joined.assignment,
        members: joined.members,
        heartbeat_interval_ms: joined.heartbeat_interval.as_millis() as u32,
    }))
}

/// `Heartbeat`, on the coordinator.
pub async fn heartbeat(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: HeartbeatRequest = message::decode(&req.payload)?;
    let term = service.coordinator_term()?;
    let (rebalance, generation) = service.coordinator.heartbeat(std::time::Instant::now(), term, &req.group, &req.member, req.generation)?;
    Ok(message::encode(&HeartbeatResponse { rebalance, generation }))
}

/// `LeaveGroup`, on the coordinator.
pub async fn leave_group(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: LeaveGroupRequest = message::decode(&req.payload)?;
    service.coordinator_term()?;
    let partitions_of = |t: &str| service.partition_count(t);
    service.coordinator.leave(&req.group, &req.member, &partitions_of);
    tracing::info!(group = %req.group, member = %req.member, "stream group member left");
    Ok(Bytes::new())
}

/// `DescribeMembers`, on the coordinator.
pub async fn describe_members(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: DescribeMembersRequest = message::decode(&req.payload)?;
    service.coordinator_term()?;
    let (generation, members) = service.coordinator.describe(std::time::Instant::now(), &req.group).unwrap_or((0, Vec::new()));
    let members = members.into_iter().map(|(m, since, a)| (m, since.as_millis() as u64, a)).collect();
    Ok(message::encode(&DescribeMembersResponse { generation, members }))
}

/// Removes stream-group members whose session ran out, while this node coordinates.
pub async fn expire_sessions(service: Arc<ClientService>) {
    let mut tick = tokio::time::interval(crate::node::limits::SESSION_EXPIRY_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let partitions_of = |t: &str| service.partition_count(t);
        for (group, member) in service.coordinator.expire(std::time::Instant::now(), &partitions_of) {
            tracing::warn!(group = %group, member = %member, "stream group member's session timed out; its partitions are reassigned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_and_member_names_are_checked() {
        assert!(check_name("group", "billing-v2.eu_1", GROUP_NAME_LEN_MAX).is_ok());
        assert!(check_name("group", "", GROUP_NAME_LEN_MAX).is_err());
        assert!(check_name("group", "a b", GROUP_NAME_LEN_MAX).is_err());
        assert!(check_name("member", &"x".repeat(MEMBER_NAME_LEN_MAX + 1), MEMBER_NAME_LEN_MAX).is_err());
    }
}
