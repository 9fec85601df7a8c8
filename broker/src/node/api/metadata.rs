//! `Metadata`: brokers, topics with their configs, partitions with replicas and the
//! leader this node knows of.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, BrokerInfo, MetadataRequest, MetadataResponse, PartitionInfo, TopicInfo};

use super::{ApiError, ClientService, Request};

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let body: MetadataRequest = message::decode(&req.payload)?;
    let state = service.metadata.borrow().clone();
    let hosted = service.hosted.read().expect("hosted lock poisoned").clone();
    let topics = state
        .topics
        .values()
        .filter(|t| body.topics.as_ref().is_none_or(|names| names.contains(&t.name)))
        .map(|t| TopicInfo {
            name: t.name.clone(),
            partitions: t
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    replicas: p.replicas.clone(),
                    leader: hosted.get(&p.group).and_then(|h| h.group.leader_hint()),
                })
                .collect(),
            config: t.config.clone(),
        })
        .collect();
    let brokers = service.cluster.members.iter().map(|m| BrokerInfo { id: m.id, addr: m.client_addr.clone() }).collect();
    Ok(MetadataResponse { brokers, topics }.encode(req.version))
}
