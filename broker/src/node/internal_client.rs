//! The node's own client of the cluster's client API: what node tasks (the dead-letter
//! writer, replay and redrive jobs) use to reach a partition led by another node. It keeps one
//! connection per node, follows `NotLeader` answers, and resolves a produce refused
//! with `DuplicateMessageIds` into the records already stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel_net::{CallError, Caller};
use keel_protocol::api::client as api;
use keel_protocol::message::{self, DuplicateMessageIds, NotLeader, ProduceRequest, ProduceResponse};
use keel_protocol::ErrorCode;

use super::api::ClientService;

/// Why a produce stored nothing.
pub enum Refusal {
    /// These records' (batch indexes) ids are stored already; nothing was written.
    Stored(Vec<u32>),
    Failed(String),
}

/// Calls other nodes' client listeners on this node's behalf.
pub struct InternalClient {
    service: Arc<ClientService>,
    /// Each call's timeout.
    timeout: Duration,
    /// A caller per node (its client listener).
    callers: Mutex<HashMap<u64, Arc<Caller>>>,
}

impl InternalClient {
    pub fn new(service: Arc<ClientService>, timeout: Duration) -> InternalClient {
        InternalClient { service, timeout, callers: Mutex::default() }
    }

    /// Appends `batch` to `topic`/`partition`, through its leader; returns where it
    /// landed.
    pub async fn produce(&self, topic: &str, partition: u32, batch: Bytes) -> Result<ProduceResponse, Refusal> {
        let req = ProduceRequest { topic: topic.to_string(), partition, timeout_ms: self.timeout.as_millis() as u32 };
        let payload = message::encode_with_batches(&req, &[batch]);
        let leader = self.leader_of(topic, partition);
        match self.call_leader_versioned(leader, api::PRODUCE, &|_| payload.clone()).await {
            Ok((version, body)) => ProduceResponse::decode(&body, version)
                .map_err(|e| Refusal::Failed(format!("appending to {topic}/{partition}: the answer does not decode: {e}"))),
            Err(CallError::Refused { code: ErrorCode::DuplicateMessageIds, body, .. }) => match message::decode::<DuplicateMessageIds>(&body) {
                Ok(d) => Err(Refusal::Stored(d.records.into_iter().map(|(i, _)| i).collect())),
                Err(e) => Err(Refusal::Failed(format!("appending to {topic}/{partition}: a DuplicateMessageIds refusal that does not decode: {e}"))),
            },
            Err(e) => Err(Refusal::Failed(format!("appending to {topic}/{partition}: {e}"))),
        }
    }

    /// The node leading `topic`/`partition` as this node knows it: its own replica's
    /// view, else the partition's first replica.
    pub fn leader_of(&self, topic: &str, partition: u32) -> Option<u64> {
        match self.service.partition(topic, partition) {
            Ok(local) => local.group.leader(),
            Err(_) => {
                self.service.metadata.borrow().topics.get(topic).and_then(|t| t.partitions.get(partition as usize)).and_then(|p| p.replicas.first().copied())
            }
        }
    }

    /// Calls `api_key` on `first` (a node id), following `NotLeader` answers a few times.
    pub async fn call_leader(&self, first: Option<u64>, api_key: u16, encode: &(dyn Fn(u16) -> Bytes + Sync)) -> Result<Bytes, CallError> {
        self.call_leader_versioned(first, api_key, encode).await.map(|(_, body)| body)
    }

    /// [`call_leader`](Self::call_leader), with the protocol version the answering
    /// connection speaks.
    pub async fn call_leader_versioned(&self, first: Option<u64>, api_key: u16, encode: &(dyn Fn(u16) -> Bytes + Sync)) -> Result<(u16, Bytes), CallError> {
        let members = &self.service.cluster.members;
        let mut target = first.unwrap_or(self.service.node_id);
        let mut last = None;
        for _ in 0..members.len() + 1 {
            let Some(member) = members.iter().find(|m| m.id == target) else { break };
            let caller = self
                .callers
                .lock()
                .expect("callers lock poisoned")
                .entry(target)
                .or_insert_with(|| Arc::new(Caller::new(target, member.client_addr.clone(), None)))
                .clone();
            match caller.call_versioned(api_key, encode, self.timeout).await {
                Ok(answer) => return Ok(answer),
                Err(CallError::Refused { code: ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable, body, .. }) if !body.is_empty() => {
                    let hint: Option<NotLeader> = message::decode(&body).ok();
                    match hint.and_then(|h| h.leader_id) {
                        Some(l) if l != target => target = l,
                        _ => {
                            // No leader known there: try the next member.
                            target = members.iter().map(|m| m.id).find(|id| *id > target).unwrap_or(members[0].id);
                        }
                    }
                }
                Err(e) => {
                    last = Some(e);
                    target = members.iter().map(|m| m.id).find(|id| *id > target).unwrap_or(members[0].id);
                }
            }
        }
        Err(last.unwrap_or(CallError::Unreachable { target, addr: String::new(), reason: "no node answered as leader".into(), refused: false }))
    }
}
