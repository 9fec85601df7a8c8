//! The job table in the metadata fold: replay and redrive jobs, their state and
//! per-partition progress checkpoints, replicated with the rest of the metadata so a
//! job survives leader changes and restarts and resumes where its last checkpoint says.
//! Finished jobs stay as the audit trail (who asked, what, when, how many), the oldest
//! forgotten first beyond [`JOBS_KEPT_MAX`]. It also remembers which dead letters
//! redrives moved, so each is redriven once.

use std::collections::BTreeMap;

use keel_protocol::job::{Job, JobAction, JobKind, JobSpec, JobState, OffsetRanges, PartitionProgress};
use serde::{Deserialize, Serialize};

use super::state::Rejection;

/// Finished jobs kept (the audit trail); the oldest finished one is dropped first.
pub const JOBS_KEPT_MAX: usize = 1_000;
/// Jobs running or paused at once.
pub const JOBS_ACTIVE_MAX: usize = 64;

/// Every job the cluster remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTable {
    pub jobs: BTreeMap<u64, Job>,
    /// The next job id (ids are never reused).
    pub next_id: u64,
    /// Per dead-letter topic, the dead letters redrives have moved (redriven or
    /// quarantined), so a later redrive skips them.
    pub redriven: BTreeMap<String, OffsetRanges>,
}

impl JobTable {
    /// Records a new job, running, created by the entry at `offset`; returns its id. A
    /// job with nothing to copy is done at once. A redrive is refused while another
    /// redrive of the same dead-letter topic is active (both would move the same
    /// letters).
    pub fn create(&mut self, spec: &JobSpec, at_ms: i64, offset: u64) -> Result<u64, Rejection> {
        spec.validate().map_err(Rejection::Invalid)?;
        if let Some(existing) = self.by_request(&spec.request_id) {
            return Ok(existing.id); // a retried create: the job exists
        }
        let active = self.jobs.values().filter(|j| !j.state.finished()).count();
        if active >= JOBS_ACTIVE_MAX {
            return Err(Rejection::LimitReached(format!("{JOBS_ACTIVE_MAX} jobs are running or paused; cancel or wait for one")));
        }
        if spec.kind == JobKind::Redrive {
            if let Some(other) = self.jobs.values().find(|j| !j.state.finished() && j.spec.kind == JobKind::Redrive && j.spec.source == spec.source) {
                return Err(Rejection::Invalid(format!(
                    "job {} is already redriving {} ({}); wait for it, or cancel it with `keel job cancel {}`",
                    other.id,
                    spec.source,
                    other.state.name(),
                    other.id
                )));
            }
        }
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        let progress = spec
            .ranges
            .iter()
            .map(|r| PartitionProgress { partition: r.partition, next: r.from, until: r.until, copied: 0, skipped: 0, quarantined: 0, targets: Vec::new() })
            .collect::<Vec<_>>();
        let state = if progress.iter().all(PartitionProgress::done) { JobState::Done } else { JobState::Running };
        self.jobs.insert(id, Job { id, spec: spec.clone(), state, created_at_ms: at_ms, updated_at_ms: at_ms, created_at_offset: offset, progress });
        self.trim();
        Ok(id)
    }

    /// A checkpoint of one partition, with the dead letters a redrive moved since the
    /// last one. Progress only moves forward (a repeated or older checkpoint changes
    /// nothing) and never past the range's end; a job whose every partition is done is
    /// done.
    pub fn progress(&mut self, id: u64, checkpoint: &PartitionProgress, moved: &OffsetRanges, at_ms: i64) -> Result<(), Rejection> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| Rejection::Invalid(format!("job {id} does not exist")))?;
        if job.state.finished() {
            return Err(Rejection::Invalid(format!("job {id} is {}: no more progress", job.state.name())));
        }
        let p = job
            .progress
            .iter_mut()
            .find(|p| p.partition == checkpoint.partition)
            .ok_or_else(|| Rejection::Invalid(format!("job {id} has no partition {}", checkpoint.partition)))?;
        if checkpoint.next > p.until {
            return Err(Rejection::Invalid(format!("job {id} partition {}: checkpoint {} past the range's end {}", p.partition, checkpoint.next, p.until)));
        }
        if !moved.is_empty() && !self.redriven.entry(job.spec.source.clone()).or_default().extend(moved) {
            tracing::warn!(job = id, topic = %job.spec.source, "the record of redriven dead letters is full; later redrives may move some of them again");
        }
        let older = checkpoint.next < p.next || (checkpoint.next == p.next && checkpoint.handled() <= p.handled() && checkpoint.targets == p.targets);
        if older {
            return Ok(()); // an older or repeated checkpoint
        }
        *p = PartitionProgress { until: p.until, ..checkpoint.clone() };
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
            // A failed job may be resumed once its cause is fixed (a topic recreated,
            // space freed); it goes on from its last checkpoint.
            (JobState::Paused | JobState::Failed(_), JobAction::Resume) => JobState::Running,
            (JobState::Running | JobState::Paused, JobAction::Cancel) => JobState::Cancelled,
            (JobState::Running | JobState::Paused, JobAction::Fail(reason)) => JobState::Failed(reason.clone()),
            // Asking for the state it is in: nothing to do.
            (JobState::Paused, JobAction::Pause) | (JobState::Running, JobAction::Resume) => return Ok(()),
            (state, action) => return Err(Rejection::Invalid(format!("job {id} is {}; {action:?} does not apply", state.name()))),
        };
        job.state = next;
        job.updated_at_ms = at_ms;
        self.trim();
        Ok(())
    }

    /// The job created for request `request_id` (none for an empty id).
    pub fn by_request(&self, request_id: &str) -> Option<&Job> {
        if request_id.is_empty() {
            return None;
        }
        self.jobs.values().find(|j| j.spec.request_id == request_id)
    }

    /// Jobs the runner should be working on.
    pub fn running(&self) -> impl Iterator<Item = &Job> {
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
            redrive: Default::default(),
            quarantine: None,
            exclude: OffsetRanges::default(),
            rate: 0,
            chunk_records: 100,
            chunk_bytes: 1 << 16,
            requested_by: "ops".into(),
            request_id: String::new(),
        }
    }

    fn checkpoint(partition: u32, next: u64, copied: u64) -> PartitionProgress {
        PartitionProgress { partition, next, until: 0, copied, skipped: 0, quarantined: 0, targets: Vec::new() }
    }

    #[test]
    fn a_job_runs_until_every_partition_is_checkpointed_at_its_end() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 10, 20), (1, 0, 5)]), 1_000, 0).unwrap();
        assert_eq!(t.jobs[&id].state, JobState::Running);
        t.progress(id, &checkpoint(0, 20, 10), &OffsetRanges::default(), 1_001).unwrap();
        assert_eq!(t.jobs[&id].state, JobState::Running, "partition 1 is not done");
        t.progress(id, &checkpoint(1, 5, 5), &OffsetRanges::default(), 1_002).unwrap();
        assert_eq!((t.jobs[&id].state.clone(), t.jobs[&id].copied()), (JobState::Done, 15));
        assert!(t.progress(id, &checkpoint(1, 5, 5), &OffsetRanges::default(), 1_003).is_err(), "a done job takes no more progress");
        assert_eq!(t.create(&spec(&[(0, 7, 7)]), 1_004, 0).map(|id| t.jobs[&id].state.clone()), Ok(JobState::Done), "nothing to copy: done at once");
    }

    #[test]
    fn progress_never_goes_back_nor_past_the_end() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 0, 100)]), 0, 0).unwrap();
        t.progress(id, &checkpoint(0, 50, 50), &OffsetRanges::default(), 1).unwrap();
        t.progress(id, &checkpoint(0, 40, 40), &OffsetRanges::default(), 2).unwrap();
        assert_eq!(t.jobs[&id].progress[0].next, 50, "an older checkpoint (a retried proposal) changes nothing");
        assert!(t.progress(id, &checkpoint(0, 101, 101), &OffsetRanges::default(), 3).is_err());
        assert!(t.progress(id, &checkpoint(3, 1, 1), &OffsetRanges::default(), 3).is_err(), "no such partition");
    }

    #[test]
    fn a_retried_create_finds_the_job_its_first_attempt_made() {
        let mut t = JobTable::default();
        let asked = JobSpec { request_id: "r-1".into(), ..spec(&[(0, 0, 100)]) };
        let id = t.create(&asked, 0, 0).unwrap();
        assert_eq!(t.create(&asked, 1, 1).unwrap(), id);
        assert_eq!(t.jobs.len(), 1);
        assert_ne!(t.create(&JobSpec { request_id: "r-2".into(), ..asked }, 2, 2).unwrap(), id);
    }

    #[test]
    fn a_redrive_waits_for_the_active_redrive_of_the_same_dead_letter_topic() {
        use keel_protocol::job::QuarantineRule;
        let mut t = JobTable::default();
        let redrive =
            JobSpec { kind: JobKind::Redrive, quarantine: Some(QuarantineRule { max_redrives: 3, topic: "orders.quarantine".into() }), ..spec(&[(0, 0, 10)]) };
        let first = t.create(&redrive, 0, 0).unwrap();
        assert!(matches!(t.create(&redrive, 1, 1), Err(Rejection::Invalid(e)) if e.contains("already redriving")));
        let mut moved = OffsetRanges::default();
        moved.insert(0, 4);
        t.progress(first, &checkpoint(0, 10, 4), &moved, 2).unwrap();
        assert_eq!(t.jobs[&first].state, JobState::Done);
        assert!(t.redriven["orders"].contains(3) && !t.redriven["orders"].contains(4), "the letters it moved are remembered");
        t.create(&redrive, 3, 3).expect("once it is done, another may start");
    }

    #[test]
    fn pause_resume_and_cancel_follow_the_state_machine() {
        let mut t = JobTable::default();
        let id = t.create(&spec(&[(0, 0, 100)]), 0, 0).unwrap();
        t.control(id, &JobAction::Pause, 1).unwrap();
        assert_eq!(t.running().count(), 0);
        t.control(id, &JobAction::Pause, 2).unwrap();
        t.control(id, &JobAction::Resume, 3).unwrap();
        assert_eq!(t.running().count(), 1);
        t.control(id, &JobAction::Cancel, 4).unwrap();
        assert!(t.control(id, &JobAction::Resume, 5).is_err(), "a cancelled job stays cancelled");
        assert!(t.progress(id, &checkpoint(0, 10, 10), &OffsetRanges::default(), 6).is_err());
    }

    #[test]
    fn the_audit_trail_and_the_active_jobs_are_bounded() {
        let mut t = JobTable::default();
        for i in 0..JOBS_ACTIVE_MAX {
            t.create(&spec(&[(0, 0, 1)]), i as i64, 0).unwrap();
        }
        assert!(matches!(t.create(&spec(&[(0, 0, 1)]), 0, 0), Err(Rejection::LimitReached(_))));
        for id in 1..=JOBS_ACTIVE_MAX as u64 {
            t.control(id, &JobAction::Cancel, 0).unwrap();
        }
        for _ in 0..JOBS_KEPT_MAX + 10 {
            t.create(&spec(&[(0, 5, 5)]), 0, 0).unwrap();
        }
        assert_eq!(t.jobs.len(), JOBS_KEPT_MAX);
        assert!(!t.jobs.contains_key(&1), "the oldest finished job is forgotten first");
        assert_eq!(t.next_id, (JOBS_ACTIVE_MAX + JOBS_KEPT_MAX + 10 + 1) as u64, "ids are never reused");
    }
}
