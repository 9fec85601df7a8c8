//! `CreateJob`, `ListJobs`, `ControlJob`: replay and redrive jobs.
//!
//! A create is served by the metadata leader (others answer `NotLeader` pointing
//! there): it resolves the request's positions to offsets on each source partition's
//! leader (times through `ListOffsets`, `latest` as the high watermark now), creates a
//! replay's missing target like its source, fixes the copy-batch size from the rate
//! and the target's largest batch, and — for a redrive — the loop guard and the dead
//! letters earlier redrives moved; then proposes the job (or, for a dry run, answers
//! the spec it would run). Listing is answered from this node's metadata.

use std::sync::Arc;

use bytes::Bytes;
use keel_net::CallError;
use keel_protocol::api::client as api;
use keel_protocol::job::{
    Job, JobKind, JobRequest, JobSpec, PartitionRange, Position, QuarantineRule, JOB_CHUNK_BYTES_MAX, REDRIVES_MAX_DEFAULT, REDRIVES_MAX_LIMIT,
};
use keel_protocol::message::{
    self, ControlJobRequest, CreateJobRequest, CreateJobResponse, CreateTopicRequest, ListJobsRequest, ListJobsResponse, ListOffsetsRequest,
    ListOffsetsResponse,
};
use keel_protocol::{ErrorCode, TopicConfigPatch};

use super::{ApiError, ClientService, Request};
use crate::metadata::MetadataCommand;
use crate::node::dead_letters::quarantine_topic;
use crate::node::internal_client::InternalClient;
use crate::node::limits::JOB_REQUEST_TIMEOUT;

pub async fn create_job(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let body: CreateJobRequest = message::decode(&req.payload)?;
    let request = body.request().map_err(ApiError::BadRequest)?;
    if let Some(job) = service.metadata.borrow().jobs.by_request(&request.request_id) {
        return Ok(message::encode(&CreateJobResponse { job_json: Some(to_json(job)), spec_json: job.spec.to_json() }));
    }
    if service.metadata_group.working_leader() != Some(service.node_id) {
        return Err(ApiError::MetadataNotLeader { leader: service.metadata_group.leader().filter(|l| *l != service.node_id) });
    }
    let client = InternalClient::new(service.clone(), JOB_REQUEST_TIMEOUT);
    let spec = resolve(&service, &client, &request).await?;
    spec.validate().map_err(ApiError::InvalidArgument)?;
    if request.dry_run {
        return Ok(message::encode(&CreateJobResponse { job_json: None, spec_json: spec.to_json() }));
    }
    if request.kind == JobKind::Replay {
        create_target_like_source(&service, &client, &spec).await?;
    }
    let (offset, state) = service.propose(MetadataCommand::CreateJob { spec: spec.clone(), at_ms: now_ms() }).await?;
    let created = state.jobs.jobs.values().find(|j| j.created_at_offset == offset).or_else(|| state.jobs.by_request(&spec.request_id));
    let Some(job) = created else {
        let why = state.rejection_at(offset).map_or_else(|| "the job was refused".to_string(), ToString::to_string);
        return Err(ApiError::InvalidArgument(why));
    };
    tracing::info!(job = job.id, kind = spec.kind.as_str(), source = %spec.source, target = %spec.target, total = spec.total(), requested_by = %spec.requested_by, "job created");
    Ok(message::encode(&CreateJobResponse { job_json: Some(to_json(job)), spec_json: spec.to_json() }))
}

pub async fn list_jobs(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let body: ListJobsRequest = message::decode(&req.payload)?;
    let state = service.metadata.borrow().clone();
    let jobs: Vec<&Job> = match body.id {
        Some(id) => vec![state.jobs.jobs.get(&id).ok_or_else(|| ApiError::InvalidArgument(format!("job {id} does not exist (see `keel job list --all`)")))?],
        None => state.jobs.jobs.values().filter(|j| body.all || !j.state.finished()).collect(),
    };
    let jobs_json = serde_json::to_string(&jobs).expect("jobs always encode as JSON");
    Ok(message::encode(&ListJobsResponse { jobs_json }))
}

pub async fn control_job(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let body: ControlJobRequest = message::decode(&req.payload)?;
    let (offset, state) = service.propose(MetadataCommand::JobControl { id: body.id, action: body.action.clone(), at_ms: now_ms() }).await?;
    if let Some(why) = state.rejection_at(offset) {
        return Err(ApiError::InvalidArgument(why.to_string()));
    }
    let job = state.jobs.jobs.get(&body.id).ok_or_else(|| ApiError::InvalidArgument(format!("job {} does not exist", body.id)))?;
    tracing::info!(job = job.id, action = ?body.action, state = job.state.name(), "job controlled");
    Ok(message::encode(&CreateJobResponse { job_json: Some(to_json(job)), spec_json: job.spec.to_json() }))
}

fn to_json(job: &Job) -> String {
    serde_json::to_string(job).expect("a job always encodes as JSON")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The spec a request asks for, with every position resolved to an offset.
async fn resolve(service: &ClientService, client: &InternalClient, request: &JobRequest) -> Result<JobSpec, ApiError> {
    let state = service.metadata.borrow().clone();
    let source = state.topics.get(&request.source).ok_or_else(|| ApiError::UnknownTopic(request.source.clone()))?;
    let source_partitions = source.partitions.len() as u32;
    let target = match (&request.target, request.kind) {
        (Some(t), _) => t.clone(),
        (None, JobKind::Replay) => return Err(ApiError::InvalidArgument("a replay needs a target topic (`--into TOPIC`)".into())),
        (None, JobKind::Redrive) => return Err(ApiError::InvalidArgument("a redrive needs the topic to send dead letters to".into())),
    };
    let target_max = match state.topics.get(&target) {
        Some(t) => t.config.max_message_bytes,
        None if request.kind == JobKind::Replay => source.config.max_message_bytes,
        None => return Err(ApiError::UnknownTopic(target)),
    };
    let partitions: Vec<u32> = if request.partitions.is_empty() { (0..source_partitions).collect() } else { request.partitions.clone() };
    if let Some(p) = partitions.iter().find(|p| **p >= source_partitions) {
        return Err(ApiError::UnknownPartition { topic: request.source.clone(), partition: *p, count: source_partitions as usize });
    }
    let mut ranges = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let start = offset_for(client, &request.source, partition, 0).await?;
        let end = offset_for(client, &request.source, partition, i64::MAX).await?;
        let at = |position: Position| async move {
            Ok::<u64, ApiError>(match position {
                Position::Earliest => start,
                Position::Latest => end,
                Position::Offset(o) => o.clamp(start, end),
                Position::Time(t) => offset_for(client, &request.source, partition, t).await?,
            })
        };
        let (from, until) = (at(request.from).await?, at(request.until).await?);
        if let Position::Offset(o) = request.from {
            if o < start {
                return Err(ApiError::InvalidArgument(format!(
                    "{}/{partition} starts at offset {start} (older messages were deleted by retention); --from {o} is before it",
                    request.source
                )));
            }
        }
        if from > until {
            return Err(ApiError::InvalidArgument(format!("{}/{partition}: the range starts at offset {from}, after its end {until}", request.source)));
        }
        ranges.push(PartitionRange { partition, from, until });
    }
    let quarantine = match request.kind {
        JobKind::Replay => None,
        JobKind::Redrive => {
            let max_redrives = request.max_redrives.unwrap_or(REDRIVES_MAX_DEFAULT);
            if max_redrives == 0 || max_redrives > REDRIVES_MAX_LIMIT {
                return Err(ApiError::InvalidArgument(format!("--max-redrives must be in 1..={REDRIVES_MAX_LIMIT}, not {max_redrives}")));
            }
            Some(QuarantineRule { max_redrives, topic: quarantine_topic(&target) })
        }
    };
    let exclude = match request.kind {
        JobKind::Redrive => state.jobs.redriven.get(&request.source).cloned().unwrap_or_default(),
        JobKind::Replay => Default::default(),
    };
    Ok(JobSpec {
        kind: request.kind,
        source: request.source.clone(),
        target,
        ranges,
        filter: request.filter.clone(),
        redrive: request.redrive.clone(),
        quarantine,
        exclude,
        rate: request.rate,
        chunk_records: JobSpec::chunk_records_for(request.rate),
        chunk_bytes: JOB_CHUNK_BYTES_MAX.min(target_max),
        requested_by: if request.requested_by.is_empty() { "unknown".into() } else { request.requested_by.clone() },
        request_id: request.request_id.clone(),
    })
}

/// The first offset of `topic`/`partition` at or after `timestamp_ms` (`i64::MAX`: the
/// end; 0: the log start), from its leader.
async fn offset_for(client: &InternalClient, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64, ApiError> {
    let req = message::encode(&ListOffsetsRequest { topic: topic.to_string(), partition, timestamp_ms });
    let body = client
        .call_leader(client.leader_of(topic, partition), api::LIST_OFFSETS, &|_| req.clone())
        .await
        .map_err(|e| ApiError::Timeout(format!("resolving a position in {topic}/{partition}: {e}; retry")))?;
    let resp: ListOffsetsResponse = message::decode(&body)?;
    Ok(resp.offset)
}

/// A replay's target that does not exist is created with the source's partitions,
/// replicas and settings.
async fn create_target_like_source(service: &ClientService, client: &InternalClient, spec: &JobSpec) -> Result<(), ApiError> {
    let (req, exists) = {
        let state = service.metadata.borrow();
        let source = state.topics.get(&spec.source).ok_or_else(|| ApiError::UnknownTopic(spec.source.clone()))?;
        let config = TopicConfigPatch::from_json(&serde_json::to_string(&source.config).expect("a topic config always encodes"))
            .map_err(|e| ApiError::Storage(format!("copying {}'s settings: {e}", spec.source)))?;
        let replicas = source.partitions.first().map_or(1, |p| p.replicas.len()) as u16;
        (
            CreateTopicRequest { name: spec.target.clone(), partitions: source.partitions.len() as u32, replicas, config },
            state.topics.contains_key(&spec.target),
        )
    };
    if exists {
        return Ok(());
    }
    match client.call_leader(Some(service.node_id), api::CREATE_TOPIC, &|v| req.encode(v)).await {
        Ok(_) | Err(CallError::Refused { code: ErrorCode::TopicAlreadyExists, .. }) => {}
        Err(e) => return Err(ApiError::Storage(format!("creating target topic {} like {}: {e}", spec.target, spec.source))),
    }
    tracing::info!(topic = %spec.target, like = %spec.source, "created a replay's target topic");
    Ok(())
}
