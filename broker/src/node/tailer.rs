//! The metadata tailer: folds newly committed metadata-log records into the node's
//! `MetadataState` and publishes each new state.

use std::sync::Arc;

use keel_protocol::BatchView;
use tokio::sync::watch;

use super::group::GroupHandle;
use super::limits::METADATA_READ_BYTES;
use crate::metadata::{MetadataCommand, MetadataState};
use crate::replication::log_store::KIND_BATCH;

/// Runs until the metadata group's high watermark channel closes.
pub async fn run(metadata: GroupHandle, publish: watch::Sender<Arc<MetadataState>>) {
    let mut hw = metadata.high_watermark.clone();
    let mut state = MetadataState::default();
    let mut next_index = 0u64;
    loop {
        let committed = *hw.borrow_and_update();
        while state.applied_offset < committed {
            let log = metadata.log.clone();
            let from = next_index;
            let entries = match tokio::task::spawn_blocking(move || log.read(from..u64::MAX, METADATA_READ_BYTES)).await {
                Ok(Ok(entries)) => entries,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading the metadata log failed; metadata stops advancing on this node");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "metadata read task failed");
                    return;
                }
            };
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                if entry.meta.end_offset() > committed {
                    break;
                }
                next_index = entry.meta.id.index + 1;
                if entry.meta.kind != KIND_BATCH || entry.meta.base_offset < state.applied_offset {
                    continue;
                }
                let commands =
                    BatchView::parse(entry.payload).map_err(|e| e.to_string()).and_then(|b| MetadataCommand::from_batch(&b).map_err(|e| e.to_string()));
                match commands {
                    Ok(commands) => {
                        for (offset, cmd) in commands {
                            if let Err(rejected) = state.apply(offset, &cmd) {
                                tracing::info!(offset, %rejected, "metadata command rejected by the fold");
                            }
                        }
                    }
                    Err(e) => {
                        // Committed bytes that do not decode mean a bug or corruption;
                        // folding past them would diverge from other nodes.
                        tracing::error!(error = %e, "undecodable committed metadata record; metadata stops advancing on this node");
                        return;
                    }
                }
            }
            publish.send_replace(Arc::new(state.clone()));
        }
        if hw.changed().await.is_err() {
            return;
        }
    }
}
