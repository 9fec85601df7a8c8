//! The partition reconciler: keeps this node's running partition groups equal to what
//! the metadata says it replicates — opening (and, as preferred leader, initializing)
//! new ones and stopping and deleting removed ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use openraft::BasicNode;
use tokio::sync::watch;

use super::group::{initialize_if_new, open_group, GroupContext, GroupHandle};
use crate::config::ClusterConfig;
use crate::metadata::MetadataState;

/// A partition hosted on this node.
#[derive(Clone)]
pub struct HostedPartition {
    pub topic: String,
    pub partition: u32,
    pub replicas: Vec<u64>,
    pub group: GroupHandle,
}

/// Partitions hosted here, by group id.
pub type HostedPartitions = Arc<RwLock<HashMap<u64, HostedPartition>>>;

/// Runs until the metadata channel closes.
pub async fn run(ctx: Arc<GroupContext>, cluster: ClusterConfig, mut metadata: watch::Receiver<Arc<MetadataState>>, hosted: HostedPartitions) {
    loop {
        let state = metadata.borrow_and_update().clone();
        let wanted = state.groups_of(ctx.node_id);
        for (topic, p) in &wanted {
            if hosted.read().expect("hosted lock poisoned").contains_key(&p.group) {
                continue;
            }
            match open_group(&ctx, p.group).await {
                Ok(group) => {
                    if p.replicas.first() == Some(&ctx.node_id) {
                        let members: BTreeMap<u64, BasicNode> = p
                            .replicas
                            .iter()
                            .filter_map(|id| cluster.members.iter().find(|m| m.id == *id).map(|m| (*id, BasicNode::new(&m.peer_addr))))
                            .collect();
                        if let Err(e) = initialize_if_new(&group, members).await {
                            tracing::error!(group = p.group, error = %e, "could not initialize a partition group");
                        }
                    }
                    hosted
                        .write()
                        .expect("hosted lock poisoned")
                        .insert(p.group, HostedPartition { topic: topic.clone(), partition: p.partition, replicas: p.replicas.clone(), group });
                }
                Err(e) => tracing::error!(group = p.group, error = %e, "could not open a partition group"),
            }
        }
        let wanted_groups: Vec<u64> = wanted.iter().map(|(_, p)| p.group).collect();
        let removed: Vec<HostedPartition> = {
            let mut hosted = hosted.write().expect("hosted lock poisoned");
            let gone: Vec<u64> = hosted.keys().copied().filter(|g| !wanted_groups.contains(g)).collect();
            gone.into_iter().filter_map(|g| hosted.remove(&g)).collect()
        };
        for p in removed {
            ctx.registry.write().expect("group registry lock poisoned").remove(&p.group.id);
            let _ = p.group.raft.shutdown().await;
            let dir = p.group.dir.clone();
            drop(p);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not delete a deleted topic's partition data");
            }
        }
        if metadata.changed().await.is_err() {
            return;
        }
    }
}
