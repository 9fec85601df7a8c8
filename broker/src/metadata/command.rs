//! Metadata commands, carried as single-record batches in the metadata log.

use bytes::Bytes;
use keel_protocol::batch::{BatchBuilder, BatchOptions, BatchView, NewRecord};
use keel_protocol::job::{JobAction, JobSpec, OffsetRanges, PartitionProgress};
use keel_protocol::message::ProducerIdentity;
use keel_protocol::topic_config::{self, TopicConfig, TopicConfigPatch};
use keel_protocol::GroupConfigPatch;
use serde::{Deserialize, Serialize};

/// A change to the cluster's metadata. Variants are only appended, and an existing
/// variant's body never changes (postcard is positional): metadata logs written by
/// earlier builds keep decoding. Topic configs travel as JSON inside, so settings can be
/// added without a new variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Create a topic (written by builds before topic configs); `replicas[p]` lists
    /// partition `p`'s replicas, preferred leader first.
    CreateTopic { name: String, replicas: Vec<Vec<u64>>, max_message_bytes: u32, retention_ms: u64 },
    /// Delete a topic and, on every node, its partitions' data.
    DeleteTopic { name: String },
    /// Create a topic with its whole config and the secret key its partitions digest
    /// message ids with (chosen at random by the proposing broker).
    CreateTopicWithConfig {
        name: String,
        replicas: Vec<Vec<u64>>,
        #[serde(with = "topic_config::as_json")]
        config: TopicConfig,
        id_key: [u8; 16],
    },
    /// Change some settings of a topic; refused by the fold if the result is invalid.
    AlterTopicConfig {
        name: String,
        #[serde(with = "topic_config::patch_as_json")]
        patch: TopicConfigPatch,
    },
    /// Hand node `node` the next `count` producer ids, for the anonymous idempotent
    /// producers it registers.
    AllocateProducerIds { node: u64, count: u64 },
    /// Register (or re-register) the named producer `name`: a new name gets a fresh id
    /// at epoch 0, a known one its epoch + 1 — fencing the previous instance. With
    /// `current`, only if that is still the name's identity (a re-registration after a
    /// failure); otherwise the fold refuses it: a newer instance exists.
    InitNamedProducer { name: String, current: Option<ProducerIdentity> },
    /// Change some settings of consumer group `group` (a group without settings of its
    /// own uses the defaults); refused by the fold if the result is invalid.
    ConfigureGroup {
        group: String,
        #[serde(with = "group_patch_as_json")]
        patch: GroupConfigPatch,
    },
    /// Record a replay or redrive job (the fold gives it the next id), at the
    /// proposer's clock `at_ms`.
    CreateJob {
        #[serde(with = "job_spec_as_json")]
        spec: JobSpec,
        at_ms: i64,
    },
    /// A job's checkpoint of one source partition (only ever forward), with the dead
    /// letters a redrive moved since its previous checkpoint.
    JobProgress {
        id: u64,
        #[serde(with = "progress_as_json")]
        progress: PartitionProgress,
        moved: OffsetRanges,
        at_ms: i64,
    },
    /// Pause, resume, cancel or fail a job.
    JobControl { id: u64, action: JobAction, at_ms: i64 },
}

/// Serde adapter: a [`JobSpec`] as a JSON string (fields can be added later).
mod job_spec_as_json {
    use keel_protocol::job::JobSpec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(spec: &JobSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&spec.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<JobSpec, D::Error> {
        let json = String::deserialize(d)?;
        JobSpec::from_json(&json).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: a [`PartitionProgress`] as a JSON string (fields can be added later).
mod progress_as_json {
    use keel_protocol::job::PartitionProgress;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &PartitionProgress, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&serde_json::to_string(p).expect("a job's progress always encodes as JSON"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PartitionProgress, D::Error> {
        let json = String::deserialize(d)?;
        serde_json::from_str(&json).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: a [`GroupConfigPatch`] as a JSON string (settings can be added later).
mod group_patch_as_json {
    use keel_protocol::GroupConfigPatch;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(patch: &GroupConfigPatch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&patch.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GroupConfigPatch, D::Error> {
        let json = String::deserialize(d)?;
        GroupConfigPatch::from_json(&json).map_err(serde::de::Error::custom)
    }
}

/// Why a command's record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("metadata record at offset {offset} is not a command: {reason}")]
pub struct UndecodableCommand {
    pub offset: u64,
    pub reason: String,
}

impl MetadataCommand {
    /// The command as a one-record batch, ready to propose to the metadata group.
    pub fn to_batch(&self, timestamp_ms: i64) -> Bytes {
        let value = postcard::to_allocvec(self).expect("metadata commands encode");
        let mut builder = BatchBuilder::new(BatchOptions::default()).expect("default batch options are valid");
        builder
            .push(NewRecord { timestamp_ms, key: None, value: Some(&value), headers: &[], message_id: None, deliver_at_ms: None })
            .expect("a metadata command fits a batch");
        builder.finish().expect("one record was pushed")
    }

    /// The commands in a committed metadata batch, with their offsets.
    pub fn from_batch(batch: &BatchView) -> Result<Vec<(u64, MetadataCommand)>, UndecodableCommand> {
        let base = batch.header().base_offset;
        let mut out = Vec::new();
        for record in batch.records() {
            let record = record.map_err(|e| UndecodableCommand { offset: base, reason: e.to_string() })?;
            let offset = base + u64::from(record.offset_delta);
            let value = record.value.ok_or_else(|| UndecodableCommand { offset, reason: "no value".into() })?;
            let cmd = postcard::from_bytes(value).map_err(|e| UndecodableCommand { offset, reason: e.to_string() })?;
            out.push((offset, cmd));
        }
        Ok(out)
    }
}
