//! `Admin`: create, delete, list and describe topics; consumer groups' settings, state
//! and offset resets.

use std::time::Instant;

use keel_protocol::message::{
    self, AlterTopicRequest, AlterTopicResponse, BrokerInfo, ClusterStatusResponse, CommitOffsetRequest, ConfigureGroupRequest, ConfigureGroupResponse,
    CreateTopicRequest, DeleteTopicRequest, DescribeMembersRequest, DescribeMembersResponse, GroupStateRequest, GroupStateResponse, TopicInfo,
};
use keel_protocol::{api::client as api, GroupConfig, GroupConfigPatch, TopicConfig, TopicConfigPatch};

use crate::cluster::Cluster;
use crate::error::ClientError;

/// Topic administration.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::{Admin, ClientConfig, Cluster};
/// let admin = Admin::new(Cluster::new(ClientConfig::with_bootstrap("127.0.0.1:9092"))?);
/// admin.create_topic("orders", 3, 3).await?;
/// for t in admin.list_topics().await? {
///     println!("{} has {} partitions", t.name, t.partitions.len());
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Admin {
    cluster: Cluster,
}

impl Admin {
    pub fn new(cluster: Cluster) -> Admin {
        Admin { cluster }
    }

    /// Creates a topic with the cluster's default settings.
    pub async fn create_topic(&self, name: &str, partitions: u32, replicas: u16) -> Result<(), ClientError> {
        self.create_topic_with(CreateTopicRequest { name: name.to_string(), partitions, replicas, config: TopicConfigPatch::default() }).await
    }

    /// Creates a topic; the settings `req.config` leaves out take the cluster's defaults.
    pub async fn create_topic_with(&self, req: CreateTopicRequest) -> Result<(), ClientError> {
        let what = format!("create topic {:?}", req.name);
        self.cluster.call_any(&what, api::CREATE_TOPIC, &|version| req.encode(version)).await?;
        self.cluster.metadata(true).await?;
        Ok(())
    }

    /// Changes the settings `patch` sets; returns the topic's whole config after it.
    /// Settings that partitions apply (dedupe window, producer expiry) reach them with
    /// their next write.
    pub async fn alter_topic(&self, name: &str, patch: TopicConfigPatch) -> Result<TopicConfig, ClientError> {
        let what = format!("alter topic {name:?}");
        let body = message::encode(&AlterTopicRequest { name: name.to_string(), config: patch });
        let (_, answer) = self.cluster.call_any(&what, api::ALTER_TOPIC, &|_| body.clone()).await?;
        let resp: AlterTopicResponse = message::decode(&answer).map_err(|e| ClientError::Malformed { addr: "a broker".into(), reason: e.to_string() })?;
        self.cluster.metadata(true).await?;
        Ok(resp.config)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let what = format!("delete topic {name:?}");
        let body = message::encode(&DeleteTopicRequest { name: name.to_string() });
        self.cluster.call_any(&what, api::DELETE_TOPIC, &|_| body.clone()).await?;
        self.cluster.metadata(true).await?;
        Ok(())
    }

    /// Every topic, with partitions, replicas and leaders.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        Ok(self.cluster.metadata(true).await?.topics.clone())
    }

    /// Every broker's report on the groups it hosts; a broker that does not answer
    /// within `timeout` comes back as an error (it is down or unreachable).
    pub async fn cluster_status(&self, timeout: std::time::Duration) -> Result<Vec<(BrokerInfo, Result<ClusterStatusResponse, ClientError>)>, ClientError> {
        let brokers = self.cluster.metadata(true).await?.brokers.clone();
        let mut out = Vec::new();
        for b in brokers {
            let status = match self.cluster.call_once(&b.addr, api::CLUSTER_STATUS, bytes::Bytes::new(), timeout).await {
                Ok(body) => message::decode(&body).map_err(|e| ClientError::Malformed { addr: b.addr.clone(), reason: e.to_string() }),
                Err(e) => Err(e),
            };
            out.push((b, status));
        }
        Ok(out)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        self.list_topics().await?.into_iter().find(|t| t.name == name).ok_or_else(|| ClientError::UnknownTopic(name.to_string()))
    }

    /// Changes the group settings `patch` sets (an empty patch only reads them);
    /// returns the group's whole settings.
    pub async fn configure_group(&self, group: &str, patch: GroupConfigPatch) -> Result<GroupConfig, ClientError> {
        let what = format!("configure group {group:?}");
        let body = message::encode(&ConfigureGroupRequest { group: group.to_string(), patch });
        let (_, answer) = self.cluster.call_any(&what, api::CONFIGURE_GROUP, &|_| body.clone()).await?;
        let resp: ConfigureGroupResponse = message::decode(&answer).map_err(|e| ClientError::Malformed { addr: "a broker".into(), reason: e.to_string() })?;
        Ok(resp.config)
    }

    /// Consumer groups' state in each partition of `topic` (`group`, or all), as each
    /// partition's leader knows it.
    pub async fn group_state(&self, topic: &str, group: Option<&str>) -> Result<Vec<(u32, GroupStateResponse)>, ClientError> {
        let partitions = self.cluster.partitions(topic).await?;
        let mut out = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let req = GroupStateRequest { topic: topic.to_string(), partition: p, group: group.map(str::to_string) };
            let body = message::encode(&req);
            let deadline = Instant::now() + self.cluster.config().request_timeout;
            let (_, answer) = self.cluster.call_partition(topic, p, api::GROUP_STATE, &|_| body.clone(), deadline).await?;
            let resp: GroupStateResponse =
                message::decode(&answer).map_err(|e| ClientError::Malformed { addr: format!("{topic}/{p} leader"), reason: e.to_string() })?;
            out.push((p, resp));
        }
        Ok(out)
    }

    /// Sets stream group `group`'s committed offset in `partition` of `topic` (an
    /// administrative reset: members read it when they next start).
    pub async fn reset_offset(&self, group: &str, topic: &str, partition: u32, offset: u64) -> Result<(), ClientError> {
        let req = CommitOffsetRequest { group: group.to_string(), topic: topic.to_string(), partition, generation: None, offset };
        let body = message::encode(&req);
        let deadline = Instant::now() + self.cluster.config().request_timeout;
        self.cluster.call_partition(topic, partition, api::COMMIT_OFFSET, &|_| body.clone(), deadline).await?;
        Ok(())
    }

    /// A stream group's live members and their partitions, from its coordinator.
    pub async fn describe_members(&self, group: &str) -> Result<DescribeMembersResponse, ClientError> {
        let body = message::encode(&DescribeMembersRequest { group: group.to_string() });
        let (_, answer) = self.cluster.call_any(&format!("describe group {group:?}"), api::DESCRIBE_MEMBERS, &|_| body.clone()).await?;
        message::decode(&answer).map_err(|e| ClientError::Malformed { addr: "the group coordinator".into(), reason: e.to_string() })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}
