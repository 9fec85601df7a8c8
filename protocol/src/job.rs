//! Replay and redrive jobs as clients ask for them and the metadata log records them:
//! what a job copies ([`JobSpec`]: source, target, per-partition offset ranges, a
//! filter, a rate), its [`JobState`] and its per-partition [`PartitionProgress`].
//!
//! A spec travels as JSON inside postcard bodies (like topic configs), so fields can be
//! added later without a new protocol version. Time ranges are resolved to offsets when
//! a job is created, so a job's work is fixed and its resumption deterministic.

use serde::{Deserialize, Serialize};

use crate::batch::RecordView;

/// Highest rate a job may be given, in messages per second (0 means unlimited).
pub const JOB_RATE_MAX: u32 = 1_000_000;
/// Most header conditions one filter may hold.
pub const JOB_FILTER_HEADERS_MAX: usize = 16;
/// Longest `requested_by`, in bytes.
pub const JOB_REQUESTER_LEN_MAX: usize = 128;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Copies a range of a topic into another topic.
    Replay,
    /// Sends dead letters back to their source topic (or another).
    Redrive,
}

/// What a record must carry to be copied; an empty filter copies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobFilter {
    /// Only records with exactly this key.
    pub key: Option<String>,
    /// Only records carrying every one of these headers with exactly this value.
    pub headers: Vec<(String, String)>,
}

impl JobFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &RecordView<'_>) -> bool {
        if let Some(key) = &self.key {
            if record.key != Some(key.as_bytes()) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| record.headers().any(|(k, v)| k == name && v == Some(value.as_bytes())))
    }
}

/// Offsets `from..until` of one source partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRange {
    pub partition: u32,
    pub from: u64,
    pub until: u64,
}

/// A job's whole definition, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub kind: JobKind,
    pub source: String,
    pub target: String,
    /// The source ranges to copy, one per partition at most.
    pub ranges: Vec<PartitionRange>,
    #[serde(default)]
    pub filter: JobFilter,
    /// Messages copied per second, over the whole job; 0: as fast as it goes.
    #[serde(default)]
    pub rate: u32,
    /// Who asked (the audit trail's "who").
    #[serde(default)]
    pub requested_by: String,
}

impl JobSpec {
    /// Checks the spec's own bounds (topics existing is the metadata fold's business).
    pub fn validate(&self) -> Result<(), String> {
        if self.source.is_empty() || self.target.is_empty() {
            return Err("a job needs a source and a target topic".into());
        }
        if self.source == self.target {
            return Err(format!("a job may not copy {} into itself", self.source));
        }
        if self.ranges.is_empty() {
            return Err("a job needs at least one partition range".into());
        }
        let mut partitions: Vec<u32> = self.ranges.iter().map(|r| r.partition).collect();
        partitions.sort_unstable();
        if partitions.windows(2).any(|w| w[0] == w[1]) {
            return Err("a partition appears twice in the job's ranges".into());
        }
        if let Some(r) = self.ranges.iter().find(|r| r.from > r.until) {
            return Err(format!("partition {}'s range starts at {} after its end {}", r.partition, r.from, r.until));
        }
        if self.rate > JOB_RATE_MAX {
            return Err(format!("rate {} is above {JOB_RATE_MAX} messages/s", self.rate));
        }
        if self.filter.headers.len() > JOB_FILTER_HEADERS_MAX {
            return Err(format!("at most {JOB_FILTER_HEADERS_MAX} header conditions"));
        }
        if self.requested_by.len() > JOB_REQUESTER_LEN_MAX {
            return Err(format!("requested_by is longer than {JOB_REQUESTER_LEN_MAX} bytes"));
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job spec always encodes as JSON")
    }

    pub fn from_json(json: &str) -> Result<JobSpec, String> {
        serde_json::from_str(json).map_err(|e| format!("job spec does not parse: {e}"))
    }

    /// Messages in the source ranges (before filtering).
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.until - r.from).sum()
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Paused,
    Cancelled,
    Done,
    Failed(String),
}

impl JobState {
    /// Whether the job will never run again.
    pub fn finished(&self) -> bool {
        matches!(self, JobState::Cancelled | JobState::Done | JobState::Failed(_))
    }
}

/// A change asked of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobAction {
    Pause,
    Resume,
    Cancel,
    /// Given up by its runner, for `reason`.
    Fail(String),
}

/// One source partition's progress: `next` is the first source offset not yet
/// handled; `target_next` the target partition's end after the last copy checkpointed
/// (where a resumed runner looks for copies made after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    pub next: u64,
    pub until: u64,
    pub copied: u64,
    pub skipped: u64,
    pub target_next: u64,
}

impl PartitionProgress {
    pub fn done(&self) -> bool {
        self.next >= self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchOptions, BatchView, NewRecord};

    fn spec() -> JobSpec {
        JobSpec {
            kind: JobKind::Replay,
            source: "orders".into(),
            target: "orders.recon".into(),
            ranges: vec![PartitionRange { partition: 0, from: 10, until: 20 }, PartitionRange { partition: 1, from: 0, until: 5 }],
            filter: JobFilter::default(),
            rate: 100,
            requested_by: "ops@host".into(),
        }
    }

    #[test]
    fn a_spec_round_trips_as_json_and_its_bounds_are_checked() {
        let s = spec();
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        assert_eq!(s.total(), 15);
        assert!(s.validate().is_ok());
        let into_itself = JobSpec { target: "orders".into(), ..spec() };
        assert!(into_itself.validate().unwrap_err().contains("into itself"));
        let backwards = JobSpec { ranges: vec![PartitionRange { partition: 0, from: 5, until: 4 }], ..spec() };
        assert!(backwards.validate().is_err());
        let twice = JobSpec { ranges: vec![PartitionRange { partition: 0, from: 0, until: 1 }; 2], ..spec() };
        assert!(twice.validate().is_err());
        assert!(JobSpec { rate: JOB_RATE_MAX + 1, ..spec() }.validate().is_err());
        // Fields added later take their defaults.
        let old = r#"{"kind":"replay","source":"a","target":"b","ranges":[{"partition":0,"from":0,"until":1}]}"#;
        assert_eq!(JobSpec::from_json(old).unwrap().rate, 0);
    }

    #[test]
    fn a_filter_matches_key_and_every_header() {
        let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
        let h1 = [("region", Some(&b"eu"[..])), ("type", Some(&b"refund"[..]))];
        b.push(NewRecord { timestamp_ms: 1, key: Some(b"o-17"), value: Some(b"x"), headers: &h1, ..NewRecord::default() }).unwrap();
        b.push(NewRecord { timestamp_ms: 1, key: Some(b"o-18"), value: Some(b"y"), headers: &h1[..1], ..NewRecord::default() }).unwrap();
        let view = BatchView::validate(b.finish().unwrap()).unwrap();
        let records: Vec<_> = view.records().map(Result::unwrap).collect();
        let all = JobFilter::default();
        assert!(records.iter().all(|r| all.matches(r)));
        let by_key = JobFilter { key: Some("o-17".into()), headers: vec![] };
        assert_eq!(records.iter().map(|r| by_key.matches(r)).collect::<Vec<_>>(), [true, false]);
        let refunds_in_eu = JobFilter { key: None, headers: vec![("region".into(), "eu".into()), ("type".into(), "refund".into())] };
        assert_eq!(records.iter().map(|r| refunds_in_eu.matches(r)).collect::<Vec<_>>(), [true, false]);
    }
}
