//! A single-node Raft group commits record batches through the segment log, and after
//! a restart (new Raft, same directory) the entries, offsets and high watermark are back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_broker::partition::{BatchOutcome, ControlCommand, ControlEntry, PartitionConfig};
use keel_broker::replication::config::partition_raft_config;
use keel_broker::replication::state_machine::{PartitionShared, PartitionSnapshot};
use keel_broker::replication::ApplyReply;
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
        b.push(NewRecord {
            timestamp_ms: 1_700_000_000_000 + i64::from(i),
            key: Some(b"k"),
            value: Some(value.as_bytes()),
            headers: &[],
            message_id: None,
            deliver_at_ms: None,
        })
        .unwrap();
    }
    RecordBatch(b.finish().unwrap())
}

async fn start(dir: &std::path::Path) -> (Raft<TypeConfig, PartitionStateMachine>, Arc<Log>, tokio::sync::watch::Receiver<u64>) {
    let (raft, log, hw, _) = start_with_state(dir).await;
    (raft, log, hw)
}

type Started = (Raft<TypeConfig, PartitionStateMachine>, Arc<Log>, tokio::sync::watch::Receiver<u64>, Arc<PartitionShared>);

async fn start_with_state(dir: &std::path::Path) -> Started {
    let log = Arc::new(Log::open(dir, LogConfig { segment_bytes: 64 * 1024, ..LogConfig::default() }).unwrap());
    let flusher = Arc::new(Flusher::spawn("flusher", 64).unwrap());
    let store = PartitionLogStore::new(log.clone(), flusher);
    let sm = PartitionStateMachine::open(keel_storage::disk::os(), dir.to_path_buf()).unwrap();
    let hw = sm.high_watermark();
    let shared = sm.shared();
    let config = Arc::new(partition_raft_config("test").unwrap());
    let raft = Raft::new(1, config, NoPeers, store, sm).await.unwrap();
    (raft, log, hw, shared)
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

fn idempotent_batch(sequence: i32, message_id: &str) -> EntryData {
    let options = BatchOptions { producer_id: 7, producer_epoch: 0, base_sequence: sequence, ..BatchOptions::default() };
    let mut b = BatchBuilder::new(options).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(b"v"), message_id: Some(message_id.as_bytes()), ..NewRecord::default() }).unwrap();
    EntryData::batch(b.finish().unwrap())
}

/// The partition fold's state (producer table, message-id window, clock, settings)
/// comes back from a snapshot after a restart: entries the snapshot covers are not
/// applied again, so without the snapshot's state a retry would be stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_state_comes_back_from_a_snapshot_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot_index;
    {
        let (raft, _log, _hw, shared) = start_with_state(dir.path()).await;
        raft.initialize(BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:0"))])).await.unwrap();
        raft.wait(Some(Duration::from_secs(10))).current_leader(1, "node 1 leads").await.unwrap();
        let configure =
            ControlEntry { leader_time_ms: 5_000, command: ControlCommand::Configure(PartitionConfig { id_key: [4; 16], ..PartitionConfig::default() }) };
        raft.client_write(EntryData::control(&configure)).await.unwrap();
        for seq in 0..4 {
            let reply = raft.client_write(idempotent_batch(seq, &format!("id-{seq}"))).await.unwrap();
            assert!(matches!(reply.data, ApplyReply::Batch(BatchOutcome::Stored { .. })), "{:?}", reply.data);
        }
        raft.trigger().snapshot().await.unwrap();
        let m = raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.snapshot.is_some(), "a snapshot is built").await.unwrap();
        snapshot_index = m.snapshot.unwrap().index;
        let before = shared.state().clone();
        assert_eq!(before.producers.get(7).map(|p| p.last_sequence), Some(3));
        // Purge what the snapshot covers, so only the snapshot can give the state back.
        raft.trigger().purge_log(snapshot_index).await.unwrap();
        raft.wait(Some(Duration::from_secs(10))).purged(Some(openraft::LogId::new_term_index(1, snapshot_index)), "purged").await.ok();
        raft.shutdown().await.unwrap();
    }
    let (raft, log, hw, shared) = start_with_state(dir.path()).await;
    assert!(log.state().first_index > snapshot_index, "the entries the snapshot covers are gone from the log");
    raft.wait(Some(Duration::from_secs(10))).current_leader(1, "node 1 leads again").await.unwrap();
    {
        let st = shared.state();
        assert_eq!(st.producers.get(7).map(|p| p.last_sequence), Some(3), "the producer table is back");
        assert_eq!(st.message_ids.len(), 4, "the message-id window is back");
        assert_eq!((st.clock_ms, st.config.id_key), (5_000, [4; 16]), "the clock and the settings are back");
    }
    assert_eq!(*hw.borrow(), 4);
    // A retry of a batch the snapshot covers is recognised; the next sequence is stored.
    let retry = raft.client_write(idempotent_batch(2, "id-2")).await.unwrap();
    assert!(matches!(retry.data, ApplyReply::Batch(BatchOutcome::Duplicate(_))), "{:?}", retry.data);
    assert!(retry.log_id.index > snapshot_index);
    let next = raft.client_write(idempotent_batch(4, "id-4")).await.unwrap();
    assert!(matches!(next.data, ApplyReply::Batch(BatchOutcome::Stored { .. })), "{:?}", next.data);
    raft.shutdown().await.unwrap();
}
