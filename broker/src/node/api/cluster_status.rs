//! `ClusterStatus`: this node's view of every Raft group it hosts (role, term, leader,
//! log, commit and applied indexes, high watermark, replica progress). The CLI asks
//! every broker and merges the answers.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, ClusterStatusResponse, GroupStatus};

use super::{ApiError, ClientService, Request};
use crate::node::group::GroupHandle;

pub async fn handle(service: Arc<ClientService>, _req: Request) -> Result<Bytes, ApiError> {
    let hosted = service.hosted.read().expect("hosted lock poisoned").clone();
    let mut groups = vec![group_status(&service.metadata_group, None, None)];
    let mut partitions: Vec<_> = hosted.values().collect();
    partitions.sort_by_key(|p| (p.topic.clone(), p.partition));
    groups.extend(partitions.into_iter().map(|p| group_status(&p.group, Some(p.topic.clone()), Some(p.partition))));
    Ok(message::encode(&ClusterStatusResponse { node: service.node_id, groups }))
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
