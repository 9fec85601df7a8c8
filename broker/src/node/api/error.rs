//! The client API's one error type, and its one conversion to a wire answer.
//!
//! Handlers return [`ApiError`]; [`ApiError::into_reply`] turns it into the wire code and
//! a message saying what failed and what to do (with a body where the code has one:
//! `NotLeader`, `Throttled`, `DuplicateMessageIds`). No handler builds a `Reply` itself.

use keel_net::Reply;
use keel_protocol::message::{self, DuplicateMessageIds, NotLeader, OutOfRange, Throttled};
use keel_protocol::{DecodeError, ErrorCode};

use crate::config::ClusterConfig;
use crate::node::partition::PartitionError;

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body does not decode: {0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("topic {0:?} does not exist; create it with `keel topic create {0}`")]
    UnknownTopic(String),
    #[error("topic {topic:?} has partitions 0..{count}, not {partition}")]
    UnknownPartition { topic: String, partition: u32, count: usize },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("this node does not hold {what}")]
    NotHosted { what: String, preferred: Option<u64> },
    #[error("{what}: {error}")]
    Partition { what: String, error: PartitionError },
    #[error("the record batch was refused: {0}")]
    CorruptBatch(DecodeError),
    #[error("the record batch was refused: {0}")]
    InvalidBatch(String),
    #[error("batch of {size} bytes exceeds topic {topic:?}'s limit of {max}; send smaller batches or raise max_message_bytes")]
    MessageTooLarge { topic: String, size: usize, max: u32 },
    #[error("this node does not lead the cluster metadata")]
    MetadataNotLeader { leader: Option<u64> },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Storage(String),
    #[error("api {api} needs protocol version {since}; this connection speaks {version}: upgrade the client")]
    UnsupportedVersion { api: u16, since: u16, version: u16 },
    #[error("api {0} is not served on the client listener; upgrade the broker")]
    UnsupportedApi(u16),
    #[error("{0}")]
    Coordinator(#[from] crate::node::coordinator::CoordinatorError),
    /// Fault injection (tests): answer nothing and close the connection, as if the
    /// answer were lost on the way.
    #[error("the answer was dropped on purpose (fault injection)")]
    DropAnswer,
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> ApiError {
        ApiError::BadRequest(e.to_string())
    }
}

fn not_leader(cluster: &ClusterConfig, code: ErrorCode, leader: Option<u64>, what: &str) -> Reply {
    let leader_addr = leader.and_then(|l| cluster.members.iter().find(|m| m.id == l)).map(|m| m.client_addr.clone());
    let message = match (&leader_addr, code) {
        (Some(addr), _) => format!("this node does not lead {what}; node {} at {addr} does, send it there", leader.unwrap_or_default()),
        (None, ErrorCode::NotLeader) => format!("this node does not lead {what} and no leader is known yet; retry shortly"),
        (None, _) => format!("{what} has no working leader right now (election in progress, or its leader lost its quorum); retry shortly"),
    };
    let code = if leader_addr.is_some() { ErrorCode::NotLeader } else { ErrorCode::LeaderNotAvailable };
    Reply::error_with(code, message, message::encode(&NotLeader { leader_id: leader, leader_addr }))
}

impl ApiError {
    /// The wire code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_) => ErrorCode::InvalidRequest,
            ApiError::InvalidArgument(_) => ErrorCode::InvalidRequest,
            ApiError::UnknownTopic(_) => ErrorCode::UnknownTopic,
            ApiError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            ApiError::TopicExists(_) => ErrorCode::TopicAlreadyExists,
            ApiError::NotHosted { .. } | ApiError::MetadataNotLeader { .. } => ErrorCode::NotLeader,
            ApiError::CorruptBatch(_) => ErrorCode::CorruptBatch,
            ApiError::InvalidBatch(_) => ErrorCode::InvalidBatch,
            ApiError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            ApiError::Timeout(_) => ErrorCode::RequestTimedOut,
            ApiError::Fenced(_) => ErrorCode::ProducerFenced,
            ApiError::Storage(_) => ErrorCode::StorageFailed,
            ApiError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ApiError::UnsupportedApi(_) => ErrorCode::UnsupportedApi,
            ApiError::DropAnswer => ErrorCode::Unknown,
            ApiError::Coordinator(e) => match e {
                crate::node::coordinator::CoordinatorError::UnknownMember { .. } => ErrorCode::UnknownMember,
                crate::node::coordinator::CoordinatorError::Invalid(_) | crate::node::coordinator::CoordinatorError::Full(_) => ErrorCode::InvalidRequest,
            },
            ApiError::Partition { error, .. } => match error {
                PartitionError::NotLeader { .. } => ErrorCode::NotLeader,
                PartitionError::LeaderNotReady => ErrorCode::LeaderNotAvailable,
                PartitionError::Throttled { .. } => ErrorCode::Throttled,
                PartitionError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
                PartitionError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
                PartitionError::DuplicateMessageIds(_) => ErrorCode::DuplicateMessageIds,
                PartitionError::InvalidBatch(_) => ErrorCode::InvalidBatch,
                PartitionError::TimedOut | PartitionError::OutcomeUnknown { .. } => ErrorCode::RequestTimedOut,
                PartitionError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
                PartitionError::Deleted => ErrorCode::UnknownTopic,
                PartitionError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
                PartitionError::Storage(_) => ErrorCode::StorageFailed,
                PartitionError::StorageFull(_) => ErrorCode::StorageFull,
            },
        }
    }

    /// The wire answer: code, a message saying what failed and what to do, and the
    /// code's body where it has one.
    pub fn into_reply(self, cluster: &ClusterConfig) -> Reply {
        let code = self.code();
        match self {
            ApiError::NotHosted { what, preferred } => not_leader(cluster, ErrorCode::NotLeader, preferred, &what),
            ApiError::MetadataNotLeader { leader } => not_leader(cluster, ErrorCode::NotLeader, leader, "the cluster metadata"),
            ApiError::Partition { what, error } => match error {
                PartitionError::NotLeader { leader } => not_leader(cluster, ErrorCode::NotLeader, leader, &what),
                PartitionError::LeaderNotReady => not_leader(cluster, ErrorCode::LeaderNotAvailable, None, &what),
                PartitionError::Throttled { retry_after_ms, detail, .. } => {
                    Reply::error_with(code, format!("{what}: {detail}; retry in {retry_after_ms} ms"), message::encode(&Throttled { retry_after_ms }))
                }
                PartitionError::DuplicateMessageIds(records) => Reply::error_with(
                    code,
                    format!("{what}: {} records carry message ids already stored; nothing was written, resend the batch without them", records.len()),
                    message::encode(&DuplicateMessageIds { records }),
                ),
                PartitionError::OutOfOrderSequence { expected, got } => Reply::error(
                    code,
                    format!("{what}: batch sequence {got} is out of order, the next expected is {expected}; an earlier batch was not stored (the client resends in order or starts a new epoch)"),
                ),
                PartitionError::ProducerFenced { epoch, current } => {
                    Reply::error(code, format!("{what}: producer epoch {epoch} is fenced by epoch {current}: a newer instance of this producer exists; stop this one"))
                }
                PartitionError::TimedOut => Reply::error(code, format!("{what}: the write did not commit in time; its outcome is unknown, retry (idempotent producers make it safe)")),
                PartitionError::OutcomeUnknown { leader } => Reply::error(
                    code,
                    format!("{what}: this node stopped leading before the write was answered (leader now {leader:?}); its outcome is unknown, retry (idempotent producers make it safe)"),
                ),
                PartitionError::Deleted => Reply::error(code, format!("{what}: the topic was deleted")),
                PartitionError::OffsetOutOfRange { offset, start, end } if offset < start => Reply::error_with(
                    code,
                    format!("offset {offset} of {what} was deleted by retention; the earliest is {start}"),
                    message::encode(&OutOfRange { log_start_offset: start, high_watermark: end }),
                ),
                PartitionError::OffsetOutOfRange { offset, start, end } => Reply::error_with(
                    code,
                    format!("offset {offset} is past the end of {what} ({end}); seek to the latest offset"),
                    message::encode(&OutOfRange { log_start_offset: start, high_watermark: end }),
                ),
                other => Reply::error(code, format!("{what}: {other}")),
            },
            other => Reply::error(code, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by keel-jepsen, W3): a write whose leader lost leadership while
    /// it was in flight may still commit under the next leader. It was answered
    /// `NotLeader`, which the client treats as definitely not written, and the checker
    /// flagged the later-read write as an aborted read. It must be an unknown outcome.
    #[test]
    fn a_write_lost_with_the_leadership_is_answered_as_an_unknown_outcome_never_not_leader() {
        for leader in [None, Some(2)] {
            let e = ApiError::Partition { what: "produce to t/0".into(), error: PartitionError::OutcomeUnknown { leader } };
            assert_eq!(e.code(), ErrorCode::RequestTimedOut, "leader hint {leader:?}");
            assert!(!e.code().is_definite(), "the client must not treat it as definitely not written");
        }
        let refused = ApiError::Partition { what: "produce to t/0".into(), error: PartitionError::NotLeader { leader: Some(2) } };
        assert!(refused.code().is_definite(), "NotLeader before proposing stays a definite refusal");
    }
}
