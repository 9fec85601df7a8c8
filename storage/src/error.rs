//! Storage errors. Callers branch on these, so each variant is one kind of failure.

use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O call failed. If it was a write or sync, the log is now poisoned.
    #[error("I/O error during {op} on {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// An earlier write or fsync failed; the log refuses all further writes and flushes
    /// until it is reopened. Never retried silently: the kernel may have dropped the
    /// dirty pages, so a later successful fsync would prove nothing.
    #[error("log at {path} is poisoned by an earlier I/O failure ({cause}); restart the node after checking the disk")]
    Poisoned { path: PathBuf, cause: String },
    /// Bytes on disk fail their checksum or break an invariant. Nothing was changed.
    #[error("corrupt data in {path} at byte {position}: {reason}; restore this replica from its peers")]
    Corrupt { path: PathBuf, position: u64, reason: String },
    /// The caller broke the append contract (index gap, offset gap, term going down).
    #[error("invalid append: {reason}")]
    InvalidAppend { reason: String },
    /// An entry payload exceeds `ENTRY_PAYLOAD_SIZE_MAX`.
    #[error("entry payload of {size} bytes exceeds the limit of {max} bytes")]
    EntryTooLarge { size: u64, max: u64 },
    /// The requested entries were purged (retention) and are gone.
    #[error("entries up to index {purged} were purged; requested index {requested}")]
    Purged { requested: u64, purged: u64 },
    /// A configuration value is out of range.
    #[error("invalid log configuration: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The flusher has shut down.
    #[error("the flusher thread has stopped; the node is shutting down")]
    FlusherStopped,
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> StorageError {
        StorageError::Io { op, path: path.into(), source }
    }

    /// Whether this failure means the disk is full (the caller may retry later).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

/// Converts to `std::io::Error` for interfaces (openraft) that take only that.
impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> std::io::Error {
        match e {
            StorageError::Io { source, op, path } => std::io::Error::new(source.kind(), format!("{op} on {}: {source}", path.display())),
            other => std::io::Error::other(other.to_string()),
        }
    }
}
