//! Every protocol limit, in one place.
//!
//! Each limit says what the peer sees when it is exceeded. Relationships between the
//! limits are checked at compile time at the bottom of this file, so a change that
//! breaks one (say, a batch that could no longer fit in a frame) does not build.

/// One kibibyte, for readable sizes below.
pub const KIB: usize = 1024;
/// One mebibyte.
pub const MIB: usize = 1024 * KIB;

/// Largest frame body (everything after the 4-byte length prefix) a peer may send.
///
/// Exceeded: the receiver answers `FrameTooLarge` and closes the connection before
/// reading the body, so a hostile length prefix never makes it allocate.
pub const FRAME_BODY_SIZE_MAX: usize = 16 * MIB;

/// Largest record batch, header included.
///
/// Exceeded: the client-side `BatchBuilder` refuses the record (`BuildError::BatchFull`);
/// a broker receiving a larger batch answers `MessageTooLarge`.
pub const BATCH_SIZE_MAX: usize = 8 * MIB;

/// Most records one batch may hold.
///
/// Exceeded: decoding fails with `DecodeError::TooLarge`; the builder refuses the record.
pub const BATCH_RECORD_COUNT_MAX: u32 = 1 << 20;

/// Most headers one record may carry.
///
/// Exceeded: decoding fails with `DecodeError::TooLarge`; the builder refuses the record.
pub const RECORD_HEADER_COUNT_MAX: u32 = 64;

/// Number of priority lanes a batch may name: priorities are `0..PRIORITY_LANES_MAX`.
///
/// Exceeded: decoding fails with `DecodeError::Invalid`.
pub const PRIORITY_LANES_MAX: u8 = 10;

/// Longest message id a record may carry (the `keel-message-id` header), in bytes.
///
/// Exceeded: the builder refuses the record (`BuildError::InvalidMessageId`); a broker
/// refuses the batch with `InvalidBatch`.
pub const MESSAGE_ID_LEN_MAX: usize = 256;

/// Batches an idempotent producer may have outstanding to one partition; the leader
/// remembers the last this many batches of each producer, so a retry of any of them is
/// recognised and answered with its original offsets.
///
/// Exceeded: the leader answers a further batch `Throttled` until one completes.
pub const PRODUCER_BATCHES_IN_FLIGHT_MAX: usize = 5;

/// Longest encoding of a varint (a zigzag-encoded `i64` in LEB128 groups of 7 bits).
///
/// Exceeded: decoding fails with `DecodeError::BadVarint`.
pub const VARINT_LEN_MAX: usize = 10;

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks. Version 2 added topic configurations,
/// idempotent producers and message-id dedupe; version 3 consumer groups (`FORMAT.md`,
/// "Versions").
pub const PROTOCOL_VERSION_MAX: u16 = 4;

/// Longest consumer-group name, in bytes (`[A-Za-z0-9._-]`).
///
/// Exceeded: the broker answers `InvalidRequest`.
pub const GROUP_NAME_LEN_MAX: usize = 128;

/// Longest queue-group member name, in bytes.
///
/// Exceeded: the broker answers `InvalidRequest`.
pub const MEMBER_NAME_LEN_MAX: usize = 128;

/// Most messages one queue fetch may lease (a member's credit per request).
///
/// Exceeded: the broker leases this many.
pub const QUEUE_FETCH_MESSAGES_MAX: u32 = 10_000;

/// Most items one queue settle request may carry.
///
/// Exceeded: the broker answers `InvalidRequest`; the client splits larger sets.
pub const SETTLE_ITEMS_MAX: usize = 10_000;

/// Longest error message carried in a response frame, in bytes. Longer messages are
/// cut (on a UTF-8 boundary) by the encoder, never rejected.
pub const ERROR_MESSAGE_SIZE_MAX: usize = 1024;

// A full batch, wrapped in a request envelope, must fit in one frame.
const _: () = assert!(BATCH_SIZE_MAX + 64 * KIB <= FRAME_BODY_SIZE_MAX);
// A frame length must fit the 4-byte length prefix.
const _: () = assert!(FRAME_BODY_SIZE_MAX <= u32::MAX as usize);
// Every record needs at least one byte, so the count bound is reachable within the size bound.
const _: () = assert!(BATCH_RECORD_COUNT_MAX as usize <= BATCH_SIZE_MAX);
const _: () = assert!(PROTOCOL_VERSION_MIN <= PROTOCOL_VERSION_MAX);
const _: () = assert!(PRIORITY_LANES_MAX >= 1 && PRIORITY_LANES_MAX <= 10);

/// Frames of at least this many bytes (a produce request's batch) are handed out in an
/// allocation of their own rather than split from the connection's read buffer, so the
/// broker can write into the batch (its offset stamp) without copying it...
pub const OWN_BUFFER_FRAME_MIN: usize = 64 * 1024;
/// ...when at most this many bytes past the frame were read with it (copied to a new
/// read buffer); with more, the frame is split off as usual.
pub const OWN_BUFFER_REMAINDER_MAX: usize = 16 * 1024;
