//! `CreateTopic`: the cluster's default config with the request's settings on top,
//! validated, proposed through the metadata log with a fresh random key for the
//! topic's message-id digests; answered once this node's fold applied it (a racing
//! duplicate create is answered `TopicAlreadyExists`).

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::CreateTopicRequest;

use super::{ApiError, ClientService, Request};
use crate::metadata::placement::place;
use crate::metadata::state::valid_topic_name;
use crate::metadata::MetadataCommand;
use crate::node::limits::TOPIC_PARTITIONS_MAX;

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req = CreateTopicRequest::decode(&req.payload, req.version)?;
    if !valid_topic_name(&req.name) {
        return Err(ApiError::InvalidArgument(format!("topic name {:?} must be 1..=249 characters of [A-Za-z0-9._-]", req.name)));
    }
    if req.partitions == 0 || req.partitions > TOPIC_PARTITIONS_MAX {
        return Err(ApiError::InvalidArgument(format!("partitions must be in 1..={TOPIC_PARTITIONS_MAX}, not {}", req.partitions)));
    }
    let members: Vec<u64> = service.cluster.members.iter().map(|m| m.id).collect();
    if req.replicas == 0 || usize::from(req.replicas) > members.len() {
        return Err(ApiError::InvalidArgument(format!("replicas must be in 1..={} (the cluster size), not {}", members.len(), req.replicas)));
    }
    let config = service.cluster.topic_defaults.config.patched(&req.config);
    config.validate().map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let existing = {
        let state = service.metadata.borrow();
        if state.topics.contains_key(&req.name) {
            return Err(ApiError::TopicExists(req.name));
        }
        state.partitions_created
    };
    let mut id_key = [0u8; 16];
    getrandom::fill(&mut id_key).map_err(|e| ApiError::Storage(format!("no randomness for the topic's message-id key: {e}")))?;
    let replicas = place(&members, req.partitions, req.replicas, existing);
    let (offset, state) = service.propose(MetadataCommand::CreateTopicWithConfig { name: req.name.clone(), replicas, config, id_key }).await?;
    match state.topics.get(&req.name) {
        Some(t) if t.created_at_offset == offset => Ok(Bytes::new()),
        _ => Err(ApiError::TopicExists(req.name)),
    }
}
