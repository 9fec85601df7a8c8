//! Wire error codes and decode errors.
//!
//! [`ErrorCode`] is what crosses the wire: a `u16` whose meaning never changes. A
//! code is never reused: a gap in the discriminants is a retired code, not free space.
//! An unknown code received from a newer peer maps to [`ErrorCode::Unknown`], so an old
//! client still gets "something failed" instead of a decoding failure.
//!
//! [`DecodeError`] is what the sans-IO decoders return: it names the byte offset where
//! decoding failed and, where it applies, the sizes involved. It converts to the
//! `ErrorCode` a server sends back.

/// A stable wire error code. `FORMAT.md` lists every code; a test keeps the two in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Success.
    None = 0,
    /// A failure this build has no code for (including codes from a newer peer).
    Unknown = 1,
    /// A frame or request body could not be decoded.
    MalformedFrame = 2,
    /// A frame declared a body longer than the peer accepts.
    FrameTooLarge = 3,
    /// The two sides share no protocol version.
    UnsupportedVersion = 4,
    /// A record batch failed its CRC32C check.
    CorruptBatch = 5,
    /// A record batch is structurally invalid (bad header, record count, varint…).
    InvalidBatch = 6,
    /// A message or batch exceeds the size the broker accepts.
    MessageTooLarge = 7,
    /// This node does not lead the partition; the response names the leader if known.
    NotLeader = 8,
    /// No such topic.
    UnknownTopic = 9,
    /// The topic exists but not that partition.
    UnknownPartition = 10,
    /// The broker is shedding load; retry after the indicated delay.
    Throttled = 11,
    /// The request did not complete within its deadline; its outcome is unknown.
    RequestTimedOut = 12,
    /// An idempotent producer skipped sequence numbers.
    OutOfOrderSequence = 13,
    /// A newer producer epoch has been registered; this producer is fenced.
    ProducerFenced = 14,
    /// The requested offset is outside the partition's retained range.
    OffsetOutOfRange = 15,
    /// A topic by that name already exists.
    TopicAlreadyExists = 16,
    /// The request is well-formed but its arguments are invalid.
    InvalidRequest = 17,
    /// The broker's disk is full; nothing was written.
    StorageFull = 18,
    /// The broker's storage failed (e.g. fsync error) and refuses writes until restarted.
    StorageFailed = 19,
    /// No leader is known for the partition yet (election in progress).
    LeaderNotAvailable = 20,
    /// The request names an API this broker does not implement.
    UnsupportedApi = 21,
    /// Some records of the batch carry message ids already stored within the topic's
    /// dedupe window; nothing was written. The body lists them with their offsets.
    DuplicateMessageIds = 22,
    /// A stream-group member's generation is older than one that already committed:
    /// a rebalance happened; rejoin the group.
    StaleGeneration = 23,
    /// The group's coordinator does not know this member (it timed out, or the
    /// coordinator moved): join the group again.
    UnknownMember = 24,
}

impl ErrorCode {
    /// Every code, in discriminant order. Used by `from_code` and by the docs test.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::CorruptBatch,
        ErrorCode::InvalidBatch,
        ErrorCode::MessageTooLarge,
        ErrorCode::NotLeader,
        ErrorCode::UnknownTopic,
        ErrorCode::UnknownPartition,
        ErrorCode::Throttled,
        ErrorCode::RequestTimedOut,
        ErrorCode::OutOfOrderSequence,
        ErrorCode::ProducerFenced,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidRequest,
        ErrorCode::StorageFull,
        ErrorCode::StorageFailed,
        ErrorCode::LeaderNotAvailable,
        ErrorCode::UnsupportedApi,
        ErrorCode::DuplicateMessageIds,
        ErrorCode::StaleGeneration,
        ErrorCode::UnknownMember,
    ];

    /// The number sent on the wire.
    pub fn as_code(self) -> u16 {
        self as u16
    }

    /// The code for a number received from the wire; unknown numbers map to `Unknown`.
    pub fn from_code(code: u16) -> ErrorCode {
        ErrorCode::ALL.iter().copied().find(|c| c.as_code() == code).unwrap_or(ErrorCode::Unknown)
    }

    /// The stable name, as listed in `FORMAT.md`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "None",
            ErrorCode::Unknown => "Unknown",
            ErrorCode::MalformedFrame => "MalformedFrame",
            ErrorCode::FrameTooLarge => "FrameTooLarge",
            ErrorCode::UnsupportedVersion => "UnsupportedVersion",
            ErrorCode::CorruptBatch => "CorruptBatch",
            ErrorCode::InvalidBatch => "InvalidBatch",
            ErrorCode::MessageTooLarge => "MessageTooLarge",
            ErrorCode::NotLeader => "NotLeader",
            ErrorCode::UnknownTopic => "UnknownTopic",
            ErrorCode::UnknownPartition => "UnknownPartition",
            ErrorCode::Throttled => "Throttled",
            ErrorCode::RequestTimedOut => "RequestTimedOut",
            ErrorCode::OutOfOrderSequence => "OutOfOrderSequence",
            ErrorCode::ProducerFenced => "ProducerFenced",
            ErrorCode::OffsetOutOfRange => "OffsetOutOfRange",
            ErrorCode::TopicAlreadyExists => "TopicAlreadyExists",
            ErrorCode::InvalidRequest => "InvalidRequest",
            ErrorCode::StorageFull => "StorageFull",
            ErrorCode::StorageFailed => "StorageFailed",
            ErrorCode::LeaderNotAvailable => "LeaderNotAvailable",
            ErrorCode::UnsupportedApi => "UnsupportedApi",
            ErrorCode::DuplicateMessageIds => "DuplicateMessageIds",
            ErrorCode::StaleGeneration => "StaleGeneration",
            ErrorCode::UnknownMember => "UnknownMember",
        }
    }

    /// What the code means and what the user should do about it.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::None => "success",
            ErrorCode::Unknown => "the server reported an error this client does not know; upgrade the client or check the server log",
            ErrorCode::MalformedFrame => "the request could not be decoded; this is a client bug or a version mismatch, report it with the client version",
            ErrorCode::FrameTooLarge => "the request exceeds the server's frame size limit; send smaller batches",
            ErrorCode::UnsupportedVersion => "client and server share no protocol version; upgrade the older side",
            ErrorCode::CorruptBatch => "the record batch failed its checksum; it was damaged in transit or by a client bug, resend it",
            ErrorCode::InvalidBatch => "the record batch is malformed; this is a client bug, report it with the client version",
            ErrorCode::MessageTooLarge => "the batch exceeds the topic's maximum message size; send smaller messages or raise the topic limit",
            ErrorCode::NotLeader => "this node does not lead the partition; refresh metadata and retry on the leader",
            ErrorCode::UnknownTopic => "no such topic; create it first or check the name",
            ErrorCode::UnknownPartition => "the topic has no such partition; check the partition count",
            ErrorCode::Throttled => "the broker is overloaded; retry after the delay it gave",
            ErrorCode::RequestTimedOut => "the request timed out and its outcome is unknown; retry (idempotent producers make this safe)",
            ErrorCode::OutOfOrderSequence => {
                "the producer's batch sequence has a gap (an earlier batch was not stored); the client resends in order or starts a new epoch"
            }
            ErrorCode::ProducerFenced => "a newer instance of this producer registered; stop this instance",
            ErrorCode::OffsetOutOfRange => "the offset is outside the retained range; seek to the earliest or latest offset",
            ErrorCode::TopicAlreadyExists => "a topic by that name already exists; pick another name or use the existing topic",
            ErrorCode::InvalidRequest => "the request's arguments are invalid; see the message for which one",
            ErrorCode::StorageFull => "the broker's disk is full and nothing was written; free space or add capacity, then retry",
            ErrorCode::StorageFailed => "the broker's storage failed and it refuses writes; an operator must check the disk and restart the node",
            ErrorCode::LeaderNotAvailable => "the partition has no leader yet (election in progress); retry shortly",
            ErrorCode::UnsupportedApi => "the server does not implement this request; upgrade the server",
            ErrorCode::DuplicateMessageIds => {
                "some messages of the batch were already stored under the same message ids; resend the batch without them (the client does this itself)"
            }
            ErrorCode::UnknownMember => "the group's coordinator does not know this member (its session timed out or the coordinator moved); join the group again (the client does this itself)",
            ErrorCode::StaleGeneration => "the group rebalanced since this member joined; rejoin the group (the client does this itself) and commit again",
        }
    }

    /// Whether a request refused with this code definitely did not take effect (for a
    /// produce: nothing was appended). `false` means its outcome is unknown.
    pub fn is_definite(self) -> bool {
        !matches!(self, ErrorCode::RequestTimedOut | ErrorCode::StorageFailed | ErrorCode::Unknown)
    }

    /// Whether retrying the same request (possibly elsewhere, after a delay) can succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::Throttled
                | ErrorCode::RequestTimedOut
                | ErrorCode::StorageFull
                | ErrorCode::LeaderNotAvailable
                | ErrorCode::CorruptBatch
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.as_code(), self.message())
    }
}

/// Why a sans-IO decoder rejected its input. Every variant names the byte offset
/// (from the start of the buffer being decoded) where decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before a field that must be there.
    #[error("input truncated at byte {offset}: need {need} more bytes, have {have}")]
    Truncated { offset: usize, need: usize, have: usize },
    /// A declared size or count is above its limit (see `limits`).
    #[error("{what} at byte {offset} is {size}, above the limit of {max}")]
    TooLarge { offset: usize, what: &'static str, size: u64, max: u64 },
    /// A checksum does not match the bytes it covers.
    #[error("CRC32C mismatch for bytes from {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { offset: usize, stored: u32, computed: u32 },
    /// A varint runs past 10 bytes or overflows 64 bits.
    #[error("malformed varint at byte {offset}")]
    BadVarint { offset: usize },
    /// The records found do not match the record count in the header.
    #[error("batch header declares {declared} records but {found} were found (at byte {offset})")]
    CountMismatch { offset: usize, declared: u32, found: u32 },
    /// A version, magic number or kind this build does not know.
    #[error("unknown {what} {value} at byte {offset}")]
    Unknown { offset: usize, what: &'static str, value: u64 },
    /// A field holds a value that is never valid.
    #[error("invalid {what} at byte {offset}: {reason}")]
    Invalid { offset: usize, what: &'static str, reason: &'static str },
}

impl DecodeError {
    /// The byte offset where decoding failed.
    pub fn offset(&self) -> usize {
        match *self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::TooLarge { offset, .. }
            | DecodeError::BadCrc { offset, .. }
            | DecodeError::BadVarint { offset }
            | DecodeError::CountMismatch { offset, .. }
            | DecodeError::Unknown { offset, .. }
            | DecodeError::Invalid { offset, .. } => offset,
        }
    }

    /// The same error with its offset moved by `base`, for decoders nested in a frame.
    pub fn shifted(self, base: usize) -> DecodeError {
        match self {
            DecodeError::Truncated { offset, need, have } => DecodeError::Truncated { offset: offset + base, need, have },
            DecodeError::TooLarge { offset, what, size, max } => DecodeError::TooLarge { offset: offset + base, what, size, max },
            DecodeError::BadCrc { offset, stored, computed } => DecodeError::BadCrc { offset: offset + base, stored, computed },
            DecodeError::BadVarint { offset } => DecodeError::BadVarint { offset: offset + base },
            DecodeError::CountMismatch { offset, declared, found } => DecodeError::CountMismatch { offset: offset + base, declared, found },
            DecodeError::Unknown { offset, what, value } => DecodeError::Unknown { offset: offset + base, what, value },
            DecodeError::Invalid { offset, what, reason } => DecodeError::Invalid { offset: offset + base, what, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_round_trips_through_its_number() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.as_code()), code, "{code:?}");
        }
    }

    #[test]
    fn error_codes_are_listed_in_discriminant_order_without_reuse() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.as_code() as usize, i, "{code:?} is out of place in ALL");
        }
    }

    #[test]
    fn an_unknown_error_code_maps_to_unknown() {
        assert_eq!(ErrorCode::from_code(ErrorCode::ALL.len() as u16), ErrorCode::Unknown);
        assert_eq!(ErrorCode::from_code(u16::MAX), ErrorCode::Unknown);
    }

    /// FORMAT.md lists every code as `| number | Name | retriable |`; keep it true.
    #[test]
    fn format_md_lists_every_error_code_with_its_number_and_retry_class() {
        let doc = include_str!("../FORMAT.md");
        for code in ErrorCode::ALL {
            let retry = if code.is_retriable() { "yes" } else { "no" };
            let row = format!("| {} | `{}` | {} |", code.as_code(), code.name(), retry);
            assert!(doc.contains(&row), "FORMAT.md lacks the row `{row}`");
        }
    }
}
