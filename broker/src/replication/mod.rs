//! Replication: openraft `0.10.0-alpha.37` over Keel's storage.
//!
//! - [`types`]: the Raft type configuration and the entry payload (a record batch or a
//!   control entry).
//! - [`log_store`]: `RaftLogStorage` / `RaftLogReader` over `keel_storage::Log`, with
//!   group commit through a `Flusher` and the vote and committed index in atomic files.
//! - [`state_machine`]: the adapter that feeds committed entries to the partition fold
//!   (`crate::partition`), publishes the high watermark and the applied position, and
//!   snapshots the fold's state.
//!
//! The rules of `shared/notes/openraft.md` §2 are implemented here: appends are
//! readable before they are durable, durability is reported through the flusher in
//! submit order, the vote is written only after queued appends are flushed, a
//! truncation leaves no hole and is durable before it returns, purge persists the
//! purge point before deleting, and `read_committed` never exceeds the durable log.

pub mod config;
pub mod log_store;
pub mod runtime;
pub mod state_machine;
pub mod types;

pub use log_store::PartitionLogStore;
pub use state_machine::PartitionStateMachine;
pub use types::{ApplyReply, EntryData, RecordBatch, TypeConfig};

/// Runs blocking storage work on `disk`: on a blocking thread, off the async runtime's
/// workers; in place for a disk whose operations never block (`Disk::runs_inline`: the
/// in-memory disk, which the deterministic simulator drives from its one thread).
pub(crate) async fn storage_io<T: Send + 'static>(
    disk: &dyn keel_storage::Disk,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    if disk.runs_inline() {
        return f();
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| std::io::Error::other(format!("storage task failed: {e}")))?
}
