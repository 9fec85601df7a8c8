//! Bodies of the job APIs (protocol version 4): create, list and control replay and
//! redrive jobs. Requests, specs and jobs are JSON strings inside the postcard bodies
//! (see `job`), so they can grow fields without a protocol version.

use serde::{Deserialize, Serialize};

use crate::job::{Job, JobAction, JobRequest, JobSpec};

/// The protocol version that added scheduled delivery and jobs.
pub const VERSION_4: u16 = 4;

/// `CreateJob`: a [`JobRequest`] as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateJobRequest {
    pub request_json: String,
}

impl CreateJobRequest {
    pub fn new(request: &JobRequest) -> CreateJobRequest {
        CreateJobRequest { request_json: serde_json::to_string(request).expect("a job request always encodes as JSON") }
    }

    pub fn request(&self) -> Result<JobRequest, String> {
        serde_json::from_str(&self.request_json).map_err(|e| format!("the job request does not parse: {e}"))
    }
}

/// The job created (a [`Job`] as JSON), or for a dry run the spec it would run
/// (a [`JobSpec`] as JSON) and no job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateJobResponse {
    pub job_json: Option<String>,
    pub spec_json: String,
}

impl CreateJobResponse {
    pub fn job(&self) -> Result<Option<Job>, String> {
        self.job_json.as_deref().map(|j| serde_json::from_str(j).map_err(|e| format!("the job does not parse: {e}"))).transpose()
    }

    pub fn spec(&self) -> Result<JobSpec, String> {
        JobSpec::from_json(&self.spec_json)
    }
}

/// `ListJobs`: one job, the jobs running or paused, or every job remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListJobsRequest {
    pub id: Option<u64>,
    /// Finished jobs too (the audit trail).
    pub all: bool,
}

/// Jobs as JSON (a `Vec<Job>`), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListJobsResponse {
    pub jobs_json: String,
}

impl ListJobsResponse {
    pub fn jobs(&self) -> Result<Vec<Job>, String> {
        serde_json::from_str(&self.jobs_json).map_err(|e| format!("the job list does not parse: {e}"))
    }
}

/// `ControlJob`: pause, resume or cancel a job; answered with the job after it (as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlJobRequest {
    pub id: u64,
    pub action: JobAction,
}
