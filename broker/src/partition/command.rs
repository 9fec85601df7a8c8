//! What a partition's log holds besides record batches: control entries.
//!
//! A control entry is proposed by the partition leader, travels in the same Raft log
//! as the batches (storage kind `KIND_CONTROL`), is never served to consumers, and
//! carries the leader's time, so applying it never reads a clock. Its payload is a
//! postcard [`ControlEntry`]. Variants are only ever appended: an existing variant's
//! body never changes, so old logs keep decoding.

use keel_protocol::TopicConfig;
use serde::{Deserialize, Serialize};

use super::consumers::Settle;
use super::producers::ProducerStamp;

/// A control entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEntry {
    /// The proposing leader's wall clock (ms since the epoch), never below the
    /// partition clock it had applied: the partition clock is the largest such value.
    pub leader_time_ms: i64,
    pub command: ControlCommand,
}

/// A change to the partition's state that is not a record batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// Advances the partition clock (the leader proposes one at least every
    /// `CLOCK_TICK_INTERVAL` while it takes writes), which expires message ids and idle
    /// producers deterministically.
    Tick,
    /// The settings applying depends on, from the topic's config: proposed by the
    /// leader whenever its applied settings differ from the topic's.
    Configure(PartitionConfig),
    /// A batch whose every record carried a message id already stored: nothing new is
    /// stored, but its producer sequence is used up, with these `(index, offset)`s as
    /// the answer to a retry.
    RecordSequence { stamp: ProducerStamp, offsets: Vec<(u32, u64)> },
    /// A stream group's position in this partition. `generation` `None` is an
    /// administrative reset of a group without members.
    CommitOffset { group: String, generation: Option<u64>, offset: u64 },
    /// Messages leased to a queue-group member until `deadline_ms`: the due offsets in
    /// `redeliver`, and the never-delivered ones from `new_from` (the group's cursor; the
    /// group starts there on its first lease) up to `new_until`. Written before priority
    /// lanes (lane 0 only); leaders now propose `QueueLeaseLanes`.
    QueueLease { group: String, member: String, deadline_ms: i64, new_from: u64, new_until: u64, redeliver: Vec<u64> },
    /// A member's answers about leased messages: `(offset, attempt, what)`.
    QueueSettle { group: String, member: String, settles: Vec<(u64, u32, Settle)> },
    /// Dead letters committed to the dead-letter topic: their source messages settle.
    QueueDeadLettered { group: String, offsets: Vec<u64> },
    /// Messages leased to a queue-group member until `deadline_ms`: the due offsets in
    /// `redeliver`, and never-delivered ones per lane, `(lane, from, until)` with `from`
    /// the group's cursor in that lane (every lane of a new group starts at `start`);
    /// `deferred` lists `(offset, not_before_ms)` of scheduled messages in those ranges,
    /// which wait for their time instead (if it is still ahead at the entry's time);
    /// for an ordered group `keys` lists `(offset, key hash)` of the keyed messages in
    /// those ranges (at most one message per key is out at a time).
    QueueLeaseLanes {
        group: String,
        member: String,
        deadline_ms: i64,
        start: u64,
        new: Vec<(u8, u64, u64)>,
        redeliver: Vec<u64>,
        deferred: Vec<(u64, i64)>,
        keys: Vec<(u64, u64)>,
    },
    /// Retention: log entries up to `upto_index` may be deleted, and the partition's
    /// messages start at `start_offset` (the first offset after that entry). Proposed by
    /// the leader from the topic's retention settings; every replica applies the same
    /// cut here and purges its own log once a snapshot covers it. A cut at or below the
    /// applied one changes nothing.
    Retain { upto_index: u64, start_offset: u64 },
}

/// The settings applying a partition's log depends on. They reach the partition as a
/// `Configure` entry, never from each node's own view of the metadata, so every replica
/// applies every entry under the same settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionConfig {
    pub dedupe_window_ms: u64,
    pub dedupe_ids_max: u64,
    pub producer_expiry_ms: u64,
    /// The topic's secret key for message-id digests (fixed at topic creation).
    pub id_key: [u8; 16],
}

impl PartitionConfig {
    /// The partition settings of a topic config and the topic's id key.
    pub fn from_topic(config: &TopicConfig, id_key: [u8; 16]) -> PartitionConfig {
        PartitionConfig {
            dedupe_window_ms: config.dedupe_window_ms,
            dedupe_ids_max: config.dedupe_ids_max,
            producer_expiry_ms: config.producer_expiry_ms,
            id_key,
        }
    }
}

impl Default for PartitionConfig {
    /// What applies before the first `Configure` entry: the topic defaults and an
    /// all-zero key (the leader configures a partition before it stores any batch with
    /// message ids).
    fn default() -> Self {
        PartitionConfig::from_topic(&TopicConfig::default(), [0; 16])
    }
}

impl ControlEntry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("control entries always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<ControlEntry, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}
