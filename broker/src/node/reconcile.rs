//! The partition reconciler: keeps this node's running partition groups equal to what
//! the metadata says it replicates — opening (and, as preferred leader, initializing)
//! new ones and stopping and deleting removed ones — and reopens groups a storage error
//! stopped.
//!
//! A write or fsync that fails (`ENOSPC` despite the disk-space reserve, an I/O error)
//! poisons the group's log and openraft stops the group: nothing it acknowledged is at
//! risk, but the replica is gone. Every `GROUP_HEALTH_CHECK_INTERVAL` the reconciler
//! looks for such groups and, once the disk has room (the node not full and at least
//! `GROUP_REOPEN_FREE_BYTES_MIN` free), stops them and opens them again from disk —
//! recovery cuts whatever half-written tail the failure left, and the ack ledger
//! checks that everything acknowledged is still there — at most every
//! `GROUP_REOPEN_BACKOFF` per group. The metadata group is not reopened this way (its
//! writes are few and small; a node whose metadata group stopped needs a restart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use openraft::BasicNode;
use tokio::sync::watch;

use super::group::{initialize_if_new, open_group, GroupContext, Peers, SegmentPolicy};
use super::limits::{GROUP_HEALTH_CHECK_INTERVAL, GROUP_REOPEN_BACKOFF, GROUP_REOPEN_FREE_BYTES_MIN};
use super::partition::Partition;
use super::rejoin;
use crate::config::ClusterConfig;
use crate::metadata::{MetadataState, PartitionMeta};

/// Partitions hosted here, by group id.
pub type HostedPartitions = Arc<RwLock<HashMap<u64, Arc<Partition>>>>;

/// Runs until the metadata channel closes. `refill_horizon`: see [`super::rejoin`];
/// partition groups of topics created below it are probed before they start empty.
pub async fn run(
    ctx: Arc<GroupContext>,
    cluster: ClusterConfig,
    refill_horizon: Option<u64>,
    mut metadata: watch::Receiver<Arc<MetadataState>>,
    hosted: HostedPartitions,
) {
    // Groups being opened by their own task (a probe can wait for a leader).
    let opening: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut health = tokio::time::interval(GROUP_HEALTH_CHECK_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reopened: HashMap<u64, std::time::Instant> = HashMap::new();
    loop {
        stop_failed_groups(&ctx, &hosted, &mut reopened).await;
        let state = metadata.borrow_and_update().clone();
        let wanted = state.groups_of(ctx.node_id);
        // Thousands of wanted groups are hosted already: one look under one lock.
        let missing: Vec<&(String, _)> = {
            let hosted = hosted.read().expect("hosted lock poisoned");
            wanted.iter().filter(|(_, p)| !hosted.contains_key(&p.group)).collect()
        };
        for (topic, p) in missing {
            if !opening.lock().expect("opening lock poisoned").insert(p.group) {
                continue;
            }
            let created_at = state.topics.get(topic).map_or(u64::MAX, |t| t.created_at_offset);
            let probe = match refill_horizon {
                Some(h) => created_at < h,
                None => false,
            };
            let probe = Peers { replicas: rejoin::other_peers(&cluster.members, Some(&p.replicas), ctx.node_id), probe_if_empty: probe };
            let task = open_partition(ctx.clone(), cluster.clone(), topic.clone(), p.clone(), probe, metadata.clone(), hosted.clone(), opening.clone());
            tokio::spawn(task);
        }
        let wanted_groups: HashSet<u64> = wanted.iter().map(|(_, p)| p.group).collect();
        let removed: Vec<Arc<Partition>> = {
            let mut hosted = hosted.write().expect("hosted lock poisoned");
            let gone: Vec<u64> = hosted.keys().copied().filter(|g| !wanted_groups.contains(g)).collect();
            gone.into_iter().filter_map(|g| hosted.remove(&g)).collect()
        };
        for p in removed {
            ctx.registry.write().expect("group registry lock poisoned").remove(&p.group.id);
            let _ = p.group.raft.shutdown().await;
            let (dir, p_group) = (p.group.dir.clone(), p.group.id);
            drop(p);
            if let Err(e) = remove_group_dir(&*ctx.disk, &dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not delete a deleted topic's partition data");
            }
            if let Err(e) = ctx.ledger.forget(p_group) {
                tracing::warn!(group = p_group, error = %e, "could not drop a deleted group's ack ledger record");
            }
        }
        tokio::select! {
            changed = metadata.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = health.tick() => {}
        }
    }
}

/// Stops the hosted partition groups a storage error stopped, if the disk has room to
/// reopen them now (see the module docs); the caller's next round opens them again.
async fn stop_failed_groups(ctx: &GroupContext, hosted: &HostedPartitions, reopened: &mut HashMap<u64, std::time::Instant>) {
    let failed: Vec<(u64, String)> =
        hosted.read().expect("hosted lock poisoned").values().filter_map(|p| p.group.stopped().map(|why| (p.group.id, why))).collect();
    if failed.is_empty() {
        return;
    }
    let room = !ctx.disk_space.is_full() && ctx.disk_space.free() >= GROUP_REOPEN_FREE_BYTES_MIN;
    for (group, error) in failed {
        if !room || reopened.get(&group).is_some_and(|t| t.elapsed() < GROUP_REOPEN_BACKOFF) {
            continue;
        }
        let Some(p) = hosted.write().expect("hosted lock poisoned").remove(&group) else { continue };
        ctx.registry.write().expect("group registry lock poisoned").remove(&group);
        // In a task of its own: shutting down a core that panicked can panic too.
        let raft = p.group.raft.clone();
        let _ = tokio::spawn(async move { raft.shutdown().await }).await;
        reopened.insert(group, std::time::Instant::now());
        crate::metrics::group_reopened();
        tracing::warn!(partition = %p.name(), %error, free = ctx.disk_space.free(), "reopening a partition group a storage error stopped, now that the disk has room");
    }
    reopened.retain(|_, t| t.elapsed() < GROUP_REOPEN_BACKOFF);
}

/// Opens one partition group (initializing it as preferred leader) and hosts it, unless
/// its topic was deleted meanwhile.
#[allow(clippy::too_many_arguments)]
async fn open_partition(
    ctx: Arc<GroupContext>,
    cluster: ClusterConfig,
    topic: String,
    p: PartitionMeta,
    probe: Peers,
    metadata: watch::Receiver<Arc<MetadataState>>,
    hosted: HostedPartitions,
    opening: Arc<Mutex<HashSet<u64>>>,
) {
    // The topic's segment size from the first entry on (retention would set it only at
    // its first look, and a segment begun larger could not be cut to it).
    let segments = metadata.borrow().topics.get(&topic).map(|t| SegmentPolicy::of_topic(&t.config));
    match open_group(&ctx, p.group, probe, segments).await {
        Ok((group, recovery)) => {
            if recovery.is_none() && p.replicas.first() == Some(&ctx.node_id) {
                let members: BTreeMap<u64, BasicNode> =
                    p.replicas.iter().filter_map(|id| cluster.members.iter().find(|m| m.id == *id).map(|m| (*id, BasicNode::new(&m.peer_addr)))).collect();
                if let Err(e) = initialize_if_new(&group, members).await {
                    tracing::error!(group = p.group, error = %e, "could not initialize a partition group");
                }
            }
            let still_wanted = metadata.borrow().groups_of(ctx.node_id).iter().any(|(_, w)| w.group == p.group);
            if still_wanted {
                let partition = Partition::new(topic, p.partition, p.replicas, group, ctx.node_id, metadata.clone(), ctx.disk_space.clone());
                hosted.write().expect("hosted lock poisoned").insert(p.group, Arc::new(partition));
            } else {
                // Deleted while opening: undo (the next reconcile round finds nothing to do).
                ctx.registry.write().expect("group registry lock poisoned").remove(&p.group);
                let _ = group.raft.shutdown().await;
                let _ = remove_group_dir(&*ctx.disk, &group.dir);
            }
        }
        Err(e) => {
            tracing::error!(group = p.group, error = %e, "could not open a partition group; retrying in {GROUP_REOPEN_BACKOFF:?}");
            // Still "opening" meanwhile, so the reconciler's rounds (every second) do not
            // retry it at once.
            tokio::time::sleep(GROUP_REOPEN_BACKOFF).await;
        }
    }
    opening.lock().expect("opening lock poisoned").remove(&p.group);
}

/// Deletes a group's directory, durably (a power cut must not bring it back).
fn remove_group_dir(disk: &dyn keel_storage::Disk, dir: &std::path::Path) -> std::io::Result<()> {
    disk.remove_dir_all(dir)?;
    match dir.parent() {
        Some(parent) => disk.sync_dir(parent),
        None => Ok(()),
    }
}
