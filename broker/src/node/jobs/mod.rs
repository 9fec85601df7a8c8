//! Replay and redrive jobs: the runner on the metadata leader.
//!
//! Jobs live in the metadata fold (`metadata::jobs`); this task, on every node, runs
//! them while its node leads the metadata group. Every `JOB_SCAN_INTERVAL` it starts
//! a runner for each running job that has none and stops the runners of jobs paused,
//! cancelled or finished, or all of them when the node stops leading. A job's runner
//! works on its source partitions side by side, at the job's rate over all of them:
//! 1. on its first start, it records the end of every target partition it may write
//!    (a checkpoint) before writing anything;
//! 2. on every start, it reads the target partitions from their recorded ends and
//!    collects the job's ids it finds there (`job::replay_marker`, `redrive_id`,
//!    `quarantine_id`): what an earlier runner wrote after its last checkpoint;
//! 3. it reads the source from the checkpoint, plans copy batches (`plan`), writes
//!    those not found, and records a checkpoint (source position, counts, target ends,
//!    dead letters moved) every `JOB_CHECKPOINT_INTERVAL` and at the range's end.
//!
//! So a runner killed at any point — before a write, after it, before its checkpoint —
//! is followed by one that writes each copy once: at-least-once writes made exactly
//! once by recognising them. Two runners at once (a deposed leader that has not noticed
//! yet) would both write; the targets' message-id dedupe refuses the second copy of a
//! batch within its window, and the deposed one stops at its next leadership check.

pub mod plan;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_net::CallError;
use keel_protocol::api::client as api;
use keel_protocol::job::{parse_redrive_id, parse_replay_marker, Job, JobAction, JobKind, JobSpec, JobState, OffsetRanges, PartitionProgress, TargetEnd};
use keel_protocol::message::{self, CreateTopicRequest, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse};
use keel_protocol::{BatchView, ErrorCode, TopicConfigPatch};

use super::api::ClientService;
use super::internal_client::{InternalClient, Refusal};
use super::limits::{
    JOB_CHECKPOINT_INTERVAL, JOB_FETCH_BYTES, JOB_REQUEST_TIMEOUT, JOB_RETRY_BACKOFF_MAX, JOB_RETRY_BACKOFF_MIN, JOB_SCAN_INTERVAL, JOB_STALL_TIMEOUT,
};
use crate::metadata::MetadataCommand;
use plan::{by_destination, plan_redrive, plan_replay, redrive_batch, Destination, PlanError};

/// Runs the job supervisor until the node stops.
pub async fn run(service: Arc<ClientService>) {
    let client = Arc::new(InternalClient::new(service.clone(), JOB_REQUEST_TIMEOUT));
    let mut runners: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(JOB_SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leading = false;
    loop {
        tick.tick().await;
        let leading = service.metadata_group.working_leader() == Some(service.node_id);
        let state = service.metadata.borrow().clone();
        runners.retain(|id, handle| {
            let keep = leading && !handle.is_finished() && state.jobs.jobs.get(id).is_some_and(|j| j.state == JobState::Running);
            if !keep {
                handle.abort();
            }
            keep
        });
        if leading {
            for job in state.jobs.running() {
                runners.entry(job.id).or_insert_with(|| tokio::spawn(run_job(service.clone(), client.clone(), job.id)));
            }
        }
        if leading || was_leading {
            report(&state.jobs.jobs, leading);
        }
        was_leading = leading;
    }
}

/// The job gauges, from the metadata leader (zeroed by a node that stops leading).
fn report(jobs: &std::collections::BTreeMap<u64, Job>, leading: bool) {
    let states = ["running", "paused", "done", "cancelled", "failed"];
    let by_state: Vec<(&'static str, usize)> =
        states.iter().map(|s| (*s, if leading { jobs.values().filter(|j| j.state.name() == *s).count() } else { 0 })).collect();
    let progress: Vec<(u64, f64)> = jobs
        .values()
        .filter(|j| !j.state.finished() || j.state == JobState::Done)
        .map(|j| (j.id, if j.state == JobState::Done { 1.0 } else { j.position() as f64 / j.spec.total().max(1) as f64 }))
        .collect();
    crate::metrics::jobs(&by_state, if leading { &progress } else { &[] });
}

/// Paces a job's writes at `rate` messages/s over all its partitions (0: no limit).
struct Pacer {
    rate: u32,
    /// When the runner started, and messages granted since.
    granted: Mutex<(Instant, u64)>,
}

impl Pacer {
    fn new(rate: u32) -> Pacer {
        Pacer { rate, granted: Mutex::new((Instant::now(), 0)) }
    }

    /// Waits until `n` more messages are due.
    async fn acquire(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let due = {
            let mut g = self.granted.lock().expect("pacer lock poisoned");
            let due = g.0 + Duration::from_secs_f64(g.1 as f64 / f64::from(self.rate));
            g.1 += n;
            due
        };
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Why a partition's run ended early.
enum Stop {
    /// The job was paused or cancelled, or this node no longer leads: end quietly.
    Quiet,
    /// The job cannot go on: it is marked failed with this reason.
    Fail(String),
    /// A step failed; retried after a backoff.
    Retry(String),
}

impl From<PlanError> for Stop {
    fn from(e: PlanError) -> Stop {
        Stop::Fail(e.to_string())
    }
}

async fn run_job(service: Arc<ClientService>, client: Arc<InternalClient>, id: u64) {
    let Some(job) = service.metadata.borrow().jobs.jobs.get(&id).cloned() else { return };
    let spec = Arc::new(job.spec.clone());
    let pacer = Arc::new(Pacer::new(spec.rate));
    tracing::info!(job = id, kind = spec.kind.as_str(), source = %spec.source, target = %spec.target, copied = job.copied(), "job runner started");
    let runs = job.progress.iter().filter(|p| !p.done()).map(|p| {
        let mut run = PartitionRun {
            service: service.clone(),
            client: client.clone(),
            job: id,
            spec: spec.clone(),
            pacer: pacer.clone(),
            progress: p.clone(),
            moved: OffsetRanges::default(),
            checkpointed_at: Instant::now(),
        };
        async move { run.run().await }
    });
    futures::future::join_all(runs).await;
}

/// One source partition of a job, on its runner.
struct PartitionRun {
    service: Arc<ClientService>,
    client: Arc<InternalClient>,
    job: u64,
    spec: Arc<JobSpec>,
    pacer: Arc<Pacer>,
    progress: PartitionProgress,
    /// Dead letters moved since the last checkpoint.
    moved: OffsetRanges,
    checkpointed_at: Instant,
}

impl PartitionRun {
    /// Runs the partition to the end of its range, retrying failed steps with a
    /// backoff; gives the job up after `JOB_STALL_TIMEOUT` without progress.
    async fn run(&mut self) {
        let mut backoff = JOB_RETRY_BACKOFF_MIN;
        let mut progressed_at = Instant::now();
        loop {
            let before = self.progress.next;
            let outcome = self.work().await;
            if self.progress.next > before {
                progressed_at = Instant::now();
                backoff = JOB_RETRY_BACKOFF_MIN;
            }
            match outcome {
                Ok(()) => return,
                Err(Stop::Quiet) => return,
                Err(Stop::Fail(reason)) => return self.fail(reason).await,
                Err(Stop::Retry(error)) => {
                    if progressed_at.elapsed() >= JOB_STALL_TIMEOUT {
                        return self.fail(format!("no progress for {JOB_STALL_TIMEOUT:?}; last error: {error}")).await;
                    }
                    tracing::warn!(job = self.job, partition = self.progress.partition, error = %error, retry_in = ?backoff, "job step failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(JOB_RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    async fn fail(&self, reason: String) {
        tracing::error!(job = self.job, partition = self.progress.partition, reason = %reason, "job failed");
        let cmd = MetadataCommand::JobControl { id: self.job, action: JobAction::Fail(reason), at_ms: now_ms() };
        if let Err(e) = self.service.propose(cmd).await {
            tracing::warn!(job = self.job, error = %e, "recording the job's failure failed; the next runner tries again");
        }
    }

    /// Whether this runner may go on: its node leads the metadata group and the job is
    /// still running.
    fn alive(&self) -> Result<(), Stop> {
        let leading = self.service.metadata_group.working_leader() == Some(self.service.node_id);
        let running = self.service.metadata.borrow().jobs.jobs.get(&self.job).is_some_and(|j| j.state == JobState::Running);
        if leading && running {
            Ok(())
        } else {
            Err(Stop::Quiet)
        }
    }

    async fn work(&mut self) -> Result<(), Stop> {
        self.alive()?;
        if self.progress.targets.is_empty() {
            self.progress.targets = self.target_ends().await?;
            self.checkpoint().await?;
        }
        let found = self.find_written().await?;
        match self.spec.kind {
            JobKind::Replay => self.replay(found).await,
            JobKind::Redrive => self.redrive(found).await,
        }
    }

    /// The partitions this run may write and their ends now.
    async fn target_ends(&self) -> Result<Vec<TargetEnd>, Stop> {
        let mut targets: Vec<(String, u32)> = match self.spec.kind {
            JobKind::Replay => vec![(self.spec.target.clone(), self.progress.partition)],
            JobKind::Redrive => (0..self.topic_partitions(&self.spec.target)?).map(|p| (self.spec.target.clone(), p)).collect(),
        };
        if let Some(q) = &self.spec.quarantine {
            self.ensure_quarantine(&q.topic).await?;
            targets.push((q.topic.clone(), 0));
        }
        let mut out = Vec::with_capacity(targets.len());
        for (topic, partition) in targets {
            let next = self.end_of(&topic, partition).await?;
            out.push(TargetEnd { topic, partition, next });
        }
        Ok(out)
    }

    fn topic_partitions(&self, topic: &str) -> Result<u32, Stop> {
        let state = self.service.metadata.borrow();
        state.topics.get(topic).map(|t| t.partitions.len() as u32).ok_or_else(|| Stop::Fail(format!("topic {topic} was deleted")))
    }

    /// Creates the quarantine topic (one partition, the dead-letter topic's replicas)
    /// if it does not exist.
    async fn ensure_quarantine(&self, topic: &str) -> Result<(), Stop> {
        let (exists, replicas) = {
            let state = self.service.metadata.borrow();
            let replicas = state.topics.get(&self.spec.source).and_then(|t| t.partitions.first()).map_or(1, |p| p.replicas.len()) as u16;
            (state.topics.contains_key(topic), replicas)
        };
        if exists {
            return Ok(());
        }
        let req = CreateTopicRequest { name: topic.to_string(), partitions: 1, replicas, config: TopicConfigPatch::default() };
        match self.client.call_leader(self.service.metadata_group.leader(), api::CREATE_TOPIC, &|v| req.encode(v)).await {
            Ok(_) | Err(CallError::Refused { code: ErrorCode::TopicAlreadyExists, .. }) => {}
            Err(e) => return Err(Stop::Retry(format!("creating quarantine topic {topic}: {e}"))),
        }
        let mut view = self.service.metadata.clone();
        let shown = tokio::time::timeout(JOB_REQUEST_TIMEOUT, view.wait_for(|s| s.topics.contains_key(topic))).await.is_ok_and(|r| r.is_ok());
        if shown {
            Ok(())
        } else {
            Err(Stop::Retry(format!("quarantine topic {topic} is not in this node's metadata yet")))
        }
    }

    /// The high watermark of `topic`/`partition`.
    async fn end_of(&self, topic: &str, partition: u32) -> Result<u64, Stop> {
        let req = message::encode(&ListOffsetsRequest { topic: topic.to_string(), partition, timestamp_ms: i64::MAX });
        let body = self
            .client
            .call_leader(self.client.leader_of(topic, partition), api::LIST_OFFSETS, &|_| req.clone())
            .await
            .map_err(|e| Stop::Retry(format!("the end of {topic}/{partition}: {e}")))?;
        let resp: ListOffsetsResponse = message::decode(&body).map_err(|e| Stop::Retry(format!("the end of {topic}/{partition}: {e}")))?;
        Ok(resp.offset)
    }

    /// Committed batches of `topic`/`partition` from `offset` (the first may start
    /// before it), and the high watermark.
    async fn fetch(&self, topic: &str, partition: u32, offset: u64) -> Result<(Vec<BatchView>, u64), Stop> {
        let req = message::encode(&FetchRequest { topic: topic.to_string(), partition, offset, max_bytes: JOB_FETCH_BYTES, max_wait_ms: 0 });
        let body = match self.client.call_leader(self.client.leader_of(topic, partition), api::FETCH, &|_| req.clone()).await {
            Ok(b) => b,
            Err(CallError::Refused { code: ErrorCode::OffsetOutOfRange, message, .. }) => {
                return Err(Stop::Fail(format!("{topic}/{partition} no longer holds offset {offset} (retention deleted it before the job read it): {message}")))
            }
            // A node whose metadata lags (restarted, refilled) does not know a new topic
            // yet; only this node's metadata (the leader's) says it is gone.
            Err(CallError::Refused { code: ErrorCode::UnknownTopic | ErrorCode::UnknownPartition, message, .. }) => {
                let known = self.service.metadata.borrow().topics.get(topic).is_some_and(|t| (partition as usize) < t.partitions.len());
                return Err(if known {
                    Stop::Retry(format!("reading {topic}/{partition}: {message} (that node's metadata lags)"))
                } else {
                    Stop::Fail(format!("reading {topic}/{partition}: {message}"))
                });
            }
            Err(e) => return Err(Stop::Retry(format!("reading {topic}/{partition} at {offset}: {e}"))),
        };
        let (head, batches): (FetchResponse, Bytes) =
            message::split_with_batches(&body).map_err(|e| Stop::Retry(format!("a fetch answer of {topic}/{partition}: {e}")))?;
        let views = message::split_batches(batches).map_err(|e| Stop::Retry(format!("a fetch answer of {topic}/{partition}: {e}")))?;
        Ok((views, head.high_watermark))
    }

    /// Source offsets whose copies are in the targets after their recorded ends.
    async fn find_written(&self) -> Result<BTreeSet<u64>, Stop> {
        let mut found = BTreeSet::new();
        for t in &self.progress.targets {
            let mut offset = t.next;
            loop {
                let (views, high_watermark) = self.fetch(&t.topic, t.partition, offset).await?;
                for v in &views {
                    for r in v.records().filter_map(Result::ok) {
                        let at = v.header().base_offset + u64::from(r.offset_delta);
                        let Some(id) = r.message_id().filter(|_| at >= t.next) else { continue };
                        let source = match self.spec.kind {
                            JobKind::Replay => parse_replay_marker(id, self.job, self.progress.partition),
                            JobKind::Redrive => parse_redrive_id(id, self.job),
                        };
                        found.extend(source);
                    }
                }
                let end = views.last().map(|v| v.header().base_offset + u64::from(v.header().record_count));
                match end {
                    Some(end) if end > offset && end < high_watermark => offset = end,
                    _ => break,
                }
            }
        }
        if !found.is_empty() {
            tracing::info!(
                job = self.job,
                partition = self.progress.partition,
                copies = found.len(),
                "found copies written after the last checkpoint; not writing them again"
            );
        }
        Ok(found)
    }

    /// Records the progress in the metadata log.
    async fn checkpoint(&mut self) -> Result<(), Stop> {
        let moved = std::mem::take(&mut self.moved);
        let cmd = MetadataCommand::JobProgress { id: self.job, progress: self.progress.clone(), moved: moved.clone(), at_ms: now_ms() };
        match self.service.propose(cmd).await {
            Ok(_) => {
                self.checkpointed_at = Instant::now();
                Ok(())
            }
            Err(super::api::ApiError::MetadataNotLeader { .. }) => Err(Stop::Quiet),
            Err(e) => {
                self.moved.extend(&moved);
                Err(Stop::Retry(format!("recording job {} progress: {e}", self.job)))
            }
        }
    }

    async fn checkpoint_if_due(&mut self) -> Result<(), Stop> {
        if self.progress.done() || self.checkpointed_at.elapsed() >= JOB_CHECKPOINT_INTERVAL {
            self.checkpoint().await?;
        }
        Ok(())
    }

    fn target_lanes(&self) -> u8 {
        self.service.metadata.borrow().topics.get(&self.spec.target).map_or(1, |t| t.config.priorities.clamp(1, 10) as u8)
    }

    async fn replay(&mut self, found: BTreeSet<u64>) -> Result<(), Stop> {
        let partition = self.progress.partition;
        let last_found = found.last().copied();
        // Source batches covering `progress.next..`, and the offset after them.
        let mut held: Vec<BatchView> = Vec::new();
        let mut held_end = self.progress.next;
        while !self.progress.done() {
            self.alive()?;
            let (views, _) = self.fetch(&self.spec.source, partition, held_end).await?;
            let before = held_end;
            for v in views {
                let end = v.header().base_offset + u64::from(v.header().record_count);
                if end > held_end {
                    held_end = end;
                    held.push(v);
                }
            }
            if held_end == before {
                return Err(Stop::Retry(format!(
                    "{}/{partition} returned nothing at offset {before} below the job's end {}",
                    self.spec.source, self.progress.until
                )));
            }
            let plan = plan_replay(&self.spec, self.job, partition, self.progress.next, self.progress.until, &held, self.target_lanes())?;
            for chunk in plan.chunks {
                let written_before = last_found.is_some_and(|m| chunk.first <= m);
                if !written_before {
                    self.alive()?;
                    self.pacer.acquire(u64::from(chunk.records)).await;
                    match self.client.produce(&self.spec.target, partition, chunk.batch).await {
                        Ok(landed) => self.progress.targets[0].next = landed.base_offset + u64::from(landed.record_count),
                        // Its marker is stored: an earlier runner wrote it within the dedupe window.
                        Err(Refusal::Stored(_)) => {}
                        Err(Refusal::Failed(e)) => return Err(Stop::Retry(e)),
                    }
                }
                self.progress.next = chunk.end;
                self.progress.copied += u64::from(chunk.records);
                self.progress.skipped += chunk.skipped;
                crate::metrics::job_messages("replay", u64::from(chunk.records), chunk.skipped, 0);
                self.checkpoint_if_due().await?;
            }
            if plan.next > self.progress.next {
                self.progress.next = plan.next;
                self.progress.skipped += plan.tail_skipped;
                crate::metrics::job_messages("replay", 0, plan.tail_skipped, 0);
                self.checkpoint_if_due().await?;
            }
            held.retain(|v| v.header().base_offset + u64::from(v.header().record_count) > self.progress.next);
        }
        Ok(())
    }

    async fn redrive(&mut self, found: BTreeSet<u64>) -> Result<(), Stop> {
        let partition = self.progress.partition;
        let size_max = self.spec.chunk_bytes;
        while !self.progress.done() {
            self.alive()?;
            let (views, _) = self.fetch(&self.spec.source, partition, self.progress.next).await?;
            let target_partitions = self.topic_partitions(&self.spec.target)?;
            let plan = plan_redrive(&self.spec, self.job, self.progress.next..self.progress.until, &views, &found, target_partitions, now_ms())?;
            if plan.next == self.progress.next {
                return Err(Stop::Retry(format!(
                    "{}/{partition} returned nothing at offset {} below the job's end {}",
                    self.spec.source, plan.next, self.progress.until
                )));
            }
            self.pacer.acquire(plan.writes.len() as u64).await;
            for (destination, records) in by_destination(&plan.writes) {
                let (topic, target) = match destination {
                    Destination::Target(p) => (self.spec.target.clone(), p),
                    Destination::Quarantine => (self.spec.quarantine.as_ref().map(|q| q.topic.clone()).unwrap_or_default(), 0),
                };
                let mut rest = records;
                while !rest.is_empty() {
                    let (batch, n) = redrive_batch(&rest, size_max)?;
                    self.alive()?;
                    match self.client.produce(&topic, target, batch).await {
                        Ok(landed) => {
                            if let Some(t) = self.progress.targets.iter_mut().find(|t| t.topic == topic && t.partition == target) {
                                t.next = landed.base_offset + u64::from(landed.record_count);
                            }
                            rest.drain(..n);
                        }
                        Err(Refusal::Stored(indexes)) => {
                            // Stored by an earlier runner within the dedupe window: send the rest again.
                            let stored: BTreeSet<usize> = indexes.into_iter().map(|i| i as usize).collect();
                            let mut i = 0;
                            rest.retain(|_| {
                                let keep = i >= n || !stored.contains(&i);
                                i += 1;
                                keep
                            });
                        }
                        Err(Refusal::Failed(e)) => return Err(Stop::Retry(e)),
                    }
                }
            }
            self.progress.next = plan.next;
            self.progress.copied += plan.copied;
            self.progress.skipped += plan.skipped;
            self.progress.quarantined += plan.quarantined;
            self.moved.extend(&plan.moved);
            crate::metrics::job_messages("redrive", plan.copied, plan.skipped, plan.quarantined);
            self.checkpoint_if_due().await?;
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
