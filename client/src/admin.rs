//! `Admin`: create, delete, list and describe topics; consumer groups' settings, state
//! and offset resets; replay and redrive jobs.

use std::time::Instant;

use keel_protocol::job::{Job, JobAction, JobRequest, JobSpec};
use keel_protocol::message::{
    self, AlterTopicRequest, AlterTopicResponse, BrokerInfo, ClusterStatusResponse, CommitOffsetRequest, ConfigureGroupRequest, ConfigureGroupResponse,
    CreateTopicRequest, DeleteTopicRequest, DescribeMembersRequest, DescribeMembersResponse, GroupStateRequest, GroupStateResponse, TopicInfo,
};
use keel_protocol::message::{ControlJobRequest, CreateJobRequest, CreateJobResponse, ListJobsRequest, ListJobsResponse};
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

    /// Creates a replay or redrive job (see [`JobRequest`]); for a dry run
    /// (`request.dry_run`), only resolves it: the answer holds the spec it would run and
    /// no job. A request without an id gets a random one, so a create retried after a
    /// lost answer finds its job instead of making a second.
    pub async fn create_job(&self, mut request: JobRequest) -> Result<JobCreated, ClientError> {
        if request.request_id.is_empty() {
            request.request_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        }
        let what = format!("create a {} job of {:?}", request.kind.as_str(), request.source);
        let body = message::encode(&CreateJobRequest::new(&request));
        let (_, answer) = self.cluster.call_any(&what, api::CREATE_JOB, &|_| body.clone()).await?;
        let resp: CreateJobResponse = message::decode(&answer).map_err(|e| malformed(e.to_string()))?;
        Ok(JobCreated { job: resp.job().map_err(malformed)?, spec: resp.spec().map_err(malformed)? })
    }

    /// Running and paused jobs, or (`all`) every job the cluster remembers: the audit
    /// trail of who ran what, when, and how much it moved.
    pub async fn list_jobs(&self, all: bool) -> Result<Vec<Job>, ClientError> {
        self.jobs(ListJobsRequest { id: None, all }).await
    }

    /// One job and its progress.
    pub async fn job(&self, id: u64) -> Result<Job, ClientError> {
        let mut jobs = self.jobs(ListJobsRequest { id: Some(id), all: true }).await?;
        jobs.pop().ok_or_else(|| malformed(format!("the answer for job {id} holds no job")))
    }

    async fn jobs(&self, req: ListJobsRequest) -> Result<Vec<Job>, ClientError> {
        let body = message::encode(&req);
        let (_, answer) = self.cluster.call_any("list jobs", api::LIST_JOBS, &|_| body.clone()).await?;
        let resp: ListJobsResponse = message::decode(&answer).map_err(|e| malformed(e.to_string()))?;
        resp.jobs().map_err(malformed)
    }

    /// Pauses, resumes or cancels a job; returns it after the change.
    pub async fn control_job(&self, id: u64, action: JobAction) -> Result<Job, ClientError> {
        let body = message::encode(&ControlJobRequest { id, action: action.clone() });
        let (_, answer) = self.cluster.call_any(&format!("{action:?} job {id}"), api::CONTROL_JOB, &|_| body.clone()).await?;
        let resp: CreateJobResponse = message::decode(&answer).map_err(|e| malformed(e.to_string()))?;
        resp.job().map_err(malformed)?.ok_or_else(|| malformed(format!("the answer for job {id} holds no job")))
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}

/// What [`Admin::create_job`] answers: the job (none for a dry run) and the spec it
/// runs, with every position resolved to an offset.
#[derive(Debug, Clone)]
pub struct JobCreated {
    pub job: Option<Job>,
    pub spec: JobSpec,
}

fn malformed(reason: String) -> ClientError {
    ClientError::Malformed { addr: "a broker".into(), reason }
}
