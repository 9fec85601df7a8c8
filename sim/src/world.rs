//! The simulated cluster: three nodes, each with its own in-memory disk holding one
//! replica of every group (real `Log`, `PartitionLogStore`, `PartitionStateMachine`,
//! an inline flusher), and a crash that loses what the disk had not synced.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_broker::replication::config::partition_raft_config;
use keel_broker::replication::types::RaftLogId;
use keel_broker::replication::{PartitionLogStore, PartitionStateMachine};
use keel_storage::disk::MemoryDisk;
use keel_storage::{Disk, Flusher, Log, LogConfig};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::BasicNode;

use crate::network::{GroupId, Net, NetFactory, NodeId, SimRaft};

pub const NODES: [NodeId; 3] = [1, 2, 3];
/// Flush requests a node's flusher holds between rounds (a full queue runs a round).
const FLUSH_QUEUE_CAPACITY: usize = 1024;

/// One replica of one group on a live node.
#[derive(Clone)]
pub struct Replica {
    pub log: Arc<Log>,
    pub raft: SimRaft,
    pub applied: tokio::sync::watch::Receiver<Option<RaftLogId>>,
}

struct NodeState {
    disk: Arc<MemoryDisk>,
    /// `None` while the node is down.
    replicas: Option<BTreeMap<GroupId, Replica>>,
    /// Bumped by every restart, so checks know a replica's state was rebuilt.
    incarnation: u64,
    /// The task that runs the node's flusher rounds while it is up.
    flushing: Option<tokio::task::JoinHandle<()>>,
    /// While set, the node's disk runs no flush rounds (a stalled disk).
    stalled: Arc<AtomicBool>,
}

pub struct World {
    pub net: Arc<Net>,
    seed: u64,
    pub groups: Vec<GroupId>,
    nodes: Mutex<BTreeMap<NodeId, NodeState>>,
    config: Arc<openraft::Config>,
}

fn group_dir(group: GroupId) -> PathBuf {
    PathBuf::from(format!("/keel/groups/{group:020}"))
}

impl World {
    pub fn new(net: Arc<Net>, groups: u64, seed: u64) -> anyhow::Result<World> {
        let nodes = NODES
            .iter()
            .map(|n| (*n, NodeState { disk: Arc::new(MemoryDisk::new()), replicas: None, incarnation: 0, flushing: None, stalled: Arc::default() }))
            .collect();
        Ok(World { net, seed, groups: (1..=groups).collect(), nodes: Mutex::new(nodes), config: Arc::new(partition_raft_config("sim")?) })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<NodeId, NodeState>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts every replica of `node` from what its disk holds.
    pub async fn start(&self, node: NodeId) -> anyhow::Result<()> {
        let disk = self.lock()[&node].disk.clone();
        let flusher = Arc::new(Flusher::manual(FLUSH_QUEUE_CAPACITY, None));
        let mut replicas = BTreeMap::new();
        for &group in &self.groups {
            let dir = group_dir(group);
            disk.create_dir_all(&dir)?;
            let log = Arc::new(Log::open_on(disk.clone(), &dir, LogConfig::default())?);
            let store = PartitionLogStore::new(log.clone(), flusher.clone());
            let sm = PartitionStateMachine::open(disk.clone(), dir)?;
            let applied = sm.shared().applied();
            let factory = NetFactory { net: self.net.clone(), node, group };
            let raft = SimRaft::new(node, self.config.clone(), factory, store, sm).await?;
            self.net.attach(node, group, raft.clone());
            replicas.insert(group, Replica { log, raft, applied });
        }
        let mut nodes = self.lock();
        let st = nodes.get_mut(&node).expect("a simulated node");
        st.replicas = Some(replicas);
        st.incarnation += 1;
        // The node's disk syncs every 0–4 ms: appends wait for it before they count as
        // durable, and a crash between an append and its round loses the append.
        let mut rng = fastrand::Rng::with_seed(self.seed ^ (node << 32) ^ st.incarnation);
        let stalled = st.stalled.clone();
        st.flushing = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_micros(rng.u64(0..=4000))).await;
                if !stalled.load(Ordering::Relaxed) {
                    flusher.run_queued();
                }
            }
        }));
        Ok(())
    }

    /// Makes the three nodes one cluster per group (node 1 initializes every group).
    pub async fn initialize(&self) -> anyhow::Result<()> {
        let members: BTreeMap<NodeId, BasicNode> = NODES.iter().map(|n| (*n, BasicNode::new(format!("sim-{n}")))).collect();
        for &group in &self.groups {
            let raft = self.replica(1, group).expect("node 1 is up").raft;
            raft.initialize(members.clone()).await?;
        }
        Ok(())
    }

    /// Kills `node` at once and cuts its power: every replica stops, and its disk keeps
    /// what was synced plus, of each file's unsynced appends, the prefix `keep` picks
    /// (a torn write). Returns false if it was already down.
    pub async fn crash(&self, node: NodeId, keep: impl FnMut(&std::path::Path, u64) -> u64) -> bool {
        let (replicas, disk, flushing) = {
            let mut nodes = self.lock();
            let st = nodes.get_mut(&node).expect("a simulated node");
            (st.replicas.take(), st.disk.clone(), st.flushing.take())
        };
        if let Some(f) = flushing {
            f.abort();
        }
        let Some(replicas) = replicas else { return false };
        self.net.detach_node(node);
        for (_, r) in replicas {
            let _ = r.raft.shutdown().await;
        }
        disk.power_loss_keeping(keep);
        true
    }

    /// Stalls (or resumes) `node`'s disk: while stalled, its appends are written to
    /// nothing durable and its flush callbacks wait, as with a disk that stops answering.
    pub fn stall_disk(&self, node: NodeId, stalled: bool) {
        self.lock()[&node].stalled.store(stalled, Ordering::Relaxed);
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.lock()[&node].replicas.is_some()
    }

    pub fn incarnation(&self, node: NodeId) -> u64 {
        self.lock()[&node].incarnation
    }

    pub fn replica(&self, node: NodeId, group: GroupId) -> Option<Replica> {
        self.lock()[&node].replicas.as_ref().and_then(|r| r.get(&group).cloned())
    }

    /// The live replica of `group` that believes it leads, if any (lowest node first).
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        NODES.iter().copied().find(|n| self.replica(*n, group).is_some_and(|r| r.raft.metrics().borrow_watched().current_leader == Some(*n)))
    }

    /// Stops every replica (end of a run).
    pub async fn shutdown(&self) {
        for n in NODES {
            let (replicas, flushing) = self.lock().get_mut(&n).map(|s| (s.replicas.take(), s.flushing.take())).unwrap_or_default();
            if let Some(f) = flushing {
                f.abort();
            }
            for (_, r) in replicas.into_iter().flatten() {
                let _ = r.raft.shutdown().await;
            }
        }
    }
}
