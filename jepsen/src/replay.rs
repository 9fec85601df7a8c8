//! Workload W4 `replay`: replay jobs of the W1 topic while the nemesis runs.
//!
//! Every `REPLAY_EVERY` of the run (at most `--replays` times) the replayer asks the
//! cluster to replay the W1 topic, from its start to its end at that moment, into a
//! fresh topic `jepsen-log.replay-<k>`, at `REPLAY_RATE` messages/s so the job lives
//! through faults (kills of the node running it included). Each create is recorded
//! (`invoke`); after the cluster is healed the runner waits for every job to end and
//! records its final state and resolved ranges (`ok`). The checker compares each target
//! partition with its source range in the nodes' final logs: every message once, in
//! order (`checker::replay`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::job::{JobFilter, JobKind, JobRequest, JobState, Position, RedriveFilter};
use keel_client::Admin;

use crate::history::{Actor, Kind, Op, ReplayOp};
use crate::workload::{Ctx, LOG_TOPIC};

/// Time between two replay jobs' creation.
const REPLAY_EVERY: Duration = Duration::from_secs(12);
/// Messages per second each replay copies (slow enough to live through faults).
const REPLAY_RATE: u32 = 300;
/// How long the runner waits, after healing, for the jobs to end.
pub const REPLAY_FINISH_LIMIT: Duration = Duration::from_secs(90);
/// How long one create keeps being retried through faults.
const CREATE_DEADLINE: Duration = Duration::from_secs(20);

/// The replay jobs created: (history id of the create, target, job id).
pub type Replays = Arc<Mutex<Vec<(u64, String, Option<u64>)>>>;

/// The target topic of the `k`th replay.
pub fn replay_target(k: usize) -> String {
    format!("{LOG_TOPIC}.replay-{k}")
}

/// Creates up to `count` replay jobs, one every `REPLAY_EVERY`, until the run stops.
pub async fn replayer(ctx: Ctx, count: usize, replays: Replays) -> Result<(), keel_client::ClientError> {
    let admin = Admin::new(ctx.cluster.clone());
    for k in 0..count {
        let wake = Instant::now() + REPLAY_EVERY;
        while Instant::now() < wake {
            if ctx.stopped() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let target = replay_target(k);
        let id = ctx.recorder.invoke(Actor::Runner, Op::Replay(ReplayOp { target: target.clone(), job: None, state: None, ranges: Vec::new() }));
        let request = JobRequest {
            kind: JobKind::Replay,
            source: LOG_TOPIC.to_string(),
            target: Some(target.clone()),
            partitions: Vec::new(),
            from: Position::Earliest,
            until: Position::Latest,
            filter: JobFilter::default(),
            redrive: RedriveFilter::default(),
            max_redrives: None,
            rate: REPLAY_RATE,
            requested_by: "keel-jepsen".into(),
            dry_run: false,
            // One id for every attempt: a create retried after a lost answer finds its job.
            request_id: format!("jepsen-replay-{k}-{:x}", fastrand::u64(..)),
        };
        let deadline = Instant::now() + CREATE_DEADLINE;
        let job = loop {
            match admin.create_job(request.clone()).await {
                Ok(created) => break created.job.map(|j| j.id),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "creating a replay job failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, target = %target, "a replay job could not be created");
                    break None;
                }
            }
        };
        replays.lock().expect("replays lock poisoned").push((id, target, job));
    }
    Ok(())
}

/// Waits (bounded) for every replay job to end, and records how each ended.
pub async fn finish(ctx: &Ctx, replays: &Replays) {
    let admin = Admin::new(ctx.cluster.clone());
    let jobs = replays.lock().expect("replays lock poisoned").clone();
    let deadline = Instant::now() + REPLAY_FINISH_LIMIT;
    for (id, target, job) in jobs {
        let Some(job_id) = job else {
            let op = Op::Replay(ReplayOp { target, job: None, state: None, ranges: Vec::new() });
            ctx.recorder.complete(id, Actor::Runner, Kind::Fail, op, Some("not created".into()));
            continue;
        };
        let ended = loop {
            match admin.job(job_id).await {
                Ok(j) if j.state.finished() || Instant::now() >= deadline => break Some(j),
                Ok(_) => {}
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(error = %e, job = job_id, "replay job state unknown");
                    break None;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let (state, ranges) = match ended {
            Some(j) => {
                let state = match &j.state {
                    JobState::Failed(reason) => format!("failed: {reason}"),
                    s => s.name().to_string(),
                };
                (Some(state), j.spec.ranges.iter().map(|r| (r.partition, r.from, r.until)).collect())
            }
            None => (None, Vec::new()),
        };
        ctx.recorder.complete(id, Actor::Runner, Kind::Ok, Op::Replay(ReplayOp { target, job: Some(job_id), state, ranges }), None);
    }
}
