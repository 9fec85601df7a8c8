//! A single-node Raft group commits record batches through the segment log, and after
//! a restart (new Raft, same directory) the entries, offsets and high watermark are back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_broker::replication::config::partition_raft_config;
use keel_broker::replication::state_machine::PartitionSnapshot;
use keel_broker::replication::{EntryData, PartitionLogStore, PartitionStateMachine, RecordBatch, TypeConfig};
use keel_protocol::batch::{BatchBuilder, BatchOptions, BatchView, NewRecord};
use keel_storage::{Flusher, Log, LogConfig};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, Raft};

/// A one-node group never sends an RPC; any attempt is a test failure made visible.
struct NoPeers;
struct NoPeer;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeer;
    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoPeer {
        NoPeer
    }
}

impl RaftNetworkV2<TypeConfig> for NoPeer {
    type SnapshotData = PartitionSnapshot;
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _o: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(Unreachable::from_string("single-node test has no peers")))
    }
    async fn vote(&mut self, _rpc: VoteRequest<TypeConfig>, _o: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(Unreachable::from_string("single-node test has no peers")))
    }
    async fn full_snapshot(
        &mut self,
        _vote: openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>,
        _snapshot: openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, BasicNode, PartitionSnapshot>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _o: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(Unreachable::from_string("single-node test has no peers")))
    }
}

fn batch(i: u32, records: u32) -> RecordBatch {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    for r in 0..records {
        let value = format!("batch {i} record {r}");
        b.push(NewRecord { timestamp_ms: 1_700_000_000_000 + i64::from(i), key: Some(b"k"), value: Some(value.as_bytes()), headers: &[], message_id: None })
            .unwrap();
    }
    RecordBatch(b.finish().unwrap())
}

async fn start(dir: &std::path::Path) -> (Raft<TypeConfig, PartitionStateMachine>, Arc<Log>, tokio::sync::watch::Receiver<u64>) {
    let log = Arc::new(Log::open(dir, LogConfig { segment_bytes: 64 * 1024, ..LogConfig::default() }).unwrap());
    let flusher = Arc::new(Flusher::spawn("flusher", 64).unwrap());
    let store = PartitionLogStore::new(log.clone(), flusher);
    let sm = PartitionStateMachine::open(dir.to_path_buf()).unwrap();
    let hw = sm.high_watermark();
    let config = Arc::new(partition_raft_config("test").unwrap());
    let raft = Raft::new(1, config, NoPeers, store, sm).await.unwrap();
    (raft, log, hw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_group_commits_batches_and_reads_them_back_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut written: Vec<(u64, u32, Bytes)> = Vec::new();
    {
        let (raft, log, hw) = start(dir.path()).await;
        raft.initialize(BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:0"))])).await.unwrap();
        raft.wait(Some(Duration::from_secs(10))).current_leader(1, "node 1 leads").await.unwrap();
        let mut expect_offset = 0u64;
        for i in 0..40u32 {
            let records = 1 + i % 5;
            let reply = raft.client_write(EntryData::Batch(batch(i, records))).await.unwrap();
            assert_eq!(reply.data.stored_at().unwrap(), expect_offset, "offsets are assigned contiguously");
            assert!(
                matches!(reply.data, keel_broker::replication::ApplyReply::Batch(keel_broker::partition::BatchOutcome::Stored { record_count, .. }) if record_count == records)
            );
            written.push((reply.log_id.index, records, batch(i, records).0));
            expect_offset += u64::from(records);
        }
        assert_eq!(*hw.borrow(), expect_offset, "the high watermark covers every committed message");
        assert!(log.state().durable_end > written.last().unwrap().0, "committed entries are durable");
        raft.shutdown().await.unwrap();
    }
    // Restart: a new Raft over the same directory.
    let (raft, log, hw) = start(dir.path()).await;
    raft.wait(Some(Duration::from_secs(10))).current_leader(1, "node 1 leads again").await.unwrap();
    let last_index = written.last().unwrap().0;
    raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(last_index), "committed entries re-applied").await.unwrap();
    let total: u64 = written.iter().map(|w| u64::from(w.1)).sum();
    assert_eq!(*hw.borrow(), total, "the high watermark is rebuilt from the log");
    let mut offset = 0u64;
    for (index, records, original) in &written {
        let entries = log.read(*index..index + 1, u64::MAX).unwrap();
        let view = BatchView::validate(entries[0].payload.clone()).expect("the stored batch is intact");
        assert_eq!(view.header().base_offset, offset, "the stored batch carries its stamped base offset");
        assert_eq!(entries[0].meta.base_offset, offset);
        assert_eq!(&view.as_bytes()[8..], &original[8..], "apart from the stamped offset, the bytes are the producer's");
        assert_eq!(view.header().record_count, *records);
        offset += u64::from(*records);
    }
    // The log accepts new writes after the restart, continuing the offsets.
    let reply = raft.client_write(EntryData::Batch(batch(99, 2))).await.unwrap();
    assert_eq!(reply.data.stored_at().unwrap(), total);
    raft.shutdown().await.unwrap();
}
