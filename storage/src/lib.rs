//! Keel's storage: a partition log as a directory of checksummed segments, with
//! group commit, a durable watermark, sparse indexes, crash recovery and retention.
//!
//! # Layout
//! - [`log`]: the [`Log`] — append, flush (group commit), read by index / offset /
//!   time, truncate-suffix, purge-prefix, retention.
//! - `open`: recovery when a log is opened (torn tails, stale indexes, corruption).
//! - `segment`: one segment file, its header and the scan recovery shares.
//! - `entry`: the on-disk entry format and its checksum.
//! - `index`: sparse offset and time indexes, memory-mapped once a segment is sealed.
//! - [`watermark`]: how durability is published to waiters.
//! - [`flusher`]: a thread that flushes logs and completes callbacks in order.
//! - [`ledger`]: the ack ledger, a node's record of what each log reported durable,
//!   kept apart from the segments so a damaged tail is noticed.
//! - [`tail_cache`]: the node-wide byte budget the logs' tail caches share.
//! - [`atomic_file`]: small metadata files replaced atomically.
//! - [`slot_file`]: small records rewritten in place, two slots (the Raft vote and
//!   hints), without a new inode per write.
//! - [`disk`]: the I/O seam every file operation goes through: the OS, an in-memory
//!   disk that can lose power, and a lazy OS disk for power-loss tests.
//! - [`config`], [`limits`], [`error`].
//!
//! `DESIGN.md` next to this crate gives the byte layouts, the numbered invariants and
//! what is assumed of the file system.
//!
//! **Architecture invariant:** storage knows nothing of Raft, the network or the wire
//! format. Terms and indexes are opaque numbers with ordering rules; payloads are bytes.

pub mod atomic_file;
pub mod config;
pub mod disk;
mod entry;
pub mod error;
pub mod flusher;
mod index;
pub mod ledger;
pub mod limits;
pub mod log;
pub mod observe;
mod open;
mod segment;
pub mod slot_file;
mod sync;
pub mod tail_cache;
pub mod watermark;

pub use config::{FsyncPolicy, LogConfig, Retention};
pub use disk::{Disk, DiskFile};
pub use entry::{Entry, EntryMeta, LogId, ENTRY_HEADER_LEN};
pub use error::StorageError;
pub use flusher::Flusher;
pub use ledger::{AckLedger, Acked};
pub use log::{IoStats, Log, LogState, SegmentExtent};
pub use open::DamageFound;
pub use segment::SEGMENT_HEADER_LEN;
pub use tail_cache::TailCacheShare;
