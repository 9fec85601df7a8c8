//! Three brokers in one process, each with its own segment log, peer server and Raft
//! group, talking over loopback TCP through the multiplexed peer transport.
//!
//! Proves: a write acknowledged by the leader is on every node, byte for byte; when
//! the leader dies a new one is elected and writes continue; nothing acknowledged is
//! lost; the dead node, restarted on its old directory, catches up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_broker::peer::{GroupNetworkFactory, GroupRegistry, HostedGroup, PeerPool, PeerServer};
use keel_broker::replication::config::partition_raft_config;
use keel_broker::replication::{PartitionLogStore, PartitionStateMachine, RecordBatch, TypeConfig};
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_storage::{Flusher, Log, LogConfig};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, Raft};

const GROUP: u64 = 7;
const CLUSTER: &str = "test-cluster";

struct Node {
    id: u64,
    dir: tempfile::TempDir,
    addr: String,
    log: Arc<Log>,
    raft: Raft<TypeConfig, PartitionStateMachine>,
    hw: tokio::sync::watch::Receiver<u64>,
    _server: PeerServer,
}

async fn start_node(id: u64, dir: tempfile::TempDir, bind: &str) -> Node {
    let groups: GroupRegistry = Arc::default();
    let server = PeerServer::bind(bind, id, CLUSTER, groups.clone(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let addr = server.local_addr().to_string();
    let log = Arc::new(Log::open(dir.path(), LogConfig::default()).unwrap());
    let flusher = Arc::new(Flusher::spawn(&format!("flusher-{id}"), 1024).unwrap());
    let store = PartitionLogStore::new(log.clone(), flusher);
    let sm = PartitionStateMachine::open(keel_storage::disk::os(), dir.path().to_path_buf()).unwrap();
    let hw = sm.high_watermark();
    let network = GroupNetworkFactory::new(GROUP, PeerPool::new(id, CLUSTER), log.clone());
    let raft = Raft::new(id, Arc::new(partition_raft_config(CLUSTER).unwrap()), network, store, sm).await.unwrap();
    groups.write().unwrap().insert(GROUP, HostedGroup::new(raft.clone(), log.clone(), Default::default()));
    Node { id, dir, addr, log, raft, hw, _server: server }
}

fn batch(i: u32) -> RecordBatch {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    for r in 0..3 {
        let v = format!("message {i}.{r}");
        b.push(NewRecord {
            timestamp_ms: 1_700_000_000_000 + i64::from(i),
            key: None,
            value: Some(v.as_bytes()),
            headers: &[],
            message_id: None,
            deliver_at_ms: None,
        })
        .unwrap();
    }
    RecordBatch(b.finish().unwrap())
}

async fn wait_for_leader(nodes: &[&Node], not: Option<u64>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        for n in nodes {
            let m = n.raft.metrics().borrow_watched().clone();
            if let Some(l) = m.current_leader {
                if Some(l) != not && nodes.iter().any(|x| x.id == l) && l == n.id {
                    return l;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader elected within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `b` through whichever live node leads, retrying when leadership moves
/// (`ForwardToLeader` means the entry was not accepted, so a retry cannot duplicate);
/// returns the committed log index.
async fn write(nodes: &[&Node], b: RecordBatch) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = wait_for_leader(nodes, None, Duration::from_secs(15)).await;
        let node = nodes.iter().find(|n| n.id == leader).unwrap();
        match node.raft.client_write(keel_broker::replication::EntryData::Batch(b.clone())).await {
            Ok(reply) => return reply.log_id.index,
            Err(openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(_))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the write was not acknowledged: {e}"),
        }
    }
}

fn payloads(log: &Log, upto: u64) -> Vec<(u64, bytes::Bytes)> {
    log.read(0..upto + 1, u64::MAX).unwrap().into_iter().filter(|e| e.meta.record_count > 0).map(|e| (e.meta.base_offset, e.payload)).collect()
}

async fn wait_applied(node: &Node, index: u64) {
    node.raft.wait(Some(Duration::from_secs(15))).applied_index_at_least(Some(index), format!("node {} applies {index}", node.id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_and_catch_up_a_restarted_node() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, tempfile::tempdir().unwrap(), "127.0.0.1:0").await);
    }
    let members: BTreeMap<u64, BasicNode> = nodes.iter().map(|n| (n.id, BasicNode::new(&n.addr))).collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = wait_for_leader(&all, None, Duration::from_secs(15)).await;

    // 1. Writes acknowledged by the leader reach every node, byte for byte.
    let mut last = 0;
    let _ = leader_id;
    for i in 0..30 {
        last = write(&all, batch(i)).await;
    }
    for n in &nodes {
        wait_applied(n, last).await;
    }
    let reference = payloads(&nodes[0].log, last);
    assert_eq!(reference.len(), 30);
    for n in &nodes[1..] {
        assert_eq!(payloads(&n.log, last), reference, "node {} holds the same bytes at the same offsets", n.id);
    }
    for n in &nodes {
        assert_eq!(*n.hw.borrow(), 90, "node {}: high watermark after 30 batches of 3", n.id);
    }

    // 2. Kill the leader: its Raft stops and its peer server closes every connection.
    let dead_pos = (leader_id - 1) as usize;
    let dead = nodes.remove(dead_pos);
    let (dead_id, dead_dir, dead_addr) = (dead.id, dead.dir, dead.addr);
    dead.raft.shutdown().await.unwrap();
    drop(dead._server);
    drop(dead.log);
    let killed_at = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().collect();
    let new_leader = wait_for_leader(&survivors, Some(dead_id), Duration::from_secs(15)).await;
    let failover = killed_at.elapsed();
    for i in 30..60 {
        last = write(&survivors, batch(i)).await;
    }
    for n in &nodes {
        wait_applied(n, last).await;
        let got = payloads(&n.log, last);
        assert_eq!(got.len(), 60, "node {}: all 60 acknowledged batches present after failover", n.id);
        assert_eq!(&got[..30], &reference[..], "node {}: nothing acknowledged before the failover was lost", n.id);
    }
    eprintln!("leader {dead_id} killed; node {new_leader} led after {failover:?}");

    // 3. Restart the dead node on its old directory and address: it catches up.
    let restarted = start_node(dead_id, dead_dir, &dead_addr).await;
    wait_applied(&restarted, last).await;
    assert_eq!(payloads(&restarted.log, last), payloads(&survivors[0].log, last), "the restarted node caught up byte for byte");
    assert_eq!(*restarted.hw.borrow(), 180);

    for n in nodes.iter().chain([&restarted]) {
        n.raft.shutdown().await.unwrap();
    }
}
