//! openraft's own storage test suite (`openraft::testing::log::Suite`) against the
//! Keel adapter: the real segment store, a real flusher thread, files in a temp dir.

use std::sync::Arc;

use keel_broker::replication::{PartitionLogStore, PartitionStateMachine, TypeConfig};
use keel_storage::{Flusher, Log, LogConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct KeelStoreBuilder;

impl StoreBuilder<TypeConfig, PartitionLogStore, PartitionStateMachine, tempfile::TempDir> for KeelStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, PartitionLogStore, PartitionStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        // Small segments so the suite's logs span several files.
        let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
        let log = Arc::new(Log::open(dir.path(), config).expect("open log"));
        let flusher = Arc::new(Flusher::spawn("test-flusher", 64).expect("spawn flusher"));
        let store = PartitionLogStore::new(log, flusher);
        let sm = PartitionStateMachine::open(keel_storage::disk::os(), dir.path().to_path_buf()).expect("open state machine");
        Ok((dir, store, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_against_the_segment_log() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(KeelStoreBuilder).await
}
