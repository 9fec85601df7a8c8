//! Bodies of the consumer-group APIs (protocol version 3): stream groups' committed
//! offsets, and queue groups' leased fetches and settle verbs.
//!
//! A queue fetch answers like a fetch — whole batches follow a header, never
//! re-encoded — and its header lists the records of those batches that are leased to
//! the member, each with its attempt number; the client delivers only those.

use serde::{Deserialize, Serialize};

use crate::topic_config::{GroupConfig, GroupConfigPatch};

/// The protocol version that added consumer groups.
pub const VERSION_3: u16 = 3;

/// `CommitOffset`: a stream group's position in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOffsetRequest {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    /// The member's generation (fences members that missed a rebalance). `None`: an
    /// administrative reset, accepted only while the group has no members.
    pub generation: Option<u64>,
    /// The next offset the group will read.
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOffsetResponse {
    pub offset: u64,
}

/// `FetchOffset`: a stream group's committed position in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchOffsetRequest {
    pub group: String,
    pub topic: String,
    pub partition: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedOffset {
    pub offset: u64,
    pub generation: u64,
    /// When it was committed (the partition leader's clock, ms since the epoch).
    pub committed_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchOffsetResponse {
    /// `None`: the group never committed in this partition.
    pub committed: Option<CommittedOffset>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

/// Where a queue group starts in a partition it has never leased from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum QueueStart {
    /// Every message the partition holds.
    #[default]
    Earliest,
    /// Only messages stored from now on.
    Latest,
}

/// `QueueFetch`: lease up to `max_messages` messages (and about `max_bytes`) of one
/// partition to a queue-group member — the member's credit. Long-polls up to
/// `max_wait_ms` when none is available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueFetchRequest {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    /// The member's name, unique within the group (its leases are held in this name).
    pub member: String,
    pub max_messages: u32,
    pub max_bytes: u32,
    pub max_wait_ms: u32,
    pub start: QueueStart,
}

/// One leased message of a queue fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub offset: u64,
    /// 1 for the first delivery, counted by the server across leaders.
    pub attempt: u32,
}

/// Header of a queue fetch response; the batches holding the leased records follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueFetchResponse {
    pub leases: Vec<Lease>,
    /// The leases run out at this time (the partition leader's clock, ms since the
    /// epoch) unless extended.
    pub lease_deadline_ms: i64,
    pub high_watermark: u64,
    /// Why nothing (or less than asked) was leased, if a bound stopped it: `None` when
    /// the partition simply had nothing more.
    pub stall: Option<Stall>,
}

/// Why a queue fetch leased less than the member's credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stall {
    /// The member holds its group's max-unacked leases in this partition.
    MaxUnacked,
    /// The group's oldest unsettled message holds the delivery window open.
    Window,
}

/// What a member says about one leased message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleVerb {
    /// Processed: never deliver it again.
    Ack,
    /// Failed: retry it after `delay_ms`, or after the group's backoff when `None`.
    Nack { delay_ms: Option<u32>, reason: String, class: String },
    /// Can never succeed: dead-letter it now.
    Term { reason: String, class: String },
    /// Still working: the lease runs another `ms` (the group's lease timeout when
    /// `None`) from now.
    Extend { ms: Option<u32> },
}

/// One settle request: which delivery (offset and attempt) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleItem {
    pub offset: u64,
    pub attempt: u32,
    pub verb: SettleVerb,
}

/// `QueueSettle`: a member's answers about messages leased from one partition, in one
/// request. Each is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettleRequest {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    pub member: String,
    pub items: Vec<SettleItem>,
}

/// How one settle request ended. Every answer is given once the outcome is committed
/// on a majority of the partition's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleOutcome {
    /// Acked: settled.
    Acked,
    /// Nacked: delivered again, as attempt `attempt`, not before `not_before_ms`.
    Retrying { attempt: u32, not_before_ms: i64 },
    /// Nacked on the last allowed attempt, or termed: it goes to the dead-letter topic.
    DeadLettering,
    /// Extended: the lease now runs out at `deadline_ms`.
    Extended { deadline_ms: i64 },
    /// Already settled (an ack retried, or acked by another member): nothing to do.
    AlreadySettled,
    /// The offset was never delivered to the group.
    NotDelivered,
    /// The lease is no longer this member's at this attempt (it expired; the message is
    /// at attempt `attempts` now). An ack is still accepted; other verbs are not.
    StaleLease { attempts: u32 },
    /// The message was already decided for the dead-letter topic; an ack or nack no
    /// longer changes that.
    AlreadyDeadLettering,
}

impl SettleOutcome {
    /// Whether the request was recorded (or had been: an ack of a settled message).
    pub fn is_recorded(self) -> bool {
        matches!(
            self,
            SettleOutcome::Acked
                | SettleOutcome::Retrying { .. }
                | SettleOutcome::DeadLettering
                | SettleOutcome::Extended { .. }
                | SettleOutcome::AlreadySettled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettleResponse {
    /// One per request item, in order.
    pub outcomes: Vec<SettleOutcome>,
}

/// `ConfigureGroup`: change some of a consumer group's settings (an empty patch only
/// reads them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigureGroupRequest {
    pub group: String,
    #[serde(with = "group_patch_json")]
    pub patch: GroupConfigPatch,
}

/// The group's whole settings after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigureGroupResponse {
    #[serde(with = "group_config_json")]
    pub config: GroupConfig,
}

/// `GroupState`: what one partition's leader knows of consumer groups (`group`, or all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStateRequest {
    pub topic: String,
    pub partition: u32,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStateResponse {
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub streams: Vec<StreamGroupState>,
    pub queues: Vec<QueueGroupState>,
}

/// A stream group in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamGroupState {
    pub group: String,
    pub committed: CommittedOffset,
}

/// A queue group in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueGroupState {
    pub group: String,
    /// The oldest unsettled offset (everything below is settled).
    pub floor: u64,
    /// Offsets at or above were never delivered.
    pub cursor: u64,
    pub leased: u64,
    /// Nacked, waiting for their retry time.
    pub waiting: u64,
    /// Decided for the dead-letter topic, not yet stored there.
    pub dead_lettering: u64,
    /// Leased messages per member.
    pub members: Vec<(String, u32)>,
    /// When the oldest unsettled message was first delivered (ms since the epoch).
    pub oldest_unsettled_delivery_ms: Option<i64>,
    pub delivered_total: u64,
    pub redelivered_total: u64,
    pub acked_total: u64,
    pub dead_lettered_total: u64,
}

/// `JoinGroup`: become (or stay) a member of stream group `group`, consuming `topics`;
/// answered by the group coordinator (the metadata leader) with this member's
/// partitions under the group's current generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGroupRequest {
    pub group: String,
    pub topics: Vec<String>,
    /// The member id from an earlier join, to rejoin as the same member.
    pub member: Option<String>,
    /// A member not heard from for this long is removed and its partitions reassigned.
    pub session_timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGroupResponse {
    pub member: String,
    pub generation: u64,
    /// This member's partitions, per topic.
    pub assignment: Vec<(String, Vec<u32>)>,
    /// Members of the group in this generation.
    pub members: u32,
    /// How often the member should send `Heartbeat`.
    pub heartbeat_interval_ms: u32,
}

/// `Heartbeat`: the member is alive; the answer says whether the group rebalanced
/// (the member then commits what it processed and joins again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub group: String,
    pub member: String,
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub rebalance: bool,
    pub generation: u64,
}

/// `LeaveGroup`: the member stops; its partitions are reassigned at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveGroupRequest {
    pub group: String,
    pub member: String,
}

/// `DescribeMembers`: a stream group's members and assignment, from its coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeMembersRequest {
    pub group: String,
}

/// A member's partitions: `(topic, partitions)`.
pub type Assignment = Vec<(String, Vec<u32>)>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeMembersResponse {
    pub generation: u64,
    /// `(member, ms since last heard, assignment)`.
    pub members: Vec<(String, u64, Assignment)>,
}

mod group_patch_json {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::topic_config::GroupConfigPatch;

    pub fn serialize<S: Serializer>(patch: &GroupConfigPatch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&patch.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GroupConfigPatch, D::Error> {
        GroupConfigPatch::from_json(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod group_config_json {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::topic_config::GroupConfig;

    pub fn serialize<S: Serializer>(config: &GroupConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&config.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GroupConfig, D::Error> {
        GroupConfig::from_json(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{decode, encode, encode_with_batches, split_with_batches};

    #[test]
    fn consumer_group_bodies_round_trip() {
        let req = QueueSettleRequest {
            group: "billing".into(),
            topic: "orders".into(),
            partition: 1,
            member: "m-1".into(),
            items: vec![
                SettleItem { offset: 4, attempt: 1, verb: SettleVerb::Ack },
                SettleItem { offset: 5, attempt: 2, verb: SettleVerb::Nack { delay_ms: Some(100), reason: "db down".into(), class: "io".into() } },
                SettleItem { offset: 6, attempt: 1, verb: SettleVerb::Extend { ms: None } },
            ],
        };
        assert_eq!(decode::<QueueSettleRequest>(&encode(&req)).unwrap(), req);
        let head = QueueFetchResponse { leases: vec![Lease { offset: 9, attempt: 3 }], lease_deadline_ms: 77, high_watermark: 10, stall: Some(Stall::Window) };
        let payload = encode_with_batches(&head, &[]);
        let (back, rest): (QueueFetchResponse, bytes::Bytes) = split_with_batches(&payload).unwrap();
        assert_eq!((back, rest.len()), (head, 0));
        let req = ConfigureGroupRequest { group: "g".into(), patch: GroupConfigPatch { lease_timeout_ms: Some(5_000), ..GroupConfigPatch::default() } };
        assert_eq!(decode::<ConfigureGroupRequest>(&encode(&req)).unwrap(), req);
    }

    #[test]
    fn only_recorded_outcomes_say_so() {
        assert!(SettleOutcome::AlreadySettled.is_recorded());
        assert!(!SettleOutcome::StaleLease { attempts: 2 }.is_recorded());
        assert!(!SettleOutcome::NotDelivered.is_recorded());
    }
}
