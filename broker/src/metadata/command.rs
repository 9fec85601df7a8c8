//! Metadata commands, carried as single-record batches in the metadata log.

use bytes::Bytes;
use keel_protocol::batch::{BatchBuilder, BatchOptions, BatchView, NewRecord};
use serde::{Deserialize, Serialize};

/// A change to the cluster's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Create a topic; `replicas[p]` lists partition `p`'s replicas, preferred leader first.
    CreateTopic { name: String, replicas: Vec<Vec<u64>>, max_message_bytes: u32, retention_ms: u64 },
    /// Delete a topic and, on every node, its partitions' data.
    DeleteTopic { name: String },
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
        builder.push(NewRecord { timestamp_ms, key: None, value: Some(&value), headers: &[], message_id: None }).expect("a metadata command fits a batch");
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
