//! Every storage limit and default, in one place, with what happens past it.

use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Largest payload of one log entry. Appending a larger one fails with
/// `StorageError::EntryTooLarge`; recovery treats a larger declared length as damage.
/// Above the protocol's 8 MiB batch limit so any valid batch fits.
pub const ENTRY_PAYLOAD_SIZE_MAX: u64 = 16 * MIB;

/// Default size at which the active segment is sealed and a new one started.
pub const SEGMENT_BYTES_DEFAULT: u64 = 128 * MIB;
/// Smallest segment size `LogConfig::validate` accepts (tests use small segments).
pub const SEGMENT_BYTES_MIN: u64 = 4 * KIB;
/// Largest segment size. Recovery may hold the unscanned tail of one segment in memory
/// while it looks for proof of durable damage, so this bounds that allocation.
pub const SEGMENT_BYTES_MAX: u64 = 1024 * MIB;

/// Default age after which a non-empty active segment is rolled, so retention by time
/// can delete it.
pub const SEGMENT_AGE_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default spacing of sparse index rows: one row per this many bytes of entries.
/// Smaller = faster lookups, bigger indexes.
pub const INDEX_INTERVAL_BYTES_DEFAULT: u64 = 4 * KIB;

/// Default byte budget of the in-memory tail cache of recently appended entries
/// (serves replication and the state machine without touching disk). Entries not yet
/// written to the file are always cached, beyond this budget, until written.
pub const TAIL_CACHE_BYTES_DEFAULT: u64 = 32 * MIB;

/// Most bytes of appended-but-unwritten entries a log holds. Past it, `append`
/// writes the pending entries to the file itself (no fsync) before accepting more,
/// so memory stays bounded even if nobody flushes.
pub const PENDING_BYTES_MAX: u64 = 64 * MIB;

/// Largest single read from a segment file when serving a range read.
pub const READ_CHUNK_BYTES_MAX: u64 = 8 * MIB;

/// First read of a lookup by offset or time (`Log::index_for_offset`, …) from the
/// sparse index's floor; each further read doubles, up to `READ_CHUNK_BYTES_MAX`.
pub const FIND_CHUNK_BYTES_MIN: u64 = 64 * KIB;

/// Default capacity of each `Flusher` lane's request queue. Full: `submit` blocks the
/// caller (backpressure on the Raft core), it never drops a request.
pub const FLUSH_QUEUE_CAPACITY_DEFAULT: usize = 4096;

/// Default number of `Flusher` lanes (threads, each flushing its logs in turn): logs on
/// different lanes are fsynced in parallel.
pub const FLUSH_LANES_DEFAULT: usize = 4;

const _: () = assert!(SEGMENT_BYTES_MIN < SEGMENT_BYTES_DEFAULT && SEGMENT_BYTES_DEFAULT <= SEGMENT_BYTES_MAX);
const _: () = assert!(ENTRY_PAYLOAD_SIZE_MAX <= READ_CHUNK_BYTES_MAX * 2);
const _: () = assert!(INDEX_INTERVAL_BYTES_DEFAULT < SEGMENT_BYTES_MIN * 2);
const _: () = assert!(PENDING_BYTES_MAX >= ENTRY_PAYLOAD_SIZE_MAX);
