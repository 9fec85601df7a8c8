//! `Admin`: create, delete, list and describe topics.

use keel_protocol::api::client as api;
use keel_protocol::message::{self, BrokerInfo, ClusterStatusResponse, CreateTopicRequest, DeleteTopicRequest, TopicInfo};

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

    /// Creates a topic with the cluster's defaults for retention and message size.
    pub async fn create_topic(&self, name: &str, partitions: u32, replicas: u16) -> Result<(), ClientError> {
        self.create_topic_with(CreateTopicRequest { name: name.to_string(), partitions, replicas, retention_ms: None, max_message_bytes: None }).await
    }

    pub async fn create_topic_with(&self, req: CreateTopicRequest) -> Result<(), ClientError> {
        let what = format!("create topic {:?}", req.name);
        self.cluster.call_any(&what, api::CREATE_TOPIC, message::encode(&req)).await?;
        self.cluster.metadata(true).await?;
        Ok(())
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let what = format!("delete topic {name:?}");
        self.cluster.call_any(&what, api::DELETE_TOPIC, message::encode(&DeleteTopicRequest { name: name.to_string() })).await?;
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
