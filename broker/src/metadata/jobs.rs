//! The job table in the metadata fold: replay and redrive jobs, their state and
//! per-partition progress checkpoints, replicated with the rest of the metadata so a
//! job survives leader changes and restarts and resumes where its last checkpoint says.
//! Finished jobs stay as the audit trail (who asked, what, when, how many), the oldest
//! forgotten first beyond [`JOBS_KEPT_MAX`].

use std::collections::BTreeMap;

use keel_protocol::job::{JobAction, JobSpec, JobState, PartitionProgress};
use serde::{Deserialize, Serialize};

use super::state::Rejection;

/// Finished jobs kept (the audit trail); the oldest finished one is dropped first.
pub const JOBS_KEPT_MAX: usize = 1_000;
/// Jobs running or paused at once.
pub const JOBS_ACTIVE_MAX: usize = 64;

/// One job as the metadata records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub spec: JobSpec,
    pub state: JobState,
    /// Proposer's clock when it was created, and when its state or progress last changed.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Per source partition, in the spec's order.
    pub progress: Vec<PartitionProgress>,
}

impl JobRecord {
    pub fn copied(&self) -> u64 {
        self.progress.iter().map(|p| p.copied).sum()
    }

    pub fn skipped(&self) -> u64 {
        self.progress.iter().map(|p| p.skipped).sum()
    }
}

/// Every job the cluster remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTable {
    pub jobs: BTreeMap<u64, JobRecord>,
    /// The next job id (ids are never reused).
    pub next_id: u64,
}

impl JobTable {
    /// Records a new job, running; returns its id. A job with nothing to copy is done
    /// at once.
    pub fn create(&mut self, spec: &JobSpec, at_ms: i64) -> Result<u64, Rejection> {
        spec.validate().map_err(Rejection::Invalid)?;
        let active = self.jobs.values().filter(|j| !j.state.finished()).count();
        if active >= JOBS_ACTIVE_MAX {
            return Err(Rejection::LimitReached(format!("{JOBS_ACTIVE_MAX} jobs are running or paused; cancel or wait for one")));
        }
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        let progress = spec
            .ranges
            .iter()
            .map(|r| PartitionProgress { partition: r.partition, next: r.from, until: r.until, copied: 0, skipped: 0, target_next: 0 })
            .collect::<Vec<_>>();
        let state = if progress.iter().all(PartitionProgress::done) { JobState::Done } else { JobState::Running };
        self.jobs.insert(id, JobRecord { id, spec: spec.clone(), state, created_at_ms: at_ms, updated_at_ms: at_ms, progress });
        self.trim();
        Ok(id)
    }

    /// A checkpoint of one partition. Progress only moves forward (a repeated or older
    /// checkpoint changes nothing) and never past the range's end; a job whose every
    /// partition is done is done.
    pub fn progress(&mut self, id: u64, checkpoint: &PartitionProgress, at_ms: i64) -> Result<(), Rejection> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| Rejection::Invalid(format!("job {id} does not exist")))?;
        if job.state.finished() {
            return Err(Rejection::Invalid(format!("job {id} is {:?}: no more progress", job.state)));
        }
        let p = job
            .progress
            .iter_mut()
            .find(|p| p.partition == checkpoint.partition)
            .ok_or_else(|| Rejection::Invalid(format!("job {id} has no partition {}", checkpoint.partition)))?;
        if checkpoint.next > p.until {
            return Err(Rejection::Invalid(format!("job {id} partition {}: checkpoint {} past the range's end {}", p.partition, checkpoint.next, p.until)));
        }
        if checkpoint.next < p.next || (checkpoint.next == p.next && checkpoint.copied + checkpoint.skipped <= p.copied + p.skipped) {
            return Ok(()); // an older or repeated checkpoint
        }
        *p = PartitionProgress { until: p.until, ..*checkpoint };
        job.updated_at_ms = at_ms;
        if job.progress.iter().all(PartitionProgress::done) {
            job.state = JobState::Done;
            self.trim();
        }
        Ok(())
    }

    /// Pause, resume, cancel or fail a job.
    pub fn control(&mut self, id: u64, action: &JobAction, at_ms: i64) -> Result<(), Rejection> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| Rejection::Invalid(format!("job {id} does not exist")))?;
        let next = match (&job.state, action) {
            (JobState::Running, JobAction::Pause) => JobState::Paused,
            (JobState::Paused, JobAction::Resume) => JobState::Running,
            (JobState::Running | JobState::Paused, JobAction::Cancel) => JobState::Cancelled,
            (JobState::Running | JobState::Paused, JobAction::Fail(reason)) => JobState::Failed(reason.clone()),
            // Asking for the state it is in: nothing to do.
            (JobState::Paused, JobAction::Pause) | (JobState::Running, JobAction::Resume) => return Ok(()),
            (state, action) => return Err(Rejection::Invalid(format!("job {id} is {state:?}; {action:?} does not apply"))),
        };
        job.state = next;
        job.updated_at_ms = at_ms;
        self.trim();
        Ok(())
    }

    /// Jobs the runner should be working on.
    pub fn running(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values().filter(|j| j.state == JobState::Running)
    }

    /// Drops the oldest finished jobs beyond `JOBS_KEPT_MAX`.
    fn trim(&mut self) {
        let finished: Vec<u64> = self.jobs.values().filter(|j| j.state.finished()).map(|j| j.id).collect();
        for id in finished.iter().take(finished.len().saturating_sub(JOBS_KEPT_MAX)) {
            self.jobs.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::job::{JobFilter, JobKind, PartitionRange};

    fn spec(ranges: &[(u32, u64, u64)]) -> JobSpec {
        JobSpec {
            kind: JobKind::Replay,
            source: "orders".into(),
            target: "orders.recon".into(),
            ranges: ranges.iter().map(|(p, f, u)| PartitionRange { partition: *p, from: *f, until: *u }).collect(),
            filter: JobFilter::default(),
            rate: 0,
            requested_by: "ops".into(),
        }
    }

    fn checkpoint(partition: u32, next: u64, copied: u64) -> PartitionProgress {
        PartitionProgress { partition, next, until: 0, copied, skipped: 0, target_next: copied }
    }

    #[test]
    fn a_job_runs_until_every_partition_is_checkpointed_at_its_end() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 10, 20), (1, 0, 5)]), 1_000).unwrap();
        assert_eq!(t.jobs[&id].state, JobState::Running);
        t.progress(id, &checkpoint(0, 20, 10), 1_001).unwrap();
        assert_eq!(t.jobs[&id].state, JobState::Running, "partition 1 is not done");
        t.progress(id, &checkpoint(1, 5, 5), 1_002).unwrap();
        assert_eq!((t.jobs[&id].state.clone(), t.jobs[&id].copied()), (JobState::Done, 15));
        assert!(t.progress(id, &checkpoint(1, 5, 5), 1_003).is_err(), "a done job takes no more progress");
        assert_eq!(t.create(&spec(&[(0, 7, 7)]), 1_004).map(|id| t.jobs[&id].state.clone()), Ok(JobState::Done), "nothing to copy: done at once");
    }

    #[test]
    fn progress_never_goes_back_nor_past_the_end() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 0, 100)]), 0).unwrap();
        t.progress(id, &checkpoint(0, 50, 50), 1).unwrap();
        t.progress(id, &checkpoint(0, 40, 40), 2).unwrap();
        assert_eq!(t.jobs[&id].progress[0].next, 50, "an older checkpoint (a retried proposal) changes nothing");
        assert!(t.progress(id, &checkpoint(0, 101, 101), 3).is_err());
        assert!(t.progress(id, &checkpoint(3, 1, 1), 3).is_err(), "no such partition");
    }

    #[test]
    fn pause_resume_and_cancel_follow_the_state_machine() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 0, 100)]), 0).unwrap();
        t.control(id, &JobAction::Pause, 1).unwrap();
        assert_eq!(t.running().count(), 0);
        t.control(id, &JobAction::Pause, 2).unwrap();
        t.control(id, &JobAction::Resume, 3).unwrap();
        assert_eq!(t.running().count(), 1);
        t.control(id, &JobAction::Cancel, 4).unwrap();
        assert!(t.control(id, &JobAction::Resume, 5).is_err(), "a cancelled job stays cancelled");
        assert!(t.progress(id, &checkpoint(0, 10, 10), 6).is_err());
    }

    #[test]
    fn the_audit_trail_and_the_active_jobs_are_bounded() {
        let mut t = JobTable::default();
        for i in 0..JOBS_ACTIVE_MAX {
            t.create(&spec(&[(0, 0, 1)]), i as i64).unwrap();
        }
        assert!(matches!(t.create(&spec(&[(0, 0, 1)]), 0), Err(Rejection::LimitReached(_))));
        for id in 1..=JOBS_ACTIVE_MAX as u64 {
            t.control(id, &JobAction::Cancel, 0).unwrap();
        }
        for _ in 0..JOBS_KEPT_MAX + 10 {
            t.create(&spec(&[(0, 5, 5)]), 0).unwrap();
        }
        assert_eq!(t.jobs.len(), JOBS_KEPT_MAX);
        assert!(!t.jobs.contains_key(&1), "the oldest finished job is forgotten first");
        assert_eq!(t.next_id, (JOBS_ACTIVE_MAX + JOBS_KEPT_MAX + 10 + 1) as u64, "ids are never reused");
    }
}
