//! Replay and redrive jobs as clients ask for them and the metadata log records them:
//! what a client asks ([`JobRequest`]: positions as offsets or times), what a job
//! copies once the request is resolved ([`JobSpec`]: source, target, per-partition
//! offset ranges, a filter, a rate, the copy-batch size), the job as the cluster
//! records it ([`Job`]: state and per-partition [`PartitionProgress`]), and the rules
//! both the broker and a client's dry run apply to each record ([`JobSpec::select`]).
//!
//! Requests, specs and jobs travel as JSON inside postcard bodies (like topic configs),
//! so fields can be added later without a new protocol version. Positions are resolved
//! to offsets when a job is created, so a job's work is fixed and its resumption
//! deterministic.
//!
//! **Copies are recognisable.** A replay writes each source partition's selected
//! records, in order, to the same partition of the target in copy batches whose
//! boundaries depend only on the spec and the source (see the broker's job plan); the
//! last record of each copy batch carries the message id [`replay_marker`]. A redrive
//! gives every redriven record the id [`redrive_id`] (and a quarantined one
//! [`quarantine_id`]). A runner resuming after a crash finds in the target what was
//! written after its last checkpoint by these ids, so nothing is copied twice.

use serde::{Deserialize, Serialize};

use crate::batch::RecordView;

/// Highest rate a job may be given, in messages per second (0 means unlimited).
pub const JOB_RATE_MAX: u32 = 1_000_000;
/// Most header conditions one filter may hold.
pub const JOB_FILTER_HEADERS_MAX: usize = 16;
/// Longest `requested_by`, in bytes.
pub const JOB_REQUESTER_LEN_MAX: usize = 128;
/// Most records one copy batch holds.
pub const JOB_CHUNK_RECORDS_MAX: u32 = 4_096;
/// Largest copy batch in bytes (a smaller target `max_message_bytes` lowers it).
pub const JOB_CHUNK_BYTES_MAX: u32 = 1 << 20;
/// A rate-limited job's copy batches hold at most this many seconds of its rate, so
/// its pace is smooth (a 1,000 msgs/s job writes batches of 50).
pub const JOB_CHUNK_SECONDS_OF_RATE: f64 = 0.05;
/// How many times a message may be redriven before a redrive quarantines it instead
/// (when the request does not say).
pub const REDRIVES_MAX_DEFAULT: u32 = 3;
/// Highest redrive limit a request may set.
pub const REDRIVES_MAX_LIMIT: u32 = 100;

/// The header carrying a dead letter's failure record (JSON, see [`DeadLetter`]).
pub const FAILURE_HEADER: &str = "keel-dlq";
/// How many times a message was redriven (decimal); absent means never.
pub const REDRIVE_COUNT_HEADER: &str = "keel-redrive-count";
/// On a redriven message: the dead letter it came from, `<dead-letter topic>@<offset>`.
pub const REDRIVEN_FROM_HEADER: &str = "keel-redriven-from";
/// On a copied record: the message id the source record carried (the copy's own id
/// slot is the job's, see the module docs).
pub const ORIGIN_ID_HEADER: &str = "keel-origin-message-id";

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Copies a range of a topic into another topic.
    Replay,
    /// Sends dead letters back to their source topic (or another).
    Redrive,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Replay => "replay",
            JobKind::Redrive => "redrive",
        }
    }
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

/// A record's headers as a filter reads them: any iterator over `(name, value)`
/// (a batch's `RecordView::headers()`, or a client `Message`'s, borrowed).
pub trait Headers<'h>: Iterator<Item = (&'h str, Option<&'h [u8]>)> + Clone {}

impl<'h, I: Iterator<Item = (&'h str, Option<&'h [u8]>)> + Clone> Headers<'h> for I {}

fn header<'h>(mut headers: impl Headers<'h>, name: &str) -> Option<Option<&'h [u8]>> {
    headers.find(|(k, _)| *k == name).map(|(_, v)| v)
}

impl JobFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &RecordView<'_>) -> bool {
        self.matches_parts(record.key, record.headers())
    }

    /// Whether a record of `key` and `headers` passes the filter.
    pub fn matches_parts<'h>(&self, key: Option<&[u8]>, headers: impl Headers<'h>) -> bool {
        if let Some(want) = &self.key {
            if key != Some(want.as_bytes()) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| headers.clone().any(|(k, v)| k == name && v == Some(value.as_bytes())))
    }
}

/// Which dead letters a redrive moves (on top of [`JobFilter`], which applies to the
/// dead letter's key and headers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedriveFilter {
    /// Only dead letters of this consumer group.
    pub group: Option<String>,
    /// Only dead letters whose reason is exactly this: the reason the consumer gave on
    /// the last attempt (`card declined`), or the failure record's whole reason.
    pub reason: Option<String>,
    /// Only dead letters written at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only dead letters delivered at least this many times.
    pub min_attempts: Option<u32>,
}

impl RedriveFilter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.group.as_ref().is_none_or(|g| *g == letter.group)
            && self.reason.as_ref().is_none_or(|r| Some(r) == letter.reason.as_ref() || Some(r.as_str()) == letter.last_reason())
            && self.since_ms.is_none_or(|t| letter.dead_lettered_ms >= t)
            && self.min_attempts.is_none_or(|n| letter.attempts >= n)
    }
}

/// Where a dead letter came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetterSource {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// The part of a dead letter's failure record (the [`FAILURE_HEADER`] JSON the broker
/// writes) that redrive filters and routing read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetter {
    pub source: DeadLetterSource,
    pub group: String,
    /// What decided it: `term`, `max_deliveries`, …
    pub cause: String,
    /// Why it was dead-lettered, as the broker says it (it names the last failure's
    /// reason: `max deliveries reached (5 attempts); last: card declined`).
    pub reason: Option<String>,
    pub attempts: u32,
    pub dead_lettered_ms: i64,
    /// Every delivery attempt, oldest first.
    pub history: Vec<DeliveryAttempt>,
}

/// One delivery attempt in a failure record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub member: String,
    pub outcome: String,
    /// The reason the consumer gave (nack, term), if any.
    pub reason: Option<String>,
}

impl DeadLetter {
    /// The reason the consumer gave on the last attempt that gave one.
    pub fn last_reason(&self) -> Option<&str> {
        self.history.iter().rev().find_map(|a| a.reason.as_deref())
    }
}

impl DeadLetter {
    /// The failure record in `headers`, if they are a dead letter's.
    pub fn of<'h>(headers: impl Headers<'h>) -> Option<DeadLetter> {
        serde_json::from_slice(header(headers, FAILURE_HEADER)??).ok()
    }
}

/// How many times the record of `headers` was redriven already ([`REDRIVE_COUNT_HEADER`]).
pub fn redrive_count<'h>(headers: impl Headers<'h>) -> u32 {
    header(headers, REDRIVE_COUNT_HEADER).flatten().and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
}

/// Offsets `from..until` of one source partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRange {
    pub partition: u32,
    pub from: u64,
    pub until: u64,
}

/// A position in a partition as a client names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// The log start.
    Earliest,
    /// The high watermark when the job is created.
    Latest,
    Offset(u64),
    /// The first offset whose message is at or after this time (ms since the epoch).
    Time(i64),
}

/// A job as a client asks for it (the body of `CreateJob`, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub kind: JobKind,
    /// The topic read: the topic replayed, or the dead-letter topic redriven.
    pub source: String,
    /// The topic written. A replay's target that does not exist is created like the
    /// source (partitions, replicas, settings). A redrive's default is the topic the
    /// dead letters came from.
    #[serde(default)]
    pub target: Option<String>,
    /// Source partitions; empty means all.
    #[serde(default)]
    pub partitions: Vec<u32>,
    pub from: Position,
    pub until: Position,
    #[serde(default)]
    pub filter: JobFilter,
    #[serde(default)]
    pub redrive: RedriveFilter,
    /// Redrive only: a dead letter already redriven this many times is quarantined
    /// instead; default [`REDRIVES_MAX_DEFAULT`].
    #[serde(default)]
    pub max_redrives: Option<u32>,
    /// Messages written per second over the whole job; 0: as fast as it goes.
    #[serde(default)]
    pub rate: u32,
    #[serde(default)]
    pub requested_by: String,
    /// Resolve and check the request, answer the spec, create nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Chosen by the client once per job it asks for: a create retried after a lost
    /// answer finds the job its first attempt made instead of making a second.
    #[serde(default)]
    pub request_id: String,
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
    #[serde(default)]
    pub redrive: RedriveFilter,
    /// Redrive: where a dead letter redriven this many times already goes instead.
    #[serde(default)]
    pub quarantine: Option<QuarantineRule>,
    /// Redrive: dead letters earlier redrives moved already (as of this job's
    /// creation); skipped, so each dead letter is redriven once.
    #[serde(default)]
    pub exclude: OffsetRanges,
    /// Messages copied per second, over the whole job; 0: as fast as it goes.
    #[serde(default)]
    pub rate: u32,
    /// Most records, and bytes, per copy batch (fixed so batch boundaries are too).
    #[serde(default = "default_chunk_records")]
    pub chunk_records: u32,
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Who asked (the audit trail's "who").
    #[serde(default)]
    pub requested_by: String,
    /// The request's id (see [`JobRequest::request_id`]).
    #[serde(default)]
    pub request_id: String,
}

fn default_chunk_records() -> u32 {
    JOB_CHUNK_RECORDS_MAX
}

fn default_chunk_bytes() -> u32 {
    JOB_CHUNK_BYTES_MAX
}

/// A redrive's loop guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRule {
    /// Dead letters redriven this many times already are quarantined.
    pub max_redrives: u32,
    /// Where they go.
    pub topic: String,
}

/// What a job does with one source record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Filtered out.
    Skip,
    /// Copied (a redrive's dead letter with its failure record).
    Copy(Option<DeadLetter>),
    /// Redrive: redriven too often; written to the quarantine topic.
    Quarantine(DeadLetter),
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
        if self.chunk_records == 0 || self.chunk_records > JOB_CHUNK_RECORDS_MAX || self.chunk_bytes == 0 || self.chunk_bytes > JOB_CHUNK_BYTES_MAX {
            return Err(format!("copy batches hold 1..={JOB_CHUNK_RECORDS_MAX} records and 1..={JOB_CHUNK_BYTES_MAX} bytes"));
        }
        match (&self.kind, &self.quarantine) {
            (JobKind::Replay, Some(_)) => return Err("only a redrive has a quarantine".into()),
            (JobKind::Redrive, None) => return Err("a redrive needs its loop guard (quarantine rule)".into()),
            (JobKind::Redrive, Some(q)) if q.max_redrives == 0 || q.max_redrives > REDRIVES_MAX_LIMIT => {
                return Err(format!("max redrives must be in 1..={REDRIVES_MAX_LIMIT}, not {}", q.max_redrives))
            }
            _ => {}
        }
        Ok(())
    }

    /// Records per copy batch for a job of `rate` messages/s (0: unlimited).
    pub fn chunk_records_for(rate: u32) -> u32 {
        if rate == 0 {
            return JOB_CHUNK_RECORDS_MAX;
        }
        ((f64::from(rate) * JOB_CHUNK_SECONDS_OF_RATE) as u32).clamp(1, JOB_CHUNK_RECORDS_MAX)
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

    /// What this job does with `record`, at `offset` of its source partition.
    pub fn select(&self, offset: u64, record: &RecordView<'_>) -> Selection {
        self.select_parts(offset, record.key, record.headers())
    }

    /// What this job does with the record of `key` and `headers` at `offset` of its
    /// source partition: the one rule the broker's runner and a client's dry run both
    /// apply.
    pub fn select_parts<'h>(&self, offset: u64, key: Option<&[u8]>, headers: impl Headers<'h>) -> Selection {
        if self.exclude.contains(offset) || !self.filter.matches_parts(key, headers.clone()) {
            return Selection::Skip;
        }
        match self.kind {
            JobKind::Replay => Selection::Copy(None),
            JobKind::Redrive => {
                let Some(letter) = DeadLetter::of(headers.clone()) else { return Selection::Skip };
                if !self.redrive.matches(&letter) {
                    return Selection::Skip;
                }
                match &self.quarantine {
                    Some(q) if redrive_count(headers) >= q.max_redrives => Selection::Quarantine(letter),
                    _ => Selection::Copy(Some(letter)),
                }
            }
        }
    }
}

/// Most disjoint ranges an [`OffsetRanges`] holds.
pub const OFFSET_RANGES_MAX: usize = 100_000;

/// A set of offsets as sorted, disjoint, non-adjacent `[from, until)` ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OffsetRanges(Vec<(u64, u64)>);

impl OffsetRanges {
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.0.partition_point(|(_, until)| *until <= offset);
        self.0.get(i).is_some_and(|(from, _)| *from <= offset)
    }

    /// Adds `[from, until)`, merging with what it touches; false (and unchanged) if
    /// that would make more than [`OFFSET_RANGES_MAX`] ranges.
    pub fn insert(&mut self, from: u64, until: u64) -> bool {
        if from >= until {
            return true;
        }
        let first = self.0.partition_point(|(_, u)| *u < from);
        let last = self.0.partition_point(|(f, _)| *f <= until);
        if first == last && self.0.len() >= OFFSET_RANGES_MAX {
            return false;
        }
        let merged = (self.0[first..last].first().map_or(from, |r| r.0.min(from)), self.0[first..last].last().map_or(until, |r| r.1.max(until)));
        self.0.splice(first..last, [merged]);
        true
    }

    /// Adds every range of `other`; false if some did not fit.
    pub fn extend(&mut self, other: &OffsetRanges) -> bool {
        other.0.iter().fold(true, |ok, (f, u)| self.insert(*f, *u) && ok)
    }

    /// Offsets held.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(f, u)| u - f).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

/// The message id on the last record of a replay's copy batch: job, source partition
/// and the source offset of that record.
pub fn replay_marker(job: u64, partition: u32, offset: u64) -> String {
    format!("job:{job}:{partition}:{offset}")
}

/// The source offset a [`replay_marker`] of `job`/`partition` names, if `id` is one.
pub fn parse_replay_marker(id: &[u8], job: u64, partition: u32) -> Option<u64> {
    let id = std::str::from_utf8(id).ok()?;
    let rest = id.strip_prefix("job:")?;
    let mut parts = rest.splitn(3, ':');
    (parts.next()?.parse::<u64>().ok()? == job && parts.next()?.parse::<u32>().ok()? == partition).then_some(())?;
    parts.next()?.parse().ok()
}

/// The message id of the copy a redrive job makes of the dead letter at `offset`.
pub fn redrive_id(job: u64, offset: u64) -> String {
    format!("redrive:{job}:{offset}")
}

/// The message id of a dead letter a redrive job quarantined.
pub fn quarantine_id(job: u64, offset: u64) -> String {
    format!("quarantine:{job}:{offset}")
}

/// The dead-letter offset a [`redrive_id`] or [`quarantine_id`] of `job` names.
pub fn parse_redrive_id(id: &[u8], job: u64) -> Option<u64> {
    let id = std::str::from_utf8(id).ok()?;
    let rest = id.strip_prefix("redrive:").or_else(|| id.strip_prefix("quarantine:"))?;
    let (j, offset) = rest.split_once(':')?;
    (j.parse::<u64>().ok()? == job).then_some(())?;
    offset.parse().ok()
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

    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Cancelled => "cancelled",
            JobState::Done => "done",
            JobState::Failed(_) => "failed",
        }
    }
}

/// A change asked of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobAction {
    Pause,
    Resume,
    Cancel,
    /// Given up by its runner, for `reason`.
    Fail(String),
}

/// The end of one target partition when a runner last checkpointed: everything the
/// job wrote there since lies at or after `next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetEnd {
    pub topic: String,
    pub partition: u32,
    pub next: u64,
}

/// One source partition's progress: `next` is the first source offset not yet
/// handled; `targets` where a resumed runner looks for copies made after it (empty
/// until the runner first started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    pub next: u64,
    pub until: u64,
    pub copied: u64,
    pub skipped: u64,
    #[serde(default)]
    pub quarantined: u64,
    #[serde(default)]
    pub targets: Vec<TargetEnd>,
}

impl PartitionProgress {
    pub fn done(&self) -> bool {
        self.next >= self.until
    }

    /// Source records handled so far.
    pub fn handled(&self) -> u64 {
        self.copied + self.skipped + self.quarantined
    }
}

/// A job as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    pub state: JobState,
    /// Proposer's clock when it was created, and when its state or progress last changed.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The metadata log offset of its creation.
    #[serde(default)]
    pub created_at_offset: u64,
    /// Per source partition, in the spec's order.
    pub progress: Vec<PartitionProgress>,
}

impl Job {
    pub fn copied(&self) -> u64 {
        self.progress.iter().map(|p| p.copied).sum()
    }

    pub fn skipped(&self) -> u64 {
        self.progress.iter().map(|p| p.skipped).sum()
    }

    pub fn quarantined(&self) -> u64 {
        self.progress.iter().map(|p| p.quarantined).sum()
    }

    /// Source offsets handled, over all partitions (for a progress bar: of `spec.total()`).
    pub fn position(&self) -> u64 {
        self.progress.iter().zip(&self.spec.ranges).map(|(p, r)| p.next.saturating_sub(r.from).min(r.until - r.from)).sum()
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
            redrive: RedriveFilter::default(),
            quarantine: None,
            exclude: OffsetRanges::default(),
            rate: 100,
            chunk_records: JobSpec::chunk_records_for(100),
            chunk_bytes: JOB_CHUNK_BYTES_MAX,
            requested_by: "ops@host".into(),
            request_id: String::new(),
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
        assert!(JobSpec { chunk_records: 0, ..spec() }.validate().is_err());
        assert!(JobSpec { kind: JobKind::Redrive, ..spec() }.validate().unwrap_err().contains("loop guard"));
        let guard = Some(QuarantineRule { max_redrives: 0, topic: "q".into() });
        assert!(JobSpec { kind: JobKind::Redrive, quarantine: guard, ..spec() }.validate().is_err());
        assert_eq!((JobSpec::chunk_records_for(0), JobSpec::chunk_records_for(1_000), JobSpec::chunk_records_for(3)), (JOB_CHUNK_RECORDS_MAX, 50, 1));
        // Fields added later take their defaults.
        let old = r#"{"kind":"replay","source":"a","target":"b","ranges":[{"partition":0,"from":0,"until":1}]}"#;
        let old = JobSpec::from_json(old).unwrap();
        assert_eq!((old.rate, old.chunk_records, old.chunk_bytes), (0, JOB_CHUNK_RECORDS_MAX, JOB_CHUNK_BYTES_MAX));
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

    #[test]
    fn job_ids_name_their_job_partition_and_offset_and_nothing_else_parses_as_one() {
        let m = replay_marker(12, 3, 999_999);
        assert_eq!(parse_replay_marker(m.as_bytes(), 12, 3), Some(999_999));
        assert_eq!(parse_replay_marker(m.as_bytes(), 12, 4), None, "another partition's");
        assert_eq!(parse_replay_marker(m.as_bytes(), 1, 3), None, "another job's");
        assert_eq!(parse_replay_marker(b"job:12:3:x", 12, 3), None);
        assert_eq!(parse_replay_marker(b"order-17", 12, 3), None);
        assert_eq!(parse_redrive_id(redrive_id(7, 40).as_bytes(), 7), Some(40));
        assert_eq!(parse_redrive_id(quarantine_id(7, 41).as_bytes(), 7), Some(41));
        assert_eq!(parse_redrive_id(redrive_id(7, 40).as_bytes(), 70), None);
        assert!(m.len() <= crate::limits::MESSAGE_ID_LEN_MAX && redrive_id(u64::MAX, u64::MAX).len() <= crate::limits::MESSAGE_ID_LEN_MAX);
    }

    /// A dead letter as the broker writes it: key, value, the failure record and how
    /// many times it was redriven before.
    fn letter(key: &str, group: &str, reason: &str, attempts: u32, at_ms: i64, redrives: Option<&str>) -> bytes::Bytes {
        let failure = serde_json::json!({"source": {"topic": "orders", "partition": 2, "offset": 17}, "group": group, "cause": "max_deliveries",
            "reason": format!("max deliveries reached ({attempts} attempts); last: {reason}"), "attempts": attempts, "dead_lettered_ms": at_ms,
            "history": [{"attempt": 1, "member": "m", "outcome": "nacked", "reason": reason}, {"attempt": 2, "member": "m", "outcome": "lease_expired"}]})
        .to_string();
        let mut headers = vec![(FAILURE_HEADER, Some(failure.as_bytes()))];
        if let Some(n) = redrives {
            headers.push((REDRIVE_COUNT_HEADER, Some(n.as_bytes())));
        }
        let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
        b.push(NewRecord { timestamp_ms: at_ms, key: Some(key.as_bytes()), value: Some(b"v"), headers: &headers, ..NewRecord::default() }).unwrap();
        b.finish().unwrap()
    }

    #[test]
    fn a_redrive_selects_by_group_reason_time_attempts_and_key_and_quarantines_after_the_limit() {
        let redrive = |filter: RedriveFilter, key: Option<&str>| JobSpec {
            kind: JobKind::Redrive,
            filter: JobFilter { key: key.map(String::from), headers: vec![] },
            redrive: filter,
            quarantine: Some(QuarantineRule { max_redrives: 2, topic: "orders.quarantine".into() }),
            ..spec()
        };
        let select = |spec: &JobSpec, batch: bytes::Bytes| {
            let view = BatchView::validate(batch).unwrap();
            let r = view.records().next().unwrap().unwrap();
            spec.select(5, &r)
        };
        let l = || letter("o-1", "billing", "card declined", 5, 10_000, None);
        let all = redrive(RedriveFilter::default(), None);
        let Selection::Copy(Some(dl)) = select(&all, l()) else { panic!("a dead letter is copied by an empty filter") };
        assert_eq!((dl.source.topic.as_str(), dl.source.partition, dl.source.offset, dl.attempts), ("orders", 2, 17, 5));
        for (filter, key, chosen) in [
            (RedriveFilter { group: Some("billing".into()), ..RedriveFilter::default() }, None, true),
            (RedriveFilter { group: Some("audit".into()), ..RedriveFilter::default() }, None, false),
            (RedriveFilter { reason: Some("card declined".into()), ..RedriveFilter::default() }, None, true),
            (RedriveFilter { reason: Some("card".into()), ..RedriveFilter::default() }, None, false),
            (RedriveFilter { reason: Some("max deliveries reached (5 attempts); last: card declined".into()), ..RedriveFilter::default() }, None, true),
            (RedriveFilter { since_ms: Some(10_000), ..RedriveFilter::default() }, None, true),
            (RedriveFilter { since_ms: Some(10_001), ..RedriveFilter::default() }, None, false),
            (RedriveFilter { min_attempts: Some(5), ..RedriveFilter::default() }, None, true),
            (RedriveFilter { min_attempts: Some(6), ..RedriveFilter::default() }, None, false),
            (RedriveFilter::default(), Some("o-1"), true),
            (RedriveFilter::default(), Some("o-2"), false),
        ] {
            assert_eq!(matches!(select(&redrive(filter.clone(), key), l()), Selection::Copy(_)), chosen, "{filter:?} {key:?}");
        }
        assert!(matches!(select(&all, letter("o-1", "billing", "x", 5, 1, Some("1"))), Selection::Copy(_)), "redriven once: below the limit of 2");
        assert!(matches!(select(&all, letter("o-1", "billing", "x", 5, 1, Some("2"))), Selection::Quarantine(_)), "redriven twice: quarantined");
        let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
        b.push(NewRecord { timestamp_ms: 1, key: None, value: Some(b"not a dead letter"), ..NewRecord::default() }).unwrap();
        assert_eq!(select(&all, b.finish().unwrap()), Selection::Skip, "a record without a failure record is not redriven");
        let mut moved = OffsetRanges::default();
        moved.insert(5, 6);
        assert_eq!(select(&JobSpec { exclude: moved, ..all.clone() }, l()), Selection::Skip, "a dead letter redriven before is not redriven again");
    }

    #[test]
    fn offset_ranges_merge_what_touches_and_answer_membership() {
        let mut r = OffsetRanges::default();
        assert!(r.insert(10, 20) && r.insert(30, 40) && r.insert(20, 25) && r.insert(5, 6));
        assert_eq!(r.ranges(), &[(5, 6), (10, 25), (30, 40)]);
        assert!(r.insert(24, 31));
        assert_eq!(r.ranges(), &[(5, 6), (10, 40)]);
        assert!(r.insert(0, 100));
        assert_eq!(r.ranges(), &[(0, 100)]);
        assert!([0, 50, 99].iter().all(|o| r.contains(*o)) && !r.contains(100));
        let mut gaps = OffsetRanges::default();
        for i in 0..OFFSET_RANGES_MAX as u64 {
            assert!(gaps.insert(2 * i, 2 * i + 1));
        }
        assert!(!gaps.insert(u64::MAX - 1, u64::MAX), "a range past the bound is refused");
        assert!(gaps.insert(1, 2), "one that merges is not");
        assert_eq!(gaps.len(), OFFSET_RANGES_MAX as u64 + 1);
    }
}
