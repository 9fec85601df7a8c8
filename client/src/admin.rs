//! `Admin`: create, delete, list and describe topics.

use keel_protocol::api::client as api;
use keel_protocol::message::{
    self, AlterTopicRequest, AlterTopicResponse, BrokerInfo, ClusterStatusResponse, CreateTopicRequest, DeleteTopicRequest, TopicInfo,
};
use keel_protocol::{TopicConfig, TopicConfigPatch};

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
}
