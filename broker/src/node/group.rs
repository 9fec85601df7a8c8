//! Opening one Raft group of this node (the metadata group or a partition's) over its
//! own directory: `<data_dir>/groups/<group:020>/`.

use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::{Flusher, Log, LogConfig};
use tokio::sync::watch;

use crate::peer::{GroupNetworkFactory, GroupRaft, GroupRegistry, PeerPool};
use crate::replication::{PartitionLogStore, PartitionStateMachine};

/// What every group of a node shares.
pub struct GroupContext {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub pool: Arc<PeerPool>,
    pub registry: GroupRegistry,
    pub flusher: Arc<Flusher>,
    pub raft_config: Arc<openraft::Config>,
    pub log_config: LogConfig,
}

/// A running group on this node.
#[derive(Clone)]
pub struct GroupHandle {
    pub id: u64,
    pub raft: GroupRaft,
    pub log: Arc<Log>,
    /// Committed messages lie below this offset.
    pub high_watermark: watch::Receiver<u64>,
    pub dir: PathBuf,
}

impl GroupHandle {
    /// The current leader's node id, if known.
    pub fn leader(&self) -> Option<u64> {
        use openraft::async_runtime::watch::WatchReceiver;
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The leader, if there is one that can make progress: as seen by a follower, or —
    /// when this node leads — only while a quorum has acknowledged it within the lease
    /// (a leader cut off from its quorum keeps calling itself leader until it learns of
    /// a higher term).
    pub fn working_leader(&self) -> Option<u64> {
        use openraft::async_runtime::watch::WatchReceiver;
        let m = self.raft.metrics().borrow_watched().clone();
        let lease_ms = self.raft.config().election_timeout_max;
        match m.state {
            openraft::ServerState::Leader => {
                use openraft::Instant as _;
                m.last_quorum_acked.filter(|t| t.elapsed() <= std::time::Duration::from_millis(lease_ms)).map(|_| m.id)
            }
            _ => m.current_leader,
        }
    }
}

pub fn group_dir(data_dir: &std::path::Path, group: u64) -> PathBuf {
    data_dir.join("groups").join(format!("{group:020}"))
}

/// Opens (creating if new) group `group` and registers it with the peer server.
pub async fn open_group(ctx: &GroupContext, group: u64) -> Result<GroupHandle, String> {
    let dir = group_dir(&ctx.data_dir, group);
    let log_config = ctx.log_config.clone();
    let open_dir = dir.clone();
    let log = tokio::task::spawn_blocking(move || Log::open(&open_dir, log_config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening the log of group {group}: {e}"))?;
    let log = Arc::new(log);
    let store = PartitionLogStore::new(log.clone(), ctx.flusher.clone());
    let sm = PartitionStateMachine::open(dir.clone()).map_err(|e| format!("opening the state machine of group {group}: {e}"))?;
    let high_watermark = sm.high_watermark();
    let network = GroupNetworkFactory::new(group, ctx.pool.clone());
    let raft = GroupRaft::new(ctx.node_id, ctx.raft_config.clone(), network, store, sm).await.map_err(|e| format!("starting Raft for group {group}: {e}"))?;
    ctx.registry.write().expect("group registry lock poisoned").insert(group, raft.clone());
    Ok(GroupHandle { id: group, raft, log, high_watermark, dir })
}

/// Initializes `handle`'s group with `members` unless it already has state. Running
/// it on an initialized group is a no-op, so bootstrap can be repeated safely.
pub async fn initialize_if_new(handle: &GroupHandle, members: std::collections::BTreeMap<u64, openraft::BasicNode>) -> Result<(), String> {
    if handle.raft.is_initialized().await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    match handle.raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(format!("initializing group {}: {e}", handle.id)),
    }
}
